//! Every change Berth makes to a filesystem: its state journal and the data
//! of its volumes (directories, backing files, trash and orphan moves).
//! Behind one trait so tests can make any step fail with the errno a real
//! disk gives (ENOSPC, EIO, EROFS) and check that nothing acknowledged is
//! lost and nothing that failed is acknowledged (`fake::FakeOs` injects).
//!
//! Berth's looks at and reads of its own files and directories (lstat,
//! stat, read_dir, `list_names`, readlink, `read_regular`, getxattr: the
//! state journal, the NFS share's directories, the CSI socket's path), the
//! resolution of a node RPC's paths (`free_of_symlinks`, `canonicalize`),
//! the CSI socket's bind, chmod and chown, its connect probe
//! (`socket_answers`) and `--socket-group`'s lookup (`group_id`), and its
//! directory locks (`open_dir`, `flock`) are behind it too, so a test can
//! make them fail (the fake's `fail_next`); the fake does them for real,
//! and tests make the state they read for real. Berth's own files are read
//! with `read_regular` / `open_regular`, which never block on a FIFO,
//! never open a device and never follow a symlink.
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::OsError;

/// How `Files::open` opens a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    /// Create it; fail if anything exists at the path (O_EXCL).
    CreateNew,
    /// Create it if missing, keep its content if present.
    CreateOrKeep,
    /// Create it if missing, truncate it if present.
    CreateOrTruncate,
    /// It must exist; opened for writing.
    Existing,
}

/// Filesystem changes. Every method names its path in the error. Files
/// are opened with O_NOFOLLOW, O_NONBLOCK and O_CLOEXEC, and only regular
/// files are (`open`; `NotRegular` otherwise): a symlink planted in Berth's
/// directories is never followed, and a FIFO, socket or device put where
/// Berth keeps a file never blocks it.
pub trait Files: Send + Sync {
    /// mkdir(2) with `mode` (before the umask, as mkdir does; callers that
    /// need an exact mode call `set_mode` after).
    fn create_dir(&self, path: &Path, mode: u32) -> Result<(), OsError>;
    /// chmod(2).
    fn set_mode(&self, path: &Path, mode: u32) -> Result<(), OsError>;
    /// chown(2) of the group only (the owner unchanged).
    fn set_group(&self, path: &Path, gid: u32) -> Result<(), OsError>;
    /// A unix socket bound at `path` and listening (bind(2), listen(2)),
    /// its file made with mode 0600 whatever the umask (the process's
    /// umask is 0177 around the bind): private from its first moment.
    fn bind_socket(&self, path: &Path) -> Result<std::os::unix::net::UnixListener, OsError>;
    /// rename(2): replaces what is at `to` (a file, or an empty directory).
    fn rename(&self, from: &Path, to: &Path) -> Result<(), OsError>;
    /// renameat2(2) with RENAME_NOREPLACE: EEXIST when `to` exists.
    fn rename_noreplace(&self, from: &Path, to: &Path) -> Result<(), OsError>;
    /// unlink(2) of a file, symlink or device node (never what a symlink
    /// points to).
    fn remove_file(&self, path: &Path) -> Result<(), OsError>;
    /// rmdir(2) of an empty directory.
    fn remove_dir(&self, path: &Path) -> Result<(), OsError>;
    /// symlink(2): a new symlink at `link` whose text is `target` (EEXIST
    /// when anything is at `link`).
    fn symlink(&self, target: &Path, link: &Path) -> Result<(), OsError>;
    /// The birth time of `path`, whose lstat or stat is `m` (std asks
    /// statx for STATX_BTIME: no call of its own). None where the
    /// filesystem keeps none.
    fn born(&self, path: &Path, m: &std::fs::Metadata) -> Option<std::time::SystemTime>;
    /// Removes a directory tree without following symlinks. Missing is
    /// success.
    fn remove_tree(&self, path: &Path) -> Result<(), OsError>;
    /// Opens the regular file `path` for writing (`how`), mode 0600 when
    /// created. Anything else at `path` (a FIFO, a socket, a device, a
    /// directory, a symlink) is an error (`NotRegular`), never opened in a
    /// way that could block.
    fn open(&self, path: &Path, how: Open) -> Result<File, OsError>;
    /// pwrite(2) of the whole buffer at `offset`.
    fn write_at(&self, file: &File, path: &Path, buf: &[u8], offset: u64) -> Result<(), OsError>;
    /// ftruncate(2).
    fn set_len(&self, file: &File, path: &Path, len: u64) -> Result<(), OsError>;
    /// fallocate(2) of the first `len` bytes (mode 0: allocate, extend).
    fn allocate(&self, file: &File, path: &Path, len: u64) -> Result<(), OsError>;
    /// fallocate(2) with FALLOC_FL_KEEP_SIZE of `len` bytes from `offset`:
    /// blocks allocated past the end of the file, its size unchanged (a
    /// reader sees no more bytes than before), so that later appends
    /// within them need no new block and cannot fail for space. Truncating
    /// the file frees them again.
    fn reserve(&self, file: &File, path: &Path, offset: u64, len: u64) -> Result<(), OsError>;
    /// fallocate(2) with FALLOC_FL_UNSHARE_RANGE of the first `len` bytes:
    /// blocks the file shares with another (a clone on xfs with reflink,
    /// btrfs) become its own, so writing to them needs no new block. A
    /// filesystem that shares no blocks (EOPNOTSUPP) has nothing to do.
    fn unshare(&self, file: &File, path: &Path, len: u64) -> Result<(), OsError>;
    /// fallocate(2) with FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE of the
    /// first `len` bytes: their blocks are given back to the filesystem
    /// (they read as zeros after), the file's size unchanged. Needs no new
    /// block, so it works on a full filesystem.
    fn punch(&self, file: &File, path: &Path, len: u64) -> Result<(), OsError>;
    /// fsync(2) of an open file.
    fn sync(&self, file: &File, path: &Path) -> Result<(), OsError>;
    /// fdatasync(2) of an open file.
    fn sync_data(&self, file: &File, path: &Path) -> Result<(), OsError>;
    /// fsync(2) of a directory (makes the entries in it durable).
    fn sync_dir(&self, path: &Path) -> Result<(), OsError>;
    /// Copies the regular file `src` to the new file `dst` (see `copy`);
    /// `src` is opened with O_NOFOLLOW, and anything else than a regular
    /// file there is refused.
    fn copy_file(&self, src: &Path, dst: &Path) -> Result<super::copy::CopyStats, OsError>;
    /// The fewest bytes of data `copy_file` of the regular file `src`
    /// writes, where that is known without copying (`copy::file_copy_need`):
    /// None where the copy may take none (a filesystem that may clone) or
    /// may leave holes that the filesystem does not show.
    fn copy_need(&self, src: &Path) -> Result<Option<u64>, OsError>;
    /// Copies the directory tree `src` to `dst`, which must not exist (see
    /// `copy`).
    fn copy_tree(&self, src: &Path, dst: &Path) -> Result<super::copy::CopyStats, OsError>;
    /// The fewest bytes `copy_tree` of the directory `src` takes, where
    /// that is known without copying (`copy::tree_copy_need`): None where
    /// it is not (a filesystem that may clone or does not show holes, a
    /// mount below `src`).
    fn tree_copy_need(&self, src: &Path) -> Result<Option<u64>, OsError>;
    /// Copies what the directory `src` holds (except its entries named in
    /// `skip`) into the existing directory `dst`, and `src`'s own metadata
    /// onto `dst` (see `copy::copy_into`).
    fn copy_into(
        &self,
        src: &Path,
        dst: &Path,
        skip: &[&str],
    ) -> Result<super::copy::CopyStats, OsError>;
    /// Copies `len` bytes of the device `src` into the new sparse file
    /// `dst` (see `copy`).
    fn copy_from_device(
        &self,
        src: &Path,
        dst: &Path,
        len: u64,
    ) -> Result<super::copy::CopyStats, OsError>;
    /// Writes the data of the regular file `src` (opened as `copy_file`
    /// opens it) onto the device `dst`, which the caller zeroed (see
    /// `copy`).
    fn copy_to_device(&self, src: &Path, dst: &Path) -> Result<super::copy::CopyStats, OsError>;
    /// FIFREEZE: blocks writes to the filesystem mounted at `mount_point`
    /// and makes it consistent on its device, until `thaw`.
    fn freeze(&self, mount_point: &Path) -> Result<(), OsError>;
    /// FITHAW.
    fn thaw(&self, mount_point: &Path) -> Result<(), OsError>;
    /// The change stamp of the file at `path` (its change and modification
    /// times and size): every write to the file changes it, a loop
    /// device's writes included (the kernel stamps the file as each write
    /// begins). Returned once the coarse clock has passed the file's change
    /// time, so that a write from then on cannot leave the stamp as it was
    /// on a kernel whose timestamps move once per tick (at most a tick's
    /// wait). None when that cannot be had (a change time ahead of the
    /// clock, after the clock was set back): nothing can then be told by
    /// comparing stamps.
    fn change_stamp(&self, path: &Path) -> Result<Option<ChangeStamp>, OsError>;
    /// What the disk itself holds of the file at `path`, read with O_DIRECT
    /// around the page cache (which after a failed writeback may show data
    /// the disk never got). None when the filesystem cannot read that way
    /// (tmpfs); a missing file reads as empty.
    fn read_durable(&self, path: &Path) -> Result<Option<Vec<u8>>, OsError>;
    /// Whether the open `file` is still the file named `path`: linked (a
    /// link count above zero) and `path` names the same inode. False once
    /// it was removed or replaced under its name.
    fn still_named(&self, file: &File, path: &Path) -> Result<bool, OsError>;
    /// The metadata of `path` itself (lstat: a symlink is not followed).
    /// One look, nothing read: for the checks of a stored copy.
    fn lstat(&self, path: &Path) -> Result<std::fs::Metadata, OsError> {
        std::fs::symlink_metadata(path).map_err(sys("lstat", path))
    }
    /// `path` itself held open by an `O_PATH` descriptor, never through
    /// a symlink at it (`O_NOFOLLOW`; `O_DIRECTORY` when `dir`), with its
    /// fstat (`pin::pin`): what a bind mount then binds through
    /// `Pinned::path`, whatever is put at `path` meanwhile.
    fn pin(&self, path: &Path, dir: bool) -> Result<super::pin::Pinned, OsError> {
        super::pin::pin(path, dir)
    }
    /// The metadata of what `path` names, a symlink followed (stat).
    fn stat(&self, path: &Path) -> Result<std::fs::Metadata, OsError> {
        std::fs::metadata(path).map_err(sys("stat", path))
    }
    /// Whether something is at `path` itself (lstat succeeds). Any error
    /// (not only ENOENT) reads as nothing there: for the places where a
    /// failed look means "leave it be".
    fn exists(&self, path: &Path) -> bool {
        self.lstat(path).is_ok()
    }
    /// The flags of `path` itself (a symlink is not followed) that stop
    /// even root from changing or removing it: immutable and append-only
    /// (`chattr +i`, `+a`; a pod with CAP_LINUX_IMMUTABLE can set them in
    /// its volume). Read with statx (its attributes), nothing opened; a
    /// filesystem that does not report them reads as neither.
    fn locks(&self, path: &Path) -> Result<Locks, OsError> {
        locks_of(path)
    }
    /// Whether `path` itself is a directory (a symlink to one is not).
    fn is_dir(&self, path: &Path) -> bool {
        self.lstat(path).is_ok_and(|m| m.is_dir())
    }
    /// The entries of the directory `path` (a symlink there is followed:
    /// `read_own_dir` does not follow one).
    fn read_dir(&self, path: &Path) -> Result<std::fs::ReadDir, OsError> {
        std::fs::read_dir(path).map_err(sys("read_dir", path))
    }
    /// Whether the regular file at `path` holds data (`has_data`: a
    /// block written, not only a size or preallocation); None when that
    /// cannot be told (it cannot be opened for reading, or SEEK_DATA is
    /// not answered). Nothing read but the file's extent map.
    fn holds_data(&self, path: &Path) -> Option<bool> {
        File::open(path).ok().and_then(|file| has_data(&file))
    }
    /// Whether the directory `path` can be read and holds no entry. False
    /// when it cannot be read: a doubt is not "empty".
    fn is_empty_dir(&self, path: &Path) -> bool {
        self.read_dir(path).is_ok_and(|mut d| d.next().is_none())
    }
    /// The metadata of `rel` (relative, `/`-separated, no `.` or `..`)
    /// below the directory `root`, never following a symlink: every parent
    /// is opened with O_NOFOLLOW from the one before (a symlink or a file
    /// on the way is ENOTDIR or ELOOP), and `rel` itself is not followed
    /// (a symlink there is reported as one). One look, nothing read or
    /// changed: what is below `root` (a share others write to) cannot lead
    /// the look outside it.
    fn lstat_beneath(&self, root: &Path, rel: &str) -> Result<std::fs::Metadata, OsError> {
        lstat_beneath(root, rel)
    }
    /// readlink(2): the text of the symlink `path`.
    fn read_link(&self, path: &Path) -> Result<PathBuf, OsError> {
        std::fs::read_link(path).map_err(sys("readlink", path))
    }
    /// Whether the directory `dir` (absolute) is reached with no symlink
    /// on the way (`resolve::free_of_symlinks`: one openat2(2)); None
    /// when the kernel cannot tell.
    fn free_of_symlinks(&self, dir: &Path) -> Option<bool> {
        super::resolve::free_of_symlinks(dir)
    }
    /// realpath(3) of `path` (`std::fs::canonicalize`).
    fn canonicalize(&self, path: &Path) -> Result<PathBuf, OsError> {
        std::fs::canonicalize(path).map_err(sys("realpath", path))
    }
    /// getxattr(2): the value of the extended attribute `name` of what
    /// `path` names (a symlink followed); None when it has none.
    fn get_xattr(&self, path: &Path, name: &str) -> Result<Option<Vec<u8>>, OsError> {
        xattr::get(path, name).map_err(sys("getxattr", path))
    }
    /// The content of the regular file `path`, at most `max` bytes
    /// (`read_regular`: never a FIFO, a device or through a symlink). The
    /// error is the I/O error itself (its kind, `NotRegular`), as callers
    /// tell a missing file from one that cannot be read.
    fn read_regular(&self, path: &Path, max: Option<u64>) -> std::io::Result<Vec<u8>> {
        read_regular(path, max)
    }
    /// The regular file `path` opened for reading (`open_regular`).
    fn open_regular(&self, path: &Path) -> std::io::Result<File> {
        open_regular(path, 0)
    }
    /// The directory `path` opened for reading, to be locked (`flock`):
    /// O_DIRECTORY (anything else there fails at once: a FIFO in its place
    /// would block a plain open), O_NONBLOCK, close-on-exec.
    fn open_dir(&self, path: &Path) -> std::io::Result<File> {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
    }
    /// The names in the directory `path` (not `.` and `..`), each followed
    /// by a NUL, in one buffer (`list_names`): no allocation per entry.
    fn list_names(&self, path: &Path) -> std::io::Result<Vec<u8>> {
        list_names(path)
    }
    /// flock(2) of the open `file` (named `path`), as `how` asks; the file
    /// comes back with the error when it is not locked.
    fn flock(
        &self,
        file: File,
        _path: &Path,
        how: nix::fcntl::FlockArg,
    ) -> Result<nix::fcntl::Flock<File>, (File, nix::errno::Errno)> {
        nix::fcntl::Flock::lock(file, how)
    }
    /// Whether a process listens on the unix socket `path` (`answers`:
    /// one connect that never waits). Errors other than "refused" and "no
    /// such file" are returned.
    fn socket_answers(&self, path: &Path) -> std::io::Result<bool> {
        socket_answers(path)
    }
    /// The id of the group named `name` (getgrnam_r: /etc/group or what
    /// NSS asks); None when there is no such group.
    fn group_id(&self, name: &str) -> Result<Option<u32>, OsError> {
        nix::unistd::Group::from_name(name)
            .map(|g| g.map(|g| g.gid.as_raw()))
            .map_err(|e| OsError::sys("getgrnam", "/etc/group", e))
    }
}

