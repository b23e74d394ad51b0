//! Snapshots, restores and clones of block volumes backed by files.
//!
//! A snapshot is a file `<block-root>/.snapshots/<snapshot id>.img`: a
//! clone of the volume's file where the filesystem shares extents (xfs with
//! reflink, btrfs: instant), else a copy of its data ranges (holes stay
//! holes). It is made under a temp name and renamed whole, synced. It is a
//! point in time:
//! - a volume staged with a filesystem is frozen (FIFREEZE) for the copy
//!   and thawed after, whatever happens: its filesystem is consistent on
//!   the device, and writes wait meanwhile;
//! - a raw volume in use cannot be frozen: it is cloned (one atomic step,
//!   crash-consistent); where the block root's filesystem cannot clone, it
//!   is copied and the copy kept only if no write began while it was made
//!   (`copy_unchanged`), else made again, and refused when writes overlap
//!   every attempt, never made of blocks from different moments;
//! - a volume nobody uses is copied as it is.
//!
//! A restore takes the snapshot's file only as it was made: a regular file
//! (never read through a symlink put in its place) of the length its record
//! keeps (`snapshot_copy_flaw`); anything else is damage, refused before
//! the new volume is recorded and reported by `berth state check`, never
//! repaired. A restore or clone copies the snapshot's (or the source
//! volume's) file to the new volume's file the same way and grows it to the
//! new size; the new volume inherits what Berth knows of its content
//! (formatted, which filesystem, raw or filesystem), and a filesystem
//! smaller than its volume is grown at the next stage.
//!
//! Whole-disk volumes (`pool: disk`) are copied into a snapshot file the
//! same way (the zero parts of the disk become holes); a raw disk in use
//! cannot be copied as a point in time and is refused. A restore onto a
//! whole disk erases the disk, then writes the file's data.
use std::path::{Path, PathBuf};

use super::{BlockKind, Dev};
use crate::error::{Error, Result};
use crate::kinds::local::copy_error;
use crate::kinds::{judge_copy, CopyFlaw, Source};
use crate::node::mounts;
use crate::os::files::{ensure_dir, Files};
use crate::os::MountEntry;
use crate::state::{Allocation, BlockInfo, SnapshotRecord, VolumeRecord};

/// Snapshot ids.
pub const SNAP_PREFIX: &str = "block-snap-";

/// Copies of a raw device in use made before giving up when each one
/// overlapped a write (`copy_unchanged`), and the pause after the first
/// (growing with each).
const RAW_COPY_ATTEMPTS: u32 = 5;
const RAW_COPY_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);
/// Where snapshots are kept (in the block root).
pub const SNAPSHOTS: &str = ".snapshots";
/// The prefix of the temporary name of a restore's file in the block root
/// (`restore_onto_file`).
pub(super) const RESTORING: &str = ".restoring-";

/// Mount points of `dev` that are filesystem mounts of its root (a staged
/// filesystem), as opposed to bind mounts of the device node (raw use).
fn filesystem_mounts<'a>(t: &'a [MountEntry], dev: &Dev) -> Vec<&'a MountEntry> {
    t.iter()
        .filter(|m| (m.major, m.minor) == (dev.major, dev.minor) && m.root == Path::new("/"))
        .collect()
}

/// The file of block snapshot `id` in the block root `root`.
fn snapshot_path(root: &Path, id: &str) -> PathBuf {
    root.join(SNAPSHOTS).join(format!("{id}.img"))
}

/// Where the copy of block snapshot `id` is made, until its record says
/// Ready.
pub fn snapshot_partial_path(root: &Path, id: &str) -> PathBuf {
    root.join(SNAPSHOTS).join(format!(".partial-{id}.img"))
}

/// Where a restore or clone onto a file copies, until its record says
/// Ready.
pub fn restoring_path(root: &Path, id: &str) -> PathBuf {
    root.join(format!("{RESTORING}{id}.img"))
}

/// The whole copy of a snapshot whose create never answered (`Creating`)
/// that its rollback keeps aside in `.orphaned/` instead of deleting: the
/// copy is made under a temporary name and renamed to the snapshot's only
/// once whole, so one there may be a snapshot that was acknowledged (a
/// record that lost its Ready). Start-up's rollback and `state check` ask
/// the same question here. A look that fails (anything but ENOENT) is an
/// error: the copy may be there, so nothing may be removed on it.
pub fn snapshot_kept_on_rollback(
    files: &dyn Files,
    root: &Path,
    s: &SnapshotRecord,
) -> std::result::Result<Option<PathBuf>, crate::os::OsError> {
    crate::kinds::kept_on_rollback(files, snapshot_path(root, &s.id), s)
}

