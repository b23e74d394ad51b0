//! Root integration tests: local directory volumes with real bind mounts.
//! Ignored unless asked for (`cargo test --test root_local -- --ignored`, as
//! tests/run-all.sh does inside a private mount namespace). Every test
//! unmounts what it mounted even when it fails (`UnmountOnDrop`).
mod common;

use std::path::Path;

use berth::csi::v1 as csi;
use berth::csi::v1::controller_server::Controller;
use berth::csi::v1::node_server::Node;
use berth::csi::v1::volume_capability::access_mode::Mode;
use common::*;
use tonic::{Code, Request};

/// A new local volume of 1 MiB named `name`: its id.
async fn create_local(h: &Harness, name: &str) -> String {
    h.ctl
        .create_volume(Request::new(create_req(name, 1 << 20)))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id
}

async fn create_and_stage(h: &Harness, name: &str) -> (String, std::path::PathBuf) {
    assert!(is_root(), "root tests need root");
    let id = create_local(h, name).await;
    let staging = h.path(&format!("staging-{name}"));
    std::fs::create_dir(&staging).unwrap();
    h.node
        .node_stage_volume(Request::new(stage_req(&id, &staging)))
        .await
        .unwrap();
    (id, staging)
}

#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn lifecycle_with_real_mounts() {
    let (h, _g) = real(&[]);
    let (id, staging) = create_and_stage(&h, "life").await;
    assert_eq!(mount_entries(&staging).len(), 1);

    let rw = h.path("pod-rw");
    let ro = h.path("pod-ro");
    h.node
        .node_publish_volume(Request::new(publish_req(&id, &staging, &rw, false)))
        .await
        .unwrap();
    h.node
        .node_publish_volume(Request::new(publish_req(&id, &staging, &ro, true)))
        .await
        .unwrap();

    // Data written through the pod's mount lands in the volume's directory.
    std::fs::write(rw.join("hello"), b"world").unwrap();
    assert_eq!(
        std::fs::read(h.path("local").join(&id).join("hello")).unwrap(),
        b"world"
    );
    assert_eq!(std::fs::read(ro.join("hello")).unwrap(), b"world");

    // Read-only is enforced by the kernel and shown in mountinfo.
    let e = std::fs::write(ro.join("nope"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    let ro_entries = mount_entries(&ro);
    assert_eq!(ro_entries.len(), 1);
    assert!(ro_entries[0].readonly(), "{:?}", ro_entries[0]);
    assert!(!mount_entries(&rw)[0].readonly());

    // Repeats add no mount; a conflicting repeat is ALREADY_EXISTS.
    h.node
        .node_publish_volume(Request::new(publish_req(&id, &staging, &ro, true)))
        .await
        .unwrap();
    h.node
        .node_stage_volume(Request::new(stage_req(&id, &staging)))
        .await
        .unwrap();
    assert_eq!(mount_entries(&ro).len(), 1);
    assert_eq!(mount_entries(&staging).len(), 1);
    let r = h
        .node
        .node_publish_volume(Request::new(publish_req(&id, &staging, &ro, false)))
        .await;
    assert_eq!(code(r), Code::AlreadyExists);

    // Unstage refuses while published; delete refuses while mounted.
    let unstage = csi::NodeUnstageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.display().to_string(),
    };
    assert_eq!(
        code(
            h.node
                .node_unstage_volume(Request::new(unstage.clone()))
                .await
        ),
        Code::FailedPrecondition
    );
    let del = csi::DeleteVolumeRequest {
        volume_id: id.clone(),
        ..Default::default()
    };
    assert_eq!(
        code(h.ctl.delete_volume(Request::new(del.clone())).await),
        Code::FailedPrecondition
    );

    for t in [&rw, &ro] {
        for _ in 0..2 {
            h.node
                .node_unpublish_volume(Request::new(csi::NodeUnpublishVolumeRequest {
                    volume_id: id.clone(),
                    target_path: t.display().to_string(),
                }))
                .await
                .unwrap();
        }
        assert!(mount_entries(t).is_empty());
        assert!(!t.exists(), "target removed");
    }
    h.node
        .node_unstage_volume(Request::new(unstage.clone()))
        .await
        .unwrap();
    h.node
        .node_unstage_volume(Request::new(unstage))
        .await
        .unwrap();
    assert!(mount_entries(&staging).is_empty());
    assert!(
        staging.is_dir(),
        "the CO's staging directory is left to the CO"
    );
    h.ctl.delete_volume(Request::new(del)).await.unwrap();
    assert!(!h.path("local").join(&id).exists());
    assert!(mounts_under(h.dir.path()).is_empty());
}

#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn readonly_remount_keeps_nosuid_nodev_and_noexec_flag_applies() {
    let (h, _g) = real(&[]);
    let (id, staging) = create_and_stage(&h, "flags").await;
    let t = h.path("t");
    let mut req = publish_req(&id, &staging, &t, true);
    req.volume_capability = Some(mount_cap_flags(
        Mode::SingleNodeWriter,
        &["nosuid", "nodev", "noexec"],
    ));
    h.node.node_publish_volume(Request::new(req)).await.unwrap();
    let e = &mount_entries(&t)[0];
    for opt in ["ro", "nosuid", "nodev", "noexec"] {
        assert!(e.has_option(opt), "{opt} missing in {}", e.options);
    }
}

#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn unpublish_removes_stacked_mounts_and_broken_targets() {
    let (h, _g) = real(&[]);
    let (id, staging) = create_and_stage(&h, "stack").await;
    let t = h.path("t");
    h.node
        .node_publish_volume(Request::new(publish_req(&id, &staging, &t, false)))
        .await
        .unwrap();
    // Two more mounts stacked on the target, as a buggy earlier publish
    // would leave.
    for _ in 0..2 {
        nix::mount::mount(
            Some(&staging),
            &t,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
    }
    assert_eq!(mount_entries(&t).len(), 3);
    h.node
        .node_unpublish_volume(Request::new(csi::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: t.display().to_string(),
        }))
        .await
        .unwrap();
    assert!(mount_entries(&t).is_empty());
    assert!(!t.exists());
}

#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn stats_and_condition_with_real_mounts() {
    let (h, _g) = real(&[]);
    let (id, staging) = create_and_stage(&h, "stats").await;
    let t = h.path("t");
    h.node
        .node_publish_volume(Request::new(publish_req(&id, &staging, &t, false)))
        .await
        .unwrap();
    let req = csi::NodeGetVolumeStatsRequest {
        volume_id: id.clone(),
        volume_path: t.display().to_string(),
        staging_target_path: String::new(),
    };
    let s = h
        .node
        .node_get_volume_stats(Request::new(req.clone()))
        .await
        .unwrap()
        .into_inner();
    let bytes = &s.usage[0];
    assert!(bytes.total > 0 && bytes.available > 0 && bytes.used >= 0);
    assert!(!s.volume_condition.unwrap().abnormal);
    // The backing directory vanishes under a live mount.
    std::fs::rename(h.path("local").join(&id), h.path("moved")).unwrap();
    let s = h
        .node
        .node_get_volume_stats(Request::new(req))
        .await
        .unwrap()
        .into_inner();
    assert!(s.volume_condition.unwrap().abnormal);
}

#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn concurrent_publishes_of_different_volumes_proceed() {
    let (h, _g) = real(&[]);
    let mut vols = Vec::new();
    for i in 0..8 {
        vols.push(create_and_stage(&h, &format!("c{i}")).await);
    }
    let mut tasks = Vec::new();
    for (i, (id, staging)) in vols.iter().enumerate() {
        let node = berth::node::NodeService {
            driver: h.driver.clone(),
        };
        let req = publish_req(id, staging, &h.path(&format!("t{i}")), false);
        tasks.push(tokio::spawn(async move {
            node.node_publish_volume(Request::new(req))
                .await
                .map(|_| ())
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    for i in 0..8 {
        assert_eq!(mount_entries(&h.path(&format!("t{i}"))).len(), 1);
    }
}

#[test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
fn statx_probe_and_unpublish_of_stacked_binds_with_the_real_kernel() {
    use berth::os::{MountProbe, StatxMountProbe};
    use std::os::unix::fs::MetadataExt;
    assert!(is_root(), "root tests need root");
    let dir = tempfile::tempdir().unwrap();
    // Declared after the temp dir, so it unmounts before the dir is removed,
    // also when an assertion fails.
    let _guard = UnmountOnDrop(dir.path().to_path_buf());
    let (src, plain, target) = (
        dir.path().join("src"),
        dir.path().join("plain"),
        dir.path().join("target"),
    );
    for d in [&src, &plain, &target] {
        std::fs::create_dir(d).unwrap();
    }
    let bind = |from: &Path, to: &Path| {
        nix::mount::mount(
            Some(from),
            to,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap()
    };
    let probe = StatxMountProbe;
    assert_eq!(probe.mount_root(&plain), Some(false));
    assert_eq!(probe.mount_root(&dir.path().join("missing")), Some(false));
    assert_eq!(probe.mount_root(&dir.path().join("missing/x")), Some(false));
    assert_eq!(probe.mount_root(Path::new("/")), Some(true));

    // Two binds stacked on the target, from the same filesystem: the same
    // st_dev as the plain directory, yet the kernel knows it is a mount.
    bind(&src, &target);
    bind(&src, &target);
    assert_eq!(mount_entries(&target).len(), 2);
    assert_eq!(
        std::fs::metadata(&target).unwrap().dev(),
        std::fs::metadata(&plain).unwrap().dev(),
        "bind mounts of one filesystem share st_dev"
    );
    assert_eq!(probe.mount_root(&target), Some(true));
    assert_eq!(probe.mount_root(&src), Some(false));
    // The target shows the directory it binds (what publish checks of the
    // staging path), not the one beneath it or any other.
    let id = |p: &Path| probe.identity(p).expect("statx identity");
    assert_eq!(id(&target), id(&src));
    assert_ne!(id(&target), id(&plain));
    assert_eq!(
        id(&plain),
        (
            std::fs::metadata(&plain).unwrap().dev(),
            std::fs::metadata(&plain).unwrap().ino()
        )
    );

    let os = berth::os::Os::real();
    berth::node::mounts::unpublish(&os, &target).unwrap();
    assert!(mount_entries(&target).is_empty(), "nothing left mounted");
    assert!(!target.exists(), "the target directory is removed");
    assert_eq!(probe.mount_root(&target), Some(false));
    assert!(mounts_under(dir.path()).is_empty());
    // Again: nothing to do.
    berth::node::mounts::unpublish(&os, &target).unwrap();
}

/// Unmounts one mount point when dropped (a test's own mount, also when an
/// assertion fails).
struct UnmountOne(std::path::PathBuf);

impl Drop for UnmountOne {
    fn drop(&mut self) {
        while nix::mount::umount2(&self.0, nix::mount::MntFlags::empty()).is_ok() {}
    }
}

fn bind(from: &Path, to: &Path) {
    nix::mount::mount(
        Some(from),
        to,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap()
}

fn unstage_req(id: &str, staging: &Path) -> csi::NodeUnstageVolumeRequest {
    csi::NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
    }
}

fn unpublish_req(id: &str, target: &Path) -> csi::NodeUnpublishVolumeRequest {
    csi::NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.display().to_string(),
    }
}

/// A mount point whose name is not UTF-8, anywhere on the node, leaves
/// every node RPC working (mountinfo is read as bytes).
#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn a_mount_point_named_in_no_utf8_breaks_nothing() {
    use std::os::unix::ffi::OsStrExt;
    let (h, _g) = real(&[]);
    let odd = h
        .dir
        .path()
        .join(std::ffi::OsStr::from_bytes(b"odd-\xff\xfe-name"));
    std::fs::create_dir(&odd).unwrap();
    let src = h.path("odd-src");
    std::fs::create_dir(&src).unwrap();
    bind(&src, &odd);
    let _odd = UnmountOne(odd.clone());
    let (id, staging) = create_and_stage(&h, "utf").await;
    let t = h.path("t");
    h.node
        .node_publish_volume(Request::new(publish_req(&id, &staging, &t, false)))
        .await
        .unwrap();
    h.node
        .node_get_volume_stats(Request::new(csi::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: t.display().to_string(),
            staging_target_path: String::new(),
        }))
        .await
        .unwrap();
    h.node
        .node_unpublish_volume(Request::new(unpublish_req(&id, &t)))
        .await
        .unwrap();
    h.node
        .node_unstage_volume(Request::new(unstage_req(&id, &staging)))
        .await
        .unwrap();
    h.ctl
        .delete_volume(Request::new(csi::DeleteVolumeRequest {
            volume_id: id,
            ..Default::default()
        }))
        .await
        .unwrap();
    assert!(mount_entries(&staging).is_empty());
    let text = std::fs::read("/proc/self/mountinfo").unwrap_or_default();
    let odd_entries: Vec<_> = berth::os::mountinfo::parse(&text)
        .unwrap()
        .into_iter()
        .filter(|m| m.mount_point == odd)
        .collect();
    assert_eq!(odd_entries.len(), 1, "the odd mount is read back exactly");
}

/// Staging and target paths with a space, a backslash and text
/// that looks like mountinfo's own escapes (`\040`, `\012`, `\134`) in
/// their names: the kernel shows them escaped in mountinfo, and Berth reads
/// them back exactly. A repeated stage and publish add no mount, a
/// DeleteVolume sees the volume mounted there (FAILED_PRECONDITION), and
/// unpublish and unstage take the mounts down, found by the mount table.
#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn paths_with_spaces_and_escape_like_names_round_trip_through_mountinfo() {
    let (h, _g) = real(&[]);
    let id = h
        .ctl
        .create_volume(Request::new(create_req("odd", 1 << 20)))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let staging = h.path(r"stage dir\040x\134y");
    std::fs::create_dir(&staging).unwrap();
    let pod = h.path(r"pods/a b\012c\d");
    std::fs::create_dir_all(&pod).unwrap();
    let target = pod.join("mount point");
    for _ in 0..2 {
        h.node
            .node_stage_volume(Request::new(stage_req(&id, &staging)))
            .await
            .unwrap();
        h.node
            .node_publish_volume(Request::new(publish_req(&id, &staging, &target, false)))
            .await
            .unwrap();
    }
    assert_eq!(mount_entries(&staging).len(), 1);
    assert_eq!(mount_entries(&target).len(), 1);
    // The kernel's own text of the mount points: escaped.
    let raw = String::from_utf8_lossy(&std::fs::read("/proc/self/mountinfo").unwrap()).into_owned();
    assert!(raw.contains(r"stage\040dir\134040x\134134y "), "{raw}");
    assert!(
        raw.contains(r"a\040b\134012c\134d/mount\040point "),
        "{raw}"
    );
    std::fs::write(target.join("f"), b"x").unwrap();
    assert_eq!(
        std::fs::read(h.path("local").join(&id).join("f")).unwrap(),
        b"x"
    );
    let del = csi::DeleteVolumeRequest {
        volume_id: id.clone(),
        ..Default::default()
    };
    assert_eq!(
        code(h.ctl.delete_volume(Request::new(del.clone())).await),
        Code::FailedPrecondition
    );
    for _ in 0..2 {
        h.node
            .node_unpublish_volume(Request::new(unpublish_req(&id, &target)))
            .await
            .unwrap();
    }
    assert!(mount_entries(&target).is_empty());
    assert!(!target.exists(), "target removed");
    for _ in 0..2 {
        h.node
            .node_unstage_volume(Request::new(unstage_req(&id, &staging)))
            .await
            .unwrap();
    }
    assert!(mount_entries(&staging).is_empty());
    h.ctl.delete_volume(Request::new(del)).await.unwrap();
    assert!(mounts_under(h.dir.path()).is_empty());
}