/// `Files::socket_answers`: whether a process listens on the unix socket
/// `path`, asked with a connect that never waits: a listener whose backlog
/// is full (a process that stopped accepting, such as a hung berth) makes
/// a blocking connect wait until it accepts, which may be never. A full
/// backlog (EAGAIN) is a listener; a refused connection (or no such file)
/// is a leftover nobody serves on. Other errors are returned.
pub fn socket_answers(path: &Path) -> std::io::Result<bool> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    match connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr) {
        Ok(()) | Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINPROGRESS) => Ok(true),
        Err(nix::errno::Errno::ECONNREFUSED | nix::errno::Errno::ENOENT) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// `Files::list_names`: the directory read with getdents(2) into one
/// buffer sized from the directory's own size (about what its names take
/// on ext4), without an allocation per entry (`std::fs::read_dir` makes
/// two: its entry's name and the caller's copy).
pub fn list_names(path: &Path) -> std::io::Result<Vec<u8>> {
    use nix::fcntl::OFlag;
    let hint = std::fs::metadata(path).map_or(0, |m| m.len()).min(64 << 20);
    let mut buf = Vec::with_capacity(usize::try_from(hint).unwrap_or(0));
    let mut dir = nix::dir::Dir::open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    for e in dir.iter() {
        let e = e?;
        let name = e.file_name().to_bytes();
        if name != b"." && name != b".." {
            buf.extend_from_slice(name);
            buf.push(0);
        }
    }
    Ok(buf)
}

