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
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use serde::Serialize;

use super::report::{print_table, OpSummary, Samples};
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
    pub wall_seconds: f64,
    pub cycles_per_second: f64,
    pub operations: Vec<OpSummary>,
    pub rss_peak_kib: Option<u64>,
    pub rss_final_kib: Option<u64>,
    pub first_error: Option<String>,
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
    let start = Instant::now();
    let mut workers = Vec::new();
    for (w, mut dir) in dirs.into_iter().enumerate() {
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
            let mut slot = 0;
            loop {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= plan.args.count {
                    break;
                }
                let t = Instant::now();
                match cycle(&mut c, &plan, i, &dir, &mut samples).await {
                    Ok(()) => {
                        samples.add("cycle", t.elapsed());
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => {
                        errors.push(e);
                        remove_worker_dir(&dir);
                        slot += 1;
                        match worker_dir(&plan, w, slot) {
                            Ok(d) => dir = d,
                            Err(e) => {
                                errors.push(e);
                                return (samples, errors);
                            }
                        }
                    }
                }
            }
            remove_worker_dir(&dir);
            (samples, errors)
        }));
    }
    let mut errors: Vec<String> = Vec::new();
    for w in workers {
        let (s, e) = w.await?;
        samples.merge(s);
        errors.extend(e);
    }
    let wall = start.elapsed();
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
    if let Some(e) = &r.first_error {
        println!("first error: {e}");
    }
    Ok(())
}
