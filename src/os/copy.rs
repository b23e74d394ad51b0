//! Copies for snapshots, restores and clones, as faithful as the source
//! filesystem allows and as cheap as it allows:
//! - a file is cloned with FICLONE where the filesystem shares extents
//!   (xfs with reflink, btrfs: instant, no space used until written);
//!   elsewhere only its data ranges are copied (SEEK_DATA / SEEK_HOLE, each
//!   range with copy_file_range, which NFS 4.2 turns into a server-side
//!   copy), so holes stay holes; its source is opened with O_NOFOLLOW and
//!   must be a regular file (a snapshot's file replaced by a symlink is
//!   never read through it);
//! - a tree is copied entry by entry without following a symlink: modes,
//!   owners, timestamps (nanoseconds), symlinks, hard-link groups (one
//!   inode stays one inode), extended attributes, FIFOs, device nodes and
//!   sockets (a socket's node, made with mknod as `cp -a` makes it: what
//!   was listening there is a process, never copied; before 2026-12-07
//!   sockets were left out, and a snapshot missing them was reported
//!   whole). Never with hard links to the source: a write through the
//!   volume must not change its snapshot. Never across a mount: an entry below the source
//!   that is the root of a mount (a pod with Bidirectional propagation
//!   mounted a host directory, another tenant's volume or a file over one
//!   of its own inside its volume) fails the copy (`OsError::MountInside`),
//!   decided on the descriptor that would be read, so a mount made while
//!   the copy runs is seen too; nothing mounted there is read.
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use nix::sys::stat::{utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchownat, FchownatFlags, Gid, Uid};

use super::OsError;

/// How a file was copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CopyStats {
    /// Files cloned (extents shared).
    pub cloned: u64,
    /// Files copied range by range.
    pub copied: u64,
    /// Bytes of data copied (not cloned).
    pub bytes: u64,
    /// Hard links recreated.
    pub links: u64,
    /// Entries of other types (directories, symlinks, FIFOs, devices,
    /// sockets).
    pub other: u64,
}

impl CopyStats {
    fn add(&mut self, o: CopyStats) {
        self.cloned += o.cloned;
        self.copied += o.copied;
        self.bytes += o.bytes;
        self.links += o.links;
        self.other += o.other;
    }
}

fn sys<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> OsError + 'a {
    move |e| OsError::sys(op, path, e)
}

fn errno<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(nix::errno::Errno) -> OsError + 'a {
    move |e| OsError::sys(op, path, e)
}

nix::ioctl_write_int!(ficlone, 0x94, 9);

/// The ranges [start, end) of `file` (of `len` bytes) that hold data, by
/// SEEK_DATA / SEEK_HOLE; all of it where the filesystem cannot tell. Each
/// is found as the one before it is done with, never listed: a tenant's
/// file can hold one for every other block (before 2026-12-07 they were
/// listed first, 16 bytes each; `tests/copy_memory.rs`).
fn data_ranges<'a>(
    file: &'a File,
    path: &'a Path,
    len: u64,
) -> impl Iterator<Item = Result<(u64, u64), OsError>> + 'a {
    use nix::unistd::{lseek, Whence};
    let end = i64::try_from(len).unwrap_or(i64::MAX);
    let mut pos = 0i64;
    std::iter::from_fn(move || {
        while pos < end {
            let data = match lseek(file, pos, Whence::SeekData) {
                Ok(d) => d,
                Err(nix::errno::Errno::ENXIO) => break,
                // No SEEK_DATA: everything is data.
                Err(nix::errno::Errno::EINVAL) => pos,
                Err(e) => {
                    pos = end;
                    return Some(Err(OsError::sys("lseek", path, e)));
                }
            };
            let hole = lseek(file, data, Whence::SeekHole).map_or(end, |h| h.min(end));
            pos = hole.max(data + 1);
            if hole > data {
                return Some(Ok((data as u64, hole as u64)));
            }
        }
        pos = end;
        None
    })
}

/// Copies the content of `src` (at `src_path`) into the empty file `dst`:
/// a clone where the filesystem can, else its data ranges only. `dst` ends
/// up exactly as long as `src`.
pub fn copy_file_data(
    src: &File,
    src_path: &Path,
    dst: &File,
    dst_path: &Path,
) -> Result<CopyStats, OsError> {
    // SAFETY: FICLONE takes the source descriptor as its argument; both
    // descriptors are open for the duration of the call.
    let r = unsafe { ficlone(dst.as_raw_fd(), src.as_raw_fd() as u64) };
    if r.is_ok() {
        return Ok(CopyStats {
            cloned: 1,
            ..Default::default()
        });
    }
    let m = src.metadata().map_err(sys("stat", src_path))?;
    let len = m.len();
    // Fewer blocks than its length: the file has holes. A filesystem that
    // cannot tell them (NFS before 4.2, ramfs: the kernel's generic
    // SEEK_DATA) answers the whole file as one range of data; that range
    // is read and its zero blocks left holes, as `cp --sparse=auto` does,
    // instead of written (before 2026-12-07 a tenant's 1 TiB sparse file,
    // which cost it nothing, was copied as 1 TiB of zeros).
    let holes_unseen = m.blocks().saturating_mul(512) < len;
    let mut bytes = 0u64;
    for range in data_ranges(src, src_path, len) {
        let (start, end) = range?;
        if holes_unseen && (start, end) == (0, len) {
            bytes += copy_skipping_zeros(src, src_path, dst, dst_path, len)?;
            continue;
        }
        let mut off_in = start as i64;
        let mut off_out = start as i64;
        while (off_in as u64) < end {
            let want = usize::try_from(end - off_in as u64)
                .unwrap_or(usize::MAX)
                .min(1 << 30);
            let n =
                nix::fcntl::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), want)
                    .map_err(errno("copy_file_range", dst_path))?;
            if n == 0 {
                break;
            }
            bytes += n as u64;
        }
    }
    dst.set_len(len).map_err(sys("truncate", dst_path))?;
    Ok(CopyStats {
        copied: 1,
        bytes,
        ..Default::default()
    })
}

const CHUNK: usize = 1 << 20;

/// What is a hole in a copy that skips zeros: a block of this many zero
/// bytes (at this alignment) is not written.
const ZERO_BLOCK: usize = 4096;

/// Copies the first `len` bytes of `src` onto the empty file `dst` at the
/// same offsets, reading them, writing only the runs of blocks
/// (`ZERO_BLOCK`) that are not all zeros; returns the bytes written.
fn copy_skipping_zeros(
    src: &File,
    src_path: &Path,
    dst: &File,
    dst_path: &Path,
    len: u64,
) -> Result<u64, OsError> {
    let zero = |b: &[u8]| b.iter().all(|&x| x == 0);
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    let mut bytes = 0u64;
    while off < len {
        let want = usize::try_from(len - off).unwrap_or(CHUNK).min(CHUNK);
        let n = src
            .read_at(&mut buf[..want], off)
            .map_err(sys("read", src_path))?;
        if n == 0 {
            break;
        }
        let data = &buf[..n];
        let mut i = 0;
        while i < n {
            let next = (i + ZERO_BLOCK).min(n);
            if zero(&data[i..next]) {
                i = next;
                continue;
            }
            let mut j = next;
            while j < n {
                let e = (j + ZERO_BLOCK).min(n);
                if zero(&data[j..e]) {
                    break;
                }
                j = e;
            }
            dst.write_all_at(&data[i..j], off + i as u64)
                .map_err(sys("write", dst_path))?;
            bytes += (j - i) as u64;
            i = j;
        }
        off += n as u64;
    }
    Ok(bytes)
}

