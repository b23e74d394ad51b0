//! ControllerPublishVolume (the attach phase): records that the volume may be
//! used on a node. A node-local volume can be published only to its own node
//! (another node id is unknown here: NOT_FOUND). A volume recorded here
//! whose kind (or NFS share) this configuration no longer serves is
//! FAILED_PRECONDITION saying why (`Driver::unserved`), not NOT_FOUND. One
//! whose delete began (a DeleteVolume that failed half way) is NOT_FOUND
//! (`Driver::require_not_deleting`). A self-describing id (NFS) without a
//! record here is a volume only when its storage says so
//! (`Driver::with_controller_volume`): else NOT_FOUND, and nothing is
//! recorded.
use std::collections::HashMap;
use std::sync::Arc;

use crate::convert;
use crate::csi::v1 as csi;
use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::state::Attachment;
use crate::validate;

pub async fn handle(
    d: Arc<Driver>,
    req: csi::ControllerPublishVolumeRequest,
) -> Result<csi::ControllerPublishVolumeResponse> {
    validate::secrets(&req.secrets)?;
    let id = validate::volume_id(&req.volume_id)?.to_string();
    let node = validate::request_node_id(&req.node_id)?.to_string();
    let cap = convert::required_capability(req.volume_capability.as_ref())?;
    validate::map("volume_context", &req.volume_context)?;
    let readonly = req.readonly;
    if let Some(why) = d.unserved(&id) {
        return Err(Error::WrongState(why));
    }
    let vid = id.clone();
    // The volume as the controller finds it: an NFS id without a record
    // here names a volume only when the share's marker says so (a record
    // made from the id alone published a volume never created).
    d.with_controller_volume(&vid, move |d, mut rec, kind| {
        d.require_not_deleting(&rec)?;
        if !rec.node.is_empty() && *rec.node != *node {
            return Err(Error::NotFound(format!(
                "node {node} not found: volume {id} is local to node {}",
                rec.node
            )));
        }
        kind.check_capability(&cap)?;
        let want = Attachment::new(readonly, cap.clone());
        if let Some(have) = rec.published.get(&node) {
            // What a newer berth recorded beside the grant is not asked
            // for by a retry.
            if have.same_as(&want) {
                return Ok(());
            }
            return Err(Error::Conflict(format!(
                "volume {id} is already published to node {node} with a different capability or read-only flag"
            )));
        }
        if cap.access_mode.single_node() {
            if let Some(other) = rec.published.keys().find(|n| **n != node) {
                return Err(Error::WrongState(format!(
                    "volume {id} has a single-node access mode and is published to node {other}"
                )));
            }
        }
        let max = d.cfg.max_volumes_per_node;
        if max > 0 {
            let n = d.store.filter(|r| r.published.contains_key(&node)).len() as i64;
            if n >= max {
                return Err(Error::NoSpace(format!(
                    "node {node} already has {n} volumes published (--max-volumes-per-node {max})"
                )));
            }
        }
        rec.published.insert(node, want);
        d.store.put(&rec)?;
        Ok(())
    })
    .await?;
    Ok(csi::ControllerPublishVolumeResponse {
        publish_context: HashMap::new(),
    })
}
