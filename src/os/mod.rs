//! Everything Berth asks of the operating system, each behind a small trait
//! with a real implementation and a recording fake (`fake.rs`), so handler
//! logic is unit-tested without root and the real calls are tested by the root
//! integration tests.
//!
//! | file          | what it wraps                                   |
//! |---------------|-------------------------------------------------|
//! | `mount.rs`    | mount(2) / umount2(2), open_tree(2), mount_setattr(2), move_mount(2): bind, remount, unmount |
//! | `mountinfo.rs`| reading and parsing /proc/self/mountinfo        |
//! | `mountpoint.rs`| statx(2) STATX_ATTR_MOUNT_ROOT: is something mounted at one path |
//! | `statvfs.rs`  | statvfs(3): free space and inodes; st_dev: which filesystem |
//! | `command.rs`  | external commands under a timeout (process group killed) |
//! | `loopdev.rs`  | loop devices: attach, detach, capacity, sysfs list |
//! | `blockdev.rs` | block devices: size, identity, by-id links, zeroing, the read-only flag |
//! | `blkid.rs`    | `blkid -p`: what is on a device                  |
//! | `mkfs.rs`     | mkfs.ext4/xfs, resize2fs, xfs_growfs, wipefs     |
//! | `copy.rs`     | snapshot copies: FICLONE or data ranges, whole trees with their metadata |
//! | `files.rs`    | every filesystem change: mkdir, rename, remove, open, write, truncate, fallocate, fsync, chmod, chown, the CSI socket's bind; Berth's reads of its own files and directories (lstat, stat, read_dir, readlink, read_regular, getxattr), the node paths' and its own directories' resolution (openat2, realpath, readlink), its directory locks (flock), the CSI socket's connect probe and `--socket-group`'s lookup (getgrnam) |
//! | `nfsmount.rs` | `mount.nfs` / `umount` with checked options      |
//! | `pin.rs`      | one object held by an O_PATH descriptor (open O_NOFOLLOW, fstat), bound through `/proc/self/fd/<n>` |
//! | `quota.rs`    | project quotas: quotactl_fd(2) and FS_IOC_FSGETXATTR/FSSETXATTR |
//! | `bounded.rs`  | calls that may hang (statvfs of NFS) with a deadline |
//! | `fake.rs`     | the recording fake of all of the above          |

pub mod blkid;
pub mod blockdev;
pub mod bounded;
pub mod command;
pub mod copy;
pub mod fake;
pub mod files;
pub mod limits;
pub mod loopdev;
pub mod mkfs;
pub mod mount;
pub mod mountinfo;
pub mod mountpoint;
pub mod nfsmount;
pub mod pin;
pub mod quota;
pub mod resolve;
pub mod statvfs;

use std::path::PathBuf;
use std::sync::Arc;

pub use blockdev::{BlockDevices, DeviceClaim, DeviceInfo, RealBlockDevices};
pub use command::{CmdOutput, RealRunner, Runner};
pub use files::{Files, Open, RealFiles};
pub use loopdev::{AttachOptions, LoopDevices, LoopInfo, LoopStatus, RealLoopDevices};
pub use mount::{BindWay, MountFlags, Mounter, RealMounter};
pub use mountinfo::{MountEntry, MountTable, ProcMountTable};
pub use mountpoint::{MountProbe, StatxMountProbe};
pub use quota::{Quotas, RealQuotas};
pub use statvfs::{FsStats, FsUsage, RealFsStats};

/// An error from the operating system layer, with the operation and path that
/// failed.
#[derive(Debug, thiserror::Error)]
pub enum OsError {
    #[error("{op} {path}")]
    Sys {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("command {program} timed out after {secs} s and was killed")]
    Timeout { program: String, secs: u64 },
    #[error("command {program} failed ({status}): {stderr}")]
    Failed {
        program: String,
        status: String,
        stderr: String,
    },
    #[error("mountinfo: {0}")]
    MountInfo(String),
    /// A tree copy reached the root of a mount below its source (a pod
    /// with Bidirectional propagation mounted something inside its
    /// volume): nothing mounted there is read (`copy`).
    #[error("{0} is a mount point inside the tree being copied; nothing mounted inside a volume is copied (unmount it first)")]
    MountInside(PathBuf),
    /// An entry that cannot be removed or moved (`op`) because `at` (the
    /// entry, or the directory that holds it) is immutable or append-only:
    /// EPERM, said exactly (`Locks::note`).
    #[error("{op} {path}: {}", locks.note(at))]
    Locked {
        op: &'static str,
        path: PathBuf,
        at: PathBuf,
        locks: files::Locks,
    },
}

