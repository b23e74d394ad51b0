//! Node side of block volumes.
//!
//! Filesystem volumes: NodeStage attaches, formats when (and only when)
//! `format::decide` allows it, and mounts the filesystem at the staging
//! path; NodePublish bind-mounts the staging path into the target.
//!
//! Raw block volumes: NodeStage attaches and bind-mounts the device node
//! onto a file `<staging>/<volume id>`, so that "staged here" is visible in
//! mountinfo like any other stage; NodePublish bind-mounts that file onto a
//! file it creates at the target. A read-only publish is a read-only bind
//! mount (what Kubernetes drivers do); a read-only access mode attaches the
//! loop device read-only, or sets the kernel's read-only flag of a disk
//! (`BlockKind::set_disk_read_only`), which the kernel enforces for every
//! user.
use std::path::{Path, PathBuf};

use super::{format, params, shown, staged_otherwise, BlockKind, Dev};
use crate::error::{Error, Result};
use crate::kinds::{PublishArgs, VolumeStats};
use crate::node::mounts;
use crate::os::blkid;
use crate::os::files::{Files, Open};
use crate::os::mkfs::{self, Filesystem};
use crate::os::mountinfo::{self, MountEntry};
use crate::os::MountFlags;
use crate::state::{AccessType, BlockAccess, BlockInfo, Capability, VolumeRecord};

/// Creates an empty regular file at `path` if nothing is there; true when it
/// created one.
fn ensure_file(files: &dyn Files, path: &Path) -> Result<bool> {
    match files.open(path, Open::CreateNew) {
        Ok(_) => Ok(true),
        Err(e) if e.errno() == Some(libc::EEXIST) => {
            match files.lstat(path).map_err(crate::os::OsError::into_io) {
                Ok(m) if m.file_type().is_file() => Ok(false),
                Ok(_) => Err(Error::WrongState(format!(
                    "{} exists and is not a regular file",
                    path.display()
                ))),
                // A broken bind mount answers stat with an error; mountinfo
                // decides what is mounted there.
                Err(_) => Ok(false),
            }
        }
        Err(e) => Err(Error::os(format!("creating {}", path.display()), e)),
    }
}

/// Whether `target`, a block volume's publish target with nothing mounted
/// on it, is the empty file a raw publish made (`bind_on_file`) and whose
/// bind is gone: a node reboot took it down (or a berth killed between
/// the file and its bind). NodeUnpublishVolume removes it, as the spec
/// asks of what NodePublishVolume made: left, it stayed in kubelet's
/// publish directory for good (kubelet's clean-up, a plain `os.Remove` of
/// that directory, fails on it). A file with any byte in it is not one
/// Berth made, and is left.
pub(super) fn raw_target_left(files: &dyn Files, target: &Path) -> bool {
    files
        .lstat(target)
        .is_ok_and(|m| m.file_type().is_file() && m.len() == 0)
}

/// Filesystem mount options Berth adds itself: `nouuid` for an xfs that
/// is a copy of another volume's (same UUID, maybe mounted too).
fn mount_data(info: &BlockInfo, fs: Filesystem) -> &'static str {
    if fs == Filesystem::Xfs && info.shared_uuid {
        "nouuid"
    } else {
        ""
    }
}

fn access_name(a: BlockAccess) -> &'static str {
    match a {
        BlockAccess::Raw => "as a raw block device",
        BlockAccess::Filesystem => "with a filesystem",
    }
}

/// Whether a failed stage was refused (the volume or path is not in a state
/// to be staged: ALREADY_EXISTS, FAILED_PRECONDITION), rather than failed
/// while working (mkfs, mount): a refused stage takes back the loop
/// attachment it made (`BlockKind::undo_attach`); a failed one keeps it for
/// the retry.
fn refused(e: &Error) -> bool {
    matches!(e, Error::Conflict(_) | Error::WrongState(_))
}

/// How the volume was first staged: recorded, or implied by a filesystem
/// Berth made on it.
fn known_access(info: &BlockInfo) -> Option<BlockAccess> {
    info.access
        .or(info.formatted.then_some(BlockAccess::Filesystem))
}

/// The filesystem Berth made on the volume (`formatted`), or began making
/// (`formatting`: an mkfs a crash interrupted, which the next stage adopts
/// or finishes as that filesystem): its content, when that is a filesystem.
fn made_fs(info: &BlockInfo) -> Option<&str> {
    if info.formatted {
        Some(info.fs_type.as_str())
    } else {
        Some(info.formatting.as_str())
    }
    .filter(|fs| !fs.is_empty())
}

