//! NodeUnpublishVolume: unmounts whatever the kernel shows mounted at the
//! target (the statx mount-root probe, or mountinfo when it cannot tell;
//! never a stat error or device numbers, see `node::mounts`) and removes
//! the target with rmdir. A target already gone or never mounted is
//! success.
use std::sync::Arc;

use crate::csi::v1 as csi;
use crate::driver::Driver;
use crate::error::Result;
use crate::validate;

pub async fn handle(
    d: Arc<Driver>,
    req: csi::NodeUnpublishVolumeRequest,
) -> Result<csi::NodeUnpublishVolumeResponse> {
    let id = validate::volume_id(&req.volume_id)?;
    let target = validate::abs_path("target_path", &req.target_path)?;
    d.with_volume(id, move |_d, rec, kind| kind.unpublish(&rec, &target))
        .await?;
    Ok(csi::NodeUnpublishVolumeResponse {})
}