/// Staging and target paths under a symlinked parent: mountinfo shows the
/// resolved path, so mounts are matched by mount id (statx STATX_MNT_ID),
/// not by path text: a repeated stage adds no mount, unpublish and unstage
/// really unmount.
#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn paths_under_a_symlinked_parent_are_matched_by_mount_id() {
    let (h, _g) = real(&[]);
    let real_dir = h.path("real");
    std::fs::create_dir(&real_dir).unwrap();
    std::os::unix::fs::symlink(&real_dir, h.path("link")).unwrap();
    let id = h
        .ctl
        .create_volume(Request::new(create_req("sym", 1 << 20)))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let staging = h.path("link/staging");
    let t = h.path("link/target");
    for _ in 0..2 {
        stage_and_publish(&h, &id, &staging, &t).await;
    }
    assert_eq!(mount_entries(&real_dir.join("staging")).len(), 1);
    assert_eq!(mount_entries(&real_dir.join("target")).len(), 1);
    // Another volume on the same staging path is refused.
    let other = h
        .ctl
        .create_volume(Request::new(create_req("sym2", 1 << 20)))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let r = h
        .node
        .node_stage_volume(Request::new(stage_req(&other, &staging)))
        .await;
    assert_eq!(code(r), Code::AlreadyExists);
    let r = h
        .node
        .node_unstage_volume(Request::new(unstage_req(&id, &staging)))
        .await;
    assert_eq!(code(r), Code::FailedPrecondition, "still published");
    h.node
        .node_unpublish_volume(Request::new(unpublish_req(&id, &t)))
        .await
        .unwrap();
    assert!(mount_entries(&real_dir.join("target")).is_empty());
    h.node
        .node_unstage_volume(Request::new(unstage_req(&id, &staging)))
        .await
        .unwrap();
    assert!(mount_entries(&real_dir.join("staging")).is_empty());
    assert!(mounts_under(h.dir.path()).is_empty());
}

/// The record is gone (the volume was deleted from under the node, or the
/// state was lost): NodeUnpublishVolume and NodeUnstageVolume work from the
/// paths and answer OK, so kubelet can finish tearing the pod down.
#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn unpublish_and_unstage_without_a_record_unmount_by_path() {
    let (h, _g) = real(&[]);
    let (id, staging) = create_and_stage(&h, "gone").await;
    let t = h.path("t");
    h.node
        .node_publish_volume(Request::new(publish_req(&id, &staging, &t, false)))
        .await
        .unwrap();
    h.driver.store.remove(&id).unwrap();
    let r = h
        .node
        .node_unstage_volume(Request::new(unstage_req(&id, &staging)))
        .await;
    assert_eq!(code(r), Code::FailedPrecondition, "still published");
    for _ in 0..2 {
        h.node
            .node_unpublish_volume(Request::new(unpublish_req(&id, &t)))
            .await
            .unwrap();
    }
    assert!(mount_entries(&t).is_empty());
    assert!(!t.exists());
    for _ in 0..2 {
        h.node
            .node_unstage_volume(Request::new(unstage_req(&id, &staging)))
            .await
            .unwrap();
    }
    assert!(mount_entries(&staging).is_empty());
    assert!(mounts_under(h.dir.path()).is_empty());
}

/// With the real kernel: volume A's id never unmounts volume B's target or
/// staging path (FAILED_PRECONDITION, B stays mounted and readable); a
/// plain repeat of B's publish is OK, one with other flags ALREADY_EXISTS;
/// a second staging path of B is FAILED_PRECONDITION; and NodeUnpublish of
/// a plain file leaves it.
#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn another_volumes_mounts_are_not_touched() {
    let (h, _g) = real(&[]);
    let (a, _sa) = create_and_stage(&h, "a").await;
    let (b, sb) = create_and_stage(&h, "b").await;
    let tb = h.path("tb");
    h.node
        .node_publish_volume(Request::new(publish_req(&b, &sb, &tb, false)))
        .await
        .unwrap();
    std::fs::write(tb.join("f"), b"b's").unwrap();
    let unpub = |id: &str, p: &Path| csi::NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: p.display().to_string(),
    };
    for p in [&tb, &sb] {
        let r = h
            .node
            .node_unpublish_volume(Request::new(unpub(&a, p)))
            .await;
        assert_eq!(code(r), Code::FailedPrecondition, "{}", p.display());
    }
    let r = h
        .node
        .node_unstage_volume(Request::new(csi::NodeUnstageVolumeRequest {
            volume_id: a.clone(),
            staging_target_path: sb.display().to_string(),
        }))
        .await;
    assert_eq!(code(r), Code::FailedPrecondition);
    assert_eq!((mount_entries(&tb).len(), mount_entries(&sb).len()), (1, 1));
    assert_eq!(std::fs::read(tb.join("f")).unwrap(), b"b's");

    h.node
        .node_publish_volume(Request::new(publish_req(&b, &sb, &tb, false)))
        .await
        .unwrap();
    let mut noexec = publish_req(&b, &sb, &tb, false);
    noexec.volume_capability = Some(mount_cap_flags(Mode::SingleNodeWriter, &["noexec"]));
    assert_eq!(
        code(h.node.node_publish_volume(Request::new(noexec)).await),
        Code::AlreadyExists
    );
    assert!(!mount_entries(&tb)[0].has_option("noexec"));

    let s2 = h.path("staging-b2");
    let r = h
        .node
        .node_stage_volume(Request::new(stage_req(&b, &s2)))
        .await;
    assert_eq!(code(r), Code::FailedPrecondition);
    assert!(mount_entries(&s2).is_empty());

    let file = h.path("plain-file");
    std::fs::write(&file, b"keep").unwrap();
    h.node
        .node_unpublish_volume(Request::new(unpub(&b, &file)))
        .await
        .unwrap();
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");

    h.node
        .node_unpublish_volume(Request::new(unpub(&b, &tb)))
        .await
        .unwrap();
    assert!(mount_entries(&tb).is_empty());
    assert!(!tb.exists());
}

#[test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
fn bench_floor_measures_the_unmount_beside_a_busy_cpu_apart_from_the_floor() {
    let d = tempfile::tempdir().unwrap();
    let work = d.path().join("floor");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["bench", "floor", "-n", "20", "--json", "--work-dir"])
        .arg(&work)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let count = |op: &str| {
        r["operations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["op"] == op)
            .map(|o| o["count"].as_u64().unwrap())
    };
    assert_eq!(count("bind + unmount"), Some(20));
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert_eq!(
        count("bind + unmount, CPU busy"),
        (cpus > 1).then_some(20),
        "{cpus} CPUs"
    );
    assert!(!work.exists(), "the work dir is removed");
    assert!(
        !std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .contains(work.to_str().unwrap()),
        "no mount left"
    );
}

