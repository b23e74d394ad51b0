//! Block volumes killed at any moment (run by tests/run-all.sh, with
//! PROBE_OWN_FS=1; written as a probe, 2026-12-06): the real `berth` binary
//! (`--kinds local,block`, loop-backed files) killed with SIGKILL in the
//! middle of one block RPC, restarted, and the CO's retries replayed; then
//! the guarantees checked: an acknowledged volume and its data survive,
//! the node RPCs succeed when retried, and after the deletes no mount,
//! loop device or file is left, GetCapacity is back and `berth state
//! check` is clean. Every test sweeps the kill point:
//! - by default, a delay after the RPC is sent: 0 to PROBE_MAX_US
//!   (default 30000) in steps of PROBE_STEP_US (default 1000);
//! - PROBE_BERTH_SYS=<syscall>: strace attached to berth (all threads and
//!   its children) kills at a thread's k-th such syscall, k swept as the
//!   delay would be (PROBE_MAX_US=6 PROBE_STEP_US=1: k = 1..7);
//! - PROBE_SYS=<syscall> (stage tests): mkfs.ext4/mkfs.xfs run killed at
//!   their k-th such syscall (e.g. pwrite64), then berth with them.
//!
//! PROBE_OWN_FS=1 puts the block root on a 3 GiB ext4 of its own, so that
//! capacity is compared exactly (on a shared disk others' writes are
//! noise); PROBE_THIN=1 makes the expansion, snapshot and teardown tests
//! use thin volumes, PROBE_THICK=1 the stage tests thick ones; PROBE_PHASE=publish (kill during NodePublishVolume)
//! or abandon (kill during NodeStageVolume, then only NodeUnpublish,
//! NodeUnstage and DeleteVolume, as when the pod is gone) for the stage
//! tests. Run as root in a private mount namespace, e.g.
//! `PROBE_OWN_FS=1 PROBE_BERTH_SYS=ioctl PROBE_MAX_US=6 PROBE_STEP_US=1
//! unshare --mount --propagation private -- cargo test --test
//! root_kill_block killed_during_stage_ext4 -- --ignored --nocapture`.
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use berth::client::{connect, CsiClient};
use berth::csi::v1 as csi;
use berth::csi::v1::volume_capability::access_mode::Mode;
use common::*;
use tonic::Request;

const BIN: &str = env!("CARGO_BIN_EXE_berth");

struct Berth {
    child: Child,
    sock: PathBuf,
}
impl Drop for Berth {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path) -> Berth {
    start_as(dir, None)
}

/// `inject`: run under strace, SIGKILL injected at `syscall:when=N`.
fn start_as(dir: &Path, inject: Option<String>) -> Berth {
    start_with(dir, inject, &[])
}

/// `start_as`, with `extra` arguments (a `--disk-pool`).
fn start_with(dir: &Path, inject: Option<String>, extra: &[String]) -> Berth {
    use std::os::unix::process::CommandExt;
    let sock = dir.join("csi.sock");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("berth.log"))
        .unwrap();
    let mut cmd = Command::new(BIN);
    if let Some(when) = &inject {
        // mkfs.ext4 and mkfs.xfs found first in PATH: the real one, killed
        // at its $PROBE_WHEN-th $PROBE_SYS, then berth (its parent) killed.
        let wrap = dir.join("wrap");
        std::fs::create_dir_all(&wrap).unwrap();
        for fs in ["mkfs.ext4", "mkfs.xfs"] {
            let real = Command::new("sh")
                .args(["-c", &format!("command -v {fs}")])
                .output()
                .unwrap();
            let real = String::from_utf8_lossy(&real.stdout).trim().to_string();
            let script = format!(
                "#!/bin/sh\nstrace -qq -o /dev/null -e trace=$PROBE_SYS -e inject=$PROBE_SYS:signal=SIGKILL:when=$PROBE_WHEN {real} \"$@\"\nrc=$?\nkill -9 $PPID\nexit $rc\n"
            );
            std::fs::write(wrap.join(fs), script).unwrap();
            Command::new("chmod")
                .arg("755")
                .arg(wrap.join(fs))
                .status()
                .unwrap();
        }
        cmd.env("PROBE_WHEN", when).env(
            "PATH",
            format!(
                "{}:{}",
                wrap.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        );
    }
    let child = cmd
        .arg("--data-dir")
        .arg(dir)
        .arg("--endpoint")
        .arg(format!("unix://{}", sock.display()))
        .args(["--node-id", NODE, "--kinds", "local,block"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(log)
        .process_group(0)
        .spawn()
        .unwrap();
    let b = Berth { child, sock };
    let deadline = Instant::now() + START_DEADLINE;
    while Instant::now() < deadline {
        if std::os::unix::net::UnixStream::connect(&b.sock).is_ok() {
            return b;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!(
        "berth did not start in {START_DEADLINE:?} ({}): {}",
        where_it_waits(b.child.id()),
        std::fs::read_to_string(dir.join("berth.log")).unwrap_or_default()
    );
}

async fn conn(b: &Berth, dir: &Path) -> CsiClient {
    for _ in 0..100 {
        if let Ok(c) = connect(&b.sock.display().to_string()).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "cannot connect: {}",
        std::fs::read_to_string(dir.join("berth.log")).unwrap_or_default()
    );
}

/// With PROBE_OWN_FS: the block root on an ext4 of its own (a loop mount
/// under `dir`), so that its free space is berth's alone.
fn own_fs(dir: &Path) {
    if std::env::var("PROBE_OWN_FS").is_err() {
        return;
    }
    let img = dir.join("fs.img");
    let root = dir.join("block");
    std::fs::create_dir_all(&root).unwrap();
    assert!(Command::new("truncate")
        .arg("-s")
        .arg("3G")
        .arg(&img)
        .status()
        .unwrap()
        .success());
    assert!(Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&img)
        .status()
        .unwrap()
        .success());
    assert!(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&img)
        .arg(&root)
        .status()
        .unwrap()
        .success());
}

/// How much less free space after than before is noise: none on a block
/// root of its own; on a shared disk, what others write meanwhile.
fn slack() -> i64 {
    if std::env::var("PROBE_OWN_FS").is_ok() {
        1 << 20
    } else {
        64 << 20
    }
}

/// With PROBE_BERTH_SYS=<syscall>: strace attached to the running berth
/// (all threads) with SIGKILL injected at a thread's `k`-th such syscall.
fn arm(b: &Berth, k: u64) -> Option<Child> {
    let sys = std::env::var("PROBE_BERTH_SYS").ok()?;
    Some(arm_sys(b, &sys, k))
}

/// strace attached to the running berth (all threads and its children)
/// with SIGKILL injected at a thread's `k`-th `sys` syscall.
fn arm_sys(b: &Berth, sys: &str, k: u64) -> Child {
    let pid = b.child.id();
    let st = Command::new("strace")
        .args(["-f", "-qq", "-o", "/dev/null", "-e"])
        .arg(format!("trace={sys}"))
        .arg("-e")
        .arg(format!("inject={sys}:signal=SIGKILL:when={k}"))
        .arg("-p")
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let traced = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|rd| {
                rd.flatten().all(|t| {
                    std::fs::read_to_string(t.path().join("status"))
                        .map(|s| {
                            s.lines().any(|l| {
                                l.starts_with("TracerPid:")
                                    && l.split_whitespace().nth(1) != Some("0")
                            })
                        })
                        .unwrap_or(true)
                })
            })
            .unwrap_or(true)
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !traced() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50));
    st
}

/// Waits for the moment to kill: `us` later, or (armed) once the RPC has
/// finished or been cut by the injected kill.
async fn fire<T>(us: u64, armed: &Option<Child>, t: &tokio::task::JoinHandle<T>) {
    if armed.is_some() {
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while !t.is_finished() {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
        })
        .await;
    } else {
        tokio::time::sleep(Duration::from_micros(us)).await;
    }
}

fn disarm(armed: Option<Child>) {
    if let Some(mut st) = armed {
        let _ = st.kill();
        let _ = st.wait();
    }
}

fn params(thick: bool) -> HashMap<String, String> {
    let mut p = HashMap::from([("kind".to_string(), "block".to_string())]);
    if thick {
        p.insert("allocation".into(), "thick".into());
    }
    p
}

fn fs_cap(fs: &str) -> csi::VolumeCapability {
    let mut cap = rwo();
    if let Some(csi::volume_capability::AccessType::Mount(m)) = &mut cap.access_type {
        m.fs_type = fs.into();
    }
    cap
}

