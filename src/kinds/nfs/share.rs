//! Controller side of NFS volumes: the share mounted at a private working
//! directory, and the volume's subdirectory made, archived or removed in it
//! without ever following a symlink (every step is an `*at` call on a
//! directory opened with O_NOFOLLOW).
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{open, openat, renameat, AtFlags, OFlag};
use nix::sys::stat::{fchmod, fstatat, mkdirat, Mode};
use nix::unistd::{unlinkat, UnlinkatFlags};

use super::id::{OnDelete, VolumeId};
use super::params::fnv64;
use super::{is_nfs, same_source, NfsKind, Probe};
use crate::error::{Error, Result};
use crate::node::mounts;
use crate::os::mountinfo;
use crate::os::{nfsmount, OsError};

/// What DeleteVolume (or a rollback) does with a subdirectory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// Undo a CreateVolume that did not finish: remove the directory only if
    /// it is empty (it may have existed, with data, before).
    Rollback,
    /// Apply the volume's onDelete.
    Apply(OnDelete),
}

fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

fn sys_err(what: String, e: Errno) -> Error {
    Error::io(what, std::io::Error::from_raw_os_error(e as i32))
}

fn open_root(root: &Path) -> Result<OwnedFd> {
    open(root, dir_flags(), Mode::empty())
        .map_err(|e| sys_err(format!("opening the share at {}", root.display()), e))
}

/// Opens `name` in `dir` as a directory, never through a symlink.
fn open_dir(dir: impl AsFd, name: &str) -> nix::Result<OwnedFd> {
    openat(dir, name, dir_flags(), Mode::empty())
}

fn not_a_dir(rel: &str) -> Error {
    Error::FailedPrecondition(format!(
        "{rel} on the share is not a directory (or is a symlink); refusing to use it"
    ))
}

/// Creates `subdir` below `root` one component at a time (existing
/// directories are fine, symlinks and files are not) and applies `mode` to
/// the last one.
pub fn create_subdir(root: &Path, subdir: &str, mode: Option<u32>) -> Result<()> {
    let mut fd = open_root(root)?;
    let mut rel = String::new();
    for c in subdir.split('/') {
        if !rel.is_empty() {
            rel.push('/');
        }
        rel.push_str(c);
        match mkdirat(&fd, c, Mode::from_bits_truncate(0o777)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(sys_err(format!("creating {rel} on the share"), e)),
        }
        fd = match open_dir(&fd, c) {
            Ok(f) => f,
            Err(Errno::ELOOP) | Err(Errno::ENOTDIR) => return Err(not_a_dir(&rel)),
            Err(e) => return Err(sys_err(format!("opening {rel} on the share"), e)),
        };
    }
    if let Some(m) = mode {
        fchmod(&fd, Mode::from_bits_truncate(m))
            .map_err(|e| sys_err(format!("setting mode {m:o} of {rel} on the share"), e))?;
    }
    Ok(())
}

/// The name an archived subdirectory gets in its parent.
pub fn archive_name(subdir: &str, unix: u64) -> String {
    format!("archived-{}-{unix}", subdir.replace('/', "-"))
}

/// Removes, archives or keeps `subdir` below `root`. Missing is success;
/// nothing outside the subdirectory is touched and no symlink is followed.
pub fn remove_subdir(root: &Path, subdir: &str, how: Removal, unix: u64) -> Result<()> {
    if how == Removal::Apply(OnDelete::Retain) {
        return Ok(());
    }
    let comps: Vec<&str> = subdir.split('/').collect();
    let Some((leaf, parents)) = comps.split_last() else {
        return Ok(());
    };
    let mut fd = open_root(root)?;
    let mut rel = String::new();
    for c in parents {
        if !rel.is_empty() {
            rel.push('/');
        }
        rel.push_str(c);
        fd = match open_dir(&fd, c) {
            Ok(f) => f,
            Err(Errno::ENOENT) => return Ok(()),
            Err(Errno::ELOOP) | Err(Errno::ENOTDIR) => return Err(not_a_dir(&rel)),
            Err(e) => return Err(sys_err(format!("opening {rel} on the share"), e)),
        };
    }
    let st = match fstatat(&fd, *leaf, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(s) => s,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(sys_err(format!("inspecting {subdir} on the share"), e)),
    };
    let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
    match how {
        Removal::Apply(OnDelete::Retain) => Ok(()),
        Removal::Rollback => {
            if !is_dir {
                return Ok(());
            }
            match unlinkat(&fd, *leaf, UnlinkatFlags::RemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => Ok(()),
                Err(Errno::ENOTEMPTY) | Err(Errno::EEXIST) => {
                    tracing::warn!(
                        subdir,
                        "not removing a subdirectory that holds data while rolling back"
                    );
                    Ok(())
                }
                Err(e) => Err(sys_err(format!("removing {subdir} on the share"), e)),
            }
        }
        Removal::Apply(OnDelete::Archive) => {
            let base = archive_name(subdir, unix);
            let mut name = base.clone();
            let mut n = 0;
            while fstatat(&fd, name.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW).is_ok() {
                n += 1;
                name = format!("{base}-{n}");
            }
            renameat(&fd, *leaf, &fd, name.as_str())
                .map_err(|e| sys_err(format!("archiving {subdir} as {name} on the share"), e))?;
            tracing::info!(subdir, archived = %name, "volume archived");
            Ok(())
        }
        Removal::Apply(OnDelete::Delete) => {
            if !is_dir {
                // Not what Berth made: remove the entry, never its target.
                return match unlinkat(&fd, *leaf, UnlinkatFlags::NoRemoveDir) {
                    Ok(()) | Err(Errno::ENOENT) => Ok(()),
                    Err(e) => Err(sys_err(format!("removing {subdir} on the share"), e)),
                };
            }
            // The parent is pinned by its descriptor; remove_dir_all opens
            // the leaf with O_NOFOLLOW and descends by descriptors.
            let path = PathBuf::from(format!("/proc/self/fd/{}/{leaf}", fd.as_raw_fd()));
            match std::fs::remove_dir_all(&path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(Error::io(format!("removing {subdir} on the share"), e)),
            }
        }
    }
}

