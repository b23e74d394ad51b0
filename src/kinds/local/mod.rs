//! Local directory volumes: one directory per volume under `--local-root`.
//!
//! Stage bind-mounts the volume's directory at the staging path; publish
//! bind-mounts the staging path into the target (read-only by remount when
//! asked).
//!
//! Sizes: when the local root's filesystem enforces project quotas, each
//! volume's directory has a project of its own whose hard limits are the
//! volume's size (`quota.rs`); stats come from the quota, and expansion
//! raises the limits, online. Elsewhere (no quota support, a filesystem
//! mounted without `prjquota`) the capacity is a promise that GetCapacity
//! accounts for, not a limit; the StorageClass parameter
//! `capacityEnforcement: required` refuses to create volumes there.
pub mod quota;
pub mod spares;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::node::mounts::{self, LazyTable};
use crate::node::staged::StagedAt;
use crate::os::files::{self, ensure_dir};
use crate::os::mountinfo;
use crate::os::{Files, Os};
use crate::state::{AccessType, Capability, Kind, Phase, SnapshotRecord, Store, VolumeRecord};

use self::quota::{Enforcement, Projects};
use self::spares::Spares;
use super::{
    judge_copy, stored_copy, CopyFlaw, Expansion, Growth, Health, NodeExpandArgs, PoolCapacity,
    PublishArgs, Source, VolumeKind, VolumeStats, Written,
};

const PREFIX: &str = "local-";
/// Snapshot ids.
const SNAP_PREFIX: &str = "local-snap-";
/// Where snapshots are kept (inside the local root).
const SNAPSHOTS: &str = ".snapshots";
/// Where restores and clones are copied before they are moved into place.
const CREATING: &str = ".creating";
/// The prefix of a copy's temporary name (`.snapshots/.partial-<id>`,
/// `.creating/.partial-<id>`).
const PARTIAL: &str = ".partial-";
/// Where deleted volumes are emptied (inside the local root).
const TRASH: &str = ".trash";
/// Where directories without a record are kept aside.
const ORPHANED: &str = ".orphaned";
/// Berth's work directories in the local root, whose contents start-up
/// removes (what no record says is in use).
pub const WORK_DIRS: [&str; 3] = [CREATING, TRASH, SNAPSHOTS];
/// The StorageClass parameter that says whether sizes must be enforced.
pub const ENFORCEMENT_KEY: &str = "capacityEnforcement";
const REQUIRED: &str = "required";
const BEST_EFFORT: &str = "bestEffort";

/// Whether the parameters require enforced sizes (`capacityEnforcement`:
/// `required`, or `bestEffort`, the default); INVALID_ARGUMENT for any
/// other value.
pub fn enforcement_required(params: &BTreeMap<String, String>) -> Result<bool> {
    match params.get(ENFORCEMENT_KEY).map(String::as_str) {
        None | Some(BEST_EFFORT) => Ok(false),
        Some(REQUIRED) => Ok(true),
        Some(v) => Err(Error::Invalid(format!(
            "parameter {ENFORCEMENT_KEY}: {v:?} is neither {REQUIRED:?} nor {BEST_EFFORT:?}"
        ))),
    }
}

/// The size of a volume of `current` bytes grown to at least `required`
/// (0: no minimum) and at most `limit` (0: none). Never smaller than now:
/// a `limit` below the current size is OUT_OF_RANGE (a shrink).
pub fn grown_size(current: i64, required: i64, limit: i64) -> Result<i64> {
    let size = required.max(current);
    if limit > 0 && size > limit {
        return Err(Error::BadSize(format!(
            "the volume would be {size} bytes (it has {current}; volumes never shrink), more than limit_bytes {limit}"
        )));
    }
    Ok(size)
}

/// A failed copy: no room is RESOURCE_EXHAUSTED, a mount inside the
/// source FAILED_PRECONDITION, anything else internal.
pub fn copy_error(what: String, e: crate::os::OsError) -> Error {
    if matches!(e, crate::os::OsError::MountInside(_)) {
        Error::WrongState(format!("{what}: {e}"))
    } else if matches!(e.errno(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) {
        Error::NoSpace(format!("{what}: no space left"))
    } else {
        Error::os(what, e)
    }
}

/// Whether `id` is a local volume's id (`LocalKind::owns_id`).
pub fn is_volume_id(id: &str) -> bool {
    super::is_hex_id(PREFIX, id)
}

/// Whether `id` is a local snapshot's id (`LocalKind::owns_snapshot_id`).
pub fn is_snapshot_id(id: &str) -> bool {
    super::is_hex_id(SNAP_PREFIX, id)
}

/// The directory of local volume `id` under `root` (ids are checked by
/// the caller: `LocalKind::dir`).
pub fn volume_dir(root: &Path, id: &str) -> PathBuf {
    root.join(id)
}

/// Whether the rollback of `rec` keeps its directory `dir`, found in place
/// in the root, aside in `.orphaned/` instead of deleting it: a plain
/// create moves its directory there only once its record says Ready, so
/// one there under a record still `Creating` was handed out (a record that
/// lost its Ready); unless it is empty, it is kept. A restore or clone
/// makes its copy under `.creating/` and moves it there at Ready too, and
/// the tenant's writes cannot be told from the copy: kept the same way.
/// One that cannot be read is kept too (a doubt). Start-up's rollback and
/// `state check` ask the same question here.
pub fn kept_on_rollback(files: &dyn Files, rec: &VolumeRecord, dir: &Path) -> bool {
    rec.phase == Phase::Creating && !files.is_empty_dir(dir)
}

/// A volume's directory as the node's unmount checks take it: a name in
/// the root of the form of a volume id is a volume's; `staged_at` tells
/// where it is staged (`node::staged`).
fn mount_check_dir<'a>(
    dir: &'a Path,
    staged_at: &'a dyn Fn() -> Option<PathBuf>,
) -> mounts::VolumeDir<'a> {
    mounts::VolumeDir {
        path: dir,
        is_volume_name: &|n: &str| super::is_hex_id(PREFIX, n),
        staged_at,
    }
}

/// A volume's directory is made by its CreateVolume right after its record
/// is written (whose `created_unix` is taken first): born within this many
/// seconds of it.
const MADE_WITHIN_SECS: u64 = 600;

/// The extended attribute by which an operator takes a directory made by
/// hand at a volume's path for the volume's own (its value: the volume id).
pub const TAKEN_AS_XATTR: &str = "trusted.berth.volume";

fn unix_secs(t: std::time::SystemTime) -> Option<u64> {
    t.duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
}

/// What is wrong with the directory `dir` (lstat `m`) of local volume `id`
/// created at `created` (unix seconds; 0: not known), when it provably is
/// not the directory Berth made and holds nothing of the volume's: born
/// more than `MADE_WITHIN_SECS` after the volume, empty, and not taken for
/// the volume by an operator (`TAKEN_AS_XATTR`). That is a directory put in
/// place by hand after the volume's own was removed or moved away (`rm -rf`
/// or `mv`, then `mkdir`), or a volume's empty directory copied to another
/// filesystem (birth times are not copied): so it is reported, never
/// refused (a refusal would strand every empty volume's pods after such a
/// copy): NodeStage logs a warning, the volume's condition is abnormal and
/// `berth state check` warns, rather than the next pod getting an empty
/// volume without a word. Only a birth time later than that reads the
/// directory.
pub fn made_by_hand(
    files: &dyn crate::os::Files,
    id: &str,
    created: u64,
    dir: &Path,
    m: &std::fs::Metadata,
) -> Option<String> {
    let born = unix_secs(files.born(dir, m)?)?;
    if created == 0 || born <= created + MADE_WITHIN_SECS {
        return None;
    }
    if !files.is_empty_dir(dir) {
        return None;
    }
    if files
        .get_xattr(dir, TAKEN_AS_XATTR)
        .ok()
        .flatten()
        .is_some_and(|v| v == id.as_bytes())
    {
        return None;
    }
    Some(format!(
        "the directory {d} of volume {id} may not be the one Berth made for it: it is empty and was made {s} s after the volume (removed or moved away by hand, then made again?), so the volume's data may not be in it; it is handed out as it is. If the volume's own directory is elsewhere, let its pods go and put it back at {d}; if this one is the volume's (the root was copied to another filesystem), mark it so: setfattr -n {TAKEN_AS_XATTR} -v {id} {d}",
        d = dir.display(),
        s = born - created,
    ))
}

/// What is wrong with the directory of the local snapshot `s` in the local
/// root `root`, if anything: missing, or not a directory (a symlink there
/// is never followed). A restore refuses such a snapshot; `berth state
/// check` reports it.
pub fn snapshot_copy_flaw(files: &dyn Files, root: &Path, s: &SnapshotRecord) -> Option<CopyFlaw> {
    stored_copy(files, &root.join(SNAPSHOTS).join(&s.id), true).err()
}

/// Where the copy of local snapshot `id` is made in the local root `root`,
/// until its record says Ready.
pub fn snapshot_partial_dir(root: &Path, id: &str) -> PathBuf {
    root.join(SNAPSHOTS).join(format!("{PARTIAL}{id}"))
}

/// The whole copy of the local snapshot `s` whose create never answered
/// (`Creating`) that its rollback keeps aside in `.orphaned/` instead of
/// deleting: the copy is moved to the snapshot's name only once whole
/// (`copy_into_place`), so one there may be a snapshot that was
/// acknowledged (a record that lost its Ready). Start-up's rollback and
/// `state check` ask the same question here. A look that fails (anything
/// but ENOENT) is an error: the copy may be there.
pub fn snapshot_kept_on_rollback(
    files: &dyn Files,
    root: &Path,
    s: &SnapshotRecord,
) -> std::result::Result<Option<PathBuf>, crate::os::OsError> {
    super::kept_on_rollback(files, root.join(SNAPSHOTS).join(&s.id), s)
}

