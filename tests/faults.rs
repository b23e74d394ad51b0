//! Fault injection at every step: each filesystem change that CreateVolume
//! (empty, restored from a snapshot, cloned from a volume),
//! NodeStageVolume, expansion, DeleteVolume, CreateSnapshot and
//! DeleteSnapshot make (to volume data, snapshot copies and to
//! the state journal) fails in turn with ENOSPC, EIO and EROFS, through the
//! recording fake of `os::Files`. After each fault: the volumes acknowledged
//! before are untouched; an operation that answered OK did its work; one
//! that failed is finished by a retry after a restart; and a restarted
//! berth's records match the storage on disk. No root needed.
mod common;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use berth::csi::v1 as csi;
use berth::csi::v1::controller_server::Controller;
use berth::csi::v1::node_server::Node;
use berth::os::fake::FakeOs;
use berth::os::Os;
use berth::state::Phase;
use common::*;
use tonic::{Request, Status};

const ERRNOS: [i32; 3] = [libc::ENOSPC, libc::EIO, libc::EROFS];
const MIB: i64 = 1 << 20;

fn out(code: i32) -> Result<berth::os::CmdOutput, berth::os::OsError> {
    Ok(berth::os::CmdOutput {
        code: Some(code),
        ..Default::default()
    })
}

/// A driver serving local and block volumes, with one acknowledged volume
/// of each kind that no fault may touch.
async fn setup() -> (Harness, Vec<String>) {
    let h = fake(&["--kinds", "local,block"]);
    script(h.fake());
    let mut keep = Vec::new();
    for (name, kind) in [("keep-local", "local"), ("keep-block", "block")] {
        let mut req = create_req(name, 8 * MIB);
        req.parameters.insert("kind".into(), kind.into());
        let v = h.ctl.create_volume(Request::new(req)).await.unwrap();
        keep.push(v.into_inner().volume.unwrap().volume_id);
    }
    (h, keep)
}

fn script(f: &FakeOs) {
    f.respond("blkid", |_| out(2));
    for p in ["mkfs.ext4", "resize2fs"] {
        f.respond(p, |_| out(0));
    }
}

/// The storage a record names exists.
fn storage(h: &Harness, id: &str) -> bool {
    if id.starts_with("local-snap-") {
        h.path("local/.snapshots").join(id).is_dir()
    } else if id.starts_with("block-snap-") {
        h.path("block/.snapshots")
            .join(format!("{id}.img"))
            .is_file()
    } else if id.starts_with("local-") {
        h.path("local").join(id).is_dir()
    } else {
        h.path("block").join(format!("{id}.img")).is_file()
    }
}

/// Records and storage agree: every record that is Ready has its storage,
/// every piece of storage has a record, and nothing was kept aside as an
/// orphan (no storage of an acknowledged volume lost its record, and what
/// an unacknowledged operation made was recognised as such).
fn consistent(h: &Harness) {
    for dir in ["local/.orphaned", "block/.orphaned"] {
        let left: Vec<_> = std::fs::read_dir(h.path(dir))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "{dir} holds {left:?}");
    }
    for r in h.driver.store.filter(|_| true) {
        if r.phase == Phase::Ready {
            assert!(storage(h, &r.id), "record {} without storage", r.id);
        }
    }
    for r in h.driver.store.snapshot_filter(|_| true) {
        if r.phase == Phase::Ready {
            assert!(
                storage(h, &r.id),
                "snapshot record {} without its copy",
                r.id
            );
        }
    }
    for (dir, suffix) in [("local/.snapshots", ""), ("block/.snapshots", ".img")] {
        for e in std::fs::read_dir(h.path(dir))
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(suffix) else {
                continue;
            };
            if id.starts_with("local-snap-") || id.starts_with("block-snap-") {
                assert!(
                    h.driver.store.snapshot_get(id).is_some(),
                    "snapshot copy {name} without a record"
                );
            }
        }
    }
    for (dir, suffix) in [("local", ""), ("block", ".img")] {
        for e in std::fs::read_dir(h.path(dir)).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(suffix) else {
                continue;
            };
            if id.starts_with("local-") || id.starts_with("block-") {
                assert!(
                    h.driver.store.get(id).is_some(),
                    "storage {name} without a record"
                );
            }
        }
    }
}