/// `Files::lstat_beneath`.
pub fn lstat_beneath(root: &Path, rel: &str) -> Result<std::fs::Metadata, OsError> {
    use nix::fcntl::{open, openat, OFlag};
    use nix::sys::stat::Mode;
    let full = root.join(rel);
    let err = |e: nix::errno::Errno| {
        OsError::sys("lstat", &full, std::io::Error::from_raw_os_error(e as i32))
    };
    let comps: Vec<&str> = rel.split('/').filter(|c| !c.is_empty()).collect();
    if comps.iter().any(|c| *c == "." || *c == "..") {
        return Err(err(nix::errno::Errno::EINVAL));
    }
    let dir = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut fd = open(root, dir, Mode::empty()).map_err(err)?;
    let Some((leaf, parents)) = comps.split_last() else {
        return File::from(fd).metadata().map_err(sys("lstat", root));
    };
    for c in parents {
        fd = openat(&fd, *c, dir, Mode::empty()).map_err(err)?;
    }
    let leaf_fd = openat(
        &fd,
        *leaf,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(err)?;
    File::from(leaf_fd).metadata().map_err(sys("lstat", &full))
}

/// The real filesystem.
pub struct RealFiles;

fn sys<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> OsError + 'a {
    move |e| OsError::sys(op, path, e)
}

impl Files for RealFiles {
    fn create_dir(&self, path: &Path, mode: u32) -> Result<(), OsError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(mode)
            .create(path)
            .map_err(sys("mkdir", path))
    }

    fn set_mode(&self, path: &Path, mode: u32) -> Result<(), OsError> {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(sys("chmod", path))
    }

    fn set_group(&self, path: &Path, gid: u32) -> Result<(), OsError> {
        nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid)))
            .map_err(|e| OsError::sys("chown", path, e))
    }

    fn bind_socket(&self, path: &Path) -> Result<std::os::unix::net::UnixListener, OsError> {
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
        let bound = std::os::unix::net::UnixListener::bind(path);
        nix::sys::stat::umask(old);
        bound.map_err(sys("bind", path))
    }

    fn rename(&self, from: &Path, to: &Path) -> Result<(), OsError> {
        std::fs::rename(from, to).map_err(sys("rename", from))
    }

    fn rename_noreplace(&self, from: &Path, to: &Path) -> Result<(), OsError> {
        nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            from,
            nix::fcntl::AT_FDCWD,
            to,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        )
        .map_err(|e| OsError::sys("rename", from, e))
    }

    fn remove_file(&self, path: &Path) -> Result<(), OsError> {
        std::fs::remove_file(path).map_err(sys("unlink", path))
    }

    fn remove_dir(&self, path: &Path) -> Result<(), OsError> {
        std::fs::remove_dir(path).map_err(sys("rmdir", path))
    }

    fn symlink(&self, target: &Path, link: &Path) -> Result<(), OsError> {
        std::os::unix::fs::symlink(target, link).map_err(sys("symlink", link))
    }

    fn born(&self, _path: &Path, m: &std::fs::Metadata) -> Option<std::time::SystemTime> {
        m.created().ok()
    }

    fn remove_tree(&self, path: &Path) -> Result<(), OsError> {
        // An empty directory (a volume never written to, a target) goes
        // with one rmdir(2), which never follows a symlink; anything else
        // (ENOTEMPTY, ENOTDIR for a file or symlink) the whole way, where
        // remove_dir_all unlinks symlinks instead of descending into them.
        match std::fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(_) => {}
        }
        remove_tree_iteratively(path)
    }

    fn open(&self, path: &Path, how: Open) -> Result<File, OsError> {
        let mut o = OpenOptions::new();
        o.write(true).mode(0o600);
        match how {
            Open::CreateNew => o.create_new(true),
            Open::CreateOrKeep => o.create(true).truncate(false),
            Open::CreateOrTruncate => o.create(true).truncate(true),
            Open::Existing => &mut o,
        };
        // O_EXCL opens nothing that exists: no look first.
        open_checked(&mut o, path, 0, how != Open::CreateNew).map_err(sys("open", path))
    }

    fn write_at(&self, file: &File, path: &Path, buf: &[u8], offset: u64) -> Result<(), OsError> {
        file.write_all_at(buf, offset).map_err(sys("write", path))
    }

    fn set_len(&self, file: &File, path: &Path, len: u64) -> Result<(), OsError> {
        file.set_len(len).map_err(sys("truncate", path))
    }

    fn allocate(&self, file: &File, path: &Path, len: u64) -> Result<(), OsError> {
        fallocate_head(file, path, len, nix::fcntl::FallocateFlags::empty())
    }

    fn reserve(&self, file: &File, path: &Path, offset: u64, len: u64) -> Result<(), OsError> {
        let range = i64::try_from(offset)
            .ok()
            .zip(i64::try_from(len).ok())
            .filter(|(o, l)| o.checked_add(*l).is_some());
        let Some((offset, len)) = range else {
            return Err(OsError::sys(
                "fallocate",
                path,
                std::io::Error::from_raw_os_error(libc::EFBIG),
            ));
        };
        if len == 0 {
            return Ok(());
        }
        nix::fcntl::fallocate(
            file,
            nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
        .map_err(|e| OsError::sys("fallocate", path, e))
    }

    fn unshare(&self, file: &File, path: &Path, len: u64) -> Result<(), OsError> {
        match fallocate_head(
            file,
            path,
            len,
            nix::fcntl::FallocateFlags::FALLOC_FL_UNSHARE_RANGE,
        ) {
            Err(e) if e.errno() == Some(libc::EOPNOTSUPP) => Ok(()),
            r => r,
        }
    }

    fn punch(&self, file: &File, path: &Path, len: u64) -> Result<(), OsError> {
        use nix::fcntl::FallocateFlags as F;
        fallocate_head(
            file,
            path,
            len,
            F::FALLOC_FL_PUNCH_HOLE | F::FALLOC_FL_KEEP_SIZE,
        )
    }

    fn sync(&self, file: &File, path: &Path) -> Result<(), OsError> {
        file.sync_all().map_err(sys("fsync", path))
    }

    fn sync_data(&self, file: &File, path: &Path) -> Result<(), OsError> {
        file.sync_data().map_err(sys("fdatasync", path))
    }

    fn sync_dir(&self, path: &Path) -> Result<(), OsError> {
        File::open(path)
            .and_then(|d| d.sync_all())
            .map_err(sys("fsync", path))
    }

    fn copy_file(&self, src: &Path, dst: &Path) -> Result<super::copy::CopyStats, OsError> {
        super::copy::copy_file(src, dst)
    }

    fn copy_need(&self, src: &Path) -> Result<Option<u64>, OsError> {
        super::copy::file_copy_need(src)
    }

    fn copy_from_device(
        &self,
        src: &Path,
        dst: &Path,
        len: u64,
    ) -> Result<super::copy::CopyStats, OsError> {
        super::copy::copy_device_to_file(src, dst, len)
    }

    fn copy_to_device(&self, src: &Path, dst: &Path) -> Result<super::copy::CopyStats, OsError> {
        super::copy::copy_file_to_device(src, dst)
    }

    fn freeze(&self, mount_point: &Path) -> Result<(), OsError> {
        fs_ioctl(mount_point, "FIFREEZE", |fd| {
            // SAFETY: FIFREEZE on a descriptor of the mount point; the
            // argument is unused by the kernel.
            unsafe { fifreeze(fd, &mut 0) }.map(|_| ())
        })?;
        frozen().push(mount_point.to_path_buf());
        if EXITING.load(std::sync::atomic::Ordering::SeqCst) {
            // `thaw_frozen` ran, or runs now: never left frozen.
            let _ = self.thaw(mount_point);
            return Err(OsError::sys(
                "FIFREEZE",
                mount_point,
                nix::errno::Errno::ECANCELED,
            ));
        }
        Ok(())
    }

    fn thaw(&self, mount_point: &Path) -> Result<(), OsError> {
        thaw_at(mount_point)?;
        let mut set = frozen();
        if let Some(i) = set.iter().position(|p| p == mount_point) {
            set.swap_remove(i);
        }
        Ok(())
    }

    fn copy_tree(&self, src: &Path, dst: &Path) -> Result<super::copy::CopyStats, OsError> {
        super::copy::copy_tree(src, dst)
    }

    fn tree_copy_need(&self, src: &Path) -> Result<Option<u64>, OsError> {
        super::copy::tree_copy_need(src)
    }

    fn copy_into(
        &self,
        src: &Path,
        dst: &Path,
        skip: &[&str],
    ) -> Result<super::copy::CopyStats, OsError> {
        super::copy::copy_into(src, dst, skip)
    }

    fn change_stamp(&self, path: &Path) -> Result<Option<ChangeStamp>, OsError> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(path).map_err(sys("stat", path))?;
        let stamp = ChangeStamp {
            ctime: (m.ctime(), m.ctime_nsec()),
            mtime: (m.mtime(), m.mtime_nsec()),
            size: m.len(),
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(100);
        loop {
            let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME_COARSE)
                .map_err(|e| OsError::sys("clock_gettime", path, e))?;
            if (now.tv_sec(), now.tv_nsec()) > stamp.ctime {
                return Ok(Some(stamp));
            }
            if std::time::Instant::now() > deadline {
                return Ok(None);
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    fn still_named(&self, file: &File, path: &Path) -> Result<bool, OsError> {
        use std::os::unix::fs::MetadataExt;
        let open = file.metadata().map_err(sys("fstat", path))?;
        if open.nlink() == 0 {
            return Ok(false);
        }
        match std::fs::symlink_metadata(path) {
            Ok(named) => Ok(named.dev() == open.dev() && named.ino() == open.ino()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(sys("stat", path)(e)),
        }
    }

    fn read_durable(&self, path: &Path) -> Result<Option<Vec<u8>>, OsError> {
        use std::os::unix::fs::FileExt as _;
        const ALIGN: usize = 4096;
        const CHUNK: usize = 1 << 20;
        let file = match open_regular(path, libc::O_DIRECT) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Some(Vec::new())),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(None),
            Err(e) => return Err(OsError::sys("open O_DIRECT", path, e)),
        };
        let len = file.metadata().map_err(sys("stat", path))?.len() as usize;
        let mut raw = vec![0u8; CHUNK + ALIGN];
        let at = raw.as_ptr().align_offset(ALIGN);
        let buf = &mut raw[at..at + CHUNK];
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            match file.read_at(buf, out.len() as u64) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) && out.is_empty() => {
                    return Ok(None)
                }
                Err(e) => return Err(OsError::sys("read O_DIRECT", path, e)),
            }
        }
        out.truncate(len);
        Ok(Some(out))
    }
}

