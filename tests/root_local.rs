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

fn mount_entries(path: &Path) -> Vec<berth::os::MountEntry> {
    let text = std::fs::read("/proc/self/mountinfo").unwrap();
    berth::os::mountinfo::parse(&text)
        .unwrap()
        .into_iter()
        .filter(|m| m.mount_point == path)
        .collect()
}

async fn create_and_stage(h: &Harness, name: &str) -> (String, std::path::PathBuf) {
    assert!(is_root(), "root tests need root");
    let id = h
        .ctl
        .create_volume(Request::new(create_req(name, 1 << 20)))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
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
