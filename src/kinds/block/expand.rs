//! Expansion. ControllerExpandVolume checks the request against the pool
//! (a thick volume's growth is allocated there and then, so that what it
//! answers is held) and answers the new size (the handler records it);
//! NodeExpandVolume does
//! the work on the volume's node, each step idempotent so a retry repairs
//! whatever a crash interrupted:
//! 1. grow the backing file (thick: allocate the new part), never shrink;
//! 2. `LOOP_SET_CAPACITY` if the attached loop device is smaller than it;
//! 3. grow the mounted filesystem online (resize2fs on the device,
//!    xfs_growfs on a mount point); a filesystem that already fills its
//!    device is left as it is. One mounted read-only only (a read-only
//!    access mode or flag), which the kernel does not grow, is flagged
//!    (`grow_fs`) before the file grows and grown at its next read-write
//!    stage, as a restore's is.
//!
//! A whole disk cannot grow: a request within its size succeeds (the
//! filesystem is grown to the disk if it is smaller), beyond it is
//! OUT_OF_RANGE.
use std::path::{Path, PathBuf};

use super::{params, BlockKind, Dev};
use crate::error::{Error, Result};
use crate::kinds::{Expansion, Growth, NodeExpandArgs};
use crate::node::mounts;

use crate::os::mkfs::{self, Filesystem};
use crate::state::{Allocation, BlockAccess, BlockInfo, VolumeRecord};

