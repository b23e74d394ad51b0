//! Block devices: what a path is (`stat` following links, `BLKGETSIZE64`),
//! whether it can be read, its stable `/dev/disk/by-id` name, whether a
//! sample of it reads as zeros, zeroing a whole device or its sample
//! (`BLKZEROOUT`), and the kernel's read-only flag (`BLKROGET`,
//! `BLKROSET`).
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::bounded::Bounded;
use super::OsError;

/// Bytes of each end of a device in its sample: the first and the last MiB
/// (partition tables, their backups, superblocks and labels of every kind
/// live there, and so does what a raw user writes first).
pub const SAMPLE_EDGE: u64 = 1 << 20;
/// Bytes of each spaced block of the sample.
pub const SAMPLE_BLOCK: u64 = 4096;
/// Number of spaced blocks of the sample, evenly between the two ends.
pub const SAMPLE_BLOCKS: u64 = 64;
/// How long reading or zeroing the sample of one device may take.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The byte ranges `(start, length)` of a device of `size` bytes that tell
/// whether it holds data: its first and last `SAMPLE_EDGE` bytes and
/// `SAMPLE_BLOCKS` blocks of `SAMPLE_BLOCK` bytes at `size * i / 65`
/// (rounded down to 4 KiB) for i = 1..=64, sorted, overlapping ranges
/// merged. At most 2 MiB + 256 KiB, whatever the size. Every start is a
/// multiple of 4 KiB except the last MiB's, which is `size - 1 MiB` (a
/// multiple of the device's logical block size, as `size` is).
pub fn sample_ranges(size: u64) -> Vec<(u64, u64)> {
    let mut v = vec![(0, SAMPLE_EDGE.min(size))];
    for i in 1..=SAMPLE_BLOCKS {
        let at = (u128::from(size) * u128::from(i) / u128::from(SAMPLE_BLOCKS + 1)) as u64;
        let at = at - at % SAMPLE_BLOCK;
        v.push((at, SAMPLE_BLOCK.min(size - at)));
    }
    let tail = size.saturating_sub(SAMPLE_EDGE);
    v.push((tail, size - tail));
    v.retain(|&(_, len)| len > 0);
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (start, len) in v {
        match out.last_mut() {
            Some((s, l)) if start <= *s + *l => *l = (*l).max(start + len - *s),
            _ => out.push((start, len)),
        }
    }
    out
}

/// Whether `ranges` of `file` read as zeros only. A short read (the file
/// ends inside a range) is an error, never zeros. `file` may be opened
/// with O_DIRECT: the buffer is aligned to 4 KiB.
pub fn ranges_read_zero(file: &File, ranges: &[(u64, u64)]) -> std::io::Result<bool> {
    const CHUNK: usize = 1 << 20;
    const ALIGN: usize = 4096;
    let mut buf = vec![0u8; CHUNK + ALIGN];
    let skip = buf.as_ptr().align_offset(ALIGN);
    let buf = &mut buf[skip..skip + CHUNK];
    for &(start, len) in ranges {
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from(len - done).map_or(CHUNK, |n| n.min(CHUNK));
            file.read_exact_at(&mut buf[..n], start + done)?;
            if buf[..n].iter().any(|&b| b != 0) {
                return Ok(false);
            }
            done += n as u64;
        }
    }
    Ok(true)
}

/// A block device as found at a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The device node the path resolves to (symlinks followed).
    pub path: PathBuf,
    pub major: u32,
    pub minor: u32,
    pub size_bytes: u64,
}

/// An exclusive claim of a block device (an open with O_EXCL), held until
/// dropped: while it is held every other exclusive open of the device
/// fails with EBUSY, in any process and mount namespace (another berth's
/// free check, mkfs, wipefs, a mount of it, and Berth's own). Opens that
/// are not exclusive (reads, `blkid -p`, `BLKROSET`) are not refused.
pub struct DeviceClaim {
    _held: Box<dyn Send + Sync>,
}

impl DeviceClaim {
    /// A claim that lasts as long as `held` does (the open device, or a
    /// fake's guard).
    pub fn new(held: Box<dyn Send + Sync>) -> Self {
        DeviceClaim { _held: held }
    }
}

