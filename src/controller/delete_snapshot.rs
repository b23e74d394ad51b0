//! DeleteSnapshot: idempotent (an unknown id is success). The record goes to
//! Deleting before the copy is removed, so a crash in between is finished
//! at start-up. Volumes restored from a snapshot are copies of their own:
//! deleting it touches none of them. A self-describing id (NFS) without a
//! record here (the controller lost its records) is deleted from the id:
//! the kind removes only storage whose marker names it. A snapshot recorded
//! here whose kind was taken out of `--kinds` (or, NFS, whose share out of
//! `--nfs-allowed-shares`) is FAILED_PRECONDITION, and nothing is touched.
use std::sync::Arc;

use super::snapshot::{self, snap_key, snap_name_key};
use crate::csi::v1 as csi;
use crate::driver::Driver;
use crate::error::Result;
use crate::state::Phase;
use crate::validate;

pub async fn handle(
    d: Arc<Driver>,
    req: csi::DeleteSnapshotRequest,
) -> Result<csi::DeleteSnapshotResponse> {
    validate::secrets(&req.secrets)?;
    snapshot::require(&d)?;
    let id = validate::snapshot_id(&req.snapshot_id)?.to_string();
    let Some(rec) = d.store.snapshot_get(&id) else {
        let Some((kind, rec)) = d
            .kinds()
            .find_map(|k| k.snapshot_from_id(&id).map(|r| (k.clone(), r)))
        else {
            return Ok(csi::DeleteSnapshotResponse {});
        };
        let guard = d.locks.try_lock(snap_key(&id))?;
        let deadline = kind.op_deadline();
        d.run_within(guard, deadline, move |d| {
            match d.store.snapshot_get(&rec.id) {
                // Made meanwhile: a DeleteSnapshot of it deletes it.
                Some(_) => Err(crate::error::Error::Busy(format!(
                    "snapshot {} was just created; retry",
                    rec.id
                ))),
                None => kind.delete_snapshot(&rec),
            }
        })
        .await?;
        return Ok(csi::DeleteSnapshotResponse {});
    };
    // A snapshot recorded here whose kind (or NFS share) this
    // configuration no longer serves exists: answering OK would have the
    // CO forget it while its record and its copy stay for good.
    if let Some(why) = d.unserved_snapshot(&rec) {
        return Err(crate::error::Error::WrongState(why));
    }
    let mut guard = d.locks.try_lock(snap_key(&id))?;
    guard.also(snap_name_key(&rec.name))?;
    let deadline = d.kind(rec.kind).ok().and_then(|k| k.op_deadline());
    d.run_within(guard, deadline, move |d| {
        let Some(mut rec) = d.store.snapshot_get(&id) else {
            return Ok(());
        };
        let kind = d.kind(rec.kind)?.clone();
        if rec.phase != Phase::Deleting {
            rec.phase = Phase::Deleting;
            d.store.snapshot_put(&rec)?;
        }
        kind.delete_snapshot(&rec)?;
        d.store.snapshot_remove(&id)?;
        Ok(())
    })
    .await?;
    Ok(csi::DeleteSnapshotResponse {})
}