/// `berth bench lifecycle --floor`: the cycles run in blocks, each beside
/// as many cycles of the floor, and each block has its ratio; the floor's
/// directory and every mount are gone afterwards.
#[test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
fn bench_lifecycle_measures_the_floor_in_blocks_between_its_cycles() {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("csi.sock");
    let work = d.path().join("work");
    let mut berth = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .arg("--data-dir")
        .arg(d.path().join("data"))
        .arg("--endpoint")
        .arg(format!("unix://{}", sock.display()))
        .args(["--node-id", "bench-node", "--log-level", "warn"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&sock).is_err()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .arg("bench")
        .arg("--endpoint")
        .arg(format!("unix://{}", sock.display()))
        .args(["lifecycle", "-n", "6", "-c", "1", "--attach", "never"])
        .args(["--floor", "--floor-block", "2", "--json", "--work-dir"])
        .arg(&work)
        .output()
        .unwrap();
    let _ = berth.kill();
    let _ = berth.wait();
    assert!(out.status.success(), "{out:?}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["cycles_ok"], 6, "{r}");
    let f = &r["floor"];
    let blocks = f["blocks"].as_array().unwrap();
    assert_eq!(blocks.len(), 3, "{f}");
    for b in blocks {
        assert_eq!(b["cycles_ok"], 2, "{b}");
        assert!(b["ratio"].as_f64().unwrap() > 0.0, "{b}");
        assert!(b["p99_ratio"].as_f64().unwrap() > 0.0, "{b}");
    }
    // Two binds, two appends, two mkdirs and one directory flush per floor
    // cycle, as many floor cycles as cycles.
    let count = |op: &str| {
        f["operations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["op"] == op)
            .map(|o| o["count"].as_u64().unwrap())
    };
    assert_eq!(count("bind + unmount"), Some(12));
    assert_eq!(count("append + fdatasync"), Some(12));
    assert_eq!(count("mkdir + rmdir"), Some(12));
    assert_eq!(count("fsync new dir + parent"), Some(6));
    let (lo, med, hi) = (
        f["ratio_min"].as_f64().unwrap(),
        f["ratio_median"].as_f64().unwrap(),
        f["ratio_max"].as_f64().unwrap(),
    );
    assert!(0.0 < lo && lo <= med && med <= hi, "{f}");
    assert!(
        !work.exists(),
        "the work dir (and the floor's in it) is removed"
    );
    assert!(
        !std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .contains(d.path().to_str().unwrap()),
        "no mount left"
    );
}

/// An operator renames a published volume's directory by hand (`mv
/// <root>/<id> <root>/<id>.old`). Its mounts still show that directory
/// (mountinfo follows a rename), so NodeUnpublish and NodeUnstage take them
/// down and the pod can go; before, both refused them as "not volume
/// <id>" on every retry. The renamed directory keeps its data. A request
/// naming another volume whose directory is in place is still refused.
#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn a_volume_directory_renamed_by_hand_strands_no_pod() {
    let (h, _g) = real(&[]);
    let (a, sa) = create_and_stage(&h, "a").await;
    let (b, sb) = create_and_stage(&h, "b").await;
    let ta = h.path("ta");
    h.node
        .node_publish_volume(Request::new(publish_req(&a, &sa, &ta, false)))
        .await
        .unwrap();
    std::fs::write(ta.join("f"), b"a's").unwrap();
    let root = h.path("local");
    let old = root.join(format!("{a}.old"));
    std::fs::rename(root.join(&a), &old).unwrap();
    assert_eq!(
        code(
            h.node
                .node_unpublish_volume(Request::new(unpublish_req(&b, &ta)))
                .await
        ),
        Code::FailedPrecondition
    );
    assert_eq!(mount_entries(&ta).len(), 1);
    h.node
        .node_unpublish_volume(Request::new(unpublish_req(&a, &ta)))
        .await
        .expect("unpublish after the rename");
    assert!(mount_entries(&ta).is_empty());
    h.node
        .node_unstage_volume(Request::new(unstage_req(&a, &sa)))
        .await
        .expect("unstage after the rename");
    assert!(mount_entries(&sa).is_empty());
    assert_eq!(std::fs::read(old.join("f")).unwrap(), b"a's");
    h.node
        .node_unstage_volume(Request::new(unstage_req(&b, &sb)))
        .await
        .unwrap();
}

/// The single mount at `p` (panics unless there is exactly one).
fn the_mount(p: &Path) -> berth::os::MountEntry {
    let mut v = mount_entries(p);
    assert_eq!(v.len(), 1, "mounts at {}: {v:?}", p.display());
    v.remove(0)
}

/// Whether a file can be created at `dir` (false: EROFS; any other error
/// fails the test). The file is removed again.
/// Unmounts `p`, waiting out (at most 2 s) an EBUSY from a descriptor
/// of a file in it that a child another test's thread forked still holds
/// until it execs (`writable` opens one; its close does not end the copy).
fn unmount_settled(p: &Path) {
    let t0 = std::time::Instant::now();
    loop {
        match nix::mount::umount2(p, nix::mount::MntFlags::empty()) {
            Err(nix::errno::Errno::EBUSY) if t0.elapsed() < std::time::Duration::from_secs(2) => {
                std::thread::sleep(std::time::Duration::from_millis(5))
            }
            r => return r.unwrap_or_else(|e| panic!("unmounting {}: {e}", p.display())),
        }
    }
}

fn writable(dir: &Path) -> bool {
    let f = dir.join("probe-write");
    match std::fs::write(&f, b"x") {
        Ok(()) => {
            std::fs::remove_file(&f).unwrap();
            true
        }
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => false,
        Err(e) => panic!("writing {}: {e}", f.display()),
    }
}

fn remount(p: &Path, flags: nix::mount::MsFlags) {
    use nix::mount::MsFlags;
    nix::mount::mount(
        None::<&str>,
        p,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | flags,
        None::<&str>,
    )
    .unwrap_or_else(|e| panic!("remount {} {flags:?}: {e}", p.display()));
}

/// With the real kernel: for every set of the flags Berth accepts (128) and
/// source mounts with flags of their own (ro; nosuid, nodev, noexec;
/// noatime; strictatime; nodiratime; nosymfollow; several at once; a
/// filesystem read-only underneath a read-write mount), the atomic bind
/// (open_tree, mount_setattr, move_mount) gives the mount exactly the
/// per-mount options the two-step bind of earlier versions (bind, then a
/// remount with what is asked plus what the mount has) gave it: mountinfo
/// shows the same options, writes fail with EROFS alike, and a repeat of
/// the publish is recognised (`has_flags`) the same way. The atomic mounter
/// really went the atomic way, the other the two-step way, and a bind
/// without flags stays one mount(MS_BIND) for both.
#[test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
fn atomic_and_two_step_binds_give_the_same_flags() {
    use berth::node::mounts::has_flags;
    use berth::os::{BindWay, RealMounter};
    use nix::mount::MsFlags;
    assert!(is_root(), "root tests need root");
    let d = tempfile::tempdir().unwrap();
    let _guard = UnmountOnDrop(d.path().to_path_buf());
    let (atomic, two) = (RealMounter::new(), RealMounter::two_step());
    let nosymfollow = MsFlags::from_bits_retain(libc::MS_NOSYMFOLLOW);
    let sources: &[(&str, MsFlags)] = &[
        ("rw", MsFlags::empty()),
        ("ro", MsFlags::MS_RDONLY),
        (
            "nosuid,nodev,noexec",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        ),
        ("noatime", MsFlags::MS_NOATIME),
        ("strictatime", MsFlags::MS_STRICTATIME),
        ("nodiratime", MsFlags::MS_NODIRATIME),
        ("nosymfollow", nosymfollow),
        (
            "ro,nosuid,noatime,nodiratime",
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NOATIME | MsFlags::MS_NODIRATIME,
        ),
        ("tmpfs read-only underneath", MsFlags::empty()),
    ];
    let mut compared = 0;
    for (i, (name, ms)) in sources.iter().enumerate() {
        let (vol, src) = (
            d.path().join(format!("vol{i}")),
            d.path().join(format!("src{i}")),
        );
        std::fs::create_dir(&vol).unwrap();
        std::fs::create_dir(&src).unwrap();
        let sb_readonly = name.starts_with("tmpfs");
        if sb_readonly {
            nix::mount::mount(
                Some("tmpfs"),
                &vol,
                Some("tmpfs"),
                MsFlags::empty(),
                Some("size=1m"),
            )
            .unwrap();
        }
        bind(&vol, &src);
        if sb_readonly {
            // The filesystem (and the mount at vol) read-only; the bind at
            // src still read-write as a mount.
            nix::mount::mount(
                None::<&str>,
                &vol,
                None::<&str>,
                MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .unwrap();
        } else {
            remount(&src, *ms);
        }
        let src_entry = the_mount(&src);
        assert_eq!(
            src_entry.readonly(),
            *name == "ro" || name.starts_with("ro,")
        );
        for n in 0..128 {
            let f = berth::os::MountFlags::numbered(n);
            let (t1, t2) = (d.path().join("two-step"), d.path().join("atomic"));
            std::fs::create_dir(&t1).unwrap();
            std::fs::create_dir(&t2).unwrap();
            let want = if f.is_plain() {
                (BindWay::Plain, BindWay::Plain)
            } else {
                (BindWay::TwoStep, BindWay::Atomic)
            };
            assert_eq!(two.bind_way(&src, &t1, f).unwrap(), want.0, "{name} {f:?}");
            assert_eq!(
                atomic.bind_way(&src, &t2, f).unwrap(),
                want.1,
                "{name} {f:?}"
            );
            let (e1, e2) = (the_mount(&t1), the_mount(&t2));
            assert_eq!(
                e1.options, e2.options,
                "source {name} ({}), asked {f:?}",
                src_entry.options
            );
            assert_eq!(
                (e1.major, e1.minor, &e1.root),
                (e2.major, e2.minor, &e2.root)
            );
            let ro = e2.readonly() || sb_readonly;
            assert_eq!(writable(&t1), !ro, "{name} {f:?}");
            assert_eq!(writable(&t2), !ro, "{name} {f:?}");
            if f.readonly {
                assert!(e2.readonly(), "{name} {f:?}: {}", e2.options);
            }
            if !sb_readonly {
                // (On a read-only filesystem the remount made even a
                // read-write request's mount read-only, so a repeat is
                // not recognised: as before, either way.)
                assert!(
                    has_flags(&e2, f, Some(&src_entry)),
                    "{name} {f:?}: {}",
                    e2.options
                );
            }
            assert_eq!(
                has_flags(&e1, f, Some(&src_entry)),
                has_flags(&e2, f, Some(&src_entry))
            );
            for t in [&t1, &t2] {
                unmount_settled(t);
                std::fs::remove_dir(t).unwrap();
            }
            compared += 1;
        }
        unmount_settled(&src);
        if sb_readonly {
            unmount_settled(&vol);
        }
    }
    assert_eq!(compared, sources.len() * 128);
    assert!(mounts_under(d.path()).is_empty());
}

/// In a shared mount, as kubelet's directory is in Berth's node plugin
/// (mountPropagation: Bidirectional), a read-only bind propagates to the
/// peer (the host's view, the one the pod gets) read-only: the mount was
/// read-only before it was attached. The two-step way's remount changed
/// only Berth's own copy and left the peer's writable (per-mount flags do
/// not propagate), which only a kernel without the new calls still gets.
#[test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
fn a_read_only_bind_propagates_read_only() {
    use berth::os::{BindWay, MountFlags, RealMounter};
    use nix::mount::MsFlags;
    assert!(is_root(), "root tests need root");
    let d = tempfile::tempdir().unwrap();
    let _guard = UnmountOnDrop(d.path().to_path_buf());
    let (shared, peer) = (d.path().join("kubelet"), d.path().join("host-view"));
    for p in [&shared, &peer] {
        std::fs::create_dir(p).unwrap();
    }
    bind(&shared, &shared);
    nix::mount::mount(
        None::<&str>,
        &shared,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .unwrap();
    bind(&shared, &peer);
    let (vol, src) = (shared.join("vol"), shared.join("staging"));
    std::fs::create_dir(&vol).unwrap();
    std::fs::create_dir(&src).unwrap();
    bind(&vol, &src);
    let ro = MountFlags {
        readonly: true,
        nosuid: true,
        ..Default::default()
    };
    for (m, way, peer_writable) in [
        (RealMounter::new(), BindWay::Atomic, false),
        (RealMounter::two_step(), BindWay::TwoStep, true),
    ] {
        let t = shared.join("target");
        std::fs::create_dir(&t).unwrap();
        assert_eq!(m.bind_way(&src, &t, ro).unwrap(), way);
        let here = the_mount(&t);
        assert!(
            here.readonly() && here.has_option("nosuid"),
            "{}",
            here.options
        );
        assert!(!writable(&t));
        let there = peer.join("target");
        let copy = the_mount(&there);
        assert_eq!(copy.readonly(), !peer_writable, "{way:?}: {}", copy.options);
        assert_eq!(writable(&there), peer_writable, "{way:?}");
        unmount_settled(&t);
        assert!(mount_entries(&there).is_empty(), "the unmount propagates");
        std::fs::remove_dir(&t).unwrap();
    }
}

/// A driver over the real OS whose mounter makes binds with flags the
/// two-step way, as on a kernel without the new mount API.
fn real_two_step() -> (Harness, UnmountOnDrop) {
    let dir = tempfile::tempdir().expect("tempdir");
    let guard = UnmountOnDrop(dir.path().to_path_buf());
    let mut os = berth::os::Os::real();
    os.mounter = std::sync::Arc::new(berth::os::RealMounter::two_step());
    (build(dir, os, None, &[]), guard)
}

/// NodePublishVolume(readonly) with nosuid, nodev, noexec and noatime, on
/// a kernel with the new mount API (one atomic mount) and with the
/// two-step fallback: the same mount either way (ro and every flag asked,
/// writes fail with EROFS), a repeat is OK and adds no mount, a repeat
/// asking read-write is ALREADY_EXISTS. And a target that already holds
/// this volume read-write (what a berth killed between bind and remount
/// left, before this version) is still ALREADY_EXISTS for a read-only
/// publish, as for any target published with another read-only setting,
/// and is left as it is.
#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn a_read_only_publish_gives_the_mount_the_two_step_way_gave() {
    let mut seen = Vec::new();
    for two_step in [false, true] {
        let (h, _g) = if two_step { real_two_step() } else { real(&[]) };
        let (id, staging) = create_and_stage(&h, "ro").await;
        let t = h.path("pod");
        let mut req = publish_req(&id, &staging, &t, true);
        req.volume_capability = Some(mount_cap_flags(
            Mode::SingleNodeWriter,
            &["nosuid,nodev", "noexec", "noatime"],
        ));
        for _ in 0..2 {
            h.node
                .node_publish_volume(Request::new(req.clone()))
                .await
                .unwrap();
            let e = the_mount(&t);
            for opt in ["ro", "nosuid", "nodev", "noexec", "noatime"] {
                assert!(e.has_option(opt), "{opt} missing in {}", e.options);
            }
            let w = std::fs::write(t.join("nope"), b"x").unwrap_err();
            assert_eq!(w.raw_os_error(), Some(libc::EROFS));
        }
        seen.push(the_mount(&t).options);
        let mut rw = req.clone();
        rw.readonly = false;
        assert_eq!(
            code(h.node.node_publish_volume(Request::new(rw)).await),
            Code::AlreadyExists
        );

        let left = h.path("left-writable");
        std::fs::create_dir(&left).unwrap();
        bind(&staging, &left);
        let r = h
            .node
            .node_publish_volume(Request::new(publish_req(&id, &staging, &left, true)))
            .await;
        assert_eq!(code(r), Code::AlreadyExists);
        assert!(!the_mount(&left).readonly());

        for p in [&t, &left] {
            h.node
                .node_unpublish_volume(Request::new(unpublish_req(&id, p)))
                .await
                .unwrap();
            assert!(mount_entries(p).is_empty());
        }
        h.node
            .node_unstage_volume(Request::new(unstage_req(&id, &staging)))
            .await
            .unwrap();
        delete(&h, &id).await;
        assert!(mounts_under(h.dir.path()).is_empty());
    }
    assert_eq!(seen[0], seen[1]);
}

/// With shared propagation and peers of the kubelet directory in Berth's
/// mount namespace (`shared_kubelet_dir`), the kernel copies the staging
/// mount and each publication onto the peers. Those copies are no
/// publications: a SINGLE_NODE_SINGLE_WRITER publish is not refused for
/// them, and NodeUnstageVolume succeeds once the pod's mount is gone
/// (before, it answered FAILED_PRECONDITION forever: the copy counted as a
/// publication). The pod's mount itself still blocks the unstage. The
/// copies go with the unmounts.
#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn copies_made_by_propagation_strand_no_volume() {
    let (h, _g) = real(&[]);
    let (kubelet, views) = shared_kubelet_dir(h.dir.path());
    let cap = mount_cap(Mode::SingleNodeSingleWriter);
    let id = h
        .ctl
        .create_volume(Request::new(csi::CreateVolumeRequest {
            volume_capabilities: vec![cap.clone()],
            ..create_req("v", 1 << 20)
        }))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let s = kubelet.join("plugins/kubernetes.io/csi/x/globalmount");
    let t = kubelet.join("pods/u/volumes/v/mount");
    std::fs::create_dir_all(&s).unwrap();
    std::fs::create_dir_all(t.parent().unwrap()).unwrap();
    h.node
        .node_stage_volume(Request::new(csi::NodeStageVolumeRequest {
            volume_capability: Some(cap.clone()),
            ..stage_req(&id, &s)
        }))
        .await
        .unwrap();
    for p in places(&kubelet, &views, &s) {
        assert_eq!(mount_entries(&p).len(), 1, "{} has its copy", p.display());
    }
    h.node
        .node_publish_volume(Request::new(csi::NodePublishVolumeRequest {
            volume_capability: Some(cap.clone()),
            ..publish_req(&id, &s, &t, false)
        }))
        .await
        .unwrap();
    std::fs::write(t.join("data"), b"pod").unwrap();
    let e = h
        .node
        .node_unstage_volume(Request::new(unstage_req(&id, &s)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains(&t.display().to_string()) && !e.message().contains("globalmount"),
        "{}",
        e.message()
    );
    h.node
        .node_unpublish_volume(Request::new(csi::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: t.display().to_string(),
        }))
        .await
        .unwrap();
    h.node
        .node_unstage_volume(Request::new(unstage_req(&id, &s)))
        .await
        .unwrap();
    for p in places(&kubelet, &views, &s)
        .into_iter()
        .chain(places(&kubelet, &views, &t))
    {
        assert!(
            mount_entries(&p).is_empty(),
            "{} still mounted",
            p.display()
        );
    }
    assert_eq!(
        std::fs::read(h.path("local").join(&id).join("data")).unwrap(),
        b"pod"
    );
    delete(&h, &id).await;
}

/// `umount` (then `umount -l` and rmdir) of the staging path by hand while
/// the volume is published: kubelet's re-stage at the same path mounts it
/// again and the pod keeps its data; another staging path is refused; the
/// teardown leaves nothing mounted.
#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn a_staging_mount_taken_off_by_hand_is_staged_again() {
    let (h, _g) = real(&[]);
    let (id, staging) = create_and_stage(&h, "byhand").await;
    let target = h.path("pod");
    let publish = || Request::new(publish_req(&id, &staging, &target, false));
    h.node.node_publish_volume(publish()).await.unwrap();
    std::fs::write(target.join("f"), b"data").unwrap();
    for how in ["umount", "umount -l and rmdir"] {
        let flags = if how == "umount" { 0 } else { libc::MNT_DETACH };
        let c = std::ffi::CString::new(staging.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path; umount2 reads it only.
        assert_eq!(unsafe { libc::umount2(c.as_ptr(), flags) }, 0, "{how}");
        if flags != 0 {
            std::fs::remove_dir(&staging).unwrap();
        }
        assert!(mount_entries(&staging).is_empty());
        let other = h.path(&format!("other-{flags}"));
        let r = h
            .node
            .node_stage_volume(Request::new(stage_req(&id, &other)))
            .await;
        assert_eq!(code(r), Code::FailedPrecondition, "{how}: a second path");
        assert!(mount_entries(&other).is_empty());
        for _ in 0..2 {
            h.node
                .node_stage_volume(Request::new(stage_req(&id, &staging)))
                .await
                .unwrap_or_else(|e| panic!("{how}: {e:?}"));
            h.node.node_publish_volume(publish()).await.unwrap();
        }
        assert_eq!(mount_entries(&staging).len(), 1, "{how}");
        assert_eq!(std::fs::read(staging.join("f")).unwrap(), b"data");
    }
    unpublish_as_kubelet(&h, &id, &target).await.unwrap();
    unstage_as_kubelet(&h, &id, &staging).await.unwrap();
    assert!(mount_entries(&staging).is_empty() && mount_entries(&target).is_empty());
    delete(&h, &id).await;
}

/// A node reboot under staged and published local volumes, with the real
/// kernel: every mount is taken off (berth stopped), the directories stay,
/// and kubelet removed one pod's directory and staging path meanwhile.
/// kubelet's teardown of that pod at its old paths, the other's stage and
/// publish again at the same paths (its data there), and the
/// reconstructed unpublish of a target never published again all answer
/// OK; stats answer for the volume only where it is mounted.
#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn a_reboot_under_local_volumes_strands_nothing() {
    let (h, _g) = real(&[]);
    let (a, sa) = create_and_stage(&h, "a").await;
    let (b, sb) = create_and_stage(&h, "b").await;
    let (ta, tb, tb2) = (h.path("pod-a"), h.path("pod-b"), h.path("pod-b2"));
    for (id, s, t, ro) in [
        (&a, &sa, &ta, false),
        (&b, &sb, &tb, false),
        (&b, &sb, &tb2, true),
    ] {
        h.node
            .node_publish_volume(Request::new(publish_req(id, s, t, ro)))
            .await
            .unwrap();
    }
    std::fs::write(tb.join("f"), b"data").unwrap();

    // The reboot.
    let dir = h.stop();
    unmount_under(dir.path());
    assert!(mounts_under(dir.path()).is_empty());
    std::fs::remove_dir(dir.path().join("pod-a")).unwrap();
    std::fs::remove_dir(&sa).unwrap();
    let h = build(dir, berth::os::Os::real(), None, &[]);

    unpublish_as_kubelet(&h, &a, &ta).await.unwrap();
    unstage_as_kubelet(&h, &a, &sa).await.unwrap();
    delete(&h, &a).await;
    h.node
        .node_stage_volume(Request::new(stage_req(&b, &sb)))
        .await
        .unwrap();
    h.node
        .node_publish_volume(Request::new(publish_req(&b, &sb, &tb, false)))
        .await
        .unwrap();
    assert_eq!(std::fs::read(tb.join("f")).unwrap(), b"data");
    let stats = |p: &Path| csi::NodeGetVolumeStatsRequest {
        volume_id: b.clone(),
        volume_path: p.display().to_string(),
        staging_target_path: sb.display().to_string(),
    };
    let st = h
        .node
        .node_get_volume_stats(Request::new(stats(&tb)))
        .await
        .unwrap()
        .into_inner();
    assert!(!st.volume_condition.unwrap().abnormal);
    assert_eq!(
        code(
            h.node
                .node_get_volume_stats(Request::new(stats(&tb2)))
                .await
        ),
        Code::NotFound
    );
    unpublish_as_kubelet(&h, &b, &tb2).await.unwrap();
    assert!(!tb2.exists());
    unpublish_as_kubelet(&h, &b, &tb).await.unwrap();
    unstage_as_kubelet(&h, &b, &sb).await.unwrap();
    delete(&h, &b).await;
    assert!(mounts_under(h.dir.path()).is_empty());
}

/// A published volume's directory moved away by hand, out of the root
/// (`mv <root>/<id> /elsewhere`) or beside it with a new one made in its
/// place (`mv <root>/<id> <root>/<id>.old; mkdir <root>/<id>`): mountinfo
/// follows the move, so the mounts show the moved directory, and
/// NodeUnpublish and NodeUnstage refused them as "not volume <id>" on
/// every retry (the pod never went). Now they take them down (the staging
/// path Berth recorded for the volume shows the moved directory) and its
/// data stays; a request naming another volume is still refused.
#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn a_volume_directory_moved_away_by_hand_strands_no_pod() {
    let (h, _g) = real(&[]);
    let (b, sb) = create_and_stage(&h, "other").await;
    let root = h.path("local");
    for how in ["out of the root", "beside, and made again"] {
        let name = if how == "out of the root" {
            "out"
        } else {
            "beside"
        };
        let (a, sa) = create_and_stage(&h, name).await;
        let ta = h.path(&format!("t-{name}"));
        h.node
            .node_publish_volume(Request::new(publish_req(&a, &sa, &ta, false)))
            .await
            .unwrap();
        std::fs::write(ta.join("f"), b"a's").unwrap();
        let moved = if name == "out" {
            h.path("moved")
        } else {
            root.join(format!("{a}.old"))
        };
        std::fs::rename(root.join(&a), &moved).unwrap();
        if name == "beside" {
            std::fs::create_dir(root.join(&a)).unwrap();
        }
        // Other volumes, made before and after this one, never take its
        // mounts for theirs.
        let (c, sc) = create_and_stage(&h, &format!("later-{name}")).await;
        for other in [&b, &c] {
            let r = h
                .node
                .node_unpublish_volume(Request::new(unpublish_req(other, &ta)))
                .await;
            assert_eq!(code(r), Code::FailedPrecondition, "{how}");
            let r = h
                .node
                .node_unstage_volume(Request::new(unstage_req(other, &sa)))
                .await;
            assert_eq!(code(r), Code::FailedPrecondition, "{how}");
        }
        assert_eq!((mount_entries(&ta).len(), mount_entries(&sa).len()), (1, 1));
        unstage_as_kubelet(&h, &c, &sc).await.unwrap();
        unpublish_as_kubelet(&h, &a, &ta)
            .await
            .unwrap_or_else(|e| panic!("{how}: unpublish: {e:?}"));
        assert!(mount_entries(&ta).is_empty());
        unstage_as_kubelet(&h, &a, &sa)
            .await
            .unwrap_or_else(|e| panic!("{how}: unstage: {e:?}"));
        assert!(mount_entries(&sa).is_empty());
        assert_eq!(std::fs::read(moved.join("f")).unwrap(), b"a's");
    }
    unstage_as_kubelet(&h, &b, &sb).await.unwrap();
}