async fn capacity(c: &mut CsiClient, thick: bool) -> i64 {
    c.controller
        .get_capacity(Request::new(csi::GetCapacityRequest {
            parameters: params(thick),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .available_capacity
}

async fn create(
    c: &mut CsiClient,
    name: &str,
    size: i64,
    thick: bool,
    cap: &csi::VolumeCapability,
) -> Result<String, tonic::Status> {
    c.controller
        .create_volume(Request::new(csi::CreateVolumeRequest {
            parameters: params(thick),
            volume_capabilities: vec![cap.clone()],
            ..create_req(name, size)
        }))
        .await
        .map(|r| r.into_inner().volume.unwrap().volume_id)
}

/// Retries as a CO does: Aborted/Unavailable are retried, anything else is
/// returned after 100 tries.
async fn retry<T, F, Fut>(what: &str, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let mut last = None;
    for _ in 0..100 {
        match call().await {
            Ok(v) => return v,
            Err(e) => {
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    panic!(
        "{what} never succeeded after the restart: {:?}",
        last.unwrap()
    );
}

/// With PROBE_RESTART_US=<n>: berth started and killed again `n` µs
/// later (in its start-up, finishing what the first kill interrupted).
fn kill_starting(dir: &Path) {
    kill_starting_with(dir, &[])
}

/// `kill_starting`, berth given `extra` arguments (a `--disk-pool`).
fn kill_starting_with(dir: &Path, extra: &[String]) {
    let Some(us) = std::env::var("PROBE_RESTART_US")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    else {
        return;
    };
    use std::os::unix::process::CommandExt;
    let mut child = Command::new(BIN)
        .arg("--data-dir")
        .arg(dir)
        .arg("--endpoint")
        .arg(format!("unix://{}", dir.join("csi.sock").display()))
        .args(["--node-id", NODE, "--kinds", "local,block"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_micros(us));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(-(child.id() as i32)),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = child.wait();
}

/// Kills berth's whole process group (berth, strace, mkfs...), as a
/// container's end does.
fn kill(b: Berth) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(-(b.child.id() as i32)),
        nix::sys::signal::Signal::SIGKILL,
    );
    drop(b);
}

fn state_check(dir: &Path) -> String {
    state_check_with(dir, &[])
}

/// `state_check`, berth given `extra` arguments (a `--disk-pool`).
fn state_check_with(dir: &Path, extra: &[String]) -> String {
    let o = Command::new(BIN)
        .arg("--data-dir")
        .arg(dir)
        .args(["--node-id", NODE, "--kinds", "local,block"])
        .args(extra)
        .args(["state", "check"])
        .output()
        .unwrap();
    if o.status.success() {
        String::new()
    } else {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    }
}

fn leftovers(dir: &Path) -> Vec<String> {
    let mut v = Vec::new();
    for aside in ["", ".orphaned", ".snapshots", ".trash", ".creating"] {
        if let Ok(rd) = std::fs::read_dir(dir.join("block").join(aside)) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().to_string();
                if (aside.is_empty() && n.starts_with('.')) || n == "lost+found" {
                    continue;
                }
                v.push(format!("{aside}/{n}"));
            }
        }
    }
    v
}

fn sweep() -> Vec<u64> {
    sweep_or(30_000, 1_000)
}

/// The kill points: PROBE_MAX_US and PROBE_STEP_US, or `max` and `step`
/// when they are not set.
fn sweep_or(max: u64, step: u64) -> Vec<u64> {
    let max: u64 = std::env::var("PROBE_MAX_US")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(max);
    let step: u64 = std::env::var("PROBE_STEP_US")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(step);
    (0..=max).step_by(step as usize).collect()
}

/// CreateVolume (thick or thin) killed after a delay, then retried; the
/// volume deleted; capacity comes back, nothing left.
async fn create_kill(thick: bool) {
    let d = tempfile::tempdir().unwrap();
    let _g = BlockGuard(d.path().to_path_buf());
    own_fs(d.path());
    let size = 512 << 20;
    let mut fails = Vec::new();
    for (i, us) in sweep().into_iter().enumerate() {
        let b = start(d.path());
        let mut c = conn(&b, d.path()).await;
        let before = capacity(&mut c, thick).await;
        let name = format!("v{i}");
        let mut c2 = c.clone();
        let n2 = name.clone();
        let armed = arm(&b, us + 1);
        let t =
            tokio::spawn(async move { create(&mut c2, &n2, size, thick, &fs_cap("ext4")).await });
        fire(us, &armed, &t).await;
        kill(b);
        disarm(armed);
        kill_starting(d.path());
        let first = t.await.unwrap();
        let b = start(d.path());
        let mut c = conn(&b, d.path()).await;
        let id = retry("CreateVolume", || {
            let mut c = c.clone();
            let n = name.clone();
            async move { create(&mut c, &n, size, thick, &fs_cap("ext4")).await }
        })
        .await;
        if let Ok(f) = &first {
            if f != &id {
                fails.push(format!("{us}us: acked {f}, retry gave {id}"));
            }
        }
        retry("DeleteVolume", || {
            let mut c = c.clone();
            let id = id.clone();
            async move {
                c.controller
                    .delete_volume(Request::new(csi::DeleteVolumeRequest {
                        volume_id: id,
                        ..Default::default()
                    }))
                    .await
            }
        })
        .await;
        let after = capacity(&mut c, thick).await;
        let left = leftovers(d.path());
        // Another helper may write the disk meanwhile: allow 64 MiB noise.
        if before - after > slack() || !left.is_empty() {
            fails.push(format!(
                "{us}us (first answer {:?}): capacity {before} -> {after}, left {left:?}",
                first.as_ref().map_err(|e| e.code())
            ));
        }
        drop(b);
        let sc = state_check(d.path());
        if !sc.is_empty() {
            fails.push(format!("{us}us: state check: {sc}"));
        }
        eprintln!("{us}us: first {:?}", first.as_ref().map_err(|e| e.code()));
    }
    assert!(fails.is_empty(), "{fails:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and a private mount namespace (tests/run-all.sh runs it)"]
async fn killed_during_thick_create() {
    create_kill(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and a private mount namespace (tests/run-all.sh runs it)"]
async fn killed_during_thin_create() {
    create_kill(false).await;
}

/// NodeStage of a new fs volume (or raw) killed after a delay; kubelet
/// retries stage until it succeeds; data written, unstaged, staged again,
/// read; then all torn down and deleted.
async fn stage_kill(fs: &str) {
    let d = tempfile::tempdir().unwrap();
    let _g = BlockGuard(d.path().to_path_buf());
    own_fs(d.path());
    let raw = fs == "raw";
    let cap = if raw {
        block_cap(Mode::SingleNodeWriter)
    } else {
        fs_cap(fs)
    };
    let size = if fs == "xfs" { 300 << 20 } else { 64 << 20 };
    let mut fails = Vec::new();
    for (i, us) in sweep().into_iter().enumerate() {
        let inject = std::env::var("PROBE_SYS")
            .ok()
            .map(|_| (us + 1).to_string());
        let b = start_as(d.path(), inject.clone());
        let mut c = conn(&b, d.path()).await;
        let id = create(
            &mut c,
            &format!("v{i}"),
            size,
            std::env::var("PROBE_THICK").is_ok(),
            &cap,
        )
        .await
        .unwrap();
        let staging = d.path().join(format!("pods/{i}/staging"));
        let target = d.path().join(format!("pods/{i}/target"));
        std::fs::create_dir_all(&staging).unwrap();
        let sreq = csi::NodeStageVolumeRequest {
            volume_capability: Some(cap.clone()),
            ..stage_req(&id, &staging)
        };
        let preq = csi::NodePublishVolumeRequest {
            volume_capability: Some(cap.clone()),
            ..publish_req(&id, &staging, &target, false)
        };
        let phase = std::env::var("PROBE_PHASE").unwrap_or_default();
        let mut c2 = c.clone();
        let (s2, p2) = (sreq.clone(), preq.clone());
        let publish_phase = phase == "publish";
        if publish_phase {
            c.node
                .node_stage_volume(Request::new(sreq.clone()))
                .await
                .unwrap();
        }
        let armed = arm(&b, us + 1);
        let t = tokio::spawn(async move {
            if publish_phase {
                c2.node
                    .node_publish_volume(Request::new(p2))
                    .await
                    .map(|_| ())
            } else {
                c2.node
                    .node_stage_volume(Request::new(s2))
                    .await
                    .map(|_| ())
            }
        });
        if inject.is_some() {
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                while !t.is_finished() {
                    tokio::time::sleep(Duration::from_millis(5)).await
                }
            })
            .await;
        } else {
            fire(us, &armed, &t).await;
        }
        kill(b);
        disarm(armed);
        kill_starting(d.path());
        let first = t.await.unwrap();
        let b = start(d.path());
        let c = conn(&b, d.path()).await;
        if phase == "abandon" {
            // The pod went away: kubelet unstages what may be staged
            // (and unpublishes), then the volume is deleted.
            retry("NodeUnpublish", || {
                let mut c = c.clone();
                let r = csi::NodeUnpublishVolumeRequest {
                    volume_id: id.clone(),
                    target_path: target.display().to_string(),
                };
                async move { c.node.node_unpublish_volume(Request::new(r)).await }
            })
            .await;
            unstage(&c, &id, &staging).await;
            let before_delete: Vec<_> = loops_under(d.path())
                .into_iter()
                .filter(|l| l.1 != d.path().join("fs.img"))
                .collect();
            retry("DeleteVolume", || {
                let mut c = c.clone();
                let id = id.clone();
                async move {
                    c.controller
                        .delete_volume(Request::new(csi::DeleteVolumeRequest {
                            volume_id: id,
                            ..Default::default()
                        }))
                        .await
                }
            })
            .await;
            let m: Vec<_> = mounts_under(d.path())
                .into_iter()
                .filter(|m| *m != d.path().join("block"))
                .collect();
            let l: Vec<_> = loops_under(d.path())
                .into_iter()
                .filter(|l| l.1 != d.path().join("fs.img"))
                .collect();
            let left = leftovers(d.path());
            if !m.is_empty() || !l.is_empty() || !left.is_empty() || !before_delete.is_empty() {
                fails.push(format!("{us}us (first {:?}): left mounts {m:?} loops {l:?} files {left:?}; loops after unstage {before_delete:?}", first.as_ref().map_err(|e| e.code())));
                eprintln!("{}", fails.last().unwrap());
            }
            drop(b);
            eprintln!("{us}us: first {:?}", first.as_ref().map_err(|e| e.code()));
            continue;
        }
        let mut errs = Vec::new();
        for _ in 0..60 {
            let mut c = c.clone();
            match c.node.node_stage_volume(Request::new(sreq.clone())).await {
                Ok(_) => {
                    errs.clear();
                    break;
                }
                Err(e) => {
                    errs.push(format!("{:?}: {}", e.code(), e.message()));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        if !errs.is_empty() {
            fails.push(format!(
                "{us}us (first {:?}): stage never succeeded: {}",
                first.as_ref().map_err(|e| e.code()),
                errs.last().unwrap()
            ));
            eprintln!("{}", fails.last().unwrap());
            drop(b);
            continue;
        }
        retry("NodePublish", || {
            let mut c = c.clone();
            let r = preq.clone();
            async move { c.node.node_publish_volume(Request::new(r)).await }
        })
        .await;
        let data = if raw {
            target.clone()
        } else {
            target.join("data")
        };
        let tag = format!("hello {i}");
        std::fs::OpenOptions::new()
            .write(true)
            .create(!raw)
            .open(&data)
            .and_then(|mut f| {
                std::io::Write::write_all(&mut f, tag.as_bytes())?;
                f.sync_all()
            })
            .unwrap();
        retry("NodeUnpublish", || {
            let mut c = c.clone();
            let r = csi::NodeUnpublishVolumeRequest {
                volume_id: id.clone(),
                target_path: target.display().to_string(),
            };
            async move { c.node.node_unpublish_volume(Request::new(r)).await }
        })
        .await;
        unstage(&c, &id, &staging).await;
        retry("NodeStage again", || {
            let mut c = c.clone();
            let r = sreq.clone();
            async move { c.node.node_stage_volume(Request::new(r)).await }
        })
        .await;
        let read = if raw {
            staging.join(&id)
        } else {
            staging.join("data")
        };
        let mut buf = vec![0u8; tag.len()];
        match std::fs::File::open(&read)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf))
        {
            Ok(()) if buf == tag.as_bytes() => {}
            r => fails.push(format!(
                "{us}us: data lost: {r:?} {:?}",
                String::from_utf8_lossy(&buf)
            )),
        }
        unstage(&c, &id, &staging).await;
        retry("DeleteVolume", || {
            let mut c = c.clone();
            let id = id.clone();
            async move {
                c.controller
                    .delete_volume(Request::new(csi::DeleteVolumeRequest {
                        volume_id: id,
                        ..Default::default()
                    }))
                    .await
            }
        })
        .await;
        let m: Vec<_> = mounts_under(d.path())
            .into_iter()
            .filter(|m| *m != d.path().join("block"))
            .collect();
        let l: Vec<_> = loops_under(d.path())
            .into_iter()
            .filter(|l| l.1 != d.path().join("fs.img"))
            .collect();
        let left = leftovers(d.path());
        if !m.is_empty() || !l.is_empty() || !left.is_empty() {
            fails.push(format!(
                "{us}us: left mounts {m:?} loops {l:?} files {left:?}"
            ));
        }
        drop(b);
        eprintln!("{us}us: first {:?}", first.as_ref().map_err(|e| e.code()));
    }
    let sc = state_check(d.path());
    assert!(fails.is_empty() && sc.is_empty(), "{fails:#?}\n{sc}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and a private mount namespace (tests/run-all.sh runs it)"]
async fn killed_during_stage_ext4() {
    stage_kill("ext4").await;
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and a private mount namespace (tests/run-all.sh runs it)"]
async fn killed_during_stage_xfs() {
    stage_kill("xfs").await;
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and a private mount namespace (tests/run-all.sh runs it)"]
async fn killed_during_stage_raw() {
    stage_kill("raw").await;
}
/// NodeUnstageVolume of `id` at `staging`, retried until it answers OK.
async fn unstage(c: &CsiClient, id: &str, staging: &Path) {
    retry("NodeUnstage", || {
        let mut c = c.clone();
        let r = csi::NodeUnstageVolumeRequest {
            volume_id: id.to_string(),
            staging_target_path: staging.display().to_string(),
        };
        async move { c.node.node_unstage_volume(Request::new(r)).await }
    })
    .await;
}

/// NodeStageVolume of `id` with `cap` at `staging` (made first), retried
/// until it answers OK (`what` names it in the retry's messages); then the
/// first `len` bytes of the device file staged there.
async fn stage_and_read(
    c: &CsiClient,
    what: &str,
    id: &str,
    cap: &csi::VolumeCapability,
    staging: &Path,
    len: usize,
) -> Vec<u8> {
    std::fs::create_dir_all(staging).unwrap();
    let req = csi::NodeStageVolumeRequest {
        volume_capability: Some(cap.clone()),
        ..stage_req(id, staging)
    };
    retry(what, || {
        let mut c = c.clone();
        let r = req.clone();
        async move { c.node.node_stage_volume(Request::new(r)).await }
    })
    .await;
    let mut got = vec![0u8; len];
    std::fs::File::open(staging.join(id))
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut got))
        .unwrap();
    got
}

/// CreateSnapshot `req`, retried until it answers OK: the snapshot's id.
async fn snapshot(c: &CsiClient, req: &csi::CreateSnapshotRequest) -> String {
    retry("CreateSnapshot", || {
        let mut c = c.clone();
        let r = req.clone();
        async move {
            c.controller
                .create_snapshot(Request::new(r))
                .await
                .map(|r| r.into_inner().snapshot.unwrap().snapshot_id)
        }
    })
    .await
}

/// DeleteSnapshot of `snap`, retried until it answers OK.
async fn del_snap(c: &CsiClient, snap: &str) {
    retry("DeleteSnapshot", || {
        let mut c = c.clone();
        let s = snap.to_string();
        async move {
            c.controller
                .delete_snapshot(Request::new(csi::DeleteSnapshotRequest {
                    snapshot_id: s,
                    ..Default::default()
                }))
                .await
        }
    })
    .await;
}

async fn del_vol(c: &CsiClient, id: &str) {
    retry("DeleteVolume", || {
        let mut c = c.clone();
        let id = id.to_string();
        async move {
            c.controller
                .delete_volume(Request::new(csi::DeleteVolumeRequest {
                    volume_id: id,
                    ..Default::default()
                }))
                .await
        }
    })
    .await;
}

/// A raw thick volume with 64 MiB of data: CreateSnapshot killed after a
/// delay, retried; then a restore from it killed after a delay, retried;
/// the restore read; everything deleted; capacity back, nothing left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and a private mount namespace (tests/run-all.sh runs it)"]
async fn killed_during_snapshot_restore() {
    let d = tempfile::tempdir().unwrap();
    let _g = BlockGuard(d.path().to_path_buf());
    own_fs(d.path());
    let cap = block_cap(Mode::SingleNodeWriter);
    let thick = std::env::var("PROBE_THIN").is_err();
    let size = 128 << 20;
    let mut fails = Vec::new();
    let b0 = start(d.path());
    let mut c0 = conn(&b0, d.path()).await;
    let baseline = capacity(&mut c0, thick).await;
    drop(b0);
    for (i, us) in sweep().into_iter().enumerate() {
        let b = start(d.path());
        let mut c = conn(&b, d.path()).await;
        let id = create(&mut c, &format!("v{i}"), size, thick, &cap)
            .await
            .unwrap();
        let staging = d.path().join(format!("pods/{i}/staging"));
        std::fs::create_dir_all(&staging).unwrap();
        let sreq = csi::NodeStageVolumeRequest {
            volume_capability: Some(cap.clone()),
            ..stage_req(&id, &staging)
        };
        c.node
            .node_stage_volume(Request::new(sreq.clone()))
            .await
            .unwrap();
        let dev = staging.join(&id);
        let tag: Vec<u8> = (0..(64u32 << 20))
            .map(|x| (x.wrapping_mul(2654435761) >> 24) as u8 ^ i as u8)
            .collect();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&dev)
            .and_then(|mut f| {
                std::io::Write::write_all(&mut f, &tag)?;
                f.sync_all()
            })
            .unwrap();
        let snap_req = csi::CreateSnapshotRequest {
            source_volume_id: id.clone(),
            name: format!("s{i}"),
            ..Default::default()
        };
        let mut c2 = c.clone();
        let r2 = snap_req.clone();
        let armed = arm(&b, us + 1);
        let t = tokio::spawn(async move { c2.controller.create_snapshot(Request::new(r2)).await });
        fire(us, &armed, &t).await;
        kill(b);
        disarm(armed);
        kill_starting(d.path());
        let first = t
            .await
            .unwrap()
            .map(|r| r.into_inner().snapshot.unwrap().snapshot_id);
        let b = start(d.path());
        let c = conn(&b, d.path()).await;
        let snap = snapshot(&c, &snap_req).await;
        if let Ok(f) = &first {
            if f != &snap {
                fails.push(format!("{us}us: snapshot {f} then {snap}"));
            }
        }
        // The restore, killed too.
        let rname = format!("r{i}");
        let mk = |c: CsiClient| {
            let rname = rname.clone();
            let snap = snap.clone();
            let cap = cap.clone();
            async move {
                let mut c = c;
                c.controller
                    .create_volume(Request::new(csi::CreateVolumeRequest {
                        parameters: params(thick),
                        volume_capabilities: vec![cap],
                        volume_content_source: Some(csi::VolumeContentSource {
                            r#type: Some(csi::volume_content_source::Type::Snapshot(
                                csi::volume_content_source::SnapshotSource { snapshot_id: snap },
                            )),
                        }),
                        ..create_req(&rname, size)
                    }))
                    .await
                    .map(|r| r.into_inner().volume.unwrap().volume_id)
            }
        };
        let armed = arm(&b, us + 1);
        let t = tokio::spawn(mk(c.clone()));
        fire(us, &armed, &t).await;
        kill(b);
        disarm(armed);
        kill_starting(d.path());
        let rfirst = t.await.unwrap();
        let b = start(d.path());
        let c = conn(&b, d.path()).await;
        let rid = retry("CreateVolume from snapshot", || mk(c.clone())).await;
        if let Ok(f) = &rfirst {
            if f != &rid {
                fails.push(format!("{us}us: restore {f} then {rid}"));
            }
        }
        let rstaging = d.path().join(format!("pods/{i}/rstaging"));
        let got = stage_and_read(&c, "NodeStage restore", &rid, &cap, &rstaging, tag.len()).await;
        if got != tag {
            fails.push(format!("{us}us: restore holds other data"));
        }
        for (v, s) in [(&rid, &rstaging), (&id, &staging)] {
            unstage(&c, v, s).await;
        }
        del_vol(&c, &rid).await;
        del_snap(&c, &snap).await;
        del_vol(&c, &id).await;
        let mut cc = c.clone();
        let after = capacity(&mut cc, thick).await;
        let m: Vec<_> = mounts_under(d.path())
            .into_iter()
            .filter(|m| *m != d.path().join("block"))
            .collect();
        let l: Vec<_> = loops_under(d.path())
            .into_iter()
            .filter(|l| l.1 != d.path().join("fs.img"))
            .collect();
        let left = leftovers(d.path());
        if baseline - after > slack() || !m.is_empty() || !l.is_empty() || !left.is_empty() {
            fails.push(format!("{us}us (snap {:?} restore {:?}): capacity {baseline} -> {after}, mounts {m:?} loops {l:?} left {left:?}", first.as_ref().map_err(|e| e.code()), rfirst.as_ref().map_err(|e| e.code())));
            eprintln!("{}", fails.last().unwrap());
        }
        drop(b);
        eprintln!(
            "{us}us: snap {:?} restore {:?}",
            first.as_ref().map_err(|e| e.code()),
            rfirst.as_ref().map_err(|e| e.code())
        );
    }
    let sc = state_check(d.path());
    assert!(fails.is_empty() && sc.is_empty(), "{fails:#?}\n{sc}");
}

/// A thick volume in use (raw, or xfs) grown: ControllerExpandVolume then
/// NodeExpandVolume, berth killed after a delay, both retried; the data
/// is there, the device or filesystem has grown, and after the delete the
/// capacity is back and nothing is left.
async fn expand_kill(fs: &str) {
    let d = tempfile::tempdir().unwrap();
    let _g = BlockGuard(d.path().to_path_buf());
    own_fs(d.path());
    let raw = fs == "raw";
    let cap = if raw {
        block_cap(Mode::SingleNodeWriter)
    } else {
        fs_cap(fs)
    };
    let thick = std::env::var("PROBE_THIN").is_err();
    let size: i64 = if fs == "xfs" { 300 << 20 } else { 64 << 20 };
    let grown = size + (256 << 20);
    let mut fails = Vec::new();
    let b0 = start(d.path());
    let mut c0 = conn(&b0, d.path()).await;
    let baseline = capacity(&mut c0, thick).await;
    drop(b0);
    for (i, us) in sweep().into_iter().enumerate() {
        let b = start(d.path());
        let mut c = conn(&b, d.path()).await;
        let id = create(&mut c, &format!("v{i}"), size, thick, &cap)
            .await
            .unwrap();
        let staging = d.path().join(format!("pods/{i}/staging"));
        let target = d.path().join(format!("pods/{i}/target"));
        std::fs::create_dir_all(&staging).unwrap();
        let sreq = csi::NodeStageVolumeRequest {
            volume_capability: Some(cap.clone()),
            ..stage_req(&id, &staging)
        };
        let preq = csi::NodePublishVolumeRequest {
            volume_capability: Some(cap.clone()),
            ..publish_req(&id, &staging, &target, false)
        };
        c.node
            .node_stage_volume(Request::new(sreq.clone()))
            .await
            .unwrap();
        c.node
            .node_publish_volume(Request::new(preq.clone()))
            .await
            .unwrap();
        let data = if raw {
            target.clone()
        } else {
            target.join("data")
        };
        let tag = format!("hello {i}");
        std::fs::OpenOptions::new()
            .write(true)
            .create(!raw)
            .open(&data)
            .and_then(|mut f| {
                std::io::Write::write_all(&mut f, tag.as_bytes())?;
                f.sync_all()
            })
            .unwrap();
        let range = Some(csi::CapacityRange {
            required_bytes: grown,
            limit_bytes: 0,
        });
        let creq = csi::ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: range,
            volume_capability: Some(cap.clone()),
            ..Default::default()
        };
        let nreq = csi::NodeExpandVolumeRequest {
            volume_id: id.clone(),
            volume_path: target.display().to_string(),
            staging_target_path: staging.display().to_string(),
            capacity_range: range,
            volume_capability: Some(cap.clone()),
            ..Default::default()
        };
        let expand = |c: CsiClient| {
            let (creq, nreq) = (creq.clone(), nreq.clone());
            async move {
                let mut c = c;
                let r = c
                    .controller
                    .controller_expand_volume(Request::new(creq))
                    .await?
                    .into_inner();
                if r.node_expansion_required {
                    c.node.node_expand_volume(Request::new(nreq)).await?;
                }
                Ok::<_, tonic::Status>(())
            }
        };
        let armed = arm(&b, us + 1);
        let t = tokio::spawn(expand(c.clone()));
        fire(us, &armed, &t).await;
        kill(b);
        disarm(armed);
        kill_starting(d.path());
        let first = t.await.unwrap();
        let b = start(d.path());
        let c = conn(&b, d.path()).await;
        let mut errs = Vec::new();
        for _ in 0..60 {
            match expand(c.clone()).await {
                Ok(()) => {
                    errs.clear();
                    break;
                }
                Err(e) => {
                    errs.push(format!("{:?}: {}", e.code(), e.message()));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        if !errs.is_empty() {
            fails.push(format!(
                "{us}us (first {:?}): expand never succeeded: {}",
                first.as_ref().map_err(|e| e.code()),
                errs.last().unwrap()
            ));
            eprintln!("{}", fails.last().unwrap());
        }
        // What the pod sees.
        let seen = if raw {
            std::fs::OpenOptions::new()
                .read(true)
                .open(&target)
                .and_then(|mut f| std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)))
                .unwrap_or(0) as i64
        } else {
            let st = nix::sys::statvfs::statvfs(&target).unwrap();
            st.blocks() as i64 * st.fragment_size() as i64
        };
        if errs.is_empty() && (seen <= size || seen > grown) {
            fails.push(format!(
                "{us}us: the pod sees {seen} bytes after growing to {grown}"
            ));
        }
        let mut buf = vec![0u8; tag.len()];
        match std::fs::File::open(&data)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf))
        {
            Ok(()) if buf == tag.as_bytes() => {}
            r => fails.push(format!("{us}us: data lost: {r:?}")),
        }
        retry("NodeUnpublish", || {
            let mut c = c.clone();
            let r = csi::NodeUnpublishVolumeRequest {
                volume_id: id.clone(),
                target_path: target.display().to_string(),
            };
            async move { c.node.node_unpublish_volume(Request::new(r)).await }
        })
        .await;
        unstage(&c, &id, &staging).await;
        retry("NodeStage again", || {
            let mut c = c.clone();
            let r = sreq.clone();
            async move { c.node.node_stage_volume(Request::new(r)).await }
        })
        .await;
        unstage(&c, &id, &staging).await;
        del_vol(&c, &id).await;
        let mut cc = c.clone();
        let after = capacity(&mut cc, thick).await;
        let m: Vec<_> = mounts_under(d.path())
            .into_iter()
            .filter(|m| *m != d.path().join("block"))
            .collect();
        let l: Vec<_> = loops_under(d.path())
            .into_iter()
            .filter(|l| l.1 != d.path().join("fs.img"))
            .collect();
        let left = leftovers(d.path());
        if baseline - after > slack() || !m.is_empty() || !l.is_empty() || !left.is_empty() {
            fails.push(format!("{us}us (first {:?}): capacity {baseline} -> {after}, mounts {m:?} loops {l:?} left {left:?}", first.as_ref().map_err(|e| e.code())));
            eprintln!("{}", fails.last().unwrap());
        }
        drop(b);
        eprintln!("{us}us: first {:?}", first.as_ref().map_err(|e| e.code()));
    }
    let sc = state_check(d.path());
    assert!(fails.is_empty() && sc.is_empty(), "{fails:#?}\n{sc}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and a private mount namespace (tests/run-all.sh runs it)"]
async fn killed_during_expand_raw() {
    expand_kill("raw").await;
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and a private mount namespace (tests/run-all.sh runs it)"]
async fn killed_during_expand_xfs() {
    expand_kill("xfs").await;
}

/// A thick volume in use torn down as kubelet and the provisioner do
/// (NodeUnpublish, NodeUnstage, DeleteVolume), berth killed at a moment of
/// it; after the restart each is retried in order: no mount, loop device
/// or file is left and the capacity is back.
async fn teardown_kill(fs: &str) {
    let d = tempfile::tempdir().unwrap();
    let _g = BlockGuard(d.path().to_path_buf());
    own_fs(d.path());
    let raw = fs == "raw";
    let cap = if raw {
        block_cap(Mode::SingleNodeWriter)
    } else {
        fs_cap(fs)
    };
    let thick = std::env::var("PROBE_THIN").is_err();
    let size: i64 = if fs == "xfs" { 300 << 20 } else { 64 << 20 };
    let mut fails = Vec::new();
    let b0 = start(d.path());
    let mut c0 = conn(&b0, d.path()).await;
    let baseline = capacity(&mut c0, thick).await;
    drop(b0);
    for (i, us) in sweep().into_iter().enumerate() {
        let b = start(d.path());
        let mut c = conn(&b, d.path()).await;
        let id = create(&mut c, &format!("v{i}"), size, thick, &cap)
            .await
            .unwrap();
        let staging = d.path().join(format!("pods/{i}/staging"));
        let target = d.path().join(format!("pods/{i}/target"));
        std::fs::create_dir_all(&staging).unwrap();
        let sreq = csi::NodeStageVolumeRequest {
            volume_capability: Some(cap.clone()),
            ..stage_req(&id, &staging)
        };
        let preq = csi::NodePublishVolumeRequest {
            volume_capability: Some(cap.clone()),
            ..publish_req(&id, &staging, &target, false)
        };
        c.node
            .node_stage_volume(Request::new(sreq.clone()))
            .await
            .unwrap();
        c.node
            .node_publish_volume(Request::new(preq.clone()))
            .await
            .unwrap();
        let data = if raw {
            target.clone()
        } else {
            target.join("data")
        };
        std::fs::OpenOptions::new()
            .write(true)
            .create(!raw)
            .open(&data)
            .and_then(|mut f| {
                std::io::Write::write_all(&mut f, b"data")?;
                f.sync_all()
            })
            .unwrap();
        let ureq = csi::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target.display().to_string(),
        };
        let usreq = csi::NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.display().to_string(),
        };
        let dreq = csi::DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        };
        let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (mut c2, u2, us2, d2, done2) = (
            c.clone(),
            ureq.clone(),
            usreq.clone(),
            dreq.clone(),
            done.clone(),
        );
        let armed = arm(&b, us + 1);
        let t = tokio::spawn(async move {
            c2.node.node_unpublish_volume(Request::new(u2)).await?;
            done2.store(1, std::sync::atomic::Ordering::SeqCst);
            c2.node.node_unstage_volume(Request::new(us2)).await?;
            done2.store(2, std::sync::atomic::Ordering::SeqCst);
            c2.controller.delete_volume(Request::new(d2)).await?;
            done2.store(3, std::sync::atomic::Ordering::SeqCst);
            Ok::<_, tonic::Status>(())
        });
        fire(us, &armed, &t).await;
        kill(b);
        disarm(armed);
        kill_starting(d.path());
        let first = t.await.unwrap();
        let at = done.load(std::sync::atomic::Ordering::SeqCst);
        let b = start(d.path());
        let c = conn(&b, d.path()).await;
        let mut errs = Vec::new();
        for step in at..3 {
            errs.clear();
            for _ in 0..60 {
                let mut c = c.clone();
                let r = match step {
                    0 => c
                        .node
                        .node_unpublish_volume(Request::new(ureq.clone()))
                        .await
                        .map(|_| ()),
                    1 => c
                        .node
                        .node_unstage_volume(Request::new(usreq.clone()))
                        .await
                        .map(|_| ()),
                    _ => c
                        .controller
                        .delete_volume(Request::new(dreq.clone()))
                        .await
                        .map(|_| ()),
                };
                match r {
                    Ok(()) => {
                        errs.clear();
                        break;
                    }
                    Err(e) => {
                        errs.push(format!("step {step}: {:?}: {}", e.code(), e.message()));
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            if !errs.is_empty() {
                break;
            }
        }
        if let Some(e) = errs.last() {
            fails.push(format!(
                "{us}us (cut at {at}, {:?}): never succeeded: {e}",
                first.as_ref().map_err(|e| e.code())
            ));
        }
        let mut cc = c.clone();
        let after = capacity(&mut cc, thick).await;
        let m: Vec<_> = mounts_under(d.path())
            .into_iter()
            .filter(|m| *m != d.path().join("block"))
            .collect();
        let l: Vec<_> = loops_under(d.path())
            .into_iter()
            .filter(|l| l.1 != d.path().join("fs.img"))
            .collect();
        let left = leftovers(d.path());
        if baseline - after > slack() || !m.is_empty() || !l.is_empty() || !left.is_empty() {
            fails.push(format!("{us}us (cut at {at}, {:?}): capacity {baseline} -> {after}, mounts {m:?} loops {l:?} left {left:?}", first.as_ref().map_err(|e| e.code())));
            eprintln!("{}", fails.last().unwrap());
        }
        drop(b);
        eprintln!(
            "{us}us: cut at {at} first {:?}",
            first.as_ref().map_err(|e| e.code())
        );
    }
    let sc = state_check(d.path());
    assert!(fails.is_empty() && sc.is_empty(), "{fails:#?}\n{sc}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and a private mount namespace (tests/run-all.sh runs it)"]
async fn killed_during_teardown_raw() {
    teardown_kill("raw").await;
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and a private mount namespace (tests/run-all.sh runs it)"]
async fn killed_during_teardown_ext4() {
    teardown_kill("ext4").await;
}

nix::ioctl_readwrite!(fifreeze, b'X', 119, libc::c_int);
nix::ioctl_readwrite!(fithaw, b'X', 120, libc::c_int);

/// Whether the filesystem mounted at `mp` is frozen (FIFREEZE answers
/// EBUSY); thawed in either case.
fn was_frozen(mp: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(mp).unwrap();
    // SAFETY: FIFREEZE/FITHAW on a descriptor of the mount point.
    let r = unsafe { fifreeze(f.as_raw_fd(), &mut 0) };
    let _ = unsafe { fithaw(f.as_raw_fd(), &mut 0) };
    match r {
        Ok(_) => false,
        Err(nix::errno::Errno::EBUSY) => true,
        Err(e) => panic!("FIFREEZE {}: {e}", mp.display()),
    }
}

/// SIGTERM while a staged ext4 volume is frozen for its snapshot's copy,
/// and the copy outlasts `--shutdown-timeout` (strace holds each
/// copy_file_range of berth 5 s): berth abandons the copy and exits, and
/// thaws the filesystem first. Before 2026-12-07 the filesystem stayed
/// frozen after berth had exited, and every write of the pod using it
/// waited until berth started again (for ever, were berth uninstalled or
/// its new image never to start). The next start takes the snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and a private mount namespace (tests/run-all.sh runs it)"]
async fn sigterm_during_a_frozen_copy_leaves_no_filesystem_frozen() {
    use std::os::unix::process::CommandExt;
    assert!(is_root(), "root tests need root");
    let d = tempfile::tempdir().unwrap();
    let _g = BlockGuard(d.path().to_path_buf());
    let sock = d.path().join("csi.sock");
    let spawn = || {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.path().join("berth.log"))
            .unwrap();
        let child = Command::new(BIN)
            .arg("--data-dir")
            .arg(d.path())
            .arg("--endpoint")
            .arg(format!("unix://{}", sock.display()))
            .args(["--node-id", NODE, "--kinds", "local,block"])
            .args(["--shutdown-timeout", "1"])
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap();
        Berth {
            child,
            sock: sock.clone(),
        }
    };
    let mut b = spawn();
    let mut c = conn(&b, d.path()).await;
    let cap = fs_cap("ext4");
    let id = create(&mut c, "v", 64 << 20, false, &cap).await.unwrap();
    let staging = d.path().join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let stage = csi::NodeStageVolumeRequest {
        volume_capability: Some(cap.clone()),
        ..stage_req(&id, &staging)
    };
    c.node
        .node_stage_volume(Request::new(stage.clone()))
        .await
        .unwrap();
    std::fs::write(staging.join("data"), vec![7u8; 4 << 20]).unwrap();
    assert!(Command::new("sync").status().unwrap().success());
    let mut strace = Command::new("strace")
        .args([
            "-f",
            "-qq",
            "-o",
            "/dev/null",
            "-e",
            "trace=copy_file_range",
        ])
        .args(["-e", "inject=copy_file_range:delay_enter=5000000", "-p"])
        .arg(b.child.id().to_string())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let snap_req = csi::CreateSnapshotRequest {
        source_volume_id: id.clone(),
        name: "s".into(),
        ..Default::default()
    };
    let mut c2 = c.clone();
    let r2 = snap_req.clone();
    let t = tokio::spawn(async move { c2.controller.create_snapshot(Request::new(r2)).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!t.is_finished(), "the copy was not held: {:?}", t.await);
    let t0 = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(b.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let st = b.child.wait().unwrap();
    let took = t0.elapsed();
    let _ = strace.kill();
    let _ = strace.wait();
    let first = t.await.unwrap();
    assert!(first.is_err(), "the snapshot was made: {first:?}");
    let frozen = was_frozen(&staging);
    let log = std::fs::read_to_string(d.path().join("berth.log")).unwrap_or_default();
    assert!(
        !frozen,
        "berth exited ({st:?} after {took:?}) leaving {} frozen: {log}",
        staging.display()
    );
    assert!(log.contains("filesystems_thawed=1"), "{log}");
    // The next start serves; the snapshot is taken; everything goes.
    b = spawn();
    let c = conn(&b, d.path()).await;
    let snap = snapshot(&c, &snap_req).await;
    unstage(&c, &id, &staging).await;
    del_snap(&c, &snap).await;
    del_vol(&c, &id).await;
    assert_eq!(leftovers(d.path()), Vec::<String>::new());
    drop(b);
}

// ---- The disk pool (`pool: disk`): whole disks, one a volume ----

/// A kill point of the disk-pool tests.
#[derive(Clone, Debug)]
enum KillAt {
    /// This many µs after the RPC is sent.
    After(u64),
    /// At a berth thread's k-th call of this syscall (strace).
    Sys(String, u64),
}

impl std::fmt::Display for KillAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KillAt::After(us) => write!(f, "{us}us"),
            KillAt::Sys(sys, k) => write!(f, "{sys} #{k}"),
        }
    }
}

impl KillAt {
    /// strace armed for a `Sys` kill point.
    fn arm(&self, b: &Berth) -> Option<Child> {
        match self {
            KillAt::After(_) => None,
            KillAt::Sys(sys, k) => Some(arm_sys(b, sys, *k)),
        }
    }

    fn delay(&self) -> u64 {
        match self {
            KillAt::After(us) => *us,
            KillAt::Sys(..) => 0,
        }
    }
}

/// The kill points of the disk-pool tests. By default a thread's 1st to
/// 6th fsync (a disk volume's marker is synced just before its Ready
/// record: a kill between the two is found only so), then 0 to 400 ms
/// after the RPC is sent in steps of 50 ms (a disk's RPCs take longer
/// than a file's: its blank check, its erase; the steps are coarse because
/// each point restarts berth and CI runs this suite on its critical path,
/// while the fsyncs find the narrow windows). PROBE_BERTH_SYS=<syscall>
/// with PROBE_MAX_US and PROBE_STEP_US: that syscall's k-th call, k swept
/// as for the other tests; PROBE_MAX_US and PROBE_STEP_US alone: delays
/// only.
fn disk_kills() -> Vec<KillAt> {
    if let Some(kills) = probe_sys_kills() {
        return kills;
    }
    let delays = sweep_or(400_000, 50_000).into_iter().map(KillAt::After);
    if std::env::var("PROBE_MAX_US").is_ok() {
        return delays.collect();
    }
    (1..=6)
        .map(|k| KillAt::Sys("fsync".into(), k))
        .chain(delays)
        .collect()
}

/// With PROBE_BERTH_SYS=<syscall>: a thread's k-th call of it, k swept
/// as the delay would be (PROBE_MAX_US, PROBE_STEP_US; 1 to 7 by default).
fn probe_sys_kills() -> Option<Vec<KillAt>> {
    let sys = std::env::var("PROBE_BERTH_SYS").ok()?;
    Some(
        sweep_or(6, 1)
            .into_iter()
            .map(|k| KillAt::Sys(sys.clone(), k + 1))
            .collect(),
    )
}

/// Size of each stand-in disk of the disk-pool tests.
const DISK: u64 = 64 << 20;

/// `n` stand-in disks: files of `size` bytes under `<dir>/disks`, each
/// attached as a loop device (the test's `BlockGuard` detaches them, also
/// when it fails): their files, and berth's arguments naming them as its
/// `--disk-pool`.
fn stand_in_disks(dir: &Path, n: usize, size: u64) -> (Vec<PathBuf>, Vec<String>) {
    use berth::os::LoopDevices;
    let disks = dir.join("disks");
    std::fs::create_dir_all(&disks).unwrap();
    let loops = berth::os::RealLoopDevices::default();
    let mut files = Vec::new();
    let mut devs = Vec::new();
    for k in 0..n {
        let f = disks.join(format!("disk{k}"));
        std::fs::File::create(&f).unwrap().set_len(size).unwrap();
        devs.push(
            loops
                .attach(&f, Default::default())
                .unwrap()
                .device
                .display()
                .to_string(),
        );
        files.push(f);
    }
    (files, vec!["--disk-pool".into(), devs.join(",")])
}

fn disk_params() -> HashMap<String, String> {
    HashMap::from([
        ("kind".to_string(), "block".to_string()),
        ("pool".to_string(), "disk".to_string()),
    ])
}

/// What GetCapacity offers of the disk pool: the bytes of its free disks.
async fn disk_free(c: &CsiClient) -> i64 {
    let mut c = c.clone();
    c.controller
        .get_capacity(Request::new(csi::GetCapacityRequest {
            parameters: disk_params(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .available_capacity
}

/// CreateVolume of a whole disk named `name` (`source`: a restore or
/// clone): the volume's id.
async fn create_disk(
    c: &CsiClient,
    name: &str,
    cap: &csi::VolumeCapability,
    source: Option<csi::VolumeContentSource>,
) -> Result<String, tonic::Status> {
    let mut c = c.clone();
    c.controller
        .create_volume(Request::new(csi::CreateVolumeRequest {
            parameters: disk_params(),
            volume_capabilities: vec![cap.clone()],
            volume_content_source: source,
            ..create_req(name, DISK as i64)
        }))
        .await
        .map(|r| r.into_inner().volume.unwrap().volume_id)
}

/// A record's id and the device number of the disk it names.
type RecordedDisk = (String, (u32, u32));

/// The disks the journal's records name (record id, device number), read
/// with berth stopped; and the records that name a disk another record
/// names too.
fn recorded_disks(dir: &Path) -> (Vec<RecordedDisk>, Vec<String>) {
    let scan =
        berth::state::journal::scan(&berth::os::RealFiles, &dir.join("state/journal")).unwrap();
    let mut v: Vec<RecordedDisk> = scan
        .records
        .values()
        .filter_map(|r| {
            let d = r.block.as_ref()?.disk.as_ref()?;
            Some((r.id.clone(), (d.major, d.minor)))
        })
        .collect();
    v.sort();
    let mut shared = Vec::new();
    for (i, (id, n)) in v.iter().enumerate() {
        if v.iter().enumerate().any(|(j, (_, m))| i != j && m == n) {
            shared.push(format!("{id} ({}:{})", n.0, n.1));
        }
    }
    (v, shared)
}

/// Whether the stand-in disk's file reads as zeros, whole.
fn all_zero(f: &Path) -> bool {
    std::fs::read(f).unwrap().iter().all(|&b| b == 0)
}

/// What a mount or loop device the test did not make itself is left under
/// `dir` (the block root's own filesystem and the stand-in disks are the
/// test's).
fn left_under(dir: &Path) -> (Vec<PathBuf>, Vec<(PathBuf, PathBuf)>) {
    let m: Vec<_> = mounts_under(dir)
        .into_iter()
        .filter(|m| *m != dir.join("block"))
        .collect();
    let l: Vec<_> = loops_under(dir)
        .into_iter()
        .filter(|l| l.1 != dir.join("fs.img") && !l.1.starts_with(dir.join("disks")))
        .collect();
    (m, l)
}

/// A tenant's bytes, written through the raw device `dev` at its start,
/// middle and end, and synced.
fn write_tenant(dev: &Path, tag: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(dev).unwrap();
    for at in [0, DISK / 2, DISK - 4096] {
        f.write_all_at(tag, at).unwrap();
    }
    f.sync_all().unwrap();
}

/// CreateVolume of a whole disk killed at a moment of it (choosing and
/// claiming the disk, recording it, its marker, its Ready record), then
/// retried under the same name after a restart, as the
/// external-provisioner does: an answered create and its retry give the
/// same volume, no disk is ever recorded for two volumes, and once the
/// volume is deleted every disk of the pool is free again (none held or
/// lost), with a clean `berth state check`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and a private mount namespace (tests/run-all.sh runs it)"]
async fn killed_during_disk_create() {
    let d = tempfile::tempdir().unwrap();
    let _g = BlockGuard(d.path().to_path_buf());
    own_fs(d.path());
    let (_, pool) = stand_in_disks(d.path(), 2, DISK);
    let cap = block_cap(Mode::SingleNodeWriter);
    let mut fails = Vec::new();
    for (i, at) in disk_kills().into_iter().enumerate() {
        let b = start_with(d.path(), None, &pool);
        let c = conn(&b, d.path()).await;
        let before = disk_free(&c).await;
        let name = format!("v{i}");
        let (c2, n2, cap2) = (c.clone(), name.clone(), cap.clone());
        let armed = at.arm(&b);
        let t = tokio::spawn(async move { create_disk(&c2, &n2, &cap2, None).await });
        fire(at.delay(), &armed, &t).await;
        kill(b);
        disarm(armed);
        kill_starting_with(d.path(), &pool);
        let first = t.await.unwrap();
        let b = start_with(d.path(), None, &pool);
        let c = conn(&b, d.path()).await;
        let id = retry("CreateVolume", || create_disk(&c, &name, &cap, None)).await;
        if let Ok(f) = &first {
            if f != &id {
                fails.push(format!("{at}: acked {f}, the retry gave {id}"));
            }
        }
        drop(b);
        let (recorded, shared) = recorded_disks(d.path());
        if !shared.is_empty() {
            fails.push(format!("{at}: disks recorded twice: {shared:?}"));
        }
        if !recorded.iter().any(|(r, _)| r == &id) || recorded.len() != 1 {
            fails.push(format!(
                "{at} (first {:?}): records of disks {recorded:?}, only {id}'s expected",
                first.as_ref().map_err(|e| e.code())
            ));
        }
        let b = start_with(d.path(), None, &pool);
        let c = conn(&b, d.path()).await;
        del_vol(&c, &id).await;
        let after = disk_free(&c).await;
        drop(b);
        if after != before {
            fails.push(format!(
                "{at} (first {:?}): disks free {before} -> {after} bytes",
                first.as_ref().map_err(|e| e.code())
            ));
        }
        eprintln!("{at}: first {:?}", first.as_ref().map_err(|e| e.code()));
        if !fails.is_empty() {
            eprintln!("{}", fails.last().unwrap());
        }
    }
    let sc = state_check_with(d.path(), &pool);
    let (m, l) = left_under(d.path());
    assert!(
        fails.is_empty()
            && sc.is_empty()
            && m.is_empty()
            && l.is_empty()
            && leftovers(d.path()).is_empty(),
        "{fails:#?}\n{sc}\nmounts {m:?} loops {l:?} left {:?}",
        leftovers(d.path())
    );
}

/// DeleteVolume of a whole disk a tenant wrote raw, killed at a moment of
/// it (the erase, the record's removal, the marker's), then retried after
/// a restart: the disk is never offered while it holds the tenant's data,
/// the retried delete answers OK, and then the disk reads as zeros
/// throughout and is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and a private mount namespace (tests/run-all.sh runs it)"]
async fn killed_during_disk_delete() {
    let d = tempfile::tempdir().unwrap();
    let _g = BlockGuard(d.path().to_path_buf());
    own_fs(d.path());
    let (files, pool) = stand_in_disks(d.path(), 1, DISK);
    let cap = block_cap(Mode::SingleNodeWriter);
    let mut fails = Vec::new();
    for (i, at) in disk_kills().into_iter().enumerate() {
        let b = start_with(d.path(), None, &pool);
        let c = conn(&b, d.path()).await;
        let before = disk_free(&c).await;
        let id = create_disk(&c, &format!("v{i}"), &cap, None).await.unwrap();
        let staging = d.path().join(format!("pods/{i}/staging"));
        std::fs::create_dir_all(&staging).unwrap();
        let sreq = csi::NodeStageVolumeRequest {
            volume_capability: Some(cap.clone()),
            ..stage_req(&id, &staging)
        };
        c.node
            .clone()
            .node_stage_volume(Request::new(sreq))
            .await
            .unwrap();
        write_tenant(&staging.join(&id), format!("TENANT-{i}").as_bytes());
        unstage(&c, &id, &staging).await;
        let (c2, id2) = (c.clone(), id.clone());
        let armed = at.arm(&b);
        let t = tokio::spawn(async move {
            c2.controller
                .clone()
                .delete_volume(Request::new(csi::DeleteVolumeRequest {
                    volume_id: id2,
                    ..Default::default()
                }))
                .await
        });
        fire(at.delay(), &armed, &t).await;
        kill(b);
        disarm(armed);
        kill_starting_with(d.path(), &pool);
        let first = t.await.unwrap().map(|_| ());
        let b = start_with(d.path(), None, &pool);
        let c = conn(&b, d.path()).await;
        // Offered only once it is erased: the capacity is read first, the
        // disk after (an erase that finishes in between reads as zeros).
        let offered = disk_free(&c).await;
        if offered > 0 && !all_zero(&files[0]) {
            fails.push(format!(
                "{at} (first {:?}): the disk is offered ({offered} bytes free) holding the tenant's data",
                first.as_ref().map_err(|e| e.code())
            ));
        }
        del_vol(&c, &id).await;
        // The erase of a delete left to start-up runs in the background:
        // the retry answers OK once the record is gone.
        let after = disk_free(&c).await;
        drop(b);
        if !all_zero(&files[0]) {
            fails.push(format!(
                "{at} (first {:?}): the deleted volume's disk still holds the tenant's data",
                first.as_ref().map_err(|e| e.code())
            ));
        }
        if after != before {
            fails.push(format!(
                "{at} (first {:?}): disks free {before} -> {after} bytes",
                first.as_ref().map_err(|e| e.code())
            ));
        }
        let (recorded, _) = recorded_disks(d.path());
        if !recorded.is_empty() {
            fails.push(format!("{at}: records of disks left: {recorded:?}"));
        }
        eprintln!("{at}: first {:?}", first.as_ref().map_err(|e| e.code()));
        if !fails.is_empty() {
            eprintln!("{}", fails.last().unwrap());
        }
    }
    let sc = state_check_with(d.path(), &pool);
    let (m, l) = left_under(d.path());
    assert!(
        fails.is_empty()
            && sc.is_empty()
            && m.is_empty()
            && l.is_empty()
            && leftovers(d.path()).is_empty(),
        "{fails:#?}\n{sc}\nmounts {m:?} loops {l:?} left {:?}",
        leftovers(d.path())
    );
}

/// NodeStageVolume of a new whole-disk volume (formatted `fs` at its first
/// stage) killed at a moment of it (PROBE_SYS: mkfs killed at its k-th
/// such syscall, then berth), then retried as kubelet does: the stage
/// succeeds, data written is there after an unstage and a second stage
/// (the disk is formatted once, never over the tenant's files), and after
/// the delete the disk reads as zeros and is free again.
async fn disk_stage_kill(fs: &str) {
    let d = tempfile::tempdir().unwrap();
    let _g = BlockGuard(d.path().to_path_buf());
    own_fs(d.path());
    let size = if fs == "xfs" { 320 << 20 } else { DISK };
    let (files, pool) = stand_in_disks(d.path(), 1, size);
    let cap = fs_cap(fs);
    let mut fails = Vec::new();
    for (i, at) in disk_kills().into_iter().enumerate() {
        let inject = std::env::var("PROBE_SYS")
            .ok()
            .map(|_| (at.delay() + 1).to_string());
        let b = start_with(d.path(), inject.clone(), &pool);
        let c = conn(&b, d.path()).await;
        let before = disk_free(&c).await;
        let id = c
            .controller
            .clone()
            .create_volume(Request::new(csi::CreateVolumeRequest {
                parameters: disk_params(),
                volume_capabilities: vec![cap.clone()],
                ..create_req(&format!("v{i}"), size as i64)
            }))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .volume_id;
        let staging = d.path().join(format!("pods/{i}/staging"));
        std::fs::create_dir_all(&staging).unwrap();
        let sreq = csi::NodeStageVolumeRequest {
            volume_capability: Some(cap.clone()),
            ..stage_req(&id, &staging)
        };
        let (c2, s2) = (c.clone(), sreq.clone());
        let armed = at.arm(&b);
        let t = tokio::spawn(async move {
            c2.node
                .clone()
                .node_stage_volume(Request::new(s2))
                .await
                .map(|_| ())
        });
        if inject.is_some() {
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                while !t.is_finished() {
                    tokio::time::sleep(Duration::from_millis(5)).await
                }
            })
            .await;
        } else {
            fire(at.delay(), &armed, &t).await;
        }
        kill(b);
        disarm(armed);
        kill_starting_with(d.path(), &pool);
        let first = t.await.unwrap();
        let b = start_with(d.path(), None, &pool);
        let c = conn(&b, d.path()).await;
        let mut errs = Vec::new();
        for _ in 0..60 {
            match c
                .node
                .clone()
                .node_stage_volume(Request::new(sreq.clone()))
                .await
            {
                Ok(_) => {
                    errs.clear();
                    break;
                }
                Err(e) => {
                    errs.push(format!("{:?}: {}", e.code(), e.message()));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        if let Some(e) = errs.last() {
            fails.push(format!(
                "{at} (first {:?}): stage never succeeded: {e}",
                first.as_ref().map_err(|e| e.code())
            ));
            eprintln!("{}", fails.last().unwrap());
        } else {
            let tag = format!("hello {i}");
            std::fs::write(staging.join("data"), &tag).unwrap();
            nix::unistd::sync();
            unstage(&c, &id, &staging).await;
            retry("NodeStage again", || {
                let mut c = c.clone();
                let r = sreq.clone();
                async move { c.node.node_stage_volume(Request::new(r)).await }
            })
            .await;
            match std::fs::read(staging.join("data")) {
                Ok(b) if b == tag.as_bytes() => {}
                r => fails.push(format!("{at}: data lost: {r:?}")),
            }
        }
        unstage(&c, &id, &staging).await;
        del_vol(&c, &id).await;
        let after = disk_free(&c).await;
        drop(b);
        let (m, l) = left_under(d.path());
        if after != before || !all_zero(&files[0]) || !m.is_empty() || !l.is_empty() {
            fails.push(format!(
                "{at} (first {:?}): disks free {before} -> {after} bytes, zeroed {}, mounts {m:?} loops {l:?}",
                first.as_ref().map_err(|e| e.code()),
                all_zero(&files[0])
            ));
            eprintln!("{}", fails.last().unwrap());
        }
        eprintln!("{at}: first {:?}", first.as_ref().map_err(|e| e.code()));
    }
    let sc = state_check_with(d.path(), &pool);
    assert!(
        fails.is_empty() && sc.is_empty() && leftovers(d.path()).is_empty(),
        "{fails:#?}\n{sc}\nleft {:?}",
        leftovers(d.path())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and a private mount namespace (tests/run-all.sh runs it)"]
async fn killed_during_disk_stage_ext4() {
    disk_stage_kill("ext4").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and a private mount namespace (tests/run-all.sh runs it)"]
async fn killed_during_disk_stage_xfs() {
    disk_stage_kill("xfs").await;
}

/// A restore (`clone`: a clone) onto a whole disk killed at a moment of
/// it (claiming the disk, the copy, the marker, the Ready record), then
/// retried under the same name after a restart: an answered restore and
/// its retry give the same volume, which holds the source's data; the
/// disk of a copy that never answered is erased before it is offered
/// again; after the deletes every disk is free and reads as zeros.
async fn disk_copy_kill(clone: bool) {
    let d = tempfile::tempdir().unwrap();
    let _g = BlockGuard(d.path().to_path_buf());
    own_fs(d.path());
    let (files, pool) = stand_in_disks(d.path(), 2, DISK);
    let cap = block_cap(Mode::SingleNodeWriter);
    let mut fails = Vec::new();
    let b = start_with(d.path(), None, &pool);
    let c = conn(&b, d.path()).await;
    let all = disk_free(&c).await;
    let src = create_disk(&c, "src", &cap, None).await.unwrap();
    let staging = d.path().join("pods/src");
    std::fs::create_dir_all(&staging).unwrap();
    let sreq = csi::NodeStageVolumeRequest {
        volume_capability: Some(cap.clone()),
        ..stage_req(&src, &staging)
    };
    c.node
        .clone()
        .node_stage_volume(Request::new(sreq))
        .await
        .unwrap();
    let tag = b"SOURCE-DATA ".repeat(100);
    write_tenant(&staging.join(&src), &tag);
    unstage(&c, &src, &staging).await;
    // The disk the copies get: the one the source did not.
    let copy_disk = files.iter().find(|f| all_zero(f)).unwrap().clone();
    let source = if clone {
        csi::volume_content_source::Type::Volume(csi::volume_content_source::VolumeSource {
            volume_id: src.clone(),
        })
    } else {
        let snap = snapshot(
            &c,
            &csi::CreateSnapshotRequest {
                source_volume_id: src.clone(),
                name: "snap".into(),
                ..Default::default()
            },
        )
        .await;
        csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource {
            snapshot_id: snap,
        })
    };
    let source = Some(csi::VolumeContentSource {
        r#type: Some(source),
    });
    let before = disk_free(&c).await;
    drop(b);
    for (i, at) in disk_kills().into_iter().enumerate() {
        let b = start_with(d.path(), None, &pool);
        let c = conn(&b, d.path()).await;
        let name = format!("r{i}");
        let (c2, n2, cap2, s2) = (c.clone(), name.clone(), cap.clone(), source.clone());
        let armed = at.arm(&b);
        let t = tokio::spawn(async move { create_disk(&c2, &n2, &cap2, s2).await });
        fire(at.delay(), &armed, &t).await;
        kill(b);
        disarm(armed);
        kill_starting_with(d.path(), &pool);
        let first = t.await.unwrap();
        let b = start_with(d.path(), None, &pool);
        let c = conn(&b, d.path()).await;
        // The disk of an unanswered copy is not offered until erased.
        let offered = disk_free(&c).await;
        if offered > 0 && !all_zero(&copy_disk) {
            fails.push(format!(
                "{at} (first {:?}): the restore's disk is offered ({offered} bytes free) holding a copy",
                first.as_ref().map_err(|e| e.code())
            ));
        }
        let rid = retry("CreateVolume from a source", || {
            create_disk(&c, &name, &cap, source.clone())
        })
        .await;
        if let Ok(f) = &first {
            if f != &rid {
                fails.push(format!("{at}: acked {f}, the retry gave {rid}"));
            }
        }
        let rstaging = d.path().join(format!("pods/{i}/rstaging"));
        let got = stage_and_read(
            &c,
            "NodeStage of the copy",
            &rid,
            &cap,
            &rstaging,
            tag.len(),
        )
        .await;
        if got != tag {
            fails.push(format!("{at}: the copy holds other data"));
        }
        unstage(&c, &rid, &rstaging).await;
        del_vol(&c, &rid).await;
        let after = disk_free(&c).await;
        drop(b);
        let (_, shared) = recorded_disks(d.path());
        if after != before || !all_zero(&copy_disk) || !shared.is_empty() {
            fails.push(format!(
                "{at} (first {:?}): disks free {before} -> {after} bytes, the copy's disk zeroed {}, disks recorded twice {shared:?}",
                first.as_ref().map_err(|e| e.code()),
                all_zero(&copy_disk)
            ));
        }
        eprintln!("{at}: first {:?}", first.as_ref().map_err(|e| e.code()));
        if !fails.is_empty() {
            eprintln!("{}", fails.last().unwrap());
        }
    }
    let b = start_with(d.path(), None, &pool);
    let c = conn(&b, d.path()).await;
    if let Some(csi::volume_content_source::Type::Snapshot(s)) =
        source.as_ref().and_then(|s| s.r#type.as_ref())
    {
        del_snap(&c, &s.snapshot_id).await;
    }
    del_vol(&c, &src).await;
    let end = disk_free(&c).await;
    drop(b);
    let sc = state_check_with(d.path(), &pool);
    let (m, l) = left_under(d.path());
    assert!(
        fails.is_empty()
            && end == all
            && files.iter().all(|f| all_zero(f))
            && sc.is_empty()
            && m.is_empty()
            && l.is_empty()
            && leftovers(d.path()).is_empty(),
        "{fails:#?}\ndisks free at the end {end} of {all}\n{sc}\nmounts {m:?} loops {l:?} left {:?}",
        leftovers(d.path())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and a private mount namespace (tests/run-all.sh runs it)"]
async fn killed_during_disk_restore() {
    disk_copy_kill(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and a private mount namespace (tests/run-all.sh runs it)"]
async fn killed_during_disk_clone() {
    disk_copy_kill(true).await;
}

// ---- A full state filesystem: a block file volume's delete ----

/// Bytes of the volume whose file holds data, and of the one beside it
/// (`full_delete_kill`).
const FULL_DATA: usize = 2 << 20;
const FULL_BESIDE: usize = 1 << 20;

/// DeleteVolume of `id`: its answer.
async fn delete_once(c: &CsiClient, id: &str) -> Result<(), tonic::Status> {
    c.clone()
        .controller
        .delete_volume(Request::new(csi::DeleteVolumeRequest {
            volume_id: id.to_string(),
            ..Default::default()
        }))
        .await
        .map(|_| ())
}

/// The kill points of `killed_during_a_delete_on_a_full_filesystem`. By
/// default a thread's k-th call (counted from strace's attach) of the
/// syscalls of the delete's steps, berth killed before it is made: the
/// refused Deleting phase cut off and flushed (fdatasync #1); the volume's
/// file punched (fallocate #2, after the refused write's reserve top-up);
/// the punched file synced (fsync #1); the phase written again and flushed
/// (fdatasync #2); the file's removal (unlink #1); the record's removal
/// flushed (fdatasync #3). Then 0 and 2 ms after the RPC is sent, and
/// 300 ms (the delete has answered: the kill finds it done). Few points: each makes,
/// fills and restarts a filesystem of its own. PROBE_BERTH_SYS with
/// PROBE_MAX_US and PROBE_STEP_US: that syscall's k-th call, k swept as
/// for the other tests; PROBE_MAX_US and PROBE_STEP_US alone: delays only.
fn full_kills() -> Vec<KillAt> {
    if let Some(kills) = probe_sys_kills() {
        return kills;
    }
    if std::env::var("PROBE_MAX_US").is_ok() {
        return sweep().into_iter().map(KillAt::After).collect();
    }
    [
        ("fdatasync", 1),
        ("fallocate", 2),
        ("fsync", 1),
        ("fdatasync", 2),
        ("unlink", 1),
        ("fdatasync", 3),
    ]
    .into_iter()
    .map(|(sys, k)| KillAt::Sys(sys.into(), k))
    .chain([0, 2_000, 300_000].into_iter().map(KillAt::After))
    .collect()
}

/// Writes `bytes` over the file `f` and syncs it.
fn write_synced(f: &Path, bytes: &[u8]) {
    let mut file = std::fs::OpenOptions::new().write(true).open(f).unwrap();
    std::io::Write::write_all(&mut file, bytes).unwrap();
    file.sync_all().unwrap();
}

/// What the file of the volume with data holds: "its data", "emptied"
/// (zeros: punched), "partly emptied" (each 4 KiB block one or the
/// other), or None for anything else (other bytes, another size).
fn data_or_zeros(bytes: &[u8]) -> Option<&'static str> {
    if bytes.len() != FULL_DATA {
        return None;
    }
    if bytes.iter().all(|&b| b == 0xa5) {
        return Some("its data");
    }
    if bytes.iter().all(|&b| b == 0) {
        return Some("emptied");
    }
    bytes
        .chunks(4096)
        .all(|c| c.iter().all(|&b| b == 0xa5) || c.iter().all(|&b| b == 0))
        .then_some("partly emptied")
}

/// A block file volume's DeleteVolume on a full state filesystem (the
/// state and the block root on a 16 MiB ext4 of their own under
/// `--data-dir`, the log's reserve let go, as a log an older berth wrote
/// has none; filled by a tenant), its Deleting phase refused for room so
/// that the volume's own file makes it (015dfe0: loop devices detached,
/// the file punched in place and synced, the phase written again), killed
/// at a moment of it (`full_kills`), then retried after a restart as the
/// CO does. At each point: the journal, read with berth stopped, has the
/// volume Ready with its own file at its name, holding its data or
/// emptied (never other bytes, never missing), or Deleting, or no record
/// and no file; the volume beside it is Ready with its data, also after
/// the retry; the retry goes through while the filesystem is still full;
/// once the tenant's file is removed every other delete goes through, and
/// nothing is left mounted, attached or on disk, with a clean `berth state
/// check`. The empty volumes are deleted first until one is refused: the
/// log's last page is then full, and the volume with data has the longest
/// name, so its Deleting phase, a whole record line, cannot fit (the
/// delete left alone, at 300 ms, must log that it emptied the file). The
/// test makes the whole data directory's filesystem itself: PROBE_OWN_FS
/// changes nothing here (the file must be on the state's filesystem).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and a private mount namespace (tests/run-all.sh runs it)"]
async fn killed_during_a_delete_on_a_full_filesystem() {
    let mut fails = Vec::new();
    for at in full_kills() {
        full_delete_kill(&at, &mut fails).await;
    }
    assert!(fails.is_empty(), "{fails:#?}");
}

async fn full_delete_kill(at: &KillAt, fails: &mut Vec<String>) {
    use berth::state::Phase;
    let images = tempfile::tempdir().unwrap();
    let d = tempfile::tempdir().unwrap();
    let _g = BlockGuard(d.path().to_path_buf());
    small_filesystem(d.path(), "ext4", &images.path().join("fs.img"));
    let cap = block_cap(Mode::SingleNodeWriter);
    let file = |id: &str| d.path().join("block").join(format!("{id}.img"));
    // berth's log off the filesystem it fills (its lines are read below).
    let log = images.path().join("berth.log");
    std::os::unix::fs::symlink(&log, d.path().join("berth.log")).unwrap();
    let b = start(d.path());
    let mut c = conn(&b, d.path()).await;
    let data = create(
        &mut c,
        "the-volume-holding-data",
        FULL_DATA as i64,
        false,
        &cap,
    )
    .await
    .unwrap();
    let beside = create(&mut c, "beside", FULL_BESIDE as i64, false, &cap)
        .await
        .unwrap();
    let mut empties = Vec::new();
    for k in 0..16 {
        empties.push(
            create(&mut c, &format!("e{k:02}"), 1 << 20, false, &cap)
                .await
                .unwrap(),
        );
    }
    write_synced(&file(&data), &vec![0xa5; FULL_DATA]);
    write_synced(&file(&beside), &vec![0x5b; FULL_BESIDE]);
    drop(b);
    assert_eq!(let_go_of_log_reserve(d.path()), 1);
    // A tenant of the filesystem fills it while berth is down.
    fill(d.path());
    let b = start(d.path());
    let c = conn(&b, d.path()).await;
    let free = free_bytes(d.path());
    assert!(free < 4096, "the filesystem is full: {free} bytes free");
    // The empty volumes' changes go into the log's last page until one
    // needs a new page.
    let mut refused = None;
    for id in &empties {
        if let Err(e) = delete_once(&c, id).await {
            assert_refused_for_room(&e, false);
            refused = Some(id.clone());
            break;
        }
    }
    let refused = refused.expect("no delete of an empty volume needed a new page of the log");
    let armed = at.arm(&b);
    let (c2, id2) = (c.clone(), data.clone());
    let t = tokio::spawn(async move { delete_once(&c2, &id2).await });
    fire(at.delay(), &armed, &t).await;
    kill(b);
    disarm(armed);
    kill_starting(d.path());
    let first = t.await.unwrap();
    let answered = first.is_ok();
    let first = format!("first {:?}", first.as_ref().map_err(|e| e.code()));
    // Whether the killed berth emptied the file to make room.
    let emptied = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("its file is emptied first, to make room");
    if matches!(at, KillAt::After(us) if *us >= 300_000) && !(answered && emptied) {
        fails.push(format!(
            "{at} ({first}): the delete left alone did not answer OK having emptied its file (emptied: {emptied}): the Deleting phase found room, or the delete failed"
        ));
    }
    // As the journal says, read with berth stopped.
    let scan = berth::state::journal::scan(&berth::os::RealFiles, &d.path().join("state/journal"))
        .unwrap();
    let phase = |id: &str| scan.records.values().find(|r| r.id == id).map(|r| r.phase);
    let seen = match (phase(&data), std::fs::read(file(&data))) {
        (Some(Phase::Ready), Ok(bytes)) if data_or_zeros(&bytes).is_some() => {
            format!("Ready, {}", data_or_zeros(&bytes).unwrap_or_default())
        }
        (Some(Phase::Deleting), f) => {
            format!(
                "Deleting, file {}",
                if f.is_ok() { "there" } else { "gone" }
            )
        }
        (None, Err(e)) if e.kind() == std::io::ErrorKind::NotFound => "gone".to_string(),
        (p, f) => {
            let f = f.map(|b| format!("{} bytes", b.len()));
            fails.push(format!(
                "{at} ({first}): volume {data} recorded {p:?}, its file {f:?}"
            ));
            "neither there nor gone".to_string()
        }
    };
    let beside_kept = || std::fs::read(file(&beside)).is_ok_and(|b| b == vec![0x5b; FULL_BESIDE]);
    if phase(&beside) != Some(Phase::Ready) || !beside_kept() {
        fails.push(format!(
            "{at} ({first}, {seen}): the volume beside is {:?}, its data kept: {}",
            phase(&beside),
            beside_kept()
        ));
    }
    // The CO's retry, the filesystem still full.
    let b = start(d.path());
    let c = conn(&b, d.path()).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match delete_once(&c, &data).await {
            Ok(()) => break,
            Err(e) if Instant::now() > deadline => {
                fails.push(format!(
                    "{at} ({first}, {seen}): the retried delete never went through while the filesystem stayed full: {:?}: {}",
                    e.code(),
                    e.message()
                ));
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    if !beside_kept() {
        fails.push(format!(
            "{at} ({first}, {seen}): the volume beside lost its data in the retry"
        ));
    }
    // Room made: the tenant's file removed; every delete goes through.
    std::fs::remove_file(d.path().join("filler")).unwrap();
    del_vol(&c, &data).await;
    for id in empties.iter().skip_while(|i| **i != refused) {
        del_vol(&c, id).await;
    }
    del_vol(&c, &beside).await;
    drop(b);
    let m: Vec<_> = mounts_under(d.path())
        .into_iter()
        .filter(|m| m.as_path() != d.path())
        .collect();
    let l = loops_under(d.path());
    let left = leftovers(d.path());
    let sc = state_check(d.path());
    if !m.is_empty() || !l.is_empty() || !left.is_empty() || !sc.is_empty() {
        fails.push(format!(
            "{at} ({first}, {seen}): left mounts {m:?} loops {l:?} files {left:?}; state check: {sc}"
        ));
    }
    eprintln!("{at}: {first}, file emptied by then: {emptied}, then {seen}");
    if !fails.is_empty() {
        eprintln!("{}", fails.last().unwrap());
    }
}