pub struct LocalKind {
    root: PathBuf,
    /// This node's id (new ids carry its tag).
    node: String,
    os: Os,
    store: Arc<Store>,
    /// Project quotas on the local root: the ids, when sizes are enforced.
    projects: Option<Arc<Projects>>,
    /// Why sizes are not enforced (when `projects` is None).
    unenforced: String,
    /// Where each volume is staged (`node::staged`).
    staged: Arc<StagedAt>,
    /// The root's entries as listed while start-up read the state
    /// (`list_root`), for the first `reconcile_orphans`.
    listed: std::sync::Mutex<Option<std::io::Result<RootListing>>>,
    /// New volumes' directories made ahead (`spares`).
    spares: Arc<Spares>,
    /// The trash entries start-up found to remove, each with the project
    /// id it holds for the entry until it is gone (`start_background`
    /// empties them).
    startup_trash: std::sync::Mutex<Vec<(PathBuf, Option<u32>)>>,
    /// True from start-up until the socket is up (`start_background`):
    /// what start-up would remove (unfinished creates, restores and
    /// clones, snapshot copies) is moved into the trash instead, one
    /// rename each, and emptied with it on the background thread.
    starting: std::sync::atomic::AtomicBool,
}

/// The names in a local root, each followed by a NUL, in one buffer: start-up
/// lists a root of thousands of volumes (milliseconds) on another thread
/// while it reads its state, and one buffer, freed whole, leaves no holes
/// between the records read meanwhile.
pub struct RootListing(Vec<u8>);

impl RootListing {
    fn names(&self) -> impl Iterator<Item = &std::ffi::OsStr> {
        use std::os::unix::ffi::OsStrExt;
        self.0
            .split(|b| *b == 0)
            .filter(|n| !n.is_empty())
            .map(std::ffi::OsStr::from_bytes)
    }
}

/// Lists `root` without an allocation per entry (`Files::list_names`), as
/// it runs beside the state's reading, whose allocations share the one
/// malloc arena.
pub fn list_root(files: &dyn Files, root: &Path) -> std::io::Result<RootListing> {
    files.list_names(root).map(RootListing)
}

/// The entries of the trash of the local root `root` (`<id>-<time>`) with
/// the volume id of each. An entry named by a volume id alone (a volume's
/// directory moved there by hand) is that volume's, so that start-up puts
/// it back while its record lasts instead of taking `local` for its id and
/// emptying it.
fn trash_entries(files: &dyn Files, root: &Path) -> Vec<(String, PathBuf)> {
    let Some(entries) = files::read_own_dir(files, &root.join(TRASH)) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let id = if super::is_hex_id(PREFIX, &name) {
                name
            } else {
                name.rsplit_once('-')
                    .map_or(name.as_str(), |(id, _)| id)
                    .to_string()
            };
            (id, e.path())
        })
        .collect()
}

/// Removes what the trash of the local root `root` holds of volume `id`,
/// then releases its project when nothing is left (`LocalKind::purge`).
fn empty_trash_of(
    root: &Path,
    files: &dyn crate::os::Files,
    projects: Option<&Projects>,
    id: &str,
    project: Option<u32>,
) {
    let mut emptied = true;
    for (of, path) in trash_entries(files, root) {
        if of == id {
            if let Err(e) = files.remove_tree(&path) {
                emptied = false;
                tracing::warn!(volume_id = %id, path = %path.display(), error = %e, "could not empty the trash; start-up does");
            }
        }
    }
    // Nothing is charged to the project any more: it can go.
    if let (true, Some(p), Some(project)) = (emptied, projects, project) {
        p.release(project);
    }
}

/// Removes the trash entries start-up found (`entries`: each path, with
/// the project id held for it), one after the other, on the background
/// thread; each id is released once its entry is gone. An entry that cannot
/// be removed (a mount inside it, an I/O error) keeps its id held and is
/// left to the next start, and so is the rest when berth exits or is
/// killed meanwhile: they are still in the trash. A `.trash` that is no
/// longer Berth's own directory (replaced by a symlink since start-up
/// listed it) stops the emptying: nothing it leads to is removed.
fn empty_startup_trash(
    trash: &Path,
    files: &dyn crate::os::Files,
    projects: Option<&Projects>,
    entries: Vec<(PathBuf, Option<u32>)>,
) {
    let (n, mut left) = (entries.len(), 0usize);
    for (path, held) in entries {
        if !files.lstat(trash).is_ok_and(|m| m.is_dir()) {
            tracing::error!(path = %trash.display(), "the trash is no longer a directory of Berth's own (replaced by hand?): nothing it leads to is removed; the next start empties what is left");
            return;
        }
        match files.remove_tree(&path) {
            Ok(()) => {
                if let (Some(p), Some(id)) = (projects, held) {
                    p.release(id);
                }
            }
            Err(e) => {
                left += 1;
                tracing::warn!(path = %path.display(), error = %e, "could not empty a deleted volume's directory out of the trash; the next start tries again");
            }
        }
    }
    tracing::info!(entries = n, left, "the trash start-up found is emptied");
}

