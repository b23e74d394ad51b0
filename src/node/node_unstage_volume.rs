//! NodeUnstageVolume: undoes NodeStageVolume; refuses while the volume is
//! still published from the staging path.
use std::sync::Arc;

use crate::csi::v1 as csi;
use crate::driver::Driver;
use crate::error::Result;
use crate::validate;

pub async fn handle(
    d: Arc<Driver>,
    req: csi::NodeUnstageVolumeRequest,
) -> Result<csi::NodeUnstageVolumeResponse> {
    let id = validate::volume_id(&req.volume_id)?;
    let staging = validate::abs_path("staging_target_path", &req.staging_target_path)?;
    d.with_volume(id, move |_d, rec, kind| kind.unstage(&rec, &staging))
        .await?;
    Ok(csi::NodeUnstageVolumeResponse {})
}
