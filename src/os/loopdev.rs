//! Loop devices: attach a file (`LOOP_CONFIGURE`, falling back to
//! `LOOP_SET_FD` + `LOOP_SET_STATUS64` on kernels without it), detach
//! (`LOOP_CLR_FD`), `LOOP_SET_CAPACITY`, and the list of attachments as the
//! kernel reports them in `/sys/block/loop*/loop/`.
//!
//! `LOOP_CLR_FD` on a device somebody still holds open returns 0 and only
//! sets autoclear, so `detach` succeeding proves nothing: callers look at
//! `list()` afterwards (the block kind does, and treats a device still bound
//! as an error to retry). Berth never sets autoclear itself.
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::OsError;

/// One bound loop device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopInfo {
    /// The device node, `/dev/loopN`.
    pub device: PathBuf,
    pub major: u32,
    pub minor: u32,
    /// The backing file as sysfs shows it (without a " (deleted)" suffix).
    pub backing_file: PathBuf,
    /// The backing file was unlinked while attached.
    pub backing_deleted: bool,
    pub read_only: bool,
    pub autoclear: bool,
    pub direct_io: bool,
}

/// What `LOOP_GET_STATUS64` tells of a bound loop device: the file behind
/// it (its filesystem's device number and its inode number) and the part
/// of that file it shows (from `offset`, at most `sizelimit` bytes; 0: to
/// the file's end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopStatus {
    pub dev: u64,
    pub ino: u64,
    pub offset: u64,
    pub sizelimit: u64,
}

/// How to attach a file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttachOptions {
    pub read_only: bool,
    /// Ask for direct I/O (no second page cache) when the backing filesystem
    /// supports O_DIRECT; silently buffered otherwise.
    pub direct_io: bool,
}

/// Loop device operations. Real: `RealLoopDevices`; fake: `fake::FakeOs`.
pub trait LoopDevices: Send + Sync {
    /// Every bound loop device.
    fn list(&self) -> Result<Vec<LoopInfo>, OsError>;
    /// The file backing `device` and the part of it the device shows
    /// (`LOOP_GET_STATUS64`).
    fn status(&self, device: &Path) -> Result<LoopStatus, OsError>;
    /// Device and inode number of the file backing `device` (`status`),
    /// to match an attachment to a file whatever path sysfs shows for it.
    fn backing_id(&self, device: &Path) -> Result<(u64, u64), OsError> {
        self.status(device).map(|s| (s.dev, s.ino))
    }
    /// Attaches `file` to a free loop device (never with autoclear).
    fn attach(&self, file: &Path, opts: AttachOptions) -> Result<LoopInfo, OsError>;
    /// `LOOP_CLR_FD`. Ok also when the kernel only set autoclear on a busy
    /// device: check `list()` afterwards. A device that is not bound is Ok.
    fn detach(&self, device: &Path) -> Result<(), OsError>;
    /// Clears the autoclear flag (after a detach of a busy device set it).
    fn clear_autoclear(&self, device: &Path) -> Result<(), OsError>;
    /// `LOOP_SET_CAPACITY`: the device takes the backing file's new size.
    fn set_capacity(&self, device: &Path) -> Result<(), OsError>;
}

// <linux/loop.h>
const LOOP_SET_FD: u64 = 0x4C00;
const LOOP_CLR_FD: u64 = 0x4C01;
const LOOP_SET_STATUS64: u64 = 0x4C04;
const LOOP_GET_STATUS64: u64 = 0x4C05;
const LOOP_SET_CAPACITY: u64 = 0x4C07;
const LOOP_SET_DIRECT_IO: u64 = 0x4C08;
const LOOP_CONFIGURE: u64 = 0x4C0A;
const LOOP_CTL_GET_FREE: u64 = 0x4C82;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;
const LO_NAME_SIZE: usize = 64;

/// Every loop device Berth attaches has 512-byte logical sectors, always.
/// Asked for 0, the kernel (6.x) takes the backing file's direct-I/O
/// alignment instead, which changes over a volume's life: a file on xfs
/// with reflink shares extents after its first snapshot or when it is a
/// restore or a clone, and its alignment becomes the filesystem's block
/// (4096). The device then came up with 4096-byte sectors, and an ext4
/// with 1 KiB blocks or an xfs made on 512-byte sectors no longer mounted
/// (EINVAL, ENOSYS), and a raw volume changed its sector size under the
/// pod. With 512 asked, the kernel does direct I/O only where the file
/// allows it and buffered I/O otherwise. Kernels before LOOP_CONFIGURE
/// (5.8) always gave 512.
const SECTOR: u32 = 512;

