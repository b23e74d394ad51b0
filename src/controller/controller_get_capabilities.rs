//! ControllerGetCapabilities: what the controller implements for the kinds
//! it serves. Node-local kinds add the attach phase and per-node capacity;
//! an NFS-only controller has neither; expansion comes with an expandable
//! kind (every kind now); snapshots (with GetSnapshot) and cloning with a kind that
//! makes them. Modification is not advertised (its RPC answers
//! UNIMPLEMENTED).
use crate::csi::v1 as csi;
use crate::csi::v1::controller_service_capability::rpc::Type;
use crate::driver::Driver;

/// The capabilities of this controller.
pub fn capabilities(d: &Driver) -> Vec<Type> {
    let mut v = vec![
        Type::CreateDeleteVolume,
        Type::ListVolumes,
        Type::GetVolume,
        Type::VolumeCondition,
        Type::SingleNodeMultiWriter,
    ];
    if d.kinds().any(|k| k.node_local()) {
        v.extend([
            Type::PublishUnpublishVolume,
            Type::ListVolumesPublishedNodes,
            Type::PublishReadonly,
            Type::GetCapacity,
        ]);
    }
    if d.kinds().any(|k| k.expandable()) {
        v.push(Type::ExpandVolume);
    }
    if d.kinds().any(|k| k.snapshots()) {
        v.extend([
            Type::CreateDeleteSnapshot,
            Type::ListSnapshots,
            Type::GetSnapshot,
            Type::CloneVolume,
        ]);
    }
    v
}

pub fn handle(d: &Driver) -> csi::ControllerGetCapabilitiesResponse {
    csi::ControllerGetCapabilitiesResponse {
        capabilities: capabilities(d)
            .into_iter()
            .map(|t| csi::ControllerServiceCapability {
                r#type: Some(csi::controller_service_capability::Type::Rpc(
                    csi::controller_service_capability::Rpc { r#type: t as i32 },
                )),
            })
            .collect(),
    }
}