impl LocalKind {
    /// `root` must exist (`Driver::new` makes it and holds its lock).
    /// Finds out once whether the root's filesystem enforces project quotas
    /// and says so in the log.
    /// `listed`: the root's entries, when start-up listed them already.
    /// `spare_dirs`: how many new volumes' directories to keep made ahead
    /// (`spares`; 0: none).
    pub fn new(
        root: PathBuf,
        node: &str,
        os: Os,
        store: Arc<Store>,
        staged: Arc<StagedAt>,
        listed: Option<std::io::Result<RootListing>>,
        spare_dirs: usize,
    ) -> Result<Self> {
        let (projects, unenforced) = match quota::detect(
            os.quotas.as_ref(),
            os.files.as_ref(),
            &root,
            &WORK_DIRS,
        ) {
            Enforcement::Enforced => {
                let held = store
                    .filter(|r| r.kind == Kind::Local && r.project.is_some())
                    .into_iter()
                    .filter_map(|r| r.project());
                let p = Arc::new(Projects::new(root.clone(), os.quotas.clone(), held));
                tracing::info!(root = %root.display(), volumes = p.held_count(),
                    "project quotas are enforced on the local root: every local volume is held to its size");
                (Some(p), String::new())
            }
            Enforcement::Unavailable(why) => {
                tracing::warn!(root = %root.display(), reason = %why,
                    "local volume sizes are not enforced: a size is a promise, not a limit; mount the local root's filesystem with prjquota (xfs; ext4 also needs the project and quota features) to enforce them");
                (None, why)
            }
        };
        let spares = {
            let node = node.to_string();
            Spares::new(
                root.join(CREATING),
                os.files.clone(),
                spare_dirs,
                Box::new(move || super::new_node_id(PREFIX, &node)),
            )
        };
        Ok(LocalKind {
            spares,
            root,
            node: node.to_string(),
            os,
            store,
            projects,
            unenforced,
            staged,
            listed: std::sync::Mutex::new(listed),
            startup_trash: std::sync::Mutex::new(Vec::new()),
            starting: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// The local root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// What the local volumes may still write into their promises (their
    /// sizes less what they wrote within them: the quantity GetCapacity and
    /// CreateVolume keep back for them), with what `read_free` answers: the
    /// free space of a filesystem the local root shares with another kind
    /// (block files), which must not hand this out. What the volumes wrote
    /// is read before `read_free`, the promises after it, as GetCapacity
    /// reads them: writes and creates in between only make what is left
    /// smaller.
    pub fn with_unwritten_promises<T>(
        &self,
        read_free: impl FnOnce() -> Result<T>,
    ) -> Result<(T, i64)> {
        let written = self.written_within_promises()?;
        let free = read_free()?;
        let (promised, written) = self
            .store
            .promised_and(Kind::Local, |present| written.of(present));
        Ok((free, promised.saturating_sub(written).max(0)))
    }

    /// Gives the volume's directory `dir` its project and limits (when
    /// sizes are enforced): the one it has (a retry), else a new one.
    /// `rec.project` is set as soon as the id is held, so that a rollback
    /// releases it. A project the directory has is adopted only if Berth
    /// could have given it (an id it hands out that no other record
    /// holds): one inherited from its parent (the inherit flag put on the
    /// root or `.creating` while Berth runs) is never taken for the
    /// volume's own.
    fn give_project(&self, rec: &mut VolumeRecord, dir: &Path) -> Result<()> {
        let Some(p) = &self.projects else {
            return Ok(());
        };
        let id = match rec.project() {
            Some(id) => id,
            None => match p.project_of(dir)? {
                0 => p.allocate()?,
                id if id >= quota::FIRST_PROJECT
                    && self.store.count(|r| {
                        r.kind == Kind::Local && r.project() == Some(id) && r.id != rec.id
                    }) == 0 =>
                {
                    p.hold(id);
                    id
                }
                found => {
                    tracing::warn!(volume_id = %rec.id, dir = %dir.display(), project = found,
                        "a new volume's directory has a project berth did not give it (inherited from its parent?): it gets one of its own");
                    p.allocate()?
                }
            },
        };
        rec.project = std::num::NonZeroU32::new(id);
        p.apply(dir, id, u64::try_from(rec.capacity_bytes).unwrap_or(0))
    }

    /// Raises the promise of volume `id` to `size` bytes (a no-op when it
    /// is that large already), written durably, after checking under the
    /// store's lock that the local root can hold it: OUT_OF_RANGE when not
    /// (ControllerExpandVolume's and NodeExpandVolume's code for a size the
    /// plugin cannot provide).
    fn grow_promise(&self, id: &str, size: i64) -> Result<()> {
        let Some(mut now) = self.store.get(id) else {
            return Err(Error::NotFound(format!("volume {id} does not exist")));
        };
        if now.capacity_bytes >= size {
            return Ok(());
        }
        let extra = size - now.capacity_bytes;
        now.capacity_bytes = size;
        // No thick block file is allocated between the free space read and
        // the promise (see `Store::space_shared`).
        let _space = self.store.space_shared();
        let pool = self.pool_capacity()?;
        if size > pool.max_volume_bytes {
            return Err(Error::BadSize(format!(
                "{size} bytes is more than the local root's filesystem holds ({} bytes)",
                pool.max_volume_bytes
            )));
        }
        // `written`: what the volumes still recorded wrote (see
        // `written_within_promises`), added to the free space.
        let attempt = |free: i64, written: &Written| {
            self.store.put_admitted(&now, |a| {
                let free = free.saturating_add(written.of(|id| a.get(id).is_some()));
                let room = free.saturating_sub(a.promised);
                if extra > room {
                    Err(Error::BadSize(format!(
                        "growing volume {id} to {size} bytes needs {extra} more; the local root has {} bytes left",
                        room.max(0)
                    )))
                } else {
                    Ok(())
                }
            })
        };
        let admitted = |free: i64| match attempt(free, &Written::default()) {
            // The promises alone leave no room: count what the volumes
            // wrote (see `written_within_promises`).
            Err(Error::BadSize(_)) if self.projects.is_some() => {
                let written = self.written_within_promises()?;
                let free = self.pool_capacity()?.free_bytes;
                attempt(free, &written)
            }
            r => r,
        };
        crate::background::after_space_freed(
            admitted(pool.free_bytes),
            |e| matches!(e, Error::BadSize(_)),
            || admitted(self.pool_capacity()?.free_bytes),
        )
    }

    /// Grows a volume as `g` asks (never shrinks): the promise, then the
    /// project's limits. Idempotent: a retry after a crash between the two
    /// sets the limits.
    fn grow(&self, rec: &VolumeRecord, g: Growth) -> Result<i64> {
        let dir = self.require_dir(&rec.id)?;
        let now = self.store.get(&rec.id).unwrap_or_else(|| rec.clone());
        let size = grown_size(now.capacity_bytes, g.required, g.limit)?;
        self.grow_promise(&rec.id, size)?;
        if let (Some(p), Some(id)) = (&self.projects, now.project()) {
            p.set_limits(id, u64::try_from(size).unwrap_or(0))?;
            tracing::info!(volume_id = %rec.id, project = id, bytes = size, dir = %dir.display(), "volume limits raised");
        }
        Ok(size)
    }

    /// NOT_FOUND unless `path` shows the volume's directory (a mount of
    /// it); with the directory gone (moved or deleted under a live mount)
    /// any mount at `path` passes, and the condition says abnormal.
    fn check_mounted_at(&self, rec: &VolumeRecord, path: &Path) -> Result<()> {
        let t = mounts::table(&self.os)?;
        let not_there = || {
            Error::NotFound(format!(
                "volume {} is not mounted at {}",
                rec.id,
                path.display()
            ))
        };
        let top = mounts::at(&self.os, &t, path)
            .last()
            .map(|m| mounts::object(m))
            .ok_or_else(not_there)?;
        if self.require_dir(&rec.id).is_ok() {
            let dir = self.dir(&rec.id)?;
            if mountinfo::object_of(&t, &dir).as_ref() != Some(&top) {
                return Err(not_there());
            }
        }
        Ok(())
    }

    /// Start-up: every recorded project has the limits of its volume's
    /// size (they live in the filesystem's quota file and survive restarts;
    /// this repairs an expansion interrupted between its record and its
    /// limits).
    fn repair_limits(&self) {
        let recs = self
            .store
            .filter(|r| r.kind == Kind::Local && r.project.is_some());
        let Some(p) = &self.projects else {
            if !recs.is_empty() {
                tracing::warn!(volumes = recs.len(), reason = %self.unenforced,
                    "local volumes have project quotas but the local root does not enforce them now");
            }
            return;
        };
        for r in recs {
            let (Some(id), Ok(bytes)) = (r.project(), u64::try_from(r.capacity_bytes)) else {
                continue;
            };
            let ok = p.usage(id).is_ok_and(|q| {
                q.limit_bytes >= bytes && q.limit_inodes == quota::inode_limit(bytes)
            });
            if !ok {
                match p.set_limits(id, bytes) {
                    Ok(()) => {
                        tracing::info!(volume_id = %r.id, project = id, bytes, "project limits set to the volume's size")
                    }
                    Err(e) => {
                        tracing::error!(volume_id = %r.id, project = id, error = %e.render(), "could not set the project limits of a volume")
                    }
                }
            }
        }
    }

    /// Lets the project of a removed directory go (read before removing it)
    /// unless a record holds it.
    fn release_unheld(&self, project: Option<u32>) {
        if let (Some(p), Some(id)) = (&self.projects, project.filter(|id| *id != 0)) {
            if !p.is_held(id) {
                p.release(id);
            }
        }
    }

    /// The project of `path` when sizes are enforced (best effort).
    fn project_on(&self, path: &Path) -> Option<u32> {
        self.projects.as_ref().and_then(|p| p.project_of(path).ok())
    }

    /// The directory of a snapshot; only for ids this kind owns.
    fn snapshot_dir(&self, id: &str) -> Result<PathBuf> {
        if !self.owns_snapshot_id(id) {
            return Err(Error::NotFound(format!(
                "snapshot {id} is not a local snapshot"
            )));
        }
        Ok(self.root.join(SNAPSHOTS).join(id))
    }

    /// What is wrong with the directory of snapshot `s`
    /// (`snapshot_copy_flaw`), looked at through the OS layer (one lstat).
    fn snapshot_dir_flaw(&self, s: &SnapshotRecord) -> Option<CopyFlaw> {
        let dir = self.root.join(SNAPSHOTS).join(&s.id);
        let found = self
            .os
            .files
            .lstat(&dir)
            .map_err(crate::os::OsError::into_io);
        judge_copy(&dir, found, true).err()
    }

    /// The directory of snapshot `s` to restore from: FAILED_PRECONDITION
    /// when it is missing or damaged (`snapshot_dir_flaw`).
    fn usable_snapshot_dir(&self, s: &SnapshotRecord) -> Result<PathBuf> {
        let dir = self.snapshot_dir(&s.id)?;
        super::snapshots_area(self.os.files.as_ref(), &self.root.join(SNAPSHOTS))?;
        match self.snapshot_dir_flaw(s) {
            Some(flaw) => Err(flaw.error(&s.id)),
            None => Ok(dir),
        }
    }

    /// Copies the tree `src` to `dest` through a temp directory in `tmp_in`
    /// (a leftover of an interrupted copy is removed first): `dest`
    /// appears whole or not at all, synced with its entry. A `dest` in
    /// `tmp_in` that is itself a temporary name (`.partial-<id>`, a
    /// snapshot's copy, moved to its name once its record says Ready) is
    /// copied into directly: its record is not Ready before the copy is
    /// whole, and start-up removes it otherwise (a temporary of a
    /// temporary, `.partial-.partial-<id>`, as older versions made, too).
    fn copy_into_place(&self, src: &Path, tmp_in: &str, dest: &Path) -> Result<()> {
        let f = self.os.files.as_ref();
        let area = self.root.join(tmp_in);
        ensure_dir(f, &area, 0o700)
            .map_err(|e| Error::os(format!("creating {}", area.display()), e))?;
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let direct = dest.parent() == Some(area.as_path()) && name.starts_with(PARTIAL);
        let tmp = if direct {
            dest.to_path_buf()
        } else {
            area.join(format!("{PARTIAL}{name}"))
        };
        self.remove_tree(&tmp)?;
        self.check_room_for_copy(src, &area)?;
        // A copy that fails is removed with what it made, so a failed
        // create leaves nothing behind (its rollback knows only `dest`).
        let stats = f
            .copy_tree(src, &tmp)
            .map_err(|e| copy_error(format!("copying {} to {}", src.display(), tmp.display()), e))
            .and_then(|stats| {
                let placed = if direct {
                    Ok(())
                } else {
                    f.rename_noreplace(&tmp, dest)
                };
                placed
                    .and_then(|_| f.sync_dir(dest.parent().unwrap_or(&self.root)))
                    .map_err(|e| Error::os(format!("moving {} into place", tmp.display()), e))
                    .map(|_| stats)
            })
            .inspect_err(|_| {
                if f.exists(&tmp) {
                    let _ = self.remove_tree(&tmp);
                }
            })?;
        tracing::info!(from = %src.display(), to = %dest.display(), cloned = stats.cloned, copied = stats.copied, bytes = stats.bytes, "copied");
        Ok(())
    }

    /// RESOURCE_EXHAUSTED, before anything is copied, when the copy of the
    /// tree `src` into `area` cannot fit (`kinds::check_room_for_copy` of
    /// `Files::tree_copy_need`): it would fill the filesystem that the
    /// state and every volume of the root usually share until it failed.
    fn check_room_for_copy(&self, src: &Path, area: &Path) -> Result<()> {
        super::check_room_for_copy(
            &self.os,
            &format!("copying {}", src.display()),
            self.os.files.tree_copy_need(src),
            area,
        )
    }

    /// Moves storage without a record into `.orphaned/` (never over an
    /// earlier orphan).
    fn set_aside(&self, path: &Path, name: &str) -> Result<()> {
        let aside = self.root.join(ORPHANED);
        ensure_dir(self.os.files.as_ref(), &aside, 0o700)
            .map_err(|e| Error::os(format!("creating {}", aside.display()), e))?;
        let to = files::move_aside(self.os.files.as_ref(), path, &aside, name)
            .map_err(|e| Error::os(format!("moving aside {}", path.display()), e))?;
        tracing::warn!(path = %path.display(), to = %to.display(), "storage without a record moved aside");
        Ok(())
    }

    fn trash(&self) -> Vec<(String, PathBuf)> {
        trash_entries(self.os.files.as_ref(), &self.root)
    }

    /// Puts the trash entry `path` of volume `id`, whose record is still
    /// there, back in place: a delete whose record could not be removed is
    /// undone. Not when the record still says Creating (what a create
    /// that never became Ready left never goes into the root: a directory
    /// there under a record still Creating is taken for one that was
    /// handed out), nor over what is in place. True when it was moved.
    fn put_back(&self, id: &str, path: &Path) -> Result<bool> {
        let home = volume_dir(&self.root, id);
        if !self.owns_id(id) || self.still_creating(id) || self.os.files.exists(&home) {
            return Ok(false);
        }
        self.os
            .files
            .rename_noreplace(path, &home)
            .map_err(|e| Error::os(format!("moving {} back", path.display()), e))?;
        tracing::warn!(volume_id = %id, "a delete whose record could not be removed was undone: the volume is back");
        Ok(true)
    }

    /// Moves `path` (an entry of one of Berth's own directories in the
    /// root) into the trash as `<name>-<time><tag>`: one rename, however
    /// many files it holds. A name that is a volume's id makes the entry
    /// that volume's (`trash_entries`): its `purge` empties it before it
    /// lets the volume's project go.
    fn move_to_trash(&self, path: &Path, name: &str, tag: &str) -> Result<()> {
        let trash = self.root.join(TRASH);
        let f = self.os.files.as_ref();
        ensure_dir(f, &trash, 0o700)
            .and_then(|_| {
                let dest = trash.join(format!("{name}-{}{tag}", crate::driver::now_nanos()));
                f.rename_noreplace(path, &dest)
            })
            .map_err(|e| Error::os(format!("moving {} to the trash", path.display()), e))
    }

    /// Removes `path`, what start-up found of a copy or create that never
    /// became Ready: while starting, moved into the trash (one rename),
    /// which is emptied on the background thread once the socket is up
    /// (`reconcile_orphans` lists it after this); otherwise, or when the
    /// move fails (no room for the trash's entry), removed in place.
    /// `name`: its name in the trash (a volume's id for what that volume's
    /// `purge` empties).
    /// True when it was moved.
    fn discard(&self, path: &Path, name: &str) -> Result<bool> {
        let Ok(m) = self.os.files.lstat(path) else {
            return Ok(false);
        };
        // Only a directory goes to the trash, which removes trees: anything
        // else in its place (put there by hand) is unlinked here at once.
        if m.is_dir() && self.starting.load(std::sync::atomic::Ordering::SeqCst) {
            match self.move_to_trash(path, name, "") {
                Ok(()) => return Ok(true),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e.render(), "could not move an unfinished copy into the trash; removing it in place")
                }
            }
        }
        self.remove_copy(path).map(|_| false)
    }

    /// Whether the record of volume `id` still says Creating: its storage
    /// was never handed out and never goes into the root.
    fn still_creating(&self, id: &str) -> bool {
        self.store
            .get(id)
            .is_some_and(|r| r.phase == Phase::Creating)
    }

    /// The names under `.creating/` (new volumes' directories, by id, and
    /// restores' and clones' unfinished copies).
    fn creating(&self) -> Vec<String> {
        self.own_dir(CREATING)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The entries of one of Berth's own directories in the root
    /// (`.trash`, `.creating`, `.snapshots`), whose contents start-up
    /// removes (`files::read_own_dir`).
    fn own_dir(&self, name: &str) -> Option<std::fs::ReadDir> {
        files::read_own_dir(self.os.files.as_ref(), &self.root.join(name))
    }

    fn remove_tree(&self, path: &Path) -> Result<()> {
        self.os
            .files
            .remove_tree(path)
            .map_err(|e| Error::os(format!("removing {}", path.display()), e))
    }

    /// The directory of a volume; only for ids this kind owns.
    pub fn dir(&self, id: &str) -> Result<PathBuf> {
        if !self.owns_id(id) {
            return Err(Error::NotFound(format!(
                "volume {id} is not a local volume"
            )));
        }
        Ok(volume_dir(&self.root, id))
    }

    /// What a mount of the volume's directory shows, from the table `t`.
    fn object(&self, id: &str, t: &[mountinfo::MountEntry]) -> Result<mounts::Object> {
        let dir = self.dir(id)?;
        mountinfo::object_of(t, &dir)
            .ok_or_else(|| Error::Internal(format!("no mount holds {}", dir.display())))
    }

    fn require_dir(&self, id: &str) -> Result<PathBuf> {
        self.dir_with(id, |_, _| None).map(|(dir, _)| dir)
    }

    /// `require_dir`, and FAILED_PRECONDITION for a directory that may have
    /// been put in place by hand (`made_by_hand`): the volume's condition.
    /// No call beyond `require_dir`'s lstat unless the directory was born
    /// late.
    fn require_own_dir(&self, rec: &VolumeRecord) -> Result<PathBuf> {
        self.dir_with(&rec.id, |dir, m| {
            made_by_hand(self.os.files.as_ref(), &rec.id, rec.created_unix, dir, m)
        })
        .map(|(dir, _)| dir)
    }

    /// `require_dir` for NodeStage: a directory that may have been put in
    /// place by hand (`made_by_hand`) is handed out with a warning. With
    /// the lstat these checks judged, which the bind holds to
    /// (`mounts::stage_bind`).
    fn stage_dir(&self, rec: &VolumeRecord) -> Result<(PathBuf, std::fs::Metadata)> {
        self.dir_with(&rec.id, |dir, m| {
            if let Some(why) =
                made_by_hand(self.os.files.as_ref(), &rec.id, rec.created_unix, dir, m)
            {
                tracing::warn!(volume_id = %rec.id, "{why}");
            }
            None
        })
    }

    fn dir_with(
        &self,
        id: &str,
        flaw: impl FnOnce(&Path, &std::fs::Metadata) -> Option<String>,
    ) -> Result<(PathBuf, std::fs::Metadata)> {
        let dir = self.dir(id)?;
        match self.os.files.lstat(&dir) {
            Ok(m) if m.is_dir() => match flaw(&dir, &m) {
                None => Ok((dir, m)),
                Some(why) => Err(Error::WrongState(why)),
            },
            _ => Err(Error::WrongState(format!(
                "backing directory {} of volume {id} is missing",
                dir.display()
            ))),
        }
    }
}

impl LocalKind {
    /// Removes a snapshot's copy; with `keep`, the whole copy of one whose
    /// Ready may have been lost is kept aside (`snapshot_kept_on_rollback`).
    fn remove_snapshot(&self, snap: &SnapshotRecord, keep: bool) -> Result<()> {
        let dest = self.snapshot_dir(&snap.id)?;
        if !super::snapshots_area(self.os.files.as_ref(), &self.root.join(SNAPSHOTS))? {
            return Ok(());
        }
        let kept = if keep {
            snapshot_kept_on_rollback(self.os.files.as_ref(), &self.root, snap)
                .map_err(|e| Error::os("looking for a snapshot's whole copy", e))?
        } else {
            None
        };
        if let Some(whole) = kept {
            tracing::error!(snapshot_id = %snap.id, dir = %whole.display(), "the whole copy of a snapshot whose create never answered: kept aside in .orphaned, never deleted (was its Ready record lost?); look at it before you remove it");
            self.set_aside(&whole, &snap.id)?;
        }
        let partial = self.partial_snapshot_dir(&snap.id);
        self.discard(&partial, &format!("{PARTIAL}{}", snap.id))?;
        self.discard(&dest, &snap.id).map(|_| ())
    }

    /// Removes a copy (a snapshot's, an unfinished one) at `path`: a directory (what Berth makes
    /// there) with its tree; anything else put in its place by hand (a
    /// symlink, a file, a FIFO) is unlinked itself, never followed or
    /// opened, so that the snapshot can still be deleted. Missing is
    /// success.
    fn remove_copy(&self, path: &Path) -> Result<()> {
        match self.os.files.lstat(path) {
            Err(e) if e.errno() == Some(libc::ENOENT) => Ok(()),
            Ok(m) if !m.is_dir() => {
                tracing::warn!(path = %path.display(), found = crate::os::files::type_name(m.file_type()), "a copy's directory replaced by hand: the entry itself is removed");
                match self.os.files.remove_file(path) {
                    Err(e) if e.errno() != Some(libc::ENOENT) => {
                        Err(Error::os(format!("removing {}", path.display()), e))
                    }
                    _ => Ok(()),
                }
            }
            _ => self.remove_tree(path),
        }
    }

    /// Where the copy of snapshot `id` is made before its record says Ready.
    fn partial_snapshot_dir(&self, id: &str) -> PathBuf {
        snapshot_partial_dir(&self.root, id)
    }

    /// Once a snapshot's record says Ready: its whole copy moved to the
    /// snapshot's name (start-up finishes a move a crash interrupted).
    fn place_snapshot(&self, id: &str) -> Result<()> {
        let partial = self.partial_snapshot_dir(id);
        crate::os::files::move_into_place(self.os.files.as_ref(), &partial, &self.snapshot_dir(id)?)
            .map_err(|e| Error::os(format!("moving {} into place", partial.display()), e))
    }

    /// Removes a volume's storage (`delete_with`; `rollback_create` without
    /// `keep`): the directory is moved to the trash, unless `keep` and it
    /// is one a create whose Ready was lost may have handed out
    /// (`kept_on_rollback`): then it is kept aside.
    fn remove_volume(&self, rec: &VolumeRecord, mount_table: &LazyTable, keep: bool) -> Result<()> {
        let dir = self.dir(&rec.id)?;
        let m = match self
            .os
            .files
            .lstat(&dir)
            .map_err(crate::os::OsError::into_io)
        {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // A create that failed before `ready`: its directory under
                // `.creating/` is Berth's own and was never handed out.
                // Never through a symlink put in place of `.creating`
                // (`files::read_own_dir`): what it leads to is not Berth's.
                // Moved into the trash under the volume's id, as a
                // delete moves a volume's directory (and so is the copy
                // of a restore or clone still in its holder,
                // `.partial-<id>`): its `purge` empties them on the
                // background thread, then lets its project go. A tree of
                // millions of files (a restore interrupted by a crash)
                // holds up neither start-up nor the RPC. Removed in place
                // if the move fails.
                let area = self.root.join(CREATING);
                if self.os.files.is_dir(&area) {
                    for (unfinished, tag) in [
                        (area.join(&rec.id), ""),
                        (area.join(format!("{PARTIAL}{}", rec.id)), ".partial"),
                    ] {
                        if !self.os.files.exists(&unfinished) {
                            continue;
                        }
                        if let Err(e) = self.move_to_trash(&unfinished, &rec.id, tag) {
                            tracing::warn!(volume_id = %rec.id, error = %e.render(), "could not move an unfinished create into the trash; removing it in place");
                            self.remove_tree(&unfinished)?;
                        }
                    }
                }
                return Ok(());
            }
            Err(e) => return Err(Error::io(format!("inspecting {}", dir.display()), e)),
            Ok(m) => m,
        };
        if !m.is_dir() {
            // Not something this driver made (a symlink or file in its
            // place): remove the entry itself, never what it points to.
            return self
                .os
                .files
                .remove_file(&dir)
                .map_err(|e| Error::os(format!("removing {}", dir.display()), e));
        }
        let t = mount_table.get(&self.os)?;
        if let Some(m) = t.iter().find(|m| m.mount_point.starts_with(&dir)) {
            return Err(Error::WrongState(format!(
                "{} is mounted inside the volume; refusing to delete",
                m.mount_point.display()
            )));
        }
        if keep && kept_on_rollback(self.os.files.as_ref(), rec, &dir) {
            tracing::error!(volume_id = %rec.id, dir = %dir.display(), "the directory of a volume whose create never answered is in place and holds data: kept aside in .orphaned, never deleted; look at it before you remove it");
            return self.set_aside(&dir, &rec.id);
        }
        // One atomic rename takes the volume away into the trash; its
        // contents are removed only once its record is gone (`purge`), or
        // to make room for that removal (`free_set_aside`). If removing
        // the record fails, DeleteVolume (`undo_delete`) or start-up puts
        // the directory back.
        // The trash is almost always there: one lstat (`ensure_dir_present`).
        let trash = self.root.join(TRASH);
        files::ensure_dir_present(self.os.files.as_ref(), &trash, 0o700)
            .map_err(|e| Error::os(format!("creating {}", trash.display()), e))?;
        let dest = trash.join(format!("{}-{}", rec.id, crate::driver::now_nanos()));
        self.os.files.rename_noreplace(&dir, &dest).map_err(|e| {
            match self.locked_move(&dir, &trash, &e) {
                Some(refusal) => refusal,
                None => Error::os(format!("moving {} to the trash", dir.display()), e),
            }
        })
    }

    /// Why the volume's directory `dir` cannot be moved into `trash`
    /// (`e`), where that is an immutable or append-only flag (chattr +i,
    /// +a) on it or on either directory: which one, which flag, the
    /// lsattr and chattr commands. FAILED_PRECONDITION ("volume in use"
    /// in the spec's table for DeleteVolume: the CO retries with back-off,
    /// and the retry deletes once an operator cleared the flag; berth
    /// never does). Before 2026-12-07 this answered INTERNAL with the
    /// rename's "Operation not permitted" and nothing about the flag.
    fn locked_move(&self, dir: &Path, trash: &Path, e: &crate::os::OsError) -> Option<Error> {
        if e.errno() != Some(libc::EPERM) {
            return None;
        }
        let f = self.os.files.as_ref();
        [dir, self.root.as_path(), trash].into_iter().find_map(|at| {
            let locks = f.locks(at).ok().filter(|l| l.any())?;
            Some(Error::WrongState(format!(
                "{} cannot be moved to the trash, so the volume is not deleted: {}; the delete is retried and goes through once the flag is cleared",
                dir.display(),
                locks.note(at)
            )))
        })
    }

    /// `create_from`'s copy of `src` when sizes are enforced: made in
    /// `holder` (the new volume's project and limits, inherited by every
    /// file copied), then moved to `dest`; `holder` is removed.
    fn copy_in_holder(
        &self,
        rec: &mut VolumeRecord,
        src: &Path,
        holder: &Path,
        dest: &Path,
    ) -> Result<()> {
        let f = self.os.files.as_ref();
        let area = self.root.join(CREATING);
        ensure_dir(f, holder, 0o700)
            .map_err(|e| Error::os(format!("creating {}", holder.display()), e))?;
        self.give_project(rec, holder)?;
        let tmp = holder.join("volume");
        let stats = f.copy_tree(src, &tmp).map_err(|e| {
            copy_error(format!("copying {} to {}", src.display(), tmp.display()), e)
        })?;
        f.rename_noreplace(&tmp, dest)
            .and_then(|_| f.sync_dir(&area))
            .map_err(|e| Error::os(format!("moving {} into place", tmp.display()), e))?;
        self.remove_tree(holder)?;
        tracing::info!(from = %src.display(), to = %dest.display(), cloned = stats.cloned, copied = stats.copied, bytes = stats.bytes, project = ?rec.project(), "copied");
        Ok(())
    }
}

impl VolumeKind for LocalKind {
    fn kind(&self) -> Kind {
        Kind::Local
    }

