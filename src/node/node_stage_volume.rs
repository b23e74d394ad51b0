//! NodeStageVolume: makes the volume available at the staging path. For
//! local directories: a bind mount of the volume's directory.
use std::sync::Arc;

use crate::convert;
use crate::csi::v1 as csi;
use crate::driver::Driver;
use crate::error::Result;
use crate::validate;

pub async fn handle(
    d: Arc<Driver>,
    req: csi::NodeStageVolumeRequest,
) -> Result<csi::NodeStageVolumeResponse> {
    validate::secrets(&req.secrets)?;
    let id = validate::volume_id(&req.volume_id)?;
    let staging = d
        .protected
        .check("staging_target_path", &req.staging_target_path)?;
    let cap = convert::required_capability(req.volume_capability.as_ref())?;
    validate::map("publish_context", &req.publish_context)?;
    validate::map("volume_context", &req.volume_context)?;
    let path = staging.path().to_path_buf();
    d.with_volume_at(id, &[&path], move |d, rec, kind| {
        let (staging, real) = d.protected.resolve(d.os.files.as_ref(), staging)?;
        let _real = d.guard_real_path(real.as_deref())?;
        d.require_not_deleting(&rec)?;
        d.require_local_here(&rec)?;
        kind.stage(&rec, &staging, &cap)
    })
    .await?;
    Ok(csi::NodeStageVolumeResponse {})
}