impl std::fmt::Debug for DeviceClaim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceClaim")
    }
}

/// Block device queries. Real: `RealBlockDevices`; fake: `fake::FakeOs`.
pub trait BlockDevices: Send + Sync {
    /// Follows symlinks; ENOTBLK when `path` is not a block device.
    fn inspect(&self, path: &Path) -> Result<DeviceInfo, OsError>;
    /// Every `/dev/disk/by-id` link to the device udev made, the one
    /// `stable_link` prefers first.
    fn stable_links(&self, dev: &DeviceInfo) -> Vec<PathBuf>;
    /// A `/dev/disk/by-id` link to the device, if udev made one.
    fn stable_link(&self, dev: &DeviceInfo) -> Option<PathBuf> {
        self.stable_links(dev).into_iter().next()
    }
    /// Reads the first 4 KiB: proves the device answers before anything is
    /// decided from a probe of it (blkid reports "nothing found" for a device
    /// it cannot read), and returns them (a superblock lives there).
    fn read_head(&self, path: &Path) -> Result<Vec<u8>, OsError>;
    /// Whether the sample of the device (`sample_ranges` of `size_bytes`,
    /// which must be its size) reads as zeros only. Read past the page
    /// cache (O_DIRECT) where the device allows it, under a deadline: a
    /// device that does not answer in time, or a short read, is an error.
    fn reads_zero(&self, path: &Path, size_bytes: u64) -> Result<bool, OsError>;
    /// Whether another process holds the device exclusively (an O_EXCL
    /// open fails with EBUSY: a mounted filesystem, a running mkfs or
    /// fsck, a device-mapper or md user), in any mount namespace. A claim
    /// that ends within 50 ms is no holder (`BUSY_PAUSES`).
    fn held(&self, path: &Path) -> Result<bool, OsError>;
    /// Claims the device at `path`, which must be `size_bytes` long,
    /// exclusively (`DeviceClaim`: O_EXCL, kept open) until the claim is
    /// dropped, under a deadline. EBUSY when something else holds it (a
    /// claim of 50 ms or less is waited out, as `held` does); berth's own
    /// exclusive uses of the device (mkfs, mount, the erase) fail while the
    /// claim is held.
    fn claim(&self, path: &Path, size_bytes: u64) -> Result<DeviceClaim, OsError>;
    /// Zeroes the whole device at `path`, which must be `size_bytes` long.
    /// Opened exclusively (O_EXCL on a block device: EBUSY while anything
    /// mounts or holds it), then flushed.
    fn zero_out(&self, path: &Path, size_bytes: u64) -> Result<(), OsError>;
    /// Zeroes the sample of the device (`sample_ranges` of `size_bytes`,
    /// which must be its size), so that a disk Berth erased only in part
    /// (`--disk-wipe signatures`) reads as zeros where the pool looks.
    /// Opened exclusively like `zero_out`, flushed, under a deadline.
    fn zero_sample(&self, path: &Path, size_bytes: u64) -> Result<(), OsError>;
    /// Whether the kernel holds the device read-only (`BLKROGET`): set
    /// with `set_read_only`, or by the device itself (write-protected).
    fn read_only(&self, path: &Path) -> Result<bool, OsError>;
    /// Sets or clears the kernel's read-only flag of the device
    /// (`BLKROSET`). While it is set every write fails with EPERM, whoever
    /// opened the device, through any node or bind of it, and
    /// `BLKZEROOUT` too. It stays set until cleared (closing the device
    /// does not clear it).
    fn set_read_only(&self, path: &Path, read_only: bool) -> Result<(), OsError>;
}

nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
// BLKZEROOUT is _IO(0x12, 127) but takes a pointer to {start, length}.
nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);
// BLKROSET is _IO(0x12, 93) and BLKROGET _IO(0x12, 94); both take a
// pointer to an int.
nix::ioctl_write_ptr_bad!(blkroset, nix::request_code_none!(0x12, 93), libc::c_int);
nix::ioctl_read_bad!(blkroget, nix::request_code_none!(0x12, 94), libc::c_int);

/// Bytes zeroed per BLKZEROOUT call: small enough that progress is logged
/// and a kill is noticed between calls on a slow disk.
const ZERO_CHUNK: u64 = 1 << 30;