#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

impl LoopInfo64 {
    fn zeroed() -> Self {
        LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: 0,
            lo_file_name: [0; LO_NAME_SIZE],
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        }
    }

    fn for_file(file: &Path, flags: u32) -> Self {
        let mut info = LoopInfo64::zeroed();
        info.lo_flags = flags;
        // Informational only (losetup shows it); truncated like losetup does.
        let name = file.as_os_str().as_bytes();
        let n = name.len().min(LO_NAME_SIZE - 1);
        info.lo_file_name[..n].copy_from_slice(&name[..n]);
        info
    }
}

/// ioctl with an integer or pointer argument; the errno on failure.
fn ioctl(fd: &File, request: u64, arg: libc::c_ulong) -> Result<libc::c_int, std::io::Error> {
    // SAFETY: every request used here takes an integer, or a pointer to a
    // structure of the size the kernel expects (checked above), that lives
    // for the duration of the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn get_status(dev: &File) -> Result<LoopInfo64, std::io::Error> {
    let mut info = LoopInfo64::zeroed();
    ioctl(
        dev,
        LOOP_GET_STATUS64,
        &mut info as *mut LoopInfo64 as libc::c_ulong,
    )?;
    Ok(info)
}

/// The real loop driver, through `/dev/loop-control`, `/dev/loopN` and
/// sysfs.
#[derive(Debug, Clone)]
pub struct RealLoopDevices {
    /// `/sys/block`
    pub sysfs: PathBuf,
    /// `/dev`
    pub dev: PathBuf,
}

impl Default for RealLoopDevices {
    fn default() -> Self {
        RealLoopDevices {
            sysfs: PathBuf::from("/sys/block"),
            dev: PathBuf::from("/dev"),
        }
    }
}

fn read_trimmed(p: &Path) -> Option<String> {
    std::fs::read(p).ok().map(|b| {
        let s = OsStr::from_bytes(&b).to_string_lossy().into_owned();
        s.trim_end_matches('\n').to_string()
    })
}

impl RealLoopDevices {
    /// The attachment of one `/sys/block/loopN` directory; None when the
    /// device is not bound.
    pub fn read_one(&self, name: &str) -> Option<LoopInfo> {
        let dir = self.sysfs.join(name);
        let raw = std::fs::read(dir.join("loop/backing_file")).ok()?;
        let mut raw = raw.as_slice();
        if raw.last() == Some(&b'\n') {
            raw = &raw[..raw.len() - 1];
        }
        if raw.is_empty() {
            return None;
        }
        let suffix = b" (deleted)";
        let (path, deleted) = match raw.strip_suffix(suffix) {
            Some(p) => (p, true),
            None => (raw, false),
        };
        let (major, minor) = read_trimmed(&dir.join("dev"))
            .and_then(|s| {
                let (a, b) = s.split_once(':')?;
                Some((a.parse().ok()?, b.parse().ok()?))
            })
            .unwrap_or((7, name.trim_start_matches("loop").parse().unwrap_or(0)));
        let flag = |f: &str| read_trimmed(&dir.join(f)).as_deref() == Some("1");
        Some(LoopInfo {
            device: self.dev.join(name),
            major,
            minor,
            backing_file: PathBuf::from(OsStr::from_bytes(path)),
            backing_deleted: deleted,
            read_only: flag("ro"),
            autoclear: flag("loop/autoclear"),
            direct_io: flag("loop/dio"),
        })
    }

    fn open_dev(&self, device: &Path, write: bool) -> Result<File, OsError> {
        OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(libc::O_CLOEXEC)
            .open(device)
            .map_err(|e| OsError::sys("open", device, e))
    }