/// Whether a volume whose content is as `info` says can be used with `cap`
/// (a capability `check_capability` accepts); when not, the reason, a
/// phrase after "the volume" or "source snapshot <id>". As NodeStageVolume
/// decides: content used raw stays raw, a filesystem stays a filesystem of
/// its own type (a mount capability without fs_type means that one:
/// `BlockKind::default_fs`); content never staged takes either. A restore
/// or clone inherits its source's content, so CreateVolume asks this of the
/// source before it makes anything.
pub(super) fn content_fits(info: &BlockInfo, cap: &Capability) -> std::result::Result<(), String> {
    let made = made_fs(info);
    match (&cap.access_type, known_access(info)) {
        (AccessType::Block, Some(BlockAccess::Filesystem)) => Err(format!(
            "{}, and a filesystem is never handed out as a raw block device (it needs a mount capability, volumeMode: Filesystem)",
            made.map_or("was first staged with a filesystem".to_string(), |fs| format!(
                "holds an {fs} filesystem"
            ))
        )),
        (AccessType::Mount { .. }, Some(BlockAccess::Raw)) => Err(
            "was used as a raw block device, and a filesystem is never made over what was written to it (it needs a block capability, volumeMode: Block)"
                .into(),
        ),
        (AccessType::Mount { fs_type, .. }, _) => match made {
            Some(fs) if !fs_type.is_empty() && fs_type != fs => Err(format!(
                "holds an {fs} filesystem, which cannot be mounted as {} (it needs fs_type {fs} or none)",
                fs_type.chars().take(32).collect::<String>()
            )),
            _ => Ok(()),
        },
        (AccessType::Block, _) => Ok(()),
    }
}

impl BlockKind {
    /// The file a raw block volume is staged on.
    fn marker(rec: &VolumeRecord, staging: &Path) -> PathBuf {
        staging.join(&rec.id)
    }

    /// The filesystem a mount capability without fs_type gets: the one
    /// Berth made on the volume or began making (`made_fs`; a filesystem is
    /// only ever mounted as what it is, and a restore or clone has its
    /// source's, whatever the source's `fsType` was); else the record's
    /// default (StorageClass `fsType`; records of old versions without one
    /// mean the default, ext4). Any other name is a damaged record: an
    /// error, never a guess.
    pub(super) fn default_fs(rec: &VolumeRecord) -> Result<Filesystem> {
        let info = Self::info(rec)?;
        let name = made_fs(&info).unwrap_or(&info.default_fs);
        if name.is_empty() {
            return Ok(Filesystem::Ext4);
        }
        Filesystem::parse(name).ok_or_else(|| {
            Error::WrongState(format!(
                "the record of volume {} names an unknown filesystem {:?}; refusing to guess",
                rec.id,
                name.chars().take(32).collect::<String>()
            ))
        })
    }

    /// Records how the volume is used at its first stage, before anything
    /// is written to it, and refuses the other way later: a volume written
    /// raw is never formatted, a filesystem never handed out raw. Volumes
    /// of older versions that Berth formatted are filesystems.
    fn claim_access(&self, rec: &VolumeRecord, want: BlockAccess) -> Result<BlockInfo> {
        let mut info = Self::info(rec)?;
        match known_access(&info) {
            Some(a) if a != want => Err(Error::WrongState(format!(
                "volume {} was first staged {}; refusing to stage it {} ({})",
                rec.id,
                access_name(a),
                access_name(want),
                match a {
                    BlockAccess::Raw =>
                        "a filesystem would be made over what was written to the device",
                    BlockAccess::Filesystem => "its filesystem would be exposed as a raw device",
                }
            ))),
            Some(_) if info.access.is_some() => Ok(info),
            _ => {
                info.access = Some(want);
                self.save_info(rec, &info)?;
                Ok(info)
            }
        }
    }

    /// Whether a file volume's backing file holds data (None: cannot tell).
    fn file_has_data(&self, rec: &VolumeRecord) -> Option<bool> {
        self.os.files.holds_data(&self.file(&rec.id).ok()?)
    }

    /// Whether a disk volume's disk holds data: its sample (first and
    /// last MiB, spaced 4 KiB blocks) does not read as zeros. The pool
    /// offered it only while it did, but its tenant may have written it
    /// since (raw) with a record that does not know (restored from a
    /// backup taken before).
    fn disk_has_data(&self, device: &Path, size_bytes: u64) -> Result<bool, String> {
        self.os
            .devices
            .reads_zero(device, size_bytes)
            .map(|zeros| !zeros)
            .map_err(|e| crate::error::chain(&e))
    }

    pub(super) fn stage_volume(
        &self,
        rec: &VolumeRecord,
        staging: &Path,
        cap: &Capability,
    ) -> Result<()> {
        let first = known_access(&Self::info(rec)?).is_none();
        let fs = params::capability_fs(cap, Self::default_fs(rec)?)?;
        // Berth's own claim of a disk (`keep_claim`) would make mkfs,
        // fsck and the mount fail (EBUSY), and a raw user's own exclusive
        // open: released while the disk is staged, taken again when
        // nothing of the stage is left (a stage that failed before it
        // mounted or bound anything).
        let disk = Self::info(rec)?.disk;
        if disk.is_some() {
            self.release_claim(&rec.id);
        }
        let r = match fs {
            None => self.stage_raw(rec, staging, cap),
            Some(fs) => self.stage_fs(rec, staging, cap, fs),
        };
        if r.is_err() && first {
            self.unclaim_access(rec);
        }
        if let Some(d) = &disk {
            self.keep_claim(&rec.id, d);
        }
        r
    }

