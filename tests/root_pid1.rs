//! Root test of the real `berth` binary as PID 1 of its own PID namespace,
//! as it runs in its container (the image's entrypoint): the processes its
//! commands leave behind become its children, and it must wait for them.
//! Ignored unless asked for (`cargo test --test root_pid1 -- --ignored`,
//! as tests/run-all.sh does inside a private mount namespace).
mod common;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use berth::client::connect;
use berth::csi::v1 as csi;
use berth::csi::v1::volume_capability::access_mode::Mode;
use common::*;
use tonic::Request;

const BIN: &str = env!("CARGO_BIN_EXE_berth");

/// `unshare --pid --fork --kill-child` running berth: killing it kills
/// berth (PID 1), which ends every process of the namespace.
struct Namespace {
    unshare: Child,
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}

/// (pid, state) of each child of `parent`, from /proc/<pid>/stat.
fn children_of(parent: u32) -> Vec<(u32, char)> {
    let parent = parent.to_string();
    let mut v = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let mut fields = rest.split(' ');
        let state = fields.next().and_then(|s| s.chars().next());
        if let (Some(state), Some(ppid)) = (state, fields.next()) {
            if ppid == parent {
                v.push((pid, state));
            }
        }
    }
    v
}

/// The pid of `pid` in each PID namespace it is in, outermost first.
fn ns_pids(pid: u32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

fn zombies_of(parent: u32) -> Vec<u32> {
    children_of(parent)
        .into_iter()
        .filter(|(_, s)| *s == 'Z')
        .map(|(p, _)| p)
        .collect()
}

/// A `mount.nfs` that starts a process which outlives it (as the real one
/// starts `start-statd` for NFSv3 locks) and fails with exit 32; each run
/// adds a line to `runs`.
fn fake_mount_nfs(bin: &Path, runs: &Path) {
    std::fs::create_dir(bin).unwrap();
    let script = bin.join("mount.nfs");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho run >> {}\nsleep 0.05 &\necho \"fake mount.nfs: $1 refused\" >&2\nexit 32\n",
            runs.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Berth as PID 1 of a new PID namespace, serving NFS with a `mount.nfs`
/// that leaves a process behind at each run (killed with its group, its
/// parent already gone: berth's child). 16 CreateVolume calls at once on
/// 16 shares, each trying its mounts: every call reports the command's own
/// exit status (`failed (exit 32)`, never a wait error: the reaper took
/// no status of a command berth waits for), and no zombie is left under
/// berth. Before berth reaped, each run left one zombie for ever (a PID
/// lost each time; csi-driver-nfs#352 in a peer driver).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn berth_as_pid_1_reaps_what_its_commands_leave_behind() {
    assert!(is_root(), "root tests need root");
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    let runs = dir.path().join("runs");
    fake_mount_nfs(&bin, &runs);
    let sock = dir.path().join("csi.sock");
    let log = dir.path().join("berth.log");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let unshare = Command::new("unshare")
        .args(["--pid", "--fork", "--kill-child", "--mount-proc", BIN])
        .arg("--data-dir")
        .arg(dir.path())
        .arg("--endpoint")
        .arg(format!("unix://{}", sock.display()))
        .args(["--node-id", NODE, "--kinds", "nfs", "--nfs-timeout", "20"])
        .env("PATH", &path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn unshare");
    let mut ns = Namespace { unshare };
    let outer = ns.unshare.id();
    // berth: the child of unshare, PID 1 inside.
    let t0 = Instant::now();
    let berth = loop {
        assert!(
            ns.unshare.try_wait().unwrap().is_none(),
            "unshare exited: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        let found = children_of(outer)
            .into_iter()
            .map(|(p, _)| p)
            .find(|p| ns_pids(*p).last().map(String::as_str) == Some("1"));
        if let Some(p) = found {
            if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
                break p;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "berth did not start as PID 1: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(ns_pids(berth).len(), 2, "{:?}", ns_pids(berth));

    let ep = format!("unix://{}", sock.display());
    let calls: Vec<_> = (0..16)
        .map(|i| {
            let ep = ep.clone();
            tokio::spawn(async move {
                let mut c = connect(&ep).await.unwrap();
                c.controller
                    .create_volume(Request::new(csi::CreateVolumeRequest {
                        name: format!("pid1-{i}"),
                        parameters: HashMap::from([
                            ("kind".to_string(), "nfs".to_string()),
                            ("server".to_string(), "127.0.0.1".to_string()),
                            ("share".to_string(), format!("/export/{i}")),
                        ]),
                        volume_capabilities: vec![mount_cap(Mode::MultiNodeMultiWriter)],
                        ..Default::default()
                    }))
                    .await
            })
        })
        .collect();
    for call in calls {
        let r = call.await.unwrap();
        let status = r.expect_err("a mount that fails fails CreateVolume");
        assert!(
            status.message().contains("failed (exit 32)") && status.message().contains("refused"),
            "{status:?}"
        );
    }
    let ran = std::fs::read_to_string(&runs)
        .unwrap_or_default()
        .lines()
        .count();
    assert!(ran >= 16, "mount.nfs ran {ran} times");

    // Each run's orphan died (SIGKILL with its group, or its sleep ended):
    // none may stay a zombie under berth.
    let t0 = Instant::now();
    loop {
        let zombies = zombies_of(berth);
        if zombies.is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "{} zombies under berth (PID 1 of its namespace) after {ran} mount.nfs runs: {zombies:?}",
            zombies.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Still serving; then a clean exit, which ends the namespace.
    let mut c = connect(&ep).await.unwrap();
    c.identity
        .probe(Request::new(csi::ProbeRequest {}))
        .await
        .unwrap();
    drop(c);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(berth as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let t0 = Instant::now();
    let st = loop {
        if let Some(st) = ns.unshare.try_wait().unwrap() {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "berth did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        st.success(),
        "{st:?}: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}
