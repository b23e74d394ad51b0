//! GetPluginCapabilities: the Controller service (when served), volume
//! accessibility constraints (when a node-local kind is served) and online
//! volume expansion (when an expandable kind is served).
use crate::csi::v1 as csi;
use crate::csi::v1::plugin_capability::service::Type;
use crate::driver::Driver;

fn service(t: Type) -> csi::PluginCapability {
    csi::PluginCapability {
        r#type: Some(csi::plugin_capability::Type::Service(
            csi::plugin_capability::Service { r#type: t as i32 },
        )),
    }
}

pub fn handle(d: &Driver) -> csi::GetPluginCapabilitiesResponse {
    let mut capabilities = Vec::new();
    if d.cfg.mode.controller() {
        capabilities.push(service(Type::ControllerService));
    }
    if d.kinds().any(|k| k.node_local()) {
        capabilities.push(service(Type::VolumeAccessibilityConstraints));
    }
    if d.kinds().any(|k| k.expandable()) {
        // Block volumes grow while published (resize2fs / xfs_growfs on
        // the mounted filesystem).
        capabilities.push(csi::PluginCapability {
            r#type: Some(csi::plugin_capability::Type::VolumeExpansion(
                csi::plugin_capability::VolumeExpansion {
                    r#type: csi::plugin_capability::volume_expansion::Type::Online as i32,
                },
            )),
        });
    }
    csi::GetPluginCapabilitiesResponse { capabilities }
}
