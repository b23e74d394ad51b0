//! Walks one local directory volume through its whole life against a running
//! berth, as Kubernetes would: CreateVolume, ControllerPublishVolume,
//! NodeStageVolume, NodePublishVolume, a write and a read through the pod's
//! path, then everything undone in reverse.
//!
//!   cargo run --release --example lifecycle -- unix://./berth-data/csi.sock [WORKDIR]
//!
//! Node steps mount, so run it (and berth) as root.
use std::collections::HashMap;
use std::path::PathBuf;

use berth::csi::v1 as csi;
use berth::csi::v1::volume_capability::access_mode::Mode;

fn cap() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(csi::volume_capability::AccessType::Mount(Default::default())),
        access_mode: Some(csi::volume_capability::AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let endpoint = args
        .next()
        .unwrap_or_else(|| "unix://./berth-data/csi.sock".into());
    let work = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "./berth-data/walkthrough".into()),
    );
    std::fs::create_dir_all(&work)?;
    let work = work.canonicalize()?;
    let mut c = berth::client::connect(&endpoint).await?;

    let info = c
        .identity
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await?
        .into_inner();
    println!("1. plugin {} {}", info.name, info.vendor_version);
    let node = c
        .node
        .node_get_info(csi::NodeGetInfoRequest {})
        .await?
        .into_inner();
    println!(
        "2. node {} topology {:?}",
        node.node_id,
        node.accessible_topology.as_ref().map(|t| &t.segments)
    );

    let vol = c
        .controller
        .create_volume(csi::CreateVolumeRequest {
            name: "walkthrough-pvc".into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 64 << 20,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap()],
            parameters: HashMap::from([("kind".into(), "local".into())]),
            accessibility_requirements: Some(csi::TopologyRequirement {
                requisite: node.accessible_topology.clone().into_iter().collect(),
                preferred: node.accessible_topology.clone().into_iter().collect(),
            }),
            ..Default::default()
        })
        .await?
        .into_inner()
        .volume
        .ok_or_else(|| anyhow::anyhow!("no volume in the answer"))?;
    let id = vol.volume_id.clone();
    println!("3. CreateVolume -> {id}, {} bytes", vol.capacity_bytes);

    c.controller
        .controller_publish_volume(csi::ControllerPublishVolumeRequest {
            volume_id: id.clone(),
            node_id: node.node_id.clone(),
            volume_capability: Some(cap()),
            ..Default::default()
        })
        .await?;
    println!("4. ControllerPublishVolume to {}", node.node_id);

    let staging = work.join("staging");
    let target = work.join("pod-volume");
    std::fs::create_dir_all(&staging)?;
    c.node
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap()),
            ..Default::default()
        })
        .await?;
    println!("5. NodeStageVolume at {}", staging.display());
    c.node
        .node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(cap()),
            ..Default::default()
        })
        .await?;
    println!("6. NodePublishVolume at {}", target.display());

    std::fs::write(target.join("hello.txt"), b"hello from berth\n")?;
    let back = std::fs::read_to_string(target.join("hello.txt"))?;
    println!(
        "7. wrote and read back through the pod path: {}",
        back.trim()
    );
    let stats = c
        .node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.display().to_string(),
            ..Default::default()
        })
        .await?
        .into_inner();
    println!(
        "8. NodeGetVolumeStats: {:?}",
        stats.usage.first().map(|u| (u.used, u.total))
    );

    c.node
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target.display().to_string(),
        })
        .await?;
    c.node
        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.display().to_string(),
        })
        .await?;
    c.controller
        .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: id.clone(),
            node_id: node.node_id.clone(),
            ..Default::default()
        })
        .await?;
    c.controller
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        })
        .await?;
    println!("9. unpublished, unstaged, detached and deleted {id}");
    std::fs::remove_dir(&staging).ok();
    std::fs::remove_dir(&work).ok();
    Ok(())
}
