//! Local directory volumes: one directory per volume under `--local-root`.
//!
//! Stage bind-mounts the volume's directory at the staging path; publish
//! bind-mounts the staging path into the target (read-only by remount when
//! asked). There is no quota on this machine's kernels, so the capacity is a
//! promise that GetCapacity accounts for, not a hard limit.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::node::mounts::{self, LazyTable};
use crate::os::files::{self, ensure_dir};
use crate::os::mountinfo;
use crate::os::Os;
use crate::state::{AccessType, Capability, Kind, SnapshotRecord, VolumeRecord};

use super::{Health, PoolCapacity, PublishArgs, Source, VolumeKind, VolumeStats};

const PREFIX: &str = "local-";
/// Snapshot ids.
const SNAP_PREFIX: &str = "local-snap-";
/// Where snapshots are kept (inside the local root).
const SNAPSHOTS: &str = ".snapshots";
/// Where restores and clones are copied before they are moved into place.
const CREATING: &str = ".creating";
/// Where deleted volumes are emptied (inside the local root).
const TRASH: &str = ".trash";
/// Where directories without a record are kept aside.
const ORPHANED: &str = ".orphaned";

/// A failed copy: no room is RESOURCE_EXHAUSTED, anything else internal.
pub fn copy_error(what: String, e: crate::os::OsError) -> Error {
    if matches!(e.errno(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) {
        Error::ResourceExhausted(format!("{what}: no space left"))
    } else {
        Error::os(what, e)
    }
}

/// The directory of local volume `id` under `root` (ids are checked by
/// the caller: `LocalKind::dir`).
pub fn volume_dir(root: &Path, id: &str) -> PathBuf {
    root.join(id)
}

pub struct LocalKind {
    root: PathBuf,
    /// This node's id (new ids carry its tag).
    node: String,
    os: Os,
}

impl LocalKind {
    /// `root` must exist (`Driver::new` makes it and holds its lock).
    pub fn new(root: PathBuf, node: &str, os: Os) -> Result<Self> {
        Ok(LocalKind {
            root,
            node: node.to_string(),
            os,
        })
    }

    /// The directory of a snapshot; only for ids this kind owns.
    fn snapshot_dir(&self, id: &str) -> Result<PathBuf> {
        if !self.owns_snapshot_id(id) {
            return Err(Error::NotFound(format!(
                "snapshot {id} is not a local snapshot"
            )));
        }
        Ok(self.root.join(SNAPSHOTS).join(id))
    }

    /// Copies the tree `src` to `dest` through a temp directory in `tmp_in`
    /// (a leftover of an interrupted copy is removed first): `dest`
    /// appears whole or not at all, synced with its entry.
    fn copy_into_place(&self, src: &Path, tmp_in: &str, dest: &Path) -> Result<()> {
        let f = self.os.files.as_ref();
        let area = self.root.join(tmp_in);
        ensure_dir(f, &area, 0o700)
            .map_err(|e| Error::os(format!("creating {}", area.display()), e))?;
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = area.join(format!(".partial-{name}"));
        self.remove_tree(&tmp)?;
        let stats = f.copy_tree(src, &tmp).map_err(|e| {
            copy_error(format!("copying {} to {}", src.display(), tmp.display()), e)
        })?;
        f.rename_noreplace(&tmp, dest)
            .and_then(|_| f.sync_dir(dest.parent().unwrap_or(&self.root)))
            .map_err(|e| Error::os(format!("moving {} into place", tmp.display()), e))?;
        tracing::info!(from = %src.display(), to = %dest.display(), cloned = stats.cloned, copied = stats.copied, bytes = stats.bytes, "copied");
        Ok(())
    }

    /// Moves storage without a record into `.orphaned/` (never over an
    /// earlier orphan).
    fn set_aside(&self, path: &Path, name: &str) -> Result<()> {
        let aside = self.root.join(ORPHANED);
        ensure_dir(self.os.files.as_ref(), &aside, 0o700)
            .map_err(|e| Error::os(format!("creating {}", aside.display()), e))?;
        let to = files::move_aside(self.os.files.as_ref(), path, &aside, name)
            .map_err(|e| Error::os(format!("moving aside {}", path.display()), e))?;
        tracing::warn!(path = %path.display(), to = %to.display(), "storage without a record moved aside");
        Ok(())
    }

    /// The trash's entries (`<id>-<time>`) with the volume id of each.
    fn trash(&self) -> Vec<(String, PathBuf)> {
        let Ok(entries) = std::fs::read_dir(self.root.join(TRASH)) else {
            return Vec::new();
        };
        entries
            .flatten()
            .map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let id = name
                    .rsplit_once('-')
                    .map_or(name.as_str(), |(id, _)| id)
                    .to_string();
                (id, e.path())
            })
            .collect()
    }

    fn remove_tree(&self, path: &Path) -> Result<()> {
        self.os
            .files
            .remove_tree(path)
            .map_err(|e| Error::os(format!("removing {}", path.display()), e))
    }

    /// The directory of a volume; only for ids this kind owns.
    pub fn dir(&self, id: &str) -> Result<PathBuf> {
        if !self.owns_id(id) {
            return Err(Error::NotFound(format!(
                "volume {id} is not a local volume"
            )));
        }
        Ok(volume_dir(&self.root, id))
    }

    /// What a mount of the volume's directory shows, from the table `t`.
    fn object(&self, id: &str, t: &[mountinfo::MountEntry]) -> Result<mounts::Object> {
        let dir = self.dir(id)?;
        mountinfo::object_of(t, &dir)
            .ok_or_else(|| Error::Internal(format!("no mount holds {}", dir.display())))
    }

    fn require_dir(&self, id: &str) -> Result<PathBuf> {
        let dir = self.dir(id)?;
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => Ok(dir),
            _ => Err(Error::FailedPrecondition(format!(
                "backing directory {} of volume {id} is missing",
                dir.display()
            ))),
        }
    }
}

