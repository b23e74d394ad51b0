//! ControllerGetVolume: the volume, the nodes it is published to, and its
//! condition.
use std::sync::Arc;

use super::volume;
use crate::csi::v1 as csi;
use crate::driver::Driver;
use crate::error::Result;
use crate::validate;

pub async fn handle(
    d: Arc<Driver>,
    req: csi::ControllerGetVolumeRequest,
) -> Result<csi::ControllerGetVolumeResponse> {
    let id = validate::volume_id(&req.volume_id)?;
    let rec = d.volume(id)?;
    Ok(csi::ControllerGetVolumeResponse {
        volume: Some(volume::to_proto(&d, &rec)),
        status: Some(csi::controller_get_volume_response::VolumeStatus {
            published_node_ids: volume::published_nodes(&rec),
            volume_condition: Some(volume::condition(&d, &rec)),
        }),
    })
}
