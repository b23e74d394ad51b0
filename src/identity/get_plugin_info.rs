//! GetPluginInfo: the driver name and version.
use std::collections::HashMap;

use crate::csi::v1 as csi;
use crate::driver::Driver;

pub fn handle(d: &Driver) -> csi::GetPluginInfoResponse {
    csi::GetPluginInfoResponse {
        name: d.cfg.driver_name.clone(),
        vendor_version: env!("CARGO_PKG_VERSION").to_string(),
        manifest: HashMap::from([(
            "kinds".to_string(),
            d.cfg
                .kinds
                .iter()
                .map(|k| k.as_str())
                .collect::<Vec<_>>()
                .join(","),
        )]),
    }
}