/// What kind of file `t` is, as a message names it: "a directory", "a
/// symbolic link", "a FIFO (named pipe)", ...
pub fn type_name(t: std::fs::FileType) -> &'static str {
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_char_device() {
        "a character device"
    } else {
        "a file of an unknown type"
    }
}

/// What stands where Berth keeps a regular file, when it is not one (the
/// error of `Files::open`, `open_regular` and `read_regular`, inside an
/// `io::Error` of kind `InvalidInput`; `not_regular` finds it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotRegular(pub &'static str);

impl NotRegular {
    pub fn of(t: std::fs::FileType) -> std::io::Error {
        let what = type_name(t);
        std::io::Error::new(std::io::ErrorKind::InvalidInput, NotRegular(what))
    }

    /// What it is ("a FIFO (named pipe)", "a directory", ...).
    pub fn what(&self) -> &'static str {
        self.0
    }
}

impl std::fmt::Display for NotRegular {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}, not a regular file", self.0)
    }
}

impl std::error::Error for NotRegular {}

/// The `NotRegular` inside `e`, if that is what it is.
pub fn not_regular(e: &std::io::Error) -> Option<NotRegular> {
    e.get_ref()
        .and_then(|i| i.downcast_ref::<NotRegular>())
        .copied()
}

/// `NotRegular` unless the open `file` is a regular file.
fn check_regular(file: &File) -> std::io::Result<()> {
    let t = file.metadata()?.file_type();
    if t.is_file() {
        Ok(())
    } else {
        Err(NotRegular::of(t))
    }
}

/// Opens the regular file `path` for reading (with `flags` added, e.g.
/// O_DIRECT). Anything else there is an error (`NotRegular`), found without
/// blocking: what is at the path is looked at first (a device is never
/// opened), and opened with O_NOFOLLOW and O_NONBLOCK (a symlink is never
/// followed; a FIFO put there in between opens at once) and looked at again
/// once open. A missing file is NotFound, as for `File::open`.
pub fn open_regular(path: &Path, flags: i32) -> std::io::Result<File> {
    open_checked(OpenOptions::new().read(true), path, flags, true)
}

/// Opens `path` with `o` (and `flags`) as only a regular file is opened:
/// when `look_first`, what is there is looked at before (a device is never
/// opened: opening one can act on it; nothing there is fine, for a create);
/// O_NOFOLLOW (a symlink is never followed), O_NONBLOCK (a FIFO put there
/// in between opens at once instead of waiting for a peer; on a regular
/// file it changes nothing); and what was opened is looked at again.
fn open_checked(
    o: &mut OpenOptions,
    path: &Path,
    flags: i32,
    look_first: bool,
) -> std::io::Result<File> {
    if look_first {
        if let Ok(m) = std::fs::symlink_metadata(path) {
            if !m.file_type().is_file() {
                return Err(NotRegular::of(m.file_type()));
            }
        }
    }
    let f = match o
        .custom_flags(
            flags | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
        .open(path)
    {
        Ok(f) => f,
        // replaced by a symlink in between
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(match std::fs::symlink_metadata(path) {
                Ok(m) => NotRegular::of(m.file_type()),
                Err(_) => e,
            })
        }
        Err(e) => return Err(e),
    };
    check_regular(&f)?;
    Ok(f)
}

/// Whether a directory can be used at `path`, or made there, looked at
/// without changing anything: `path` itself when it is there (a
/// directory this process may write in), else the nearest ancestor that
/// is there (likewise: a regular file, or a read-only filesystem, in the
/// way fails). For start-up, before anything is made. Err says why.
pub fn check_dir_usable(path: &Path) -> Result<(), String> {
    use nix::unistd::{access, AccessFlags};
    let mut at = path;
    loop {
        match std::fs::metadata(at) {
            Ok(m) if m.is_dir() => {
                return access(at, AccessFlags::W_OK | AccessFlags::X_OK).map_err(|e| {
                    if at == path {
                        format!("{} cannot be written in: {e}", path.display())
                    } else {
                        format!(
                            "{} cannot be made: {} cannot be written in: {e}",
                            path.display(),
                            at.display()
                        )
                    }
                });
            }
            Ok(_) if at == path => return Err(format!("{} is not a directory", path.display())),
            Ok(_) => {
                return Err(format!(
                    "{} cannot be made: {} is not a directory",
                    path.display(),
                    at.display()
                ))
            }
            Err(e)
                if matches!(e.kind(), std::io::ErrorKind::NotFound)
                    || e.raw_os_error() == Some(libc::ENOTDIR) =>
            {
                match at.parent() {
                    Some(p) => at = p,
                    None => return Ok(()),
                }
            }
            Err(e) => return Err(format!("{}: {e}", at.display())),
        }
    }
}

/// The whole of the regular file `path` (see `open_regular`); at most
/// `max` bytes when given.
pub fn read_regular(path: &Path, max: Option<u64>) -> std::io::Result<Vec<u8>> {
    let f = open_regular(path, 0)?;
    let len = f.metadata()?.len();
    let mut out = Vec::with_capacity(max.map_or(len, |m| m.min(len)) as usize);
    match max {
        Some(m) => f.take(m).read_to_end(&mut out)?,
        None => (&f).read_to_end(&mut out)?,
    };
    Ok(out)
}

/// The mount points this process froze (`RealFiles::freeze`) and has not
/// thawed yet: a copy in flight holds its source's filesystem frozen.
static FROZEN: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Set by `thaw_frozen`: a freeze made after it is undone at once.
static EXITING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn frozen() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    FROZEN.lock().unwrap_or_else(|e| e.into_inner())
}

fn thaw_at(mount_point: &Path) -> Result<(), OsError> {
    fs_ioctl(mount_point, "FITHAW", |fd| {
        // SAFETY: FITHAW on a descriptor of the mount point; the argument
        // is unused by the kernel.
        unsafe { fithaw(fd, &mut 0) }.map(|_| ())
    })
}

/// Thaws every filesystem this process froze and has not thawed, and
/// undoes any freeze made after; returns how many it thawed. For a
/// process about to exit without waiting for its calls in flight: a copy
/// it abandons would leave its source frozen, and every write of the pod
/// using it waiting, until berth starts again.
pub fn thaw_frozen() -> usize {
    EXITING.store(true, std::sync::atomic::Ordering::SeqCst);
    let left: Vec<PathBuf> = frozen().drain(..).collect();
    let mut thawed = 0;
    for mp in left {
        match thaw_at(&mp) {
            Ok(()) => {
                tracing::warn!(mount_point = %mp.display(), "thawed a filesystem frozen for a copy abandoned at exit");
                thawed += 1;
            }
            Err(e) => {
                tracing::error!(mount_point = %mp.display(), error = %e, "could not thaw a filesystem frozen for a copy abandoned at exit; run `fsfreeze -u` on it")
            }
        }
    }
    thawed
}

nix::ioctl_readwrite!(fifreeze, b'X', 119, libc::c_int);
nix::ioctl_readwrite!(fithaw, b'X', 120, libc::c_int);

fn fs_ioctl(
    path: &Path,
    op: &'static str,
    f: impl FnOnce(libc::c_int) -> nix::Result<()>,
) -> Result<(), OsError> {
    use std::os::fd::AsRawFd;
    let dir = File::open(path).map_err(sys("open", path))?;
    f(dir.as_raw_fd()).map_err(|e| OsError::sys(op, path, e))
}

