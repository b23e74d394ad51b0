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

/// Guard key of a snapshot id.
pub fn snap_key(id: &str) -> String {
    format!("snap/{id}")
}

/// Guard key of a snapshot name.
pub fn snap_name_key(name: &str) -> String {
    format!("snapname/{name}")
}