fn intact(h: &Harness, keep: &[String]) {
    for id in keep {
        let r = h
            .driver
            .store
            .get(id)
            .unwrap_or_else(|| panic!("{id} lost"));
        assert_eq!(r.phase, Phase::Ready, "{id}");
        assert!(storage(h, id), "storage of {id} lost");
    }
}

/// What the operation under test works on.
struct Subject {
    kind: &'static str,
    id: String,
    staging: PathBuf,
}

type Op =
    for<'a> fn(&'a Harness, &'a Subject) -> Pin<Box<dyn Future<Output = Result<(), Status>> + 'a>>;

async fn create_op(h: &Harness, s: &Subject) -> Result<(), Status> {
    let mut req = create_req("subject", 8 * MIB);
    req.parameters.insert("kind".into(), s.kind.into());
    h.ctl.create_volume(Request::new(req)).await.map(|_| ())
}

/// CreateVolume of "subject" from the snapshot or volume `s.id`.
async fn create_from_op(h: &Harness, s: &Subject) -> Result<(), Status> {
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    let source = if s.id.contains("-snap-") {
        Type::Snapshot(SnapshotSource {
            snapshot_id: s.id.clone(),
        })
    } else {
        Type::Volume(VolumeSource {
            volume_id: s.id.clone(),
        })
    };
    let mut req = create_req("subject", 8 * MIB);
    req.parameters.insert("kind".into(), s.kind.into());
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(source),
    });
    h.ctl.create_volume(Request::new(req)).await.map(|_| ())
}

async fn delete_op(h: &Harness, s: &Subject) -> Result<(), Status> {
    h.ctl
        .delete_volume(Request::new(csi::DeleteVolumeRequest {
            volume_id: s.id.clone(),
            ..Default::default()
        }))
        .await
        .map(|_| ())
}

async fn stage_op(h: &Harness, s: &Subject) -> Result<(), Status> {
    h.node
        .node_stage_volume(Request::new(stage_req(&s.id, &s.staging)))
        .await
        .map(|_| ())
}

async fn expand_op(h: &Harness, s: &Subject) -> Result<(), Status> {
    let range = Some(csi::CapacityRange {
        required_bytes: 16 * MIB,
        limit_bytes: 0,
    });
    h.ctl
        .controller_expand_volume(Request::new(csi::ControllerExpandVolumeRequest {
            volume_id: s.id.clone(),
            capacity_range: range,
            ..Default::default()
        }))
        .await?;
    h.node
        .node_expand_volume(Request::new(csi::NodeExpandVolumeRequest {
            volume_id: s.id.clone(),
            volume_path: s.staging.display().to_string(),
            staging_target_path: s.staging.display().to_string(),
            capacity_range: range,
            ..Default::default()
        }))
        .await
        .map(|_| ())
}

/// CreateSnapshot "snap" of the volume `s.id`.
async fn snapshot_op(h: &Harness, s: &Subject) -> Result<(), Status> {
    h.ctl
        .create_snapshot(Request::new(csi::CreateSnapshotRequest {
            name: "snap".into(),
            source_volume_id: s.id.clone(),
            ..Default::default()
        }))
        .await
        .map(|_| ())
}

/// DeleteSnapshot of the snapshot `s.id`.
async fn delete_snapshot_op(h: &Harness, s: &Subject) -> Result<(), Status> {
    h.ctl
        .delete_snapshot(Request::new(csi::DeleteSnapshotRequest {
            snapshot_id: s.id.clone(),
            ..Default::default()
        }))
        .await
        .map(|_| ())
}