/// DeleteVolume of a published volume whose directory was moved away by
/// hand is refused while its staging path is still mounted: mountinfo
/// follows the move, so no mount showed `<root>/<id>`, the delete removed
/// the record, and without it every NodeUnpublish and NodeUnstage of the
/// pod refused the mounts as not the volume's, forever. Once the pod's
/// teardown is done, the delete succeeds.
#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn delete_of_a_moved_away_volume_waits_for_its_mounts() {
    let (h, _g) = real(&[]);
    let (a, sa) = create_and_stage(&h, "moved").await;
    let ta = h.path("t");
    h.node
        .node_publish_volume(Request::new(publish_req(&a, &sa, &ta, false)))
        .await
        .unwrap();
    std::fs::rename(h.path("local").join(&a), h.path("elsewhere")).unwrap();
    let e = try_delete(&h, &a).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(h.driver.store.contains(&a));
    unpublish_as_kubelet(&h, &a, &ta).await.unwrap();
    unstage_as_kubelet(&h, &a, &sa).await.unwrap();
    assert!(mount_entries(&sa).is_empty() && mount_entries(&ta).is_empty());
    delete(&h, &a).await;
    assert!(!h.driver.store.contains(&a));
}

/// `<state-dir>/staged.log` damaged or edited by hand so that it names a
/// volume's staging path as one no node RPC accepts (`/`, a system
/// directory, Berth's own state directory, a relative path): DeleteVolume
/// took `/` (mounted, as it always is) for the volume's staging path still
/// mounted, and refused the volume forever ("still mounted at /"). Now
/// start-up skips such a line as damage, and the delete succeeds; stage and
/// unstage still work.
#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn a_staged_log_naming_paths_no_rpc_accepts_blocks_no_delete() {
    let (h, g) = real(&[]);
    let mut ids = Vec::new();
    for name in ["root", "proc", "state", "relative"] {
        let (id, staging) = create_and_stage(&h, name).await;
        unstage_as_kubelet(&h, &id, &staging).await.unwrap();
        ids.push(id);
    }
    let dir = h.stop();
    let state = dir.path().join("state");
    let mut text = std::fs::read_to_string(state.join("staged.log")).unwrap();
    for (id, at) in ids.iter().zip([
        "/".to_string(),
        "/proc".to_string(),
        state.display().to_string(),
        "..".to_string(),
    ]) {
        text.push_str(&format!("{{\"id\":\"{id}\",\"at\":{at:?}}}\n"));
    }
    std::fs::write(state.join("staged.log"), text).unwrap();
    let h = build(dir, berth::os::Os::real(), None, &[]);
    // Stage and unstage still work beside the damage.
    let (id, staging) = create_and_stage(&h, "after").await;
    unstage_as_kubelet(&h, &id, &staging).await.unwrap();
    ids.push(id);
    for id in &ids {
        try_delete(&h, id)
            .await
            .unwrap_or_else(|e| panic!("{id}: {e:?}"));
        assert!(!h.driver.store.contains(id));
    }
    drop((h, g));
}

