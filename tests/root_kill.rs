//! Root tests of the real `berth` binary killed with SIGKILL at any moment
//! while volumes go through their whole lifecycle with real mounts
//! (CreateVolume, ControllerPublish, NodeStage, NodePublish, a write through
//! the pod's path, NodeUnpublish, NodeUnstage, ControllerUnpublish,
//! DeleteVolume), as a node restart or an OOM kill would. After each restart,
//! every volume's lifecycle is finished the way kubelet and the sidecars
//! would: the RPC that was in flight is retried, then the rest follow; every
//! one must succeed (every RPC is idempotent), data written through a
//! publication that was answered is there, and at the end nothing is left:
//! no mount, no record, no volume directory, and a clean `berth state check`.
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
use common::*;
use tonic::Request;

const BIN: &str = env!("CARGO_BIN_EXE_berth");

/// The steps of one volume's life, in order; a volume's progress is the
/// number of steps answered OK.
const STEPS: [&str; 12] = [
    "CreateVolume",
    "ControllerPublishVolume",
    "NodeStageVolume",
    "NodePublishVolume",
    "write",
    "NodeUnpublishVolume",
    "NodeUnstageVolume",
    // Staged again (a pod on the same node later): the filesystem that now
    // holds data must never be formatted, also when the kill lands here.
    "NodeStageVolume again",
    "read",
    "NodeUnstageVolume again",
    "ControllerUnpublishVolume",
    "DeleteVolume",
];
const WRITTEN: usize = 5;

/// What kind of volume the lifecycles use.
#[derive(Clone)]
struct Flavor {
    kinds: &'static str,
    parameters: HashMap<String, String>,
    cap: csi::VolumeCapability,
}

fn local() -> Flavor {
    Flavor {
        kinds: "local",
        parameters: HashMap::new(),
        cap: rwo(),
    }
}

