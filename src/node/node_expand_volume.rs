//! NodeExpandVolume: grows a volume on its node (the kind does the work:
//! backing file, device, filesystem) and records the capacity it has now.
//! UNIMPLEMENTED when no served kind can be expanded (EXPAND_VOLUME is then
//! not advertised).
use std::sync::Arc;

use crate::controller::Range;
use crate::convert;
use crate::csi::v1 as csi;
use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::kinds::{Growth, NodeExpandArgs};
use crate::validate;

pub async fn handle(
    d: Arc<Driver>,
    req: csi::NodeExpandVolumeRequest,
) -> Result<csi::NodeExpandVolumeResponse> {
    validate::secrets(&req.secrets)?;
    if !d.kinds().any(|k| k.expandable()) {
        return Err(Error::Unsupported(
            "volume expansion is not supported by the volume kinds served here".into(),
        ));
    }
    let id = validate::volume_id(&req.volume_id)?.to_string();
    if req.volume_path.is_empty() {
        return Err(Error::Invalid("volume_path is required".into()));
    }
    let staging = if req.staging_target_path.is_empty() {
        None
    } else {
        Some(validate::abs_path(
            "staging_target_path",
            &req.staging_target_path,
        )?)
    };
    let range = Range::from_proto(req.capacity_range.as_ref())?;
    let cap = req
        .volume_capability
        .as_ref()
        .map(convert::capability)
        .transpose()?;
    let volume_path = req.volume_path.clone();
    let size = d
        .with_volume(&id, move |d, rec, kind| {
            d.require_local_here(&rec)?;
            // Nothing of a volume the CO asked deleted is grown.
            d.require_not_deleting(&rec)?;
            // The spec's "Exceeds capabilities": a capability the volume's
            // kind does not offer is INVALID_ARGUMENT before anything grows.
            if let Some(c) = &cap {
                kind.check_capability(c)?;
            }
            // A path that could never hold a volume holds none.
            let path = validate::abs_path("volume_path", &volume_path).map_err(|e| {
                Error::NotFound(format!("volume {} is not available there: {e}", rec.id))
            })?;
            let size = kind.node_expand(
                &rec,
                &NodeExpandArgs {
                    volume_path: &path,
                    staging: staging.as_deref(),
                    capability: cap.as_ref(),
                    growth: Growth {
                        required: range.required,
                        limit: range.limit,
                    },
                },
            )?;
            if let Some(mut now) = d.store.get(&rec.id) {
                if now.capacity_bytes != size {
                    now.capacity_bytes = size;
                    d.store.put(&now)?;
                }
            }
            Ok(size)
        })
        .await?;
    Ok(csi::NodeExpandVolumeResponse {
        capacity_bytes: size,
    })
}
