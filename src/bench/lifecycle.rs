//! The full lifecycle benchmark. Each cycle: CreateVolume,
//! ControllerPublishVolume (if advertised and not `--attach never`),
//! NodeStageVolume (if advertised),
//! NodePublishVolume, NodeUnpublishVolume, NodeUnstageVolume,
//! ControllerUnpublishVolume, DeleteVolume. Each worker (one per cycle in
//! flight) makes its staging directory once, before the timed cycles, as
//! kubelet makes a volume's before NodeStageVolume: a cycle's time is the
//! driver's work and the round trips only. A cycle that fails or is
//! interrupted undoes the steps it completed, so the endpoint is left clean;
//! Ctrl-C stops new cycles (a second Ctrl-C exits at once). Before the
//! cycles, one Probe at a time (as many as cycles, at most 1,000) measures
//! a gRPC round trip with what the driver's Probe does (nothing for
//! host-path; berth writes and removes a file in its state directory),
//! reported as `Probe (round trip)`; then as many GetPluginInfo calls,
//! which every driver answers from memory: the bare round trip of this
//! client and the driver's gRPC server, `GetPluginInfo (round trip)`, the
//! part of every operation's latency that is not the driver's work.
//!
//! With `--floor` (one at a time, root), the cycles run in blocks of
//! `--floor-block`, each beside a block of as many cycles of this machine's
//! floor (`berth bench floor`'s lifecycle floor: 2 bind/unmount pairs, 2
//! durable appends, 2 mkdir/rmdir pairs, 1 directory flush, measured here
//! with no driver work in between), the floor block first in even blocks
//! and last in odd ones. Each block's ratio (cycles/s against the floor's)
//! and NodePublish's p99 against the bind + unmount pair's p99 are
//! reported, with their median and spread: a floor measured minutes apart
//! from the cycles swung by a factor of 2.5 on the development machine,
//! while both halves of a block see the same moment.
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use serde::Serialize;

use super::floor::{floor_us, Rig};
use super::report::{percentile, print_table, OpSummary, Samples};
use super::rss::Sampler;
use super::VolumeArgs;
use crate::client::{connect, CsiClient};
use crate::csi::v1 as csi;

#[derive(Debug, Clone, Args)]
pub struct LifecycleArgs {
    /// Number of full cycles.
    #[arg(short = 'n', long, default_value_t = 1000)]
    pub count: usize,
    /// Cycles in flight at once.
    #[arg(short = 'c', long, default_value_t = 16)]
    pub concurrency: usize,
    #[command(flatten)]
    pub volume: VolumeArgs,
    /// Directory for staging and target paths (absolute; created).
    #[arg(long, default_value = "/tmp/berth-bench")]
    pub work_dir: PathBuf,
    /// Process whose RSS to report (peak and final), e.g. the driver's pid.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Node service endpoint when it is not the --endpoint process (a split
    /// controller/node deployment).
    #[arg(long)]
    pub node_endpoint: Option<String>,
    /// Whether each cycle calls ControllerPublishVolume and
    /// ControllerUnpublishVolume: `auto` when the driver advertises
    /// PUBLISH_UNPUBLISH_VOLUME; `never` as Kubernetes does when the
    /// CSIDriver object says `attachRequired: false` (as Berth's manifests
    /// ship it, and as the floor's lifecycle counts it).
    #[arg(long, value_enum, default_value_t = Attach::Auto)]
    pub attach: Attach,
    #[command(flatten)]
    pub floor: FloorArgs,
}

/// The floor measured interleaved with the cycles (module comment).
#[derive(Debug, Clone, Args)]
pub struct FloorArgs {
    /// Measure this machine's floor in blocks between the cycles' blocks
    /// and report each block's ratio to it (needs root and -c 1).
    #[arg(id = "floor", long = "floor")]
    pub on: bool,
    /// Cycles in each block with --floor (and floor cycles beside it).
    #[arg(
        id = "floor_block",
        long = "floor-block",
        value_name = "N",
        default_value_t = 50
    )]
    pub block: usize,
    /// Directory for the floor's operations with --floor (absolute;
    /// created, removed after; default: under --work-dir). It should be on
    /// the filesystem of the driver's state and volumes.
    #[arg(id = "floor_dir", long = "floor-dir", value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

