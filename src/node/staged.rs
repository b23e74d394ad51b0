//! Where each volume is staged: `<state-dir>/staged/<id>`, a symlink whose
//! text is the staging path of the volume's last NodeStageVolume that
//! mounted (made just before its mount), removed by NodeUnstageVolume
//! there and by DeleteVolume.
//!
//! It tells the volume's own staging path from a second one when the
//! staging mount is gone and the pods' mounts are not: an operator's
//! `umount` (or `umount -l`, or `rmdir` after it) of the staging path
//! while a pod still uses the volume. kubelet stages again at the same
//! path (after its restart) and retries forever, and Berth refused that
//! for as long as the pod lived, as it refuses a second staging path of a
//! mounted volume (two staging paths could never be unstaged, each
//! counting the other as a publication). The kernel cannot tell the two
//! apart (a bind shows the same directory or device either way); this
//! entry can: a stage at the path it names is the same staging path again.
//!
//! Not synced: it outlives any process, and the power loss that could take
//! it takes the mounts too. A failure to write it never fails a stage (the
//! stage then only loses this recovery). The staging path is compared as
//! the request resolves it (`Protected::resolve`), as it is stored.
use std::path::{Path, PathBuf};

use crate::os::files::{ensure_dir, Files};
use crate::os::OsError;

#[derive(Debug, Clone)]
pub struct StagedAt {
    dir: PathBuf,
}

impl StagedAt {
    /// Entries under `<state_dir>/staged`.
    pub fn new(state_dir: &Path) -> Self {
        StagedAt {
            dir: state_dir.join("staged"),
        }
    }

    /// Volume ids are checked (a safe path component) before they get here.
    fn entry(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// Whether `staging` is where volume `id` was last staged (and not
    /// unstaged since). One readlink.
    pub fn is(&self, id: &str, staging: &Path) -> bool {
        std::fs::read_link(self.entry(id)).is_ok_and(|p| p == staging)
    }

    /// Where volume `id` was last staged and not unstaged since, if
    /// anywhere. One readlink.
    pub fn path(&self, id: &str) -> Option<PathBuf> {
        std::fs::read_link(self.entry(id)).ok()
    }

    /// Records `staging` as where volume `id` is staged: one symlink(2)
    /// when there is no entry (the common case). A failure is logged.
    pub fn remember(&self, files: &dyn Files, id: &str, staging: &Path) {
        if let Err(e) = self.try_remember(files, id, staging) {
            tracing::warn!(volume_id = %id, staging = %staging.display(), error = %e,
                "could not record the staging path (a staging mount unmounted by hand while a pod uses the volume then cannot be made again until the pod goes)");
        }
    }

    fn try_remember(&self, files: &dyn Files, id: &str, staging: &Path) -> Result<(), OsError> {
        let entry = self.entry(id);
        match files.symlink(staging, &entry) {
            Ok(()) => return Ok(()),
            Err(e) if e.errno() == Some(libc::ENOENT) => {
                ensure_dir(files, &self.dir, 0o700)?;
                return files.symlink(staging, &entry);
            }
            Err(e) if e.errno() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e),
        }
        if self.is(id, staging) {
            return Ok(());
        }
        // An entry for another path (an unstage that could not remove it):
        // replaced in one rename.
        let tmp = self.dir.join(format!(".{id}.tmp"));
        match files.remove_file(&tmp) {
            Err(e) if e.errno() != Some(libc::ENOENT) => return Err(e),
            _ => {}
        }
        files.symlink(staging, &tmp)?;
        files.rename(&tmp, &entry)
    }

    /// Forgets `staging` as where volume `id` is staged, once it is
    /// unstaged there; an entry naming another path is kept.
    pub fn forget(&self, files: &dyn Files, id: &str, staging: &Path) {
        if self.is(id, staging) {
            self.discard(files, id);
        }
    }

    /// Removes volume `id`'s entry, whatever it names (DeleteVolume).
    pub fn discard(&self, files: &dyn Files, id: &str) {
        match files.remove_file(&self.entry(id)) {
            Err(e) if e.errno() != Some(libc::ENOENT) => {
                tracing::warn!(volume_id = %id, error = %e, "could not remove the record of the staging path");
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::os::files::RealFiles;

    #[test]
    fn remembers_replaces_and_forgets_one_path_per_volume() {
        let d = tempfile::tempdir().unwrap();
        let s = StagedAt::new(d.path());
        let (a, b) = (Path::new("/k/a"), Path::new("/k/b"));
        assert!(!s.is("v", a));
        s.remember(&RealFiles, "v", a);
        assert!(s.is("v", a) && !s.is("v", b) && !s.is("w", a));
        s.remember(&RealFiles, "v", a);
        assert!(s.is("v", a));
        // A stale entry for another path is replaced.
        s.remember(&RealFiles, "v", b);
        assert!(s.is("v", b) && !s.is("v", a));
        // Forgetting another path keeps the entry.
        s.forget(&RealFiles, "v", a);
        assert!(s.is("v", b));
        s.forget(&RealFiles, "v", b);
        assert!(!s.is("v", b));
        s.remember(&RealFiles, "v", a);
        s.discard(&RealFiles, "v");
        s.discard(&RealFiles, "v");
        assert!(!s.is("v", a));
        assert_eq!(
            std::fs::read_dir(d.path().join("staged")).unwrap().count(),
            0
        );
    }
}