/// What `Files::change_stamp` compares: a file's change and modification
/// times (seconds, nanoseconds) and its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangeStamp {
    pub ctime: (i64, i64),
    pub mtime: (i64, i64),
    pub size: u64,
}

/// Bytes of a file actually allocated on disk.
pub fn allocated_bytes(meta: &std::fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    meta.blocks().saturating_mul(512)
}

/// Whether any byte of `file` is stored (SEEK_DATA finds data): a file
/// that was only created, sized or preallocated has none (preallocated
/// extents are unwritten and read as zeros), one that anything wrote to
/// has some. `None` when the filesystem cannot tell (an error).
pub fn has_data(file: &File) -> Option<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on a descriptor this function borrows; no memory is
    // passed.
    let r = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_DATA) };
    if r >= 0 {
        return Some(true);
    }
    match std::io::Error::last_os_error().raw_os_error() {
        // ENXIO: no data at or after offset 0.
        Some(libc::ENXIO) => Some(false),
        _ => None,
    }
}

/// Creates a directory if it is missing (not its parents); true when it
/// created it. Something else than a directory there is an error.
pub fn ensure_dir(files: &dyn Files, path: &Path, mode: u32) -> Result<bool, OsError> {
    match files.create_dir(path, mode) {
        Ok(()) => Ok(true),
        Err(e) if e.errno() == Some(libc::EEXIST) => match std::fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => Ok(false),
            Ok(_) => Err(OsError::sys(
                "mkdir",
                path,
                std::io::Error::from_raw_os_error(libc::ENOTDIR),
            )),
            // A broken mount point answers stat with an error; it is a
            // directory as far as mounting is concerned.
            Err(_) => Ok(false),
        },
        Err(e) => Err(e),
    }
}

/// Creates the directory `path` and its missing parents with `files`, as
/// `std::fs::create_dir_all` does (the same calls: mkdir(2) of `path`
/// first, its parents only when that finds one missing; mode 0777 before
/// the umask; a directory already there, a symlink to one included, is
/// success).
pub fn create_dir_all(files: &dyn Files, path: &Path) -> Result<(), OsError> {
    if path.as_os_str().is_empty() {
        return Ok(());
    }
    let is_dir = |p: &Path| files.stat(p).is_ok_and(|m| m.is_dir());
    match files.create_dir(path, 0o777) {
        Ok(()) => return Ok(()),
        Err(e) if e.errno() == Some(libc::ENOENT) => {}
        Err(_) if is_dir(path) => return Ok(()),
        Err(e) => return Err(e),
    }
    match path.parent() {
        Some(p) => create_dir_all(files, p)?,
        None => {
            return Err(OsError::sys(
                "mkdir",
                path,
                std::io::Error::other("failed to create whole tree"),
            ))
        }
    }
    match files.create_dir(path, 0o777) {
        Ok(()) => Ok(()),
        Err(_) if is_dir(path) => Ok(()),
        Err(e) => Err(e),
    }
}

/// `ensure_dir` for a directory that is almost always there already (a
/// staging path, which kubelet makes before NodeStageVolume; a root's
/// `.trash`): one lstat when it is, where `ensure_dir` makes a mkdir that
/// fails with EEXIST and then the same lstat. The same answers: a
/// directory is `false`, anything else there (a symlink too) ENOTDIR, and
/// when the lstat cannot tell (missing, or an error such as a broken
/// mount's) `ensure_dir` decides.
pub fn ensure_dir_present(files: &dyn Files, path: &Path, mode: u32) -> Result<bool, OsError> {
    match files.lstat(path) {
        Ok(m) if m.is_dir() => Ok(false),
        Ok(_) => Err(OsError::sys(
            "mkdir",
            path,
            std::io::Error::from_raw_os_error(libc::ENOTDIR),
        )),
        Err(_) => ensure_dir(files, path, mode),
    }
}

/// The lstat of `path` through `files`, None when nothing is there
/// (ENOENT); any other error is returned: a look that fails is a doubt,
/// never "nothing there" (`Files::exists` reads every error as that).
pub fn lstat_present(files: &dyn Files, path: &Path) -> Result<Option<std::fs::Metadata>, OsError> {
    match files.lstat(path) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.errno() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The entries of one of Berth's own directories (a root's `.trash`,
/// `.creating`, `.snapshots`), whose contents start-up removes: never
/// through a symlink (or anything else that is not a directory) put in its
/// place, which would have start-up remove what it points to, outside
/// Berth's directories. Such an entry is reported and left alone (the RPCs
/// that need the directory fail on it: `ensure_dir`); a missing or
/// unreadable directory has no entries. Looked at and read through
/// `files` (its lstat, then its read_dir).
pub fn read_own_dir(files: &dyn Files, path: &Path) -> Option<std::fs::ReadDir> {
    match files.lstat(path) {
        Ok(m) if m.is_dir() => files.read_dir(path).ok(),
        Ok(m) => {
            tracing::error!(
                path = %path.display(),
                symlink = m.file_type().is_symlink(),
                "not a directory of Berth's own (put there by hand?): nothing it leads to is moved or removed; remove it"
            );
            None
        }
        Err(_) => None,
    }
}

/// The flags of an inode that even root cannot get past: while one is
/// set, the inode cannot be removed, renamed or (immutable) changed, nor
/// (either, on a directory) an entry in it removed or renamed. Berth never
/// clears them: they are the statement of whoever set them (the tenant, a
/// privileged pod, an operator), and only an operator takes them back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Locks {
    /// `chattr +i`.
    pub immutable: bool,
    /// `chattr +a`.
    pub append_only: bool,
}

impl Locks {
    pub fn any(&self) -> bool {
        self.immutable || self.append_only
    }

    /// "immutable (chattr +i)", "append-only (chattr +a)" or both; None
    /// when neither is set.
    pub fn named(&self) -> Option<&'static str> {
        match (self.immutable, self.append_only) {
            (true, true) => Some("immutable and append-only (chattr +i +a)"),
            (true, false) => Some("immutable (chattr +i)"),
            (false, true) => Some("append-only (chattr +a)"),
            (false, false) => None,
        }
    }

    /// The chattr arguments that clear what is set ("-i", "-a", "-i -a").
    pub fn clearing(&self) -> &'static str {
        match (self.immutable, self.append_only) {
            (true, true) => "-i -a",
            (true, false) => "-i",
            _ => "-a",
        }
    }

    /// What an operator reads of `path`, which berth cannot remove or move
    /// because of these flags: which flag, how to see it, how to clear
    /// it, and that berth never does.
    pub fn note(&self, path: &Path) -> String {
        format!(
            "{} is {}: berth never clears that flag (the tenant's or an operator's statement); `lsattr -d {}` shows it, `chattr {} {}` clears it",
            path.display(),
            self.named().unwrap_or("neither immutable nor append-only"),
            path.display(),
            self.clearing(),
            path.display()
        )
    }
}

/// `Files::locks` for real: statx's immutable and append attributes of
/// `path` itself, where the filesystem reports them.
pub fn locks_of(path: &Path) -> Result<Locks, OsError> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        OsError::sys(
            "statx",
            path,
            std::io::Error::from_raw_os_error(libc::EINVAL),
        )
    })?;
    // SAFETY: statx writes one `struct statx` into `buf`, a valid and
    // exclusively borrowed one, and reads the NUL-terminated `c`.
    let mut buf: libc::statx = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_TYPE,
            &mut buf,
        )
    };
    if r != 0 {
        return Err(OsError::sys("statx", path, std::io::Error::last_os_error()));
    }
    let set = |flag: libc::c_int| {
        let flag = flag as u64;
        buf.stx_attributes_mask & flag != 0 && buf.stx_attributes & flag != 0
    };
    Ok(Locks {
        immutable: set(libc::STATX_ATTR_IMMUTABLE),
        append_only: set(libc::STATX_ATTR_APPEND),
    })
}

/// fallocate(2) with `flags` of the first `len` bytes of `file` (nothing
/// to do for none; EFBIG for a length past what the call takes).
fn fallocate_head(
    file: &File,
    path: &Path,
    len: u64,
    flags: nix::fcntl::FallocateFlags,
) -> Result<(), OsError> {
    let len = i64::try_from(len).map_err(|_| {
        OsError::sys(
            "fallocate",
            path,
            std::io::Error::from_raw_os_error(libc::EFBIG),
        )
    })?;
    if len == 0 {
        return Ok(());
    }
    nix::fcntl::fallocate(file, flags, 0, len).map_err(|e| OsError::sys("fallocate", path, e))
}