/// Alignment of the O_DIRECT reads' buffer (the largest logical block
/// size of a disk).
const DIRECT_ALIGN: usize = 4096;

/// Opens the device `src` for reading what is on the device itself
/// (O_DIRECT), not what its page cache holds: a filesystem mounted from
/// the device writes file data around that cache, so pages a read cached
/// before (an earlier snapshot of the same disk, while it stayed open by
/// the mount) are stale by the time of the next snapshot. Where O_DIRECT
/// is not supported (EINVAL: a file on tmpfs standing in for a device in
/// tests), a plain open whose cached pages are dropped first
/// (POSIX_FADV_DONTNEED), the best the kernel offers there.
fn open_uncached(src: &Path) -> Result<(File, bool), OsError> {
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_DIRECT)
        .open(src)
    {
        Ok(f) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            let f = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(src)
                .map_err(sys("open", src))?;
            nix::fcntl::posix_fadvise(
                &f,
                0,
                0,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            )
            .map_err(errno("posix_fadvise", src))?;
            Ok((f, false))
        }
        Err(e) => Err(OsError::sys("open", src, e)),
    }
}

/// Copies `len` bytes of the device `src` into the new file `dst` (mode
/// 0600), leaving holes where the device reads as zeros, and syncs it. The
/// device is read around its page cache (`open_uncached`).
pub fn copy_device_to_file(src: &Path, dst: &Path, len: u64) -> Result<CopyStats, OsError> {
    let (s, direct) = open_uncached(src)?;
    let d = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dst)
        .map_err(sys("create", dst))?;
    // An O_DIRECT read needs a buffer aligned to the logical block size
    // (and a length that is a multiple of it: a device's size is).
    let mut raw = vec![0u8; CHUNK + DIRECT_ALIGN];
    let shift = raw.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
    let buf = &mut raw[shift..shift + CHUNK];
    let mut off = 0u64;
    let mut bytes = 0u64;
    while off < len {
        let mut want = usize::try_from(len - off).unwrap_or(CHUNK).min(CHUNK);
        if direct {
            // A last piece shorter than a block: read the whole block (the
            // device ends there; the file is cut to `len` below).
            want = want.div_ceil(512) * 512;
        }
        let n = s.read_at(&mut buf[..want], off).map_err(sys("read", src))?;
        let n = n.min(usize::try_from(len - off).unwrap_or(usize::MAX));
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            d.write_all_at(&buf[..n], off).map_err(sys("write", dst))?;
            bytes += n as u64;
        }
        off += n as u64;
    }
    d.set_len(len).map_err(sys("truncate", dst))?;
    d.sync_all().map_err(sys("fsync", dst))?;
    Ok(CopyStats {
        copied: 1,
        bytes,
        ..Default::default()
    })
}

/// Writes the data ranges of the regular file `src` (never read through a
/// symlink: `open_regular`) onto the device `dst` at the same offsets (the
/// holes are not written: the caller zeroed the device first), and flushes
/// the device.
pub fn copy_file_to_device(src: &Path, dst: &Path) -> Result<CopyStats, OsError> {
    let s = open_regular(src)?;
    let d = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(dst)
        .map_err(sys("open", dst))?;
    let len = s.metadata().map_err(sys("stat", src))?.len();
    let mut buf = vec![0u8; CHUNK];
    let mut bytes = 0u64;
    for range in data_ranges(&s, src, len) {
        let (start, end) = range?;
        let mut off = start;
        while off < end {
            let want = usize::try_from(end - off).unwrap_or(CHUNK).min(CHUNK);
            let n = s.read_at(&mut buf[..want], off).map_err(sys("read", src))?;
            if n == 0 {
                break;
            }
            d.write_all_at(&buf[..n], off).map_err(sys("write", dst))?;
            bytes += n as u64;
            off += n as u64;
        }
    }
    d.sync_all().map_err(sys("fsync", dst))?;
    Ok(CopyStats {
        copied: 1,
        bytes,
        ..Default::default()
    })
}

/// Opens the regular file `path` for reading, never through a symlink
/// (ELOOP) and never blocking (a FIFO; a file under a lease, EWOULDBLOCK):
/// what is copied is the file Berth made at that name, not what a symlink
/// put in its place names (another volume's backing file, a host file).
/// Anything else than a regular file (a FIFO, a device, a directory) is
/// refused without being opened: the name is first resolved to an
/// `O_PATH` descriptor (which opens nothing: no driver's open, no FIFO
/// wait), its type read from that descriptor, and only a regular file is
/// then opened for reading, through the descriptor, so the inode read is
/// the one looked at. Before 2026-12-07 the name was opened first and its
/// type looked at after, so a device node a tenant swapped in for a file
/// of its volume while the volume was copied was opened by Berth (as root,
/// outside the pod's device cgroup).
fn open_regular(path: &Path) -> Result<File, OsError> {
    use nix::fcntl::OFlag;
    let at = nix::fcntl::open(
        path,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno("open", path))?;
    let kind = nix::sys::stat::fstat(&at)
        .map_err(errno("stat", path))?
        .st_mode
        & libc::S_IFMT;
    if kind != libc::S_IFREG {
        let why = if kind == libc::S_IFLNK {
            std::io::Error::from_raw_os_error(libc::ELOOP)
        } else {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file")
        };
        return Err(OsError::sys("open", path, why));
    }
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(format!("/proc/self/fd/{}", at.as_raw_fd()))
        .map_err(sys("open", path))
}

/// Copies the regular file `src` to the new file `dst` (created mode 0600,
/// never over an existing file), content only, and syncs it. `src` is
/// never read through a symlink (`open_regular`).
pub fn copy_file(src: &Path, dst: &Path) -> Result<CopyStats, OsError> {
    let s = open_regular(src)?;
    let d = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dst)
        .map_err(sys("create", dst))?;
    let st = copy_file_data(&s, src, &d, dst)?;
    d.sync_all().map_err(sys("fsync", dst))?;
    Ok(st)
}

