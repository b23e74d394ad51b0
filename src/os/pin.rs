//! One filesystem object held open by an `O_PATH` descriptor, so that a
//! mount binds the object Berth looked at rather than whatever its path
//! names by then: open(2) with `O_PATH | O_NOFOLLOW | O_CLOEXEC` (plus
//! `O_DIRECTORY` for a directory), statx(2) of the descriptor, and the
//! descriptor's magic link `/proc/self/fd/<n>` as the bind's source
//! (mount(2) with `MS_BIND`, and open_tree(2), follow it to the opened
//! object itself, on the mount it was opened on). A read: changes nothing.
use std::fs::{File, Metadata};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{open, OFlag};
use nix::sys::stat::Mode;

use super::OsError;

/// An object opened without following a symlink at its path, and what
/// statx showed of it. Dropping it closes the descriptor.
#[derive(Debug)]
pub struct Pinned {
    pub(crate) file: File,
    /// The type bits of its mode (`S_IFMT`).
    pub(crate) kind: u32,
    /// Device and inode numbers (what a bind of it shows).
    pub(crate) id: (u64, u64),
    /// Whether it is the root of its mount (a path with a mount on it
    /// opens as that mount's root); None: the kernel cannot tell.
    pub(crate) mount_root: Option<bool>,
    /// The id of the mount it was opened on (mountinfo's first field);
    /// None: the kernel cannot tell (before 5.8).
    pub(crate) mount_id: Option<u64>,
}

impl Pinned {
    /// The path that reaches the object through its descriptor
    /// (`/proc/self/fd/<n>`), valid while this lives.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }

    /// Whether the object is the one `seen` (an lstat of its path made
    /// before) showed: the same type, device and inode.
    pub fn is(&self, seen: &Metadata) -> bool {
        self.kind == seen.mode() & libc::S_IFMT && self.id == (seen.dev(), seen.ino())
    }

    /// Device and inode numbers, as `MountProbe::identity` gives them.
    pub fn identity(&self) -> (u64, u64) {
        self.id
    }

    /// Whether it is the root of the mount `id` (false when the kernel
    /// cannot tell the mount, or that it is a mount root).
    pub fn is_root_of(&self, id: u64) -> bool {
        self.mount_root == Some(true) && self.mount_id == Some(id)
    }

    /// Whether it is the root of a mount (None: cannot tell).
    pub fn mount_root(&self) -> Option<bool> {
        self.mount_root
    }

    /// The id of the mount it was opened on (None: cannot tell).
    pub fn mount_id(&self) -> Option<u64> {
        self.mount_id
    }
}

/// Opens `path` itself, never through a symlink at it (one there is
/// opened as the symlink, or refused with ENOTDIR when `dir`), as an
/// `O_PATH` descriptor, and statx's the descriptor.
pub fn pin(path: &Path, dir: bool) -> Result<Pinned, OsError> {
    let mut flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    if dir {
        flags |= OFlag::O_DIRECTORY;
    }
    let fd = open(path, flags, Mode::empty()).map_err(|e| OsError::sys("open", path, e))?;
    let file = File::from(fd);
    let stx = super::mountpoint::fd_statx(&file, libc::STATX_BASIC_STATS | libc::STATX_MNT_ID)
        .map_err(|e| OsError::sys("statx", path, e))?;
    let id = super::mountpoint::identity_of(&stx)
        .ok_or_else(|| OsError::sys("statx", path, std::io::Error::from_raw_os_error(libc::EIO)))?;
    Ok(Pinned {
        file,
        kind: u32::from(stx.stx_mode) & libc::S_IFMT,
        id,
        mount_root: super::mountpoint::is_mount_root(&stx),
        mount_id: (stx.stx_mask & libc::STATX_MNT_ID != 0).then_some(stx.stx_mnt_id),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_the_object_and_never_follows_a_symlink_at_its_path() {
        let d = tempfile::tempdir().unwrap();
        let (a, b, link) = (d.path().join("a"), d.path().join("b"), d.path().join("l"));
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        std::os::unix::fs::symlink(&b, &link).unwrap();
        let seen = std::fs::symlink_metadata(&a).unwrap();
        let p = pin(&a, true).unwrap();
        assert!(p.is(&seen));
        assert_eq!(p.mount_root(), Some(false));
        // Moved away and another directory put at its path: the
        // descriptor still reaches the one opened.
        std::fs::rename(&a, d.path().join("moved")).unwrap();
        std::fs::create_dir(&a).unwrap();
        assert_eq!(
            std::fs::read_link(p.path()).unwrap(),
            d.path().join("moved")
        );
        assert!(!pin(&a, true).unwrap().is(&seen));
        // A symlink: refused as a directory, opened as itself otherwise.
        let e = pin(&link, true).unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENOTDIR));
        let l = pin(&link, false).unwrap();
        assert_eq!(l.kind, libc::S_IFLNK);
        assert!(!l.is(&std::fs::symlink_metadata(&b).unwrap()));
        // "/" is a mount root, on the mount of its own id.
        let r = pin(Path::new("/"), true).unwrap();
        assert_eq!(r.mount_root(), Some(true));
        assert!(r.mount_id().is_some_and(|id| r.is_root_of(id)));
    }
}
