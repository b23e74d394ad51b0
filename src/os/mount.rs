//! mount(2) and umount2(2); bind mounts with flags through open_tree(2),
//! mount_setattr(2) and move_mount(2) (Linux 5.12), so that they appear
//! with their flags in one step.
use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

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

    /// The flag set numbered `n` (bit i: the i-th of the seven flags, in
    /// field order; 0 to 127 name every set), for tests that go through
    /// them all.
    pub fn numbered(n: u32) -> Self {
        let b = |i: u32| n & (1 << i) != 0;
        MountFlags {
            readonly: b(0),
            nosuid: b(1),
            nodev: b(2),
            noexec: b(3),
            noatime: b(4),
            nodiratime: b(5),
            relatime: b(6),
        }
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

/// A mount_setattr(2) change: the `MOUNT_ATTR_*` bits to set and to clear.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MountAttr {
    pub set: u64,
    pub clr: u64,
}

impl MountAttr {
    /// Every per-mount flag a remount sets (ro, nosuid, nodev, noexec, the
    /// atime setting, nodiratime, nosymfollow).
    const ALL: u64 = libc::MOUNT_ATTR_RDONLY
        | libc::MOUNT_ATTR_NOSUID
        | libc::MOUNT_ATTR_NODEV
        | libc::MOUNT_ATTR_NOEXEC
        | libc::MOUNT_ATTR__ATIME
        | libc::MOUNT_ATTR_NODIRATIME
        | libc::MOUNT_ATTR_NOSYMFOLLOW;

    /// The change that leaves a mount with exactly the per-mount flags that
    /// `mount(MS_REMOUNT | MS_BIND | all.to_ms())` gives it, where `all`
    /// holds what the mount already has (the two-step way: the remount
    /// replaces every per-mount flag, while mount_setattr changes only the
    /// bits it names, so every bit is named here):
    /// - ro, nosuid, nodev, noexec, nodiratime: as in `all`;
    /// - atime: noatime if `all` has it; else relatime if `all` has relatime
    ///   or nodiratime (mount(2) defaults to relatime unless MS_NOATIME);
    ///   else strictatime (the remount keeps the mount's setting, and
    ///   `all` showing none of the three means strictatime);
    /// - nosymfollow: cleared (Berth's flags cannot ask for it and the
    ///   remount did not keep it).
    pub fn exact(all: MountFlags) -> MountAttr {
        let mut set = 0;
        for (on, bit) in [
            (all.readonly, libc::MOUNT_ATTR_RDONLY),
            (all.nosuid, libc::MOUNT_ATTR_NOSUID),
            (all.nodev, libc::MOUNT_ATTR_NODEV),
            (all.noexec, libc::MOUNT_ATTR_NOEXEC),
            (all.nodiratime, libc::MOUNT_ATTR_NODIRATIME),
        ] {
            if on {
                set |= bit;
            }
        }
        set |= if all.noatime {
            libc::MOUNT_ATTR_NOATIME
        } else if all.relatime || all.nodiratime {
            libc::MOUNT_ATTR_RELATIME
        } else {
            libc::MOUNT_ATTR_STRICTATIME
        };
        MountAttr {
            set,
            clr: Self::ALL,
        }
    }
}

/// How a bind mount was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindWay {
    /// No flags asked: one mount(MS_BIND).
    Plain,
    /// open_tree, mount_setattr, move_mount: the mount appears at the
    /// target with its flags, so nothing can leave it half made.
    Atomic,
    /// mount(MS_BIND), then a remount with the flags: a kernel without the
    /// new mount API (before 5.12), or one that refused it.
    TwoStep,
}

