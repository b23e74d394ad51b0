//! Sizes of local volumes held by project quotas (see `os::quota`).
//!
//! When the local root's filesystem enforces project quotas (xfs mounted
//! with `prjquota`; ext4 with the `project` and `quota` features mounted
//! with `prjquota`), every volume directory gets a project id of its own,
//! the inherit flag (everything created inside is charged to it) and hard
//! limits: bytes = the volume's capacity, inodes = `inode_limit`.
//!
//! **Allocation and crash safety.** An id is free when no volume record
//! holds it, no create in flight holds it (`held`, in memory) and the
//! kernel charges nothing to it (no inode, no byte). The id is set on the
//! directory (which charges the directory's inode to it, durably with the
//! directory) before the record that names it is written; a crash in
//! between leaves a directory without a record, which start-up removes
//! when empty (releasing the id) or sets aside (the id stays charged, so it
//! is never handed out while that directory exists). So the kernel's own
//! accounting is the journal of ids set but not yet recorded, and no id is
//! ever held by two volumes. An id is released when the volume's
//! directory is removed (its limits are cleared then); reuse after that is
//! fine. Snapshot copies hold no id: they are made outside the volume's
//! directory and are charged to no project.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::os::quota::{Project, ProjectQuota, Quotas};
use crate::os::FsUsage;

/// The first project id Berth hands out: ids below are left to the node's
/// administrator (`/etc/projid` numbers its own projects from 1), and every
/// id Berth uses fits in 16 bits up to 65,535 volumes (old xfs without
/// `projid32bit` has no more).
pub const FIRST_PROJECT: u32 = 10_000;

/// Bytes per inode of the inode limit: ext4's default inode ratio
/// (mke2fs.conf `inode_ratio = 16384`), so a volume holds as many files
/// as a dedicated ext4 filesystem of its size would.
pub const BYTES_PER_INODE: u64 = 16 << 10;
/// The least inode limit, so that small volumes still hold a useful tree.
pub const MIN_INODES: u64 = 1024;

/// The inode limit of a volume of `bytes`.
pub fn inode_limit(bytes: u64) -> u64 {
    (bytes / BYTES_PER_INODE).max(MIN_INODES)
}

/// Whether the local root enforces volume sizes, and why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enforcement {
    Enforced,
    /// The reason, for the start-up log and CreateVolume's refusal.
    Unavailable(String),
}

/// What `Quotas::state` of the local root says, as an `Enforcement`; and
/// not enforced either where the root or one of Berth's directories in it
/// (`dirs`, those that exist) has the project inherit flag (an
/// administrator's project over the root, `xfs_quota project -s`): every
/// directory made there gets that project, so a new volume's directory
/// would come out with it (and share it with every other volume), and the
/// kernel refuses to move a directory of another project into it (EXDEV).
pub fn detect(
    quotas: &dyn Quotas,
    files: &dyn crate::os::Files,
    root: &Path,
    dirs: &[&str],
) -> Enforcement {
    match quotas.state(root) {
        Ok(s) if s.enforced && s.accounting => {
            let own = dirs
                .iter()
                .map(|d| root.join(d))
                .filter(|d| files.is_dir(d));
            for dir in std::iter::once(root.to_path_buf()).chain(own) {
                match quotas.project(&dir) {
                    Ok(p) if p.inherit => {
                        return Enforcement::Unavailable(format!(
                            "{} has project {} with the inherit flag (an administrator's project over the local root?): every directory made in it gets that project, so volumes cannot have projects of their own; clear the flag (chattr -P {}, or xfs_quota -x -c 'project -C -p {} {}')",
                            dir.display(),
                            p.id,
                            dir.display(),
                            dir.display(),
                            p.id
                        ))
                    }
                    Ok(_) => {}
                    Err(e) => {
                        return Enforcement::Unavailable(format!(
                            "the project of {} cannot be read ({e})",
                            dir.display()
                        ))
                    }
                }
            }
            Enforcement::Enforced
        }
        Ok(s) if s.accounting => Enforcement::Unavailable(
            "project quotas are accounted but not enforced on its filesystem (mounted with pqnoenforce)"
                .into(),
        ),
        Ok(_) => Enforcement::Unavailable(
            "project quotas are off on its filesystem (mounted without prjquota)".into(),
        ),
        Err(e) => Enforcement::Unavailable(match e.errno() {
            Some(libc::ENOSYS) | Some(libc::ENOTTY) | Some(libc::EOPNOTSUPP) => {
                format!("the kernel or the filesystem has no quota support, or project quotas are off on its filesystem (xfs mounted without prjquota) ({e})")
            }
            Some(libc::ESRCH) => {
                format!("quotas are not on for its filesystem (mounted without prjquota) ({e})")
            }
            Some(libc::EPERM) => format!(
                "berth may not read the quota state (CAP_SYS_ADMIN is needed) ({e})"
            ),
            _ => format!("the quota state cannot be read ({e})"),
        }),
    }
}

