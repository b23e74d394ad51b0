//! Project quotas on a real filesystem: local volumes held to their size.
//! This machine's kernel has no quota support, so these run only inside the
//! full-kernel test guest (tests/vm/quota.sh boots it), once on xfs mounted
//! with `prjquota` and once on ext4 made with `-O project,quota` and mounted
//! with `prjquota`:
//!   BERTH_QUOTA_ROOT=<a directory on that filesystem> BERTH_QUOTA_FS=xfs|ext4 \
//!     root_quota --ignored --test-threads=1
//! Ignored by default; without BERTH_QUOTA_ROOT they fail (saying why),
//! never pass. Writes into volumes run as nobody (65534) through setpriv:
//! root has CAP_SYS_RESOURCE, which ext4 lets past hard limits.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use berth::csi::v1 as csi;
use berth::csi::v1::controller_server::Controller;
use berth::csi::v1::node_server::Node;
use berth::kinds::local::quota::{inode_limit, FIRST_PROJECT};
use berth::os::quota::{Quotas, RealQuotas};
use berth::os::statvfs::{FsStats, RealFsStats};
use common::*;
use tonic::Request;

const MIB: i64 = 1 << 20;

/// The directory on the quota filesystem this run may use, and its type.
fn quota_root() -> (PathBuf, String) {
    assert!(is_root(), "root tests need root");
    let root = std::env::var_os("BERTH_QUOTA_ROOT")
        .map(PathBuf::from)
        .expect(
            "BERTH_QUOTA_ROOT (a directory on a filesystem with project quotas) is not set: \
         these tests run in the full-kernel guest, see tests/vm/quota.sh",
        );
    let fs = std::env::var("BERTH_QUOTA_FS").unwrap_or_default();
    (root, fs)
}

/// A driver over the real OS whose local root is `sub` in the quota root.
fn start(sub: &str) -> (Harness, UnmountOnDrop, PathBuf) {
    let (root, _) = quota_root();
    let local = root.join(sub);
    let (h, g) = real(&["--local-root", local.to_str().unwrap()]);
    // nobody writes through the pod paths inside the temp dir (0700).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(h.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    (h, g, local)
}

/// A new driver on the same state and local root (a restart of berth).
fn restart(h: Harness, local: &Path) -> Harness {
    build(
        h.stop(),
        berth::os::Os::real(),
        None,
        &["--local-root", local.to_str().unwrap()],
    )
}

async fn create(h: &Harness, name: &str, size: i64) -> String {
    created_id(
        h.ctl
            .create_volume(Request::new(create_req(name, size)))
            .await,
    )
}

fn project(h: &Harness, id: &str) -> u32 {
    h.driver
        .store
        .get(id)
        .and_then(|r| r.project())
        .expect("the volume has a project (is the local root's filesystem mounted with prjquota?)")
}

async fn publish(h: &Harness, id: &str) -> (PathBuf, PathBuf) {
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
    (staging, target)
}

async fn unpublish(h: &Harness, id: &str, staging: &Path, target: &Path) {
    h.node
        .node_unpublish_volume(Request::new(csi::NodeUnpublishVolumeRequest {
            volume_id: id.into(),
            target_path: target.display().to_string(),
        }))
        .await
        .expect("unpublish");
    h.node
        .node_unstage_volume(Request::new(csi::NodeUnstageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.display().to_string(),
        }))
        .await
        .expect("unstage");
}

/// (bytes total, used, available; inodes total, used) from
/// NodeGetVolumeStats.
async fn stats(h: &Harness, id: &str, path: &Path) -> (i64, i64, i64, i64, i64) {
    let s = h
        .node
        .node_get_volume_stats(Request::new(csi::NodeGetVolumeStatsRequest {
            volume_id: id.into(),
            volume_path: path.display().to_string(),
            ..Default::default()
        }))
        .await
        .expect("stats")
        .into_inner();
    let (b, i) = (&s.usage[0], &s.usage[1]);
    (b.total, b.used, b.available, i.total, i.used)
}

