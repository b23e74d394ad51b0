//! The whole-disk pool ("one PV, one disk"): `--disk-pool` names devices
//! by path, glob or directory of device links. A disk is free when no
//! record claims it, nothing mounts it, it is not one of Berth's own loop
//! devices, no other process holds it (it opens exclusively, O_EXCL, at
//! the time it is chosen), the kernel does not hold it read-only
//! (BLKROGET), it can be read, `blkid -p` finds no signature
//! at all on it, and its sample (first and last MiB, 64 spaced 4 KiB
//! blocks: `os::blockdev::sample_ranges`) reads as zeros. A disk that
//! reads as anything else holds someone's data, signature or not: it is
//! never handed to a tenant (nor formatted) until it is erased.
//!
//! A recorded disk is found again by `identify_disk`: its by-id link (or
//! pool path), its size and device number, and for a loop device used as
//! a disk (it has no by-id link) the file backing it, by which it is found
//! at another loop number too (attached again after a reboot). A loop device of one
//! of Berth's own files (a block volume's or snapshot's, `OwnFiles`) is
//! never a disk: not offered, not used, never erased; nor is one of which
//! that cannot be told (a listing or lock file that cannot be read: the
//! doubt is Berth's).
//!
//! A disk a record of berth's has is claimed exclusively (O_EXCL, kept
//! open: `BlockKind::keep_claim`) whenever nothing of berth's own mounts
//! or binds it, so another berth given the same pool (whose journal does
//! not name it) finds it held, never free; the claim is let go before
//! berth's own exclusive uses (`BlockKind::release_claim`).
use std::cell::OnceCell;
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{lock, BlockKind};
use crate::error::{chain, Error, Result};
use crate::node::mounts;
use crate::os::blkid::{self, Probe};
use crate::os::files::Files;
use crate::os::{DeviceInfo, LoopInfo, Os};
use crate::state::{DiskRef, FileId, Kept, LoopRange};

/// The major number of loop devices (`LOOP_MAJOR`).
const LOOP_MAJOR: u32 = 7;

/// Berth's own files, which no disk of the pool may be a loop device of:
/// files under the block root (volumes, `.snapshots/`, `.orphaned/`) or
/// Berth's other directories (state dir, local root). Looked at through
/// the OS layer (`files`). What cannot be read is a doubt, and a doubt is
/// "Berth's" (`holds` answers Err): never offered, used or erased.
pub struct OwnFiles<'a> {
    files: &'a dyn Files,
    root: &'a Path,
    dirs: &'a [PathBuf],
    /// Device and inode of the files of the block root, read when first
    /// needed, with what could not be read (if anything).
    ids: OnceCell<(HashSet<FileId>, Option<String>)>,
}

impl<'a> OwnFiles<'a> {
    pub fn new(files: &'a dyn Files, root: &'a Path, dirs: &'a [PathBuf]) -> Self {
        OwnFiles {
            files,
            root,
            dirs,
            ids: OnceCell::new(),
        }
    }

    /// Device and inode of every regular file in the block root, its
    /// `.snapshots/` and its `.orphaned/` (each entry lstat'ed: a symlink
    /// is not one of Berth's files), and what of them could not be read,
    /// in words: a directory that cannot be listed (any error but
    /// ENOENT: missing, it holds nothing), an entry that cannot be looked
    /// at (any error but ENOENT: removed since it was listed). The set is
    /// then incomplete, and a file outside it may be Berth's.
    fn ids(&self) -> &(HashSet<FileId>, Option<String>) {
        self.ids.get_or_init(|| {
            let mut out = HashSet::new();
            let mut unread = Vec::new();
            for dir in [
                self.root.to_path_buf(),
                self.root.join(super::snapshot::SNAPSHOTS),
                self.root.join(super::ORPHANED),
            ] {
                let rd = match self.files.read_dir(&dir) {
                    Ok(rd) => rd,
                    Err(e) if e.errno() == Some(libc::ENOENT) => continue,
                    Err(e) => {
                        unread.push(format!(
                            "{} cannot be listed ({})",
                            dir.display(),
                            chain(&e)
                        ));
                        continue;
                    }
                };
                for e in rd {
                    let e = match e {
                        Ok(e) => e,
                        Err(e) => {
                            unread.push(format!(
                                "{} cannot be listed to its end ({e})",
                                dir.display()
                            ));
                            break;
                        }
                    };
                    let path = e.path();
                    match self.files.lstat(&path) {
                        Ok(m) if m.is_file() => {
                            out.insert(FileId {
                                dev: m.dev(),
                                ino: m.ino(),
                            });
                        }
                        Ok(_) => {}
                        Err(e) if e.errno() == Some(libc::ENOENT) => {}
                        Err(e) => unread.push(format!(
                            "{} cannot be looked at ({})",
                            path.display(),
                            chain(&e)
                        )),
                    }
                }
            }
            let unread = (!unread.is_empty()).then(|| unread.join("; "));
            (out, unread)
        })
    }

    /// Whether the loop device `l`, backed by the file `backing`, is a
    /// loop device of one of Berth's own files: its backing file's path,
    /// as sysfs shows it, lies under one of Berth's directories, or it is
    /// the very file (device and inode) of one in the block root (another
    /// mount namespace may show another path, a hard link another name),
    /// or it lies in another berth's directory (`in_a_berths_dir`).
    /// Err, in words, when that cannot be told (the block root's files or
    /// a lock file could not be read): a doubt, which the caller takes as
    /// Berth's (not offered; refused, never erased).
    pub fn holds(&self, l: &LoopInfo, backing: FileId) -> std::result::Result<bool, String> {
        if std::iter::once(self.root)
            .chain(self.dirs.iter().map(PathBuf::as_path))
            .any(|d| l.backing_file.starts_with(d))
        {
            return Ok(true);
        }
        let (ids, unread) = self.ids();
        if ids.contains(&backing) {
            return Ok(true);
        }
        match (in_a_berths_dir(self.files, &l.backing_file), unread) {
            (Ok(true), _) => Ok(true),
            (Ok(false), None) => Ok(false),
            (Ok(false), Some(why)) => Err(format!(
                "whether its file {} is one of Berth's own files cannot be told: {why}",
                l.backing_file.display()
            )),
            (Err(why), _) => Err(format!(
                "whether its file {} lies in a directory of a berth cannot be told: {why}",
                l.backing_file.display()
            )),
        }
    }
}