/// What is wrong with the file of the block snapshot `s` in the block root
/// `root`, if anything: missing, not a regular file (a symlink there is
/// never followed), or not as long as it was made (`file_bytes`; a record
/// from before that was recorded: `size_bytes`, which its file was made
/// with). A restore refuses such a snapshot; `berth state check` reports
/// it.
pub fn snapshot_copy_flaw(files: &dyn Files, root: &Path, s: &SnapshotRecord) -> Option<CopyFlaw> {
    copy_flaw_as_found(root, s, &|p| {
        files.lstat(p).map_err(crate::os::OsError::into_io)
    })
}

/// `snapshot_copy_flaw`, looking at the file with `lstat`.
fn copy_flaw_as_found(
    root: &Path,
    s: &SnapshotRecord,
    lstat: &dyn Fn(&Path) -> std::io::Result<std::fs::Metadata>,
) -> Option<CopyFlaw> {
    let path = snapshot_path(root, &s.id);
    let have = match judge_copy(&path, lstat(&path), false) {
        Ok(m) => m.len(),
        Err(flaw) => return Some(flaw),
    };
    let want = s
        .file_bytes
        .unwrap_or_else(|| u64::try_from(s.size_bytes).unwrap_or(0));
    (have != want).then_some(CopyFlaw::WrongLength { path, have, want })
}

impl BlockKind {
    /// The file of a snapshot; only for ids this kind owns.
    fn snapshot_file(&self, id: &str) -> Result<PathBuf> {
        if !super::super::is_hex_id(SNAP_PREFIX, id) {
            return Err(Error::NotFound(format!(
                "snapshot {id} is not a block snapshot"
            )));
        }
        Ok(snapshot_path(&self.root, id))
    }

    /// What is wrong with the file of snapshot `s` (`snapshot_copy_flaw`),
    /// looked at through the OS layer (one lstat).
    pub(super) fn snapshot_file_flaw(&self, s: &SnapshotRecord) -> Option<CopyFlaw> {
        copy_flaw_as_found(&self.root, s, &|p| {
            self.os.files.lstat(p).map_err(crate::os::OsError::into_io)
        })
    }

    /// The file of snapshot `s` to restore from: FAILED_PRECONDITION when
    /// it is missing or damaged (`snapshot_file_flaw`).
    pub(super) fn usable_snapshot_file(&self, s: &SnapshotRecord) -> Result<PathBuf> {
        let file = self.snapshot_file(&s.id)?;
        crate::kinds::snapshots_area(self.os.files.as_ref(), &self.root.join(SNAPSHOTS))?;
        match self.snapshot_file_flaw(s) {
            Some(flaw) => Err(flaw.error(&s.id)),
            None => Ok(file),
        }
    }

