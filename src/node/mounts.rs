//! Mount logic shared by the kinds that stage a volume at the staging path
//! and bind-mount it into targets.
//!
//! Every decision comes from the kernel, never from comparing `stat` device
//! numbers (bind mounts of one filesystem share them) and never from a
//! `stat` error (a broken NFS/FUSE mount answers EIO/ENOTCONN/ESTALE). Two
//! kernel sources are used:
//!
//! - the mount-root probe (`os.probe`, statx STATX_ATTR_MOUNT_ROOT) for
//!   "is anything mounted exactly at this path": `unmount_all` (unpublish)
//!   unmounts the top mount while it answers "yes" and stops at "no";
//!   `unstage` returns at once when it answers "no" (asked with the mount
//!   id, STATX_MNT_ID, in the same statx). When the probe cannot
//!   tell (`None`: an error other than ENOENT, or a kernel before 5.8), they
//!   decide from mountinfo instead, as below.
//! - /proc/self/mountinfo (`os.mounts`, one read of the whole table) for
//!   everything that needs to know *what* is mounted: whether the staging
//!   path already holds this volume (idempotent stage) or another one
//!   (ALREADY_EXISTS), what publish binds and whether the target already
//!   has it, whether the volume is mounted elsewhere (single-target publish,
//!   unstage), and how many mounts to remove when the probe cannot tell.
//!
//! - the identity probe (`os.probe.identity`, statx device and inode) for
//!   "does the staging path show this volume's directory": with the
//!   mount-root probe it decides a local volume's NodePublish without
//!   mountinfo in the common case (see `publish_bind`).
//!
//! A local-volume lifecycle reads mountinfo three times: NodeStage (is the
//! volume mounted anywhere already: a second staging path is refused),
//! NodeUnstage and DeleteVolume once each (publish and unpublish only
//! probe).
use std::cell::OnceCell;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::node::staged::StagedAt;
use crate::os::mountinfo::{self, MountEntry};
use crate::os::{MountFlags, Os};
use crate::state::{AccessType, Capability};

/// The filesystem object a mount shows: device and directory within it.
pub type Object = (u32, u32, PathBuf);

pub fn object(e: &MountEntry) -> Object {
    (e.major, e.minor, e.root.clone())
}

pub fn table(os: &Os) -> Result<Vec<MountEntry>> {
    os.mounts
        .mounts()
        .map_err(|e| Error::os("reading the mount table", e))
}

/// The mount table, read at most once and only when first needed, so that
/// the decisions of one RPC (DeleteVolume's "in use?" and the kind's own
/// checks in delete) share one read. Use it within one RPC under the
/// volume's guard, never across RPCs.
#[derive(Debug, Default)]
pub struct LazyTable(OnceCell<Vec<MountEntry>>);

impl LazyTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// The table, reading it on the first call.
    pub fn get(&self, os: &Os) -> Result<&[MountEntry]> {
        if let Some(t) = self.0.get() {
            return Ok(t);
        }
        let t = table(os)?;
        Ok(self.0.get_or_init(|| t))
    }
}

/// Everything mounted exactly at `path`, bottom first, as entries of the
/// table `t`. Matched by mount id, not by path text: the mount-id probe
/// (statx STATX_MNT_ID) names the top mount at `path` (following symlinks
/// in its parents, as mount and umount do, while mountinfo shows resolved
/// paths), and the mounts stacked beneath it are its parents at the same
/// mount point. When the kernel cannot tell, or the table does not know
/// the id (it was read before the mount), the path text decides.
pub fn at<'a>(os: &Os, t: &'a [MountEntry], path: &Path) -> Vec<&'a MountEntry> {
    at_probed(t, path, os.probe.root_mount_id(path))
}

/// `at` with the mount-id probe of `path` made already (`probed`), under
/// the path's guard.
fn at_probed<'a>(
    t: &'a [MountEntry],
    path: &Path,
    probed: Option<Option<u64>>,
) -> Vec<&'a MountEntry> {
    match probed {
        Some(None) => Vec::new(),
        Some(Some(id)) => stack(t, id).unwrap_or_else(|| mountinfo::at(t, path)),
        None => mountinfo::at(t, path),
    }
}

/// The mount `id` and those stacked beneath it, bottom first.
fn stack(t: &[MountEntry], id: u64) -> Option<Vec<&MountEntry>> {
    let mut top = t.iter().find(|m| u64::from(m.id) == id)?;
    let mut v = vec![top];
    while let Some(below) = t
        .iter()
        .find(|m| m.id == top.parent && m.id != top.id && m.mount_point == top.mount_point)
    {
        if v.len() > t.len() {
            break;
        }
        v.push(below);
        top = below;
    }
    v.reverse();
    Some(v)
}

/// Ids of the mounts at each of `paths` (see `at`).
fn ids_at(os: &Os, t: &[MountEntry], paths: &[&Path]) -> Vec<u32> {
    paths
        .iter()
        .flat_map(|p| at(os, t, p))
        .map(|m| m.id)
        .collect()
}

/// At most this many unmounts at one path (stacked mounts) per call.
const MAX_UNMOUNTS: usize = 64;

/// Mount flags a bind mount accepts from `mount_flags` (an allowlist); any
/// other flag is INVALID_ARGUMENT, so nothing reaches the kernel unchecked.
/// The error names a refused flag, never its value (`os::option_shown`:
/// a value may be a secret).
pub fn bind_flags(cap: &Capability) -> Result<MountFlags> {
    let mut f = MountFlags::default();
    if let AccessType::Mount { mount_flags, .. } = &cap.access_type {
        for flag in mount_flags {
            for opt in flag.split(',') {
                match opt.trim() {
                    "" | "rw" | "defaults" | "bind" => {}
                    "ro" => f.readonly = true,
                    "nosuid" => f.nosuid = true,
                    "nodev" => f.nodev = true,
                    "noexec" => f.noexec = true,
                    "noatime" => f.noatime = true,
                    "nodiratime" => f.nodiratime = true,
                    "relatime" => f.relatime = true,
                    other => {
                        return Err(Error::Invalid(format!(
                            "mount flag {} is not supported (allowed: ro, rw, nosuid, nodev, noexec, noatime, nodiratime, relatime)",
                            crate::os::option_shown(other)
                        )))
                    }
                }
            }
        }
    }
    Ok(f)
}

/// Whether the mount `m` has the per-mount flags that mounting with `want`
/// gives: ro, nosuid, nodev and noexec each exactly as asked or as
/// `inherited` has them (a bind mount keeps its source mount's flags), and
/// noatime when asked. An idempotent repeat of a publish or stage compares
/// with this, so a repeat asking for other flags is ALREADY_EXISTS rather
/// than an OK that leaves the old flags in place.
pub fn has_flags(m: &MountEntry, want: MountFlags, inherited: Option<&MountEntry>) -> bool {
    let inh = |o: &str| inherited.is_some_and(|s| s.has_option(o));
    [
        (want.readonly, "ro"),
        (want.nosuid, "nosuid"),
        (want.nodev, "nodev"),
        (want.noexec, "noexec"),
    ]
    .iter()
    .all(|(w, o)| m.has_option(o) == (*w || inh(o)))
        && (!want.noatime || m.has_option("noatime"))
}