/// Writes `mib` MiB of zeros into `file` as nobody, without
/// CAP_SYS_RESOURCE; returns whether it all fitted and the error dd gave.
fn write_as_nobody(file: &Path, mib: i64) -> (bool, String) {
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(["dd", "if=/dev/zero", "bs=1M", "conv=fsync", "status=none"])
        .arg(format!("of={}", file.display()))
        .arg(format!("count={mib}"))
        .output()
        .expect("running setpriv dd");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The quota of project `id` once nothing is charged to it any more, or
/// after 20 s: xfs frees removed inodes in the background (inode
/// inactivation), so their charge drains a moment after the removal.
async fn released(fs: &Path, id: u32) -> berth::os::quota::ProjectQuota {
    let t0 = std::time::Instant::now();
    loop {
        let q = RealQuotas.get(fs, id).unwrap();
        let waited = t0.elapsed();
        if q.unused() || waited > std::time::Duration::from_secs(20) {
            if !waited.is_zero() && waited > std::time::Duration::from_millis(50) {
                eprintln!("project {id}: {q:?} {waited:?} after its volume was deleted");
            }
            return q;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

fn size(file: &Path) -> i64 {
    std::fs::metadata(file).map(|m| m.len() as i64).unwrap_or(0)
}

/// What a write past a project's limit fails with: EDQUOT on ext4,
/// ENOSPC on xfs (which reports project quotas as a full filesystem).
fn is_quota_error(stderr: &str) -> bool {
    stderr.contains("Disk quota exceeded") || stderr.contains("No space left on device")
}

async fn capacity(h: &Harness) -> i64 {
    h.ctl
        .get_capacity(Request::new(csi::GetCapacityRequest::default()))
        .await
        .expect("get capacity")
        .into_inner()
        .available_capacity
}

#[tokio::test]
#[ignore = "needs the full-kernel guest with a prjquota filesystem: tests/vm/quota.sh"]
async fn writes_stop_at_the_size_and_online_expansion_raises_it() {
    let (root, fs) = quota_root();
    let (h, _g, local) = start("expand");
    let id = create(&h, "v", 16 * MIB).await;
    let p = project(&h, &id);
    let q = RealQuotas.get(&local, p).unwrap();
    assert_eq!(
        (q.limit_bytes, q.limit_inodes),
        (16 << 20, inode_limit(16 << 20)),
        "limits of project {p}"
    );
    let (staging, target) = publish(&h, &id).await;

    // df in the pod shows the volume, not the filesystem.
    let df = RealFsStats.statvfs(&target).unwrap();
    assert_eq!(df.total_bytes, 16 << 20, "statvfs of the pod's path");
    let before = stats(&h, &id, &target).await;
    eprintln!("{fs}: stats before writing {before:?}");
    assert_eq!(before.0, 16 * MIB);
    assert!(before.1 < MIB, "{before:?}");
    assert_eq!(before.3, inode_limit(16 << 20) as i64);
    assert!(before.4 >= 1, "the directory itself is charged: {before:?}");
    let free_before = capacity(&h).await;

    // Writes stop at the size.
    let fill = target.join("fill");
    let (ok, err) = write_as_nobody(&fill, 64);
    assert!(!ok, "64 MiB fitted into a 16 MiB volume");
    assert!(is_quota_error(&err), "{err}");
    let written = size(&fill);
    eprintln!(
        "{fs}: wrote {written} bytes into 16 MiB before: {}",
        err.trim()
    );
    assert!((14 * MIB..=16 * MIB).contains(&written), "{written}");
    let full = stats(&h, &id, &target).await;
    eprintln!("{fs}: stats when full {full:?}");
    assert!(
        full.1 >= 14 * MIB && full.1 <= 16 * MIB + MIB / 4,
        "{full:?}"
    );
    assert!(full.2 < 2 * MIB, "{full:?}");
    // Written within its promise: the node's capacity stays what it was.
    let free_full = capacity(&h).await;
    eprintln!("{fs}: GetCapacity {free_before} before, {free_full} when full");
    assert!(
        (free_before - free_full).abs() < 2 * MIB,
        "{free_before} vs {free_full}"
    );

    // Online expansion: the limit grows while the volume is published.
    let r = h
        .node
        .node_expand_volume(Request::new(csi::NodeExpandVolumeRequest {
            volume_id: id.clone(),
            volume_path: target.display().to_string(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 32 * MIB,
                limit_bytes: 0,
            }),
            volume_capability: Some(rwo()),
            ..Default::default()
        }))
        .await
        .expect("node expand")
        .into_inner();
    assert_eq!(r.capacity_bytes, 32 * MIB);
    assert_eq!(RealFsStats.statvfs(&target).unwrap().total_bytes, 32 << 20);
    let more = target.join("more");
    let (ok, err) = write_as_nobody(&more, 64);
    assert!(!ok && is_quota_error(&err), "{ok} {err}");
    let total = size(&fill) + size(&more);
    eprintln!("{fs}: {total} bytes in the volume after expanding to 32 MiB");
    assert!((30 * MIB..=32 * MIB).contains(&total), "{total}");
    let after = stats(&h, &id, &target).await;
    eprintln!("{fs}: stats after expanding and writing {after:?}");
    assert_eq!(after.0, 32 * MIB);
    assert!(after.1 >= 30 * MIB, "{after:?}");

    // A restart: the limits are still there and still hold.
    let h = restart(h, &local);
    assert_eq!(
        h.driver
            .kind(berth::state::Kind::Local)
            .unwrap()
            .sizes_enforced(),
        Some(true)
    );
    let q = RealQuotas.get(&local, p).unwrap();
    assert_eq!(q.limit_bytes, 32 << 20);
    assert_eq!(project(&h, &id), p);
    std::fs::remove_file(&more).unwrap();
    let (ok, err) = write_as_nobody(&more, 64);
    assert!(!ok && is_quota_error(&err), "{ok} {err}");
    assert!(size(&fill) + size(&more) <= 32 * MIB);
    assert_eq!(stats(&h, &id, &target).await.0, 32 * MIB);

    // The inode limit: a small volume holds MIN_INODES entries.
    let small = create(&h, "small", MIB).await;
    let (s_staging, s_target) = publish(&h, &small).await;
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args([
            "sh",
            "-c",
            // printf, a regular builtin: a failed redirection ends the loop,
            // not the shell (it would with `:`, a special builtin).
            "cd \"$1\" && i=0; while printf '' > f$i; do i=$((i+1)); [ $i -gt 5000 ] && break; done; echo $i",
            "sh",
        ])
        .arg(&s_target)
        .output()
        .unwrap();
    let made: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    eprintln!(
        "{fs}: {made} files made in a 1 MiB volume: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    assert!(
        made < inode_limit(1 << 20) && made + 2 >= inode_limit(1 << 20),
        "{made} files"
    );

    unpublish(&h, &small, &s_staging, &s_target).await;
    unpublish(&h, &id, &staging, &target).await;
    let ps = project(&h, &small);
    delete(&h, &small).await;
    delete(&h, &id).await;
    for id in [p, ps] {
        let q = released(&local, id).await;
        assert!(q.unused(), "project {id} not released: {q:?}");
    }
    drop(h);
    std::fs::remove_dir_all(&local).ok();
    let _ = root;
}

#[tokio::test]
#[ignore = "needs the full-kernel guest with a prjquota filesystem: tests/vm/quota.sh"]
async fn a_thousand_volumes_created_and_deleted_leak_no_project_id() {
    let (_, fs) = quota_root();
    let (h, _g, local) = start("thousand");
    const SIZE: i64 = 64 << 10;
    // 16 in flight, as a busy node's provisioner would send them.
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
    let ctl = || berth::controller::ControllerService {
        driver: h.driver.clone(),
    };
    let t0 = std::time::Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let (c, permit) = (ctl(), sem.clone().acquire_owned().await.unwrap());
        set.spawn(async move {
            let _permit = permit;
            created_id(
                c.create_volume(Request::new(create_req(&format!("v{i}"), SIZE)))
                    .await,
            )
        });
    }
    let ids: Vec<String> = set.join_all().await;
    let created = t0.elapsed();
    let mut projects: Vec<u32> = ids.iter().map(|id| project(&h, id)).collect();
    projects.sort_unstable();
    projects.dedup();
    assert_eq!(projects.len(), 1000, "every volume has an id of its own");
    assert_eq!(projects.first(), Some(&FIRST_PROJECT));
    for p in &projects {
        assert_eq!(RealQuotas.get(&local, *p).unwrap().limit_bytes, SIZE as u64);
    }
    let t1 = std::time::Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for id in ids {
        let (c, permit) = (ctl(), sem.clone().acquire_owned().await.unwrap());
        set.spawn(async move {
            let _permit = permit;
            c.delete_volume(Request::new(csi::DeleteVolumeRequest {
                volume_id: id,
                ..Default::default()
            }))
            .await
            .expect("delete");
        });
    }
    set.join_all().await;
    eprintln!(
        "{fs}: 1000 volumes created in {:.1} s, deleted in {:.1} s (16 in flight)",
        created.as_secs_f64(),
        t1.elapsed().as_secs_f64()
    );
    for p in &projects {
        let q = released(&local, *p).await;
        assert!(q.unused(), "project {p} left with {q:?}");
    }
    // The ids are free again: the next volume gets the first.
    let again = create(&h, "again", SIZE).await;
    assert_eq!(project(&h, &again), FIRST_PROJECT);
    delete(&h, &again).await;
    drop(h);
    std::fs::remove_dir_all(&local).ok();
}
