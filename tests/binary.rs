//! The real `berth` binary over its unix socket: socket permissions and
//! replacement rules, graceful shutdown, reflection, restart with state, and
//! that secrets never reach a log line or an error message. Runs without
//! root (mount calls fail, which is fine for what is checked here).
mod common;

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use berth::client::connect;
use berth::csi::v1 as csi;
use common::*;
use tonic::Request;

const BIN: &str = env!("CARGO_BIN_EXE_berth");

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

fn start(dir: &Path, extra: &[&str]) -> Berth {
    start_as(dir, NODE, extra)
}

/// `start` with `--node-id node`.
fn start_as(dir: &Path, node: &str, extra: &[&str]) -> Berth {
    start_within(dir, node, extra, Duration::from_secs(10))
}

/// `start_as`, waiting at most `wait` for the socket to accept.
fn start_within(dir: &Path, node: &str, extra: &[&str], wait: Duration) -> Berth {
    let sock = dir.join("csi.sock");
    let log = dir.join(format!(
        "berth-{}.log",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let child = Command::new(BIN)
        .arg("--data-dir")
        .arg(dir)
        .arg("--endpoint")
        .arg(format!("unix://{}", sock.display()))
        .args(["--node-id", node])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn berth");
    let b = Berth { child, sock, log };
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        // A stale socket file from a killed run exists before the new
        // process binds: wait until a connection is accepted.
        if std::fs::symlink_metadata(&b.sock)
            .map(|m| m.file_type().is_socket())
            .unwrap_or(false)
            && std::os::unix::net::UnixStream::connect(&b.sock).is_ok()
        {
            return b;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!(
        "berth did not start: {}",
        std::fs::read_to_string(&b.log).unwrap_or_default()
    );
}

fn sigterm(b: &mut Berth) -> std::process::ExitStatus {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(b.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(st) = b.child.try_wait().unwrap() {
            return st;
        }
        assert!(Instant::now() < deadline, "berth did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Text logs to a pipe (what a container runtime gives berth, and what
/// `kubectl logs` shows) carry no terminal colour codes.
#[test]
fn text_logs_to_a_pipe_have_no_colour_codes() {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("csi.sock");
    let mut child = Command::new(BIN)
        .arg("--data-dir")
        .arg(d.path())
        .arg("--endpoint")
        .arg(format!("unix://{}", sock.display()))
        .args([
            "--node-id",
            NODE,
            "--log-format",
            "text",
            "--log-level",
            "debug",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn berth");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "berth did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut log = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut log).unwrap();
    child.wait().unwrap();
    assert!(
        log.contains("INFO"),
        "no log lines read from the pipe: {log:?}"
    );
    assert!(!log.contains('\x1b'), "colour codes in piped logs: {log:?}");
}

#[test]
fn version_flag() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("berth {}", env!("CARGO_PKG_VERSION"))
    );
}

/// `berth bench --help` lists the bench's own flags, not the driver's, and
/// the driver's flags after `bench` are refused instead of ignored.
#[test]
fn bench_help_lists_only_the_bench_flags() {
    let out = Command::new(BIN)
        .args(["bench", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--endpoint"), "{help}");
    for driver_flag in [
        "--data-dir",
        "--kinds",
        "--disk-pool",
        "--nfs-allowed-shares",
        "--mode",
    ] {
        assert!(!help.contains(driver_flag), "{driver_flag} in {help}");
    }
    let out = Command::new(BIN)
        .args(["bench", "--data-dir", "/tmp", "floor"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    // The driver's help still lists them.
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("--data-dir"));
}

#[test]
fn bad_flags_are_refused() {
    for args in [
        vec!["--driver-name", "1bad"],
        vec!["--endpoint", "tcp://127.0.0.1:1"],
        vec!["--mode", "both"],
    ] {
        let d = tempfile::tempdir().unwrap();
        let out = Command::new(BIN)
            .arg("--data-dir")
            .arg(d.path())
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} accepted");
    }
}

/// `--mode node` with a node-local kind (the default one included) is
/// refused before anything is made, naming what to run instead; with
/// `--kinds nfs` it serves.
#[tokio::test]
async fn node_mode_serves_nfs_only() {
    for args in [
        &["--mode", "node"][..],
        &["--mode", "node", "--kinds", "nfs,local"],
        &["--mode", "node", "--kinds", "block"],
    ] {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("data");
        let mut all = vec!["--data-dir".to_string(), data.display().to_string()];
        all.extend(args.iter().map(|a| a.to_string()));
        let out = run_to_exit(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(
            err.contains("--mode node serves NFS volumes only"),
            "{args:?}: {err}"
        );
        assert!(!data.exists(), "{args:?} made the data directory");
    }
    let d = tempfile::tempdir().unwrap();
    let mut b = start(d.path(), &["--mode", "node", "--kinds", "nfs"]);
    let mut c = connect(&b.sock.display().to_string()).await.unwrap();
    c.identity
        .probe(Request::new(Default::default()))
        .await
        .expect("probe of a node-only NFS berth");
    assert!(sigterm(&mut b).success());
}

/// `--mode controller` with a node-local kind (the default `--kinds
/// local` included: a controller StatefulSet whose `--kinds nfs` was
/// left out) is refused before anything is made. It started, and made
/// local volumes in its own directories that no node's berth could stage
/// (each node's `--mode all` berth has its own records).
#[test]
fn controller_mode_with_a_node_local_kind_is_refused() {
    for args in [
        &["--mode", "controller"][..],
        &["--mode", "controller", "--kinds", "nfs,local"],
        &["--mode", "controller", "--kinds", "block"],
    ] {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("data");
        let mut all = vec!["--data-dir".to_string(), data.display().to_string()];
        all.extend(args.iter().map(|a| a.to_string()));
        let out = run_to_exit(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(
            err.contains("--mode controller serves NFS volumes only"),
            "{args:?}: {err}"
        );
        assert!(!data.exists(), "{args:?} made the data directory");
    }
}

/// The idle client answers the server's GOAWAY on a thread of its own (as
/// a sidecar does): its connection holds up no shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_is_private_and_shutdown_is_graceful() {
    let d = tempfile::tempdir().unwrap();
    let mut b = start(d.path(), &[]);
    let mode = std::fs::metadata(&b.sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let mut c = connect(&b.sock.display().to_string()).await.unwrap();
    let info = c
        .identity
        .get_plugin_info(Request::new(Default::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "berth.csi.io");
    let t0 = Instant::now();
    let st = sigterm(&mut b);
    assert!(st.success(), "{st:?}");
    let took = t0.elapsed();
    eprintln!("shutdown with an idle client connection took {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert!(!b.sock.exists(), "socket removed on shutdown");
    drop(c);
}

/// SIGTERM as soon as the socket accepts (before any RPC) is a graceful
/// shutdown too: the handler is in place before the socket is bound.
#[test]
fn sigterm_right_after_start_is_graceful() {
    for _ in 0..10 {
        let d = tempfile::tempdir().unwrap();
        let mut b = start(d.path(), &[]);
        let st = sigterm(&mut b);
        assert!(st.success(), "{st:?}");
        assert!(!b.sock.exists(), "socket removed on shutdown");
    }
}

#[tokio::test]
async fn socket_group_mode() {
    let d = tempfile::tempdir().unwrap();
    let gid = nix::unistd::getegid().as_raw().to_string();
    let b = start(d.path(), &["--socket-group", &gid]);
    let m = std::fs::metadata(&b.sock).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o660);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(m.gid().to_string(), gid);
}

#[test]
fn an_old_socket_is_replaced_but_a_regular_file_is_not() {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("csi.sock");
    // A stale socket from a crashed run.
    let stale = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    drop(stale);
    let b = start(d.path(), &[]);
    drop(b);
    std::fs::remove_file(&sock).ok();
    std::fs::write(&sock, b"important").unwrap();
    let refused = |data_dir: &Path| {
        let out = Command::new(BIN)
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--endpoint")
            .arg(format!("unix://{}", sock.display()))
            .args(["--node-id", NODE])
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("not a socket"));
        assert_eq!(std::fs::read(&sock).unwrap(), b"important");
    };
    refused(d.path());
    // Refused before anything is made: a fresh data directory whose
    // endpoint is a regular file stays as it was (no state, no root).
    let fresh = tempfile::tempdir().unwrap();
    refused(fresh.path());
    let made: Vec<_> = std::fs::read_dir(fresh.path()).unwrap().collect();
    assert!(made.is_empty(), "{made:?}");
}

/// A test that lists the services over reflection version `$v` twice (v1,
/// and v1alpha, which older grpcurl knows only): each version is built on
/// its first call, and the second call gets the same answer.
macro_rules! reflection_test {
    ($name:ident, $v:ident) => {
        #[tokio::test]
        async fn $name() {
            use tonic_reflection::pb::$v::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::$v::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::$v::server_reflection_response::MessageResponse;
            use tonic_reflection::pb::$v::ServerReflectionRequest;
            let d = tempfile::tempdir().unwrap();
            let b = start(d.path(), &[]);
            let c = connect(&b.sock.display().to_string()).await.unwrap();
            let mut r = ServerReflectionClient::new(c.channel.clone());
            for _ in 0..2 {
                let req = ServerReflectionRequest {
                    host: String::new(),
                    message_request: Some(MessageRequest::ListServices(String::new())),
                };
                let mut stream = r
                    .server_reflection_info(tokio_stream::iter(vec![req]))
                    .await
                    .unwrap()
                    .into_inner();
                let resp = stream.message().await.unwrap().unwrap();
                let Some(MessageResponse::ListServicesResponse(l)) = resp.message_response else {
                    panic!("unexpected reflection answer");
                };
                let names: Vec<_> = l.service.iter().map(|s| s.name.as_str()).collect();
                for want in ["csi.v1.Identity", "csi.v1.Controller", "csi.v1.Node"] {
                    assert!(names.contains(&want), "{names:?}");
                }
            }
        }
    };
}

reflection_test!(reflection_lists_the_csi_services, v1);
reflection_test!(reflection_v1alpha_lists_the_csi_services, v1alpha);

#[tokio::test]
async fn controller_mode_serves_no_node_service() {
    let d = tempfile::tempdir().unwrap();
    let b = start(d.path(), &["--mode", "controller", "--kinds", "nfs"]);
    let mut c = connect(&b.sock.display().to_string()).await.unwrap();
    let e = c
        .node
        .node_get_info(Request::new(Default::default()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented);
    c.controller
        .controller_get_capabilities(Request::new(Default::default()))
        .await
        .unwrap();
}

#[tokio::test]
async fn volumes_survive_a_kill() {
    let d = tempfile::tempdir().unwrap();
    let b = start(d.path(), &[]);
    let mut c = connect(&b.sock.display().to_string()).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..20 {
        let v = c
            .controller
            .create_volume(Request::new(create_req(&format!("pvc-{i}"), 1 << 20)))
            .await
            .unwrap();
        ids.push(v.into_inner().volume.unwrap().volume_id);
    }
    drop(b); // SIGKILL
    let b = start(d.path(), &[]);
    let mut c = connect(&b.sock.display().to_string()).await.unwrap();
    for (i, id) in ids.iter().enumerate() {
        let v = c
            .controller
            .create_volume(Request::new(create_req(&format!("pvc-{i}"), 1 << 20)))
            .await
            .unwrap();
        assert_eq!(&v.into_inner().volume.unwrap().volume_id, id);
    }
    let l = c
        .controller
        .list_volumes(Request::new(Default::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(l.entries.len(), 20);
}

/// Killed while 16 clients create and delete volumes: after the restart,
/// every create that was answered OK and not deleted since is there, every
/// delete that was answered OK is gone (a change is answered only once the
/// state journal holds it; a kill keeps the page cache, so this checks the
/// order of write and answer, not the flush).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_changes_survive_a_kill_mid_flight() {
    use std::sync::{Arc, Mutex};
    let d = tempfile::tempdir().unwrap();
    let b = start(d.path(), &[]);
    let c = connect(&b.sock.display().to_string()).await.unwrap();
    // name -> Some(id) created and acknowledged, None deleted and
    // acknowledged; names in flight are absent.
    let done: Arc<Mutex<HashMap<String, Option<String>>>> = Default::default();
    let mut tasks = Vec::new();
    for t in 0..16 {
        let (mut c, done) = (c.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0.. {
                let name = format!("pvc-{t}-{i}");
                let Ok(v) = c
                    .controller
                    .create_volume(Request::new(create_req(&name, 1 << 20)))
                    .await
                else {
                    return;
                };
                let id = v.into_inner().volume.unwrap().volume_id;
                done.lock().unwrap().insert(name.clone(), Some(id.clone()));
                if i % 2 == 1 {
                    continue;
                }
                done.lock().unwrap().remove(&name);
                let del = csi::DeleteVolumeRequest {
                    volume_id: id.clone(),
                    ..Default::default()
                };
                if c.controller.delete_volume(Request::new(del)).await.is_err() {
                    return;
                }
                done.lock().unwrap().insert(name, None);
            }
        }));
    }
    // Kill once enough has been acknowledged (not after a fixed time: a
    // loaded machine may acknowledge little in any given interval).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while done.lock().unwrap().len() < 64 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let pid = nix::unistd::Pid::from_raw(b.child.id() as i32);
    let snapshot = done.lock().unwrap().clone();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    drop(b);
    // Answers that arrived after the snapshot was taken count too.
    let done = done.lock().unwrap().clone();
    assert!(
        snapshot.len() > 16,
        "too little work before the kill: {}",
        snapshot.len()
    );
    let b = start(d.path(), &[]);
    let mut c = connect(&b.sock.display().to_string()).await.unwrap();
    let mut listed = HashMap::new();
    let mut token = String::new();
    loop {
        let l = c
            .controller
            .list_volumes(Request::new(csi::ListVolumesRequest {
                max_entries: 500,
                starting_token: token,
            }))
            .await
            .unwrap()
            .into_inner();
        for e in l.entries {
            let v = e.volume.unwrap();
            listed.insert(v.volume_id, ());
        }
        token = l.next_token;
        if token.is_empty() {
            break;
        }
    }
    let (mut kept, mut gone) = (0, 0);
    for (name, state) in &done {
        match state {
            Some(id) => {
                kept += 1;
                assert!(
                    listed.contains_key(id),
                    "{name} ({id}) was acknowledged but is lost"
                );
            }
            None => gone += 1,
        }
    }
    // A deleted name is free again: creating it gives a new volume, and
    // nothing answered for a deleted volume is listed.
    for (name, state) in &done {
        if state.is_none() {
            let v = c
                .controller
                .create_volume(Request::new(create_req(name, 1 << 20)))
                .await
                .unwrap()
                .into_inner()
                .volume
                .unwrap();
            assert!(
                !listed.contains_key(&v.volume_id),
                "{name} was deleted but came back"
            );
        }
    }
    assert!(kept > 0 && gone > 0, "kept {kept}, gone {gone}");
}

const SENTINEL: &str = "s3cr3t-SENTINEL-9f1c";

fn secrets() -> HashMap<String, String> {
    HashMap::from([
        ("password".to_string(), SENTINEL.to_string()),
        (SENTINEL.to_string(), SENTINEL.to_string()),
    ])
}

/// Every RPC that carries secrets, with a sentinel in its secrets map and in
/// its volume context, at the most verbose log level: the sentinel must not
/// appear in any log line or error message.
#[tokio::test]
async fn secrets_never_reach_logs_or_errors() {
    let d = tempfile::tempdir().unwrap();
    // As root the node calls below really mount; undo them whatever happens.
    let _unmount = UnmountOnDrop(d.path().to_path_buf());
    let b = start(d.path(), &["--log-level", "trace", "--log-format", "json"]);
    let mut c = connect(&b.sock.display().to_string()).await.unwrap();
    let ctx = HashMap::from([("ctx".to_string(), SENTINEL.to_string())]);
    let mut messages = Vec::new();
    let mut note = |r: Result<(), tonic::Status>| {
        if let Err(s) = r {
            messages.push(s.message().to_string());
        }
    };
    let mut create = create_req("sentinel", 1 << 20);
    create.secrets = secrets();
    let vol = c
        .controller
        .create_volume(Request::new(create))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let id = vol.volume_id.clone();
    // The same name with a mismatch: an error path that names the volume.
    let mut bad = create_req("sentinel", 2 << 20);
    bad.secrets = secrets();
    note(
        c.controller
            .create_volume(Request::new(bad))
            .await
            .map(|_| ()),
    );
    let mut bad = create_req("sentinel2", 1);
    bad.secrets = secrets();
    bad.parameters.insert("unknownKey".into(), SENTINEL.into());
    let st = c
        .controller
        .create_volume(Request::new(bad))
        .await
        .unwrap_err();
    assert!(st.message().contains("unknownKey"));
    // Parameters are not secrets, but the error names only the key.
    assert!(
        !st.message().contains(SENTINEL),
        "parameter value echoed: {}",
        st.message()
    );
    note(
        c.controller
            .controller_publish_volume(Request::new(csi::ControllerPublishVolumeRequest {
                volume_id: id.clone(),
                node_id: NODE.into(),
                volume_capability: Some(rwo()),
                secrets: secrets(),
                volume_context: ctx.clone(),
                ..Default::default()
            }))
            .await
            .map(|_| ()),
    );
    note(
        c.controller
            .validate_volume_capabilities(Request::new(csi::ValidateVolumeCapabilitiesRequest {
                volume_id: id.clone(),
                volume_capabilities: vec![rwo()],
                secrets: secrets(),
                volume_context: ctx.clone(),
                ..Default::default()
            }))
            .await
            .map(|_| ()),
    );
    let staging = d.path().join("staging");
    let target = d.path().join("target");
    note(
        c.node
            .node_stage_volume(Request::new(csi::NodeStageVolumeRequest {
                secrets: secrets(),
                volume_context: ctx.clone(),
                ..stage_req(&id, &staging)
            }))
            .await
            .map(|_| ()),
    );
    note(
        c.node
            .node_publish_volume(Request::new(csi::NodePublishVolumeRequest {
                secrets: secrets(),
                volume_context: ctx.clone(),
                ..publish_req(&id, &staging, &target, false)
            }))
            .await
            .map(|_| ()),
    );
    note(
        c.controller
            .controller_unpublish_volume(Request::new(csi::ControllerUnpublishVolumeRequest {
                volume_id: id.clone(),
                node_id: NODE.into(),
                secrets: secrets(),
            }))
            .await
            .map(|_| ()),
    );
    note(
        c.controller
            .controller_expand_volume(Request::new(csi::ControllerExpandVolumeRequest {
                volume_id: id.clone(),
                secrets: secrets(),
                ..Default::default()
            }))
            .await
            .map(|_| ()),
    );
    note(
        c.controller
            .create_snapshot(Request::new(csi::CreateSnapshotRequest {
                source_volume_id: id.clone(),
                name: "snap".into(),
                secrets: secrets(),
                ..Default::default()
            }))
            .await
            .map(|_| ()),
    );
    note(
        c.controller
            .get_capacity(Request::new(csi::GetCapacityRequest {
                parameters: HashMap::from([("kind".into(), "local".into())]),
                ..Default::default()
            }))
            .await
            .map(|_| ()),
    );
    note(
        c.controller
            .delete_volume(Request::new(csi::DeleteVolumeRequest {
                volume_id: id.clone(),
                secrets: secrets(),
            }))
            .await
            .map(|_| ()),
    );
    assert!(!messages.is_empty(), "some calls should have failed");
    for m in &messages {
        assert!(!m.contains(SENTINEL), "secret in error message: {m}");
    }
    let log = std::fs::read_to_string(&b.log).unwrap();
    assert!(
        log.lines().count() > 10,
        "trace logging produced too little to be a real check"
    );
    assert!(
        log.contains("CreateVolume"),
        "RPC spans missing from the log"
    );
    assert!(!log.contains(SENTINEL), "secret in the log");
}

/// A volume id far over the spec's 128 bytes is refused, and never reaches
/// a log line: the call's span names only its length.
#[tokio::test]
async fn an_oversized_volume_id_is_refused_and_not_logged() {
    let d = tempfile::tempdir().unwrap();
    let b = start(d.path(), &["--log-level", "trace", "--log-format", "json"]);
    let mut c = connect(&b.sock.display().to_string()).await.unwrap();
    let huge = format!("local-{}", "Q".repeat(1 << 20));
    let e = c
        .controller
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: huge.clone(),
            secrets: HashMap::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
    assert!(e.message().len() < 1000, "the error echoes the id");
    let e = c
        .node
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: huge.clone(),
            target_path: d.path().join("t").display().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
    // a valid id still shows in the span
    let _ = c
        .controller
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: "local-visible-id".into(),
            secrets: HashMap::new(),
        })
        .await;
    let log = std::fs::read_to_string(&b.log).unwrap();
    assert!(
        log.contains("<invalid id, 1048582 bytes>"),
        "no span for the call"
    );
    assert!(log.contains("local-visible-id"), "valid ids are logged");
    assert!(
        !log.contains(&"Q".repeat(129)),
        "the oversized id reached the log"
    );
}

/// A request's text never starts a line of berth's text log: a volume
/// name (the spec allows LF, CR and tab in one) named by an error, and a
/// capability's fs_type (refused now, `convert::capability`), show their
/// control characters escaped. Before, the "rpc failed" line carried the
/// message as it was, at the default level: a CreateVolume name
/// "x\n<time>  INFO ..." wrote a line of its own that read as berth's, and
/// at debug level so did a local volume's fs_type ("fs_type ignored").
#[tokio::test]
async fn a_request_never_forges_a_log_line() {
    let d = tempfile::tempdir().unwrap();
    let b = start(d.path(), &["--log-level", "debug", "--log-format", "text"]);
    let mut c = connect(&b.sock.display().to_string()).await.unwrap();
    let name = "pvc-x\nFORGED-NAME  INFO berth: all volumes deleted\r";
    c.controller
        .create_volume(Request::new(create_req(name, 1 << 20)))
        .await
        .unwrap();
    let e = c
        .controller
        .create_volume(Request::new(create_req(name, 2 << 20)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{}", e.message());
    let mut cap = rwo();
    if let Some(csi::volume_capability::AccessType::Mount(m)) = &mut cap.access_type {
        m.fs_type = "ext4\nFORGED-FS".into();
    }
    let _ = c
        .controller
        .create_volume(Request::new(csi::CreateVolumeRequest {
            volume_capabilities: vec![cap],
            ..create_req("pvc-y", 1 << 20)
        }))
        .await;
    let log = std::fs::read_to_string(&b.log).unwrap();
    assert!(log.contains("rpc failed"), "{log}");
    for line in log.lines() {
        assert!(
            !line.contains("FORGED") || line.contains("rpc failed"),
            "a line the request wrote: {line:?}"
        );
        assert!(!line.contains('\x1b') && !line.contains('\r'), "{line:?}");
    }
}

/// A client that calls again and again with a request berth refuses (300
/// DeleteVolume without a volume id, as fast as it can) gets at most
/// `rpc::FAILED_LINES_PER_SECOND` "rpc failed" lines a second for that RPC
/// and code, then one line with the count of those not logged; a failure
/// of another kind in the middle of the flood is logged. Before, every
/// refused call wrote its line: 300 of them.
#[tokio::test]
async fn a_flood_of_refused_calls_is_logged_at_a_bounded_rate() {
    let d = tempfile::tempdir().unwrap();
    let b = start(d.path(), &["--log-format", "text"]);
    let mut c = connect(&b.sock.display().to_string()).await.unwrap();
    let calls = 300u64;
    let began = Instant::now();
    for i in 0..calls {
        let e = c
            .controller
            .delete_volume(Request::new(Default::default()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        if i == calls / 2 {
            let e = c
                .controller
                .create_volume(Request::new(create_req("", 1 << 20)))
                .await
                .unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        }
    }
    let took = began.elapsed();
    // Lines of "rpc failed" for `method`, and the calls of DeleteVolume
    // the log says were not logged.
    let counts = |log: &str, method: &str| {
        let failed = log
            .lines()
            .filter(|l| l.contains("rpc failed") && l.contains(&format!("method=\"{method}\"")))
            .count() as u64;
        let not_logged: u64 = log
            .lines()
            .filter(|l| l.contains("failed calls not logged") && l.contains("DeleteVolume"))
            .map(|l| {
                let n = l.split("calls=").nth(1).expect(l);
                n.split(|c: char| !c.is_ascii_digit())
                    .next()
                    .unwrap()
                    .parse::<u64>()
                    .expect(l)
            })
            .sum();
        (failed, not_logged)
    };
    // The count of those not logged comes once their second is over.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (log, logged, not_logged) = loop {
        let log = std::fs::read_to_string(&b.log).unwrap();
        let (logged, not_logged) = counts(&log, "DeleteVolume");
        if logged + not_logged >= calls || Instant::now() > deadline {
            break (log, logged, not_logged);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let most = berth::rpc::FAILED_LINES_PER_SECOND as u64 * (took.as_secs() + 2);
    assert!(
        (1..=most).contains(&logged),
        "{logged} lines for {calls} refused calls in {took:?}"
    );
    assert_eq!(counts(&log, "CreateVolume").0, 1, "{log}");
    assert_eq!(logged + not_logged, calls, "{log}");
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[tokio::test]
async fn metrics_and_healthz() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let d = tempfile::tempdir().unwrap();
    let b = start(d.path(), &["--metrics-address", &addr]);
    let mut c = connect(&b.sock.display().to_string()).await.unwrap();
    c.identity
        .get_plugin_info(Request::new(Default::default()))
        .await
        .unwrap();
    c.controller
        .create_volume(Request::new(create_req("m1", 1 << 20)))
        .await
        .unwrap();
    let _ = c
        .controller
        .create_volume(Request::new(create_req("", 1)))
        .await;
    let m = http_get(&addr, "/metrics");
    assert!(
        m.starts_with("HTTP/1.0 200") || m.starts_with("HTTP/1.1 200"),
        "{m}"
    );
    for want in [
        r#"berth_rpc_requests_total{method="GetPluginInfo",code="OK"} 1"#,
        r#"berth_rpc_requests_total{method="CreateVolume",code="INVALID_ARGUMENT"} 1"#,
        r#"berth_rpc_duration_seconds_count{method="CreateVolume",code="OK"} 1"#,
        r#"berth_volumes{kind="local",phase="ready"} 1"#,
        r#"berth_pool_allocated_bytes{kind="local"} 1048576"#,
        "berth_operations_in_flight",
        r#"berth_build_info{version=""#,
    ] {
        assert!(m.contains(want), "missing {want} in\n{m}");
    }
    let h = http_get(&addr, "/healthz");
    assert!(h.contains(" 200 ") && h.ends_with("ok\n"), "{h}");
    // Moved away in one step: berth makes spare directories in it
    // meanwhile, and a removal could race them (ENOTEMPTY).
    std::fs::rename(d.path().join("local"), d.path().join("local-gone")).unwrap();
    let h = http_get(&addr, "/healthz");
    assert!(h.contains(" 503 "), "{h}");
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Connections to the metrics endpoint (on the node's network) that send
/// nothing cannot take berth's file descriptors: at most
/// `metrics::MAX_CONNECTIONS` are accepted at once, each closed when its
/// headers are late. Every one was accepted and held for ever, so enough
/// of them took every descriptor and the CSI socket accepted nobody
/// (Probe timed out).
#[tokio::test]
async fn idle_metrics_connections_are_bounded_and_closed() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let d = tempfile::tempdir().unwrap();
    let b = start(d.path(), &["--metrics-address", &addr]);
    let mut c = connect(&b.sock.display().to_string()).await.unwrap();
    c.identity
        .probe(Request::new(Default::default()))
        .await
        .unwrap();
    let pid = b.child.id();
    let before = open_fds(pid);
    let idle: Vec<std::net::TcpStream> = (0..150)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    // The most berth holds while they wait (it accepted all of them at
    // once before).
    let mut most = 0;
    for _ in 0..40 {
        most = most.max(open_fds(pid));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        most <= before + berth::metrics::MAX_CONNECTIONS + 4,
        "{most} descriptors open with 150 idle metrics connections, {before} before"
    );
    let probe = tokio::time::timeout(
        Duration::from_secs(20),
        c.identity.probe(Request::new(Default::default())),
    )
    .await;
    assert!(
        matches!(probe, Ok(Ok(_))),
        "Probe beside idle metrics connections: {probe:?}"
    );
    // The first connection (accepted first) is closed by berth, not held.
    let mut first = idle[0].try_clone().unwrap();
    first
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = [0u8; 64];
    let n = std::io::Read::read(&mut first, &mut buf);
    assert!(
        matches!(n, Ok(0)),
        "an idle metrics connection was not closed: {n:?}"
    );
    drop(first);
    drop(idle);
    let m = http_get(&addr, "/metrics");
    assert!(m.contains(" 200 "), "{m}");
}

/// CPU time (user + system, in clock ticks) process `pid` has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15, 12 and 13 after the name.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// More connections to the CSI socket than berth holds (100 that send
/// nothing, at a limit of 64 descriptors): accepting neither spins the
/// one async thread nor takes every descriptor, and Probe answers while
/// they are all open. When they took every descriptor (before
/// `server::connection_limit`), tonic retried a failed accept at once,
/// and with a connection waiting in the backlog every attempt failed at
/// once again (60% of a core and more, measured); accepting now pauses
/// `server::ACCEPT_BACKOFF` after a failure.
#[tokio::test]
async fn accepting_beyond_the_connection_limit_does_not_spin() {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("csi.sock");
    let b = start_with_open_files(d.path(), 64, 64);
    let pid = b.child.id();
    let before = open_fds(pid);
    let idle: Vec<std::os::unix::net::UnixStream> = (0..100)
        .map(|_| std::os::unix::net::UnixStream::connect(&sock).unwrap())
        .collect();
    let cap = berth::server::connection_limit(64);
    let mut most = 0;
    for _ in 0..20 {
        most = most.max(open_fds(pid));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        most <= before + cap + 4,
        "{most} descriptors open with 100 connections, {before} before"
    );
    let ticks_per_s = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .unwrap()
        .unwrap() as u64;
    let cpu = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(pid) - cpu;
    assert!(
        used * 5 < 2 * ticks_per_s,
        "berth used {used} ticks of CPU ({ticks_per_s}/s) in 2 s with 100 connections"
    );
    let probe = tokio::time::timeout(Duration::from_secs(20), async {
        let mut c = connect(&sock.display().to_string()).await?;
        c.identity.probe(Request::new(Default::default())).await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    })
    .await;
    assert!(
        matches!(probe, Ok(Ok(_))),
        "Probe beside 100 connections: {probe:?}"
    );
    drop(idle);
}

/// A client that opens connections to the CSI socket and never closes
/// them (each sent the HTTP/2 preface: a client's, kept while idle) holds
/// at most `server::connection_limit` of berth's descriptors: a
/// connection beyond it closes the one whose client has been silent
/// longest. Before, every one was held: 200 of them at a limit of 128
/// descriptors took every one, a new client's Probe timed out, and a
/// CreateVolume on a connection already open was INTERNAL (its new
/// volume's directory could not be read).
#[tokio::test]
async fn connections_held_open_never_take_every_descriptor() {
    use std::io::Write;
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("csi.sock");
    let endpoint = sock.display().to_string();
    let b = start_with_open_files(d.path(), 128, 128);
    let pid = b.child.id();
    let mut c = connect(&endpoint).await.unwrap();
    c.identity
        .probe(Request::new(Default::default()))
        .await
        .unwrap();
    let before = open_fds(pid);
    // At most 200: beyond what berth accepts, connect(2) waits for room in
    // the listen backlog (128).
    let mut held = Vec::new();
    for _ in 0..200 {
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        let mut out = raw_h2::PREFACE.to_vec();
        out.extend(raw_h2::frame(4, 0, 0, &[]));
        s.write_all(&out).unwrap();
        held.push(s);
    }
    let cap = berth::server::connection_limit(128);
    let mut most = 0;
    for _ in 0..40 {
        most = most.max(open_fds(pid));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        most <= before + cap + 4,
        "{most} descriptors open with 200 connections held, {before} before"
    );
    // A new client is served, and a call that needs descriptors works.
    let served = tokio::time::timeout(Duration::from_secs(20), async {
        let mut c = connect(&endpoint).await?;
        c.identity.probe(Request::new(Default::default())).await?;
        c.controller
            .create_volume(Request::new(create_req("pvc-beside-held", 1 << 20)))
            .await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    })
    .await;
    assert!(
        matches!(served, Ok(Ok(()))),
        "a new client beside 200 connections held: {served:?}"
    );
    // The first client, silent longest, was closed to make room; it
    // connects again and is served.
    let again = tokio::time::timeout(Duration::from_secs(20), async {
        for _ in 0..2 {
            if c.identity
                .probe(Request::new(Default::default()))
                .await
                .is_ok()
            {
                return true;
            }
        }
        false
    })
    .await;
    assert!(matches!(again, Ok(true)), "{again:?}");
    drop(held);
}

/// The connection bounds the tests of each start berth with, in seconds
/// (`--preface-timeout`, `--keepalive-interval`, `--keepalive-timeout`,
/// `--write-stall-timeout`, `--request-arrival-timeout`), short so that
/// they wait seconds, not the defaults (45 s for the keep-alive's two
/// tests alone), and long enough for a client on a loaded machine to
/// answer a PING or send its preface in time.
const PREFACE_S: u64 = 2;
const KEEPALIVE_INTERVAL_S: u64 = 1;
const KEEPALIVE_TIMEOUT_S: u64 = 2;
const WRITE_STALL_S: u64 = 3;
const REQUEST_ARRIVAL_S: u64 = 5;

/// `--flag=seconds` for berth's command line.
fn bound(flag: &str, secs: u64) -> String {
    format!("--{flag}={secs}")
}

/// Connections to the CSI socket that never send the HTTP/2 preface (not
/// a byte, or only part of it) are closed after `--preface-timeout`;
/// hyper waited for the preface without a bound, so each held a file
/// descriptor for ever, and enough of them left none for real clients.
#[tokio::test]
async fn connections_that_never_send_the_preface_are_closed() {
    use std::io::{Read, Write};
    let d = tempfile::tempdir().unwrap();
    let b = start(d.path(), &[&bound("preface-timeout", PREFACE_S)]);
    let mut c = connect(&b.sock.display().to_string()).await.unwrap();
    c.identity
        .probe(Request::new(Default::default()))
        .await
        .unwrap();
    let pid = b.child.id();
    let before = open_fds(pid);
    let mut silent: Vec<std::os::unix::net::UnixStream> = (0..80)
        .map(|_| std::os::unix::net::UnixStream::connect(&b.sock).unwrap())
        .collect();
    // Half of them send part of the preface.
    for s in silent.iter_mut().step_by(2) {
        s.write_all(b"PRI * HTTP/2.0\r\n").unwrap();
    }
    let began = Instant::now();
    for (i, s) in silent.iter_mut().enumerate() {
        // Generous: closed after the preface timeout.
        s.set_read_timeout(Some(Duration::from_secs(PREFACE_S * 5)))
            .unwrap();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => continue, // the server's SETTINGS
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("connection {i} that sent no preface was not closed: {e}"),
            }
        }
    }
    // Not before the preface timeout (the clock began after they
    // connected).
    assert!(
        began.elapsed() >= Duration::from_secs(PREFACE_S) / 2,
        "closed after {:?}",
        began.elapsed()
    );
    drop(silent);
    let deadline = Instant::now() + Duration::from_secs(20);
    while open_fds(pid) > before {
        assert!(
            Instant::now() < deadline,
            "{} descriptors open, {before} before",
            open_fds(pid)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The client that spoke at once, idle meanwhile, is still served.
    c.identity
        .probe(Request::new(Default::default()))
        .await
        .unwrap();
}

/// Connections whose client stopped reading are closed within
/// `--keepalive-interval` and `--keepalive-timeout` (a PING berth sent
/// unanswered), or `--write-stall-timeout` (answers that the client never
/// takes), and their descriptors and what they held are
/// given back; a client that reads (its HTTP/2 stack answers the PINGs)
/// keeps its idle connection. Before, both were held until the connection
/// cap closed them: one that sent the preface and then nothing (a client
/// stopped, a peer frozen) and one that opened 128 calls with the largest
/// flow-control windows and never read an answer (held in berth's
/// memory, about 5 KiB each here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_whose_client_stopped_reading_are_closed() {
    use std::io::Write;
    let d = tempfile::tempdir().unwrap();
    let b = start(
        d.path(),
        &[
            &bound("keepalive-interval", KEEPALIVE_INTERVAL_S),
            &bound("keepalive-timeout", KEEPALIVE_TIMEOUT_S),
            &bound("write-stall-timeout", WRITE_STALL_S),
        ],
    );
    create_n(&b.sock, 50).await;
    let pid = b.child.id();
    let mut c = connect(&b.sock.display().to_string()).await.unwrap();
    c.identity
        .probe(Request::new(Default::default()))
        .await
        .unwrap();
    // create_n's connection gone.
    std::thread::sleep(Duration::from_millis(500));
    let before = open_fds(pid);
    // A client that reads, idle all along: its hyper stack answers PINGs.
    let io = hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(&b.sock).await.unwrap());
    let (mut reader, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(io)
            .await
            .unwrap();
    tokio::spawn(conn);
    // Stopped after its preface and SETTINGS.
    let mut stopped = std::os::unix::net::UnixStream::connect(&b.sock).unwrap();
    let mut out = raw_h2::PREFACE.to_vec();
    out.extend(raw_h2::frame(4, 0, 0, &[]));
    stopped.write_all(&out).unwrap();
    // Windows as large as HTTP/2 allows, 128 ListVolumes, never a read.
    let mut unread = std::os::unix::net::UnixStream::connect(&b.sock).unwrap();
    let mut out = raw_h2::PREFACE.to_vec();
    out.extend(raw_h2::frame(4, 0, 0, &[0, 4, 0x7f, 0xff, 0xff, 0xff]));
    out.extend(raw_h2::frame(8, 0, 0, &0x7fff_0000u32.to_be_bytes()));
    for i in 0..berth::server::MAX_STREAMS_PER_CONNECTION {
        out.extend(raw_h2::call(1 + 2 * i, "/csi.v1.Controller/ListVolumes"));
        out.extend(raw_h2::frame(0, 1, 1 + 2 * i, &[0; 5]));
    }
    unread.write_all(&out).unwrap();
    let began = Instant::now();
    // Whether berth closed its end of `s` (seen without reading it).
    let hung_up = |s: &std::os::unix::net::UnixStream| {
        let mut p = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(s),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no wait.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n == 1 && p.revents & (libc::POLLRDHUP | libc::POLLHUP) != 0
    };
    let limit =
        Duration::from_secs(WRITE_STALL_S.max(KEEPALIVE_INTERVAL_S + KEEPALIVE_TIMEOUT_S) + 10);
    while !(hung_up(&stopped) && hung_up(&unread)) {
        assert!(
            began.elapsed() < limit,
            "still open {:?} after the clients stopped reading: the one that stopped {}, the one that never read {}",
            began.elapsed(),
            !hung_up(&stopped),
            !hung_up(&unread)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Not before a PING could have gone unanswered.
    assert!(
        began.elapsed() >= Duration::from_secs(KEEPALIVE_INTERVAL_S),
        "closed after {:?}",
        began.elapsed()
    );
    // Their descriptors are given back.
    let deadline = Instant::now() + Duration::from_secs(5);
    while open_fds(pid) > before + 1 {
        assert!(
            Instant::now() < deadline,
            "{} descriptors open, {before} before (and one client that reads)",
            open_fds(pid)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The client that reads is still connected, and its call is answered.
    let req = hyper::Request::post("http://localhost/csi.v1.Controller/ListVolumes")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(&[
            0, 0, 0, 0, 0,
        ])))
        .unwrap();
    let resp = reader
        .send_request(req)
        .await
        .expect("the idle client that reads lost its connection");
    assert_eq!(resp.status(), 200);
    drop((stopped, unread));
    c.identity
        .probe(Request::new(Default::default()))
        .await
        .unwrap();
}

/// A call that takes longer than the keep-alive's bound (a CreateVolume
/// whose NFS mount takes longer than `--keepalive-interval` and
/// `--keepalive-timeout` together) is answered: its client's HTTP/2 stack
/// answers berth's PINGs while it waits, and its connection is kept. The
/// capability names the NFS version, so that berth mounts once (without
/// one it tries three versions in turn: the call took 3 mounts' time, over
/// 75 s with the fixed 10 s + 10 s bounds).
#[tokio::test]
async fn a_call_longer_than_the_keepalive_bound_is_answered() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let took = Duration::from_secs(KEEPALIVE_INTERVAL_S + KEEPALIVE_TIMEOUT_S + 2);
    std::fs::write(
        bin.join("mount.nfs"),
        format!(
            "#!/bin/sh\nsleep {}\necho 'mount.nfs: access denied by server' >&2\nexit 32\n",
            took.as_secs()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        bin.join("mount.nfs"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let sock = dir.path().join("csi.sock");
    let log = dir.path().join("berth.log");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let child = Command::new(BIN)
        .args(berth_args(
            dir.path(),
            &sock,
            &[
                "--kinds",
                "nfs",
                "--nfs-timeout",
                "120",
                &bound("keepalive-interval", KEEPALIVE_INTERVAL_S),
                &bound("keepalive-timeout", KEEPALIVE_TIMEOUT_S),
            ],
        ))
        .env("PATH", &path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut b = Berth {
        child,
        sock: sock.clone(),
        log,
    };
    wait_accepting(&mut b);
    let mut c = connect(&format!("unix://{}", sock.display()))
        .await
        .unwrap();
    let t0 = Instant::now();
    let r = c
        .controller
        .create_volume(Request::new(csi::CreateVolumeRequest {
            name: "slow".into(),
            parameters: HashMap::from([
                ("kind".to_string(), "nfs".to_string()),
                ("server".to_string(), "127.0.0.1".to_string()),
                ("share".to_string(), "/export".to_string()),
            ]),
            volume_capabilities: vec![mount_cap_flags(
                berth::csi::v1::volume_capability::access_mode::Mode::MultiNodeMultiWriter,
                &["nfsvers=4.1"],
            )],
            ..Default::default()
        }))
        .await;
    assert!(t0.elapsed() >= took, "answered after {:?}", t0.elapsed());
    // berth's answer to the failed mount, not a connection cut.
    let e = r.expect_err("a mount that failed");
    assert!(
        !matches!(
            e.code(),
            tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown
        ) && e.message().contains("denies this node access"),
        "{e:?}"
    );
}

/// HTTP/2 by hand, for clients no gRPC library would be: frames written
/// as they are on the wire, header blocks as HPACK literals.
mod raw_h2 {
    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }

    fn literal(out: &mut Vec<u8>, name: &str, value: &str) {
        // Literal without indexing, new name; every string here is < 127.
        out.push(0);
        out.push(name.len() as u8);
        out.extend(name.as_bytes());
        out.push(value.len() as u8);
        out.extend(value.as_bytes());
    }

    /// A call's HEADERS frame (END_HEADERS, the body to follow).
    pub fn call(stream: u32, path: &str) -> Vec<u8> {
        let mut block = Vec::new();
        for (n, v) in [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ] {
            literal(&mut block, n, v);
        }
        frame(1, 0x4, stream, &block)
    }

    /// A frame read: type, flags, stream, payload.
    pub type Frame = (u8, u8, u32, Vec<u8>);

    /// Frames read within `wait`.
    pub fn read(
        s: &mut std::os::unix::net::UnixStream,
        buf: &mut Vec<u8>,
        wait: std::time::Duration,
    ) -> Option<Vec<Frame>> {
        use std::io::Read;
        s.set_read_timeout(Some(wait)).unwrap();
        let mut chunk = vec![0u8; 1 << 16];
        match s.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => buf.extend(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return None,
        }
        let mut frames = Vec::new();
        while buf.len() >= 9 {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if buf.len() < 9 + len {
                break;
            }
            let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
            frames.push((buf[3], buf[4], stream, buf[9..9 + len].to_vec()));
            buf.drain(..9 + len);
        }
        Some(frames)
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// One connection that opens thousands of calls and never sends their
/// requests holds at most `server::MAX_STREAMS_PER_CONNECTION` of them:
/// the rest are refused (RST_STREAM REFUSED_STREAM). tonic gave hyper no
/// limit, which lifted hyper's own: every call was taken, about 8 KiB
/// each, for as long as the connection lasted.
#[tokio::test]
async fn one_connection_cannot_open_calls_without_bound() {
    use std::io::Write;
    let d = tempfile::tempdir().unwrap();
    let b = start(d.path(), &[]);
    let pid = b.child.id();
    let mut c = connect(&b.sock.display().to_string()).await.unwrap();
    c.identity
        .probe(Request::new(Default::default()))
        .await
        .unwrap();
    let before = rss_kib(pid);
    let mut s = std::os::unix::net::UnixStream::connect(&b.sock).unwrap();
    let mut out = raw_h2::PREFACE.to_vec();
    out.extend(raw_h2::frame(4, 0, 0, &[]));
    let calls = 4000u32;
    for i in 0..calls {
        out.extend(raw_h2::call(1 + 2 * i, "/csi.v1.Controller/CreateVolume"));
    }
    s.write_all(&out).unwrap();
    let (mut buf, mut refused, mut limit) = (Vec::new(), 0u32, None);
    let deadline = Instant::now() + Duration::from_secs(20);
    while refused + berth::server::MAX_STREAMS_PER_CONNECTION < calls && Instant::now() < deadline {
        let Some(frames) = raw_h2::read(&mut s, &mut buf, Duration::from_millis(200)) else {
            break;
        };
        for (kind, flags, _, p) in frames {
            match kind {
                // SETTINGS (not an ack): MAX_CONCURRENT_STREAMS is 3.
                4 if flags & 1 == 0 => {
                    for e in p.chunks(6) {
                        if e[..2] == [0, 3] {
                            limit = Some(u32::from_be_bytes([e[2], e[3], e[4], e[5]]));
                        }
                    }
                    s.write_all(&raw_h2::frame(4, 1, 0, &[])).unwrap();
                }
                // RST_STREAM REFUSED_STREAM (7).
                3 if p == [0, 0, 0, 7] => refused += 1,
                _ => {}
            }
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let grown = rss_kib(pid).saturating_sub(before);
    assert!(
        grown < 8 << 10,
        "{grown} KiB more resident with {calls} calls opened"
    );
    assert!(
        refused + berth::server::MAX_STREAMS_PER_CONNECTION >= calls,
        "{refused} of {calls} calls refused"
    );
    assert_eq!(limit, Some(berth::server::MAX_STREAMS_PER_CONNECTION));
    let probe = tokio::time::timeout(
        Duration::from_secs(10),
        c.identity.probe(Request::new(Default::default())),
    )
    .await;
    assert!(matches!(probe, Ok(Ok(_))), "Probe: {probe:?}");
    drop(s);
}

/// Calls whose requests never arrive whole (each begins a message of
/// almost gRPC's 4 MiB and stops short of its end) make berth hold at
/// most `server::REQUEST_BYTES_IN_TRANSIT` of them; a call that needs
/// more meanwhile is RESOURCE_EXHAUSTED, and once they are gone the same
/// call goes through. Before, berth held every byte (64 calls on one
/// connection: 265 MB resident), and Probe and small calls still answer.
#[tokio::test]
async fn requests_that_never_arrive_whole_hold_bounded_memory() {
    let d = tempfile::tempdir().unwrap();
    let b = start(d.path(), &[]);
    let pid = b.child.id();
    let sock = b.sock.display().to_string();
    let mut c = connect(&sock).await.unwrap();
    c.identity
        .probe(Request::new(Default::default()))
        .await
        .unwrap();
    let before = rss_kib(pid);
    let (calls, declared, sent_each) = (64u32, 4_000_000u32, 3_900_000usize);
    let s = requests_never_whole(&b.sock, &vec![(declared, sent_each); calls as usize]);
    std::thread::sleep(Duration::from_millis(500));
    let grown = rss_kib(pid).saturating_sub(before);
    assert!(
        grown < ((berth::server::REQUEST_BYTES_IN_TRANSIT >> 10) as u64) * 3 / 2,
        "{grown} KiB more resident while {calls} requests of {declared} bytes never arrive whole"
    );
    let probe = tokio::time::timeout(
        Duration::from_secs(10),
        c.identity.probe(Request::new(Default::default())),
    )
    .await;
    assert!(matches!(probe, Ok(Ok(_))), "Probe: {probe:?}");
    // A large request meanwhile finds no room.
    let mut big = csi::CreateVolumeRequest {
        name: "pvc-big".into(),
        ..Default::default()
    };
    big.parameters
        .insert("unknownKey".into(), "x".repeat(2 << 20));
    let e = c
        .controller
        .create_volume(Request::new(big.clone()))
        .await
        .expect_err("a 2 MiB request beside 64 MiB in transit");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    // The slow client gone, its bytes are given back.
    drop(s);
    std::thread::sleep(Duration::from_millis(500));
    let e = c
        .controller
        .create_volume(Request::new(big))
        .await
        .expect_err("a request with an unknown parameter");
    assert_ne!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
}

/// A connection to `sock` that begins a call of CreateVolume for each
/// `(declared, sent)` of `calls`: a message declared `declared` bytes long
/// of which it sends `sent` (with the 5 bytes of its gRPC header), as
/// HTTP/2 flow control allows, as fast as berth takes them, and then sends
/// nothing more. Returned once every call has its bytes or has been
/// answered.
fn requests_never_whole(sock: &Path, calls: &[(u32, usize)]) -> std::os::unix::net::UnixStream {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    let mut out = raw_h2::PREFACE.to_vec();
    out.extend(raw_h2::frame(4, 0, 0, &[]));
    let mut sent = HashMap::new();
    let mut wanted = HashMap::new();
    let mut conn_window: i64 = 65_535 - 5 * calls.len() as i64;
    for (i, &(declared, sent_each)) in calls.iter().enumerate() {
        let id = 1 + 2 * i as u32;
        out.extend(raw_h2::call(id, "/csi.v1.Controller/CreateVolume"));
        let mut head = vec![0u8];
        head.extend(declared.to_be_bytes());
        out.extend(raw_h2::frame(0, 0, id, &head));
        sent.insert(id, 5usize);
        wanted.insert(id, sent_each);
    }
    s.write_all(&out).unwrap();
    let (mut buf, mut initial, mut windows) = (Vec::new(), 65_535i64, HashMap::<u32, i64>::new());
    let mut ended = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let open: Vec<u32> = sent
            .iter()
            .filter(|(id, n)| **n < wanted[*id] && !ended.contains(*id))
            .map(|(id, _)| *id)
            .collect();
        if open.is_empty() || Instant::now() > deadline {
            break;
        }
        let frames = raw_h2::read(&mut s, &mut buf, Duration::from_millis(20))
            .expect("berth closed the connection");
        for (kind, flags, id, p) in frames {
            match kind {
                4 if flags & 1 == 0 => {
                    for e in p.chunks(6) {
                        if e[..2] == [0, 4] {
                            initial = u32::from_be_bytes([e[2], e[3], e[4], e[5]]) as i64;
                        }
                    }
                    s.write_all(&raw_h2::frame(4, 1, 0, &[])).unwrap();
                }
                8 => {
                    let inc = (u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff) as i64;
                    if id == 0 {
                        conn_window += inc;
                    } else {
                        *windows.entry(id).or_default() += inc;
                    }
                }
                // An answer or a reset: that call is over.
                1 | 3 => {
                    ended.insert(id);
                }
                _ => {}
            }
        }
        for id in open {
            let n = sent[&id];
            let room = (initial + windows.get(&id).copied().unwrap_or(0) - n as i64)
                .min(conn_window)
                .min((wanted[&id] - n) as i64)
                .min(16_384);
            if room > 0 {
                s.write_all(&raw_h2::frame(0, 0, id, &vec![0u8; room as usize]))
                    .unwrap();
                *sent.get_mut(&id).unwrap() += room as usize;
                conn_window -= room;
            }
        }
    }
    s
}

/// Calls whose request stops arriving part way (the client stalls, or
/// sends a whole message and never ends its stream) are ended
/// `--request-arrival-timeout` after they began, and the bytes they
/// held go back to `server::REQUEST_BYTES_IN_TRANSIT`. Before, berth
/// waited for their bytes without a bound: a client that stalled 64 MiB
/// of requests made every request over 4 KiB (here a CreateVolume with an
/// 8 KiB secret, a certificate bundle) RESOURCE_EXHAUSTED for as long as
/// its connection stayed open, and a call whose stream never ended was
/// held for ever, answered never.
#[tokio::test]
async fn a_request_that_stops_arriving_is_ended_and_gives_its_bytes_back() {
    use std::io::Write;
    let d = tempfile::tempdir().unwrap();
    let b = start(
        d.path(),
        &[&bound("request-arrival-timeout", REQUEST_ARRIVAL_S)],
    );
    let arrival = Duration::from_secs(REQUEST_ARRIVAL_S);
    let mut c = connect(&b.sock.display().to_string()).await.unwrap();
    // Calls that hold the whole budget, to the byte: 16 of gRPC's largest
    // message (4 MiB, all but its last 5 bytes sent), and one for what is
    // left (each call's first 4 KiB is not counted).
    let free = berth::server::REQUEST_BYTES_FREE;
    let largest = 4usize << 20;
    let mut calls = vec![(largest as u32, largest); 16];
    let left = berth::server::REQUEST_BYTES_IN_TRANSIT - 16 * (largest - free);
    calls.push((1 << 20, free + left));
    let began = Instant::now();
    let mut stalled = requests_never_whole(&b.sock, &calls);
    // Sent well within the timeout berth is given here, or the calls it
    // ends meanwhile leave room in the budget below.
    assert!(
        began.elapsed() < arrival / 2,
        "sending the stalled requests took {:?}: lengthen REQUEST_ARRIVAL_S",
        began.elapsed()
    );
    // A whole message (an empty CreateVolumeRequest), its stream never
    // ended.
    let mut unended = std::os::unix::net::UnixStream::connect(&b.sock).unwrap();
    let mut out = raw_h2::PREFACE.to_vec();
    out.extend(raw_h2::frame(4, 0, 0, &[]));
    out.extend(raw_h2::call(1, "/csi.v1.Controller/CreateVolume"));
    out.extend(raw_h2::frame(0, 0, 1, &[0, 0, 0, 0, 0]));
    unended.write_all(&out).unwrap();
    // 8 KiB of secrets: more than the 4 KiB the CSI spec allows a map,
    // which berth refuses (INVALID_ARGUMENT) once the request has come.
    let mut create = create_req("pvc-with-secret", 1 << 20);
    create.secrets.insert("ca.crt".into(), "c".repeat(8 << 10));
    let e = c
        .controller
        .create_volume(Request::new(create.clone()))
        .await
        .expect_err("an 8 KiB request beside 64 MiB stalled");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    // Once the stalled calls are ended, the same request is answered (its
    // secrets refused); nothing about the stalled client changed meanwhile.
    let limit = arrival * 3;
    loop {
        match c
            .controller
            .create_volume(Request::new(create.clone()))
            .await
        {
            Ok(r) => panic!("8 KiB of secrets accepted: {r:?}"),
            Err(e) if e.code() == tonic::Code::InvalidArgument => {
                assert!(e.message().contains("secrets"), "{e:?}");
                break;
            }
            Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                assert!(
                    began.elapsed() < limit,
                    "still RESOURCE_EXHAUSTED {:?} after the stalled requests began",
                    began.elapsed()
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(
        began.elapsed() >= arrival,
        "stalled calls ended before their time"
    );
    // Each stalled call was answered (trailers) or reset, and so was the
    // one whose stream never ended.
    let ended = |s: &mut std::os::unix::net::UnixStream, id: u32| {
        let mut buf = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let Some(frames) = raw_h2::read(s, &mut buf, Duration::from_millis(100)) else {
                return true; // the connection closed
            };
            if frames.iter().any(|(kind, flags, sid, _)| {
                *sid == id && (*kind == 3 || (*kind == 1 && flags & 1 == 1))
            }) {
                return true;
            }
        }
        false
    };
    assert!(
        ended(&mut stalled, 1),
        "the first stalled call is still open"
    );
    assert!(
        ended(&mut unended, 1),
        "the call whose stream never ended is still open"
    );
    drop(stalled);
    drop(unended);
    c.identity
        .probe(Request::new(Default::default()))
        .await
        .unwrap();
}

/// Probes and /healthz checks at the same moment (the livenessprobe
/// sidecar's Probe and kubelet's /healthz overlap in a cluster) all pass:
/// each check writes a file of its own (they shared one, and one check
/// removed the other's: FAILED_PRECONDITION and 503). Files that checks
/// killed half way left in the state directory (under this version's
/// names and the one name earlier versions shared) are no damage: `state
/// check` passes beside them, and start-up removes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_probes_and_healthz_checks_all_pass() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("state");
    let probe_files = || -> Vec<_> {
        std::fs::read_dir(&state)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().starts_with(".probe"))
            .collect()
    };
    let mut b = start(d.path(), &["--metrics-address", &addr]);
    let healthz: Vec<_> = (0..4)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                (0..100)
                    .map(|_| http_get(&addr, "/healthz"))
                    .filter(|h| !h.contains(" 200 "))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let c = connect(&b.sock.display().to_string()).await.unwrap();
    let mut failed = Vec::new();
    for _ in 0..20 {
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..50 {
            let mut c = c.clone();
            calls.spawn(async move { c.identity.probe(Request::new(Default::default())).await });
        }
        while let Some(r) = calls.join_next().await {
            if let Err(e) = r.unwrap() {
                failed.push(format!("{:?}: {}", e.code(), e.message()));
            }
        }
    }
    let bad: Vec<String> = healthz
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of 1000 Probes failed: {:?}",
        failed.len(),
        failed.first()
    );
    assert!(
        bad.is_empty(),
        "{} of 400 /healthz failed: {:?}",
        bad.len(),
        bad.first()
    );
    assert!(probe_files().is_empty(), "{:?}", probe_files());
    assert!(sigterm(&mut b).success());
    drop(b);
    // What checks killed half way leave.
    let leftovers = [".probe.tmp", ".probe-0.tmp", ".probe-41.tmp"];
    for n in leftovers {
        std::fs::write(state.join(n), b"ok").unwrap();
    }
    let sock = d.path().join("csi.sock");
    let check = run_to_exit(&berth_args(d.path(), &sock, &["state", "check"]));
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success() && text.contains("0 errors, 0 warnings"),
        "{text}"
    );
    let _b = start(d.path(), &[]);
    assert!(
        probe_files().is_empty(),
        "left at start-up: {:?}",
        probe_files()
    );
}

/// Runs berth with `args` until it exits (killed after 15 s: a berth that
/// should have refused to start but serves instead).
fn run_to_exit(args: &[String]) -> std::process::Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn berth");
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "berth {args:?} did not exit: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

fn berth_args(dir: &Path, sock: &Path, rest: &[&str]) -> Vec<String> {
    let mut v = vec![
        "--data-dir".to_string(),
        dir.display().to_string(),
        "--endpoint".into(),
        format!("unix://{}", sock.display()),
        "--node-id".into(),
        NODE.into(),
    ];
    v.extend(rest.iter().map(|s| s.to_string()));
    v
}

async fn create_n(sock: &Path, n: usize) -> Vec<String> {
    let mut c = connect(&sock.display().to_string()).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..n {
        let v = c
            .controller
            .create_volume(Request::new(create_req(&format!("pvc-{i}"), 1 << 20)))
            .await
            .unwrap();
        ids.push(v.into_inner().volume.unwrap().volume_id);
    }
    ids
}

async fn listed(sock: &Path) -> Vec<String> {
    let mut c = connect(&sock.display().to_string()).await.unwrap();
    let mut v: Vec<String> = c
        .controller
        .list_volumes(Request::new(Default::default()))
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.volume.unwrap().volume_id)
        .collect();
    v.sort();
    v
}

/// Two berth processes on one state directory (a debugging run next to
/// the DaemonSet pod): the second refuses to start, naming the directory
/// and the holder, and touches nothing; a second berth on a socket that
/// answers refuses too, and never takes the socket away. Every volume of
/// the first survives its restart.
#[tokio::test]
async fn a_second_berth_on_the_same_state_or_socket_refuses_to_start() {
    let d = tempfile::tempdir().unwrap();
    let b = start(d.path(), &[]);
    let mut ids = create_n(&b.sock, 60).await;
    ids.sort();
    for id in &ids {
        std::fs::write(d.path().join("local").join(id).join("data"), id).unwrap();
    }
    let other = d.path().join("other.sock");
    let out = run_to_exit(&berth_args(d.path(), &other, &[]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second berth started: {err}");
    assert!(
        err.contains(&d.path().join("state").display().to_string())
            && err.contains(&format!("pid {}", b.child.id())),
        "{err}"
    );
    assert!(!other.exists(), "the refused berth bound a socket");
    // Another state directory on the first one's socket.
    let d2 = tempfile::tempdir().unwrap();
    let out = run_to_exit(&berth_args(d2.path(), &b.sock, &[]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("another process is serving"), "{err}");
    assert_eq!(listed(&b.sock).await, ids, "the first berth still serves");
    drop(b);
    let b = start(d.path(), &[]);
    assert_eq!(listed(&b.sock).await, ids);
    for id in &ids {
        assert_eq!(
            std::fs::read_to_string(d.path().join("local").join(id).join("data")).unwrap(),
            *id
        );
    }
    assert!(!d.path().join("local/.orphaned").exists());
}

/// After `state repair` dropped `lost`'s record: berth does not start
/// while its directory is in the local root without a record, names it and
/// the flag, and moves nothing.
/// Runs berth in `dir`, which must exit with an error (`what` otherwise);
/// its stderr.
fn refused_start(dir: &Path, sock: &Path, what: &str) -> String {
    let out = run_to_exit(&berth_args(dir, sock, &[]));
    assert!(!out.status.success(), "{what}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn refused_for_storage_without_record(dir: &Path, sock: &Path, lost: &str) {
    let err = refused_start(dir, sock, "berth started beside storage without a record");
    assert!(
        err.contains("no record of 1 volume")
            && err.contains(lost)
            && err.contains("--allow-missing-storage"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("local").join(lost).join("data")).unwrap(),
        lost
    );
    assert!(!dir.join("local/.orphaned").exists());
}

/// Starts berth in `dir`, creates `n` local volumes, writes each one's id
/// into a file in it, and stops berth with SIGTERM (a clean exit).
async fn volumes_with_data_then_exit(dir: &Path, n: usize) -> Vec<String> {
    let mut b = start(dir, &[]);
    let ids = create_n(&b.sock, n).await;
    for id in &ids {
        std::fs::write(dir.join("local").join(id).join("data"), id).unwrap();
    }
    assert!(sigterm(&mut b).success());
    ids
}

/// One byte changed in the middle of the journal: berth does not start
/// (nothing is cut, nothing is moved aside), says where and how to
/// recover; `state check` and `state export` report it; `state repair`
/// drops only the damaged line, and the volume it named is kept aside with
/// its data, never deleted.
#[tokio::test]
async fn a_damaged_journal_stops_start_up_until_the_operator_decides() {
    let d = tempfile::tempdir().unwrap();
    let ids = volumes_with_data_then_exit(d.path(), 50).await;
    let log = d.path().join("state/journal/log-0.jsonl");
    let mut bytes = std::fs::read(&log).unwrap();
    // A byte near the end of the 20th line's JSON (past the id).
    let lines: Vec<&[u8]> = bytes.split_inclusive(|&c| c == b'\n').collect();
    let start20: usize = lines[..19].iter().map(|l| l.len()).sum();
    let at = start20 + lines[19].len() - 5;
    assert!(bytes[at] != b'\n');
    bytes[at] ^= 0x01;
    std::fs::write(&log, &bytes).unwrap();

    let sock = d.path().join("csi.sock");
    let err = refused_start(d.path(), &sock, "berth started on a damaged journal");
    assert!(
        err.contains("log-0.jsonl")
            && err.contains(&format!("byte {start20}"))
            && err.contains("berth state repair"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&log).unwrap(),
        bytes,
        "the journal was changed"
    );
    for id in &ids {
        assert!(d.path().join("local").join(id).join("data").exists());
    }
    assert!(!d.path().join("local/.orphaned").exists());

    let tool = |t: &str| run_to_exit(&berth_args(d.path(), &sock, &["state", t]));
    let check = tool("check");
    let text = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(1), "{text}");
    assert!(
        text.contains("journal damaged") && text.contains("line 20"),
        "{text}"
    );
    let export = tool("export");
    assert_eq!(export.status.code(), Some(1));
    let doc: serde_json::Value = serde_json::from_slice(&export.stdout).unwrap();
    assert_eq!(doc["records"].as_array().unwrap().len(), 49);
    assert_eq!(doc["damage"].as_array().unwrap().len(), 1);

    let repair = tool("repair");
    let text = String::from_utf8_lossy(&repair.stdout);
    assert!(
        repair.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&repair.stderr)
    );
    let lost = &ids[19];
    assert!(
        text.contains("dropped line 20")
            && text.contains(lost.as_str())
            && text.contains("--allow-missing-storage"),
        "{text}"
    );
    refused_for_storage_without_record(d.path(), &sock, lost);
    let b = start(d.path(), &["--allow-missing-storage"]);
    let mut want: Vec<String> = ids.iter().filter(|i| *i != lost).cloned().collect();
    want.sort();
    assert_eq!(listed(&b.sock).await, want);
    // The volume whose record was dropped: its data kept aside.
    assert_eq!(
        std::fs::read_to_string(d.path().join("local/.orphaned").join(lost).join("data")).unwrap(),
        *lost
    );
    let check = tool("check");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
}

/// A record forged into the journal by hand, with a valid checksum and a
/// hostile id (`local-../../victim`, deleting): berth starts, says so once
/// in its log and never acts on it (no delete tried, nothing touched, no
/// retry), keeps it in the journal, and serves the rest; `state check`
/// reports it as an error (exit code 1), `state export` lists it as
/// damage (exit code 1), and `state repair` drops it (its line kept in
/// the copy), after which check is clean. Before, start-up retried its
/// "interrupted delete" with an error at each start and every minute, and
/// check reported only a warning (exit code 0).
#[tokio::test]
async fn a_forged_record_with_a_hostile_id_is_damage_never_acted_on() {
    let d = tempfile::tempdir().unwrap();
    let ids = volumes_with_data_then_exit(d.path(), 3).await;
    let log = d.path().join("state/journal/log-0.jsonl");
    let text = std::fs::read_to_string(&log).unwrap();
    let line = text.lines().next().unwrap();
    let put: serde_json::Value = serde_json::from_str(&line[9..]).unwrap();
    let mut rec: berth::state::VolumeRecord =
        serde_json::from_str(&put["put"].to_string()).unwrap();
    let hostile = "local-../../victim";
    rec.id = hostile.into();
    rec.name = "forged".into();
    rec.seq = 1000;
    rec.phase = berth::state::Phase::Deleting;
    let mut forged = Vec::new();
    berth::state::journal::encode(&berth::state::journal::EntryRef::Put(&rec), &mut forged)
        .unwrap();
    let mut bytes = text.into_bytes();
    bytes.extend_from_slice(&forged);
    std::fs::write(&log, &bytes).unwrap();
    std::fs::create_dir(d.path().join("victim")).unwrap();
    std::fs::write(d.path().join("victim/file"), "precious").unwrap();

    let sock = d.path().join("csi.sock");
    let tool = |t: &str| run_to_exit(&berth_args(d.path(), &sock, &["state", t]));
    let check = tool("check");
    let out = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(1), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("error:") && l.contains(&format!("{hostile:?}"))),
        "{out}"
    );
    let export = tool("export");
    assert_eq!(export.status.code(), Some(1));
    let doc: serde_json::Value = serde_json::from_slice(&export.stdout).unwrap();
    assert_eq!(doc["records"].as_array().unwrap().len(), 4, "{doc}");
    let damage = doc["damage"].as_array().unwrap();
    assert!(
        damage.len() == 1 && damage[0].as_str().unwrap().contains(hostile),
        "{damage:?}"
    );

    let mut want = ids.clone();
    for round in 0..2 {
        let mut b = start(d.path(), &[]);
        want.sort();
        assert_eq!(listed(&b.sock).await, want);
        let mut c = connect(&b.sock.display().to_string()).await.unwrap();
        let new = c
            .controller
            .create_volume(Request::new(create_req(&format!("new-{round}"), 1 << 20)))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .volume_id;
        assert!(d.path().join("local").join(&new).is_dir());
        want.push(new);
        assert!(sigterm(&mut b).success());
        let log = std::fs::read_to_string(&b.log).unwrap();
        let about: Vec<&str> = log.lines().filter(|l| l.contains(hostile)).collect();
        assert_eq!(about.len(), 1, "{log}");
        assert!(about[0].contains("ERROR"), "{log}");
        assert!(!log.contains("will retry"), "{log}");
        assert_eq!(
            std::fs::read_to_string(d.path().join("victim/file")).unwrap(),
            "precious"
        );
        // kept in the journal
        let export = tool("export");
        let doc: serde_json::Value = serde_json::from_slice(&export.stdout).unwrap();
        assert!(
            doc["records"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["id"] == hostile),
            "{doc}"
        );
    }

    let repair = tool("repair");
    let text = String::from_utf8_lossy(&repair.stdout);
    assert!(repair.status.success(), "{text}");
    assert!(text.contains(hostile), "{text}");
    let check = tool("check");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let b = start(d.path(), &[]);
    assert_eq!(listed(&b.sock).await.len(), 5);
    assert_eq!(
        std::fs::read_to_string(d.path().join("victim/file")).unwrap(),
        "precious"
    );
}

/// A journal cut short, at a line boundary (a valid shorter journal: no
/// checksum can tell) or inside a line (taken for an interrupted last
/// write): the volumes whose records were cut off still have their
/// directories in the local root. Berth does not start, names how many
/// and some of them, and moves nothing; with `--allow-missing-storage` it
/// keeps them aside with their data and serves the rest.
#[tokio::test]
async fn a_journal_cut_short_stops_start_up_while_its_volumes_are_there() {
    for mid_line in [false, true] {
        let d = tempfile::tempdir().unwrap();
        let ids = volumes_with_data_then_exit(d.path(), 50).await;
        let log = d.path().join("state/journal/log-0.jsonl");
        let bytes = std::fs::read(&log).unwrap();
        let lines: Vec<&[u8]> = bytes.split_inclusive(|&c| c == b'\n').collect();
        assert_eq!(lines.len(), 50, "one line per volume");
        // Keep the first 40 records (and, mid-line, half of the 41st).
        let mut cut: usize = lines[..40].iter().map(|l| l.len()).sum();
        if mid_line {
            cut += lines[40].len() / 2;
        }
        std::fs::OpenOptions::new()
            .write(true)
            .open(&log)
            .unwrap()
            .set_len(cut as u64)
            .unwrap();
        let lost = &ids[40..];
        let sock = d.path().join("csi.sock");
        let err = refused_start(d.path(), &sock, "berth started with 10 records cut off");
        assert!(
            err.contains("no record of 10 volumes")
                && err.contains("records 40 others")
                && lost.iter().any(|id| err.contains(id.as_str()))
                && err.contains("--allow-missing-storage"),
            "{err}"
        );
        for id in &ids {
            assert_eq!(
                std::fs::read_to_string(d.path().join("local").join(id).join("data")).unwrap(),
                *id
            );
        }
        assert!(!d.path().join("local/.orphaned").exists());
        let check = run_to_exit(&berth_args(d.path(), &sock, &["state", "check"]));
        let text = String::from_utf8_lossy(&check.stdout);
        assert_eq!(check.status.code(), Some(1), "{text}");
        assert!(lost.iter().all(|id| text.contains(id.as_str())), "{text}");

        let b = start(d.path(), &["--allow-missing-storage"]);
        let mut want = ids[..40].to_vec();
        want.sort();
        assert_eq!(listed(&b.sock).await, want);
        for id in lost {
            assert_eq!(
                std::fs::read_to_string(d.path().join("local/.orphaned").join(id).join("data"))
                    .unwrap(),
                *id
            );
        }
    }
}

/// A log padded by hand (here 65 MiB of NUL bytes after its last line):
/// longer than any write berth makes, so not the torn tail of a crash.
/// Berth does not start, says why, and neither cuts the log nor copies the
/// padding aside.
#[tokio::test]
async fn a_log_padded_past_any_write_stops_start_up() {
    let d = tempfile::tempdir().unwrap();
    let ids = volumes_with_data_then_exit(d.path(), 3).await;
    let log = d.path().join("state/journal/log-0.jsonl");
    let len = std::fs::metadata(&log).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&log).unwrap();
    f.set_len(len + (65 << 20)).unwrap();
    drop(f);
    let sock = d.path().join("csi.sock");
    let err = refused_start(d.path(), &sock, "berth started on a padded log");
    assert!(
        err.contains("log-0.jsonl")
            && err.contains(&format!("byte {len}"))
            && err.contains("not the torn tail"),
        "{err}"
    );
    assert_eq!(std::fs::metadata(&log).unwrap().len(), len + (65 << 20));
    let names: Vec<String> = std::fs::read_dir(d.path().join("state/journal"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.contains("torn")), "{names:?}");
    for id in &ids {
        assert!(d.path().join("local").join(id).join("data").exists());
    }
}

/// A clean exit folds a log of 64 KiB or more into a binary snapshot
/// (the next start reads it and replays nothing). A byte changed inside a
/// record of it: berth does not start and names the file and the frame;
/// `state repair` drops that record only, and its volume's data is kept
/// aside.
#[tokio::test]
async fn a_snapshot_written_at_exit_is_read_back_and_its_damage_stops_start_up() {
    let d = tempfile::tempdir().unwrap();
    let ids = volumes_with_data_then_exit(d.path(), 200).await;
    let j = d.path().join("state/journal");
    let mut files: Vec<String> = std::fs::read_dir(&j)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["log-1.jsonl", "snapshot-1.bin", "snapshot-1.jsonl"]);
    assert_eq!(std::fs::metadata(j.join("log-1.jsonl")).unwrap().len(), 0);
    let b = start(d.path(), &[]);
    let mut want = ids.clone();
    want.sort();
    assert_eq!(listed(&b.sock).await, want);
    drop(b);

    // one byte of the 100th volume's id, in its record's frame
    let snap = j.join("snapshot-1.bin");
    let mut bytes = std::fs::read(&snap).unwrap();
    let lost = &ids[99];
    let at = bytes
        .windows(lost.len())
        .position(|w| w == lost.as_bytes())
        .expect("the id in the snapshot")
        + 3;
    bytes[at] ^= 0x01;
    std::fs::write(&snap, &bytes).unwrap();
    let sock = d.path().join("csi.sock");
    let err = refused_start(d.path(), &sock, "berth started on a damaged snapshot");
    assert!(
        err.contains("snapshot-1.bin") && err.contains("frame") && err.contains("checksum"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&snap).unwrap(),
        bytes,
        "the snapshot was changed"
    );
    let tool = |t: &str| run_to_exit(&berth_args(d.path(), &sock, &["state", t]));
    assert_eq!(tool("check").status.code(), Some(1));
    let repair = tool("repair");
    assert!(
        repair.status.success(),
        "{}{}",
        String::from_utf8_lossy(&repair.stdout),
        String::from_utf8_lossy(&repair.stderr)
    );
    refused_for_storage_without_record(d.path(), &sock, lost);
    let b = start(d.path(), &["--allow-missing-storage"]);
    want.retain(|i| i != lost);
    assert_eq!(listed(&b.sock).await, want);
    assert_eq!(
        std::fs::read_to_string(d.path().join("local/.orphaned").join(lost).join("data")).unwrap(),
        *lost
    );
}

/// A non-empty log newer than the newest snapshot (a copy left by hand):
/// `state check` and start-up refuse, pointing to `state repair`, which
/// takes it out of the journal (its bytes kept aside); then `state check`
/// is clean and berth starts with every volume. Repair used to say
/// "repaired" and leave it there, so check and start-up kept refusing and
/// pointing back to repair.
#[tokio::test]
async fn repair_takes_a_stray_newer_log_out_and_berth_starts() {
    for stray in [7u64, u64::MAX] {
        let d = tempfile::tempdir().unwrap();
        let mut b = start(d.path(), &[]);
        let mut ids = create_n(&b.sock, 3).await;
        ids.sort();
        b.child.kill().unwrap();
        b.child.wait().unwrap();
        drop(b);
        let j = d.path().join("state/journal");
        let name = format!("log-{stray}.jsonl");
        let bytes = std::fs::read(j.join("log-0.jsonl")).unwrap();
        std::fs::write(j.join(&name), &bytes).unwrap();
        let sock = d.path().join("csi.sock");
        let tool = |t: &str| run_to_exit(&berth_args(d.path(), &sock, &["state", t]));
        let check = tool("check");
        assert_eq!(check.status.code(), Some(1));
        let err = refused_start(d.path(), &sock, "berth started beside a stray log");
        assert!(
            err.contains(&name) && err.contains("berth state repair"),
            "{err}"
        );
        let repair = tool("repair");
        let text = String::from_utf8_lossy(&repair.stdout);
        assert!(repair.status.success(), "{text}");
        assert!(text.contains(&name), "{text}");
        assert!(!j.join(&name).exists(), "{name} left in the journal");
        let kept: Vec<_> = std::fs::read_dir(&j)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("damaged-"))
            .map(|e| e.path().join(&name))
            .collect();
        assert_eq!(kept.len(), 1);
        assert_eq!(
            std::fs::read(&kept[0]).unwrap(),
            bytes,
            "its bytes are kept"
        );
        let check = tool("check");
        let text = String::from_utf8_lossy(&check.stdout);
        assert!(
            check.status.success() && text.contains("0 errors"),
            "{text}"
        );
        let b = start(d.path(), &[]);
        assert_eq!(listed(&b.sock).await, ids);
    }
}

/// A directory or endpoint that is empty, only white space, or begins or
/// ends with it (a quoting slip in a manifest: `BERTH_LOCAL_ROOT: " "`,
/// `"/var/lib/berth "`) stops start-up naming the flag, from the command
/// line or the environment, and nothing is made. Before, such a value was
/// a directory of that name: `BERTH_LOCAL_ROOT=" "` made and served the
/// local root `<working directory>/ `, and a data directory with a
/// trailing space a second, empty state beside the real one, whose
/// volumes every node call then said do not exist.
#[test]
fn directories_padded_with_white_space_stop_start_up() {
    // (arguments, environment, the flag the error names)
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 8] = [
        (&[], &[("BERTH_LOCAL_ROOT", " ")], "--local-root"),
        (&["--local-root", "\t"], &[], "--local-root"),
        (&[], &[("BERTH_STATE_DIR", "state ")], "--state-dir"),
        (
            &["--kinds", "block"],
            &[("BERTH_BLOCK_ROOT", " block")],
            "--block-root",
        ),
        (&["--block-root", "block\n"], &[], "--block-root"),
        (&[], &[("BERTH_DATA_DIR", "data ")], "--data-dir"),
        (&["--data-dir", " "], &[], "--data-dir"),
        (
            &[],
            &[("CSI_ENDPOINT", "unix:///tmp/berth-x.sock ")],
            "endpoint",
        ),
    ];
    for (args, env, flag) in cases {
        let d = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(BIN);
        if !env.iter().any(|(k, _)| *k == "BERTH_DATA_DIR") && !args.contains(&"--data-dir") {
            cmd.arg("--data-dir").arg(d.path().join("data"));
        }
        if !env.iter().any(|(k, _)| *k == "CSI_ENDPOINT") {
            cmd.arg("--endpoint")
                .arg(format!("unix://{}", d.path().join("csi.sock").display()));
        }
        let mut child = cmd
            .args(["--node-id", NODE])
            .args(args)
            .envs(env.iter().copied())
            .current_dir(d.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{args:?} {env:?}: berth started");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} {env:?}: {err}");
        assert!(
            err.contains(flag) && err.contains("white space"),
            "{args:?} {env:?}: {err}"
        );
        let made: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(made.is_empty(), "{args:?} {env:?}: made {made:?}");
    }
}

/// A node id that cannot be this node's topology value (the CSI spec: at
/// most 63 characters, alphanumeric at both ends, only '-', '_', '.' and
/// alphanumerics between; kubelet puts it on the node as a label) is
/// refused at start-up, whether it comes from --node-id, $NODE_ID or
/// $KUBE_NODE_NAME, naming what is wrong and the flag to pass; so is an
/// empty one (it used to mean "the host name"). Nothing is served. It used
/// to be served as the topology value. An NFS-only berth reports no
/// topology: a long id serves there.
#[tokio::test]
async fn a_node_id_that_is_no_topology_value_stops_start_up() {
    let long = "x".repeat(100);
    // (arguments, environment, what the error says)
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: [Case; 7] = [
        (&["--node-id", "bad/node"], &[], &["'/'"]),
        (&["--node-id", "node 1"], &[], &["' '"]),
        (&["--node-id", &long], &[], &["100 characters", "63", "253"]),
        (&["--node-id", ""], &[], &["empty"]),
        (&[], &[("NODE_ID", "bad/node")], &["'/'"]),
        (&[], &[("NODE_ID", "")], &["empty"]),
        (
            &[],
            &[("KUBE_NODE_NAME", &long)],
            &["$KUBE_NODE_NAME", "253"],
        ),
    ];
    for (args, env, says) in cases {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("csi.sock");
        let mut cmd = Command::new(BIN);
        cmd.arg("--data-dir")
            .arg(d.path())
            .arg("--endpoint")
            .arg(format!("unix://{}", sock.display()))
            .args(args)
            .env_remove("NODE_ID")
            .env_remove("KUBE_NODE_NAME")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{args:?} {env:?}: berth started");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} {env:?}: {err}");
        assert!(err.contains("--node-id"), "{args:?} {env:?}: {err}");
        for s in says {
            assert!(err.contains(s), "{args:?} {env:?}: no {s:?} in {err}");
        }
        assert!(!sock.exists(), "{args:?} {env:?}: bound the socket");
    }
    // The longest valid id is this node's topology value.
    let max = "n".repeat(63);
    let d = tempfile::tempdir().unwrap();
    let b = start_as(d.path(), &max, &[]);
    let mut c = connect(&b.sock.display().to_string()).await.unwrap();
    let info = c
        .node
        .node_get_info(Request::new(Default::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, max);
    assert_eq!(info.accessible_topology.unwrap().segments[TOPO_KEY], max);
    drop(b);
    // No topology without node-local kinds: the id's own limit only.
    let d = tempfile::tempdir().unwrap();
    let b = start_as(d.path(), &long, &["--mode", "node", "--kinds", "nfs"]);
    let mut c = connect(&b.sock.display().to_string()).await.unwrap();
    let info = c
        .node
        .node_get_info(Request::new(Default::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, long);
    assert!(info.accessible_topology.is_none());
}

/// Runs berth with `args` and returns its output, failing unless it
/// exits within 5 s.
fn exits_at_once(args: &[String]) -> std::process::Output {
    let started = Instant::now();
    let out = run_to_exit(args);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "berth {args:?} took {:?}",
        started.elapsed()
    );
    out
}

/// A FIFO where the journal's log should be (or the state directory's
/// lock file): start-up and every `berth state` tool stop at once, naming
/// it (they used to wait for ever in open(2) for a writer). `state repair`
/// moves it aside; then `state check` is clean and berth starts with
/// every volume.
#[tokio::test]
async fn a_fifo_in_the_state_directory_stops_nothing_for_ever() {
    let d = tempfile::tempdir().unwrap();
    let ids = volumes_with_data_then_exit(d.path(), 3).await;
    let sock = d.path().join("csi.sock");
    let j = d.path().join("state/journal");
    let log = j.join("log-0.jsonl");
    let kept = std::fs::read(&log).unwrap();
    std::fs::remove_file(&log).unwrap();
    nix::unistd::mkfifo(&log, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let out = exits_at_once(&berth_args(d.path(), &sock, &[]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "berth started with a FIFO for its log"
    );
    assert!(
        err.contains("log-0.jsonl") && err.contains("FIFO") && err.contains("berth state repair"),
        "{err}"
    );
    let tool = |t: &str| exits_at_once(&berth_args(d.path(), &sock, &["state", t]));
    for t in ["check", "export"] {
        let out = tool(t);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{t}: {text}");
        assert!(text.contains("FIFO"), "{t}: {text}");
    }
    // The log's lines back, the FIFO as the lock file instead.
    std::fs::remove_file(&log).unwrap();
    std::fs::write(&log, &kept).unwrap();
    let lock = d.path().join("state/.berth.lock");
    std::fs::remove_file(&lock).unwrap();
    nix::unistd::mkfifo(&lock, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let out = exits_at_once(&berth_args(d.path(), &sock, &[]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "berth started with a FIFO for its lock file"
    );
    assert!(err.contains(".berth.lock") && err.contains("FIFO"), "{err}");
    let check = tool("check");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    std::fs::remove_file(&lock).unwrap();
    // The FIFO as the log again: repair moves it aside.
    std::fs::remove_file(&log).unwrap();
    nix::unistd::mkfifo(&log, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let repair = tool("repair");
    let text = String::from_utf8_lossy(&repair.stdout);
    assert!(
        repair.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&repair.stderr)
    );
    assert!(
        text.contains("moved") && text.contains("FIFO") && text.contains("--allow-missing-storage"),
        "{text}"
    );
    assert!(!log.exists() || std::fs::metadata(&log).unwrap().is_file());
    // The journal is whole again; the log was lost, and its volumes'
    // records with it: their storage is without a record until berth
    // keeps it aside.
    let check = tool("check");
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(!text.contains("journal damaged"), "{text}");
    assert!(text.contains("3 errors"), "{text}");
    let b = start(d.path(), &["--allow-missing-storage"]);
    assert!(listed(&b.sock).await.is_empty());
    for id in &ids {
        assert!(d
            .path()
            .join("local/.orphaned")
            .join(id)
            .join("data")
            .exists());
    }
    let check = tool("check");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
}

/// `--shutdown-timeout` is a real bound: a call stuck in a command (here a
/// `mount.nfs` that never returns, as against a hung NFS server) does not
/// keep berth alive after SIGTERM, and the stuck command's process group
/// goes with it; the next start serves again.
#[tokio::test]
async fn shutdown_timeout_bounds_a_call_stuck_in_a_command() {
    stuck_in_mount(false).await;
}

/// A berth killed with SIGKILL while a `mount.nfs` hangs takes the
/// `mount.nfs` with it (it is berth's own child, which dies with its
/// parent: `mount` would have forked it out of reach); the next start
/// serves again.
#[tokio::test]
async fn a_killed_berth_takes_its_stuck_mount_helper_with_it() {
    stuck_in_mount(true).await;
}

async fn stuck_in_mount(kill9: bool) {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let pidfile = dir.path().join("mount.pid");
    std::fs::write(
        bin.join("mount.nfs"),
        format!(
            // Written whole, then renamed: the test reads it as soon as it
            // exists (a plain `>` let it read an empty file now and then).
            "#!/bin/sh\necho $$ > {0}.tmp && mv {0}.tmp {0}\nexec sleep 300\n",
            pidfile.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        bin.join("mount.nfs"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let sock = dir.path().join("csi.sock");
    let log = dir.path().join("berth.log");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let spawn = || {
        Command::new(BIN)
            .args(berth_args(
                dir.path(),
                &sock,
                &[
                    "--kinds",
                    "nfs",
                    "--nfs-timeout",
                    "120",
                    "--shutdown-timeout",
                    "1",
                ],
            ))
            .env("PATH", &path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap()
    };
    let mut b = Berth {
        child: spawn(),
        sock: sock.clone(),
        log: log.clone(),
    };
    wait_accepting(&mut b);
    let ep = format!("unix://{}", sock.display());
    let call = tokio::spawn(async move {
        let mut c = connect(&ep).await.unwrap();
        c.controller
            .create_volume(Request::new(csi::CreateVolumeRequest {
                name: "stuck".into(),
                parameters: HashMap::from([
                    ("kind".to_string(), "nfs".to_string()),
                    ("server".to_string(), "127.0.0.1".to_string()),
                    ("share".to_string(), "/export".to_string()),
                ]),
                volume_capabilities: vec![mount_cap(
                    berth::csi::v1::volume_capability::access_mode::Mode::MultiNodeMultiWriter,
                )],
                ..Default::default()
            }))
            .await
    });
    let t0 = Instant::now();
    while !pidfile.exists() {
        assert!(t0.elapsed() < Duration::from_secs(20), "mount never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mount_pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    if kill9 {
        b.child.kill().unwrap();
        b.child.wait().unwrap();
        let _ = call.await;
    } else {
        let t0 = Instant::now();
        let st = sigterm(&mut b);
        let took = t0.elapsed();
        let _ = call.await;
        assert!(took < Duration::from_secs(5), "exit took {took:?}: {st:?}");
        let log_text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(log_text.contains("shutdown-timeout"), "{log_text}");
    }
    // The stuck mount went with it (gone, or a zombie waiting for init).
    let alive = || {
        std::fs::read_to_string(format!("/proc/{mount_pid}/stat"))
            .ok()
            .and_then(|st| st.rsplit(") ").next().map(|r| !r.starts_with('Z')))
            .unwrap_or(false)
    };
    let t0 = Instant::now();
    while alive() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "mount {mount_pid} still running"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A clean exit removes the socket; a killed berth's is replaced.
    assert_eq!(sock.exists(), kill9);
    // The next start serves.
    b.child = spawn();
    wait_accepting(&mut b);
    sigterm(&mut b);
}

/// Waits until the berth just spawned accepts on its socket.
fn wait_accepting(b: &mut Berth) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&b.sock).is_err() {
        assert!(Instant::now() < deadline, "berth did not start");
        assert!(
            b.child.try_wait().unwrap().is_none(),
            "berth exited: {}",
            std::fs::read_to_string(&b.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `state check` beside a serving berth under create/delete churn: a
/// create moves its directory into the root after its Ready record, a
/// delete moves it to `.trash` before it removes the record, so one read
/// of the journal and one scan of the roots saw volumes whose directory
/// was "missing" and directories that had "no record" (exit 1 in most
/// runs, none of it real). Every check exits 0; a volume directory
/// removed by hand while berth serves is still reported, every time, as
/// the one error.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn state_check_beside_a_serving_berth_under_churn_reports_only_real_damage() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let d = tempfile::tempdir().unwrap();
    let mut b = start(d.path(), &["--kinds", "local"]);
    let c = connect(&b.sock.display().to_string()).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let churn: Vec<_> = (0..8)
        .map(|w| {
            let (mut c, stop) = (c.clone(), stop.clone());
            tokio::spawn(async move {
                let mut mine = std::collections::VecDeque::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let req = create_req(&format!("churn-{w}-{i}"), 1 << 20);
                    let id = created_id(c.controller.create_volume(Request::new(req)).await);
                    mine.push_back(id);
                    if mine.len() > 5 {
                        let del = csi::DeleteVolumeRequest {
                            volume_id: mine.pop_front().unwrap(),
                            ..Default::default()
                        };
                        c.controller.delete_volume(Request::new(del)).await.unwrap();
                    }
                }
            })
        })
        .collect();
    let dir = d.path().to_path_buf();
    let sock = b.sock.clone();
    let check = move || {
        let out = run_to_exit(&berth_args(
            &dir,
            &sock,
            &["--kinds", "local", "state", "check"],
        ));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.code(), text)
    };
    let mut failed = Vec::new();
    let t0 = Instant::now();
    let mut runs = 0;
    while t0.elapsed() < Duration::from_secs(6) || runs < 10 {
        runs += 1;
        let check = check.clone();
        let (code, text) = tokio::task::spawn_blocking(check).await.unwrap();
        if code != Some(0) {
            failed.push(text);
        }
    }
    // Real damage, churn going on: a volume's directory removed by hand.
    let mut c2 = c.clone();
    let lost = created_id(
        c2.controller
            .create_volume(Request::new(create_req("lost-by-hand", 1 << 20)))
            .await,
    );
    std::fs::remove_dir_all(d.path().join("local").join(&lost)).unwrap();
    let mut damage = Vec::new();
    for _ in 0..5 {
        let check = check.clone();
        damage.push(tokio::task::spawn_blocking(check).await.unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    for t in churn {
        t.await.unwrap();
    }
    assert!(sigterm(&mut b).success());
    assert!(
        failed.is_empty(),
        "{} of {runs} checks beside a serving berth under churn failed; first:\n{}",
        failed.len(),
        failed[0]
    );
    for (code, text) in damage {
        assert_eq!(code, Some(1), "{text}");
        assert!(
            text.contains(&format!(
                "error: volume {lost} (lost-by-hand): its directory"
            )) && text.contains("is missing")
                && text.contains("1 errors,")
                && text.contains("beside a serving berth: a finding is reported only when each of"),
            "{text}"
        );
    }
}

/// Every path under `dir`, for comparing a directory before and after.
fn paths_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}

/// An operator who names a state directory that holds no berth state (a
/// typo in `--data-dir`, a missing one, or `--state-dir` set to the data
/// directory itself) is told so by every state tool, never given a clean
/// bill or an empty backup with exit code 0, and no tool writes a lock
/// file or a journal into that directory (before, `check` said "0
/// errors, 0 warnings", `export` printed no records with exit code 0,
/// and `release` and `repair` left `.berth.lock` and `journal/log-0.jsonl`
/// in it, after which check and export read it as an empty state).
#[tokio::test]
async fn state_tools_refuse_a_directory_that_holds_no_state() {
    let d = tempfile::tempdir().unwrap();
    // A berth that served and has a volume: the real state is there.
    let data = d.path().join("berth");
    std::fs::create_dir(&data).unwrap();
    let sock = data.join("csi.sock");
    let mut b = start(&data, &[]);
    let ids = create_n(&sock, 1).await;
    assert!(sigterm(&mut b).success());
    drop(b);
    let other = d.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("keep"), b"not berth's").unwrap();
    let before = paths_under(d.path());
    let typo = d.path().join("bert");
    for (data_dir, state_dir) in [
        (&typo, None),          // a typo in --data-dir: missing
        (&other, Some(&other)), // a directory that is not berth's state
        (&data, Some(&data)),   // the data directory, not its state/
    ] {
        for tool in [
            &["check"][..],
            &["export"],
            &["repair"],
            &["release", "held-x"],
        ] {
            let mut args = Vec::new();
            if let Some(s) = state_dir {
                args.extend(["--state-dir", s.to_str().unwrap()]);
            }
            args.push("state");
            args.extend_from_slice(tool);
            let out = run_to_exit(&berth_args(data_dir, &sock, &args));
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success(),
                "{args:?} succeeded: {stdout}{stderr}"
            );
            assert!(
                stderr.contains("holds no berth state"),
                "{args:?}: {stdout}{stderr}"
            );
            assert_eq!(paths_under(d.path()), before, "{args:?}");
        }
    }
    // The real state directory is still read as before.
    let out = run_to_exit(&berth_args(&data, &sock, &["state", "export"]));
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(&ids[0]));
}

/// A request that does not decode (a string field whose bytes are not
/// UTF-8, a field of the wrong wire type) is INVALID_ARGUMENT, as the CSI
/// spec answers a bad argument, and not INTERNAL (tonic-prost's answer to
/// a parse failure, which says the plugin failed). The error names the
/// field, never the bytes; berth goes on serving.
#[tokio::test]
async fn a_request_that_does_not_decode_is_invalid_argument() {
    /// Field 1 (every request's volume_id here) as raw bytes.
    #[derive(Clone, PartialEq, prost::Message)]
    struct RawString {
        #[prost(bytes = "vec", tag = "1")]
        field: Vec<u8>,
    }
    /// Field 1 as a varint: the wrong wire type for a string.
    #[derive(Clone, PartialEq, prost::Message)]
    struct WrongType {
        #[prost(uint64, tag = "1")]
        field: u64,
    }
    let d = tempfile::tempdir().unwrap();
    let b = start(d.path(), &[]);
    let sock = b.sock.clone();
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let sock = sock.clone();
            async move {
                let s = tokio::net::UnixStream::connect(sock).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    let not_utf8 = vec![b'v', 0xff, 0xfe, b'!'];
    for method in [
        "/csi.v1.Controller/DeleteVolume",
        "/csi.v1.Controller/ControllerGetVolume",
        "/csi.v1.Node/NodeGetVolumeStats",
        "/csi.v1.Node/NodeUnpublishVolume",
    ] {
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
        grpc.ready().await.unwrap();
        let codec = tonic_prost::ProstCodec::<RawString, ()>::default();
        let e = grpc
            .unary(
                Request::new(RawString {
                    field: not_utf8.clone(),
                }),
                path.clone(),
                codec,
            )
            .await
            .expect_err(method);
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{method}: {e:?}");
        assert!(e.message().contains("volume_id"), "{method}: {e:?}");
        assert!(!e.message().contains('\u{fffd}'), "{method}: {e:?}");
        grpc.ready().await.unwrap();
        let codec = tonic_prost::ProstCodec::<WrongType, ()>::default();
        let e = grpc
            .unary(Request::new(WrongType { field: 7 }), path, codec)
            .await
            .expect_err(method);
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{method}: {e:?}");
    }
    let mut c = connect(&b.sock.display().to_string()).await.unwrap();
    c.identity
        .probe(Request::new(Default::default()))
        .await
        .unwrap();
}

/// A request body cut short (its gRPC message ends before the length its
/// prefix gives, or within the prefix), or one that ended with no message
/// at all, is INVALID_ARGUMENT, as a message that does not decode is: the
/// caller sent no whole request. Before, tonic answered both INTERNAL
/// ("Unexpected EOF decoding stream.", "Missing request message.") before
/// berth's code saw the call, which says the plugin failed. A whole
/// request still goes through on the same connection.
#[tokio::test]
async fn a_request_cut_short_or_missing_is_invalid_argument() {
    use http_body_util::BodyExt;
    let d = tempfile::tempdir().unwrap();
    let b = start(d.path(), &[]);
    let io = hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(&b.sock).await.unwrap());
    let (mut send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(io)
            .await
            .unwrap();
    tokio::spawn(conn);
    // DeleteVolumeRequest { volume_id: "vol-1" }: field 1, 5 bytes.
    let whole: &[u8] = &[0, 0, 0, 0, 7, 0x0a, 5, b'v', b'o', b'l', b'-', b'1'];
    type Send = hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>;
    /// The call's grpc-status and grpc-message.
    async fn call(send: &mut Send, method: &str, body: &[u8]) -> (String, String) {
        let req = hyper::Request::post(format!("http://localhost{method}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(http_body_util::Full::new(bytes::Bytes::copy_from_slice(
                body,
            )))
            .unwrap();
        send.ready().await.unwrap();
        let resp = send.send_request(req).await.unwrap();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap();
        let trailers = body.trailers().cloned().unwrap_or_default();
        let field = |name: &str| {
            trailers
                .get(name)
                .or_else(|| headers.get(name))
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default()
        };
        (field("grpc-status"), field("grpc-message"))
    }
    let invalid = (tonic::Code::InvalidArgument as i32).to_string();
    for method in [
        "/csi.v1.Controller/DeleteVolume",
        "/csi.v1.Node/NodeGetInfo",
        "/csi.v1.Identity/Probe",
    ] {
        for (what, body) in [
            ("its message cut short", &whole[..9]),
            ("its prefix cut short", &whole[..3]),
            ("no message", &whole[..0]),
        ] {
            let (code, msg) = call(&mut send, method, body).await;
            assert_eq!(code, invalid, "{method}, {what}: {code} {msg}");
        }
    }
    // A whole message whose protobuf is cut short inside (a string field
    // of 5 bytes with 2 sent): berth's codec, INVALID_ARGUMENT already.
    let (code, msg) = call(
        &mut send,
        "/csi.v1.Controller/DeleteVolume",
        &[0, 0, 0, 0, 4, 0x0a, 5, b'v', b'o'],
    )
    .await;
    assert_eq!(code, invalid, "{code} {msg}");
    // A whole request on the same connection is answered.
    let (code, msg) = call(&mut send, "/csi.v1.Identity/Probe", &[0; 5]).await;
    assert_eq!(code, "0", "{msg}");
}

/// A second berth whose directories lie inside another berth's (its local
/// root, or one of its volumes: `--data-dir <first's local root>/.trash/b`)
/// refuses to start and makes nothing; and a berth whose local root holds
/// a serving berth's directories in its work directories (`.creating`,
/// `.trash`, `.snapshots`, whose contents start-up removes) refuses too.
/// Before, each berth compared its directories only with each other: the
/// second one started, and the first one's next start removed the second
/// one's state, volumes and socket while it served.
#[tokio::test]
async fn a_berth_inside_another_berths_directories_refuses_to_start() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a");
    std::fs::create_dir(&a).unwrap();
    let first = start(&a, &[]);
    let ids = create_n(&first.sock, 1).await;
    let vol = a.join("local").join(&ids[0]);
    std::fs::write(vol.join("data"), "kept").unwrap();
    for inner in [a.join("local/.trash/b"), vol.join("b"), a.join("state/b")] {
        let sock = d.path().join("b.sock");
        let out = run_to_exit(&berth_args(&inner, &sock, &[]));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{}: {err}", inner.display());
        assert!(
            err.contains("lies inside") && err.contains(&format!("pid {}", first.child.id())),
            "{}: {err}",
            inner.display()
        );
        assert!(!inner.exists(), "{} was made", inner.display());
    }
    assert_eq!(std::fs::read_to_string(vol.join("data")).unwrap(), "kept");
    assert_eq!(listed(&first.sock).await, ids);
    drop(first);

    // The other order: the inner berth serves first, where the outer one's
    // local root will be; the outer one refuses, and removes nothing.
    let c = d.path().join("c");
    let inner_dir = c.join("local/.creating/d");
    std::fs::create_dir_all(&inner_dir).unwrap();
    let inner = start(&inner_dir, &[]);
    let inner_ids = create_n(&inner.sock, 1).await;
    let out = run_to_exit(&berth_args(&c, &d.path().join("c.sock"), &[]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(".creating") && err.contains(&format!("pid {}", inner.child.id())),
        "{err}"
    );
    for kept in [
        inner_dir.join("state/journal"),
        inner_dir.join("local").join(&inner_ids[0]),
        inner.sock.clone(),
    ] {
        assert!(kept.exists(), "{} was removed", kept.display());
    }
    assert!(
        !c.join("state").exists(),
        "the refused berth made its state"
    );
    assert_eq!(listed(&inner.sock).await, inner_ids);
}

/// A `--socket-group` that does not exist stops berth before the driver
/// touches anything: no state directory, no root, no socket left behind
/// (before, the group was looked up only when binding, after the state
/// and the roots were made and locked, and the socket file stayed).
#[test]
fn a_socket_group_that_does_not_exist_stops_berth_having_made_nothing() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    let sock = d.path().join("csi.sock");
    let out = run_to_exit(&berth_args(
        &data,
        &sock,
        &["--socket-group", "no-such-group-berth"],
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("--socket-group") && err.contains("no-such-group-berth"),
        "{err}"
    );
    assert_eq!(paths_under(d.path()), Vec::<PathBuf>::new());
}

/// A state directory or root that cannot be used (a regular file, or
/// under one; a read-only filesystem likewise, shown by hand in a private
/// mount namespace) stops berth before anything is made. Before, the
/// state directory was made and locked first, and the roots one by one:
/// a bad `--local-root` or `--block-root` left `<data-dir>/state` (and
/// the local root) behind, and a socket that could not be bound left the
/// state's journal and the roots.
#[test]
fn a_directory_berth_cannot_use_stops_it_having_made_nothing() {
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("file");
    std::fs::write(&file, b"not a directory").unwrap();
    let data = d.path().join("data");
    let sock = d.path().join("csi.sock");
    let under = file.join("b");
    for (flag, extra) in [
        ("--local-root", vec!["--local-root", file.to_str().unwrap()]),
        ("--state-dir", vec!["--state-dir", file.to_str().unwrap()]),
        (
            "--block-root",
            vec![
                "--kinds",
                "local,block",
                "--block-root",
                under.to_str().unwrap(),
            ],
        ),
    ] {
        let out = run_to_exit(&berth_args(&data, &sock, &extra));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?}: {err}");
        assert!(
            err.contains(flag) && err.contains("is not a directory"),
            "{extra:?}: {err}"
        );
        assert_eq!(paths_under(d.path()), vec![file.clone()], "{extra:?}");
    }
}

/// A `--metrics-address` in use stops berth before the driver touches
/// anything (before, it was bound once the state directory and the roots
/// were made, and they stayed behind).
#[test]
fn a_metrics_address_in_use_stops_berth_having_made_nothing() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    let out = run_to_exit(&berth_args(
        &data,
        &d.path().join("csi.sock"),
        &["--metrics-address", &addr],
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("--metrics-address") && err.contains("in use"),
        "{err}"
    );
    assert_eq!(paths_under(d.path()), Vec::<PathBuf>::new());
}

/// A `--log-level` typo (`infoo`) or an empty one stops berth with a
/// message naming it, having made nothing: the filter syntax took a bare
/// word for a target's name, and berth served without a line of log,
/// errors included.
#[test]
fn a_log_level_that_would_silence_berth_stops_it() {
    for level in ["infoo", ""] {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("data");
        let out = run_to_exit(&berth_args(
            &data,
            &d.path().join("csi.sock"),
            &["--log-level", level],
        ));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{level:?}: {err}");
        assert!(err.contains("--log-level"), "{level:?}: {err}");
        assert_eq!(paths_under(d.path()), Vec::<PathBuf>::new(), "{level:?}");
    }
}

/// Removes `dir` with `rm -rf` (fts: no recursion), whatever it holds, when
/// dropped: a test's data directory whose tree std's `remove_dir_all`
/// (tempfile's drop) could not remove without overflowing the stack.
struct RmRf(PathBuf);

impl Drop for RmRf {
    fn drop(&mut self) {
        let _ = Command::new("rm").arg("-rf").arg(&self.0).status();
    }
}

/// Makes a chain of `depth` directories named `d` inside `dir`, one level
/// relative to the one above (as a tenant can, without any path length
/// limit).
fn deep_tree(dir: &Path, depth: usize) {
    use nix::fcntl::{open, openat, OFlag};
    use nix::sys::stat::{mkdirat, Mode};
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let mut fd = open(dir, flags, Mode::empty()).unwrap();
    for _ in 0..depth {
        mkdirat(&fd, "d", Mode::from_bits_truncate(0o755)).unwrap();
        fd = openat(&fd, "d", flags, Mode::empty()).unwrap();
    }
    std::fs::write(
        format!("/proc/self/fd/{}/bottom", {
            use std::os::fd::AsRawFd;
            fd.as_raw_fd()
        }),
        b"x",
    )
    .unwrap();
}

/// A tenant can make a directory tree as deep as they like in a local
/// volume. Removing it (DeleteVolume empties the trash on the background
/// thread; start-up empties what is left; a snapshot's copy, a failed
/// restore's) must not take a stack frame per level: std's
/// `remove_dir_all` did, and at some ten thousand levels it overflowed the
/// thread's stack, which aborted berth, and every start after it aborted
/// the same way while emptying the trash: one tenant took the node's
/// plugin down for good. Now the tree goes, berth stays up, and a restart
/// finds nothing left.
#[tokio::test]
async fn a_local_volume_holding_a_very_deep_tree_is_deleted_and_berth_stays_up() {
    let d = tempfile::tempdir().unwrap();
    let _rm = RmRf(d.path().to_path_buf());
    let b = start(d.path(), &[]);
    let mut c = connect(&b.sock.display().to_string()).await.unwrap();
    let id = c
        .controller
        .create_volume(Request::new(create_req("deep", 1 << 20)))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    // std's remove_dir_all overflowed a 2 MiB stack between 8,000 and
    // 14,000 levels.
    deep_tree(&d.path().join("local").join(&id), 16_000);
    c.controller
        .delete_volume(Request::new(csi::DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
    let trash = d.path().join("local/.trash");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let alive = c.identity.probe(Request::new(csi::ProbeRequest {})).await;
        assert!(
            alive.is_ok(),
            "berth went down while it removed the tree: {alive:?}\n{}",
            std::fs::read_to_string(&b.log).unwrap_or_default()
        );
        if std::fs::read_dir(&trash).map_or(true, |mut e| e.next().is_none()) {
            break;
        }
        assert!(Instant::now() < deadline, "the trash was not emptied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(b);
    let b = start(d.path(), &[]);
    let mut c = connect(&b.sock.display().to_string()).await.unwrap();
    c.identity
        .probe(Request::new(csi::ProbeRequest {}))
        .await
        .unwrap();
    assert!(!d.path().join("local").join(&id).exists());
}

/// SIGTERM waits for the answers of the calls it waited for, not only for
/// their work: a call whose handler is done but whose answer is still on
/// its way out (a client reading slowly: HTTP/2 flow control holds the
/// rest of a large answer until the client opens its window) gets the
/// whole answer. Before 2026-12-07 berth exited as soon as no work was in
/// flight, and the client got a broken connection instead of the answer
/// of a call berth had carried out.
#[tokio::test]
async fn sigterm_delivers_the_answer_of_a_finished_call() {
    use http_body_util::BodyExt;
    use prost::Message;
    let d = tempfile::tempdir().unwrap();
    let mut b = start(d.path(), &[]);
    let mut ids = create_n(&b.sock, 20).await;
    ids.sort();
    // A client whose stream window (1 KiB) holds a fraction of the answer:
    // the rest is sent only as it reads.
    let io = hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(&b.sock).await.unwrap());
    let (mut send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(1024)
            .handshake(io)
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::post("http://localhost/csi.v1.Controller/ListVolumes")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(&[
            0, 0, 0, 0, 0,
        ])))
        .unwrap();
    // Its headers come when the handler is done: nothing is in flight.
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let st = sigterm_nowait(&mut b);
    // Berth exits within its grace; the client reads only now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let body = resp.into_body().collect().await;
    let st = st.finish(&mut b);
    assert!(st.success(), "{st:?}");
    let body = body.expect("the answer was cut: berth exited before sending it");
    let status = body
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .map(|v| v.to_str().unwrap().to_string());
    assert_eq!(status.as_deref(), Some("0"));
    let bytes = body.to_bytes();
    assert!(bytes.len() > 1024, "{} bytes", bytes.len());
    let msg = csi::ListVolumesResponse::decode(&bytes[5..]).unwrap();
    let mut got: Vec<String> = msg
        .entries
        .into_iter()
        .map(|e| e.volume.unwrap().volume_id)
        .collect();
    got.sort();
    assert_eq!(got, ids);
}

/// SIGTERM sent; `finish` waits for the exit as `sigterm` does.
struct Terminating(Instant);

fn sigterm_nowait(b: &mut Berth) -> Terminating {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(b.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    Terminating(Instant::now())
}

impl Terminating {
    fn finish(self, b: &mut Berth) -> std::process::ExitStatus {
        loop {
            if let Some(st) = b.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                self.0.elapsed() < Duration::from_secs(15),
                "berth did not exit on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Fills `dir` with `n` names of empty files, in subdirectories of 10,000
/// each: one file in each, the rest hard links to it (quicker to make than
/// files; as many entries to remove).
fn many_files(dir: &Path, n: usize) {
    let mut first = PathBuf::new();
    for i in 0..n {
        let sub = dir.join(format!("d{}", i / 10_000));
        let name = sub.join(format!("f{i}"));
        if i % 10_000 == 0 {
            std::fs::create_dir_all(&sub).unwrap();
            std::fs::File::create(&name).unwrap();
            first = name;
        } else {
            std::fs::hard_link(&first, &name).unwrap();
        }
    }
}

/// Whether the local root's trash holds anything.
fn trash_holds_anything(dir: &Path) -> bool {
    std::fs::read_dir(dir.join("local/.trash")).is_ok_and(|mut e| e.next().is_some())
}

/// A deleted volume's directory left in the trash (a crash while it was
/// being emptied, or a removal that failed) is emptied on the background
/// thread once the socket is up: berth answers Probe, NodeGetInfo and
/// CreateVolume while the trash still holds it (a tenant's millions of
/// files took minutes to remove, and every node RPC of every tenant, and
/// kubelet's registration of the plugin, waited for them). A kill while
/// it is being emptied leaves the rest in the trash, and the next start
/// empties it the same way. Before, start-up removed it before binding the
/// socket: the first Probe was answered with the trash empty.
#[tokio::test]
async fn start_up_serves_before_the_trash_it_found_is_emptied() {
    let d = tempfile::tempdir().unwrap();
    let mut b = start(d.path(), &[]);
    assert!(sigterm(&mut b).success());
    // A directory of a volume whose record is gone, left in the trash.
    let entry = d
        .path()
        .join("local/.trash")
        .join(format!("local-{:032x}-1", 7));
    many_files(&entry, 100_000);
    let b = start_within(d.path(), NODE, &[], Duration::from_secs(600));
    let mut c = connect(&b.sock.display().to_string()).await.unwrap();
    let p = c
        .identity
        .probe(Request::new(csi::ProbeRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.ready, Some(true));
    let info = c
        .node
        .node_get_info(Request::new(csi::NodeGetInfoRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, NODE);
    c.controller
        .create_volume(Request::new(create_req("new", 1 << 20)))
        .await
        .unwrap();
    assert!(
        entry.exists(),
        "berth answered only once the trash was empty: start-up removed it before serving"
    );
    // Killed while the trash is being emptied: the rest is left there.
    drop(c);
    drop(b);
    assert!(
        entry.exists(),
        "the kill came after the whole entry was removed"
    );
    let b = start_within(d.path(), NODE, &[], Duration::from_secs(600));
    let mut c = connect(&b.sock.display().to_string()).await.unwrap();
    c.identity
        .probe(Request::new(csi::ProbeRequest {}))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while trash_holds_anything(d.path()) {
        assert!(
            Instant::now() < deadline,
            "the trash was not emptied\n{}",
            std::fs::read_to_string(&b.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(listed(&b.sock).await.len(), 1);
}

/// What a crash leaves of creates and copies that never became Ready (an
/// unfinished create's or restore's directory under `.creating/`, a
/// snapshot's copy `.snapshots/.partial-<id>`, and one an older version
/// named `.partial-.partial-<id>`) is moved into the trash at start-up
/// and removed on the background thread once the socket is up: berth
/// answers Probe, NodeGetInfo and CreateVolume while 100,000 entries of
/// each are still on the disk, then removes them all. Before, start-up
/// removed them in place before it bound the socket: the first Probe was
/// answered with them gone.
#[tokio::test]
async fn start_up_serves_before_the_unfinished_copies_it_found_are_removed() {
    let d = tempfile::tempdir().unwrap();
    let mut b = start(d.path(), &[]);
    assert!(sigterm(&mut b).success());
    let local = d.path().join("local");
    let left = [
        local.join(".creating").join(format!("local-{:032x}", 7)),
        local
            .join(".creating")
            .join(format!(".partial-local-{:032x}", 8)),
        local
            .join(".snapshots")
            .join(format!(".partial-local-snap-{:032x}", 9)),
        local
            .join(".snapshots")
            .join(format!(".partial-.partial-local-snap-{:032x}", 10)),
    ];
    for l in &left {
        many_files(l, 100_000);
    }
    let b = start_within(d.path(), NODE, &[], Duration::from_secs(600));
    let mut c = connect(&b.sock.display().to_string()).await.unwrap();
    let p = c
        .identity
        .probe(Request::new(csi::ProbeRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.ready, Some(true));
    let info = c
        .node
        .node_get_info(Request::new(csi::NodeGetInfoRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, NODE);
    c.controller
        .create_volume(Request::new(create_req("new", 1 << 20)))
        .await
        .unwrap();
    assert!(
        trash_holds_anything(d.path()),
        "berth answered only once what start-up found was removed: it removed them before serving"
    );
    assert!(
        left.iter().all(|l| !l.exists()),
        "left in place: moved into the trash at start-up"
    );
    let deadline = Instant::now() + Duration::from_secs(300);
    while trash_holds_anything(d.path()) {
        assert!(
            Instant::now() < deadline,
            "the trash was not emptied\n{}",
            std::fs::read_to_string(&b.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(listed(&b.sock).await.len(), 1);
}

/// Berth raises its soft limit of open files to the hard one at start
/// (as Go programs do): started with 256 of 4,096 (a shell's or an older
/// container runtime's soft limit is often 1,024), it had 256, and 300
/// idle connections to its socket left a new client's Probe unanswered.
/// The commands it runs get the limit it was given (unit test
/// `os::limits::tests`).
#[test]
fn the_soft_limit_of_open_files_is_raised_to_the_hard_one() {
    let d = tempfile::tempdir().unwrap();
    let b = start_with_open_files(d.path(), 256, 4096);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", b.child.id())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(&fields[3..5], ["4096", "4096"], "{line}");
}

/// `state check` (which reads the journal as start-up does) on a log of
/// 200 MiB without a newline (padded by hand): it is damage, found with
/// one copy of the log in memory. Before, the look at whether its last
/// line was a whole change that only lacked its newline copied that line
/// twice: the peak was twice the log (measured with a 300 MiB padding,
/// `state check` 630 MB and 4.2 s, start-up the same; after, 323 MB and
/// 1.7 s).
#[test]
fn a_padded_log_is_read_with_one_copy_in_memory() {
    const LEN: u64 = 200 << 20;
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("state/journal");
    std::fs::create_dir_all(&journal).unwrap();
    // sparse: no disk space taken
    std::fs::File::create(journal.join("log-0.jsonl"))
        .unwrap()
        .set_len(LEN)
        .unwrap();
    // reaped by the wait4 below, which gives its own peak memory
    #[allow(clippy::zombie_processes)]
    let child = Command::new(BIN)
        .arg("--data-dir")
        .arg(dir.path())
        .args(["state", "check"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn berth");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: wait4 on our own child, with valid pointers; the rusage it
    // fills is this child's alone (tests run in parallel).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::wait4(pid, &mut status, 0, &mut usage) }, pid);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 1);
    let peak = usage.ru_maxrss as u64 * 1024;
    assert!(
        peak < LEN + LEN / 2,
        "peak memory {} MiB for a log of {} MiB",
        peak >> 20,
        LEN >> 20
    );
}

/// A berth serving local volumes from `dir` (socket `csi.sock`), started
/// with a soft and hard limit of open files of `soft` and `hard`, once it
/// accepts.
fn start_with_open_files(dir: &Path, soft: u64, hard: u64) -> Berth {
    use std::os::unix::process::CommandExt;
    let sock = dir.join("csi.sock");
    let mut cmd = Command::new(BIN);
    cmd.args(berth_args(dir, &sock, &["--kinds", "local"]))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setrlimit is async-signal-safe and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("spawn berth");
    let mut b = Berth {
        child,
        sock,
        log: dir.join("unused.log"),
    };
    wait_accepting(&mut b);
    b
}