    fn new_id(&self) -> String {
        super::new_node_id(PREFIX, &self.node)
    }

    fn owns_id(&self, id: &str) -> bool {
        is_volume_id(id)
    }

    fn take_spare_id(&self) -> Option<String> {
        self.spares.take()
    }

    fn spare_unused(&self, id: &str) {
        self.spares.give_back(id);
    }

    fn drop_spares(&self) {
        self.spares.drop_free();
    }

    fn check_parameters(&self, params: &BTreeMap<String, String>) -> Result<()> {
        if let Some(k) = params.keys().find(|k| k.as_str() != ENFORCEMENT_KEY) {
            return Err(Error::Invalid(format!(
                "unknown parameter {k:?} for local volumes"
            )));
        }
        enforcement_required(params).map(|_| ())
    }

    fn can_create(&self, params: &BTreeMap<String, String>) -> Result<()> {
        if enforcement_required(params)? && self.projects.is_none() {
            return Err(Error::WrongNode(format!(
                "{ENFORCEMENT_KEY}: {REQUIRED}, but this node cannot hold local volumes to their size: on its local root {}, {}; mount that filesystem with prjquota (xfs, or ext4 with the project and quota features: tune2fs -O project,quota) and restart berth, or use {ENFORCEMENT_KEY}: {BEST_EFFORT}",
                self.root.display(),
                self.unenforced
            )));
        }
        Ok(())
    }