/// A symlink put by hand at the staging-path log's temp name
/// (`<state-dir>/.staged.log.tmp`): every rewrite of the log failed on it
/// and removed the log, so after a restart Berth knew no staging path, and
/// a staging mount taken off by hand while a pod used the volume could not
/// be made again (`FAILED_PRECONDITION` on every NodeStageVolume until the
/// pod went). Now the symlink is taken away (not where it leads) and the
/// log kept.
#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn a_symlink_at_the_staged_logs_temp_name_loses_no_staging_path() {
    let (h, g) = real(&[]);
    let dir = h.stop();
    let state = dir.path().join("state");
    let outside = dir.path().join("outside");
    std::fs::write(&outside, b"keep").unwrap();
    std::os::unix::fs::symlink(&outside, state.join(".staged.log.tmp")).unwrap();
    // A damaged line, so that start-up rewrites the log.
    std::fs::write(state.join("staged.log"), "garbage\n").unwrap();
    let h = build(dir, berth::os::Os::real(), None, &[]);
    let (id, staging) = create_and_stage(&h, "tmp").await;
    let target = h.path("pod");
    let publish = || Request::new(publish_req(&id, &staging, &target, false));
    h.node.node_publish_volume(publish()).await.unwrap();
    let h = build(h.stop(), berth::os::Os::real(), None, &[]);
    let c = std::ffi::CString::new(staging.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path; umount2 reads it only.
    assert_eq!(unsafe { libc::umount2(c.as_ptr(), 0) }, 0);
    h.node
        .node_stage_volume(Request::new(stage_req(&id, &staging)))
        .await
        .unwrap();
    h.node.node_publish_volume(publish()).await.unwrap();
    assert_eq!(std::fs::read(&outside).unwrap(), b"keep");
    unpublish_as_kubelet(&h, &id, &target).await.unwrap();
    unstage_as_kubelet(&h, &id, &staging).await.unwrap();
    delete(&h, &id).await;
    drop((h, g));
}

/// Two volumes staged at one path by calls at the same moment, with real
/// bind mounts: one is mounted there, the other call is ABORTED or
/// ALREADY_EXISTS. Before, both calls looked at the empty path before
/// either mounted and both answered OK: the kernel held two volumes
/// stacked at the staging path.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn two_volumes_staged_at_one_path_at_once_are_never_stacked() {
    assert!(is_root(), "root tests need root");
    let (h, _g) = real(&[]);
    for round in 0..30 {
        let mut ids = Vec::new();
        for v in ["a", "b"] {
            ids.push(created_id(
                h.ctl
                    .create_volume(Request::new(create_req(&format!("{v}{round}"), 1 << 20)))
                    .await,
            ));
        }
        let s = h.path(&format!("staging-{round}"));
        let calls = ids.iter().map(|id| {
            let node = berth::node::NodeService {
                driver: h.driver.clone(),
            };
            let req = stage_req(id, &s);
            tokio::spawn(async move { node.node_stage_volume(Request::new(req)).await })
        });
        let mut codes = Vec::new();
        for c in calls.collect::<Vec<_>>() {
            codes.push(code(c.await.unwrap()));
        }
        assert!(
            codes.contains(&Code::Ok)
                && codes
                    .iter()
                    .any(|c| matches!(c, Code::Aborted | Code::AlreadyExists)),
            "round {round}: {codes:?}"
        );
        assert_eq!(mount_entries(&s).len(), 1, "round {round}");
    }
}

/// A local root named through a symlink (`--local-root` a link, or a data
/// directory under one: `/var/lib/berth` linked to `/data/berth`) serves
/// like any other: mountinfo shows the directory the link leads to, and
/// before 2026-12-06 berth compared it with the root as written, so
/// NodeGetVolumeStats answered NOT_FOUND ("not mounted") for a published
/// volume and unpublish and unstage could not tell the volume's mounts.
#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn a_local_root_named_through_a_symlink_serves_its_volumes() {
    assert!(is_root(), "root tests need root");
    let dir = tempfile::tempdir().unwrap();
    let _g = UnmountOnDrop(dir.path().to_path_buf());
    std::fs::create_dir(dir.path().join("real")).unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(dir.path().join("real"), &link).unwrap();
    let link_arg = link.display().to_string();
    let h = build(
        dir,
        berth::os::Os::real(),
        None,
        &["--local-root", &link_arg],
    );
    let (id, staging) = create_and_stage(&h, "linked").await;
    let t = h.path("t");
    h.node
        .node_publish_volume(Request::new(publish_req(&id, &staging, &t, false)))
        .await
        .unwrap();
    std::fs::write(t.join("hello"), b"world").unwrap();
    assert_eq!(
        std::fs::read(h.path("real").join(&id).join("hello")).unwrap(),
        b"world"
    );
    let s = h
        .node
        .node_get_volume_stats(Request::new(csi::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: t.display().to_string(),
            staging_target_path: String::new(),
        }))
        .await
        .expect("stats of a published volume")
        .into_inner();
    assert!(!s.volume_condition.unwrap().abnormal);
    h.node
        .node_unpublish_volume(Request::new(unpublish_req(&id, &t)))
        .await
        .unwrap();
    h.node
        .node_unstage_volume(Request::new(unstage_req(&id, &staging)))
        .await
        .unwrap();
    assert!(mount_entries(&t).is_empty() && mount_entries(&staging).is_empty());
    h.ctl
        .delete_volume(Request::new(csi::DeleteVolumeRequest {
            volume_id: id.clone(),
            secrets: Default::default(),
        }))
        .await
        .unwrap();
    assert!(!h.path("real").join(&id).exists());
}

/// Thaws a frozen filesystem when dropped (before it is unmounted).
struct Thaw(std::path::PathBuf);

impl Drop for Thaw {
    fn drop(&mut self) {
        let _ = std::process::Command::new("fsfreeze")
            .arg("--unfreeze")
            .arg(&self.0)
            .status();
    }
}

/// A command that SIGKILL cannot end at its deadline (uninterruptible
/// sleep: here a write to a frozen filesystem; in life I/O to a disk that
/// stopped answering) does not hold its call: the call returns Timeout
/// soon after the deadline and the process is waited for elsewhere. The
/// runner waited for it without a bound after killing it, so the
/// operation, and the volume's guard, were held for as long as the process
/// slept: for ever on a dead disk, every retry ABORTED.
#[test]
#[ignore = "needs root, a loop device and a private mount namespace: run tests/run-all.sh"]
fn a_command_that_outlives_sigkill_does_not_hold_its_call() {
    use berth::os::{OsError, RealRunner, Runner};
    use std::process::Command;
    use std::time::Duration;
    assert!(is_root(), "root tests need root");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fs.img");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let _unmount = UnmountOnDrop(mnt.clone());
    let run = |c: &mut Command| assert!(c.status().unwrap().success(), "{c:?}");
    run(Command::new("truncate").arg("-s").arg("64M").arg(&img));
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img));
    // A loop mount: detached again when unmounted.
    run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&img)
        .arg(&mnt));
    run(Command::new("fsfreeze").arg("--freeze").arg(&mnt));
    let thaw = Thaw(mnt.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    let file = mnt.join("f");
    std::thread::spawn(move || {
        let r = RealRunner.run(
            "sh",
            &["-c".into(), format!("echo x > '{}'", file.display())],
            Duration::from_secs(1),
        );
        let _ = tx.send(r);
    });
    // Generous: the call returns within a few seconds of its deadline; it
    // returned only once the filesystem was thawed below.
    let r = rx.recv_timeout(Duration::from_secs(30));
    drop(thaw);
    assert!(
        matches!(r, Ok(Err(OsError::Timeout { .. }))),
        "the call waited for a process SIGKILL could not end: {r:?}"
    );
}

/// A tree removed by Berth (a deleted volume's directory, the trash) never
/// reaches into a filesystem mounted inside it, nor empties one mounted on
/// the tree itself: the removal stops with an error naming the mount point,
/// and what is mounted there keeps every file.
#[test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
fn remove_tree_never_enters_a_mount_in_the_tree() {
    use berth::os::files::{Files, RealFiles};
    let d = tempfile::tempdir().unwrap();
    let _g = UnmountOnDrop(d.path().to_path_buf());
    let other = d.path().join("other");
    std::fs::create_dir_all(other.join("deep")).unwrap();
    std::fs::write(other.join("deep/keep"), b"theirs").unwrap();
    // A mount on the tree itself.
    let on = d.path().join("on");
    std::fs::create_dir(&on).unwrap();
    bind(&other, &on);
    let e = berth::error::chain(&RealFiles.remove_tree(&on).unwrap_err());
    assert!(e.contains("mount point"), "{e}");
    assert_eq!(std::fs::read(other.join("deep/keep")).unwrap(), b"theirs");
    // A mount in the tree, below a level of plain directories and files.
    let tree = d.path().join("tree");
    std::fs::create_dir_all(tree.join("a/b")).unwrap();
    std::fs::write(tree.join("a/f"), b"x").unwrap();
    bind(&other, &tree.join("a/b"));
    let e = berth::error::chain(&RealFiles.remove_tree(&tree).unwrap_err());
    assert!(e.contains("mount point"), "{e}");
    assert_eq!(std::fs::read(other.join("deep/keep")).unwrap(), b"theirs");
    assert_eq!(mount_entries(&tree.join("a/b")).len(), 1);
    // Unmounted, the tree goes whole.
    nix::mount::umount(&tree.join("a/b")).unwrap();
    RealFiles.remove_tree(&tree).unwrap();
    assert!(std::fs::symlink_metadata(&tree).is_err());
    assert_eq!(std::fs::read(other.join("deep/keep")).unwrap(), b"theirs");
}