    fn name_of(device: &Path) -> Result<String, OsError> {
        device
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| n.starts_with("loop") && n[4..].bytes().all(|b| b.is_ascii_digit()))
            .map(str::to_string)
            .ok_or_else(|| {
                OsError::sys(
                    "loop device",
                    device,
                    std::io::Error::from_raw_os_error(libc::ENODEV),
                )
            })
    }

    /// Binds `file` to the free device `dev`: LOOP_CONFIGURE, or the old
    /// two-step sequence where the kernel lacks it.
    fn bind(dev: &File, file: &File, path: &Path, flags: u32) -> Result<(), std::io::Error> {
        let cfg = LoopConfig {
            fd: file.as_raw_fd() as u32,
            block_size: SECTOR,
            info: LoopInfo64::for_file(path, flags),
            reserved: [0; 8],
        };
        match ioctl(
            dev,
            LOOP_CONFIGURE,
            &cfg as *const LoopConfig as libc::c_ulong,
        ) {
            Ok(_) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && flags & LO_FLAGS_DIRECT_IO != 0 => {
                // Some kernels refuse direct I/O they cannot do; go buffered.
                return Self::bind(dev, file, path, flags & !LO_FLAGS_DIRECT_IO);
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY) | Some(libc::EINVAL)) => {}
            Err(e) => return Err(e),
        }
        // Kernels before 5.8: set the file, then the flags.
        ioctl(dev, LOOP_SET_FD, file.as_raw_fd() as libc::c_ulong)?;
        let info = LoopInfo64::for_file(path, flags & !LO_FLAGS_DIRECT_IO);
        if let Err(e) = ioctl(
            dev,
            LOOP_SET_STATUS64,
            &info as *const LoopInfo64 as libc::c_ulong,
        ) {
            let _ = ioctl(dev, LOOP_CLR_FD, 0);
            return Err(e);
        }
        if flags & LO_FLAGS_DIRECT_IO != 0 {
            let _ = ioctl(dev, LOOP_SET_DIRECT_IO, 1);
        }
        Ok(())
    }
}

/// True when `path` can be opened with O_DIRECT (the loop driver can then
/// do direct I/O on it).
fn supports_direct_io(path: &Path) -> bool {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
        .open(path)
        .is_ok()
}

impl LoopDevices for RealLoopDevices {
    fn list(&self) -> Result<Vec<LoopInfo>, OsError> {
        let rd =
            std::fs::read_dir(&self.sysfs).map_err(|e| OsError::sys("read", &self.sysfs, e))?;
        let mut out = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| OsError::sys("read", &self.sysfs, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if !name.starts_with("loop") {
                continue;
            }
            if let Some(info) = self.read_one(name) {
                out.push(info);
            }
        }
        out.sort_by_key(|i| i.minor);
        Ok(out)
    }

    fn status(&self, device: &Path) -> Result<LoopStatus, OsError> {
        let dev = self.open_dev(device, false)?;
        let info = get_status(&dev).map_err(|e| OsError::sys("LOOP_GET_STATUS64", device, e))?;
        Ok(LoopStatus {
            dev: info.lo_device,
            ino: info.lo_inode,
            offset: info.lo_offset,
            sizelimit: info.lo_sizelimit,
        })
    }