/// The real devices.
#[derive(Debug, Clone)]
pub struct RealBlockDevices {
    pub by_id: PathBuf,
    /// Sample reads and writes, each under a deadline (one at a time per
    /// device: a device stuck in the kernel is not asked again meanwhile),
    /// and every other open of a device (`inspect`, `held`, `claim`, `read_head`,
    /// `read_only`, `set_read_only`) under the same deadline: an open or
    /// read of a disk that stopped answering can block in the kernel for
    /// good, and the pool opens every disk it names (GetCapacity,
    /// CreateVolume, and each DeleteVolume of a disk). `zero_out` is not
    /// bounded: zeroing a large disk takes as long as writing it.
    bounded: Bounded,
    /// The deadline of each bounded call (`SAMPLE_TIMEOUT`).
    timeout: Duration,
}

impl Default for RealBlockDevices {
    fn default() -> Self {
        Self::with_timeout(SAMPLE_TIMEOUT)
    }
}

/// Pauses before an exclusive open that failed with EBUSY is tried again,
/// before the device counts as held (50 ms in all). Some claims last only
/// milliseconds and are no holder: a descriptor just closed lives on in a
/// child another thread forked until that child execs (seen here: up to
/// 5 ms after the close, with mkfs and blkid run beside), and udev
/// re-reads the partition table of a disk written and closed, which
/// claims it exclusively while it does.
pub(crate) const BUSY_PAUSES: [Duration; 3] = [
    Duration::from_millis(5),
    Duration::from_millis(15),
    Duration::from_millis(30),
];

/// Whether `busy` still answers true after it is asked again after each of
/// `pauses` (`sleep` takes them); an error ends it at once.
fn busy_after_pauses<E>(
    pauses: &[Duration],
    mut sleep: impl FnMut(Duration),
    mut busy: impl FnMut() -> Result<bool, E>,
) -> Result<bool, E> {
    for &p in pauses {
        if !busy()? {
            return Ok(false);
        }
        sleep(p);
    }
    busy()
}

/// A block device opened exclusively (O_EXCL), closed while no command is
/// being spawned (`command::while_not_spawning`). The kernel lets an
/// exclusive hold go only at the last close of the open, and a command
/// spawned by another thread holds a copy of every descriptor from its fork
/// to its exec: closed beside it, the device stayed held for that while,
/// and a mount or mkfs of it right after failed with EBUSY (a stage then
/// answered ABORTED; measured: 495 of 84,689 claims let go beside three
/// threads spawning commands left the device held).
pub(crate) struct Exclusive(std::mem::ManuallyDrop<File>);

impl Exclusive {
    fn new(f: File) -> Self {
        Exclusive(std::mem::ManuallyDrop::new(f))
    }
}

impl std::ops::Deref for Exclusive {
    type Target = File;
    fn deref(&self) -> &File {
        &self.0
    }
}

impl Drop for Exclusive {
    fn drop(&mut self) {
        super::command::while_not_spawning(|| {
            // SAFETY: the file is dropped once, here, and never used after.
            unsafe { std::mem::ManuallyDrop::drop(&mut self.0) }
        });
    }
}

/// Opens the block device at `path` for writing, exclusively (O_EXCL: EBUSY
/// while anything mounts or holds it), and checks that it is `size_bytes`
/// long. A claim that ends within 50 ms is waited out (`open_exclusive`).
fn open_exclusive_sized(path: &Path, size_bytes: u64) -> Result<Exclusive, OsError> {
    let f = open_exclusive(path, Access::Write, "open exclusively")?;
    check_size(&f, path, size_bytes)?;
    Ok(f)
}

/// What an exclusive open may do with the device.
#[derive(Clone, Copy)]
enum Access {
    /// A claim: no write is made through it.
    Read,
    /// The erase.
    Write,
}