/// DeleteVolume of a local volume with a filesystem mounted inside its
/// directory (a privileged pod's mount propagated back, a mount made by
/// hand) never removes what is mounted there; once it is unmounted, the
/// delete's retry removes the volume.
#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn delete_of_a_volume_with_a_mount_inside_keeps_what_is_mounted_there() {
    let (h, _g) = real(&[]);
    let id = h
        .ctl
        .create_volume(Request::new(create_req("a", 1 << 20)))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let other = h.path("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("keep"), b"theirs").unwrap();
    let inside = h.path("local").join(&id).join("sub");
    std::fs::create_dir(&inside).unwrap();
    bind(&other, &inside);
    let del = || csi::DeleteVolumeRequest {
        volume_id: id.clone(),
        ..Default::default()
    };
    // Whatever the delete answers, and however often the background
    // tries to finish it (the trash is emptied on its own thread), what is
    // mounted inside stays.
    let _ = h.ctl.delete_volume(Request::new(del())).await;
    let trash = h.path("local/.trash");
    let trash_empty = || std::fs::read_dir(&trash).map_or(true, |d| d.count() == 0);
    for _ in 0..20 {
        h.driver.retry_pending(true);
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(std::fs::read(other.join("keep")).unwrap(), b"theirs");
    let inner: Vec<_> = mounts_under(&h.path(""))
        .into_iter()
        .filter(|m| m.ends_with("sub"))
        .collect();
    assert_eq!(inner.len(), 1, "{inner:?}");
    nix::mount::umount(&inner[0]).unwrap();
    let _ = h.ctl.delete_volume(Request::new(del())).await;
    for _ in 0..100 {
        h.driver.retry_pending(true);
        if h.driver.store.get(&id).is_none() && trash_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(std::fs::read(other.join("keep")).unwrap(), b"theirs");
    assert!(h.driver.store.get(&id).is_none());
    assert!(trash_empty());
}

/// Takes the immutable and append-only flags off everything under a
/// directory when dropped (declare it after the harness's guard so it
/// drops first): a test tree with `chattr +i` in it cannot be removed.
struct Unchattr(std::path::PathBuf);

impl Drop for Unchattr {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .args(["-R", "-f", "-i", "-a"])
            .arg(&self.0)
            .status();
    }
}

/// A pod with CAP_LINUX_IMMUTABLE makes a file of its volume immutable:
/// DeleteVolume answers OK (the record goes, the directory into the
/// trash), the trash cannot be emptied, and each start-up's attempt fails.
/// That one entry must not stop the rest of start-up's cleanup: before,
/// the first trash entry that could not be removed ended it, so an
/// unfinished create's directory under `.creating/` (and every later
/// step: partial snapshot copies, directories without a record) stayed on
/// every start. Once the flag is gone, a start empties the trash.
#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn an_undeletable_trash_entry_stops_no_other_cleanup_at_start_up() {
    let (h, _g) = real(&[]);
    let _flags = Unchattr(h.path("local"));
    let id = h
        .ctl
        .create_volume(Request::new(create_req("a", 1 << 20)))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let stuck = h.path("local").join(&id).join("stuck");
    std::fs::write(&stuck, b"the tenant's").unwrap();
    let made = std::process::Command::new("chattr")
        .arg("+i")
        .arg(&stuck)
        .status()
        .unwrap();
    assert!(made.success(), "chattr +i (the filesystem keeps no flags?)");
    delete(&h, &id).await;
    assert!(h.driver.store.get(&id).is_none());
    let trash = h.path("local/.trash");
    let in_trash = || std::fs::read_dir(&trash).map_or(0, |d| d.count());
    // The background's attempt fails; the entry stays.
    for _ in 0..20 {
        h.driver.retry_pending(true);
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(in_trash(), 1);
    // What start-up removes beside it: a create that never finished.
    let unfinished = h.path("local/.creating/local-unfinished");
    std::fs::create_dir_all(unfinished.join("d")).unwrap();
    let h = h.restart(berth::os::Os::real(), None);
    assert!(
        !unfinished.exists(),
        "an unfinished create's directory was left beside a trash entry that cannot be removed"
    );
    assert_eq!(in_trash(), 1);
    // The flag gone (by the operator): the next start empties the trash.
    assert!(std::process::Command::new("chattr")
        .args(["-R", "-i"])
        .arg(&trash)
        .status()
        .unwrap()
        .success());
    let h = h.restart(berth::os::Os::real(), None);
    assert_eq!(in_trash(), 0);
    drop(h);
}

/// A tenant fills the filesystem that holds both the state journal and
/// the local root (the default: everything under `--data-dir`; here a
/// small filesystem of its own, which keeps nothing back for root). Every
/// DeleteVolume on the full filesystem still works (each appends its
/// Deleting and its removal to the journal: without space kept for the
/// journal, the first append that needed a new block failed with ENOSPC,
/// and every delete after it, so the space never came back), also after
/// a restart on the full filesystem; deleting the tenant's volume gives
/// its space back; the journal is never damaged (`state check` clean on
/// the full filesystem and after), and once space is back berth creates
/// again without an operator.
async fn deletes_on_a_full_filesystem(fs: &str) {
    assert!(is_root(), "root tests need root");
    let images = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _unmount = UnmountOnDrop(dir.path().to_path_buf());
    small_filesystem(dir.path(), fs, &images.path().join("fs.img"));
    let total = free_bytes(dir.path());
    let h = build(
        dir,
        berth::os::Os::real(),
        None,
        &["--local-spare-dirs", "0"],
    );
    let mut ids = Vec::new();
    for i in 0..24 {
        let r = h
            .ctl
            .create_volume(Request::new(create_req(&format!("v{i}"), 64 << 10)))
            .await;
        ids.push(created_id(r));
    }
    let tenant = ids.remove(0);
    fill(&h.path("local").join(&tenant));
    // (xfs keeps a few blocks back that no write of a file takes: 20 KiB)
    let left = free_bytes(h.dir.path());
    assert!(left < 64 << 10, "the filesystem is full: {left} bytes free");
    let (clean, out) = state_check(&h);
    assert!(clean, "{out}");

    // Half of the deletes on the full filesystem, a restart on it, the
    // other half.
    let later = ids.split_off(ids.len() / 2);
    for id in &ids {
        let r = try_delete(&h, id).await;
        assert!(r.is_ok(), "delete of {id} on a full filesystem: {r:?}");
    }
    let (clean, out) = state_check(&h);
    assert!(clean, "{out}");
    let h = h.restart(berth::os::Os::real(), None);
    for id in &later {
        let r = try_delete(&h, id).await;
        assert!(
            r.is_ok(),
            "delete of {id} on a full filesystem after a restart: {r:?}"
        );
    }
    let (clean, out) = state_check(&h);
    assert!(clean, "{out}");

    // The tenant's volume goes, and its space comes back.
    let r = try_delete(&h, &tenant).await;
    assert!(r.is_ok(), "delete of the full volume: {r:?}");
    let back = total - (2 << 20);
    for _ in 0..100 {
        if free_bytes(h.dir.path()) > back {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        free_bytes(h.dir.path()) > back,
        "the deleted volume's space came back: {} of {total} bytes free",
        free_bytes(h.dir.path())
    );
    assert!(h.driver.store.is_empty());
    assert_eq!(h.driver.store.poisoned(), None);

    // With space back berth works as before, no operator involved, and a
    // restart finds a clean journal.
    let r = h
        .ctl
        .create_volume(Request::new(create_req("after", 1 << 20)))
        .await;
    created_id(r);
    let h = h.restart(berth::os::Os::real(), None);
    assert_eq!(h.driver.store.len(), 1);
    let (clean, out) = state_check(&h);
    assert!(clean, "{out}");
    let torn: Vec<_> = std::fs::read_dir(h.path("state/journal"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().contains("torn"))
        .collect();
    assert!(torn.is_empty(), "{torn:?}");
}

#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn deletes_on_a_full_tmpfs_work_and_free_its_space() {
    deletes_on_a_full_filesystem("tmpfs").await;
}

/// On ext4 a directory takes a block: the trash a delete moves the volume
/// into is made ahead (when a volume is made), and before 2026-12-07 the
/// first delete on the full filesystem failed making it (`mkdir .trash`:
/// ENOSPC), after its record said Deleting.
#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn deletes_on_a_full_ext4_work_and_free_its_space() {
    deletes_on_a_full_filesystem("ext4").await;
}

/// On xfs the same (before 2026-12-07 the first delete on the full
/// filesystem failed appending to the journal, ENOSPC, as on tmpfs).
#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn deletes_on_a_full_xfs_work_and_free_its_space() {
    deletes_on_a_full_filesystem("xfs").await;
}

/// A crash tore the journal's last write, and a tenant has filled the
/// filesystem (state and volumes share it) by the next start: the torn
/// tail is still kept beside the log (in the space the log kept past its
/// end, let go for it) and cut off, and berth starts with every
/// acknowledged volume; nothing is dropped without its copy. Before,
/// start-up failed writing the copy (ENOSPC) and berth did not start
/// until an operator freed space (no NodeUnpublish for the node's pods
/// meanwhile), leaving an empty `.torn` copy at every attempt.
#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn a_torn_tail_on_a_full_tmpfs_is_kept_and_berth_starts() {
    a_torn_tail_on_a_full_filesystem("tmpfs").await;
}

#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn a_torn_tail_on_a_full_ext4_is_kept_and_berth_starts() {
    a_torn_tail_on_a_full_filesystem("ext4").await;
}

async fn a_torn_tail_on_a_full_filesystem(fs: &str) {
    assert!(is_root(), "root tests need root");
    let images = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _unmount = UnmountOnDrop(dir.path().to_path_buf());
    small_filesystem(dir.path(), fs, &images.path().join("fs.img"));
    let h = build(
        dir,
        berth::os::Os::real(),
        None,
        &["--local-spare-dirs", "0"],
    );
    let a = created_id(
        h.ctl
            .create_volume(Request::new(create_req("a", 64 << 10)))
            .await,
    );
    std::fs::write(h.path("local").join(&a).join("data"), b"acknowledged").unwrap();
    let tenant = created_id(
        h.ctl
            .create_volume(Request::new(create_req("tenant", 64 << 10)))
            .await,
    );
    fill(&h.path("local").join(&tenant));
    let journal = h.path("state/journal");
    let dir = h.stop();
    let logs = |suffix: &str| -> Vec<std::path::PathBuf> {
        let mut v: Vec<std::path::PathBuf> = std::fs::read_dir(&journal)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().contains(suffix))
            .collect();
        v.sort();
        v
    };
    let log = logs(".jsonl")
        .into_iter()
        .find(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .unwrap();
    let whole = std::fs::read(&log).unwrap();
    // The crash: a write cut short, within the space kept past the log.
    let torn: &[u8] = b"{\"v\":1,\"op\":\"put\",\"a write a crash cut sh";
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(torn).unwrap();
        f.sync_all().unwrap();
    }
    let left = free_bytes(dir.path());
    assert!(left < 64 << 10, "the filesystem is full: {left} bytes free");
    let h = match try_build(
        dir,
        berth::os::Os::real(),
        None,
        &["--local-spare-dirs", "0"],
    ) {
        Ok(h) => h,
        Err((_d, e)) => panic!(
            "berth did not start on the full filesystem: {e}; journal: {:?}",
            logs("log-")
        ),
    };
    let kept = logs(".torn");
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(
        std::fs::read(&kept[0]).unwrap(),
        torn,
        "the torn tail is kept whole"
    );
    assert_eq!(
        std::fs::read(&log).unwrap(),
        whole,
        "cut off the log, nothing else"
    );
    assert!(h.driver.store.get(&a).is_some());
    assert!(h.driver.store.get(&tenant).is_some());
    assert_eq!(
        std::fs::read(h.path("local").join(&a).join("data")).unwrap(),
        b"acknowledged"
    );
    let (clean, out) = state_check(&h);
    assert!(clean, "{out}");
    // Deletes still work, and the tenant's gives its space back.
    let r = try_delete(&h, &tenant).await;
    assert!(r.is_ok(), "delete of the full volume: {r:?}");
    assert!(h.driver.store.get(&tenant).is_none());
    drop(h);
}

