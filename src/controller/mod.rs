//! The CSI Controller service: one file per RPC; each handler validates its
//! request, takes the per-volume guard and calls into the volume kind.
mod controller_expand_volume;
mod controller_get_capabilities;
mod controller_get_volume;
mod controller_publish_volume;
mod controller_unpublish_volume;
mod create_snapshot;
mod create_volume;
mod delete_snapshot;
pub(crate) mod delete_volume;
mod get_capacity;
mod get_snapshot;
mod list_snapshots;
mod list_volumes;
pub mod snapshot;
mod topology;
mod unimplemented;
mod validate_volume_capabilities;
mod volume;

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::csi::v1 as csi;
use crate::driver::Driver;
use crate::rpc::serve;

pub use create_volume::{kind_parameters, Range, KIND_KEY};
pub use topology::placement;

pub struct ControllerService {
    pub driver: Arc<Driver>,
}

type Res<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl csi::controller_server::Controller for ControllerService {
    async fn create_volume(
        &self,
        req: Request<csi::CreateVolumeRequest>,
    ) -> Res<csi::CreateVolumeResponse> {
        let req = req.into_inner();
        serve(
            "CreateVolume",
            "",
            create_volume::handle(self.driver.clone(), req),
        )
        .await
    }

    async fn delete_volume(
        &self,
        req: Request<csi::DeleteVolumeRequest>,
    ) -> Res<csi::DeleteVolumeResponse> {
        let req = req.into_inner();
        let id = req.volume_id.clone();
        serve(
            "DeleteVolume",
            &id,
            delete_volume::handle(self.driver.clone(), req),
        )
        .await
    }

    async fn controller_publish_volume(
        &self,
        req: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Res<csi::ControllerPublishVolumeResponse> {
        let req = req.into_inner();
        let id = req.volume_id.clone();
        serve(
            "ControllerPublishVolume",
            &id,
            controller_publish_volume::handle(self.driver.clone(), req),
        )
        .await
    }

    async fn controller_unpublish_volume(
        &self,
        req: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Res<csi::ControllerUnpublishVolumeResponse> {
        let req = req.into_inner();
        let id = req.volume_id.clone();
        serve(
            "ControllerUnpublishVolume",
            &id,
            controller_unpublish_volume::handle(self.driver.clone(), req),
        )
        .await
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Res<csi::ValidateVolumeCapabilitiesResponse> {
        let req = req.into_inner();
        let id = req.volume_id.clone();
        serve(
            "ValidateVolumeCapabilities",
            &id,
            validate_volume_capabilities::handle(self.driver.clone(), req),
        )
        .await
    }

    async fn list_volumes(
        &self,
        req: Request<csi::ListVolumesRequest>,
    ) -> Res<csi::ListVolumesResponse> {
        let req = req.into_inner();
        serve(
            "ListVolumes",
            "",
            list_volumes::handle(self.driver.clone(), req),
        )
        .await
    }

    async fn get_capacity(
        &self,
        req: Request<csi::GetCapacityRequest>,
    ) -> Res<csi::GetCapacityResponse> {
        let req = req.into_inner();
        serve(
            "GetCapacity",
            "",
            get_capacity::handle(self.driver.clone(), req),
        )
        .await
    }

    async fn controller_get_capabilities(
        &self,
        _req: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Res<csi::ControllerGetCapabilitiesResponse> {
        serve("ControllerGetCapabilities", "", async {
            Ok(controller_get_capabilities::handle(&self.driver))
        })
        .await
    }

    async fn create_snapshot(
        &self,
        req: Request<csi::CreateSnapshotRequest>,
    ) -> Res<csi::CreateSnapshotResponse> {
        let req = req.into_inner();
        let id = req.source_volume_id.clone();
        serve(
            "CreateSnapshot",
            &id,
            create_snapshot::handle(self.driver.clone(), req),
        )
        .await
    }

    async fn delete_snapshot(
        &self,
        req: Request<csi::DeleteSnapshotRequest>,
    ) -> Res<csi::DeleteSnapshotResponse> {
        let req = req.into_inner();
        let id = req.snapshot_id.clone();
        serve(
            "DeleteSnapshot",
            &id,
            delete_snapshot::handle(self.driver.clone(), req),
        )
        .await
    }

    async fn list_snapshots(
        &self,
        req: Request<csi::ListSnapshotsRequest>,
    ) -> Res<csi::ListSnapshotsResponse> {
        let req = req.into_inner();
        serve(
            "ListSnapshots",
            "",
            list_snapshots::handle(self.driver.clone(), req),
        )
        .await
    }

    async fn get_snapshot(
        &self,
        req: Request<csi::GetSnapshotRequest>,
    ) -> Res<csi::GetSnapshotResponse> {
        let req = req.into_inner();
        let id = req.snapshot_id.clone();
        serve(
            "GetSnapshot",
            &id,
            get_snapshot::handle(self.driver.clone(), req),
        )
        .await
    }

    async fn controller_expand_volume(
        &self,
        req: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Res<csi::ControllerExpandVolumeResponse> {
        let req = req.into_inner();
        let id = req.volume_id.clone();
        serve(
            "ControllerExpandVolume",
            &id,
            controller_expand_volume::handle(self.driver.clone(), req),
        )
        .await
    }

    async fn controller_get_volume(
        &self,
        req: Request<csi::ControllerGetVolumeRequest>,
    ) -> Res<csi::ControllerGetVolumeResponse> {
        let req = req.into_inner();
        let id = req.volume_id.clone();
        serve(
            "ControllerGetVolume",
            &id,
            controller_get_volume::handle(self.driver.clone(), req),
        )
        .await
    }

    async fn controller_modify_volume(
        &self,
        req: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Res<csi::ControllerModifyVolumeResponse> {
        let id = req.get_ref().volume_id.clone();
        serve("ControllerModifyVolume", &id, unimplemented::modify()).await
    }
}