/// Removes the tree at `path` (a directory; a symlink there is removed
/// itself, a file is an error, ENOTDIR, as `remove_dir_all` has it)
/// without following a symlink, one level at a time with no recursion and
/// no descriptor held per level: a tree as deep as a tenant likes (one
/// relative mkdir after another) cannot overflow the thread's stack, which
/// `std::fs::remove_dir_all` did at some ten thousand levels (it recurses,
/// and aborted berth). Going back up, the parent reached through `..` must
/// be the directory it came down from (device and inode), or it stops:
/// nothing outside the tree is ever touched. Nor is anything mounted in
/// it: a directory of the tree (or the tree itself) that is the root of
/// a mount stops the removal with an error before anything below it is
/// touched (statx's mount-root attribute of the open directory, or a
/// device other than its parent's where the kernel cannot tell); a
/// mount's contents are never the tree's. Held per level on the way down:
/// a batch of its subdirectories' names (`SUBDIR_BATCH`).
pub(crate) fn remove_tree_iteratively(path: &Path) -> Result<(), OsError> {
    use nix::fcntl::{openat, OFlag};
    use nix::sys::stat::{fstat, Mode};
    use nix::unistd::{unlinkat, UnlinkatFlags};
    use std::ffi::OsString;
    use std::os::fd::OwnedFd;
    let err = |op: &'static str| move |e: nix::errno::Errno| OsError::sys(op, path, e);
    // An entry that cannot be removed (`name` in the directory open at
    // `dir`) is named by its own path (the kernel's name of the
    // directory), not the tree's top: the operator finds it. EPERM, which
    // root gets for an immutable or append-only entry or directory (chattr
    // +i, +a: a privileged pod can set them in its volume), names the one
    // that carries the flag, which flag, and the lsattr and chattr
    // commands (`OsError::Locked`); those flags are never cleared here.
    // Before 2026-12-07 the error named the tree's top only, and then
    // (until this) guessed at "immutable or append-only, or in such a
    // directory" without saying which.
    let entry_err = |op: &'static str, dir: &OwnedFd, name: &std::ffi::OsStr| {
        use std::os::fd::AsRawFd;
        let parent = std::fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd()))
            .unwrap_or_else(|_| path.to_path_buf());
        let at = parent.join(name);
        move |e: nix::errno::Errno| refused(op, at, &parent, e.into())
    };
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(OsError::sys("lstat", path, e)),
        Ok(m) if m.file_type().is_symlink() => {
            return std::fs::remove_file(path).map_err(sys("unlink", path))
        }
        Ok(m) if !m.is_dir() => {
            return Err(OsError::sys(
                "remove tree",
                path,
                std::io::Error::from_raw_os_error(libc::ENOTDIR),
            ))
        }
        Ok(_) => {}
    }
    let dir_flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    // Removes every entry of the directory `dir` but its subdirectories,
    // whose names it returns, `SUBDIR_BATCH` at most, and whether there
    // are more (found by reading the directory again once these are gone).
    let clear = |dir: &OwnedFd| -> Result<(Vec<OsString>, bool), OsError> {
        use std::os::unix::ffi::OsStrExt;
        let mut d =
            nix::dir::Dir::openat(dir, ".", dir_flags, Mode::empty()).map_err(err("opendir"))?;
        let mut subdirs = Vec::new();
        let mut more = false;
        for e in d.iter() {
            let e = e.map_err(err("readdir"))?;
            let name = e.file_name();
            if matches!(name.to_bytes(), b"." | b"..") {
                continue;
            }
            let is_dir = match e.file_type() {
                Some(t) => t == nix::dir::Type::Directory,
                None => {
                    nix::sys::stat::fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
                        .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR)
                        .map_err(err("stat"))?
                }
            };
            if is_dir {
                if subdirs.len() < SUBDIR_BATCH {
                    subdirs.push(OsString::from(std::ffi::OsStr::from_bytes(name.to_bytes())));
                } else {
                    more = true;
                }
                continue;
            }
            match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
                Err(e) => {
                    let name = std::ffi::OsStr::from_bytes(name.to_bytes());
                    return Err(entry_err("unlink", dir, name)(e));
                }
            }
        }
        Ok((subdirs, more))
    };
    // The directories above the current one: each one's name in its
    // parent, its parent's (device, inode), and its parent's subdirectories
    // still to remove.
    struct Level {
        name: OsString,
        parent: (libc::dev_t, libc::ino_t),
        pending: Vec<OsString>,
        more: bool,
    }
    // A mount at `d` (named `name` in the tree, its parent on device
    // `parent_dev`): stop, leaving it and what it holds.
    let refuse_mount = |d: &OwnedFd, name: &std::ffi::OsStr, parent_dev: Option<libc::dev_t>| {
        let mounted = match super::mountpoint::fd_is_mount_root(d) {
            Some(m) => m,
            None => match parent_dev {
                Some(p) => fstat(d).map_err(err("stat"))?.st_dev != p,
                None => false,
            },
        };
        if mounted {
            return Err(OsError::sys(
                "remove tree",
                path,
                std::io::Error::other(format!(
                    "{name:?} in the tree is a mount point; nothing mounted there, or below it, is removed (unmount it first)"
                )),
            ));
        }
        Ok(())
    };
    let mut up: Vec<Level> = Vec::new();
    let mut dir = nix::fcntl::open(path, dir_flags, Mode::empty()).map_err(err("open"))?;
    refuse_mount(&dir, path.as_os_str(), None)?;
    let (mut pending, mut more) = clear(&dir)?;
    loop {
        if let Some(name) = pending.pop() {
            match unlinkat(&dir, name.as_os_str(), UnlinkatFlags::RemoveDir) {
                Ok(()) | Err(nix::errno::Errno::ENOENT) => continue,
                // Not empty, or (EBUSY) a mount point: looked into, where a
                // mount stops the removal with a message saying so.
                Err(nix::errno::Errno::ENOTEMPTY)
                | Err(nix::errno::Errno::EEXIST)
                | Err(nix::errno::Errno::EBUSY) => {}
                Err(e) => return Err(entry_err("rmdir", &dir, &name)(e)),
            }
            let st = fstat(&dir).map_err(err("stat"))?;
            let child = match openat(&dir, name.as_os_str(), dir_flags, Mode::empty()) {
                Ok(c) => c,
                Err(nix::errno::Errno::ENOENT) => continue,
                Err(e) => return Err(err("open")(e)),
            };
            refuse_mount(&child, name.as_os_str(), Some(st.st_dev))?;
            up.push(Level {
                name,
                parent: (st.st_dev, st.st_ino),
                pending: std::mem::take(&mut pending),
                more,
            });
            dir = child;
            (pending, more) = clear(&dir)?;
            continue;
        }
        if more {
            // This batch of subdirectories is gone: the next.
            (pending, more) = clear(&dir)?;
            continue;
        }
        // `dir` is empty: it goes, from its parent.
        let Some(level) = up.pop() else {
            drop(dir);
            return match std::fs::remove_dir(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(refused(
                    "rmdir",
                    path.to_path_buf(),
                    path.parent().unwrap_or(Path::new("/")),
                    e,
                )),
                _ => Ok(()),
            };
        };
        let parent = openat(&dir, "..", dir_flags, Mode::empty()).map_err(err("open"))?;
        let st = fstat(&parent).map_err(err("stat"))?;
        if (st.st_dev, st.st_ino) != level.parent {
            return Err(OsError::sys(
                "remove tree",
                path,
                std::io::Error::other("a directory in the tree was moved while it was removed"),
            ));
        }
        dir = parent;
        match unlinkat(&dir, level.name.as_os_str(), UnlinkatFlags::RemoveDir) {
            Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => return Err(entry_err("rmdir", &dir, &level.name)(e)),
        }
        pending = level.pending;
        more = level.more;
    }
}

/// What `find_locked` found in a tree.
#[derive(Debug, Default)]
pub struct LockSearch {
    /// The first entry that is immutable or append-only, with its flags.
    pub locked: Option<(PathBuf, Locks)>,
    /// The first entry that could not be looked at (its flags, its type,
    /// its listing), with the cause: it could be kept by a flag, which
    /// cannot be told. An entry not there (ENOENT: removed while it was
    /// looked through) is not one.
    pub unread: Option<(PathBuf, std::io::Error)>,
}

impl LockSearch {
    /// Notes that `path` could not be looked at (the first such entry is
    /// kept; ENOENT is nothing there).
    fn unread(&mut self, path: &Path, e: std::io::Error) {
        if self.unread.is_none() && e.raw_os_error() != Some(libc::ENOENT) {
            self.unread = Some((path.to_path_buf(), e));
        }
    }

    /// The flags of `path` through `files` when it carries one; one that
    /// cannot be read is noted (`unread`), never taken for none.
    fn flags(&mut self, files: &dyn Files, path: &Path) -> Option<Locks> {
        match files.locks(path) {
            Ok(l) => l.any().then_some(l),
            Err(e) => {
                self.unread(path, e.into_io());
                None
            }
        }
    }
}

