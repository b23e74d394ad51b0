//! ControllerGetCapabilities: what the controller implements. Snapshots,
//! cloning, expansion and modification are not advertised (their RPCs answer
//! UNIMPLEMENTED).
use crate::csi::v1 as csi;
use crate::csi::v1::controller_service_capability::rpc::Type;
use crate::driver::Driver;

pub const CAPABILITIES: &[Type] = &[
    Type::CreateDeleteVolume,
    Type::PublishUnpublishVolume,
    Type::ListVolumes,
    Type::GetCapacity,
    Type::ListVolumesPublishedNodes,
    Type::GetVolume,
    Type::VolumeCondition,
    Type::SingleNodeMultiWriter,
    Type::PublishReadonly,
];

pub fn handle(_d: &Driver) -> csi::ControllerGetCapabilitiesResponse {
    csi::ControllerGetCapabilitiesResponse {
        capabilities: CAPABILITIES
            .iter()
            .map(|t| csi::ControllerServiceCapability {
                r#type: Some(csi::controller_service_capability::Type::Rpc(
                    csi::controller_service_capability::Rpc { r#type: *t as i32 },
                )),
            })
            .collect(),
    }
}