impl Default for FloorArgs {
    fn default() -> FloorArgs {
        FloorArgs {
            on: false,
            block: 50,
            dir: None,
        }
    }
}

/// See `LifecycleArgs::attach`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Attach {
    Auto,
    Never,
}

#[derive(Debug, Serialize)]
pub struct LifecycleReport {
    pub cycles_ok: usize,
    pub cycles_failed: usize,
    pub concurrency: usize,
    /// The cycles' time (with --floor, their blocks' only).
    pub wall_seconds: f64,
    pub cycles_per_second: f64,
    pub operations: Vec<OpSummary>,
    pub rss_peak_kib: Option<u64>,
    pub rss_final_kib: Option<u64>,
    pub first_error: Option<String>,
    /// With --floor: the floor measured in blocks between the cycles'.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub floor: Option<Interleaved>,
}

/// One block of cycles and the floor's block beside it.
#[derive(Debug, Serialize)]
pub struct FloorBlock {
    pub cycles_ok: usize,
    pub cycles_per_second: f64,
    pub floor_cycles_per_second: f64,
    /// cycles_per_second / floor_cycles_per_second
    pub ratio: f64,
    pub node_publish_p99_us: f64,
    pub bind_pair_p99_us: f64,
    /// node_publish_p99_us / bind_pair_p99_us
    pub p99_ratio: f64,
}

/// The floor interleaved with the cycles (`--floor`).
#[derive(Debug, Serialize)]
pub struct Interleaved {
    pub block_cycles: usize,
    pub blocks: Vec<FloorBlock>,
    /// The blocks' ratios: median, lowest, highest.
    pub ratio_median: f64,
    pub ratio_min: f64,
    pub ratio_max: f64,
    /// The blocks' NodePublish p99 / bind pair p99: median, lowest, highest.
    pub p99_ratio_median: f64,
    pub p99_ratio_min: f64,
    pub p99_ratio_max: f64,
    /// Over every block: the floor's cycles/s, the cycles' ratio to it,
    /// NodePublish's p99, the bind + unmount pair's p99 and their ratio.
    pub floor_cycles_per_second: f64,
    pub ratio: f64,
    pub node_publish_p99_us: f64,
    pub bind_pair_p99_us: f64,
    pub p99_ratio: f64,
    /// The floor's operations over every block.
    pub operations: Vec<OpSummary>,
}

fn div(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

fn p99_us(s: &Samples, op: &str) -> f64 {
    let mut v = s.by_op.get(op).cloned().unwrap_or_default();
    v.sort();
    percentile(&v, 99.0).as_secs_f64() * 1e6
}

/// Median, lowest and highest (zeros for none).
fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[0], v[n - 1])
}

impl FloorBlock {
    fn of(ok: usize, wall: std::time::Duration, cycles: &Samples, floor: &Samples) -> FloorBlock {
        let cps = div(ok as f64, wall.as_secs_f64());
        let floor_cps = div(1e6, floor_us(floor));
        let (np, bp) = (
            p99_us(cycles, "NodePublishVolume"),
            p99_us(floor, "bind + unmount"),
        );
        FloorBlock {
            cycles_ok: ok,
            cycles_per_second: cps,
            floor_cycles_per_second: floor_cps,
            ratio: div(cps, floor_cps),
            node_publish_p99_us: np,
            bind_pair_p99_us: bp,
            p99_ratio: div(np, bp),
        }
    }
}

impl Interleaved {
    /// From the blocks and all their samples (`cycles`: the cycles',
    /// `floor`: the floor's; `ok` cycles in `wall`).
    fn of(
        block_cycles: usize,
        blocks: Vec<FloorBlock>,
        ok: usize,
        wall: std::time::Duration,
        cycles: &Samples,
        floor: &Samples,
    ) -> Interleaved {
        let all = FloorBlock::of(ok, wall, cycles, floor);
        let (ratio_median, ratio_min, ratio_max) = spread(blocks.iter().map(|b| b.ratio).collect());
        let (p99_ratio_median, p99_ratio_min, p99_ratio_max) =
            spread(blocks.iter().map(|b| b.p99_ratio).collect());
        Interleaved {
            block_cycles,
            blocks,
            ratio_median,
            ratio_min,
            ratio_max,
            p99_ratio_median,
            p99_ratio_min,
            p99_ratio_max,
            floor_cycles_per_second: all.floor_cycles_per_second,
            ratio: all.ratio,
            node_publish_p99_us: all.node_publish_p99_us,
            bind_pair_p99_us: all.bind_pair_p99_us,
            p99_ratio: all.p99_ratio,
            operations: floor.summary(),
        }
    }
}