/// The system calls a bind mount is made of, one method each, so that the
/// choice between the atomic and the two-step way (`bind_with`) is tested
/// with a fake (`fake::FakeBindCalls`). Real: `RealMounter`'s.
pub trait BindCalls {
    /// A detached copy of a mount; dropping it discards the copy.
    type Tree;
    /// open_tree(source, OPEN_TREE_CLONE): a detached copy of the mount at
    /// `source`, rooted there; not recursive, as mount(MS_BIND) is not.
    fn open_tree(&self, source: &Path) -> Result<Self::Tree, OsError>;
    /// The flags of the copy (statvfs of it: the mount's flags, read-only
    /// also when its filesystem is).
    fn tree_flags(&self, tree: &Self::Tree) -> Result<MountFlags, OsError>;
    /// mount_setattr(2) on the copy.
    fn set_attr(&self, tree: &Self::Tree, attr: MountAttr) -> Result<(), OsError>;
    /// move_mount(2): attaches the copy at `target` (not following a
    /// symlink there).
    fn attach(&self, tree: Self::Tree, target: &Path) -> Result<(), OsError>;
    /// mount(source, target, MS_BIND).
    fn bind(&self, source: &Path, target: &Path) -> Result<(), OsError>;
    /// The flags of the mount at `target` (statvfs).
    fn flags(&self, target: &Path) -> Result<MountFlags, OsError>;
    /// mount(target, MS_REMOUNT | MS_BIND | flags): sets the per-mount
    /// flags of the mount at `target` to exactly `flags`.
    fn remount(&self, target: &Path, flags: MountFlags) -> Result<(), OsError>;
    /// umount2(target, UMOUNT_NOFOLLOW).
    fn unmount(&self, target: &Path) -> Result<(), OsError>;
}

/// Whether a failure of the atomic way (nothing attached yet) is the
/// kernel lacking the new mount API (ENOSYS, or a seccomp filter saying so)
/// or refusing it (EINVAL, EPERM), where the two-step way is tried.
fn try_two_step(e: &OsError) -> bool {
    matches!(
        e.errno(),
        Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::EPERM)
    )
}

/// Bind-mounts `source` on `target` with `flags`: one mount(MS_BIND) when
/// no flag is asked; else atomically (`BindWay::Atomic`), falling back to
/// the two-step way when the kernel lacks or refuses the new calls. The
/// flags end up the same either way: those asked plus those the copy of the
/// source mount has (`MountAttr::exact`). `no_new_api` is set on ENOSYS
/// (the kernel lacks the calls, which does not change while it runs), so
/// later binds go the two-step way at once.
pub fn bind_with<C: BindCalls>(
    c: &C,
    no_new_api: &AtomicBool,
    source: &Path,
    target: &Path,
    flags: MountFlags,
) -> Result<BindWay, OsError> {
    if flags.is_plain() {
        c.bind(source, target)?;
        return Ok(BindWay::Plain);
    }
    if !no_new_api.load(Ordering::Relaxed) {
        match bind_atomic(c, source, target, flags) {
            Ok(()) => return Ok(BindWay::Atomic),
            Err(e) if try_two_step(&e) => {
                let errno = e.errno().unwrap_or_default();
                if errno == libc::ENOSYS && !no_new_api.swap(true, Ordering::Relaxed) {
                    tracing::info!(
                        error = %e,
                        "the kernel lacks open_tree/mount_setattr/move_mount (before 5.12): bind mounts with flags are made in two steps"
                    );
                } else {
                    tracing::debug!(
                        error = %e,
                        errno,
                        target = %target.display(),
                        "the kernel refused the atomic bind mount: made in two steps"
                    );
                }
            }
            Err(e) => return Err(e),
        }
    }
    bind_two_step(c, source, target, flags)?;
    Ok(BindWay::TwoStep)
}

/// A detached copy of the source mount gets its flags, then is attached:
/// a process killed at any point leaves nothing at `target` (the copy dies
/// with its file descriptor) or the finished mount.
fn bind_atomic<C: BindCalls>(
    c: &C,
    source: &Path,
    target: &Path,
    flags: MountFlags,
) -> Result<(), OsError> {
    let tree = c.open_tree(source)?;
    let have = c.tree_flags(&tree)?;
    c.set_attr(&tree, MountAttr::exact(flags.union(have)))?;
    c.attach(tree, target)
}

/// The bind, then a remount with the flags asked plus those the new mount
/// already carries (inherited from the source: a remount without them would
/// drop them; a bind ignores MS_RDONLY on the first call). A failed remount
/// takes the bind off again: never a writable mount where a read-only one
/// was asked for. (A process killed between the two leaves it, which is
/// why this is only the fallback.)
fn bind_two_step<C: BindCalls>(
    c: &C,
    source: &Path,
    target: &Path,
    flags: MountFlags,
) -> Result<(), OsError> {
    c.bind(source, target)?;
    let r = c
        .flags(target)
        .and_then(|have| c.remount(target, flags.union(have)));
    if let Err(e) = r {
        let _ = c.unmount(target);
        return Err(e);
    }
    Ok(())
}