    /// Takes back the access a first stage that failed recorded
    /// (`claim_access`) while Berth wrote nothing to the volume (not
    /// formatted, no mkfs begun; a raw stage writes nothing): a stage
    /// refused because the volume holds data or is mounted elsewhere does
    /// not decide how the volume is used. (Kept, a filesystem stage
    /// refused over a raw volume's data made every raw stage after it
    /// FAILED_PRECONDITION.)
    fn unclaim_access(&self, rec: &VolumeRecord) {
        let Some(now) = self.store.get(&rec.id) else {
            return;
        };
        let Ok(mut info) = Self::info(&now) else {
            return;
        };
        if info.access.is_none() || info.formatted || !info.formatting.is_empty() {
            return;
        }
        info.access = None;
        if let Err(e) = self.save_info(&now, &info) {
            tracing::warn!(volume_id = %rec.id, error = %e.render(), "could not take back the access type a failed first stage recorded");
        }
    }

    fn stage_raw(&self, rec: &VolumeRecord, staging: &Path, cap: &Capability) -> Result<()> {
        let info = self.claim_access(rec, BlockAccess::Raw)?;
        let read_only = cap.access_mode.read_only();
        let (dev, fresh) = match self.ensure_device(rec, read_only) {
            Ok(d) => d,
            Err(e @ Error::WrongState(_)) => {
                return Err(self
                    .staged_here_otherwise(rec, staging, read_only)?
                    .unwrap_or(e))
            }
            Err(e) => return Err(e),
        };
        let disk_ro = info.disk.is_some().then_some(read_only);
        let r = self.stage_raw_on(rec, staging, &dev, disk_ro);
        if let (Err(e), Some(l)) = (&r, &fresh) {
            if refused(e) {
                self.undo_attach(&rec.id, l);
            }
        }
        r
    }

    /// ALREADY_EXISTS when the raw volume is staged at `staging` (its
    /// loop device bound at the marker) with the other read-only setting
    /// than `read_only`: the spec's "staged there but incompatible with the
    /// capability", not a second staging path (FAILED_PRECONDITION, what
    /// `ensure_device` refused with). None when that is not so.
    fn staged_here_otherwise(
        &self,
        rec: &VolumeRecord,
        staging: &Path,
        read_only: bool,
    ) -> Result<Option<Error>> {
        if Self::info(rec)?.disk.is_some() {
            return Ok(None);
        }
        let [l] = &super::attach::attachments(&self.os, &self.file(&rec.id)?)?[..] else {
            return Ok(None);
        };
        if l.read_only == read_only {
            return Ok(None);
        }
        let marker = Self::marker(rec, staging);
        let t = mounts::table(&self.os)?;
        let here = mounts::at(&self.os, &t, &marker)
            .last()
            .map(|m| mounts::object(m));
        if here.is_none() || here != mountinfo::object_of(&t, &l.device) {
            return Ok(None);
        }
        Ok(Some(staged_otherwise(
            &rec.id,
            staging,
            &l.device,
            l.read_only,
            read_only,
        )))
    }

    /// Binds the device `dev` at the marker under `staging`. `disk_ro`:
    /// for a disk volume, whether the stage is read-only, which the
    /// kernel's read-only flag of the disk enforces (`set_disk_read_only`)
    /// and tells for a stage already there.
    fn stage_raw_on(
        &self,
        rec: &VolumeRecord,
        staging: &Path,
        dev: &Dev,
        disk_ro: Option<bool>,
    ) -> Result<()> {
        let marker = Self::marker(rec, staging);
        let t = mounts::table(&self.os)?;
        let node = mountinfo::object_of(&t, &dev.path)
            .ok_or_else(|| Error::Internal(format!("no mount holds {}", dev.path.display())))?;
        if let Some(top) = mounts::at(&self.os, &t, &marker).last() {
            if mounts::object(top) == node {
                if let Some(want) = disk_ro {
                    let is = self.disk_read_only(&dev.path)?;
                    // A read-only stage made before Berth set the flag
                    // (its publishes are read-only binds): enforced now.
                    // Not one Berth recorded read-write, which looks the
                    // same while nothing is published.
                    let made_before = want
                        && self.staged.read_only(&rec.id, staging) != Some(false)
                        && t.iter()
                            .filter(|m| m.mount_point != marker && mounts::object(m) == node)
                            .all(|m| m.readonly());
                    if is != want && made_before {
                        return self.set_disk_read_only(&rec.id, &dev.path, true);
                    }
                    if is != want {
                        return Err(staged_otherwise(&rec.id, staging, &dev.path, is, want));
                    }
                }
                return Ok(());
            }
            return Err(Error::Conflict(format!(
                "{} already holds another device",
                marker.display()
            )));
        }
        if !mounts::at(&self.os, &t, staging).is_empty() {
            return Err(Error::Conflict(format!(
                "staging path {} already has a mount (staged as a filesystem?)",
                staging.display()
            )));
        }
        let users = Self::users(&t, dev);
        mounts::refuse_staged_elsewhere(staging, &users, || self.staged.is(&rec.id, staging))?;
        if let Some(ro) = disk_ro {
            // Staged here before and still published (its staging bind
            // taken off by hand): the publishes keep the setting they
            // were made with, as a file's loop device does.
            if !users.is_empty() && self.disk_read_only(&dev.path)? != ro {
                return Err(Error::WrongState(format!(
                    "disk {} of volume {} is {} and still mounted at {}; unpublish and unstage it first",
                    dev.path.display(),
                    rec.id,
                    if ro { "read-write" } else { "read-only" },
                    shown(&users)
                )));
            }
        }
        self.staged.remember_as(&rec.id, staging, disk_ro);
        if let Some(ro) = disk_ro {
            self.set_disk_read_only(&rec.id, &dev.path, ro)?;
        }
        mounts::mount_on_dir(&self.os, staging, || {
            self.bind_on_file(&dev.path, &marker, MountFlags::default(), "staging")
        })
    }

