//! NodeUnpublishVolume: unmounts whatever the kernel shows mounted at the
//! target (the statx mount-root probe, or mountinfo when it cannot tell;
//! never a stat error or device numbers, see `node::mounts`) and removes
//! the target with rmdir. It works from the path alone, as every CSI
//! driver's unpublish does: a target already gone or never mounted, or a
//! volume whose record is gone, is success (kubelet can finish tearing the
//! pod down).
use std::sync::Arc;

use crate::csi::v1 as csi;
use crate::driver::{path_key, vol_key, Driver};
use crate::error::Result;
use crate::validate;

pub async fn handle(
    d: Arc<Driver>,
    req: csi::NodeUnpublishVolumeRequest,
) -> Result<csi::NodeUnpublishVolumeResponse> {
    let id = validate::volume_id(&req.volume_id)?.to_string();
    let target = d.protected.check("target_path", &req.target_path)?;
    let mut guard = d.locks.try_lock(vol_key(&id))?;
    guard.also(path_key(target.path()))?;
    d.run(guard, move |d| {
        let (target, real) = d.protected.resolve(d.os.files.as_ref(), target)?;
        let _real = d.guard_real_path(real.as_deref())?;
        d.unpublish(&id, &target)
    })
    .await?;
    Ok(csi::NodeUnpublishVolumeResponse {})
}