/// Whether the operation's work is done.
fn done(h: &Harness, s: &Subject, op: &str) -> bool {
    match op {
        "snapshot" => h
            .driver
            .store
            .snapshot_by_name("snap")
            .is_some_and(|r| r.phase == Phase::Ready && storage(h, &r.id)),
        "delete-snapshot" => h.driver.store.snapshot_get(&s.id).is_none() && !storage(h, &s.id),
        "create" | "restore" | "clone" => h
            .driver
            .store
            .get_by_name("subject")
            .is_some_and(|r| r.phase == Phase::Ready && storage(h, &r.id)),
        "delete" => h.driver.store.get(&s.id).is_none() && !storage(h, &s.id),
        "stage" => h.fake().table().iter().any(|m| m.mount_point == s.staging),
        "expand" | "expand-thick" => {
            h.driver
                .store
                .get(&s.id)
                .is_some_and(|r| r.capacity_bytes == 16 * MIB)
                && std::fs::metadata(h.path("block").join(format!("{}.img", s.id)))
                    .is_ok_and(|m| m.len() == (16 * MIB) as u64)
        }
        _ => unreachable!(),
    }
}

/// Prepares the subject volume for `op`.
async fn subject(h: &Harness, kind: &'static str, op: &str) -> Subject {
    let staging = h.path("staging");
    if op == "create" {
        return Subject {
            kind,
            id: String::new(),
            staging,
        };
    }
    // A restore or clone makes "subject" from a source volume (and its
    // snapshot); the other operations work on "subject" itself.
    let name = match op {
        "restore" | "clone" => "source",
        _ => "subject",
    };
    let mut req = create_req(name, 8 * MIB);
    req.parameters.insert("kind".into(), kind.into());
    if op == "expand-thick" {
        req.parameters.insert("allocation".into(), "thick".into());
    }
    let mut id = h
        .ctl
        .create_volume(Request::new(req))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    // Data in the source, so a copy of it is never an empty directory
    // (which start-up could remove as an unused orphan).
    if matches!(op, "restore" | "clone" | "snapshot" | "delete-snapshot") {
        let data = match kind {
            "local" => h.path("local").join(&id).join("data"),
            _ => h.path("block").join(format!("{id}.img")),
        };
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&data)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"source data"))
            .unwrap();
    }
    if op == "restore" {
        id = snapshot_id(h, "snap", &id).await;
    }
    if op == "delete-snapshot" {
        id = snapshot_id(h, "doomed", &id).await;
    }
    let s = Subject { kind, id, staging };
    if op == "expand" || op == "expand-thick" {
        stage_op(h, &s).await.unwrap();
    }
    s
}

/// Runs `op` on a fresh driver with the `k`-th filesystem change failing
/// with `errno`; None when the operation made fewer changes than `k`.
async fn run_with_fault(
    kind: &'static str,
    name: &str,
    op: Op,
    fault: Option<(usize, i32)>,
) -> Option<usize> {
    let (h, keep) = setup().await;
    let s = subject(&h, kind, name).await;
    let f: Arc<FakeOs> = h.fake.clone().unwrap();
    f.clear_file_ops();
    f.fail_file_op_at(fault);
    let r = op(&h, &s).await;
    let changes = f.file_ops().len();
    if fault.is_some() && f.file_fault_pending() {
        f.clear_file_faults();
        return None;
    }
    f.clear_file_faults();
    let what = format!(
        "{kind} {name} with change {fault:?} failing ({:?})",
        f.file_ops().get(fault.map_or(0, |x| x.0))
    );
    match &r {
        Ok(()) => assert!(done(&h, &s, name), "{what}: answered OK, work not done"),
        Err(e) => assert!(
            !matches!(e.code(), tonic::Code::Ok | tonic::Code::Unknown),
            "{what}: {e:?}"
        ),
    }
    intact(&h, &keep);
    // Restart on the same files and kernel state: records match storage,
    // nothing acknowledged is lost.
    let h = build(
        h.stop(),
        Os::on_fake(&f),
        Some(f.clone()),
        &["--kinds", "local,block"],
    );
    intact(&h, &keep);
    consistent(&h);
    // The CO retries a failed call; the retry finishes the work.
    if r.is_err() {
        let s = match name {
            "create" | "restore" | "clone" => s,
            _ => Subject {
                id: s.id.clone(),
                ..s
            },
        };
        if let Err(e) = op(&h, &s).await {
            panic!("{what}: the retry failed too: {e:?}");
        }
        assert!(done(&h, &s, name), "{what}: retried, work not done");
        intact(&h, &keep);
        consistent(&h);
    }
    Some(changes)
}

