//! GetSnapshot (alpha in the spec): one snapshot by id; NOT_FOUND for an
//! id that does not exist (or whose copy is not complete).
use std::sync::Arc;

use super::snapshot;
use crate::csi::v1 as csi;
use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::state::Phase;
use crate::validate;

pub async fn handle(
    d: Arc<Driver>,
    req: csi::GetSnapshotRequest,
) -> Result<csi::GetSnapshotResponse> {
    snapshot::require(&d)?;
    let id = validate::snapshot_id(&req.snapshot_id)?;
    let s = d
        .store
        .snapshot_get(id)
        .filter(|s| s.phase == Phase::Ready)
        .ok_or_else(|| Error::NotFound(format!("snapshot {id} does not exist")))?;
    Ok(csi::GetSnapshotResponse {
        snapshot: Some(snapshot::to_proto(&s)),
    })
}
