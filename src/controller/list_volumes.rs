//! ListVolumes: pages in creation order. The token is the creation sequence
//! number of the last volume the page covered, so deleting that volume or
//! creating new ones between pages loses nothing. A volume whose create
//! began before a page was read and was still under way then (not listed:
//! its sequence number is taken when the create begins) is not listed by
//! the rest of that walk either; a new walk lists it (the spec lets a CO
//! expect no consistent view across pages). A token that was never handed
//! out is ABORTED.
use std::sync::Arc;

use super::volume;
use crate::csi::v1 as csi;
use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::state::Phase;

/// The checks every paged List RPC makes: `max_entries` is not negative,
/// and the token is a sequence number that was handed out (ABORTED
/// otherwise, as the spec asks). Returns where the page starts after.
pub fn page_start(max_entries: i32, token: &str, last_seq: u64) -> Result<u64> {
    if max_entries < 0 {
        return Err(Error::Invalid("max_entries must not be negative".into()));
    }
    if token.is_empty() {
        return Ok(0);
    }
    token
        .parse::<u64>()
        .ok()
        // Only the form handed out: "+1" or "01" were never a token.
        .filter(|t| *t > 0 && *t <= last_seq && t.to_string() == token)
        .ok_or_else(|| {
            Error::Busy(format!(
                "starting_token {:?} is not valid",
                token.chars().take(128).collect::<String>()
            ))
        })
}

pub async fn handle(
    d: Arc<Driver>,
    req: csi::ListVolumesRequest,
) -> Result<csi::ListVolumesResponse> {
    let after = page_start(req.max_entries, &req.starting_token, d.store.last_seq())?;
    let (recs, next) = d.store.page(after, req.max_entries as usize);
    // Blocking: each volume's condition looks at its storage (an lstat of
    // a directory or file, a bounded probe of an NFS share), on an
    // operation's thread, never on the one that answers every call.
    let entries = tokio::task::spawn_blocking(move || {
        recs.iter()
            // Internal records (a disk waiting to be wiped) are not volumes;
            // one of a kind (or NFS share) no longer served is, listed with
            // an abnormal condition saying why (`volume::condition`).
            .filter(|r| {
                r.phase != Phase::Creating
                    && (d.id_is_plausible(&r.id) || d.unserved(&r.id).is_some())
            })
            .map(|r| csi::list_volumes_response::Entry {
                volume: Some(volume::to_proto(&d, r)),
                status: Some(csi::list_volumes_response::VolumeStatus {
                    published_node_ids: volume::published_nodes(r),
                    volume_condition: Some(volume::condition(&d, r)),
                }),
            })
            .collect()
    })
    .await
    .map_err(|e| Error::Internal(format!("ListVolumes task failed: {e}")))?;
    Ok(csi::ListVolumesResponse {
        entries,
        next_token: next.map(|n| n.to_string()).unwrap_or_default(),
    })
}
