//! mount(2) and umount2(2).
use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::OsError;

/// Per-mount flags Berth sets on bind mounts; they map 1:1 to `MS_*` flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MountFlags {
    pub readonly: bool,
    pub nosuid: bool,
    pub nodev: bool,
    pub noexec: bool,
    pub noatime: bool,
    pub nodiratime: bool,
    pub relatime: bool,
}

impl MountFlags {
    pub fn to_ms(self) -> MsFlags {
        let mut f = MsFlags::empty();
        for (on, flag) in [
            (self.readonly, MsFlags::MS_RDONLY),
            (self.nosuid, MsFlags::MS_NOSUID),
            (self.nodev, MsFlags::MS_NODEV),
            (self.noexec, MsFlags::MS_NOEXEC),
            (self.noatime, MsFlags::MS_NOATIME),
            (self.nodiratime, MsFlags::MS_NODIRATIME),
            (self.relatime, MsFlags::MS_RELATIME),
        ] {
            if on {
                f |= flag;
            }
        }
        f
    }

    /// True when nothing beyond a plain bind mount is asked for.
    pub fn is_plain(self) -> bool {
        self == MountFlags::default()
    }

    /// Union of two flag sets (a remount must keep the flags a mount already
    /// has, or the kernel refuses or silently drops them).
    pub fn union(self, o: MountFlags) -> MountFlags {
        MountFlags {
            readonly: self.readonly || o.readonly,
            nosuid: self.nosuid || o.nosuid,
            nodev: self.nodev || o.nodev,
            noexec: self.noexec || o.noexec,
            noatime: self.noatime || o.noatime,
            nodiratime: self.nodiratime || o.nodiratime,
            relatime: self.relatime || o.relatime,
        }
    }
}

/// Mount operations. Real: `RealMounter`; fake: `fake::FakeOs`.
pub trait Mounter: Send + Sync {
    /// Bind-mounts `source` on `target` (both must exist), then, when `flags`
    /// asks for anything, remounts the bind with those flags plus the ones the
    /// new mount already carries (a bind ignores MS_RDONLY on the first call).
    fn bind(&self, source: &Path, target: &Path, flags: MountFlags) -> Result<(), OsError>;
    /// Mounts a filesystem of `fstype` from `source` on `target`.
    fn mount_fs(
        &self,
        source: &Path,
        target: &Path,
        fstype: &str,
        flags: MountFlags,
        data: &str,
    ) -> Result<(), OsError>;
    /// Unmounts the topmost mount at `target` (no lazy or forced unmount).
    fn unmount(&self, target: &Path) -> Result<(), OsError>;
}

/// The real mount(2)/umount2(2).
pub struct RealMounter;

impl RealMounter {
    fn remount(target: &Path, flags: MountFlags) -> Result<(), OsError> {
        // Keep what the mount already has (nosuid, nodev, ... inherited from
        // the source): a remount without them would drop them or fail.
        let existing =
            nix::sys::statvfs::statvfs(target).map_err(|e| OsError::sys("statvfs", target, e))?;
        let have = statvfs_flags(existing.flags());
        let all = flags.union(have).to_ms();
        mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | all,
            None::<&str>,
        )
        .map_err(|e| OsError::sys("remount", target, e))
    }
}

fn statvfs_flags(f: nix::sys::statvfs::FsFlags) -> MountFlags {
    use nix::sys::statvfs::FsFlags as F;
    MountFlags {
        readonly: f.contains(F::ST_RDONLY),
        nosuid: f.contains(F::ST_NOSUID),
        nodev: f.contains(F::ST_NODEV),
        noexec: f.contains(F::ST_NOEXEC),
        noatime: f.contains(F::ST_NOATIME),
        nodiratime: f.contains(F::ST_NODIRATIME),
        relatime: f.contains(F::ST_RELATIME),
    }
}

impl Mounter for RealMounter {
    fn bind(&self, source: &Path, target: &Path, flags: MountFlags) -> Result<(), OsError> {
        mount(
            Some(source),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| OsError::sys("bind mount", target, e))?;
        if flags.is_plain() {
            return Ok(());
        }
        if let Err(e) = Self::remount(target, flags) {
            // Never leave a writable mount where a read-only one was asked for.
            let _ = umount2(target, MntFlags::UMOUNT_NOFOLLOW);
            return Err(e);
        }
        Ok(())
    }

    fn mount_fs(
        &self,
        source: &Path,
        target: &Path,
        fstype: &str,
        flags: MountFlags,
        data: &str,
    ) -> Result<(), OsError> {
        let data = if data.is_empty() { None } else { Some(data) };
        mount(Some(source), target, Some(fstype), flags.to_ms(), data)
            .map_err(|e| OsError::sys("mount", target, e))
    }

    fn unmount(&self, target: &Path) -> Result<(), OsError> {
        umount2(target, MntFlags::UMOUNT_NOFOLLOW).map_err(|e| OsError::sys("unmount", target, e))
    }
}
