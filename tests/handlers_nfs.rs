//! NFS volumes against the recording fake OS: parameters, ids, the mount
//! and umount commands that reach the OS, onDelete, timeouts. The fake
//! emulates `mount -t nfs` and `umount` (an NFS entry appears in its mount
//! table); the share's "working mount" is a plain directory, so the
//! controller's directory work is real. No root or NFS needed.
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth::csi::v1 as csi;
use berth::csi::v1::controller_server::Controller;
use berth::csi::v1::identity_server::Identity;
use berth::csi::v1::node_server::Node;
use berth::csi::v1::volume_capability::access_mode::Mode;
use berth::os::fake::{Call, FakeOs};
use berth::os::{CmdOutput, Os, OsError};
use clap::Parser;
use common::*;
use tonic::{Code, Request};

const SERVER: &str = "127.0.0.1";
const SHARE: &str = "/export";

fn nfs(extra: &[&str]) -> Harness {
    let mut args = vec!["--kinds", "nfs"];
    if !extra.contains(&"--nfs-timeout") {
        args.extend(["--nfs-timeout", "2"]);
    }
    args.extend_from_slice(extra);
    let h = fake(&args);
    h.fake().emulate_nfs_mounts();
    h
}

/// The same data dir and fake OS, a new driver (a restart), with `extra`.
fn restart(h: Harness, extra: &[&str]) -> Harness {
    let Harness {
        dir,
        driver,
        fake,
        ctl,
        node,
        ident,
    } = h;
    drop((ctl, node, ident, driver));
    let f: Arc<FakeOs> = fake.expect("fake");
    build(dir, Os::on_fake(&f), Some(f), extra)
}

/// A restart after a crash: the old driver cleans nothing up.
fn restart_after_crash(h: Harness, extra: &[&str]) -> Harness {
    let Harness {
        dir,
        driver,
        fake,
        ctl,
        node,
        ident,
    } = h;
    // The kernel releases a dead process's directory locks.
    driver.release_dir_locks();
    std::mem::forget((driver, ctl, node, ident));
    let f: Arc<FakeOs> = fake.expect("fake");
    build(dir, Os::on_fake(&f), Some(f), extra)
}

fn params(extra: &[(&str, &str)]) -> HashMap<String, String> {
    let mut p: HashMap<String, String> = HashMap::from([
        ("kind".into(), "nfs".into()),
        ("server".into(), SERVER.into()),
        ("share".into(), SHARE.into()),
    ]);
    for (k, v) in extra {
        p.insert(k.to_string(), v.to_string());
    }
    p
}

fn req(name: &str, extra: &[(&str, &str)]) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        parameters: params(extra),
        ..create_req(name, 5 << 20)
    }
}

async fn create(h: &Harness, name: &str, extra: &[(&str, &str)]) -> csi::Volume {
    h.ctl
        .create_volume(Request::new(req(name, extra)))
        .await
        .expect("create")
        .into_inner()
        .volume
        .expect("volume")
}

/// CreateVolume of `r`, which must fail: its status.
async fn create_err(h: &Harness, r: csi::CreateVolumeRequest) -> tonic::Status {
    h.ctl
        .create_volume(Request::new(r))
        .await
        .expect_err("CreateVolume should fail")
}

fn runs(f: &FakeOs) -> Vec<(String, Vec<String>)> {
    f.calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::Run { program, args } => Some((program, args)),
            _ => None,
        })
        .collect()
}

fn v(s: &[&str]) -> Vec<String> {
    s.iter().map(|x| x.to_string()).collect()
}

/// The controller's working mount of the share (from the fake's table).
fn share_root(h: &Harness) -> PathBuf {
    h.fake()
        .table()
        .into_iter()
        .find(|m| m.source == format!("{SERVER}:{SHARE}"))
        .expect("share mounted")
        .mount_point
}

fn nfs_publish(
    id: &str,
    target: &Path,
    readonly: bool,
    flags: &[&str],
) -> csi::NodePublishVolumeRequest {
    csi::NodePublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.display().to_string(),
        volume_capability: Some(mount_cap_flags(Mode::MultiNodeMultiWriter, flags)),
        readonly,
        ..Default::default()
    }
}

fn unpublish_req(id: &str, target: &Path) -> csi::NodeUnpublishVolumeRequest {
    csi::NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.display().to_string(),
    }
}

fn timeout(program: &str) -> Result<CmdOutput, OsError> {
    Err(OsError::Timeout {
        program: program.into(),
        secs: 2,
    })
}

fn exit(code: i32, stderr: &str) -> Result<CmdOutput, OsError> {
    Ok(CmdOutput {
        code: Some(code),
        stdout: String::new(),
        stderr: stderr.into(),
    })
}

// ------------------------------------------------------------ capabilities

