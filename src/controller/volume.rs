//! Building CSI `Volume` and `VolumeStatus` messages from records.
use crate::convert::node_topology;
use crate::csi::v1 as csi;
use crate::driver::Driver;
use crate::state::VolumeRecord;

pub fn to_proto(d: &Driver, rec: &VolumeRecord) -> csi::Volume {
    csi::Volume {
        capacity_bytes: rec.capacity_bytes,
        volume_id: rec.id.clone(),
        volume_context: rec.context.clone().into_iter().collect(),
        content_source: None,
        accessible_topology: if rec.node.is_empty() {
            vec![]
        } else {
            vec![node_topology(&d.topology_key, &rec.node)]
        },
    }
}

pub fn condition(d: &Driver, rec: &VolumeRecord) -> csi::VolumeCondition {
    let h = match d.kind(rec.kind) {
        Ok(k) => k.health(rec),
        Err(e) => crate::kinds::Health::abnormal(e.to_string()),
    };
    csi::VolumeCondition {
        abnormal: h.abnormal,
        message: h.message,
    }
}

pub fn published_nodes(rec: &VolumeRecord) -> Vec<String> {
    rec.published.keys().cloned().collect()
}
