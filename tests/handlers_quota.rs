//! Local volumes held to their size by project quotas, against the
//! recording fake (no root; the real kernel interface is tested in the
//! full-kernel guest, tests/vm/quota.sh): ids, limits, crash safety,
//! expansion, stats, capacity, and what happens where quotas are missing.
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use berth::csi::v1 as csi;
use berth::csi::v1::controller_server::Controller;
use berth::csi::v1::node_server::Node;
use berth::kinds::local::quota::{inode_limit, FIRST_PROJECT, MIN_INODES};
use berth::os::fake::FakeOs;
use berth::os::quota::{Project, Quotas};
use berth::os::Os;
use common::*;
use tonic::{Code, Request};

const MIB: i64 = 1 << 20;

/// A driver over a fake whose local root enforces project quotas.
fn with_quotas(extra: &[&str]) -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let (os, fake) = Os::fake();
    fake.enable_project_quotas();
    build(dir, os, Some(fake), extra)
}

fn restart(h: Harness) -> Harness {
    let f: Arc<FakeOs> = h.fake.clone().expect("fake");
    h.restart(Os::on_fake(&f), Some(f))
}

fn req(name: &str, size: i64, params: &[(&str, &str)]) -> csi::CreateVolumeRequest {
    let mut r = create_req(name, size);
    r.parameters = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect::<HashMap<_, _>>();
    r
}

async fn create(h: &Harness, name: &str, size: i64) -> String {
    created_id(
        h.ctl
            .create_volume(Request::new(req(name, size, &[])))
            .await,
    )
}

fn project(h: &Harness, id: &str) -> u32 {
    h.driver
        .store
        .get(id)
        .and_then(|r| r.project())
        .expect("a project in the record")
}

fn dir(h: &Harness, id: &str) -> PathBuf {
    h.path("local").join(id)
}

async fn available(h: &Harness, params: &[(&str, &str)]) -> i64 {
    h.ctl
        .get_capacity(Request::new(csi::GetCapacityRequest {
            parameters: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }))
        .await
        .expect("get capacity")
        .into_inner()
        .available_capacity
}

/// Stages and publishes a volume; returns the target path.
async fn published(h: &Harness, id: &str) -> PathBuf {
    let staging = h.path(&format!("stage-{id}"));
    let target = h.path(&format!("pod-{id}"));
    h.node
        .node_stage_volume(Request::new(stage_req(id, &staging)))
        .await
        .expect("stage");
    h.node
        .node_publish_volume(Request::new(publish_req(id, &staging, &target, false)))
        .await
        .expect("publish");
    target
}

fn node_expand(id: &str, path: &Path, required: i64, limit: i64) -> csi::NodeExpandVolumeRequest {
    csi::NodeExpandVolumeRequest {
        volume_id: id.into(),
        volume_path: path.display().to_string(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        }),
        volume_capability: Some(rwo()),
        ..Default::default()
    }
}

