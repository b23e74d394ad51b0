//! Snapshots of NFS volumes, restores and clones, all made inside the
//! controller's working mount of the share (copy_file_range for the data,
//! which NFS 4.2 turns into a server-side copy where the server can).
//!
//! A snapshot is the directory `.berth-snapshots/<key>/` at the share root
//! (`id::SnapshotId`: the key is 16 hex digits, nothing a volume name or a
//! snapshot id can turn into another path; no volume's share or
//! subdirectory may lie in `.berth-snapshots`). It holds
//! - `.berth-snapshot`, the marker (JSON: snapshot id and name, source
//!   volume, size, creation time): what DeleteSnapshot checks before it
//!   removes anything, and what a controller that lost its records
//!   restores from;
//! - `data/`, the copy of the volume's directory (the volume's own marker
//!   left out): modes, owners, times, symlinks, hard-link groups, extended
//!   attributes where the server keeps them (`os::copy`).
//!
//! It is made as `.berth-new-<key>` (marker first, then the copy, flushed
//! with syncfs) and renamed to `<key>` once complete and durable, so a
//! snapshot directory under its own name is always whole; an interrupted
//! one is removed by the start-up reconcile (its record says Creating) or
//! by the retry of the same CreateSnapshot (the same name and source give
//! the same key).
use std::os::fd::OwnedFd;
use std::path::Path;

use nix::errno::Errno;
use serde::{Deserialize, Serialize};

use super::id::{SnapshotId, VolumeId};
use super::share::{
    fd_path, not_a_dir, open_dir, open_parent, open_root, read_json, remove_marked, rename_new,
    sys_err, write_json, Seen, MARKER, NEW,
};
use crate::error::{Error, Result};
use crate::kinds::local::copy_error;
use crate::os::files::Files;

/// The snapshot area at the share root.
pub const SNAPSHOTS: &str = ".berth-snapshots";
/// The marker of a snapshot directory.
pub const SNAP_MARKER: &str = ".berth-snapshot";
/// The copy inside a snapshot directory.
pub const DATA: &str = "data";

/// What a snapshot's marker says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapMarker {
    pub id: String,
    pub name: String,
    pub source_volume_id: String,
    pub size_bytes: i64,
    pub created_secs: i64,
    pub created_nanos: i32,
}

/// The name a snapshot directory has while it is being made.
fn new_name(key: &str) -> String {
    format!("{NEW}{key}")
}

/// Opens the directory of volume `id` (`subdir` below the open share root)
/// when its marker names `id`: NOT_FOUND when it is missing,
/// FAILED_PRECONDITION when what is there is not that volume's.
pub fn open_volume(files: &dyn Files, root: &OwnedFd, subdir: &str, id: &str) -> Result<OwnedFd> {
    let missing = || {
        Error::NotFound(format!(
            "the directory of volume {id} ({subdir}) is missing on the share"
        ))
    };
    let Some((fd, leaf)) = open_parent(files, root, subdir, false)? else {
        return Err(missing());
    };
    let dir = match open_dir(&fd, leaf) {
        Ok(d) => d,
        Err(Errno::ENOENT) => return Err(missing()),
        Err(Errno::ELOOP) | Err(Errno::ENOTDIR) => return Err(not_a_dir(subdir)),
        Err(e) => return Err(sys_err(format!("opening {subdir} on the share"), e)),
    };
    let marker: Option<super::share::Marker> = read_json(files, &dir, MARKER)
        .map_err(|e| sys_err(format!("reading the marker of {subdir} on the share"), e))?;
    match marker {
        Some(m) if m.id == id => Ok(dir),
        _ => Err(Error::WrongState(format!(
            "{subdir} on the share does not carry the marker of volume {id}; refusing to copy it"
        ))),
    }
}

/// Opens the snapshot area at the open share root, made if `create`. None
/// when it is missing (and not made).
fn open_area(files: &dyn Files, root: &OwnedFd, create: bool) -> Result<Option<OwnedFd>> {
    if create {
        match files.create_dir(&fd_path(root, SNAPSHOTS), 0o700) {
            Err(e) if e.errno() != Some(libc::EEXIST) => {
                return Err(Error::os(format!("creating {SNAPSHOTS} on the share"), e))
            }
            _ => {}
        }
    }
    match open_dir(root, SNAPSHOTS) {
        Ok(fd) => Ok(Some(fd)),
        Err(Errno::ENOENT) if !create => Ok(None),
        Err(Errno::ELOOP) | Err(Errno::ENOTDIR) => Err(not_a_dir(SNAPSHOTS)),
        Err(e) => Err(sys_err(format!("opening {SNAPSHOTS} on the share"), e)),
    }
}