pub(super) struct Plan {
    args: LifecycleArgs,
    pub(super) run: String,
    node_id: String,
    pub(super) topology: Option<csi::Topology>,
    controller_publish: bool,
    stage: bool,
}

#[derive(Default)]
pub(super) struct Done {
    pub(super) volume: Option<String>,
    attached: bool,
    staged: bool,
    published: bool,
}

async fn timed<T, F>(samples: &mut Samples, op: &'static str, f: F) -> Result<T, String>
where
    F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let t = Instant::now();
    let r = f.await;
    samples.add(op, t.elapsed());
    r.map(|r| r.into_inner())
        .map_err(|s| format!("{op}: {:?}: {}", s.code(), s.message()))
}

/// One cycle with the staging directory `dir/staging` (made by the
/// caller, kept) and the target `dir/target` (the driver makes it and
/// removes it, as with kubelet).
async fn cycle(
    c: &mut CsiClient,
    p: &Plan,
    i: usize,
    dir: &std::path::Path,
    s: &mut Samples,
) -> Result<(), String> {
    let staging = dir.join("staging");
    let target = dir.join("target");
    let mut done = Done::default();
    let r = forward(c, p, i, s, &staging, &target, &mut done).await;
    let undo = backward(c, p, s, &staging, &target, &mut done).await;
    r.and(undo)
}

/// A worker's directory for its cycles, with its staging directory made:
/// `<work-dir>/<run>-w<worker>-<slot>`. Kubelet makes a volume's staging
/// directory itself before NodeStageVolume; the bench makes it once per
/// worker, before the timed cycles, so their time is the driver's work
/// only (a new one after a failed cycle, which may have left the old one
/// in use).
fn worker_dir(p: &Plan, worker: usize, slot: usize) -> Result<PathBuf, String> {
    let dir = p.args.work_dir.join(format!("{}-w{worker}-{slot}", p.run));
    let staging = dir.join("staging");
    std::fs::create_dir_all(&staging)
        .map_err(|e| format!("creating {}: {e}", staging.display()))?;
    Ok(dir)
}

/// Removes what `worker_dir` made (empty directories only: never anything
/// a failed cycle left mounted or inside).
fn remove_worker_dir(dir: &std::path::Path) {
    let _ = std::fs::remove_dir(dir.join("staging"));
    let _ = std::fs::remove_dir(dir);
}

/// One worker's cycles: its directory, and a new one after a failed
/// cycle.
struct Worker {
    w: usize,
    slot: usize,
    dir: PathBuf,
}

impl Worker {
    /// Cycle `i`, its time as "cycle" when it succeeds, its error kept:
    /// whether it succeeded, None when the worker cannot go on (no new
    /// directory could be made).
    async fn cycle(
        &mut self,
        c: &mut CsiClient,
        p: &Plan,
        i: usize,
        samples: &mut Samples,
        errors: &mut Vec<String>,
    ) -> Option<bool> {
        let t = Instant::now();
        match cycle(c, p, i, &self.dir, samples).await {
            Ok(()) => {
                samples.add("cycle", t.elapsed());
                Some(true)
            }
            Err(e) => {
                errors.push(e);
                remove_worker_dir(&self.dir);
                self.slot += 1;
                match worker_dir(p, self.w, self.slot) {
                    Ok(d) => {
                        self.dir = d;
                        Some(false)
                    }
                    Err(e) => {
                        errors.push(e);
                        None
                    }
                }
            }
        }
    }
}