/// Creates a directory if it is missing (not its parents); true when it
/// created it.
pub fn ensure_dir(os: &Os, path: &Path) -> Result<bool> {
    ensure_dir_by(os, path, crate::os::files::ensure_dir)
}

/// `ensure_dir` by `how` (`files::ensure_dir`, or `ensure_dir_present` for
/// a directory that is usually there).
fn ensure_dir_by(
    os: &Os,
    path: &Path,
    how: fn(&dyn crate::os::Files, &Path, u32) -> std::result::Result<bool, crate::os::OsError>,
) -> Result<bool> {
    how(os.files.as_ref(), path, 0o777).map_err(|e| {
        if e.errno() == Some(libc::ENOTDIR) {
            Error::WrongState(format!("{} exists and is not a directory", path.display()))
        } else if e.errno() == Some(libc::ENOENT) {
            Error::WrongState(format!(
                "the parent directory of {} does not exist (the CO creates it)",
                path.display()
            ))
        } else {
            Error::os(format!("creating {}", path.display()), e)
        }
    })
}

/// Runs `mount` onto the directory `target`, creating the directory first
/// if it is missing; when the mount fails, a directory created here is
/// removed again, so a failed publish leaves nothing behind.
pub fn mount_on_dir(os: &Os, target: &Path, mount: impl FnOnce() -> Result<()>) -> Result<()> {
    mount_on(os, target, ensure_dir(os, target)?, mount)
}

/// `mount_on_dir` for a staging path, which kubelet makes before
/// NodeStageVolume: looked at first (one lstat) and made only when it is
/// missing, where `mount_on_dir` (for a target, which the driver makes)
/// tries the mkdir first.
pub fn mount_on_staging_dir(
    os: &Os,
    staging: &Path,
    mount: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let created = ensure_dir_by(os, staging, crate::os::files::ensure_dir_present)?;
    mount_on(os, staging, created, mount)
}

/// Runs `mount` onto `target`, removing the directory again when the
/// mount fails and `created` says it was made for it.
fn mount_on(
    os: &Os,
    target: &Path,
    created: bool,
    mount: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let r = mount();
    if r.is_err() && created {
        let _ = os.files.remove_dir(target);
    }
    r
}

/// FAILED_PRECONDITION when a volume about to be staged at a new path is
/// mounted already (`mounted_at`: staged at another path, or published
/// from there). One staging path per volume: a second one could never be
/// unstaged (each would count the other as a publication), and Kubernetes
/// stages a volume at one path per node.
///
/// Unless `staging` is where the volume was staged and never unstaged
/// (`staged_here`, asked only when it is mounted elsewhere: see
/// `node::staged`): then its staging mount was taken off by hand (`umount`,
/// `umount -l`, the directory removed after) while pods still use it, and
/// the mounts elsewhere are their publications; kubelet stages it again
/// there and retries until that succeeds.
pub fn refuse_staged_elsewhere(
    staging: &Path,
    mounted_at: &[PathBuf],
    staged_here: impl FnOnce() -> bool,
) -> Result<()> {
    if mounted_at.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = mounted_at.iter().map(|p| p.display().to_string()).collect();
    if staged_here() {
        tracing::warn!(staging = %staging.display(), mounted_at = %list.join(", "),
            "the volume's staging mount is gone (unmounted by hand?) while it is still mounted elsewhere; staging it again at its own staging path");
        return Ok(());
    }
    Err(Error::WrongState(format!(
        "volume is already mounted at {}; it is staged at one path at a time: unstage it there before staging it at {}",
        list.join(", "),
        staging.display()
    )))
}

/// Stages by bind-mounting `source` (a directory) at `staging`. Idempotent:
/// an existing bind of the same directory is success; any other mount there
/// is ALREADY_EXISTS; the directory mounted anywhere else is
/// FAILED_PRECONDITION (`refuse_staged_elsewhere`), unless `staging` is
/// where volume `id` is staged (`staged`). The path is recorded there just
/// before the bind.
///
/// `seen` is the caller's lstat of `source`, which its checks judged: the
/// bind is of that directory, never of what the path names by then. The
/// directory is opened once (`pin_checked`) and bound through its
/// descriptor; a symlink, or another directory, put at `source` since
/// the look is FAILED_PRECONDITION and nothing is mounted.
pub fn stage_bind(
    os: &Os,
    staged: &StagedAt,
    id: &str,
    (source, seen): (&Path, &std::fs::Metadata),
    staging: &Path,
) -> Result<()> {
    let t = table(os)?;
    let obj = mountinfo::object_of(&t, source)
        .ok_or_else(|| Error::Internal(format!("no mount holds {}", source.display())))?;
    if let Some(top) = at(os, &t, staging).last() {
        if object(top) == obj {
            return Ok(());
        }
        if deleted(top) || staged.is(id, staging) {
            return Err(Error::WrongState(format!(
                "staging path {s} still holds volume {id}'s directory as it was before it was removed or moved away by hand (mountinfo shows {}), and {} is another directory: the pods using it keep it. Put the volume's own directory back at {} and let its pods go, or let them go first (their NodeUnpublishVolume and NodeUnstageVolume take the old mounts down)",
                top.root.display(),
                source.display(),
                source.display(),
                s = staging.display(),
            )));
        }
        return Err(Error::Conflict(format!(
            "staging path {} already has another mount",
            staging.display()
        )));
    }
    let elsewhere: Vec<PathBuf> = mountinfo::mounts_of(&t, &obj)
        .into_iter()
        .filter(|m| m.mount_point != source)
        .map(|m| m.mount_point.clone())
        .collect();
    refuse_staged_elsewhere(staging, &elsewhere, || staged.is(id, staging))?;
    let pinned = pin_checked(os, source, Checked::Seen(seen), true)?;
    staged.remember(id, staging);
    mount_on_staging_dir(os, staging, || {
        os.mounter
            .bind(&pinned.path(), staging, MountFlags::default())
            .map_err(|e| Error::os(format!("staging at {}", staging.display()), e))
    })
}

/// What a caller's checks saw at a path it is about to bind from.
#[derive(Debug, Clone, Copy)]
pub enum Checked<'a> {
    /// The object an lstat of the path showed (type, device, inode).
    Seen(&'a std::fs::Metadata),
    /// A mount root showing this device and inode (the mount-root and
    /// identity probes: a bind of a volume's directory).
    Shows((u64, u64)),
    /// The top mount at the path, by its id (mountinfo's first field).
    Mount(u32),
}

impl Checked<'_> {
    /// Whether the opened object `p` is what was checked. A mount whose
    /// id the kernel cannot tell (before 5.8) is taken for the one
    /// checked unless it is no mount root at all: as before, the checks
    /// decide alone there.
    fn holds(self, p: &crate::os::pin::Pinned) -> bool {
        match self {
            Checked::Seen(m) => p.is(m),
            Checked::Shows(id) => p.mount_root() == Some(true) && p.identity() == id,
            Checked::Mount(id) => match p.mount_id() {
                Some(_) => p.is_root_of(u64::from(id)),
                None => p.mount_root() != Some(false),
            },
        }
    }
}

