//! Root tests of the real `berth` binary killed with SIGKILL at any moment
//! while volumes go through their whole lifecycle with real mounts, as a
//! node restart or an OOM kill would: eight clients, each running one
//! volume's steps after another (CreateVolume, ControllerPublish,
//! NodeStage, NodePublish, a write through the pod's path, ..., DeleteVolume;
//! with snapshots: CreateSnapshot, a restore staged and read, DeleteSnapshot).
//! After each kill, berth is started and killed once more while it starts
//! (finishing what the kill interrupted), then restarted, and every
//! lifecycle is finished the way kubelet and the sidecars would: the RPC that was in flight is retried, then the rest
//! follow; every one must succeed (every RPC is idempotent), data written
//! through a publication that was answered is there, a restore holds what
//! its snapshot was taken of, and at the end nothing is left: no mount, no
//! loop device, no record, no volume or snapshot on disk, and a clean
//! `berth state check`.
//! Ignored unless asked for (`cargo test --test root_kill -- --ignored`, as
//! tests/run-all.sh does inside a private mount namespace).
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth::client::{connect, CsiClient};
use berth::csi::v1 as csi;
use berth::csi::v1::volume_capability::access_mode::Mode;
use common::*;
use tonic::Request;

const BIN: &str = env!("CARGO_BIN_EXE_berth");