/// Whether `file` lies in a directory of some berth (a state directory or
/// a root, known by its lock file): the loop device of another berth's
/// block volume (a `--disk-pool /dev/loop*` on a node that runs two) is
/// that berth's volume, never a disk of this one's pool, which would hand
/// it to a tenant and zero it at DeleteVolume. Each directory above it is
/// asked for its lock file (lstat, through `files`); ENOENT and ENOTDIR
/// are "no lock there", any other failure (EIO, EACCES, ...) a doubt:
/// Err, in words, unless another directory above has one.
fn in_a_berths_dir(files: &dyn Files, file: &Path) -> std::result::Result<bool, String> {
    let mut doubt = None;
    for d in file
        .ancestors()
        .skip(1)
        .filter(|d| !d.as_os_str().is_empty())
    {
        let lock = d.join(crate::state::lock::LOCK_FILE);
        match files.lstat(&lock) {
            Ok(_) => return Ok(true),
            Err(e) if matches!(e.errno(), Some(libc::ENOENT | libc::ENOTDIR)) => {}
            Err(e) => {
                doubt.get_or_insert_with(|| {
                    format!("{} cannot be looked at ({})", lock.display(), chain(&e))
                });
            }
        }
    }
    doubt.map_or(Ok(false), Err)
}

/// What a device is as a loop device (`loop_of`).
enum LoopOf {
    /// Not a loop device.
    NotLoop,
    /// A loop device, bound to the file with this identity, showing this
    /// part of it.
    Bound(LoopInfo, FileId, LoopRange),
    /// A loop device bound to no file (detached); why, in words.
    Detached(String),
    /// A loop device whose backing file cannot be told; why, in words.
    Unknown(String),
}

/// What `dev` is as a loop device: the major number tells a loop device,
/// sysfs its attachment and `LOOP_GET_STATUS64` its backing file.
fn loop_of(os: &Os, dev: &DeviceInfo) -> LoopOf {
    if dev.major != LOOP_MAJOR {
        return LoopOf::NotLoop;
    }
    let detached = |device: &Path| {
        LoopOf::Detached(format!(
            "loop device {} is bound to no file (detached)",
            device.display()
        ))
    };
    let list = match os.loops.list() {
        Ok(list) => list,
        Err(e) => return LoopOf::Unknown(format!("listing loop devices: {e}")),
    };
    let Some(l) = list
        .into_iter()
        .find(|l| (l.major, l.minor) == (dev.major, dev.minor))
    else {
        return detached(&dev.path);
    };
    match os.loops.status(&l.device) {
        Ok(s) => LoopOf::Bound(
            l,
            FileId {
                dev: s.dev,
                ino: s.ino,
            },
            range_of(&s),
        ),
        Err(e) if e.errno() == Some(libc::ENXIO) => detached(&l.device),
        Err(e) => LoopOf::Unknown(format!(
            "which file backs loop device {} cannot be told: {e}",
            l.device.display()
        )),
    }
}

/// The part of its file a loop device shows, as its status tells.
fn range_of(s: &crate::os::LoopStatus) -> LoopRange {
    LoopRange {
        offset: s.offset,
        sizelimit: s.sizelimit,
    }
}

/// How the part of its file a loop device shows now (`now`) differs from
/// the one its disk's record names (`was`), in words; None when it does
/// not, or the record names none (made before it was kept: any part is
/// taken, as before).
fn range_differs(was: Option<LoopRange>, now: LoopRange) -> Option<String> {
    let was = was?;
    let mut what = Vec::new();
    if was.offset != now.offset {
        what.push(format!(
            "its loop offset is {}, the disk's was {}",
            now.offset, was.offset
        ));
    }
    if was.sizelimit != now.sizelimit {
        what.push(format!(
            "its loop sizelimit is {}, the disk's was {}",
            now.sizelimit, was.sizelimit
        ));
    }
    (!what.is_empty()).then(|| what.join(" and "))
}

/// The device of a recorded disk, if it is still the same disk: found by
/// its by-id link (or pool path) with the recorded size, and with the
/// recorded device number unless a by-id link found it (the recorded one,
/// or the pool path when that is a by-id link of the device); a loop device of
/// one of Berth's own files (`own`) never is, and a loop device must be
/// backed by the file the record names (`DiskRef::loop_backing`), showing
/// the part of it the record names (`DiskRef::loop_range`: the same
/// offset and size limit; another part of the same file is another disk).
/// A loop disk whose record names its backing file and that is not found
/// so (re-attached at another number after a reboot) is the one loop
/// device backed by that very file (device and inode), of the recorded
/// size (`attached_elsewhere`).
/// NOT_FOUND when it is gone (a device of 0 bytes, as a detached loop
/// device's node shows, counts as gone), FAILED_PRECONDITION when another
/// device is there now or it cannot be told.
/// A loop disk found at its recorded path (backed by its recorded file)
/// whose ownership cannot be told (`OwnFiles::holds`) is refused as it is:
/// it is not looked for elsewhere.
pub fn identify_disk(os: &Os, own: &OwnFiles<'_>, d: &DiskRef) -> Result<DeviceInfo> {
    match (identify_at_path(os, own, d), d.backing()) {
        (AtPath::Doubt(e), _) => Err(e),
        (AtPath::Not(e), Some(backing)) => match attached_elsewhere(os, own, d, backing) {
            Ok(Some(dev)) => Ok(dev),
            Ok(None) => Err(e),
            Err(doubt) => Err(doubt),
        },
        (AtPath::Found(dev), _) => Ok(dev),
        (AtPath::Not(e), None) => Err(e),
    }
}

/// What `identify_at_path` found at a recorded disk's path.
enum AtPath {
    /// The disk.
    Found(DeviceInfo),
    /// Not the disk, or nothing: a loop disk may be attached elsewhere.
    Not(Error),
    /// The loop device of the disk's file, refused: whether that file is
    /// one of Berth's own cannot be told (`ownership_unknown`).
    Doubt(Error),
}

/// FAILED_PRECONDITION for the loop disk `what` (where it was found),
/// backed by the file of the loop device `l`, of which `OwnFiles::holds`
/// cannot tell whether it is one of Berth's own (`why`): a doubt is
/// Berth's, so the disk is neither used nor erased. Says what happened
/// and what an operator checks. Before, the message began "... is now
/// ..., not the disk the volume was created on" or "... is not at
/// <path>", though the disk was there and only its file's ownership was
/// in doubt.
fn ownership_unknown(what: &str, l: &LoopInfo, why: &str) -> Error {
    Error::WrongState(format!(
        "ownership of the backing file of {what} (loop device {}, file {}) cannot be told: {why}. Nothing was erased and the disk is not used: berth never uses nor erases a loop device that may be one of its own files (a block volume's or a snapshot's, its own or another berth's). Check that what could not be read can be read (permissions, I/O errors on that filesystem), then retry",
        l.device.display(),
        l.backing_file.display()
    ))
}