/// `path` opened once (`Files::pin`, never through a symlink at it) for
/// a bind through its descriptor, when it is still what the caller's
/// checks judged (`checked`). A symlink, another object or another mount
/// put at `path` since (by hand, or by anyone who can write its parent)
/// is FAILED_PRECONDITION and nothing is mounted: a bind by path would
/// have bound whatever is there by then. `dir`: the object must be a
/// directory.
pub fn pin_checked(
    os: &Os,
    path: &Path,
    checked: Checked<'_>,
    dir: bool,
) -> Result<crate::os::pin::Pinned> {
    let changed = || {
        Error::WrongState(format!(
            "{} was replaced while it was being mounted (a symlink, another object or another mount is there now, not the one checked); nothing was mounted, retry",
            path.display()
        ))
    };
    let p = os.files.pin(path, dir).map_err(|e| match e.errno() {
        Some(libc::ELOOP | libc::ENOTDIR | libc::ENOENT) => changed(),
        _ => Error::os(format!("opening {}", path.display()), e),
    })?;
    if !checked.holds(&p) {
        return Err(changed());
    }
    Ok(p)
}

/// The top mount at `staging`, if it shows `expected` (or any object when
/// `expected` is None).
pub fn staged_entry<'a>(
    os: &Os,
    t: &'a [MountEntry],
    staging: &Path,
    expected: Option<&Object>,
) -> Result<&'a MountEntry> {
    let entry = at(os, t, staging).last().copied().ok_or_else(|| {
        Error::WrongState(format!(
            "volume is not staged at {} (call NodeStageVolume first)",
            staging.display()
        ))
    })?;
    if let Some(exp) = expected {
        if &object(entry) != exp {
            return Err(Error::WrongState(format!(
                "{} holds a different volume",
                staging.display()
            )));
        }
    }
    Ok(entry)
}

/// Publishes by bind-mounting the staged volume into `target`, read-only
/// when asked. A repeat with the same arguments is success and adds no
/// mount; the same target with another volume or another read-only setting
/// is ALREADY_EXISTS; a second target of a single-target volume is
/// FAILED_PRECONDITION.
///
/// `source`, for kinds that stage a directory (local volumes), is that
/// directory. Then the common case is decided without mountinfo: nothing is
/// mounted at the target (probe), the staging path is a mount root (probe)
/// showing the source directory itself (same device and inode: a bind of
/// that directory), and the access mode allows several targets. Anything
/// else, or any probe that cannot tell, is decided from mountinfo.
///
/// The bind is of what those checks saw at the staging path, never of
/// what the path shows by then: the staging path is opened once after
/// them (`pin_checked`: the mount root showing the source's identity, or
/// the top mount mountinfo showed there, by its id) and bound through its
/// descriptor; another mount or object there meanwhile is
/// FAILED_PRECONDITION and nothing is mounted.
pub fn publish_bind(
    os: &Os,
    expected: impl FnOnce(&[MountEntry]) -> Option<Object>,
    source: Option<&Path>,
    staging: &Path,
    target: &Path,
    cap: &Capability,
    readonly: bool,
) -> Result<()> {
    let mut flags = bind_flags(cap)?;
    flags.readonly |= readonly || cap.access_mode.read_only();
    let bind = |checked: Checked<'_>| {
        let p = pin_checked(os, staging, checked, true)?;
        os.mounter
            .bind(&p.path(), target, flags)
            .map_err(|e| Error::os(format!("publishing at {}", target.display()), e))
    };
    // The staging path's two answers from one look (one statx).
    let shown = source
        .filter(|_| !cap.access_mode.single_target())
        .and_then(|src| shows_dir(os, staging, src));
    if let Some(id) = shown {
        // The target's directory first: one made here has nothing
        // mounted on it, which the mount-root probe would ask; one that
        // was there is probed. Anything else (a mount there, a probe
        // that cannot tell, a target that cannot be made) goes through
        // the mount table below, as before.
        let checked = Checked::Shows(id);
        match ensure_dir(os, target) {
            Ok(true) => return mount_on(os, target, true, || bind(checked)),
            Ok(false) if os.probe.mount_root(target) == Some(false) => {
                return mount_on(os, target, false, || bind(checked))
            }
            _ => {}
        }
    }
    let t = table(os)?;
    let exp = expected(&t);
    let staged = staged_entry(os, &t, staging, exp.as_ref())?;
    let obj = object(staged);
    if let Some(top) = at(os, &t, target).last() {
        if object(top) == obj && has_flags(top, flags, Some(staged)) {
            return Ok(());
        }
        return Err(Error::Conflict(format!(
            "target {} is already mounted with a different volume, read-only setting or mount flags",
            target.display()
        )));
    }
    if cap.access_mode.single_target() {
        refuse_second_target(os, &t, &obj, staging, target)?;
    }
    mount_on_dir(os, target, || bind(Checked::Mount(staged.id)))
}

/// The identity the staging path shows when it is a mount root showing
/// the directory `src` itself (a bind of it); None otherwise, or when a
/// probe cannot tell.
fn shows_dir(os: &Os, staging: &Path, src: &Path) -> Option<(u64, u64)> {
    match os.probe.root_and_identity(staging) {
        (Some(true), Some(id)) if os.probe.identity(src) == Some(id) => Some(id),
        _ => None,
    }
}

/// The mounts of `obj` other than those at `paths` and the kernel's copies
/// of those: where it is mounted by someone else. A copy is made when a
/// path is under a mount with shared propagation that has a peer in this
/// mount namespace (`/var/lib/kubelet` bound from `/data/kubelet`, or a
/// container given both `/var/lib/kubelet` and a directory under it): it
/// is no publication and goes with the mount it copies
/// (`mountinfo::propagated_copy_of`).
pub fn mounts_elsewhere<'a>(
    os: &Os,
    t: &'a [MountEntry],
    obj: &Object,
    paths: &[&Path],
) -> Vec<&'a MountEntry> {
    elsewhere_than(t, obj, &ids_at(os, t, paths))
}

/// `mounts_elsewhere` with the ids of the mounts at the paths known (`at`
/// probed them already).
fn elsewhere_than<'a>(t: &'a [MountEntry], obj: &Object, here: &[u32]) -> Vec<&'a MountEntry> {
    let ours: Vec<&MountEntry> = t.iter().filter(|m| here.contains(&m.id)).collect();
    mountinfo::mounts_of(t, obj)
        .into_iter()
        .filter(|m| !here.contains(&m.id))
        .filter(|m| !ours.iter().any(|o| mountinfo::propagated_copy_of(t, m, o)))
        .collect()
}

/// FAILED_PRECONDITION when `obj` (a single-target volume) is mounted
/// anywhere but at its staging point and at `target`.
pub fn refuse_second_target(
    os: &Os,
    t: &[MountEntry],
    obj: &Object,
    staging: &Path,
    target: &Path,
) -> Result<()> {
    let others: Vec<_> = mounts_elsewhere(os, t, obj, &[staging, target])
        .into_iter()
        .map(|m| m.mount_point.display().to_string())
        .collect();
    if others.is_empty() {
        return Ok(());
    }
    Err(Error::WrongState(format!(
        "volume has access mode SINGLE_NODE_SINGLE_WRITER and is already published at {}",
        others.join(", ")
    )))
}

