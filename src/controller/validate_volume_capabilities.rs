//! ValidateVolumeCapabilities: confirms the capabilities when the volume's
//! kind supports all of them (and they fit how the volume was created), the
//! parameters, when given, when they describe the volume (a `kind` key must
//! name its kind; without one, parameters describe the default kind's), and
//! the volume_context, when given, when it is the
//! volume's own. NOT_FOUND for
//! a volume that does not exist (an NFS id without a record is looked up on
//! the share, like ControllerGetVolume). A volume recorded here whose kind
//! (or NFS share) this configuration no longer serves exists, and its
//! kind's checks are out of reach: nothing is confirmed, and the message
//! says why (`Driver::unserved`): an answer the spec gives this RPC for
//! capabilities it does not confirm, not NOT_FOUND (the volume exists) nor
//! a code its error table does not list. A volume whose record says
//! Deleting (a DeleteVolume that did not finish) is NOT_FOUND, its
//! capabilities not confirmed (`Driver::require_not_deleting`). A kind's
//! `op_deadline` bounds the call (`Driver::query_within`).
use std::sync::Arc;

use super::{kind_parameters, KIND_KEY};
use crate::convert;
use crate::csi::v1 as csi;
use crate::driver::{vol_key, Driver};
use crate::error::Result;
use crate::state::{AccessType, Kind};
use crate::validate;

pub async fn handle(
    d: Arc<Driver>,
    req: csi::ValidateVolumeCapabilitiesRequest,
) -> Result<csi::ValidateVolumeCapabilitiesResponse> {
    validate::secrets(&req.secrets)?;
    let id = validate::volume_id(&req.volume_id)?.to_string();
    let caps = convert::capabilities(&req.volume_capabilities)?;
    let context = validate::map("volume_context", &req.volume_context)?;
    let params = validate::map("parameters", &req.parameters)?;
    validate::map("mutable_parameters", &req.mutable_parameters)?;
    let has_mutable = !req.mutable_parameters.is_empty();
    if let Some(why) = d.unserved(&id) {
        if let Some(rec) = d.store.get(&id) {
            d.require_not_deleting(&rec)?;
        }
        return Ok(csi::ValidateVolumeCapabilitiesResponse {
            confirmed: None,
            message: why,
        });
    }
    // Blocking: it may mount an NFS share and look at the volume's
    // marker, under the volume's guard within the kind's deadline
    // (`Driver::query_within`).
    let deadline = d.kind_of_id(&id).and_then(|k| k.op_deadline());
    let key = vol_key(&id);
    let message = d
        .query_within(key, deadline, "ValidateVolumeCapabilities", move |d2| {
        let rec = d2.controller_volume(&id)?;
        d2.require_not_deleting(&rec)?;
        let kind = d2.kind(rec.kind)?;
        let created_block = rec
            .capabilities
            .iter()
            .all(|c| matches!(c.access_type, AccessType::Block));
        for c in &caps {
            if let Err(e) = kind.check_capability(c) {
                return Ok(e.to_string());
            }
            if let Err(why) = kind.capability_fits(&rec, c) {
                return Ok(why);
            }
            if created_block != matches!(c.access_type, AccessType::Block) {
                return Ok("the access type (block or mount) differs from the one the volume was created with".into());
            }
        }
        // The parameters must make CreateVolume make a volume of this kind:
        // a `kind` parameter must name it, and parameters for a kind without
        // one describe a volume of the default kind (the first served).
        // Parameters Kubernetes adds (csi.storage.k8s.io/...) alone describe
        // no kind.
        let own = kind_parameters(&params);
        match params.get(KIND_KEY) {
            Some(k) if Kind::parse(&k.to_ascii_lowercase()) != Some(rec.kind) => {
                return Ok(format!(
                    "parameter kind {k:?} does not name the volume's kind ({})",
                    rec.kind
                ));
            }
            None if !own.is_empty() && d2.cfg.kinds.first() != Some(&rec.kind) => {
                return Ok(format!(
                    "the parameters name no kind, so they describe a volume of the default kind ({}); this volume is {}",
                    d2.cfg
                        .kinds
                        .first()
                        .map(|k| k.to_string())
                        .unwrap_or_default(),
                    rec.kind
                ));
            }
            _ => {}
        }
        if !params.is_empty() {
            if let Err(why) = kind.parameters_match(&rec, &own) {
                return Ok(why);
            }
        }
        // The spec: volume_context, when given, MUST match the volume's
        // (the one CreateVolume returned).
        if !context.is_empty() && context != *rec.context {
            return Ok(
                "the volume_context differs from the volume's (the one CreateVolume returned)"
                    .into(),
            );
        }
        if has_mutable {
            return Ok("mutable_parameters are not supported (no MODIFY_VOLUME capability)".into());
        }
        Ok(String::new())
    })
    .await?;
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