async fn sweep(kind: &'static str, name: &str, op: Op) {
    let n = run_with_fault(kind, name, op, None).await.unwrap();
    assert!(n > 0, "{kind} {name} made no filesystem change");
    let mut faults = 0;
    for k in 0..n {
        for errno in ERRNOS {
            if run_with_fault(kind, name, op, Some((k, errno)))
                .await
                .is_some()
            {
                faults += 1;
            }
        }
    }
    assert!(
        faults >= n,
        "{kind} {name}: only {faults} faults hit of {n} changes"
    );
    eprintln!("{kind} {name}: {n} filesystem changes, {faults} faults injected");
}

#[tokio::test]
async fn local_create() {
    sweep("local", "create", |h, s| Box::pin(create_op(h, s))).await;
}

#[tokio::test]
async fn local_restore() {
    sweep("local", "restore", |h, s| Box::pin(create_from_op(h, s))).await;
}

#[tokio::test]
async fn local_clone() {
    sweep("local", "clone", |h, s| Box::pin(create_from_op(h, s))).await;
}

#[tokio::test]
async fn local_delete() {
    sweep("local", "delete", |h, s| Box::pin(delete_op(h, s))).await;
}

#[tokio::test]
async fn local_stage() {
    sweep("local", "stage", |h, s| Box::pin(stage_op(h, s))).await;
}

#[tokio::test]
async fn block_create() {
    sweep("block", "create", |h, s| Box::pin(create_op(h, s))).await;
}

#[tokio::test]
async fn block_restore() {
    sweep("block", "restore", |h, s| Box::pin(create_from_op(h, s))).await;
}

#[tokio::test]
async fn block_clone() {
    sweep("block", "clone", |h, s| Box::pin(create_from_op(h, s))).await;
}

#[tokio::test]
async fn block_delete() {
    sweep("block", "delete", |h, s| Box::pin(delete_op(h, s))).await;
}

#[tokio::test]
async fn block_stage() {
    sweep("block", "stage", |h, s| Box::pin(stage_op(h, s))).await;
}

#[tokio::test]
async fn block_expand() {
    sweep("block", "expand", |h, s| Box::pin(expand_op(h, s))).await;
}

/// A thick volume's growth is allocated by ControllerExpandVolume (the
/// file grows before the record says so): a fault at any step, a restart,
/// and the retry finishes with record and file agreeing.
#[tokio::test]
async fn block_thick_expand() {
    sweep("block", "expand-thick", |h, s| Box::pin(expand_op(h, s))).await;
}

#[tokio::test]
async fn local_snapshot() {
    sweep("local", "snapshot", |h, s| Box::pin(snapshot_op(h, s))).await;
}

#[tokio::test]
async fn local_delete_snapshot() {
    sweep("local", "delete-snapshot", |h, s| {
        Box::pin(delete_snapshot_op(h, s))
    })
    .await;
}

#[tokio::test]
async fn block_snapshot() {
    sweep("block", "snapshot", |h, s| Box::pin(snapshot_op(h, s))).await;
}

#[tokio::test]
async fn block_delete_snapshot() {
    sweep("block", "delete-snapshot", |h, s| {
        Box::pin(delete_snapshot_op(h, s))
    })
    .await;
}