    /// No room at all on a node that cannot meet `capacityEnforcement:
    /// required`, so that the scheduler's capacity check skips it.
    fn capacity_for(&self, params: &BTreeMap<String, String>) -> Result<PoolCapacity> {
        if self.can_create(params).is_err() {
            return Ok(PoolCapacity::default());
        }
        self.pool_capacity()
    }

    fn written_within_promises(&self) -> Result<Written> {
        let Some(p) = &self.projects else {
            return Ok(Written::default());
        };
        let mut written = Vec::new();
        for r in self
            .store
            .filter(|r| r.kind == Kind::Local && r.project.is_some())
        {
            let Some(id) = r.project() else { continue };
            let used = i64::try_from(p.usage(id)?.used_bytes).unwrap_or(i64::MAX);
            written.push((r.id, used.min(r.capacity_bytes).max(0)));
        }
        Ok(Written(written))
    }

    fn sizes_enforced(&self) -> Option<bool> {
        Some(self.projects.is_some())
    }

    fn expandable(&self) -> bool {
        true
    }

    /// The leader-elected external-resizer (one for the cluster, in the
    /// node DaemonSet: external-resizer has no per-node mode) sends every
    /// ControllerExpandVolume to the berth next to it, which holds only its
    /// own node's records. A volume of another node (`None`) is answered
    /// with the requested size and `node_expansion_required`: kubelet then
    /// calls NodeExpandVolume on the volume's own node (online, while it is
    /// published; otherwise when it is next staged), which checks the room
    /// and raises the promise and the project's limits there. A volume of
    /// this node is grown here and now (promise and limits), and needs no
    /// node step.
    fn controller_expand(&self, rec: Option<&VolumeRecord>, g: Growth) -> Result<Expansion> {
        let Some(rec) = rec else {
            if g.required <= 0 {
                return Err(Error::Invalid(
                    "capacity_range.required_bytes is needed to expand a volume of another node"
                        .into(),
                ));
            }
            return Ok(Expansion {
                capacity_bytes: grown_size(0, g.required, g.limit)?,
                node_expansion_required: true,
            });
        };
        let size = self.grow(rec, g)?;
        Ok(Expansion {
            capacity_bytes: size,
            node_expansion_required: false,
        })
    }

    fn node_expand(&self, rec: &VolumeRecord, a: &NodeExpandArgs<'_>) -> Result<i64> {
        self.check_mounted_at(rec, a.volume_path)?;
        self.grow(rec, a.growth)
    }

