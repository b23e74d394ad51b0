//! Project quotas: what holds a local volume's directory to its size.
//!
//! A directory gets a project id and the inherit flag (FS_IOC_FSSETXATTR),
//! so everything created under it is charged to that project; the project
//! gets hard limits for bytes and inodes (quotactl Q_SETQUOTA with
//! PRJQUOTA). xfs mounted with `prjquota` and ext4 with the `project` and
//! `quota` features mounted with `prjquota` enforce them: a write past the
//! limit fails (xfs: ENOSPC, ext4: EDQUOT), and statfs of the directory
//! (`df` in a pod) shows the project's limit and usage.
//!
//! quotactl goes through `quotactl_fd(2)` (Linux 5.14+) on a descriptor of
//! a directory of the filesystem, so no block device path is needed (the
//! node plugin's container may not have one). The generic Q_GETQUOTA and
//! Q_SETQUOTA work for xfs and ext4 alike; Q_XGETQSTATV says whether
//! project quotas are accounted and enforced.
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::OsError;

/// `PRJQUOTA` of <linux/quota.h>.
const PRJQUOTA: libc::c_int = 2;
/// `Q_XGETQSTATV` of <linux/dqblk_xfs.h>: XQM_CMD(8).
const Q_XGETQSTATV: libc::c_int = ((b'X' as libc::c_int) << 8) + 8;
const FS_QSTATV_VERSION1: i8 = 1;
const FS_QUOTA_PDQ_ACCT: u16 = 1 << 4;
const FS_QUOTA_PDQ_ENFD: u16 = 1 << 5;
/// Quota limits are counted in blocks of this many bytes (QIF_DQBLKSIZE).
const DQBLK_SIZE: u64 = 1024;
/// FS_XFLAG_PROJINHERIT of <linux/fs.h>.
const FS_XFLAG_PROJINHERIT: u32 = 0x0000_0200;

/// Whether project quotas are on for a filesystem.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuotaState {
    /// Usage is counted per project.
    pub accounting: bool,
    /// Hard limits are enforced.
    pub enforced: bool,
}

/// One project's usage and hard limits (0: no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProjectQuota {
    pub used_bytes: u64,
    pub used_inodes: u64,
    pub limit_bytes: u64,
    pub limit_inodes: u64,
}

impl ProjectQuota {
    /// Nothing is charged to the project and it has no limits: no
    /// directory, file or limit holds its id.
    pub fn unused(&self) -> bool {
        *self == ProjectQuota::default()
    }
}

/// The project of a file or directory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Project {
    pub id: u32,
    /// New entries in this directory get its project (and, if they are
    /// directories, the flag).
    pub inherit: bool,
}

/// Project quota operations. `fs` is any path on the filesystem concerned
/// (the local root).
pub trait Quotas: Send + Sync {
    /// Q_XGETQSTATV: whether project quotas are accounted and enforced.
    /// ENOSYS when the kernel or the filesystem has no quota support (or
    /// the kernel is older than 5.14 and has no quotactl_fd).
    fn state(&self, fs: &Path) -> Result<QuotaState, OsError>;
    /// FS_IOC_FSGETXATTR: the project of `path` (never follows a symlink).
    fn project(&self, path: &Path) -> Result<Project, OsError>;
    /// FS_IOC_FSSETXATTR: sets the project id and the inherit flag of the
    /// directory `dir`, keeping its other attributes.
    fn set_project(&self, dir: &Path, project: Project) -> Result<(), OsError>;
    /// Q_GETQUOTA: usage and limits of project `id` (an id nothing was
    /// ever charged to reads as all zeros).
    fn get(&self, fs: &Path, id: u32) -> Result<ProjectQuota, OsError>;
    /// Q_SETQUOTA: sets the hard limits of project `id` (bytes are rounded
    /// up to whole KiB, the filesystem may round further to its blocks;
    /// 0 removes a limit). Soft limits are set to the same values.
    fn set_limits(&self, fs: &Path, id: u32, bytes: u64, inodes: u64) -> Result<(), OsError>;
}

/// The kernel's project quotas.
pub struct RealQuotas;