/// Which of a lifecycle's two volumes a step is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vol {
    /// The volume the lifecycle creates first.
    Source,
    /// The volume restored from the snapshot of the source.
    Restore,
    /// A clone of the source, made while it is in use.
    Clone,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Create(Vol),
    ControllerPublish(Vol),
    /// Staged at the volume's own staging path.
    Stage(Vol),
    /// The source published at its pod's path.
    Publish,
    /// What a pod does: writes the tag (with the lifecycle's name) through
    /// its path, and syncs it.
    Write(&'static str),
    /// Reads the volume at its staging path: the tag written last.
    Read(Vol, &'static str),
    Unpublish,
    Unstage(Vol),
    ControllerUnpublish(Vol),
    Delete(Vol),
    Snapshot,
    DeleteSnapshot,
    /// The source grown by 64 MiB while in use: ControllerExpandVolume,
    /// then NodeExpandVolume when the answer asks for it.
    Expand,
    /// Checks what the pod sees: a filesystem of about the new size.
    Grown,
}

use Step::*;
use Vol::*;

/// Published, written, unpublished, unstaged, staged again and read (a
/// filesystem that holds data is never formatted, also when the kill lands
/// in the second stage), then released and deleted.
const PLAIN: &[Step] = &[
    Create(Source),
    ControllerPublish(Source),
    Stage(Source),
    Publish,
    Write("v1"),
    Unpublish,
    Unstage(Source),
    Stage(Source),
    Read(Source, "v1"),
    Unstage(Source),
    ControllerUnpublish(Source),
    Delete(Source),
];

/// Grown while in use (a kill can land in the middle of growing the file,
/// the loop device or the filesystem), written again, staged again and
/// read.
const EXPAND: &[Step] = &[
    Create(Source),
    ControllerPublish(Source),
    Stage(Source),
    Publish,
    Write("v1"),
    Expand,
    Grown,
    Write("v2"),
    Unpublish,
    Unstage(Source),
    Stage(Source),
    Read(Source, "v2"),
    Unstage(Source),
    ControllerUnpublish(Source),
    Delete(Source),
];

/// A snapshot of a volume in use, a write after it, a restore of it staged
/// and read (what the snapshot was taken of), a clone of the volume in use
/// staged and read, then all of it deleted.
const SNAPSHOT: &[Step] = &[
    Create(Source),
    ControllerPublish(Source),
    Stage(Source),
    Publish,
    Write("v1"),
    Snapshot,
    Write("v2"),
    Create(Restore),
    ControllerPublish(Restore),
    Stage(Restore),
    Read(Restore, "v1"),
    Unstage(Restore),
    ControllerUnpublish(Restore),
    Delete(Restore),
    DeleteSnapshot,
    Read(Source, "v2"),
    Create(Clone),
    ControllerPublish(Clone),
    Stage(Clone),
    Read(Clone, "v2"),
    Unstage(Clone),
    ControllerUnpublish(Clone),
    Delete(Clone),
    Unpublish,
    Unstage(Source),
    ControllerUnpublish(Source),
    Delete(Source),
];

/// What kind of volume the lifecycles use.
#[derive(Clone)]
struct Flavor {
    kinds: &'static str,
    parameters: HashMap<String, String>,
    cap: csi::VolumeCapability,
    steps: &'static [Step],
    /// Size of a new volume (xfs needs 300 MiB); `Expand` adds 64 MiB.
    size: i64,
    /// Raw block volumes: the pod's data is the device's first bytes.
    raw: bool,
}

fn local(steps: &'static [Step]) -> Flavor {
    Flavor {
        kinds: "local",
        parameters: HashMap::new(),
        cap: rwo(),
        steps,
        size: 16 << 20,
        raw: false,
    }
}

/// Raw block volumes (volumeMode: Block) on loop-backed files: a kill can
/// land in the middle of attaching the loop device or binding its node.
fn block_raw(steps: &'static [Step]) -> Flavor {
    Flavor {
        kinds: "local,block",
        parameters: HashMap::from([("kind".to_string(), "block".to_string())]),
        cap: block_cap(Mode::SingleNodeWriter),
        steps,
        size: 16 << 20,
        raw: true,
    }
}

fn block_ext4(steps: &'static [Step]) -> Flavor {
    block_fs("ext4", steps)
}

/// xfs grows online here (ext4's online resize needs CAP_SYS_RESOURCE,
/// which root lacks on the development machine; the guest tests it).
fn block_xfs(steps: &'static [Step]) -> Flavor {
    block_fs("xfs", steps)
}

fn block_fs(fs: &str, steps: &'static [Step]) -> Flavor {
    let mut cap = rwo();
    if let Some(csi::volume_capability::AccessType::Mount(m)) = &mut cap.access_type {
        m.fs_type = fs.into();
    }
    Flavor {
        kinds: "local,block",
        parameters: HashMap::from([("kind".to_string(), "block".to_string())]),
        cap,
        steps,
        size: if fs == "xfs" { 300 << 20 } else { 16 << 20 },
        raw: false,
    }
}

struct Berth {
    child: Child,
    sock: PathBuf,
    log: PathBuf,
}

impl Drop for Berth {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path, f: &Flavor) -> Berth {
    let sock = dir.join("csi.sock");
    let log = dir.join("berth.log");
    let child = Command::new(BIN)
        .arg("--data-dir")
        .arg(dir)
        .arg("--endpoint")
        .arg(format!("unix://{}", sock.display()))
        .args(["--node-id", NODE, "--kinds", f.kinds])
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .unwrap(),
        )
        .spawn()
        .expect("spawn berth");
    let b = Berth { child, sock, log };
    let deadline = Instant::now() + START_DEADLINE;
    while Instant::now() < deadline {
        if std::os::unix::net::UnixStream::connect(&b.sock).is_ok() {
            return b;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!(
        "berth did not start after a kill in {START_DEADLINE:?} ({}): {}",
        where_it_waits(b.child.id()),
        std::fs::read_to_string(&b.log).unwrap_or_default()
    );
}

/// Starts berth and kills it after `after`, whether it is serving by then
/// or still starting.
fn kill_while_starting(dir: &Path, f: &Flavor, after: Duration) {
    let mut child = Command::new(BIN)
        .arg("--data-dir")
        .arg(dir)
        .arg("--endpoint")
        .arg(format!("unix://{}", dir.join("csi.sock").display()))
        .args(["--node-id", NODE, "--kinds", f.kinds])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn berth");
    std::thread::sleep(after);
    let _ = child.kill();
    let _ = child.wait();
}

#[derive(Clone, Default, Debug)]
struct Progress {
    source: Option<String>,
    restore: Option<String>,
    clone: Option<String>,
    snapshot: Option<String>,
    /// Steps answered OK.
    done: usize,
}

impl Progress {
    fn id(&self, v: Vol) -> String {
        match v {
            Source => self.source.clone(),
            Restore => self.restore.clone(),
            Clone => self.clone.clone(),
        }
        .unwrap_or_default()
    }
}

/// The staging path of a lifecycle's volume, and the source's pod path.
fn staging(pods: &Path, name: &str, v: Vol) -> PathBuf {
    pods.join(name).join(match v {
        Source => "staging",
        Restore => "staging-restore",
        Clone => "staging-clone",
    })
}

fn target(pods: &Path, name: &str) -> PathBuf {
    pods.join(name).join("target")
}

/// Where the pod writes: a file in its filesystem, or its raw device.
fn pod_data(f: &Flavor, pods: &Path, name: &str) -> PathBuf {
    if f.raw {
        target(pods, name)
    } else {
        target(pods, name).join("data")
    }
}

/// Where a staged volume's data is read: a file in the staged filesystem,
/// or the device node bound at `<staging>/<volume id>`.
fn staged_data(f: &Flavor, pods: &Path, name: &str, v: Vol, p: &Progress) -> PathBuf {
    if f.raw {
        staging(pods, name, v).join(p.id(v))
    } else {
        staging(pods, name, v).join("data")
    }
}

/// Reads what a `Write` step wrote for `name`: the whole file, or as many
/// of the device's first bytes.
fn read_data(f: &Flavor, path: &Path, name: &str, tag: &str) -> std::io::Result<Vec<u8>> {
    if !f.raw {
        return std::fs::read(path);
    }
    let mut buf = vec![0u8; content(name, tag).len()];
    std::io::Read::read_exact(&mut std::fs::File::open(path)?, &mut buf)?;
    Ok(buf)
}

fn content(name: &str, tag: &str) -> Vec<u8> {
    format!("{name} {tag}").into_bytes()
}

/// What a step answered that the lifecycle needs later.
enum Got {
    Nothing,
    Volume(Vol, String),
    Snapshot(String),
}

/// Runs `step` of lifecycle `name`.
async fn run_step(
    c: &mut CsiClient,
    f: &Flavor,
    pods: &Path,
    name: &str,
    p: &Progress,
    step: Step,
) -> Result<Got, String> {
    // Only a dead berth may fail an RPC (the connection breaks): any other
    // error, or a failed write or read through the volume, fails the test.
    let err = |s: tonic::Status| {
        let dead = matches!(
            s.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
        );
        format!(
            "{}{name} {step:?}: {:?}: {}",
            if dead { "" } else { "fatal: " },
            s.code(),
            s.message()
        )
    };
    let vol_name = |v: Vol| match v {
        Source => name.to_string(),
        Restore => format!("{name}-restore"),
        Clone => format!("{name}-clone"),
    };
    match step {
        Create(v) => {
            std::fs::create_dir_all(staging(pods, name, v)).map_err(|e| e.to_string())?;
            use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
            let content_source = match v {
                Source => None,
                Restore => Some(Type::Snapshot(SnapshotSource {
                    snapshot_id: p.snapshot.clone().unwrap_or_default(),
                })),
                Clone => Some(Type::Volume(VolumeSource {
                    volume_id: p.id(Source),
                })),
            }
            .map(|t| csi::VolumeContentSource { r#type: Some(t) });
            let r = c
                .controller
                .create_volume(Request::new(csi::CreateVolumeRequest {
                    parameters: f.parameters.clone(),
                    volume_capabilities: vec![f.cap.clone()],
                    volume_content_source: content_source,
                    ..create_req(&vol_name(v), f.size)
                }))
                .await
                .map_err(err)?;
            let id = r
                .into_inner()
                .volume
                .map(|v| v.volume_id)
                .unwrap_or_default();
            return Ok(Got::Volume(v, id));
        }
        ControllerPublish(v) => {
            c.controller
                .controller_publish_volume(Request::new(csi::ControllerPublishVolumeRequest {
                    volume_id: p.id(v),
                    node_id: NODE.into(),
                    volume_capability: Some(f.cap.clone()),
                    ..Default::default()
                }))
                .await
                .map_err(err)?;
        }
        Stage(v) => {
            c.node
                .node_stage_volume(Request::new(csi::NodeStageVolumeRequest {
                    volume_capability: Some(f.cap.clone()),
                    ..stage_req(&p.id(v), &staging(pods, name, v))
                }))
                .await
                .map_err(err)?;
        }
        Publish => {
            c.node
                .node_publish_volume(Request::new(csi::NodePublishVolumeRequest {
                    volume_capability: Some(f.cap.clone()),
                    ..publish_req(
                        &p.id(Source),
                        &staging(pods, name, Source),
                        &target(pods, name),
                        false,
                    )
                }))
                .await
                .map_err(err)?;
        }
        Write(tag) => {
            let file = pod_data(f, pods, name);
            // A device is written in place (never truncated or created).
            std::fs::OpenOptions::new()
                .write(true)
                .create(!f.raw)
                .truncate(!f.raw)
                .open(&file)
                .and_then(|mut w| std::io::Write::write_all(&mut w, &content(name, tag)))
                .map_err(|e| format!("fatal: {name} write: {e}"))?;
            std::fs::OpenOptions::new()
                .write(f.raw)
                .read(true)
                .open(&file)
                .and_then(|f| f.sync_all())
                .map_err(|e| format!("fatal: {name} sync: {e}"))?;
        }
        Read(v, tag) => {
            let got = read_data(f, &staged_data(f, pods, name, v, p), name, tag)
                .map_err(|e| format!("fatal: {name} read {v:?}: {e}"))?;
            if got != content(name, tag) {
                return Err(format!(
                    "fatal: {name} {v:?} holds {:?}, not {tag}",
                    String::from_utf8_lossy(&got)
                ));
            }
        }
        Unpublish => {
            retry_busy(|| {
                let mut c = c.clone();
                let req = csi::NodeUnpublishVolumeRequest {
                    volume_id: p.id(Source),
                    target_path: target(pods, name).display().to_string(),
                };
                async move { c.node.node_unpublish_volume(Request::new(req)).await }
            })
            .await
            .map_err(err)?;
        }
        Unstage(v) => {
            retry_busy(|| {
                let mut c = c.clone();
                let req = csi::NodeUnstageVolumeRequest {
                    volume_id: p.id(v),
                    staging_target_path: staging(pods, name, v).display().to_string(),
                };
                async move { c.node.node_unstage_volume(Request::new(req)).await }
            })
            .await
            .map_err(err)?;
        }
        ControllerUnpublish(v) => {
            c.controller
                .controller_unpublish_volume(Request::new(csi::ControllerUnpublishVolumeRequest {
                    volume_id: p.id(v),
                    node_id: NODE.into(),
                    ..Default::default()
                }))
                .await
                .map_err(err)?;
        }
        Delete(v) => {
            c.controller
                .delete_volume(Request::new(csi::DeleteVolumeRequest {
                    volume_id: p.id(v),
                    ..Default::default()
                }))
                .await
                .map_err(err)?;
            if v == Source {
                let _ = std::fs::remove_dir_all(pods.join(name));
            }
        }
        Snapshot => {
            let s = c
                .controller
                .create_snapshot(Request::new(csi::CreateSnapshotRequest {
                    source_volume_id: p.id(Source),
                    name: format!("{name}-snap"),
                    ..Default::default()
                }))
                .await
                .map_err(err)?
                .into_inner()
                .snapshot
                .unwrap_or_default();
            if !s.ready_to_use {
                return Err(format!("fatal: {name}: the snapshot answered is not ready"));
            }
            return Ok(Got::Snapshot(s.snapshot_id));
        }
        Expand => {
            let range = Some(csi::CapacityRange {
                required_bytes: f.size + (64 << 20),
                limit_bytes: 0,
            });
            let r = c
                .controller
                .controller_expand_volume(Request::new(csi::ControllerExpandVolumeRequest {
                    volume_id: p.id(Source),
                    capacity_range: range,
                    volume_capability: Some(f.cap.clone()),
                    ..Default::default()
                }))
                .await
                .map_err(err)?
                .into_inner();
            if r.node_expansion_required {
                c.node
                    .node_expand_volume(Request::new(csi::NodeExpandVolumeRequest {
                        volume_id: p.id(Source),
                        volume_path: target(pods, name).display().to_string(),
                        staging_target_path: staging(pods, name, Source).display().to_string(),
                        capacity_range: range,
                        volume_capability: Some(f.cap.clone()),
                        ..Default::default()
                    }))
                    .await
                    .map_err(err)?;
            }
        }
        Grown => {
            // Local directories without quotas report the whole filesystem:
            // only block volumes say what they hold.
            if f.kinds.contains("block") {
                let st = nix::sys::statvfs::statvfs(&target(pods, name))
                    .map_err(|e| format!("fatal: {name} statvfs: {e}"))?;
                let size = st.blocks() as i64 * st.fragment_size() as i64;
                let want = f.size + (64 << 20);
                // A filesystem shows less than its device (xfs keeps its
                // log out of the count: 64 MiB of a 300 MiB one), but one
                // that was not grown shows less than 15/16 of the old size.
                if size <= f.size * 15 / 16 || size > want {
                    return Err(format!(
                        "fatal: {name}: the pod sees {size} bytes after growing to {want}"
                    ));
                }
            }
        }
        DeleteSnapshot => {
            c.controller
                .delete_snapshot(Request::new(csi::DeleteSnapshotRequest {
                    snapshot_id: p.snapshot.clone().unwrap_or_default(),
                    ..Default::default()
                }))
                .await
                .map_err(err)?;
        }
    }
    Ok(Got::Nothing)
}

/// Runs the steps of `name` from its progress on, recording each answer.
async fn drive(
    c: &mut CsiClient,
    f: &Flavor,
    pods: &Path,
    name: &str,
    book: &Mutex<HashMap<String, Progress>>,
    acked: &AtomicUsize,
) -> Result<(), String> {
    // In the book before its first RPC: a CreateVolume in flight at the
    // kill is retried after it, as external-provisioner would.
    book.lock().unwrap().entry(name.to_string()).or_default();
    loop {
        let p = book.lock().unwrap().get(name).cloned().unwrap_or_default();
        let Some(&step) = f.steps.get(p.done) else {
            return Ok(());
        };
        let got = run_step(c, f, pods, name, &p, step).await?;
        let mut b = book.lock().unwrap();
        let e = b.entry(name.to_string()).or_default();
        match got {
            Got::Nothing => {}
            Got::Volume(Source, id) => e.source = Some(id),
            Got::Volume(Restore, id) => e.restore = Some(id),
            Got::Volume(Clone, id) => e.clone = Some(id),
            Got::Snapshot(id) => e.snapshot = Some(id),
        }
        e.done += 1;
        acked.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn every_local_lifecycle_finishes_after_a_kill_at_any_moment() {
    kill_rounds(local(PLAIN), &[3, 17, 41, 8, 97, 29, 60, 1]).await;
}

/// Local volumes grown while in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn every_local_expansion_finishes_after_a_kill_at_any_moment() {
    kill_rounds(local(EXPAND), &[4, 19, 37, 61, 90, 120]).await;
}

/// xfs volumes on loop-backed files grown while in use: the file, the
/// loop device's size and the filesystem, each a step a kill can cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn every_block_expansion_finishes_after_a_kill_at_any_moment() {
    kill_rounds(block_xfs(EXPAND), &[5, 21, 35, 47, 66, 90, 115]).await;
}

/// Filesystem volumes on loop-backed files: a kill can land in the middle
/// of mkfs, of attaching the loop device or of mounting it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn every_block_lifecycle_finishes_after_a_kill_at_any_moment() {
    kill_rounds(block_ext4(PLAIN), &[2, 11, 23, 5, 37, 16]).await;
}

/// Raw block volumes: published, written, staged again and read as a
/// device.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn every_raw_block_lifecycle_finishes_after_a_kill_at_any_moment() {
    kill_rounds(block_raw(PLAIN), &[3, 13, 29, 7, 41, 19, 55, 2, 70, 33]).await;
}

/// Snapshots of local volumes in use and their restores: a kill can land
/// in the middle of a tree copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn every_local_snapshot_lifecycle_finishes_after_a_kill_at_any_moment() {
    kill_rounds(local(SNAPSHOT), &[5, 23, 44, 11, 71, 2, 130, 160, 185]).await;
}

/// Snapshots and clones of staged ext4 volumes (frozen around the copy)
/// and their restores: a kill can land while the filesystem is frozen, and
/// the restart thaws it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn every_block_snapshot_lifecycle_finishes_after_a_kill_at_any_moment() {
    kill_rounds(block_ext4(SNAPSHOT), &[6, 19, 33, 52, 120, 150, 175, 195]).await;
}

