//! statx(2) with STATX_ATTR_MOUNT_ROOT: the cheap "is something mounted
//! exactly here?" probe, answered by the kernel for one path without reading
//! the whole mount table.
//!
//! The answer is the kernel's own (the VFS sets the attribute when the path
//! resolves to the root of a mount), not a comparison of device numbers, so
//! bind mounts of the same filesystem are seen. Only a definite answer counts:
//! an error other than ENOENT (a broken NFS/FUSE mount answers EIO, ENOTCONN
//! or ESTALE) or a kernel older than 5.8, which does not report the
//! attribute, is "don't know", and callers then decide from mountinfo.
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The mount-root probe. Real: `StatxMountProbe`; fake: `fake::FakeOs`.
pub trait MountProbe: Send + Sync {
    /// Whether something is mounted exactly at `path`: `Some(true)` when
    /// `path` is the root of a mount (the top one, if several are stacked;
    /// "/" is one), `Some(false)` when it is not or when nothing exists at
    /// `path`, and `None` when the kernel cannot tell (an error, or no
    /// support for the attribute): read mountinfo then.
    fn mount_root(&self, path: &Path) -> Option<bool>;
    /// What `path` shows, following the mounts on it (not a symlink at it):
    /// its device and inode numbers; None when the kernel cannot tell. A
    /// bind mount shows the directory it binds, so a staging path bound
    /// from a volume's directory has that directory's identity.
    fn identity(&self, path: &Path) -> Option<(u64, u64)>;
    /// The mount whose root `path` is, by its mount id (mountinfo's first
    /// field; the top one if several are stacked): `Some(Some(id))`;
    /// `Some(None)` when `path` is not a mount root or does not exist;
    /// `None` when the kernel cannot tell. Symlinks in the parent
    /// components are followed (as mount and umount follow them), so a
    /// path whose text differs from mountinfo's is still matched.
    fn root_mount_id(&self, path: &Path) -> Option<Option<u64>>;
    /// `mount_root` and `identity` of `path` from one look (one statx on a
    /// node, where the two calls make two of the same): the same answers.
    fn root_and_identity(&self, path: &Path) -> (Option<bool>, Option<(u64, u64)>) {
        (self.mount_root(path), self.identity(path))
    }
}

/// The real probe: statx(2).
pub struct StatxMountProbe;

/// statx(2) of `path`. AT_SYMLINK_NOFOLLOW: a symlink at `path` is looked
/// at itself, like umount2(UMOUNT_NOFOLLOW) does (mounts on `path` are
/// still followed). AT_STATX_DONT_SYNC: the filesystem may answer from
/// cached attributes (no round trip to an NFS server or FUSE daemon); the
/// mount-root attribute comes from the VFS, not from the filesystem, and
/// device and inode numbers never change, so the answer is exact either way.
fn statx(path: &Path, mask: u32) -> std::io::Result<libc::statx> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: `c` is a NUL-terminated string and `stx` a buffer of the size
    // the kernel writes; both live for the duration of the call.
    let r = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW | libc::AT_STATX_DONT_SYNC,
            mask,
            stx.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statx succeeded and filled the buffer (which was zeroed
    // before, so every field is initialised either way).
    Ok(unsafe { stx.assume_init() })
}

/// Whether the directory open at `fd` is the root of a mount (None: the
/// kernel cannot tell), from statx(2) of the descriptor itself
/// (AT_EMPTY_PATH): nothing is resolved by name.
pub fn fd_is_mount_root(fd: &impl std::os::fd::AsFd) -> Option<bool> {
    is_mount_root(&fd_statx(fd, libc::STATX_BASIC_STATS).ok()?)
}