/// The first entry of the tree at `top` (`top` itself included, no
/// symlink followed) that is immutable or append-only, with its flags:
/// what keeps such a tree from being removed (`OsError::Locked`); and the
/// first entry it could not look at (its flags, its type or its listing:
/// before 2026-12-07 such an entry was skipped, and a tree that might be
/// kept by a flag read as free of them). Looked at through `files`
/// (lstat, read_dir, `locks`), depth first, holding one listing per
/// level; it gives up (no flag found) after `budget` entries or
/// `MAX_LOCK_DEPTH` levels down, never reading a whole tenant's tree of
/// millions of files.
pub fn find_locked(files: &dyn Files, top: &Path, budget: usize) -> LockSearch {
    let mut found = LockSearch::default();
    if let Some(l) = found.flags(files, top) {
        found.locked = Some((top.to_path_buf(), l));
        return found;
    }
    let listed = match files.lstat(top) {
        Ok(m) if m.is_dir() => files.read_dir(top),
        Ok(_) => return found,
        Err(e) => Err(e),
    };
    let first = match listed {
        Ok(rd) => rd,
        Err(e) => {
            found.unread(top, e.into_io());
            return found;
        }
    };
    let mut levels = vec![(top.to_path_buf(), first)];
    let mut seen = 0usize;
    while let Some((dir, level)) = levels.last_mut() {
        let e = match level.next() {
            None => {
                levels.pop();
                continue;
            }
            Some(Err(e)) => {
                // a listing that broke off: what is left of it is unseen
                found.unread(dir, e);
                levels.pop();
                continue;
            }
            Some(Ok(e)) => e,
        };
        seen += 1;
        if seen > budget {
            return found;
        }
        let p = e.path();
        if let Some(l) = found.flags(files, &p) {
            found.locked = Some((p, l));
            return found;
        }
        if levels.len() < MAX_LOCK_DEPTH {
            match e.file_type() {
                Ok(t) if t.is_dir() => match files.read_dir(&p) {
                    Ok(below) => levels.push((p, below)),
                    Err(err) => found.unread(&p, err.into_io()),
                },
                Ok(_) => {}
                Err(err) => found.unread(&p, err),
            }
        }
    }
    found
}

/// How many levels down `find_locked` looks.
const MAX_LOCK_DEPTH: usize = 128;

/// The error of `op` (unlink, rmdir) of `at` in the directory `parent`:
/// for EPERM, where `at` or `parent` is immutable or append-only, which
/// one and which flag (`OsError::Locked`); otherwise as the call said.
fn refused(op: &'static str, at: PathBuf, parent: &Path, e: std::io::Error) -> OsError {
    if e.raw_os_error() == Some(libc::EPERM) {
        for held in [at.as_path(), parent] {
            if let Ok(locks) = locks_of(held) {
                if locks.any() {
                    return OsError::Locked {
                        op,
                        at: held.to_path_buf(),
                        path: at.clone(),
                        locks,
                    };
                }
            }
        }
    }
    OsError::sys(op, at, e)
}

/// The most subdirectories' names `remove_tree_iteratively` holds for one
/// directory at a time (some 1 MB of names at most): a tenant's directory
/// of a million subdirectories is read again for each batch instead of
/// having all its names held (before 2026-12-07, on xfs, where an empty
/// directory takes no block, hundreds of MB; `tests/copy_memory.rs`).
const SUBDIR_BATCH: usize = 4096;

/// Moves a whole copy made under a temporary name, `from`, to its own
/// name `to` (never replacing anything there), and syncs `to`'s directory;
/// nothing to do when `from` is not there (moved already). Once a record
/// says Ready: a restore's file, a snapshot's copy.
pub fn move_into_place(files: &dyn Files, from: &Path, to: &Path) -> Result<(), OsError> {
    if std::fs::symlink_metadata(from).is_err() {
        return Ok(());
    }
    files.rename_noreplace(from, to)?;
    files.sync_dir(to.parent().unwrap_or(Path::new("/")))
}