    fn stage_fs(
        &self,
        rec: &VolumeRecord,
        staging: &Path,
        cap: &Capability,
        fs: Filesystem,
    ) -> Result<()> {
        let mut flags = mounts::bind_flags(cap)?;
        flags.readonly |= cap.access_mode.read_only();
        let info = self.claim_access(rec, BlockAccess::Filesystem)?;
        let (dev, fresh) = self.ensure_device(rec, false)?;
        let r = self.stage_fs_on(rec, staging, fs, flags, info, &dev);
        if let (Err(e), Some(l)) = (&r, &fresh) {
            if refused(e) {
                self.undo_attach(&rec.id, l);
            }
        }
        r
    }

    /// Mounts the filesystem `fs` of `dev` at `staging` with `flags` and
    /// the filesystem's `data` (`mount_data`).
    fn mount_staging(
        &self,
        dev: &Dev,
        staging: &Path,
        fs: Filesystem,
        flags: MountFlags,
        data: &str,
    ) -> Result<()> {
        mounts::mount_on_dir(&self.os, staging, || {
            self.os
                .mounter
                .mount_fs(&dev.path, staging, fs.as_str(), flags, data)
                .map_err(|e| {
                    let what = format!(
                        "mounting {} ({fs}) at {}",
                        dev.path.display(),
                        staging.display()
                    );
                    if e.errno() == Some(libc::EBUSY) {
                        // Held open exclusively: an mkfs (or fsck) still
                        // running, such as one a killed berth left.
                        // Transient: nothing is decided on it.
                        Error::Busy(format!(
                            "{what}: the device is held by another process (an mkfs a killed berth started may still be running); retry"
                        ))
                    } else {
                        Error::os(what, e)
                    }
                })
        })
    }

    /// A filesystem mounted read-only is not grown (the kernel refuses:
    /// xfs_growfs and online resize2fs fail "Read-only file system"): a
    /// restore into a larger volume staged read-only keeps its growth for
    /// its first read-write stage.
    fn growth_deferred(rec: &VolumeRecord, info: &BlockInfo) {
        if info.grow_fs {
            tracing::info!(volume_id = %rec.id, "staged read-only: the restored filesystem is grown to its volume at its first read-write stage");
        }
    }