/// What NodeExpandVolume does with a volume's filesystem.
enum FsGrowth {
    /// Nothing: raw, not formatted yet (mkfs will use the whole device),
    /// or used raw right now.
    None,
    /// Grown online through this read-write mount.
    Online(Filesystem, PathBuf),
    /// Mounted read-only only: flagged (`grow_fs`) for its next
    /// read-write stage.
    Deferred,
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl BlockKind {
    pub(super) fn expand_controller(
        &self,
        rec: Option<&VolumeRecord>,
        g: Growth,
    ) -> Result<Expansion> {
        let Some(rec) = rec else {
            // A volume of another node: its node checks and does the work.
            if g.required <= 0 {
                return Err(Error::Invalid(
                    "capacity_range.required_bytes is needed to expand a volume of another node"
                        .into(),
                ));
            }
            return Ok(Expansion {
                capacity_bytes: params::grown_size(0, g.required, g.limit)?,
                node_expansion_required: true,
            });
        };
        let info = Self::info(rec)?;
        if let Some(d) = &info.disk {
            let size = to_i64(d.size_bytes);
            Self::check_disk_growth(size, g)?;
            return Ok(Expansion {
                capacity_bytes: size,
                node_expansion_required: false,
            });
        }
        let size = params::grown_size(rec.capacity_bytes, g.required, g.limit)?;
        self.check_file_growth(rec, info.allocation, size)?;
        if info.allocation == Allocation::Thick {
            // The growth is allocated before the answer, under the pool's
            // allocation lock: a check alone took nothing, so two
            // expansions (or a thick create) were both admitted to the
            // same free space and the node's growth failed for good. The
            // device and the filesystem still grow on the node.
            // Its filesystem stays at the old size until the node grows
            // it: flagged as a restore's is (`grow_fs`), so a snapshot or
            // clone taken meanwhile, whose file is no longer shorter than
            // its size, still has the filesystem grown at its first stage
            // (as the volume itself is, if staged before NodeExpandVolume).
            let f = self.require_file(&rec.id)?;
            let mut grown = info.clone();
            grown.grow_fs |= info.formatted;
            self.grow_file_to(rec, &grown, &f, size)?;
        }
        Ok(Expansion {
            capacity_bytes: size,
            node_expansion_required: true,
        })
    }

    fn check_disk_growth(size: i64, g: Growth) -> Result<()> {
        if g.required > size {
            return Err(Error::BadSize(format!(
                "a whole-disk volume cannot grow beyond its disk ({size} bytes)"
            )));
        }
        if g.limit > 0 && size > g.limit {
            return Err(Error::BadSize(format!(
                "the volume is a whole disk of {size} bytes, more than limit_bytes {}",
                g.limit
            )));
        }
        Ok(())
    }

    /// OUT_OF_RANGE when the file pool cannot hold the volume at `size`.
    fn check_file_growth(
        &self,
        rec: &VolumeRecord,
        allocation: Allocation,
        size: i64,
    ) -> Result<()> {
        let r = self.file_room(true)?;
        if size > to_i64(r.usage.total_bytes) {
            return Err(Error::BadSize(format!(
                "{size} bytes is more than the block pool's filesystem holds ({} bytes)",
                r.usage.total_bytes
            )));
        }
        if allocation == Allocation::Thick {
            let allocated = self
                .os
                .files
                .stat(&self.file(&rec.id)?)
                .map(|m| crate::os::files::allocated_bytes(&m))
                .unwrap_or(0);
            let need = u64::try_from(size).unwrap_or(0).saturating_sub(allocated);
            if need > r.room {
                return Err(Error::BadSize(format!(
                    "growing the thick volume to {size} bytes needs {need} more bytes; the block pool has {}",
                    r.describe()
                )));
            }
        }
        Ok(())
    }

    pub(super) fn expand_node(&self, rec: &VolumeRecord, a: &NodeExpandArgs<'_>) -> Result<i64> {
        let info = Self::info(rec)?;
        Self::refuse_raw_of_filesystem(rec, &info, a)?;
        self.require_at_volume_path(rec, &info, a)?;
        if let Some(d) = &info.disk {
            let disk = self.resolve_disk(d)?;
            let size = to_i64(disk.size_bytes);
            Self::check_disk_growth(size, a.growth)?;
            let dev = Dev {
                path: disk.path,
                major: disk.major,
                minor: disk.minor,
            };
            match self.fs_to_grow(rec, &info, &dev, a)? {
                FsGrowth::Online(fs, at) => {
                    self.grow_fs(rec, &dev, (fs, at))?;
                    self.fs_grown(rec)?;
                }
                FsGrowth::Deferred => {
                    self.defer_fs_growth(rec, &info)?;
                }
                FsGrowth::None => {}
            }
            return Ok(size);
        }
        let size = params::grown_size(rec.capacity_bytes, a.growth.required, a.growth.limit)?;
        self.check_file_growth(rec, info.allocation, size)?;
        let f = self.require_file(&rec.id)?;
        // Whether a filesystem must be grown, and where, is settled before
        // the file grows: a request that is refused grows nothing.
        let dev = self.current_device(rec)?;
        let growth = match &dev {
            Some(dev) => self.fs_to_grow(rec, &info, dev, a)?,
            // Not attached: the device takes the file's size when it is.
            // A filesystem must still be grown, once staged.
            None if info.formatted && !Self::used_raw(a) => {
                return Err(Self::not_mounted(rec, &info));
            }
            None => FsGrowth::None,
        };
        // The flag is durable before the file grows: a crash between
        // leaves a file larger than its filesystem that the next
        // read-write stage grows into.
        let info = match growth {
            FsGrowth::Deferred => self.defer_fs_growth(rec, &info)?,
            _ => info,
        };
        // no room: OUT_OF_RANGE, as ControllerExpandVolume and
        // NodeExpandVolume answer NoSpace (error.rs)
        self.grow_file_to(rec, &info, &f, size)?;
        if let Some(dev) = dev {
            self.refresh_capacity(&dev.path, &f)?;
            if let FsGrowth::Online(fs, at) = growth {
                self.grow_fs(rec, &dev, (fs, at))?;
                self.fs_grown(rec)?;
            }
        }
        Ok(size)
    }

    /// The filesystem is mounted read-only only, which the kernel does not
    /// grow (online resize2fs and xfs_growfs fail "Read-only file
    /// system"), and no offline resize can run while it is mounted: it is
    /// flagged (`grow_fs`) and grown at its next read-write stage, as a
    /// restore staged read-only is. Its readers cannot write to it
    /// meanwhile, so its size holds nobody back; and the expansion is
    /// answered, not refused at every retry of the kubelet for as long as
    /// the volume stays staged read-only.
    fn defer_fs_growth(&self, rec: &VolumeRecord, info: &BlockInfo) -> Result<BlockInfo> {
        let mut info = info.clone();
        if !info.grow_fs {
            info.grow_fs = true;
            self.save_info(rec, &info)?;
        }
        tracing::info!(volume_id = %rec.id, fs = %info.fs_type, "mounted read-only: the filesystem is grown to its device at its next read-write stage");
        Ok(info)
    }

    /// The filesystem fills its device now: a growth still flagged for
    /// the next stage (`grow_fs`: a restore's, or a thick expansion's) is
    /// done.
    fn fs_grown(&self, rec: &VolumeRecord) -> Result<()> {
        let now = self.store.get(&rec.id).unwrap_or_else(|| rec.clone());
        let mut info = Self::info(&now)?;
        if info.grow_fs && info.formatted {
            info.grow_fs = false;
            self.save_info(&now, &info)?;
        }
        Ok(())
    }

    /// NOT_FOUND, before anything grows, when a formatted volume whose
    /// device is attached is mounted at neither `volume_path` nor the
    /// staging path: the request names a path that does not hold this
    /// volume. A volume used raw (Kubernetes passes a directory of its own
    /// as the path then), not formatted yet, or not attached is left to the
    /// checks that follow.
    fn require_at_volume_path(
        &self,
        rec: &VolumeRecord,
        info: &BlockInfo,
        a: &NodeExpandArgs<'_>,
    ) -> Result<()> {
        if Self::used_raw(a) || info.access == Some(BlockAccess::Raw) || !info.formatted {
            return Ok(());
        }
        let Some(dev) = self.current_device(rec)? else {
            return Ok(());
        };
        let t = mounts::table(&self.os)?;
        let shows_dev = |p: &Path| {
            mounts::at(&self.os, &t, p)
                .last()
                .is_some_and(|m| (m.major, m.minor) == (dev.major, dev.minor))
        };
        if shows_dev(a.volume_path) || a.staging.is_some_and(shows_dev) {
            return Ok(());
        }
        Err(Error::NotFound(format!(
            "volume {} is not mounted at {}{}",
            rec.id,
            a.volume_path.display(),
            a.staging
                .map(|s| format!(" or at {}", s.display()))
                .unwrap_or_default()
        )))
    }

    /// INVALID_ARGUMENT, before anything grows, when the request says the
    /// volume is used raw (a block `volume_capability`) but it holds a
    /// filesystem: its file would grow and its filesystem would not, the
    /// next stage would not grow it either, and the answer would say it
    /// was expanded.
    fn refuse_raw_of_filesystem(
        rec: &VolumeRecord,
        info: &BlockInfo,
        a: &NodeExpandArgs<'_>,
    ) -> Result<()> {
        if Self::used_raw(a) && (info.formatted || info.access == Some(BlockAccess::Filesystem)) {
            return Err(Error::Invalid(format!(
                "volume {} is used as a filesystem ({}); a block volume_capability does not describe it",
                rec.id,
                if info.fs_type.is_empty() {
                    "not formatted yet"
                } else {
                    info.fs_type.as_str()
                }
            )));
        }
        Ok(())
    }

    fn used_raw(a: &NodeExpandArgs<'_>) -> bool {
        a.capability
            .is_some_and(|c| matches!(c.access_type, crate::state::AccessType::Block))
    }

    fn not_mounted(rec: &VolumeRecord, info: &BlockInfo) -> Error {
        Error::WrongState(format!(
            "the {} filesystem of volume {} is not mounted read-write; it is grown online once the volume is staged",
            info.fs_type, rec.id
        ))
    }

    /// The filesystem of a formatted volume and the read-write mount of
    /// its device to grow it through (the staging path or `volume_path`
    /// when the device is mounted there). None when there is none to grow:
    /// raw, not formatted yet (mkfs will use the whole device), or used
    /// raw right now. Deferred when the device is mounted read-only only.
    /// FAILED_PRECONDITION when a filesystem is not mounted at all.
    fn fs_to_grow(
        &self,
        rec: &VolumeRecord,
        info: &BlockInfo,
        dev: &Dev,
        a: &NodeExpandArgs<'_>,
    ) -> Result<FsGrowth> {
        if !info.formatted {
            return Ok(FsGrowth::None);
        }
        let fs = Filesystem::parse(&info.fs_type).ok_or_else(|| {
            Error::Internal(format!(
                "volume {} records an unknown filesystem {:?}",
                rec.id, info.fs_type
            ))
        })?;
        let t = mounts::table(&self.os)?;
        let of_dev = |m: &crate::os::MountEntry| (m.major, m.minor) == (dev.major, dev.minor);
        let mounted: Vec<PathBuf> = t
            .iter()
            .filter(|m| of_dev(m) && m.root == Path::new("/") && !m.readonly())
            .map(|m| m.mount_point.clone())
            .collect();
        if mounted.is_empty() {
            if Self::used_raw(a) {
                // Used raw right now: the device is grown, nothing else to do.
                return Ok(FsGrowth::None);
            }
            // Mounted, read-only only: grown at the next read-write stage.
            if t.iter().any(of_dev) {
                return Ok(FsGrowth::Deferred);
            }
            return Err(Self::not_mounted(rec, info));
        }
        let mount_point = [a.staging, Some(a.volume_path)]
            .into_iter()
            .flatten()
            .find(|p| mounted.iter().any(|m| m == p))
            .map(Path::to_path_buf)
            .unwrap_or_else(|| mounted[0].clone());
        Ok(FsGrowth::Online(fs, mount_point))
    }

    /// Grows the filesystem of a formatted volume to its device, online,
    /// through the mount `fs_to_grow` chose.
    fn grow_fs(
        &self,
        rec: &VolumeRecord,
        dev: &Dev,
        (fs, mount_point): (Filesystem, PathBuf),
    ) -> Result<()> {
        mkfs::grow(self.os.cmd.as_ref(), fs, &dev.path, &mount_point).map_err(|e| {
            let hint = match &e {
                // EXT4_IOC_RESIZE_FS needs CAP_SYS_RESOURCE.
                crate::os::OsError::Failed { stderr, .. }
                    if stderr.contains("Permission denied") =>
                {
                    " (online ext4 resize needs CAP_SYS_RESOURCE: run the node plugin privileged)"
                }
                _ => "",
            };
            Error::os(
                format!("growing the {fs} filesystem of volume {}{hint}", rec.id),
                e,
            )
        })
    }
}