fn ctl_expand(id: &str, required: i64, limit: i64) -> csi::ControllerExpandVolumeRequest {
    csi::ControllerExpandVolumeRequest {
        volume_id: id.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn every_volume_gets_its_own_project_with_its_size_as_limits() {
    let h = with_quotas(&[]);
    let a = create(&h, "a", 1 << 30).await;
    let b = create(&h, "b", 10 * MIB).await;
    let (pa, pb) = (project(&h, &a), project(&h, &b));
    assert_eq!((pa, pb), (FIRST_PROJECT, FIRST_PROJECT + 1));
    let projects = h.fake().projects();
    assert_eq!(
        projects.get(&dir(&h, &a)),
        Some(&Project {
            id: pa,
            inherit: true
        })
    );
    assert_eq!(
        projects.get(&dir(&h, &b)),
        Some(&Project {
            id: pb,
            inherit: true
        })
    );
    let limits = h.fake().project_limits();
    assert_eq!(limits.get(&pa), Some(&(1 << 30, 65_536)));
    assert_eq!(limits.get(&pb), Some(&(10 << 20, MIN_INODES)));
    // A retry of the same create changes nothing.
    assert_eq!(create(&h, "a", 1 << 30).await, a);
    assert_eq!(h.fake().project_limits().len(), 2);
    // The ids are in the durable records.
    let h = restart(h);
    assert_eq!((project(&h, &a), project(&h, &b)), (pa, pb));
    let c = create(&h, "c", MIB).await;
    assert_eq!(project(&h, &c), FIRST_PROJECT + 2);
}

#[tokio::test]
async fn delete_releases_the_id_and_a_thousand_volumes_leak_none() {
    let h = with_quotas(&[]);
    let a = create(&h, "a", MIB).await;
    let pa = project(&h, &a);
    delete(&h, &a).await;
    assert!(h.fake().project_limits().is_empty(), "limits cleared");
    assert!(h.fake().projects().is_empty(), "no directory has it");
    // Reused after delete.
    let b = create(&h, "b", MIB).await;
    assert_eq!(project(&h, &b), pa);
    let mut ids = Vec::new();
    for i in 0..1000 {
        ids.push(create(&h, &format!("v{i}"), MIB).await);
    }
    let mut held: Vec<u32> = ids.iter().map(|id| project(&h, id)).collect();
    held.sort_unstable();
    held.dedup();
    assert_eq!(held.len(), 1000, "every volume has an id of its own");
    assert!(!held.contains(&pa), "b still holds {pa}");
    for id in &ids {
        delete(&h, id).await;
    }
    delete(&h, &b).await;
    assert!(h.fake().project_limits().is_empty());
    assert!(h.fake().projects().is_empty());
    let c = create(&h, "c", MIB).await;
    assert_eq!(project(&h, &c), FIRST_PROJECT);
}

#[tokio::test]
async fn an_id_set_before_a_crash_is_never_handed_out_twice() {
    let h = with_quotas(&[]);
    let root = h.path("local");
    let k = create(&h, "k", MIB).await;
    assert_eq!(project(&h, &k), FIRST_PROJECT);
    // What a crash after the id was set and before the record was written
    // leaves: a directory under .creating/ holding an id (never handed
    // out: removed at start-up, its id freed). And a directory in the root
    // without a record (a volume whose record was lost: kept aside, its id
    // stays charged, so it is never handed out).
    std::fs::create_dir_all(root.join(".creating")).unwrap();
    let empty = root.join(format!(".creating/local-{:032x}", 1));
    let full = root.join(format!("local-{:032x}", 2));
    for (d, id) in [(&empty, FIRST_PROJECT + 1), (&full, FIRST_PROJECT + 2)] {
        std::fs::create_dir(d).unwrap();
        h.fake()
            .set_project(d, Project { id, inherit: true })
            .unwrap();
        h.fake().set_limits(&root, id, MIB as u64, 1024).unwrap();
    }
    std::fs::write(full.join("data"), b"x").unwrap();
    let f: Arc<FakeOs> = h.fake.clone().expect("fake");
    let h = h.restart_past_lost_records(
        &format!("local-{:032x}", 2),
        &|| (Os::on_fake(&f), Some(f.clone())),
        &[],
    );
    assert!(!empty.exists(), "the unfinished create is removed");
    assert!(root.join(".orphaned").read_dir().unwrap().count() == 1);
    assert!(
        !h.fake().project_limits().contains_key(&(FIRST_PROJECT + 1)),
        "the freed id's limits are cleared"
    );
    let a = create(&h, "a", MIB).await;
    let b = create(&h, "b", MIB).await;
    assert_eq!(project(&h, &a), FIRST_PROJECT + 1);
    assert_eq!(
        project(&h, &b),
        FIRST_PROJECT + 3,
        "the id of the directory kept aside is skipped"
    );
}

#[tokio::test]
async fn a_trash_left_by_a_failed_purge_frees_its_id_at_start_up() {
    let h = with_quotas(&[]);
    let a = create(&h, "a", MIB).await;
    let pa = project(&h, &a);
    // The record goes, emptying the trash fails: the directory is still
    // charged to its id, which stays held.
    h.fake().fail_next("remove tree", libc::EIO);
    delete(&h, &a).await;
    assert!(h.driver.store.get(&a).is_none());
    assert!(h.fake().project_limits().contains_key(&pa));
    let b = create(&h, "b", MIB).await;
    assert_eq!(project(&h, &b), pa + 1);
    // Start-up empties the trash and lets the id go.
    let h = restart(h);
    assert!(!h.fake().project_limits().contains_key(&pa));
    assert!(h.fake().projects().values().all(|p| p.id != pa));
    let c = create(&h, "c", MIB).await;
    assert_eq!(project(&h, &c), pa);
}

#[tokio::test]
async fn a_failed_quota_call_rolls_the_create_back_and_frees_the_id() {
    let h = with_quotas(&[]);
    h.fake().fail_next("quota_set", libc::EIO);
    let r = h.ctl.create_volume(Request::new(req("a", MIB, &[]))).await;
    assert_eq!(code(r), Code::Internal);
    assert!(h.driver.store.is_empty());
    assert!(h.fake().projects().is_empty());
    assert_eq!(
        std::fs::read_dir(h.path("local"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("local-"))
            .count(),
        0
    );
    let a = create(&h, "a", MIB).await;
    assert_eq!(project(&h, &a), FIRST_PROJECT);
}

#[tokio::test]
async fn stats_are_the_volumes_own_from_its_quota() {
    let h = with_quotas(&[]);
    let a = create(&h, "a", 10 * MIB).await;
    let target = published(&h, &a).await;
    h.fake()
        .set_project_written(project(&h, &a), 3 * MIB as u64);
    let s = h
        .node
        .node_get_volume_stats(Request::new(csi::NodeGetVolumeStatsRequest {
            volume_id: a.clone(),
            volume_path: target.display().to_string(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let bytes = &s.usage[0];
    assert_eq!(
        (bytes.total, bytes.used, bytes.available),
        (10 * MIB, 3 * MIB, 7 * MIB)
    );
    let inodes = &s.usage[1];
    // The fake charges the volume's directory only.
    assert_eq!(
        (inodes.total, inodes.used, inodes.available),
        (MIN_INODES as i64, 1, MIN_INODES as i64 - 1)
    );
}

#[tokio::test]
async fn expansion_raises_the_limits_online_and_never_shrinks() {
    let h = with_quotas(&[]);
    let a = create(&h, "a", 10 * MIB).await;
    let pa = project(&h, &a);
    let target = published(&h, &a).await;
    let r = h
        .node
        .node_expand_volume(Request::new(node_expand(&a, &target, 20 * MIB, 0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 20 * MIB);
    assert_eq!(
        h.fake().project_limits().get(&pa),
        Some(&(20 << 20, inode_limit(20 << 20)))
    );
    assert_eq!(h.driver.store.get(&a).unwrap().capacity_bytes, 20 * MIB);
    // Asking for less: it stays as large as it is.
    let r = h
        .node
        .node_expand_volume(Request::new(node_expand(&a, &target, 5 * MIB, 0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 20 * MIB);
    // A limit below its size would shrink it: OUT_OF_RANGE.
    let r = h
        .node
        .node_expand_volume(Request::new(node_expand(&a, &target, 0, 15 * MIB)))
        .await;
    assert_eq!(code(r), Code::OutOfRange);
    let r = h
        .ctl
        .controller_expand_volume(Request::new(ctl_expand(&a, 0, 15 * MIB)))
        .await;
    assert_eq!(code(r), Code::OutOfRange);
    assert_eq!(h.fake().project_limits().get(&pa).unwrap().0, 20 << 20);
    // A path that does not hold the volume.
    let r = h
        .node
        .node_expand_volume(Request::new(node_expand(
            &a,
            &h.path("elsewhere"),
            30 * MIB,
            0,
        )))
        .await;
    assert_eq!(code(r), Code::NotFound);
    // The controller of the volume's own node grows it itself.
    let r = h
        .ctl
        .controller_expand_volume(Request::new(ctl_expand(&a, 30 * MIB, 0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 30 * MIB);
    assert!(!r.node_expansion_required);
    assert_eq!(h.fake().project_limits().get(&pa).unwrap().0, 30 << 20);
    // A volume of another node (the resizer is leader-elected: one
    // controller gets every volume): passed on to that node.
    let other = format!(
        "local-{}{}",
        berth::kinds::node_tag("node-b"),
        "0".repeat(24)
    );
    let r = h
        .ctl
        .controller_expand_volume(Request::new(ctl_expand(&other, 40 * MIB, 0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 40 * MIB);
    assert!(r.node_expansion_required);
    // A restart keeps the limits, and repairs limits that fell behind the
    // record (an expansion interrupted between the two).
    h.fake()
        .set_limits(&h.path("local"), pa, 10 << 20, 1)
        .unwrap();
    let h = restart(h);
    assert_eq!(
        h.fake().project_limits().get(&pa),
        Some(&(30 << 20, inode_limit(30 << 20)))
    );
}

#[tokio::test]
async fn capacity_is_free_space_minus_what_limits_still_allow() {
    let h = with_quotas(&[]);
    set_free(&h, 200 * MIB, 100 * MIB);
    let a = create(&h, "a", 60 * MIB).await;
    let b = create(&h, "b", 30 * MIB).await;
    assert_eq!(available(&h, &[]).await, 10 * MIB);
    // a writes 50 MiB: the free space drops by as much, and a may still
    // write 10.
    h.fake()
        .set_project_written(project(&h, &a), 50 * MIB as u64);
    set_free(&h, 200 * MIB, 50 * MIB);
    assert_eq!(available(&h, &[]).await, 10 * MIB);
    // Written beyond the limit (root may, on ext4) counts as the limit:
    // a may write 10 more, b nothing, and 10 are free.
    h.fake()
        .set_project_written(project(&h, &b), 40 * MIB as u64);
    set_free(&h, 200 * MIB, 10 * MIB);
    assert_eq!(available(&h, &[]).await, 0);
    h.fake().set_project_written(project(&h, &b), 0);
    set_free(&h, 200 * MIB, 50 * MIB);
    // Creation never overcommits: 10 MiB fit, one byte more does not.
    let r = h
        .ctl
        .create_volume(Request::new(req("c", 10 * MIB + 1, &[])))
        .await;
    assert_eq!(code(r), Code::ResourceExhausted);
    // Nor does growth.
    let r = h
        .ctl
        .controller_expand_volume(Request::new(ctl_expand(&b, 40 * MIB + 1, 0)))
        .await;
    assert_eq!(code(r), Code::OutOfRange);
    let r = h
        .ctl
        .controller_expand_volume(Request::new(ctl_expand(&b, 35 * MIB, 0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 35 * MIB);
    create(&h, "c", 5 * MIB).await;
    assert_eq!(available(&h, &[]).await, 0);
    let r = h.ctl.create_volume(Request::new(req("d", 1, &[]))).await;
    assert_eq!(code(r), Code::ResourceExhausted);
}

#[tokio::test]
async fn restores_and_clones_get_a_project_of_their_own() {
    let h = with_quotas(&[]);
    let a = create(&h, "a", 10 * MIB).await;
    std::fs::create_dir(dir(&h, &a).join("sub")).unwrap();
    std::fs::write(dir(&h, &a).join("sub/f"), b"hello").unwrap();
    let snap = snapshot_id(&h, "s", &a).await;
    let from = |name: &str, src: csi::volume_content_source::Type| {
        let mut r = req(name, 20 * MIB, &[]);
        r.volume_content_source = Some(csi::VolumeContentSource { r#type: Some(src) });
        r
    };
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    let b = h
        .ctl
        .create_volume(Request::new(from(
            "b",
            Type::Snapshot(SnapshotSource {
                snapshot_id: snap.clone(),
            }),
        )))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let c = h
        .ctl
        .create_volume(Request::new(from(
            "c",
            Type::Volume(VolumeSource {
                volume_id: a.clone(),
            }),
        )))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let (pa, pb, pc) = (project(&h, &a), project(&h, &b), project(&h, &c));
    assert!(pa != pb && pb != pc && pa != pc);
    let projects = h.fake().projects();
    for (id, p) in [(&b, pb), (&c, pc)] {
        assert_eq!(std::fs::read(dir(&h, id).join("sub/f")).unwrap(), b"hello");
        assert_eq!(projects.get(&dir(&h, id)).map(|x| x.id), Some(p));
        assert_eq!(
            h.fake().project_limits().get(&p),
            Some(&(20 << 20, inode_limit(20 << 20)))
        );
    }
    // The snapshot's copy is charged to no volume.
    assert!(!projects
        .keys()
        .any(|k| k.starts_with(h.path("local").join(".snapshots"))));
    // Nothing left of the holders the copies were made in.
    assert_eq!(
        common::unfinished_in_creating(&h.path("local")),
        Vec::<std::ffi::OsString>::new()
    );
}

#[tokio::test]
async fn without_quotas_sizes_are_promises_and_required_is_refused() {
    let h = fake(&[]);
    // Today's behaviour: no project, no quota call but the one look at the
    // state at start-up.
    let a = create(&h, "a", MIB).await;
    assert_eq!(h.driver.store.get(&a).unwrap().project, None);
    assert_eq!(h.fake().quota_ops(), vec!["quota_state"]);
    let best = h
        .ctl
        .create_volume(Request::new(req(
            "b",
            MIB,
            &[("capacityEnforcement", "bestEffort")],
        )))
        .await;
    assert_eq!(code(best), Code::Ok);
    let r = h
        .ctl
        .create_volume(Request::new(req(
            "c",
            MIB,
            &[("capacityEnforcement", "required")],
        )))
        .await
        .unwrap_err();
    assert_eq!(r.code(), Code::ResourceExhausted);
    assert!(r.message().contains("prjquota"), "{}", r.message());
    assert!(h.driver.store.get_by_name("c").is_none());
    // The scheduler sees no room here for such a class.
    assert!(available(&h, &[]).await > 0);
    assert_eq!(
        available(&h, &[("capacityEnforcement", "required")]).await,
        0
    );
    let bad = h
        .ctl
        .create_volume(Request::new(req(
            "d",
            MIB,
            &[("capacityEnforcement", "Required")],
        )))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("capacityEnforcement"));
    let m = berth::metrics::render(&h.driver).unwrap();
    assert!(
        m.contains("berth_volume_sizes_enforced{kind=\"local\"} 0"),
        "{m}"
    );
    // Expansion is a bigger promise.
    let r = h
        .ctl
        .controller_expand_volume(Request::new(ctl_expand(&a, 2 * MIB, 0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 2 * MIB);
    assert!(!r.node_expansion_required);

    let q = with_quotas(&[]);
    let r = q
        .ctl
        .create_volume(Request::new(req(
            "c",
            MIB,
            &[("capacityEnforcement", "required")],
        )))
        .await;
    assert_eq!(code(r), Code::Ok);
    let m = berth::metrics::render(&q.driver).unwrap();
    assert!(
        m.contains("berth_volume_sizes_enforced{kind=\"local\"} 1"),
        "{m}"
    );
}

/// A restore or clone whose copy fails (the snapshot holds more than the
/// new volume's limits allow, EDQUOT; a full disk, ENOSPC) is rolled back
/// with everything it made: no record, and nothing under `.creating/`.
/// Before, the holder directory the copy was made in (the new volume's
/// project, its limits, what was copied so far) stayed there until berth
/// restarted, taking space, although the claim was given up; and a
/// retry succeeds.
#[tokio::test]
async fn a_failed_restore_or_clone_leaves_no_partial_copy() {
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    let h = with_quotas(&[]);
    let a = create(&h, "a", 10 * MIB).await;
    std::fs::write(dir(&h, &a).join("f"), b"hello").unwrap();
    let snap = snapshot_id(&h, "s", &a).await;
    let from = |name: &str, src: Type| {
        let mut r = req(name, 10 * MIB, &[]);
        r.volume_content_source = Some(csi::VolumeContentSource { r#type: Some(src) });
        r
    };
    let sources = [
        (
            "b",
            Type::Snapshot(SnapshotSource {
                snapshot_id: snap.clone(),
            }),
        ),
        (
            "c",
            Type::Volume(VolumeSource {
                volume_id: a.clone(),
            }),
        ),
    ];
    for (name, src) in sources {
        for errno in [libc::EDQUOT, libc::ENOSPC] {
            h.fake().fail_next("copy", errno);
            let r = h
                .ctl
                .create_volume(Request::new(from(name, src.clone())))
                .await;
            assert!(r.is_err(), "{name}: {r:?}");
            assert!(h.driver.store.get_by_name(name).is_none(), "{name}");
            assert_eq!(
                common::unfinished_in_creating(&h.path("local")),
                Vec::<std::ffi::OsString>::new(),
                "{name}, errno {errno}: left under .creating/"
            );
        }
        let id = created_id(h.ctl.create_volume(Request::new(from(name, src))).await);
        assert_eq!(std::fs::read(dir(&h, &id).join("f")).unwrap(), b"hello");
    }
}

/// GetCapacity never answers more than the free space when a volume that
/// wrote data is deleted while it reads: what the volumes wrote is read
/// first, the free space next, the promises last, and a volume deleted in
/// between had its writes added back but no promise left to take them
/// off again (its data is still on the disk, in the trash, until the
/// background thread empties it). Ordered without a clock: the delete
/// runs once the quota usage has been read, while the statvfs that
/// follows it is held. Before, 100 MiB were answered with 40 MiB free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_read_while_a_written_volume_is_deleted_is_never_more_than_free() {
    let h = with_quotas(&[]);
    set_free(&h, 200 * MIB, 100 * MIB);
    let a = create(&h, "a", 60 * MIB).await;
    // a wrote all 60 MiB: 40 MiB are free, and a may write nothing more.
    h.fake()
        .set_project_written(project(&h, &a), 60 * MIB as u64);
    set_free(&h, 200 * MIB, 40 * MIB);
    assert_eq!(available(&h, &[]).await, 40 * MIB);
    h.fake().clear_quota_ops();
    h.fake()
        .set_statvfs_delay(&h.path("local"), Some(std::time::Duration::from_secs(3)));
    let get = tokio::spawn({
        let ctl = berth::controller::ControllerService {
            driver: h.driver.clone(),
        };
        async move {
            ctl.get_capacity(Request::new(csi::GetCapacityRequest::default()))
                .await
                .expect("get capacity")
                .into_inner()
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !h.fake().quota_ops().contains(&"quota_get") {
        assert!(
            std::time::Instant::now() < deadline,
            "GetCapacity never read the usage"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    delete(&h, &a).await;
    h.fake().set_statvfs_delay(&h.path("local"), None);
    let got = get.await.expect("task");
    assert!(
        got.available_capacity <= 40 * MIB,
        "{} bytes available, {} free",
        got.available_capacity,
        40 * MIB
    );
}

/// CreateVolume admits against the free space plus what the volumes wrote
/// within their promises only for the volumes whose promises it counts: a
/// volume that wrote data and is deleted while a create reads the usage
/// and the free space (the promises alone left no room) had its writes
/// added back with no promise left to take them off, and the create was
/// admitted beyond the free space (41 MiB with 40 MiB free). Ordered as in
/// `capacity_read_while_a_written_volume_is_deleted_is_never_more_than_free`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_while_a_written_volume_is_deleted_never_promises_more_than_free() {
    let h = with_quotas(&[]);
    set_free(&h, 200 * MIB, 100 * MIB);
    let a = create(&h, "a", 60 * MIB).await;
    h.fake()
        .set_project_written(project(&h, &a), 60 * MIB as u64);
    set_free(&h, 200 * MIB, 40 * MIB);
    h.fake().clear_quota_ops();
    let driver = h.driver.clone();
    let root = h.path("local");
    h.fake()
        .set_statvfs_delay(&root, Some(std::time::Duration::from_secs(3)));
    let make = tokio::spawn(async move {
        berth::controller::ControllerService { driver }
            .create_volume(Request::new(req("b", 41 * MIB, &[])))
            .await
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !h.fake().quota_ops().contains(&"quota_get") {
        assert!(
            std::time::Instant::now() < deadline,
            "CreateVolume never read the usage"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    delete(&h, &a).await;
    h.fake().set_statvfs_delay(&root, None);
    let r = make.await.expect("task");
    assert_eq!(code(r), Code::ResourceExhausted);
}

/// A local root whose directory has a project with the inherit flag (an
/// administrator's own project over berth's directory, `xfs_quota -x -c
/// 'project -s -p <root> 42'`, which sets it on every directory in the
/// tree): every directory made in it gets that project. Before, a new
/// volume's directory came out with the administrator's id, which berth
/// took for one a retry had set and adopted: every volume shared project
/// 42, each create set 42's limits to that volume's size (the
/// administrator's limit gone), and each delete cleared them. (On a real
/// kernel a directory of another project cannot be moved into the root
/// at all, EXDEV.) Now such a root does not enforce sizes: start-up says
/// why, no volume takes a project, the administrator's is untouched, and
/// `capacityEnforcement: required` is refused naming the flag.
#[tokio::test]
async fn a_root_under_an_inherited_project_never_shares_it_with_volumes() {
    let h = with_quotas(&[]);
    let root = h.path("local");
    let admin = Project {
        id: 42,
        inherit: true,
    };
    let mut dirs = vec![root.clone()];
    while let Some(d) = dirs.pop() {
        h.fake().set_project(&d, admin).unwrap();
        dirs.extend(
            std::fs::read_dir(&d)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir()),
        );
    }
    let limit = (10u64 << 30, 1_000_000);
    h.fake().set_limits(&root, 42, limit.0, limit.1).unwrap();
    let h = restart(h);
    let a = create(&h, "a", MIB).await;
    let b = create(&h, "b", 2 * MIB).await;
    let (ra, rb) = (
        h.driver.store.get(&a).unwrap().project(),
        h.driver.store.get(&b).unwrap().project(),
    );
    assert!(ra != Some(42) && rb != Some(42), "{ra:?} {rb:?}");
    assert!(ra.is_none() || ra != rb, "{ra:?} {rb:?}");
    assert_eq!(h.fake().project_limits().get(&42), Some(&limit));
    delete(&h, &a).await;
    assert_eq!(h.fake().project_limits().get(&42), Some(&limit));
    let r = h
        .ctl
        .create_volume(Request::new(req(
            "c",
            MIB,
            &[("capacityEnforcement", "required")],
        )))
        .await
        .unwrap_err();
    assert_eq!(r.code(), Code::ResourceExhausted);
    assert!(
        r.message().contains("project 42") && r.message().contains("inherit"),
        "{}",
        r.message()
    );
    assert_eq!(
        available(&h, &[("capacityEnforcement", "required")]).await,
        0
    );
    let m = berth::metrics::render(&h.driver).unwrap();
    assert!(
        m.contains("berth_volume_sizes_enforced{kind=\"local\"} 0"),
        "{m}"
    );
}

/// A new volume's directory that comes out with a project berth did not
/// give it (the inherit flag put on the local root and `.creating` while
/// berth runs, after start-up looked) gets an id of its own. Before, any
/// project found on it was taken for one an earlier attempt of the same
/// create had set and adopted: both volumes shared the administrator's
/// project 42 and set its limits. Now only an id berth hands out
/// (`FIRST_PROJECT` and up) that no other record holds is adopted.
#[tokio::test]
async fn a_project_a_new_directory_inherits_is_never_adopted() {
    // Each create makes its directory (no spare made before the flag).
    let h = with_quotas(&["--local-spare-dirs", "0"]);
    let root = h.path("local");
    let a = create(&h, "a", MIB).await;
    let pa = project(&h, &a);
    let creating = root.join(".creating");
    std::fs::create_dir_all(&creating).unwrap();
    for (d, id) in [(&root, 42), (&creating, 42)] {
        h.fake()
            .set_project(d, Project { id, inherit: true })
            .unwrap();
    }
    h.fake().set_limits(&root, 42, 10 << 30, 1_000_000).unwrap();
    let b = create(&h, "b", MIB).await;
    let c = create(&h, "c", 2 * MIB).await;
    let (pb, pc) = (project(&h, &b), project(&h, &c));
    assert!(pb >= FIRST_PROJECT && pc >= FIRST_PROJECT, "{pb} {pc}");
    let mut all = vec![pa, pb, pc];
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 3, "{pa} {pb} {pc}");
    assert_eq!(
        h.fake().project_limits().get(&42),
        Some(&(10 << 30, 1_000_000))
    );
    // And a directory showing another volume's id (inherited from a
    // parent given that id) is not adopted either.
    for d in [&root, &creating] {
        h.fake()
            .set_project(
                d,
                Project {
                    id: pa,
                    inherit: true,
                },
            )
            .unwrap();
    }
    let e = create(&h, "e", MIB).await;
    assert_ne!(project(&h, &e), pa);
    assert_eq!(
        h.fake().project_limits().get(&pa),
        Some(&(MIB as u64, inode_limit(MIB as u64)))
    );
}