/// Mount operations. Real: `RealMounter`; fake: `fake::FakeOs`.
pub trait Mounter: Send + Sync {
    /// Bind-mounts `source` on `target` (both must exist), with `flags`
    /// plus the flags the source mount has (`bind_with`): when `flags` asks
    /// for anything, the mount appears at `target` with its flags at once
    /// (kernels from 5.12; before, a bind then a remount).
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

/// The real mount(2)/umount2(2) and new mount API.
#[derive(Debug, Default)]
pub struct RealMounter {
    /// Set once the kernel answered ENOSYS to the new mount API (or from
    /// the start: `two_step`).
    no_new_api: AtomicBool,
}

impl RealMounter {
    pub fn new() -> Self {
        Self::default()
    }

    /// A mounter that makes every bind with flags the two-step way, as on a
    /// kernel without the new mount API: for tests that compare the ways.
    pub fn two_step() -> Self {
        RealMounter {
            no_new_api: AtomicBool::new(true),
        }
    }

    /// `Mounter::bind`, saying how the mount was made.
    pub fn bind_way(
        &self,
        source: &Path,
        target: &Path,
        flags: MountFlags,
    ) -> Result<BindWay, OsError> {
        bind_with(&Syscalls, &self.no_new_api, source, target, flags)
    }
}

/// The real `BindCalls`.
struct Syscalls;

fn c_path(path: &Path) -> Result<CString, OsError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        OsError::sys(
            "path",
            path,
            std::io::Error::from_raw_os_error(libc::EINVAL),
        )
    })
}

/// The result of a raw system call: the error of a negative answer.
fn check(r: libc::c_long, op: &'static str, path: &Path) -> Result<libc::c_long, OsError> {
    if r < 0 {
        return Err(OsError::sys(op, path, std::io::Error::last_os_error()));
    }
    Ok(r)
}

impl BindCalls for Syscalls {
    type Tree = OwnedFd;