/// The project ids of the local root's volumes.
pub struct Projects {
    root: PathBuf,
    quotas: Arc<dyn Quotas>,
    /// Ids held by a volume record or by a create in flight.
    held: Mutex<BTreeSet<u32>>,
}

fn q_err(what: String) -> impl FnOnce(crate::os::OsError) -> Error {
    move |e| Error::os(what, e)
}

impl Projects {
    /// `held`: the ids the volume records hold.
    pub fn new(
        root: PathBuf,
        quotas: Arc<dyn Quotas>,
        held: impl IntoIterator<Item = u32>,
    ) -> Self {
        Projects {
            root,
            quotas,
            held: Mutex::new(held.into_iter().collect()),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, BTreeSet<u32>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many ids are held now.
    pub fn held_count(&self) -> usize {
        self.held().len()
    }

    /// Hands out the lowest free id (see the module comment) and holds it.
    pub fn allocate(&self) -> Result<u32> {
        let mut held = self.held();
        let mut id = FIRST_PROJECT;
        loop {
            if !held.contains(&id) {
                let q = self
                    .quotas
                    .get(&self.root, id)
                    .map_err(q_err(format!("reading the quota of project {id}")))?;
                if q.used_inodes == 0 && q.used_bytes == 0 {
                    held.insert(id);
                    return Ok(id);
                }
                tracing::info!(
                    project = id,
                    used_inodes = q.used_inodes,
                    used_bytes = q.used_bytes,
                    "project id skipped: something on the local root's filesystem is charged to it"
                );
            }
            id = id
                .checked_add(1)
                .filter(|i| *i < u32::MAX)
                .ok_or_else(|| Error::NoSpace("no project id is free on the local root".into()))?;
        }
    }

    /// Holds `id` (found on a volume's directory: a retry adopts it).
    pub fn hold(&self, id: u32) {
        self.held().insert(id);
    }

    /// The project of `dir` (0: none).
    pub fn project_of(&self, dir: &Path) -> Result<u32> {
        self.quotas
            .project(dir)
            .map(|p| p.id)
            .map_err(q_err(format!("reading the project of {}", dir.display())))
    }

    /// Gives `dir` project `id` with the inherit flag, and the project the
    /// limits of a volume of `bytes`. Idempotent.
    pub fn apply(&self, dir: &Path, id: u32, bytes: u64) -> Result<()> {
        self.quotas
            .set_project(dir, Project { id, inherit: true })
            .map_err(q_err(format!("setting project {id} on {}", dir.display())))?;
        self.set_limits(id, bytes)
    }

    /// Sets project `id`'s hard limits for a volume of `bytes`.
    pub fn set_limits(&self, id: u32, bytes: u64) -> Result<()> {
        self.quotas
            .set_limits(&self.root, id, bytes, inode_limit(bytes))
            .map_err(q_err(format!("setting the limits of project {id}")))
    }

    /// Usage and limits of project `id`.
    pub fn usage(&self, id: u32) -> Result<ProjectQuota> {
        self.quotas
            .get(&self.root, id)
            .map_err(q_err(format!("reading the quota of project {id}")))
    }

    /// After the directory holding `id` is gone: clears its limits (best
    /// effort: a failure only leaves limits that the next holder's replace)
    /// and lets it go.
    pub fn release(&self, id: u32) {
        if let Err(e) = self.quotas.set_limits(&self.root, id, 0, 0) {
            tracing::warn!(project = id, error = %e, "could not clear the limits of a released project id");
        }
        self.held().remove(&id);
    }

    /// Whether a record or a create in flight holds `id`.
    pub fn is_held(&self, id: u32) -> bool {
        self.held().contains(&id)
    }
}

/// NodeGetVolumeStats numbers of a volume from its project's quota: its
/// limits are the totals.
pub fn usage_of(q: &ProjectQuota, capacity: u64) -> FsUsage {
    let total = if q.limit_bytes > 0 {
        q.limit_bytes
    } else {
        capacity
    };
    let inodes = if q.limit_inodes > 0 {
        q.limit_inodes
    } else {
        inode_limit(capacity)
    };
    FsUsage {
        total_bytes: total,
        available_bytes: total.saturating_sub(q.used_bytes),
        used_bytes: q.used_bytes,
        total_inodes: inodes,
        free_inodes: inodes.saturating_sub(q.used_inodes),
        used_inodes: q.used_inodes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::os::fake::FakeOs;
    use crate::os::quota::QuotaState;

    #[test]
    fn inode_limit_follows_ext4s_ratio_with_a_floor() {
        assert_eq!(inode_limit(1 << 30), 65_536);
        assert_eq!(inode_limit(10 << 30), 655_360);
        assert_eq!(inode_limit(1 << 20), MIN_INODES);
        assert_eq!(inode_limit(0), MIN_INODES);
    }

    #[test]
    fn detect_says_why_not() {
        let f = FakeOs::new();
        let root = Path::new("/");
        match detect(&f, &f, root, &[]) {
            Enforcement::Unavailable(m) => assert!(m.contains("no quota support"), "{m}"),
            e => panic!("{e:?}"),
        }
        f.set_quota_state(Ok(QuotaState {
            accounting: true,
            enforced: false,
        }));
        match detect(&f, &f, root, &[]) {
            Enforcement::Unavailable(m) => assert!(m.contains("not enforced"), "{m}"),
            e => panic!("{e:?}"),
        }
        f.set_quota_state(Ok(QuotaState::default()));
        match detect(&f, &f, root, &[]) {
            Enforcement::Unavailable(m) => assert!(m.contains("prjquota"), "{m}"),
            e => panic!("{e:?}"),
        }
        f.set_quota_state(Err(libc::ESRCH));
        match detect(&f, &f, root, &[]) {
            Enforcement::Unavailable(m) => assert!(m.contains("prjquota"), "{m}"),
            e => panic!("{e:?}"),
        }
        f.set_quota_state(Err(libc::EPERM));
        match detect(&f, &f, root, &[]) {
            Enforcement::Unavailable(m) => assert!(m.contains("CAP_SYS_ADMIN"), "{m}"),
            e => panic!("{e:?}"),
        }
        f.enable_project_quotas();
        assert_eq!(detect(&f, &f, root, &[]), Enforcement::Enforced);
        // A project inherited by every directory made in the root or in
        // one of Berth's directories there: not enforced.
        let t = tempfile::tempdir().unwrap();
        let work = t.path().join(".trash");
        std::fs::create_dir(&work).unwrap();
        assert_eq!(
            detect(&f, &f, t.path(), &[".trash", ".missing"]),
            Enforcement::Enforced
        );
        f.set_project(
            &work,
            Project {
                id: 7,
                inherit: true,
            },
        )
        .unwrap();
        match detect(&f, &f, t.path(), &[".trash"]) {
            Enforcement::Unavailable(m) => {
                assert!(m.contains("project 7 with the inherit flag"), "{m}")
            }
            e => panic!("{e:?}"),
        }
        // Without the flag the project is no one's concern here.
        f.set_project(
            &work,
            Project {
                id: 7,
                inherit: false,
            },
        )
        .unwrap();
        f.set_project(
            t.path(),
            Project {
                id: 0,
                inherit: true,
            },
        )
        .unwrap();
        match detect(&f, &f, t.path(), &[".trash"]) {
            Enforcement::Unavailable(m) => {
                assert!(m.contains("project 0 with the inherit flag"), "{m}")
            }
            e => panic!("{e:?}"),
        }
        f.set_project(t.path(), Project::default()).unwrap();
        assert_eq!(detect(&f, &f, t.path(), &[".trash"]), Enforcement::Enforced);
        f.fail_next("project_get", libc::EIO);
        match detect(&f, &f, t.path(), &[".trash"]) {
            Enforcement::Unavailable(m) => assert!(m.contains("cannot be read"), "{m}"),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn allocation_skips_held_and_charged_ids_and_reuses_released_ones() {
        let t = tempfile::tempdir().unwrap();
        let f = Arc::new(FakeOs::new());
        f.enable_project_quotas();
        let p = Projects::new(t.path().into(), f.clone(), [FIRST_PROJECT]);
        // FIRST is held by a record; FIRST+1 is charged by a directory
        // that no record names (a crash after the id was set).
        let orphan = t.path().join("orphan");
        std::fs::create_dir(&orphan).unwrap();
        p.apply(&orphan, FIRST_PROJECT + 1, 1 << 20).unwrap();
        let a = p.allocate().unwrap();
        assert_eq!(a, FIRST_PROJECT + 2);
        let b = p.allocate().unwrap();
        assert_eq!(b, FIRST_PROJECT + 3);
        // The orphan goes: its id is free again (nothing charged, no
        // record), limits or not.
        crate::os::files::Files::remove_dir(f.as_ref(), &orphan).unwrap();
        let mut free = Projects::new(t.path().into(), f.clone(), [FIRST_PROJECT, a, b]);
        assert_eq!(free.allocate().unwrap(), FIRST_PROJECT + 1);
        free.release(a);
        assert!(!free.is_held(a));
        assert_eq!(f.project_limits().get(&a), None);
        assert_eq!(free.allocate().unwrap(), a);
        free = Projects::new(t.path().into(), f.clone(), []);
        assert_eq!(free.held_count(), 0);
    }

    #[test]
    fn a_failed_read_hands_out_nothing() {
        let t = tempfile::tempdir().unwrap();
        let f = Arc::new(FakeOs::new());
        f.enable_project_quotas();
        let p = Projects::new(t.path().into(), f.clone(), []);
        f.fail_quota_op_at(Some((0, libc::EIO)));
        assert!(p.allocate().is_err());
        assert_eq!(p.held_count(), 0);
        assert_eq!(p.allocate().unwrap(), FIRST_PROJECT);
    }

    #[test]
    fn usage_reports_the_limits_as_totals() {
        let q = ProjectQuota {
            used_bytes: 300,
            used_inodes: 3,
            limit_bytes: 1000,
            limit_inodes: 10,
        };
        let u = usage_of(&q, 5000);
        assert_eq!(
            (u.total_bytes, u.available_bytes, u.used_bytes),
            (1000, 700, 300)
        );
        assert_eq!((u.total_inodes, u.free_inodes, u.used_inodes), (10, 7, 3));
        // Over the limit (root may write past it on ext4): nothing free.
        let q = ProjectQuota {
            used_bytes: 2000,
            ..q
        };
        assert_eq!(usage_of(&q, 5000).available_bytes, 0);
        // No limit set (yet): the capacity.
        let u = usage_of(&ProjectQuota::default(), 1 << 20);
        assert_eq!((u.total_bytes, u.total_inodes), (1 << 20, MIN_INODES));
    }
}