/// statx(2) of the descriptor `fd` itself (AT_EMPTY_PATH): nothing is
/// resolved by name.
pub fn fd_statx(fd: &impl std::os::fd::AsFd, mask: u32) -> std::io::Result<libc::statx> {
    use std::os::fd::AsRawFd;
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: the path is a NUL-terminated empty string, `stx` a buffer of
    // the size the kernel writes; both live for the duration of the call.
    let r = unsafe {
        libc::statx(
            fd.as_fd().as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_STATX_DONT_SYNC,
            mask,
            stx.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statx succeeded and filled the (zeroed) buffer.
    Ok(unsafe { stx.assume_init() })
}

/// Whether `stx` says `path` is a mount root (None: cannot tell).
pub(super) fn is_mount_root(stx: &libc::statx) -> Option<bool> {
    let bit = libc::STATX_ATTR_MOUNT_ROOT as u64;
    if stx.stx_attributes_mask & bit == 0 {
        return None;
    }
    Some(stx.stx_attributes & bit != 0)
}

impl MountProbe for StatxMountProbe {
    fn mount_root(&self, path: &Path) -> Option<bool> {
        match statx(path, libc::STATX_BASIC_STATS) {
            Ok(stx) => is_mount_root(&stx),
            // Nothing exists there, so nothing is mounted there.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Some(false),
            Err(_) => None,
        }
    }

    fn root_mount_id(&self, path: &Path) -> Option<Option<u64>> {
        let stx = match statx(path, libc::STATX_BASIC_STATS | libc::STATX_MNT_ID) {
            Ok(s) => s,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Some(None),
            Err(_) => return None,
        };
        if !is_mount_root(&stx)? {
            return Some(None);
        }
        // Kernels before 5.8 do not fill it in.
        if stx.stx_mask & libc::STATX_MNT_ID == 0 {
            return None;
        }
        Some(Some(stx.stx_mnt_id))
    }

    fn identity(&self, path: &Path) -> Option<(u64, u64)> {
        identity_of(&statx(path, libc::STATX_BASIC_STATS).ok()?)
    }

    fn root_and_identity(&self, path: &Path) -> (Option<bool>, Option<(u64, u64)>) {
        match statx(path, libc::STATX_BASIC_STATS) {
            Ok(stx) => (is_mount_root(&stx), identity_of(&stx)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => (Some(false), None),
            Err(_) => (None, None),
        }
    }
}

/// The device and inode numbers `stx` holds (None: the kernel did not say).
pub(super) fn identity_of(stx: &libc::statx) -> Option<(u64, u64)> {
    if stx.stx_mask & libc::STATX_INO == 0 {
        return None;
    }
    let dev = libc::makedev(stx.stx_dev_major, stx.stx_dev_minor);
    Some((dev, stx.stx_ino))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_a_mount_root_and_missing_paths_are_not() {
        // Kernels before 5.8 answer None everywhere; nothing else to check.
        if let Some(root) = StatxMountProbe.mount_root(Path::new("/")) {
            assert!(root);
            let dir = tempfile::tempdir().unwrap();
            assert_eq!(
                StatxMountProbe.mount_root(&dir.path().join("missing")),
                Some(false)
            );
            assert_eq!(
                StatxMountProbe.mount_root(&dir.path().join("missing/deeper")),
                Some(false)
            );
            // A fresh subdirectory is never a mount point.
            let sub = dir.path().join("sub");
            std::fs::create_dir(&sub).unwrap();
            assert_eq!(StatxMountProbe.mount_root(&sub), Some(false));
            assert_eq!(StatxMountProbe.root_mount_id(&sub), Some(None));
            assert_eq!(StatxMountProbe.root_mount_id(&sub.join("x")), Some(None));
            // "/" is a mount root, and its id is the one mountinfo gives.
            let id = StatxMountProbe
                .root_mount_id(Path::new("/"))
                .unwrap()
                .unwrap();
            let table = crate::os::ProcMountTable::default();
            use crate::os::MountTable;
            let t = table.mounts().unwrap();
            let e = t.iter().find(|m| u64::from(m.id) == id).unwrap();
            assert_eq!(e.mount_point, Path::new("/"));
        }
    }

    #[test]
    fn one_look_answers_as_the_two_probes_do() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        for path in [
            Path::new("/").to_path_buf(),
            dir.path().to_path_buf(),
            file.clone(),
            link.clone(),
            dir.path().join("missing"),
            file.join("below-a-file"),
        ] {
            let probe = StatxMountProbe;
            assert_eq!(
                probe.root_and_identity(&path),
                (probe.mount_root(&path), probe.identity(&path)),
                "{}",
                path.display()
            );
        }
        // Something is there to tell: not everything answered None.
        assert!(StatxMountProbe.root_and_identity(dir.path()).1.is_some());
    }
}
