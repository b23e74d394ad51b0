//! ListSnapshots: pages in creation order, filtered by snapshot id and by
//! source volume. The token is the creation sequence number of the last
//! snapshot returned; a token that was never handed out is ABORTED. Only
//! snapshots whose copy is complete are listed (ready to use only while
//! their stored copy is there as made and their kind, or NFS share, is
//! served: `snapshot::to_proto_checked`); an
//! id that does not exist gives an empty list, as the spec asks. A
//! self-describing snapshot id (NFS) asked for by id, without a record
//! here, is listed from its storage (the marker of the complete copy): the
//! external-snapshotter checks a pre-provisioned snapshot that way, within
//! the kind's `op_deadline` (`Driver::query_within`).
use std::sync::Arc;

use super::list_volumes::{fit_page, page_start};
use super::snapshot::{self, snap_key};
use crate::csi::v1 as csi;
use crate::driver::Driver;
use crate::error::Result;
use crate::state::Phase;
use crate::validate;

pub async fn handle(
    d: Arc<Driver>,
    req: csi::ListSnapshotsRequest,
) -> Result<csi::ListSnapshotsResponse> {
    validate::secrets(&req.secrets)?;
    snapshot::require(&d)?;
    if !req.snapshot_id.is_empty() {
        validate::snapshot_id(&req.snapshot_id)?;
    }
    if !req.source_volume_id.is_empty() {
        validate::volume_id(&req.source_volume_id)?;
    }
    let after = page_start(
        req.max_entries,
        &req.starting_token,
        d.store.snapshot_last_seq(),
    )?;
    let max = usize::try_from(req.max_entries).unwrap_or(0);
    // One page, read from the seq index (a page never copies or sorts the
    // snapshots after it: paging through n snapshots was O(n²) on the
    // thread that answers every call).
    let (mut all, more) = d.store.snapshot_page_matching(after, max, |s| {
        s.phase == Phase::Ready
            && (req.snapshot_id.is_empty() || s.id == req.snapshot_id)
            && (req.source_volume_id.is_empty() || s.source_volume_id == req.source_volume_id)
    });
    if all.is_empty()
        && !req.snapshot_id.is_empty()
        && req.starting_token.is_empty()
        && d.store.snapshot_get(&req.snapshot_id).is_none()
    {
        // Blocking: it may mount an NFS share and read the marker, under
        // the snapshot's guard within the kind's deadline
        // (`Driver::query_within`).
        let id = req.snapshot_id.clone();
        let found = d
            .query_within(
                snap_key(&id),
                d.snapshot_deadline(&id),
                "ListSnapshots",
                move |d| d.snapshot_from_storage(&id),
            )
            .await?;
        all.extend(found.filter(|s| {
            req.source_volume_id.is_empty() || s.source_volume_id == req.source_volume_id
        }));
    }
    let next = all.last().filter(|_| more).map(|s| s.seq);
    let limit = d.cfg.list_page_bytes;
    // One look at each listed snapshot's copy (blocking).
    let entries = tokio::task::spawn_blocking(move || {
        all.iter()
            .map(|s| {
                let e = csi::list_snapshots_response::Entry {
                    snapshot: Some(snapshot::to_proto_checked(&d, s)),
                };
                (s.seq, e)
            })
            .collect()
    })
    .await
    .map_err(|e| crate::error::Error::Internal(format!("ListSnapshots task failed: {e}")))?;
    let (entries, next) = fit_page(entries, next, limit);
    Ok(csi::ListSnapshotsResponse {
        next_token: next.map(|n| n.to_string()).unwrap_or_default(),
        entries,
    })
}
