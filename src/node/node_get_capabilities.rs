//! NodeGetCapabilities.
use crate::csi::v1 as csi;
use crate::csi::v1::node_service_capability::rpc::Type;

pub const CAPABILITIES: &[Type] = &[
    Type::StageUnstageVolume,
    Type::GetVolumeStats,
    Type::VolumeCondition,
    Type::SingleNodeMultiWriter,
];

pub fn handle() -> csi::NodeGetCapabilitiesResponse {
    csi::NodeGetCapabilitiesResponse {
        capabilities: CAPABILITIES
            .iter()
            .map(|t| csi::NodeServiceCapability {
                r#type: Some(csi::node_service_capability::Type::Rpc(
                    csi::node_service_capability::Rpc { r#type: *t as i32 },
                )),
            })
            .collect(),
    }
}