/// The loop device the backing file of a loop disk (`backing`, as its
/// record names it) is attached to now, found by that file's device and
/// inode whatever its number: a loop disk attached again after a reboot
/// gets the first free number, not necessarily its old one. None when no
/// loop device is backed by it; FAILED_PRECONDITION when which device is
/// the disk cannot be told for sure: the file is behind more than one
/// loop device, one of them has another size than the disk's, it is one
/// of Berth's own files, or a loop device's backing file cannot be told.
fn attached_elsewhere(
    os: &Os,
    own: &OwnFiles<'_>,
    d: &DiskRef,
    backing: FileId,
) -> Result<Option<DeviceInfo>> {
    let doubt = |why: String| {
        Error::WrongState(format!(
            "the loop disk of the volume (file device {} inode {}, {} bytes, was {}) is not at {}, and {why}; refusing to use or erase it",
            backing.dev,
            backing.ino,
            d.size_bytes,
            d.device.display(),
            d.path.display()
        ))
    };
    let list = os.loops.list().map_err(|e| {
        doubt(format!(
            "whether its file is attached elsewhere cannot be told (listing loop devices: {e})"
        ))
    })?;
    let mut found = Vec::new();
    for l in list {
        match os.loops.status(&l.device) {
            Ok(s)
                if (FileId {
                    dev: s.dev,
                    ino: s.ino,
                }) == backing =>
            {
                found.push((l, range_of(&s)))
            }
            Ok(_) => {}
            // Detached since it was listed.
            Err(e) if e.errno() == Some(libc::ENXIO) => {}
            Err(e) => {
                return Err(doubt(format!(
                    "which file backs loop device {} cannot be told: {e}",
                    l.device.display()
                )))
            }
        }
    }
    let (l, range) = match found.as_slice() {
        [] => return Ok(None),
        [(l, range)] => (l, *range),
        several => {
            return Err(doubt(format!(
                "its file is attached to {} loop devices ({}): which one is the disk cannot be told; detach all but one",
                several.len(),
                several
                    .iter()
                    .map(|(l, _)| l.device.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
    };
    let own_file = match own.holds(l, backing) {
        Ok(false) => None,
        Ok(true) => Some(format!(
            "{} is a loop device of Berth's own file {}: a block volume's or snapshot's, never a disk",
            l.device.display(),
            l.backing_file.display()
        )),
        // A doubt is Berth's: never used, never erased.
        Err(why) => {
            return Err(ownership_unknown(
                &format!(
                    "the volume's loop disk (recorded at {}, its file attached at {} now)",
                    d.path.display(),
                    l.device.display()
                ),
                l,
                &why,
            ))
        }
    };
    if let Some(why) = own_file {
        return Err(doubt(why));
    }
    if let Some(what) = range_differs(d.range(), range) {
        return Err(doubt(format!(
            "loop device {} shows another part of its file ({what}): not the disk",
            l.device.display()
        )));
    }
    let dev = os.devices.inspect(&l.device).map_err(|e| {
        doubt(format!(
            "loop device {} of its file cannot be inspected: {e}",
            l.device.display()
        ))
    })?;
    if (dev.major, dev.minor) != (l.major, l.minor) || dev.size_bytes != d.size_bytes {
        return Err(doubt(format!(
            "loop device {} of its file is {}:{} with {} bytes, not {}:{} with the disk's {} bytes",
            l.device.display(),
            dev.major,
            dev.minor,
            dev.size_bytes,
            l.major,
            l.minor,
            d.size_bytes
        )));
    }
    tracing::debug!(disk = %d.path.display(), device = %dev.path.display(), "loop disk found by its backing file at another loop device");
    Ok(Some(dev))
}

/// `identify_disk` at the recorded by-id link or pool path only. A loop
/// device there backed by another file than the disk's is not the disk
/// (it may be attached elsewhere); one backed by the disk's file (or by
/// any file, for a record that names none) whose ownership cannot be told
/// is refused as it is (`AtPath::Doubt`).
fn identify_at_path(os: &Os, own: &OwnFiles<'_>, d: &DiskRef) -> AtPath {
    let path: &Path = d.by_id.as_deref().unwrap_or(&d.path);
    let missing = |why: String| {
        AtPath::Not(Error::NotFound(format!(
            "disk {} of the volume is missing: {why}",
            path.display()
        )))
    };
    let dev = match os.devices.inspect(path) {
        Ok(dev) => dev,
        Err(e) => return missing(e.to_string()),
    };
    if dev.size_bytes == 0 {
        // A detached loop device (its node stays), a drive without its
        // medium: nothing there to use or erase; the disk may come back.
        return missing(format!(
            "{} has 0 bytes (a detached loop device, or a drive without its medium)",
            dev.path.display()
        ));
    }
    let not_it = |what: String| {
        AtPath::Not(Error::WrongState(format!(
            "{} is now {} ({}:{}, {} bytes{what}), not the disk the volume was created on ({}:{}, {} bytes); refusing to use or erase it",
            path.display(),
            dev.path.display(),
            dev.major,
            dev.minor,
            dev.size_bytes,
            d.major,
            d.minor,
            d.size_bytes
        )))
    };
    let same_number = (dev.major, dev.minor) == (d.major, d.minor);
    // Found by a name the disk keeps wherever the kernel puts it: its
    // by-id link, or the pool path when that is itself one of its by-id
    // links (a pool listed as `/dev/disk/by-id/...`, whose link is then
    // recorded as the path). Its device number may change at a reboot
    // (NVMe drives probed in another order).
    let by_link = d.by_id.is_some() || os.devices.stable_links(&dev).contains(&d.path);
    if dev.size_bytes != d.size_bytes || (!by_link && !same_number) {
        return not_it(String::new());
    }
    let (l, backing, range) = match loop_of(os, &dev) {
        LoopOf::Bound(l, backing, range) => (l, backing, range),
        LoopOf::NotLoop if d.loop_backing.is_some() => {
            return not_it(", not a loop device".into());
        }
        LoopOf::NotLoop => return AtPath::Found(dev),
        LoopOf::Detached(why) => return missing(why),
        LoopOf::Unknown(why) => return not_it(format!("; {why}")),
    };
    // Another file than the disk's (its record names it) is not the disk,
    // whether or not that file's ownership can be told.
    let other_file = d.backing().filter(|b| *b != backing);
    match own.holds(&l, backing) {
        Ok(false) => {}
        Ok(true) => {
            let what = format!(
                ", a loop device of Berth's own file {}: a block volume's or snapshot's, never a disk",
                l.backing_file.display()
            );
            return not_it(what);
        }
        Err(_) if other_file.is_some() => {}
        // A doubt is Berth's: never used, never erased.
        Err(why) => {
            return AtPath::Doubt(ownership_unknown(
                &format!("the volume's loop disk {}", path.display()),
                &l,
                &why,
            ))
        }
    }
    if let Some(b) = other_file {
        return not_it(format!(
            ", a loop device of another file, {} (device {} inode {}; the disk's was device {} inode {})",
            l.backing_file.display(),
            backing.dev,
            backing.ino,
            b.dev,
            b.ino
        ));
    }
    if d.backing().is_none() {
        // A record made before the backing file was kept: the loop device
        // found at the recorded path, number and size is taken for the disk
        // when its file is not one of Berth's own. That it is the file it
        // was at creation cannot be proven: another file of the same size
        // attached at the same loop number after a detach passes (as any
        // disk without a by-id link replaced by one of the same size at the
        // same device number does).
        return AtPath::Found(dev);
    }
    match range_differs(d.range(), range) {
        Some(what) => not_it(format!(
            ", a loop device of the disk's file {} showing another part of it: {what}",
            l.backing_file.display()
        )),
        None => AtPath::Found(dev),
    }
}

/// Why the record of a disk `d` cannot tell its disk from another one
/// (`berth state check` warns): None when it names a by-id link, its pool
/// path is one (the device found there has it, or it lies in
/// `/dev/disk/by-id`), or, a loop disk, its backing file. Records made
/// before pool disks without a by-id link were refused (2026-12-07), or
/// before a loop disk's backing file was kept, find the disk by its
/// kernel name (pool path), device number and size only: another disk of
/// that size that gets that name passes for it (`identify_disk`), is
/// handed to the volume's pods and erased at its delete.
pub fn weak_identity(os: &Os, d: &DiskRef) -> Option<String> {
    if d.by_id.is_some() || d.loop_backing.is_some() || d.path.starts_with(BY_ID_DIR) {
        return None;
    }
    if os
        .devices
        .inspect(&d.path)
        .is_ok_and(|dev| os.devices.stable_links(&dev).contains(&d.path))
    {
        return None;
    }
    let (path, size) = (d.path.display(), d.size_bytes);
    Some(if d.major == LOOP_MAJOR {
        format!(
            "its record finds loop disk {path} by its name, device number ({}:{}) and size ({size} bytes) only (it was made before the backing file of a loop disk was kept): another file of that size attached at that number would pass for it, be handed to the volume's pods and erased at its delete. Move the data to a new volume and delete this one; until then, after each reboot attach the disk's file at {} again before the volume is staged or deleted, and attach no other file of {size} bytes there",
            d.major,
            d.minor,
            d.device.display()
        )
    } else {
        format!(
            "its record finds disk {path} by its kernel name, device number ({}:{}) and size ({size} bytes) only (it was made before 2026-12-07, when pool disks without a /dev/disk/by-id link were still offered): another disk of that size that gets that name (a swap, drives probed in another order at a reboot) would pass for it, be handed to the volume's pods and erased at its delete. Move the data to a new volume on a disk with a by-id link (give a VM's disk a serial, or make /dev/disk/by-id visible to berth) and delete this one; until then add or swap no disk of {size} bytes on this node, and after each reboot check that {path} is still the volume's disk before it is staged or deleted",
            d.major, d.minor
        )
    })
}

/// Where udev makes the stable links of disks.
const BY_ID_DIR: &str = "/dev/disk/by-id/";

/// A disk of the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The path the pool names it by.
    pub listed: PathBuf,
    pub dev: DeviceInfo,
}

/// Paths the `--disk-pool` entries name, in a stable order. Entries,
/// directories and patterns are looked at and read through `files`. A
/// directory or pattern that cannot be read (a listing or look that fails
/// otherwise than ENOENT) names none of what it holds, and is said so (a
/// warning): a disk the pool cannot be read for is not offered, nor erased
/// (`outside_pool`). An entry that cannot be looked at is taken as a
/// device's path (`inspect` decides), as before.
pub fn expand(files: &dyn Files, entries: &[String]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
        if !e.starts_with('/') {
            tracing::warn!(entry = %e, "--disk-pool entries must be absolute paths; ignored");
            continue;
        }
        if e.contains(['*', '?', '[']) {
            out.extend(glob(files, e));
            continue;
        }
        let p = PathBuf::from(e);
        // Followed, as a directory of device links is named (a symlink to
        // a directory is one).
        match files.stat(&p) {
            Ok(m) if m.is_dir() => {
                let mut v = names_in(files, &p, e);
                v.sort();
                out.extend(v.into_iter().map(|n| p.join(n)));
            }
            Ok(_) => out.push(p),
            Err(err) if matches!(err.errno(), Some(libc::ENOENT | libc::ENOTDIR)) => out.push(p),
            Err(err) => {
                // Whether it is a directory of devices cannot be told: it
                // is taken as the path of one, which `inspect` looks at.
                tracing::warn!(entry = %e, error = %chain(&err), "--disk-pool entry cannot be looked at; taken as a device's path (were it a directory, the disks in it are not listed)");
                out.push(p);
            }
        }
    }
    out
}

/// The names in the directory `dir` of the `--disk-pool` entry `entry`,
/// read through `files`, as far as they can be read (a listing that breaks
/// off is said so; a directory gone meanwhile holds nothing).
fn names_in(files: &dyn Files, dir: &Path, entry: &str) -> Vec<std::ffi::OsString> {
    let rd = match files.read_dir(dir) {
        Ok(rd) => rd,
        Err(err) if err.errno() == Some(libc::ENOENT) => return Vec::new(),
        Err(err) => {
            tracing::warn!(entry = %entry, dir = %dir.display(), error = %chain(&err), "a directory of --disk-pool cannot be listed; the disks in it are not listed");
            return Vec::new();
        }
    };
    let mut names = Vec::new();
    for x in rd {
        match x {
            Ok(x) => names.push(x.file_name()),
            Err(err) => {
                tracing::warn!(entry = %entry, dir = %dir.display(), error = %err, "a directory of --disk-pool cannot be listed to its end; the disks after the break are not listed");
                break;
            }
        }
    }
    names
}

/// Expands `*`, `?` and `[...]` in the components of an absolute pattern,
/// reading directories through `files` (`expand`: what cannot be read
/// names nothing, and is said so). Names starting with a dot match only a
/// pattern starting with one.
pub fn glob(files: &dyn Files, pattern: &str) -> Vec<PathBuf> {
    let mut current = vec![PathBuf::from("/")];
    for comp in pattern.split('/').filter(|c| !c.is_empty()) {
        let wild = comp.contains(['*', '?', '[']);
        let mut next = Vec::new();
        for base in &current {
            if !wild {
                next.push(base.join(comp));
                continue;
            }
            let mut names: Vec<_> = names_in(files, base, pattern)
                .into_iter()
                .filter(|n| {
                    let n = n.as_encoded_bytes();
                    (comp.starts_with('.') || !n.starts_with(b".")) && wildmatch(comp.as_bytes(), n)
                })
                .collect();
            names.sort();
            next.extend(names.into_iter().map(|n| base.join(n)));
        }
        current = next;
    }
    current
        .into_iter()
        .filter(|p| match files.lstat(p) {
            Ok(_) => true,
            Err(err) if matches!(err.errno(), Some(libc::ENOENT | libc::ENOTDIR)) => false,
            Err(err) => {
                tracing::warn!(entry = %pattern, path = %p.display(), error = %chain(&err), "a path --disk-pool names cannot be looked at; it names no disk until it can");
                false
            }
        })
        .collect()
}

/// Shell-style match of one name against one pattern component.
pub fn wildmatch(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() {
            match p[pi] {
                b'*' => {
                    star = Some((pi, si));
                    pi += 1;
                    continue;
                }
                b'?' => {
                    pi += 1;
                    si += 1;
                    continue;
                }
                b'[' => {
                    if let Some((hit, len)) = class(&p[pi..], s[si]) {
                        if hit {
                            pi += len;
                            si += 1;
                            continue;
                        }
                    } else if s[si] == b'[' {
                        pi += 1;
                        si += 1;
                        continue;
                    }
                }
                c if c == s[si] => {
                    pi += 1;
                    si += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, ss)) => {
                pi = sp + 1;
                si = ss + 1;
                star = Some((sp, ss + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// A `[...]` class at the start of `p`: whether `c` is in it and the
/// class's length; None when it has no closing bracket.
fn class(p: &[u8], c: u8) -> Option<(bool, usize)> {
    let mut i = 1;
    let negate = matches!(p.get(1), Some(b'!') | Some(b'^'));
    if negate {
        i += 1;
    }
    let mut hit = false;
    let mut first = true;
    while i < p.len() {
        if p[i] == b']' && !first {
            return Some((hit != negate, i + 1));
        }
        first = false;
        if i + 2 < p.len() && p[i + 1] == b'-' && p[i + 2] != b']' {
            if p[i] <= c && c <= p[i + 2] {
                hit = true;
            }
            i += 3;
        } else {
            if p[i] == c {
                hit = true;
            }
            i += 1;
        }
    }
    None
}

/// The warning for a pool disk whose sample does not read as zeros.
fn holds_data(listed: &Path) -> String {
    format!(
        "pool disk {} has no signature but does not read as zeros (its first and last MiB and {} spaced 4 KiB blocks are read): it may hold someone's data, so it is not offered; to offer it, erase it, e.g. `blkdiscard -z {}` or zeroing it whole with dd",
        listed.display(),
        crate::os::blockdev::SAMPLE_BLOCKS,
        listed.display()
    )
}

/// The warning for a pool disk that has no stable name.
fn no_stable_name(listed: &Path) -> String {
    format!(
        "pool disk {} has no /dev/disk/by-id link (udev made none: no serial, or /dev/disk/by-id not visible to berth): a volume's record could not tell it from another disk of its size that gets its kernel name (a swap, drives probed in another order at a reboot), so it is not offered; give it a serial (a VM's disk) or make /dev/disk/by-id visible",
        listed.display()
    )
}

/// Every block device the `--disk-pool` entries `pool` name (duplicates
/// by device number dropped); entries that are not block devices are
/// skipped.
pub fn pool_disks(os: &Os, pool: &[String]) -> Vec<Disk> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for listed in expand(os.files.as_ref(), pool) {
        match os.devices.inspect(&listed) {
            Ok(dev) => {
                if seen.insert((dev.major, dev.minor)) {
                    out.push(Disk { listed, dev });
                }
            }
            Err(e) => {
                tracing::debug!(path = %listed.display(), error = %e, "not a disk; skipped")
            }
        }
    }
    out
}

/// Why berth does not erase the disk `dev` (which a record names, and
/// `identify_disk` found): None when the pool `pool` names it now. Berth
/// erases only disks of its pool: a record is no proof that a device is
/// Berth's (one forged into the journal, or damaged, can name any device
/// with its numbers and size, the host's own disk included).
pub fn outside_pool(os: &Os, pool: &[String], dev: &DeviceInfo) -> Option<String> {
    let numbers = (dev.major, dev.minor);
    if pool_disks(os, pool)
        .iter()
        .any(|d| (d.dev.major, d.dev.minor) == numbers)
    {
        return None;
    }
    Some(format!(
        "disk {} ({}:{}) is not a disk of --disk-pool ({}): berth erases only the disks its pool names, so it never erases this one (the record stays; if the disk is Berth's, put it back in --disk-pool)",
        dev.path.display(),
        dev.major,
        dev.minor,
        if pool.is_empty() {
            "empty".to_string()
        } else {
            pool.join(",")
        }
    ))
}

impl BlockKind {
    /// `resolve_disk` of a disk about to be erased: WrongState unless the
    /// pool names it (`outside_pool`).
    pub(super) fn resolve_disk_to_erase(&self, d: &DiskRef) -> Result<DeviceInfo> {
        let dev = self.resolve_disk(d)?;
        match outside_pool(&self.os, &self.disk_pool, &dev) {
            None => Ok(dev),
            Some(why) => Err(Error::WrongState(why)),
        }
    }

    /// Every block device the pool names (`pool_disks`).
    pub(super) fn pool_disks(&self) -> Vec<Disk> {
        pool_disks(&self.os, &self.disk_pool)
    }

    /// The disks of the pool nobody uses, smallest first.
    pub(super) fn free_disks(&self) -> Result<Vec<Disk>> {
        let mut claimed_numbers = HashSet::new();
        let mut claimed_paths = HashSet::new();
        let mut recorded_files = Vec::new();
        for rec in self
            .store
            .filter(|r| r.block.as_ref().is_some_and(|b| b.disk.is_some()))
        {
            if let Some(d) = rec.block.and_then(|b| b.disk) {
                if let Some(b) = d.backing() {
                    recorded_files.push((b.dev, b.ino));
                }
                // Where a by-id link of the disk (`identify_disk`) shows
                // it now, that is the disk, and only that: after a reboot
                // that numbered the drives otherwise, its recorded node and
                // number, and its pool path when that is a kernel name,
                // are another disk's, which would never be offered again.
                let linked = match &d.by_id {
                    Some(l) => self.os.devices.inspect(l).ok(),
                    None => self
                        .os
                        .devices
                        .inspect(&d.path)
                        .ok()
                        .filter(|now| self.os.devices.stable_links(now).contains(&d.path)),
                };
                if let Some(now) = linked {
                    claimed_numbers.insert((now.major, now.minor));
                    claimed_paths.insert(now.path);
                    continue;
                }
                claimed_numbers.insert((d.major, d.minor));
                claimed_paths.insert(d.device.clone());
                for p in [Some(&d.path), d.by_id.as_ref()].into_iter().flatten() {
                    if let Ok(now) = self.os.devices.inspect(p) {
                        claimed_numbers.insert((now.major, now.minor));
                        claimed_paths.insert(now.path);
                    }
                }
            }
        }
        let t = mounts::table(&self.os)?;
        let mounted: HashSet<(u32, u32)> = t.iter().map(|m| (m.major, m.minor)).collect();
        let loops: HashMap<(u32, u32), LoopInfo> = self
            .os
            .loops
            .list()
            .map_err(|e| Error::os("listing loop devices", e))?
            .into_iter()
            .map(|l| ((l.major, l.minor), l))
            .collect();
        let own = self.own_files();
        // A file behind two loop devices is one disk under two names (a
        // pool listing both, or a glob matching both): only its first name
        // is offered, and none while a volume has any of its names.
        // A record's loop disk is its backing file wherever it is
        // attached (`identify_disk`): attached again after a reboot at
        // another number, that number is still the volume's disk.
        let mut files: HashSet<(u64, u64)> = claimed_numbers
            .iter()
            .filter_map(|n| loops.get(n))
            .filter_map(|l| self.os.loops.backing_id(&l.device).ok())
            .chain(recorded_files.iter().copied())
            .collect();
        // A loop device bound to a block device is that device under
        // another name: both are the same disk's numbers, and the disk is
        // offered under the first one found only, never while a volume or
        // a mount has it under either.
        let under = |n: &(u32, u32)| {
            loops
                .get(n)
                .and_then(|l| self.os.devices.inspect(&l.backing_file).ok())
                .map(|b| (b.major, b.minor))
        };
        let names = |n: (u32, u32)| [Some(n), under(&n)].into_iter().flatten();
        let mut taken: HashSet<(u32, u32)> =
            claimed_numbers.iter().flat_map(|n| names(*n)).collect();
        let mut free = Vec::new();
        for d in self.pool_disks() {
            let n = (d.dev.major, d.dev.minor);
            // (looked up once: a loop device's backing device is a stat)
            let these: Vec<(u32, u32)> = names(n).collect();
            let shared = these.iter().any(|m| taken.contains(m));
            taken.extend(these.iter().copied());
            // A bind of its device node (a raw block volume's stage or
            // publish, of another berth or of anything else) shows the
            // filesystem holding the node, not the disk's numbers; a raw
            // user need not open it exclusively.
            let bound = || {
                let dev = super::Dev {
                    path: d.dev.path.clone(),
                    major: d.dev.major,
                    minor: d.dev.minor,
                };
                !Self::users(&t, &dev).is_empty()
            };
            if shared
                || claimed_paths.contains(&d.dev.path)
                || these.iter().any(|m| mounted.contains(m))
                || bound()
                // A detached loop device, a drive without its medium.
                || d.dev.size_bytes == 0
            {
                continue;
            }
            if let Some(l) = loops.get(&n) {
                match self.os.loops.backing_id(&l.device) {
                    Ok((dev, ino)) => match own.holds(l, FileId { dev, ino }) {
                        Ok(false) => {
                            if !files.insert((dev, ino)) {
                                tracing::debug!(disk = %d.listed.display(), file = %l.backing_file.display(), "pool disk's file is another pool disk's, or a volume's disk's, too; not offered");
                                continue;
                            }
                        }
                        Ok(true) => continue,
                        Err(why) => {
                            // A doubt is Berth's: never handed to a tenant.
                            tracing::warn!(disk = %d.listed.display(), "pool disk may be a loop device of Berth's own file ({why}); not offered");
                            continue;
                        }
                    },
                    Err(e) => {
                        tracing::debug!(disk = %d.listed.display(), error = %e, "which file backs the pool's loop device cannot be told; not offered");
                        continue;
                    }
                }
            } else if d.dev.major == LOOP_MAJOR {
                // A loop device bound to no file.
                continue;
            } else if self.os.devices.stable_link(&d.dev).is_none() {
                // Its kernel name, number and size are all its record could
                // find it by again (`identify_disk`): another disk of its
                // size that gets its name (a swap, drives probed in another
                // order at a reboot) would pass for it, be handed to its
                // tenant and erased at its delete.
                if lock(&self.unnamed_warned).insert(d.listed.clone()) {
                    tracing::warn!(disk = %d.listed.display(), device = %d.dev.path.display(), "{}", no_stable_name(&d.listed));
                } else {
                    tracing::debug!(disk = %d.listed.display(), "pool disk has no /dev/disk/by-id link; not offered");
                }
                continue;
            }
            match self.os.devices.held(&d.dev.path) {
                Ok(false) => {}
                Ok(true) => {
                    tracing::debug!(disk = %d.listed.display(), "pool disk is held open exclusively by another process; not offered");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(disk = %d.listed.display(), error = %crate::error::chain(&e), "pool disk cannot be opened exclusively; not offered");
                    continue;
                }
            }
            // A disk the kernel holds read-only (write-protected, or set
            // so by `blockdev --setro`) can neither be used read-write nor
            // erased at its delete (BLKZEROOUT fails with EPERM).
            match self.os.devices.read_only(&d.dev.path) {
                Ok(false) => {}
                Ok(true) => {
                    tracing::debug!(disk = %d.listed.display(), "pool disk is read-only (BLKROGET); not offered");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(disk = %d.listed.display(), error = %crate::error::chain(&e), "whether the pool disk is read-only cannot be told; not offered");
                    continue;
                }
            }
            if self.os.devices.read_head(&d.dev.path).is_err() {
                tracing::warn!(disk = %d.listed.display(), "pool disk cannot be read; not offered");
                continue;
            }
            match blkid::probe(self.os.cmd.as_ref(), &d.dev.path) {
                Ok(Probe::Blank) => {}
                Ok(p) => {
                    tracing::debug!(disk = %d.listed.display(), found = %p.describe(), "pool disk has a signature; not offered");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(disk = %d.listed.display(), error = %e, "pool disk could not be probed; not offered");
                    continue;
                }
            }
            match self.os.devices.reads_zero(&d.dev.path, d.dev.size_bytes) {
                Ok(true) => {
                    lock(&self.data_warned).remove(&d.listed);
                    free.push(d);
                }
                Ok(false) => {
                    if lock(&self.data_warned).insert(d.listed.clone()) {
                        tracing::warn!(disk = %d.listed.display(), device = %d.dev.path.display(), "{}", holds_data(&d.listed));
                    } else {
                        tracing::debug!(disk = %d.listed.display(), "pool disk holds data; not offered");
                    }
                }
                Err(e) => {
                    tracing::warn!(disk = %d.listed.display(), error = %crate::error::chain(&e), "pool disk's sample could not be read; not offered");
                }
            }
        }
        free.sort_by_key(|d| (d.dev.size_bytes, d.listed.clone()));
        Ok(free)
    }

    /// The size of the disk a new volume of at least `wanted` and at most
    /// `limit` bytes (0: no limit) gets: the smallest free disk that fits. When none fits
    /// the answer is RESOURCE_EXHAUSTED (another node may have one: the
    /// external-provisioner then lets the scheduler pick again).
    pub(super) fn disk_size_for(&self, wanted: i64, limit: i64) -> Result<i64> {
        let fits = |size: u64| {
            let s = i64::try_from(size).unwrap_or(i64::MAX);
            s >= wanted && (limit == 0 || s <= limit)
        };
        if let Some(d) = self
            .free_disks()?
            .into_iter()
            .find(|d| fits(d.dev.size_bytes))
        {
            return Ok(i64::try_from(d.dev.size_bytes).unwrap_or(i64::MAX));
        }
        let range = match (wanted > 1, limit > 0) {
            (true, true) => format!("of {wanted} to {limit} bytes"),
            (false, true) => format!("of at most {limit} bytes"),
            (true, false) => format!("of {wanted} bytes or more"),
            (false, false) => "of any size".to_string(),
        };
        Err(Error::NoSpace(if self.disk_pool.is_empty() {
            "this node offers no disks (no --disk-pool)".to_string()
        } else if self.pool_disks().iter().any(|d| fits(d.dev.size_bytes)) {
            format!("no free disk {range} on this node: every fitting disk is in use, held by another process, read-only, without a /dev/disk/by-id link, or not blank (a signature, or data where a blank disk reads as zeros)")
        } else {
            format!("this node's disk pool has no disk {range}")
        }))
    }

    /// Claims a free disk of exactly `size` bytes: the first of that size
    /// that berth can claim exclusively (`BlockDevices::claim`), with the
    /// claim, which the caller keeps while nothing of its own mounts the
    /// disk. Chosen and claimed in one step: a second berth given the same
    /// pool that chose the same disk finds it held (EBUSY), at its own
    /// choosing or its own free check, and neither hands it out twice.
    pub(super) fn claim_disk(&self, size: i64) -> Result<(DiskRef, crate::os::DeviceClaim)> {
        let fitting = self
            .free_disks()?
            .into_iter()
            .filter(|d| i64::try_from(d.dev.size_bytes).ok() == Some(size));
        for d in fitting {
            let held = match self.os.devices.claim(&d.dev.path, d.dev.size_bytes) {
                Ok(held) => held,
                Err(e) => {
                    // Held since the free check (another berth chose it),
                    // or it stopped answering: not free either way.
                    tracing::warn!(disk = %d.listed.display(), error = %crate::error::chain(&e), "the free disk chosen could not be claimed exclusively; not handed out");
                    continue;
                }
            };
            let by_id = self
                .os
                .devices
                .stable_link(&d.dev)
                .filter(|l| l != &d.listed);
            // A loop device has no by-id link: the file backing it is what
            // tells it from another file attached at its number later.
            let (loop_backing, loop_range) = match loop_of(&self.os, &d.dev) {
                LoopOf::NotLoop => (None, None),
                LoopOf::Bound(_, backing, range) => (Some(backing), Some(range)),
                LoopOf::Detached(why) | LoopOf::Unknown(why) => {
                    return Err(Error::Busy(format!(
                        "the free disk {} chosen for this volume changed: {why}; retry",
                        d.listed.display()
                    )))
                }
            };
            let disk = DiskRef {
                path: d.listed,
                device: d.dev.path,
                by_id,
                major: d.dev.major,
                minor: d.dev.minor,
                size_bytes: d.dev.size_bytes,
                loop_backing: loop_backing.map(Kept::from),
                loop_range: loop_range.map(Kept::from),
                extra: None,
            };
            return Ok((disk, held));
        }
        // A concurrent create took it; a retry chooses again.
        Err(Error::Busy(format!(
            "the free disk of {size} bytes chosen for this volume was taken by a concurrent create; retry"
        )))
    }

    /// Drops berth's claim of the disk of record `id` (`keep_claim`), if
    /// it holds one: before anything of its own opens the disk
    /// exclusively (mkfs, fsck, a mount, the erase, a restore's copy).
    pub(super) fn release_claim(&self, id: &str) {
        if lock(&self.disk_claims).remove(id).is_some() {
            tracing::debug!(volume_id = %id, "claim of the disk released");
        }
    }

    /// Claims the disk `d` of record `id` exclusively (O_EXCL, kept open
    /// until `release_claim`), unless it is claimed already or something
    /// mounts or binds it (a stage of its own: a filesystem mount holds it
    /// exclusively itself, and a raw user may open it so). Another berth
    /// given the same pool then finds the disk held, never free, while no
    /// mount shows it (a volume created and not staged, or unstaged). A
    /// claim that cannot be taken (the disk is missing, or something else
    /// holds it) fails nothing: it is logged.
    pub(super) fn keep_claim(&self, id: &str, d: &DiskRef) {
        if lock(&self.disk_claims).contains_key(id) {
            return;
        }
        let dev = match self.resolve_disk(d) {
            Ok(dev) => dev,
            Err(e) => {
                tracing::warn!(volume_id = %id, disk = %d.path.display(), error = %e.render(), "the disk cannot be claimed: it is not found as recorded; another berth given the same pool may take it for blank");
                return;
            }
        };
        let shown = super::Dev {
            path: dev.path.clone(),
            major: dev.major,
            minor: dev.minor,
        };
        match mounts::table(&self.os) {
            Ok(t) if !Self::users(&t, &shown).is_empty() => return,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(volume_id = %id, disk = %d.path.display(), error = %e.render(), "the disk is not claimed: the mount table cannot be read");
                return;
            }
        }
        match self.os.devices.claim(&dev.path, dev.size_bytes) {
            Ok(held) => {
                lock(&self.disk_claims).insert(id.to_string(), held);
                tracing::debug!(volume_id = %id, disk = %dev.path.display(), "disk claimed exclusively");
            }
            Err(e) => {
                tracing::warn!(volume_id = %id, disk = %dev.path.display(), error = %crate::error::chain(&e), "the disk cannot be claimed exclusively (another process holds it?); another berth given the same pool may take it for blank once nothing holds it");
            }
        }
    }

    /// Start-up: the disk of every Ready record of berth's (a volume's, a
    /// hold's) is claimed (`keep_claim`) unless something mounts or binds
    /// it. Not a record still Creating or Deleting: start-up rolls back or
    /// deletes it, in the background, and a claim taken beside that would
    /// make its erase fail (EBUSY).
    pub(super) fn claim_recorded_disks(&self) {
        for rec in self.store.filter(|r| {
            r.phase == crate::state::Phase::Ready
                && r.block.as_ref().is_some_and(|b| b.disk.is_some())
        }) {
            if let Some(d) = rec.block.as_ref().and_then(|b| b.disk.as_ref()) {
                self.keep_claim(&rec.id, d);
            }
        }
    }

    /// Berth's own files (`OwnFiles`).
    pub(super) fn own_files(&self) -> OwnFiles<'_> {
        OwnFiles::new(self.os.files.as_ref(), &self.root, &self.own_dirs)
    }

    /// The device of a recorded disk, if it is still the same disk
    /// (`identify_disk`). NOT_FOUND when it is gone, FAILED_PRECONDITION
    /// when another device is there now.
    pub(super) fn resolve_disk(&self, d: &DiskRef) -> Result<DeviceInfo> {
        identify_disk(&self.os, &self.own_files(), d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        let m = |p: &str, s: &str| wildmatch(p.as_bytes(), s.as_bytes());
        assert!(m("nvme-*", "nvme-Samsung_123"));
        assert!(!m("nvme-*", "ata-x"));
        assert!(m("loop?", "loop7"));
        assert!(!m("loop?", "loop12"));
        assert!(m("sd[b-d]", "sdc"));
        assert!(!m("sd[b-d]", "sda"));
        assert!(m("sd[!a]", "sdb"));
        assert!(!m("sd[!a]", "sda"));
        assert!(m("*", ""));
        assert!(m("a*b*c", "aXXbYYc"));
        assert!(!m("a*b*c", "aXXbYY"));
        assert!(m("[", "["));
        assert!(m("x[]]", "x]"));
    }

    #[test]
    fn expands_globs_and_directories() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("disks");
        std::fs::create_dir(&d).unwrap();
        for n in ["d2", "d1", ".hidden", "other"] {
            std::fs::write(d.join(n), b"").unwrap();
        }
        let base = d.display().to_string();
        assert_eq!(
            expand(&crate::os::RealFiles, &[format!("{base}/d*")]),
            vec![d.join("d1"), d.join("d2")]
        );
        assert_eq!(
            expand(&crate::os::RealFiles, std::slice::from_ref(&base)),
            vec![
                d.join(".hidden"),
                d.join("d1"),
                d.join("d2"),
                d.join("other")
            ]
        );
        assert_eq!(
            expand(
                &crate::os::RealFiles,
                &[format!("{base}/other"), " ".into(), "relative/x".into()]
            ),
            vec![d.join("other")]
        );
        assert!(expand(&crate::os::RealFiles, &[format!("{base}/nothing*")]).is_empty());
    }

    /// `--disk-pool` is read through the OS layer, and what cannot be read
    /// names nothing of what it holds: a directory that cannot be listed
    /// (its disks not listed, the others still), a pattern's directory
    /// that cannot be listed, a match that cannot be looked at. An entry
    /// that cannot be looked at is taken as a device's path, as a missing
    /// one is (`inspect` then decides). Guard: the same answers as the
    /// std calls gave on such errors before, now each with a warning.
    #[test]
    fn a_pool_that_cannot_be_read_names_nothing_of_what_it_holds() {
        let t = tempfile::tempdir().unwrap();
        let (dir, other) = (t.path().join("disks"), t.path().join("more"));
        for (d, names) in [(&dir, ["d1", "d2"]), (&other, ["m1", "m2"])] {
            std::fs::create_dir(d).unwrap();
            for n in names {
                std::fs::write(d.join(n), b"").unwrap();
            }
        }
        let (os, fake) = crate::os::Os::fake();
        let files = os.files.as_ref();
        let both = [dir.display().to_string(), format!("{}/m*", other.display())];
        let all = vec![
            dir.join("d1"),
            dir.join("d2"),
            other.join("m1"),
            other.join("m2"),
        ];
        assert_eq!(expand(files, &both), all);
        // A directory that cannot be listed: its disks are not listed.
        fake.fail_op_under("read_dir", &dir, libc::EIO);
        assert_eq!(expand(files, &both), all[2..]);
        fake.clear_file_faults();
        // A pattern's directory that cannot be listed: nothing matches.
        fake.fail_op_under("read_dir", &other, libc::EACCES);
        assert_eq!(expand(files, &both), all[..2]);
        fake.clear_file_faults();
        // A match that cannot be looked at: not listed.
        fake.fail_op_under("lstat", &other.join("m1"), libc::EIO);
        assert_eq!(expand(files, &both), [&all[..2], &all[3..]].concat());
        fake.clear_file_faults();
        // An entry that cannot be looked at: a device's path, not listed
        // as a directory.
        fake.fail_next("stat", libc::EIO);
        assert_eq!(
            expand(files, &both),
            [&[dir.clone()][..], &all[2..]].concat()
        );
        assert_eq!(expand(files, &both), all);
    }

    proptest::proptest! {
        #[test]
        fn literal_patterns_match_themselves(s in "[a-z0-9_.-]{0,12}") {
            proptest::prop_assert!(wildmatch(s.as_bytes(), s.as_bytes()));
            proptest::prop_assert!(wildmatch(b"*", s.as_bytes()));
        }

        #[test]
        fn never_panics(p in "[a-c*?\\[\\]!^-]{0,10}", s in "[a-c\\[\\]-]{0,10}") {
            let _ = wildmatch(p.as_bytes(), s.as_bytes());
        }
    }
}