impl VolumeKind for LocalKind {
    fn kind(&self) -> Kind {
        Kind::Local
    }

    fn new_id(&self) -> String {
        super::new_node_id(PREFIX, &self.node)
    }

    fn owns_id(&self, id: &str) -> bool {
        super::is_hex_id(PREFIX, id)
    }

    fn check_parameters(&self, params: &BTreeMap<String, String>) -> Result<()> {
        if let Some(k) = params.keys().next() {
            return Err(Error::InvalidArgument(format!(
                "unknown parameter {k:?} for local volumes"
            )));
        }
        Ok(())
    }

    fn check_capability(&self, cap: &Capability) -> Result<()> {
        match &cap.access_type {
            AccessType::Block => Err(Error::InvalidArgument(
                "local directory volumes support only the mount access type".into(),
            )),
            AccessType::Mount { fs_type, .. } => {
                if !fs_type.is_empty() {
                    // A directory has the filesystem of the local root; an
                    // explicit type is accepted only as a hint and ignored.
                    tracing::debug!(fs_type = %fs_type, "fs_type ignored for local volumes");
                }
                if !cap.access_mode.single_node() {
                    return Err(Error::InvalidArgument(format!(
                        "access mode {:?} needs a volume reachable from several nodes; local volumes live on one node",
                        cap.access_mode
                    )));
                }
                mounts::bind_flags(cap).map(|_| ())
            }
        }
    }

    fn pool_capacity(&self) -> Result<PoolCapacity> {
        let u = self
            .os
            .fs
            .statvfs(&self.root)
            .map_err(|e| Error::os("reading free space of the local root", e))?;
        Ok(PoolCapacity {
            free_bytes: i64::try_from(u.available_bytes).unwrap_or(i64::MAX),
            max_volume_bytes: i64::try_from(u.total_bytes).unwrap_or(i64::MAX),
        })
    }

    fn create(&self, rec: &mut VolumeRecord) -> Result<()> {
        let dir = self.dir(&rec.id)?;
        let f = self.os.files.as_ref();
        let fail = |what: &str| {
            let dir = dir.clone();
            let what = what.to_string();
            move |e| Error::os(format!("{what} {}", dir.display()), e)
        };
        ensure_dir(f, &dir, 0o700).map_err(fail("creating"))?;
        // World-writable like a fresh emptyDir, so pods running as any user
        // can write; the local root itself is private.
        f.set_mode(&dir, 0o777)
            .map_err(fail("setting the mode of"))?;
        // The directory and its entry in the root are durable before the
        // record says Ready.
        f.sync_dir(&dir)
            .and_then(|_| f.sync_dir(&self.root))
            .map_err(fail("syncing"))?;
        Ok(())
    }

