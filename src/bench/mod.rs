//! `berth bench`: drives any CSI endpoint (not only Berth) and reports
//! latency percentiles, throughput and memory.
//!
//! - `lifecycle`: the full volume cycle N times with C in flight;
//! - `scale`: many volumes, CreateVolume latency empty vs full, ListVolumes
//!   paging;
//! - `startup`: spawns berth and measures the time to its first Probe answer
//!   and its idle RSS;
//! - `snapshot`: snapshot and restore of one volume holding data, against
//!   tar;
//! - `floor`: what the machine allows for the operations a lifecycle is
//!   made of, so other measures can be given as a ratio to it.
pub mod floor;
pub mod lifecycle;
pub mod report;
pub mod rss;
pub mod scale;
pub mod snapshot;
pub mod startup;

use std::collections::HashMap;

use clap::{Args, Subcommand};

use crate::csi::v1 as csi;
use crate::csi::v1::volume_capability::access_mode::Mode;

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// The CSI endpoint to drive, unix:// only.
    #[arg(
        long,
        env = "CSI_ENDPOINT",
        default_value = "unix:///var/lib/berth/csi.sock"
    )]
    pub endpoint: String,
    #[command(subcommand)]
    pub mode: BenchMode,
}

#[derive(Debug, Clone, Subcommand)]
pub enum BenchMode {
    /// The full lifecycle of N volumes, C at a time.
    Lifecycle(lifecycle::LifecycleArgs),
    /// Create many volumes and measure how latency and listing scale.
    Scale(scale::ScaleArgs),
    /// Spawn berth and time its start-up to the first Probe answer.
    Startup(startup::StartupArgs),
    /// Snapshot and restore one volume holding data, against tar.
    Snapshot(snapshot::SnapshotArgs),
    /// This machine's floor: bind/unmount, durable append, mkdir/rmdir,
    /// directory flush (no driver needed; needs root).
    Floor(floor::FloorArgs),
}

/// What every mode needs to build requests.
#[derive(Debug, Clone, Args)]
pub struct VolumeArgs {
    /// StorageClass parameter key=value (repeatable).
    #[arg(long = "param", value_parser = parse_kv)]
    pub params: Vec<(String, String)>,
    /// Volume size in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub size: i64,
    /// Raw block volumes (volumeMode: Block) instead of filesystem ones.
    #[arg(long)]
    pub block: bool,
    /// fs_type in the mount capability.
    #[arg(long, default_value = "")]
    pub fs_type: String,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

impl VolumeArgs {
    pub fn capability(&self) -> csi::VolumeCapability {
        let access_type = if self.block {
            csi::volume_capability::AccessType::Block(csi::volume_capability::BlockVolume {})
        } else {
            csi::volume_capability::AccessType::Mount(csi::volume_capability::MountVolume {
                fs_type: self.fs_type.clone(),
                ..Default::default()
            })
        };
        csi::VolumeCapability {
            access_type: Some(access_type),
            access_mode: Some(csi::volume_capability::AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
        }
    }

    pub fn create(
        &self,
        name: String,
        topology: Option<&csi::Topology>,
    ) -> csi::CreateVolumeRequest {
        csi::CreateVolumeRequest {
            name,
            capacity_range: Some(csi::CapacityRange {
                required_bytes: self.size,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![self.capability()],
            parameters: self.params.iter().cloned().collect::<HashMap<_, _>>(),
            accessibility_requirements: topology.map(|t| csi::TopologyRequirement {
                requisite: vec![t.clone()],
                preferred: vec![t.clone()],
            }),
            ..Default::default()
        }
    }
}

/// Runs a bench mode; returns the process exit code.
pub async fn run(args: BenchArgs) -> anyhow::Result<i32> {
    let endpoint = args.endpoint.as_str();
    match args.mode {
        BenchMode::Lifecycle(a) => lifecycle::run(endpoint, a).await,
        BenchMode::Scale(a) => scale::run(endpoint, a).await,
        BenchMode::Startup(a) => startup::run(endpoint, a).await,
        BenchMode::Snapshot(a) => snapshot::run(endpoint, a).await,
        BenchMode::Floor(a) => floor::run(a),
    }
}

/// A unique prefix for the names one bench run creates.
pub fn run_id() -> String {
    format!(
        "bench-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() % 1_000_000)
            .unwrap_or(0)
    )
}