/// Opens the block device at `path` exclusively (O_EXCL), tried again after
/// each of `BUSY_PAUSES` while it fails with EBUSY:
/// a hold of milliseconds (a child of another process's thread between its
/// fork and exec, udev re-reading a disk just written) is no holder. Before,
/// the erase tried once, and a DeleteVolume right after an unstage could
/// fail on such a hold.
fn open_exclusive(path: &Path, access: Access, op: &'static str) -> Result<Exclusive, OsError> {
    let open = || {
        OpenOptions::new()
            .read(matches!(access, Access::Read))
            .write(matches!(access, Access::Write))
            .custom_flags(libc::O_CLOEXEC | libc::O_EXCL)
            .open(path)
    };
    let mut pauses = BUSY_PAUSES.iter();
    loop {
        match open() {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => match pauses.next() {
                Some(p) => std::thread::sleep(*p),
                None => return Err(OsError::sys(op, path, e)),
            },
            r => return Ok(Exclusive::new(r.map_err(|e| OsError::sys(op, path, e))?)),
        }
    }
}

/// Fails unless the block device open as `f` is `size_bytes` long.
fn check_size(f: &File, path: &Path, size_bytes: u64) -> Result<(), OsError> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
    unsafe { blkgetsize64(std::os::fd::AsRawFd::as_raw_fd(f), &mut size) }
        .map_err(|e| OsError::sys("BLKGETSIZE64", path, e))?;
    if size != size_bytes {
        return Err(OsError::sys(
            "size changed",
            path,
            std::io::Error::other(format!("{size} bytes, expected {size_bytes}")),
        ));
    }
    Ok(())
}

/// BLKZEROOUT of `len` bytes from `start` of the device open as `f`.
fn zero_range(f: &File, path: &Path, start: u64, len: u64) -> Result<(), OsError> {
    let range = [start, len];
    // SAFETY: BLKZEROOUT reads two u64 (start, length) through the
    // pointer, which lives for the call.
    unsafe { blkzeroout(std::os::fd::AsRawFd::as_raw_fd(f), &range) }
        .map_err(|e| OsError::sys("BLKZEROOUT", path, e))?;
    Ok(())
}

/// Whether the sample of the block device at `path` reads as zeros: read
/// with O_DIRECT, or through the page cache where the device refuses
/// O_DIRECT (EINVAL).
fn sample_reads_zero(path: &Path, size_bytes: u64) -> Result<bool, OsError> {
    let ranges = sample_ranges(size_bytes);
    let open = |flags| {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | flags)
            .open(path)
    };
    if let Ok(f) = open(libc::O_DIRECT) {
        check_size(&f, path, size_bytes)?;
        match ranges_read_zero(&f, &ranges) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            r => return r.map_err(|e| OsError::sys("read sample", path, e)),
        }
    }
    let f = open(0).map_err(|e| OsError::sys("open", path, e))?;
    check_size(&f, path, size_bytes)?;
    ranges_read_zero(&f, &ranges).map_err(|e| OsError::sys("read sample", path, e))
}

impl RealBlockDevices {
    /// The real devices, each bounded call under `timeout`.
    pub fn with_timeout(timeout: Duration) -> Self {
        RealBlockDevices {
            by_id: PathBuf::from("/dev/disk/by-id"),
            bounded: Bounded::new(),
            timeout,
        }
    }

    /// The error of a call on `path` that did not answer in time.
    fn timed_out(&self, op: &'static str, path: &Path) -> OsError {
        OsError::sys(
            op,
            path,
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no answer within {} s (or an earlier one still pending)",
                    self.timeout.as_secs_f64()
                ),
            ),
        )
    }

    /// Runs `f` on the device at `path` under the deadline: one call at a
    /// time per operation and device (`Calls::OneAtATime`: the sample's
    /// reads and writes), or side by side except on a device with a call
    /// still stuck (`Calls::SideBySide`, `Bounded::run_unless_stuck`: an
    /// open or an ioctl).
    fn bounded<T: Send + 'static>(
        &self,
        calls: Calls,
        op: &'static str,
        path: &Path,
        f: impl FnOnce(&Path) -> Result<T, OsError> + Send + 'static,
    ) -> Result<T, OsError> {
        let owned = path.to_path_buf();
        let key = format!("{op}:{}", path.display());
        let call = move || f(&owned);
        match calls {
            Calls::OneAtATime => self.bounded.run(&key, self.timeout, call),
            Calls::SideBySide => self.bounded.run_unless_stuck(&key, self.timeout, call),
        }
        .unwrap_or_else(|| Err(self.timed_out(op, path)))
    }
}