    fn delete_with(&self, rec: &VolumeRecord, mount_table: &LazyTable) -> Result<()> {
        let dir = self.dir(&rec.id)?;
        let m = match std::fs::symlink_metadata(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(format!("inspecting {}", dir.display()), e)),
            Ok(m) => m,
        };
        if !m.is_dir() {
            // Not something this driver made (a symlink or file in its
            // place): remove the entry itself, never what it points to.
            return self
                .os
                .files
                .remove_file(&dir)
                .map_err(|e| Error::os(format!("removing {}", dir.display()), e));
        }
        let t = mount_table.get(&self.os)?;
        if let Some(m) = t.iter().find(|m| m.mount_point.starts_with(&dir)) {
            return Err(Error::FailedPrecondition(format!(
                "{} is mounted inside the volume; refusing to delete",
                m.mount_point.display()
            )));
        }
        // One atomic rename takes the volume away into the trash; its
        // contents are removed only once its record is gone (`purge`). If
        // removing the record fails, start-up puts the directory back.
        let trash = self.root.join(TRASH);
        ensure_dir(self.os.files.as_ref(), &trash, 0o700)
            .map_err(|e| Error::os(format!("creating {}", trash.display()), e))?;
        let dest = trash.join(format!("{}-{}", rec.id, crate::driver::now_nanos()));
        self.os
            .files
            .rename_noreplace(&dir, &dest)
            .map_err(|e| Error::os(format!("moving {} to the trash", dir.display()), e))
    }

    fn purge(&self, rec: &VolumeRecord) {
        for (id, path) in self.trash() {
            if id == rec.id {
                if let Err(e) = self.remove_tree(&path) {
                    tracing::warn!(volume_id = %rec.id, error = %e.render(), "could not empty the trash; start-up does");
                }
            }
        }
    }

    fn durable_intent(&self) -> bool {
        false
    }

    fn reconcile_orphans(&self, known: &dyn Fn(&str) -> bool) -> Result<()> {
        // The trash: a volume whose record is still there was being
        // deleted when removing its record failed: it goes back. The rest
        // is emptied.
        for (id, path) in self.trash() {
            let home = volume_dir(&self.root, &id);
            if self.owns_id(&id) && known(&id) && std::fs::symlink_metadata(&home).is_err() {
                self.os
                    .files
                    .rename_noreplace(&path, &home)
                    .map_err(|e| Error::os(format!("moving {} back", path.display()), e))?;
                tracing::warn!(volume_id = %id, "a delete whose record could not be removed was undone: the volume is back");
                continue;
            }
            self.remove_tree(&path)?;
        }
        // Copies of restores and clones that never finished: never handed
        // out, only Berth's own copies.
        if let Ok(entries) = std::fs::read_dir(self.root.join(CREATING)) {
            for e in entries.flatten() {
                self.remove_tree(&e.path())?;
            }
        }
        // Snapshots: an unfinished copy is removed; a copy without a record
        // (a lost state directory) is kept aside like any orphan.
        if let Ok(entries) = std::fs::read_dir(self.root.join(SNAPSHOTS)) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(".partial-") {
                    self.remove_tree(&e.path())?;
                } else if self.owns_snapshot_id(&name) && !known(&name) {
                    self.set_aside(&e.path(), &name)?;
                }
            }
        }
        let entries = std::fs::read_dir(&self.root)
            .map_err(|e| Error::io(format!("reading {}", self.root.display()), e))?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !self.owns_id(&name) || known(&name) {
                continue;
            }
            // Made by a CreateVolume that never answered: never handed out,
            // so empty. Anything else is kept aside, never deleted.
            let path = e.path();
            if self.os.files.remove_dir(&path).is_ok() {
                tracing::info!(dir = %path.display(), "removed orphaned volume directory");
                continue;
            }
            self.set_aside(&path, &name)?;
        }
        Ok(())
    }

    fn snapshots(&self) -> bool {
        true
    }

    fn new_snapshot_id(&self) -> String {
        super::new_node_id(SNAP_PREFIX, &self.node)
    }

    fn owns_snapshot_id(&self, id: &str) -> bool {
        super::is_hex_id(SNAP_PREFIX, id)
    }

    fn node_tag_of(&self, id: &str) -> Option<String> {
        super::id_node_tag(PREFIX, id)
            .or_else(|| super::id_node_tag(SNAP_PREFIX, id))
            .map(str::to_string)
    }

    /// A copy of the volume's directory under `.snapshots/`, sharing extents
    /// where the filesystem can (FICLONE), never hard links. The directory
    /// is not frozen: files written while the copy runs are copied as they
    /// are when reached (each file is consistent with itself).
    fn create_snapshot(&self, vol: &VolumeRecord, snap: &mut SnapshotRecord) -> Result<()> {
        let src = self.require_dir(&vol.id)?;
        let dest = self.snapshot_dir(&snap.id)?;
        self.copy_into_place(&src, SNAPSHOTS, &dest)
    }

    fn delete_snapshot(&self, snap: &SnapshotRecord) -> Result<()> {
        let dest = self.snapshot_dir(&snap.id)?;
        let partial = self
            .root
            .join(SNAPSHOTS)
            .join(format!(".partial-{}", snap.id));
        self.remove_tree(&partial)?;
        self.remove_tree(&dest)
    }

    /// The new volume's directory is a copy of the snapshot's or the source
    /// volume's, made under `.creating/` and moved into place whole.
    fn create_from(&self, rec: &mut VolumeRecord, from: Source<'_>) -> Result<()> {
        let src = match from {
            Source::Snapshot(s) => {
                let d = self.snapshot_dir(&s.id)?;
                if !d.is_dir() {
                    return Err(Error::FailedPrecondition(format!(
                        "the copy of snapshot {} is missing ({})",
                        s.id,
                        d.display()
                    )));
                }
                d
            }
            Source::Volume(v) => self.require_dir(&v.id)?,
        };
        let dest = self.dir(&rec.id)?;
        if std::fs::symlink_metadata(&dest).is_ok_and(|m| m.is_dir()) {
            // A retry after the copy was moved into place.
            return Ok(());
        }
        self.copy_into_place(&src, CREATING, &dest)
    }

    fn health(&self, rec: &VolumeRecord) -> Health {
        match self.require_dir(&rec.id) {
            Ok(_) => Health::ok(),
            Err(e) => Health::abnormal(e.to_string()),
        }
    }

    fn stage(&self, rec: &VolumeRecord, staging: &Path, cap: &Capability) -> Result<()> {
        self.check_capability(cap)?;
        let dir = self.require_dir(&rec.id)?;
        mounts::stage_bind(&self.os, &dir, staging)
    }

    fn unstage(&self, rec: &VolumeRecord, staging: &Path) -> Result<()> {
        let dir = self.dir(&rec.id)?;
        mounts::unstage(&self.os, staging, Some(&dir))
    }

    fn publish(&self, rec: &VolumeRecord, a: &PublishArgs<'_>) -> Result<()> {
        self.check_capability(a.capability)?;
        let dir = self.dir(&rec.id)?;
        mounts::publish_bind(
            &self.os,
            |t| mountinfo::object_of(t, &dir),
            Some(&dir),
            a.staging,
            a.target,
            a.capability,
            a.readonly,
        )
    }

    fn unstage_path(&self, _id: &str, staging: &Path) -> Result<()> {
        mounts::unstage(&self.os, staging, None)
    }

    fn unpublish(&self, target: &Path) -> Result<()> {
        mounts::unpublish(&self.os, target)
    }

    fn stats(&self, rec: &VolumeRecord, path: &Path) -> Result<VolumeStats> {
        let t = mounts::table(&self.os)?;
        let Some(top) = mounts::at(&self.os, &t, path)
            .last()
            .map(|m| mounts::object(m))
        else {
            return Err(Error::NotFound(format!(
                "volume {} is not mounted at {}",
                rec.id,
                path.display()
            )));
        };
        // With the backing directory gone (moved or deleted under a live
        // mount) the mount cannot be matched to it; report what is there and
        // let the condition say abnormal.
        if self.require_dir(&rec.id).is_ok() {
            let dir = self.dir(&rec.id)?;
            if mountinfo::object_of(&t, &dir).as_ref() != Some(&top) {
                return Err(Error::NotFound(format!(
                    "volume {} is not mounted at {}",
                    rec.id,
                    path.display()
                )));
            }
        }
        let usage = self
            .os
            .fs
            .statvfs(path)
            .map_err(|e| Error::os(format!("statvfs of {}", path.display()), e))?;
        Ok(VolumeStats {
            usage,
            block_size_only: None,
        })
    }

    fn in_use(&self, rec: &VolumeRecord, mount_table: &LazyTable) -> Result<Vec<PathBuf>> {
        let t = mount_table.get(&self.os)?;
        let obj = self.object(&rec.id, t)?;
        Ok(mountinfo::mounts_of(t, &obj)
            .into_iter()
            .map(|m| m.mount_point.clone())
            .collect())
    }
}
