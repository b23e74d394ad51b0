//! NodeGetVolumeStats: bytes and inodes of the volume at `volume_path`
//! (statvfs; a local volume with a project quota: its own usage and limits
//! from the quota), and its condition. NOT_FOUND when the volume is not
//! there.
use std::sync::Arc;

use crate::csi::v1 as csi;
use crate::csi::v1::volume_usage::Unit;
use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::kinds::VolumeStats;
use crate::validate;

fn usage(unit: Unit, total: u64, available: u64, used: u64) -> csi::VolumeUsage {
    let c = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    csi::VolumeUsage {
        available: c(available),
        total: c(total),
        used: c(used),
        unit: unit as i32,
    }
}

pub async fn handle(
    d: Arc<Driver>,
    req: csi::NodeGetVolumeStatsRequest,
) -> Result<csi::NodeGetVolumeStatsResponse> {
    let id = validate::volume_id(&req.volume_id)?.to_string();
    if req.volume_path.is_empty() {
        return Err(Error::Invalid("volume_path is required".into()));
    }
    // A path that could never hold a volume (relative, "..") holds none.
    let path = validate::abs_path("volume_path", &req.volume_path)
        .map_err(|e| Error::NotFound(format!("volume {id} is not available there: {e}")))?;
    if !req.staging_target_path.is_empty() {
        validate::abs_path("staging_target_path", &req.staging_target_path)?;
    }
    // Read-only: no guard, so kubelet's periodic stats never make a
    // concurrent mount operation fail with ABORTED.
    tokio::task::spawn_blocking(move || {
        let rec = d.volume(&id)?;
        let kind = d.kind(rec.kind)?;
        let (stats, health) = kind.stats_and_health(&rec, &path)?;
        let usage = match stats.block_size_only {
            // No numbers (an NFS server that does not answer): the
            // condition says why.
            None if health.abnormal && stats == VolumeStats::default() => vec![],
            Some(size) => vec![csi::VolumeUsage {
                available: 0,
                total: size,
                used: 0,
                unit: Unit::Bytes as i32,
            }],
            None => {
                let u = stats.usage;
                vec![
                    usage(Unit::Bytes, u.total_bytes, u.available_bytes, u.used_bytes),
                    usage(Unit::Inodes, u.total_inodes, u.free_inodes, u.used_inodes),
                ]
            }
        };
        Ok(csi::NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(csi::VolumeCondition {
                abnormal: health.abnormal,
                message: health.message,
            }),
        })
    })
    .await
    .map_err(|e| Error::Internal(format!("stats task failed: {e}")))?
}