/// Lifecycles on 8 clients at once, berth killed after `rounds[r]` more
/// answers in round `r` (varied, so the kill lands in different steps),
/// then restarted and every lifecycle finished.
async fn kill_rounds(f: Flavor, rounds: &[usize]) {
    assert!(is_root(), "root tests need root");
    let d = tempfile::tempdir().unwrap();
    let _unmount = BlockGuard(d.path().to_path_buf());
    let pods = d.path().join("pods");
    let book: Arc<Mutex<HashMap<String, Progress>>> = Default::default();
    let mut cut = vec![0usize; f.steps.len()];
    let mut b = start(d.path(), &f);
    for (round, &after) in rounds.iter().enumerate() {
        let acked = Arc::new(AtomicUsize::new(0));
        let c = connect(&b.sock.display().to_string()).await.unwrap();
        let mut workers = Vec::new();
        for w in 0..8 {
            let (mut c, book, pods, acked, f) = (
                c.clone(),
                book.clone(),
                pods.clone(),
                acked.clone(),
                f.clone(),
            );
            workers.push(tokio::spawn(async move {
                for i in 0.. {
                    let name = format!("r{round}-w{w}-{i}");
                    if let Err(e) = drive(&mut c, &f, &pods, &name, &book, &acked).await {
                        assert!(!e.starts_with("fatal: "), "before the kill: {e}");
                        return;
                    }
                }
            }));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while acked.load(Ordering::SeqCst) < after && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        tokio::time::sleep(Duration::from_micros((round as u64 * 1_337) % 4_000)).await;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(b.child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        for w in workers {
            w.await.unwrap();
        }
        drop(b);
        assert!(
            acked.load(Ordering::SeqCst) >= after,
            "round {round}: only {} answers before the kill",
            acked.load(Ordering::SeqCst)
        );

        // A kill during start-up too (while it finishes what the first kill
        // interrupted), then restart and finish every lifecycle as kubelet
        // and the sidecars would: retry what was in flight, then the rest.
        kill_while_starting(d.path(), &f, Duration::from_millis((round as u64 * 7) % 25));
        b = start(d.path(), &f);
        let mut c = connect(&b.sock.display().to_string()).await.unwrap();
        let names: Vec<(String, Progress)> = book
            .lock()
            .unwrap()
            .iter()
            .map(|(n, p)| (n.clone(), p.clone()))
            .collect();
        let mut finished = 0;
        for (name, p) in names {
            if p.done == f.steps.len() {
                continue;
            }
            cut[p.done] += 1;
            if let Some(Write(tag)) = p.done.checked_sub(1).map(|i| f.steps[i]) {
                // Written through the pod's path and answered: still there
                // (read at the staging path: a NodeUnpublish in flight may
                // have unmounted the pod's).
                let got = read_data(&f, &staged_data(&f, &pods, &name, Source, &p), &name, tag)
                    .unwrap_or_else(|e| panic!("{name}: the data written before the kill: {e}"));
                assert_eq!(got, content(&name, tag), "{name}: data changed by the kill");
            }
            let mut retries = 0;
            loop {
                match drive(&mut c, &f, &pods, &name, &book, &AtomicUsize::new(0)).await {
                    Ok(()) => break,
                    // A start-up reconcile may still hold the volume.
                    Err(e) if e.contains("Aborted") && retries < 50 => {
                        retries += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => panic!(
                        "round {round}: after the kill at step {} ({:?}): {e}\nberth's log:\n{}",
                        p.done,
                        f.steps.get(p.done),
                        std::fs::read_to_string(&b.log).unwrap_or_default()
                    ),
                }
            }
            finished += 1;
        }
        assert!(
            finished > 0,
            "round {round}: no lifecycle was cut by the kill"
        );
    }

    // Where the kills landed (each lifecycle in flight counted at the step
    // it was in).
    eprintln!(
        "kills cut lifecycles in: {}",
        f.steps
            .iter()
            .zip(&cut)
            .filter(|(_, n)| **n > 0)
            .map(|(s, n)| format!("{s:?} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    // Everything finished: nothing is listed, mounted or left on disk.
    let mut c = connect(&b.sock.display().to_string()).await.unwrap();
    let listed = c
        .controller
        .list_volumes(Request::new(Default::default()))
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(listed.is_empty(), "volumes left: {listed:?}");
    if f.steps.contains(&Snapshot) {
        let snaps = c
            .controller
            .list_snapshots(Request::new(Default::default()))
            .await
            .unwrap()
            .into_inner()
            .entries;
        assert!(snaps.is_empty(), "snapshots left: {snaps:?}");
    }
    assert!(
        book.lock().unwrap().len() >= rounds.len() * 8,
        "too few lifecycles: {}",
        book.lock().unwrap().len()
    );
    let st = {
        let mut b = b;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(b.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        b.child.wait().unwrap()
    };
    assert!(st.success(), "berth's exit on SIGTERM: {st}");
    assert_eq!(mounts_under(d.path()), Vec::<PathBuf>::new(), "mounts left");
    assert_eq!(loops_under(d.path()), vec![], "loop devices left");
    let names_in = |dir: PathBuf| -> Vec<std::ffi::OsString> {
        std::fs::read_dir(dir)
            .map(|e| e.map(|e| e.unwrap().file_name()).collect())
            .unwrap_or_default()
    };
    for root in ["local", "block"] {
        let left: Vec<_> = names_in(d.path().join(root))
            .into_iter()
            .filter(|n| !n.to_string_lossy().starts_with('.'))
            .collect();
        assert!(left.is_empty(), "{root} volumes left: {left:?}");
        // Snapshots, unfinished copies, the trash and anything set aside.
        for aside in [".snapshots", ".creating", ".trash", ".orphaned"] {
            let left = names_in(d.path().join(root).join(aside));
            assert!(left.is_empty(), "{root}/{aside} left: {left:?}");
        }
    }
    let check = Command::new(BIN)
        .arg("--data-dir")
        .arg(d.path())
        .args(["--node-id", NODE, "--kinds", f.kinds, "state", "check"])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "berth state check: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
}

/// Berth serving local volumes whose local root is a 64 MiB tmpfs under
/// `d` (the caller's `UnmountOnDrop` of `d` takes it off), a client, and
/// a deleter: it fills volume `id`'s directory with 40 MiB in 10,000
/// files, then deletes the volume, so that emptying the trash (on berth's
/// background thread, after DeleteVolume answered) takes a while.
struct SmallRoot {
    b: Berth,
    c: CsiClient,
    root: PathBuf,
    f: Flavor,
}

impl SmallRoot {
    async fn start(d: &Path) -> SmallRoot {
        let root = d.join("local");
        std::fs::create_dir(&root).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &root,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=64m"),
        )
        .unwrap();
        let f = local(&[]);
        let b = start(d, &f);
        let c = connect(&format!("unix://{}", b.sock.display()))
            .await
            .unwrap();
        SmallRoot { b, c, root, f }
    }

    async fn create(&mut self, name: &str, size: i64) -> String {
        self.c
            .controller
            .create_volume(Request::new(csi::CreateVolumeRequest {
                parameters: self.f.parameters.clone(),
                volume_capabilities: vec![self.f.cap.clone()],
                ..create_req(name, size)
            }))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .volume_id
    }

    async fn fill_and_delete(&mut self, id: &str) {
        let dir = self.root.join(id);
        let chunk = vec![7u8; 4096];
        for i in 0..10_000 {
            std::fs::write(dir.join(format!("f{i}")), &chunk).unwrap();
        }
        self.c
            .controller
            .delete_volume(Request::new(csi::DeleteVolumeRequest {
                volume_id: id.to_string(),
                ..Default::default()
            }))
            .await
            .unwrap();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.b.log).unwrap_or_default()
    }
}

/// A create right after a delete finds the space the delete freed, though
/// the deleted local volume's directory is emptied on berth's background
/// thread after DeleteVolume answered (CreateVolume waits for it a while
/// before it refuses for space): a local root on a 64 MiB tmpfs, a volume
/// of 40 MiB holding 40 MiB in 10,000 files, deleted, then another of 40
/// MiB at once.
#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn a_create_right_after_a_delete_finds_the_space_the_delete_freed() {
    let d = tempfile::tempdir().unwrap();
    let _unmount = UnmountOnDrop(d.path().to_path_buf());
    let mut s = SmallRoot::start(d.path()).await;
    let a = s.create("a", 40 << 20).await;
    s.fill_and_delete(&a).await;
    let r =
        s.c.controller
            .create_volume(Request::new(csi::CreateVolumeRequest {
                parameters: s.f.parameters.clone(),
                volume_capabilities: vec![s.f.cap.clone()],
                ..create_req("b", 40 << 20)
            }))
            .await;
    assert!(r.is_ok(), "{r:?}: {}", s.log());
}

/// An expansion right after a delete finds the space the delete freed, as
/// a create does (`a_create_right_after_a_delete_finds_the_space_the_delete_freed`):
/// a local root on a 64 MiB tmpfs, a volume of 40 MiB holding 40 MiB in
/// 10,000 files and one of 8 MiB; the first deleted, then the second grown
/// to 40 MiB at once.
#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn an_expansion_right_after_a_delete_finds_the_space_the_delete_freed() {
    let d = tempfile::tempdir().unwrap();
    let _unmount = UnmountOnDrop(d.path().to_path_buf());
    let mut s = SmallRoot::start(d.path()).await;
    let a = s.create("a", 40 << 20).await;
    let b = s.create("b", 8 << 20).await;
    s.fill_and_delete(&a).await;
    let r =
        s.c.controller
            .controller_expand_volume(Request::new(csi::ControllerExpandVolumeRequest {
                volume_id: b,
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: 40 << 20,
                    limit_bytes: 0,
                }),
                volume_capability: Some(s.f.cap.clone()),
                ..Default::default()
            }))
            .await;
    assert!(r.is_ok(), "{r:?}: {}", s.log());
}
