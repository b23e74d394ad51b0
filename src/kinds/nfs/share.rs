//! Controller side of NFS volumes: the share mounted at a private working
//! directory, and the volume's subdirectory made, archived or removed in it
//! without ever following a symlink (every step is an `*at` call on a
//! directory opened with O_NOFOLLOW).
//!
//! Ownership lives on the share, so it holds when the controller lost its
//! records: every volume directory holds a marker file, `.berth-volume`
//! (JSON: volume id, volume name, creation time, what it was filled from),
//! written before the directory gets its name (it is made as
//! `.berth-new-<hash>`, marked, then renamed into place). CreateVolume
//! adopts an existing directory only if its marker names the same id and
//! name and the same content source (a retry), refuses any other
//! (ALREADY_EXISTS), and refuses to make a volume inside a marked directory.
//! DeleteVolume deletes or archives only a directory whose marker names the
//! id, and refuses while another volume's marker lies inside it; with
//! onDelete=retain it marks the marker released, and no create adopts a
//! released directory (a deleted volume's data is never handed out again). Archives
//! go to `.berth-archive/` at the share root; no subdirectory of a volume
//! may start with `.berth`, so no volume name reaches them.
use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{open, openat, AtFlags, OFlag};
use nix::sys::stat::{fstatat, Mode};
use serde::{Deserialize, Serialize};

use super::id::{OnDelete, VolumeId};
use super::params::fnv64;
use super::{is_mount_of, is_nfs, same_server, split_source, NfsKind, Probe};
use crate::error::{Error, Result};
use crate::node::mounts;
use crate::os::files::{not_regular, Files, Open};
use crate::os::mountinfo::MountEntry;
use crate::os::{nfsmount, OsError};
use crate::state::ContentSource;

/// The marker file in every volume directory Berth makes.
pub const MARKER: &str = ".berth-volume";
/// Where archived volumes go, at the share root.
pub const ARCHIVE: &str = ".berth-archive";
/// Prefix of a volume directory being made (marked, not yet renamed).
pub(super) const NEW: &str = ".berth-new-";
/// A marker larger than this is not Berth's.
const MAX_MARKER: u64 = 4096;
/// The share's own marker, at its root: written by the first CreateVolume
/// on the share (or when Berth finds its layout there), so that an empty
/// directory the server exports in place of the share (its filesystem not
/// mounted on the server) is never taken for the share.
pub const SHARE_MARKER: &str = ".berth-share";

/// What the share's marker says (informational; its presence is what
/// counts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareMarker {
    pub share: String,
    pub marked_unix: u64,
}

/// Whether the share's root looks like the share Berth uses
/// (`share_looks`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShareLooks {
    /// It holds the share's marker.
    Marked,
    /// No marker (a share Berth used before it wrote one), but Berth's
    /// layout: an area of Berth's (`.berth-*`) at the root, or a volume
    /// marker in a directory at most three levels down.
    Layout,
    /// Nothing of Berth's: a share never used, or a stand-in (an empty
    /// directory exported where the share's filesystem failed to mount).
    Unknown,
}

/// How many directories `share_looks` opens at most looking for a volume
/// marker.
const LAYOUT_LOOK: usize = 256;

/// How the share at `root` looks (`ShareLooks`). Never follows a symlink.
/// Its directories are listed through `files`.
pub fn share_looks(files: &dyn Files, root: &Path) -> Result<ShareLooks> {
    let rootfd = open_root(root)?;
    let what = || "reading the share's root".to_string();
    if share_marked(&rootfd).map_err(|e| sys_err(what(), e))? {
        return Ok(ShareLooks::Marked);
    }
    let mut queue = std::collections::VecDeque::from([(
        open_dir(&rootfd, ".").map_err(|e| sys_err(what(), e))?,
        0,
    )]);
    let mut opened = 0;
    while let Some((dir, depth)) = queue.pop_front() {
        let entries = files
            .read_dir(&fd_path(&dir, ""))
            .map_err(|e| Error::io(what(), e.into_io()))?;
        for e in entries {
            let e = e.map_err(|e| Error::io(what(), e))?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if depth == 0 && name.starts_with(".berth-") && name != SHARE_MARKER {
                return Ok(ShareLooks::Layout);
            }
            if depth > 0 && name == MARKER {
                if read_marker(files, &dir).ok().flatten().is_some() {
                    return Ok(ShareLooks::Layout);
                }
                continue;
            }
            if depth < 3 && opened < LAYOUT_LOOK && e.file_type().is_ok_and(|t| t.is_dir()) {
                if let Ok(sub) = open_dir(&dir, name) {
                    opened += 1;
                    queue.push_back((sub, depth + 1));
                }
            }
        }
    }
    Ok(ShareLooks::Unknown)
}

/// Whether the share's root (open as `root`) holds the share's marker: a
/// regular file named `SHARE_MARKER` of at most `MAX_MARKER` bytes, not
/// through a symlink. What it holds is not read: its presence is what
/// counts (`ShareMarker`), so the empty file an operator makes by hand to
/// mark a share an older Berth used (see `NfsKind::confirm_absent`)
/// marks it as well as the one Berth writes. Before 2026-12-07 only a
/// file holding Berth's JSON counted, and the empty file the message and
/// the README asked for left every such delete refused.
fn share_marked(root: &OwnedFd) -> nix::Result<bool> {
    match fstatat(root, SHARE_MARKER, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(st.st_mode & libc::S_IFMT == libc::S_IFREG
            && u64::try_from(st.st_size).is_ok_and(|n| n <= MAX_MARKER)),
        Err(Errno::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Writes the share's marker at `root` (nothing if it is there already).
/// A share whose root is a volume's directory (a StorageClass naming
/// another volume's directory as its share) is never marked: it is that
/// volume's, and no volume is made inside it (`create_subdir`).
pub fn mark_share(files: &dyn Files, root: &Path, marker: &ShareMarker) -> Result<()> {
    let rootfd = open_root(root)?;
    if read_marker(files, &rootfd)
        .map_err(|e| sys_err("reading the marker of the share root".into(), e))?
        .is_some()
    {
        return Ok(());
    }
    match write_json(files, &rootfd, SHARE_MARKER, marker) {
        Err(e) if e.errno() != Some(libc::EEXIST) => {
            Err(Error::os("writing the share's marker", e))
        }
        _ => Ok(()),
    }
}

/// What a removal found (`remove_subdir`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// The directory (or something at its place) was there, and was dealt
    /// with.
    There,
    /// Nothing at the directory's place (or a parent missing): the volume
    /// is gone, if the share is really the share (the caller checks).
    Absent,
}

/// What a marker says: the volume that owns the directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    pub id: String,
    pub name: String,
    pub created_unix: u64,
    /// When DeleteVolume with onDelete=retain released the directory: the
    /// volume is deleted and its data kept, and no volume adopts it, the
    /// same name and id included (a deleted volume's data is never handed
    /// to a new volume). Absent in markers of live volumes, and in every
    /// marker older versions wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released_unix: Option<u64>,
    /// What the create filled the directory from (its content source): a
    /// create of the same id and name adopts the directory only if it asks
    /// for the same (a retry). Absent in markers older versions wrote:
    /// unknown, any request of that id and name adopts it, as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filled: Option<Filled>,
}

/// What a volume directory was filled from when it was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Filled {
    /// Nothing: a CreateVolume without a content source.
    Empty,
    /// A restore of the snapshot.
    Snapshot(String),
    /// A clone of the volume.
    Volume(String),
}

impl Filled {
    pub fn of(source: Option<&ContentSource>) -> Filled {
        match source {
            None => Filled::Empty,
            Some(ContentSource::Snapshot(id)) => Filled::Snapshot(id.clone()),
            Some(ContentSource::Volume(id)) => Filled::Volume(id.clone()),
        }
    }

    fn describe(&self) -> String {
        match self {
            Filled::Empty => "made empty".into(),
            Filled::Snapshot(id) => format!("restored from snapshot {id}"),
            Filled::Volume(id) => format!("cloned from volume {id}"),
        }
    }
}

/// Whether two markers' `filled` can be the same (absent: unknown).
fn same_filling(a: &Option<Filled>, b: &Option<Filled>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    }
}

impl Marker {
    /// Whether `found` (on a directory) was written by the create this
    /// marker describes: the same id, name and creation time. A directory
    /// a create found in place (another volume's of the same id, or one
    /// an earlier create of the same name made, which may have been handed
    /// out) is not that create's to roll back.
    pub fn made_by_same_create(&self, found: &Marker) -> bool {
        found.id == self.id
            && found.name == self.name
            && found.created_unix == self.created_unix
            && same_filling(&found.filled, &self.filled)
    }
}

/// The marker's temporary name while a released marker replaces it.
const MARKER_NEW: &str = ".berth-volume.new";

/// What DeleteVolume (or a rollback) does with a subdirectory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal<'a> {
    /// Undo a CreateVolume that did not finish: remove the directory only if
    /// it holds nothing but its marker and, given the marker that create
    /// writes, only if it is that create's (`Marker::made_by_same_create`),
    /// never one it found in place.
    Rollback(Option<&'a Marker>),
    /// Apply the volume's onDelete.
    Apply(OnDelete),
}

pub(super) fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

pub(super) fn sys_err(what: String, e: Errno) -> Error {
    Error::io(what, std::io::Error::from_raw_os_error(e as i32))
}

pub(super) fn open_root(root: &Path) -> Result<OwnedFd> {
    open(root, dir_flags(), Mode::empty())
        .map_err(|e| sys_err(format!("opening the share at {}", root.display()), e))
}

/// Opens `name` in `dir` as a directory, never through a symlink.
pub(super) fn open_dir(dir: impl AsFd, name: &str) -> nix::Result<OwnedFd> {
    openat(dir, name, dir_flags(), Mode::empty())
}

/// `name` inside the directory open as `dir`, as a path: the directory is
/// pinned by its descriptor (`/proc/self/fd/N`), so a changed or symlinked
/// parent cannot redirect the call, and the calls made with it (`Files`:
/// mkdir, rename, unlink, rmdir, remove_tree, open with O_NOFOLLOW) never
/// follow a symlink at `name`. An empty `name` is the directory itself.
pub(super) fn fd_path(dir: &impl AsRawFd, name: &str) -> PathBuf {
    let d = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    if name.is_empty() {
        d
    } else {
        d.join(name)
    }
}

pub(super) fn os_err(what: String) -> impl FnOnce(OsError) -> Error {
    move |e| Error::os(what, e)
}

pub(super) fn gone(e: &OsError) -> bool {
    e.errno() == Some(libc::ENOENT)
}

pub(super) fn not_a_dir(rel: &str) -> Error {
    Error::WrongState(format!(
        "{rel} on the share is not a directory (or is a symlink); refusing to use it"
    ))
}

/// The marker in the directory `dir`: None when there is none, or what is
/// there is not a regular file of Berth's format.
fn read_marker(files: &dyn Files, dir: impl AsFd) -> nix::Result<Option<Marker>> {
    read_json(files, dir, MARKER)
}