impl OsError {
    pub fn sys(
        op: &'static str,
        path: impl Into<PathBuf>,
        source: impl Into<std::io::Error>,
    ) -> Self {
        OsError::Sys {
            op,
            path: path.into(),
            source: source.into(),
        }
    }

    /// The raw errno of a failed system call, if that is what this is.
    pub fn errno(&self) -> Option<i32> {
        match self {
            OsError::Sys { source, .. } => source.raw_os_error(),
            OsError::Locked { .. } => Some(libc::EPERM),
            _ => None,
        }
    }

    /// The I/O error underneath (a system call's), or this one as one.
    pub fn into_io(self) -> std::io::Error {
        match self {
            OsError::Sys { source, .. } => source,
            e => std::io::Error::other(e.to_string()),
        }
    }
}

/// How a mount option (or mount flag) is named in an error message: its
/// name only, never its value (at most 64 characters). A mount option's
/// value may be a secret (`password=` of a CIFS class copied into another
/// driver's, a key in a misspelt option), and an error message travels to
/// the CO (an event on the PVC, which every user of the namespace reads)
/// and into berth's log.
pub fn option_shown(opt: &str) -> String {
    let short = |s: &str| s.chars().take(64).collect::<String>();
    match opt.split_once('=') {
        Some((name, _)) => format!("{:?} (value not shown)", short(name)),
        None => format!("{:?}", short(opt)),
    }
}

/// The bundle of OS interfaces a driver uses.
#[derive(Clone)]
pub struct Os {
    pub mounter: Arc<dyn Mounter>,
    pub mounts: Arc<dyn MountTable>,
    /// The one-path probe; `None` answers fall back to `mounts`.
    pub probe: Arc<dyn MountProbe>,
    pub fs: Arc<dyn FsStats>,
    pub cmd: Arc<dyn Runner>,
    pub loops: Arc<dyn LoopDevices>,
    pub devices: Arc<dyn BlockDevices>,
    pub files: Arc<dyn Files>,
    pub quotas: Arc<dyn Quotas>,
}

impl Os {
    /// The real operating system.
    pub fn real() -> Self {
        Os {
            mounter: Arc::new(RealMounter::new()),
            mounts: Arc::new(ProcMountTable::default()),
            probe: Arc::new(StatxMountProbe),
            fs: Arc::new(RealFsStats),
            cmd: Arc::new(RealRunner),
            loops: Arc::new(RealLoopDevices::default()),
            devices: Arc::new(RealBlockDevices::default()),
            files: Arc::new(RealFiles),
            quotas: Arc::new(RealQuotas),
        }
    }

    /// A recording fake; the returned handle inspects and steers it.
    pub fn fake() -> (Self, Arc<fake::FakeOs>) {
        let f = Arc::new(fake::FakeOs::new());
        (
            Os {
                mounter: f.clone(),
                mounts: f.clone(),
                probe: f.clone(),
                fs: f.clone(),
                cmd: f.clone(),
                loops: f.clone(),
                devices: f.clone(),
                files: f.clone(),
                quotas: f.clone(),
            },
            f,
        )
    }

    /// Another handle on an existing fake (a restart that keeps the fake's
    /// mount table, as a real restart keeps the kernel's).
    pub fn on_fake(f: &Arc<fake::FakeOs>) -> Self {
        Os {
            mounter: f.clone(),
            mounts: f.clone(),
            probe: f.clone(),
            fs: f.clone(),
            cmd: f.clone(),
            loops: f.clone(),
            devices: f.clone(),
            files: f.clone(),
            quotas: f.clone(),
        }
    }
}
