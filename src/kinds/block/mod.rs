//! Block volumes: a file under `--block-root` attached to a loop device, or
//! a whole disk of `--disk-pool`; used raw (`volumeMode: Block`) or with an
//! ext4/xfs filesystem Berth makes on first stage.
//!
//! | file         | what                                                   |
//! |--------------|--------------------------------------------------------|
//! | `params.rs`  | StorageClass parameters, sizes                         |
//! | `attach.rs`  | loop attachments: find, attach, verified detach        |
//! | `format.rs`  | the decision whether a device may be formatted         |
//! | `disks.rs`   | the whole-disk pool                                    |
//! | `node.rs`    | stage, unstage, publish, unpublish, stats              |
//! | `expand.rs`  | controller and node expansion                          |
//! | `snapshot.rs`| snapshots, restores and clones of file volumes         |
//!
//! Safety rules: Berth formats, wipes or deletes only what its own records
//! name (files `<block-root>/<id>.img` for ids of the exact form
//! `block-<32 hex>`, disks recorded at creation and still identical);
//! device paths come only from those records or from the kernel's list of
//! Berth's own loop attachments.
mod attach;
mod disks;
mod expand;
mod format;
mod node;
pub mod params;
mod snapshot;

pub use disks::{identify_disk, outside_pool, weak_identity, OwnFiles};
pub use snapshot::{
    restoring_path, snapshot_copy_flaw, snapshot_kept_on_rollback, snapshot_partial_path,
};

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::config::DiskWipe;
use crate::error::{Error, Result};
use crate::node::mounts::{self, LazyTable};
use crate::os::files::{self, allocated_bytes, ensure_dir, Files, Open};
use crate::os::{FsUsage, MountEntry, Os};
use crate::state::{
    AccessType, Allocation, BlockInfo, Capability, DiskRef, Kind, Phase, SnapshotRecord, Store,
    VolumeRecord,
};

use super::{
    Expansion, Growth, Health, LocalKind, NodeExpandArgs, PoolCapacity, PublishArgs, Source,
    VolumeKind, VolumeStats,
};
use params::Pool;

const PREFIX: &str = "block-";

/// Prefix of the internal records of pool disks that must be wiped before
/// they are offered again (their volume was deleted while the disk was
/// missing). Not a volume id of any kind: no RPC reaches them.
const WIPE_PREFIX: &str = "wipe-";

fn is_wipe_record(id: &str) -> bool {
    id.starts_with(WIPE_PREFIX)
}

/// The id of the record that has the disk of block volume `id` erased
/// (`remember_wipe`, `released`).
fn wipe_id(id: &str) -> String {
    format!("{WIPE_PREFIX}{}", id.strip_prefix(PREFIX).unwrap_or(id))
}

/// Prefix of the internal records of pool disks held for an operator: the
/// disk's volume reached Ready (its marker says so, `disk_marker`) yet its
/// record still said Creating at start-up (`BlockKind::hold_disk`). Not a
/// volume id of any kind: no RPC reaches them, and nothing erases or
/// offers the disk until an operator releases it (`berth state release`).
pub const HELD_PREFIX: &str = "held-";

/// The id of the record that holds the disk of block volume `id`.
pub fn held_id(id: &str) -> String {
    format!("{HELD_PREFIX}{}", id.strip_prefix(PREFIX).unwrap_or(id))
}

/// The block volume whose disk the record `id` holds, if it is a hold.
pub fn held_volume(id: &str) -> Option<String> {
    id.strip_prefix(HELD_PREFIX)
        .map(|rest| format!("{PREFIX}{rest}"))
}

/// What `berth state check` says of a held disk (the record `r`,
/// `hold_disk`), and what an operator does about it.
pub fn held_disk_finding(r: &VolumeRecord) -> String {
    let disk = r
        .block
        .as_ref()
        .and_then(|b| b.disk.as_ref())
        .map(|d| d.by_id.as_deref().unwrap_or(&d.path).display().to_string())
        .unwrap_or_default();
    let volume = held_volume(&r.id).unwrap_or_default();
    let name = r.context.get(HELD_NAME).map(String::as_str).unwrap_or("");
    format!(
        "disk {disk} is held: the record of its volume {volume} (named {name}) still said Creating at start-up, yet the volume got as far as its Ready record (its disk marker in {DISK_MARKERS}/ says so), so it may have been handed out and lost its Ready record (a damaged or cut journal), holding a tenant's data; berth never erases it nor offers it to a new volume. If a PersistentVolume names {volume}, its data is on this disk: copy it off (e.g. dd the disk to a file or another disk) before anything else. Then, with berth stopped, run `berth state release {}`: berth erases the disk and returns it to the pool",
        r.id
    )
}

/// Where a hold keeps the name of the volume whose disk it holds.
const HELD_NAME: &str = "volume-name";

/// Whether the hold `hold` is one a CreateVolume of its volume's name
/// took the volume back from (`adopt_held`) and whose removal, the last
/// journal write of that, failed: `vol` is the Ready record of the very
/// volume it holds the disk of (the same id, the same name), and names the
/// very same disk. The hold's end is then only a write to finish
/// (`BlockKind::finish_taken_back_hold`); a hold that differs from its
/// volume's record in anything of that stays, for an operator.
pub fn hold_taken_back(hold: &VolumeRecord, vol: &VolumeRecord) -> bool {
    vol.phase == Phase::Ready && hold_names(hold, vol)
}

/// Whether the hold `hold` holds the disk of the very volume `vol`,
/// whatever its phase: the same id, the same name, the very same disk.
fn hold_names(hold: &VolumeRecord, vol: &VolumeRecord) -> bool {
    fn disk(r: &VolumeRecord) -> Option<&DiskRef> {
        r.block.as_ref().and_then(|b| b.disk.as_ref())
    }
    held_volume(&hold.id).as_deref() == Some(vol.id.as_str())
        && vol.kind == Kind::Block
        && hold.kind == Kind::Block
        && hold.context.get(HELD_NAME) == Some(&vol.name)
        && disk(hold).is_some()
        && disk(hold) == disk(vol)
}

/// How the hold `hold`, which bears the id of the volume `vol`'s hold
/// (`held_id`), differs from that volume, in words: another volume name,
/// another disk (or none), another kind. None when it holds the disk of
/// the very volume (`hold_names`), or is not that volume's hold. Such a
/// hold says another claimant may own the disk: `vol`'s DeleteVolume is
/// refused while it is there (`BlockKind::refuse_foreign_hold`), and
/// `berth state check` says so beside the held disk.
pub fn hold_differs(hold: &VolumeRecord, vol: &VolumeRecord) -> Option<String> {
    fn disk(r: &VolumeRecord) -> Option<&DiskRef> {
        r.block.as_ref().and_then(|b| b.disk.as_ref())
    }
    fn named(d: Option<&DiskRef>) -> String {
        d.map_or("none".into(), |d| {
            d.by_id.as_deref().unwrap_or(&d.path).display().to_string()
        })
    }
    if held_volume(&hold.id).as_deref() != Some(vol.id.as_str()) || hold_names(hold, vol) {
        return None;
    }
    let mut what = Vec::new();
    if hold.kind != Kind::Block || vol.kind != Kind::Block {
        what.push("it is not a block record".to_string());
    }
    let name = hold.context.get(HELD_NAME).map(String::as_str);
    if name != Some(vol.name.as_str()) {
        what.push(format!(
            "it names the volume {:?}, not {:?}",
            name.unwrap_or(""),
            vol.name
        ));
    }
    if disk(hold).is_none() || disk(hold) != disk(vol) {
        what.push(format!(
            "it holds the disk {}, not the volume's disk {}",
            named(disk(hold)),
            named(disk(vol))
        ));
    }
    Some(what.join(" and "))
}

/// What ends the hold `held` (`berth state release`, the operator's
/// decision once what the disk held is saved): the record that has the
/// disk erased (with `--disk-wipe`) and then returned to the pool, as a
/// volume deleted while its disk was missing has (`remember_wipe`; a
/// retry finds it and erases it). None when `held` is not a hold.
pub fn released(held: &VolumeRecord) -> Option<VolumeRecord> {
    let vol = held_volume(&held.id)?;
    held.block.as_ref().and_then(|b| b.disk.as_ref())?;
    let id = wipe_id(&vol);
    Some(VolumeRecord {
        id: id.clone(),
        name: id,
        phase: Phase::Deleting,
        context: Default::default(),
        source: None,
        ..held.clone()
    })
}