/// The cycles one at a time in blocks, each beside a block of the floor
/// (module comment). Returns the blocks, the cycles that succeeded, the
/// cycles' time and the floor's samples; stops at the first failure of a
/// floor operation (kept in `errors`).
async fn interleaved(
    c: &mut CsiClient,
    p: &Plan,
    rig: &mut Rig,
    worker: &mut Worker,
    stop: &AtomicBool,
    samples: &mut Samples,
    errors: &mut Vec<String>,
) -> (Vec<FloorBlock>, usize, std::time::Duration, Samples) {
    let block = p.args.floor.block;
    let (mut blocks, mut ok, mut wall, mut floor) =
        (Vec::new(), 0, std::time::Duration::ZERO, Samples::default());
    let mut i = 0;
    while i < p.args.count && !stop.load(Ordering::SeqCst) {
        let n = block.min(p.args.count - i);
        let floor_first = blocks.len() % 2 == 0;
        let mut fs = Samples::default();
        let mut run_floor = |fs: &mut Samples| {
            (0..n)
                .try_for_each(|_| rig.cycle(fs))
                .map_err(|e| format!("floor: {e:#}"))
        };
        if floor_first {
            if let Err(e) = run_floor(&mut fs) {
                errors.push(e);
                break;
            }
        }
        let mut cs = Samples::default();
        let (mut ok_b, mut ran, t) = (0, 0, Instant::now());
        let mut lost = false;
        for _ in 0..n {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            ran += 1;
            match worker.cycle(c, p, i, &mut cs, errors).await {
                Some(true) => ok_b += 1,
                Some(false) => {}
                None => lost = true,
            }
            i += 1;
            if lost {
                break;
            }
        }
        let wall_b = t.elapsed();
        if !floor_first && !lost {
            if let Err(e) = run_floor(&mut fs) {
                errors.push(e);
                lost = true;
            }
        }
        if fs.by_op.is_empty() || ran == 0 {
            // No floor beside these cycles (or no cycle beside this floor,
            // after Ctrl-C): the cycles count, the block does not.
            samples.merge(cs);
        } else {
            blocks.push(FloorBlock::of(ok_b, wall_b, &cs, &fs));
            samples.merge(cs);
            floor.merge(fs);
        }
        ok += ok_b;
        wall += wall_b;
        if lost {
            break;
        }
    }
    (blocks, ok, wall, floor)
}

pub(super) async fn forward(
    c: &mut CsiClient,
    p: &Plan,
    i: usize,
    s: &mut Samples,
    staging: &std::path::Path,
    target: &std::path::Path,
    done: &mut Done,
) -> Result<(), String> {
    let cap = p.args.volume.capability();
    let req = p
        .args
        .volume
        .create(format!("{}-{i}", p.run), p.topology.as_ref());
    let vol = timed(s, "CreateVolume", c.controller.create_volume(req)).await?;
    let id = vol
        .volume
        .map(|v| v.volume_id)
        .ok_or("CreateVolume returned no volume")?;
    done.volume = Some(id.clone());
    let mut publish_context = Default::default();
    if p.controller_publish {
        let r = timed(
            s,
            "ControllerPublishVolume",
            c.controller
                .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                    volume_id: id.clone(),
                    node_id: p.node_id.clone(),
                    volume_capability: Some(cap.clone()),
                    ..Default::default()
                }),
        )
        .await?;
        publish_context = r.publish_context;
        done.attached = true;
    }
    if p.stage {
        timed(
            s,
            "NodeStageVolume",
            c.node.node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: id.clone(),
                publish_context: publish_context.clone(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            }),
        )
        .await?;
        done.staged = true;
    }
    timed(
        s,
        "NodePublishVolume",
        c.node.node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: id.clone(),
            publish_context,
            staging_target_path: if p.stage {
                staging.display().to_string()
            } else {
                String::new()
            },
            target_path: target.display().to_string(),
            volume_capability: Some(cap),
            ..Default::default()
        }),
    )
    .await?;
    done.published = true;
    Ok(())
}

pub(super) async fn backward(
    c: &mut CsiClient,
    p: &Plan,
    s: &mut Samples,
    staging: &std::path::Path,
    target: &std::path::Path,
    done: &mut Done,
) -> Result<(), String> {
    let Some(id) = done.volume.clone() else {
        return Ok(());
    };
    let released = release(c, p, s, staging, target, done).await;
    let r = timed(
        s,
        "DeleteVolume",
        c.controller.delete_volume(csi::DeleteVolumeRequest {
            volume_id: id,
            ..Default::default()
        }),
    )
    .await;
    done.volume = None;
    released.and(r.map(|_| ()))
}