    fn stage_fs_on(
        &self,
        rec: &VolumeRecord,
        staging: &Path,
        fs: Filesystem,
        flags: MountFlags,
        mut info: BlockInfo,
        dev: &Dev,
    ) -> Result<()> {
        let t = mounts::table(&self.os)?;
        if let Some(top) = mounts::at(&self.os, &t, staging).last() {
            if (top.major, top.minor) == (dev.major, dev.minor) && top.root == Path::new("/") {
                if top.fs_type != fs.as_str() || !mounts::has_flags(top, flags, None) {
                    return Err(Error::Conflict(format!(
                        "volume {} is staged at {} as {} ({}), not as asked ({fs}, {})",
                        rec.id,
                        staging.display(),
                        top.fs_type,
                        top.options,
                        if flags.readonly {
                            "read-only"
                        } else {
                            "read-write"
                        }
                    )));
                }
                // Staged already; a restore whose growth failed after the
                // mount (or was killed) is grown now (a retry must not
                // answer OK with the filesystem still at the source's
                // size). Where the kernel refuses online ext4 growth, the
                // offline fallback as at the first stage, while nothing
                // but the staging path mounts the device.
                if flags.readonly {
                    Self::growth_deferred(rec, &info);
                    return Ok(());
                }
                if info.grow_fs
                    && fs == Filesystem::Ext4
                    && Self::users(&t, dev).iter().all(|p| p == staging)
                {
                    let data = mount_data(&info, fs);
                    let mount = || self.mount_staging(dev, staging, fs, flags, data);
                    return self.grow_restored_ext4(rec, &info, dev, staging, &mount);
                }
                return self.grow_restored(rec, &info, dev, staging, fs);
            }
            return Err(Error::Conflict(format!(
                "staging path {} already has another mount",
                staging.display()
            )));
        }
        let users = Self::users(&t, dev);
        mounts::refuse_staged_elsewhere(staging, &users, || self.staged.is(&rec.id, staging))?;
        if info.disk.is_some() {
            // Berth sets the flag only for raw stages; one left set (by
            // anyone else: a raw volume's disk is never staged with a
            // filesystem) would fail mkfs and a read-write mount.
            self.set_disk_read_only(&rec.id, &dev.path, false)?;
        }
        self.staged.remember(&rec.id, staging);
        // Nothing is probed, decided or formatted while another process
        // holds the device: an mkfs a killed berth started may still be
        // writing. (A volume already formatted is only mounted, and a busy
        // mount says the same.)
        let held =
            !info.formatted
                && self.os.devices.held(&dev.path).map_err(|e| {
                    Error::os(format!("opening {} exclusively", dev.path.display()), e)
                })?;
        if held {
            return Err(Error::Busy(format!(
                "volume {}: {} is held by another process (a filesystem mounted in another mount namespace, or an mkfs a killed berth started that is still running); nothing is decided while it is: retry",
                rec.id,
                dev.path.display()
            )));
        }
        let facts_in_use = !users.is_empty();
        let facts = format::Facts {
            in_use: facts_in_use,
            data: match &info.disk {
                Some(d) => format::Data::Disk(if info.formatted {
                    // Not consulted: a volume Berth formatted is mounted.
                    Ok(false)
                } else {
                    self.disk_has_data(&dev.path, d.size_bytes)
                }),
                None => format::Data::File(self.file_has_data(rec)),
            },
        };
        let head = || self.os.devices.read_head(&dev.path);
        let decision = format::decide(
            &info,
            fs,
            facts,
            || {
                head().map_err(|e| e.to_string())?;
                blkid::probe(self.os.cmd.as_ref(), &dev.path).map_err(|e| e.to_string())
            },
            || head().is_ok_and(|sb| format::xfs_in_progress(&sb)),
        );
        let data = mount_data(&info, fs);
        let mount = || self.mount_staging(dev, staging, fs, flags, data);
        let formatted = |mut info: BlockInfo| {
            info.formatted = true;
            info.fs_type = fs.as_str().into();
            info.formatting.clear();
            info.formatting_uuid.clear();
            self.save_info(rec, &info)
        };
        match decision {
            format::Decision::Mount => {
                // An offline resize of it that did not finish (killed at
                // its deadline, or with berth): what it changed is put
                // back before the mount, which would leave it half grown
                // (and make the undo file no longer apply). Only while
                // nothing else mounts the device.
                if info.grow_fs && fs == Filesystem::Ext4 && !facts_in_use {
                    self.undo_interrupted_growth(rec, dev)?;
                }
                mount()?;
                if flags.readonly {
                    Self::growth_deferred(rec, &info);
                    return Ok(());
                }
                if info.grow_fs && fs == Filesystem::Ext4 && !facts_in_use {
                    return self.grow_restored_ext4(rec, &info, dev, staging, &mount);
                }
                self.grow_restored(rec, &info, dev, staging, fs)
            }
            format::Decision::Refuse(why) => Err(Error::WrongState(format!(
                "volume {} on {}: {why}",
                rec.id,
                dev.path.display()
            ))),
            format::Decision::Adopt => {
                // Berth's own mkfs finished before a crash: the filesystem
                // is taken as it is (it may hold data), never made again.
                tracing::warn!(volume_id = %rec.id, device = %dev.path.display(), fs = %fs, uuid = %info.formatting_uuid, "found the filesystem of an interrupted format; mounting it as it is");
                mount().map_err(|e| match e {
                    Error::Busy(_) => e,
                    e => Error::WrongState(format!(
                        "volume {}: the {fs} filesystem that Berth's interrupted mkfs made on {} (UUID {}) does not mount ({}); refusing to format over it: delete the volume",
                        rec.id,
                        dev.path.display(),
                        info.formatting_uuid,
                        e.render()
                    ))
                })?;
                formatted(info)
            }
            format::Decision::Format { force } => {
                // The intent, with the UUID mkfs will write, is durable
                // before mkfs touches the device, so a crash mid-mkfs is
                // recognised as Berth's own work, and only that.
                if !force || info.formatting_uuid.is_empty() {
                    info.formatting_uuid = uuid::Uuid::new_v4().to_string();
                }
                info.formatting = fs.as_str().into();
                self.save_info(rec, &info)?;
                let options = if info.default_fs == fs.as_str() {
                    info.mkfs_options.clone()
                } else {
                    Vec::new()
                };
                tracing::info!(volume_id = %rec.id, device = %dev.path.display(), fs = %fs, uuid = %info.formatting_uuid, force, "formatting new volume");
                mkfs::mkfs(
                    self.os.cmd.as_ref(),
                    fs,
                    &dev.path,
                    &options,
                    force,
                    &info.formatting_uuid,
                )
                .map_err(|e| Error::os(format!("formatting {} as {fs}", dev.path.display()), e))?;
                formatted(info)?;
                mount()
            }
        }
    }

