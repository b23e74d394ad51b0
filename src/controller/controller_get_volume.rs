//! ControllerGetVolume: the volume, the nodes it is published to, and its
//! condition. A volume with a self-describing id (NFS) and no record here
//! exists only when its storage says so (the directory's marker): NOT_FOUND
//! otherwise. A volume recorded here whose kind (or NFS share) this
//! configuration no longer serves exists: it is answered, with an abnormal
//! condition saying why (`Driver::unserved_record`), not NOT_FOUND, which
//! has a CO take it for gone. A volume whose record says Deleting (a
//! DeleteVolume that did not finish) is NOT_FOUND: the CO asked for it
//! gone (`Driver::require_not_deleting`). A kind's `op_deadline` bounds
//! the call (`Driver::query_within`): an NFS server that stops answering
//! makes it DEADLINE_EXCEEDED, and the same volume's calls ABORTED until
//! the look ends.
use std::sync::Arc;

use super::volume;
use crate::csi::v1 as csi;
use crate::driver::{vol_key, Driver};
use crate::error::Result;
use crate::validate;

pub async fn handle(
    d: Arc<Driver>,
    req: csi::ControllerGetVolumeRequest,
) -> Result<csi::ControllerGetVolumeResponse> {
    let id = validate::volume_id(&req.volume_id)?.to_string();
    // Blocking: it may mount an NFS share and look at the volume's marker,
    // under the volume's guard within the kind's deadline
    // (`Driver::query_within`).
    let deadline = d.kind_of_id(&id).and_then(|k| k.op_deadline());
    d.query_within(vol_key(&id), deadline, "ControllerGetVolume", move |d| {
        let rec = match d.unserved_record(&id) {
            Some(rec) => rec,
            None => d.controller_volume(&id)?,
        };
        d.require_not_deleting(&rec)?;
        Ok(csi::ControllerGetVolumeResponse {
            volume: Some(volume::to_proto(d, &rec)),
            status: Some(csi::controller_get_volume_response::VolumeStatus {
                published_node_ids: volume::published_nodes(&rec),
                volume_condition: Some(volume::condition(d, &rec)),
            }),
        })
    })
    .await
}