    fn check_capability(&self, cap: &Capability) -> Result<()> {
        match &cap.access_type {
            AccessType::Block => Err(Error::Capability(
                "local directory volumes support only the mount access type".into(),
            )),
            AccessType::Mount { fs_type, .. } => {
                if !fs_type.is_empty() {
                    // A directory has the filesystem of the local root; an
                    // explicit type is accepted only as a hint and ignored.
                    tracing::debug!(fs_type = %fs_type, "fs_type ignored for local volumes");
                }
                if !cap.access_mode.single_node() {
                    return Err(Error::Capability(format!(
                        "access mode {:?} needs a volume reachable from several nodes; local volumes live on one node",
                        cap.access_mode
                    )));
                }
                mounts::bind_flags(cap).map(|_| ())
            }
        }
    }

    fn pool_capacity(&self) -> Result<PoolCapacity> {
        let u = self
            .os
            .fs
            .statvfs(&self.root)
            .map_err(|e| Error::os("reading free space of the local root", e))?;
        Ok(PoolCapacity {
            free_bytes: i64::try_from(u.available_bytes).unwrap_or(i64::MAX),
            max_volume_bytes: i64::try_from(u.total_bytes).unwrap_or(i64::MAX),
        })
    }

    /// Makes the directory under `.creating/` (moved into the root by
    /// `ready` once the record says Ready): a crash before that leaves it
    /// there, where start-up removes it, never in the root, where a
    /// directory without a record is a volume whose record was lost. A
    /// spare made ahead under the volume's id (`spares`) is that directory
    /// already, flushed.
    fn create(&self, rec: &mut VolumeRecord) -> Result<()> {
        let area = self.root.join(CREATING);
        let f = self.os.files.as_ref();
        self.dir(&rec.id)?;
        let dir = area.join(&rec.id);
        let fail = |what: &str| {
            let dir = dir.clone();
            let what = what.to_string();
            move |e| Error::os(format!("{what} {}", dir.display()), e)
        };
        let taken = self.spares.use_taken(&rec.id);
        // More spares asked for here, on the operation's thread, never in
        // `take_spare_id` (the async handler): a refill that runs where it
        // is asked for (a full background queue) must not hold up every
        // RPC.
        self.spares.top_up();
        let found = self.os.files.is_dir(&dir);
        // Made empty (a spare, or this create's earlier attempt, whose
        // record is still Creating), in Berth's own private directory, and
        // nothing writes into it before Ready: anything in it now was put
        // there by hand, and is never handed to a tenant (the create fails;
        // its rollback removes the directory, as it does any unfinished
        // create's). Checked on a retry too: a rollback that could not
        // remove a planted spare left its record Creating, and the retry
        // makes the same directory again.
        // A directory that cannot be read (no descriptor left, EIO) is
        // not handed out either, and the error says so: it is no sign of
        // a hand in `.creating`.
        let planted = match found.then(|| self.os.files.read_dir(&dir)) {
            Some(Ok(mut entries)) => entries.next().is_some(),
            Some(Err(e)) => {
                return Err(Error::os(
                    format!("reading new volume {}'s directory", rec.id),
                    e,
                ))
            }
            None => false,
        };
        if planted {
            tracing::error!(volume_id = %rec.id, dir = %dir.display(), "a new volume's directory is not empty (something was put into Berth's .creating by hand): not handed out");
            return Err(Error::Internal(format!(
                "the directory {} made for new volume {} is not empty; not handed out",
                dir.display(),
                rec.id
            )));
        }
        // `.creating` itself must be Berth's own directory: one moved away
        // by hand and a symlink to it put in its place leads outside
        // Berth's directories, and the spare found through it would be
        // moved from there into the root. Refused then by `ensure_dir`
        // below, as before spares existed (one lstat, no write).
        let own_area = || self.os.files.is_dir(&area);
        if taken && found && own_area() {
            if self.projects.is_some() {
                // Its project and limits are as durable as the record.
                self.give_project(rec, &dir)?;
                f.sync_dir(&dir).map_err(fail("syncing"))?;
            }
            return Ok(());
        }
        ensure_dir(f, &area, 0o700)
            .map_err(|e| Error::os(format!("creating {}", area.display()), e))?;
        spares::make_volume_dir(f, &dir).map_err(fail("creating"))?;
        // Project and limits before the record says Ready (and before the
        // directory is synced, which makes the project durable with it).
        self.give_project(rec, &dir)?;
        // The directory and its entry are durable before the record says
        // Ready (the move into the root after it need not be: start-up
        // finishes it from `.creating/` for a Ready record).
        f.sync_dir(&dir)
            .and_then(|_| f.sync_dir(&area))
            .map_err(fail("syncing"))?;
        Ok(())
    }

    fn ready(&self, rec: &VolumeRecord) -> Result<()> {
        let from = self.root.join(CREATING).join(&rec.id);
        if !self.os.files.exists(&from) {
            // Moved already (a retry of a create that answered an error
            // after this move).
            return Ok(());
        }
        let to = self.dir(&rec.id)?;
        self.os
            .files
            .rename_noreplace(&from, &to)
            .map_err(|e| Error::os(format!("moving {} into place", from.display()), e))?;
        // The trash its delete moves it into is made now, while there is
        // room: a directory made takes a block (ext4), and a delete on a
        // full filesystem that had to make it failed with ENOSPC, the
        // volume's space never given back. Best effort: the delete makes
        // it otherwise.
        let trash = self.root.join(TRASH);
        if !self.os.files.exists(&trash) {
            if let Err(e) = ensure_dir(self.os.files.as_ref(), &trash, 0o700) {
                tracing::warn!(dir = %trash.display(), error = %e, "could not make the local root's trash ahead of a delete");
            }
        }
        Ok(())
    }

    fn delete_with(&self, rec: &VolumeRecord, mount_table: &LazyTable) -> Result<()> {
        self.remove_volume(rec, mount_table, true)
    }

    fn rollback_create(&self, rec: &VolumeRecord) -> Result<()> {
        self.remove_volume(rec, &LazyTable::new(), false)
    }

    /// On the background thread (`crate::background`): the record is gone
    /// and the directory is in the trash already, so nothing an RPC
    /// answers waits for it (a volume of many files took its DeleteVolume
    /// as long as their removal).
    fn purge(&self, rec: &VolumeRecord) {
        let root = self.root.clone();
        let files = self.os.files.clone();
        let projects = self.projects.clone();
        let (id, project) = (rec.id.clone(), rec.project());
        let store = self.store.clone();
        crate::background::submit(move || {
            empty_trash_of(&root, files.as_ref(), projects.as_deref(), &id, project);
            // On a filesystem a tenant keeps full, the space the delete
            // freed refills the journal's reserve now, not at the next
            // change (by which time the tenant may have taken it).
            store.keep_reserve();
        });
    }

    /// Removes what the volume's trash entries hold, keeping each entry
    /// (an empty directory, the volume's own: put back by `undo_delete`,
    /// removed by `purge`). Its project stays held: the record still names
    /// it.
    fn free_set_aside(&self, rec: &VolumeRecord) -> Result<bool> {
        let f = self.os.files.as_ref();
        let mut freed = false;
        for (id, entry) in self.trash() {
            if id != rec.id || !f.lstat(&entry).is_ok_and(|m| m.is_dir()) {
                continue;
            }
            let inside = f
                .read_dir(&entry)
                .map_err(|e| Error::os(format!("reading {}", entry.display()), e))?;
            for e in inside {
                let p = e
                    .map_err(|e| Error::io(format!("reading {}", entry.display()), e))?
                    .path();
                // A directory is removed as a tree, anything else (a file,
                // a symlink: never what it leads to) unlinked.
                if f.lstat(&p).is_ok_and(|m| m.is_dir()) {
                    self.remove_tree(&p)?;
                } else {
                    f.remove_file(&p)
                        .map_err(|e| Error::os(format!("removing {}", p.display()), e))?;
                }
                freed = true;
            }
        }
        if freed {
            tracing::warn!(volume_id = %rec.id, "the state's filesystem has no room to record this volume's delete: its data is removed first, to make room");
        }
        Ok(freed)
    }

    fn undo_delete(&self, rec: &VolumeRecord) -> Result<()> {
        for (id, entry) in self.trash() {
            if id == rec.id && self.put_back(&id, &entry)? {
                break;
            }
        }
        Ok(())
    }

    fn durable_intent(&self) -> bool {
        false
    }

    /// The trash start-up found (`reconcile_orphans`), emptied on the
    /// background thread: start-up answers no RPC later for a deleted
    /// volume of millions of files.
    fn start_background(&self) {
        // From now on removals are made where they are asked for again.
        self.starting
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let entries =
            std::mem::take(&mut *self.startup_trash.lock().unwrap_or_else(|e| e.into_inner()));
        if entries.is_empty() {
            return;
        }
        tracing::info!(
            entries = entries.len(),
            "emptying the trash start-up found, in the background"
        );
        let trash = self.root.join(TRASH);
        let files = self.os.files.clone();
        let projects = self.projects.clone();
        let store = self.store.clone();
        crate::background::submit(move || {
            empty_startup_trash(&trash, files.as_ref(), projects.as_deref(), entries);
            store.keep_reserve();
        });
    }