/// Unpublishes, unstages and detaches the volume (what `forward` did but
/// its creation).
pub(super) async fn release(
    c: &mut CsiClient,
    p: &Plan,
    s: &mut Samples,
    staging: &std::path::Path,
    target: &std::path::Path,
    done: &mut Done,
) -> Result<(), String> {
    let Some(id) = done.volume.clone() else {
        return Ok(());
    };
    let mut first_err = Ok(());
    let mut keep = |r: Result<(), String>| {
        if first_err.is_ok() {
            first_err = r;
        }
    };
    if done.published {
        let r = timed(
            s,
            "NodeUnpublishVolume",
            c.node
                .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                    volume_id: id.clone(),
                    target_path: target.display().to_string(),
                }),
        )
        .await;
        keep(r.map(|_| ()));
    }
    if done.staged {
        let r = timed(
            s,
            "NodeUnstageVolume",
            c.node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging.display().to_string(),
            }),
        )
        .await;
        keep(r.map(|_| ()));
    }
    if done.attached {
        let r = timed(
            s,
            "ControllerUnpublishVolume",
            c.controller
                .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                    volume_id: id.clone(),
                    node_id: p.node_id.clone(),
                    ..Default::default()
                }),
        )
        .await;
        keep(r.map(|_| ()));
    }
    done.published = false;
    done.staged = false;
    done.attached = false;
    first_err
}