/// How the bounded calls of one operation on one device may overlap
/// (`RealBlockDevices::bounded`).
#[derive(Clone, Copy)]
enum Calls {
    OneAtATime,
    SideBySide,
}

/// `BlockDevices::inspect`, unbounded.
fn inspect_now(path: &Path) -> Result<DeviceInfo, OsError> {
    let canonical = std::fs::canonicalize(path).map_err(|e| OsError::sys("resolve", path, e))?;
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

/// `BlockDevices::read_head`, unbounded.
fn read_head_now(path: &Path) -> Result<Vec<u8>, OsError> {
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

/// `BlockDevices::held`, unbounded.
fn held_now(path: &Path) -> Result<bool, OsError> {
    busy_after_pauses(
        &BUSY_PAUSES,
        std::thread::sleep,
        || match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_EXCL)
            .open(path)
        {
            Ok(f) => {
                drop(Exclusive::new(f));
                Ok(false)
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(true),
            Err(e) => Err(OsError::sys("open exclusively", path, e)),
        },
    )
}

/// `BlockDevices::claim`, unbounded: an exclusive open (read-only: no
/// write is made through it), tried again after each of `BUSY_PAUSES`
/// while it fails with EBUSY.
fn claim_now(path: &Path, size_bytes: u64) -> Result<Exclusive, OsError> {
    let f = open_exclusive(path, Access::Read, "claim exclusively")?;
    check_size(&f, path, size_bytes)?;
    Ok(f)
}

/// `BlockDevices::read_only`, unbounded.
fn read_only_now(path: &Path) -> Result<bool, OsError> {
    let f = open_for_ioctl(path)?;
    let mut ro: libc::c_int = 0;
    // SAFETY: BLKROGET writes one int through the pointer.
    unsafe { blkroget(std::os::fd::AsRawFd::as_raw_fd(&f), &mut ro) }
        .map_err(|e| OsError::sys("BLKROGET", path, e))?;
    Ok(ro != 0)
}

/// `BlockDevices::set_read_only`, unbounded.
fn set_read_only_now(path: &Path, read_only: bool) -> Result<(), OsError> {
    let f = open_for_ioctl(path)?;
    let ro = libc::c_int::from(read_only);
    // SAFETY: BLKROSET reads one int through the pointer, which lives
    // for the call.
    unsafe { blkroset(std::os::fd::AsRawFd::as_raw_fd(&f), &ro) }
        .map_err(|e| OsError::sys("BLKROSET", path, e))?;
    Ok(())
}

impl BlockDevices for RealBlockDevices {
    fn inspect(&self, path: &Path) -> Result<DeviceInfo, OsError> {
        self.bounded(Calls::SideBySide, "inspect", path, inspect_now)
    }

    fn stable_links(&self, dev: &DeviceInfo) -> Vec<PathBuf> {
        let Ok(rd) = std::fs::read_dir(&self.by_id) else {
            return Vec::new();
        };
        let mut links: Vec<PathBuf> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| std::fs::canonicalize(p).ok().as_deref() == Some(dev.path.as_path()))
            .collect();
        // Prefer names that do not depend on the bus path; stable order.
        links.sort_by_key(|p| {
            let n = p.file_name().map(|n| n.to_string_lossy().into_owned());
            (n.as_deref().is_some_and(|n| n.starts_with("wwn-")), n)
        });
        links
    }

    fn read_head(&self, path: &Path) -> Result<Vec<u8>, OsError> {
        self.bounded(Calls::SideBySide, "read", path, read_head_now)
    }

    fn held(&self, path: &Path) -> Result<bool, OsError> {
        self.bounded(Calls::SideBySide, "open exclusively", path, held_now)
    }

    fn claim(&self, path: &Path, size_bytes: u64) -> Result<DeviceClaim, OsError> {
        let f = self.bounded(Calls::SideBySide, "claim exclusively", path, move |p| {
            claim_now(p, size_bytes)
        })?;
        Ok(DeviceClaim::new(Box::new(f)))
    }

    fn zero_out(&self, path: &Path, size_bytes: u64) -> Result<(), OsError> {
        let f = open_exclusive_sized(path, size_bytes)?;
        let started = std::time::Instant::now();
        let mut done = 0;
        while done < size_bytes {
            let len = ZERO_CHUNK.min(size_bytes - done);
            zero_range(&f, path, done, len)?;
            done += len;
            if started.elapsed().as_secs() >= 10 && (done / ZERO_CHUNK) % 16 == 0 {
                tracing::info!(device = %path.display(), done, size = size_bytes, "zeroing");
            }
        }
        f.sync_all().map_err(|e| OsError::sys("fsync", path, e))
    }

    fn reads_zero(&self, path: &Path, size_bytes: u64) -> Result<bool, OsError> {
        self.bounded(Calls::OneAtATime, "read sample", path, move |p| {
            sample_reads_zero(p, size_bytes)
        })
    }

    fn zero_sample(&self, path: &Path, size_bytes: u64) -> Result<(), OsError> {
        self.bounded(Calls::OneAtATime, "zero sample", path, move |p| {
            let f = open_exclusive_sized(p, size_bytes)?;
            for (start, len) in sample_ranges(size_bytes) {
                zero_range(&f, p, start, len)?;
            }
            f.sync_all().map_err(|e| OsError::sys("fsync", p, e))
        })
    }

    fn read_only(&self, path: &Path) -> Result<bool, OsError> {
        self.bounded(Calls::SideBySide, "BLKROGET", path, read_only_now)
    }

    fn set_read_only(&self, path: &Path, read_only: bool) -> Result<(), OsError> {
        self.bounded(Calls::SideBySide, "BLKROSET", path, move |p| {
            set_read_only_now(p, read_only)
        })
    }
}

/// The block device at `path` opened read-only for an ioctl (a read-only
/// open is allowed on a read-only device, and takes no claim).
fn open_for_ioctl(path: &Path) -> Result<File, OsError> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| OsError::sys("open", path, e))?;
    let m = f.metadata().map_err(|e| OsError::sys("stat", path, e))?;
    if !m.file_type().is_block_device() {
        return Err(OsError::sys(
            "not a block device",
            path,
            std::io::Error::from_raw_os_error(libc::ENOTBLK),
        ));
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens of a device that do not answer (a FIFO without a writer
    /// blocks its open as a disk stuck in the kernel does) end with an
    /// error at the deadline; before, `held`, `read_head`, `read_only` and
    /// `set_read_only` waited for good (the pool asks every disk it names
    /// at GetCapacity, CreateVolume and each disk's DeleteVolume). A second
    /// call on the stuck device answers at once.
    #[test]
    fn opens_that_do_not_answer_end_at_the_deadline() {
        let t = tempfile::tempdir().unwrap();
        let fifo = t.path().join("stuck");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let d = std::sync::Arc::new(RealBlockDevices::with_timeout(Duration::from_millis(200)));
        type Call = fn(&RealBlockDevices, &Path) -> Result<(), OsError>;
        let calls: [(&str, Call); 4] = [
            ("held", |d, p| d.held(p).map(drop)),
            ("read_head", |d, p| d.read_head(p).map(drop)),
            ("read_only", |d, p| d.read_only(p).map(drop)),
            ("set_read_only", |d, p| d.set_read_only(p, false)),
        ];
        for (name, call) in calls {
            for round in 0..2 {
                let (tx, rx) = std::sync::mpsc::channel();
                let (d, p) = (d.clone(), fifo.clone());
                std::thread::spawn(move || {
                    let _ = tx.send(call(&d, &p));
                });
                let r = rx
                    .recv_timeout(Duration::from_secs(5))
                    .unwrap_or_else(|_| panic!("{name} (call {round}): no answer within 5 s"));
                let e = r.expect_err(name);
                let e = crate::error::chain(&e);
                assert!(e.contains("no answer within"), "{name}: {e}");
            }
        }
        // Let the stuck opens go: a writer opens the FIFO and closes it.
        drop(
            OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&fifo),
        );
    }

    #[test]
    fn a_claim_that_ends_within_the_pauses_is_no_holder() {
        let pauses = [Duration::from_millis(1), Duration::from_millis(2)];
        // Busy twice, then free: not held, after two pauses.
        let (mut asked, mut slept) = (0, Vec::new());
        let r = busy_after_pauses(
            &pauses,
            |d| slept.push(d),
            || {
                asked += 1;
                Ok::<_, ()>(asked <= 2)
            },
        );
        assert_eq!((r, asked), (Ok(false), 3));
        assert_eq!(slept, pauses);
        // Busy every time: held, asked once more than there are pauses.
        let mut asked = 0;
        let r = busy_after_pauses(
            &pauses,
            |_| {},
            || {
                asked += 1;
                Ok::<_, ()>(true)
            },
        );
        assert_eq!((r, asked), (Ok(true), 3));
        // Free at once: no pause.
        let mut slept = 0;
        let r = busy_after_pauses(&pauses, |_| slept += 1, || Ok::<_, ()>(false));
        assert_eq!((r, slept), (Ok(false), 0));
        // An error ends it at once.
        let mut asked = 0;
        let r = busy_after_pauses(
            &pauses,
            |_| {},
            || {
                asked += 1;
                Err::<bool, _>("EACCES")
            },
        );
        assert_eq!((r, asked), (Err("EACCES"), 1));
    }

    #[test]
    fn the_sample_covers_both_ends_and_spaced_blocks_within_bounds() {
        const MIB: u64 = 1 << 20;
        for size in [
            512,
            4096,
            MIB,
            2 * MIB,
            10 * MIB + 512,
            64 * MIB,
            1 << 40,
            (1 << 44) + 4096 * 7,
        ] {
            let r = sample_ranges(size);
            assert_eq!(r[0].0, 0, "{size}: starts at 0");
            let last = r[r.len() - 1];
            assert_eq!(last.0 + last.1, size, "{size}: ends at the end");
            assert!(r.iter().all(|&(_, len)| len > 0), "{size}: no empty range");
            assert!(
                r.windows(2).all(|w| w[0].0 + w[0].1 < w[1].0),
                "{size}: sorted, merged: {r:?}"
            );
            let total: u64 = r.iter().map(|&(_, len)| len).sum();
            assert!(
                total <= (2 * MIB + SAMPLE_BLOCKS * SAMPLE_BLOCK).min(size),
                "{size}: {total} bytes"
            );
            if size >= 4 * MIB && size % 4096 == 0 {
                assert_eq!(r[0], (0, MIB));
                assert_eq!(last, (size - MIB, MIB));
            }
            if size >= 1 << 30 {
                // Far apart: none merges with another or with an end.
                assert_eq!(r.len() as u64, SAMPLE_BLOCKS + 2, "{size}: {r:?}");
                assert!(r[1..r.len() - 1]
                    .iter()
                    .all(|&(at, len)| at % 4096 == 0 && len == SAMPLE_BLOCK));
            }
        }
        // The spaced blocks of a 64 MiB disk are less than a MiB apart:
        // data 1 MiB long anywhere on it meets the sample.
        let r = sample_ranges(64 * MIB);
        assert!(r.windows(2).all(|w| w[1].0 - (w[0].0 + w[0].1) < MIB));
    }

    #[test]
    fn a_sample_reads_zero_unless_a_sampled_byte_is_not() {
        const MIB: u64 = 1 << 20;
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("disk");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        let size = 64 * MIB;
        f.set_len(size).unwrap();
        let r = sample_ranges(size);
        assert!(ranges_read_zero(&f, &r).unwrap());
        // A byte between the sampled blocks is not seen (the sample is a
        // sample) ...
        let gap = r[1].0 + r[1].1 + 10;
        f.write_all_at(b"x", gap).unwrap();
        assert!(ranges_read_zero(&f, &r).unwrap());
        // ... one in a spaced block, the first or the last MiB is.
        for at in [r[5].0 + 4095, 0, MIB - 1, size - MIB, size - 1] {
            f.write_all_at(b"x", at).unwrap();
            assert!(!ranges_read_zero(&f, &r).unwrap(), "byte {at}");
            f.write_all_at(&[0], at).unwrap();
        }
        assert!(ranges_read_zero(&f, &r).unwrap());
        // A device shorter than its sample is an error, never zeros.
        f.set_len(size - 4096).unwrap();
        assert!(ranges_read_zero(&f, &r).is_err());
    }

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