    fn presence(&self) -> Option<super::Presence> {
        let ready =
            |r: &VolumeRecord| r.kind == Kind::Local && r.phase == crate::state::Phase::Ready;
        let expected = self.store.count(ready);
        let recorded = self.store.count(|r| r.kind == Kind::Local);
        let mut listed = self.listed.lock().unwrap_or_else(|e| e.into_inner());
        if listed.is_none() {
            *listed = Some(list_root(self.os.files.as_ref(), &self.root));
        }
        // An unreadable root is reported by `reconcile_orphans`.
        let mut names: Vec<&str> = match listed.as_ref() {
            Some(Ok(l)) => l.names().filter_map(|n| n.to_str()).collect(),
            Some(Err(_)) => return None,
            None => Vec::new(),
        };
        // Volume directories in the root that no record names (any phase):
        // creates make theirs under `.creating/` and record them before
        // moving them here, deletes move them out before removing the
        // record, so only lost records leave one.
        let (mut present, unrecorded) = self
            .store
            .held_and_unrecorded(names.iter().copied().filter(|n| self.owns_id(n)), ready);
        // A delete whose record could not be removed left the directory in
        // the trash, a crash after a create's Ready left it under
        // `.creating/`: `reconcile_orphans` puts both in place.
        let (trash, creating) = if expected > 0 {
            (self.trash(), self.creating())
        } else {
            (Vec::new(), Vec::new())
        };
        if !trash.is_empty() || !creating.is_empty() {
            names.extend(trash.iter().map(|(id, _)| id.as_str()));
            names.extend(creating.iter().map(String::as_str));
            names.sort_unstable();
            names.dedup();
            present = self
                .store
                .count_held(names.iter().copied().filter(|n| self.owns_id(n)), ready);
        }
        let missing = if present < expected {
            let here: std::collections::HashSet<&str> = names.iter().copied().collect();
            let all = self.store.filter(ready);
            super::some_missing(all.iter().map(|r| r.id.as_str()), &|id| here.contains(id))
        } else {
            Vec::new()
        };
        Some(super::Presence {
            root: self.root.clone(),
            what: "local root",
            expected,
            present,
            missing,
            recorded,
            unrecorded: super::some_unrecorded(&unrecorded),
        })
    }