/// Unmounts everything mounted at `path` (stacked mounts included). The
/// mount-root probe decides: while it says something is mounted there, the
/// top mount is unmounted; once it says nothing is, done, without reading
/// mountinfo. When the probe cannot tell, or when umount answers EINVAL
/// (not mounted: someone else unmounted meanwhile, or the probe and umount
/// disagree), mountinfo decides (as in `unmount_all_in`). EBUSY is returned
/// as an error to retry, never turned into a lazy unmount. Returns how many
/// mounts it removed.
pub fn unmount_all(os: &Os, path: &Path) -> Result<usize> {
    unmount_all_from(os, path, os.probe.mount_root(path))
}

/// `unmount_all` with the first mount-root probe of `path` made already by
/// the caller (`first`), in the same call and under the path's guard, with
/// nothing mounted or unmounted since: each later turn probes again.
pub fn unmount_all_from(os: &Os, path: &Path, first: Option<bool>) -> Result<usize> {
    let mut probed = Some(first);
    for done in 0..MAX_UNMOUNTS {
        let root = probed.take().unwrap_or_else(|| os.probe.mount_root(path));
        match root {
            Some(false) => return Ok(done),
            Some(true) => {}
            None => {
                return unmount_listed(os, &table(os)?, path, MAX_UNMOUNTS - done).map(|n| n + done)
            }
        }
        match os.mounter.unmount(path) {
            Ok(()) => {}
            Err(e) if e.errno() == Some(libc::EINVAL) => {
                return unmount_listed(os, &table(os)?, path, MAX_UNMOUNTS - done - 1)
                    .map(|n| n + done);
            }
            Err(e) => return Err(Error::os(format!("unmounting {}", path.display()), e)),
        }
    }
    // The budget is spent; one last look decides between done and stuck.
    match os.probe.mount_root(path) {
        Some(false) => Ok(MAX_UNMOUNTS),
        Some(true) => Err(still_mounted(path)),
        None => unmount_listed(os, &table(os)?, path, 0).map(|n| n + MAX_UNMOUNTS),
    }
}

/// `unmount_all` with a mount table the caller already read: unmounts as
/// many times as the table shows mounts at `path`, reading the table again
/// only if the kernel disagrees.
pub fn unmount_all_in(os: &Os, t: &[MountEntry], path: &Path) -> Result<()> {
    unmount_listed(os, t, path, MAX_UNMOUNTS).map(|_| ())
}

/// `unmount_all_in` with at most `budget` unmount calls; how many it made
/// that succeeded.
fn unmount_listed(os: &Os, t: &[MountEntry], path: &Path, budget: usize) -> Result<usize> {
    unmount_counted(os, path, at(os, t, path).len(), budget)
}

/// `unmount_listed` with the number of mounts at `path` known (`at`
/// probed it already, within the same call).
fn unmount_counted(os: &Os, path: &Path, mut n: usize, budget: usize) -> Result<usize> {
    let mut removed = 0;
    for _ in 0..budget {
        if n == 0 {
            return Ok(removed);
        }
        match os.mounter.unmount(path) {
            Ok(()) => {
                n -= 1;
                removed += 1;
            }
            // EINVAL: not mounted any more (someone else unmounted): look
            // again.
            Err(e) if e.errno() == Some(libc::EINVAL) => {
                n = at(os, &table(os)?, path).len();
            }
            Err(e) => return Err(Error::os(format!("unmounting {}", path.display()), e)),
        }
    }
    if n == 0 {
        return Ok(removed);
    }
    Err(still_mounted(path))
}

fn still_mounted(path: &Path) -> Error {
    Error::Internal(format!(
        "{} still mounted after {MAX_UNMOUNTS} unmounts",
        path.display()
    ))
}

/// Removes a target path the driver created: an empty directory with rmdir,
/// never recursively; anything else (the file a raw block volume is bound
/// on) only when `file_is_ours` (it was just unmounted, or Berth named it),
/// else it is left as it is. Missing is fine.
///
/// The rmdir comes first: a directory (the common case) goes with that one
/// call, and rmdir never follows a symlink at `path` (ENOTDIR, as for a
/// file). Only ENOTDIR has `path` looked at (lstat) to decide.
pub fn remove_target(os: &Os, path: &Path, file_is_ours: bool) -> Result<()> {
    match os.files.remove_dir(path) {
        Err(e) if e.errno() == Some(libc::ENOTDIR) => remove_target_looked(os, path, file_is_ours),
        r => removed_dir(path, r),
    }
}

/// What an rmdir of the target `path` answered, as `remove_target` takes
/// it: gone (or never there) is fine, and so is a directory left because
/// something is in it (a warning).
fn removed_dir(path: &Path, r: std::result::Result<(), crate::os::OsError>) -> Result<()> {
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.errno() == Some(libc::ENOENT) => Ok(()),
        Err(e) if e.errno() == Some(libc::ENOTEMPTY) => {
            tracing::warn!(path = %path.display(), "target directory is not empty after unmount; leaving it");
            Ok(())
        }
        Err(e) => Err(Error::os(format!("removing {}", path.display()), e)),
    }
}

/// `remove_target` of a `path` that is not a directory (or was not when
/// rmdir looked): decided by what lstat shows.
fn remove_target_looked(os: &Os, path: &Path, file_is_ours: bool) -> Result<()> {
    let gone = |e: &crate::os::OsError| e.errno() == Some(libc::ENOENT);
    match os.files.lstat(path).map_err(crate::os::OsError::into_io) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("inspecting {}", path.display()), e)),
        Ok(m) if m.is_dir() => removed_dir(path, os.files.remove_dir(path)),
        Ok(_) if !file_is_ours => {
            tracing::warn!(path = %path.display(), "target is not a directory and nothing was mounted on it; leaving it");
            Ok(())
        }
        Ok(_) => match os.files.remove_file(path) {
            Err(e) if !gone(&e) => Err(Error::os(format!("removing {}", path.display()), e)),
            _ => Ok(()),
        },
    }
}

/// Whether the mount shows a directory that was removed after it was
/// mounted (mountinfo marks its root `//deleted`): it cannot be told apart
/// from the volume's own, and is never a reason to refuse an unmount.
pub fn deleted(m: &MountEntry) -> bool {
    m.root
        .as_os_str()
        .as_encoded_bytes()
        .ends_with(b"//deleted")
}

/// The refusal to unmount another volume's (or anything not Berth's) mount.
pub fn foreign(path: &Path, id: &str, top: &MountEntry) -> Error {
    Error::WrongState(format!(
        "{} holds a mount that is not volume {id} ({} from {}); refusing to unmount it",
        path.display(),
        top.fs_type,
        top.source
    ))
}

