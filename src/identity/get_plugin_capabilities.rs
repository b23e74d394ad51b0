//! GetPluginCapabilities: the Controller service (when served) and volume
//! accessibility constraints (when a node-local kind is served).
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
    csi::GetPluginCapabilitiesResponse { capabilities }
}