    fn attach(&self, file: &Path, opts: AttachOptions) -> Result<LoopInfo, OsError> {
        let backing = OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(file)
            .map_err(|e| OsError::sys("open", file, e))?;
        let mut flags = 0;
        if opts.read_only {
            flags |= LO_FLAGS_READ_ONLY;
        }
        if opts.direct_io && supports_direct_io(file) {
            flags |= LO_FLAGS_DIRECT_IO;
        }
        let ctl_path = self.dev.join("loop-control");
        let ctl = self.open_dev(&ctl_path, true)?;
        // Another process may take the free device between GET_FREE and
        // CONFIGURE (EBUSY): ask again.
        let mut last = None;
        for _ in 0..64 {
            let n = ioctl(&ctl, LOOP_CTL_GET_FREE, 0)
                .map_err(|e| OsError::sys("LOOP_CTL_GET_FREE", &ctl_path, e))?;
            let name = format!("loop{n}");
            let device = self.dev.join(&name);
            let dev = self.open_dev(&device, !opts.read_only)?;
            match Self::bind(&dev, &backing, file, flags) {
                Ok(()) => {
                    drop(dev);
                    return self.read_one(&name).ok_or_else(|| {
                        OsError::sys(
                            "attach (device not bound after LOOP_CONFIGURE)",
                            &device,
                            std::io::Error::from_raw_os_error(libc::ENXIO),
                        )
                    });
                }
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    last = Some(e);
                    continue;
                }
                Err(e) => return Err(OsError::sys("LOOP_CONFIGURE", &device, e)),
            }
        }
        Err(OsError::sys(
            "attach (every free loop device was taken meanwhile)",
            file,
            last.unwrap_or_else(|| std::io::Error::from_raw_os_error(libc::EBUSY)),
        ))
    }

    fn detach(&self, device: &Path) -> Result<(), OsError> {
        Self::name_of(device)?;
        let dev = match self.open_dev(device, false) {
            Ok(d) => d,
            Err(e) if e.errno() == Some(libc::ENOENT) || e.errno() == Some(libc::ENXIO) => {
                return Ok(())
            }
            Err(e) => return Err(e),
        };
        match ioctl(&dev, LOOP_CLR_FD, 0) {
            Ok(_) => Ok(()),
            // Not bound: nothing to do.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(()),
            Err(e) => Err(OsError::sys("LOOP_CLR_FD", device, e)),
        }
    }

    fn clear_autoclear(&self, device: &Path) -> Result<(), OsError> {
        Self::name_of(device)?;
        let dev = self.open_dev(device, false)?;
        let mut info =
            get_status(&dev).map_err(|e| OsError::sys("LOOP_GET_STATUS64", device, e))?;
        if info.lo_flags & LO_FLAGS_AUTOCLEAR == 0 {
            return Ok(());
        }
        info.lo_flags &= !LO_FLAGS_AUTOCLEAR;
        ioctl(
            &dev,
            LOOP_SET_STATUS64,
            &info as *const LoopInfo64 as libc::c_ulong,
        )
        .map(|_| ())
        .map_err(|e| OsError::sys("LOOP_SET_STATUS64", device, e))
    }

    fn set_capacity(&self, device: &Path) -> Result<(), OsError> {
        Self::name_of(device)?;
        let dev = self.open_dev(device, false)?;
        ioctl(&dev, LOOP_SET_CAPACITY, 0)
            .map(|_| ())
            .map_err(|e| OsError::sys("LOOP_SET_CAPACITY", device, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_sysfs(dir: &Path, name: &str, backing: &[u8], dev: &str, flags: [&str; 3]) {
        let d = dir.join(name);
        std::fs::create_dir_all(d.join("loop")).unwrap();
        std::fs::write(d.join("loop/backing_file"), backing).unwrap();
        std::fs::write(d.join("dev"), dev).unwrap();
        std::fs::write(d.join("ro"), flags[0]).unwrap();
        std::fs::write(d.join("loop/autoclear"), flags[1]).unwrap();
        std::fs::write(d.join("loop/dio"), flags[2]).unwrap();
    }

    #[test]
    fn reads_sysfs_attachments() {
        let t = tempfile::tempdir().unwrap();
        fake_sysfs(
            t.path(),
            "loop3",
            b"/var/lib/berth/block/x y.img\n",
            "7:3\n",
            ["0\n", "0\n", "1\n"],
        );
        fake_sysfs(
            t.path(),
            "loop1",
            b"/tmp/gone.img (deleted)\n",
            "7:1\n",
            ["1\n", "1\n", "0\n"],
        );
        // Unbound: no backing_file.
        std::fs::create_dir_all(t.path().join("loop0/loop")).unwrap();
        std::fs::create_dir_all(t.path().join("vda")).unwrap();
        let l = RealLoopDevices {
            sysfs: t.path().to_path_buf(),
            dev: PathBuf::from("/dev"),
        };
        let v = l.list().unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].device, PathBuf::from("/dev/loop1"));
        assert!(v[0].backing_deleted && v[0].read_only && v[0].autoclear && !v[0].direct_io);
        assert_eq!(v[0].backing_file, PathBuf::from("/tmp/gone.img"));
        assert_eq!(
            (v[1].major, v[1].minor, v[1].backing_file.clone()),
            (7, 3, PathBuf::from("/var/lib/berth/block/x y.img"))
        );
        assert!(!v[1].backing_deleted && v[1].direct_io);
    }

    #[test]
    fn only_loop_device_names_are_accepted() {
        assert!(RealLoopDevices::name_of(Path::new("/dev/loop12")).is_ok());
        for bad in ["/dev/sda", "/dev/loop-control", "/dev/loopx", "/"] {
            assert!(RealLoopDevices::name_of(Path::new(bad)).is_err(), "{bad}");
        }
    }
}