#[tokio::test]
async fn nfs_only_instance_advertises_no_attach_staging_capacity_or_topology() {
    let h = nfs(&[]);
    use csi::controller_service_capability::rpc::Type as C;
    let types = controller_rpcs(&h).await;
    assert!(types.contains(&(C::CreateDeleteVolume as i32)));
    for t in [C::PublishUnpublishVolume, C::GetCapacity] {
        assert!(!types.contains(&(t as i32)), "{t:?}");
    }
    use csi::node_service_capability::rpc::Type as N;
    assert!(!node_rpcs(&h)
        .await
        .contains(&(N::StageUnstageVolume as i32)));
    let info = h
        .node
        .node_get_info(Request::new(Default::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(info.accessible_topology.is_none());
    let plugin = h
        .ident
        .get_plugin_capabilities(Request::new(Default::default()))
        .await
        .unwrap()
        .into_inner();
    use csi::plugin_capability::service::Type as P;
    assert!(!plugin.capabilities.iter().any(|c| matches!(&c.r#type,
        Some(csi::plugin_capability::Type::Service(s)) if s.r#type == P::VolumeAccessibilityConstraints as i32)));
    let p = h.ident.probe(Request::new(Default::default())).await;
    assert_eq!(code(p), Code::Ok);
}

// ------------------------------------------------------------ CreateVolume

#[tokio::test]
async fn create_mounts_the_share_once_and_makes_the_subdirectory() {
    let h = nfs(&[]);
    let a = create(&h, "pvc-1", &[("mountPermissions", "0770")]).await;
    assert_eq!(a.volume_id, "nfs#d#127.0.0.1#/export#pvc-1");
    assert_eq!(a.capacity_bytes, 5 << 20, "the requested size is recorded");
    assert!(a.accessible_topology.is_empty());
    assert_eq!(a.volume_context["server"], SERVER);
    assert_eq!(a.volume_context["share"], SHARE);
    assert_eq!(a.volume_context["subDir"], "pvc-1");
    let r = runs(h.fake());
    assert_eq!(r.len(), 1, "{r:?}");
    let root = share_root(&h);
    assert!(root.starts_with(h.path("state/nfs")), "{}", root.display());
    assert_eq!(
        r[0],
        (
            "mount.nfs".to_string(),
            v(&[
                "127.0.0.1:/export",
                &root.display().to_string(),
                "-n",
                "-o",
                "nfsvers=4.1"
            ])
        )
    );
    use std::os::unix::fs::PermissionsExt;
    let m = std::fs::metadata(root.join("pvc-1")).unwrap();
    assert!(m.is_dir());
    assert_eq!(m.permissions().mode() & 0o7777, 0o770);
    // Idempotent: the same answer, no second mount; a second volume reuses
    // the working mount.
    let again = create(&h, "pvc-1", &[("mountPermissions", "0770")]).await;
    assert_eq!(again, a);
    create(&h, "pvc-2", &[]).await;
    assert_eq!(runs(h.fake()).len(), 1);
    assert!(root.join("pvc-2").is_dir());
    // After a crash and restart the working mount is found in mountinfo.
    let h = restart_after_crash(h, &["--kinds", "nfs"]);
    h.fake().clear_calls();
    create(&h, "pvc-3", &[]).await;
    assert!(runs(h.fake()).is_empty());
    assert!(root.join("pvc-3").is_dir());
}

#[tokio::test]
async fn create_uses_subdir_templates_and_the_mount_options() {
    let h = nfs(&[]);
    let mut r = req(
        "pv-1",
        &[
            ("subDir", "${pvc.metadata.namespace}/${pvc.metadata.name}"),
            ("csi.storage.k8s.io/pvc/name", "data"),
            ("csi.storage.k8s.io/pvc/namespace", "team-a"),
            ("csi.storage.k8s.io/pv/name", "pv-1"),
            ("onDelete", "archive"),
        ],
    );
    r.volume_capabilities = vec![mount_cap_flags(
        Mode::MultiNodeMultiWriter,
        &["nfsvers=3,nolock", "hard"],
    )];
    let vol = h
        .ctl
        .create_volume(Request::new(r))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(vol.volume_id, "nfs#a#127.0.0.1#/export#team-a/data");
    let r = runs(h.fake());
    assert_eq!(r[0].0, "mount.nfs");
    assert_eq!(r[0].1[2..], v(&["-n", "-o", "nfsvers=3,nolock,hard"]));
    assert!(share_root(&h).join("team-a/data").is_dir());
}

#[tokio::test]
async fn create_rejects_bad_parameters_before_touching_the_os() {
    let h = nfs(&[]);
    let cases: Vec<(csi::CreateVolumeRequest, &str)> = vec![
        (req("a", &[("color", "blue")]), "color"),
        (req("a", &[("Server", "10.0.0.2")]), "twice"),
        (req("a", &[("onDelete", "shred")]), "onDelete"),
        (
            req("a", &[("mountPermissions", "0999")]),
            "mountPermissions",
        ),
        (req("a", &[("subDir", "../escape")]), "subDir"),
        (req("a", &[("subDir", "/abs")]), "subDir"),
        (
            req("a", &[("subDir", "${pvc.metadata.name}")]),
            "extra-create-metadata",
        ),
        (req("a", &[("subDir", "${pvc.metadata.labels}")]), "subDir"),
        (req("a", &[("subDir", &"d".repeat(120))]), "128"),
        (req("a", &[("server", "-oro")]), "server"),
        (req("a", &[("server", "fd00::1")]), "brackets"),
        (req("a", &[("share", "exports")]), "share"),
        (req("a", &[("share", "/e/../etc")]), "share"),
        (
            req(
                "a",
                &[
                    ("subDir", "${pvc.metadata.name}"),
                    ("csi.storage.k8s.io/pvc/name", ".."),
                ],
            ),
            "..",
        ),
    ];
    for (r, want) in cases {
        let p = format!("{:?}", r.parameters);
        let e = create_err(&h, r).await;
        assert_eq!(e.code(), Code::InvalidArgument, "{p}: {}", e.message());
        assert!(e.message().contains(want), "{p}: {}", e.message());
    }
    let mut missing = req("a", &[]);
    missing.parameters.remove("server");
    assert_eq!(
        code(h.ctl.create_volume(Request::new(missing)).await),
        Code::InvalidArgument
    );
    // Mount options outside the allowlist, or smuggled behind a comma.
    for flags in [
        &["nfsvers=4.1,helper=/bin/sh"][..],
        &["-o", "remount"],
        &["x-mount.mkdir"],
        &["vers=4.1\nro"],
    ] {
        let mut r = req("a", &[]);
        r.volume_capabilities = vec![mount_cap_flags(Mode::MultiNodeMultiWriter, flags)];
        assert_eq!(
            code(h.ctl.create_volume(Request::new(r)).await),
            Code::InvalidArgument,
            "{flags:?}"
        );
    }
    let mut r = req("a", &[]);
    r.volume_capabilities = vec![block_cap(Mode::MultiNodeMultiWriter)];
    assert_eq!(
        code(h.ctl.create_volume(Request::new(r)).await),
        Code::InvalidArgument
    );
    assert!(h.fake().calls().is_empty());
    assert!(h.driver.store.is_empty());
}

/// A mount option's value never reaches an error message (the PVC's
/// events, which every user of the namespace reads, and berth's log): a
/// CIFS class's `password=` copied into an NFS class was answered with
/// `NFS mount option "password=hunter2" is not supported`, by CreateVolume
/// and NodePublishVolume alike, and a bad value of a known option
/// (`sec=`) was shown too. The option is named, its value is not.
#[tokio::test]
async fn mount_option_values_never_reach_an_error_message() {
    let h = nfs(&[]);
    let t = h.path("target");
    for (flags, named) in [
        (&["password=hunter2"][..], "password"),
        (&["nfsvers=4.1,password=hunter2"], "password"),
        (&["hard", "secret=hunter2,nolock"], "secret"),
        (&["sec=hunter2"], "sec"),
        (&["timeo=hunter2"], "timeo"),
        (&["hard=hunter2"], "hard"),
    ] {
        let mut r = req("a", &[]);
        r.volume_capabilities = vec![mount_cap_flags(Mode::MultiNodeMultiWriter, flags)];
        let create = create_err(&h, r).await;
        let publish = h
            .node
            .node_publish_volume(Request::new(nfs_publish(
                "nfs#d#127.0.0.1#/export#a",
                &t,
                false,
                flags,
            )))
            .await
            .expect_err("NodePublishVolume should fail");
        for (rpc, e) in [("CreateVolume", create), ("NodePublishVolume", publish)] {
            assert_eq!(e.code(), Code::InvalidArgument, "{rpc} {flags:?}");
            assert!(
                !e.message().contains("hunter2"),
                "{rpc} {flags:?} shows the option's value: {}",
                e.message()
            );
            assert!(
                e.message().contains(named),
                "{rpc} {flags:?}: {}",
                e.message()
            );
        }
    }
    assert!(runs(h.fake()).is_empty());
    assert!(h.driver.store.is_empty());
}

#[tokio::test]
async fn create_refuses_a_subdirectory_another_volume_uses() {
    let h = nfs(&[]);
    create(&h, "one", &[("subDir", "shared")]).await;
    let e = create_err(&h, req("two", &[("subDir", "shared")])).await;
    assert_eq!(e.code(), Code::AlreadyExists);
    // Nested inside it, or holding it: deleting one would touch the other.
    let e = create_err(&h, req("three", &[("subDir", "shared/inner")])).await;
    assert_eq!(e.code(), Code::AlreadyExists, "{}", e.message());
    create(&h, "four", &[("subDir", "top/leaf")]).await;
    let e = create_err(&h, req("five", &[("subDir", "top")])).await;
    assert_eq!(e.code(), Code::AlreadyExists, "{}", e.message());
    create(&h, "six", &[("subDir", "top/leaf2")]).await;
    assert_eq!(h.driver.store.len(), 3);
}

/// CreateVolume's check for nested storage (another volume's directory
/// holding this one's or inside it, on any share spelling of the same
/// server directory) looks the directory's parents and children up in the
/// store's index of storage: a create walks no record, so it costs the
/// same with any number of volumes. Before, every create parsed every
/// record's id twice (thousands of NFS volumes: creates slowed down with
/// each one).
#[tokio::test]
async fn create_looks_up_overlapping_volumes_without_walking_every_record() {
    let h = nfs(&[]);
    for i in 0..100 {
        create(&h, &format!("pvc-{i}"), &[]).await;
    }
    create(&h, "leaf", &[("subDir", "top/leaf")]).await;
    create(&h, "named", &[("server", "nas.example"), ("subDir", "x")]).await;
    let walked = h.driver.store.records_walked();
    create(&h, "one-more", &[]).await;
    create(&h, "top-leaf2", &[("subDir", "top/leaf2")]).await;
    // Every overlap is still refused: the same directory, one inside
    // another's, one holding another's, through another share spelling,
    // with the server in other case.
    for (name, extra) in [
        ("same", vec![("subDir", "pvc-7")]),
        ("inside", vec![("subDir", "pvc-7/inner")]),
        ("holding", vec![("subDir", "top")]),
        (
            "other-share",
            vec![("share", "/export/top"), ("subDir", "leaf/deeper")],
        ),
        (
            "other-case",
            vec![("server", "NAS.Example"), ("subDir", "x/y")],
        ),
    ] {
        let e = create_err(&h, req(name, &extra)).await;
        assert_eq!(e.code(), Code::AlreadyExists, "{name}: {}", e.message());
    }
    // Not an overlap: a sibling whose name starts the same, another server.
    create(&h, "sibling", &[("subDir", "pvc-7x")]).await;
    create(
        &h,
        "elsewhere",
        &[("server", "nas2.example"), ("subDir", "pvc-7")],
    )
    .await;
    assert_eq!(
        h.driver.store.records_walked(),
        walked,
        "creates and refusals walked every record"
    );
    assert_eq!(h.driver.store.len(), 106);
    // A deleted volume's directory is free again; after a restart the
    // index is rebuilt from the journal.
    delete(&h, "nfs#d#127.0.0.1#/export#pvc-7").await;
    create(&h, "again", &[("subDir", "pvc-7")]).await;
    let h = restart(h, &["--kinds", "nfs"]);
    let walked = h.driver.store.records_walked();
    let e = create_err(&h, req("inside-again", &[("subDir", "pvc-7/inner")])).await;
    assert_eq!(e.code(), Code::AlreadyExists, "{}", e.message());
    create(&h, "after-restart", &[]).await;
    assert_eq!(h.driver.store.records_walked(), walked);
}

#[tokio::test]
async fn create_with_a_128_byte_name_fits_the_id() {
    let h = nfs(&[]);
    let name = "n".repeat(128);
    let a = create(&h, &name, &[]).await;
    assert!(a.volume_id.len() <= 128, "{}", a.volume_id);
    assert_eq!(create(&h, &name, &[]).await.volume_id, a.volume_id);
}

#[tokio::test]
async fn create_that_times_out_mounting_is_deadline_exceeded_and_leaves_no_record() {
    let h = nfs(&[]);
    h.fake().reply("mount.nfs", timeout("mount.nfs"));
    let e = create_err(&h, req("a", &[])).await;
    assert_eq!(e.code(), Code::DeadlineExceeded, "{}", e.message());
    assert!(h.driver.store.is_empty());
    // The retry works.
    create(&h, "a", &[]).await;
}

/// The mount.nfs runs the fake has seen.
fn mount_runs(f: &FakeOs) -> usize {
    runs(f).iter().filter(|(p, _)| p == "mount.nfs").count()
}

/// A create whose share cannot be mounted (an option the kernel refuses,
/// though Berth's allowlist passes it: `xprtsec=tls` on a kernel before 6.5) has made nothing and writes no
/// record: nothing is rolled back, the failed mount is not tried again for
/// a rollback, and the directory it named is free at once. (It was blocked
/// by a record left Creating, whose rollback needed the very mount that
/// had failed, retried every 60 s.)
#[tokio::test]
async fn a_create_whose_share_cannot_be_mounted_leaves_no_record_and_blocks_nothing() {
    let h = nfs(&[]);
    h.fake().respond_to_some("mount.nfs", |args| {
        args.iter()
            .any(|a| a.split(',').any(|o| o == "xprtsec=tls"))
            .then(|| exit(32, "mount.nfs: an incorrect mount option was specified"))
    });
    let mut bad = req("n1", &[("subDir", "data")]);
    bad.volume_capabilities = vec![mount_cap_flags(Mode::SingleNodeWriter, &["xprtsec=tls"])];
    for _ in 0..2 {
        let e = create_err(&h, bad.clone()).await;
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert!(
            e.message()
                .contains("an incorrect mount option was specified"),
            "{}",
            e.message()
        );
        assert!(h.driver.store.is_empty(), "no record is left");
    }
    // Each try mounts once per option set (4.1, 4.0, 3), none for a
    // rollback.
    assert_eq!(mount_runs(h.fake()), 6, "{:?}", runs(h.fake()));
    // Another volume with the same subDir and good options: made at once.
    let n2 = create(&h, "n2", &[("subDir", "data")]).await;
    assert_eq!(n2.volume_id, "nfs#d#127.0.0.1#/export#data");
    let root = share_root(&h);
    assert_eq!(marker_of(&root.join("data")).unwrap()["name"], "n2");
    // Nothing is left for a restart to finish.
    let h = restart(h, &["--kinds", "nfs"]);
    assert_eq!(h.driver.store.len(), 1);
    assert!(!h.driver.reconciling());
}

/// A create to a server that does not answer, with no working mount:
/// DEADLINE_EXCEEDED after one mount timeout. The rollback does not mount
/// again (there is nothing to roll back: no record was written), which
/// made the call wait out twice `--nfs-timeout`.
#[tokio::test]
async fn a_create_to_a_dead_server_waits_for_one_mount_only() {
    let h = nfs(&[]);
    h.fake().respond("mount.nfs", |_| {
        std::thread::sleep(Duration::from_millis(300));
        timeout("mount.nfs")
    });
    let t0 = Instant::now();
    let e = create_err(&h, req("a", &[])).await;
    assert_eq!(e.code(), Code::DeadlineExceeded, "{}", e.message());
    assert_eq!(mount_runs(h.fake()), 1, "{:?}", runs(h.fake()));
    assert!(
        t0.elapsed() < Duration::from_millis(600),
        "{:?}",
        t0.elapsed()
    );
    assert!(h.driver.store.is_empty());
    // The server is back: the retry works.
    h.fake().respond_to_some("mount.nfs", |_| None);
    create(&h, "a", &[]).await;
    // With a working mount a stopped server answers within the stat
    // timeout, UNAVAILABLE, and nothing is mounted or recorded.
    let root = share_root(&h);
    h.fake().clear_calls();
    h.fake()
        .set_statvfs_delay(&root, Some(Duration::from_secs(4)));
    let e = create_err(&h, req("b", &[])).await;
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    assert_eq!(mount_runs(h.fake()), 0);
    assert!(h.driver.store.get("nfs#d#127.0.0.1#/export#b").is_none());
    h.fake().set_statvfs_delay(&root, None);
}

/// What the server or the kernel refuses for good is INVALID_ARGUMENT for
/// CreateVolume (the request names something that cannot work): an
/// export the server does not have, or does not let this node mount, an
/// option the kernel does not accept.
/// A server that does not answer stays DEADLINE_EXCEEDED, and other mount
/// failures INTERNAL. None leaves a record.
#[tokio::test]
async fn create_volume_codes_of_failed_mounts() {
    let h = nfs(&[]);
    let cases: Vec<(&str, Result<CmdOutput, OsError>, Code)> = vec![
        (
            "/nope",
            exit(
                32,
                "mount.nfs: mounting 127.0.0.1:/nope failed, reason given by server: No such file or directory",
            ),
            Code::InvalidArgument,
        ),
        (
            "/opt",
            exit(32, "mount.nfs: an incorrect mount option was specified"),
            Code::InvalidArgument,
        ),
        (
            "/private",
            exit(
                32,
                "mount.nfs: access denied by server while mounting 127.0.0.1:/private",
            ),
            Code::InvalidArgument,
        ),
        ("/slow", timeout("mount.nfs"), Code::DeadlineExceeded),
        (
            "/odd",
            exit(32, "mount.nfs: mount point /w/x does not exist"),
            Code::Internal,
        ),
    ];
    for (share, reply, want) in cases {
        h.fake().clear_calls();
        h.fake().reply("mount.nfs", reply);
        let mut r = req("v", &[("share", share)]);
        r.volume_capabilities = vec![mount_cap_flags(Mode::SingleNodeWriter, &["nfsvers=4.2"])];
        let e = create_err(&h, r).await;
        assert_eq!(e.code(), want, "{share}: {}", e.message());
        assert_eq!(mount_runs(h.fake()), 1, "{share}");
        assert!(h.driver.store.is_empty(), "{share}");
    }
}

#[tokio::test]
async fn controller_remounts_a_stale_share_and_reports_a_hung_one() {
    let h = nfs(&[]);
    create(&h, "a", &[]).await;
    let root = share_root(&h);
    h.fake().clear_calls();
    h.fake().fail_next("statvfs", libc::ESTALE);
    create(&h, "b", &[]).await;
    let r = runs(h.fake());
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!(r[0].0, "umount");
    assert_eq!(r[1].0, "mount.nfs");
    // A server that does not answer: UNAVAILABLE within the stat timeout
    // (--nfs-timeout 2 here), not a hang.
    h.fake()
        .set_statvfs_delay(&root, Some(Duration::from_secs(4)));
    let t0 = Instant::now();
    let e = create_err(&h, req("c", &[])).await;
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    h.fake().set_statvfs_delay(&root, None);
}

// ------------------------------------------------------------ DeleteVolume

#[tokio::test]
async fn delete_applies_on_delete_and_never_touches_the_share_root() {
    let h = nfs(&[]);
    let del = create(&h, "del", &[]).await.volume_id;
    let arc = create(&h, "arc", &[("onDelete", "archive"), ("subDir", "ns/arc")])
        .await
        .volume_id;
    let ret = create(&h, "ret", &[("onDelete", "retain")]).await.volume_id;
    let root = share_root(&h);
    std::fs::write(root.join("canary"), b"keep").unwrap();
    for d in ["del", "ns/arc", "ret"] {
        std::fs::create_dir_all(root.join(d).join("deep")).unwrap();
        std::fs::write(root.join(d).join("deep/file"), b"data").unwrap();
    }
    for id in [&del, &arc, &ret] {
        try_delete(&h, id).await.unwrap();
        try_delete(&h, id).await.unwrap();
    }
    assert!(!root.join("del").exists());
    assert!(!root.join("ns/arc").exists());
    let archived: Vec<_> = std::fs::read_dir(root.join(".berth-archive"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(archived.len(), 1, "{archived:?}");
    assert!(archived[0].starts_with("ns-arc-"), "{archived:?}");
    assert!(root
        .join(".berth-archive")
        .join(&archived[0])
        .join("deep/file")
        .exists());
    assert!(root.join("ret/deep/file").exists());
    assert_eq!(std::fs::read(root.join("canary")).unwrap(), b"keep");
    assert!(h.driver.store.is_empty());
}

/// onDelete=retain, then a CreateVolume with the same name: the deleted
/// volume's data is not handed back (it was: the marker named the same id
/// and name, so the create took it for a retry). DeleteVolume marks the
/// directory's marker released, durably before the record is removed, and
/// a delete cut short there (kill -9) is finished by its retry; the create
/// is ALREADY_EXISTS naming the retained directory, which keeps its data.
#[tokio::test]
async fn a_retained_directory_is_never_handed_to_a_new_volume() {
    let h = nfs(&[]);
    let retain = [("onDelete", "retain")];
    let id = create(&h, "reuse2", &retain).await.volume_id;
    let root = share_root(&h);
    std::fs::write(root.join("reuse2/old"), b"old data").unwrap();
    // Cut short before the released marker is in place: the record stays,
    // Deleting, and the marker is still the live one.
    h.fake().fail_op_under("rename", &root, libc::EIO);
    let e = try_delete(&h, &id).await.unwrap_err();
    h.fake().clear_file_faults();
    assert_eq!(e.code(), Code::Internal, "{}", e.message());
    let rec = h.driver.store.get(&id).expect("record kept");
    assert_eq!(rec.phase, berth::state::Phase::Deleting);
    assert!(marker_of(&root.join("reuse2")).unwrap()["released_unix"].is_null());
    try_delete(&h, &id).await.unwrap();
    try_delete(&h, &id).await.unwrap();
    assert!(h.driver.store.is_empty());
    let m = marker_of(&root.join("reuse2")).unwrap();
    assert!(m["released_unix"].is_u64(), "{m}");
    assert_eq!(
        (m["id"].as_str(), m["name"].as_str()),
        (Some(id.as_str()), Some("reuse2"))
    );
    for _ in 0..2 {
        let e = create_err(&h, req("reuse2", &retain)).await;
        assert_eq!(e.code(), Code::AlreadyExists, "{}", e.message());
        assert!(
            e.message()
                .contains("reuse2 on the share holds the data of deleted volume"),
            "{}",
            e.message()
        );
        assert!(h.driver.store.is_empty());
    }
    assert_eq!(std::fs::read(root.join("reuse2/old")).unwrap(), b"old data");
    // The deleted volume no longer exists for calls without a record.
    let r = h
        .ctl
        .controller_get_volume(Request::new(csi::ControllerGetVolumeRequest {
            volume_id: id.clone(),
        }))
        .await;
    assert_eq!(code(r), Code::NotFound);
}

/// The share's filesystem fails to mount on the server, which then
/// exports the empty directory beneath it (a stand-in): the working mount
/// is still an NFS mount of the share, but nothing of Berth's is there.
/// Before, DeleteVolume found the volume's directory absent, answered OK
/// and dropped the record while the data still existed (on the server's
/// real filesystem), and DeleteSnapshot likewise; CreateVolume made a new
/// volume inside the stand-in. Now the share's root carries Berth's
/// marker (`.berth-share`, written by its first CreateVolume), and a
/// volume or snapshot absent from a share without it is UNAVAILABLE with
/// the record kept, a create there too; once the real filesystem is back,
/// the retries work.
#[tokio::test]
async fn an_empty_stand_in_for_the_share_never_deletes_a_record_or_gets_a_volume() {
    let h = nfs(&[]);
    let a = create(&h, "a", &[]).await.volume_id;
    let s = snapshot(&h, "s", &a).await.snapshot_id;
    let root = share_root(&h);
    std::fs::write(root.join("a/data"), b"tenant data").unwrap();
    // The server's filesystem is not mounted: the export is an empty
    // directory (the real one is kept aside).
    let real = h.path("real-share");
    std::fs::rename(&root, &real).unwrap();
    std::fs::create_dir(&root).unwrap();
    for _ in 0..2 {
        let e = try_delete(&h, &a).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
        assert!(e.message().contains(".berth-share"), "{}", e.message());
        assert!(h.driver.store.get(&a).is_some(), "the record is kept");
        let e = delete_snapshot(&h, &s).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
        assert!(
            h.driver.store.snapshot_get(&s).is_some(),
            "the record is kept"
        );
        let e = create_err(&h, req("b", &[])).await;
        assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
        assert!(h.driver.store.get("nfs#d#127.0.0.1#/export#b").is_none());
    }
    assert_eq!(
        std::fs::read_dir(&root).unwrap().count(),
        0,
        "nothing made in the stand-in"
    );
    // The server mounts its filesystem again: everything works.
    std::fs::remove_dir(&root).unwrap();
    std::fs::rename(&real, &root).unwrap();
    delete_snapshot(&h, &s).await.unwrap();
    try_delete(&h, &a).await.unwrap();
    assert!(!root.join("a").exists());
    assert!(h.driver.store.is_empty());
    create(&h, "b", &[]).await;
    assert!(root.join("b").is_dir());
    assert!(root.join(".berth-share").is_file());
}

/// The working mount is gone (here: `mount.nfs` answered success and
/// mounted nothing, so the working directory is an empty local
/// directory). Before, DeleteVolume looked there, found nothing and
/// answered OK, dropping the record of a volume whose data was on the
/// share. Now a volume is taken for gone only from the share's NFS mount:
/// UNAVAILABLE, the record kept, and the retry with the share mounted
/// deletes the volume.
#[tokio::test]
async fn a_vanished_working_mount_never_deletes_a_record() {
    use berth::os::Mounter;
    let h = nfs(&[]);
    let a = create(&h, "a", &[]).await.volume_id;
    let root = share_root(&h);
    std::fs::write(root.join("a/data"), b"tenant data").unwrap();
    // The mount is gone: an empty local directory is left at its place
    // (the share's content kept aside, as the server keeps it).
    h.fake().unmount(&root).unwrap();
    let real = h.path("real-share");
    std::fs::rename(&root, &real).unwrap();
    std::fs::create_dir(&root).unwrap();
    h.fake().reply("mount.nfs", exit(0, ""));
    let e = try_delete(&h, &a).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    assert!(e.message().contains("working mount"), "{}", e.message());
    assert!(h.driver.store.get(&a).is_some(), "the record is kept");
    // The share mounted again.
    std::fs::remove_dir(&root).unwrap();
    std::fs::rename(&real, &root).unwrap();
    try_delete(&h, &a).await.unwrap();
    assert!(!root.join("a").exists());
    assert!(h.driver.store.is_empty());
}

/// A share Berth used before it wrote share markers: its first DeleteVolume
/// of a volume already gone finds Berth's layout (a volume's marker, its
/// areas) and marks the share, and succeeds; a share with nothing of
/// Berth's refuses until the operator marks it.
#[tokio::test]
async fn a_share_from_before_share_markers_is_adopted_by_its_layout() {
    let h = nfs(&[]);
    let a = create(&h, "a", &[("subDir", "ns/a")]).await.volume_id;
    let b = create(&h, "b", &[("subDir", "ns/b")]).await.volume_id;
    let c = create(&h, "c", &[]).await.volume_id;
    let root = share_root(&h);
    std::fs::remove_dir_all(root.join("c")).unwrap();
    std::fs::remove_file(root.join(".berth-share")).unwrap();
    // Nor does this controller remember it marked.
    for e in std::fs::read_dir(h.path("state/nfs")).unwrap() {
        let e = e.unwrap();
        if e.file_name().to_string_lossy().starts_with("marked-") {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    // b's directory is already gone; a's marker (two levels down) shows
    // the share is Berth's.
    std::fs::remove_dir_all(root.join("ns/b")).unwrap();
    try_delete(&h, &b).await.unwrap();
    assert!(root.join(".berth-share").is_file(), "adopted");
    // Nothing of Berth's at all: refused, until marked by hand.
    try_delete(&h, &a).await.unwrap();
    std::fs::remove_file(root.join(".berth-share")).unwrap();
    std::fs::remove_dir_all(root.join("ns")).unwrap();
    let e = try_delete(&h, &c).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    std::fs::write(
        root.join(".berth-share"),
        b"{\"share\":\"x\",\"marked_unix\":1}",
    )
    .unwrap();
    try_delete(&h, &c).await.unwrap();
    assert!(h.driver.store.is_empty());
}

/// The server stops answering while the directory work runs (the working
/// mount is `hard`: a file call waits until the server answers). Before,
/// CreateVolume and DeleteVolume waited with it, without end. Now each
/// answers DEADLINE_EXCEEDED once twice `--nfs-timeout` and the stat
/// timeout passed (2 s each here: 6 s); the work goes on and keeps the
/// volume's guard, so a retry meanwhile is ABORTED, never a second
/// operation on the same directory; once the server answers, the work
/// ends and the retry succeeds.
#[tokio::test]
async fn a_server_that_stops_answering_mid_operation_bounds_the_call() {
    let h = nfs(&[]);
    let a = create(&h, "a", &[]).await.volume_id;
    let root = share_root(&h);
    std::fs::write(root.join("a/data"), b"x").unwrap();
    // Every directory made on the share hangs.
    let hold = h.fake().hold_op_under("mkdir", &root);
    let t0 = Instant::now();
    let e = create_err(&h, req("b", &[])).await;
    assert_eq!(e.code(), Code::DeadlineExceeded, "{}", e.message());
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(6) && took < Duration::from_secs(9),
        "{took:?}"
    );
    assert_eq!(hold.reached(), 1);
    let e = create_err(&h, req("b", &[])).await;
    assert_eq!(e.code(), Code::Aborted, "{}", e.message());
    hold.release();
    let mut made = None;
    for _ in 0..100 {
        match h.ctl.create_volume(Request::new(req("b", &[]))).await {
            Ok(r) => {
                made = r.into_inner().volume;
                break;
            }
            Err(e) if e.code() == Code::Aborted => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(
        made.expect("created").volume_id,
        "nfs#d#127.0.0.1#/export#b"
    );
    assert!(root.join("b").is_dir());
    // The same for a delete: removing the volume's contents hangs.
    let hold = h.fake().hold_op_under("unlink", &root.join("a"));
    let t0 = Instant::now();
    let e = try_delete(&h, &a).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{}", e.message());
    assert!(t0.elapsed() < Duration::from_secs(9), "{:?}", t0.elapsed());
    let e = try_delete(&h, &a).await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{}", e.message());
    assert!(h.driver.store.get(&a).is_some());
    hold.release();
    let mut deleted = false;
    for _ in 0..100 {
        match try_delete(&h, &a).await {
            Ok(()) => {
                deleted = true;
                break;
            }
            Err(e) if e.code() == Code::Aborted => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(deleted);
    assert!(!root.join("a").exists());
    assert!(h.driver.store.get(&a).is_none());
}

/// Lets a fake's hold go when dropped: a test that fails while calls are
/// held leaves no thread waiting on it (the runtime waits for them).
struct LetGo(Arc<berth::os::fake::OpHold>);

impl Drop for LetGo {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// ControllerPublishVolume of a well-formed NFS id that names no volume
/// (no record here, no directory marked with it on the share) is
/// NOT_FOUND, the spec's "Volume does not exist", and records nothing.
/// Before, the id alone made a record (the node side's
/// `Driver::volume`): the call answered OK and put a Ready record of the
/// made-up id in the journal, and from then on ControllerGetVolume,
/// ValidateVolumeCapabilities and ListVolumes showed a volume never
/// created (found by handlers_hostile's sweep). A volume whose record
/// this controller lost is still published: its marker names it.
#[tokio::test]
async fn controller_publish_of_an_nfs_id_that_names_no_volume_is_not_found() {
    let h = nfs(&[]);
    let real = create(&h, "real", &[]).await.volume_id;
    let made_up = real.replace("#real", "#made-up");
    assert_ne!(made_up, real);
    let e = controller_publish(&h, &made_up, NODE)
        .await
        .expect_err("a publish of a volume never created");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(h.driver.store.get(&made_up).is_none());
    let got = h
        .ctl
        .controller_get_volume(Request::new(csi::ControllerGetVolumeRequest {
            volume_id: made_up.clone(),
        }))
        .await;
    assert_eq!(code(got), Code::NotFound);
    // The record is lost (an emptyDir): the marker on the share tells.
    h.driver.store.remove(&real).unwrap();
    controller_publish(&h, &real, NODE)
        .await
        .expect("a publish of a volume whose record was lost");
    assert!(h
        .driver
        .store
        .get(&real)
        .unwrap()
        .published
        .contains_key(NODE));
}

/// The server stops answering while a controller query looks at the
/// share (the working mount is `hard`: a read waits until the server
/// answers). Without records, ControllerExpandVolume,
/// ControllerGetVolume and ValidateVolumeCapabilities read the volume's
/// marker there, and GetSnapshot and ListSnapshots (asked for one id) the
/// snapshot's. Before, each waited with the server, without end (here:
/// the 20 s bound of the test). Now each answers DEADLINE_EXCEEDED after
/// the deadline of the other NFS controller calls (6 s here); the look
/// goes on and keeps the volume's (snapshot's) guard, so a call on the
/// same id meanwhile is ABORTED, and once the server answers the retry
/// gets the answer.
#[tokio::test]
async fn controller_queries_to_a_server_that_stops_answering_are_bounded() {
    let h = nfs(&[]);
    let x = create(&h, "x", &[]).await.volume_id;
    let g = create(&h, "g", &[]).await.volume_id;
    let val = create(&h, "val", &[]).await.volume_id;
    let s1 = snapshot(&h, "s1", &x).await.snapshot_id;
    let s2 = snapshot(&h, "s2", &x).await.snapshot_id;
    // The records are lost (an emptyDir): only the markers tell.
    for id in [&x, &g, &val] {
        h.driver.store.remove(id).unwrap();
    }
    for id in [&s1, &s2] {
        h.driver.store.snapshot_remove(id).unwrap();
    }
    let root = share_root(&h);
    let expand = |id: &str| csi::ControllerExpandVolumeRequest {
        volume_id: id.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: 10 << 20,
            limit_bytes: 0,
        }),
        ..Default::default()
    };
    let get = |id: &str| csi::ControllerGetVolumeRequest {
        volume_id: id.into(),
    };
    let validate = |id: &str| csi::ValidateVolumeCapabilitiesRequest {
        volume_id: id.into(),
        volume_capabilities: vec![mount_cap(Mode::MultiNodeMultiWriter)],
        ..Default::default()
    };
    let get_snap = |id: &str| csi::GetSnapshotRequest {
        snapshot_id: id.into(),
        ..Default::default()
    };
    let list_snap = |id: &str| csi::ListSnapshotsRequest {
        snapshot_id: id.into(),
        ..Default::default()
    };
    // Every read on the share hangs.
    let hold = LetGo(h.fake().hold_op_under("read", &root));
    let ctl = &h.ctl;
    let t0 = Instant::now();
    let all = async {
        tokio::join!(
            ctl.controller_expand_volume(Request::new(expand(&x))),
            ctl.controller_get_volume(Request::new(get(&g))),
            ctl.validate_volume_capabilities(Request::new(validate(&val))),
            ctl.get_snapshot(Request::new(get_snap(&s1))),
            ctl.list_snapshots(Request::new(list_snap(&s2))),
        )
    };
    let (e, gv, vv, gs, ls) = tokio::time::timeout(Duration::from_secs(20), all)
        .await
        .expect("the calls waited for the server without end");
    let took = t0.elapsed();
    for (what, c) in [
        ("ControllerExpandVolume", code(e)),
        ("ControllerGetVolume", code(gv)),
        ("ValidateVolumeCapabilities", code(vv)),
        ("GetSnapshot", code(gs)),
        ("ListSnapshots", code(ls)),
    ] {
        assert_eq!(c, Code::DeadlineExceeded, "{what}");
    }
    assert!(
        took >= Duration::from_secs(6) && took < Duration::from_secs(9),
        "{took:?}"
    );
    assert_eq!(hold.0.reached(), 5, "each look reached the share");
    // The looks go on and keep their guards: a retry, or another call on
    // the same id, is ABORTED at once, and adds no look.
    let retries = [
        code(ctl.controller_expand_volume(Request::new(expand(&x))).await),
        code(ctl.controller_get_volume(Request::new(get(&x))).await),
        code(ctl.controller_get_volume(Request::new(get(&g))).await),
        code(
            ctl.validate_volume_capabilities(Request::new(validate(&val)))
                .await,
        ),
        code(ctl.get_snapshot(Request::new(get_snap(&s1))).await),
        code(ctl.list_snapshots(Request::new(list_snap(&s1))).await),
        code(ctl.get_snapshot(Request::new(get_snap(&s2))).await),
    ];
    assert_eq!(retries, [Code::Aborted; 7]);
    assert_eq!(hold.0.reached(), 5);
    assert!(t0.elapsed() < Duration::from_secs(9), "{:?}", t0.elapsed());
    // The server answers again: the looks end, and the retries answer
    // (each retried while its look, ended in the background, still holds
    // its guard: ABORTED).
    drop(hold);
    let t1 = Instant::now();
    macro_rules! once_ended {
        ($call:expr) => {
            loop {
                match $call.await {
                    Err(e)
                        if e.code() == Code::Aborted && t1.elapsed() < Duration::from_secs(5) =>
                    {
                        tokio::time::sleep(Duration::from_millis(50)).await
                    }
                    r => break r,
                }
            }
        };
    }
    let r = once_ended!(ctl.controller_expand_volume(Request::new(expand(&x))));
    assert_eq!(r.unwrap().into_inner().capacity_bytes, 10 << 20);
    let v = once_ended!(ctl.controller_get_volume(Request::new(get(&g))))
        .unwrap()
        .into_inner();
    assert_eq!(v.volume.unwrap().volume_id, g);
    let r = once_ended!(ctl.validate_volume_capabilities(Request::new(validate(&val))))
        .unwrap()
        .into_inner();
    assert!(r.confirmed.is_some(), "{}", r.message);
    let s = once_ended!(ctl.get_snapshot(Request::new(get_snap(&s1))))
        .unwrap()
        .into_inner();
    assert_eq!(s.snapshot.unwrap().snapshot_id, s1);
    let l = once_ended!(ctl.list_snapshots(Request::new(list_snap(&s2))))
        .unwrap()
        .into_inner();
    assert_eq!(l.entries.len(), 1);
}

/// A share used only by a Berth that wrote no share marker, with nothing
/// of Berth's left on it: DeleteVolume of a volume already gone is
/// UNAVAILABLE (the share cannot be told from an empty stand-in), and the
/// message says what the operator does: the marker file by its NFS path,
/// and the commands that make it from any host. Done literally (an empty
/// file), the retry succeeds. Before, the message asked for an empty file
/// but only one holding Berth's JSON counted: the delete stayed refused.
#[tokio::test]
async fn a_share_marked_by_hand_as_the_message_says_lets_the_delete_through() {
    let h = nfs(&[]);
    let c = create(&h, "c", &[]).await.volume_id;
    let root = share_root(&h);
    std::fs::remove_dir_all(root.join("c")).unwrap();
    std::fs::remove_file(root.join(".berth-share")).unwrap();
    for e in std::fs::read_dir(h.path("state/nfs")).unwrap() {
        let e = e.unwrap();
        if e.file_name().to_string_lossy().starts_with("marked-") {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    let e = try_delete(&h, &c).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    for says in [
        "127.0.0.1:/export/.berth-share",
        "`mount -t nfs 127.0.0.1:/export /mnt && touch /mnt/.berth-share && umount /mnt`",
    ] {
        assert!(e.message().contains(says), "{says}: {}", e.message());
    }
    assert!(h.driver.store.get(&c).is_some(), "the record is kept");
    // A symlink by that name, or a directory, does not mark the share.
    std::os::unix::fs::symlink("/etc/hostname", root.join(".berth-share")).unwrap();
    assert_eq!(
        try_delete(&h, &c).await.unwrap_err().code(),
        Code::Unavailable
    );
    std::fs::remove_file(root.join(".berth-share")).unwrap();
    std::fs::create_dir(root.join(".berth-share")).unwrap();
    assert_eq!(
        try_delete(&h, &c).await.unwrap_err().code(),
        Code::Unavailable
    );
    std::fs::remove_dir(root.join(".berth-share")).unwrap();
    // `touch`: an empty file.
    std::fs::File::create(root.join(".berth-share")).unwrap();
    try_delete(&h, &c).await.unwrap();
    assert!(h.driver.store.is_empty());
    assert_eq!(std::fs::read(root.join(".berth-share")).unwrap(), b"");
}

#[tokio::test]
async fn delete_without_a_record_works_from_the_id() {
    let h = nfs(&[]);
    let del = create(&h, "del", &[]).await.volume_id;
    let ret = create(&h, "ret", &[("onDelete", "retain")]).await.volume_id;
    let root = share_root(&h);
    std::fs::write(root.join("del/f"), b"x").unwrap();
    std::fs::write(root.join("ret/f"), b"x").unwrap();
    // The controller's state is lost (an emptyDir). A shutdown unmounts
    // the share.
    std::fs::remove_dir_all(h.path("state/journal")).unwrap();
    h.fake().clear_calls();
    let h = restart(h, &["--kinds", "nfs"]);
    assert!(h.driver.store.is_empty());
    assert_eq!(
        runs(h.fake()),
        vec![(
            "umount".to_string(),
            v(&["-i", "-c", "--", &root.display().to_string()])
        )]
    );
    assert!(!h.fake().table().iter().any(|m| m.mount_point == root));
    try_delete(&h, &del).await.unwrap();
    try_delete(&h, &ret).await.unwrap();
    assert!(!root.join("del").exists());
    assert!(root.join("ret/f").exists(), "retain survives a lost record");
}

/// The record is lost (so are the StorageClass mount options) and the
/// server speaks only NFSv3: the controller's working mount falls back from
/// the default version to NFSv4.0, then to NFSv3 without locks, and the
/// delete works. A failed attempt leaves no directory it made behind.
#[tokio::test]
async fn delete_without_a_record_reaches_a_server_that_speaks_only_nfsv3() {
    let h = nfs(&[]);
    let del = create(&h, "del", &[]).await.volume_id;
    let share = share_root(&h);
    std::fs::remove_dir_all(h.path("state/journal")).unwrap();
    let h = restart(h, &["--kinds", "nfs"]);
    // Each working directory of the fake is a directory of its own: a
    // mount at another one shows the share's content, as a real one does.
    h.fake().respond_to_some("mount.nfs", move |a| {
        if Path::new(&a[1]) != share {
            let st = std::process::Command::new("cp")
                .arg("-a")
                .arg(share.join("."))
                .arg(&a[1])
                .status()
                .unwrap();
            assert!(st.success());
        }
        None
    });
    let refuse = || {
        Ok(CmdOutput {
            code: Some(32),
            stdout: String::new(),
            stderr: "mount.nfs: requested NFS version or transport protocol is not supported"
                .into(),
        })
    };
    h.fake().reply("mount.nfs", refuse());
    h.fake().reply("mount.nfs", refuse());
    h.fake().clear_calls();
    try_delete(&h, &del).await.unwrap();
    let tried: Vec<(String, String)> = runs(h.fake())
        .into_iter()
        .filter(|(p, _)| p == "mount.nfs")
        .map(|(_, a)| {
            let o = a[a.iter().position(|x| x == "-o").unwrap() + 1].clone();
            (o, a[1].clone())
        })
        .collect();
    assert_eq!(
        tried.iter().map(|t| t.0.as_str()).collect::<Vec<_>>(),
        ["nfsvers=4.1", "nfsvers=4.0", "nfsvers=3,nolock"]
    );
    // The directory of the first set is the one the share had before the
    // restart (an unmount keeps it); the second was made for the attempt.
    assert!(
        !Path::new(&tried[1].1).exists(),
        "{} left behind",
        tried[1].1
    );
    assert!(h
        .fake()
        .table()
        .iter()
        .any(|m| m.mount_point == Path::new(&tried[2].1)));
    assert!(Path::new(&tried[2].1).join(".berth-share").exists());
    assert!(!Path::new(&tried[2].1).join("del").exists(), "deleted");
    // With a version in the mount options, only that version is tried.
    let h = nfs(&[]);
    let mut r = req("v4only", &[]);
    r.volume_capabilities = vec![mount_cap_flags(
        Mode::MultiNodeMultiWriter,
        &["nfsvers=4.2"],
    )];
    h.fake().reply("mount.nfs", refuse());
    h.fake().clear_calls();
    assert!(h.ctl.create_volume(Request::new(r)).await.is_err());
    let opts: Vec<String> = runs(h.fake())
        .into_iter()
        .filter(|(p, _)| p == "mount.nfs")
        .map(|(_, a)| a[a.iter().position(|x| x == "-o").unwrap() + 1].clone())
        .collect();
    assert!(
        !opts.is_empty() && opts.iter().all(|o| o == "nfsvers=4.2"),
        "{opts:?}"
    );
}

/// Two calls on one share whose mount options differ but share an option
/// set (one without a version tries nfsvers=4.1, then 4.0; the other asks
/// for nfsvers=4.0) mount at the same working directory. Each took the
/// lock named by its first option set, so both could find that directory
/// unmounted and both mount there: two NFS mounts stacked on one
/// directory (with the real kernel, the second mount fails 'busy or
/// already mounted' and its call fails). One lock per share: the second
/// call waits, then reuses the first one's mount.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_with_other_options_on_one_share_never_stack_working_mounts() {
    let h = Arc::new(nfs(&[]));
    h.fake().respond_to_some("mount.nfs", |args| {
        if args
            .iter()
            .any(|a| a.split(',').any(|o| o == "nfsvers=4.1"))
        {
            return Some(exit(
                32,
                "mount.nfs: requested NFS version or transport protocol is not supported",
            ));
        }
        // A slow mount: the other call arrives while it runs.
        std::thread::sleep(Duration::from_millis(400));
        None
    });
    let h2 = h.clone();
    let any = tokio::spawn(async move {
        h2.ctl
            .create_volume(Request::new(req("any", &[])))
            .await
            .map(|_| ())
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut r = req("v40", &[]);
    r.volume_capabilities = vec![mount_cap_flags(Mode::SingleNodeWriter, &["nfsvers=4.0"])];
    let v40 = h.ctl.create_volume(Request::new(r)).await.map(|_| ());
    assert!(v40.is_ok(), "{:?}", v40.err());
    let a = any.await.unwrap();
    assert!(a.is_ok(), "{:?}", a.err());
    let mounts = nfs_mounts(&h);
    assert_eq!(mounts.len(), 1, "stacked working mounts: {mounts:?}");
    let v40_runs = runs(h.fake())
        .iter()
        .filter(|(p, a)| p == "mount.nfs" && a.iter().any(|x| x == "nfsvers=4.0"))
        .count();
    assert_eq!(v40_runs, 1, "{:?}", runs(h.fake()));
    // Both directories are on the one mount.
    let root = share_root(&h);
    assert!(root.join("any").is_dir() && root.join("v40").is_dir());
}

/// Creates under different names whose subdirectories nest (or coincide)
/// race each other: exactly one wins, the others are ALREADY_EXISTS, so no
/// volume's delete can ever take another volume's data with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_of_nested_subdirectories_let_one_win() {
    for round in 0..10 {
        let h = Arc::new(nfs(&[]));
        let base = format!("r{round}");
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let h = h.clone();
                let sub = if i % 2 == 0 {
                    base.clone()
                } else {
                    format!("{base}/inner")
                };
                tokio::spawn(async move {
                    h.ctl
                        .create_volume(Request::new(req(&format!("n{i}"), &[("subDir", &sub)])))
                        .await
                        .map(|_| ())
                        .map_err(|s| s.code())
                })
            })
            .collect();
        let mut won = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(()) => won += 1,
                Err(c) => assert!(
                    c == Code::AlreadyExists || c == Code::Aborted,
                    "round {round}: {c:?}"
                ),
            }
        }
        assert_eq!(won, 1, "round {round}: {won} overlapping volumes created");
        assert_eq!(h.driver.store.len(), 1);
    }
}

#[tokio::test]
async fn delete_of_hostile_ids_is_ok_and_touches_nothing() {
    let h = nfs(&[]);
    create(&h, "v", &[]).await;
    let root = share_root(&h);
    std::fs::write(root.join("canary"), b"keep").unwrap();
    h.fake().clear_calls();
    for id in [
        "nfs#d#127.0.0.1#/export#",
        "nfs#d#127.0.0.1#/export#.",
        "nfs#d#127.0.0.1#/export#..",
        "nfs#d#127.0.0.1#/export#../etc",
        "nfs#d#127.0.0.1#/export#v/..",
        "nfs#d#127.0.0.1#/export#/v",
        "nfs#d#127.0.0.1#/export#v#x",
        "nfs#d#127.0.0.1#/#",
        "nfs#d#127.0.0.1#/export/..#v",
        "nfs#d#-o#/export#v",
        "nfs#x#127.0.0.1#/export#v",
    ] {
        try_delete(&h, id).await.unwrap();
    }
    // NUL and over-long ids are invalid input.
    for id in [
        "nfs#d#127.0.0.1#/export#a\0b".to_string(),
        format!("nfs#d#h#/e#{}", "a".repeat(130)),
    ] {
        assert_eq!(
            code(
                h.ctl
                    .delete_volume(Request::new(csi::DeleteVolumeRequest {
                        volume_id: id,
                        ..Default::default()
                    }))
                    .await
            ),
            Code::InvalidArgument
        );
    }
    assert!(h.fake().calls().is_empty(), "{:?}", h.fake().calls());
    assert!(root.join("v").is_dir());
    assert!(root.join("canary").exists());
}

// ------------------------------------------------------------ Node

#[tokio::test]
async fn publish_mounts_straight_at_the_target_and_unpublish_unmounts() {
    let h = nfs(&[]);
    let id = create(&h, "v", &[]).await.volume_id;
    h.fake().clear_calls();
    let t = h.path("pods/a/target");
    std::fs::create_dir_all(t.parent().unwrap()).unwrap();
    let ro = h.path("pods/a/ro");
    h.node
        .node_publish_volume(Request::new(nfs_publish(&id, &t, false, &["hard"])))
        .await
        .unwrap();
    h.node
        .node_publish_volume(Request::new(nfs_publish(&id, &ro, true, &[])))
        .await
        .unwrap();
    assert!(t.is_dir());
    let r = runs(h.fake());
    assert_eq!(
        r,
        vec![
            (
                "mount.nfs".to_string(),
                v(&[
                    "127.0.0.1:/export/v",
                    &t.display().to_string(),
                    "-n",
                    "-o",
                    "hard,nfsvers=4.1"
                ])
            ),
            (
                "mount.nfs".to_string(),
                v(&[
                    "127.0.0.1:/export/v",
                    &ro.display().to_string(),
                    "-n",
                    "-o",
                    "nfsvers=4.1,ro"
                ])
            ),
        ]
    );
    // Same again: OK, nothing run. Other read-only flag: ALREADY_EXISTS.
    h.node
        .node_publish_volume(Request::new(nfs_publish(&id, &t, false, &["hard"])))
        .await
        .unwrap();
    assert_eq!(runs(h.fake()).len(), 2);
    let r = h
        .node
        .node_publish_volume(Request::new(nfs_publish(&id, &t, true, &[])))
        .await;
    assert_eq!(code(r), Code::AlreadyExists);
    // Another volume at the same target: ALREADY_EXISTS.
    let other = create(&h, "w", &[]).await.volume_id;
    let r = h
        .node
        .node_publish_volume(Request::new(nfs_publish(&other, &t, false, &[])))
        .await;
    assert_eq!(code(r), Code::AlreadyExists);
    // A bad option never reaches mount.
    let r = h
        .node
        .node_publish_volume(Request::new(nfs_publish(
            &id,
            &h.path("x"),
            false,
            &["nolock,helper=x"],
        )))
        .await;
    assert_eq!(code(r), Code::InvalidArgument);
    h.fake().clear_calls();
    for target in [&t, &ro] {
        for _ in 0..2 {
            h.node
                .node_unpublish_volume(Request::new(unpublish_req(&id, target)))
                .await
                .unwrap();
        }
        assert!(!target.exists());
    }
    assert_eq!(
        runs(h.fake()),
        vec![
            (
                "umount".to_string(),
                v(&["-i", "-c", "--", &t.display().to_string()])
            ),
            (
                "umount".to_string(),
                v(&["-i", "-c", "--", &ro.display().to_string()])
            ),
        ]
    );
}

#[tokio::test]
async fn node_plugin_without_records_works_from_the_id() {
    let h = nfs(&["--mode", "node"]);
    let id = "nfs#d#nfs.example.com#/exports/berth#team-a/pvc-1";
    let t = h.path("target");
    h.node
        .node_publish_volume(Request::new(nfs_publish(id, &t, false, &[])))
        .await
        .unwrap();
    assert_eq!(
        runs(h.fake())[0].1[..2],
        v(&[
            "nfs.example.com:/exports/berth/team-a/pvc-1",
            &t.display().to_string()
        ])
    );
    let s = h
        .node
        .node_get_volume_stats(Request::new(csi::NodeGetVolumeStatsRequest {
            volume_id: id.into(),
            volume_path: t.display().to_string(),
            staging_target_path: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.usage.len(), 2);
    assert!(s.usage[0].total > 0);
    assert!(!s.volume_condition.unwrap().abnormal);
    h.node
        .node_unpublish_volume(Request::new(unpublish_req(id, &t)))
        .await
        .unwrap();
    // Ids no kind owns, or hostile ones: NOT_FOUND, nothing run.
    h.fake().clear_calls();
    for bad in [
        "nfs#d#h#/e#..",
        "nfs#d#h#/e#",
        "nfs#d#h#/e#a/../..",
        "nfs#d#h;rm#/e#a",
        "local-0123456789abcdef0123456789abcdef",
    ] {
        let r = h
            .node
            .node_publish_volume(Request::new(nfs_publish(bad, &h.path("t2"), false, &[])))
            .await;
        assert_eq!(code(r), Code::NotFound, "{bad}");
    }
    assert!(h.fake().calls().is_empty());
}

#[tokio::test]
async fn single_writer_volume_gets_one_target() {
    let h = nfs(&["--mode", "node"]);
    let id = "nfs#d#h#/e#v";
    let mut r = nfs_publish(id, &h.path("t1"), false, &[]);
    r.volume_capability = Some(mount_cap(Mode::SingleNodeSingleWriter));
    h.node
        .node_publish_volume(Request::new(r.clone()))
        .await
        .unwrap();
    r.target_path = h.path("t2").display().to_string();
    assert_eq!(
        code(h.node.node_publish_volume(Request::new(r)).await),
        Code::FailedPrecondition
    );
}

#[tokio::test]
async fn publish_that_times_out_is_deadline_exceeded_and_leaves_nothing() {
    let h = nfs(&["--mode", "node"]);
    let t = h.path("target");
    h.fake().reply("mount.nfs", timeout("mount.nfs"));
    let e = h
        .node
        .node_publish_volume(Request::new(nfs_publish("nfs#d#h#/e#v", &t, false, &[])))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{}", e.message());
    assert!(!t.exists(), "the target berth made is removed again");
    assert!(!h.fake().table().iter().any(|m| m.mount_point == t));
}

#[tokio::test]
async fn unpublish_with_a_dead_server_forces_then_lazily_unmounts() {
    let h = nfs(&["--mode", "node"]);
    let id = "nfs#d#h#/e#v";
    let t = h.path("target");
    let ts = t.display().to_string();
    // The normal unmount times out; the forced one works.
    h.node
        .node_publish_volume(Request::new(nfs_publish(id, &t, false, &[])))
        .await
        .unwrap();
    h.fake().clear_calls();
    h.fake().reply("umount", timeout("umount"));
    h.node
        .node_unpublish_volume(Request::new(unpublish_req(id, &t)))
        .await
        .unwrap();
    assert_eq!(
        runs(h.fake()),
        vec![
            ("umount".to_string(), v(&["-i", "-c", "--", &ts])),
            ("umount".to_string(), v(&["-f", "-i", "-c", "--", &ts])),
        ]
    );
    assert!(!t.exists());
    // The forced unmount leaves it mounted: lazily.
    h.node
        .node_publish_volume(Request::new(nfs_publish(id, &t, false, &[])))
        .await
        .unwrap();
    h.fake().clear_calls();
    h.fake().reply("umount", timeout("umount"));
    h.fake().reply("umount", exit(0, ""));
    h.node
        .node_unpublish_volume(Request::new(unpublish_req(id, &t)))
        .await
        .unwrap();
    assert_eq!(
        runs(h.fake()),
        vec![
            ("umount".to_string(), v(&["-i", "-c", "--", &ts])),
            ("umount".to_string(), v(&["-f", "-i", "-c", "--", &ts])),
            ("umount".to_string(), v(&["-l", "-i", "-c", "--", &ts])),
        ]
    );
    assert!(!t.exists());
    assert!(!h.fake().table().iter().any(|m| m.mount_point == t));
}

#[tokio::test]
async fn busy_unmount_is_an_error_never_forced() {
    let h = nfs(&["--mode", "node"]);
    let id = "nfs#d#h#/e#v";
    let t = h.path("target");
    h.node
        .node_publish_volume(Request::new(nfs_publish(id, &t, false, &[])))
        .await
        .unwrap();
    h.fake().clear_calls();
    h.fake()
        .reply("umount", exit(32, "umount: target is busy."));
    let e = h
        .node
        .node_unpublish_volume(Request::new(unpublish_req(id, &t)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Internal);
    assert!(e.message().contains("busy"), "{}", e.message());
    assert_eq!(runs(h.fake()).len(), 1, "no force, no lazy");
    assert!(h.fake().table().iter().any(|m| m.mount_point == t));
    // A retry that works.
    h.node
        .node_unpublish_volume(Request::new(unpublish_req(id, &t)))
        .await
        .unwrap();
}

/// A statvfs of the target that kubelet's NodeGetVolumeStats has in
/// flight (no guard: stats run beside every other call) is not a server
/// that does not answer. Before, the unpublish's own statvfs of the busy
/// mount found that key in flight, took that for "not responding" at once,
/// and forced and lazily unmounted a busy mount of a live server. Now it
/// waits for a call that is not overdue and asks itself.
#[tokio::test]
async fn a_busy_unmount_beside_a_stats_call_on_a_live_server_is_never_forced() {
    let h = nfs(&["--mode", "node"]);
    let id = "nfs#d#h#/e#v";
    let t = h.path("target");
    h.node
        .node_publish_volume(Request::new(nfs_publish(id, &t, false, &[])))
        .await
        .unwrap();
    // A live server that takes a moment to answer (well within the 2 s
    // stat timeout).
    h.fake()
        .set_statvfs_delay(&t, Some(Duration::from_millis(400)));
    h.fake().clear_calls();
    h.fake()
        .reply("umount", exit(32, "umount: target is busy."));
    let node = berth::node::NodeService {
        driver: h.driver.clone(),
    };
    let stats = tokio::spawn(async move {
        node.node_get_volume_stats(Request::new(stats_req(id, &t)))
            .await
            .map(|r| r.into_inner())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = h.path("target");
    let e = h
        .node
        .node_unpublish_volume(Request::new(unpublish_req(id, &t)))
        .await
        .expect_err("a busy mount of a live server is not unmounted");
    assert_eq!(e.code(), Code::Internal);
    assert!(e.message().contains("busy"), "{}", e.message());
    assert_eq!(
        runs(h.fake()).len(),
        1,
        "no force, no lazy: {:?}",
        runs(h.fake())
    );
    assert!(h.fake().table().iter().any(|m| m.mount_point == t));
    let s = stats.await.unwrap().unwrap();
    assert!(!s.volume_condition.unwrap().abnormal);
    h.fake().set_statvfs_delay(&t, None);
}

/// The controller's side of the same: a ControllerGetVolume's health
/// check has a statvfs of the share's working mount in flight (it takes no
/// share lock); a CreateVolume beside it was UNAVAILABLE ("NFS server ...
/// is not responding") from a server that answers.
#[tokio::test]
async fn a_create_beside_a_health_check_on_a_live_server_is_made() {
    let h = nfs(&[]);
    let id = create(&h, "v", &[]).await.volume_id;
    let root = share_root(&h);
    h.fake()
        .set_statvfs_delay(&root, Some(Duration::from_millis(400)));
    let ctl = berth::controller::ControllerService {
        driver: h.driver.clone(),
    };
    let get = tokio::spawn(async move {
        ctl.controller_get_volume(Request::new(csi::ControllerGetVolumeRequest {
            volume_id: id,
        }))
        .await
        .map(|r| r.into_inner())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = h.ctl.create_volume(Request::new(req("w", &[]))).await;
    assert!(r.is_ok(), "{:?}", r.err());
    let g = get.await.unwrap().unwrap();
    let c = g.status.unwrap().volume_condition.unwrap();
    assert!(!c.abnormal, "{c:?}");
    h.fake().set_statvfs_delay(&root, None);
}

#[tokio::test]
async fn force_and_lazy_unmounts_are_only_for_nfs() {
    // A local volume in an instance that serves both kinds: unpublish uses
    // plain umount(2) calls and never runs umount -f/-l.
    let (h, id, staging, t) = local_published().await;
    h.fake().reply("umount", timeout("umount"));
    h.fake().fail_next("unmount", libc::EBUSY);
    let e = h
        .node
        .node_unpublish_volume(Request::new(unpublish_req(&id, &t)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Internal);
    assert!(runs(h.fake()).is_empty(), "{:?}", runs(h.fake()));
    // A bind mount (not this NFS volume's share) found at an NFS volume's
    // target is not this volume's: refused, nothing unmounted, no umount
    // command run.
    let nfs_id = "nfs#d#h#/e#v";
    let t2 = h.path("t2");
    std::fs::create_dir(&t2).unwrap();
    use berth::os::Mounter;
    h.fake().bind(&staging, &t2, Default::default()).unwrap();
    h.fake().clear_calls();
    let r = h
        .node
        .node_unpublish_volume(Request::new(unpublish_req(nfs_id, &t2)))
        .await;
    assert_eq!(code(r), Code::FailedPrecondition);
    assert!(runs(h.fake()).is_empty());
    assert!(!h
        .fake()
        .calls()
        .iter()
        .any(|c| matches!(c, Call::Unmount { .. })));
    assert!(h.fake().table().iter().any(|m| m.mount_point == t2));
}

#[tokio::test]
async fn republish_of_a_stale_mount_mounts_again() {
    let h = nfs(&["--mode", "node"]);
    let id = "nfs#d#h#/e#v";
    let t = h.path("target");
    h.node
        .node_publish_volume(Request::new(nfs_publish(id, &t, false, &[])))
        .await
        .unwrap();
    h.fake().clear_calls();
    h.fake().fail_next("statvfs", libc::ESTALE);
    h.node
        .node_publish_volume(Request::new(nfs_publish(id, &t, false, &[])))
        .await
        .unwrap();
    let r = runs(h.fake());
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!((r[0].0.as_str(), r[1].0.as_str()), ("umount", "mount.nfs"));
    assert_eq!(
        h.fake()
            .table()
            .iter()
            .filter(|m| m.mount_point == t)
            .count(),
        1
    );
}

#[tokio::test]
async fn stats_report_stale_and_hung_servers_as_abnormal_without_hanging() {
    let h = nfs(&["--mode", "node", "--nfs-timeout", "1"]);
    let id = "nfs#d#h#/e#v";
    let t = h.path("target");
    h.node
        .node_publish_volume(Request::new(nfs_publish(id, &t, false, &[])))
        .await
        .unwrap();
    let stats = |path: &Path| csi::NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: path.display().to_string(),
        staging_target_path: String::new(),
    };
    h.fake().fail_next("statvfs", libc::ESTALE);
    let s = h
        .node
        .node_get_volume_stats(Request::new(stats(&t)))
        .await
        .unwrap()
        .into_inner();
    assert!(s.usage.is_empty());
    let c = s.volume_condition.unwrap();
    assert!(c.abnormal && c.message.contains("stale"), "{c:?}");
    h.fake().set_statvfs_delay(&t, Some(Duration::from_secs(3)));
    let t0 = Instant::now();
    let s = h
        .node
        .node_get_volume_stats(Request::new(stats(&t)))
        .await
        .unwrap()
        .into_inner();
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t0.elapsed()
    );
    let c = s.volume_condition.unwrap();
    assert!(c.abnormal && c.message.contains("not responding"), "{c:?}");
    assert!(s.usage.is_empty());
    h.fake().set_statvfs_delay(&t, None);
    // Not mounted there: NOT_FOUND.
    let r = h
        .node
        .node_get_volume_stats(Request::new(stats(&h.path("elsewhere"))))
        .await;
    assert_eq!(code(r), Code::NotFound);
}

#[tokio::test]
async fn mixed_instance_stages_nfs_as_a_no_op_and_publishes_at_the_target() {
    let h = fake(&["--kinds", "local,nfs", "--nfs-timeout", "2"]);
    h.fake().emulate_nfs_mounts();
    let id = create(&h, "v", &[]).await.volume_id;
    assert!(id.starts_with("nfs#"));
    h.fake().clear_calls();
    let staging = h.path("staging");
    let mut st = stage_req(&id, &staging);
    st.volume_capability = Some(mount_cap(Mode::MultiNodeMultiWriter));
    h.node.node_stage_volume(Request::new(st)).await.unwrap();
    assert!(h.fake().calls().is_empty());
    let t = h.path("t");
    let mut p = nfs_publish(&id, &t, false, &[]);
    p.staging_target_path = staging.display().to_string();
    h.node.node_publish_volume(Request::new(p)).await.unwrap();
    assert_eq!(
        runs(h.fake())[0].1[..2],
        v(&["127.0.0.1:/export/v", &t.display().to_string()])
    );
    h.node
        .node_unpublish_volume(Request::new(unpublish_req(&id, &t)))
        .await
        .unwrap();
    h.node
        .node_unstage_volume(Request::new(csi::NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.display().to_string(),
        }))
        .await
        .unwrap();
    // A local volume still needs its staging path.
    let loc = h
        .ctl
        .create_volume(Request::new(create_req("loc", 1 << 20)))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let mut p = publish_req(&loc, &staging, &h.path("t3"), false);
    p.staging_target_path.clear();
    assert_eq!(
        code(h.node.node_publish_volume(Request::new(p)).await),
        Code::FailedPrecondition
    );
    try_delete(&h, &id).await.unwrap();
}

#[tokio::test]
async fn list_get_and_validate_nfs_volumes() {
    let h = nfs(&[]);
    let id = create(&h, "v", &[]).await.volume_id;
    let l = h
        .ctl
        .list_volumes(Request::new(Default::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(l.entries.len(), 1);
    let st = l.entries[0].status.as_ref().unwrap();
    assert!(!st.volume_condition.as_ref().unwrap().abnormal);
    std::fs::remove_dir_all(share_root(&h).join("v")).unwrap();
    let g = h
        .ctl
        .controller_get_volume(Request::new(csi::ControllerGetVolumeRequest {
            volume_id: id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    let c = g.status.unwrap().volume_condition.unwrap();
    assert!(c.abnormal && c.message.contains("missing"), "{c:?}");
    let r = h
        .ctl
        .validate_volume_capabilities(Request::new(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: id.clone(),
            volume_capabilities: vec![mount_cap(Mode::MultiNodeMultiWriter)],
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(r.confirmed.is_some(), "{}", r.message);
    let r = h
        .ctl
        .validate_volume_capabilities(Request::new(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: id,
            volume_capabilities: vec![block_cap(Mode::MultiNodeMultiWriter)],
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(r.confirmed.is_none());
}

/// ControllerGetVolume's condition of a volume looks at its directory on
/// the share through the OS layer, below the working mount, never
/// following a symlink: a parent on the share replaced by a symlink (by
/// anyone who writes to the share) led the look (a plain
/// `symlink_metadata`, which follows symlinks in every component but the
/// last) out of the share, here to a directory of the controller's host,
/// and the volume was reported healthy while its directory is not
/// reached. And the look is bounded like the rest: a server that stops
/// answering it is 'not responding' within the stat timeout.
#[tokio::test]
async fn the_health_check_never_follows_a_symlink_on_the_share() {
    let h = nfs(&[]);
    let id = create(&h, "v", &[("subDir", "a/b")]).await.volume_id;
    let root = share_root(&h);
    let condition = || async {
        h.ctl
            .controller_get_volume(Request::new(csi::ControllerGetVolumeRequest {
                volume_id: id.clone(),
            }))
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap()
            .volume_condition
            .unwrap()
    };
    let c = condition().await;
    assert!(!c.abnormal, "{c:?}");
    assert!(h.fake().lstats().contains(&root.join("a/b")));
    // A directory outside the share holding `b`, and `a` a symlink to it.
    let outside = h.path("outside");
    std::fs::create_dir_all(outside.join("b")).unwrap();
    std::fs::rename(root.join("a"), root.join("a-moved")).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("a")).unwrap();
    let c = condition().await;
    assert!(c.abnormal, "followed the symlink out of the share: {c:?}");
    assert!(c.message.contains("not a plain directory"), "{c:?}");
    // Put back: healthy again; the volume's directory itself a symlink
    // (to a directory) is not its directory.
    std::fs::remove_file(root.join("a")).unwrap();
    std::fs::rename(root.join("a-moved"), root.join("a")).unwrap();
    assert!(!condition().await.abnormal);
    std::fs::rename(root.join("a/b"), root.join("b-moved")).unwrap();
    std::os::unix::fs::symlink(root.join("b-moved"), root.join("a/b")).unwrap();
    let c = condition().await;
    assert!(c.abnormal && c.message.contains("not a directory"), "{c:?}");
    std::fs::remove_file(root.join("a/b")).unwrap();
    std::fs::rename(root.join("b-moved"), root.join("a/b")).unwrap();
    // A look that does not answer: not responding, within the stat
    // timeout (--nfs-timeout 2 here).
    h.fake()
        .set_lstat_delay(&root.join("a/b"), Some(Duration::from_secs(4)));
    let t0 = Instant::now();
    let c = condition().await;
    assert!(c.abnormal && c.message.contains("not responding"), "{c:?}");
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    h.fake().set_lstat_delay(&root.join("a/b"), None);
}

#[tokio::test]
async fn unpublish_forces_when_its_own_stuck_statvfs_keeps_the_mount_busy() {
    // kubelet asked for stats of a volume whose server is gone: that
    // statvfs is stuck and keeps the mount busy, so a normal umount fails
    // with "busy" at once. That also means "server not responding".
    let h = nfs(&["--mode", "node", "--nfs-timeout", "1"]);
    let id = "nfs#d#h#/e#v";
    let t = h.path("target");
    h.node
        .node_publish_volume(Request::new(nfs_publish(id, &t, false, &[])))
        .await
        .unwrap();
    h.fake().set_statvfs_delay(&t, Some(Duration::from_secs(3)));
    let s = h
        .node
        .node_get_volume_stats(Request::new(csi::NodeGetVolumeStatsRequest {
            volume_id: id.into(),
            volume_path: t.display().to_string(),
            staging_target_path: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(s.volume_condition.unwrap().abnormal);
    h.fake().clear_calls();
    h.fake()
        .reply("umount", exit(32, "umount: target is busy."));
    h.node
        .node_unpublish_volume(Request::new(unpublish_req(id, &t)))
        .await
        .unwrap();
    let r = runs(h.fake());
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!(r[1].1[..2], v(&["-f", "-i"]));
    assert!(!t.exists());
    h.fake().set_statvfs_delay(&t, None);
}

/// A `soft` mount's statvfs does not hang when the server is gone: its
/// RPCs give up, ETIMEDOUT (`softerr`) or EIO (plain `soft`), which is the
/// same "server not responding". Before, only a statvfs that hung counted,
/// so a busy soft mount of a dead server (a process with its working
/// directory there) failed NodeUnpublishVolume with "busy" for as long as
/// the server stayed away, the pod Terminating. Any other error of the
/// statvfs is still no reason to force.
#[tokio::test]
async fn a_busy_soft_mount_whose_statvfs_times_out_is_forced() {
    let h = nfs(&["--mode", "node"]);
    let id = "nfs#d#h#/e#v";
    let t = h.path("target");
    let soft = ["soft", "timeo=10", "retrans=1"];
    for errno in [libc::ETIMEDOUT, libc::EIO] {
        h.node
            .node_publish_volume(Request::new(nfs_publish(id, &t, false, &soft)))
            .await
            .unwrap();
        h.fake().clear_calls();
        h.fake()
            .reply("umount", exit(32, "umount: target is busy."));
        h.fake().fail_next("statvfs", errno);
        h.node
            .node_unpublish_volume(Request::new(unpublish_req(id, &t)))
            .await
            .unwrap_or_else(|e| panic!("errno {errno}: {e:?}"));
        let r = runs(h.fake());
        assert_eq!(r.len(), 2, "errno {errno}: {r:?}");
        assert_eq!(r[1].1[..2], v(&["-f", "-i"]));
        assert!(!t.exists());
    }
    h.node
        .node_publish_volume(Request::new(nfs_publish(id, &t, false, &soft)))
        .await
        .unwrap();
    h.fake().clear_calls();
    h.fake()
        .reply("umount", exit(32, "umount: target is busy."));
    h.fake().fail_next("statvfs", libc::EACCES);
    let e = h
        .node
        .node_unpublish_volume(Request::new(unpublish_req(id, &t)))
        .await
        .unwrap_err();
    assert!(e.message().contains("busy"), "{}", e.message());
    assert_eq!(runs(h.fake()).len(), 1, "no force, no lazy");
}

#[tokio::test]
async fn expansion_records_the_size_and_needs_nothing_on_the_node() {
    let h = nfs(&[]);
    use csi::controller_service_capability::rpc::Type as C;
    assert!(controller_rpcs(&h)
        .await
        .contains(&(C::ExpandVolume as i32)));
    let id = create(&h, "v", &[]).await.volume_id;
    let expand = |required: i64, limit: i64| csi::ControllerExpandVolumeRequest {
        volume_id: id.clone(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        }),
        ..Default::default()
    };
    let r = h
        .ctl
        .controller_expand_volume(Request::new(expand(10 << 20, 0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 10 << 20);
    assert!(!r.node_expansion_required);
    assert_eq!(h.driver.store.get(&id).unwrap().capacity_bytes, 10 << 20);
    // Never shrinks.
    let r = h
        .ctl
        .controller_expand_volume(Request::new(expand(1 << 20, 0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 10 << 20);
    assert_eq!(
        code(
            h.ctl
                .controller_expand_volume(Request::new(expand(1 << 20, 2 << 20)))
                .await
        ),
        Code::OutOfRange
    );
    let t = h.path("t");
    h.node
        .node_publish_volume(Request::new(nfs_publish(&id, &t, false, &[])))
        .await
        .unwrap();
    let node_expand = |path: &Path| csi::NodeExpandVolumeRequest {
        volume_id: id.clone(),
        volume_path: path.display().to_string(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: 10 << 20,
            limit_bytes: 0,
        }),
        ..Default::default()
    };
    let r = h
        .node
        .node_expand_volume(Request::new(node_expand(&t)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 10 << 20);
    let r = h
        .node
        .node_expand_volume(Request::new(node_expand(&h.path("nowhere"))))
        .await;
    assert_eq!(code(r), Code::NotFound);
}

#[tokio::test]
async fn list_volumes_with_a_hung_server_answers_within_one_timeout() {
    let h = nfs(&["--nfs-timeout", "1"]);
    for i in 0..5 {
        create(&h, &format!("v{i}"), &[]).await;
    }
    let root = share_root(&h);
    h.fake()
        .set_statvfs_delay(&root, Some(Duration::from_secs(3)));
    let t0 = Instant::now();
    let l = h
        .ctl
        .list_volumes(Request::new(Default::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(l.entries.len(), 5);
    for e in &l.entries {
        let c = e
            .status
            .as_ref()
            .unwrap()
            .volume_condition
            .as_ref()
            .unwrap();
        assert!(c.abnormal && c.message.contains("not responding"), "{c:?}");
    }
    h.fake().set_statvfs_delay(&root, None);
}

#[tokio::test]
async fn busy_unmount_with_a_hung_server_is_forced_after_the_stat_timeout() {
    // A process stuck on the dead server keeps the mount busy; a statvfs
    // of it does not answer either: the server is not responding.
    let h = nfs(&["--mode", "node", "--nfs-timeout", "1"]);
    let id = "nfs#d#h#/e#v";
    let t = h.path("target");
    h.node
        .node_publish_volume(Request::new(nfs_publish(id, &t, false, &[])))
        .await
        .unwrap();
    h.fake().set_statvfs_delay(&t, Some(Duration::from_secs(3)));
    h.fake().clear_calls();
    h.fake()
        .reply("umount", exit(32, "umount: target is busy."));
    let t0 = Instant::now();
    h.node
        .node_unpublish_volume(Request::new(unpublish_req(id, &t)))
        .await
        .unwrap();
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t0.elapsed()
    );
    let r = runs(h.fake());
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!(r[1].1[..2], v(&["-f", "-i"]));
    assert!(!t.exists());
    h.fake().set_statvfs_delay(&t, None);
}

#[tokio::test]
async fn expansion_works_from_the_id_when_the_record_is_lost() {
    let h = nfs(&[]);
    let id = create(&h, "lost", &[]).await.volume_id;
    // The controller's state is gone (an emptyDir in deploy/).
    h.driver.store.remove(&id).unwrap();
    let r = h
        .ctl
        .controller_expand_volume(Request::new(csi::ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 20 << 20,
                limit_bytes: 0,
            }),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 20 << 20);
    assert!(!r.node_expansion_required);
    // An id no kind owns is still NOT_FOUND.
    let e = h
        .ctl
        .controller_expand_volume(Request::new(csi::ControllerExpandVolumeRequest {
            volume_id: "nfs#x#../..#etc".into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 1,
                limit_bytes: 0,
            }),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

/// ControllerExpandVolume of an NFS id without a record answers from the
/// share, as ControllerGetVolume does: NOT_FOUND unless the directory the
/// id names carries the id's marker (a deleted volume, an id naming a
/// directory Berth never made), and nothing is recorded. Before, it
/// answered OK with the requested size for any well-formed id.
#[tokio::test]
async fn expansion_of_an_nfs_volume_that_does_not_exist_is_not_found() {
    let h = nfs(&[]);
    let expand = |id: &str| csi::ControllerExpandVolumeRequest {
        volume_id: id.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: 20 << 20,
            limit_bytes: 0,
        }),
        ..Default::default()
    };
    let id = create(&h, "gone", &[]).await.volume_id;
    h.ctl
        .delete_volume(Request::new(csi::DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert!(!share_root(&h).join("gone").exists());
    let r = h
        .ctl
        .controller_expand_volume(Request::new(expand(&id)))
        .await;
    assert_eq!(code(r), Code::NotFound);
    // A directory on the share without the id's marker is no volume.
    std::fs::create_dir_all(share_root(&h).join("nobody")).unwrap();
    let r = h
        .ctl
        .controller_expand_volume(Request::new(expand("nfs#d#127.0.0.1#/export#nobody")))
        .await;
    assert_eq!(code(r), Code::NotFound);
    assert!(h.driver.store.is_empty());
}

/// NodeExpandVolume of an NFS volume whose size (10 MiB) is more than the
/// request's limit_bytes: OUT_OF_RANGE, as for the other kinds (the size
/// never shrinks) and as ControllerExpandVolume answers it. Before, it
/// answered OK with 10 MiB, more than the limit it was given.
#[tokio::test]
async fn nfs_node_expansion_never_answers_more_than_the_limit() {
    let h = nfs(&[]);
    let id = create(&h, "v", &[]).await.volume_id;
    h.ctl
        .controller_expand_volume(Request::new(csi::ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 10 << 20,
                limit_bytes: 0,
            }),
            ..Default::default()
        }))
        .await
        .unwrap();
    let t = h.path("t");
    h.node
        .node_publish_volume(Request::new(nfs_publish(&id, &t, false, &[])))
        .await
        .unwrap();
    let node_expand = |required: i64, limit: i64| csi::NodeExpandVolumeRequest {
        volume_id: id.clone(),
        volume_path: t.display().to_string(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        }),
        ..Default::default()
    };
    let r = h
        .node
        .node_expand_volume(Request::new(node_expand(0, 5 << 20)))
        .await;
    assert_eq!(code(r), Code::OutOfRange);
    // Within the limit: the size it has.
    let r = h
        .node
        .node_expand_volume(Request::new(node_expand(1 << 20, 10 << 20)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 10 << 20);
    assert_eq!(h.driver.store.get(&id).unwrap().capacity_bytes, 10 << 20);
}

// ------------------------------------------------------------ ownership

/// What a directory's Berth marker says (None: no marker).
fn marker_of(dir: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read(dir.join(".berth-volume")).ok()?;
    serde_json::from_slice(&text).ok()
}

fn templated(name: &str, namespace: &str) -> Vec<(&'static str, String)> {
    vec![
        ("subDir", "${pvc.metadata.name}".to_string()),
        ("csi.storage.k8s.io/pvc/name", name.to_string()),
        ("csi.storage.k8s.io/pvc/namespace", namespace.to_string()),
    ]
}

fn pairs<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    v.iter().map(|(k, x)| (*k, x.as_str())).collect()
}

/// CreateVolume marks the directory it makes; a directory on the share that
/// Berth did not make for this volume is never adopted (ALREADY_EXISTS),
/// also after the controller lost its records: a same-named PVC of another
/// namespace does not get the first one's data, while a retry of the first
/// one's own CreateVolume does.
#[tokio::test]
async fn create_never_adopts_a_directory_berth_did_not_make() {
    let h = nfs(&[]);
    let first = create(&h, "pvc-first", &[]).await.volume_id;
    let root = share_root(&h);
    let m = marker_of(&root.join("pvc-first")).expect("marker");
    assert_eq!(m["id"], first.as_str());
    assert_eq!(m["name"], "pvc-first");
    // Someone's directory on the share, with data and its own mode.
    std::fs::create_dir(root.join("existing")).unwrap();
    std::fs::write(root.join("existing/data"), b"theirs").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        root.join("existing"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    let e = create_err(
        &h,
        req(
            "pvc-x",
            &[("subDir", "existing"), ("mountPermissions", "0777")],
        ),
    )
    .await;
    assert_eq!(e.code(), Code::AlreadyExists, "{}", e.message());
    assert!(e.message().contains("existing"), "{}", e.message());
    assert!(e.message().contains("marker"), "{}", e.message());
    let mode = std::fs::metadata(root.join("existing"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o700, "never chmodded");
    assert!(marker_of(&root.join("existing")).is_none());

    // team-a's PVC "data"; the controller then loses its records.
    let ta = templated("data", "team-a");
    let a = pairs(&ta);
    let ida = create(&h, "pvc-aaaa", &a).await.volume_id;
    std::fs::write(root.join("data/secret"), b"team-a").unwrap();
    std::fs::remove_dir_all(h.path("state/journal")).unwrap();
    let h = restart(h, &["--kinds", "nfs"]);
    // team-b's PVC of the same name asks for the same directory.
    let b = templated("data", "team-b");
    let e = create_err(&h, req("pvc-bbbb", &pairs(&b))).await;
    assert_eq!(e.code(), Code::AlreadyExists, "{}", e.message());
    assert!(e.message().contains("pvc-aaaa"), "{}", e.message());
    assert!(h.driver.store.is_empty());
    // team-a's own retry finds its directory again.
    assert_eq!(create(&h, "pvc-aaaa", &a).await.volume_id, ida);
    assert_eq!(std::fs::read(root.join("data/secret")).unwrap(), b"team-a");
}

/// DeleteVolume without a record touches only a directory whose marker
/// names the id: a handle naming a directory Berth did not make (someone's
/// home directories) deletes and archives nothing.
#[tokio::test]
async fn delete_touches_only_a_directory_whose_marker_names_the_id() {
    let h = nfs(&[]);
    let mine = create(&h, "mine", &[]).await.volume_id;
    let root = share_root(&h);
    std::fs::create_dir_all(root.join("home/user1")).unwrap();
    std::fs::write(root.join("home/user1/file"), b"keep").unwrap();
    for id in [
        "nfs#d#127.0.0.1#/export#home",
        "nfs#a#127.0.0.1#/export#home",
        "nfs#d#127.0.0.1#/export#home/user1",
    ] {
        try_delete(&h, id).await.unwrap();
    }
    assert_eq!(
        std::fs::read(root.join("home/user1/file")).unwrap(),
        b"keep"
    );
    assert!(!root.join(".berth-archive").exists());
    // A marker naming another volume does not count either.
    std::fs::create_dir(root.join("other")).unwrap();
    std::fs::write(
        root.join("other/.berth-volume"),
        br#"{"id":"nfs#d#127.0.0.1#/export#elsewhere","name":"x","created_unix":1}"#,
    )
    .unwrap();
    try_delete(&h, "nfs#d#127.0.0.1#/export#other")
        .await
        .unwrap();
    assert!(root.join("other/.berth-volume").exists());
    // The share root is never a volume, and "/" is not an allowed share
    // unless listed: nothing is mounted for it.
    h.fake().clear_calls();
    try_delete(&h, "nfs#d#127.0.0.1#/#home").await.unwrap();
    assert!(runs(h.fake()).is_empty(), "{:?}", runs(h.fake()));
    // The volume Berth made is deleted, marker and all.
    try_delete(&h, &mine).await.unwrap();
    assert!(!root.join("mine").exists());
}

/// Overlap is decided on the resolved export path: a volume in share
/// /export at a, and one in share /export/a at b, are the same tree.
#[tokio::test]
async fn aliased_shares_overlap_on_the_resolved_path() {
    for first_outer in [true, false] {
        let h = nfs(&[]);
        let outer = [("share", "/export"), ("subDir", "a")];
        let inner = [("share", "/export/a"), ("subDir", "b")];
        let (one, two) = if first_outer {
            (outer, inner)
        } else {
            (inner, outer)
        };
        create(&h, "one", &one).await;
        let e = create_err(&h, req("two", &two)).await;
        assert_eq!(e.code(), Code::AlreadyExists, "{}", e.message());
        // The same directory through another share is the same volume's.
        let same = [("share", "/export/a"), ("subDir", "x")];
        let other = [("share", "/export"), ("subDir", "a/x")];
        let h = nfs(&[]);
        create(&h, "s1", &same).await;
        let e = create_err(&h, req("s2", &other)).await;
        assert_eq!(e.code(), Code::AlreadyExists, "{}", e.message());
    }
}

/// Overlap is decided on the server as an address, not as it is spelled:
/// `[FD00:0::1]` is `[fd00::1]` to the kernel, so a volume on one spelling
/// inside another's directory on the other is ALREADY_EXISTS. Before, only
/// the case was ignored: the second was made inside the first volume's
/// directory, whose tenant could read and change it, and whose delete
/// would take it along. Forms of an IPv4 address other than a.b.c.d, which
/// the resolver and the kernel read as that address (a numeric host name,
/// `0x7f.1`, `0x7f000001`; an IPv4-mapped IPv6 address,
/// `[::ffff:127.0.0.1]`), are INVALID_ARGUMENT naming the plain form;
/// before, they were taken for other servers and nested unseen too.
#[tokio::test]
async fn another_spelling_of_the_server_address_overlaps_too() {
    for (first, second) in [("[FD00::1]", "[fd00:0::1]"), ("[fd00::1]", "[FD00:0:0::1]")] {
        let h = nfs(&[]);
        let one = create(
            &h,
            "one",
            &[("server", first), ("share", "/export"), ("subDir", "a")],
        )
        .await;
        let e = create_err(
            &h,
            req(
                "two",
                &[("server", second), ("share", "/export/a"), ("subDir", "b")],
            ),
        )
        .await;
        assert_eq!(
            e.code(),
            Code::AlreadyExists,
            "{first} {second}: {}",
            e.message()
        );
        assert!(e.message().contains(&one.volume_id), "{}", e.message());
        assert_eq!(h.driver.store.len(), 1);
    }
    let h = nfs(&[]);
    create(&h, "one", &[("subDir", "a")]).await;
    h.fake().clear_calls();
    for odd in ["0x7f.1", "0x7f000001", "0X7F.0.0.1", "[::ffff:127.0.0.1]"] {
        let e = create_err(
            &h,
            req(
                "odd",
                &[("server", odd), ("share", "/export/a"), ("subDir", "b")],
            ),
        )
        .await;
        assert_eq!(e.code(), Code::InvalidArgument, "{odd}: {}", e.message());
        assert!(
            e.message().contains("write it as 127.0.0.1"),
            "{}",
            e.message()
        );
    }
    assert!(runs(h.fake()).is_empty(), "{:?}", runs(h.fake()));
}

/// A volume with another volume's marked directory inside it is neither
/// deleted nor archived (that would take the other's data with it).
#[tokio::test]
async fn delete_refuses_a_volume_with_another_volume_inside() {
    let h = nfs(&[]);
    let outer = create(&h, "outer", &[]).await.volume_id;
    let arch = create(&h, "arch", &[("onDelete", "archive")])
        .await
        .volume_id;
    let root = share_root(&h);
    for (dir, id) in [
        (
            "outer/deep/inner",
            "nfs#d#127.0.0.1#/export/outer/deep#inner",
        ),
        ("arch/inner", "nfs#d#127.0.0.1#/export/arch#inner"),
    ] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
        std::fs::write(root.join(dir).join("data"), b"inner").unwrap();
        std::fs::write(
            root.join(dir).join(".berth-volume"),
            format!(r#"{{"id":"{id}","name":"inner","created_unix":1}}"#),
        )
        .unwrap();
    }
    for id in [&outer, &arch] {
        let e = try_delete(&h, id).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
        assert!(e.message().contains("inner"), "{}", e.message());
    }
    assert!(root.join("outer/deep/inner/data").exists());
    assert!(root.join("arch/inner/data").exists());
    assert_eq!(h.driver.store.len(), 2);
    // Once the inner one is gone, the delete goes through.
    std::fs::remove_dir_all(root.join("outer/deep/inner")).unwrap();
    try_delete(&h, &outer).await.unwrap();
    assert!(!root.join("outer").exists());
}

/// Archives go to .berth-archive at the share root, named by the id's
/// subdirectory, the time and a hash of the id; no volume name reaches
/// them (subdirectories starting with .berth are refused).
#[tokio::test]
async fn archives_are_out_of_reach_of_volume_names() {
    let h = nfs(&[]);
    let id = create(&h, "arc", &[("onDelete", "archive"), ("subDir", "ns/arc")])
        .await
        .volume_id;
    let root = share_root(&h);
    std::fs::write(root.join("ns/arc/f"), b"data").unwrap();
    try_delete(&h, &id).await.unwrap();
    assert!(!root.join("ns/arc").exists());
    assert_eq!(std::fs::read_dir(root.join("ns")).unwrap().count(), 0);
    let archived: Vec<PathBuf> = std::fs::read_dir(root.join(".berth-archive"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(archived.len(), 1, "{archived:?}");
    assert_eq!(std::fs::read(archived[0].join("f")).unwrap(), b"data");
    assert_eq!(marker_of(&archived[0]).unwrap()["id"], id.as_str());
    for sub in [
        ".berth-archive",
        "x/.berth-archive",
        ".berth-volume",
        ".berthx",
    ] {
        let e = create_err(&h, req("sneaky", &[("subDir", sub)])).await;
        assert_eq!(e.code(), Code::InvalidArgument, "{sub}: {}", e.message());
    }
    let e = create_err(
        &h,
        req(
            "sneaky",
            &[
                ("subDir", "${pvc.metadata.name}"),
                ("csi.storage.k8s.io/pvc/name", ".berth-archive"),
            ],
        ),
    )
    .await;
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
}

/// --nfs-allowed-shares confines Berth to the listed exports (and what is
/// below them); without it any share but "/" is allowed, and "/" only when
/// listed. Ids on other shares are not Berth's: nothing is touched.
#[tokio::test]
async fn allowed_shares_confine_create_delete_and_publish() {
    let h = nfs(&[]);
    let e = create_err(&h, req("root", &[("share", "/")])).await;
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(
        e.message().contains("--nfs-allowed-shares"),
        "{}",
        e.message()
    );

    let h = nfs(&["--nfs-allowed-shares", "127.0.0.1:/export,[fd00::1]:/"]);
    create(&h, "ok", &[]).await;
    create(&h, "below", &[("share", "/export/sub")]).await;
    create(&h, "v6", &[("server", "[fd00::1]"), ("share", "/")]).await;
    for (server, share) in [
        ("127.0.0.1", "/other"),
        ("127.0.0.2", "/export"),
        ("127.0.0.1", "/"),
    ] {
        let e = create_err(&h, req("no", &[("server", server), ("share", share)])).await;
        assert_eq!(
            e.code(),
            Code::InvalidArgument,
            "{server}:{share}: {}",
            e.message()
        );
    }
    h.fake().clear_calls();
    try_delete(&h, "nfs#d#127.0.0.1#/other#v").await.unwrap();
    assert!(runs(h.fake()).is_empty());
    let r = h
        .node
        .node_publish_volume(Request::new(nfs_publish(
            "nfs#d#127.0.0.1#/other#v",
            &h.path("t"),
            false,
            &[],
        )))
        .await;
    assert_eq!(code(r), Code::NotFound);
    assert!(runs(h.fake()).is_empty());
    // Bad entries are refused at start.
    for bad in ["export", "127.0.0.1:export", "-o:/x", "h:/a/../b"] {
        let cli = berth::config::Cli::try_parse_from(["berth", "--nfs-allowed-shares", bad]);
        assert!(cli.is_err(), "{bad}");
    }
}

/// A share taken out of `--nfs-allowed-shares` while volumes recorded
/// on it exist: DeleteVolume of such a volume is FAILED_PRECONDITION
/// naming the flag, and nothing is mounted or removed; with the share
/// allowed again it is deleted. Before, it answered OK as for an id that
/// is not Berth's: the record stayed in the state and the tenant's
/// directory on the share for good, and the PV went without a word.
#[tokio::test]
async fn a_recorded_volume_on_a_share_no_longer_allowed_is_not_forgotten() {
    let h = nfs(&[]);
    let id = create(&h, "v", &[]).await.volume_id;
    let h = restart(
        h,
        &["--kinds", "nfs", "--nfs-allowed-shares", "127.0.0.1:/other"],
    );
    h.fake().clear_calls();
    let e = try_delete(&h, &id)
        .await
        .expect_err("deleted off the allowed shares");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("--nfs-allowed-shares"), "{e:?}");
    // Nor is it snapshotted or expanded (before: INTERNAL, NOT_FOUND).
    let e = h
        .ctl
        .create_snapshot(Request::new(csi::CreateSnapshotRequest {
            name: "s".into(),
            source_volume_id: id.clone(),
            ..Default::default()
        }))
        .await
        .expect_err("snapshotted off the allowed shares");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("--nfs-allowed-shares"), "{e:?}");
    let e = h
        .ctl
        .controller_expand_volume(Request::new(csi::ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 2 << 30,
                limit_bytes: 0,
            }),
            ..Default::default()
        }))
        .await
        .expect_err("expanded off the allowed shares");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("--nfs-allowed-shares"), "{e:?}");
    // It exists: ControllerGetVolume answers it abnormal, without a look
    // at the share (before: NOT_FOUND).
    let got = h
        .ctl
        .controller_get_volume(Request::new(csi::ControllerGetVolumeRequest {
            volume_id: id.clone(),
        }))
        .await
        .expect("get off the allowed shares")
        .into_inner();
    let c = got.status.unwrap().volume_condition.unwrap();
    assert!(
        c.abnormal && c.message.contains("--nfs-allowed-shares"),
        "{c:?}"
    );
    assert!(runs(h.fake()).is_empty(), "{:?}", runs(h.fake()));
    assert!(h.driver.store.get(&id).is_some());
    assert!(h.driver.store.snapshot_by_name("s").is_none());
    let (_, report) = state_check(&h);
    assert!(
        report.contains(&id) && report.contains("--nfs-allowed-shares does not allow"),
        "{report}"
    );
    let h = restart(h, &["--kinds", "nfs"]);
    try_delete(&h, &id).await.expect("delete");
    assert!(h.driver.store.get(&id).is_none());
}

/// ControllerGetVolume and ValidateVolumeCapabilities of an NFS id without
/// a record answer from the share: NOT_FOUND unless the directory's marker
/// names the id. ValidateVolumeCapabilities checks the parameters too.
#[tokio::test]
async fn get_and_validate_need_the_volume_to_exist() {
    let h = nfs(&[]);
    let v = create(&h, "v", &[("onDelete", "retain")]).await;
    let (id, ctx) = (v.volume_id, v.volume_context);
    let get = |id: &str| csi::ControllerGetVolumeRequest {
        volume_id: id.into(),
    };
    let validate = |id: &str, params: &[(&str, &str)]| csi::ValidateVolumeCapabilitiesRequest {
        volume_id: id.into(),
        volume_capabilities: vec![mount_cap(Mode::MultiNodeMultiWriter)],
        parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    };
    // The volume_context, when given, must be the one CreateVolume returned.
    let with_context = |id: &str, ctx: &HashMap<String, String>| {
        let mut r = validate(id, &[]);
        r.volume_context = ctx.clone();
        r
    };
    let mut other_dir = ctx.clone();
    other_dir.insert("subDir".into(), "elsewhere".into());
    let mut extra = ctx.clone();
    extra.insert("foo".into(), "bar".into());
    let confirmed = |r: csi::ValidateVolumeCapabilitiesResponse| {
        assert_eq!(r.message.is_empty(), r.confirmed.is_some(), "{}", r.message);
        r.confirmed.is_some()
    };
    let nobody = "nfs#d#127.0.0.1#/export#nobody";
    assert_eq!(
        code(h.ctl.controller_get_volume(Request::new(get(nobody))).await),
        Code::NotFound
    );
    assert_eq!(
        code(
            h.ctl
                .validate_volume_capabilities(Request::new(validate(nobody, &[])))
                .await
        ),
        Code::NotFound
    );
    // Parameters: the volume's own are confirmed; others are not.
    let own = [
        ("kind", "nfs"),
        ("server", SERVER),
        ("share", SHARE),
        ("onDelete", "retain"),
    ];
    let r = h
        .ctl
        .validate_volume_capabilities(Request::new(validate(&id, &own)))
        .await
        .unwrap()
        .into_inner();
    assert!(r.confirmed.is_some(), "{}", r.message);
    for bad in [
        &[
            ("kind", "nfs"),
            ("server", SERVER),
            ("share", "/elsewhere"),
            ("onDelete", "retain"),
        ][..],
        &[("kind", "nfs"), ("server", SERVER), ("share", SHARE)],
        &[("color", "blue")],
    ] {
        let r = h
            .ctl
            .validate_volume_capabilities(Request::new(validate(&id, bad)))
            .await
            .unwrap()
            .into_inner();
        assert!(r.confirmed.is_none(), "{bad:?} confirmed");
        assert!(!r.message.is_empty());
    }
    // The record is lost: the marker on the share still proves the volume.
    h.driver.store.remove(&id).unwrap();
    h.ctl
        .controller_get_volume(Request::new(get(&id)))
        .await
        .unwrap();
    let r = h
        .ctl
        .validate_volume_capabilities(Request::new(validate(&id, &own)))
        .await
        .unwrap()
        .into_inner();
    assert!(r.confirmed.is_some(), "{}", r.message);
    let r = h
        .ctl
        .validate_volume_capabilities(Request::new(validate(&id, &own[..3])))
        .await
        .unwrap()
        .into_inner();
    assert!(r.confirmed.is_none(), "onDelete differs from the id's");
    // The volume_context (checked after the record is lost too: the one the
    // id describes is the one CreateVolume returned).
    assert_eq!(ctx.len(), 3, "{ctx:?}");
    for (c, ok) in [(&ctx, true), (&other_dir, false), (&extra, false)] {
        let r = h
            .ctl
            .validate_volume_capabilities(Request::new(with_context(&id, c)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(confirmed(r), ok, "{c:?}");
    }
}

async fn ready(ident: &berth::identity::IdentityService) -> Option<bool> {
    use berth::csi::v1::identity_server::Identity;
    ident
        .probe(Request::new(Default::default()))
        .await
        .unwrap()
        .into_inner()
        .ready
}

/// Start-up does not wait for the NFS server: interrupted NFS deletes are
/// finished after the driver is up, holding their volumes' guards (a call
/// on such a volume answers ABORTED meanwhile), and Probe answers ready all
/// along. It answered `ready: false` until they were done: the
/// livenessprobe sidecar fails on that, kubelet restarted berth after a
/// minute, and a reconcile waiting on a dead server began again at every
/// start (a crash loop, with no NFS volume provisioned on any share).
#[tokio::test]
async fn interrupted_nfs_deletes_finish_after_start_up_while_probe_says_ready() {
    let h = nfs(&[]);
    let id = create(&h, "v", &[]).await.volume_id;
    let root = share_root(&h);
    let mut rec = h.driver.store.get(&id).unwrap();
    h.driver
        .store
        .set_phase(&mut rec, berth::state::Phase::Deleting)
        .unwrap();
    // The working mount is gone (a reboot) and the server is slow.
    berth::os::nfsmount::umount(
        h.fake(),
        &root,
        berth::os::nfsmount::Unmount::Normal,
        Duration::from_secs(1),
    )
    .unwrap();
    h.fake().clear_calls();
    let slow = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let s = slow.clone();
    h.fake().respond("mount.nfs", move |_| {
        let t0 = Instant::now();
        while s.load(std::sync::atomic::Ordering::SeqCst) && t0.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(CmdOutput {
            code: Some(0),
            ..Default::default()
        })
    });
    let t0 = Instant::now();
    let h = restart_after_crash(h, &["--kinds", "nfs"]);
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert!(h.driver.reconciling());
    assert_eq!(ready(&h.ident).await, Some(true));
    // The volume being reconciled is busy.
    let e = h
        .ctl
        .delete_volume(Request::new(csi::DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{}", e.message());
    slow.store(false, std::sync::atomic::Ordering::SeqCst);
    let t0 = Instant::now();
    while h.driver.reconciling() {
        assert!(t0.elapsed() < Duration::from_secs(10), "never done");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(ready(&h.ident).await, Some(true));
    assert!(h.driver.store.get(&id).is_none());
}

/// A filesystem step of CreateVolume that fails on the share (EIO, a full
/// or read-only export) leaves neither the volume's directory nor the one
/// being made, nor a record; the retry works.
#[tokio::test]
async fn a_create_that_fails_on_the_share_leaves_nothing() {
    let h = nfs(&[]);
    create(&h, "first", &[]).await;
    let root = share_root(&h);
    for (op, errno) in [
        ("mkdir", libc::ENOSPC),
        ("open", libc::EROFS),
        ("write", libc::EIO),
        ("fsync", libc::EIO),
        ("rename", libc::EIO),
    ] {
        h.fake().fail_op_under(op, &root, errno);
        let e = create_err(&h, req("v", &[])).await;
        h.fake().clear_file_faults();
        // A full share is no room (RESOURCE_EXHAUSTED); the rest INTERNAL.
        let want = if errno == libc::ENOSPC {
            Code::ResourceExhausted
        } else {
            Code::Internal
        };
        assert_eq!(e.code(), want, "{op}: {}", e.message());
        assert_eq!(names_in(&root), [".berth-share", "first"], "{op}");
        assert!(h.driver.store.get("nfs#d#127.0.0.1#/export#v").is_none());
    }
    create(&h, "v", &[]).await;
    assert!(marker_of(&root.join("v")).is_some());
}

// ------------------------------------------- snapshots, restores and clones

fn snap_req(name: &str, source: &str) -> csi::CreateSnapshotRequest {
    csi::CreateSnapshotRequest {
        name: name.into(),
        source_volume_id: source.into(),
        ..Default::default()
    }
}

async fn snapshot(h: &Harness, name: &str, source: &str) -> csi::Snapshot {
    h.ctl
        .create_snapshot(Request::new(snap_req(name, source)))
        .await
        .expect("snapshot")
        .into_inner()
        .snapshot
        .expect("snapshot")
}

fn source_snapshot(id: &str) -> Option<csi::VolumeContentSource> {
    Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: id.into(),
            },
        )),
    })
}

fn source_volume(id: &str) -> Option<csi::VolumeContentSource> {
    Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Volume(
            csi::volume_content_source::VolumeSource {
                volume_id: id.into(),
            },
        )),
    })
}

/// CreateVolume of `name` (`size` bytes at least, `limit` at most) from
/// `source`, with `extra` parameters.
async fn create_from(
    h: &Harness,
    name: &str,
    size: i64,
    limit: i64,
    source: Option<csi::VolumeContentSource>,
    extra: &[(&str, &str)],
) -> Result<csi::Volume, tonic::Status> {
    let mut r = req(name, extra);
    r.capacity_range = Some(csi::CapacityRange {
        required_bytes: size,
        limit_bytes: limit,
    });
    r.volume_content_source = source;
    h.ctl
        .create_volume(Request::new(r))
        .await
        .map(|r| r.into_inner().volume.expect("volume"))
}

/// The directory of an NFS snapshot on the share.
fn snap_dir(h: &Harness, id: &str) -> PathBuf {
    let key = id.rsplit('#').next().unwrap();
    share_root(h).join(".berth-snapshots").join(key)
}

fn snap_marker(dir: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read(dir.join(".berth-snapshot")).ok()?;
    serde_json::from_slice(&text).ok()
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A tree with what a snapshot must keep: a subdirectory with its own
/// mode, a file with a mode, a symlink, a hard-link pair, an xattr when
/// the filesystem takes one.
fn fill_tree(dir: &Path, content: &[u8]) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("sub/f"), content).unwrap();
    std::fs::set_permissions(dir.join("sub/f"), std::fs::Permissions::from_mode(0o640)).unwrap();
    std::fs::set_permissions(dir.join("sub"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::symlink("sub/f", dir.join("link")).unwrap();
    std::fs::hard_link(dir.join("sub/f"), dir.join("hard")).unwrap();
    xattr::set(dir.join("sub/f"), "user.berth", b"v").is_ok()
}

fn check_tree(dir: &Path, content: &[u8], xattrs: bool) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(std::fs::read(dir.join("sub/f")).unwrap(), content);
    let m = |p: &str| std::fs::symlink_metadata(dir.join(p)).unwrap();
    assert_eq!(m("sub/f").permissions().mode() & 0o7777, 0o640);
    assert_eq!(m("sub").permissions().mode() & 0o7777, 0o750);
    assert_eq!(
        std::fs::read_link(dir.join("link")).unwrap(),
        Path::new("sub/f")
    );
    assert_eq!(m("hard").ino(), m("sub/f").ino(), "one inode stays one");
    if xattrs {
        assert_eq!(
            xattr::get(dir.join("sub/f"), "user.berth")
                .unwrap()
                .as_deref(),
            Some(&b"v"[..])
        );
    }
}

#[tokio::test]
async fn nfs_snapshots_are_copies_on_the_share_that_restore_and_clone() {
    let h = nfs(&[]);
    use csi::controller_service_capability::rpc::Type as C;
    let types = controller_rpcs(&h).await;
    for t in [
        C::CreateDeleteSnapshot,
        C::ListSnapshots,
        C::GetSnapshot,
        C::CloneVolume,
    ] {
        assert!(types.contains(&(t as i32)), "{t:?} not advertised");
    }
    let src = create(&h, "src", &[]).await;
    let root = share_root(&h);
    let xattrs = fill_tree(&root.join("src"), b"before");
    let s = snapshot(&h, "snap-1", &src.volume_id).await;
    assert!(s.ready_to_use);
    assert_eq!(s.size_bytes, src.capacity_bytes);
    assert_eq!(s.source_volume_id, src.volume_id);
    assert!(s.creation_time.is_some_and(|t| t.seconds > 0));
    assert!(
        s.snapshot_id.starts_with("nfssnap#127.0.0.1#/export#"),
        "{}",
        s.snapshot_id
    );
    // On the share: the marker names the snapshot; the copy leaves the
    // volume's own marker out.
    let dir = snap_dir(&h, &s.snapshot_id);
    assert_eq!(names_in(&dir), [".berth-snapshot", "data"]);
    let m = snap_marker(&dir).unwrap();
    assert_eq!(m["id"], s.snapshot_id.as_str());
    assert_eq!(m["name"], "snap-1");
    assert_eq!(m["source_volume_id"], src.volume_id.as_str());
    assert!(!dir.join("data/.berth-volume").exists());
    check_tree(&dir.join("data"), b"before", xattrs);
    assert_eq!(
        names_in(&root.join(".berth-snapshots")),
        [s.snapshot_id.rsplit('#').next().unwrap()],
        "nothing of the making is left"
    );
    // Idempotent by name; the same name of another volume is not.
    assert_eq!(
        snapshot(&h, "snap-1", &src.volume_id).await.snapshot_id,
        s.snapshot_id
    );
    let other = create(&h, "other", &[]).await;
    let e = h
        .ctl
        .create_snapshot(Request::new(snap_req("snap-1", &other.volume_id)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{}", e.message());
    // Written after the snapshot: not in it.
    std::fs::write(root.join("src/sub/f"), b"after").unwrap();
    let r = create_from(&h, "restored", 1, 0, source_snapshot(&s.snapshot_id), &[])
        .await
        .unwrap();
    assert_eq!(r.capacity_bytes, src.capacity_bytes, "at least the source");
    check_tree(&root.join("restored"), b"before", xattrs);
    assert_eq!(
        marker_of(&root.join("restored")).unwrap()["id"],
        r.volume_id.as_str(),
        "the restored volume has its own marker"
    );
    assert!(matches!(
        r.content_source.and_then(|c| c.r#type),
        Some(csi::volume_content_source::Type::Snapshot(x)) if x.snapshot_id == s.snapshot_id
    ));
    // A clone copies the volume as it is now.
    let c = create_from(&h, "clone", 0, 0, source_volume(&src.volume_id), &[])
        .await
        .unwrap();
    check_tree(&root.join("clone"), b"after", xattrs);
    assert_eq!(
        marker_of(&root.join("clone")).unwrap()["id"],
        c.volume_id.as_str()
    );
    // Larger is fine; a limit below the source is OUT_OF_RANGE.
    let big = create_from(
        &h,
        "big",
        3 * src.capacity_bytes,
        0,
        source_snapshot(&s.snapshot_id),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(big.capacity_bytes, 3 * src.capacity_bytes);
    let e = create_from(
        &h,
        "small",
        1,
        src.capacity_bytes - 1,
        source_snapshot(&s.snapshot_id),
        &[],
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{}", e.message());
    let e = create_from(
        &h,
        "small",
        1,
        src.capacity_bytes - 1,
        source_volume(&src.volume_id),
        &[],
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{}", e.message());
    assert!(!root.join("small").exists());
    // mountPermissions applies to a restored volume too.
    create_from(
        &h,
        "perm",
        0,
        0,
        source_snapshot(&s.snapshot_id),
        &[("mountPermissions", "0770")],
    )
    .await
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(root.join("perm"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o770
    );
    // Get and List from the records.
    let got = h
        .ctl
        .get_snapshot(Request::new(csi::GetSnapshotRequest {
            snapshot_id: s.snapshot_id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(got.snapshot_id, s.snapshot_id);
    let l = h
        .ctl
        .list_snapshots(Request::new(csi::ListSnapshotsRequest {
            source_volume_id: src.volume_id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(l.entries.len(), 1);
    // Unknown sources are NOT_FOUND.
    for source in [
        source_snapshot("nfssnap#127.0.0.1#/export#0123456789abcdef"),
        source_volume("nfs#d#127.0.0.1#/export#none"),
    ] {
        let e = create_from(&h, "nothing", 0, 0, source, &[])
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{}", e.message());
    }
    // Deleting the snapshot leaves the volumes made from it.
    delete_snapshot(&h, &s.snapshot_id).await.unwrap();
    assert!(!dir.exists());
    assert!(names_in(&root.join(".berth-snapshots")).is_empty());
    check_tree(&root.join("restored"), b"before", xattrs);
    delete_snapshot(&h, &s.snapshot_id).await.unwrap();
}

/// Restores and clones copy inside one working mount of one share: a
/// source on another share is INVALID_ARGUMENT (the spec's "source
/// incompatible") and nothing is made.
#[tokio::test]
async fn restore_and_clone_stay_on_the_source_share() {
    let h = nfs(&[]);
    let src = create(&h, "src", &[]).await;
    let s = snapshot(&h, "s", &src.volume_id).await;
    for source in [
        source_snapshot(&s.snapshot_id),
        source_volume(&src.volume_id),
    ] {
        let e = create_from(&h, "elsewhere", 0, 0, source, &[("share", "/export2")])
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert!(e.message().contains("share"), "{}", e.message());
    }
    assert!(h
        .driver
        .store
        .get("nfs#d#127.0.0.1#/export2#elsewhere")
        .is_none());
    // Another subdirectory template on the same share is fine.
    create_from(
        &h,
        "x",
        0,
        0,
        source_snapshot(&s.snapshot_id),
        &[
            ("subDir", "team/${pvc.metadata.name}"),
            ("csi.storage.k8s.io/pvc/name", "x"),
        ],
    )
    .await
    .unwrap();
    assert!(share_root(&h).join("team/x/.berth-volume").exists());
}

/// A volume with snapshots can be deleted (or archived); its snapshots
/// stay and restore.
#[tokio::test]
async fn a_deleted_volume_s_snapshots_stay_usable() {
    let h = nfs(&[]);
    for mode in ["delete", "archive"] {
        let name = format!("src-{mode}");
        let src = create(&h, &name, &[("onDelete", mode)]).await;
        let root = share_root(&h);
        let xattrs = fill_tree(&root.join(&name), b"kept");
        let s = snapshot(&h, &format!("s-{mode}"), &src.volume_id).await;
        try_delete(&h, &src.volume_id).await.unwrap();
        assert!(!root.join(&name).exists());
        let r = create_from(
            &h,
            &format!("r-{mode}"),
            0,
            0,
            source_snapshot(&s.snapshot_id),
            &[],
        )
        .await
        .unwrap();
        check_tree(&root.join(format!("r-{mode}")), b"kept", xattrs);
        assert!(r.volume_id.ends_with(&format!("r-{mode}")));
    }
}

/// The controller's records live in an emptyDir: after losing them, the
/// snapshot id alone finds the snapshot on the share. A retry of the same
/// CreateSnapshot gets the same id and copy (no second copy), a restore
/// works from the id, DeleteSnapshot removes it from the id.
#[tokio::test]
async fn nfs_snapshots_survive_a_lost_controller_state() {
    let h = nfs(&[]);
    let src = create(&h, "src", &[]).await;
    let root = share_root(&h);
    let xattrs = fill_tree(&root.join("src"), b"old");
    let s = snapshot(&h, "snap", &src.volume_id).await;
    let created = s.creation_time.unwrap();
    std::fs::remove_dir_all(h.path("state/journal")).unwrap();
    let h = restart(h, &["--kinds", "nfs"]);
    assert!(h.driver.store.is_empty());
    // GetSnapshot and ListSnapshots by id answer from the marker (the
    // external-snapshotter checks a pre-provisioned snapshot that way); a
    // list without an id shows only records.
    let get = |id: &str| csi::GetSnapshotRequest {
        snapshot_id: id.into(),
        ..Default::default()
    };
    let got = h
        .ctl
        .get_snapshot(Request::new(get(&s.snapshot_id)))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(got.ready_to_use);
    assert_eq!(got.source_volume_id, src.volume_id);
    assert_eq!(got.size_bytes, s.size_bytes);
    assert_eq!(got.creation_time.unwrap(), created);
    let unknown = "nfssnap#127.0.0.1#/export#0123456789abcdef";
    let e = h
        .ctl
        .get_snapshot(Request::new(get(unknown)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{}", e.message());
    let list = |id: &str, source: &str| csi::ListSnapshotsRequest {
        snapshot_id: id.into(),
        source_volume_id: source.into(),
        ..Default::default()
    };
    for (id, source, n) in [
        (s.snapshot_id.as_str(), "", 1),
        (s.snapshot_id.as_str(), src.volume_id.as_str(), 1),
        (s.snapshot_id.as_str(), "nfs#d#127.0.0.1#/export#other", 0),
        (unknown, "", 0),
        ("", "", 0),
    ] {
        let l = h
            .ctl
            .list_snapshots(Request::new(list(id, source)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(l.entries.len(), n, "{id:?} {source:?}");
    }
    // The CO retries the CreateSnapshot it never got an answer for: the
    // source volume has no record either and is found from its marker.
    let again = snapshot(&h, "snap", &src.volume_id).await;
    assert_eq!(again.snapshot_id, s.snapshot_id);
    assert!(again.ready_to_use);
    assert_eq!(again.creation_time.unwrap(), created, "the copy's own time");
    assert_eq!(names_in(&root.join(".berth-snapshots")).len(), 1);
    h.driver.store.snapshot_remove(&s.snapshot_id).unwrap();
    let r = create_from(&h, "restored", 0, 0, source_snapshot(&s.snapshot_id), &[])
        .await
        .unwrap();
    check_tree(&root.join("restored"), b"old", xattrs);
    assert!(matches!(
        r.content_source.and_then(|c| c.r#type),
        Some(csi::volume_content_source::Type::Snapshot(x)) if x.snapshot_id == s.snapshot_id
    ));
    // A clone of a volume without a record, too.
    std::fs::remove_dir_all(h.path("state/journal")).unwrap();
    let h = restart(h, &["--kinds", "nfs"]);
    create_from(&h, "clone", 0, 0, source_volume(&src.volume_id), &[])
        .await
        .unwrap();
    check_tree(&root.join("clone"), b"old", xattrs);
    delete_snapshot(&h, &s.snapshot_id).await.unwrap();
    assert!(!snap_dir(&h, &s.snapshot_id).exists());
    let e = create_from(&h, "late", 0, 0, source_snapshot(&s.snapshot_id), &[])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{}", e.message());
}

/// DeleteSnapshot removes only a directory whose marker names the
/// snapshot (or an empty one at its name): another snapshot's marker, none
/// on a directory with data, or a symlink at its place is left as it is; ids that reach outside the snapshot area are not NFS
/// snapshot ids and touch nothing.
#[tokio::test]
async fn delete_snapshot_touches_only_what_its_marker_names() {
    let h = nfs(&[]);
    let src = create(&h, "src", &[]).await;
    let root = share_root(&h);
    std::fs::write(root.join("src/f"), b"x").unwrap();
    let a = snapshot(&h, "a", &src.volume_id).await;
    let b = snapshot(&h, "b", &src.volume_id).await;
    let (da, db) = (snap_dir(&h, &a.snapshot_id), snap_dir(&h, &b.snapshot_id));
    // a's directory now carries b's marker; b's none at all.
    std::fs::copy(db.join(".berth-snapshot"), da.join(".berth-snapshot")).unwrap();
    std::fs::remove_file(db.join(".berth-snapshot")).unwrap();
    delete_snapshot(&h, &a.snapshot_id).await.unwrap();
    delete_snapshot(&h, &b.snapshot_id).await.unwrap();
    assert!(da.join("data/f").exists(), "a foreign marker: left");
    assert!(db.join("data/f").exists(), "no marker: left");
    assert!(h.driver.store.snapshot_get(&a.snapshot_id).is_none());
    // What a delete cut short between the marker and the directory leaves
    // (empty, unmarked) goes with the retry: nothing is in it.
    let d = snapshot(&h, "d", &src.volume_id).await;
    let dd = snap_dir(&h, &d.snapshot_id);
    std::fs::remove_dir_all(&dd).unwrap();
    std::fs::create_dir(&dd).unwrap();
    delete_snapshot(&h, &d.snapshot_id).await.unwrap();
    assert!(
        !dd.exists(),
        "an empty unmarked directory at its name: removed"
    );
    // A restore from a snapshot whose copy is not Berth's is refused.
    let c = snapshot(&h, "c", &src.volume_id).await;
    let dc = snap_dir(&h, &c.snapshot_id);
    std::fs::remove_file(dc.join(".berth-snapshot")).unwrap();
    let e = create_from(&h, "r", 0, 0, source_snapshot(&c.snapshot_id), &[])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(!root.join("r").exists());
    // A symlink at a snapshot's place is not followed.
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("keep"), b"x").unwrap();
    std::fs::remove_dir_all(&dc).unwrap();
    std::os::unix::fs::symlink(outside.path(), &dc).unwrap();
    delete_snapshot(&h, &c.snapshot_id).await.unwrap();
    assert!(outside.path().join("keep").exists());
    // Hostile ids: OK, nothing touched.
    let canary = root.join("canary");
    std::fs::write(&canary, b"x").unwrap();
    for bad in [
        "nfssnap#127.0.0.1#/export#..",
        "nfssnap#127.0.0.1#/export#../src",
        "nfssnap#127.0.0.1#/export/.berth-snapshots#0123456789abcdef",
        "nfssnap#127.0.0.1#/#0123456789abcdef",
        "nfssnap#127.0.0.1#/export#0123456789ABCDEF",
    ] {
        delete_snapshot(&h, bad).await.unwrap();
        let e = create_from(&h, "hostile", 0, 0, source_snapshot(bad), &[])
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{bad}: {}", e.message());
    }
    assert!(canary.exists() && root.join("src/f").exists());
}

/// A copy that fails (no space, an I/O error) leaves neither a snapshot
/// nor a half-made copy, nor a record; a restore that fails leaves no
/// volume directory; the retries work.
#[tokio::test]
async fn failed_nfs_copies_leave_nothing() {
    let h = nfs(&[]);
    let src = create(&h, "src", &[]).await;
    let root = share_root(&h);
    std::fs::write(root.join("src/f"), b"x").unwrap();
    for (errno, code) in [
        (libc::ENOSPC, Code::ResourceExhausted),
        (libc::EIO, Code::Internal),
    ] {
        h.fake().fail_op_under("copy", &root, errno);
        let e = h
            .ctl
            .create_snapshot(Request::new(snap_req("s", &src.volume_id)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{}", e.message());
        let e = create_from(&h, "c", 0, 0, source_volume(&src.volume_id), &[])
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{}", e.message());
        h.fake().clear_file_faults();
        assert!(names_in(&root.join(".berth-snapshots")).is_empty());
        assert_eq!(names_in(&root), [".berth-share", ".berth-snapshots", "src"]);
        assert!(h.driver.store.snapshot_by_name("s").is_none());
        assert!(h.driver.store.get_by_name("c").is_none());
    }
    let s = snapshot(&h, "s", &src.volume_id).await;
    assert!(snap_dir(&h, &s.snapshot_id).join("data/f").exists());
    create_from(&h, "c", 0, 0, source_volume(&src.volume_id), &[])
        .await
        .unwrap();
    assert!(root.join("c/f").exists());
}

/// A snapshot interrupted by a crash (its record says Creating, a
/// half-made copy on the share) is never reported ready; after start-up
/// (which does not wait for the NFS server) its copy and record are gone.
#[tokio::test]
async fn an_interrupted_nfs_snapshot_is_removed_after_start_up() {
    let h = nfs(&[]);
    let src = create(&h, "src", &[]).await;
    let root = share_root(&h);
    std::fs::write(root.join("src/f"), b"x").unwrap();
    let s = snapshot(&h, "s", &src.volume_id).await;
    // Made into a half-made copy with a Creating record.
    let dir = snap_dir(&h, &s.snapshot_id);
    let key = s.snapshot_id.rsplit('#').next().unwrap().to_string();
    let tmp = root
        .join(".berth-snapshots")
        .join(format!(".berth-new-{key}"));
    std::fs::rename(&dir, &tmp).unwrap();
    let mut rec = h.driver.store.snapshot_get(&s.snapshot_id).unwrap();
    rec.phase = berth::state::Phase::Creating;
    h.driver.store.snapshot_put(&rec).unwrap();
    let e = h
        .ctl
        .get_snapshot(Request::new(csi::GetSnapshotRequest {
            snapshot_id: s.snapshot_id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = create_from(&h, "r", 0, 0, source_snapshot(&s.snapshot_id), &[])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{}", e.message());
    let h = restart_after_crash(h, &["--kinds", "nfs"]);
    let t0 = Instant::now();
    while h.driver.reconciling() {
        assert!(t0.elapsed() < Duration::from_secs(10), "never done");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(h.driver.store.snapshot_get(&s.snapshot_id).is_none());
    assert!(!tmp.exists() && !dir.exists());
    assert!(root.join("src/f").exists());
    // The CO's retry makes it again.
    let again = snapshot(&h, "s", &src.volume_id).await;
    assert_eq!(again.snapshot_id, s.snapshot_id);
    assert!(dir.join("data/f").exists());
}

/// An id no served kind owns goes to NFS's unpublish where NFS is served,
/// and never takes down another volume's mount there either; a local
/// volume of an instance that no longer serves `local` is still torn down
/// by its own id (its pod must not stay Terminating).
#[tokio::test]
async fn ids_no_served_kind_owns_never_unmount_a_volumes_storage() {
    let (h, id, staging, t) = local_published().await;
    refused(&h, &t, &staging).await;
    // The same instance without `local`: the volume's own id unpublishes,
    // another still cannot.
    let h = restart(h, &["--kinds", "nfs", "--nfs-timeout", "2"]);
    refused(&h, &t, &staging).await;
    h.node
        .node_unpublish_volume(Request::new(unpublish_req(&id, &t)))
        .await
        .unwrap();
    assert!(!mounted(&h, &t) && !t.exists());
}

/// An instance serving local and NFS volumes with one local volume staged
/// at `staging` and published at `t`: (harness, id, staging, t).
async fn local_published() -> (Harness, String, PathBuf, PathBuf) {
    let h = fake(&["--kinds", "local,nfs", "--nfs-timeout", "2"]);
    h.fake().emulate_nfs_mounts();
    let id = created_id(
        h.ctl
            .create_volume(Request::new(create_req("loc", 1 << 20)))
            .await,
    );
    let staging = h.path("staging");
    h.node
        .node_stage_volume(Request::new(stage_req(&id, &staging)))
        .await
        .unwrap();
    let t = h.path("t");
    h.node
        .node_publish_volume(Request::new(publish_req(&id, &staging, &t, false)))
        .await
        .unwrap();
    (h, id, staging, t)
}

/// The mount flags of a local volume (a bind mount) are checked by
/// `bind_flags`, whose error showed the whole refused flag, value
/// included: `mount flag "password=hunter2" is not supported`, answered by
/// CreateVolume, NodeStageVolume and NodePublishVolume (the PVC's events,
/// berth's log) and ValidateVolumeCapabilities' message. The flag is
/// named, its value is not, as for NFS mount options.
#[tokio::test]
async fn bind_mount_flag_values_never_reach_an_error_message() {
    let (h, id, staging, t) = local_published().await;
    let staging2 = h.path("staging2");
    let t2 = h.path("t2");
    for (flags, named) in [
        (&["password=hunter2"][..], "\"password\" (value not shown)"),
        (&["ro,secret=hunter2"], "\"secret\" (value not shown)"),
        (
            &["noatime", "key=hunter2,nodev"],
            "\"key\" (value not shown)",
        ),
        (&["bogus"], "\"bogus\""),
    ] {
        let cap = mount_cap_flags(Mode::SingleNodeWriter, flags);
        let mut c = create_req("other", 1 << 20);
        c.volume_capabilities = vec![cap.clone()];
        let create = h
            .ctl
            .create_volume(Request::new(c))
            .await
            .expect_err("CreateVolume should fail");
        let mut s = stage_req(&id, &staging2);
        s.volume_capability = Some(cap.clone());
        let stage = h
            .node
            .node_stage_volume(Request::new(s))
            .await
            .expect_err("NodeStageVolume should fail");
        let mut p = publish_req(&id, &staging, &t2, false);
        p.volume_capability = Some(cap.clone());
        let publish = h
            .node
            .node_publish_volume(Request::new(p))
            .await
            .expect_err("NodePublishVolume should fail");
        for (rpc, e) in [
            ("CreateVolume", create),
            ("NodeStageVolume", stage),
            ("NodePublishVolume", publish),
        ] {
            assert_eq!(e.code(), Code::InvalidArgument, "{rpc} {flags:?}");
            assert!(
                !e.message().contains("hunter2"),
                "{rpc} {flags:?} shows the flag's value: {}",
                e.message()
            );
            assert!(
                e.message().contains(named),
                "{rpc} {flags:?}: {}",
                e.message()
            );
        }
        let v = h
            .ctl
            .validate_volume_capabilities(Request::new(csi::ValidateVolumeCapabilitiesRequest {
                volume_id: id.clone(),
                volume_capabilities: vec![cap],
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        assert!(v.confirmed.is_none(), "{flags:?}");
        assert!(!v.message.contains("hunter2"), "{}", v.message);
        assert!(v.message.contains(named), "{}", v.message);
    }
    assert!(mounted(&h, &t));
    assert!(!mounted(&h, &t2) && !mounted(&h, &staging2));
}

fn mounted(h: &Harness, p: &Path) -> bool {
    h.fake().table().iter().any(|m| m.mount_point == p)
}

/// NodeUnpublish and NodeUnstage of "foo-bar" (no served kind's id) at a
/// volume's target and staging path: FAILED_PRECONDITION, both mounts stay.
async fn refused(h: &Harness, t: &Path, staging: &Path) {
    let e = unpublish_as_kubelet(h, "foo-bar", t).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let e = unstage_as_kubelet(h, "foo-bar", staging).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(mounted(h, t) && mounted(h, staging));
}

// ------------------------------------------------------- mount identity

fn stats_req(id: &str, path: &Path) -> csi::NodeGetVolumeStatsRequest {
    csi::NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: path.display().to_string(),
        staging_target_path: String::new(),
    }
}

/// The NFS mounts in the fake's table: (mount point, source).
fn nfs_mounts(h: &Harness) -> Vec<(PathBuf, String)> {
    h.fake()
        .table()
        .into_iter()
        .filter(|m| m.fs_type.starts_with("nfs"))
        .map(|m| (m.mount_point, m.source))
        .collect()
}

fn nfs_mount_runs(h: &Harness) -> usize {
    runs(h.fake())
        .iter()
        .filter(|(p, _)| p == "mount.nfs")
        .count()
}

/// Publish, a retry, stats, unpublish (twice) of `id` at `t`, which must
/// show `shown` in mountinfo once published.
async fn publish_cycle(h: &Harness, id: &str, t: &Path, shown: &str) {
    h.node
        .node_publish_volume(Request::new(nfs_publish(id, t, false, &[])))
        .await
        .unwrap();
    assert!(
        nfs_mounts(h).contains(&(t.to_path_buf(), shown.to_string())),
        "{:?}",
        nfs_mounts(h)
    );
    h.fake().clear_calls();
    h.node
        .node_publish_volume(Request::new(nfs_publish(id, t, false, &[])))
        .await
        .expect("a publish retry is OK");
    assert_eq!(nfs_mount_runs(h), 0, "the retry mounts nothing");
    let s = h
        .node
        .node_get_volume_stats(Request::new(stats_req(id, t)))
        .await
        .expect("stats")
        .into_inner();
    assert!(!s.usage.is_empty());
    for _ in 0..2 {
        h.node
            .node_unpublish_volume(Request::new(unpublish_req(id, t)))
            .await
            .expect("unpublish");
    }
    assert!(!t.exists());
    assert!(!nfs_mounts(h).iter().any(|(p, _)| p == t));
}

/// The kernel shares one client among the mounts of one server address,
/// and shows every later mount with the host spelling of the first
/// (`localhost:/export/ha` shows as `127.0.0.1:/export/ha`): publish,
/// stats, unpublish, create and delete all work with either spelling
/// first, also after a restart.
#[tokio::test]
async fn mounts_shown_with_another_spelling_of_the_server_are_the_volume_s() {
    for first in ["127.0.0.1", "localhost"] {
        let second = if first == "localhost" {
            "LOCALHOST"
        } else {
            "localhost"
        };
        let h = nfs(&[]);
        h.fake()
            .emulate_nfs_naming(&[("localhost", "127.0.0.1")], &[]);
        let vb = create(&h, "vb", &[("server", first), ("subDir", "hb")])
            .await
            .volume_id;
        let va = create(&h, "va", &[("server", second), ("subDir", "ha")])
            .await
            .volume_id;
        assert!(va.contains(&format!("#{second}#")), "{va}");
        let tb = h.path("pub/b");
        std::fs::create_dir_all(tb.parent().unwrap()).unwrap();
        h.node
            .node_publish_volume(Request::new(nfs_publish(&vb, &tb, false, &[])))
            .await
            .unwrap();
        // While vB is mounted, vA's mounts show vB's spelling.
        publish_cycle(&h, &va, &h.path("pub/a"), &format!("{first}:/export/ha")).await;
        // A third volume of either spelling, made and removed.
        for (i, server) in [first, second].into_iter().enumerate() {
            let name = format!("vc{i}");
            let id = create(&h, &name, &[("server", server)]).await.volume_id;
            try_delete(&h, &id).await.expect("delete");
        }
        try_delete(&h, &va).await.expect("delete vA");
        // After a restart (the working mounts stay after a crash).
        let h = restart_after_crash(h, &["--kinds", "nfs", "--nfs-timeout", "2"]);
        let again = create(&h, "va2", &[("server", second), ("subDir", "ha2")])
            .await
            .volume_id;
        publish_cycle(
            &h,
            &again,
            &h.path("pub/a2"),
            &format!("{first}:/export/ha2"),
        )
        .await;
        try_delete(&h, &again).await.expect("delete");
        h.node
            .node_unpublish_volume(Request::new(unpublish_req(&vb, &tb)))
            .await
            .unwrap();
        try_delete(&h, &vb).await.expect("delete vB");
        assert!(h.driver.store.get(&vb).is_none() && h.driver.store.get(&va).is_none());
    }
}

/// A mount of another export path (another volume of the same server,
/// under any spelling) at a volume's target is never the volume's:
/// publish is ALREADY_EXISTS, stats NOT_FOUND, unpublish
/// FAILED_PRECONDITION and the mount stays. A working mount of the share
/// replaced by another export is refused by create and delete.
#[tokio::test]
async fn a_mount_of_another_export_path_is_never_the_volume_s() {
    let h = nfs(&[]);
    h.fake()
        .emulate_nfs_naming(&[("localhost", "127.0.0.1")], &[]);
    let other = create(&h, "vo", &[("subDir", "other")]).await.volume_id;
    let va = create(&h, "va", &[("server", "localhost"), ("subDir", "ha")])
        .await
        .volume_id;
    let t = h.path("t");
    h.node
        .node_publish_volume(Request::new(nfs_publish(&other, &t, false, &[])))
        .await
        .unwrap();
    let r = h
        .node
        .node_publish_volume(Request::new(nfs_publish(&va, &t, false, &[])))
        .await;
    assert_eq!(code(r), Code::AlreadyExists);
    let r = h
        .node
        .node_get_volume_stats(Request::new(stats_req(&va, &t)))
        .await;
    assert_eq!(code(r), Code::NotFound);
    h.fake().clear_calls();
    let e = h
        .node
        .node_unpublish_volume(Request::new(unpublish_req(&va, &t)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(
        e.message().contains("refusing to unmount"),
        "{}",
        e.message()
    );
    assert!(runs(h.fake()).is_empty());
    assert!(mounted(&h, &t));
    // The share's working directory: another server's export there is
    // never Berth's mount of the share (create and delete INTERNAL,
    // nothing removed); another path of the same server is what the
    // server resolved the share to (a symlink), refused for new volumes.
    let root = share_root(&h);
    use berth::os::Runner;
    let remount = |source: &str| {
        let r = h
            .fake()
            .run(
                "umount",
                &v(&[&root.display().to_string()]),
                Duration::from_secs(1),
            )
            .unwrap();
        assert_eq!(r.code, Some(0));
        let r = h
            .fake()
            .run(
                "mount.nfs",
                &v(&[source, &root.display().to_string()]),
                Duration::from_secs(1),
            )
            .unwrap();
        assert_eq!(r.code, Some(0));
    };
    remount("10.9.9.9:/export");
    let e = try_delete(&h, &other).await.unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{}", e.message());
    assert!(e.message().contains("instead of"), "{}", e.message());
    let e = create_err(&h, req("vn", &[])).await;
    assert_eq!(e.code(), Code::Internal, "{}", e.message());
    assert!(root.join("other").is_dir(), "nothing removed");
    assert!(!root.join("vn").exists());
    remount("127.0.0.1:/");
    let e = create_err(&h, req("vn", &[])).await;
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(!root.join("vn").exists());
    h.node
        .node_unpublish_volume(Request::new(unpublish_req(&other, &t)))
        .await
        .unwrap();
}

/// A share whose path runs through a symlink on the server shows as the
/// resolved path: CreateVolume refuses it (INVALID_ARGUMENT naming that
/// path) and leaves nothing; volumes made on it before still unpublish
/// and delete.
#[tokio::test]
async fn a_share_through_a_symlink_is_refused_and_old_volumes_on_it_still_go() {
    let h = nfs(&[]);
    let lnk = [("share", "/export/lnk-in")];
    // Made before Berth looked (the fake shows the path as mounted).
    let old1 = create(&h, "old1", &[lnk[0], ("subDir", "o1")])
        .await
        .volume_id;
    let old2 = create(&h, "old2", &[lnk[0], ("subDir", "o2")])
        .await
        .volume_id;
    let h = restart(h, &["--kinds", "nfs", "--nfs-timeout", "2"]);
    assert!(nfs_mounts(&h).is_empty());
    h.fake()
        .emulate_nfs_naming(&[], &[("/export/lnk-in", "/export/victim")]);
    let work = h.path("state/nfs");
    let before: Vec<_> = std::fs::read_dir(&work)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    let e = create_err(&h, req("new", &[lnk[0], ("subDir", "n")])).await;
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains("/export/victim"), "{}", e.message());
    assert!(nfs_mounts(&h).is_empty(), "{:?}", nfs_mounts(&h));
    let after: Vec<_> = std::fs::read_dir(&work)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert_eq!(after, before, "no working directory left");
    assert!(h
        .driver
        .store
        .get("nfs#d#127.0.0.1#/export/lnk-in#n")
        .is_none());
    // The old volumes: published, unpublished, deleted.
    let t = h.path("t");
    h.node
        .node_publish_volume(Request::new(nfs_publish(&old1, &t, false, &[])))
        .await
        .unwrap();
    assert!(nfs_mounts(&h).contains(&(t.clone(), "127.0.0.1:/export/victim/o1".into())));
    h.node
        .node_unpublish_volume(Request::new(unpublish_req(&old1, &t)))
        .await
        .expect("an old volume unpublishes");
    assert!(!t.exists());
    try_delete(&h, &old1).await.expect("delete old1");
    // Its working mount stays and is used again; a new volume is still
    // refused, and the mount (the old volumes' share) stays.
    let root = nfs_mounts(&h)
        .into_iter()
        .find(|(_, s)| s == "127.0.0.1:/export/victim")
        .expect("working mount")
        .0;
    assert!(!root.join("o1").exists() && root.join("o2").is_dir());
    let e = create_err(&h, req("new", &[lnk[0], ("subDir", "n")])).await;
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(mounted(&h, &root));
    assert!(!root.join("n").exists());
    try_delete(&h, &old2).await.expect("delete old2");
    assert!(!root.join("o2").exists());
    // The resolved path itself is fine.
    let ok = create(&h, "ok", &[("share", "/export/victim")])
        .await
        .volume_id;
    try_delete(&h, &ok).await.expect("delete");
}

/// Creates on one share waiting for each other while its server does not
/// answer: the first mount times out, and the calls that waited for it
/// answer DEADLINE_EXCEEDED at once instead of each mounting in turn and
/// waiting out a timeout of its own (6 creates on a dead share answered
/// after 1, 2, ... 6 timeouts: 3 minutes for the last with the default
/// --nfs-timeout, its volume's retries ABORTED meanwhile). A create that
/// comes later mounts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn creates_queued_on_a_dead_share_answer_with_the_first_timeout() {
    let h = nfs(&[]);
    h.fake().respond("mount.nfs", |_| {
        // Long enough for every create below to be waiting.
        std::thread::sleep(Duration::from_secs(2));
        timeout("mount.nfs")
    });
    let mut set = tokio::task::JoinSet::new();
    for i in 0..6 {
        let ctl = berth::controller::ControllerService {
            driver: h.driver.clone(),
        };
        set.spawn(async move {
            ctl.create_volume(Request::new(req(&format!("v{i}"), &[])))
                .await
                .map(|_| ())
        });
    }
    while let Some(r) = set.join_next().await {
        let e = r.unwrap().expect_err("a create on a dead share");
        assert_eq!(e.code(), Code::DeadlineExceeded, "{}", e.message());
    }
    assert_eq!(mount_runs(h.fake()), 1, "{:?}", runs(h.fake()));
    assert!(h.driver.store.is_empty());
    // The server is back: the next create mounts and works.
    h.fake().respond_to_some("mount.nfs", |_| None);
    create(&h, "v0", &[]).await;
    assert_eq!(mount_runs(h.fake()), 2);
}

/// Without records, a CreateVolume that finds its directory taken by
/// another volume (a same-named PVC of another namespace, `subDir` from
/// the PVC's name) is ALREADY_EXISTS, and its rollback leaves that
/// volume's directory alone, also while it is still empty (a PVC just
/// bound, its pod not started yet): only a directory this create made is
/// removed.
#[tokio::test]
async fn a_refused_create_never_removes_the_empty_directory_of_another_volume() {
    let h = nfs(&[]);
    let ta = templated("data", "team-a");
    let ida = create(&h, "pvc-aaaa", &pairs(&ta)).await.volume_id;
    let root = share_root(&h);
    assert!(marker_of(&root.join("data")).is_some());
    std::fs::remove_dir_all(h.path("state/journal")).unwrap();
    let h = restart(h, &["--kinds", "nfs"]);
    let tb = templated("data", "team-b");
    let e = create_err(&h, req("pvc-bbbb", &pairs(&tb))).await;
    assert_eq!(e.code(), Code::AlreadyExists, "{}", e.message());
    assert!(h.driver.store.is_empty());
    let m = marker_of(&root.join("data")).expect("team-a's directory is still there");
    assert_eq!(m["id"], ida.as_str());
    assert_eq!(m["name"], "pvc-aaaa");
    // Its own retry still finds it.
    assert_eq!(create(&h, "pvc-aaaa", &pairs(&ta)).await.volume_id, ida);
}

/// The controller lost its records (an emptyDir): a CreateVolume whose
/// name finds a volume directory marked with the same id and name is a
/// retry only when it asks for the same content source, as with records
/// (`ALREADY_EXISTS` otherwise): the marker says what the directory was
/// filled from. A plain volume is never answered as a restore (its empty
/// or own data passed off as the snapshot's), a restore never as another
/// source's or as a plain volume.
#[tokio::test]
async fn without_records_the_same_name_with_another_content_source_is_already_exists() {
    let h = nfs(&[]);
    let src = create(&h, "src", &[]).await;
    let root = share_root(&h);
    std::fs::write(root.join("src/f"), b"snapped").unwrap();
    let s1 = snapshot(&h, "s1", &src.volume_id).await.snapshot_id;
    let s2 = snapshot(&h, "s2", &src.volume_id).await.snapshot_id;
    create(&h, "plain", &[]).await;
    std::fs::write(root.join("plain/own"), b"plain data").unwrap();
    // A volume not written yet: its directory holds only its marker.
    create(&h, "empty", &[]).await;
    let restored = create_from(&h, "restored", 5 << 20, 0, source_snapshot(&s1), &[])
        .await
        .unwrap();
    let lose = |h: Harness| {
        std::fs::remove_dir_all(h.path("state/journal")).unwrap();
        let h = restart(h, &["--kinds", "nfs"]);
        assert!(h.driver.store.is_empty());
        h
    };
    let h = lose(h);
    for (name, source) in [
        ("plain", source_snapshot(&s1)),
        ("plain", source_volume(&src.volume_id)),
        ("empty", source_snapshot(&s1)),
        ("restored", None),
        ("restored", source_snapshot(&s2)),
        ("restored", source_volume(&src.volume_id)),
    ] {
        let e = create_from(&h, name, 5 << 20, 0, source.clone(), &[])
            .await
            .expect_err(&format!("{name} from {source:?} answered OK"));
        assert_eq!(e.code(), Code::AlreadyExists, "{name}: {}", e.message());
        // Nothing was made or removed.
        assert_eq!(h.driver.store.len(), 0, "{name}");
    }
    assert_eq!(
        std::fs::read(root.join("plain/own")).unwrap(),
        b"plain data"
    );
    assert!(!root.join("plain/f").exists());
    assert!(
        marker_of(&root.join("empty")).is_some(),
        "never rolled back"
    );
    assert!(!root.join("empty/f").exists());
    assert_eq!(std::fs::read(root.join("restored/f")).unwrap(), b"snapped");
    // The CO's retry of the same request is answered with the volume.
    let h = lose(h);
    let again = create_from(&h, "restored", 5 << 20, 0, source_snapshot(&s1), &[])
        .await
        .unwrap();
    assert_eq!(again.volume_id, restored.volume_id);
    assert!(matches!(
        again.content_source.and_then(|c| c.r#type),
        Some(csi::volume_content_source::Type::Snapshot(x)) if x.snapshot_id == s1
    ));
    let h = lose(h);
    create_from(&h, "plain", 5 << 20, 0, None, &[])
        .await
        .unwrap();
}

/// DeleteSnapshot of an NFS snapshot recorded here whose share was taken
/// out of --nfs-allowed-shares is FAILED_PRECONDITION naming the flag, and
/// nothing is mounted or removed (as DeleteVolume of a volume there); it
/// is answered not ready to use; with the share allowed again it is
/// deleted. Before, the kind's delete
/// took the id for one that is not Berth's and did nothing, the record
/// was removed and the call answered OK: the CO forgot the snapshot while
/// its copy stayed on the share for good. `state check` warns about it, as
/// about such a volume (before, it said nothing).
#[tokio::test]
async fn a_recorded_snapshot_on_a_share_no_longer_allowed_is_not_forgotten() {
    let h = nfs(&[]);
    let src = create(&h, "src", &[]).await;
    std::fs::write(share_root(&h).join("src/f"), b"tenant").unwrap();
    let s = snapshot(&h, "s", &src.volume_id).await;
    let dir = snap_dir(&h, &s.snapshot_id);
    assert!(dir.join("data/f").exists());
    let h = restart(
        h,
        &["--kinds", "nfs", "--nfs-allowed-shares", "127.0.0.1:/other"],
    );
    h.fake().clear_calls();
    let e = delete_snapshot(&h, &s.snapshot_id)
        .await
        .expect_err("deleted off the allowed shares");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("--nfs-allowed-shares"), "{e:?}");
    // Still there, not ready to use (a restore from it is refused).
    let got = h
        .ctl
        .get_snapshot(Request::new(csi::GetSnapshotRequest {
            snapshot_id: s.snapshot_id.clone(),
            ..Default::default()
        }))
        .await
        .expect("get")
        .into_inner()
        .snapshot
        .unwrap();
    assert!(!got.ready_to_use, "{got:?}");
    assert!(runs(h.fake()).is_empty(), "{:?}", runs(h.fake()));
    assert!(h.driver.store.snapshot_get(&s.snapshot_id).is_some());
    assert!(dir.join("data/f").exists());
    // `state check` names it, as it does such a volume (before: nothing).
    let (_, report) = state_check(&h);
    let line = report
        .lines()
        .find(|l| l.contains(&s.snapshot_id))
        .unwrap_or_else(|| panic!("the snapshot is not named: {report}"));
    assert!(
        line.starts_with("warning:") && line.contains("--nfs-allowed-shares does not allow"),
        "{report}"
    );
    let h = restart(h, &["--kinds", "nfs"]);
    let (_, report) = state_check(&h);
    assert!(!report.contains(&s.snapshot_id), "{report}");
    delete_snapshot(&h, &s.snapshot_id).await.expect("delete");
    assert!(h.driver.store.snapshot_get(&s.snapshot_id).is_none());
    assert!(!dir.exists());
}

/// Numeric NFS mount options beyond the kernel's range (fs/nfs/fs_context.c:
/// nconnect and max_connect 1 to 16, port and mountport at most 65535,
/// timeo at least 1, mountvers 1 to 3, minorversion at most 2) are refused
/// by CreateVolume, naming the option, before anything is mounted or
/// recorded (and by NodePublishVolume before mount.nfs runs). They passed
/// as "at most 9 digits" and then failed every NodePublishVolume. The
/// limits themselves pass.
#[tokio::test]
async fn numeric_mount_options_beyond_the_kernels_range_are_refused_at_create() {
    let h = nfs(&[]);
    let t = h.path("target");
    for (opt, named) in [
        ("nconnect=17", "nconnect"),
        ("nconnect=0", "nconnect"),
        ("max_connect=17", "max_connect"),
        ("max_connect=0", "max_connect"),
        ("port=65536", "port"),
        ("mountport=99999", "mountport"),
        ("timeo=0", "timeo"),
        ("mountvers=4", "mountvers"),
        ("mountvers=0", "mountvers"),
        ("minorversion=3", "minorversion"),
    ] {
        let mut r = req("a", &[]);
        r.volume_capabilities = vec![mount_cap_flags(Mode::MultiNodeMultiWriter, &[opt])];
        let e = create_err(&h, r).await;
        assert_eq!(e.code(), Code::InvalidArgument, "{opt}: {}", e.message());
        assert!(e.message().contains(named), "{opt}: {}", e.message());
        let e = h
            .node
            .node_publish_volume(Request::new(nfs_publish(
                "nfs#d#127.0.0.1#/export#a",
                &t,
                false,
                &[opt],
            )))
            .await
            .expect_err("NodePublishVolume should fail");
        assert_eq!(e.code(), Code::InvalidArgument, "{opt}: {}", e.message());
    }
    assert!(runs(h.fake()).is_empty(), "{:?}", runs(h.fake()));
    assert!(h.driver.store.is_empty());
    let mut r = req("b", &[]);
    r.volume_capabilities = vec![mount_cap_flags(
        Mode::MultiNodeMultiWriter,
        &["nconnect=16,max_connect=16,port=65535,timeo=1,mountport=0"],
    )];
    h.ctl
        .create_volume(Request::new(r))
        .await
        .expect("options at the kernel's limits are accepted");
}