    /// NodeUnstageVolume with the record. A device that has gone (a pool
    /// disk pulled, or another one in its place; a file not attached) is
    /// no reason to fail forever: the staging path is then all there is to
    /// go by (`unstage_at` without a device).
    pub(super) fn unstage_volume(&self, rec: &VolumeRecord, staging: &Path) -> Result<()> {
        let dev = match self.current_device(rec) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(volume_id = %rec.id, error = %e.render(), "the volume's device is not what the record says; unstaging by path");
                None
            }
        };
        self.unstage_at(&rec.id, staging, dev.as_ref())?;
        // The unstage is done: a flag that cannot be cleared now (a
        // write-protected disk, one that stopped answering) fails no
        // unstage, whose every retry would fail the same way. Every
        // read-write use clears it first (`set_disk_read_only`).
        if let Some(dev) = dev.filter(|_| Self::info(rec).is_ok_and(|i| i.disk.is_some())) {
            if let Err(e) = self.release_disk_read_only(&rec.id, &dev) {
                tracing::warn!(volume_id = %rec.id, disk = %dev.path.display(), error = %e.render(), "unstaged; the disk's read-only flag stays set (cleared before its next read-write use)");
            }
        }
        // Unstaged, the disk is claimed again (`keep_claim`).
        if let Some(d) = Self::info(rec).ok().and_then(|i| i.disk) {
            self.keep_claim(&rec.id, &d);
        }
        Ok(())
    }

    /// Unstages volume `id` (an id of this kind) at `staging`: the raw
    /// volume's bind at `<staging>/<id>` and its file, then the mount at
    /// the staging path (when `dev` is known, only if it is that device's),
    /// refusing while the volume is published elsewhere; then detaches the
    /// backing file's loop devices, if any.
    pub(super) fn unstage_at(&self, id: &str, staging: &Path, dev: Option<&Dev>) -> Result<()> {
        // Only an id of this kind (a safe path component) gets here.
        self.file(id)?;
        let t = mounts::table(&self.os)?;
        let marker = staging.join(id);
        let marker_mounted = !mounts::at(&self.os, &t, &marker).is_empty();
        if marker_mounted {
            mounts::unstage_in(&self.os, &t, &marker, None)?;
        }
        if self.os.files.exists(&marker) {
            mounts::remove_target(&self.os, &marker, true)?;
        }
        if !marker_mounted && mounts::at(&self.os, &t, staging).is_empty() {
            if let Some(at) = dev.and_then(|d| self.staged_elsewhere(id, staging, &t, d)) {
                tracing::info!(volume_id = %id, staging = %staging.display(), staged_at = %at.display(), "the volume is not staged at this path but at another, which keeps its device: nothing to unstage here");
                return Ok(());
            }
        }
        if let Some(top) = mounts::at(&self.os, &t, staging).last() {
            let ours = dev.is_none_or(|d| (top.major, top.minor) == (d.major, d.minor));
            if !ours {
                return Err(Error::WrongState(format!(
                    "staging path {} holds a mount that is not volume {id}",
                    staging.display(),
                )));
            }
            if marker_mounted {
                // Both were mounted (not a state Berth makes): the table no
                // longer shows where the volume is mounted; read it again.
                mounts::unstage(&self.os, staging, None)?;
            } else {
                mounts::unstage_in(&self.os, &t, staging, None)?;
            }
        }
        // The mounts just changed: whether the loop device is still used
        // elsewhere needs a fresh read (made only if it is attached). A disk
        // volume has no file, so nothing is attached.
        self.release_file(id, &mounts::LazyTable::new())?;
        if dev.is_none() {
            // No device known: the record may be gone and the backing file
            // moved aside at start-up while attached.
            self.release_orphaned(id)?;
        }
        Ok(())
    }

    /// The path other than `staging` where volume `id` is staged: the one
    /// Berth recorded (`node::staged`), while the table `t` shows the
    /// device `dev` there (its filesystem, or a raw volume's bind at
    /// `<path>/<id>`). NodeUnstageVolume at a path where the volume is
    /// not staged is OK, as the spec asks; the volume's device stays
    /// attached for its own staging path. (It failed with
    /// FAILED_PRECONDITION "still mounted at <path>" on every retry.)
    fn staged_elsewhere(
        &self,
        id: &str,
        staging: &Path,
        t: &[MountEntry],
        dev: &Dev,
    ) -> Option<PathBuf> {
        let at = self.staged.path(id).filter(|p| p != staging)?;
        let shows = |p: &Path| {
            mounts::at(&self.os, t, p)
                .last()
                .is_some_and(|m| Self::shows(t, m, dev))
        };
        (shows(&at) || shows(&at.join(id))).then_some(at)
    }

    pub(super) fn publish_volume(&self, rec: &VolumeRecord, a: &PublishArgs<'_>) -> Result<()> {
        let fs = params::capability_fs(a.capability, Self::default_fs(rec)?)?;
        let not_staged = || {
            Error::WrongState(format!(
                "volume {} is not staged at {} (call NodeStageVolume first)",
                rec.id,
                a.staging.display()
            ))
        };
        let want = if fs.is_some() {
            BlockAccess::Filesystem
        } else {
            BlockAccess::Raw
        };
        if let Some(a) = rec
            .block
            .as_deref()
            .and_then(known_access)
            .filter(|a| *a != want)
        {
            return Err(Error::WrongState(format!(
                "volume {} is staged {}; it cannot be published {} (publish it with the capability it was staged with)",
                rec.id,
                access_name(a),
                access_name(want)
            )));
        }
        let dev = self.current_device(rec)?.ok_or_else(not_staged)?;
        if fs.is_some() {
            let obj = (dev.major, dev.minor, PathBuf::from("/"));
            return mounts::publish_bind(
                &self.os,
                |_| Some(obj),
                None,
                a.staging,
                a.target,
                a.capability,
                a.readonly,
            );
        }
        self.publish_raw(rec, &dev, a, not_staged)
    }

    fn publish_raw(
        &self,
        rec: &VolumeRecord,
        dev: &Dev,
        a: &PublishArgs<'_>,
        not_staged: impl Fn() -> Error,
    ) -> Result<()> {
        let marker = Self::marker(rec, a.staging);
        let t = mounts::table(&self.os)?;
        let node = mountinfo::object_of(&t, &dev.path).ok_or_else(&not_staged)?;
        let staged = mounts::at(&self.os, &t, &marker)
            .last()
            .copied()
            .filter(|m| mounts::object(m) == node)
            .ok_or_else(&not_staged)?;
        let readonly = a.readonly || a.capability.access_mode.read_only();
        if let Some(top) = mounts::at(&self.os, &t, a.target).last() {
            if mounts::object(top) == node && top.readonly() == readonly {
                return Ok(());
            }
            return Err(Error::Conflict(format!(
                "target {} is already mounted with a different volume or read-only setting",
                a.target.display()
            )));
        }
        if a.capability.access_mode.single_target() {
            mounts::refuse_second_target(&self.os, &t, &node, &marker, a.target)?;
        }
        let flags = MountFlags {
            readonly,
            ..Default::default()
        };
        // The marker's mount that was checked, opened once and bound
        // through its descriptor: never what the path shows by then.
        let p = mounts::pin_checked(&self.os, &marker, mounts::Checked::Mount(staged.id), false)?;
        self.bind_on_file(&p.path(), a.target, flags, "publishing")
    }

    /// Bind-mounts the device node `source` onto the file `file`, creating
    /// the file first if it is missing; when the mount fails, a file created
    /// here is removed again (the file counterpart of
    /// `mounts::mount_on_dir`). `what` names the step in the error.
    fn bind_on_file(
        &self,
        source: &Path,
        file: &Path,
        flags: MountFlags,
        what: &str,
    ) -> Result<()> {
        let created = ensure_file(self.os.files.as_ref(), file)?;
        self.os.mounter.bind(source, file, flags).map_err(|e| {
            if created {
                let _ = self.os.files.remove_file(file);
            }
            Error::os(format!("{what} at {}", file.display()), e)
        })
    }

    /// Whether the mount `top` shows device `dev`: its filesystem, or its
    /// device node bound there.
    fn shows(t: &[MountEntry], top: &MountEntry, dev: &Dev) -> bool {
        (top.major, top.minor) == (dev.major, dev.minor)
            || mountinfo::object_of(t, &dev.path).as_ref() == Some(&mounts::object(top))
    }

    /// For an id without a record: FAILED_PRECONDITION when the top mount
    /// at `path` shows the device of a block volume recorded under another
    /// id, which the id cannot name. Anything else cannot be told here and
    /// is left to the caller.
    pub(super) fn refuse_recorded_device(&self, id: &str, path: &Path) -> Result<()> {
        if self.os.probe.mount_root(path) == Some(false) {
            return Ok(());
        }
        let t = mounts::table(&self.os)?;
        let Some(top) = mounts::at(&self.os, &t, path).last().copied() else {
            return Ok(());
        };
        // The hold of this very volume's disk (`hold_disk`: its record
        // was rolled back while it was staged) is not another volume's.
        let others = self.store.filter(|r| {
            r.kind == crate::state::Kind::Block
                && r.id != id
                && super::held_volume(&r.id).as_deref() != Some(id)
        });
        for rec in others {
            if let Ok(Some(dev)) = self.current_device(&rec) {
                if Self::shows(&t, top, &dev) {
                    return Err(mounts::foreign(path, id, top));
                }
            }
        }
        Ok(())
    }

    /// FAILED_PRECONDITION when the top mount at `path` is known not to be
    /// volume `id`'s: its record names a device that is there, and the
    /// mount shows neither that device's filesystem nor its device node.
    /// Without a record, `refuse_recorded_device`; without a device nothing
    /// can be told: Ok.
    pub(super) fn refuse_foreign(&self, id: &str, path: &Path) -> Result<()> {
        if self.os.probe.mount_root(path) == Some(false) {
            return Ok(());
        }
        let Some(rec) = self.store.get(id) else {
            return self.refuse_recorded_device(id, path);
        };
        let Ok(Some(dev)) = self.current_device(&rec) else {
            return Ok(());
        };
        let t = mounts::table(&self.os)?;
        let Some(top) = mounts::at(&self.os, &t, path).last().copied() else {
            return Ok(());
        };
        if Self::shows(&t, top, &dev) || mounts::deleted(top) {
            return Ok(());
        }
        Err(mounts::foreign(path, id, top))
    }

    /// When `path` shows a loop device node (a raw volume's publish or
    /// stage: a bind of `/dev/loopN`) while the volume's file is attached
    /// to no loop device, its device was detached under it (`losetup -d`
    /// while only bind-mounted, which the kernel allows): what the
    /// condition says then. None in every other case. Asked only after
    /// `volume_stats` found nothing.
    pub(super) fn detached_under(&self, rec: &VolumeRecord, path: &Path) -> Result<Option<String>> {
        if self.current_device(rec)?.is_some() {
            return Ok(None);
        }
        let t = mounts::table(&self.os)?;
        let Some(top) = mounts::at(&self.os, &t, path).last().copied() else {
            return Ok(None);
        };
        let Some(name) = top.root.file_name().and_then(|n| n.to_str()) else {
            return Ok(None);
        };
        let is_loop = name
            .strip_prefix("loop")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        let node = Path::new("/dev").join(name);
        if !is_loop || mountinfo::object_of(&t, &node).as_ref() != Some(&mounts::object(top)) {
            return Ok(None);
        }
        Ok(Some(format!(
            "{} shows the loop device {} of volume {}, which is no longer attached to the volume's file (detached by hand?): I/O through it fails, or reaches whatever is attached there now; delete the pod so the volume is unpublished and staged again",
            path.display(),
            node.display(),
            rec.id
        )))
    }

    pub(super) fn volume_stats(&self, rec: &VolumeRecord, path: &Path) -> Result<VolumeStats> {
        let not_here = || {
            Error::NotFound(format!(
                "volume {} is not available at {}",
                rec.id,
                path.display()
            ))
        };
        let t = mounts::table(&self.os)?;
        let top = mounts::at(&self.os, &t, path)
            .last()
            .copied()
            .ok_or_else(not_here)?;
        let dev = self.current_device(rec)?.ok_or_else(not_here)?;
        if (top.major, top.minor) == (dev.major, dev.minor) {
            let usage = self
                .os
                .fs
                .statvfs(path)
                .map_err(|e| Error::os(format!("statvfs of {}", path.display()), e))?;
            return Ok(VolumeStats {
                usage,
                block_size_only: None,
            });
        }
        if mountinfo::object_of(&t, &dev.path).as_ref() == Some(&mounts::object(top)) {
            let size = self
                .os
                .devices
                .inspect(&dev.path)
                .map_err(|e| Error::os("reading the device size", e))?
                .size_bytes;
            return Ok(VolumeStats {
                usage: Default::default(),
                block_size_only: Some(i64::try_from(size).unwrap_or(i64::MAX)),
            });
        }
        Err(not_here())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::AccessMode;

    fn cap(fs: Option<&str>) -> Capability {
        Capability {
            access_type: match fs {
                None => AccessType::Block,
                Some(t) => AccessType::Mount {
                    fs_type: t.into(),
                    mount_flags: vec![],
                    volume_mount_group: String::new(),
                    extra: None,
                },
            },
            access_mode: AccessMode::SingleNodeWriter,
            extra: None,
        }
    }

    /// What each content takes: raw stays raw; a filesystem made, being
    /// made (an interrupted mkfs) or only claimed stays a filesystem, of
    /// its own type; a record of an old version that says formatted and no
    /// access is a filesystem; content never staged takes anything.
    #[test]
    fn content_fits_as_the_stage_decides() {
        let info = |access, formatted: &str, formatting: &str| BlockInfo {
            access,
            formatted: !formatted.is_empty(),
            fs_type: formatted.into(),
            formatting: formatting.into(),
            ..Default::default()
        };
        let fs = Some(BlockAccess::Filesystem);
        let all = [None, Some(""), Some("ext4"), Some("xfs")];
        for (content, takes) in [
            (info(None, "", ""), &all[..]),
            (info(Some(BlockAccess::Raw), "", ""), &[None][..]),
            (info(fs, "ext4", ""), &[Some(""), Some("ext4")][..]),
            (info(None, "ext4", ""), &[Some(""), Some("ext4")][..]),
            (info(fs, "", "xfs"), &[Some(""), Some("xfs")][..]),
            (info(fs, "", ""), &[Some(""), Some("ext4"), Some("xfs")][..]),
        ] {
            for c in all {
                assert_eq!(
                    content_fits(&content, &cap(c)).is_ok(),
                    takes.contains(&c),
                    "{content:?} {c:?}"
                );
            }
        }
        let why = content_fits(&info(fs, "", ""), &cap(None)).unwrap_err();
        assert!(
            why.starts_with("was first staged with a filesystem"),
            "{why}"
        );
        let why = content_fits(&info(fs, "ext4", ""), &cap(Some("xfs"))).unwrap_err();
        assert!(
            why.contains("ext4 filesystem, which cannot be mounted as xfs"),
            "{why}"
        );
    }
}