/// Moves `from` into the directory `dir` under `name`, never replacing
/// anything there: when `name` is taken, `name.<n>` for the first free n.
/// Returns where it went.
pub fn move_aside(
    files: &dyn Files,
    from: &Path,
    dir: &Path,
    name: &str,
) -> Result<std::path::PathBuf, OsError> {
    let mut to = dir.join(name);
    for n in 1..=1000u32 {
        match files.rename_noreplace(from, &to) {
            Ok(()) => return Ok(to),
            Err(e) if e.errno() == Some(libc::EEXIST) || e.errno() == Some(libc::ENOTEMPTY) => {
                to = dir.join(format!("{name}.{n}"));
            }
            Err(e) => return Err(e),
        }
    }
    Err(OsError::sys(
        "rename",
        from,
        std::io::Error::from_raw_os_error(libc::EEXIST),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ensure_dir_present` answers as `ensure_dir` does, whatever is at
    /// the path (a guard: the cut is in the calls it makes, which the
    /// handler tests count).
    #[test]
    fn ensure_dir_present_answers_as_ensure_dir() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("dir")).unwrap();
        std::fs::write(d.path().join("file"), b"x").unwrap();
        std::os::unix::fs::symlink(d.path().join("dir"), d.path().join("link")).unwrap();
        let answer = |r: Result<bool, OsError>| r.map_err(|e| e.errno());
        for name in ["dir", "file", "link", "missing", "file/below", "none/below"] {
            let (a, b) = (d.path().join(name), d.path().join(format!("{name}-2")));
            if name == "missing" {
                assert_eq!(answer(ensure_dir_present(&RealFiles, &a, 0o700)), Ok(true));
                assert!(a.is_dir());
                assert_eq!(answer(ensure_dir(&RealFiles, &b, 0o700)), Ok(true));
                continue;
            }
            assert_eq!(
                answer(ensure_dir_present(&RealFiles, &a, 0o700)),
                answer(ensure_dir(&RealFiles, &a, 0o700)),
                "{name}"
            );
        }
        assert_eq!(
            answer(ensure_dir_present(&RealFiles, &d.path().join("dir"), 0o700)),
            Ok(false)
        );
        assert_eq!(
            answer(ensure_dir_present(
                &RealFiles,
                &d.path().join("link"),
                0o700
            )),
            Err(Some(libc::ENOTDIR))
        );
    }

    #[test]
    fn lstat_beneath_never_follows_a_symlink_on_the_way() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/b")).unwrap();
        std::fs::create_dir_all(outside.path().join("b")).unwrap();
        std::os::unix::fs::symlink(outside.path(), d.path().join("l")).unwrap();
        std::os::unix::fs::symlink(d.path().join("a/b"), d.path().join("a/lb")).unwrap();
        std::fs::write(d.path().join("f"), b"x").unwrap();
        let errno = |rel: &str| lstat_beneath(d.path(), rel).unwrap_err().errno();
        assert!(lstat_beneath(d.path(), "a/b").unwrap().is_dir());
        assert!(lstat_beneath(d.path(), "a").unwrap().is_dir());
        // The last component itself is not followed: a symlink is one.
        assert!(lstat_beneath(d.path(), "a/lb")
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(lstat_beneath(d.path(), "l")
            .unwrap()
            .file_type()
            .is_symlink());
        // Through a symlink or a file: refused, never followed.
        assert!(matches!(errno("l/b"), Some(libc::ENOTDIR | libc::ELOOP)));
        assert!(matches!(errno("a/lb/x"), Some(libc::ENOTDIR | libc::ELOOP)));
        assert_eq!(errno("f/x"), Some(libc::ENOTDIR));
        assert_eq!(errno("a/missing"), Some(libc::ENOENT));
        assert_eq!(errno("a/../a/b"), Some(libc::EINVAL));
        assert_eq!(errno("./a"), Some(libc::EINVAL));
    }

    #[test]
    fn remove_tree_removes_the_entry_never_what_a_symlink_leads_to() {
        let t = tempfile::tempdir().unwrap();
        let p = |n: &str| t.path().join(n);
        std::fs::create_dir(p("empty")).unwrap();
        std::fs::create_dir_all(p("full/sub")).unwrap();
        std::fs::write(p("full/sub/f"), b"x").unwrap();
        std::fs::create_dir(p("kept")).unwrap();
        std::fs::write(p("kept/f"), b"x").unwrap();
        std::os::unix::fs::symlink(p("kept"), p("link")).unwrap();
        std::fs::write(p("file"), b"x").unwrap();
        for n in ["empty", "full", "link", "missing"] {
            RealFiles.remove_tree(&p(n)).unwrap();
            assert!(std::fs::symlink_metadata(p(n)).is_err(), "{n}");
        }
        assert!(p("kept/f").is_file());
        // A file is no tree (as remove_dir_all has it): left, an error.
        assert!(RealFiles.remove_tree(&p("file")).is_err());
        assert!(p("file").is_file());
    }

    /// A tree deeper than any path (one relative mkdir after another), with
    /// symlinks and side directories along it, goes whole, level by level
    /// without recursion (std's `remove_dir_all` overflowed a 2 MiB stack
    /// at some ten thousand levels: binary test
    /// `a_local_volume_holding_a_very_deep_tree_is_deleted_and_berth_stays_up`);
    /// what a symlink in it leads to stays.
    #[test]
    fn remove_tree_takes_a_tree_deeper_than_any_path() {
        use nix::fcntl::{open, openat, OFlag};
        use nix::sys::stat::{mkdirat, Mode};
        let t = tempfile::tempdir().unwrap();
        let kept = t.path().join("kept");
        std::fs::create_dir(&kept).unwrap();
        std::fs::write(kept.join("f"), b"x").unwrap();
        let top = t.path().join("deep");
        std::fs::create_dir(&top).unwrap();
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let mut fd = open(&top, flags, Mode::empty()).unwrap();
        for i in 0..3_000 {
            if i % 100 == 0 {
                nix::unistd::symlinkat(&kept, &fd, "link").unwrap();
                mkdirat(&fd, "side", Mode::from_bits_truncate(0o755)).unwrap();
            }
            mkdirat(&fd, "d", Mode::from_bits_truncate(0o755)).unwrap();
            fd = openat(&fd, "d", flags, Mode::empty()).unwrap();
        }
        drop(fd);
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || RealFiles.remove_tree(&top).map(|_| top))
            .unwrap()
            .join()
            .unwrap()
            .map(|top| assert!(std::fs::symlink_metadata(top).is_err()))
            .unwrap();
        assert!(kept.join("f").is_file());
    }

    /// Lets an entry made immutable by a test go again (also when the test
    /// fails), so that its temporary directory can be removed.
    struct Unlock(PathBuf);

    impl Drop for Unlock {
        fn drop(&mut self) {
            let _ = std::process::Command::new("chattr")
                .arg("-i")
                .arg(&self.0)
                .status();
        }
    }

    /// An entry that even root cannot remove (an immutable file, chattr
    /// +i, which a privileged pod can set in its volume) stops the
    /// removal of its tree with an error naming the entry and why (never
    /// the tree's top only, as before 2026-12-07); the flag is never
    /// cleared, nothing outside the tree is touched, and once the flag
    /// is gone the tree goes. Needs root and a filesystem with the flag:
    /// elsewhere it says so and checks nothing.
    #[test]
    fn an_immutable_entry_stops_a_removal_with_its_own_name() {
        let t = tempfile::tempdir().unwrap();
        let top = t.path().join("vol");
        std::fs::create_dir_all(top.join("a/b")).unwrap();
        std::fs::write(top.join("a/other"), b"x").unwrap();
        let locked = top.join("a/b/locked");
        std::fs::write(&locked, b"the tenant's").unwrap();
        let outside = t.path().join("outside");
        std::fs::write(&outside, b"kept").unwrap();
        std::os::unix::fs::symlink(&outside, top.join("a/b/link")).unwrap();
        let unlock = Unlock(locked.clone());
        let made = std::process::Command::new("chattr")
            .arg("+i")
            .arg(&locked)
            .output();
        if !made.as_ref().is_ok_and(|o| o.status.success()) {
            eprintln!("chattr +i is not possible here ({made:?}): nothing checked");
            return;
        }
        let e = RealFiles.remove_tree(&top).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EPERM), "{e}");
        let named = std::fs::canonicalize(&locked).unwrap();
        assert!(
            e.to_string().contains(&named.display().to_string()),
            "the error does not name {}: {e}",
            named.display()
        );
        assert!(e.to_string().contains("immutable"), "{e}");
        assert_eq!(std::fs::read(&locked).unwrap(), b"the tenant's");
        assert_eq!(std::fs::read(&outside).unwrap(), b"kept");
        drop(unlock);
        RealFiles.remove_tree(&top).unwrap();
        assert!(std::fs::symlink_metadata(&top).is_err());
        assert_eq!(std::fs::read(&outside).unwrap(), b"kept");
    }

    #[test]
    fn move_aside_never_replaces() {
        let t = tempfile::tempdir().unwrap();
        let aside = t.path().join("aside");
        std::fs::create_dir(&aside).unwrap();
        let mut moved = Vec::new();
        for i in 0..3 {
            let d = t.path().join("vol");
            std::fs::create_dir(&d).unwrap();
            std::fs::write(d.join("data"), format!("{i}")).unwrap();
            moved.push(move_aside(&RealFiles, &d, &aside, "vol").unwrap());
        }
        assert_eq!(
            moved,
            [aside.join("vol"), aside.join("vol.1"), aside.join("vol.2")]
        );
        for (i, p) in moved.iter().enumerate() {
            assert_eq!(
                std::fs::read_to_string(p.join("data")).unwrap(),
                format!("{i}")
            );
        }
        // Files too (rename(2) would silently replace a file).
        std::fs::write(t.path().join("f"), b"new").unwrap();
        std::fs::write(aside.join("f"), b"old").unwrap();
        let to = move_aside(&RealFiles, &t.path().join("f"), &aside, "f").unwrap();
        assert_eq!(to, aside.join("f.1"));
        assert_eq!(std::fs::read(aside.join("f")).unwrap(), b"old");
    }

    #[test]
    fn has_data_sees_writes_not_sizes_or_preallocation() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("img");
        let f = RealFiles.open(&p, Open::CreateNew).unwrap();
        RealFiles.set_len(&f, &p, 64 << 20).unwrap();
        // tmpfs and ext4/xfs all answer SEEK_DATA; a filesystem that cannot
        // tell is None, which callers treat as "not new".
        if let Some(d) = has_data(&f) {
            assert!(!d, "a sized file holds no data");
            RealFiles.write_at(&f, &p, b"x", 40 << 20).unwrap();
            assert_eq!(has_data(&f), Some(true));
        }
        let q = t.path().join("thick");
        let g = RealFiles.open(&q, Open::CreateNew).unwrap();
        if RealFiles.allocate(&g, &q, 8 << 20).is_ok() {
            assert_ne!(
                has_data(&g),
                Some(true),
                "preallocated extents are not data"
            );
        }
    }

    #[test]
    fn read_durable_reads_what_was_written() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("log");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        std::fs::File::open(&p).unwrap().sync_all().unwrap();
        match RealFiles.read_durable(&p).unwrap() {
            Some(d) => assert!(d == data, "{} bytes read back", d.len()),
            None => eprintln!("skipped: this filesystem has no O_DIRECT"),
        }
        assert_eq!(
            RealFiles.read_durable(&t.path().join("none")).unwrap(),
            Some(Vec::new())
        );
    }

    /// A FIFO, a socket, a directory or a symlink where a regular file is
    /// expected: every open and read fails at once, saying what is there
    /// (a FIFO used to block the opener until a writer came).
    #[test]
    fn only_regular_files_are_opened_and_never_with_a_wait() {
        let t = tempfile::tempdir().unwrap();
        let fifo = t.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let sock = t.path().join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let dir = t.path().join("dir");
        std::fs::create_dir(&dir).unwrap();
        let file = t.path().join("file");
        std::fs::write(&file, b"data").unwrap();
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let (done, finished) = std::sync::mpsc::channel();
        let paths = [fifo, sock, dir, link];
        let checked = paths.clone();
        std::thread::spawn(move || {
            for p in &checked {
                let what = |e: &std::io::Error| not_regular(e).map(|n| n.what());
                let r = read_regular(p, None).map_err(|e| what(&e));
                let o = open_regular(p, 0).map(|_| ()).map_err(|e| what(&e));
                let d = RealFiles
                    .read_durable(p)
                    .map(|_| ())
                    .map_err(|e| e.to_string());
                let w: Vec<_> = [Open::CreateOrKeep, Open::CreateOrTruncate, Open::Existing]
                    .into_iter()
                    .map(|how| {
                        RealFiles
                            .open(p, how)
                            .map(|_| ())
                            .map_err(|e| crate::error::chain(&e))
                    })
                    .collect();
                let _ = done.send((p.clone(), r.map(|_| ()), o, d, w));
            }
        });
        let kinds = [
            "a FIFO (named pipe)",
            "a socket",
            "a directory",
            "a symbolic link",
        ];
        for (p, kind) in paths.iter().zip(kinds) {
            let (at, r, o, d, w) = finished
                .recv_timeout(std::time::Duration::from_secs(5))
                .expect("blocked on a file that is not a regular file");
            assert_eq!(&at, p);
            assert_eq!(r, Err(Some(kind)), "{}", p.display());
            assert_eq!(o, Err(Some(kind)), "{}", p.display());
            assert!(d.is_err(), "{}", p.display());
            for e in w {
                assert!(e.unwrap_err().contains(kind), "{}", p.display());
            }
        }
        assert_eq!(read_regular(&file, None).unwrap(), b"data");
        assert_eq!(read_regular(&file, Some(2)).unwrap(), b"da");
        assert!(RealFiles.open(&file, Open::Existing).is_ok());
        assert_eq!(
            read_regular(&t.path().join("none"), None)
                .unwrap_err()
                .kind(),
            std::io::ErrorKind::NotFound
        );
    }

    #[test]
    fn open_never_follows_a_symlink() {
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("target");
        std::fs::write(&target, b"keep").unwrap();
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        for how in [Open::CreateOrKeep, Open::CreateOrTruncate, Open::Existing] {
            assert!(RealFiles.open(&link, how).is_err());
        }
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
    }
}
