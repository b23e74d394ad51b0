//! NodeGetCapabilities: staging is advertised when a node-local kind is
//! served (an NFS-only node mounts straight into the target), expansion
//! when an expandable kind (local, block, NFS) is.
use crate::csi::v1 as csi;
use crate::csi::v1::node_service_capability::rpc::Type;
use crate::driver::Driver;

/// The capabilities of this node service.
pub fn capabilities(d: &Driver) -> Vec<Type> {
    let mut v = Vec::new();
    if d.kinds().any(|k| k.node_local()) {
        v.push(Type::StageUnstageVolume);
    }
    v.extend([
        Type::GetVolumeStats,
        Type::VolumeCondition,
        Type::SingleNodeMultiWriter,
    ]);
    if d.kinds().any(|k| k.expandable()) {
        v.push(Type::ExpandVolume);
    }
    v
}

pub fn handle(d: &Driver) -> csi::NodeGetCapabilitiesResponse {
    csi::NodeGetCapabilitiesResponse {
        capabilities: capabilities(d)
            .into_iter()
            .map(|t| csi::NodeServiceCapability {
                r#type: Some(csi::node_service_capability::Type::Rpc(
                    csi::node_service_capability::Rpc { r#type: t as i32 },
                )),
            })
            .collect(),
    }
}