/// FAILED_PRECONDITION when the top mount at `path` shows something other
/// than `dir` (volume `id`'s directory). Nothing mounted, or the same
/// directory (the identity probe, without mountinfo): Ok. When `dir` is
/// gone, or the mount's directory was removed, nothing can be told: Ok.
pub fn refuse_foreign_dir(os: &Os, dir: &VolumeDir<'_>, id: &str, path: &Path) -> Result<()> {
    refuse_foreign_dir_probed(os, dir, id, path, os.probe.root_and_identity(path))
}

/// `refuse_foreign_dir` with the one look at `path` (`root_and_identity`:
/// whether it is a mount root, and what it shows) made already by the
/// caller, in the same call and under the path's guard. Before, the
/// identity of `path` was a statx of its own after the mount-root probe's.
pub fn refuse_foreign_dir_probed(
    os: &Os,
    dir: &VolumeDir<'_>,
    id: &str,
    path: &Path,
    (root, shown): (Option<bool>, Option<(u64, u64)>),
) -> Result<()> {
    let (vol, dir) = (dir, dir.path);
    if root == Some(false) {
        return Ok(());
    }
    if let (Some(a), Some(b)) = (shown, os.probe.identity(dir)) {
        if a == b {
            return Ok(());
        }
    }
    let t = table(os)?;
    let Some(top) = at(os, &t, path).last().copied() else {
        return Ok(());
    };
    match mountinfo::object_of(&t, dir) {
        Some(obj)
            if obj != object(top)
                && !deleted(top)
                && !vol.renamed(os, &obj, top)
                && !vol.moved(os, &t, &obj, top, path) =>
        {
            Err(foreign(path, id, top))
        }
        _ => Ok(()),
    }
}

/// A volume's directory (`path`, `<root>/<id>`) and how to tell a volume's
/// directory name (`is_volume_name`) from any other name in its root.
pub struct VolumeDir<'a> {
    pub path: &'a Path,
    pub is_volume_name: &'a dyn Fn(&str) -> bool,
    /// Where the volume is staged, as Berth recorded it when it made the
    /// staging mount (`node::staged`; None: not known, or no record of the
    /// volume), asked only when a mount shows another directory.
    pub staged_at: &'a dyn Fn() -> Option<PathBuf>,
}

impl VolumeDir<'_> {
    /// Whether `top` shows this volume's directory under a name an
    /// operator gave it by hand (`mv <root>/<id> <root>/<id>.old`): the
    /// directory is gone from its path, and `top` shows a directory beside
    /// that path (same filesystem, same parent) whose name is no volume's
    /// and not one of the root's own dot-entries. mountinfo follows a
    /// rename, so the mount still shows the same directory; refusing it as
    /// "another volume's" failed every unpublish and unstage of the volume
    /// forever, and its pod never went. Another volume's directory is
    /// never taken for it.
    pub fn renamed(&self, os: &Os, obj: &Object, top: &MountEntry) -> bool {
        let shown = object(top);
        (shown.0, shown.1) == (obj.0, obj.1)
            && shown.2.parent() == obj.2.parent()
            && shown
                .2
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| !n.starts_with('.') && !(self.is_volume_name)(n))
            && os.probe.identity(self.path).is_none()
    }

    /// Whether `top`, the mount at `at`, shows this volume's own directory
    /// moved away by hand, anywhere on its filesystem (`mv <root>/<id>
    /// /elsewhere`, or `mv <root>/<id> <root>/<id>.old` then `mkdir
    /// <root>/<id>`): `at` is the staging path Berth recorded when it made
    /// the volume's staging mount (`staged_at`), or `top` shows what the
    /// mount there shows (a publication of it); and `top` shows no other
    /// volume's directory (nor anything in one) and none of the root's own
    /// dot-entries. mountinfo follows a move, so the mounts still show the
    /// volume's directory; refusing them as another's failed every
    /// unpublish and unstage of the volume forever (`renamed` covers a
    /// rename beside it with the path left empty only). Read only on the
    /// refusal path: one lookup in memory, and the table the caller read.
    pub fn moved(
        &self,
        os: &Os,
        t: &[MountEntry],
        obj: &Object,
        top: &MountEntry,
        at: &Path,
    ) -> bool {
        let shown = object(top);
        if (shown.0, shown.1) != (obj.0, obj.1) {
            return false;
        }
        if let Some(root) = obj.2.parent() {
            if let Ok(inside) = shown.2.strip_prefix(root) {
                let first = inside.components().next().map(|c| c.as_os_str());
                let ours = first
                    .and_then(|n| n.to_str())
                    .is_none_or(|n| n.starts_with('.') || (self.is_volume_name)(n));
                if ours {
                    return false;
                }
            }
        }
        let Some(staging) = (self.staged_at)() else {
            return false;
        };
        staging == at
            || self::at(os, t, &staging)
                .last()
                .is_some_and(|m| object(m) == shown)
    }
}

/// FAILED_PRECONDITION when the top mount at `path` shows a directory at or
/// below one of `roots` (Berth's state directory and kinds' roots: a
/// volume's storage) while the request names `id`, an id without a record
/// (or one no served kind owns): such an id never takes down another
/// volume's mount. A mount of
/// `<root>/<id>` itself is that id's own volume (of a kind no longer
/// served): Ok. Nothing mounted there: Ok, without reading mountinfo.
pub fn refuse_root_storage(os: &Os, roots: &[PathBuf], id: &str, path: &Path) -> Result<()> {
    if os.probe.mount_root(path) == Some(false) {
        return Ok(());
    }
    let t = table(os)?;
    let Some(top) = at(os, &t, path).last().copied() else {
        return Ok(());
    };
    let shows_another = roots.iter().any(|r| {
        mountinfo::object_of(&t, r).is_some_and(|(major, minor, root)| {
            top.major == major
                && top.minor == minor
                && top.root.starts_with(&root)
                && top.root != root.join(id)
        })
    });
    if shows_another {
        return Err(foreign(path, id, top));
    }
    Ok(())
}

/// Unpublishes: unmount everything at `target`, then remove it (a file
/// only if a mount was just taken off it).
pub fn unpublish(os: &Os, target: &Path) -> Result<()> {
    unpublish_from(os, target, os.probe.mount_root(target))
}

/// `unpublish` with the first mount-root probe of `target` made already by
/// the caller (see `unmount_all_from`).
pub fn unpublish_from(os: &Os, target: &Path, root: Option<bool>) -> Result<()> {
    let unmounted = unmount_all_from(os, target, root)?;
    remove_target(os, target, unmounted > 0)
}

/// Unstages: refuses while the staged volume is still mounted elsewhere
/// (other than its own source), then unmounts the staging path. One look
/// at `staging` (the mount-id probe, one statx), then one read of
/// mountinfo; none when the probe says nothing is mounted there. Before,
/// a mount-root probe came first, and the mount-id probe was a second
/// statx of the same path.
pub fn unstage(os: &Os, staging: &Path, source: Option<&VolumeDir<'_>>) -> Result<()> {
    let probed = os.probe.root_mount_id(staging);
    if probed == Some(None) {
        return Ok(());
    }
    let t = table(os)?;
    unstage_here(os, &t, staging, at_probed(&t, staging, probed), source)
}