/// struct fs_qfilestatv of <linux/dqblk_xfs.h>.
#[repr(C)]
#[derive(Default)]
struct FsQfilestatv {
    qfs_ino: u64,
    qfs_nblks: u64,
    qfs_nextents: u32,
    qfs_pad: u32,
}

/// struct fs_quota_statv of <linux/dqblk_xfs.h>.
#[repr(C)]
#[derive(Default)]
struct FsQuotaStatv {
    qs_version: i8,
    qs_pad1: u8,
    qs_flags: u16,
    qs_incoredqs: u32,
    qs_uquota: FsQfilestatv,
    qs_gquota: FsQfilestatv,
    qs_pquota: FsQfilestatv,
    qs_btimelimit: i32,
    qs_itimelimit: i32,
    qs_rtbtimelimit: i32,
    qs_bwarnlimit: u16,
    qs_iwarnlimit: u16,
    qs_rtbwarnlimit: u16,
    qs_pad3: u16,
    qs_pad4: u32,
    qs_pad2: [u64; 7],
}

/// struct fsxattr of <linux/fs.h>.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct FsXattr {
    fsx_xflags: u32,
    fsx_extsize: u32,
    fsx_nextents: u32,
    fsx_projid: u32,
    fsx_cowextsize: u32,
    fsx_pad: [u8; 8],
}

nix::ioctl_read!(fs_ioc_fsgetxattr, b'X', 31, FsXattr);
nix::ioctl_write_ptr!(fs_ioc_fssetxattr, b'X', 32, FsXattr);

fn open_dir(path: &Path, op: &'static str) -> Result<File, OsError> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| OsError::sys(op, path, e))
}

/// quotactl_fd(2) with `cmd` for project quotas on the filesystem of `fs`.
fn quotactl(
    fs: &Path,
    op: &'static str,
    cmd: libc::c_int,
    id: u32,
    addr: *mut libc::c_void,
) -> Result<(), OsError> {
    let dir = open_dir(fs, op)?;
    // SAFETY: quotactl_fd on a descriptor this function owns; `addr`
    // points to a structure of the size the command reads or writes, owned
    // by the caller for the duration of the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_quotactl_fd,
            dir.as_raw_fd(),
            libc::QCMD(cmd, PRJQUOTA),
            id,
            addr,
        )
    };
    if r < 0 {
        return Err(OsError::sys(op, fs, std::io::Error::last_os_error()));
    }
    Ok(())
}

impl Quotas for RealQuotas {
    fn state(&self, fs: &Path) -> Result<QuotaState, OsError> {
        let mut s = FsQuotaStatv {
            qs_version: FS_QSTATV_VERSION1,
            ..Default::default()
        };
        quotactl(
            fs,
            "quotactl Q_XGETQSTATV",
            Q_XGETQSTATV,
            0,
            (&mut s as *mut FsQuotaStatv).cast(),
        )?;
        Ok(QuotaState {
            accounting: s.qs_flags & FS_QUOTA_PDQ_ACCT != 0,
            enforced: s.qs_flags & FS_QUOTA_PDQ_ENFD != 0,
        })
    }

    fn project(&self, path: &Path) -> Result<Project, OsError> {
        let x = get_xattr(path)?;
        Ok(Project {
            id: x.fsx_projid,
            inherit: x.fsx_xflags & FS_XFLAG_PROJINHERIT != 0,
        })
    }

    fn set_project(&self, dir: &Path, p: Project) -> Result<(), OsError> {
        let f = open_dir(dir, "open")?;
        let mut x = FsXattr::default();
        // SAFETY: FS_IOC_FSGETXATTR writes one struct fsxattr into `x`.
        unsafe { fs_ioc_fsgetxattr(f.as_raw_fd(), &mut x) }
            .map_err(|e| OsError::sys("FS_IOC_FSGETXATTR", dir, e))?;
        x.fsx_projid = p.id;
        if p.inherit {
            x.fsx_xflags |= FS_XFLAG_PROJINHERIT;
        } else {
            x.fsx_xflags &= !FS_XFLAG_PROJINHERIT;
        }
        // SAFETY: FS_IOC_FSSETXATTR reads one struct fsxattr from `x`.
        unsafe { fs_ioc_fssetxattr(f.as_raw_fd(), &x) }
            .map_err(|e| OsError::sys("FS_IOC_FSSETXATTR", dir, e))?;
        Ok(())
    }

