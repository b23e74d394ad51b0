//! Building CSI `Volume` and `VolumeStatus` messages from records.
use crate::convert::node_topology;
use crate::csi::v1 as csi;
use crate::driver::Driver;
use crate::state::{ContentSource, VolumeRecord};

pub fn to_proto(d: &Driver, rec: &VolumeRecord) -> csi::Volume {
    csi::Volume {
        capacity_bytes: rec.capacity_bytes,
        volume_id: rec.id.clone(),
        volume_context: rec
            .context
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        content_source: rec.content_source().map(content_source),
        accessible_topology: if rec.node.is_empty() {
            vec![]
        } else {
            vec![node_topology(&d.topology_key, &rec.node)]
        },
    }
}

fn content_source(s: &ContentSource) -> csi::VolumeContentSource {
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    csi::VolumeContentSource {
        r#type: Some(match s {
            ContentSource::Snapshot(id) => Type::Snapshot(SnapshotSource {
                snapshot_id: id.clone(),
            }),
            ContentSource::Volume(id) => Type::Volume(VolumeSource {
                volume_id: id.clone(),
            }),
        }),
    }
}

/// The volume's condition: its kind's look at its storage, or, for a
/// volume this configuration does not serve (`Driver::unserved`: its kind
/// out of `--kinds`, its NFS share out of `--nfs-allowed-shares`),
/// abnormal saying why, its storage not looked at (a share no longer
/// allowed is not mounted).
pub fn condition(d: &Driver, rec: &VolumeRecord) -> csi::VolumeCondition {
    if let Some(why) = d.unserved(&rec.id) {
        return csi::VolumeCondition {
            abnormal: true,
            message: why,
        };
    }
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