/// The JSON file `name` in the directory `dir` (Berth's markers): None when
/// there is none, or what is there is not a regular file of at most 4 KiB
/// holding a `T`. Never follows a symlink, never blocks on a FIFO
/// (`Files::read_regular`). Read through `files`, the OS layer: on a
/// working mount of a share this is the read a server that stopped
/// answering holds, which a test can hold the same way (the fake's
/// `hold_op_under("read", ..)`).
pub(super) fn read_json<T: serde::de::DeserializeOwned>(
    files: &dyn Files,
    dir: impl AsFd,
    name: &str,
) -> nix::Result<Option<T>> {
    let path = fd_path(&dir.as_fd(), name);
    let text = match files.read_regular(&path, Some(MAX_MARKER + 1)) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if not_regular(&e).is_some() => return Ok(None),
        Err(e) => match e.raw_os_error() {
            Some(libc::ELOOP) | Some(libc::ENXIO) => return Ok(None),
            n => return Err(Errno::from_raw(n.unwrap_or(libc::EIO))),
        },
    };
    if text.len() as u64 > MAX_MARKER {
        return Ok(None);
    }
    Ok(serde_json::from_slice(&text).ok())
}

/// Writes the marker into the (new, empty) directory `dir`, durably.
fn write_marker(files: &dyn Files, dir: &OwnedFd, m: &Marker) -> std::result::Result<(), OsError> {
    write_json(files, dir, MARKER, m)
}

/// Writes `value` as the new JSON file `name` in the directory `dir`,
/// durably.
pub(super) fn write_json<T: Serialize>(
    files: &dyn Files,
    dir: &OwnedFd,
    name: &str,
    value: &T,
) -> std::result::Result<(), OsError> {
    let path = fd_path(dir, name);
    let mut text = serde_json::to_vec(value).map_err(|e| OsError::sys("encode", &path, e))?;
    text.push(b'\n');
    let f = files.open(&path, Open::CreateNew)?;
    files.write_at(&f, &path, &text, 0)?;
    files.sync(&f, &path)
}

/// The name a volume directory has while it is being made.
fn new_name(id: &str) -> String {
    format!("{NEW}{:016x}", fnv64(id.as_bytes()))
}

/// Removes the entry `name` of the directory `dir` (a tree without
/// following symlinks, or a file or link). Missing is fine.
pub(super) fn remove_entry(files: &dyn Files, dir: &OwnedFd, name: &OsStr) -> Result<()> {
    let shown = name.to_string_lossy();
    let st = match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(s) => s,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(sys_err(format!("inspecting {shown} on the share"), e)),
    };
    let path = fd_path(dir, "").join(name);
    let r = if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
        files.remove_tree(&path)
    } else {
        files.remove_file(&path)
    };
    match r {
        Err(e) if !gone(&e) => Err(Error::os(format!("removing {shown} on the share"), e)),
        _ => Ok(()),
    }
}

/// Opens the parents of `subdir` below the open share root, one component
/// at a time. None when one is missing or not a plain directory (nothing of
/// the volume's can be there). Every parent is checked for a marker when
/// `refuse_inside` is set: a volume cannot be made inside another.
pub(super) fn open_parent<'a>(
    files: &dyn Files,
    root: &OwnedFd,
    subdir: &'a str,
    create: bool,
) -> Result<Option<(OwnedFd, &'a str)>> {
    let comps: Vec<&str> = subdir.split('/').collect();
    let Some((leaf, parents)) = comps.split_last() else {
        return Ok(None);
    };
    let mut fd = open_dir(root, ".").map_err(|e| sys_err("opening the share".into(), e))?;
    let mut rel = String::new();
    for c in parents {
        if !rel.is_empty() {
            rel.push('/');
        }
        rel.push_str(c);
        if create {
            match files.create_dir(&fd_path(&fd, c), 0o777) {
                Err(e) if e.errno() != Some(libc::EEXIST) => {
                    return Err(Error::os(format!("creating {rel} on the share"), e))
                }
                _ => {}
            }
        }
        fd = match open_dir(&fd, c) {
            Ok(f) => f,
            Err(Errno::ENOENT) if !create => return Ok(None),
            Err(Errno::ELOOP) | Err(Errno::ENOTDIR) if create => return Err(not_a_dir(&rel)),
            Err(Errno::ELOOP) | Err(Errno::ENOTDIR) => {
                tracing::warn!(subdir, parent = %rel, "a parent of the volume directory is not a plain directory; nothing of the volume's is there");
                return Ok(None);
            }
            Err(e) => return Err(sys_err(format!("opening {rel} on the share"), e)),
        };
        if create {
            if let Some(m) = read_marker(files, &fd)
                .map_err(|e| sys_err(format!("reading the marker of {rel} on the share"), e))?
            {
                return Err(Error::Conflict(format!(
                    "{rel} on the share is volume {} (named {}): a volume cannot be made inside another",
                    m.id, m.name
                )));
            }
        }
    }
    Ok(Some((fd, leaf)))
}

/// What fills a new volume directory (given as a path) before it is named.
pub type Fill<'a> = &'a dyn Fn(&Path) -> Result<()>;

/// Creates `subdir` below `root` (parents one component at a time: existing
/// directories are fine, symlinks and files are not; none may be a volume),
/// marked as `marker`'s volume, and applies `mode` to it. A directory that
/// is there already is this volume's only if its marker names the same id
/// and name (a retry); anything else is ALREADY_EXISTS and is left as it is.
/// `fill` (a restore or a clone) fills the directory before it gets its
/// name (after the marker, before the mode), so the volume's directory
/// never exists half filled.
pub fn create_subdir(
    files: &dyn Files,
    root: &Path,
    subdir: &str,
    mode: Option<u32>,
    marker: &Marker,
    fill: Option<Fill<'_>>,
) -> Result<()> {
    let rootfd = open_root(root)?;
    if let Some(m) = read_marker(files, &rootfd)
        .map_err(|e| sys_err("reading the marker of the share root".into(), e))?
    {
        return Err(Error::Conflict(format!(
            "the share is itself volume {} (named {}): a volume cannot be made inside another",
            m.id, m.name
        )));
    }
    let Some((fd, leaf)) = open_parent(files, &rootfd, subdir, true)? else {
        return Err(Error::Internal(format!("no path for {subdir}")));
    };
    let chmod = |dir: &OwnedFd| match mode {
        Some(m) => files.set_mode(&fd_path(dir, ""), m).map_err(os_err(format!(
            "setting mode {m:o} of {subdir} on the share"
        ))),
        None => Ok(()),
    };
    let tmp = new_name(&marker.id);
    // A few rounds: someone may make or remove the name meanwhile.
    for _ in 0..4 {
        match open_dir(&fd, leaf) {
            Ok(dir) => {
                return match read_marker(files, &dir).map_err(|e| {
                    sys_err(format!("reading the marker of {subdir} on the share"), e)
                })? {
                    Some(m) if m.released_unix.is_some() => Err(Error::Conflict(format!(
                        "{subdir} on the share holds the data of deleted volume {} (named {}), kept by onDelete=retain: Berth never hands a deleted volume's data to a new volume; move or remove the directory, or use another subDir",
                        m.id, m.name
                    ))),
                    Some(m)
                        if m.id == marker.id
                            && m.name == marker.name
                            && !same_filling(&m.filled, &marker.filled) =>
                    {
                        Err(Error::Conflict(format!(
                            "{subdir} on the share is volume {} (named {}), {}, not {} as this request asks",
                            m.id,
                            m.name,
                            m.filled.as_ref().map_or(String::new(), Filled::describe),
                            marker.filled.as_ref().map_or(String::new(), Filled::describe),
                        )))
                    }
                    Some(m) if m.id == marker.id && m.name == marker.name => chmod(&dir),
                    Some(m) => Err(Error::Conflict(format!(
                        "{subdir} on the share belongs to volume {} (named {}), not to {}",
                        m.id, m.name, marker.name
                    ))),
                    None => Err(Error::Conflict(format!(
                        "{subdir} already exists on the share without Berth's marker ({MARKER}) for this volume: Berth does not adopt a directory it did not make"
                    ))),
                };
            }
            Err(Errno::ENOENT) => {}
            Err(Errno::ELOOP) | Err(Errno::ENOTDIR) => {
                return Err(Error::Conflict(format!(
                    "{subdir} already exists on the share and is not a directory Berth made"
                )))
            }
            Err(e) => return Err(sys_err(format!("opening {subdir} on the share"), e)),
        }
        // Made under a name no volume can have, marked, then given its
        // name: the volume's directory never exists without its marker.
        remove_entry(files, &fd, tmp.as_ref())?;
        files
            .create_dir(&fd_path(&fd, &tmp), 0o777)
            .map_err(os_err(format!("creating {subdir} on the share")))?;
        let dir = open_dir(&fd, &tmp).map_err(|e| sys_err(format!("opening {tmp}"), e))?;
        write_marker(files, &dir, marker).map_err(os_err(format!(
            "writing the marker of {subdir} on the share"
        )))?;
        if let Some(fill) = fill {
            if let Err(e) = fill(&fd_path(&dir, ".")) {
                drop(dir);
                if let Err(r) = remove_entry(files, &fd, tmp.as_ref()) {
                    tracing::warn!(subdir, error = %r.render(), "could not remove a half-filled volume directory; a retry or the rollback does");
                }
                return Err(e);
            }
        }
        chmod(&dir)?;
        match rename_new(files, &fd_path(&fd, &tmp), &fd_path(&fd, leaf)) {
            Ok(()) => return Ok(()),
            Err(e) if matches!(e.errno(), Some(libc::EEXIST) | Some(libc::ENOTEMPTY)) => continue,
            Err(e) => return Err(Error::os(format!("naming {subdir} on the share"), e)),
        }
    }
    remove_entry(files, &fd, tmp.as_ref())?;
    Err(Error::Busy(format!(
        "{subdir} on the share keeps changing while it is being made; retry"
    )))
}

/// The name an archived volume directory gets in `.berth-archive`: the
/// subdirectory (with `/` as `-`), the time and a hash of the id.
pub fn archive_name(id: &str, subdir: &str, unix: u64) -> String {
    let flat: String = subdir.replace('/', "-").chars().take(200).collect();
    format!("{flat}-{unix}-{:08x}", fnv64(id.as_bytes()) as u32)
}