/// The fewest bytes of data `copy_file` of the regular file `src` writes,
/// where that is known without copying: the sum of its data ranges
/// (`data_ranges`, which the copy writes one by one) on a filesystem that
/// never clones a file (ext2/3/4, tmpfs), where SEEK_DATA sees its holes.
/// None elsewhere: a filesystem that may clone (xfs, btrfs, any other:
/// the copy may then take no space at all), or one that does not show a
/// file's holes (ramfs, NFS before 4.2: the copy leaves zero blocks holes,
/// which only reading the file tells). Reads no data, never follows a
/// symlink (`open_regular`). A free-space check before a copy refuses
/// only a copy that cannot fit.
pub fn file_copy_need(src: &Path) -> Result<Option<u64>, OsError> {
    use nix::sys::statfs::{fstatfs, EXT4_SUPER_MAGIC, TMPFS_MAGIC};
    let s = open_regular(src)?;
    let fs = fstatfs(&s).map_err(errno("statfs", src))?.filesystem_type();
    if fs != EXT4_SUPER_MAGIC && fs != TMPFS_MAGIC {
        return Ok(None);
    }
    let m = s.metadata().map_err(sys("stat", src))?;
    let len = m.len();
    let holes_unseen = m.blocks().saturating_mul(512) < len;
    let mut need = 0u64;
    for range in data_ranges(&s, src, len) {
        let (start, end) = range?;
        if holes_unseen && (start, end) == (0, len) {
            return Ok(None);
        }
        need += end - start;
    }
    Ok(Some(need))
}

/// The fewest bytes of the filesystem `copy_tree` of the directory `src`
/// takes, where that is known without copying (the free-space check
/// before a local snapshot, restore or clone): on a filesystem that never
/// clones a file and shows holes (ext2/3/4, tmpfs; `file_copy_need`), the
/// data of each regular file (its `SEEK_DATA` ranges, each rounded up to
/// the filesystem's block, and no more than the blocks the file has:
/// preallocated blocks are no data, a file held in its inode takes
/// none), each inode once however many names it has (the copy keeps a
/// hard-link group one inode), and for a directory or a symlink the one
/// block it takes where the source's takes one. Never follows a symlink,
/// never opens anything else than a directory or a regular file, reads
/// no data, skips what is removed meanwhile. None elsewhere: a filesystem that may clone, a file
/// whose holes are not shown (`file_copy_need`), or a mount below `src`
/// (the copy refuses it). The sum is a lower bound of what the copy takes
/// (it leaves out extent and xattr blocks), so a check on it refuses only
/// a copy that cannot fit; it walks the tree as the copy does, on the
/// copy's stack, and no deeper than the copy can go: a tree with a path
/// longer than PATH_MAX below `src` (a tenant's relative `mkdir` after
/// another), which the copy fails (`File name too long`), is None once
/// the walk reaches that depth (`NEED_PATH_MAX`).
pub fn tree_copy_need(src: &Path) -> Result<Option<u64>, OsError> {
    use nix::fcntl::OFlag;
    use nix::sys::statfs::{fstatfs, EXT4_SUPER_MAGIC, TMPFS_MAGIC};
    let dir = nix::fcntl::open(
        src,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno("open", src))?;
    let fs = fstatfs(&dir).map_err(errno("statfs", src))?;
    if fs.filesystem_type() != EXT4_SUPER_MAGIC && fs.filesystem_type() != TMPFS_MAGIC {
        return Ok(None);
    }
    let block = u64::try_from(fs.block_size()).unwrap_or(4096).max(512);
    on_copy_stack(move || {
        let mut need = Need {
            block,
            bytes: 0,
            links: HashMap::new(),
        };
        let top = std::fs::symlink_metadata(src).map_err(sys("stat", src))?;
        need.bytes += need.metadata(&top);
        Ok(need.dir(dir, src, 0)?.then_some(need.bytes))
    })
}

/// How long the path below the source of a copy can be that
/// `tree_copy_need` walks down to (PATH_MAX, 4,096 bytes, with its NUL):
/// the copy makes each entry at its destination's path, which is longer
/// still, so it never copies an entry deeper than that. The walk holds a
/// descriptor, the C library's 32 KiB buffer and a stack frame for each
/// directory on the way down, and a path of this length has at most some
/// 2,000. Before 2026-12-07 it walked to the bottom of any tree, reaching
/// each level through its parent's descriptor (no path length limit): a
/// tenant's tree 50,000 levels deep took 50,000 descriptors at once
/// (`EMFILE` for every other call of berth meanwhile, and the walk failed
/// where the limit was lower) and, deeper, overflowed the copy's stack,
/// which aborted berth (`os::copy` unit test
/// `the_copy_need_of_a_tree_deeper_than_any_path_stops_at_the_longest_path`).
const NEED_PATH_MAX: usize = 4096;

/// What `tree_copy_need` counted so far.
struct Need {
    /// The filesystem's block size.
    block: u64,
    bytes: u64,
    /// The inodes with more than one name met so far, and how many of
    /// their names are still to be met.
    links: HashMap<(u64, u64), u64>,
}

impl Need {
    /// A directory's or a symlink's block, where the source's takes one.
    fn metadata(&self, m: &std::fs::Metadata) -> u64 {
        m.blocks().saturating_mul(512).min(self.block)
    }

    /// Adds what the entries below the directory open at `dir` (reached
    /// at `path`, `below` bytes of path below the copy's source) take;
    /// false when that cannot be known, or the copy fails it (a path
    /// below the source longer than `NEED_PATH_MAX`).
    fn dir(
        &mut self,
        dir: std::os::fd::OwnedFd,
        path: &Path,
        below: usize,
    ) -> Result<bool, OsError> {
        use nix::fcntl::OFlag;
        let mut dir = nix::dir::Dir::from_fd(dir).map_err(errno("opendir", path))?;
        let base = PathBuf::from(format!("/proc/self/fd/{}/.", dir.as_raw_fd()));
        for e in dir.iter() {
            let e = e.map_err(errno("readdir", path))?;
            let name = OsStr::from_bytes(e.file_name().to_bytes());
            if name == "." || name == ".." {
                continue;
            }
            let from = base.join(name);
            let m = match std::fs::symlink_metadata(&from) {
                Ok(m) => m,
                // Removed since the directory was read: the copy leaves
                // it out.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(OsError::sys("stat", &from, e)),
            };
            let ft = m.file_type();
            if ft.is_dir() {
                let sub_below = below + 1 + name.len();
                if sub_below >= NEED_PATH_MAX {
                    return Ok(false);
                }
                let sub = match nix::fcntl::open(
                    &from,
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                ) {
                    Ok(d) => d,
                    Err(nix::errno::Errno::ENOENT) => continue,
                    Err(e) => return Err(OsError::sys("open", &from, e)),
                };
                if super::mountpoint::fd_is_mount_root(&sub) == Some(true) {
                    return Ok(false);
                }
                self.bytes += self.metadata(&m);
                if !self.dir(sub, &from, sub_below)? {
                    return Ok(false);
                }
                continue;
            }
            if m.nlink() > 1 {
                let k = (m.dev(), m.ino());
                if let Some(left) = self.links.get_mut(&k) {
                    *left = left.saturating_sub(1);
                    if *left == 0 {
                        self.links.remove(&k);
                    }
                    continue;
                }
                self.links.insert(k, m.nlink() - 1);
            }
            if ft.is_symlink() {
                self.bytes += self.metadata(&m);
            } else if ft.is_file() {
                let f = match open_regular(&from) {
                    Ok(f) => f,
                    Err(e) if e.errno() == Some(libc::ENOENT) => continue,
                    Err(e) => return Err(e),
                };
                if super::mountpoint::fd_is_mount_root(&f) == Some(true) {
                    return Ok(false);
                }
                match self.file(&f, &from)? {
                    Some(n) => self.bytes += n,
                    None => return Ok(false),
                }
            }
        }
        Ok(true)
    }

