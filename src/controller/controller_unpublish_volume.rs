//! ControllerUnpublishVolume: forgets a publish. Idempotent: a volume not
//! published to the node, or not known at all, is success (the spec: a
//! volume or node that cannot be found can safely be regarded as
//! unpublished); an empty node id means every node.
use std::sync::Arc;

use crate::csi::v1 as csi;
use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::validate;

pub async fn handle(
    d: Arc<Driver>,
    req: csi::ControllerUnpublishVolumeRequest,
) -> Result<csi::ControllerUnpublishVolumeResponse> {
    let id = validate::volume_id(&req.volume_id)?.to_string();
    let node = if req.node_id.is_empty() {
        None
    } else {
        Some(validate::node_id(&req.node_id)?.to_string())
    };
    let r = d
        .with_volume(&id, move |d, mut rec, _kind| {
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
        })
        .await;
    match r {
        Ok(()) | Err(Error::NotFound(_)) => Ok(csi::ControllerUnpublishVolumeResponse {}),
        Err(e) => Err(e),
    }
}
