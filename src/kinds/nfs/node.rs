//! Node side of NFS volumes: `mount.nfs` straight at the target,
//! unmounts that work with the server gone, and stats that never hang.
//! Every decision is made from mountinfo.
use std::path::Path;

use super::id::VolumeId;
use super::{is_mount_of, is_nfs, node_options, Health, NfsKind, Probe, VolumeStats};
use crate::error::{Error, Result};
use crate::node::mounts;
use crate::os::nfsmount::{self, Unmount};
use crate::os::OsError;
use crate::state::Capability;

impl NfsKind {
    /// Mounts `server:/share/subdir` at `target`. A repeat with the same
    /// source and read-only setting is success (a stale mount found then is
    /// mounted again); anything else at the target is ALREADY_EXISTS.
    pub(super) fn publish_nfs(
        &self,
        vid: &VolumeId,
        target: &Path,
        cap: &Capability,
        readonly: bool,
    ) -> Result<()> {
        let opts = node_options(cap, readonly)?;
        let ro = opts.iter().any(|o| o == "ro");
        let source = vid.source();
        let t = mounts::table(&self.os)?;
        if let Some(top) = mounts::at(&self.os, &t, target).last() {
            if !(is_mount_of(top, &vid.server, &vid.path()) && top.readonly() == ro) {
                return Err(Error::Conflict(format!(
                    "target {} is already mounted with a different volume or read-only setting",
                    target.display()
                )));
            }
            match self.probe(target) {
                Probe::Stale => {
                    tracing::warn!(target = %target.display(), %source, "stale NFS mount at the target; mounting again");
                    self.unmount_target(target)?;
                }
                Probe::Usage(_) | Probe::Hung | Probe::Failed(_) => return Ok(()),
            }
        }
        if cap.access_mode.single_target() {
            let here: Vec<u32> = mounts::at(&self.os, &t, target)
                .iter()
                .map(|m| m.id)
                .collect();
            let others: Vec<_> = t
                .iter()
                .filter(|m| is_mount_of(m, &vid.server, &vid.path()) && !here.contains(&m.id))
                .map(|m| m.mount_point.display().to_string())
                .collect();
            if !others.is_empty() {
                return Err(Error::WrongState(format!(
                    "volume has access mode SINGLE_NODE_SINGLE_WRITER and is already published at {}",
                    others.join(", ")
                )));
            }
        }
        mounts::mount_on_dir(&self.os, target, || {
            nfsmount::mount(self.os.cmd.as_ref(), &source, target, &opts, self.timeout)
                .map_err(|e| Error::os(format!("mounting {source} at {}", target.display()), e))
        })
    }

    /// Unmounts everything mountinfo shows at `path`: NFS mounts with
    /// `nfs_unmount`, anything else with a plain unmount (never forced).
    pub(super) fn unmount_target(&self, path: &Path) -> Result<()> {
        for _ in 0..32 {
            let t = mounts::table(&self.os)?;
            let at = mounts::at(&self.os, &t, path);
            let Some(top) = at.last() else {
                return Ok(());
            };
            if is_nfs(top) {
                self.nfs_unmount(path, at.len())?;
            } else {
                match self.os.mounter.unmount(path) {
                    Ok(()) => {}
                    Err(e) if e.errno() == Some(libc::EINVAL) => {}
                    Err(e) => return Err(Error::os(format!("unmounting {}", path.display()), e)),
                }
            }
        }
        Err(Error::Internal(format!(
            "{} still mounted after 32 unmounts",
            path.display()
        )))
    }

    fn mounts_at(&self, path: &Path) -> Result<usize> {
        Ok(mounts::at(&self.os, &mounts::table(&self.os)?, path).len())
    }

    /// Unmounts the top NFS mount at `path` (`before` mounts there now): a
    /// normal `umount` first; only if the server is not responding (that
    /// umount timed out; or it failed, typically busy because a process is
    /// stuck on the dead server, and a statvfs of the mount does not answer
    /// within the stat timeout either) `umount -f`, and if the mount is
    /// still there, `umount -l`. Any other failure (busy with a live
    /// server) is returned for the CO to retry.
    fn nfs_unmount(&self, path: &Path, before: usize) -> Result<()> {
        let run = |how| nfsmount::umount(self.os.cmd.as_ref(), path, how, self.timeout);
        match run(Unmount::Normal) {
            Ok(()) => return Ok(()),
            Err(OsError::Timeout { .. }) => {}
            Err(e) => {
                if self.mounts_at(path)? < before {
                    return Ok(());
                }
                if !matches!(self.probe(path), Probe::Hung) {
                    return Err(Error::os(format!("unmounting {}", path.display()), e));
                }
                tracing::warn!(path = %path.display(), error = %e, "NFS unmount failed and a statvfs of the mount does not answer (server not responding)");
            }
        }
        if self.mounts_at(path)? < before {
            return Ok(());
        }
        tracing::warn!(path = %path.display(), timeout_s = self.timeout.as_secs(), "NFS server not responding; forcing the unmount");
        let forced = run(Unmount::Force);
        if forced.is_ok() && self.mounts_at(path)? < before {
            return Ok(());
        }
        tracing::warn!(path = %path.display(), "forced NFS unmount did not detach it; unmounting lazily");
        match run(Unmount::Lazy) {
            Ok(()) => Ok(()),
            Err(e) => {
                if self.mounts_at(path)? < before {
                    return Ok(());
                }
                Err(Error::os(
                    format!("lazily unmounting {}", path.display()),
                    e,
                ))
            }
        }
    }

    /// NodeGetVolumeStats: NOT_FOUND unless the volume is mounted at `path`;
    /// the export's numbers when the server answers in time, otherwise an
    /// abnormal condition and no numbers.
    pub(super) fn node_stats(&self, vid: &VolumeId, path: &Path) -> Result<(VolumeStats, Health)> {
        let t = mounts::table(&self.os)?;
        let here = mounts::at(&self.os, &t, path)
            .last()
            .is_some_and(|m| is_mount_of(m, &vid.server, &vid.path()));
        if !here {
            return Err(Error::NotFound(format!(
                "volume {vid} is not mounted at {}",
                path.display()
            )));
        }
        let none = VolumeStats::default();
        Ok(match self.probe(path) {
            Probe::Usage(usage) => (
                VolumeStats {
                    usage,
                    block_size_only: None,
                },
                Health::ok(),
            ),
            Probe::Stale => (
                none,
                Health::abnormal(format!(
                    "stale NFS file handle: {} was removed or re-exported on the server",
                    vid.path()
                )),
            ),
            Probe::Hung => (
                none,
                Health::abnormal(format!(
                    "NFS server {} not responding (no answer within {} s)",
                    vid.server,
                    self.stat_timeout.as_secs()
                )),
            ),
            Probe::Failed(e) => (none, Health::abnormal(format!("statvfs failed: {e}"))),
        })
    }
}
