//! DeleteVolume: idempotent (an unknown id is success). Refuses a volume that
//! is still published (FAILED_PRECONDITION). The record goes to Deleting
//! before the storage is removed, so a crash in between is finished at
//! start-up. A volume with a self-describing id (NFS) but no record here
//! (the controller's state was lost) is deleted as its id describes.
use std::sync::Arc;

use crate::csi::v1 as csi;
use crate::driver::{name_key, vol_key, Driver};
use crate::error::{Error, Result};
use crate::kinds::VolumeKind;
use crate::node::mounts::LazyTable;
use crate::state::{Phase, StateError, VolumeRecord};
use crate::validate;

pub async fn handle(
    d: Arc<Driver>,
    req: csi::DeleteVolumeRequest,
) -> Result<csi::DeleteVolumeResponse> {
    validate::secrets(&req.secrets)?;
    let id = validate::volume_id(&req.volume_id)?.to_string();
    if !d.id_is_plausible(&id) {
        // A volume recorded here whose kind (or NFS share) this
        // configuration no longer serves exists: answering OK would have
        // the CO forget it while its record and storage stay for good.
        if let Some(why) = d.unserved(&id) {
            return Err(Error::WrongState(why));
        }
        return Ok(csi::DeleteVolumeResponse {});
    }
    let mut guard = d.locks.try_lock(vol_key(&id))?;
    let Some(rec) = d.store.get(&id) else {
        if let Some(rec) = d.record_from_id(&id) {
            let deadline = d.kind(rec.kind).ok().and_then(|k| k.op_deadline());
            // CreateVolume guards the id too: no record can appear meanwhile.
            d.run_within(guard, deadline, move |d| match d.record_from_id(&id) {
                Some(rec) => d.kind(rec.kind)?.clone().delete(&rec),
                None => Ok(()),
            })
            .await?;
        }
        return Ok(csi::DeleteVolumeResponse {});
    };
    guard.also(name_key(&rec.name))?;
    let deadline = d.kind(rec.kind).ok().and_then(|k| k.op_deadline());
    d.run_within(guard, deadline, move |d| {
        // Read again under the guard.
        let Some(mut rec) = d.store.get(&id) else {
            return Ok(());
        };
        let kind = d.kind(rec.kind)?.clone();
        // One read of the mount table serves both the check here and the
        // kind's own checks in delete (all under the volume's guard).
        let mount_table = LazyTable::new();
        refuse_in_use(d, &rec, kind.as_ref(), &mount_table)?;
        if kind.durable_intent() && rec.phase != Phase::Deleting {
            write_intent(d, kind.as_ref(), &mut rec, &mount_table)?;
        }
        kind.delete_with(&rec, &mount_table)?;
        remove_record(d, kind.as_ref(), &rec)?;
        kind.purge(&rec);
        d.staged.discard(&id);
        Ok(())
    })
    .await?;
    Ok(csi::DeleteVolumeResponse {})
}

/// Writes the Deleting phase of `rec` (its intent: a crash after its
/// storage is gone leaves a record that start-up or a retry finishes, not
/// a Ready one without its storage). When the journal has no room for it
/// (ENOSPC, EDQUOT), the volume's own space is what can make room: the
/// kind frees it, the volume kept in place with its record
/// (`VolumeKind::free_for_intent`: a block file emptied, its blocks given
/// back) and the phase is written again. If it still cannot be, the answer
/// is RESOURCE_EXHAUSTED as in `remove_record`, the volume in place,
/// Ready. Before, a block file volume's delete failed here on every retry
/// while the filesystem stayed full, and its file, the one thing that
/// could make room, stayed.
fn write_intent(
    d: &Driver,
    kind: &dyn VolumeKind,
    rec: &mut VolumeRecord,
    mount_table: &LazyTable,
) -> Result<()> {
    let now = &*rec;
    let r = with_room(
        &rec.id,
        "its delete's record",
        || d.store.set_phase(&mut now.clone(), Phase::Deleting),
        || kind.free_for_intent(now, mount_table),
    );
    match r {
        Ok(()) => {
            rec.phase = Phase::Deleting;
            Ok(())
        }
        Err((freed, e)) if e.is_no_space() => {
            Err(no_space(d, &rec.id, "Deleting phase", &e, freed))
        }
        Err((_, e)) => Err(e.into()),
    }
}

/// Makes the journal change `write` of volume `id`; when the journal has
/// no room for it (ENOSPC, EDQUOT), `free` makes room with the volume's
/// own space and `write` is tried again. Else the error of the last try,
/// with whether `free` freed anything (a `free` that fails is logged,
/// `for_what` naming what the room was for, and frees nothing); the error
/// of a first try that was not for want of space comes back at once,
/// nothing freed.
fn with_room(
    id: &str,
    for_what: &str,
    write: impl Fn() -> std::result::Result<(), StateError>,
    free: impl FnOnce() -> Result<bool>,
) -> std::result::Result<(), (bool, StateError)> {
    let first = match write() {
        Err(e) if e.is_no_space() => e,
        r => return r.map_err(|e| (false, e)),
    };
    match free() {
        Ok(true) => write().map_err(|e| (true, e)),
        Ok(false) => Err((false, first)),
        Err(f) => {
            tracing::warn!(volume_id = %id, error = %f.render(), "could not free the space of a volume to make room for {for_what}");
            Err((false, first))
        }
    }
}

