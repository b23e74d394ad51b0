//! GetSnapshot (alpha in the spec): one snapshot by id; NOT_FOUND for an
//! id that does not exist (or whose copy is not complete). A self-describing
//! id (NFS) without a record here is answered from its storage (the
//! marker of the complete copy), within the kind's `op_deadline`
//! (`Driver::query_within`).
use std::sync::Arc;

use super::snapshot::{self, snap_key};
use crate::csi::v1 as csi;
use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::state::Phase;
use crate::validate;

pub async fn handle(
    d: Arc<Driver>,
    req: csi::GetSnapshotRequest,
) -> Result<csi::GetSnapshotResponse> {
    validate::secrets(&req.secrets)?;
    snapshot::require(&d)?;
    let id = validate::snapshot_id(&req.snapshot_id)?.to_string();
    let missing = || Error::NotFound(format!("snapshot {id} does not exist"));
    let s = match d.store.snapshot_get(&id) {
        Some(s) if s.phase == Phase::Ready => s,
        Some(_) => return Err(missing()),
        None => {
            // Blocking: it may mount an NFS share and read the marker,
            // under the snapshot's guard within the kind's deadline
            // (`Driver::query_within`).
            let i = id.clone();
            d.query_within(
                snap_key(&id),
                d.snapshot_deadline(&id),
                "GetSnapshot",
                move |d| d.snapshot_from_storage(&i),
            )
            .await?
            .ok_or_else(missing)?
        }
    };
    // Blocking: one look at the stored copy, on an operation's thread,
    // never on the one that answers every call.
    let snap = tokio::task::spawn_blocking(move || snapshot::to_proto_checked(&d, &s))
        .await
        .map_err(|e| Error::Internal(format!("GetSnapshot task failed: {e}")))?;
    Ok(csi::GetSnapshotResponse {
        snapshot: Some(snap),
    })
}
