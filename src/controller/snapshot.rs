//! Building CSI `Snapshot` messages from records, and the guard keys of
//! snapshots.
use crate::csi::v1 as csi;
use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::state::{Phase, SnapshotRecord};

/// UNIMPLEMENTED unless a served kind makes snapshots (the snapshot
/// capabilities are not advertised then).
pub fn require(d: &Driver) -> Result<()> {
    if d.kinds().any(|k| k.snapshots()) {
        Ok(())
    } else {
        Err(Error::Unsupported(
            "snapshots are not supported by the volume kinds served here".into(),
        ))
    }
}

pub fn to_proto(s: &SnapshotRecord) -> csi::Snapshot {
    csi::Snapshot {
        size_bytes: s.size_bytes,
        snapshot_id: s.id.clone(),
        source_volume_id: s.source_volume_id.clone(),
        creation_time: Some(prost_types::Timestamp {
            seconds: s.created_secs,
            nanos: s.created_nanos,
        }),
        ready_to_use: s.phase == Phase::Ready,
        group_snapshot_id: String::new(),
    }
}

/// `to_proto` of the snapshot as it is now: ready to use only when its
/// record says Ready and its stored copy is there as it was made, the copy
/// a restore from it takes (`VolumeKind::snapshot_flaw`: one look, nothing
/// read). A copy deleted or damaged by hand makes it not ready, as
/// CreateVolume from it is refused. So does a kind taken out of `--kinds`,
/// or, NFS, a share taken out of `--nfs-allowed-shares`
/// (`Driver::unserved_snapshot`), its copy not looked at. Blocking (a look
/// at the disk).
pub fn to_proto_checked(d: &Driver, s: &SnapshotRecord) -> csi::Snapshot {
    let mut p = to_proto(s);
    if p.ready_to_use {
        if let Some(why) = d.unserved_snapshot(s) {
            tracing::debug!(snapshot_id = %s.id, why = %why, "snapshot not served: not ready to use");
            p.ready_to_use = false;
            return p;
        }
        if let Some(flaw) = d.kind(s.kind).ok().and_then(|k| k.snapshot_flaw(s)) {
            tracing::debug!(snapshot_id = %s.id, flaw = %flaw, "snapshot's copy is {}: not ready to use", flaw.state());
            p.ready_to_use = false;
        }
    }
    p
}

/// Guard key of a snapshot id.
pub fn snap_key(id: &str) -> String {
    format!("snap/{id}")
}

/// Guard key of a snapshot name.
pub fn snap_name_key(name: &str) -> String {
    format!("snapname/{name}")
}
