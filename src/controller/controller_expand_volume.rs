//! ControllerExpandVolume: validates the request and records the new
//! capacity of a volume this instance knows; the volume's node grows it
//! (NodeExpandVolume, `node_expansion_required`). Node-local volumes live
//! in the store of their own node, and one leader-elected external-resizer
//! serves the whole cluster: for a volume id of a served node-local kind
//! that this instance does not know and that another node made (its id's
//! node tag is not ours; ids made before the tags count as another's), the
//! answer is the requested size with `node_expansion_required`, and the
//! node does the checks and the work. One this node made is NOT_FOUND.
//! An NFS id without a record is expanded only when its directory on the
//! share carries the id's marker (NOT_FOUND otherwise). A volume recorded
//! here whose kind (or NFS share) is no longer served is
//! FAILED_PRECONDITION (`Driver::unserved`). A kind's `op_deadline`
//! bounds the call (`Driver::run_within`).
use std::sync::Arc;

use super::create_volume::Range;
use crate::convert;
use crate::csi::v1 as csi;
use crate::driver::{vol_key, Driver};
use crate::error::{Error, Result};
use crate::kinds::{node_tag, Growth};
use crate::state::Phase;
use crate::validate;

pub async fn handle(
    d: Arc<Driver>,
    req: csi::ControllerExpandVolumeRequest,
) -> Result<csi::ControllerExpandVolumeResponse> {
    validate::secrets(&req.secrets)?;
    if !d.kinds().any(|k| k.expandable()) {
        return Err(Error::Unsupported(
            "volume expansion is not supported by the volume kinds served here".into(),
        ));
    }
    let id = validate::volume_id(&req.volume_id)?.to_string();
    // REQUIRED, and a CapacityRange specifies at least one of its fields
    // (0 is unspecified): one with neither asks for no size at all.
    let range = match req.capacity_range.as_ref() {
        Some(r) if r.required_bytes != 0 || r.limit_bytes != 0 => Range::from_proto(Some(r))?,
        Some(_) => {
            return Err(Error::Invalid(
                "capacity_range must specify required_bytes or limit_bytes".into(),
            ))
        }
        None => return Err(Error::Invalid("capacity_range is required".into())),
    };
    let cap = req
        .volume_capability
        .as_ref()
        .map(convert::capability)
        .transpose()?;
    let growth = Growth {
        required: range.required,
        limit: range.limit,
    };
    // A volume recorded here whose kind (or NFS share) this configuration
    // no longer serves exists: not NOT_FOUND, and nothing grows.
    if let Some(why) = d.unserved(&id) {
        return Err(Error::WrongState(why));
    }
    let kind = d
        .kinds()
        .find(|k| k.owns_id(&id))
        .cloned()
        .ok_or_else(|| Error::NotFound(format!("volume {id} does not exist")))?;
    // The spec's "Exceeds capabilities": a capability the volume's kind
    // does not offer is INVALID_ARGUMENT before anything grows.
    if let Some(c) = &cap {
        kind.check_capability(c)?;
    }
    let guard = d.locks.try_lock(vol_key(&id))?;
    // A kind whose storage may stop answering (NFS: the look at the share
    // for an id without a record) answers DEADLINE_EXCEEDED after its
    // deadline; the work keeps the guard until it ends (a retry meanwhile
    // is ABORTED). Before 2026-12-07 the call waited with it, without end.
    let deadline = kind.op_deadline();
    let e = d
        .run_within(guard, deadline, move |d| match d.store.get(&id) {
            Some(rec) if rec.phase == Phase::Ready => {
                let e = d.kind(rec.kind)?.controller_expand(Some(&rec), growth)?;
                // Kinds that check the room when they grow (local) have
                // recorded the new size already.
                if let Some(mut now) = d.store.get(&rec.id) {
                    if now.capacity_bytes != e.capacity_bytes {
                        now.capacity_bytes = e.capacity_bytes;
                        d.store.put(&now)?;
                    }
                }
                Ok(e)
            }
            // A delete that did not finish (its retry does): the CO asked
            // for it gone (`Driver::require_not_deleting`). An unfinished
            // create was never handed out (`Driver::volume`). Neither is
            // an operation in progress (that holds the guard: ABORTED).
            Some(rec) => {
                d.require_not_deleting(&rec)?;
                Err(Error::NotFound(format!("volume {id} does not exist")))
            }
            // An id this node made (its tag is ours) lives here or nowhere.
            None if kind.node_local() && kind.node_tag_of(&id) == Some(node_tag(&d.node_id)) => {
                Err(Error::NotFound(format!("volume {id} does not exist")))
            }
            None if kind.node_local() => kind.controller_expand(None, growth),
            // A self-describing id (NFS) whose record this controller lost
            // (its state is not persistent in deploy/): expand from the id
            // once the storage proves the volume exists (its marker), as
            // ControllerGetVolume does; a deleted volume is NOT_FOUND.
            None => match kind.confirm_from_id(&id)? {
                Some(rec) => kind.controller_expand(Some(&rec), growth),
                None => Err(Error::NotFound(format!("volume {id} does not exist"))),
            },
        })
        .await?;
    Ok(csi::ControllerExpandVolumeResponse {
        capacity_bytes: e.capacity_bytes,
        node_expansion_required: e.node_expansion_required,
    })
}
