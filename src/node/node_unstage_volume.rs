//! NodeUnstageVolume: undoes NodeStageVolume; refuses while the volume is
//! still published from the staging path. Without a record (the volume was
//! deleted from under the node, or the state lost) or with its device gone,
//! it works from the path: what is mounted there is unmounted and what
//! Berth made is removed, and the answer is OK, never NOT_FOUND forever.
use std::sync::Arc;

use crate::csi::v1 as csi;
use crate::driver::{path_key, vol_key, Driver};
use crate::error::{Error, Result};
use crate::node::mounts;
use crate::validate;

pub async fn handle(
    d: Arc<Driver>,
    req: csi::NodeUnstageVolumeRequest,
) -> Result<csi::NodeUnstageVolumeResponse> {
    let id = validate::volume_id(&req.volume_id)?.to_string();
    let staging = d
        .protected
        .check("staging_target_path", &req.staging_target_path)?;
    let mut guard = d.locks.try_lock(vol_key(&id))?;
    guard.also(path_key(staging.path()))?;
    d.run(guard, move |d| {
        let (staging, real) = d.protected.resolve(d.os.files.as_ref(), staging)?;
        let _real = d.guard_real_path(real.as_deref())?;
        let r = match d.volume(&id) {
            Ok(rec) => d.kind(rec.kind)?.unstage(&rec, &staging),
            // No record: never another volume's storage (a directory in
            // the state directory or a root other than the id's own), then
            // what the id's kind tells (a block volume's device).
            Err(Error::NotFound(_)) => {
                d.refuse_volume_storage(&id, &staging)?;
                match d.kind_of_id(&id) {
                    Some(k) => k.unstage_path(&id, &staging),
                    None => mounts::unstage(&d.os, &staging, None),
                }
            }
            Err(e) => Err(e),
        };
        if r.is_ok() {
            d.staged.forget(&id, &staging);
        }
        r
    })
    .await?;
    Ok(csi::NodeUnstageVolumeResponse {})
}