    /// Makes every block of the file `f` its own (`Files::unshare`): a
    /// thick volume's, or the copy of one, made by a clone (xfs with
    /// reflink, btrfs) whose blocks another file shares. No room is
    /// RESOURCE_EXHAUSTED, as for a copy.
    fn unshare_file(&self, f: &Path) -> Result<()> {
        let fs = self.os.files.as_ref();
        let file = fs
            .open(f, crate::os::files::Open::Existing)
            .map_err(|e| Error::os(format!("opening {}", f.display()), e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io(format!("inspecting {}", f.display()), e))?
            .len();
        fs.unshare(&file, f, len)
            .map_err(|e| copy_error(format!("unsharing the blocks of {}", f.display()), e))
    }

    fn partial_file(&self, id: &str) -> PathBuf {
        snapshot_partial_path(&self.root, id)
    }

    /// What a volume made from `info` inherits of it. A format that a crash
    /// interrupted is inherited too (the copy holds what that mkfs wrote,
    /// and the UUID it gave): the copy's first stage then adopts or redoes
    /// it as the source's would, instead of refusing a filesystem Berth
    /// made as one it did not. Its filesystem's UUID is the source's once
    /// there is one.
    fn inherited(info: &BlockInfo) -> BlockInfo {
        BlockInfo {
            allocation: info.allocation,
            disk: None,
            // A disk's own, set with its claim.
            marker: false,
            default_fs: info.default_fs.clone(),
            mkfs_options: info.mkfs_options.clone(),
            formatted: info.formatted,
            fs_type: info.fs_type.clone(),
            formatting: info.formatting.clone(),
            formatting_uuid: info.formatting_uuid.clone(),
            access: info.access,
            grow_fs: info.grow_fs,
            shared_uuid: info.formatted || !info.formatting.is_empty(),
            // Set by the restore once its file is made.
            file_bytes: None,
            // What a newer berth recorded of the source is the source's:
            // the copy is this version's, made as it knows.
            extra: None,
        }
    }

    pub(super) fn snapshot_volume(
        &self,
        vol: &VolumeRecord,
        snap: &mut SnapshotRecord,
    ) -> Result<()> {
        self.copy_volume(vol, snap).map(|_| ())
    }

    /// Once a snapshot's record says Ready: its whole copy renamed to the
    /// snapshot's name (`VolumeKind::snapshot_ready`; start-up finishes a
    /// rename a crash interrupted).
    pub(super) fn place_snapshot(&self, id: &str) -> Result<()> {
        let partial = self.partial_file(id);
        crate::os::files::move_into_place(
            self.os.files.as_ref(),
            &partial,
            &self.snapshot_file(id)?,
        )
        .map_err(|e| Error::os(format!("moving {} into place", partial.display()), e))
    }

    /// Copies the volume as a snapshot does (see the module comment) and
    /// returns the copy's file, under its temporary name: a snapshot's is
    /// renamed to the snapshot's name once its record says Ready
    /// (`place_snapshot`); the unlisted snapshot a clone is made from is
    /// moved to the new volume. Start-up removes a temporary copy without
    /// a Ready record.
    fn copy_volume(&self, vol: &VolumeRecord, snap: &mut SnapshotRecord) -> Result<PathBuf> {
        let info = Self::info(vol)?;
        // What is copied: the volume's file, or its whole disk.
        let (src, disk_len) = match &info.disk {
            Some(d) => {
                let dev = self.resolve_disk(d)?;
                (dev.path, Some(dev.size_bytes))
            }
            None => {
                let f = self.require_file(&vol.id)?;
                self.require_whole(vol, &info, &f)?;
                (f, None)
            }
        };
        // (A block snapshot id: checked.)
        self.snapshot_file(&snap.id)?;
        let partial = self.partial_file(&snap.id);
        let f = self.os.files.as_ref();
        let area = self.root.join(SNAPSHOTS);
        ensure_dir(f, &area, 0o700)
            .map_err(|e| Error::os(format!("creating {}", area.display()), e))?;
        // What an earlier try left (its lstat: a symlink there is one, and
        // goes, never what it leads to). A look that fails otherwise than
        // ENOENT is a doubt, which stops the copy: never "nothing there".
        if crate::os::files::lstat_present(f, &partial)
            .map_err(|e| Error::os(format!("looking at {}", partial.display()), e))?
            .is_some()
        {
            f.remove_file(&partial)
                .map_err(|e| Error::os(format!("removing {}", partial.display()), e))?;
        }
        if disk_len.is_none() {
            crate::kinds::check_room_for_copy(
                &self.os,
                &format!("copying volume {} ({})", vol.id, src.display()),
                self.os.files.copy_need(&src),
                &area,
            )?;
        }
        let dev = self.current_device(vol)?;
        let t = match &dev {
            Some(_) => mounts::table(&self.os)?,
            None => Vec::new(),
        };
        let frozen: Vec<PathBuf> = dev
            .as_ref()
            .map(|d| {
                filesystem_mounts(&t, d)
                    .iter()
                    .map(|m| m.mount_point.clone())
                    .collect()
            })
            .unwrap_or_default();
        let raw_in_use =
            dev.as_ref().is_some_and(|d| !Self::users(&t, d).is_empty()) && frozen.is_empty();
        if raw_in_use && disk_len.is_some() {
            return Err(Error::WrongState(format!(
                "volume {} is a whole disk in use as a raw device: a copy of it would not be a point in time; snapshot it while it is not in use",
                vol.id
            )));
        }
        let copy = || {
            let copied = match disk_len {
                Some(len) => f.copy_from_device(&src, &partial, len),
                None if raw_in_use => return self.copy_unchanged(&vol.id, &src, &partial),
                None => f.copy_file(&src, &partial),
            };
            copied.map_err(|e| copy_error(format!("copying {}", src.display()), e))
        };
        let copied = if let Some(mp) = frozen.first() {
            f.freeze(mp).map_err(|e| {
                Error::os(format!("freezing the filesystem at {}", mp.display()), e)
            })?;
            let r = copy();
            if let Err(e) = f.thaw(mp) {
                tracing::error!(volume_id = %vol.id, mount_point = %mp.display(), error = %e, "could not thaw the filesystem after a snapshot");
                let _ = f.remove_file(&partial);
                return Err(Error::os(
                    format!("thawing the filesystem at {}", mp.display()),
                    e,
                ));
            }
            r
        } else {
            copy()
        };
        let stats = match copied {
            Ok(s) => s,
            Err(e) => {
                let _ = f.remove_file(&partial);
                return Err(e);
            }
        };
        // A clone shares every block with the volume: a thick volume's
        // next write to one would need a new block, which a full
        // filesystem no longer has. The copy takes blocks of its own
        // (after the thaw: the volume's writes need not wait for it).
        if info.allocation == Allocation::Thick && stats.cloned > 0 {
            if let Err(e) = self.unshare_file(&partial) {
                let _ = f.remove_file(&partial);
                return Err(e);
            }
        }
        // The length a restore and `state check` require of the file (less
        // than `size_bytes` when the volume's expansion has not reached its
        // file yet).
        snap.file_bytes = match f.lstat(&partial).map_err(crate::os::OsError::into_io) {
            Ok(m) => Some(m.len()),
            Err(e) => {
                let _ = f.remove_file(&partial);
                return Err(Error::io(format!("inspecting {}", partial.display()), e));
            }
        };
        snap.block = Some(Self::inherited(&info));
        f.sync_dir(&area)
            .map_err(|e| Error::os(format!("syncing {}", area.display()), e))?;
        tracing::info!(volume_id = %vol.id, snapshot_id = %snap.id, cloned = stats.cloned > 0, bytes = stats.bytes, frozen = !frozen.is_empty(), disk = disk_len.is_some(), "snapshot copied");
        Ok(partial)
    }

    /// Copies the file of a volume in use as a raw device to `partial` as
    /// it was at one point in time. A clone (xfs with reflink, btrfs) is
    /// one. Elsewhere the file is copied range by range and kept only if
    /// its change stamp did not move while it was copied: no write began
    /// meanwhile, so the copy is the device as of the copy's start (a
    /// write already under way then may be in it in part, as after a
    /// power cut). A copy the device's writes overlapped is thrown away
    /// and made again, at most `RAW_COPY_ATTEMPTS` times; a device written
    /// throughout is `WrongState` (FAILED_PRECONDITION), nothing made.
    fn copy_unchanged(
        &self,
        id: &str,
        src: &Path,
        partial: &Path,
    ) -> Result<crate::os::copy::CopyStats> {
        let f = self.os.files.as_ref();
        let failed = |what: &str| {
            let what = format!("{what} {}", src.display());
            move |e| copy_error(what, e)
        };
        for attempt in 1..=RAW_COPY_ATTEMPTS {
            let before = f.change_stamp(src).map_err(failed("inspecting"))?;
            let stats = f.copy_file(src, partial).map_err(failed("copying"))?;
            if stats.cloned > 0 {
                return Ok(stats);
            }
            let after = f.change_stamp(src).map_err(failed("inspecting"))?;
            if before.is_some() && before == after {
                tracing::info!(volume_id = %id, attempt, "raw device in use copied while no write began");
                return Ok(stats);
            }
            f.remove_file(partial)
                .map_err(|e| Error::os(format!("removing {}", partial.display()), e))?;
            tracing::info!(volume_id = %id, attempt, "raw device in use was written while it was copied");
            if attempt < RAW_COPY_ATTEMPTS {
                std::thread::sleep(RAW_COPY_PAUSE * attempt);
            }
        }
        Err(Error::WrongState(format!(
            "volume {id} is in use as a raw device and was written during each of {RAW_COPY_ATTEMPTS} copies of it (the block root's filesystem cannot clone files, as xfs with reflink or btrfs can, and a copy that writes overlap is not a point in time); snapshot it while it is not being written"
        )))
    }

    /// Thaws the filesystem of `vol` if a copy that a crash interrupted
    /// left it frozen (FITHAW of a filesystem that is not frozen fails with
    /// EINVAL, which is the usual answer). Called at start-up, before
    /// serving, so no copy of this berth has it frozen now.
    pub(super) fn thaw_after_crash(&self, vol: &VolumeRecord) {
        let dev = match self.current_device(vol) {
            Ok(Some(d)) => d,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(volume_id = %vol.id, error = %e.render(), "could not find the device of a volume whose copy a crash interrupted; if its filesystem stays frozen, run `fsfreeze -u` on its staging path");
                return;
            }
        };
        let t = match mounts::table(&self.os) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(volume_id = %vol.id, error = %e.render(), "could not read the mount table to thaw a volume whose copy a crash interrupted");
                return;
            }
        };
        let Some(m) = filesystem_mounts(&t, &dev)
            .first()
            .map(|m| m.mount_point.clone())
        else {
            return;
        };
        match self.os.files.thaw(&m) {
            Ok(()) => {
                tracing::warn!(volume_id = %vol.id, mount_point = %m.display(), "thawed a filesystem that a copy interrupted by a crash had left frozen")
            }
            Err(e) if e.errno() == Some(libc::EINVAL) => {}
            Err(e) => {
                tracing::error!(volume_id = %vol.id, mount_point = %m.display(), error = %e, "could not thaw a filesystem that a copy interrupted by a crash may have left frozen; run `fsfreeze -u` on it")
            }
        }
    }

    /// Removes a snapshot's copy; with `keep`, the whole copy of one whose
    /// Ready may have been lost is kept aside (`snapshot_kept_on_rollback`).
    pub(super) fn remove_snapshot(&self, snap: &SnapshotRecord, keep: bool) -> Result<()> {
        let f = self.os.files.as_ref();
        let dest = self.snapshot_file(&snap.id)?;
        if !crate::kinds::snapshots_area(f, &self.root.join(SNAPSHOTS))? {
            return Ok(());
        }
        let kept = if keep {
            snapshot_kept_on_rollback(f, &self.root, snap)
                .map_err(|e| Error::os("looking for a snapshot's whole copy", e))?
        } else {
            None
        };
        if let Some(whole) = kept {
            let to = self.keep_aside(&whole, &format!("{}.img", snap.id))?;
            tracing::error!(snapshot_id = %snap.id, file = %whole.display(), to = %to.display(), "the whole copy of a snapshot whose create never answered: kept aside in .orphaned, never deleted (was its Ready record lost?); look at it before you remove it");
        }
        for p in [self.partial_file(&snap.id), dest] {
            // A directory put in the file's place by hand (Berth never
            // makes one there) is not Berth's to delete: kept aside, so
            // the snapshot can still be deleted. Anything else (the file,
            // a symlink, a FIFO) is unlinked itself, never followed.
            // A look that fails is a doubt: nothing is removed on it.
            let found = crate::os::files::lstat_present(f, &p)
                .map_err(|e| Error::os(format!("looking at {}", p.display()), e))?;
            if found.is_some_and(|m| m.is_dir()) {
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let to = self.keep_aside(&p, &name)?;
                tracing::warn!(snapshot_id = %snap.id, path = %p.display(), to = %to.display(), "a directory in place of a snapshot's file (put there by hand?): kept aside in .orphaned, never deleted");
                continue;
            }
            match f.remove_file(&p) {
                Err(e) if e.errno() != Some(libc::ENOENT) => {
                    return Err(Error::os(format!("removing {}", p.display()), e))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The new volume is a copy of the snapshot's file or of the source
    /// volume (taken like a snapshot, frozen when it is staged): onto a
    /// file, or onto a whole disk of the pool (`pool: disk`), which is
    /// zeroed first so nothing of an earlier tenant shows through the
    /// holes. The record is durable (phase Creating) before, so an
    /// interrupted copy is rolled back with the volume: a failed one by
    /// its create (a disk it was written to is erased), one a crash
    /// interrupted at start-up (a file under its temporary name is
    /// removed; a disk is erased, as its marker is not there yet: it is
    /// written once the copy is whole, `BlockKind::mark_disk`, and a disk
    /// with its marker is held, `BlockKind::hold_disk`).
    pub(super) fn restore_volume(&self, rec: &mut VolumeRecord, from: Source<'_>) -> Result<()> {
        let p = super::params::parse(&super::params::own(&rec.parameters))?;
        // The file to copy from; a clone first takes an unlisted snapshot.
        // `copied`: how long that file is, which is how large the
        // filesystem in it can be (less than the source's recorded size
        // when an expansion had reached the record but not the file yet).
        let (src, mut info, copied, tmp) = match from {
            Source::Snapshot(s) => {
                // Checked before anything is made (also when the CO
                // retries a restore that `check_source` let through).
                let file = self.usable_snapshot_file(s)?;
                (
                    file,
                    s.block.clone().unwrap_or_default(),
                    s.file_bytes
                        .unwrap_or_else(|| u64::try_from(s.size_bytes).unwrap_or(0)),
                    None,
                )
            }
            Source::Volume(v) => {
                let mut tmp = SnapshotRecord {
                    id: super::super::new_hex_id(SNAP_PREFIX),
                    name: String::new(),
                    kind: v.kind,
                    seq: 0,
                    phase: crate::state::Phase::Creating,
                    source_volume_id: v.id.clone(),
                    size_bytes: v.capacity_bytes,
                    node: v.node.to_string(),
                    parameters: Default::default(),
                    created_secs: 0,
                    created_nanos: 0,
                    block: None,
                    file_bytes: None,
                    extra: None,
                };
                let file = self.copy_volume(v, &mut tmp)?;
                let info = tmp.block.clone().unwrap_or_default();
                let copied = tmp
                    .file_bytes
                    .unwrap_or_else(|| u64::try_from(v.capacity_bytes).unwrap_or(0));
                (file.clone(), info, copied, Some(file))
            }
        };
        if !info.formatted && info.formatting.is_empty() {
            // No filesystem was made on the source (never staged, or used
            // raw): its class only said what one would be. A mount
            // capability without fs_type gets the new volume's own
            // (`fsType`, `mkfsOptions`), as a new volume does; a source
            // that holds a filesystem keeps it, whatever the class says.
            info.default_fs = p.default_fs.as_str().into();
            info.mkfs_options = p.mkfs_options.clone();
        }
        let r = match p.pool {
            super::params::Pool::File(allocation) => {
                self.restore_onto_file(rec, &src, tmp.is_some(), allocation, info, copied)
            }
            super::params::Pool::Disk => self.restore_onto_disk(rec, &src, info, copied),
        };
        if let Some(t) = &tmp {
            // Moved into place already, unless the restore failed. A look
            // that fails otherwise than ENOENT is a doubt: the copy is left
            // (start-up removes a temporary copy without a Ready record),
            // and said so, never taken for gone.
            match crate::os::files::lstat_present(self.os.files.as_ref(), t) {
                Ok(Some(_)) => {
                    let _ = self.os.files.remove_file(t);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(path = %t.display(), error = %crate::error::chain(&e), "whether a clone's temporary copy is left cannot be told; left for start-up to remove");
                }
            }
        }
        r
    }

    /// The volume's file: `src` moved (`take`: an unlisted snapshot of a
    /// clone) or copied to a temporary name in the block root and grown;
    /// it is renamed to the volume's name only once the record says Ready
    /// (`place_restored`), so a file at that name under a record still
    /// Creating was handed out (a record that lost its Ready), and a
    /// rollback keeps it aside (`kept_on_rollback`) instead of deleting.
    fn restore_onto_file(
        &self,
        rec: &mut VolumeRecord,
        src: &Path,
        take: bool,
        allocation: crate::state::Allocation,
        info: BlockInfo,
        copied: u64,
    ) -> Result<()> {
        let f = self.os.files.as_ref();
        let partial = self.restoring_file(&rec.id);
        if f.exists(&partial) {
            // A retry of this create: what an earlier try left.
            f.remove_file(&partial)
                .map_err(|e| Error::os(format!("removing {}", partial.display()), e))?;
        }
        if take {
            f.rename_noreplace(src, &partial)
                .map_err(|e| Error::os(format!("moving {} into place", src.display()), e))?;
        } else {
            let stats = f.copy_file(src, &partial).map_err(|e| {
                let _ = f.remove_file(&partial);
                copy_error(format!("copying {}", src.display()), e)
            })?;
            tracing::info!(volume_id = %rec.id, cloned = stats.cloned > 0, bytes = stats.bytes, "volume restored");
        }
        self.finish_restore(rec, &partial, allocation, info, copied)?;
        f.sync_dir(&self.root)
            .map_err(|e| Error::os(format!("syncing {}", self.root.display()), e))
    }

    /// Once a restore's record says Ready: its whole copy renamed to the
    /// volume's name (`VolumeKind::ready`; start-up finishes a rename a
    /// crash interrupted).
    pub(super) fn place_restored(&self, id: &str) -> Result<()> {
        let partial = self.restoring_file(id);
        crate::os::files::move_into_place(self.os.files.as_ref(), &partial, &self.file(id)?)
            .map_err(|e| Error::os(format!("moving {} into place", partial.display()), e))
    }

    /// Where a restore onto a file copies before the file is whole.
    pub(super) fn restoring_file(&self, id: &str) -> PathBuf {
        restoring_path(&self.root, id)
    }

    /// Claims a free disk for `rec` (as a create does), erases it and
    /// writes the snapshot's data onto it, then marks it (`mark_disk`).
    fn restore_onto_disk(
        &self,
        rec: &mut VolumeRecord,
        src: &Path,
        source: BlockInfo,
        copied: u64,
    ) -> Result<()> {
        self.make_volume(rec)?;
        let mut info = Self::info(rec)?;
        let d = info
            .disk
            .clone()
            .ok_or_else(|| Error::Internal(format!("volume {} claimed no disk", rec.id)))?;
        // Berth's own claim of the disk would make the erase fail
        // (EBUSY): released for the copy, taken again after it.
        self.release_claim(&rec.id);
        let written = self.resolve_disk_to_erase(&d).and_then(|dev| {
            self.os
                .devices
                .zero_out(&dev.path, dev.size_bytes)
                .map_err(|e| Error::os(format!("zeroing disk {}", dev.path.display()), e))?;
            let stats = self.os.files.copy_to_device(src, &dev.path).map_err(|e| {
                Error::os(
                    format!("writing {} onto disk {}", src.display(), dev.path.display()),
                    e,
                )
            })?;
            Ok((dev, stats))
        });
        self.keep_claim(&rec.id, &d);
        let (dev, stats) = written?;
        tracing::info!(volume_id = %rec.id, disk = %dev.path.display(), bytes = stats.bytes, "volume restored onto a disk");
        let inherited = Self::inherited(&source);
        info.formatted = inherited.formatted;
        info.fs_type = inherited.fs_type;
        info.formatting = inherited.formatting;
        info.formatting_uuid = inherited.formatting_uuid;
        info.access = inherited.access;
        info.default_fs = inherited.default_fs;
        info.shared_uuid = inherited.shared_uuid;
        info.grow_fs = Self::grow_due(&source, rec.capacity_bytes, copied);
        rec.block = Some(Box::new(info));
        // What the copy holds is recorded before the marker: a hold made
        // of the record (`hold_disk`), and the volume a retry takes back
        // from it (`adopt_held`), know its filesystem.
        self.store.put(rec)?;
        // The copy is whole: from here on the volume may be handed out.
        self.mark_disk(&rec.id)
    }

    /// Whether the filesystem of a volume of `capacity` bytes made from a
    /// copy of `copied` bytes whose content was `source` must be grown at
    /// its first stage: it holds a filesystem, and either the copy is
    /// shorter than the volume (the filesystem is at most the copy's
    /// length, which can be less than the source's recorded size: a
    /// snapshot or clone of a volume whose expansion had reached its
    /// record, not its file) or the source's own growth was still due (a
    /// restore not staged since).
    fn grow_due(source: &BlockInfo, capacity: i64, copied: u64) -> bool {
        source.formatted && (source.grow_fs || u64::try_from(capacity).unwrap_or(0) > copied)
    }

    fn finish_restore(
        &self,
        rec: &mut VolumeRecord,
        file: &Path,
        allocation: crate::state::Allocation,
        source: BlockInfo,
        copied: u64,
    ) -> Result<()> {
        let grow_fs = Self::grow_due(&source, rec.capacity_bytes, copied);
        let mut info = Self::inherited(&source);
        info.allocation = allocation;
        info.grow_fs = grow_fs;
        if allocation == Allocation::Thick {
            // A clone of the snapshot's (or the source's) file shares its
            // blocks: a thick volume takes blocks of its own.
            self.unshare_file(file)?;
        }
        self.grow_file(file, allocation, rec.capacity_bytes, None)?;
        info.file_bytes = u64::try_from(rec.capacity_bytes).ok();
        rec.block = Some(Box::new(info));
        Ok(())
    }

    /// An ext4 filesystem restored or cloned into a larger volume is grown
    /// to its device at its first stage, before it is mounted; returns the
    /// info with the growth done and recorded.
    pub(super) fn grow_restored_unmounted(
        &self,
        rec: &VolumeRecord,
        info: &BlockInfo,
        dev: &Dev,
    ) -> Result<BlockInfo> {
        let undo = self.growth_undo_file(&rec.id)?;
        crate::os::mkfs::grow_ext4_unmounted(
            self.os.cmd.as_ref(),
            self.os.files.as_ref(),
            &dev.path,
            &undo,
        )
        .map_err(|e| {
            let hint = if crate::os::mkfs::fsck_left_errors(&e) {
                format!(
                    " (e2fsck -p found errors it does not fix, which an offline resize interrupted before it saved what it changed (in {}, `e2undo` puts that back) leaves; Berth does not repair a filesystem: copy the volume's file or disk aside, run e2fsck -f on the device, then retry; run the node plugin with CAP_SYS_RESOURCE so that restores grow online)",
                    undo.display()
                )
            } else {
                String::new()
            };
            Error::os(
                format!(
                    "growing the restored ext4 filesystem on {}{hint}",
                    dev.path.display()
                ),
                e,
            )
        })?;
        let mut grown = info.clone();
        grown.grow_fs = false;
        self.save_info(rec, &grown)?;
        Ok(grown)
    }

    /// The ext4 filesystem of a restore or clone into a larger volume,
    /// mounted at `staging` by its first stage, grown to its device:
    /// online first (EXT4_IOC_RESIZE_FS: the kernel journals each step, so
    /// a crash at any moment leaves a consistent filesystem, which the
    /// retry grows the rest of). Without CAP_SYS_RESOURCE the kernel
    /// refuses that, and it is grown offline instead: unmounted, checked,
    /// resized and mounted again (`mount`). An offline resize2fs killed
    /// midway leaves a filesystem that `e2fsck -p` will not fix; Berth
    /// never repairs one, and says so.
    pub(super) fn grow_restored_ext4(
        &self,
        rec: &VolumeRecord,
        info: &BlockInfo,
        dev: &Dev,
        staging: &Path,
        mount: &dyn Fn() -> Result<()>,
    ) -> Result<()> {
        let fs = crate::os::mkfs::Filesystem::Ext4;
        match crate::os::mkfs::grow(self.os.cmd.as_ref(), fs, &dev.path, staging) {
            Ok(()) => {
                let mut grown = info.clone();
                grown.grow_fs = false;
                return self.save_info(rec, &grown);
            }
            Err(e) if !crate::os::mkfs::resize_not_permitted(&e) => {
                return Err(Error::os(
                    format!(
                        "growing the restored ext4 filesystem at {}",
                        staging.display()
                    ),
                    e,
                ))
            }
            Err(_) => {}
        }
        tracing::info!(volume_id = %rec.id, device = %dev.path.display(), "online ext4 resize not permitted (no CAP_SYS_RESOURCE): growing the restored filesystem offline");
        self.os.mounter.unmount(staging).map_err(|e| {
            Error::os(
                format!("unmounting {} to grow it offline", staging.display()),
                e,
            )
        })?;
        self.grow_restored_unmounted(rec, info, dev)?;
        mount()
    }

    /// A filesystem restored or cloned into a larger volume is grown to its
    /// device once it is mounted (at the first stage; xfs grows only
    /// mounted).
    pub(super) fn grow_restored(
        &self,
        rec: &VolumeRecord,
        info: &BlockInfo,
        dev: &Dev,
        mount_point: &Path,
        fs: crate::os::mkfs::Filesystem,
    ) -> Result<()> {
        if !info.grow_fs {
            return Ok(());
        }
        crate::os::mkfs::grow(self.os.cmd.as_ref(), fs, &dev.path, mount_point).map_err(|e| {
            Error::os(
                format!(
                    "growing the restored {fs} filesystem at {}",
                    mount_point.display()
                ),
                e,
            )
        })?;
        let mut grown = info.clone();
        grown.grow_fs = false;
        self.save_info(rec, &grown)
    }

    /// At start-up: an unfinished snapshot copy is removed; a snapshot file
    /// without a record (a lost state directory) is moved aside, never
    /// deleted. Each on its own: one that cannot be is logged and left for
    /// the next start-up, and the first such error returned once all were
    /// tried.
    pub(super) fn reconcile_snapshots(&self, known: &dyn Fn(&str) -> bool) -> Result<()> {
        let Some(entries) =
            crate::os::files::read_own_dir(self.os.files.as_ref(), &self.root.join(SNAPSHOTS))
        else {
            return Ok(());
        };
        let mut failed = None;
        for e in entries.flatten() {
            if let Err(err) = self.reconcile_snapshot_file(&e, known) {
                tracing::error!(path = %e.path().display(), error = %err.render(), "could not reconcile a leftover snapshot copy; the next start-up tries again");
                failed.get_or_insert(err);
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// One entry `e` of the snapshots' directory (`reconcile_snapshots`).
    fn reconcile_snapshot_file(
        &self,
        e: &std::fs::DirEntry,
        known: &dyn Fn(&str) -> bool,
    ) -> Result<()> {
        let f = self.os.files.as_ref();
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        if let Some(rest) = name.strip_prefix(".partial-") {
            // A snapshot's whole copy whose record says Ready (a crash
            // came before the rename) goes into place; anything else was
            // never handed out: also the copy of one whose record still
            // says Creating because its rollback just failed (before, it
            // was placed, and the retry of the rollback kept it in
            // `.orphaned/`).
            let id = rest.strip_suffix(".img").unwrap_or(rest);
            if super::super::is_hex_id(SNAP_PREFIX, id)
                && known(id)
                && !self
                    .store
                    .snapshot_get(id)
                    .is_some_and(|s| s.phase == crate::state::Phase::Creating)
                && !self.os.files.exists(&self.snapshot_file(id)?)
            {
                self.place_snapshot(id)?;
                tracing::info!(snapshot_id = %id, "finished moving a snapshot's copy into place");
                return Ok(());
            }
            return f
                .remove_file(&path)
                .map_err(|e| Error::os(format!("removing {}", path.display()), e));
        }
        let Some(id) = name.strip_suffix(".img") else {
            return Ok(());
        };
        if super::super::is_hex_id(SNAP_PREFIX, id) && !known(id) {
            let to = self.keep_aside(&path, &name)?;
            tracing::warn!(file = %path.display(), to = %to.display(), "snapshot without a record moved aside");
        }
        Ok(())
    }
}
