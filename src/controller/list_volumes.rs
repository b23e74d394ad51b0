//! ListVolumes: pages in creation order. The token is the creation sequence
//! number of the last volume returned, so deleting that volume or creating
//! new ones between pages loses nothing; a token that was never handed out
//! is ABORTED.
use std::sync::Arc;

use super::volume;
use crate::csi::v1 as csi;
use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::state::Phase;

pub async fn handle(
    d: Arc<Driver>,
    req: csi::ListVolumesRequest,
) -> Result<csi::ListVolumesResponse> {
    if req.max_entries < 0 {
        return Err(Error::InvalidArgument(
            "max_entries must not be negative".into(),
        ));
    }
    let after = if req.starting_token.is_empty() {
        0
    } else {
        req.starting_token
            .parse::<u64>()
            .ok()
            .filter(|t| *t > 0 && *t <= d.store.last_seq())
            .ok_or_else(|| {
                Error::Aborted(format!(
                    "starting_token {:?} is not valid",
                    req.starting_token.chars().take(128).collect::<String>()
                ))
            })?
    };
    let (recs, next) = d.store.page(after, req.max_entries as usize);
    let entries = recs
        .iter()
        // Internal records (a disk waiting to be wiped) are not volumes.
        .filter(|r| r.phase != Phase::Creating && d.id_is_plausible(&r.id))
        .map(|r| csi::list_volumes_response::Entry {
            volume: Some(volume::to_proto(&d, r)),
            status: Some(csi::list_volumes_response::VolumeStatus {
                published_node_ids: volume::published_nodes(r),
                volume_condition: Some(volume::condition(&d, r)),
            }),
        })
        .collect();
    Ok(csi::ListVolumesResponse {
        entries,
        next_token: next.map(|n| n.to_string()).unwrap_or_default(),
    })
}
