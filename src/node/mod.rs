//! The CSI Node service: one file per RPC. Mount mechanics shared by the
//! kinds live in `mounts.rs`.
pub mod mounts;
mod node_expand_volume;
mod node_get_capabilities;
mod node_get_info;
mod node_get_volume_stats;
mod node_publish_volume;
mod node_stage_volume;
mod node_unpublish_volume;
mod node_unstage_volume;
pub mod paths;
pub mod staged;

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::csi::v1 as csi;
use crate::driver::Driver;
use crate::rpc::serve;

pub struct NodeService {
    pub driver: Arc<Driver>,
}

type Res<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl csi::node_server::Node for NodeService {
    async fn node_stage_volume(
        &self,
        req: Request<csi::NodeStageVolumeRequest>,
    ) -> Res<csi::NodeStageVolumeResponse> {
        let req = req.into_inner();
        let id = req.volume_id.clone();
        serve(
            "NodeStageVolume",
            &id,
            node_stage_volume::handle(self.driver.clone(), req),
        )
        .await
    }

    async fn node_unstage_volume(
        &self,
        req: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Res<csi::NodeUnstageVolumeResponse> {
        let req = req.into_inner();
        let id = req.volume_id.clone();
        serve(
            "NodeUnstageVolume",
            &id,
            node_unstage_volume::handle(self.driver.clone(), req),
        )
        .await
    }

    async fn node_publish_volume(
        &self,
        req: Request<csi::NodePublishVolumeRequest>,
    ) -> Res<csi::NodePublishVolumeResponse> {
        let req = req.into_inner();
        let id = req.volume_id.clone();
        serve(
            "NodePublishVolume",
            &id,
            node_publish_volume::handle(self.driver.clone(), req),
        )
        .await
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Res<csi::NodeUnpublishVolumeResponse> {
        let req = req.into_inner();
        let id = req.volume_id.clone();
        serve(
            "NodeUnpublishVolume",
            &id,
            node_unpublish_volume::handle(self.driver.clone(), req),
        )
        .await
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Res<csi::NodeGetVolumeStatsResponse> {
        let req = req.into_inner();
        let id = req.volume_id.clone();
        serve(
            "NodeGetVolumeStats",
            &id,
            node_get_volume_stats::handle(self.driver.clone(), req),
        )
        .await
    }

    async fn node_expand_volume(
        &self,
        req: Request<csi::NodeExpandVolumeRequest>,
    ) -> Res<csi::NodeExpandVolumeResponse> {
        let req = req.into_inner();
        let id = req.volume_id.clone();
        serve(
            "NodeExpandVolume",
            &id,
            node_expand_volume::handle(self.driver.clone(), req),
        )
        .await
    }

    async fn node_get_capabilities(
        &self,
        _req: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Res<csi::NodeGetCapabilitiesResponse> {
        serve("NodeGetCapabilities", "", async {
            Ok(node_get_capabilities::handle(&self.driver))
        })
        .await
    }

    async fn node_get_info(
        &self,
        _req: Request<csi::NodeGetInfoRequest>,
    ) -> Res<csi::NodeGetInfoResponse> {
        serve("NodeGetInfo", "", async {
            Ok(node_get_info::handle(&self.driver))
        })
        .await
    }
}