/// A local DeleteVolume on a full filesystem whose journal keeps no space
/// past its end (a log an older berth wrote, or a reserve used up): the
/// rename into the trash needs no room, but the append of the record's
/// removal needs a new page once the log's last one is full, and the full
/// filesystem refuses it (ENOSPC). That delete was INTERNAL, the volume's
/// directory kept in the trash under its record, and so was every retry
/// for as long as the filesystem stayed full: the volume's own space, the
/// one that could make room, was never given back. Now a volume that holds
/// data is emptied first and its record's removal written in the room that
/// made; an empty one (nothing to free) is RESOURCE_EXHAUSTED naming the
/// full filesystem, and is left as it was (record, directory in place).
/// The state directory shares the tmpfs with the local root (`--data-dir`).
#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn a_delete_without_room_for_its_record_frees_the_volumes_own_space() {
    assert!(is_root(), "root tests need root");
    let images = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _unmount = UnmountOnDrop(dir.path().to_path_buf());
    small_filesystem(dir.path(), "tmpfs", &images.path().join("fs.img"));
    let args = ["--local-spare-dirs", "0"];
    let h = build(dir, berth::os::Os::real(), None, &args);
    let mut ids = Vec::new();
    for i in 0..120 {
        let r = h
            .ctl
            .create_volume(Request::new(create_req(&format!("v{i}"), 16 << 10)))
            .await;
        ids.push(created_id(r));
    }
    let tenant = ids.remove(0);
    let data = ids.remove(0);
    std::fs::write(h.path("local").join(&data).join("data"), vec![7u8; 2 << 20]).unwrap();
    let dir = h.stop();
    // The space the log keeps past its end let go (ftruncate to its own
    // size), then the filesystem filled while berth is down.
    assert_eq!(let_go_of_log_reserve(dir.path()), 1);
    fill(&dir.path().join("local").join(&tenant));
    let h = build(dir, berth::os::Os::real(), None, &args);
    let left = free_bytes(h.dir.path());
    assert!(left < 4096, "the filesystem is full: {left} bytes free");
    // The empty volumes' removals go into the log's last page until one
    // needs a new page.
    let (id, e) = first_refused_delete(&h, &ids).await;
    assert_refused_for_room(&e, false);
    // As it was: the record, the directory in place, nothing in the trash.
    assert!(h.driver.store.get(&id).is_some());
    assert!(h.path("local").join(&id).is_dir());
    let trash = h.path("local/.trash");
    assert_eq!(std::fs::read_dir(&trash).unwrap().count(), 0);
    let (clean, out) = state_check(&h);
    assert!(clean, "{out}");
    // The volume that holds data makes the room for its own removal.
    let r = try_delete(&h, &data).await;
    assert!(r.is_ok(), "delete of the volume holding data: {r:?}");
    assert!(h.driver.store.get(&data).is_none());
    assert!(!h.path("local").join(&data).exists());
    for _ in 0..100 {
        if std::fs::read_dir(&trash).unwrap().count() == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(std::fs::read_dir(&trash).unwrap().count(), 0);
    // In the room it gave back, the refused delete and the rest go through.
    delete_from(&h, &ids, &id).await;
    let (clean, out) = state_check(&h);
    assert!(clean, "{out}");
    let r = try_delete(&h, &tenant).await;
    assert!(r.is_ok(), "delete of the full volume: {r:?}");
    assert!(h.driver.store.is_empty());
    let h = h.restart(berth::os::Os::real(), None);
    assert!(h.driver.store.is_empty());
    drop(h);
}

/// Pages of the file `f` in the page cache (mincore of a mapping of it):
/// on ramfs, the pages a write (or a read) gave the file.
fn resident_pages(f: &std::fs::File, len: usize) -> usize {
    use std::os::fd::AsRawFd;
    let page = 4096;
    let pages = len.div_ceil(page);
    let mut vec = vec![0u8; pages];
    // SAFETY: a read-only shared mapping of `len` bytes of an open file,
    // only given to mincore (never read through) and unmapped after;
    // `vec` has one byte per page.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        assert_eq!(libc::mincore(p, len, vec.as_mut_ptr()), 0);
        libc::munmap(p, len);
    }
    vec.iter().filter(|&&b| b & 1 == 1).count()
}

/// A filesystem that cannot tell holes answers SEEK_DATA / SEEK_HOLE with
/// the whole file as one range of data (the kernel's generic answer: NFS
/// before 4.2, which a share mounted `nfsvers=3` is, ramfs). A file that
/// takes fewer blocks than its length has holes all the same, and is
/// copied as `cp --sparse=auto` copies it: its zero blocks are left holes.
/// Before 2026-12-07 the copy wrote them (copy_file_range of the whole
/// range: zeros read from the holes, written as data), so a tenant's 1 TiB
/// sparse file, which costs it nothing, became 1 TiB written on the share
/// by a snapshot. Shown on ramfs (the pages of the copy, counted with
/// mincore before anything reads it).
#[test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
fn a_sparse_file_stays_sparse_where_the_filesystem_cannot_tell_holes() {
    use std::os::unix::fs::FileExt;
    assert!(is_root(), "root tests need root");
    let dir = tempfile::tempdir().unwrap();
    let _unmount = UnmountOnDrop(dir.path().to_path_buf());
    nix::mount::mount(
        Some("ramfs"),
        dir.path(),
        Some("ramfs"),
        nix::mount::MsFlags::empty(),
        Some("mode=0700"),
    )
    .unwrap();
    let len: u64 = 64 << 20;
    let src = dir.path().join("sparse");
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(len).unwrap();
    f.write_all_at(b"head", 0).unwrap();
    f.write_all_at(b"middle", 40 << 20).unwrap();
    drop(f);
    let dst = dir.path().join("copy");
    let st = berth::os::copy::copy_file(&src, &dst).unwrap();
    let d = std::fs::File::open(&dst).unwrap();
    let pages = resident_pages(&d, len as usize);
    assert_eq!(d.metadata().unwrap().len(), len);
    let at = |off: u64, n: usize| {
        let mut b = vec![0u8; n];
        d.read_exact_at(&mut b, off).unwrap();
        b
    };
    assert_eq!(at(0, 4), b"head");
    assert_eq!(at(40 << 20, 6), b"middle");
    assert_eq!(at(20 << 20, 4), [0; 4]);
    assert!(
        pages <= 4,
        "the copy of a {len}-byte file holding 10 bytes took {pages} pages ({st:?})"
    );
}

/// A driver whose data directory is an ext4 of its own, loop-backed, made
/// by the test and removed with it (it keeps the immutable and append-only
/// flags, which tmpfs does not). Bind the three in this order: the driver
/// goes first, then the filesystem is unmounted (the loop device with it),
/// then its image is removed, also when the test fails.
fn on_ext4() -> (tempfile::TempDir, UnmountOnDrop, Harness) {
    assert!(is_root(), "root tests need root");
    let images = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let unmount = UnmountOnDrop(dir.path().to_path_buf());
    small_filesystem(dir.path(), "ext4", &images.path().join("fs.img"));
    let h = build(dir, berth::os::Os::real(), None, &[]);
    (images, unmount, h)
}

/// The two flags a tenant can set that stop even root: how chattr sets
/// each, how berth names it, how chattr clears it.
const FLAGS: [(&str, &str, &str); 2] = [
    ("+i", "immutable (chattr +i)", "-i"),
    ("+a", "append-only (chattr +a)", "-a"),
];

/// `chattr <flag> <path>`, which must work (the test's own ext4).
fn chattr(flag: &str, path: &Path) {
    let o = std::process::Command::new("chattr")
        .arg(flag)
        .arg(path)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "chattr {flag} {}: {o:?}",
        path.display()
    );
}

/// A tenant (a pod with CAP_LINUX_IMMUTABLE) makes its volume's own
/// directory immutable, then another's append-only: neither can be moved
/// to the trash, and DeleteVolume answers FAILED_PRECONDITION (the spec's
/// "volume in use" for DeleteVolume: the CO retries with back-off) naming
/// the directory, its flag, and the lsattr and chattr commands an
/// operator runs; the record and the data stay, and berth never clears
/// the flag. Once it is cleared, the retry deletes the volume. Before
/// 2026-12-07 the answer was INTERNAL, "moving <dir> to the trash:
/// rename_noreplace ...: Operation not permitted", nothing about a flag.
#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn a_delete_of_a_volume_whose_directory_is_immutable_says_which_flag_and_how_to_clear_it() {
    let (_images, _unmount, h) = on_ext4();
    let _flags = Unchattr(h.path("local"));
    for (set, named, clear) in FLAGS {
        let id = created_id(
            h.ctl
                .create_volume(Request::new(create_req(&format!("v{clear}"), 1 << 20)))
                .await,
        );
        let dir = h.path("local").join(&id);
        std::fs::write(dir.join("data"), b"the tenant's").unwrap();
        chattr(set, &dir);
        let e = try_delete(&h, &id).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        let d = dir.display();
        for want in [
            format!("{d} cannot be moved to the trash, so the volume is not deleted"),
            format!("{d} is {named}"),
            format!("`lsattr -d {d}`"),
            format!("`chattr {clear} {d}`"),
            "berth never clears that flag".to_string(),
        ] {
            assert!(
                e.message().contains(&want),
                "{want:?} not in: {}",
                e.message()
            );
        }
        assert!(h.driver.store.get(&id).is_some());
        assert_eq!(std::fs::read(dir.join("data")).unwrap(), b"the tenant's");
        // Berth never cleared it.
        let shown = std::process::Command::new("lsattr")
            .arg("-d")
            .arg(&dir)
            .output()
            .unwrap();
        let shown = String::from_utf8_lossy(&shown.stdout);
        let flags = shown.split_whitespace().next().unwrap_or_default();
        assert!(flags.contains(&set[1..]), "{shown}");
        chattr(clear, &dir);
        delete(&h, &id).await;
        assert!(h.driver.store.get(&id).is_none());
    }
}

/// Deleted volumes whose trash entries a tenant's flag keeps: an immutable
/// file in one, an append-only directory (with a file in it) in another.
/// DeleteVolume answers OK (the directory is moved into the trash; the
/// flag is inside it) and the trash cannot be emptied. `berth state
/// check` lists each entry with the path that carries the flag, which
/// flag, and the lsattr and chattr commands. Before 2026-12-07 only
/// berth's log said so (at each start). Once an operator cleared the
/// flags, a start empties the trash and the check lists nothing.
#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn state_check_lists_the_trash_entries_a_flag_keeps() {
    let (_images, _unmount, h) = on_ext4();
    let _flags = Unchattr(h.path("local"));
    let mut made = Vec::new();
    for (name, inside, set) in [("a", "stuck", "+i"), ("b", "logs", "+a")] {
        let id = created_id(
            h.ctl
                .create_volume(Request::new(create_req(name, 1 << 20)))
                .await,
        );
        let at = h.path("local").join(&id).join(inside);
        if set == "+a" {
            std::fs::create_dir(&at).unwrap();
            std::fs::write(at.join("log"), b"the tenant's").unwrap();
        } else {
            std::fs::write(&at, b"the tenant's").unwrap();
        }
        chattr(set, &at);
        delete(&h, &id).await;
        made.push((id, inside, set));
    }
    for _ in 0..20 {
        h.driver.retry_pending(true);
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let trash = h.path("local/.trash");
    let (clean, out) = state_check(&h);
    assert!(clean, "{out}");
    for (id, inside, set) in &made {
        let entry = std::fs::read_dir(&trash)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.file_name().unwrap().to_str().unwrap().starts_with(&**id))
            .unwrap_or_else(|| panic!("{id} is not in the trash"));
        let at = entry.join(inside).display().to_string();
        let (_, named, clear) = FLAGS.into_iter().find(|f| f.0 == *set).unwrap();
        for want in [
            format!(
                "warning: {} (the directory of the deleted volume {id}) stays in the trash: {at} is {named}",
                entry.display()
            ),
            format!("`lsattr -d {at}`"),
            format!("`chattr {clear} {at}`"),
        ] {
            assert!(out.contains(&want), "{want:?} not in:\n{out}");
        }
    }
    assert!(std::process::Command::new("chattr")
        .args(["-R", "-i", "-a"])
        .arg(&trash)
        .status()
        .unwrap()
        .success());
    let h = h.restart(berth::os::Os::real(), None);
    assert_eq!(std::fs::read_dir(&trash).unwrap().count(), 0);
    let (clean, out) = state_check(&h);
    assert!(clean && !out.contains("stays in the trash"), "{out}");
}

