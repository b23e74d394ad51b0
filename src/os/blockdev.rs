//! Block devices: what a path is (`stat` following links, `BLKGETSIZE64`),
//! whether it can be read, its stable `/dev/disk/by-id` name, and zeroing a
//! whole device (`BLKZEROOUT`).
use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::OsError;

/// A block device as found at a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The device node the path resolves to (symlinks followed).
    pub path: PathBuf,
    pub major: u32,
    pub minor: u32,
    pub size_bytes: u64,
}

/// Block device queries. Real: `RealBlockDevices`; fake: `fake::FakeOs`.
pub trait BlockDevices: Send + Sync {
    /// Follows symlinks; ENOTBLK when `path` is not a block device.
    fn inspect(&self, path: &Path) -> Result<DeviceInfo, OsError>;
    /// A `/dev/disk/by-id` link to the device, if udev made one.
    fn stable_link(&self, dev: &DeviceInfo) -> Option<PathBuf>;
    /// Reads the first 4 KiB: proves the device answers before anything is
    /// decided from a probe of it (blkid reports "nothing found" for a device
    /// it cannot read), and returns them (a superblock lives there).
    fn read_head(&self, path: &Path) -> Result<Vec<u8>, OsError>;
    /// Whether another process holds the device exclusively (an O_EXCL
    /// open fails with EBUSY: a mounted filesystem, a running mkfs or
    /// fsck, a device-mapper or md user), in any mount namespace.
    fn held(&self, path: &Path) -> Result<bool, OsError>;
    /// Zeroes the whole device at `path`, which must be `size_bytes` long.
    /// Opened exclusively (O_EXCL on a block device: EBUSY while anything
    /// mounts or holds it), then flushed.
    fn zero_out(&self, path: &Path, size_bytes: u64) -> Result<(), OsError>;
}

nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
// BLKZEROOUT is _IO(0x12, 127) but takes a pointer to {start, length}.
nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);

/// Bytes zeroed per BLKZEROOUT call: small enough that progress is logged
/// and a kill is noticed between calls on a slow disk.
const ZERO_CHUNK: u64 = 1 << 30;

/// The real devices.
#[derive(Debug, Clone)]
pub struct RealBlockDevices {
    pub by_id: PathBuf,
}

impl Default for RealBlockDevices {
    fn default() -> Self {
        RealBlockDevices {
            by_id: PathBuf::from("/dev/disk/by-id"),
        }
    }
}

impl BlockDevices for RealBlockDevices {
    fn inspect(&self, path: &Path) -> Result<DeviceInfo, OsError> {
        let canonical =
            std::fs::canonicalize(path).map_err(|e| OsError::sys("resolve", path, e))?;
        let m = std::fs::metadata(&canonical).map_err(|e| OsError::sys("stat", path, e))?;
        if !m.file_type().is_block_device() {
            return Err(OsError::sys(
                "not a block device",
                path,
                std::io::Error::from_raw_os_error(libc::ENOTBLK),
            ));
        }
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&canonical)
            .map_err(|e| OsError::sys("open", &canonical, e))?;
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
        unsafe { blkgetsize64(std::os::fd::AsRawFd::as_raw_fd(&f), &mut size) }
            .map_err(|e| OsError::sys("BLKGETSIZE64", &canonical, e))?;
        let rdev = m.rdev();
        Ok(DeviceInfo {
            path: canonical,
            major: nix::sys::stat::major(rdev) as u32,
            minor: nix::sys::stat::minor(rdev) as u32,
            size_bytes: size,
        })
    }

    fn stable_link(&self, dev: &DeviceInfo) -> Option<PathBuf> {
        let mut links: Vec<PathBuf> = std::fs::read_dir(&self.by_id)
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| std::fs::canonicalize(p).ok().as_deref() == Some(dev.path.as_path()))
            .collect();
        // Prefer names that do not depend on the bus path; stable order.
        links.sort_by_key(|p| {
            let n = p.file_name().map(|n| n.to_string_lossy().into_owned());
            (n.as_deref().is_some_and(|n| n.starts_with("wwn-")), n)
        });
        links.into_iter().next()
    }

    fn read_head(&self, path: &Path) -> Result<Vec<u8>, OsError> {
        let mut f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| OsError::sys("open", path, e))?;
        let mut buf = vec![0u8; 4096];
        f.read_exact(&mut buf)
            .map_err(|e| OsError::sys("read", path, e))?;
        Ok(buf)
    }

    fn held(&self, path: &Path) -> Result<bool, OsError> {
        match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_EXCL)
            .open(path)
        {
            Ok(_) => Ok(false),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(true),
            Err(e) => Err(OsError::sys("open exclusively", path, e)),
        }
    }

    fn zero_out(&self, path: &Path, size_bytes: u64) -> Result<(), OsError> {
        let f = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_EXCL)
            .open(path)
            .map_err(|e| OsError::sys("open exclusively", path, e))?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
        unsafe { blkgetsize64(fd, &mut size) }
            .map_err(|e| OsError::sys("BLKGETSIZE64", path, e))?;
        if size != size_bytes {
            return Err(OsError::sys(
                "size changed",
                path,
                std::io::Error::other(format!("{size} bytes, expected {size_bytes}")),
            ));
        }
        let started = std::time::Instant::now();
        let mut done = 0;
        while done < size {
            let len = ZERO_CHUNK.min(size - done);
            let range = [done, len];
            // SAFETY: BLKZEROOUT reads two u64 (start, length) through the
            // pointer, which lives for the call.
            unsafe { blkzeroout(fd, &range) }.map_err(|e| OsError::sys("BLKZEROOUT", path, e))?;
            done += len;
            if started.elapsed().as_secs() >= 10 && (done / ZERO_CHUNK) % 16 == 0 {
                tracing::info!(device = %path.display(), done, size, "zeroing");
            }
        }
        f.sync_all().map_err(|e| OsError::sys("fsync", path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_files_are_not_block_devices() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("disk");
        std::fs::write(&f, b"x").unwrap();
        let e = RealBlockDevices::default().inspect(&f).unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENOTBLK));
        assert!(RealBlockDevices::default()
            .inspect(&t.path().join("missing"))
            .is_err());
    }
}
