//! The CSI Identity service: one file per RPC.
mod get_plugin_capabilities;
mod get_plugin_info;
mod probe;

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::csi::v1 as csi;
use crate::driver::Driver;
use crate::rpc::serve;

pub use probe::check as probe_check;
pub use probe::remove_leftovers as remove_probe_leftovers;

pub struct IdentityService {
    pub driver: Arc<Driver>,
}

#[tonic::async_trait]
impl csi::identity_server::Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _req: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        serve("GetPluginInfo", "", async {
            Ok(get_plugin_info::handle(&self.driver))
        })
        .await
    }

    async fn get_plugin_capabilities(
        &self,
        _req: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        serve("GetPluginCapabilities", "", async {
            Ok(get_plugin_capabilities::handle(&self.driver))
        })
        .await
    }

    async fn probe(
        &self,
        _req: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        serve("Probe", "", probe::handle(self.driver.clone())).await
    }
}