/// The removal of a tree that an immutable file, or an append-only
/// directory, keeps: the error (which the log of each attempt to empty the
/// trash carries) names the entry that carries the flag, which flag, and
/// the lsattr and chattr commands, and says berth never clears it; EPERM
/// stays its errno. Before 2026-12-07 it said "unlink (immutable or
/// append-only, or in such a directory? lsattr -d shows it ...)" of the
/// entry, without telling which or what clears it.
#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn a_removal_a_flag_stops_names_the_entry_that_carries_it_and_the_flag() {
    use berth::os::{Files, RealFiles};
    let (_images, _unmount, h) = on_ext4();
    let _flags = Unchattr(h.path("trees"));
    for (set, named, clear) in FLAGS {
        let top = h.path("trees").join(clear);
        let locked = top.join("a/b");
        std::fs::create_dir_all(&locked).unwrap();
        std::fs::write(locked.join("f"), b"the tenant's").unwrap();
        // The immutable one is the file itself, the append-only one the
        // directory that holds it.
        let carrier = if set == "+i" {
            locked.join("f")
        } else {
            locked.clone()
        };
        chattr(set, &carrier);
        let e = RealFiles.remove_tree(&top).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EPERM), "{e}");
        let c = carrier.display();
        let msg = e.to_string();
        // The immutable file cannot be unlinked; the append-only
        // directory cannot even be removed (it stops before its file).
        let refused = if set == "+i" {
            format!("unlink {}", locked.join("f").display())
        } else {
            format!("rmdir {}", locked.display())
        };
        for want in [
            refused,
            format!("{c} is {named}"),
            format!("`lsattr -d {c}`"),
            format!("`chattr {clear} {c}`"),
            "berth never clears that flag".to_string(),
        ] {
            assert!(msg.contains(&want), "{want:?} not in: {msg}");
        }
        assert_eq!(std::fs::read(locked.join("f")).unwrap(), b"the tenant's");
        chattr(clear, &carrier);
        RealFiles.remove_tree(&top).unwrap();
        assert!(std::fs::symlink_metadata(&top).is_err());
    }
}

/// What a mount of the directory `dir` shows (device and root), from the
/// real mount table.
fn object_now(dir: &Path) -> (u32, u32, std::path::PathBuf) {
    let t = berth::os::mountinfo::parse(&std::fs::read("/proc/self/mountinfo").unwrap()).unwrap();
    berth::os::mountinfo::object_of(&t, dir).expect("a mount holds it")
}

/// NodeStageVolume binds the volume's directory through a descriptor of
/// it (`/proc/self/fd/N`, opened without following a symlink): with the
/// real kernel the staging mount shows the volume's directory itself
/// (mountinfo's root, the same as before), a repeat is OK and adds no
/// mount, and publish binds it on. A volume directory replaced by a
/// symlink to a host directory is FAILED_PRECONDITION and nothing is
/// mounted (a guard: the stage's lstat refused it before too).
#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn a_stage_binds_the_volume_directory_itself_and_never_a_symlink_in_its_place() {
    let (h, _g) = real(&[]);
    let (id, staging) = create_and_stage(&h, "pinned").await;
    let root = h.path("local");
    std::fs::write(root.join(&id).join("f"), b"vol").unwrap();
    let m = the_mount(&staging);
    assert_eq!(
        (m.major, m.minor, m.root.clone()),
        object_now(&root.join(&id))
    );
    h.node
        .node_stage_volume(Request::new(stage_req(&id, &staging)))
        .await
        .expect("a repeat");
    assert_eq!(the_mount(&staging).id, m.id, "no second mount");
    assert_eq!(std::fs::read(staging.join("f")).unwrap(), b"vol");
    let target = h.path("pod");
    h.node
        .node_publish_volume(Request::new(publish_req(&id, &staging, &target, false)))
        .await
        .unwrap();
    assert_eq!(std::fs::read(target.join("f")).unwrap(), b"vol");
    unpublish_as_kubelet(&h, &id, &target).await.unwrap();
    unstage_as_kubelet(&h, &id, &staging).await.unwrap();

    let b = create_local(&h, "swapped").await;
    let host = host_dir(&h);
    let (dir, aside) = (root.join(&b), root.join(format!("{b}.aside")));
    symlink_in_place(&dir, &aside, &host);
    let sb = h.path("staging-swapped");
    std::fs::create_dir(&sb).unwrap();
    let r = h
        .node
        .node_stage_volume(Request::new(stage_req(&b, &sb)))
        .await;
    assert_eq!(code(r), Code::FailedPrecondition);
    assert!(mount_entries(&sb).is_empty());
    assert!(mounts_of_dir(&host).is_empty());
    std::fs::remove_file(&dir).unwrap();
    std::fs::rename(&aside, &dir).unwrap();
    delete(&h, &b).await;
    delete(&h, &id).await;
}

/// A host directory (`host` in the harness) with a file in it.
fn host_dir(h: &Harness) -> std::path::PathBuf {
    let host = h.path("host");
    std::fs::create_dir(&host).unwrap();
    std::fs::write(host.join("secret"), b"host").unwrap();
    host
}

/// Moves the directory `dir` to `aside` and puts a symlink to `host` at
/// its path.
fn symlink_in_place(dir: &Path, aside: &Path, host: &Path) {
    std::fs::rename(dir, aside).unwrap();
    std::os::unix::fs::symlink(host, dir).unwrap();
}

/// Every mount showing the directory `dir`.
fn mounts_of_dir(dir: &Path) -> Vec<berth::os::MountEntry> {
    let obj = object_now(dir);
    let t = berth::os::mountinfo::parse(&std::fs::read("/proc/self/mountinfo").unwrap()).unwrap();
    berth::os::mountinfo::mounts_of(&t, &obj)
        .into_iter()
        .filter(|m| m.mount_point != dir)
        .cloned()
        .collect()
}

/// The real mounter, with a change made once just before its next bind:
/// a path swapped by someone else after Berth's checks looked at it.
struct SwapBeforeBind {
    real: berth::os::RealMounter,
    swap: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl berth::os::Mounter for SwapBeforeBind {
    fn bind(
        &self,
        source: &Path,
        target: &Path,
        flags: berth::os::MountFlags,
    ) -> Result<(), berth::os::OsError> {
        let swap = self.swap.lock().unwrap().take();
        if let Some(f) = swap {
            f();
        }
        self.real.bind(source, target, flags)
    }

    fn mount_fs(
        &self,
        source: &Path,
        target: &Path,
        fstype: &str,
        flags: berth::os::MountFlags,
        data: &str,
    ) -> Result<(), berth::os::OsError> {
        self.real.mount_fs(source, target, fstype, flags, data)
    }

    fn unmount(&self, target: &Path) -> Result<(), berth::os::OsError> {
        self.real.unmount(target)
    }
}

/// A harness on the real kernel whose mounter makes a change just before
/// its next bind (`SwapBeforeBind`), and its guard.
fn swapping() -> (Harness, std::sync::Arc<SwapBeforeBind>, UnmountOnDrop) {
    assert!(is_root(), "root tests need root");
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_path_buf();
    let swap = std::sync::Arc::new(SwapBeforeBind {
        real: berth::os::RealMounter::new(),
        swap: std::sync::Mutex::new(None),
    });
    let mut os = berth::os::Os::real();
    os.mounter = swap.clone() as std::sync::Arc<dyn berth::os::Mounter>;
    (build(dir, os, None, &[]), swap, UnmountOnDrop(base))
}

/// Volume b's directory mounted over volume a's staging mount just
/// before NodePublishVolume's bind of a, with the real kernel, for a
/// plain publish (mount(2)) and a read-only one (open_tree(2) and
/// move_mount(2)): the target shows a's directory (both follow the
/// staging path's descriptor to the mount opened), never b's (which a
/// bind by path gave a's pod). a's staging mount taken away instead
/// (`umount -l`, the descriptor keeps a plain umount off): the bind
/// fails and nothing is mounted.
#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn a_staging_mount_swapped_just_before_the_publish_bind_is_not_what_is_bound() {
    let (h, swap, _g) = swapping();
    let (a, sa) = create_and_stage(&h, "a").await;
    let (b, sb) = create_and_stage(&h, "b").await;
    let root = h.path("local");
    for (ro, lazy) in [(false, false), (true, false), (false, true)] {
        let target = h.path(&format!("pod-{ro}-{lazy}"));
        let (sa2, bdir) = (sa.clone(), root.join(&b));
        *swap.swap.lock().unwrap() = Some(Box::new(move || {
            if lazy {
                nix::mount::umount2(&sa2, nix::mount::MntFlags::MNT_DETACH).unwrap();
            }
            bind(&bdir, &sa2);
        }));
        let r = h
            .node
            .node_publish_volume(Request::new(publish_req(&a, &sa, &target, ro)))
            .await;
        assert!(swap.swap.lock().unwrap().is_none(), "the swap was made");
        let shown = mount_entries(&target);
        // a's staging mount back as it was before anything can fail.
        unmount_settled(&sa);
        if lazy {
            bind(&root.join(&a), &sa);
        }
        assert_eq!(the_mount(&sa).root, object_now(&root.join(&a)).2);
        if lazy {
            assert!(r.is_err(), "{r:?}");
            assert!(shown.is_empty(), "{shown:?}");
            assert!(!target.exists());
            continue;
        }
        r.expect("publish");
        assert_eq!(shown.len(), 1, "{shown:?}");
        let m = &shown[0];
        assert_eq!(
            (m.major, m.minor, m.root.clone()),
            object_now(&root.join(&a)),
            "ro {ro}"
        );
        assert_eq!(m.readonly(), ro);
        unpublish_as_kubelet(&h, &a, &target).await.unwrap();
    }
    for (id, s) in [(&a, &sa), (&b, &sb)] {
        unstage_as_kubelet(&h, id, s).await.unwrap();
        delete(&h, id).await;
    }
}

/// The volume's directory moved away and a symlink to a host directory
/// put at its path after NodeStageVolume's checks and just before its
/// bind, with the real kernel: the staging mount shows the volume's own
/// directory (mount(2) follows the descriptor's magic link to the object
/// opened), never the host directory (which a bind by path mounted into
/// the pod before).
#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn a_volume_directory_swapped_just_before_the_stage_bind_is_still_what_is_bound() {
    let (h, swap, _g) = swapping();
    let id = create_local(&h, "swap").await;
    let root = h.path("local");
    let (vol, moved, host) = (
        root.join(&id),
        root.join(format!("{id}.moved")),
        h.path("host"),
    );
    std::fs::write(vol.join("f"), b"vol").unwrap();
    let (v, m, ho) = (vol.clone(), moved.clone(), host_dir(&h));
    *swap.swap.lock().unwrap() = Some(Box::new(move || symlink_in_place(&v, &m, &ho)));
    let staging = h.path("staging-swap");
    std::fs::create_dir(&staging).unwrap();
    let r = h
        .node
        .node_stage_volume(Request::new(stage_req(&id, &staging)))
        .await;
    assert!(swap.swap.lock().unwrap().is_none(), "the swap was made");
    let shown = mount_entries(&staging);
    // Taken down before any assertion can fail (the guard would too).
    for _ in &shown {
        unmount_settled(&staging);
    }
    r.expect("stage");
    assert_eq!(shown.len(), 1, "{shown:?}");
    let m0 = &shown[0];
    assert_eq!((m0.major, m0.minor, m0.root.clone()), object_now(&moved));
    assert_ne!((m0.major, m0.minor, m0.root.clone()), object_now(&host));
    std::fs::remove_file(&vol).unwrap();
    std::fs::rename(&moved, &vol).unwrap();
    unstage_as_kubelet(&h, &id, &staging).await.unwrap();
    delete(&h, &id).await;
}