/// What the directory `name` in the area holds.
enum Found {
    Missing,
    /// A directory whose marker names the snapshot: the marker and the
    /// open directory.
    Ours(SnapMarker, OwnedFd),
    /// Anything else (another snapshot's marker, none, not a directory):
    /// never touched.
    Foreign(String),
}

fn look(files: &dyn Files, area: &OwnedFd, name: &str, id: &str) -> Result<Found> {
    let dir = match open_dir(area, name) {
        Ok(d) => d,
        Err(Errno::ENOENT) => return Ok(Found::Missing),
        Err(Errno::ELOOP) | Err(Errno::ENOTDIR) => {
            return Ok(Found::Foreign(format!(
                "{SNAPSHOTS}/{name} is not a directory"
            )))
        }
        Err(e) => return Err(sys_err(format!("opening {SNAPSHOTS}/{name}"), e)),
    };
    let m: Option<SnapMarker> = read_json(files, &dir, SNAP_MARKER)
        .map_err(|e| sys_err(format!("reading the marker of {SNAPSHOTS}/{name}"), e))?;
    Ok(match m {
        Some(m) if m.id == id => Found::Ours(m, dir),
        Some(m) => Found::Foreign(format!(
            "{SNAPSHOTS}/{name} is snapshot {} (named {})",
            m.id, m.name
        )),
        None => Found::Foreign(format!(
            "{SNAPSHOTS}/{name} has no Berth snapshot marker ({SNAP_MARKER})"
        )),
    })
}

/// Removes the unfinished copy `.berth-new-<key>` of snapshot `id`: only
/// when its marker names `id`, or when it is empty (a crash before its
/// marker was written). Anything else is left as it is (warned).
fn remove_unfinished(files: &dyn Files, area: &OwnedFd, key: &str, id: &str) -> Result<()> {
    let tmp = new_name(key);
    match look(files, area, &tmp, id)? {
        Found::Missing => Ok(()),
        Found::Ours(m, dir) => remove_marked(files, area, &tmp, &dir, &tmp, SNAP_MARKER, &m),
        Found::Foreign(why) => {
            remove_if_empty(files, area, &tmp, id, &why);
            Ok(())
        }
    }
}

/// Removes the directory `name` of the snapshot area if it is empty (a
/// crash before its marker was written, or after it was removed: the area
/// and its names are Berth's own, and an empty directory holds nothing);
/// anything else is left as it is, warned with `why`.
fn remove_if_empty(files: &dyn Files, area: &OwnedFd, name: &str, id: &str, why: &str) {
    match files.remove_dir(&fd_path(area, name)) {
        Ok(()) => {
            tracing::info!(snapshot_id = %id, "removed the empty, unmarked {SNAPSHOTS}/{name} a cut-short make or delete left")
        }
        Err(e) if e.errno() == Some(libc::ENOENT) => {}
        Err(_) => tracing::warn!(snapshot_id = %id, "{why}; left as it is"),
    }
}

/// Makes snapshot `marker.id` (`sid`) of the volume `vol` (`vol_id`, whose
/// directory is `vol.subdir` below `root`, the share's working mount);
/// returns the marker of the complete snapshot. A complete snapshot with
/// the same id, name and source already there is the answer (a retry after
/// the records were lost); one with another name or source is
/// ALREADY_EXISTS and is left as it is.
pub fn make(
    files: &dyn Files,
    root: &Path,
    sid: &SnapshotId,
    vol: &VolumeId,
    marker: &SnapMarker,
) -> Result<SnapMarker> {
    let rootfd = open_root(root)?;
    let src = open_volume(files, &rootfd, &vol.subdir, &marker.source_volume_id)?;
    let Some(area) = open_area(files, &rootfd, true)? else {
        return Err(Error::Internal(format!("no {SNAPSHOTS} on the share")));
    };
    match look(files, &area, &sid.key, &marker.id)? {
        Found::Ours(m, _)
            if m.name == marker.name && m.source_volume_id == marker.source_volume_id =>
        {
            tracing::info!(snapshot_id = %marker.id, "the snapshot is on the share already");
            return Ok(m);
        }
        Found::Ours(m, _) => {
            return Err(Error::Conflict(format!(
                "snapshot {} on the share is named {} of volume {}, not {} of {}",
                m.id, m.name, m.source_volume_id, marker.name, marker.source_volume_id
            )))
        }
        Found::Foreign(why) => {
            return Err(Error::Conflict(format!(
                "{why}: the snapshot cannot be made there"
            )))
        }
        Found::Missing => {}
    }
    remove_unfinished(files, &area, &sid.key, &marker.id)?;
    let tmp = new_name(&sid.key);
    files
        .create_dir(&fd_path(&area, &tmp), 0o700)
        .map_err(|e| Error::os(format!("creating {SNAPSHOTS}/{tmp} on the share"), e))?;
    let dir =
        open_dir(&area, &tmp).map_err(|e| sys_err(format!("opening {SNAPSHOTS}/{tmp}"), e))?;
    write_json(files, &dir, SNAP_MARKER, marker)
        .map_err(|e| Error::os(format!("writing the marker of {SNAPSHOTS}/{tmp}"), e))?;
    let data = fd_path(&dir, DATA);
    files
        .create_dir(&data, 0o700)
        .map_err(|e| Error::os(format!("creating {SNAPSHOTS}/{tmp}/{DATA}"), e))?;
    // Through the directory ("N/."), not the descriptor's link.
    let from = fd_path(&src, ".");
    let stats = files
        .copy_into(&from, &data, &[MARKER])
        .map_err(|e| copy_error(format!("copying {} into its snapshot", vol.subdir), e))?;
    rename_new(files, &fd_path(&area, &tmp), &fd_path(&area, &sid.key))
        .and_then(|_| files.sync_dir(&fd_path(&area, "")))
        .map_err(|e| Error::os(format!("naming {SNAPSHOTS}/{}", sid.key), e))?;
    tracing::info!(snapshot_id = %marker.id, from = %vol.subdir, cloned = stats.cloned, copied = stats.copied, bytes = stats.bytes, links = stats.links, "snapshot made");
    Ok(marker.clone())
}