    /// What the copy of the regular file `f` takes at least: its data
    /// ranges, each rounded up to a block, at most its blocks; None when
    /// its holes are not shown.
    fn file(&self, f: &File, path: &Path) -> Result<Option<u64>, OsError> {
        let m = f.metadata().map_err(sys("stat", path))?;
        let len = m.len();
        let allocated = m.blocks().saturating_mul(512);
        if allocated == 0 {
            // All holes, or (ext4's inline_data) held in its inode.
            return Ok(Some(0));
        }
        let holes_unseen = allocated < len;
        let mut data = 0u64;
        for range in data_ranges(f, path, len) {
            let (start, end) = range?;
            if holes_unseen && (start, end) == (0, len) {
                return Ok(None);
            }
            data += (end - start).div_ceil(self.block) * self.block;
        }
        Ok(Some(data.min(allocated)))
    }
}

fn copy_xattrs(src: &Path, dst: &Path) -> Result<(), OsError> {
    let names = match xattr::list(src) {
        Ok(n) => n,
        // A filesystem without extended attributes has none to copy.
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(()),
        Err(e) => return Err(OsError::sys("listxattr", src, e)),
    };
    for name in names {
        if let Some(value) = xattr::get(src, &name).map_err(sys("getxattr", src))? {
            xattr::set(dst, &name, &value).map_err(sys("setxattr", dst))?;
        }
    }
    Ok(())
}