/// Asks the endpoint what it supports.
pub(super) async fn plan(c: &mut CsiClient, args: LifecycleArgs) -> anyhow::Result<Plan> {
    use crate::csi::v1::controller_service_capability::rpc::Type as CType;
    use crate::csi::v1::node_service_capability::rpc::Type as NType;
    let ccaps = c
        .controller
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await?
        .into_inner();
    let ncaps = c
        .node
        .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
        .await?
        .into_inner();
    let info = c
        .node
        .node_get_info(csi::NodeGetInfoRequest {})
        .await?
        .into_inner();
    let controller_publish = args.attach == Attach::Auto
        && ccaps.capabilities.iter().any(|x| {
            matches!(&x.r#type, Some(csi::controller_service_capability::Type::Rpc(r)) if r.r#type == CType::PublishUnpublishVolume as i32)
        });
    let stage = ncaps.capabilities.iter().any(|x| {
        matches!(&x.r#type, Some(csi::node_service_capability::Type::Rpc(r)) if r.r#type == NType::StageUnstageVolume as i32)
    });
    Ok(Plan {
        args,
        run: super::run_id(),
        node_id: info.node_id,
        topology: info.accessible_topology,
        controller_publish,
        stage,
    })
}

pub async fn run(endpoint: &str, args: LifecycleArgs) -> anyhow::Result<i32> {
    anyhow::ensure!(args.work_dir.is_absolute(), "--work-dir must be absolute");
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    if args.floor.on {
        anyhow::ensure!(
            args.concurrency == 1,
            "--floor measures the floor one at a time: it needs -c 1"
        );
        anyhow::ensure!(args.floor.block > 0, "--floor-block must be at least 1");
        anyhow::ensure!(
            args.floor.dir.as_ref().is_none_or(|d| d.is_absolute()),
            "--floor-dir must be absolute"
        );
    }
    std::fs::create_dir_all(&args.work_dir)?;
    let mut client = connect(endpoint).await?;
    if let Some(ne) = &args.node_endpoint {
        client.node = connect(ne).await?.node;
    }
    let plan = Arc::new(plan(&mut client, args.clone()).await?);
    let stop = Arc::new(AtomicBool::new(false));
    {
        // Registered here, before any cycle starts (not when the task is
        // first polled), so no SIGINT meets the default disposition.
        let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let stop = stop.clone();
        tokio::spawn(async move {
            if sigint.recv().await.is_some() {
                eprintln!("interrupted: finishing the cycles in flight and cleaning up (Ctrl-C again to abort)");
                stop.store(true, Ordering::SeqCst);
                if sigint.recv().await.is_some() {
                    std::process::exit(130);
                }
            }
        });
    }
    // Round trips one at a time, before the cycles (not in their wall
    // time): Probe (what each driver's Probe does), then GetPluginInfo (no
    // work anywhere: the gRPC part of every operation below).
    let mut samples = Samples::default();
    for _ in 0..args.count.min(1000) {
        timed(
            &mut samples,
            "Probe (round trip)",
            client.identity.probe(csi::ProbeRequest {}),
        )
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    }
    for _ in 0..args.count.min(1000) {
        timed(
            &mut samples,
            "GetPluginInfo (round trip)",
            client
                .identity
                .get_plugin_info(csi::GetPluginInfoRequest {}),
        )
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    }
    let mut dirs = Vec::with_capacity(args.concurrency);
    for w in 0..args.concurrency {
        dirs.push(worker_dir(&plan, w, 0).map_err(|e| anyhow::anyhow!(e))?);
    }
    let sampler = args.pid.map(Sampler::start);
    let next = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    let mut errors: Vec<String> = Vec::new();
    let mut floor = None;
    let start = Instant::now();
    let wall = if args.floor.on {
        let dir = args
            .floor
            .dir
            .clone()
            .unwrap_or_else(|| args.work_dir.join(format!("{}-floor", plan.run)));
        let mut worker = Worker {
            w: 0,
            slot: 0,
            dir: dirs.pop().ok_or_else(|| anyhow::anyhow!("no worker"))?,
        };
        let r = match Rig::new(&dir) {
            Ok(mut rig) => {
                let r = interleaved(
                    &mut client,
                    &plan,
                    &mut rig,
                    &mut worker,
                    &stop,
                    &mut samples,
                    &mut errors,
                )
                .await;
                Ok(r)
            }
            Err(e) => Err(e),
        };
        Rig::remove(&dir);
        remove_worker_dir(&worker.dir);
        let (blocks, n, wall, floor_samples) = r?;
        ok.store(n, Ordering::SeqCst);
        floor = Some(Interleaved::of(
            args.floor.block,
            blocks,
            n,
            wall,
            &samples,
            &floor_samples,
        ));
        wall
    } else {
        let mut workers = Vec::new();
        for (w, dir) in dirs.into_iter().enumerate() {
            let (mut c, plan, next, stop, ok) = (
                client.clone(),
                plan.clone(),
                next.clone(),
                stop.clone(),
                ok.clone(),
            );
            workers.push(tokio::spawn(async move {
                let mut samples = Samples::default();
                let mut errors = Vec::new();
                let mut worker = Worker { w, slot: 0, dir };
                loop {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= plan.args.count {
                        break;
                    }
                    match worker
                        .cycle(&mut c, &plan, i, &mut samples, &mut errors)
                        .await
                    {
                        Some(true) => {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        Some(false) => {}
                        None => return (samples, errors),
                    }
                }
                remove_worker_dir(&worker.dir);
                (samples, errors)
            }));
        }
        for w in workers {
            let (s, e) = w.await?;
            samples.merge(s);
            errors.extend(e);
        }
        start.elapsed()
    };
    let rss = sampler.map(|s| s.finish());
    let _ = std::fs::remove_dir(&args.work_dir);
    let cycles_ok = ok.load(Ordering::SeqCst);
    let report = LifecycleReport {
        cycles_ok,
        cycles_failed: errors.len(),
        concurrency: args.concurrency,
        wall_seconds: wall.as_secs_f64(),
        cycles_per_second: cycles_ok as f64 / wall.as_secs_f64().max(f64::EPSILON),
        operations: samples.summary(),
        rss_peak_kib: rss.map(|r| r.0),
        rss_final_kib: rss.map(|r| r.1),
        first_error: errors.first().cloned(),
        floor,
    };
    print(&report, args.json)?;
    Ok(if errors.is_empty() && !stop.load(Ordering::SeqCst) {
        0
    } else {
        1
    })
}

fn print(r: &LifecycleReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    println!(
        "{} cycles ok, {} failed, {} in flight, {:.2} s: {:.1} cycles/s",
        r.cycles_ok, r.cycles_failed, r.concurrency, r.wall_seconds, r.cycles_per_second
    );
    print_table(&r.operations);
    if let (Some(p), Some(f)) = (r.rss_peak_kib, r.rss_final_kib) {
        println!(
            "RSS of the driver: peak {:.1} MiB, final {:.1} MiB",
            p as f64 / 1024.0,
            f as f64 / 1024.0
        );
    }
    if let Some(f) = &r.floor {
        print_floor(f);
    }
    if let Some(e) = &r.first_error {
        println!("first error: {e}");
    }
    Ok(())
}

fn print_floor(f: &Interleaved) {
    println!(
        "this machine's floor, interleaved: {} blocks of up to {} cycles, each beside as many floor cycles (2 bind/unmount, 2 durable appends, 2 mkdir/rmdir, 1 directory flush)",
        f.blocks.len(),
        f.block_cycles
    );
    print_table(&f.operations);
    println!(
        "{:>5} {:>10} {:>14} {:>7} {:>16} {:>16} {:>9}",
        "block",
        "cycles/s",
        "floor cycles/s",
        "ratio",
        "NodePublish p99",
        "bind pair p99",
        "p99 ratio"
    );
    for (i, b) in f.blocks.iter().enumerate() {
        println!(
            "{:>5} {:>10.1} {:>14.1} {:>7.3} {:>13.1} us {:>13.1} us {:>9.2}",
            i,
            b.cycles_per_second,
            b.floor_cycles_per_second,
            b.ratio,
            b.node_publish_p99_us,
            b.bind_pair_p99_us,
            b.p99_ratio
        );
    }
    println!(
        "ratio to the floor, per block: median {:.3} (lowest {:.3}, highest {:.3}); all blocks: {:.3} (floor {:.1} cycles/s)",
        f.ratio_median, f.ratio_min, f.ratio_max, f.ratio, f.floor_cycles_per_second
    );
    println!(
        "NodePublish p99 / bind + unmount pair p99, per block: median {:.2} (lowest {:.2}, highest {:.2}); all blocks: {:.1} us / {:.1} us = {:.2}",
        f.p99_ratio_median, f.p99_ratio_min, f.p99_ratio_max, f.node_publish_p99_us, f.bind_pair_p99_us, f.p99_ratio
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_spread_is_the_median_and_both_ends() {
        assert_eq!(spread(vec![3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(spread(vec![4.0, 1.0, 3.0, 2.0]), (2.5, 1.0, 4.0));
        assert_eq!(spread(vec![]), (0.0, 0.0, 0.0));
    }

    #[test]
    fn a_block_is_its_cycles_against_the_floor_measured_beside_them() {
        let us = Duration::from_micros;
        let mut floor = Samples::default();
        // One floor cycle: 2 x 15 + 2 x 200 + 2 x 85 + 400 = 1,000 us, so
        // 1,000 cycles/s; the pair's p99 is its slower sample, 20 us.
        for (op, v) in [
            ("bind + unmount", 10),
            ("bind + unmount", 20),
            ("append + fdatasync", 200),
            ("append + fdatasync", 200),
            ("mkdir + rmdir", 85),
            ("mkdir + rmdir", 85),
            ("fsync new dir + parent", 400),
        ] {
            floor.add(op, us(v));
        }
        let mut cycles = Samples::default();
        cycles.add("NodePublishVolume", us(100));
        cycles.add("NodePublishVolume", us(300));
        // 2 cycles in 4 ms: 500 cycles/s, half the floor's.
        let b = FloorBlock::of(2, Duration::from_millis(4), &cycles, &floor);
        assert!((b.floor_cycles_per_second - 1000.0).abs() < 1e-6, "{b:?}");
        assert!((b.cycles_per_second - 500.0).abs() < 1e-6, "{b:?}");
        assert!((b.ratio - 0.5).abs() < 1e-9, "{b:?}");
        assert!((b.node_publish_p99_us - 300.0).abs() < 1e-6, "{b:?}");
        assert!((b.bind_pair_p99_us - 20.0).abs() < 1e-6, "{b:?}");
        assert!((b.p99_ratio - 15.0).abs() < 1e-9, "{b:?}");
        // No floor measured: ratios of 0, never a division by zero.
        let none = FloorBlock::of(2, Duration::from_millis(4), &cycles, &Samples::default());
        assert_eq!((none.ratio, none.p99_ratio), (0.0, 0.0));
    }

    #[test]
    fn the_floor_is_refused_beside_other_cycles_in_flight() {
        let args = LifecycleArgs {
            count: 1,
            concurrency: 2,
            volume: super::super::VolumeArgs {
                params: vec![],
                size: 1,
                block: false,
                fs_type: String::new(),
            },
            work_dir: "/tmp/berth-bench-unused".into(),
            pid: None,
            json: false,
            node_endpoint: None,
            attach: Attach::Never,
            floor: FloorArgs {
                on: true,
                ..Default::default()
            },
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let e = rt
            .block_on(run("unix:///nonexistent/berth.sock", args))
            .expect_err("refused");
        assert!(e.to_string().contains("-c 1"), "{e}");
    }
}