impl NfsKind {
    /// The working directory for one server, share and option set.
    fn work_dir(&self, vid: &VolumeId, opts: &[String]) -> PathBuf {
        let key = format!("{}\0{}\0{}", vid.server, vid.share, opts.join(","));
        self.work.join(format!("{:016x}", fnv64(key.as_bytes())))
    }

    /// A working mount of the volume's share already there (for health
    /// checks, which never mount).
    pub(super) fn existing_share_mount(&self, vid: &VolumeId) -> Option<PathBuf> {
        let t = mounts::table(&self.os).ok()?;
        let want = vid.share_source();
        t.iter()
            .rev()
            .find(|m| {
                m.mount_point.parent() == Some(self.work.as_path())
                    && is_nfs(m)
                    && same_source(&m.source, &want)
            })
            .map(|m| m.mount_point.clone())
    }

    /// Mounts the volume's share (once per server, share and options; an
    /// existing healthy mount is reused, also after a restart) and returns
    /// where. `sets` are the option sets to try in order (see
    /// `controller_option_sets`): a healthy mount made with any of them is
    /// reused first; then each is mounted in turn until one works. A server
    /// that does not answer stops the search (every later set would wait
    /// out the same timeout).
    pub(super) fn share_mount(&self, vid: &VolumeId, sets: &[Vec<String>]) -> Result<PathBuf> {
        let Some(first) = sets.first() else {
            return Err(Error::Internal("no NFS mount options to try".into()));
        };
        // One lock for the whole search: its first set names it.
        let lock = self.share_lock(&self.work_dir(vid, first));
        let _held = lock.lock().unwrap_or_else(|e| e.into_inner());
        let source = vid.share_source();
        let t = mounts::table(&self.os)?;
        for opts in sets {
            let mp = self.work_dir(vid, opts);
            if let Some(top) = mountinfo::at(&t, &mp).last() {
                if !is_nfs(top) || !same_source(&top.source, &source) {
                    return Err(Error::Internal(format!(
                        "{} holds {} instead of {source}",
                        mp.display(),
                        top.source
                    )));
                }
                match self.probe(&mp) {
                    Probe::Usage(_) => return Ok(mp),
                    Probe::Stale => {
                        tracing::warn!(share = %source, "working mount of the share is stale; mounting again");
                        self.unmount_target(&mp)?;
                    }
                    Probe::Hung => {
                        return Err(Error::Unavailable(format!(
                            "NFS server {} is not responding (share {})",
                            vid.server, vid.share
                        )))
                    }
                    Probe::Failed(e) => {
                        return Err(Error::os(format!("checking the mount of {source}"), e))
                    }
                }
            }
        }
        if !self.work.is_dir() {
            std::fs::create_dir_all(&self.work)
                .and_then(|_| {
                    std::fs::set_permissions(&self.work, std::fs::Permissions::from_mode(0o700))
                })
                .map_err(|e| Error::io(format!("creating {}", self.work.display()), e))?;
        }
        let mut first_error = None;
        for opts in sets {
            let mp = self.work_dir(vid, opts);
            match mounts::mount_on_dir(&self.os, &mp, || {
                nfsmount::mount(self.os.cmd.as_ref(), &source, &mp, opts, self.timeout)
                    .map_err(|e| Error::os(format!("mounting {source}"), e))
            }) {
                Ok(()) => {
                    tracing::info!(share = %source, at = %mp.display(), options = %opts.join(","), "mounted NFS share");
                    return Ok(mp);
                }
                Err(e)
                    if matches!(
                        &e,
                        Error::Os {
                            source: OsError::Timeout { .. },
                            ..
                        }
                    ) =>
                {
                    return Err(e)
                }
                Err(e) => {
                    if sets.len() > 1 {
                        tracing::info!(share = %source, options = %opts.join(","), error = %e.render(), "NFS mount failed; trying the next options");
                    }
                    // The first failure (the preferred options) is the one
                    // worth reporting.
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or_else(|| Error::Internal("no NFS mount options to try".into())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn creates_components_and_applies_the_mode() {
        let d = tempfile::tempdir().unwrap();
        create_subdir(d.path(), "ns/pvc", Some(0o2775)).unwrap();
        assert!(d.path().join("ns/pvc").is_dir());
        assert_eq!(mode(&d.path().join("ns/pvc")), 0o2775);
        // Idempotent, and an existing directory keeps its data.
        std::fs::write(d.path().join("ns/pvc/f"), b"x").unwrap();
        create_subdir(d.path(), "ns/pvc", Some(0o777)).unwrap();
        assert_eq!(mode(&d.path().join("ns/pvc")), 0o777);
        assert!(d.path().join("ns/pvc/f").exists());
    }

    #[test]
    fn never_follows_symlinks() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), b"x").unwrap();
        symlink(outside.path(), d.path().join("link")).unwrap();
        // Creating through or at a symlink is refused.
        for sub in ["link/pvc", "link"] {
            let e = create_subdir(d.path(), sub, None).unwrap_err();
            assert!(matches!(e, Error::FailedPrecondition(_)), "{sub}: {e:?}");
        }
        assert!(!outside.path().join("pvc").exists());
        // Deleting through a symlinked parent is refused; deleting a
        // symlink removes the link only.
        let e = remove_subdir(d.path(), "link/keep", Removal::Apply(OnDelete::Delete), 1);
        assert!(matches!(e, Err(Error::FailedPrecondition(_))), "{e:?}");
        remove_subdir(d.path(), "link", Removal::Apply(OnDelete::Delete), 1).unwrap();
        assert!(!d.path().join("link").exists());
        assert!(outside.path().join("keep").exists());
    }

    #[test]
    fn delete_archive_retain_and_rollback() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("canary"), b"x").unwrap();
        for sub in ["a/v", "b/v", "c/v", "r"] {
            create_subdir(d.path(), sub, None).unwrap();
            std::fs::create_dir(d.path().join(sub).join("deep")).unwrap();
            std::fs::write(d.path().join(sub).join("deep/f"), b"data").unwrap();
        }
        remove_subdir(d.path(), "a/v", Removal::Apply(OnDelete::Delete), 7).unwrap();
        assert!(!d.path().join("a/v").exists());
        assert!(d.path().join("a").is_dir(), "the parent stays");
        remove_subdir(d.path(), "b/v", Removal::Apply(OnDelete::Archive), 7).unwrap();
        assert!(!d.path().join("b/v").exists());
        assert!(d.path().join("b/archived-b-v-7/deep/f").exists());
        // A second archive at the same second gets its own name.
        create_subdir(d.path(), "b/v", None).unwrap();
        remove_subdir(d.path(), "b/v", Removal::Apply(OnDelete::Archive), 7).unwrap();
        assert!(d.path().join("b/archived-b-v-7-1").is_dir());
        remove_subdir(d.path(), "c/v", Removal::Apply(OnDelete::Retain), 7).unwrap();
        assert!(d.path().join("c/v/deep/f").exists());
        // A rollback never removes data; an empty directory goes.
        remove_subdir(d.path(), "r", Removal::Rollback, 7).unwrap();
        assert!(d.path().join("r/deep/f").exists());
        create_subdir(d.path(), "e", None).unwrap();
        remove_subdir(d.path(), "e", Removal::Rollback, 7).unwrap();
        assert!(!d.path().join("e").exists());
        // Missing is success, for every mode.
        for how in [
            Removal::Rollback,
            Removal::Apply(OnDelete::Delete),
            Removal::Apply(OnDelete::Archive),
        ] {
            remove_subdir(d.path(), "x/y", how, 7).unwrap();
            remove_subdir(d.path(), "a/v", how, 7).unwrap();
        }
        assert!(d.path().join("canary").exists());
    }

    #[test]
    fn archive_names() {
        assert_eq!(
            archive_name("ns/pvc-1", 1700000000),
            "archived-ns-pvc-1-1700000000"
        );
        assert_eq!(archive_name("v", 5), "archived-v-5");
    }
}
