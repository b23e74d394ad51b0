//! ControllerUnpublishVolume: forgets a publish. Idempotent: a volume not
//! published to the node, or not known at all, is success (the spec: a
//! volume or node that cannot be found can safely be regarded as
//! unpublished); an empty node id means every node. A volume recorded here
//! whose kind (or NFS share) this configuration no longer serves exists:
//! its attachment is forgotten too (only its record changes, no storage
//! is touched), or DeleteVolume would refuse it as still published for
//! good once it is served again, the CO having forgotten the attachment.
use std::sync::Arc;

use crate::csi::v1 as csi;
use crate::driver::{vol_key, Driver};
use crate::error::{Error, Result};
use crate::state::VolumeRecord;
use crate::validate;

pub async fn handle(
    d: Arc<Driver>,
    req: csi::ControllerUnpublishVolumeRequest,
) -> Result<csi::ControllerUnpublishVolumeResponse> {
    validate::secrets(&req.secrets)?;
    let id = validate::volume_id(&req.volume_id)?.to_string();
    let node = if req.node_id.is_empty() {
        None
    } else {
        Some(validate::request_node_id(&req.node_id)?.to_string())
    };
    let forget = move |d: &Driver, mut rec: VolumeRecord| -> Result<()> {
        let before = rec.published.len();
        match &node {
            Some(n) => {
                rec.published.remove(n);
            }
            None => rec.published.clear(),
        }
        if rec.published.len() != before {
            d.store.put(&rec)?;
        }
        Ok(())
    };
    if d.unserved(&id).is_some() {
        let guard = d.locks.try_lock(vol_key(&id))?;
        d.run(guard, move |d| match d.unserved_record(&id) {
            Some(rec) => forget(d, rec),
            None => Ok(()),
        })
        .await?;
        return Ok(csi::ControllerUnpublishVolumeResponse {});
    }
    let r = d
        .with_volume(&id, move |d, rec, _kind| forget(d, rec))
        .await;
    match r {
        Ok(()) | Err(Error::NotFound(_)) => Ok(csi::ControllerUnpublishVolumeResponse {}),
        Err(e) => Err(e),
    }
}