    fn open_tree(&self, source: &Path) -> Result<OwnedFd, OsError> {
        let c = c_path(source)?;
        // SAFETY: `c` is a NUL-terminated string that outlives the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_open_tree,
                libc::AT_FDCWD,
                c.as_ptr(),
                libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC,
            )
        };
        let fd = check(r, "open_tree", source)?;
        // SAFETY: open_tree returned a new file descriptor that nothing
        // else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    }

    fn tree_flags(&self, tree: &OwnedFd) -> Result<MountFlags, OsError> {
        nix::sys::statvfs::fstatvfs(tree)
            .map(|s| statvfs_flags(s.flags()))
            .map_err(|e| OsError::sys("fstatvfs", "open_tree copy", e))
    }

    fn set_attr(&self, tree: &OwnedFd, attr: MountAttr) -> Result<(), OsError> {
        let mut a = libc::mount_attr {
            attr_set: attr.set,
            attr_clr: attr.clr,
            propagation: 0,
            userns_fd: 0,
        };
        // SAFETY: the path is an empty NUL-terminated string and `a` a
        // mount_attr of the size passed, both live for the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                std::os::fd::AsRawFd::as_raw_fd(tree),
                c"".as_ptr(),
                libc::AT_EMPTY_PATH as libc::c_uint,
                &mut a as *mut libc::mount_attr,
                std::mem::size_of::<libc::mount_attr>(),
            )
        };
        check(r, "mount_setattr", Path::new("open_tree copy")).map(|_| ())
    }

    fn attach(&self, tree: OwnedFd, target: &Path) -> Result<(), OsError> {
        let c = c_path(target)?;
        // SAFETY: both paths are NUL-terminated strings and `tree` an open
        // descriptor, all live for the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                std::os::fd::AsRawFd::as_raw_fd(&tree),
                c"".as_ptr(),
                libc::AT_FDCWD,
                c.as_ptr(),
                libc::MOVE_MOUNT_F_EMPTY_PATH,
            )
        };
        check(r, "move_mount", target).map(|_| ())
    }

    fn bind(&self, source: &Path, target: &Path) -> Result<(), OsError> {
        mount(
            Some(source),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| OsError::sys("bind mount", target, e))
    }

    fn flags(&self, target: &Path) -> Result<MountFlags, OsError> {
        nix::sys::statvfs::statvfs(target)
            .map(|s| statvfs_flags(s.flags()))
            .map_err(|e| OsError::sys("statvfs", target, e))
    }

    fn remount(&self, target: &Path, flags: MountFlags) -> Result<(), OsError> {
        mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags.to_ms(),
            None::<&str>,
        )
        .map_err(|e| OsError::sys("remount", target, e))
    }

    fn unmount(&self, target: &Path) -> Result<(), OsError> {
        umount2(target, MntFlags::UMOUNT_NOFOLLOW).map_err(|e| OsError::sys("unmount", target, e))
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
        self.bind_way(source, target, flags).map(|_| ())
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
        BindCalls::unmount(&Syscalls, target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::os::fake::{BindCall, FakeBindCalls};

    fn flags(n: u32) -> MountFlags {
        MountFlags::numbered(n)
    }

    /// Source mounts as the kernel can have them: every combination of ro,
    /// nosuid, nodev, noexec and nodiratime, with each atime setting
    /// (relatime, noatime, strictatime; never noatime and relatime both).
    fn sources() -> impl Iterator<Item = MountFlags> {
        (0..128).map(flags).filter(|f| !(f.noatime && f.relatime))
    }

    fn ro() -> MountFlags {
        MountFlags {
            readonly: true,
            ..Default::default()
        }
    }

    fn bind(c: &FakeBindCalls, flag: &AtomicBool, f: MountFlags) -> Result<BindWay, OsError> {
        bind_with(c, flag, Path::new("/s"), Path::new("/t"), f)
    }

    /// For every flag set Berth can ask for and every source mount, the
    /// atomic way leaves the mount with exactly the flags the two-step way
    /// (bind, then a remount with what is asked plus what the mount has)
    /// leaves it with, in the kernel's terms as the fake models them.
    #[test]
    fn both_ways_give_the_same_flags() {
        for src in sources() {
            for n in 1..128 {
                let (atomic, two) = (FakeBindCalls::new(src), FakeBindCalls::new(src));
                let way = bind(&atomic, &AtomicBool::new(false), flags(n)).unwrap();
                assert_eq!(way, BindWay::Atomic);
                let way = bind(&two, &AtomicBool::new(true), flags(n)).unwrap();
                assert_eq!(way, BindWay::TwoStep);
                assert_eq!(
                    atomic.mounted(),
                    two.mounted(),
                    "source {src:?}, asked {:?}",
                    flags(n)
                );
                let got = atomic.mounted()[0].1;
                let asked = flags(n);
                assert!(!asked.readonly || got.readonly);
                assert!(!asked.nosuid || got.nosuid);
                assert!(!asked.noexec || got.noexec);
                assert!(!asked.noatime || got.noatime);
            }
        }
    }

    #[test]
    fn exact_attr_names_every_flag_and_one_atime_setting() {
        use libc::{
            MOUNT_ATTR_NOATIME as NOATIME, MOUNT_ATTR_NODIRATIME as NODIRATIME,
            MOUNT_ATTR_NOSUID as NOSUID, MOUNT_ATTR_RDONLY as RDONLY,
            MOUNT_ATTR_RELATIME as RELATIME, MOUNT_ATTR_STRICTATIME as STRICT,
        };
        let set = |f: MountFlags| MountAttr::exact(f).set;
        assert_eq!(set(ro()), RDONLY | STRICT);
        let rel = MountFlags {
            relatime: true,
            ..ro()
        };
        assert_eq!(set(rel), RDONLY | RELATIME);
        let dir = MountFlags {
            nodiratime: true,
            nosuid: true,
            ..Default::default()
        };
        assert_eq!(set(dir), NOSUID | NODIRATIME | RELATIME);
        let both = MountFlags {
            noatime: true,
            relatime: true,
            ..ro()
        };
        assert_eq!(set(both), RDONLY | NOATIME);
        for n in 0..128 {
            assert_eq!(MountAttr::exact(flags(n)).clr, MountAttr::ALL);
        }
    }

    /// No flags: one mount(MS_BIND), nothing else. Flags: the atomic way,
    /// whose copy is attached already read-only.
    #[test]
    fn plain_binds_are_one_call_and_flagged_ones_atomic() {
        let c = FakeBindCalls::new(MountFlags::default());
        let flag = AtomicBool::new(false);
        assert_eq!(
            bind(&c, &flag, MountFlags::default()).unwrap(),
            BindWay::Plain
        );
        assert_eq!(c.calls(), ["bind"]);
        c.clear_calls();
        assert_eq!(bind(&c, &flag, ro()).unwrap(), BindWay::Atomic);
        assert_eq!(
            c.full_calls(),
            [
                BindCall::OpenTree("/s".into()),
                BindCall::TreeFlags,
                BindCall::SetAttr(MountAttr::exact(ro())),
                BindCall::Attach("/t".into()),
            ]
        );
        assert!(c.mounted()[1].1.readonly);
    }

    /// A kernel without the new calls (ENOSYS at open_tree, or at
    /// mount_setattr on 5.2 to 5.11): the two-step way, and every later
    /// bind goes there at once.
    #[test]
    fn enosys_falls_back_to_two_steps_and_is_remembered() {
        for op in ["open_tree", "set_attr"] {
            let c = FakeBindCalls::new(MountFlags::default());
            let flag = AtomicBool::new(false);
            c.fail_next(op, libc::ENOSYS);
            assert_eq!(bind(&c, &flag, ro()).unwrap(), BindWay::TwoStep);
            let atomic: &[&str] = if op == "open_tree" {
                &["open_tree"]
            } else {
                &["open_tree", "tree_flags", "set_attr"]
            };
            let two = ["bind", "flags", "remount"];
            assert_eq!(c.calls(), [atomic, &two].concat());
            assert_eq!(c.mounted(), [("/t".into(), ro())]);
            assert!(flag.load(Ordering::Relaxed));
            c.clear_calls();
            assert_eq!(bind(&c, &flag, ro()).unwrap(), BindWay::TwoStep);
            assert_eq!(c.calls(), two);
            // A plain bind stays one call.
            c.clear_calls();
            bind(&c, &flag, MountFlags::default()).unwrap();
            assert_eq!(c.calls(), ["bind"]);
        }
    }

    /// EINVAL or EPERM from any of the three calls (a kernel that refuses
    /// them): nothing was attached; the two-step way makes the mount, and
    /// the next bind tries the atomic way again.
    #[test]
    fn a_refused_call_falls_back_once() {
        for op in ["open_tree", "tree_flags", "set_attr", "attach"] {
            for errno in [libc::EINVAL, libc::EPERM] {
                let c = FakeBindCalls::new(MountFlags::default());
                let flag = AtomicBool::new(false);
                c.fail_next(op, errno);
                assert_eq!(bind(&c, &flag, ro()).unwrap(), BindWay::TwoStep);
                let calls = c.calls();
                assert_eq!(calls.last(), Some(&"remount"), "{op} {errno}: {calls:?}");
                assert_eq!(c.mounted(), [("/t".into(), ro())]);
                assert!(!flag.load(Ordering::Relaxed));
                assert_eq!(bind(&c, &flag, ro()).unwrap(), BindWay::Atomic);
            }
        }
    }

    /// Any other error of the atomic way (no such source or target, ...)
    /// is the answer: no second try, nothing mounted.
    #[test]
    fn other_errors_are_returned_without_a_second_try() {
        for op in ["open_tree", "tree_flags", "set_attr", "attach"] {
            let c = FakeBindCalls::new(MountFlags::default());
            c.fail_next(op, libc::ENOENT);
            let e = bind(&c, &AtomicBool::new(false), ro()).unwrap_err();
            assert_eq!(e.errno(), Some(libc::ENOENT));
            assert!(!c.calls().contains(&"bind"), "{op}: {:?}", c.calls());
            assert!(c.mounted().is_empty());
        }
    }

    /// The two-step way never leaves a writable mount after a failed
    /// remount (or statvfs): the bind is taken off again.
    #[test]
    fn a_failed_remount_takes_the_bind_off() {
        for op in ["flags", "remount"] {
            let c = FakeBindCalls::new(MountFlags::default());
            c.fail_next(op, libc::EIO);
            let e = bind(&c, &AtomicBool::new(true), ro()).unwrap_err();
            assert_eq!(e.errno(), Some(libc::EIO));
            assert_eq!(c.calls().last(), Some(&"unmount"));
            assert!(c.mounted().is_empty());
        }
    }
}