/// RESOURCE_EXHAUSTED: the journal has no room for `what` of volume
/// `id`'s record (`e`); `freed` says that its data is removed meanwhile.
fn no_space(d: &Driver, id: &str, what: &str, e: &StateError, freed: bool) -> Error {
    Error::NoSpace(format!(
        "the filesystem of the state directory {} is full: the {what} of volume {id}'s record cannot be written ({}); {}retry once there is room there",
        d.cfg.state_dir().display(),
        crate::error::chain(e),
        if freed {
            "its data is removed (the volume is empty); "
        } else {
            ""
        }
    ))
}

/// Removes the record of the volume `rec` once `delete_with` set its
/// storage aside. When the journal has no room for the removal (ENOSPC,
/// EDQUOT: a tenant filled the filesystem the state shares, and the log's
/// reserve is used up or was never taken), the volume's own space is what
/// can make room: the kind removes the data it set aside
/// (`VolumeKind::free_set_aside`, removals only) and the removal is written
/// again. If it still cannot be, what was set aside goes back
/// (`undo_delete`: record and storage agree) and the answer is
/// RESOURCE_EXHAUSTED (`Error::NoSpace`) naming the full filesystem: the
/// CSI spec's table for DeleteVolume has no row for it, and gRPC's
/// RESOURCE_EXHAUSTED is a resource used up, "perhaps the entire file
/// system" (the CO retries a DeleteVolume whatever its code). Before, the
/// delete was INTERNAL for as long as the filesystem stayed full, the
/// volume's data kept in the trash under its record: the one space that
/// could make room was never given back.
fn remove_record(d: &Driver, kind: &dyn VolumeKind, rec: &VolumeRecord) -> Result<()> {
    let (freed, e) = match with_room(
        &rec.id,
        "its record's removal",
        || d.store.remove(&rec.id),
        || kind.free_set_aside(rec),
    ) {
        Ok(()) => return Ok(()),
        // Not for want of space, at the first try: nothing was freed.
        Err((false, e)) if !e.is_no_space() => return Err(e.into()),
        Err(x) => x,
    };
    if let Err(u) = kind.undo_delete(rec) {
        tracing::warn!(volume_id = %rec.id, error = %u.render(), "could not put back the storage of a volume whose record could not be removed (start-up does)");
    }
    if !e.is_no_space() {
        return Err(e.into());
    }
    Err(no_space(d, &rec.id, "removal", &e, freed))
}

/// FAILED_PRECONDITION while the volume `rec` is still in use: published
/// to a node (its record's attachments), or, for a node-local kind,
/// staged or published on this node (`mounts`, shared with the kind's
/// `delete_with` of the same call). DeleteVolume's check, and that of
/// the retry of a delete that did not finish (`Driver::retry_pending`),
/// which must no more erase, trash or archive a volume a pod still uses.
/// Also what the kind itself refuses (`VolumeKind::refuse_delete`), first.
pub(crate) fn refuse_in_use(
    d: &Driver,
    rec: &VolumeRecord,
    kind: &dyn VolumeKind,
    mount_table: &LazyTable,
) -> Result<()> {
    let id = &rec.id;
    kind.refuse_delete(rec)?;
    if !rec.published.is_empty() {
        return Err(Error::WrongState(format!(
            "volume {id} is still published to node(s) {}",
            rec.published.keys().cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    // A node-local volume's storage and mounts are on this node
    // whatever node id its record names: one recorded under a former
    // `--node-id` is in this root, and its pods' mounts outlived the
    // restart. (Checked only for this node id's volumes before: such a
    // volume's directory went to the trash while a pod used it.)
    if kind.node_local() {
        let mut used = kind.in_use(rec, mount_table)?;
        // Its staging path (or a raw block volume's device bound at
        // `<staging>/<id>`) still mounted where the kind finds no mount
        // of its storage: the storage was moved away by hand under the
        // mounts (mountinfo follows the move). Deleting the record then
        // left those mounts without a record to prove them the
        // volume's, and every NodeUnpublish and NodeUnstage of the pod
        // refused them forever (a local volume), or deleted a volume a
        // pod still used.
        if used.is_empty() {
            if let Some(s) = d.staged.path(id) {
                let marker = s.join(id);
                used.extend(
                    [s, marker]
                        .into_iter()
                        .filter(|p| d.os.probe.mount_root(p) == Some(true)),
                );
            }
        }
        if !used.is_empty() {
            return Err(Error::WrongState(format!(
                "volume {id} is still mounted at {}",
                used.iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    Ok(())
}
