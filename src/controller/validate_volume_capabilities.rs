//! ValidateVolumeCapabilities: confirms the capabilities when the volume's
//! kind supports all of them (and they fit how the volume was created).
use std::sync::Arc;

use crate::convert;
use crate::csi::v1 as csi;
use crate::driver::Driver;
use crate::error::Result;
use crate::state::AccessType;
use crate::validate;

pub async fn handle(
    d: Arc<Driver>,
    req: csi::ValidateVolumeCapabilitiesRequest,
) -> Result<csi::ValidateVolumeCapabilitiesResponse> {
    let id = validate::volume_id(&req.volume_id)?;
    let caps = convert::capabilities(&req.volume_capabilities)?;
    validate::map("volume_context", &req.volume_context)?;
    validate::map("parameters", &req.parameters)?;
    let rec = d.volume(id)?;
    let kind = d.kind(rec.kind)?;
    let created_block = rec
        .capabilities
        .iter()
        .all(|c| matches!(c.access_type, AccessType::Block));
    let mut message = String::new();
    for c in &caps {
        if let Err(e) = kind.check_capability(c) {
            message = e.to_string();
            break;
        }
        if created_block != matches!(c.access_type, AccessType::Block) {
            message =
                "the access type (block or mount) differs from the one the volume was created with"
                    .into();
            break;
        }
    }
    if !message.is_empty() {
        return Ok(csi::ValidateVolumeCapabilitiesResponse {
            confirmed: None,
            message,
        });
    }
    Ok(csi::ValidateVolumeCapabilitiesResponse {
        confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
            volume_context: req.volume_context,
            volume_capabilities: req.volume_capabilities,
            parameters: req.parameters,
            mutable_parameters: req.mutable_parameters,
        }),
        message: String::new(),
    })
}