/// Owner, (except for symlinks) mode, extended attributes and timestamps
/// of `dst` from `src`, whose metadata is `m`. The extended attributes
/// after the owner: the kernel removes a file's capabilities
/// (`security.capability`) when its owner is set, even to the one it has
/// (before 2026-12-07 they were set first, and every copy lost them).
fn copy_meta(m: &std::fs::Metadata, src: &Path, dst: &Path, symlink: bool) -> Result<(), OsError> {
    fchownat(
        nix::fcntl::AT_FDCWD,
        dst,
        Some(Uid::from_raw(m.uid())),
        Some(Gid::from_raw(m.gid())),
        FchownatFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(errno("chown", dst))?;
    if !symlink {
        // After chown, which clears set-id bits.
        std::fs::set_permissions(dst, std::fs::Permissions::from_mode(m.mode() & 0o7777))
            .map_err(sys("chmod", dst))?;
    }
    copy_xattrs(src, dst).or_else(|e| {
        // User attributes are not allowed on symlinks.
        if symlink && e.errno() == Some(libc::EPERM) {
            Ok(())
        } else {
            Err(e)
        }
    })?;
    let at = TimeSpec::new(m.atime(), m.atime_nsec());
    let mt = TimeSpec::new(m.mtime(), m.mtime_nsec());
    utimensat(
        nix::fcntl::AT_FDCWD,
        dst,
        &at,
        &mt,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(errno("utimensat", dst))
}

/// Where an entry of a copy is: its name in its directory's place, up to
/// the copy's root (whose name is its whole path). The hard-link table
/// keeps a first copy's place, so each directory's name is held once,
/// shared by everything below it: the table grows with the names it
/// holds, never with the length of their paths (before 2026-12-07 it kept
/// each first copy's whole path: a tenant's inodes with two names each,
/// some 3,000 bytes deep, held that much memory apiece until the copy
/// ended; `tests/copy_memory.rs`).
struct Place {
    parent: Option<Rc<Place>>,
    name: OsString,
}

impl Place {
    fn root(path: &Path) -> Rc<Place> {
        Rc::new(Place {
            parent: None,
            name: path.as_os_str().to_owned(),
        })
    }

    fn child(self: &Rc<Place>, name: &OsStr) -> Rc<Place> {
        Rc::new(Place {
            parent: Some(Rc::clone(self)),
            name: name.to_owned(),
        })
    }

    fn path(&self) -> PathBuf {
        let mut names = vec![self.name.as_os_str()];
        let mut up = self.parent.as_deref();
        while let Some(p) = up {
            names.push(p.name.as_os_str());
            up = p.parent.as_deref();
        }
        names.into_iter().rev().collect()
    }
}

/// The inodes with more than one name met so far: where the first copy of
/// each is, and how many of its names are still to be met (it is dropped
/// once they all are).
type Links = HashMap<(u64, u64), (Rc<Place>, u64)>;

/// Copies the tree at `src` (a directory) to `dst`, which must not exist.
/// See the module comment for what is kept. The copy is durable before
/// this returns: one syncfs(2) of the destination's filesystem flushes
/// every file and directory it wrote (one flush instead of one fsync per
/// file, which made copying many small files many times slower than tar).
pub fn copy_tree(src: &Path, dst: &Path) -> Result<CopyStats, OsError> {
    on_copy_stack(|| {
        let mut links = Links::new();
        let mut st = CopyStats::default();
        copy_dir(src, dst, &Place::root(dst), &[], true, &mut links, &mut st)?;
        sync_fs_of(dst)?;
        Ok(st)
    })
}

/// The stack a tree copy runs on. It takes a few frames per level of the
/// tree, and a level deeper than the destination's paths allow (PATH_MAX,
/// 4,096 bytes: at most some 2,000 levels) fails its mkdir: a few MiB at
/// most, more than the 2 MiB a thread gets by default (a tenant's tree
/// some two thousand levels deep, one relative mkdir after another,
/// overflowed it and aborted berth, in a release build too). Only the part
/// used is ever touched.
const TREE_COPY_STACK: usize = 64 << 20;

/// Runs the tree copy `f` on a thread of its own with `TREE_COPY_STACK`,
/// and waits for it.
fn on_copy_stack<T: Send>(f: impl FnOnce() -> Result<T, OsError> + Send) -> Result<T, OsError> {
    std::thread::scope(|s| {
        let copy = std::thread::Builder::new()
            .name("berth-copy".into())
            .stack_size(TREE_COPY_STACK)
            .spawn_scoped(s, f)
            .map_err(|e| OsError::sys("spawn", "a tree copy's thread", e))?;
        match copy.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Copies what the directory `src` holds into the existing directory
/// `dst`, except the entries of `src` itself named in `skip` (deeper
/// entries of those names are copied), then gives `dst` the mode, owner,
/// times and extended attributes of `src`. Nothing in `dst` may have the
/// name of an entry copied (EEXIST). Durable before it returns, like
/// `copy_tree`.
pub fn copy_into(src: &Path, dst: &Path, skip: &[&str]) -> Result<CopyStats, OsError> {
    let m = std::fs::symlink_metadata(src).map_err(sys("stat", src))?;
    if !m.is_dir() {
        return Err(OsError::sys(
            "copy",
            src,
            std::io::Error::from_raw_os_error(libc::ENOTDIR),
        ));
    }
    on_copy_stack(|| {
        let mut links = Links::new();
        let mut st = CopyStats::default();
        copy_entries(src, dst, &Place::root(dst), skip, true, &mut links, &mut st)?;
        copy_meta(&m, src, dst, false)?;
        st.other += 1;
        sync_fs_of(dst)?;
        Ok(st)
    })
}

/// One syncfs(2) of the filesystem that holds `path`.
fn sync_fs_of(path: &Path) -> Result<(), OsError> {
    let d = File::open(path).map_err(sys("open", path))?;
    nix::unistd::syncfs(&d).map_err(errno("syncfs", path))
}

/// Copies the directory `src` to `dst` (at `place`).
fn copy_dir(
    src: &Path,
    dst: &Path,
    place: &Rc<Place>,
    skip: &[&str],
    top: bool,
    links: &mut Links,
    st: &mut CopyStats,
) -> Result<(), OsError> {
    let m = std::fs::symlink_metadata(src).map_err(sys("stat", src))?;
    std::fs::create_dir(dst).map_err(sys("mkdir", dst))?;
    copy_entries(src, dst, place, skip, top, links, st)?;
    copy_meta(&m, src, dst, false)?;
    st.other += 1;
    Ok(())
}

/// Copies the entries of the directory `src` (except the names in `skip`)
/// into the directory `dst` (at `place`). `src` is opened once, never
/// through a symlink, and its entries are reached through that
/// descriptor: a volume in use whose directory is swapped for a symlink
/// while it is copied makes the copy fail (ENOTDIR) instead of copying
/// what the link points to. Below the `top` of the copy, a directory that
/// is the root of a mount fails it (`refuse_mount`). The entries are
/// copied as they are read, one at a time, never collected: a tenant's
/// directory of millions of entries costs the copy what one does (before
/// 2026-12-07 each directory's whole listing was read and sorted first,
/// some 300 bytes an entry of 200-byte names; `tests/copy_memory.rs`).
/// What each directory open on the way down holds is its descriptor and
/// the C library's buffer for reading it (32 KiB).
fn copy_entries(
    src: &Path,
    dst: &Path,
    place: &Rc<Place>,
    skip: &[&str],
    top: bool,
    links: &mut Links,
    st: &mut CopyStats,
) -> Result<(), OsError> {
    use nix::fcntl::OFlag;
    let dir = nix::fcntl::open(
        src,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno("open", src))?;
    if !top {
        refuse_mount(&dir, src)?;
    }
    let mut dir = nix::dir::Dir::from_fd(dir).map_err(errno("opendir", src))?;
    let base = PathBuf::from(format!("/proc/self/fd/{}/.", dir.as_raw_fd()));
    for e in dir.iter() {
        let e = e.map_err(errno("readdir", src))?;
        let name = OsStr::from_bytes(e.file_name().to_bytes());
        if name == "." || name == ".." || skip.iter().any(|s| name == *s) {
            continue;
        }
        let from = base.join(name);
        let to = dst.join(name);
        match copy_entry(&from, &to, place, name, links, st) {
            Ok(()) => {}
            // Removed since the directory was read (a volume in use: a
            // temporary file, a rotated log): left out, as if removed
            // before the copy began; what was made of it goes.
            Err(err)
                if err.errno() == Some(libc::ENOENT)
                    && std::fs::symlink_metadata(&from).is_err() =>
            {
                tracing::debug!(path = %from.display(), "removed while it was copied: left out");
                remove_partial(&to)?;
            }
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// `OsError::MountInside` when the entry open at `fd` (reached at `path`)
/// is the root of a mount, asked of the descriptor itself: what it shows
/// is what would be read. The error names the entry's path as the kernel
/// gives it for the descriptor (not the /proc/self/fd path it was reached
/// by). A kernel that cannot tell (before 5.8) copies as before.
fn refuse_mount(fd: &impl std::os::fd::AsFd, path: &Path) -> Result<(), OsError> {
    if super::mountpoint::fd_is_mount_root(fd) != Some(true) {
        return Ok(());
    }
    let real = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd()))
        .unwrap_or_else(|_| path.to_path_buf());
    Err(OsError::MountInside(real))
}

/// Removes what a copy made at `dst` of an entry that was removed from
/// its source meanwhile (a file, or a directory tree); nothing there is
/// nothing to do.
fn remove_partial(dst: &Path) -> Result<(), OsError> {
    match std::fs::symlink_metadata(dst) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(OsError::sys("lstat", dst, e)),
        Ok(m) if m.is_dir() => super::files::remove_tree_iteratively(dst),
        Ok(_) => std::fs::remove_file(dst).map_err(sys("unlink", dst)),
    }
}

/// Copies the entry `from` (reached through its directory's descriptor)
/// to `to`, named `name` in the directory at `dir`.
fn copy_entry(
    from: &Path,
    to: &Path,
    dir: &Rc<Place>,
    name: &OsStr,
    links: &mut Links,
    st: &mut CopyStats,
) -> Result<(), OsError> {
    let em = std::fs::symlink_metadata(from).map_err(sys("stat", from))?;
    let ft = em.file_type();
    if ft.is_dir() {
        return copy_dir(from, to, &dir.child(name), &[], false, links, st);
    }
    // One inode stays one inode: the first of its names copied is linked.
    let link_key = (em.nlink() > 1).then(|| (em.dev(), em.ino()));
    if let Some(k) = link_key {
        if let Some((first, left)) = links.get_mut(&k) {
            std::fs::hard_link(first.path(), to).map_err(sys("link", to))?;
            st.links += 1;
            *left = left.saturating_sub(1);
            if *left == 0 {
                links.remove(&k);
            }
            return Ok(());
        }
    }
    if ft.is_file() {
        // Never through a symlink that replaced the file meanwhile (a
        // volume in use changes while it is copied); never opening a
        // FIFO or a device that did (`open_regular`).
        let s = open_regular(from)?;
        // A file mounted over one of the volume's (a host file bound
        // there) is not the volume's.
        refuse_mount(&s, from)?;
        let d = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(to)
            .map_err(sys("create", to))?;
        st.add(copy_file_data(&s, from, &d, to)?);
        copy_meta(&em, from, to, false)?;
    } else if ft.is_symlink() {
        let target = std::fs::read_link(from).map_err(sys("readlink", from))?;
        std::os::unix::fs::symlink(&target, to).map_err(sys("symlink", to))?;
        copy_meta(&em, from, to, true)?;
        st.other += 1;
    } else {
        let kind = if ft.is_fifo() {
            SFlag::S_IFIFO
        } else if ft.is_char_device() {
            SFlag::S_IFCHR
        } else if ft.is_socket() {
            SFlag::S_IFSOCK
        } else {
            SFlag::S_IFBLK
        };
        nix::sys::stat::mknod(
            to,
            kind,
            Mode::from_bits_truncate(0o600),
            em.rdev() as nix::sys::stat::dev_t,
        )
        .map_err(errno("mknod", to))?;
        copy_meta(&em, from, to, false)?;
        st.other += 1;
    }
    // Linked to by the inode's next names only once it is copied whole.
    if let Some(k) = link_key {
        links.insert(k, (dir.child(name), em.nlink() - 1));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparse_file_stays_sparse_and_equal() {
        let t = tempfile::tempdir().unwrap();
        let a = t.path().join("a");
        let f = File::create(&a).unwrap();
        f.set_len(64 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"middle", 32 << 20).unwrap();
        drop(f);
        let b = t.path().join("b");
        let st = copy_file(&a, &b).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        let mb = std::fs::metadata(&b).unwrap();
        assert_eq!(mb.len(), 64 << 20);
        assert!(
            mb.blocks() * 512 < 4 << 20,
            "{} bytes allocated",
            mb.blocks() * 512
        );
        assert!(st.cloned == 1 || st.bytes < 1 << 20, "{st:?}");
        // Never over an existing file.
        assert!(copy_file(&a, &b).is_err());
    }

    /// What `file_copy_need` answers is never more than the copy writes
    /// (a free-space check on it never refuses a copy that fits): on a
    /// filesystem that shows holes and never clones, exactly the bytes of
    /// data the copy writes; None elsewhere. Preallocated blocks never
    /// written are no data.
    #[test]
    fn a_copys_need_is_the_data_it_writes() {
        use std::os::unix::fs::FileExt;
        let t = tempfile::tempdir().unwrap();
        let a = t.path().join("a");
        let f = File::create(&a).unwrap();
        f.set_len(16 << 20).unwrap();
        f.write_all_at(&[7u8; 8192], 4 << 20).unwrap();
        f.write_all_at(&[9u8; 4096], 12 << 20).unwrap();
        // SAFETY: fallocate(2) on a descriptor this test owns.
        let _ = unsafe { libc::fallocate(f.as_raw_fd(), 0, 8 << 20, 1 << 20) };
        f.sync_all().unwrap();
        drop(f);
        let need = file_copy_need(&a).unwrap();
        let st = copy_file(&a, &t.path().join("b")).unwrap();
        let fs = nix::sys::statfs::statfs(t.path())
            .unwrap()
            .filesystem_type();
        let shows_holes = [
            nix::sys::statfs::EXT4_SUPER_MAGIC,
            nix::sys::statfs::TMPFS_MAGIC,
        ]
        .contains(&fs);
        match need {
            Some(n) => {
                assert!(shows_holes, "{fs:?}");
                assert_eq!(st.cloned, 0);
                assert_eq!(n, st.bytes, "{st:?}");
                assert!(n < 2 << 20, "{n}");
            }
            None => assert!(!shows_holes, "{fs:?}"),
        }
        let empty = t.path().join("empty");
        File::create(&empty).unwrap().set_len(1 << 30).unwrap();
        assert!(matches!(file_copy_need(&empty).unwrap(), None | Some(0)));
        // Never through a symlink.
        std::os::unix::fs::symlink(&a, t.path().join("link")).unwrap();
        assert!(file_copy_need(&t.path().join("link")).is_err());
    }

    /// The blocks a copied tree takes: each inode's once (`du`).
    fn allocated(root: &Path) -> u64 {
        fn walk(p: &Path, seen: &mut std::collections::HashSet<u64>, sum: &mut u64) {
            let m = std::fs::symlink_metadata(p).unwrap();
            if seen.insert(m.ino()) {
                *sum += m.blocks() * 512;
            }
            if m.is_dir() {
                for e in std::fs::read_dir(p).unwrap() {
                    walk(&e.unwrap().path(), seen, sum);
                }
            }
        }
        let mut sum = 0;
        walk(root, &mut std::collections::HashSet::new(), &mut sum);
        sum
    }

    /// What `tree_copy_need` answers is never more than the copy of the
    /// tree takes (a free-space check on it never refuses a copy that
    /// fits), and at least the data the copy writes: a hard-link group
    /// counts once, a sparse file its data, a symlink (to a large file
    /// outside the tree) never what it points to; None where the
    /// filesystem may clone or hides holes.
    #[test]
    fn a_trees_copy_need_is_what_its_copy_takes_at_least() {
        use std::os::unix::fs::FileExt;
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        File::create(&outside)
            .unwrap()
            .write_all_at(&[3u8; 4 << 20], 0)
            .unwrap();
        let src = t.path().join("src");
        std::fs::create_dir_all(src.join("a/b/c")).unwrap();
        let data = src.join("a/b/data");
        File::create(&data)
            .unwrap()
            .write_all_at(&[5u8; 1 << 20], 0)
            .unwrap();
        std::fs::hard_link(&data, src.join("again")).unwrap();
        std::fs::hard_link(&data, src.join("a/b/c/and-again")).unwrap();
        let sparse = File::create(src.join("sparse")).unwrap();
        sparse.set_len(1 << 30).unwrap();
        sparse.write_all_at(&[1u8; 100], 512 << 20).unwrap();
        drop(sparse);
        std::fs::write(src.join("a/small"), b"x").unwrap();
        std::os::unix::fs::symlink(&outside, src.join("a/link")).unwrap();
        let long = "l".repeat(300);
        std::os::unix::fs::symlink(&long, src.join("a/long-link")).unwrap();
        nix::unistd::mkfifo(&src.join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        let need = tree_copy_need(&src).unwrap();
        let dst = t.path().join("dst");
        let st = copy_tree(&src, &dst).unwrap();
        let took = allocated(&dst);
        let fs = nix::sys::statfs::statfs(t.path())
            .unwrap()
            .filesystem_type();
        let shows_holes = [
            nix::sys::statfs::EXT4_SUPER_MAGIC,
            nix::sys::statfs::TMPFS_MAGIC,
        ]
        .contains(&fs);
        match need {
            Some(n) => {
                assert!(shows_holes, "{fs:?}");
                assert_eq!(st.cloned, 0);
                assert!(n >= st.bytes, "{n} < {st:?}");
                assert!(n <= took, "{n} > the {took} bytes the copy took");
                assert!(n < 2 << 20, "{n}: counted more than once, or followed");
            }
            None => assert!(!shows_holes, "{fs:?}"),
        }
        // Never through a symlink, never a file.
        std::os::unix::fs::symlink(&src, t.path().join("src-link")).unwrap();
        assert!(tree_copy_need(&t.path().join("src-link")).is_err());
        assert!(tree_copy_need(&outside).is_err());
    }

    /// Makes a chain of `depth` directories named `d` in `dir`, each made
    /// relative to the one above (as a tenant can, with no path length
    /// limit); the deepest holds a file of 1 MiB of data.
    fn deep_tree(dir: &Path, depth: usize) {
        use nix::fcntl::{open, openat, OFlag};
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let mut fd = open(dir, flags, Mode::empty()).unwrap();
        for _ in 0..depth {
            nix::sys::stat::mkdirat(&fd, "d", Mode::from_bits_truncate(0o755)).unwrap();
            fd = openat(&fd, "d", flags, Mode::empty()).unwrap();
        }
        std::fs::write(
            format!("/proc/self/fd/{}/bottom", fd.as_raw_fd()),
            vec![1u8; 1 << 20],
        )
        .unwrap();
    }

    /// Removes deep trees level by level, also when a test fails
    /// (`TempDir`'s removal recurses, and overflows on such a tree).
    struct Gone(Vec<PathBuf>);

    impl Drop for Gone {
        fn drop(&mut self) {
            for d in &self.0 {
                let _ = crate::os::files::remove_tree_iteratively(d);
            }
        }
    }

    /// A tenant's tree 50,000 levels deep: the walk of `tree_copy_need`
    /// goes no deeper than the copy can (a path of PATH_MAX below the
    /// source) and answers None (the copy then fails `File name too
    /// long`), holding no more than some 2,000 descriptors on the way.
    /// Before 2026-12-07 it went to the bottom: 50,000 descriptors open at
    /// once (here, with 20,000 allowed, `EMFILE`; where more are allowed,
    /// deeper still, the copy's stack overflowed and berth aborted). A
    /// tree as deep as a path can be is still counted.
    #[test]
    fn the_copy_need_of_a_tree_deeper_than_any_path_stops_at_the_longest_path() {
        let t = tempfile::tempdir().unwrap();
        let fs = nix::sys::statfs::statfs(t.path())
            .unwrap()
            .filesystem_type();
        let counted = [
            nix::sys::statfs::EXT4_SUPER_MAGIC,
            nix::sys::statfs::TMPFS_MAGIC,
        ]
        .contains(&fs);
        let (deep, shallow) = (t.path().join("deep"), t.path().join("shallow"));
        std::fs::create_dir(&deep).unwrap();
        std::fs::create_dir(&shallow).unwrap();
        let _gone = Gone(vec![deep.clone(), shallow.clone()]);
        deep_tree(&deep, 50_000);
        // "d/" 2,000 times: 4,000 bytes below the source.
        deep_tree(&shallow, 2_000);
        let need = tree_copy_need(&deep);
        let shallow_need = tree_copy_need(&shallow);
        assert!(matches!(need, Ok(None)), "{need:?}");
        match shallow_need.unwrap() {
            Some(n) => {
                assert!(counted, "{fs:?}");
                assert!(n >= 1 << 20, "{n}: the bottom file was not counted");
            }
            None => assert!(!counted, "{fs:?}"),
        }
    }

    #[test]
    fn a_file_is_never_copied_through_a_symlink_or_from_a_non_file() {
        let t = tempfile::tempdir().unwrap();
        let secret = t.path().join("secret");
        std::fs::write(&secret, b"another tenant's data").unwrap();
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        let fifo = t.path().join("fifo");
        nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o600)).unwrap();
        let dir = t.path().join("dir");
        std::fs::create_dir(&dir).unwrap();
        let dev = t.path().join("dev");
        std::fs::write(&dev, b"").unwrap();
        for (n, src) in [&link, &dir, &fifo].into_iter().enumerate() {
            let dst = t.path().join(format!("copy-{n}"));
            let e = copy_file(src, &dst).unwrap_err();
            assert!(e.to_string().contains(&src.display().to_string()), "{e}");
            assert!(!dst.exists(), "{src:?}: {dst:?} was made");
            // Onto a device: nothing written.
            assert!(copy_file_to_device(src, &dev).is_err(), "{src:?}");
            assert_eq!(std::fs::read(&dev).unwrap(), b"", "{src:?}");
        }
        let e = copy_file(&link, &t.path().join("x")).unwrap_err();
        assert_eq!(e.errno(), Some(libc::ELOOP), "{e}");
    }

    #[test]
    fn a_tree_keeps_links_modes_times_and_is_independent() {
        let t = tempfile::tempdir().unwrap();
        let s = t.path().join("src");
        std::fs::create_dir_all(s.join("d/e")).unwrap();
        std::fs::write(s.join("d/f"), b"data").unwrap();
        std::fs::hard_link(s.join("d/f"), s.join("g")).unwrap();
        std::os::unix::fs::symlink("d/f", s.join("l")).unwrap();
        std::os::unix::fs::symlink("/nonexistent", s.join("dangling")).unwrap();
        std::fs::set_permissions(s.join("d/f"), std::fs::Permissions::from_mode(0o640)).unwrap();
        std::fs::set_permissions(s.join("d/e"), std::fs::Permissions::from_mode(0o711)).unwrap();
        nix::unistd::mkfifo(&s.join("p"), Mode::from_bits_truncate(0o644)).unwrap();
        utimensat(
            nix::fcntl::AT_FDCWD,
            &s.join("d/f"),
            &TimeSpec::new(1_000_000, 5),
            &TimeSpec::new(2_000_000, 7),
            UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
        let xattrs = xattr::set(s.join("d/f"), "user.berth", b"v").is_ok();
        let d = t.path().join("dst");
        let st = copy_tree(&s, &d).unwrap();
        assert_eq!(st.links, 1);
        let m = |p: &str| std::fs::symlink_metadata(d.join(p)).unwrap();
        // Times first: reading the file would move its atime (relatime).
        assert_eq!((m("d/f").atime(), m("d/f").atime_nsec()), (1_000_000, 5));
        assert_eq!(std::fs::read(d.join("d/f")).unwrap(), b"data");
        assert_eq!(m("d/f").ino(), m("g").ino(), "one inode stays one inode");
        assert_ne!(
            m("d/f").ino(),
            std::fs::metadata(s.join("d/f")).unwrap().ino()
        );
        assert_eq!(m("d/f").mode() & 0o7777, 0o640);
        assert_eq!(m("d/e").mode() & 0o7777, 0o711);
        assert_eq!((m("d/f").mtime(), m("d/f").mtime_nsec()), (2_000_000, 7));
        assert_eq!(std::fs::read_link(d.join("l")).unwrap(), Path::new("d/f"));
        assert_eq!(
            std::fs::read_link(d.join("dangling")).unwrap(),
            Path::new("/nonexistent")
        );
        assert!(m("p").file_type().is_fifo());
        if xattrs {
            assert_eq!(
                xattr::get(d.join("d/f"), "user.berth").unwrap().as_deref(),
                Some(&b"v"[..])
            );
        }
        // A write through the source does not change the copy.
        std::fs::write(s.join("d/f"), b"changed").unwrap();
        assert_eq!(std::fs::read(d.join("d/f")).unwrap(), b"data");
        // Never into something that exists.
        assert!(copy_tree(&s, &d).is_err());
    }

    /// A socket a pod's program listens on in its volume (and a second
    /// name of it) is in the copy, a socket node with its mode, owner and
    /// times, one inode for both names, as `cp -a` copies it; nothing
    /// listens there (a process is never copied). Before 2026-12-07 it
    /// was left out, and the copy answered as whole.
    #[test]
    fn a_socket_is_copied_as_a_socket_node_never_left_out() {
        let t = tempfile::tempdir().unwrap();
        let s = t.path().join("src");
        std::fs::create_dir(&s).unwrap();
        let _listening = std::os::unix::net::UnixListener::bind(s.join("sock")).unwrap();
        std::fs::set_permissions(s.join("sock"), std::fs::Permissions::from_mode(0o640)).unwrap();
        std::fs::hard_link(s.join("sock"), s.join("again")).unwrap();
        utimensat(
            nix::fcntl::AT_FDCWD,
            &s.join("sock"),
            &TimeSpec::new(1_000_000, 3),
            &TimeSpec::new(2_000_000, 4),
            UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
        assert!(tree_copy_need(&s).is_ok());
        let d = t.path().join("dst");
        let st = copy_tree(&s, &d).unwrap();
        let m = std::fs::symlink_metadata(d.join("sock")).expect("the socket was left out");
        assert!(m.file_type().is_socket(), "{:?}", m.file_type());
        assert_eq!(m.mode() & 0o7777, 0o640);
        assert_eq!((m.mtime(), m.mtime_nsec()), (2_000_000, 4));
        assert_eq!(
            std::fs::symlink_metadata(d.join("again")).unwrap().ino(),
            m.ino(),
            "one inode stays one inode"
        );
        assert_eq!((st.other, st.links), (2, 1), "{st:?}");
        let e = std::os::unix::net::UnixStream::connect(d.join("sock")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ECONNREFUSED), "{e}");
    }

    /// A pod can swap a file of its volume for a device node (CAP_MKNOD is
    /// in the runtimes' default set; the device cgroup keeps the pod from
    /// opening it, not from making it) between the copy's look at the
    /// entry and its open: the copy must never open anything but a regular
    /// file (opening a device has effects of its own: a watchdog's open
    /// arms it). A FIFO stands in where this process cannot make a device.
    /// Watched with inotify, which reports every open of the node's inode
    /// (the copy of a node makes a new node, never opens the source).
    #[test]
    fn an_entry_swapped_for_a_device_while_it_is_copied_is_never_opened() {
        use std::os::unix::ffi::OsStrExt;
        use std::sync::atomic::{AtomicBool, Ordering};
        let t = tempfile::tempdir().unwrap();
        let s = t.path().join("src");
        std::fs::create_dir(&s).unwrap();
        std::fs::write(s.join("f"), b"data").unwrap();
        let node = s.join("x");
        let device = nix::sys::stat::mknod(
            &node,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o600),
            nix::sys::stat::makedev(1, 3),
        );
        if device.is_err() {
            nix::unistd::mkfifo(&node, Mode::from_bits_truncate(0o600)).unwrap();
        }
        // SAFETY: plain system calls on a descriptor this test owns and a
        // NUL-terminated path.
        let ino = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(ino >= 0);
        let c = std::ffi::CString::new(node.as_os_str().as_bytes()).unwrap();
        assert!(unsafe { libc::inotify_add_watch(ino, c.as_ptr(), libc::IN_OPEN) } >= 0);
        let opened = || {
            let mut buf = [0u8; 4096];
            // SAFETY: `buf` is writable for its length.
            unsafe { libc::read(ino, buf.as_mut_ptr().cast(), buf.len()) > 0 }
        };
        let stop = AtomicBool::new(false);
        let (a, b) = (
            std::ffi::CString::new(s.join("f").as_os_str().as_bytes()).unwrap(),
            c.clone(),
        );
        let mut seen = false;
        std::thread::scope(|sc| {
            sc.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    // SAFETY: two NUL-terminated paths.
                    unsafe {
                        libc::renameat2(
                            libc::AT_FDCWD,
                            a.as_ptr(),
                            libc::AT_FDCWD,
                            b.as_ptr(),
                            libc::RENAME_EXCHANGE,
                        )
                    };
                }
            });
            for n in 0..2000 {
                let d = t.path().join(format!("dst-{n}"));
                std::fs::create_dir(&d).unwrap();
                let mut links = Links::new();
                let mut st = CopyStats::default();
                let _ = copy_entries(&s, &d, &Place::root(&d), &[], true, &mut links, &mut st);
                let _ = std::fs::remove_dir_all(&d);
                if opened() {
                    seen = true;
                    break;
                }
            }
            stop.store(true, Ordering::Relaxed);
        });
        // SAFETY: the descriptor is this test's.
        unsafe { libc::close(ino) };
        assert!(
            !seen,
            "the copy opened the {} swapped in for a file",
            if device.is_ok() { "device" } else { "FIFO" }
        );
    }

    #[test]
    fn a_directory_is_never_copied_through_a_symlink() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"x").unwrap();
        let s = t.path().join("src");
        std::fs::create_dir(&s).unwrap();
        std::os::unix::fs::symlink(&outside, s.join("d")).unwrap();
        // Below the top: the symlink is copied as a symlink.
        copy_tree(&s, &t.path().join("dst")).unwrap();
        assert!(std::fs::symlink_metadata(t.path().join("dst/d"))
            .unwrap()
            .file_type()
            .is_symlink());
        // A source that is itself a symlink (a directory swapped for one
        // while the copy runs) is refused.
        let e = copy_tree(&s.join("d"), &t.path().join("dst2")).unwrap_err();
        assert!(
            matches!(e.errno(), Some(libc::ELOOP) | Some(libc::ENOTDIR)),
            "{e}"
        );
        assert!(!t.path().join("dst2/secret").exists());
        std::fs::create_dir(t.path().join("dst3")).unwrap();
        let e = copy_into(&s.join("d"), &t.path().join("dst3"), &[]).unwrap_err();
        assert!(!t.path().join("dst3/secret").exists(), "{e}");
    }

    #[test]
    fn copy_into_skips_top_level_names_and_takes_the_root_metadata() {
        let t = tempfile::tempdir().unwrap();
        let s = t.path().join("src");
        std::fs::create_dir_all(s.join("d")).unwrap();
        std::fs::write(s.join(".marker"), b"source's own").unwrap();
        std::fs::write(s.join("d/.marker"), b"deeper: copied").unwrap();
        std::fs::write(s.join("f"), b"data").unwrap();
        std::fs::set_permissions(&s, std::fs::Permissions::from_mode(0o2750)).unwrap();
        utimensat(
            nix::fcntl::AT_FDCWD,
            &s,
            &TimeSpec::new(3_000_000, 0),
            &TimeSpec::new(4_000_000, 9),
            UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
        let d = t.path().join("dst");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join(".marker"), b"destination's own").unwrap();
        copy_into(&s, &d, &[".marker"]).unwrap();
        assert_eq!(
            std::fs::read(d.join(".marker")).unwrap(),
            b"destination's own"
        );
        assert_eq!(
            std::fs::read(d.join("d/.marker")).unwrap(),
            b"deeper: copied"
        );
        assert_eq!(std::fs::read(d.join("f")).unwrap(), b"data");
        let m = std::fs::metadata(&d).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o2750);
        assert_eq!((m.mtime(), m.mtime_nsec()), (4_000_000, 9));
        // An entry already there is never overwritten.
        assert!(copy_into(&s, &d, &[]).is_err());
        assert_eq!(
            std::fs::read(d.join(".marker")).unwrap(),
            b"destination's own"
        );
        // Only a directory is copied into one.
        assert!(copy_into(&s.join("f"), &d, &[]).is_err());
    }
}