fn block_ext4() -> Flavor {
    let mut cap = rwo();
    if let Some(csi::volume_capability::AccessType::Mount(m)) = &mut cap.access_type {
        m.fs_type = "ext4".into();
    }
    Flavor {
        kinds: "local,block",
        parameters: HashMap::from([("kind".to_string(), "block".to_string())]),
        cap,
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
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if std::os::unix::net::UnixStream::connect(&b.sock).is_ok() {
            return b;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!(
        "berth did not start after a kill: {}",
        std::fs::read_to_string(&b.log).unwrap_or_default()
    );
}

#[derive(Clone, Default, Debug)]
struct Progress {
    id: Option<String>,
    /// Steps answered OK.
    done: usize,
}

struct Paths {
    staging: PathBuf,
    target: PathBuf,
}

fn paths(pods: &Path, name: &str) -> Paths {
    Paths {
        staging: pods.join(name).join("staging"),
        target: pods.join(name).join("target"),
    }
}

/// Runs step `step` of volume `name`; returns the volume id after
/// CreateVolume.
async fn run_step(
    c: &mut CsiClient,
    f: &Flavor,
    pods: &Path,
    name: &str,
    id: &str,
    step: usize,
) -> Result<Option<String>, String> {
    let p = paths(pods, name);
    // Only a dead berth may fail an RPC (the connection breaks): any other
    // error, or a failed write or read through the volume, fails the test.
    let err = |s: tonic::Status| {
        let dead = matches!(
            s.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
        );
        format!(
            "{}{name} {}: {:?}: {}",
            if dead { "" } else { "fatal: " },
            STEPS[step],
            s.code(),
            s.message()
        )
    };
    match step {
        0 => {
            std::fs::create_dir_all(&p.staging).map_err(|e| e.to_string())?;
            let v = c
                .controller
                .create_volume(Request::new(csi::CreateVolumeRequest {
                    parameters: f.parameters.clone(),
                    volume_capabilities: vec![f.cap.clone()],
                    ..create_req(name, 16 << 20)
                }))
                .await
                .map_err(err)?;
            return Ok(v.into_inner().volume.map(|v| v.volume_id));
        }
        1 => {
            c.controller
                .controller_publish_volume(Request::new(csi::ControllerPublishVolumeRequest {
                    volume_id: id.into(),
                    node_id: NODE.into(),
                    volume_capability: Some(f.cap.clone()),
                    ..Default::default()
                }))
                .await
                .map_err(err)?;
        }
        2 | 7 => {
            c.node
                .node_stage_volume(Request::new(csi::NodeStageVolumeRequest {
                    volume_capability: Some(f.cap.clone()),
                    ..stage_req(id, &p.staging)
                }))
                .await
                .map_err(err)?;
        }
        3 => {
            c.node
                .node_publish_volume(Request::new(csi::NodePublishVolumeRequest {
                    volume_capability: Some(f.cap.clone()),
                    ..publish_req(id, &p.staging, &p.target, false)
                }))
                .await
                .map_err(err)?;
        }
        4 => {
            // What a pod does: write and sync through its own path.
            let f = p.target.join("data");
            std::fs::write(&f, name.as_bytes()).map_err(|e| format!("fatal: {name} write: {e}"))?;
            std::fs::File::open(&f)
                .and_then(|f| f.sync_all())
                .map_err(|e| format!("fatal: {name} sync: {e}"))?;
        }
        8 => {
            let got = std::fs::read(p.staging.join("data"))
                .map_err(|e| format!("fatal: {name} read after staging again: {e}"))?;
            if got != name.as_bytes() {
                return Err(format!("fatal: {name}: the data changed: {got:?}"));
            }
        }
        5 => {
            c.node
                .node_unpublish_volume(Request::new(csi::NodeUnpublishVolumeRequest {
                    volume_id: id.into(),
                    target_path: p.target.display().to_string(),
                }))
                .await
                .map_err(err)?;
        }
        6 | 9 => {
            c.node
                .node_unstage_volume(Request::new(csi::NodeUnstageVolumeRequest {
                    volume_id: id.into(),
                    staging_target_path: p.staging.display().to_string(),
                }))
                .await
                .map_err(err)?;
        }
        10 => {
            c.controller
                .controller_unpublish_volume(Request::new(csi::ControllerUnpublishVolumeRequest {
                    volume_id: id.into(),
                    node_id: NODE.into(),
                    ..Default::default()
                }))
                .await
                .map_err(err)?;
        }
        11 => {
            c.controller
                .delete_volume(Request::new(csi::DeleteVolumeRequest {
                    volume_id: id.into(),
                    ..Default::default()
                }))
                .await
                .map_err(err)?;
            let _ = std::fs::remove_dir_all(pods.join(name));
        }
        _ => unreachable!(),
    }
    Ok(None)
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
        if p.done == STEPS.len() {
            return Ok(());
        }
        let id = p.id.clone().unwrap_or_default();
        let got = run_step(c, f, pods, name, &id, p.done).await?;
        let mut b = book.lock().unwrap();
        let e = b.entry(name.to_string()).or_default();
        if let Some(got) = got {
            e.id = Some(got);
        }
        e.done += 1;
        acked.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn every_local_lifecycle_finishes_after_a_kill_at_any_moment() {
    kill_rounds(local(), &[3, 17, 41, 8, 97, 29, 60, 1]).await;
}

/// Filesystem volumes on loop-backed files: a kill can land in the middle
/// of mkfs, of attaching the loop device or of mounting it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn every_block_lifecycle_finishes_after_a_kill_at_any_moment() {
    kill_rounds(block_ext4(), &[2, 11, 23, 5, 37, 16]).await;
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
    let mut cut = vec![0usize; STEPS.len()];
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

        // Restart and finish every volume as kubelet and the sidecars
        // would: retry what was in flight, then the rest.
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
            if p.done == STEPS.len() {
                continue;
            }
            cut[p.done] += 1;
            if p.done == WRITTEN {
                // Written through the pod's path and answered: still there
                // (read at the staging path: the NodeUnpublish in flight may
                // have unmounted the pod's).
                let got = std::fs::read(paths(&pods, &name).staging.join("data"))
                    .unwrap_or_else(|e| panic!("{name} ({:?}): the data written before the kill: {e}\nmounts: {:?}\nberth's log:\n{}", p.id, mounts_under(&pods.join(&name)), std::fs::read_to_string(&b.log).unwrap_or_default()));
                assert_eq!(got, name.as_bytes(), "{name}: data changed by the kill");
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
                        "round {round}: after the kill at step {} ({}): {e}\nberth's log:\n{}",
                        p.done,
                        STEPS.get(p.done).copied().unwrap_or("done"),
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
        STEPS
            .iter()
            .zip(&cut)
            .filter(|(_, n)| **n > 0)
            .map(|(s, n)| format!("{s} {n}"))
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
    for dir in ["local", "block"] {
        let Ok(entries) = std::fs::read_dir(d.path().join(dir)) else {
            continue;
        };
        let left: Vec<_> = entries
            .map(|e| e.unwrap().file_name())
            .filter(|n| !n.to_string_lossy().starts_with('.'))
            .collect();
        assert!(left.is_empty(), "{dir} volumes left: {left:?}");
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