/// `unstage` with a mount table the caller already read (and that still
/// shows what is mounted at `staging` and where its volume is mounted).
pub fn unstage_in(
    os: &Os,
    t: &[MountEntry],
    staging: &Path,
    volume: Option<&VolumeDir<'_>>,
) -> Result<()> {
    unstage_here(os, t, staging, at(os, t, staging), volume)
}

/// `unstage_in` with what is mounted at `staging` (`here`, from `at`)
/// probed once (statx) for the checks and the unmounts below: the caller
/// holds the path's guard, and the table `t` does not change meanwhile
/// either.
fn unstage_here(
    os: &Os,
    t: &[MountEntry],
    staging: &Path,
    here: Vec<&MountEntry>,
    volume: Option<&VolumeDir<'_>>,
) -> Result<()> {
    let Some(top_entry) = here.last().copied() else {
        return Ok(());
    };
    let top = object(top_entry);
    let source = volume.map(|v| v.path);
    if let Some((v, src)) = volume.and_then(|v| Some((v, mountinfo::object_of(t, v.path)?))) {
        if src != top
            && !deleted(top_entry)
            && !v.renamed(os, &src, top_entry)
            && !v.moved(os, t, &src, top_entry, staging)
        {
            return Err(Error::WrongState(format!(
                "staging path {} holds a mount that is not this volume ({} from {}); refusing to unmount it",
                staging.display(),
                top_entry.fs_type,
                top_entry.source
            )));
        }
    }
    let here_ids: Vec<u32> = here.iter().map(|m| m.id).collect();
    let others: Vec<_> = elsewhere_than(t, &top, &here_ids)
        .into_iter()
        .filter(|m| Some(m.mount_point.as_path()) != source)
        .map(|m| m.mount_point.display().to_string())
        .collect();
    if !others.is_empty() {
        return Err(Error::WrongState(format!(
            "volume is still published at {}; unpublish it first",
            others.join(", ")
        )));
    }
    unmount_counted(os, staging, here.len(), MAX_UNMOUNTS).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::os::fake::{Call, FakeOs};
    use std::sync::Arc;

    struct Env {
        _dir: tempfile::TempDir,
        root: PathBuf,
        os: Os,
        fake: Arc<FakeOs>,
        staged: StagedAt,
    }

    fn env() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let (os, fake) = Os::fake();
        for d in ["vol-a", "vol-b", "state"] {
            std::fs::create_dir(root.join(d)).unwrap();
        }
        Env {
            staged: StagedAt::open(
                &root.join("state"),
                os.files.clone(),
                &crate::node::paths::Protected::default(),
            ),
            _dir: dir,
            root,
            os,
            fake,
        }
    }

    /// `stage_bind` of the directory `src` as an lstat of it shows it now.
    fn stage(e: &Env, id: &str, src: &Path, staging: &Path) -> Result<()> {
        let seen = std::fs::symlink_metadata(src).unwrap();
        stage_bind(&e.os, &e.staged, id, (src, &seen), staging)
    }

    /// `p` as a volume directory of a root where `vol-*` names volumes.
    fn vol(p: &Path) -> VolumeDir<'_> {
        VolumeDir {
            path: p,
            is_volume_name: &|n: &str| n.starts_with("vol-"),
            staged_at: &|| None,
        }
    }

    fn at(f: &FakeOs, p: &Path) -> usize {
        f.table().iter().filter(|m| m.mount_point == p).count()
    }

    fn binds(f: &FakeOs) -> usize {
        f.calls()
            .iter()
            .filter(|c| matches!(c, Call::Bind { .. }))
            .count()
    }

    fn unmounts(f: &FakeOs) -> usize {
        f.calls()
            .iter()
            .filter(|c| matches!(c, Call::Unmount { .. }))
            .count()
    }

    fn cap(mode: crate::state::AccessMode) -> Capability {
        Capability {
            access_type: AccessType::Mount {
                fs_type: String::new(),
                mount_flags: vec![],
                volume_mount_group: String::new(),
                extra: None,
            },
            access_mode: mode,
            extra: None,
        }
    }

    /// The common publish of a staged directory is decided by the probes;
    /// anything else (another directory staged, a single-target volume, a
    /// probe that cannot tell) by mountinfo, with the same answers.
    #[test]
    fn publish_of_a_staged_directory_reads_the_table_only_when_needed() {
        use crate::state::AccessMode::{SingleNodeSingleWriter, SingleNodeWriter};
        let e = env();
        let (a, b) = (e.root.join("vol-a"), e.root.join("vol-b"));
        let (staging, t1, t2) = (e.root.join("stage"), e.root.join("t1"), e.root.join("t2"));
        stage(&e, "vol", &a, &staging).unwrap();
        let exp = |dir: &Path| {
            let dir = dir.to_path_buf();
            move |t: &[MountEntry]| mountinfo::object_of(t, &dir)
        };
        e.fake.clear_calls();
        let w = cap(SingleNodeWriter);
        publish_bind(&e.os, exp(&a), Some(&a), &staging, &t1, &w, false).unwrap();
        assert_eq!(e.fake.table_reads(), 0);
        assert_eq!(at(&e.fake, &t1), 1);
        // A repeat: the target is mounted, so mountinfo decides (OK, no
        // second mount).
        publish_bind(&e.os, exp(&a), Some(&a), &staging, &t1, &w, false).unwrap();
        assert_eq!(e.fake.table_reads(), 1);
        assert_eq!(at(&e.fake, &t1), 1);
        // The staging path shows another volume's directory.
        e.fake.clear_calls();
        let r = publish_bind(&e.os, exp(&b), Some(&b), &staging, &t2, &w, false);
        assert!(matches!(r, Err(Error::WrongState(_))), "{r:?}");
        assert_eq!((e.fake.table_reads(), at(&e.fake, &t2)), (1, 0));
        // A single-target volume already published at t1.
        e.fake.clear_calls();
        let s = cap(SingleNodeSingleWriter);
        let r = publish_bind(&e.os, exp(&a), Some(&a), &staging, &t2, &s, false);
        assert!(matches!(r, Err(Error::WrongState(_))), "{r:?}");
        assert_eq!((e.fake.table_reads(), at(&e.fake, &t2)), (1, 0));
        // The probe cannot tell about the staging path: mountinfo decides.
        e.fake.clear_calls();
        e.fake.set_probe_unknown(&staging, true);
        publish_bind(&e.os, exp(&a), Some(&a), &staging, &t2, &w, false).unwrap();
        assert_eq!((e.fake.table_reads(), at(&e.fake, &t2)), (1, 1));
    }

    #[test]
    fn stage_reads_the_table_once_and_binds() {
        let e = env();
        let (src, staging) = (e.root.join("vol-a"), e.root.join("stage"));
        stage(&e, "vol", &src, &staging).unwrap();
        assert_eq!(e.fake.table_reads(), 1);
        // The directory opened once, and bound through that descriptor.
        assert_eq!(e.fake.pins(), std::slice::from_ref(&src));
        assert_eq!(
            e.fake.calls(),
            vec![Call::Bind {
                source: src.clone(),
                target: staging.clone(),
                flags: MountFlags::default(),
            }]
        );
        assert_eq!(shown_at(&e.fake, &staging), src);
        assert!(staging.is_dir(), "the staging directory is created");
        // A repeat finds the mount (one read) and adds none.
        e.fake.clear_calls();
        stage(&e, "vol", &src, &staging).unwrap();
        assert_eq!(e.fake.table_reads(), 1);
        assert_eq!(binds(&e.fake), 0);
        assert_eq!(at(&e.fake, &staging), 1);
    }

    /// The directory the one mount at `p` shows (its mountinfo root).
    fn shown_at(f: &FakeOs, p: &Path) -> PathBuf {
        let t = f.table();
        let v: Vec<_> = t.iter().filter(|m| m.mount_point == p).collect();
        assert_eq!(v.len(), 1, "{v:?}");
        v[0].root.clone()
    }

    /// Moves the directory `dir` to `moved` and puts `with` at its path:
    /// a symlink to `host` when `with` is "symlink", else a new directory.
    fn swap(dir: &Path, moved: &Path, with: &'static str, host: &Path) {
        std::fs::rename(dir, moved).unwrap();
        match with {
            "symlink" => std::os::unix::fs::symlink(host, dir).unwrap(),
            _ => std::fs::create_dir(dir).unwrap(),
        }
    }

    /// Stages `vol-a` at `stage` with `vol-a` swapped at the next call of
    /// `op`, after the caller's look (moved to `vol-a.moved`, and a
    /// symlink to `vol-b` or a new directory put at its path, as `with`
    /// says): the env and the stage's answer.
    fn stage_swapped_at(op: &'static str, with: &'static str) -> (Env, Result<()>) {
        let e = env();
        let (src, staging) = (e.root.join("vol-a"), e.root.join("stage"));
        let (moved, host) = (e.root.join("vol-a.moved"), e.root.join("vol-b"));
        let seen = std::fs::symlink_metadata(&src).unwrap();
        e.fake
            .before_next(op, move || swap(&src, &moved, with, &host));
        let r = stage_bind(
            &e.os,
            &e.staged,
            "vol",
            (&e.root.join("vol-a"), &seen),
            &staging,
        );
        assert!(
            e.root.join("vol-a.moved").is_dir(),
            "{with}: the swap was made"
        );
        (e, r)
    }

    /// The volume's directory swapped (moved away, a symlink to a host
    /// directory or another directory put at its path) after the stage's
    /// checks looked at it and before its bind: the mount shows the
    /// directory that was checked, wherever it is now, never what the
    /// path names by then. (A bind by path bound the host directory.)
    #[test]
    fn a_stage_binds_the_directory_it_checked_though_its_path_is_swapped() {
        for with in ["symlink", "directory"] {
            let (e, r) = stage_swapped_at("bind", with);
            r.unwrap();
            let shown = shown_at(&e.fake, &e.root.join("stage"));
            assert_eq!(shown, e.root.join("vol-a.moved"), "{with}");
        }
    }

    /// The volume's directory swapped between the checks' look (the
    /// caller's lstat) and the stage's open of it (here, while the mount
    /// table is read): a symlink there, or another directory, is
    /// FAILED_PRECONDITION; nothing is mounted and the staging path is not
    /// recorded as the volume's. (A bind by path bound what was there.)
    #[test]
    fn a_stage_refuses_a_directory_swapped_before_it_was_opened() {
        for with in ["symlink", "directory"] {
            let (e, r) = stage_swapped_at("mounts", with);
            assert!(
                matches!(&r, Err(Error::WrongState(m)) if m.contains("replaced")),
                "{with}: {r:?}"
            );
            let staging = e.root.join("stage");
            assert_eq!((binds(&e.fake), at(&e.fake, &staging)), (0, 0), "{with}");
            assert!(!e.staged.is("vol", &staging), "{with}");
            assert!(!staging.exists(), "{with}");
        }
    }

    /// Takes the mount at `staging` off and binds `dir` there instead:
    /// the staging mount swapped by someone else.
    fn remount_staging(os: &Os, staging: &Path, dir: &Path) {
        os.mounter.unmount(staging).unwrap();
        os.mounter
            .bind(dir, staging, MountFlags::default())
            .unwrap();
    }

    /// Publishes `vol-a`, staged at `stage`, at `t` with `mode`, its
    /// staging mount swapped for `vol-b`'s at the next call of `op`: the
    /// env and the publish's answer.
    fn publish_swapped_at(op: &'static str, mode: crate::state::AccessMode) -> (Env, Result<()>) {
        let e = env();
        let (a, b) = (e.root.join("vol-a"), e.root.join("vol-b"));
        let (staging, target) = (e.root.join("stage"), e.root.join("t"));
        stage(&e, "vol", &a, &staging).unwrap();
        let (os, st, bb) = (e.os.clone(), staging.clone(), b.clone());
        e.fake
            .before_next(op, move || remount_staging(&os, &st, &bb));
        let exp = |t: &[MountEntry]| mountinfo::object_of(t, &a);
        let r = publish_bind(&e.os, exp, Some(&a), &staging, &target, &cap(mode), false);
        assert_eq!(
            shown_at(&e.fake, &staging),
            b,
            "{mode:?}: the swap was made"
        );
        (e, r)
    }

    /// The staging mount swapped for another volume's directory after a
    /// publish's checks and just before its bind (probes, or mountinfo for
    /// a single-target volume): the target shows the volume that was
    /// checked, never the other. (A bind by path bound the other.)
    #[test]
    fn a_publish_binds_the_staging_mount_it_checked_though_it_is_swapped() {
        use crate::state::AccessMode::{SingleNodeSingleWriter, SingleNodeWriter};
        for mode in [SingleNodeWriter, SingleNodeSingleWriter] {
            let (e, r) = publish_swapped_at("bind", mode);
            r.unwrap();
            let shown = shown_at(&e.fake, &e.root.join("t"));
            assert_eq!(shown, e.root.join("vol-a"), "{mode:?}");
        }
    }

    /// The staging mount swapped between a publish's checks and its open
    /// of the staging path (here, while the target's directory is made):
    /// FAILED_PRECONDITION, nothing mounted, the target made for it gone.
    /// (A bind by path bound the other volume.)
    #[test]
    fn a_publish_refuses_a_staging_mount_swapped_before_it_was_opened() {
        use crate::state::AccessMode::{SingleNodeSingleWriter, SingleNodeWriter};
        for mode in [SingleNodeWriter, SingleNodeSingleWriter] {
            let (e, r) = publish_swapped_at("mkdir", mode);
            assert!(
                matches!(&r, Err(Error::WrongState(m)) if m.contains("replaced")),
                "{mode:?}: {r:?}"
            );
            let target = e.root.join("t");
            assert_eq!(at(&e.fake, &target), 0, "{mode:?}");
            assert!(!target.exists(), "{mode:?}");
        }
    }

    #[test]
    fn stage_where_another_volume_is_mounted_is_already_exists() {
        let e = env();
        let staging = e.root.join("stage");
        stage(&e, "other", &e.root.join("vol-b"), &staging).unwrap();
        for unknown in [false, true] {
            e.fake.set_probe_unknown(&staging, unknown);
            e.fake.clear_calls();
            let r = stage(&e, "vol", &e.root.join("vol-a"), &staging);
            assert!(matches!(r, Err(Error::Conflict(_))), "{r:?}");
            assert_eq!(e.fake.table_reads(), 1);
            assert_eq!(binds(&e.fake), 0);
            assert_eq!(at(&e.fake, &staging), 1);
        }
    }

    #[test]
    fn stage_with_an_unknown_probe_decides_from_the_table() {
        let e = env();
        let (src, staging) = (e.root.join("vol-a"), e.root.join("stage"));
        e.fake.set_probe_unknown(&staging, true);
        stage(&e, "vol", &src, &staging).unwrap();
        assert_eq!(e.fake.table_reads(), 1);
        assert_eq!(binds(&e.fake), 1);
        stage(&e, "vol", &src, &staging).unwrap();
        assert_eq!(e.fake.table_reads(), 2);
        assert_eq!(binds(&e.fake), 1, "idempotent");
    }

    /// A volume is staged at one path at a time: a second staging path is
    /// FAILED_PRECONDITION and mounts nothing (two staging paths could never
    /// be unstaged, each counting the other as a publication); once
    /// unstaged, the other path works.
    #[test]
    fn a_second_staging_path_is_refused_until_the_first_is_unstaged() {
        let e = env();
        let (src, staging, other) = (
            e.root.join("vol-a"),
            e.root.join("stage"),
            e.root.join("stage2"),
        );
        stage(&e, "vol", &src, &staging).unwrap();
        let r = stage(&e, "vol", &src, &other);
        assert!(
            matches!(&r, Err(Error::WrongState(m)) if m.contains("stage")),
            "{r:?}"
        );
        assert_eq!(at(&e.fake, &other), 0);
        unstage(&e.os, &staging, Some(&vol(&src))).unwrap();
        stage(&e, "vol", &src, &other).unwrap();
        assert_eq!(at(&e.fake, &other), 1);
        unstage(&e.os, &other, Some(&vol(&src))).unwrap();
        assert_eq!(at(&e.fake, &other), 0);
    }

    /// A target with the publish bind and one more stacked on it.
    fn stacked(e: &Env) -> PathBuf {
        let (staging, target) = (e.root.join("stage"), e.root.join("target"));
        stage(e, "vol", &e.root.join("vol-a"), &staging).unwrap();
        std::fs::create_dir(&target).unwrap();
        for _ in 0..2 {
            e.os.mounter
                .bind(&staging, &target, MountFlags::default())
                .unwrap();
        }
        assert_eq!(at(&e.fake, &target), 2);
        e.fake.clear_calls();
        target
    }

    #[test]
    fn unpublish_of_stacked_mounts_removes_both_without_reading_the_table() {
        let e = env();
        let target = stacked(&e);
        unpublish(&e.os, &target).unwrap();
        assert_eq!(at(&e.fake, &target), 0);
        assert_eq!(unmounts(&e.fake), 2);
        assert_eq!(e.fake.table_reads(), 0);
        assert_eq!(e.fake.probes(), 3, "mounted, mounted, free");
        assert!(!target.exists());
        // Again: nothing there, one probe.
        e.fake.clear_calls();
        unpublish(&e.os, &target).unwrap();
        assert_eq!((unmounts(&e.fake), e.fake.table_reads()), (0, 0));
    }

    #[test]
    fn unpublish_with_an_unknown_probe_decides_from_the_table() {
        let e = env();
        let target = stacked(&e);
        e.fake.set_probe_unknown(&target, true);
        unpublish(&e.os, &target).unwrap();
        assert_eq!(at(&e.fake, &target), 0);
        assert_eq!(unmounts(&e.fake), 2);
        assert_eq!(e.fake.table_reads(), 1);
        assert!(!target.exists());
    }

    #[test]
    fn unmount_einval_lets_the_table_decide_and_ebusy_is_an_error() {
        let e = env();
        let target = stacked(&e);
        // EINVAL (the fake fails before unmounting) after the probe said
        // "mounted": the table decides, still shows both mounts, and both
        // are removed.
        e.fake.fail_next("unmount", libc::EINVAL);
        unmount_all(&e.os, &target).unwrap();
        assert_eq!(at(&e.fake, &target), 0);
        assert_eq!(e.fake.table_reads(), 1);
        assert_eq!(unmounts(&e.fake), 3);

        let target = e.root.join("target2");
        std::fs::create_dir(&target).unwrap();
        e.os.mounter
            .bind(&e.root.join("stage"), &target, MountFlags::default())
            .unwrap();
        e.fake.fail_next("unmount", libc::EBUSY);
        let r = unmount_all(&e.os, &target);
        assert!(matches!(&r, Err(Error::Os { .. })), "{r:?}");
        assert_eq!(at(&e.fake, &target), 1, "no lazy unmount");
        unmount_all(&e.os, &target).unwrap();
        assert_eq!(at(&e.fake, &target), 0);
    }

    #[test]
    fn unstage_reads_once_and_not_at_all_when_nothing_is_staged() {
        let e = env();
        let (src, staging) = (e.root.join("vol-a"), e.root.join("stage"));
        stage(&e, "vol", &src, &staging).unwrap();
        let target = e.root.join("target");
        std::fs::create_dir(&target).unwrap();
        e.os.mounter
            .bind(&staging, &target, MountFlags::default())
            .unwrap();
        e.fake.clear_calls();
        let r = unstage(&e.os, &staging, Some(&vol(&src)));
        assert!(matches!(r, Err(Error::WrongState(_))), "{r:?}");
        assert_eq!((e.fake.table_reads(), unmounts(&e.fake)), (1, 0));
        unpublish(&e.os, &target).unwrap();
        e.fake.clear_calls();
        unstage(&e.os, &staging, Some(&vol(&src))).unwrap();
        assert_eq!((e.fake.table_reads(), unmounts(&e.fake)), (1, 1));
        assert_eq!(at(&e.fake, &staging), 0);
        e.fake.clear_calls();
        unstage(&e.os, &staging, Some(&vol(&src))).unwrap();
        assert_eq!((e.fake.table_reads(), unmounts(&e.fake)), (0, 0));
        // Probe unknown: the table decides (nothing there).
        e.fake.set_probe_unknown(&staging, true);
        unstage(&e.os, &staging, Some(&vol(&src))).unwrap();
        assert_eq!((e.fake.table_reads(), unmounts(&e.fake)), (1, 0));
    }

    #[test]
    fn lazy_table_reads_once_and_only_when_asked() {
        let e = env();
        let t = LazyTable::new();
        assert_eq!(e.fake.table_reads(), 0);
        let n = t.get(&e.os).unwrap().len();
        assert_eq!(t.get(&e.os).unwrap().len(), n);
        assert_eq!(e.fake.table_reads(), 1);
        // A failed read is not kept: the next call reads again.
        let t = LazyTable::new();
        e.fake.fail_next("mounts", libc::EIO);
        assert!(t.get(&e.os).is_err());
        assert!(t.get(&e.os).is_ok());
        assert_eq!(e.fake.table_reads(), 3);
    }
}
