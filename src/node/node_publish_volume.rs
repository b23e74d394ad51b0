//! NodePublishVolume: bind-mounts the staged volume into the pod's target
//! path (created by the driver), read-only when asked. Kinds that do not
//! stage (NFS) mount straight at the target and need no staging path.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::convert;
use crate::csi::v1 as csi;
use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::kinds::PublishArgs;
use crate::validate;

pub async fn handle(
    d: Arc<Driver>,
    req: csi::NodePublishVolumeRequest,
) -> Result<csi::NodePublishVolumeResponse> {
    validate::secrets(&req.secrets)?;
    let id = validate::volume_id(&req.volume_id)?;
    let target = d.protected.check("target_path", &req.target_path)?;
    let cap = convert::required_capability(req.volume_capability.as_ref())?;
    let staging = if req.staging_target_path.is_empty() {
        None
    } else {
        Some(
            d.protected
                .check("staging_target_path", &req.staging_target_path)?,
        )
    };
    // A target at or below the staging path is inside the volume itself
    // (publishing would make a directory in its data and mount the volume
    // inside itself); a staging path below the target would be hidden by
    // the publish.
    if let Some(s) = &staging {
        refuse_nested(target.path(), s.path())?;
    }
    validate::map("publish_context", &req.publish_context)?;
    validate::map("volume_context", &req.volume_context)?;
    let readonly = req.readonly;
    // The target's guard (and the staging path's): another volume's call
    // on either path waits for none and is ABORTED.
    let mut paths = vec![target.path().to_path_buf()];
    paths.extend(staging.as_ref().map(|s| s.path().to_path_buf()));
    let path_refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    d.with_volume_at(id, &path_refs, move |d, rec, kind| {
        let (target, target_real) = d.protected.resolve(d.os.files.as_ref(), target)?;
        let staging = staging.map(|s| d.protected.resolve(d.os.files.as_ref(), s)).transpose()?;
        let staging_real = staging.as_ref().and_then(|(_, r)| r.clone());
        // The same check on the places the kernel reaches (a symlink in a
        // parent can make two spellings one place), before their guards.
        if let Some((s, _)) = &staging {
            refuse_nested(
                target_real.as_deref().unwrap_or(&target),
                staging_real.as_deref().unwrap_or(s),
            )?;
        }
        let _target_real = d.guard_real_path(target_real.as_deref())?;
        let _staging_real = d.guard_real_path(staging_real.as_deref())?;
        let staging = staging.map(|(s, _)| s);
        d.require_not_deleting(&rec)?;
        d.require_local_here(&rec)?;
        let staging = match &staging {
            Some(s) => s.as_path(),
            None if !kind.node_local() => Path::new(""),
            None => {
                // The CSI spec's NodePublishVolume table: STAGE_UNSTAGE_VOLUME
                // is advertised and no staging path was given:
                // FAILED_PRECONDITION.
                return Err(Error::WrongState(
                    "staging_target_path is required: this driver stages volumes (STAGE_UNSTAGE_VOLUME)"
                        .into(),
                ))
            }
        };
        kind.publish(
            &rec,
            &PublishArgs {
                staging,
                target: &target,
                capability: &cap,
                readonly,
            },
        )
    })
    .await?;
    Ok(csi::NodePublishVolumeResponse {})
}

/// INVALID_ARGUMENT when the target is the staging path, or either is
/// inside the other.
fn refuse_nested(target: &Path, staging: &Path) -> Result<()> {
    if target.starts_with(staging) || staging.starts_with(target) {
        return Err(Error::Invalid(
            "target_path and staging_target_path must differ and neither may be inside the other"
                .into(),
        ));
    }
    Ok(())
}