    fn reconcile_orphans(&self, known: &dyn Fn(&str) -> bool) -> Result<()> {
        // What cannot be removed (a tenant's immutable or append-only file,
        // `chattr +i`/`+a`, in a deleted volume) stays, is logged, and the
        // first such failure is the answer; it stops none of the rest.
        // Before, the first one ended this cleanup on every start.
        let mut failed: Option<Error> = None;
        // Some(true): moved into the trash; Some(false): removed in place.
        let mut discard = |path: &Path, name: &str| -> Option<bool> {
            match self.discard(path, name) {
                Ok(moved) => Some(moved),
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e.render(), "could not remove storage that no record holds (the error says why: an immutable or append-only entry is named with its flag); kept, the rest of start-up's cleanup goes on");
                    failed.get_or_insert(e);
                    None
                }
            }
        };
        // Unfinished creates and snapshot copies first: while starting they
        // are moved into the trash (`discard`), which is listed after them
        // and emptied on the background thread once the socket is up.
        // Creates whose record says Ready but whose directory was not moved
        // into the root yet (a crash in between): moved now. Everything
        // else under `.creating/` (creates that never became Ready, also
        // one whose rollback just failed and whose record still says
        // Creating; copies of restores and clones that never finished) was
        // never handed out and is only Berth's own. Before, the directory
        // of any id with a record was moved into the root, where the retry
        // of a rollback took it for one handed out and kept it aside.
        if let Some(entries) = self.own_dir(CREATING) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let home = self.root.join(&name);
                if self.owns_id(&name)
                    && known(&name)
                    && !self.still_creating(&name)
                    && !self.os.files.exists(&home)
                {
                    self.os
                        .files
                        .rename_noreplace(&e.path(), &home)
                        .map_err(|err| {
                            Error::os(format!("moving {} into place", e.path().display()), err)
                        })?;
                    tracing::info!(volume_id = %name, "finished moving a new volume's directory into place");
                    continue;
                }
                let project = self.project_on(&e.path());
                // Moved: the trash holds its project until it is emptied.
                if matches!(discard(&e.path(), &name), Some(false)) {
                    self.release_unheld(project);
                }
            }
        }
        // Snapshots: an unfinished copy is removed; a copy without a record
        // (a lost state directory) is kept aside like any orphan.
        if let Some(entries) = self.own_dir(SNAPSHOTS) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(id) = name.strip_prefix(PARTIAL) {
                    // A whole copy whose record says Ready (a crash came
                    // before the move) goes into place; anything else was
                    // never handed out (an interrupted copy, also one whose
                    // record still says Creating because its rollback just
                    // failed, or one an older version made as
                    // `.partial-.partial-<id>`).
                    if self.owns_snapshot_id(id)
                        && known(id)
                        && !self
                            .store
                            .snapshot_get(id)
                            .is_some_and(|s| s.phase == Phase::Creating)
                        && !self.os.files.exists(&self.snapshot_dir(id)?)
                    {
                        self.place_snapshot(id)?;
                        tracing::info!(snapshot_id = %id, "finished moving a snapshot's copy into place");
                    } else {
                        discard(&e.path(), &name);
                    }
                } else if self.owns_snapshot_id(&name) && !known(&name) {
                    self.set_aside(&e.path(), &name)?;
                }
            }
        }
        // The trash: a volume whose record is still there was being
        // deleted when removing its record failed: it goes back. The rest
        // is emptied. What a create that never became Ready left (moved
        // here by its rollback, under its id) never goes into the root: a
        // directory there under a record still Creating is taken for one
        // that was handed out.
        for (id, path) in self.trash() {
            if known(&id) && self.put_back(&id, &path)? {
                continue;
            }
            // Emptied on the background thread once the socket is up
            // (`start_background`): a tree of millions of files takes
            // minutes to remove, and no RPC needs it gone. Its project id
            // stays held until it is (no create is given an id something
            // is still charged to; its limits are cleared only then), and
            // what it still takes on the disk is not free space: GetCapacity
            // and CreateVolume count the free space the filesystem reports.
            let project = self.project_on(&path).filter(|id| *id != 0);
            let ours = match (&self.projects, project) {
                (Some(p), Some(id)) if !p.is_held(id) => {
                    p.hold(id);
                    Some(id)
                }
                _ => None,
            };
            self.startup_trash
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((path, ours));
        }
        let listed = self.listed.lock().unwrap_or_else(|e| e.into_inner()).take();
        let listing = listed
            .unwrap_or_else(|| list_root(self.os.files.as_ref(), &self.root))
            .map_err(|e| Error::io(format!("reading {}", self.root.display()), e))?;
        for name in listing.names() {
            let Some(name) = name.to_str() else {
                continue;
            };
            if !self.owns_id(name) || known(name) {
                continue;
            }
            // A volume directory in the root without a record: creates make
            // theirs under `.creating/`, so this is a volume whose record
            // was lost (a log removed or cut short, another state
            // directory). Kept aside, never deleted, empty or not; its
            // project stays charged so it is not handed out.
            let path = self.root.join(name);
            // Listed at start-up before the interrupted operations were
            // finished: one of them may have removed it since.
            if !self.os.files.exists(&path) {
                continue;
            }
            tracing::error!(dir = %path.display(), "a volume directory without a record (its record was lost): kept aside in .orphaned, never deleted");
            self.set_aside(&path, name)?;
        }
        self.repair_limits();
        failed.map_or(Ok(()), Err)
    }

    fn snapshots(&self) -> bool {
        true
    }

    fn new_snapshot_id(&self) -> String {
        super::new_node_id(SNAP_PREFIX, &self.node)
    }

    fn owns_snapshot_id(&self, id: &str) -> bool {
        is_snapshot_id(id)
    }

    fn node_tag_of(&self, id: &str) -> Option<String> {
        super::id_node_tag(PREFIX, id)
            .or_else(|| super::id_node_tag(SNAP_PREFIX, id))
            .map(str::to_string)
    }

    /// A copy of the volume's directory under `.snapshots/`, sharing extents
    /// where the filesystem can (FICLONE), never hard links. The directory
    /// is not frozen: files written while the copy runs are copied as they
    /// are when reached (each file is consistent with itself).
    fn create_snapshot(&self, vol: &VolumeRecord, snap: &mut SnapshotRecord) -> Result<()> {
        let src = self.require_dir(&vol.id)?;
        self.snapshot_dir(&snap.id)?;
        // Made whole under its temporary name; moved to the snapshot's
        // once its record says Ready (`snapshot_ready`).
        self.copy_into_place(&src, SNAPSHOTS, &self.partial_snapshot_dir(&snap.id))
    }

    fn snapshot_ready(&self, snap: &SnapshotRecord) -> Result<()> {
        self.place_snapshot(&snap.id)
    }

    fn snapshot_flaw(&self, snap: &SnapshotRecord) -> Option<CopyFlaw> {
        self.snapshot_dir_flaw(snap)
    }

    fn delete_snapshot(&self, snap: &SnapshotRecord) -> Result<()> {
        self.remove_snapshot(snap, true)
    }

    fn rollback_snapshot(&self, snap: &SnapshotRecord) -> Result<()> {
        self.remove_snapshot(snap, false)
    }

    /// A snapshot whose directory is missing or damaged is refused before
    /// the new volume is recorded.
    /// Every capability of a local volume is a mount of its directory
    /// (`check_capability`: no raw block, fs_type only a hint): any source
    /// fits them.
    fn check_source(&self, _id: &str, _caps: &[Capability], from: Source<'_>) -> Result<()> {
        match from {
            Source::Snapshot(s) => self.usable_snapshot_dir(s).map(|_| ()),
            Source::Volume(_) => Ok(()),
        }
    }

    /// The new volume's directory is a copy of the snapshot's or the source
    /// volume's, made under `.creating/` and moved into place whole.
    fn create_from(&self, rec: &mut VolumeRecord, from: Source<'_>) -> Result<()> {
        let src = match from {
            Source::Snapshot(s) => self.usable_snapshot_dir(s)?,
            Source::Volume(v) => self.require_dir(&v.id)?,
        };
        // The copy is made whole under `.creating/` and moved into place by
        // `ready` once the record says Ready, as a plain create's directory
        // is: one in place under a record still Creating was handed out
        // (`kept_on_rollback`), and a copy a failed create left is Berth's
        // own.
        let dest = self.root.join(CREATING).join(&rec.id);
        if self.spares.use_taken(&rec.id) {
            // Spares are for creates without a source (`take_spare_id`):
            // an empty one here is not a copy made whole.
            self.remove_tree(&dest)?;
        }
        if self.os.files.is_dir(&dest) {
            // A retry after the copy was made whole.
            return self.give_project(rec, &dest);
        }
        if self.projects.is_none() {
            return self.copy_into_place(&src, CREATING, &dest);
        }
        // The copy is made inside a holder directory that has the new
        // volume's project, the inherit flag and its limits, so that every
        // file copied is charged to the volume (and a copy larger than the
        // volume fails), then moved into place.
        let f = self.os.files.as_ref();
        let area = self.root.join(CREATING);
        ensure_dir(f, &area, 0o700)
            .map_err(|e| Error::os(format!("creating {}", area.display()), e))?;
        let holder = area.join(format!("{PARTIAL}{}", rec.id));
        self.remove_tree(&holder)?;
        self.check_room_for_copy(&src, &area)?;
        let copied = self.copy_in_holder(rec, &src, &holder, &dest);
        if copied.is_err() && f.lstat(&holder).is_ok() {
            // A copy that fails (EDQUOT: the source holds more than the
            // volume's limits; ENOSPC) is removed with what it made, as
            // `copy_into_place` does: its rollback knows only `dest`, and
            // what was copied would take space until the next start.
            let _ = self.remove_tree(&holder);
        }
        copied
    }

    fn health(&self, rec: &VolumeRecord) -> Health {
        match self.require_own_dir(rec) {
            Ok(_) => Health::ok(),
            Err(e) => Health::abnormal(e.to_string()),
        }
    }

    fn stage(&self, rec: &VolumeRecord, staging: &Path, cap: &Capability) -> Result<()> {
        self.check_capability(cap)?;
        let (dir, seen) = self.stage_dir(rec)?;
        mounts::stage_bind(&self.os, &self.staged, &rec.id, (&dir, &seen), staging)
    }

    fn unstage(&self, rec: &VolumeRecord, staging: &Path) -> Result<()> {
        let dir = self.dir(&rec.id)?;
        let staged_at = || self.staged.path(&rec.id);
        mounts::unstage(&self.os, staging, Some(&mount_check_dir(&dir, &staged_at)))
    }

    fn publish(&self, rec: &VolumeRecord, a: &PublishArgs<'_>) -> Result<()> {
        self.check_capability(a.capability)?;
        let dir = self.dir(&rec.id)?;
        mounts::publish_bind(
            &self.os,
            |t| mountinfo::object_of(t, &dir),
            Some(&dir),
            a.staging,
            a.target,
            a.capability,
            a.readonly,
        )
    }

    /// No record: unmount what the staging path shows, unless it shows
    /// another directory than this volume's (another volume's, or anything
    /// that is not Berth's), as `unpublish` refuses it: an unknown id never
    /// takes down another volume's staging mount.
    fn unstage_path(&self, id: &str, staging: &Path) -> Result<()> {
        if let Ok(dir) = self.dir(id) {
            mounts::refuse_foreign_dir(&self.os, &mount_check_dir(&dir, &|| None), id, staging)?;
        }
        mounts::unstage(&self.os, staging, None)
    }

    fn unpublish(&self, id: &str, target: &Path) -> Result<()> {
        // One look (a statx) at the target for the refusal (is a mount
        // there, and what does it show) and the first turn of the
        // unmounts: nothing is mounted or unmounted between them (the
        // target's guard is held).
        let probed = self.os.probe.root_and_identity(target);
        let root = probed.0;
        if let Ok(dir) = self.dir(id) {
            let staged_at = || {
                self.store
                    .contains(id)
                    .then(|| self.staged.path(id))
                    .flatten()
            };
            mounts::refuse_foreign_dir_probed(
                &self.os,
                &mount_check_dir(&dir, &staged_at),
                id,
                target,
                probed,
            )?;
        }
        mounts::unpublish_from(&self.os, target, root)
    }

    /// With a project: the volume's own usage and limits from its quota.
    /// Otherwise the filesystem's (statvfs of the path).
    fn stats(&self, rec: &VolumeRecord, path: &Path) -> Result<VolumeStats> {
        self.check_mounted_at(rec, path)?;
        if let (Some(p), Some(id)) = (&self.projects, rec.project()) {
            let q = p.usage(id)?;
            return Ok(VolumeStats {
                usage: quota::usage_of(&q, u64::try_from(rec.capacity_bytes).unwrap_or(0)),
                block_size_only: None,
            });
        }
        let usage = self
            .os
            .fs
            .statvfs(path)
            .map_err(|e| Error::os(format!("statvfs of {}", path.display()), e))?;
        Ok(VolumeStats {
            usage,
            block_size_only: None,
        })
    }

    fn in_use(&self, rec: &VolumeRecord, mount_table: &LazyTable) -> Result<Vec<PathBuf>> {
        let t = mount_table.get(&self.os)?;
        let obj = self.object(&rec.id, t)?;
        Ok(mountinfo::mounts_of(t, &obj)
            .into_iter()
            .map(|m| m.mount_point.clone())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The root is listed through the OS layer: its names (not `.` and
    /// `..`), or the error a listing that fails gives.
    #[test]
    fn the_root_is_listed_through_the_os_layer() {
        let d = tempfile::tempdir().unwrap();
        for n in ["b", "a"] {
            std::fs::create_dir(d.path().join(n)).unwrap();
        }
        let (os, fake) = Os::fake();
        let listed = list_root(os.files.as_ref(), d.path()).unwrap();
        let mut names: Vec<_> = listed.names().collect();
        names.sort();
        assert_eq!(names, ["a", "b"]);
        fake.fail_next("list_names", libc::EIO);
        let e = list_root(os.files.as_ref(), d.path()).err();
        assert_eq!(e.and_then(|e| e.raw_os_error()), Some(libc::EIO));
    }

    /// Start-up over a root that cannot be listed: berth starts, and a
    /// volume's directory without a record stays where it is (nothing is
    /// moved on a listing it does not have); once the root can be listed,
    /// it is kept aside in .orphaned, with its data.
    #[test]
    fn storage_without_a_record_stays_while_the_root_cannot_be_listed() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("local");
        let name = format!("local-{}", "c".repeat(32));
        let lost = root.join(&name);
        std::fs::create_dir_all(&lost).unwrap();
        std::fs::write(lost.join("data"), b"kept").unwrap();
        let open = |os: Os| {
            let args = [
                "berth",
                "--data-dir",
                d.path().to_str().unwrap(),
                "--node-id",
                "n1",
                "--allow-missing-storage",
            ];
            let cli = <crate::config::Cli as clap::Parser>::try_parse_from(args).unwrap();
            crate::driver::Driver::new(cli.config, os)
        };
        let (os, fake) = Os::fake();
        fake.fail_op_under("list_names", &root, libc::EIO);
        drop(open(os).expect("started"));
        assert_eq!(std::fs::read(lost.join("data")).unwrap(), b"kept");
        drop(open(Os::fake().0).expect("started"));
        assert!(!lost.exists());
        let aside = root.join(ORPHANED).join(&name).join("data");
        assert_eq!(std::fs::read(aside).unwrap(), b"kept");
    }

    /// An empty directory born long after its volume is taken for the
    /// volume's only when its mark (`TAKEN_AS_XATTR`), read through the OS
    /// layer, names that volume; a mark that cannot be read is a doubt,
    /// and the directory is reported.
    #[test]
    fn the_mark_of_a_late_directory_is_read_through_the_os_layer() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("v");
        std::fs::create_dir(&dir).unwrap();
        let (os, fake) = Os::fake();
        let files = os.files.as_ref();
        let m = files.lstat(&dir).unwrap();
        let id = format!("local-{}", "a".repeat(32));
        let created = 1_800_000_000;
        let late = created + MADE_WITHIN_SECS + 60;
        fake.set_born(
            &dir,
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(late),
        );
        assert!(made_by_hand(files, &id, created, &dir, &m).is_some());
        fake.set_xattr(&dir, TAKEN_AS_XATTR, id.as_bytes());
        assert_eq!(made_by_hand(files, &id, created, &dir, &m), None);
        fake.fail_next("getxattr", libc::EIO);
        assert!(made_by_hand(files, &id, created, &dir, &m).is_some());
        fake.set_xattr(&dir, TAKEN_AS_XATTR, b"local-another");
        assert!(made_by_hand(files, &id, created, &dir, &m).is_some());
    }

    /// The trash is looked at and listed through the OS layer
    /// (`files::read_own_dir`): one that cannot be looked at or listed has
    /// no entries (nothing in it is removed), and a symlink in its place
    /// is never listed.
    #[test]
    fn the_trash_is_read_through_the_os_layer() {
        let d = tempfile::tempdir().unwrap();
        let trash = d.path().join(TRASH);
        std::fs::create_dir(&trash).unwrap();
        let id = format!("local-{}", "b".repeat(32));
        std::fs::create_dir(trash.join(format!("{id}-17"))).unwrap();
        let (os, fake) = Os::fake();
        let files = os.files.as_ref();
        let listed = trash_entries(files, d.path());
        assert_eq!(listed, [(id.clone(), trash.join(format!("{id}-17")))]);
        fake.fail_next("lstat", libc::EIO);
        assert!(trash_entries(files, d.path()).is_empty());
        fake.fail_op_under("read_dir", &trash, libc::EIO);
        assert!(trash_entries(files, d.path()).is_empty());
        fake.clear_file_faults();
        assert_eq!(trash_entries(files, d.path()).len(), 1);
        let elsewhere = d.path().join("elsewhere");
        std::fs::rename(&trash, &elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &trash).unwrap();
        assert!(trash_entries(files, d.path()).is_empty());
    }
}