/// Another volume's marker inside the directory `dir` (any depth, no
/// symlink followed): its path relative to `dir` and its id. The walk
/// goes depth first and holds, for each directory on the path it is on,
/// that directory's descriptor and its listing as it is read (one entry
/// at a time): what it holds at once is bounded by the depth it goes to,
/// never by how many entries a directory has. Before 2026-12-07 each
/// directory's listing was read whole and the paths of all its
/// subdirectories kept until each was looked into: a tenant's volume with
/// a million subdirectories side by side held a million paths in berth's
/// memory at once (unit test
/// `the_look_for_nested_volumes_holds_no_list_of_siblings`).
/// Each directory is opened from its parent's descriptor with O_NOFOLLOW
/// and read through its own descriptor: the tenant changes the tree while
/// it is walked, and a directory it swaps for a symlink after it was
/// listed is not followed (nothing behind it is the volume's). Before
/// 2026-12-07 each was read by its path, and a symlink swapped in for a
/// listed directory led the walk out of the volume, to wherever it
/// pointed on the controller's host (its root, other shares' working
/// mounts), the delete refused naming whatever marker was found there.
/// It goes no deeper than another volume's subdirectory can lie below
/// this one's: a volume id has at most `MAX_ID` bytes, its subdirectory
/// fewer, so a directory whose path below `dir` is longer holds no volume
/// (a marker there is a tenant's copy) and is not looked into (which also
/// bounds the walk's depth, so what it holds: at most one descriptor pair
/// and one listing buffer per level, a level per two bytes of that
/// length). Before 2026-12-07 the look went to the bottom of any tree: a
/// tenant's tree 50,000 levels deep was a DeleteVolume that never ended
/// (unit test `the_look_for_nested_volumes_stops_where_no_volume_can_be`).
fn nested_volume(
    files: &dyn Files,
    dir: &OwnedFd,
    own_id: &str,
) -> Result<Option<(PathBuf, String)>> {
    /// A directory on the walk's path: where it is below `dir`, its
    /// descriptor, and its listing, read as the walk goes.
    struct Level {
        rel: PathBuf,
        fd: OwnedFd,
        entries: std::fs::ReadDir,
    }
    // The listing of the directory open as `fd` (`rel` below `dir`); None
    // when it went since it was opened.
    let list = |rel: &Path, fd: &OwnedFd| -> Result<Option<std::fs::ReadDir>> {
        match files.read_dir(&fd_path(fd, "")).map_err(OsError::into_io) {
            Ok(e) => Ok(Some(e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(
                format!("reading {} on the share", rel.display()),
                e,
            )),
        }
    };
    let top = openat(dir, ".", dir_flags(), Mode::empty())
        .map_err(|e| sys_err("opening the volume's directory on the share".into(), e))?;
    let Some(entries) = list(Path::new(""), &top)? else {
        return Ok(None);
    };
    let mut levels = vec![Level {
        rel: PathBuf::new(),
        fd: top,
        entries,
    }];
    while let Some(level) = levels.last_mut() {
        let Some(e) = level.entries.next() else {
            levels.pop();
            continue;
        };
        let rel = &level.rel;
        let e = e.map_err(|e| Error::io(format!("reading {} on the share", rel.display()), e))?;
        let ft = e
            .file_type()
            .map_err(|e| Error::io(format!("inspecting {} on the share", rel.display()), e))?;
        if ft.is_dir() {
            let below = rel.join(e.file_name());
            if below.as_os_str().len() >= super::id::MAX_ID {
                continue;
            }
            let sub = match openat(
                &level.fd,
                e.file_name().as_os_str(),
                dir_flags(),
                Mode::empty(),
            ) {
                Ok(fd) => fd,
                // Removed, or replaced by a symlink or a file, since its
                // parent was listed: nothing of a volume's is reached
                // through it.
                Err(Errno::ENOENT) | Err(Errno::ELOOP) | Err(Errno::ENOTDIR) => continue,
                Err(e) => {
                    return Err(sys_err(
                        format!("opening {} on the share", below.display()),
                        e,
                    ))
                }
            };
            if let Some(entries) = list(&below, &sub)? {
                levels.push(Level {
                    rel: below,
                    fd: sub,
                    entries,
                });
            }
        } else if !rel.as_os_str().is_empty() && e.file_name() == MARKER && ft.is_file() {
            if let Some(m) = read_marker(files, &level.fd)
                .map_err(|e| sys_err(format!("reading {}", rel.display()), e))?
            {
                if m.id != own_id {
                    return Ok(Some((level.rel.clone(), m.id)));
                }
            }
        }
    }
    Ok(None)
}

/// Whether the directory of `id` (`subdir` below `root`) carries the
/// marker of `id`, not released (a volume deleted with onDelete=retain no
/// longer exists).
pub fn marked_as(files: &dyn Files, root: &Path, subdir: &str, id: &str) -> Result<bool> {
    let rootfd = open_root(root)?;
    let Some((fd, leaf)) = open_parent(files, &rootfd, subdir, false)? else {
        return Ok(false);
    };
    let dir = match open_dir(&fd, leaf) {
        Ok(d) => d,
        Err(Errno::ENOENT) | Err(Errno::ELOOP) | Err(Errno::ENOTDIR) => return Ok(false),
        Err(e) => return Err(sys_err(format!("opening {subdir} on the share"), e)),
    };
    Ok(read_marker(files, &dir)
        .map_err(|e| sys_err(format!("reading the marker of {subdir} on the share"), e))?
        .is_some_and(|m| m.id == id && m.released_unix.is_none()))
}

/// Removes, archives or keeps (marked released: `release`) the directory
/// of `id` (`subdir` below `root`), only if its marker names `id`; anything else there is not
/// Berth's and is left alone (success), except, when `resumed` (the
/// volume's own record says Deleting: Berth made this directory), an empty
/// directory without a marker: a delete cut short between the marker and
/// the directory leaves exactly that. Missing is success; nothing outside the directory is touched
/// and no symlink is followed. Another volume's marker inside it is
/// FAILED_PRECONDITION.
pub fn remove_subdir(
    files: &dyn Files,
    root: &Path,
    id: &str,
    subdir: &str,
    how: Removal<'_>,
    resumed: bool,
    unix: u64,
) -> Result<Seen> {
    let rootfd = open_root(root)?;
    let Some((fd, leaf)) = open_parent(files, &rootfd, subdir, false)? else {
        return Ok(Seen::Absent);
    };
    if matches!(how, Removal::Rollback(_)) {
        // A create interrupted before its directory got its name.
        remove_entry(files, &fd, new_name(id).as_ref())?;
    }
    let dir = match open_dir(&fd, leaf) {
        Ok(d) => d,
        Err(Errno::ENOENT) => return Ok(Seen::Absent),
        Err(Errno::ELOOP) | Err(Errno::ENOTDIR) => {
            tracing::warn!(volume_id = %id, subdir, "not a directory Berth made; left as it is");
            return Ok(Seen::There);
        }
        Err(e) => return Err(sys_err(format!("opening {subdir} on the share"), e)),
    };
    let marker = read_marker(files, &dir)
        .map_err(|e| sys_err(format!("reading the marker of {subdir} on the share"), e))?;
    let ours = match &marker {
        Some(m) if m.id == id && how == Removal::Apply(OnDelete::Retain) => {
            return release(files, &dir, subdir, m, unix).map(|()| Seen::There)
        }
        Some(m) if m.id == id && m.released_unix.is_some() => {
            tracing::warn!(volume_id = %id, subdir, "the directory was released by a retained delete; left as it is");
            return Ok(Seen::There);
        }
        Some(m) if m.id == id => m,
        Some(m) => {
            tracing::warn!(volume_id = %id, subdir, owner = %m.id, "the directory belongs to another volume; left as it is");
            return Ok(Seen::There);
        }
        None if resumed && how == Removal::Apply(OnDelete::Delete) => {
            return finish_unmarked(files, &fd, leaf, &dir, id, subdir).map(|()| Seen::There)
        }
        None => {
            tracing::warn!(volume_id = %id, subdir, "the directory has no Berth marker (Berth did not make it); left as it is");
            return Ok(Seen::There);
        }
    };
    if let Removal::Rollback(made) = how {
        if made.is_some_and(|made| !made.made_by_same_create(ours)) {
            tracing::warn!(volume_id = %id, subdir, owner = %ours.name, "the directory was not made by the create being rolled back (another volume's, or made before); left as it is");
            return Ok(Seen::There);
        }
        // Never handed out: it holds data only if someone wrote there.
        let empty = files
            .read_dir(&fd_path(&dir, ""))
            .map_err(|e| Error::io(format!("reading {subdir} on the share"), e.into_io()))?
            .all(|e| e.is_ok_and(|e| e.file_name() == MARKER));
        if !empty {
            tracing::warn!(
                subdir,
                "not removing a subdirectory that holds data while rolling back"
            );
            return Ok(Seen::There);
        }
        return remove_marked(files, &fd, leaf, &dir, subdir, MARKER, ours).map(|()| Seen::There);
    }
    if let Some((rel, other)) = nested_volume(files, &dir, id)? {
        return Err(Error::WrongState(format!(
            "{subdir}/{} on the share is volume {other}: delete that volume first",
            rel.display()
        )));
    }
    match how {
        Removal::Apply(OnDelete::Archive) => {
            match files.create_dir(&fd_path(&rootfd, ARCHIVE), 0o700) {
                Err(e) if e.errno() != Some(libc::EEXIST) => {
                    return Err(Error::os(format!("creating {ARCHIVE} on the share"), e))
                }
                _ => {}
            }
            let archive = open_dir(&rootfd, ARCHIVE).map_err(|e| match e {
                Errno::ELOOP | Errno::ENOTDIR => not_a_dir(ARCHIVE),
                e => sys_err(format!("opening {ARCHIVE} on the share"), e),
            })?;
            let base = archive_name(id, subdir, unix);
            let mut name = base.clone();
            let mut n = 0;
            while fstatat(&archive, name.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW).is_ok() {
                n += 1;
                name = format!("{base}-{n}");
            }
            rename_new(files, &fd_path(&fd, leaf), &fd_path(&archive, &name)).map_err(os_err(
                format!("archiving {subdir} as {ARCHIVE}/{name} on the share"),
            ))?;
            tracing::info!(volume_id = %id, subdir, archived = %format!("{ARCHIVE}/{name}"), "volume archived");
            Ok(Seen::There)
        }
        _ => remove_marked(files, &fd, leaf, &dir, subdir, MARKER, ours).map(|()| Seen::There),
    }
}

/// Marks the directory `dir` (of the volume `subdir`, whose marker `m`
/// names the volume being deleted) as released, durably: the new marker is
/// written and synced under a temporary name, renamed over the old one and
/// the directory synced, so a crash at any point leaves the old marker or
/// the released one, and the retried delete (its record still says
/// Deleting) finishes it. Already released: nothing to do.
fn release(files: &dyn Files, dir: &OwnedFd, subdir: &str, m: &Marker, unix: u64) -> Result<()> {
    if m.released_unix.is_some() {
        return Ok(());
    }
    let released = Marker {
        released_unix: Some(unix),
        ..m.clone()
    };
    let what = || format!("releasing {subdir} on the share (onDelete=retain)");
    remove_entry(files, dir, MARKER_NEW.as_ref())?;
    write_json(files, dir, MARKER_NEW, &released).map_err(os_err(what()))?;
    files
        .rename(&fd_path(dir, MARKER_NEW), &fd_path(dir, MARKER))
        .map_err(os_err(what()))?;
    files.sync_dir(&fd_path(dir, "")).map_err(os_err(what()))?;
    tracing::info!(volume_id = %m.id, subdir, "onDelete retain: subdirectory kept, its marker says released");
    Ok(())
}

/// Removes the marked directory `leaf` (open as `dir`) in `parent`: its
/// contents first, the marker last, so an interrupted delete leaves a
/// directory that is still recognisably the volume's; a directory that
/// then cannot be removed gets its marker (`content`, as read) back
/// (FAILED_PRECONDITION).
pub(super) fn remove_marked<T: Serialize>(
    files: &dyn Files,
    parent: &OwnedFd,
    leaf: &str,
    dir: &OwnedFd,
    subdir: &str,
    marker: &str,
    content: &T,
) -> Result<()> {
    let entries = files
        .read_dir(&fd_path(dir, ""))
        .map_err(|e| Error::io(format!("reading {subdir} on the share"), e.into_io()))?;
    for e in entries {
        let e = e.map_err(|e| Error::io(format!("reading {subdir} on the share"), e))?;
        if e.file_name() != marker {
            remove_entry(files, dir, &e.file_name())?;
        }
    }
    match files.remove_file(&fd_path(dir, marker)) {
        Err(e) if !gone(&e) => {
            return Err(Error::os(format!("removing the marker of {subdir}"), e))
        }
        _ => {}
    }
    let Err(left) = remove_emptied(files, parent, leaf, dir, RMDIR_WAIT) else {
        return Ok(());
    };
    // Without its marker the directory would no longer be recognisably the
    // volume's, and a retried delete would leave it on the share for good.
    if let Err(e) = write_json(files, dir, marker, content) {
        tracing::warn!(subdir, error = %e, "could not put the marker back; the directory is left without it");
    }
    Err(left.error(subdir, "its marker is back and "))
}

/// The directory of `id` (`leaf` in `parent`, open as `dir`) has no marker
/// while a delete of the volume is being resumed: removed if nothing is
/// in it (but silly-renamed `.nfs*` files, waited for), since a delete cut
/// short after removing the marker leaves exactly that; anything else
/// there is left alone (the rmdir fails on it and touches nothing).
fn finish_unmarked(
    files: &dyn Files,
    parent: &OwnedFd,
    leaf: &str,
    dir: &OwnedFd,
    id: &str,
    subdir: &str,
) -> Result<()> {
    match remove_emptied(files, parent, leaf, dir, RMDIR_WAIT) {
        Ok(()) => {
            tracing::info!(volume_id = %id, subdir, "finished a delete cut short after the marker was removed");
            Ok(())
        }
        Err(Left::Entries(names)) if !names.iter().all(|n| silly(n)) => {
            tracing::warn!(volume_id = %id, subdir, "the directory has no Berth marker and holds data; left as it is");
            Ok(())
        }
        Err(left) => Err(left.error(subdir, "")),
    }
}

/// How long DeleteVolume waits for a directory kept non-empty only by
/// silly-renamed files (`.nfsXXXX`: files unlinked on an NFS client that
/// still had them open; the client removes them when the last user closes).
const RMDIR_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Why an emptied directory could not be removed.
enum Left {
    /// It is still not empty: the names found in it.
    Entries(Vec<String>),
    Os(OsError),
}

impl Left {
    /// The error of a delete of `subdir` that stopped here; `then` says
    /// what was done about it before the retry.
    fn error(self, subdir: &str, then: &str) -> Error {
        match self {
            Left::Entries(names) => {
                let mut shown: Vec<&str> = names.iter().take(3).map(String::as_str).collect();
                if names.len() > 3 {
                    shown.push("...");
                }
                Error::WrongState(format!(
                    "{subdir} on the share is not empty after its contents were removed: {} ({}); \
                     files still open on an NFS client (.nfs*) or written during the delete; \
                     {then}DeleteVolume can be retried",
                    names.len(),
                    shown.join(", ")
                ))
            }
            Left::Os(e) => Error::os(format!("removing {subdir} on the share"), e),
        }
    }
}

/// A file an NFS client renamed instead of removing it because it was
/// still open there ("silly rename"); the client removes it on the last
/// close.
fn silly(name: &str) -> bool {
    name.starts_with(".nfs")
}

/// Removes the directory `leaf` of `parent` (open as `dir`), whose
/// contents were just removed. While what keeps it non-empty is only
/// silly-renamed files (`.nfs*`), it is retried for up to `wait`; anything
/// else there (data written meanwhile) is left and reported.
fn remove_emptied(
    files: &dyn Files,
    parent: &OwnedFd,
    leaf: &str,
    dir: &OwnedFd,
    wait: std::time::Duration,
) -> std::result::Result<(), Left> {
    let deadline = std::time::Instant::now() + wait;
    let mut pause = std::time::Duration::from_millis(20);
    loop {
        let e = match files.remove_dir(&fd_path(parent, leaf)) {
            Ok(()) => return Ok(()),
            Err(e) if gone(&e) => return Ok(()),
            Err(e) if matches!(e.errno(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST)) => e,
            Err(e) => return Err(Left::Os(e)),
        };
        let names: Vec<String> = match files.read_dir(&fd_path(dir, "")) {
            Ok(entries) => entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => return Err(Left::Os(e)),
        };
        let now = std::time::Instant::now();
        if !names.iter().all(|n| silly(n)) || now >= deadline {
            return Err(Left::Entries(names));
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(std::time::Duration::from_millis(400));
    }
}

/// Renames `from` to `to`, never replacing anything at `to` (EEXIST then).
/// NFS has no RENAME_NOREPLACE (EINVAL): there, `to` is looked at first and
/// a plain rename follows, which could only replace an empty directory
/// made in between.
pub(super) fn rename_new(
    files: &dyn Files,
    from: &Path,
    to: &Path,
) -> std::result::Result<(), OsError> {
    match files.rename_noreplace(from, to) {
        Err(e) if e.errno() == Some(libc::EINVAL) => {}
        r => return r,
    }
    match files.lstat(to).map_err(OsError::into_io) {
        Ok(_) => Err(OsError::sys(
            "rename",
            to,
            std::io::Error::from_raw_os_error(libc::EEXIST),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => files.rename(from, to),
        Err(e) => Err(OsError::sys("inspecting", to, e)),
    }
}

impl NfsKind {
    /// The working directory for one server, share and option set.
    fn work_dir(&self, vid: &VolumeId, opts: &[String]) -> PathBuf {
        let key = format!("{}\0{}\0{}", vid.server, vid.share, opts.join(","));
        self.work.join(format!("{:016x}", fnv64(key.as_bytes())))
    }

    /// The key of the share's lock (`share_lock`): server and share only,
    /// so every call that may mount at any working directory of the share
    /// takes the same lock. A name no working directory has (those hash
    /// an option set too).
    fn share_key(&self, vid: &VolumeId) -> PathBuf {
        let key = format!("{}\0{}", vid.server, vid.share);
        self.work
            .join(format!("share-{:016x}", fnv64(key.as_bytes())))
    }

    /// A working mount of the volume's share already there (for health
    /// checks, which never mount), at the directory of one of the option
    /// sets `sets` (see `share_mount`).
    pub(super) fn existing_share_mount(
        &self,
        vid: &VolumeId,
        sets: &[Vec<String>],
    ) -> Option<PathBuf> {
        let t = mounts::table(&self.os).ok()?;
        sets.iter().map(|o| self.work_dir(vid, o)).find(|mp| {
            mounts::at(&self.os, &t, mp)
                .last()
                .is_some_and(|top| self.working_mount(top, vid, mp).is_ok())
        })
    }

    /// Checks that `top`, the top mount at the working directory `mp` of
    /// the volume's share, is Berth's mount of that share: NFS, the server
    /// by `same_server` (INTERNAL otherwise: something else is mounted in
    /// Berth's private directory), and the share's path, or another path:
    /// the kernel shows a share whose path runs through a symlink on the
    /// server as the resolved path (`Shown::Resolved`). Such a share is
    /// refused for new volumes, while volumes made before Berth refused it
    /// still reach theirs through this mount: it is in Berth's private
    /// directory named by a hash of server, share and options, where only
    /// Berth mounts that source, and what is then touched is decided by
    /// the markers on the share.
    fn working_mount(&self, top: &MountEntry, vid: &VolumeId, mp: &Path) -> Result<Shown> {
        if is_mount_of(top, &vid.server, &vid.share) {
            return Ok(Shown::Share);
        }
        let holds = || {
            Error::Internal(format!(
                "{} holds {} ({}) instead of {}",
                mp.display(),
                top.source,
                top.fs_type,
                vid.share_source()
            ))
        };
        let Some((host, path)) = is_nfs(top).then(|| split_source(&top.source)).flatten() else {
            return Err(holds());
        };
        if !same_server(top, host, &vid.server) {
            return Err(holds());
        }
        Ok(Shown::Resolved(path.to_string()))
    }

    /// Mounts the volume's share (once per server, share and options; an
    /// existing healthy mount is reused, also after a restart) and returns
    /// where. `sets` are the option sets to try in order (see
    /// `controller_option_sets`): a healthy mount made with any of them is
    /// reused first; then each is mounted in turn until one works. A server
    /// that does not answer stops the search (every later set would wait
    /// out the same timeout).
    pub(super) fn share_mount(&self, vid: &VolumeId, sets: &[Vec<String>]) -> Result<PathBuf> {
        self.share_mount_for(vid, sets, Purpose::Existing)?
            .ok_or_else(|| Error::Internal(format!("no working mount of {}", vid.share_source())))
    }

    /// `share_mount` for a new volume (CreateVolume, a restore or clone):
    /// a share the server resolves to another path (a symlink on the
    /// server: mountinfo shows where it leads) is INVALID_ARGUMENT naming
    /// that path, and a working mount made for it is unmounted again.
    pub(super) fn new_volume_share(&self, vid: &VolumeId, sets: &[Vec<String>]) -> Result<PathBuf> {
        self.share_mount_for(vid, sets, Purpose::NewVolume)?
            .ok_or_else(|| Error::Internal(format!("no working mount of {}", vid.share_source())))
    }

    /// The rollback of a volume still being created: `undo` runs in the
    /// share's working mount. On a share the server resolves to another
    /// path no new volume is made, so a working mount made only for this
    /// is unmounted again once `undo` ran there (a volume half made on
    /// such a share before Berth refused them is still rolled back).
    pub(super) fn rollback_in_share(
        &self,
        vid: &VolumeId,
        sets: &[Vec<String>],
        undo: &dyn Fn(&Path) -> Result<()>,
    ) -> Result<()> {
        match self.share_mount_for(vid, sets, Purpose::Rollback(undo))? {
            Some(root) => undo(&root),
            None => Ok(()),
        }
    }

    fn share_mount_for(
        &self,
        vid: &VolumeId,
        sets: &[Vec<String>],
        purpose: Purpose<'_>,
    ) -> Result<Option<PathBuf>> {
        if sets.is_empty() {
            return Err(Error::Internal("no NFS mount options to try".into()));
        }
        // One lock per server and share, whatever the options: the sets
        // of two calls overlap (a record without a version tries
        // nfsvers=4.1, 4.0, 3; one with nfsvers=4.0 only that), and two
        // calls under different locks could both find the same working
        // directory unmounted and both mount there, stacked.
        let share = self.share_lock(&self.share_key(vid));
        let waiting_since = std::time::Instant::now();
        let mut held = share.lock.lock().unwrap_or_else(|e| e.into_inner());
        let source = vid.share_source();
        let t = mounts::table(&self.os)?;
        for opts in sets {
            let mp = self.work_dir(vid, opts);
            if let Some(top) = mounts::at(&self.os, &t, &mp).last() {
                let shown = self.working_mount(top, vid, &mp)?;
                if let (Shown::Resolved(path), Purpose::NewVolume) = (&shown, &purpose) {
                    return Err(resolved_share(vid, path));
                }
                match self.probe(&mp) {
                    Probe::Usage(_) => return Ok(Some(mp)),
                    Probe::Stale => {
                        tracing::warn!(share = %source, "working mount of the share is stale; mounting again");
                        self.unmount_target(&mp)?;
                    }
                    Probe::Hung => {
                        return Err(Error::Unavailable(format!(
                            "NFS server {} is not responding (share {})",
                            vid.server, vid.share
                        )))
                    }
                    Probe::Failed(e) => {
                        return Err(Error::os(format!("checking the mount of {source}"), e))
                    }
                }
            }
        }
        if !self.os.files.stat(&self.work).is_ok_and(|m| m.is_dir()) {
            let parent = self.work.parent().unwrap_or(Path::new("/"));
            crate::os::files::ensure_dir(self.os.files.as_ref(), parent, 0o700)
                .and_then(|_| {
                    crate::os::files::ensure_dir(self.os.files.as_ref(), &self.work, 0o700)
                })
                .and_then(|_| self.os.files.set_mode(&self.work, 0o700))
                .map_err(os_err(format!("creating {}", self.work.display())))?;
        }
        // A mount another call made while this one waited timed out: the
        // server did not answer; so is this call answered, at once.
        if held.timed_out.is_some_and(|t| t >= waiting_since) {
            return Err(Error::os(
                format!("mounting {source} (a mount of it by another call timed out while this one waited)"),
                OsError::Timeout {
                    program: nfsmount::MOUNT.to_string(),
                    secs: self.timeout.as_secs(),
                },
            ));
        }
        let mut first_error = None;
        for opts in sets {
            let mp = self.work_dir(vid, opts);
            match mounts::mount_on_dir(&self.os, &mp, || {
                nfsmount::mount(self.os.cmd.as_ref(), &source, &mp, opts, self.timeout).map_err(
                    |e| match nfsmount::refusal(&e) {
                        Some(why) => Error::Refused {
                            context: format!(
                                "mounting {source} with options {}: {}",
                                opts.join(","),
                                why.explain()
                            ),
                            source: e,
                        },
                        None => Error::os(format!("mounting {source}"), e),
                    },
                )
            }) {
                Ok(()) => {
                    tracing::info!(share = %source, at = %mp.display(), options = %opts.join(","), "mounted NFS share");
                    return self.check_new_mount(vid, &mp, purpose);
                }
                Err(e)
                    if matches!(
                        &e,
                        Error::Os {
                            source: OsError::Timeout { .. },
                            ..
                        }
                    ) =>
                {
                    held.timed_out = Some(std::time::Instant::now());
                    return Err(e);
                }
                Err(e) => {
                    if sets.len() > 1 {
                        tracing::info!(share = %source, options = %opts.join(","), error = %e.render(), "NFS mount failed; trying the next options");
                    }
                    // The first failure (the preferred options) is the one
                    // worth reporting.
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or_else(|| Error::Internal("no NFS mount options to try".into())))
    }
}

/// The refusal of a new volume on a share the server resolves to another
/// path.
fn resolved_share(vid: &VolumeId, shown: &str) -> Error {
    Error::Invalid(format!(
        "share {} is {}:{shown} on the server (a symlink in the share's path): Berth identifies mounts by the path the kernel shows, so use share {shown}",
        vid.share_source(),
        vid.server
    ))
}

/// What the working mount of a share shows (`NfsKind::working_mount`).
enum Shown {
    /// The share's own path.
    Share,
    /// Another path of the same server: the share resolved by the server.
    Resolved(String),
}

/// What the working mount is wanted for (`NfsKind::share_mount_for`).
enum Purpose<'a> {
    /// An existing volume or snapshot.
    Existing,
    /// A new volume: a resolved share is refused.
    NewVolume,
    /// The rollback of a volume being created, run in the mount.
    Rollback(&'a dyn Fn(&Path) -> Result<()>),
}

/// The share's marker as an NFS path, `server:/share/.berth-share`: the
/// file an operator makes by hand (`NfsKind::confirm_absent`).
fn share_marker_path(vid: &VolumeId) -> String {
    let share = vid.share.trim_end_matches('/');
    format!("{}:{share}/{SHARE_MARKER}", vid.server)
}

impl NfsKind {
    /// Where this controller notes that it saw the share of `vid` marked
    /// (`SHARE_MARKER`): a marker gone since means the export is not the
    /// share any more. Kept with the working mounts, in the state dir.
    fn seen_marked(&self, vid: &VolumeId) -> PathBuf {
        let key = format!("{}\0{}", vid.server, vid.share);
        self.work
            .join(format!("marked-{:016x}", fnv64(key.as_bytes())))
    }

    fn note_marked(&self, vid: &VolumeId) {
        let path = self.seen_marked(vid);
        match self.os.files.open(&path, Open::CreateNew) {
            Err(e) if e.errno() != Some(libc::EEXIST) => {
                tracing::warn!(share = %vid.share_source(), error = %e, "could not note that the share is marked")
            }
            _ => {}
        }
    }

    /// The working mount at `mp` is still Berth's NFS mount of the share
    /// (mountinfo): a mount gone since it was checked leaves an empty
    /// local directory at `mp`, and nothing may be decided from that.
    fn still_mounted(&self, vid: &VolumeId, mp: &Path) -> Result<()> {
        let t = mounts::table(&self.os)?;
        match mounts::at(&self.os, &t, mp).last() {
            Some(top) if self.working_mount(top, vid, mp).is_ok() => Ok(()),
            top => Err(Error::Unavailable(format!(
                "the working mount of share {} at {} is gone or is not its NFS mount any more ({}); nothing is decided from it, retry",
                vid.share_source(),
                mp.display(),
                top.map_or("nothing mounted".to_string(), |m| format!(
                    "{} ({})",
                    m.source, m.fs_type
                ))
            ))),
        }
    }

    fn mark(&self, vid: &VolumeId, root: &Path) -> Result<()> {
        let m = ShareMarker {
            share: vid.share_source(),
            marked_unix: crate::driver::now_unix(),
        };
        mark_share(self.os.files.as_ref(), root, &m)?;
        tracing::info!(share = %vid.share_source(), "marked the share as Berth's ({SHARE_MARKER})");
        self.note_marked(vid);
        Ok(())
    }

    /// A volume's (or snapshot's) directory is absent from the share's
    /// working mount at `root`: it is gone only if the share looks like
    /// itself. The mount must still be the share's NFS mount, and the
    /// share's root must hold its marker or Berth's layout (which then
    /// gets the marker). Otherwise (an empty directory the server exports
    /// where the share's filesystem failed to mount, or a working mount
    /// that vanished) the volume's data may well still exist: UNAVAILABLE,
    /// and the caller keeps its record for the retry.
    pub(super) fn confirm_absent(&self, vid: &VolumeId, root: &Path, what: &str) -> Result<()> {
        self.still_mounted(vid, root)?;
        match share_looks(self.os.files.as_ref(), root)? {
            ShareLooks::Marked => Ok(()),
            ShareLooks::Layout => self.mark(vid, root),
            ShareLooks::Unknown => Err(Error::Unavailable(format!(
                "{what} is not on share {source} and the share shows nothing of Berth's (no {SHARE_MARKER} at its root, no volume marker): the server may export an empty directory in place of the share (its filesystem not mounted on the server), so nothing is taken as deleted; fix the export and retry. If the share is really empty and was used only by a Berth that wrote no {SHARE_MARKER}, mark it by hand with an empty file {marker} (at the share's root), then retry: from any host that can mount it, `mount -t nfs {source} /mnt && touch /mnt/{SHARE_MARKER} && umount /mnt`",
                source = vid.share_source(),
                marker = share_marker_path(vid),
            ))),
        }
    }

    /// Before a new volume is made on the share at `root`: the mount is
    /// still the share's NFS mount, and the share is marked (a share
    /// without a marker is marked now, as the first volume's), unless this
    /// controller saw it marked before: then the marker is gone because
    /// the export is not the share (an empty stand-in), and no volume is
    /// made there (UNAVAILABLE).
    pub(super) fn check_share_for_create(&self, vid: &VolumeId, root: &Path) -> Result<()> {
        self.still_mounted(vid, root)?;
        let files = self.os.files.as_ref();
        let seen_marked = || files.stat(&self.seen_marked(vid)).is_ok();
        match share_looks(files, root)? {
            ShareLooks::Marked => {
                if !seen_marked() {
                    self.note_marked(vid);
                }
                Ok(())
            }
            ShareLooks::Unknown if seen_marked() => {
                Err(Error::Unavailable(format!(
                    "share {} was marked as Berth's ({SHARE_MARKER}) when this controller used it before, and its root now shows nothing of Berth's: the server may export an empty directory in place of the share (its filesystem not mounted on the server); no volume is made there, retry once the export is fixed",
                    vid.share_source()
                )))
            }
            _ => self.mark(vid, root),
        }
    }

    /// After mounting the share at `mp` (under the share's lock, so no
    /// other call uses the mount yet): what mountinfo shows there must be
    /// Berth's mount of the share (`working_mount`), and for a new volume
    /// the share's own path. Otherwise the mount just made is unmounted
    /// and its directory removed, so nothing is left; a rollback runs its
    /// work in it first (and then has nothing more to do: None).
    fn check_new_mount(
        &self,
        vid: &VolumeId,
        mp: &Path,
        purpose: Purpose<'_>,
    ) -> Result<Option<PathBuf>> {
        let t = mounts::table(&self.os)?;
        // Nothing shown there (mount.nfs said it mounted): nothing to tell
        // the share by, as before this check.
        let Some(top) = mounts::at(&self.os, &t, mp).last().cloned() else {
            return Ok(Some(mp.to_path_buf()));
        };
        let verdict = self.working_mount(top, vid, mp);
        let outcome = match (verdict, purpose) {
            (Ok(Shown::Share), _) | (Ok(Shown::Resolved(_)), Purpose::Existing) => {
                return Ok(Some(mp.to_path_buf()))
            }
            (Ok(Shown::Resolved(path)), Purpose::NewVolume) => Err(resolved_share(vid, &path)),
            (Ok(Shown::Resolved(_)), Purpose::Rollback(undo)) => undo(mp).map(|()| None),
            (Err(e), _) => Err(e),
        };
        if let Err(e) = &outcome {
            tracing::warn!(share = %vid.share_source(), at = %mp.display(), error = %e.render(), "the new working mount is refused; unmounting it");
        }
        self.unmount_target(mp)?;
        if let Err(r) = self.os.files.remove_dir(mp) {
            tracing::warn!(at = %mp.display(), error = %r, "could not remove the working directory");
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::os::RealFiles;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    fn id(sub: &str) -> String {
        format!("nfs#d#h#/e#{sub}")
    }

    fn mk(sub: &str) -> Marker {
        Marker {
            id: id(sub),
            name: format!("pv-{sub}"),
            created_unix: 1,
            released_unix: None,
            filled: None,
        }
    }

    fn create(root: &Path, sub: &str, mode: Option<u32>) -> Result<()> {
        create_subdir(&RealFiles, root, sub, mode, &mk(sub), None)
    }

    fn remove(root: &Path, sub: &str, how: Removal) -> Result<Seen> {
        remove_subdir(&RealFiles, root, &id(sub), sub, how, false, 7)
    }

    fn mark(dir: &Path, m: &Marker) {
        write_marker(
            &RealFiles,
            &open(dir, dir_flags(), Mode::empty()).unwrap(),
            m,
        )
        .unwrap();
    }

    fn marker(p: &Path) -> Option<Marker> {
        read_marker(&RealFiles, open(p, dir_flags(), Mode::empty()).unwrap()).unwrap()
    }

    /// A fake whose `mount.nfs` cannot resolve any server.
    fn unresolvable_server() -> (crate::os::Os, std::sync::Arc<crate::os::fake::FakeOs>) {
        let (os, fake) = crate::os::Os::fake();
        fake.respond("mount.nfs", |_| {
            Ok(crate::os::command::CmdOutput {
                code: Some(32),
                stdout: String::new(),
                stderr: "mount.nfs: Failed to resolve server".into(),
            })
        });
        (os, fake)
    }

    /// Each share a call names (a volume id is the client's to choose) had
    /// its lock entry kept for ever: 200 ids on 200 servers that do not
    /// exist left 200 entries. An entry lives while a call uses it.
    #[test]
    fn a_share_lock_lives_only_while_a_call_uses_it() {
        let d = tempfile::tempdir().unwrap();
        let os = unresolvable_server().0;
        let k = NfsKind::new(
            d.path().join("nfs"),
            std::time::Duration::from_secs(5),
            crate::kinds::nfs::allow::AllowedShares::default(),
            os,
        );
        for i in 0..200 {
            let vid = VolumeId::parse(&format!("nfs#d#host-{i}#/e#v")).unwrap();
            assert!(k.share_mount(&vid, &[vec![]]).is_err());
        }
        assert_eq!(
            k.share_locks.lock().unwrap().len(),
            0,
            "share lock entries left after every call ended"
        );
    }

    #[test]
    fn creates_marked_components_and_applies_the_mode() {
        let d = tempfile::tempdir().unwrap();
        create(d.path(), "ns/pvc", Some(0o2775)).unwrap();
        let dir = d.path().join("ns/pvc");
        assert_eq!(mode(&dir), 0o2775);
        assert_eq!(marker(&dir), Some(mk("ns/pvc")));
        assert_eq!(
            marker(&d.path().join("ns")),
            None,
            "parents are not volumes"
        );
        // Idempotent for the same volume, and its data stays.
        std::fs::write(dir.join("f"), b"x").unwrap();
        create(d.path(), "ns/pvc", Some(0o777)).unwrap();
        assert_eq!(mode(&dir), 0o777);
        assert!(dir.join("f").exists());
        // The same id under another name is someone else's.
        let mut other = mk("ns/pvc");
        other.name = "pv-other".into();
        let e = create_subdir(&RealFiles, d.path(), "ns/pvc", None, &other, None).unwrap_err();
        assert!(matches!(e, Error::Conflict(_)), "{e:?}");
        // Nothing of the making is left beside it.
        let names: Vec<_> = std::fs::read_dir(d.path().join("ns"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["pvc"]);
        assert!(marked_as(&RealFiles, d.path(), "ns/pvc", &id("ns/pvc")).unwrap());
        assert!(!marked_as(&RealFiles, d.path(), "ns/pvc", &id("x")).unwrap());
        assert!(!marked_as(&RealFiles, d.path(), "ns/none", &id("ns/none")).unwrap());
    }

    #[test]
    fn never_adopts_and_never_nests() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("theirs")).unwrap();
        std::fs::write(d.path().join("theirs/f"), b"x").unwrap();
        let e = create(d.path(), "theirs", Some(0o777)).unwrap_err();
        assert!(matches!(e, Error::Conflict(_)), "{e:?}");
        assert_eq!(marker(&d.path().join("theirs")), None);
        // An empty directory is not adopted either.
        std::fs::create_dir(d.path().join("empty")).unwrap();
        assert!(create(d.path(), "empty", None).is_err());
        // Inside a volume, or a volume's directory as the share root.
        create(d.path(), "vol", None).unwrap();
        for sub in ["vol/inner", "vol/a/b"] {
            let e = create(d.path(), sub, None).unwrap_err();
            assert!(matches!(e, Error::Conflict(_)), "{sub}: {e:?}");
        }
        let e = create(&d.path().join("vol"), "x", None).unwrap_err();
        assert!(matches!(e, Error::Conflict(_)), "{e:?}");
        assert!(!d.path().join("vol/x").exists());
        // A leftover of an interrupted create is replaced.
        let tmp = d.path().join(new_name(&id("again")));
        std::fs::create_dir(&tmp).unwrap();
        std::fs::write(tmp.join("junk"), b"x").unwrap();
        create(d.path(), "again", None).unwrap();
        assert!(!tmp.exists());
        assert!(!d.path().join("again/junk").exists());
    }

    #[test]
    fn never_follows_symlinks() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), b"x").unwrap();
        symlink(outside.path(), d.path().join("link")).unwrap();
        // Creating through a symlink is refused; at one it is not ours.
        let e = create(d.path(), "link/pvc", None).unwrap_err();
        assert!(matches!(e, Error::WrongState(_)), "{e:?}");
        let e = create(d.path(), "link", None).unwrap_err();
        assert!(matches!(e, Error::Conflict(_)), "{e:?}");
        assert!(!outside.path().join("pvc").exists());
        // Deleting through a symlinked parent, or a symlink itself, touches
        // nothing: Berth did not make them.
        for sub in ["link/keep", "link"] {
            remove(d.path(), sub, Removal::Apply(OnDelete::Delete)).unwrap();
        }
        assert!(d.path().join("link").exists());
        assert!(outside.path().join("keep").exists());
    }

    /// A directory that will not go once emptied (a silly-renamed `.nfs*`
    /// file of a client that still has it open): retried while only that
    /// keeps it, and when it stays, its marker is put back so a retried
    /// DeleteVolume still knows it as the volume's.
    #[test]
    fn delete_waits_for_silly_renamed_files_then_restores_the_marker() {
        use crate::os::fake::FakeOs;
        let d = tempfile::tempdir().unwrap();
        let os = FakeOs::new();
        let del = |os: &FakeOs| {
            remove_subdir(
                os,
                d.path(),
                &id("v"),
                "v",
                Removal::Apply(OnDelete::Delete),
                false,
                7,
            )
        };
        // Kept non-empty for one try: the retry removes it.
        create(d.path(), "v", None).unwrap();
        os.fail_next("rmdir", libc::ENOTEMPTY);
        del(&os).unwrap();
        assert!(!d.path().join("v").exists());
        let rmdirs = || os.file_ops().iter().filter(|o| o.op == "rmdir").count();
        assert_eq!(rmdirs(), 2);
        // Kept for good by a `.nfs*` file: retried until the wait is over,
        // then FAILED_PRECONDITION with the marker back.
        create(d.path(), "v", None).unwrap();
        os.clear_file_ops();
        os.fail_op_under("rmdir", d.path(), libc::ENOTEMPTY);
        let t0 = std::time::Instant::now();
        let e = del(&os).unwrap_err();
        assert!(t0.elapsed() >= RMDIR_WAIT, "{:?}", t0.elapsed());
        assert!(matches!(e, Error::WrongState(_)), "{e:?}");
        assert!(e.to_string().contains("can be retried"), "{e}");
        assert!(rmdirs() > 2, "retried: {}", rmdirs());
        assert_eq!(marker(&d.path().join("v")).unwrap().id, id("v"));
        // The retry, once nothing keeps it, removes it.
        os.clear_file_faults();
        del(&os).unwrap();
        assert!(!d.path().join("v").exists());
        // Anything but `.nfs*` files (data written during the delete) is
        // not waited for: reported at once by name.
        std::fs::create_dir(d.path().join("w")).unwrap();
        std::fs::write(d.path().join("w/late"), b"x").unwrap();
        let root = open_root(d.path()).unwrap();
        let w = open_dir(&root, "w").unwrap();
        let t0 = std::time::Instant::now();
        match remove_emptied(&RealFiles, &root, "w", &w, RMDIR_WAIT) {
            Err(Left::Entries(names)) => assert_eq!(names, ["late"]),
            Err(Left::Os(e)) => panic!("{e}"),
            Ok(()) => panic!("removed a directory holding data"),
        }
        assert!(t0.elapsed() < RMDIR_WAIT);
        assert!(d.path().join("w/late").exists());
    }

    /// A delete cut short between removing the marker and the directory
    /// (kill -9) leaves an empty unmarked directory: the resumed delete of
    /// the recorded volume removes it; without a record saying Deleting,
    /// or with anything in it, it is left alone.
    #[test]
    fn a_resumed_delete_finishes_an_emptied_unmarked_directory() {
        let d = tempfile::tempdir().unwrap();
        let del = |resumed| {
            let how = Removal::Apply(OnDelete::Delete);
            remove_subdir(&RealFiles, d.path(), &id("v"), "v", how, resumed, 7)
        };
        create(d.path(), "v", None).unwrap();
        std::fs::remove_file(d.path().join("v").join(MARKER)).unwrap();
        del(false).unwrap();
        assert!(
            d.path().join("v").is_dir(),
            "unrecorded: not Berth's to remove"
        );
        std::fs::write(d.path().join("v/data"), b"x").unwrap();
        del(true).unwrap();
        assert!(
            d.path().join("v/data").exists(),
            "data without a marker stays"
        );
        std::fs::remove_file(d.path().join("v/data")).unwrap();
        // Archive never gets here (one rename), retain removes nothing.
        let archive = Removal::Apply(OnDelete::Archive);
        remove_subdir(&RealFiles, d.path(), &id("v"), "v", archive, true, 7).unwrap();
        assert!(d.path().join("v").is_dir());
        del(true).unwrap();
        assert!(!d.path().join("v").exists());
        assert!(d.path().exists());
    }

    #[test]
    fn delete_archive_retain_and_rollback() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("canary"), b"x").unwrap();
        for sub in ["a/v", "b/v", "c/v", "r"] {
            create(d.path(), sub, None).unwrap();
            std::fs::create_dir(d.path().join(sub).join("deep")).unwrap();
            std::fs::write(d.path().join(sub).join("deep/f"), b"data").unwrap();
        }
        remove(d.path(), "a/v", Removal::Apply(OnDelete::Delete)).unwrap();
        assert!(!d.path().join("a/v").exists());
        assert!(d.path().join("a").is_dir(), "the parent stays");
        remove(d.path(), "b/v", Removal::Apply(OnDelete::Archive)).unwrap();
        assert!(!d.path().join("b/v").exists());
        let name = archive_name(&id("b/v"), "b/v", 7);
        let archived = d.path().join(ARCHIVE).join(&name);
        assert!(archived.join("deep/f").exists());
        assert_eq!(marker(&archived).unwrap().id, id("b/v"));
        // A second archive at the same second gets its own name.
        create(d.path(), "b/v", None).unwrap();
        remove(d.path(), "b/v", Removal::Apply(OnDelete::Archive)).unwrap();
        assert!(d.path().join(ARCHIVE).join(format!("{name}-1")).is_dir());
        remove(d.path(), "c/v", Removal::Apply(OnDelete::Retain)).unwrap();
        assert!(d.path().join("c/v/deep/f").exists());
        // A rollback never removes data; a directory with only its marker
        // goes, and so does one still being made.
        remove(d.path(), "r", Removal::Rollback(None)).unwrap();
        assert!(d.path().join("r/deep/f").exists());
        create(d.path(), "e", None).unwrap();
        remove(d.path(), "e", Removal::Rollback(None)).unwrap();
        assert!(!d.path().join("e").exists());
        let tmp = d.path().join(new_name(&id("t")));
        std::fs::create_dir(&tmp).unwrap();
        remove(d.path(), "t", Removal::Rollback(None)).unwrap();
        assert!(!tmp.exists());
        // Missing is success, for every mode.
        for how in [
            Removal::Rollback(None),
            Removal::Apply(OnDelete::Delete),
            Removal::Apply(OnDelete::Archive),
        ] {
            remove(d.path(), "x/y", how).unwrap();
            remove(d.path(), "a/v", how).unwrap();
        }
        assert!(d.path().join("canary").exists());
    }

    /// DeleteVolume with onDelete=retain keeps the directory and marks its
    /// marker released, durably and idempotently: no create adopts it
    /// afterwards, the same id and name included (ALREADY_EXISTS naming
    /// it), a rollback leaves it alone, and it no longer counts as the
    /// volume. A delete cut short before the new marker was renamed into
    /// place (kill -9) is finished by the retry.
    #[test]
    fn retain_releases_the_directory_for_good() {
        let d = tempfile::tempdir().unwrap();
        let retain = Removal::Apply(OnDelete::Retain);
        create(d.path(), "r", None).unwrap();
        std::fs::write(d.path().join("r/f"), b"data").unwrap();
        // Cut short: the new marker written, not renamed into place.
        let dir = open(&d.path().join("r"), dir_flags(), Mode::empty()).unwrap();
        write_json(&RealFiles, &dir, MARKER_NEW, &mk("r")).unwrap();
        remove(d.path(), "r", retain).unwrap();
        remove(d.path(), "r", retain).unwrap();
        let m = marker(&d.path().join("r")).unwrap();
        assert_eq!(m.released_unix, Some(7));
        assert_eq!((m.id.as_str(), m.name.as_str()), (id("r").as_str(), "pv-r"));
        assert!(!d.path().join("r").join(MARKER_NEW).exists());
        assert!(d.path().join("r/f").exists());
        assert!(!marked_as(&RealFiles, d.path(), "r", &id("r")).unwrap());
        let e = create(d.path(), "r", None).unwrap_err();
        assert!(matches!(e, Error::Conflict(_)), "{e:?}");
        assert!(e.to_string().contains("deleted volume"), "{e}");
        // Even emptied, a rollback of the same id leaves it alone.
        std::fs::remove_file(d.path().join("r/f")).unwrap();
        remove(d.path(), "r", Removal::Rollback(None)).unwrap();
        assert!(d.path().join("r").join(MARKER).exists());
        // A marker of an older version (no released_unix) is a live
        // volume's: read as before.
        std::fs::create_dir(d.path().join("old")).unwrap();
        std::fs::write(
            d.path().join("old").join(MARKER),
            format!(
                r#"{{"id":"{}","name":"pv-old","created_unix":1}}"#,
                id("old")
            ),
        )
        .unwrap();
        assert_eq!(marker(&d.path().join("old")), Some(mk("old")));
        create(d.path(), "old", None).unwrap();
        // Released markers are written with the field, live ones without.
        let text = std::fs::read_to_string(d.path().join("r").join(MARKER)).unwrap();
        assert!(text.contains("\"released_unix\":7"), "{text}");
        create(d.path(), "live", None).unwrap();
        let text = std::fs::read_to_string(d.path().join("live").join(MARKER)).unwrap();
        assert!(!text.contains("released"), "{text}");
    }

    #[test]
    fn an_unmarked_or_foreign_directory_and_a_nested_volume_stop_a_delete() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("plain/x")).unwrap();
        remove(d.path(), "plain", Removal::Apply(OnDelete::Delete)).unwrap();
        remove(d.path(), "plain", Removal::Apply(OnDelete::Archive)).unwrap();
        assert!(d.path().join("plain/x").is_dir());
        create(d.path(), "outer", None).unwrap();
        std::fs::create_dir_all(d.path().join("outer/a/b")).unwrap();
        let inner = d.path().join("outer/a/b");
        mark(&inner, &mk("z"));
        for how in [
            Removal::Apply(OnDelete::Delete),
            Removal::Apply(OnDelete::Archive),
        ] {
            let e = remove(d.path(), "outer", how).unwrap_err();
            assert!(matches!(e, Error::WrongState(_)), "{e:?}");
        }
        assert!(inner.join(MARKER).exists());
        // A copy of its own marker deeper inside does not count.
        std::fs::remove_file(inner.join(MARKER)).unwrap();
        mark(&inner, &mk("outer"));
        remove(d.path(), "outer", Removal::Apply(OnDelete::Delete)).unwrap();
        assert!(!d.path().join("outer").exists());
    }

    /// The share's directories are listed through the OS layer: a listing
    /// that fails stops the look at the share's root and a delete (the
    /// volume's directory and marker stay), and the rename of a new name
    /// on NFS (no RENAME_NOREPLACE) looks at its target through it.
    #[test]
    fn the_share_is_listed_and_looked_at_through_the_os_layer() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        let (os, fake) = crate::os::Os::fake();
        let files = os.files.as_ref();
        assert_eq!(share_looks(files, r).unwrap(), ShareLooks::Unknown);
        fake.fail_next("read_dir", libc::EIO);
        assert!(share_looks(files, r).is_err());
        create(r, "v", None).unwrap();
        std::fs::create_dir(r.join("v/data")).unwrap();
        let delete = || {
            remove_subdir(
                files,
                r,
                &id("v"),
                "v",
                Removal::Apply(OnDelete::Delete),
                false,
                7,
            )
        };
        fake.fail_op_under("read_dir", &r.join("v"), libc::EIO);
        let e = delete().unwrap_err();
        assert!(e.render().contains("Input/output error"), "{e:?}");
        assert!(r.join("v/data").is_dir());
        assert_eq!(marker(&r.join("v")), Some(mk("v")));
        fake.clear_file_faults();
        assert_eq!(delete().unwrap(), Seen::There);
        assert!(!r.join("v").exists());
        // rename_new where RENAME_NOREPLACE is not answered (NFS).
        std::fs::create_dir(r.join("from")).unwrap();
        fake.fail_next("rename", libc::EINVAL);
        fake.fail_next("lstat", libc::EIO);
        let e = rename_new(files, &r.join("from"), &r.join("to")).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EIO), "{e}");
        assert!(r.join("from").is_dir());
        fake.fail_next("rename", libc::EINVAL);
        rename_new(files, &r.join("from"), &r.join("to")).unwrap();
        assert!(r.join("to").is_dir());
    }

    /// The working directory, and the note that this controller saw the
    /// share marked, are looked at through the OS layer: a working
    /// directory whose look fails is made again (it is found there), and a
    /// note whose look fails is not taken as seen (the share is marked
    /// again rather than refused).
    #[test]
    fn the_working_directory_and_the_marked_note_are_looked_at_through_the_os_layer() {
        let d = tempfile::tempdir().unwrap();
        let work = d.path().join("nfs");
        let vid = VolumeId::parse("nfs#d#h#/e#v").unwrap();
        let kind = |os| {
            NfsKind::new(
                work.clone(),
                std::time::Duration::from_secs(5),
                crate::kinds::nfs::allow::AllowedShares::default(),
                os,
            )
        };
        // A server that cannot be mounted: each call looks at the working
        // directory before it mounts.
        let (os, fake) = unresolvable_server();
        let k = kind(os);
        let chmods = || {
            fake.file_ops()
                .iter()
                .filter(|o| o.op == "chmod" && o.path == work)
                .count()
        };
        assert!(k.share_mount(&vid, &[vec![]]).is_err());
        assert_eq!(chmods(), 1);
        assert!(k.share_mount(&vid, &[vec![]]).is_err());
        assert_eq!(chmods(), 1);
        fake.fail_next("stat", libc::EIO);
        assert!(k.share_mount(&vid, &[vec![]]).is_err());
        assert_eq!(chmods(), 2);
        assert!(work.is_dir());
        // The note that the share was seen marked.
        let (os, fake) = crate::os::Os::fake();
        fake.emulate_nfs_mounts();
        let k = kind(os);
        let root = k.new_volume_share(&vid, &[vec![]]).unwrap();
        k.check_share_for_create(&vid, &root).unwrap();
        assert!(root.join(SHARE_MARKER).is_file());
        std::fs::remove_file(root.join(SHARE_MARKER)).unwrap();
        let e = k.check_share_for_create(&vid, &root).unwrap_err();
        assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
        fake.fail_next("stat", libc::EIO);
        k.check_share_for_create(&vid, &root).unwrap();
        assert!(root.join(SHARE_MARKER).is_file());
    }

    /// A tenant swaps a directory of its volume for a symlink (and back)
    /// while a delete looks for other volumes' markers inside it: the look
    /// never follows the symlink. Before, each directory was read by its
    /// path after its parent listed it as a directory, and the symlink
    /// swapped in meanwhile led the look out of the volume (to where it
    /// points on the controller's host): here to another volume's marker,
    /// which refused the delete naming that volume.
    #[test]
    fn the_look_for_nested_volumes_never_follows_a_symlink_swapped_in() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(outside.path().join("sub")).unwrap();
        mark(&outside.path().join("sub"), &mk("other"));
        create(d.path(), "v", None).unwrap();
        let v = d.path().join("v");
        std::fs::create_dir_all(v.join("x/sub")).unwrap();
        symlink(outside.path(), v.join("y")).unwrap();
        let dir = open(&v, dir_flags(), Mode::empty()).unwrap();
        let stop = AtomicBool::new(false);
        let (walks, swaps) = std::thread::scope(|s| {
            let swapper = s.spawn(|| {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    nix::fcntl::renameat2(
                        nix::fcntl::AT_FDCWD,
                        &v.join("x"),
                        nix::fcntl::AT_FDCWD,
                        &v.join("y"),
                        nix::fcntl::RenameFlags::RENAME_EXCHANGE,
                    )
                    .unwrap();
                    n += 1;
                }
                n
            });
            let t0 = std::time::Instant::now();
            let mut walks = 0;
            let mut found = Ok(None);
            while t0.elapsed() < std::time::Duration::from_secs(3) {
                found = nested_volume(&RealFiles, &dir, &id("v"));
                walks += 1;
                if !matches!(found, Ok(None)) {
                    break;
                }
            }
            stop.store(true, Ordering::Relaxed);
            let swaps = swapper.join().unwrap();
            assert!(
                matches!(found, Ok(None)),
                "walk {walks}: {:?}",
                found.map_err(|e| e.to_string())
            );
            (walks, swaps)
        });
        assert!(walks > 100 && swaps > 100, "{walks} walks, {swaps} swaps");
        // A volume really inside is still found, through plain directories.
        let real = if std::fs::symlink_metadata(v.join("x")).unwrap().is_dir() {
            v.join("x")
        } else {
            v.join("y")
        };
        std::fs::create_dir_all(real.join("sub/deeper")).unwrap();
        mark(&real.join("sub/deeper"), &mk("nested"));
        let (rel, other) = nested_volume(&RealFiles, &dir, &id("v")).unwrap().unwrap();
        assert!(rel.ends_with("sub/deeper"), "{rel:?}");
        assert_eq!(other, id("nested"));
    }

    /// A tenant's tree 50,000 levels deep in its volume, another volume's
    /// marker (a copy) at its bottom: the look for nested volumes goes no
    /// deeper than a volume's subdirectory can be (ids have at most 128
    /// bytes) and ends at once, finding none. Before 2026-12-07 it went
    /// to the bottom, opening each directory from the volume's own one
    /// component at a time: some 1.25 billion openat calls, a delete that
    /// did not end. A volume as deep as one can be is still found.
    #[test]
    fn the_look_for_nested_volumes_stops_where_no_volume_can_be() {
        use std::os::fd::AsRawFd;
        /// Removes the deep tree level by level, also when the test fails
        /// (`TempDir`'s removal recurses, and overflows on such a tree).
        struct Gone(PathBuf);
        impl Drop for Gone {
            fn drop(&mut self) {
                let _ = crate::os::files::remove_tree_iteratively(&self.0);
            }
        }
        let d = tempfile::tempdir().unwrap();
        create(d.path(), "v", None).unwrap();
        let v = d.path().join("v");
        let _gone = Gone(v.clone());
        let mut fd = open(&v, dir_flags(), Mode::empty()).unwrap();
        for _ in 0..50_000 {
            nix::sys::stat::mkdirat(&fd, "d", Mode::from_bits_truncate(0o755)).unwrap();
            fd = openat(&fd, "d", dir_flags(), Mode::empty()).unwrap();
        }
        mark(
            Path::new(&format!("/proc/self/fd/{}/.", fd.as_raw_fd())),
            &mk("v/deep"),
        );
        drop(fd);
        let look = || {
            let dir = open(&v, dir_flags(), Mode::empty()).unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ =
                    tx.send(nested_volume(&RealFiles, &dir, &id("v")).map_err(|e| e.to_string()));
            });
            rx.recv_timeout(std::time::Duration::from_secs(20))
        };
        let deep = look();
        // "d/" 60 times, then "x": 121 bytes below the volume.
        let shallow = v.join("d/".repeat(60)).join("x");
        std::fs::create_dir(&shallow).unwrap();
        mark(&shallow, &mk("v/shallow"));
        let found = look();
        assert_eq!(
            deep.expect("the look for nested volumes did not end in 20 s"),
            Ok(None)
        );
        let (rel, other) = found
            .expect("the look for nested volumes did not end in 20 s")
            .unwrap()
            .expect("the volume 121 bytes down was not found");
        assert_eq!(rel, Path::new(&"d/".repeat(60)).join("x"));
        assert_eq!(other, id("v/shallow"));
    }

    /// A tenant's volume with 20,000 subdirectories side by side (names of
    /// 120 bytes, as deep as the look goes): the look for nested volumes
    /// holds one listing per level of the path it walks, never the paths
    /// of all the siblings. Measured as the growth of the peak memory
    /// (VmHWM, less the pages of files: the code) of a process that makes
    /// only this look (the test binary run again for this test alone):
    /// under 1 MiB. Before 2026-12-07 the look kept every sibling's path
    /// until it had looked into it: 2.8 MiB here, some 150 MiB for a
    /// million. A nested volume among them is still found.
    #[test]
    fn the_look_for_nested_volumes_holds_no_list_of_siblings() {
        const ROLE: &str = "BERTH_TEST_NESTED_LOOK_AT";
        const NAME: &str =
            "kinds::nfs::share::tests::the_look_for_nested_volumes_holds_no_list_of_siblings";
        // The peak of the process's memory less its pages of files (the
        // binary's code, which the first run of any code brings in): the
        // growth of this between two moments is at most that of its
        // private memory's peak, and at least its growth minus the pages
        // of files that came in meanwhile.
        let peak_private_kib = || -> u64 {
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            let kib = |key: &str| -> u64 {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                    .unwrap()
            };
            kib("VmHWM:") - kib("RssFile:")
        };
        if let Ok(v) = std::env::var(ROLE) {
            let dir = open(Path::new(&v), dir_flags(), Mode::empty()).unwrap();
            let before = peak_private_kib();
            let found = nested_volume(&RealFiles, &dir, &id("v")).map_err(|e| e.to_string());
            let grown = peak_private_kib().saturating_sub(before);
            println!("look: grown {grown} found {found:?}");
            return;
        }
        const SIBLINGS: usize = 20_000;
        let d = tempfile::tempdir().unwrap();
        create(d.path(), "v", None).unwrap();
        let v = d.path().join("v");
        for i in 0..SIBLINGS {
            std::fs::create_dir(v.join(format!("{i:0>120}"))).unwrap();
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
            .env(ROLE, &v)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .find_map(|l| l.split_once("look: grown ").map(|(_, a)| a))
            .unwrap_or_else(|| panic!("no answer from the look: {stdout}"));
        let (grown, found) = line.split_once(" found ").unwrap();
        assert_eq!(found, "Ok(None)");
        let grown: u64 = grown.parse().unwrap();
        assert!(
            grown < 1 << 10,
            "the look over {SIBLINGS} sibling directories grew the peak memory by {grown} KiB"
        );
        let nested = v.join(format!("{:0>120}", SIBLINGS / 2));
        mark(&nested, &mk("v/nested"));
        let dir = open(&v, dir_flags(), Mode::empty()).unwrap();
        let (rel, other) = nested_volume(&RealFiles, &dir, &id("v")).unwrap().unwrap();
        assert_eq!(rel, Path::new(nested.file_name().unwrap()));
        assert_eq!(other, id("v/nested"));
    }

    /// How a share's root looks: its marker; Berth's layout without one
    /// (its areas, a volume marker up to three levels down, never through
    /// a symlink); anything else is not known as Berth's (an empty
    /// stand-in, foreign files).
    #[test]
    fn a_share_looks_like_berths_by_its_marker_or_layout() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        assert_eq!(share_looks(&RealFiles, r).unwrap(), ShareLooks::Unknown);
        std::fs::create_dir_all(r.join("x/y/z")).unwrap();
        std::fs::write(r.join("x/f"), b"foreign").unwrap();
        assert_eq!(share_looks(&RealFiles, r).unwrap(), ShareLooks::Unknown);
        // A marker behind a symlink is not looked at.
        let other = tempfile::tempdir().unwrap();
        mark(other.path(), &mk("o"));
        symlink(other.path(), r.join("x/link")).unwrap();
        assert_eq!(share_looks(&RealFiles, r).unwrap(), ShareLooks::Unknown);
        mark(&r.join("x/y/z"), &mk("x/y/z"));
        assert_eq!(share_looks(&RealFiles, r).unwrap(), ShareLooks::Layout);
        std::fs::remove_file(r.join("x/y/z").join(MARKER)).unwrap();
        std::fs::create_dir(r.join(ARCHIVE)).unwrap();
        assert_eq!(share_looks(&RealFiles, r).unwrap(), ShareLooks::Layout);
        std::fs::remove_dir(r.join(ARCHIVE)).unwrap();
        let m = ShareMarker {
            share: "h:/e".into(),
            marked_unix: 7,
        };
        // A share that is a volume's directory is never marked.
        create(r, "vol", None).unwrap();
        mark_share(&RealFiles, &r.join("vol"), &m).unwrap();
        assert!(!r.join("vol").join(SHARE_MARKER).exists());
        mark_share(&RealFiles, r, &m).unwrap();
        mark_share(&RealFiles, r, &m).unwrap();
        assert_eq!(share_looks(&RealFiles, r).unwrap(), ShareLooks::Marked);
        // Removals tell an absent directory from one dealt with.
        assert_eq!(
            remove(r, "gone/v", Removal::Apply(OnDelete::Delete)).unwrap(),
            Seen::Absent
        );
        create(r, "v", None).unwrap();
        assert_eq!(
            remove(r, "v", Removal::Apply(OnDelete::Delete)).unwrap(),
            Seen::There
        );
        assert_eq!(
            remove(r, "v", Removal::Apply(OnDelete::Delete)).unwrap(),
            Seen::Absent
        );
    }

    /// The share's marker counts by its presence: Berth's JSON or the
    /// empty file an operator makes by hand, never a symlink, a FIFO, a
    /// directory or a large file by that name.
    #[test]
    fn a_share_is_marked_by_a_small_regular_file_of_that_name() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        let m = r.join(SHARE_MARKER);
        let looks = || share_looks(&RealFiles, r).unwrap();
        std::fs::write(&m, b"").unwrap();
        assert_eq!(looks(), ShareLooks::Marked);
        std::fs::write(&m, b"marked by hand\n").unwrap();
        assert_eq!(looks(), ShareLooks::Marked);
        std::fs::write(&m, vec![b' '; 5000]).unwrap();
        assert_eq!(looks(), ShareLooks::Unknown);
        std::fs::remove_file(&m).unwrap();
        let other = tempfile::tempdir().unwrap();
        std::fs::write(other.path().join(SHARE_MARKER), b"").unwrap();
        symlink(other.path().join(SHARE_MARKER), &m).unwrap();
        assert_eq!(looks(), ShareLooks::Unknown);
        std::fs::remove_file(&m).unwrap();
        nix::unistd::mkfifo(&m, Mode::from_bits_truncate(0o600)).unwrap();
        assert_eq!(looks(), ShareLooks::Unknown);
        std::fs::remove_file(&m).unwrap();
        std::fs::create_dir(&m).unwrap();
        assert_eq!(looks(), ShareLooks::Unknown);
    }

    #[test]
    fn markers_that_are_not_berths_do_not_count() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("v");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join(MARKER), b"not json").unwrap();
        assert_eq!(marker(&dir), None);
        std::fs::write(dir.join(MARKER), vec![b' '; 5000]).unwrap();
        assert_eq!(marker(&dir), None);
        std::fs::remove_file(dir.join(MARKER)).unwrap();
        symlink("/etc/hostname", dir.join(MARKER)).unwrap();
        assert_eq!(marker(&dir), None);
        std::fs::remove_file(dir.join(MARKER)).unwrap();
        nix::unistd::mkfifo(&dir.join(MARKER), Mode::from_bits_truncate(0o600)).unwrap();
        assert_eq!(marker(&dir), None, "a FIFO is not read (no hang)");
    }

    #[test]
    fn archive_names() {
        let a = archive_name("nfs#a#h#/e#ns/pvc-1", "ns/pvc-1", 1700000000);
        assert!(a.starts_with("ns-pvc-1-1700000000-"), "{a}");
        assert_ne!(
            a,
            archive_name("nfs#a#h#/f#ns/pvc-1", "ns/pvc-1", 1700000000)
        );
        assert!(archive_name("x", &"a/".repeat(120), 1).len() < 255);
    }
}
