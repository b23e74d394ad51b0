//! GetCapacity: free space of the pool the parameters select, minus what
//! existing volumes were promised (for kinds whose capacity is a promise)
//! and may still write (local volumes with project quotas: the promises
//! minus what they wrote); the block file pool's free space leaves out what
//! local volumes on the same filesystem may still write (the block kind's);
//! 0 for another node's topology segment or for capabilities the kind cannot
//! serve, and when the largest volume that fits is smaller than the
//! smallest one the kind makes for the capabilities (a block file volume
//! formatted xfs: 300 MiB), which `minimum_volume_size` names.
use std::sync::Arc;

use super::create_volume::{kind_of, kind_parameters};
use crate::convert;
use crate::csi::v1 as csi;
use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::state::Kind;
use crate::validate;

pub async fn handle(
    d: Arc<Driver>,
    req: csi::GetCapacityRequest,
) -> Result<csi::GetCapacityResponse> {
    let params = validate::map("parameters", &req.parameters)?;
    let kind = kind_of(&d, &params)?;
    let imp = d.kind(kind)?.clone();
    imp.check_parameters(&kind_parameters(&params))?;
    let zero = csi::GetCapacityResponse {
        available_capacity: 0,
        maximum_volume_size: Some(0),
        minimum_volume_size: None,
    };
    let mut caps = Vec::with_capacity(req.volume_capabilities.len());
    for c in &req.volume_capabilities {
        let cap = convert::capability(c)?;
        if imp.check_capability(&cap).is_err() {
            return Ok(zero);
        }
        caps.push(cap);
    }
    if matches!(kind, Kind::Local | Kind::Block) {
        if let Some(t) = &req.accessible_topology {
            if t.segments.get(&d.topology_key) != Some(&d.node_id) {
                return Ok(zero);
            }
        }
    }
    let kparams = kind_parameters(&params);
    // The smallest volume these capabilities get (xfs: 300 MiB): when the
    // largest that fits is smaller, none fits (a CreateVolume here would
    // be refused, so the scheduler must not pick this node for it).
    let min = imp.min_size_for(&kparams, &caps)?;
    let promises = imp.capacity_is_promise();
    // What volumes wrote within their promises is read before the free
    // space (see `VolumeKind::written_within_promises`).
    let (written, pool) = tokio::task::spawn_blocking(move || {
        let written = imp.written_within_promises()?;
        Ok::<_, Error>((written, imp.capacity_for(&kparams)?))
    })
    .await
    .map_err(|e| Error::Internal(format!("capacity task failed: {e}")))??;
    // Promises read last: a volume created meanwhile is counted whole; one
    // deleted meanwhile no longer has its writes added back.
    let (promised, written) = d.store.promised_and(kind, |present| written.of(present));
    let promised = if promises { promised } else { 0 };
    let available = pool
        .free_bytes
        .saturating_add(written)
        .saturating_sub(promised)
        .max(0);
    let largest = available.min(pool.max_volume_bytes);
    if min.is_some_and(|m| largest < m) {
        return Ok(csi::GetCapacityResponse {
            minimum_volume_size: min,
            ..zero
        });
    }
    Ok(csi::GetCapacityResponse {
        available_capacity: available,
        maximum_volume_size: Some(largest),
        minimum_volume_size: min,
    })
}