    fn get(&self, fs: &Path, id: u32) -> Result<ProjectQuota, OsError> {
        // SAFETY: dqblk is plain old data; all zeros is a valid value.
        let mut q: libc::dqblk = unsafe { std::mem::zeroed() };
        match quotactl(
            fs,
            "quotactl Q_GETQUOTA",
            libc::Q_GETQUOTA,
            id,
            (&mut q as *mut libc::dqblk).cast(),
        ) {
            // xfs: no quota record for the id (nothing was ever charged).
            Err(e) if e.errno() == Some(libc::ENOENT) => return Ok(ProjectQuota::default()),
            r => r?,
        }
        Ok(ProjectQuota {
            used_bytes: q.dqb_curspace,
            used_inodes: q.dqb_curinodes,
            limit_bytes: q.dqb_bhardlimit.saturating_mul(DQBLK_SIZE),
            limit_inodes: q.dqb_ihardlimit,
        })
    }

    fn set_limits(&self, fs: &Path, id: u32, bytes: u64, inodes: u64) -> Result<(), OsError> {
        // SAFETY: as in `get`.
        let mut q: libc::dqblk = unsafe { std::mem::zeroed() };
        q.dqb_bhardlimit = bytes.div_ceil(DQBLK_SIZE);
        q.dqb_bsoftlimit = q.dqb_bhardlimit;
        q.dqb_ihardlimit = inodes;
        q.dqb_isoftlimit = inodes;
        q.dqb_valid = libc::QIF_LIMITS;
        quotactl(
            fs,
            "quotactl Q_SETQUOTA",
            libc::Q_SETQUOTA,
            id,
            (&mut q as *mut libc::dqblk).cast(),
        )
    }
}

fn get_xattr(path: &Path) -> Result<FsXattr, OsError> {
    // O_PATH descriptors do not take ioctls: a plain read-only open that
    // never follows a symlink (a volume's directory, or one in the trash).
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| OsError::sys("open", path, e))?;
    let mut x = FsXattr::default();
    // SAFETY: FS_IOC_FSGETXATTR writes one struct fsxattr into `x`.
    unsafe { fs_ioc_fsgetxattr(f.as_raw_fd(), &mut x) }
        .map_err(|e| OsError::sys("FS_IOC_FSGETXATTR", path, e))?;
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structures_have_the_kernel_layout() {
        // Sizes from <linux/fs.h>, <linux/dqblk_xfs.h>, <linux/quota.h>.
        assert_eq!(std::mem::size_of::<FsXattr>(), 28);
        assert_eq!(std::mem::size_of::<FsQuotaStatv>(), 160);
        assert_eq!(std::mem::size_of::<libc::dqblk>(), 72);
        assert_eq!(Q_XGETQSTATV, 0x5808);
        assert_eq!(libc::QCMD(libc::Q_GETQUOTA, PRJQUOTA) as u32, 0x8000_0702);
    }

    #[test]
    fn unused_means_all_zero() {
        assert!(ProjectQuota::default().unused());
        let q = ProjectQuota {
            used_inodes: 1,
            ..Default::default()
        };
        assert!(!q.unused());
        let q = ProjectQuota {
            limit_bytes: 1024,
            ..Default::default()
        };
        assert!(!q.unused());
    }

    /// On a kernel without quota support (this project's development
    /// machine) the state says so with ENOSYS; on one with quotas, the
    /// state of a temp directory's filesystem reads without error. Either
    /// way the call itself works (no EFAULT/EINVAL from a wrong layout).
    #[test]
    fn state_reads_or_says_unsupported() {
        let t = tempfile::tempdir().unwrap();
        match RealQuotas.state(t.path()) {
            Ok(_) => {}
            Err(e) => assert!(
                matches!(
                    e.errno(),
                    Some(libc::ENOSYS) | Some(libc::EPERM) | Some(libc::ESRCH)
                ),
                "{e:?}"
            ),
        }
    }
}
