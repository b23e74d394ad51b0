//! statvfs(3): filesystem size, free space and inodes; stat(2)'s st_dev:
//! which filesystem a path is on.
use std::path::Path;

use super::OsError;

/// Usage of the filesystem holding a path, in bytes and inodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FsUsage {
    pub total_bytes: u64,
    /// Free for an unprivileged user (f_bavail).
    pub available_bytes: u64,
    pub used_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
    pub used_inodes: u64,
}

pub trait FsStats: Send + Sync {
    fn statvfs(&self, path: &Path) -> Result<FsUsage, OsError>;

    /// The device of the filesystem that holds `path` (stat(2)'s
    /// `st_dev`, the path followed): two paths with the same device share
    /// one filesystem and its free space.
    fn device(&self, path: &Path) -> Result<u64, OsError>;
}

pub struct RealFsStats;

impl FsStats for RealFsStats {
    fn statvfs(&self, path: &Path) -> Result<FsUsage, OsError> {
        let s = nix::sys::statvfs::statvfs(path).map_err(|e| OsError::sys("statvfs", path, e))?;
        let frag = s.fragment_size() as u64;
        let total = s.blocks() as u64 * frag;
        let free = s.blocks_free() as u64 * frag;
        let avail = s.blocks_available() as u64 * frag;
        let files = s.files() as u64;
        let ffree = s.files_free() as u64;
        Ok(FsUsage {
            total_bytes: total,
            available_bytes: avail,
            used_bytes: total.saturating_sub(free),
            total_inodes: files,
            free_inodes: ffree,
            used_inodes: files.saturating_sub(ffree),
        })
    }

    fn device(&self, path: &Path) -> Result<u64, OsError> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path)
            .map(|m| m.dev())
            .map_err(|e| OsError::sys("stat", path, e))
    }
}