/// Removes snapshot `id` (`key` in the area below `root`) and what an
/// interrupted making of it left: only directories whose marker names
/// `id`, and an empty unmarked directory at its name (a delete cut short
/// between marker and directory). Anything else is left as it is
/// (success, warned). Missing is success (`Seen::Absent`: the caller
/// checks that the share is really the share).
pub fn remove(files: &dyn Files, root: &Path, key: &str, id: &str) -> Result<Seen> {
    let rootfd = open_root(root)?;
    let Some(area) = open_area(files, &rootfd, false)? else {
        return Ok(Seen::Absent);
    };
    remove_unfinished(files, &area, key, id)?;
    match look(files, &area, key, id)? {
        Found::Missing => Ok(Seen::Absent),
        Found::Ours(m, dir) => {
            remove_marked(
                files,
                &area,
                key,
                &dir,
                &format!("{SNAPSHOTS}/{key}"),
                SNAP_MARKER,
                &m,
            )?;
            tracing::info!(snapshot_id = %id, "snapshot removed from the share");
            Ok(Seen::There)
        }
        Found::Foreign(why) => {
            remove_if_empty(
                files,
                &area,
                key,
                id,
                &format!("{why}; not Berth's copy of this snapshot"),
            );
            Ok(Seen::There)
        }
    }
}

/// The marker of the complete snapshot `id` (`key` below `root`), if it is
/// there.
pub fn find(files: &dyn Files, root: &Path, key: &str, id: &str) -> Result<Option<SnapMarker>> {
    let rootfd = open_root(root)?;
    let area = match open_dir(&rootfd, SNAPSHOTS) {
        Ok(a) => a,
        Err(Errno::ENOENT) | Err(Errno::ELOOP) | Err(Errno::ENOTDIR) => return Ok(None),
        Err(e) => return Err(sys_err(format!("opening {SNAPSHOTS} on the share"), e)),
    };
    Ok(match look(files, &area, key, id)? {
        Found::Ours(m, _) => Some(m),
        _ => None,
    })
}

/// Opens the copy (`data/`) of the complete snapshot `id` below the open
/// share root: FAILED_PRECONDITION when it is missing or not Berth's.
pub fn open_data(files: &dyn Files, root: &OwnedFd, key: &str, id: &str) -> Result<OwnedFd> {
    let gone = |why: String| {
        Error::WrongState(format!(
            "the copy of snapshot {id} is not usable on the share: {why}"
        ))
    };
    let area = match open_dir(root, SNAPSHOTS) {
        Ok(a) => a,
        Err(Errno::ENOENT) => return Err(gone(format!("{SNAPSHOTS} is missing"))),
        Err(Errno::ELOOP) | Err(Errno::ENOTDIR) => return Err(not_a_dir(SNAPSHOTS)),
        Err(e) => return Err(sys_err(format!("opening {SNAPSHOTS} on the share"), e)),
    };
    match look(files, &area, key, id)? {
        Found::Ours(_, dir) => match open_dir(&dir, DATA) {
            Ok(d) => Ok(d),
            Err(e) => Err(gone(format!("{SNAPSHOTS}/{key}/{DATA}: {e}"))),
        },
        Found::Missing => Err(gone(format!("{SNAPSHOTS}/{key} is missing"))),
        Found::Foreign(why) => Err(gone(why)),
    }
}