/// Paths for a message: "a, b, c".
fn shown(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// ALREADY_EXISTS: volume `id` is staged at `staging` through `device`
/// read-only or read-write (`is`), not as the request asks (`want`).
fn staged_otherwise(id: &str, staging: &Path, device: &Path, is: bool, want: bool) -> Error {
    let mode = |ro: bool| if ro { "read-only" } else { "read-write" };
    Error::Conflict(format!(
        "volume {id} is staged at {} {} ({}), not {} as asked",
        staging.display(),
        mode(is),
        device.display(),
        mode(want)
    ))
}

/// The directory in the block root of the markers of disk volumes
/// (`disk_marker`).
pub const DISK_MARKERS: &str = ".disks";

/// The marker of disk volume `id` under the block root `root`: an empty
/// file, made durable before the volume's record first says Ready and kept
/// for the volume's whole life (`BlockKind::mark_disk`). It lives outside
/// the state journal, so a journal that loses the volume's Ready line (cut
/// or damaged) does not lose it: a disk volume whose record says Creating
/// at start-up with its marker there may have been handed out, and its
/// disk is held (`BlockKind::hold_disk`); without it, the create never
/// reached Ready and nothing of it was handed out.
pub fn disk_marker(root: &Path, id: &str) -> PathBuf {
    root.join(DISK_MARKERS).join(id)
}

/// Whether the marker of disk volume `id` is there (`disk_marker`); one
/// that cannot be looked at counts as there (the disk is then held, never
/// erased).
pub fn disk_marked(files: &dyn crate::os::files::Files, root: &Path, id: &str) -> bool {
    match files.lstat(&disk_marker(root, id)) {
        Ok(_) => true,
        Err(e) => e.errno() != Some(libc::ENOENT),
    }
}

/// The block volume a disk record `id` is about: the volume itself, or
/// the one whose disk a hold or a wipe record claims.
fn disk_volume_of(id: &str) -> Option<String> {
    if id.starts_with(PREFIX) {
        return Some(id.to_string());
    }
    id.strip_prefix(HELD_PREFIX)
        .or_else(|| id.strip_prefix(WIPE_PREFIX))
        .map(|rest| format!("{PREFIX}{rest}"))
}

/// Whether `id` is the id of a block record: a volume's
/// (`BlockKind::owns_id`), or the record of a pool disk to wipe
/// (`wipe-`) or held (`held-`), each the volume's 32 hex digits.
/// Whether `id` is a block volume's id (`BlockKind::owns_id`), not one of
/// the kind's internal records (`wipe-`, `held-`).
pub fn is_volume_id(id: &str) -> bool {
    super::is_hex_id(PREFIX, id)
}

pub fn is_record_id(id: &str) -> bool {
    [PREFIX, WIPE_PREFIX, HELD_PREFIX]
        .iter()
        .any(|p| super::is_hex_id(p, id))
}

/// Whether `id` is a block snapshot's id (`BlockKind::owns_snapshot_id`).
pub fn is_snapshot_id(id: &str) -> bool {
    super::is_hex_id(snapshot::SNAP_PREFIX, id)
}

/// The backing file of block volume `id` under `root` (ids are checked by
/// the caller: `BlockKind::file`).
pub fn volume_file(root: &Path, id: &str) -> PathBuf {
    root.join(format!("{id}.img"))
}

/// Whether the rollback of `rec` keeps its backing file `f` (a regular
/// file) aside in `.orphaned/` instead of deleting it: a plain create that
/// never answered (`Creating`, no content source) made a file nothing wrote
/// to, so one that holds data (SEEK_DATA), or that cannot be told about,
/// was handed out after all (a record that lost its Ready). A restore or
/// clone puts its file at the volume's name only once its record says
/// Ready (`restore_onto_file`), so such a file was handed out too (the
/// tenant's data cannot be told from the copy's): kept as well. Start-up's
/// rollback and `state check` ask the same question here.
pub fn kept_on_rollback(files: &dyn Files, rec: &VolumeRecord, f: &Path) -> bool {
    rec.phase == Phase::Creating && (rec.source.is_some() || files.holds_data(f) != Some(false))
}

/// What is wrong with a backing file `f` of `len` bytes that Berth made
/// `made` bytes long (for NodeStageVolume, NodeExpandVolume and `berth
/// state check`).
pub fn cut_short(id: &str, f: &Path, len: u64, made: u64) -> String {
    format!(
        "backing file {} of volume {id} has {len} bytes, less than the {made} Berth made it: it was cut short outside Berth, and what it held past byte {len} is gone; Berth does not grow it back with zeros. Put the whole file back (from a backup) or delete the volume",
        f.display()
    )
}

/// Where backing files without a record are kept aside (in the block root).
const ORPHANED: &str = ".orphaned";

pub struct BlockKind {
    root: PathBuf,
    /// Berth's other directories (state dir, local root): no loop device
    /// of a file under them, or under `root`, is a pool disk.
    own_dirs: Vec<PathBuf>,
    /// The state directory: a file volume's space makes room for the
    /// journal only on its filesystem (`free_for_intent`).
    state_dir: PathBuf,
    /// This node's id (new ids carry its tag).
    node: String,
    disk_pool: Vec<String>,
    disk_wipe: DiskWipe,
    os: Os,
    store: Arc<Store>,
    /// The local kind, when it is served: where its root is on the block
    /// root's filesystem, the space its volumes were promised and may
    /// still write is not the file pool's (`file_room`).
    local: Option<Arc<LocalKind>>,
    /// Serialises allocations from the file pool (thick creates, growth),
    /// so a free-space check and the allocation it admits are one step.
    alloc: Mutex<()>,
    /// Serialises choosing and recording a disk of the disk pool.
    claim: Mutex<()>,
    /// Berth's exclusive claim (`BlockDevices::claim`: O_EXCL, kept open)
    /// of each disk a record of its has (by record id) while nothing of
    /// its own mounts or binds it: another berth given the same pool sees
    /// it held, never free (`disks::BlockKind::keep_claim`).
    disk_claims: Mutex<HashMap<String, crate::os::DeviceClaim>>,
    /// Pool disks found holding data, warned about once (forgotten when
    /// one reads as zeros again).
    data_warned: Mutex<std::collections::HashSet<PathBuf>>,
    /// Pool disks without a by-id link (never offered), warned about once.
    unnamed_warned: Mutex<std::collections::HashSet<PathBuf>>,
    /// Where each volume is staged (`node::staged`).
    staged: Arc<crate::node::staged::StagedAt>,
}

/// What the file pool may take of the block root's filesystem
/// (`BlockKind::file_room`).
struct FileRoom {
    usage: FsUsage,
    /// Free bytes that block files may take.
    room: u64,
    /// Free bytes kept back for local volumes on the same filesystem.
    local: u64,
}

impl FileRoom {
    /// "N bytes free", with what was kept back for local volumes.
    fn describe(&self) -> String {
        if self.local == 0 {
            format!("{} bytes free", self.room)
        } else {
            format!(
                "{} bytes free ({} free on its filesystem, less {} that local volumes on the same filesystem may still write into their sizes)",
                self.room, self.usage.available_bytes, self.local
            )
        }
    }
}

/// A volume's device: a loop device or a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Dev {
    path: PathBuf,
    major: u32,
    minor: u32,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl BlockKind {
    /// The block root, Berth's other directories (`BlockKind::own_dirs`),
    /// the disk pool and how it is erased come from `cfg`; the block root
    /// must exist (`Driver::new` makes it and holds its lock). `local`: the
    /// local kind, when it is served (its root may share the block root's
    /// filesystem). `staged`: where each volume is staged (`node::staged`,
    /// shared with the driver).
    pub fn new(
        cfg: &crate::config::Config,
        node: &str,
        os: Os,
        store: Arc<Store>,
        local: Option<Arc<LocalKind>>,
        staged: Arc<crate::node::staged::StagedAt>,
    ) -> Result<Self> {
        Ok(BlockKind {
            root: cfg.block_root(),
            own_dirs: cfg.own_dirs(),
            state_dir: cfg.state_dir(),
            node: node.to_string(),
            disk_pool: cfg.disk_pool.clone(),
            disk_wipe: cfg.disk_wipe,
            os,
            store,
            local,
            alloc: Mutex::new(()),
            claim: Mutex::new(()),
            disk_claims: Mutex::new(HashMap::new()),
            data_warned: Mutex::new(Default::default()),
            unnamed_warned: Mutex::new(Default::default()),
            staged,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The backing file of a volume; only for ids this kind owns.
    pub fn file(&self, id: &str) -> Result<PathBuf> {
        if !self.owns_id(id) {
            return Err(Error::NotFound(format!(
                "volume {id} is not a block volume"
            )));
        }
        Ok(volume_file(&self.root, id))
    }

    /// Where an offline ext4 resize of volume `id` saves what it changes
    /// (`mkfs::grow_ext4_unmounted`): beside its file, on the block root
    /// (also for a disk volume), so that it outlives a crash.
    pub(super) fn growth_undo_file(&self, id: &str) -> Result<PathBuf> {
        if !self.owns_id(id) {
            return Err(Error::NotFound(format!(
                "volume {id} is not a block volume"
            )));
        }
        Ok(self.root.join(format!("{id}.e2undo")))
    }

    /// Puts back what an offline ext4 resize of the volume that did not
    /// finish changed (`mkfs::undo_interrupted_ext4_growth`), before the
    /// filesystem is mounted: a mount would leave it half grown, with
    /// errors `e2fsck -p` does not fix.
    fn undo_interrupted_growth(&self, rec: &VolumeRecord, dev: &Dev) -> Result<()> {
        let undo = self.growth_undo_file(&rec.id)?;
        crate::os::mkfs::undo_interrupted_ext4_growth(
            self.os.cmd.as_ref(),
            self.os.files.as_ref(),
            &dev.path,
            &undo,
        )
        .map(|_| ())
        .map_err(|e| {
            Error::os(
                format!(
                    "putting back what an interrupted resize of volume {} changed ({})",
                    rec.id,
                    undo.display()
                ),
                e,
            )
        })
    }

    fn info(rec: &VolumeRecord) -> Result<BlockInfo> {
        rec.block.as_deref().cloned().ok_or_else(|| {
            Error::Internal(format!(
                "record of block volume {} has no block section",
                rec.id
            ))
        })
    }

    /// Writes the block section of a record (under the volume's guard).
    /// `file_bytes` keeps the larger of the stored and the given value: a
    /// caller's copy read before the file grew does not take it back.
    fn save_info(&self, rec: &VolumeRecord, info: &BlockInfo) -> Result<()> {
        let mut r = self.store.get(&rec.id).unwrap_or_else(|| rec.clone());
        let mut info = info.clone();
        info.file_bytes = info
            .file_bytes
            .max(r.block.as_ref().and_then(|b| b.file_bytes));
        r.block = Some(Box::new(info));
        self.store.put(&r)?;
        Ok(())
    }

    /// The backing file, which must be a regular file.
    fn require_file(&self, id: &str) -> Result<PathBuf> {
        let f = self.file(id)?;
        match self.os.files.lstat(&f) {
            Ok(m) if m.file_type().is_file() => Ok(f),
            _ => Err(Error::WrongState(format!(
                "backing file {} of volume {id} is missing",
                f.display()
            ))),
        }
    }

    /// Remembers that the disk of `rec` (deleted while the disk was missing)
    /// must be wiped before it is offered again: a record of its own, in
    /// phase Deleting, claims the disk (so it is never free) until a retry
    /// finds it back and wipes it (`Driver::retry_pending`). Idempotent.
    fn remember_wipe(&self, rec: &VolumeRecord, d: &DiskRef) -> Result<String> {
        let id = wipe_id(&rec.id);
        let mut info = rec.block.clone().unwrap_or_default();
        info.disk = Some(d.clone());
        let pending = VolumeRecord {
            id: id.clone(),
            name: id.clone(),
            kind: Kind::Block,
            seq: 0,
            phase: Phase::Deleting,
            capacity_bytes: 0,
            node: rec.node.clone(),
            parameters: Default::default(),
            capabilities: Vec::new().into(),
            context: Default::default(),
            published: Default::default(),
            created_unix: crate::driver::now_unix(),
            block: Some(info),
            source: None,
            project: None,
            extra: None,
        };
        self.store.put(&pending)?;
        Ok(id)
    }

    /// Holds the disk `d` of `rec`, a disk volume whose record still says
    /// Creating at start-up though its marker (`disk_marker`, written just
    /// before its Ready record) is there: it may have been handed out and
    /// lost its Ready record (a cut or damaged journal), and a tenant's
    /// data on a disk cannot be told from a restore's copy nor, where the
    /// tenant wrote outside the pool's blank sample, from a blank disk. A
    /// record of its own (phase Ready, so no retry ever erases it) claims
    /// the disk: it is never erased, never offered to a new volume
    /// (`free_disks`) nor counted as free (GetCapacity), also across
    /// restarts, until an operator releases it (`berth state
    /// release`); `berth state check` reports it as an error. Idempotent.
    fn hold_disk(&self, rec: &VolumeRecord, d: &DiskRef) -> Result<String> {
        let id = held_id(&rec.id);
        let mut info = rec.block.clone().unwrap_or_default();
        info.disk = Some(d.clone());
        let mut context = BTreeMap::new();
        context.insert(HELD_NAME.to_string(), rec.name.clone());
        let held = VolumeRecord {
            id: id.clone(),
            name: id.clone(),
            kind: Kind::Block,
            seq: 0,
            phase: Phase::Ready,
            capacity_bytes: 0,
            node: rec.node.clone(),
            parameters: rec.parameters.clone(),
            capabilities: Vec::new().into(),
            context: context.into(),
            published: Default::default(),
            created_unix: crate::driver::now_unix(),
            block: Some(info),
            source: rec.source.clone(),
            project: None,
            extra: None,
        };
        self.store.put(&held)?;
        Ok(id)
    }

    /// Writes the marker of disk volume `id` (`disk_marker`), durably:
    /// the file, its entry in `.disks/` and that directory's entry in the
    /// block root. The last step of a disk volume's create, restore or
    /// clone, before its record says Ready; start-up writes it for a Ready
    /// disk volume without one (made before markers were). Idempotent.
    fn mark_disk(&self, id: &str) -> Result<()> {
        if !self.owns_id(id) {
            return Err(Error::Internal(format!(
                "{id} is not a block volume id; no disk marker made"
            )));
        }
        let f = self.os.files.as_ref();
        let dir = self.root.join(DISK_MARKERS);
        ensure_dir(f, &dir, 0o700)
            .map_err(|e| Error::os(format!("creating {}", dir.display()), e))?;
        let path = disk_marker(&self.root, id);
        let file = f
            .open(&path, Open::CreateOrKeep)
            .map_err(|e| Error::os(format!("creating {}", path.display()), e))?;
        f.sync(&file, &path)
            .map_err(|e| Error::os(format!("syncing {}", path.display()), e))?;
        for d in [&dir, &self.root] {
            f.sync_dir(d)
                .map_err(|e| Error::os(format!("syncing {}", d.display()), e))?;
        }
        Ok(())
    }

    /// Start-up, one entry `e` of the block root (`reconcile_orphans`):
    /// a restore's copy is moved to its name or removed, a volume file
    /// without a record moved aside.
    fn reconcile_file(&self, e: &std::fs::DirEntry, known: &dyn Fn(&str) -> bool) -> Result<()> {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_suffix(".img") else {
            return Ok(());
        };
        if let Some(id) = id.strip_prefix(snapshot::RESTORING) {
            // A restore's copy: renamed into place when its record is no
            // longer Creating (it said Ready; a crash came between the
            // two); otherwise never handed out, only Berth's own: also one
            // whose record still says Creating because its rollback just
            // failed. Before, the copy of any id with a record was renamed
            // to the volume's name, where the retry of the rollback took
            // it for a file handed out and kept it in `.orphaned/`.
            if self.owns_id(id)
                && known(id)
                && !self.still_creating(id)
                && !self.os.files.exists(&self.file(id)?)
            {
                self.place_restored(id)?;
                tracing::info!(volume_id = %id, "finished moving a restored volume's file into place");
            } else {
                self.os
                    .files
                    .remove_file(&e.path())
                    .map_err(|err| Error::os(format!("removing {}", e.path().display()), err))?;
            }
            return Ok(());
        }
        if !self.owns_id(id) || known(id) {
            return Ok(());
        }
        let path = e.path();
        let to = self.keep_aside(&path, &name)?;
        tracing::warn!(file = %path.display(), to = %to.display(), "block volume file without a record moved aside");
        Ok(())
    }

    /// Whether the record of volume `id` still says Creating: a copy made
    /// for it was never handed out and never goes to the volume's name.
    fn still_creating(&self, id: &str) -> bool {
        self.store
            .get(id)
            .is_some_and(|r| r.phase == Phase::Creating)
    }

    /// Ends the hold of the disk of `vol` when it is a leftover of the
    /// volume's own take-back (`hold_taken_back`: a CreateVolume of its
    /// name got the volume back, and the journal write removing the hold
    /// failed, or berth stopped before it): the hold is removed, the
    /// disk's claim kept under the volume's id, and that is logged. True
    /// when it removed one. Any other hold stays.
    fn finish_taken_back_hold(&self, vol: &VolumeRecord) -> Result<bool> {
        let hold = held_id(&vol.id);
        let Some(h) = self.store.get(&hold) else {
            return Ok(false);
        };
        if !hold_taken_back(&h, vol) {
            return Ok(false);
        }
        self.store.remove(&hold)?;
        self.release_claim(&hold);
        if let Some(d) = vol.block.as_ref().and_then(|b| b.disk.as_ref()) {
            self.keep_claim(&vol.id, d);
        }
        tracing::warn!(volume_id = %vol.id, name = %vol.name, hold = %hold, "removed the hold of a disk whose volume was taken back from it and is Ready (the journal write that ends the hold had failed, or berth stopped before it)");
        Ok(true)
    }

    /// DeleteVolume (or its retry) of the disk volume `vol` beside a hold
    /// left from its take-back (`hold_names`: the same id, name and disk;
    /// its removal failed at the take-back and again when the volume was
    /// made Ready, and berth did not restart since): the hold is removed
    /// before the disk is erased, and its claim let go (it would make the
    /// erase fail, EBUSY). The volume's own record, which the delete keeps
    /// until the disk is erased, claims the disk meanwhile; what the hold
    /// kept for an operator is that volume's, which the CO deletes. A
    /// removal that fails fails the delete, before anything is erased.
    /// Any other hold stays; nothing is done for a record still Creating
    /// (an unfinished create's rollback holds its disk itself).
    fn end_hold_at_delete(&self, vol: &VolumeRecord) -> Result<()> {
        if vol.phase == Phase::Creating {
            return Ok(());
        }
        let hold = held_id(&vol.id);
        let Some(h) = self.store.get(&hold) else {
            return Ok(());
        };
        if !hold_names(&h, vol) {
            return self.refuse_foreign_hold(vol);
        }
        self.store.remove(&hold)?;
        self.release_claim(&hold);
        tracing::warn!(volume_id = %vol.id, name = %vol.name, hold = %hold, "removed the hold left beside a volume taken back from it, at the volume's delete (the journal writes that end the hold had failed)");
        Ok(())
    }

    /// The hold bearing the id of `rec`'s hold (`held-<id>`) when it
    /// differs from `rec` (`hold_differs`), with how, in words.
    fn differing_hold(&self, rec: &VolumeRecord) -> Option<(String, String)> {
        let hold = held_id(&rec.id);
        let what = self.store.get(&hold).and_then(|h| hold_differs(&h, rec))?;
        Some((hold, what))
    }

    /// FAILED_PRECONDITION when a hold bears the id of the disk volume
    /// `vol`'s hold (`held-<id>`) yet differs from it (`hold_differs`:
    /// another volume name, another disk): it says another claimant may
    /// own the disk, and a doubt means "do not erase". DeleteVolume checks
    /// it before anything is written (`VolumeKind::refuse_delete`), and the
    /// delete itself again (`end_hold_at_delete`): nothing is erased,
    /// nothing changed, until an operator has settled the hold. Before,
    /// such a hold was left alone and the volume's disk erased.
    fn refuse_foreign_hold(&self, vol: &VolumeRecord) -> Result<()> {
        if vol.block.as_ref().is_none_or(|b| b.disk.is_none()) {
            return Ok(());
        }
        let Some((hold, what)) = self.differing_hold(vol) else {
            return Ok(());
        };
        Err(Error::WrongState(format!(
            "volume {} ({}) is not deleted and its disk not erased: the hold {hold} bears this volume's id, but {what}; another claimant may own the disk, so nothing was erased or changed. See what `berth state check` says of {hold} and settle it (whose data the disks hold); the delete goes through once that hold is gone",
            vol.id, vol.name
        )))
    }

    /// FAILED_PRECONDITION before the disk of `rec` (a create whose record
    /// still says Creating and that may have been handed out) is held,
    /// when a hold bearing its id is there already and differs from it
    /// (`hold_differs`: another volume name, another disk): writing the
    /// new hold over it would end its claim of its disk, which may hold
    /// another claimant's data (offered to a new volume where its data
    /// lies outside the pool's blank sample, and erased at that volume's
    /// delete). Both records stay as they are, and the disks claimed;
    /// start-up logs it and the retry every minute tries again. Before,
    /// the hold was written over.
    fn refuse_overwriting_hold(&self, rec: &VolumeRecord) -> Result<()> {
        let Some((hold, what)) = self.differing_hold(rec) else {
            return Ok(());
        };
        Err(Error::WrongState(format!(
            "the disk of volume {} ({}), whose create never answered, is neither held nor erased: the hold {hold} bears this volume's id already, but {what}; another claimant may own a disk, so nothing was changed. See what `berth state check` says of {hold} and settle it",
            rec.id, rec.name
        )))
    }

    /// Start-up: every hold left beside the Ready record of the volume
    /// taken back from it (`finish_taken_back_hold`) is removed; one that
    /// cannot be is logged, for the next start-up or CreateVolume of the
    /// volume's name.
    fn finish_taken_back_holds(&self) {
        let holds = self.store.filter(|r| held_volume(&r.id).is_some());
        for h in holds {
            let Some(vol) = held_volume(&h.id).and_then(|id| self.store.get(&id)) else {
                continue;
            };
            if let Err(e) = self.finish_taken_back_hold(&vol) {
                tracing::error!(volume_id = %vol.id, hold = %h.id, error = %e.render(), "could not remove the hold left beside a volume taken back from it; the next start-up tries again");
            }
        }
    }

    /// Whether disk volume `id` has its marker (`disk_marked`).
    fn disk_marked(&self, id: &str) -> bool {
        disk_marked(self.os.files.as_ref(), &self.root, id)
    }

    /// Removes the marker of disk volume `id`, if it is there.
    fn unmark_disk(&self, id: &str) -> Result<()> {
        let path = disk_marker(&self.root, id);
        match self.os.files.remove_file(&path) {
            Err(e) if e.errno() != Some(libc::ENOENT) => {
                Err(Error::os(format!("removing {}", path.display()), e))
            }
            _ => Ok(()),
        }
    }

    /// Whether the disk of `rec` (a record still Creating) may have been
    /// handed out: its marker is there, or its disk is held already (a
    /// hold whose volume's record came back: a journal cut after it), or
    /// its record was made before markers were (`BlockInfo::marker`: the
    /// marker's absence tells nothing then).
    fn may_be_handed_out(&self, rec: &VolumeRecord) -> bool {
        rec.block.as_ref().is_none_or(|b| !b.marker)
            || self.disk_marked(&rec.id)
            || self.store.contains(&held_id(&rec.id))
    }

    /// Start-up: every Ready disk volume gets its marker (volumes made
    /// before markers were; one that cannot be written is logged, and the
    /// others still get theirs), and a marker no record needs any more (no
    /// record of its volume nor a hold of its disk: a delete whose purge
    /// did not finish) is removed. Something else in `.disks/` is left
    /// alone and reported.
    fn reconcile_disk_markers(&self) -> Result<()> {
        let ready = self.store.filter(|r| {
            r.kind == Kind::Block
                && r.phase == Phase::Ready
                && self.owns_id(&r.id)
                && r.block.as_ref().is_some_and(|b| b.disk.is_some())
        });
        for r in ready {
            if self.disk_marked(&r.id) {
                continue;
            }
            match self.mark_disk(&r.id) {
                Ok(()) => {
                    tracing::info!(volume_id = %r.id, "disk volume marked (it was made before disk markers were)")
                }
                // Its disk would be released, not held, if its Ready
                // record were lost before the next start-up marks it.
                Err(e) => {
                    tracing::error!(volume_id = %r.id, error = %e.render(), "could not write the marker of a disk volume; the next start-up tries again")
                }
            }
        }
        let dir = self.root.join(DISK_MARKERS);
        let Some(entries) = files::read_own_dir(self.os.files.as_ref(), &dir) else {
            return Ok(());
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let regular = e.file_type().is_ok_and(|t| t.is_file());
            if !self.owns_id(&name) || !regular {
                tracing::warn!(path = %e.path().display(), "not a disk marker of berth's; left alone");
                continue;
            }
            if self.store.contains(&name) || self.store.contains(&held_id(&name)) {
                continue;
            }
            self.unmark_disk(&name)?;
            tracing::info!(volume_id = %name, "disk marker of a volume without a record removed");
        }
        Ok(())
    }

    /// The volume's device as it is now, without attaching anything.
    fn current_device(&self, rec: &VolumeRecord) -> Result<Option<Dev>> {
        let info = Self::info(rec)?;
        if let Some(d) = &info.disk {
            return match self.resolve_disk(d) {
                Ok(dev) => Ok(Some(Dev {
                    path: dev.path,
                    major: dev.major,
                    minor: dev.minor,
                })),
                Err(Error::NotFound(_)) => Ok(None),
                Err(e) => Err(e),
            };
        }
        let f = self.file(&rec.id)?;
        Ok(attach::attachments(&self.os, &f)?
            .into_iter()
            .next()
            .map(|l| Dev {
                path: l.device,
                major: l.major,
                minor: l.minor,
            }))
    }

    /// The volume's device, attaching the backing file if needed (and
    /// growing it first to the recorded capacity, which repairs an
    /// expansion a crash interrupted).
    ///
    /// With the device, the loop attachment this call made, if it made one:
    /// a stage that then fails takes it back (`undo_attach`).
    fn ensure_device(
        &self,
        rec: &VolumeRecord,
        read_only: bool,
    ) -> Result<(Dev, Option<crate::os::LoopInfo>)> {
        let info = Self::info(rec)?;
        if let Some(d) = &info.disk {
            let dev = self.resolve_disk(d)?;
            return Ok((
                Dev {
                    path: dev.path,
                    major: dev.major,
                    minor: dev.minor,
                },
                None,
            ));
        }
        let f = self.require_file(&rec.id)?;
        self.grow_file_to(rec, &info, &f, rec.capacity_bytes)?;
        let (l, fresh) = attach::ensure_attached(&self.os, &f, read_only)?;
        let fresh = fresh.then(|| l.clone());
        if let Err(e) = self.refresh_capacity(&l.device, &f) {
            if let Some(l) = &fresh {
                self.undo_attach(&rec.id, l);
            }
            return Err(e);
        }
        Ok((
            Dev {
                path: l.device,
                major: l.major,
                minor: l.minor,
            },
            fresh,
        ))
    }

    /// Detaches the loop device `l` that a stage of volume `id` attached
    /// before it was refused, so that a refused stage leaves no attachment
    /// behind. A loop device nobody staged is reachable through any stale
    /// bind of its device node: a raw volume whose loop device was detached
    /// by hand (`losetup -d`, which the kernel allows while the device
    /// node is only bind-mounted) still has its staging and pod binds of
    /// that node, the kernel hands the number out again, and the other
    /// volume's stage that got it refuses (the device node is mounted
    /// elsewhere) while the pod of the first reads and writes the second's
    /// file. A leftover attachment would also make the volume's own older
    /// mounts (its backing file replaced under them) look foreign to
    /// unpublish and unstage, which would refuse them forever. Kept when a
    /// filesystem is mounted from it (a stage that mounted, then failed) or
    /// the mount table cannot be read; a failed detach is logged (the next
    /// stage reuses the attachment, unstage and DeleteVolume detach it).
    pub(super) fn undo_attach(&self, id: &str, l: &crate::os::LoopInfo) {
        let mounted = mounts::table(&self.os)
            .map(|t| t.iter().any(|m| (m.major, m.minor) == (l.major, l.minor)))
            .unwrap_or(true);
        if mounted {
            return;
        }
        if let Err(e) = attach::detach_verified(&self.os, l) {
            tracing::warn!(volume_id = %id, device = %l.device.display(), error = %e.render(), "could not detach the loop device of a failed stage");
        }
    }

    /// Whether the kernel holds the disk `dev` read-only.
    fn disk_read_only(&self, dev: &Path) -> Result<bool> {
        self.os
            .devices
            .read_only(dev)
            .map_err(|e| Error::os(format!("reading whether {} is read-only", dev.display()), e))
    }

    /// Sets the kernel's read-only flag of the disk `dev` to `read_only`
    /// (`BLKROSET`) unless it is so already. A raw disk volume staged with
    /// a read-only access mode is held read-only by the kernel (as a file
    /// volume's loop device is attached read-only): a read-only bind of a
    /// device node does not stop writes through it. Every other use of a
    /// disk clears the flag first: a read-write stage, and the erase at
    /// delete; an unstage clears it once nothing shows the disk. A disk
    /// that stays read-only when asked to be writable (write-protected)
    /// is FAILED_PRECONDITION.
    fn set_disk_read_only(&self, id: &str, dev: &Path, read_only: bool) -> Result<()> {
        if self.disk_read_only(dev)? == read_only {
            return Ok(());
        }
        self.os.devices.set_read_only(dev, read_only).map_err(|e| {
            Error::os(
                format!(
                    "making disk {} {}",
                    dev.display(),
                    if read_only { "read-only" } else { "writable" }
                ),
                e,
            )
        })?;
        tracing::info!(volume_id = %id, disk = %dev.display(), read_only, "set the disk's read-only flag");
        if !read_only && self.disk_read_only(dev)? {
            return Err(Error::WrongState(format!(
                "disk {} of volume {id} stays read-only (write-protected?); it cannot be used read-write",
                dev.display()
            )));
        }
        Ok(())
    }

    /// Clears the read-only flag of the disk `dev` of volume `id` after an
    /// unstage, unless something still shows the disk (a stage elsewhere,
    /// not one Berth makes, keeps it).
    fn release_disk_read_only(&self, id: &str, dev: &Dev) -> Result<()> {
        if !self.disk_read_only(&dev.path)?
            || !Self::users(&mounts::table(&self.os)?, dev).is_empty()
        {
            return Ok(());
        }
        self.set_disk_read_only(id, &dev.path, false)
    }

    /// Mount points of the table `t` that show the volume's device:
    /// filesystem mounts of it and bind mounts of its device node.
    fn users(t: &[MountEntry], dev: &Dev) -> Vec<PathBuf> {
        let node = crate::os::mountinfo::object_of(t, &dev.path);
        t.iter()
            .filter(|m| {
                (m.major, m.minor) == (dev.major, dev.minor)
                    || node.as_ref() == Some(&mounts::object(m))
            })
            .map(|m| m.mount_point.clone())
            .collect()
    }

    /// Creates (or, on a retry, completes) the backing file of a volume.
    fn create_file(&self, rec: &VolumeRecord, allocation: Allocation) -> Result<()> {
        let f = self.file(&rec.id)?;
        if let Ok(m) = self.os.files.lstat(&f) {
            if !m.file_type().is_file() {
                return Err(Error::Internal(format!(
                    "{} exists and is not a regular file",
                    f.display()
                )));
            }
        }
        self.os
            .files
            .open(&f, Open::CreateOrKeep)
            .map_err(|e| Error::os(format!("creating {}", f.display()), e))?;
        self.grow_file(&f, allocation, rec.capacity_bytes, None)?;
        // The file and its directory entry are durable before the volume is
        // reported created.
        self.os
            .files
            .sync_dir(&self.root)
            .map_err(|e| Error::os(format!("syncing {}", self.root.display()), e))
    }

    /// FAILED_PRECONDITION when the backing file `f` of the volume is
    /// shorter than Berth made it (`BlockInfo::file_bytes`): damage.
    fn require_whole(&self, rec: &VolumeRecord, info: &BlockInfo, f: &Path) -> Result<()> {
        let len = self
            .os
            .files
            .stat(f)
            .map_err(|e| Error::os(format!("inspecting {}", f.display()), e))?
            .len();
        match info.file_bytes.filter(|&made| len < made) {
            Some(made) => Err(Error::WrongState(cut_short(&rec.id, f, len, made))),
            None => Ok(()),
        }
    }

    /// Grows the backing file `f` of the volume to `size` bytes, which
    /// completes an expansion under way, and records its new length; a
    /// file shorter than Berth made it (`BlockInfo::file_bytes`) is damage:
    /// FAILED_PRECONDITION, not grown back with zeros.
    fn grow_file_to(
        &self,
        rec: &VolumeRecord,
        info: &BlockInfo,
        f: &Path,
        size: i64,
    ) -> Result<()> {
        let made = info.file_bytes.map(|made| (rec.id.as_str(), made));
        self.grow_file(f, info.allocation, size, made)?;
        let size = u64::try_from(size).unwrap_or(0);
        if info.file_bytes.is_none_or(|made| made < size) {
            let mut grown = info.clone();
            grown.file_bytes = Some(size);
            self.save_info(rec, &grown)?;
        }
        Ok(())
    }

    /// Makes the file at least `size` bytes (thick: allocated), never
    /// smaller. The free-space check and the allocation are one step;
    /// RESOURCE_EXHAUSTED when the pool has no room. With `made` (the
    /// volume's id and the length Berth made its file), a file found
    /// shorter than that is damage: FAILED_PRECONDITION, nothing changed.
    /// The check reads the metadata the growth needs anyway (one fstat).
    fn grow_file(
        &self,
        f: &Path,
        allocation: Allocation,
        size: i64,
        made: Option<(&str, u64)>,
    ) -> Result<()> {
        let size = u64::try_from(size).unwrap_or(0);
        let _g = lock(&self.alloc);
        let fs = self.os.files.as_ref();
        let file = fs
            .open(f, Open::Existing)
            .map_err(|e| Error::os(format!("opening {}", f.display()), e))?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io(format!("inspecting {}", f.display()), e))?;
        if let Some((id, made)) = made.filter(|&(_, made)| meta.len() < made) {
            return Err(Error::WrongState(cut_short(id, f, meta.len(), made)));
        }
        let need = match allocation {
            Allocation::Thin => 0,
            Allocation::Thick => size.saturating_sub(allocated_bytes(&meta)),
        };
        if meta.len() >= size && need == 0 {
            return Ok(());
        }
        let no_room = || Error::NoSpace(format!("the block pool has no room for {size} bytes"));
        if need > 0 {
            // No local admission reads the free space until the file has
            // taken it (see `Store::space_exclusive`).
            let _space = self.store.space_exclusive();
            let r = self.file_room(true)?;
            if need > r.room {
                return Err(Error::NoSpace(format!(
                    "the block pool has {}; allocating {size} bytes needs {need} more",
                    r.describe()
                )));
            }
            fs.allocate(&file, f, size).map_err(|e| {
                if e.errno() == Some(libc::ENOSPC) {
                    no_room()
                } else {
                    Error::os("preallocating the volume", e)
                }
            })?;
        }
        if meta.len() < size {
            fs.set_len(&file, f, size).map_err(|e| match e.errno() {
                Some(libc::EFBIG) => Error::BadSize(format!(
                    "{size} bytes is larger than a file on the block root's filesystem can be"
                )),
                Some(libc::ENOSPC) => no_room(),
                _ => Error::os(format!("sizing {}", f.display()), e),
            })?;
        }
        fs.sync(&file, f)
            .map_err(|e| Error::os(format!("syncing {}", f.display()), e))
    }

    /// Moves `path` (in the block root) into `.orphaned/` as `name` (or
    /// `name.<n>`, never over an earlier one); returns where it went.
    pub(super) fn keep_aside(&self, path: &Path, name: &str) -> Result<PathBuf> {
        let aside = self.root.join(ORPHANED);
        let f = self.os.files.as_ref();
        ensure_dir(f, &aside, 0o700)
            .map_err(|e| Error::os(format!("creating {}", aside.display()), e))?;
        files::move_aside(f, path, &aside, name)
            .map_err(|e| Error::os(format!("moving aside {}", path.display()), e))
    }

    /// Makes a loop device take its backing file's size if it is smaller.
    fn refresh_capacity(&self, device: &Path, f: &Path) -> Result<()> {
        let want = self
            .os
            .files
            .stat(f)
            .map_err(|e| Error::os(format!("inspecting {}", f.display()), e))?
            .len();
        let have = self
            .os
            .devices
            .inspect(device)
            .map_err(|e| Error::os("reading the loop device size", e))?
            .size_bytes;
        if have < want {
            self.os
                .loops
                .set_capacity(device)
                .map_err(|e| Error::os("updating the loop device size", e))?;
        }
        Ok(())
    }

    /// Detaches every loop device of the file (refusing while one is in
    /// use, as `mount_table` shows), verified through sysfs. The table is
    /// read only if the file is attached.
    fn release_file(&self, id: &str, mount_table: &LazyTable) -> Result<()> {
        let f = self.file(id)?;
        for l in attach::attachments(&self.os, &f)? {
            self.release_loop(id, &l, mount_table)?;
        }
        Ok(())
    }

    /// Detaches one loop device of volume `id`, verified through sysfs;
    /// refuses while `mount_table` shows it mounted.
    fn release_loop(
        &self,
        id: &str,
        l: &crate::os::LoopInfo,
        mount_table: &LazyTable,
    ) -> Result<()> {
        let dev = Dev {
            path: l.device.clone(),
            major: l.major,
            minor: l.minor,
        };
        let users = Self::users(mount_table.get(&self.os)?, &dev);
        if !users.is_empty() {
            return Err(Error::WrongState(format!(
                "{} of volume {id} is still mounted at {}",
                l.device.display(),
                shown(&users)
            )));
        }
        attach::detach_verified(&self.os, l)
    }

    /// Detaches the loop devices of volume `id`'s backing file that
    /// start-up moved aside into `.orphaned/` (its record was lost while it
    /// was attached), once nothing mounts them: an unstage by path must not
    /// leave them attached. Refuses while one is still mounted.
    fn release_orphaned(&self, id: &str) -> Result<()> {
        let aside = self.root.join(ORPHANED);
        let name = format!("{id}.img");
        let loops = self
            .os
            .loops
            .list()
            .map_err(|e| Error::os("listing loop devices", e))?;
        let table = LazyTable::new();
        for l in loops.iter().filter(|l| {
            l.backing_file.parent() == Some(aside.as_path())
                && l.backing_file
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| {
                        n == name
                            || n.strip_prefix(name.as_str())
                                .is_some_and(|r| r.starts_with('.'))
                    })
        }) {
            self.release_loop(id, l, &table)?;
        }
        Ok(())
    }

    /// The local kind when its root is on the block root's filesystem
    /// (the same device).
    fn local_beside(&self) -> Result<Option<&LocalKind>> {
        let Some(local) = &self.local else {
            return Ok(None);
        };
        let device = |p: &Path, what: &str| {
            self.os
                .fs
                .device(p)
                .map_err(|e| Error::os(format!("reading the filesystem of the {what}"), e))
        };
        let shared = device(&self.root, "block root")? == device(local.root(), "local root")?;
        Ok(shared.then_some(local.as_ref()))
    }

    /// The block root's filesystem and what of its free space block files
    /// may take: all of it, unless the local root is on the same
    /// filesystem: then less what local volumes may still write into
    /// their sizes (what the local kind keeps back for them, read its way:
    /// `LocalKind::with_unwritten_promises`). Thick files never take space
    /// promised to local volumes, and GetCapacity never offers it.
    ///
    /// Not `exact` (Probe, metrics: asked often, and with many volumes):
    /// the local promises whole, from the records alone, without reading
    /// what each local volume wrote (one quota read per volume); never more
    /// room than the exact answer.
    fn file_room(&self, exact: bool) -> Result<FileRoom> {
        let statvfs = || {
            self.os
                .fs
                .statvfs(&self.root)
                .map_err(|e| Error::os("reading free space of the block root", e))
        };
        let (usage, local) = match self.local_beside()? {
            Some(l) if exact => l.with_unwritten_promises(statvfs)?,
            Some(_) => (statvfs()?, self.store.promised(Kind::Local)),
            None => (statvfs()?, 0),
        };
        let local = u64::try_from(local).unwrap_or(0);
        Ok(FileRoom {
            usage,
            room: usage.available_bytes.saturating_sub(local),
            local,
        })
    }

    fn file_pool_capacity(&self, exact: bool) -> Result<PoolCapacity> {
        let r = self.file_room(exact)?;
        Ok(PoolCapacity {
            free_bytes: i64::try_from(r.room).unwrap_or(i64::MAX),
            max_volume_bytes: i64::try_from(r.usage.total_bytes).unwrap_or(i64::MAX),
        })
    }

    fn disk_pool_capacity(&self) -> Result<PoolCapacity> {
        let free = self.free_disks()?;
        let size = |d: &disks::Disk| i64::try_from(d.dev.size_bytes).unwrap_or(i64::MAX);
        Ok(PoolCapacity {
            free_bytes: free.iter().map(size).fold(0i64, i64::saturating_add),
            max_volume_bytes: free.iter().map(size).max().unwrap_or(0),
        })
    }
}

impl BlockKind {
    /// Makes a new volume's storage, without its disk marker
    /// (`VolumeKind::create` adds it; a restore onto a disk adds it once
    /// the copy is done): a file of its size, or a disk of the pool,
    /// claimed and recorded. Idempotent.
    fn make_volume(&self, rec: &mut VolumeRecord) -> Result<()> {
        let p = params::parse(&params::own(&rec.parameters))?;
        let mut info = rec.block.clone().unwrap_or_else(|| {
            Box::new(BlockInfo {
                allocation: match p.pool {
                    Pool::File(a) => a,
                    Pool::Disk => Allocation::Thin,
                },
                default_fs: p.default_fs.as_str().into(),
                mkfs_options: p.mkfs_options.clone(),
                ..Default::default()
            })
        });
        match p.pool {
            Pool::File(allocation) => {
                rec.block = Some(info);
                self.create_file(rec, allocation)?;
                if let Some(b) = rec.block.as_mut() {
                    b.file_bytes = u64::try_from(rec.capacity_bytes).ok();
                }
                Ok(())
            }
            Pool::Disk => {
                if let Some(d) = &info.disk {
                    // A retry of a create whose record names its disk
                    // already: only that very disk is the volume's. One
                    // not found as recorded (gone, or another device at
                    // its path now) is not handed out; the unfinished
                    // create is rolled back in the background (its disk
                    // released or held, never erased: `remove_disk`).
                    if let Err(e) = self.resolve_disk(d) {
                        return Err(Error::Busy(format!(
                            "the disk this volume's unfinished create claimed is not found as recorded ({}); no other device is used for it: the unfinished create is rolled back in the background (its disk released, or held, never another device erased); retry",
                            e.render()
                        )));
                    }
                    self.keep_claim(&rec.id, d);
                    return Ok(());
                }
                // Choose, claim exclusively and record the disk under one
                // lock, so two creates never get the same disk, and a
                // second berth given the same pool finds it held.
                let _g = lock(&self.claim);
                let (disk, held) = self.claim_disk(rec.capacity_bytes)?;
                tracing::info!(volume_id = %rec.id, disk = %disk.path.display(), "disk claimed");
                info.disk = Some(disk);
                info.marker = true;
                rec.block = Some(info);
                self.store.put(rec)?;
                lock(&self.disk_claims).insert(rec.id.clone(), held);
                Ok(())
            }
        }
    }

    /// Removes a volume's storage (`delete_with`; `rollback_create` without
    /// `keep`): a disk is erased (or released), a file removed, unless
    /// `keep` and it is one a create whose Ready was lost may have handed
    /// out (`kept_on_rollback`; a disk with its marker, `disk_marker`):
    /// then a file is kept aside, a disk held. A disk's marker is removed
    /// after its record (`purge`).
    fn remove_volume(&self, rec: &VolumeRecord, mount_table: &LazyTable, keep: bool) -> Result<()> {
        if let Some(d) = rec.block.as_ref().and_then(|b| b.disk.clone()) {
            // Berth's own claim would make the erase fail (EBUSY); taken
            // again if the disk stays the record's (`keep_claim`).
            self.release_claim(&rec.id);
            let r = self.remove_disk(rec, &d, mount_table, keep);
            if r.is_err() {
                self.keep_claim(&rec.id, &d);
            }
            return r;
        }
        let f = self.file(&rec.id)?;
        self.release_file(&rec.id, mount_table)?;
        // An unfinished restore's copy (never the volume's file yet).
        let partial = self.restoring_file(&rec.id);
        if self.os.files.exists(&partial) {
            self.os
                .files
                .remove_file(&partial)
                .map_err(|e| Error::os(format!("removing {}", partial.display()), e))?;
        }
        match self.os.files.lstat(&f).map_err(crate::os::OsError::into_io) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("inspecting {}", f.display()), e)),
            Ok(m) if m.is_file() && keep && kept_on_rollback(self.os.files.as_ref(), rec, &f) => {
                let to = self.keep_aside(&f, &format!("{}.img", rec.id))?;
                tracing::error!(volume_id = %rec.id, file = %f.display(), to = %to.display(), "the file of a volume whose create never answered holds data: kept aside in .orphaned, never deleted; look at it before you remove it");
                Ok(())
            }
            // A symlink or anything else in its place is removed itself,
            // never what it points to.
            Ok(_) => match self.os.files.remove_file(&f) {
                Err(e) if e.errno() != Some(libc::ENOENT) => {
                    Err(Error::os(format!("removing {}", f.display()), e))
                }
                _ => Ok(()),
            },
        }
    }

    /// Gives back the blocks of volume `id`'s backing file (a regular file,
    /// never what a symlink there points to) when it is on the state
    /// directory's filesystem, its name and size kept: it reads as zeros.
    /// True when it held blocks there.
    fn empty_file(&self, id: &str) -> Result<bool> {
        use std::os::unix::fs::MetadataExt;
        let f = self.file(id)?;
        let fs = self.os.files.as_ref();
        let m = match fs.lstat(&f) {
            Err(e) if e.errno() == Some(libc::ENOENT) => return Ok(false),
            Err(e) => return Err(Error::os(format!("inspecting {}", f.display()), e)),
            Ok(m) => m,
        };
        let state = fs.stat(&self.state_dir).map(|s| s.dev()).ok();
        if !m.is_file() || allocated_bytes(&m) == 0 || state != Some(m.dev()) {
            return Ok(false);
        }
        let file = fs
            .open(&f, Open::Existing)
            .map_err(|e| Error::os(format!("opening {}", f.display()), e))?;
        fs.punch(&file, &f, m.len())
            .map_err(|e| Error::os(format!("emptying {}", f.display()), e))?;
        // Blocks freed in a filesystem's running transaction may be taken
        // again only once it commits (ext4).
        fs.sync(&file, &f)
            .map_err(|e| Error::os(format!("syncing {}", f.display()), e))?;
        tracing::warn!(volume_id = %id, file = %f.display(), bytes = allocated_bytes(&m), "the state's filesystem has no room to record this volume's delete: its file is emptied first, to make room");
        Ok(true)
    }

    /// `remove_volume` of a disk volume (its disk `d`), Berth's claim of
    /// the disk released.
    fn remove_disk(
        &self,
        rec: &VolumeRecord,
        d: &DiskRef,
        mount_table: &LazyTable,
        keep: bool,
    ) -> Result<()> {
        let d = d.clone();
        if keep && rec.phase == Phase::Creating && self.may_be_handed_out(rec) {
            // A create whose record still says Creating, found after
            // the fact (start-up, a retry), with its marker there: it
            // got as far as its Ready record, which was lost since (a
            // cut or damaged journal), so the volume may have been
            // handed out and hold a tenant's data (`hold_disk`); also
            // one whose record predates markers, which cannot tell. A
            // create this process ran and that failed is rolled back
            // without `keep`. A hold already there that bears the
            // volume's id but differs from it is never written over
            // (`refuse_overwriting_hold`).
            self.refuse_overwriting_hold(rec)?;
            let held = self.hold_disk(rec, &d)?;
            tracing::error!(volume_id = %rec.id, disk = %d.path.display(), held = %held, "a disk volume whose record says Creating yet whose marker says it reached Ready: the disk is held, never erased nor offered (was its Ready record lost?); see `berth state check`");
            self.keep_claim(&held, &d);
            return Ok(());
        }
        if rec.phase == Phase::Creating && rec.source.is_none() {
            // Claimed by a create that never answered (no marker: it
            // never got as far as its Ready record): the volume was
            // never handed out and Berth wrote nothing to the disk (it
            // was blank and read as zeros when claimed), so there is
            // nothing to erase. (A restore wrote a snapshot onto it:
            // that one is erased below.)
            tracing::info!(volume_id = %rec.id, disk = %d.path.display(), "disk of an unfinished create released");
            return Ok(());
        }
        let dev = match self.resolve_disk_to_erase(&d) {
            Ok(dev) => dev,
            Err(Error::NotFound(m)) if is_wipe_record(&rec.id) => {
                return Err(Error::Unavailable(format!(
                    "{m}; it is wiped once it is back"
                )));
            }
            Err(Error::NotFound(m)) => {
                // It may come back with the tenant's data: it stays
                // claimed, by a record of its own, until it is wiped.
                let pending = self.remember_wipe(rec, &d)?;
                tracing::warn!(volume_id = %rec.id, pending = %pending, "{m}; it stays out of the pool until it is back and wiped");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let users = Self::users(
            mount_table.get(&self.os)?,
            &Dev {
                path: dev.path.clone(),
                major: dev.major,
                minor: dev.minor,
            },
        );
        if !users.is_empty() {
            return Err(Error::WrongState(format!(
                "disk {} of volume {} is still mounted at {}",
                dev.path.display(),
                rec.id,
                shown(&users)
            )));
        }
        // A raw stage left read-only (a crash, an unstage by path)
        // would make the erase fail with EPERM.
        self.set_disk_read_only(&rec.id, &dev.path, false)?;
        match self.disk_wipe {
            DiskWipe::Zero => {
                // Can take long on a big disk without a write-zeroes
                // offload; the operation owns the volume's guard, so a
                // retried DeleteVolume answers ABORTED until it is done,
                // and a restart in the middle zeroes again (the record
                // stays until the disk is clean).
                tracing::info!(volume_id = %rec.id, disk = %dev.path.display(), bytes = dev.size_bytes, "zeroing disk");
                self.os
                    .devices
                    .zero_out(&dev.path, dev.size_bytes)
                    .map_err(|e| Error::os(format!("zeroing disk {}", dev.path.display()), e))?;
            }
            DiskWipe::Signatures => {
                crate::os::mkfs::wipe(self.os.cmd.as_ref(), &dev.path)
                    .map_err(|e| Error::os(format!("wiping disk {}", dev.path.display()), e))?;
                // The pool offers only disks whose sample reads as
                // zeros: zeroing it keeps a disk Berth erased itself
                // in the pool (the rest is left as it was).
                self.os
                    .devices
                    .zero_sample(&dev.path, dev.size_bytes)
                    .map_err(|e| {
                        Error::os(
                            format!("zeroing the sampled blocks of disk {}", dev.path.display()),
                            e,
                        )
                    })?;
            }
        }
        tracing::info!(volume_id = %rec.id, disk = %d.path.display(), wipe = ?self.disk_wipe, "disk erased and returned to the pool");
        Ok(())
    }
}

impl VolumeKind for BlockKind {
    fn kind(&self) -> Kind {
        Kind::Block
    }

    fn new_id(&self) -> String {
        super::new_node_id(PREFIX, &self.node)
    }

    fn owns_id(&self, id: &str) -> bool {
        is_volume_id(id)
    }

    fn check_parameters(&self, p: &BTreeMap<String, String>) -> Result<()> {
        // A node without --disk-pool is a valid place to ask; it just has no
        // capacity for `pool: disk`.
        params::parse(p).map(|_| ())
    }

    fn check_capability(&self, cap: &Capability) -> Result<()> {
        if !cap.access_mode.single_node() {
            return Err(Error::Capability(format!(
                "access mode {:?} needs a volume reachable from several nodes; block volumes live on one node",
                cap.access_mode
            )));
        }
        if let AccessType::Mount { .. } = cap.access_type {
            params::capability_fs(cap, crate::os::mkfs::Filesystem::Ext4)?;
            mounts::bind_flags(cap)?;
        }
        Ok(())
    }

    /// The volume is used as its content allows (`node::content_fits`:
    /// what was used raw stays raw, a filesystem stays one of its type);
    /// and a filesystem needs room: a volume smaller than what mkfs needs
    /// for the capability's filesystem (xfs: 300 MiB) cannot be formatted
    /// with it (CreateVolume makes volumes at least that large for it).
    /// Both as NodeStageVolume decides.
    fn capability_fits(
        &self,
        rec: &VolumeRecord,
        cap: &Capability,
    ) -> std::result::Result<(), String> {
        let info = Self::info(rec).map_err(|e| e.to_string())?;
        node::content_fits(&info, cap).map_err(|why| format!("the volume {why}"))?;
        let default_fs = Self::default_fs(rec).map_err(|e| e.to_string())?;
        match params::capability_fs(cap, default_fs).map_err(|e| e.to_string())? {
            Some(fs) if rec.capacity_bytes < fs.min_bytes() => Err(format!(
                "the volume has {} bytes, less than the {} bytes {} needs",
                rec.capacity_bytes,
                fs.min_bytes(),
                fs.mkfs_program()
            )),
            _ => Ok(()),
        }
    }

    /// Probe and metrics: the file pool, without reading each local
    /// volume's usage (`file_room`).
    fn pool_capacity(&self) -> Result<PoolCapacity> {
        self.file_pool_capacity(false)
    }

    /// The file pool in whole MiB, what a file volume takes (its sizes are
    /// rounded up to them): a volume of the size GetCapacity answers can
    /// be made, and a create's checks against it are unchanged.
    fn capacity_for(&self, p: &BTreeMap<String, String>) -> Result<PoolCapacity> {
        match params::parse(p)?.pool {
            Pool::File(_) => {
                let c = self.file_pool_capacity(true)?;
                let whole = |b: i64| b / params::GRANULE * params::GRANULE;
                Ok(PoolCapacity {
                    free_bytes: whole(c.free_bytes),
                    max_volume_bytes: whole(c.max_volume_bytes),
                })
            }
            Pool::Disk => self.disk_pool_capacity(),
        }
    }

    fn size_for(
        &self,
        p: &BTreeMap<String, String>,
        caps: &[Capability],
        wanted: i64,
        required: i64,
        limit: i64,
    ) -> Result<i64> {
        let p = params::parse(p)?;
        match p.pool {
            Pool::File(_) => params::file_size(&p, caps, wanted, required, limit),
            Pool::Disk => {
                // A disk too small for mkfs of the capabilities'
                // filesystem would be refused at NodeStageVolume.
                let need = params::fs_min_bytes(&p, caps)?;
                if let Some((fs, m)) = need {
                    if limit > 0 && m > limit {
                        return Err(Error::BadSize(format!(
                            "a block volume that may be formatted {fs} takes at least {m} bytes ({} refuses less), more than limit_bytes {limit}",
                            fs.mkfs_program()
                        )));
                    }
                }
                // A disk is taken whole: the smallest free one that is at
                // least what is required (a restore's or clone's source
                // included), not `wanted`, whose default without a
                // `required_bytes` (1 GiB, or `limit_bytes` capped at it)
                // is the size a file volume allocates. Without one, any
                // disk of the range will do (at least 1 byte).
                self.disk_size_for(required.max(need.map_or(0, |(_, m)| m)).max(1), limit)
            }
        }
    }

    /// A file volume: at least a whole MiB, and what mkfs needs for the
    /// capabilities' filesystem (xfs: 300 MiB). A disk is taken whole: at
    /// least what that mkfs needs.
    fn min_size_for(
        &self,
        p: &BTreeMap<String, String>,
        caps: &[Capability],
    ) -> Result<Option<i64>> {
        let p = params::parse(p)?;
        match p.pool {
            Pool::File(_) => params::file_size(&p, caps, 0, 0, 0).map(Some),
            Pool::Disk => Ok(params::fs_min_bytes(&p, caps)?.map(|(_, m)| m)),
        }
    }

    /// File volumes take their space when created (thick) or as they are
    /// written (thin: overcommitted, like any thin provisioning); disks are
    /// claimed. Nothing is a promise on top of the pool's free space (the
    /// file pool's leaves out what local volumes on the same filesystem
    /// may still write: `file_room`).
    fn capacity_is_promise(&self) -> bool {
        false
    }

    fn expandable(&self) -> bool {
        true
    }

    fn controller_expand(&self, rec: Option<&VolumeRecord>, g: Growth) -> Result<Expansion> {
        self.expand_controller(rec, g)
    }

    fn node_expand(&self, rec: &VolumeRecord, args: &NodeExpandArgs<'_>) -> Result<i64> {
        self.expand_node(rec, args)
    }

    /// Also ends a hold left beside the volume once it was taken back
    /// from it (`finish_taken_back_hold`): the CO's retry of a
    /// CreateVolume whose removal of the hold failed finishes it. A
    /// removal that fails again is logged, not answered: the volume is
    /// whole, and the next start-up removes the hold.
    fn ready(&self, rec: &VolumeRecord) -> Result<()> {
        if rec.block.as_ref().is_some_and(|b| b.disk.is_some()) {
            if let Err(e) = self.finish_taken_back_hold(rec) {
                tracing::error!(volume_id = %rec.id, error = %e.render(), "could not remove the hold left beside a volume taken back from it; the next start-up does");
            }
        }
        self.place_restored(&rec.id)
    }

    /// A disk volume is marked (`mark_disk`) as the create's last step,
    /// before its record says Ready.
    fn create(&self, rec: &mut VolumeRecord) -> Result<()> {
        self.make_volume(rec)?;
        if rec.block.as_ref().is_some_and(|b| b.disk.is_some()) {
            self.mark_disk(&rec.id)?;
        }
        Ok(())
    }

    /// The hold (`hold_disk`) of the disk of a volume named `name`, for
    /// `pool: disk` only: a kill between the volume's marker and its Ready
    /// record leaves one, and so does a Ready record lost later. Either
    /// way the disk is that name's: the external-provisioner calls
    /// CreateVolume again only for a claim without its volume, and a name
    /// is one claim's (`pvc-<uid>`). Not while the disk is not found as
    /// held (`resolve_disk`).
    fn held_by_name(&self, name: &str, params: &BTreeMap<String, String>) -> Option<VolumeRecord> {
        if params::parse(params).ok()?.pool != Pool::Disk {
            return None;
        }
        let hold = self
            .store
            .filter(|r| {
                held_volume(&r.id).is_some() && r.context.get(HELD_NAME).is_some_and(|n| n == name)
            })
            .into_iter()
            .next()?;
        let id = held_volume(&hold.id).filter(|id| self.owns_id(id))?;
        // Not while its volume has a record, nor once an operator released
        // the disk (`berth state release`, whose removal of the hold
        // failed): its erase is due, and it is no one's volume any more.
        if self.store.contains(&id) || self.store.contains(&wipe_id(&id)) {
            return None;
        }
        let info = hold.block.clone()?;
        let d = info.disk.as_ref()?;
        self.resolve_disk(d).ok()?;
        Some(VolumeRecord {
            id,
            name: name.to_string(),
            kind: Kind::Block,
            seq: 0,
            phase: Phase::Creating,
            capacity_bytes: i64::try_from(d.size_bytes).ok()?,
            node: hold.node.clone(),
            parameters: hold.parameters.clone(),
            capabilities: Vec::new().into(),
            context: Default::default(),
            published: Default::default(),
            created_unix: hold.created_unix,
            block: Some(info),
            source: hold.source.clone(),
            project: None,
            extra: None,
        })
    }

    /// The volume's record again (phase Creating, its marker kept), then
    /// the hold removed, then the disk claimed for the volume: a crash in
    /// between leaves a Creating record with its marker, which start-up
    /// holds again. The disk is handed back as it is, never erased.
    fn adopt_held(&self, rec: &VolumeRecord) -> Result<()> {
        let d = rec
            .block
            .as_ref()
            .and_then(|b| b.disk.clone())
            .ok_or_else(|| Error::Internal(format!("the hold of {} names no disk", rec.id)))?;
        let hold = held_id(&rec.id);
        self.store.put(rec)?;
        self.mark_disk(&rec.id)?;
        self.release_claim(&hold);
        self.keep_claim(&rec.id, &d);
        // Should this write fail, the retry that makes the record Ready
        // removes the hold (`ready`), or the next start-up does.
        self.store.remove(&hold)?;
        tracing::warn!(volume_id = %rec.id, name = %rec.name, disk = %d.path.display(), hold = %hold, "CreateVolume of the name of a held disk's volume (its create was cut short before its Ready record): the volume is handed back, its disk as it is");
        Ok(())
    }

    /// A backing file without a record can only come from outside Berth
    /// (block volumes record their intent before the file is made), or from
    /// a lost state directory: it may hold a tenant's data, so it is moved
    /// into `.orphaned/` under the block root, never deleted.
    fn recover_copy_source(&self, vol: &VolumeRecord) {
        self.thaw_after_crash(vol);
    }

    fn presence(&self) -> Option<super::Presence> {
        let ready = |r: &VolumeRecord| {
            r.kind == Kind::Block
                && r.phase == crate::state::Phase::Ready
                && r.block.as_ref().is_some_and(|b| b.disk.is_none())
        };
        let expected = self.store.count(ready);
        let recorded = self.store.count(|r| r.kind == Kind::Block);
        let mut ids = Vec::new();
        // Backing files no record names (any phase): a block volume is
        // recorded before its file is made and its file removed before its
        // record, so only lost records leave one.
        let mut unrecorded = Vec::new();
        // An unreadable root is reported by `reconcile_orphans`.
        let entries = self.os.files.read_dir(&self.root).ok()?;
        for e in entries.flatten() {
            let name = e.file_name();
            if let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".img")) {
                // A restore's file whose record says Ready, not moved to
                // its name yet (a crash in between): there, and
                // `reconcile_orphans` moves it.
                if let Some(id) = id.strip_prefix(snapshot::RESTORING) {
                    if self.owns_id(id) && self.store.holds(id, ready) {
                        ids.push(id.to_string());
                    }
                    continue;
                }
                if !self.owns_id(id) {
                    continue;
                }
                if self.store.holds(id, ready) {
                    ids.push(id.to_string());
                } else if !self.store.contains(id) {
                    unrecorded.push(id.to_string());
                }
            }
        }
        ids.sort_unstable();
        ids.dedup();
        let present = ids.len();
        let missing = if present < expected {
            let here: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
            let all = self.store.filter(ready);
            super::some_missing(all.iter().map(|r| r.id.as_str()), &|id| here.contains(id))
        } else {
            Vec::new()
        };
        Some(super::Presence {
            recorded,
            unrecorded: super::some_unrecorded(&unrecorded),
            root: self.root.clone(),
            what: "block root",
            expected,
            present,
            missing,
        })
    }

    /// Each leftover is finished on its own: one that cannot be (a
    /// removal or move refused) is logged and left for the next start-up,
    /// and the others, the disk markers and the disks' claims are still
    /// done; the first such error is returned once all were tried. Before,
    /// the first one ended the pass: a Ready restore's copy was not moved
    /// to its name and no disk was claimed.
    fn reconcile_orphans(&self, known: &dyn Fn(&str) -> bool) -> Result<()> {
        let snapshots = self.reconcile_snapshots(known);
        self.finish_taken_back_holds();
        if let Err(e) = self.reconcile_disk_markers() {
            tracing::error!(error = %e.render(), "could not reconcile the disk markers");
        }
        self.claim_recorded_disks();
        let entries = self
            .os
            .files
            .read_dir(&self.root)
            .map_err(|e| Error::os(format!("reading {}", self.root.display()), e))?;
        let mut failed = None;
        for e in entries.flatten() {
            if let Err(err) = self.reconcile_file(&e, known) {
                tracing::error!(path = %e.path().display(), error = %err.render(), "could not reconcile a leftover in the block root; the next start-up tries again");
                failed.get_or_insert(err);
            }
        }
        snapshots?;
        failed.map_or(Ok(()), Err)
    }

    fn snapshots(&self) -> bool {
        true
    }

    fn new_snapshot_id(&self) -> String {
        super::new_node_id(snapshot::SNAP_PREFIX, &self.node)
    }

    fn owns_snapshot_id(&self, id: &str) -> bool {
        super::is_hex_id(snapshot::SNAP_PREFIX, id)
    }

    fn node_tag_of(&self, id: &str) -> Option<String> {
        super::id_node_tag(PREFIX, id)
            .or_else(|| super::id_node_tag(snapshot::SNAP_PREFIX, id))
            .map(str::to_string)
    }

    fn create_snapshot(&self, vol: &VolumeRecord, snap: &mut SnapshotRecord) -> Result<()> {
        self.snapshot_volume(vol, snap)
    }

    fn snapshot_ready(&self, snap: &SnapshotRecord) -> Result<()> {
        self.place_snapshot(&snap.id)
    }

    fn snapshot_flaw(&self, snap: &SnapshotRecord) -> Option<super::CopyFlaw> {
        self.snapshot_file_flaw(snap)
    }

    fn delete_snapshot(&self, snap: &SnapshotRecord) -> Result<()> {
        self.remove_snapshot(snap, true)
    }

    fn rollback_snapshot(&self, snap: &SnapshotRecord) -> Result<()> {
        self.remove_snapshot(snap, false)
    }

    /// A restore or clone inherits what its source's record knows of the
    /// content (used raw or with a filesystem, which one): capabilities
    /// that cannot use it (`node::content_fits`) are INVALID_ARGUMENT, the
    /// spec's "source incompatible" (before, the volume was made and every
    /// NodeStageVolume of it refused). A snapshot whose file is missing or
    /// damaged is refused. Both before the new volume is recorded: nothing
    /// is made.
    fn check_source(&self, _id: &str, caps: &[Capability], from: Source<'_>) -> Result<()> {
        let unknown = BlockInfo::default();
        let (what, src, info) = match from {
            Source::Snapshot(s) => ("snapshot", &s.id, s.block.as_ref()),
            Source::Volume(v) => ("volume", &v.id, v.block.as_deref()),
        };
        for c in caps {
            if let Err(why) = node::content_fits(info.unwrap_or(&unknown), c) {
                return Err(Error::Invalid(format!(
                    "source {what} {src} {why}; a volume made from it cannot be used with the capabilities asked for"
                )));
            }
        }
        match from {
            Source::Snapshot(s) => self.usable_snapshot_file(s).map(|_| ()),
            Source::Volume(_) => Ok(()),
        }
    }

    fn create_from(&self, rec: &mut VolumeRecord, from: Source<'_>) -> Result<()> {
        self.restore_volume(rec, from)
    }

    /// Zeroing a disk: a deleted volume's, or an unanswered restore's or
    /// clone's that never reached Ready (no marker). An unanswered plain
    /// create's disk is released, one that may have been handed out held
    /// (`remove_volume`), which is quick.
    fn slow_delete(&self, rec: &VolumeRecord) -> bool {
        self.disk_wipe == DiskWipe::Zero
            && rec.block.as_ref().is_some_and(|b| b.disk.is_some())
            && (rec.phase != Phase::Creating
                || (rec.source.is_some() && !self.may_be_handed_out(rec)))
    }

    /// A hold bearing the volume's id that is not its own leftover
    /// (`refuse_foreign_hold`).
    fn refuse_delete(&self, rec: &VolumeRecord) -> Result<()> {
        self.refuse_foreign_hold(rec)
    }

    /// A hold left beside the volume from its take-back goes first
    /// (`end_hold_at_delete`); any other hold bearing its id refuses it.
    fn delete_with(&self, rec: &VolumeRecord, mount_table: &LazyTable) -> Result<()> {
        self.end_hold_at_delete(rec)?;
        self.remove_volume(rec, mount_table, true)
    }

    /// A file volume's file is emptied in place (`empty_file`), its loop
    /// devices detached first (refused while mounted): no rename, so a
    /// crash at any moment leaves the record (Ready) and its own file at
    /// its name, at most emptied, and never a record without its file,
    /// which is what the Deleting phase keeps from happening. Only a Ready
    /// one: what a create left (Creating) may be kept aside on delete
    /// (`kept_on_rollback`). A disk volume frees nothing on the state's
    /// filesystem: left as it is.
    fn free_for_intent(&self, rec: &VolumeRecord, mount_table: &LazyTable) -> Result<bool> {
        if rec.phase != Phase::Ready || rec.block.as_ref().is_some_and(|b| b.disk.is_some()) {
            return Ok(false);
        }
        self.release_file(&rec.id, mount_table)?;
        self.empty_file(&rec.id)
    }

    /// A restore or clone onto a disk is marked Deleting before its disk
    /// is erased: this process knows it never answered, and a rollback
    /// that fails (or a crash during it) leaves a record that a retry
    /// erases, not one that start-up must hold (`hold_disk`).
    ///
    /// A disk volume's marker, if the create got as far as making it, is
    /// removed once its disk is erased or released (best effort: `purge`
    /// and start-up remove a leftover one), before its record, so a record
    /// left behind says it never reached Ready.
    fn rollback_create(&self, rec: &VolumeRecord) -> Result<()> {
        let disk = rec.block.as_ref().is_some_and(|b| b.disk.is_some());
        if disk && rec.source.is_some() && rec.phase == Phase::Creating {
            let mut r = self.store.get(&rec.id).unwrap_or_else(|| rec.clone());
            self.store.set_phase(&mut r, Phase::Deleting)?;
            self.remove_volume(&r, &LazyTable::new(), false)?;
        } else {
            self.remove_volume(rec, &LazyTable::new(), false)?;
        }
        if disk {
            if let Err(e) = self.unmark_disk(&rec.id) {
                tracing::warn!(volume_id = %rec.id, error = %e.render(), "could not remove the disk marker of a failed create; start-up does");
            }
        }
        Ok(())
    }

    /// A disk's marker goes once no record needs it: neither its volume's
    /// (deleted) nor a hold of its disk (a wipe record's erase that
    /// follows a release ends the hold). Best effort: start-up removes a
    /// leftover one.
    fn purge(&self, rec: &VolumeRecord) {
        // The undo file of an offline resize that never finished, if any.
        if let Ok(undo) = self.growth_undo_file(&rec.id) {
            if let Err(e) = crate::os::mkfs::remove_undo(self.os.files.as_ref(), &undo) {
                tracing::warn!(volume_id = %rec.id, file = %undo.display(), error = %e, "could not remove the undo file of a deleted volume's resize");
            }
        }
        if rec.block.as_ref().is_none_or(|b| b.disk.is_none()) {
            return;
        }
        self.release_claim(&rec.id);
        let Some(id) = disk_volume_of(&rec.id).filter(|id| self.owns_id(id)) else {
            return;
        };
        if self.store.contains(&id) || self.store.contains(&held_id(&id)) {
            return;
        }
        if let Err(e) = self.unmark_disk(&id) {
            tracing::warn!(volume_id = %id, error = %e.render(), "could not remove the disk marker of a deleted volume; start-up does");
        }
    }

    fn health(&self, rec: &VolumeRecord) -> Health {
        let info = match Self::info(rec) {
            Ok(i) => i,
            Err(e) => return Health::abnormal(e.to_string()),
        };
        if let Some(d) = &info.disk {
            return match self.resolve_disk(d) {
                Ok(_) => Health::ok(),
                Err(e) => Health::abnormal(e.to_string()),
            };
        }
        if let Err(e) = self.require_file(&rec.id) {
            return Health::abnormal(e.to_string());
        }
        Health::ok()
    }

    fn stage(&self, rec: &VolumeRecord, staging: &Path, cap: &Capability) -> Result<()> {
        self.check_capability(cap)?;
        self.stage_volume(rec, staging, cap)
    }

    fn unstage(&self, rec: &VolumeRecord, staging: &Path) -> Result<()> {
        self.unstage_volume(rec, staging)
    }

    fn publish(&self, rec: &VolumeRecord, a: &PublishArgs<'_>) -> Result<()> {
        self.check_capability(a.capability)?;
        self.publish_volume(rec, a)
    }

    fn unstage_path(&self, id: &str, staging: &Path) -> Result<()> {
        self.refuse_recorded_device(id, staging)?;
        self.unstage_at(id, staging, None)
    }

    fn unpublish(&self, id: &str, target: &Path) -> Result<()> {
        self.refuse_foreign(id, target)?;
        let unmounted = mounts::unmount_all(&self.os, target)?;
        mounts::remove_target(
            &self.os,
            target,
            unmounted > 0 || node::raw_target_left(self.os.files.as_ref(), target),
        )
    }

    fn refuse_recorded(&self, id: &str, path: &Path) -> Result<()> {
        self.refuse_recorded_device(id, path)
    }

    fn stats(&self, rec: &VolumeRecord, path: &Path) -> Result<VolumeStats> {
        self.volume_stats(rec, path)
    }

    /// As the default, but a raw volume whose loop device was detached
    /// under its publish is abnormal (no numbers), not NOT_FOUND: the path
    /// still holds what was published there.
    fn stats_and_health(&self, rec: &VolumeRecord, path: &Path) -> Result<(VolumeStats, Health)> {
        match self.volume_stats(rec, path) {
            Ok(s) => Ok((s, self.health(rec))),
            Err(e @ Error::NotFound(_)) => match self.detached_under(rec, path)? {
                Some(why) => Ok((VolumeStats::default(), Health::abnormal(why))),
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    fn in_use(&self, rec: &VolumeRecord, mount_table: &LazyTable) -> Result<Vec<PathBuf>> {
        match self.current_device(rec) {
            Ok(Some(dev)) => Ok(Self::users(mount_table.get(&self.os)?, &dev)),
            Ok(None) => Ok(Vec::new()),
            // A disk that is not the recorded one any more is not ours to
            // judge; delete will refuse it.
            Err(_) => Ok(Vec::new()),
        }
    }
}
