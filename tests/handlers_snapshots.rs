//! Snapshots, restores and clones over the recording fake (no root): the
//! spec's rules for CreateSnapshot, DeleteSnapshot, ListSnapshots,
//! GetSnapshot and CreateVolume with a content source, the copies on disk,
//! crash recovery, and block volumes frozen while they are copied.
mod common;

use std::path::{Path, PathBuf};

use berth::csi::v1 as csi;
use berth::csi::v1::controller_server::Controller;
use berth::csi::v1::node_server::Node;
use berth::os::fake::Call;
use berth::state::{Phase, SnapshotRecord};
use common::*;
use tonic::{Code, Request};

const MIB: i64 = 1 << 20;

async fn create_p(h: &Harness, name: &str, size: i64, kv: &[(&str, &str)]) -> csi::Volume {
    let mut req = create_req(name, size);
    for (k, v) in kv {
        req.parameters.insert(k.to_string(), v.to_string());
    }
    h.ctl
        .create_volume(Request::new(req))
        .await
        .expect("create")
        .into_inner()
        .volume
        .expect("volume")
}

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

fn from_snapshot(name: &str, size: i64, snap: &str) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        volume_content_source: Some(csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Snapshot(
                csi::volume_content_source::SnapshotSource {
                    snapshot_id: snap.into(),
                },
            )),
        }),
        ..create_req(name, size)
    }
}

fn from_volume(name: &str, size: i64, vol: &str) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        volume_content_source: Some(csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Volume(
                csi::volume_content_source::VolumeSource {
                    volume_id: vol.into(),
                },
            )),
        }),
        ..create_req(name, size)
    }
}

fn vol_dir(h: &Harness, id: &str) -> PathBuf {
    h.path("local").join(id)
}

async fn list(h: &Harness, req: csi::ListSnapshotsRequest) -> csi::ListSnapshotsResponse {
    h.ctl
        .list_snapshots(Request::new(req))
        .await
        .expect("list")
        .into_inner()
}

fn ids(r: &csi::ListSnapshotsResponse) -> Vec<String> {
    r.entries
        .iter()
        .map(|e| e.snapshot.as_ref().unwrap().snapshot_id.clone())
        .collect()
}

#[tokio::test]
async fn a_local_snapshot_is_a_point_in_time_copy_and_restores() {
    let h = fake(&[]);
    let v = create_p(&h, "src", 3 * MIB, &[]).await;
    std::fs::create_dir(vol_dir(&h, &v.volume_id).join("sub")).unwrap();
    std::fs::write(vol_dir(&h, &v.volume_id).join("sub/f"), b"before").unwrap();
    let s = snapshot(&h, "snap-1", &v.volume_id).await;
    assert!(s.ready_to_use);
    assert_eq!(s.size_bytes, 3 * MIB);
    assert_eq!(s.source_volume_id, v.volume_id);
    assert!(s.creation_time.is_some_and(|t| t.seconds > 0));
    assert!(s.snapshot_id.starts_with("local-snap-"));
    // Idempotent by name.
    assert_eq!(
        snapshot(&h, "snap-1", &v.volume_id).await.snapshot_id,
        s.snapshot_id
    );
    // A write after the snapshot does not reach it.
    std::fs::write(vol_dir(&h, &v.volume_id).join("sub/f"), b"after").unwrap();
    let r = h
        .ctl
        .create_volume(Request::new(from_snapshot(
            "restored",
            3 * MIB,
            &s.snapshot_id,
        )))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        std::fs::read(vol_dir(&h, &r.volume_id).join("sub/f")).unwrap(),
        b"before"
    );
    assert!(matches!(
        r.content_source.and_then(|c| c.r#type),
        Some(csi::volume_content_source::Type::Snapshot(x)) if x.snapshot_id == s.snapshot_id
    ));
    // Bigger is fine, smaller is OUT_OF_RANGE.
    let big = h
        .ctl
        .create_volume(Request::new(from_snapshot(
            "bigger",
            8 * MIB,
            &s.snapshot_id,
        )))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(big.capacity_bytes, 8 * MIB);
    let mut small = from_snapshot("smaller", MIB, &s.snapshot_id);
    small.capacity_range = Some(csi::CapacityRange {
        required_bytes: MIB,
        limit_bytes: MIB,
    });
    assert_eq!(
        code(h.ctl.create_volume(Request::new(small)).await),
        Code::OutOfRange
    );
    // The same name from another source: ALREADY_EXISTS.
    assert_eq!(
        code(
            h.ctl
                .create_volume(Request::new(from_volume("restored", 3 * MIB, &v.volume_id)))
                .await
        ),
        Code::AlreadyExists
    );
    // A clone copies the volume as it is now.
    let c = h
        .ctl
        .create_volume(Request::new(from_volume("clone", 3 * MIB, &v.volume_id)))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        std::fs::read(vol_dir(&h, &c.volume_id).join("sub/f")).unwrap(),
        b"after"
    );
    // Deleting the source keeps its snapshots usable.
    h.ctl
        .delete_volume(Request::new(csi::DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
    let again = h
        .ctl
        .create_volume(Request::new(from_snapshot(
            "after-delete",
            3 * MIB,
            &s.snapshot_id,
        )))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        std::fs::read(vol_dir(&h, &again.volume_id).join("sub/f")).unwrap(),
        b"before"
    );
    // Nothing is left in the copy areas.
    assert_eq!(
        common::unfinished_in_creating(&h.path("local")),
        Vec::<std::ffi::OsString>::new()
    );
    // DeleteSnapshot removes the copy; a repeat and an unknown id are OK.
    for _ in 0..2 {
        delete_snapshot(&h, &s.snapshot_id).await.unwrap();
    }
    assert!(!h.path("local/.snapshots").join(&s.snapshot_id).exists());
    assert_eq!(
        code(
            h.ctl
                .create_volume(Request::new(from_snapshot("gone", MIB, &s.snapshot_id)))
                .await
        ),
        Code::NotFound
    );
}

/// A volume and a snapshot recorded here whose kind was taken out of
/// `--kinds` exist: DeleteSnapshot, CreateSnapshot of the volume and
/// ControllerExpandVolume are FAILED_PRECONDITION naming the flag (as
/// DeleteVolume is) and touch nothing. Before, DeleteSnapshot and
/// CreateSnapshot were INVALID_ARGUMENT and ControllerExpandVolume
/// NOT_FOUND ("does not exist"). `state check` warns about the snapshot
/// (before, it named the volume only).
#[tokio::test]
async fn a_kind_no_longer_served_keeps_its_snapshots_and_is_failed_precondition() {
    let h = fake(&[]);
    let id = create_p(&h, "a", MIB, &[]).await.volume_id;
    let s = snapshot(&h, "s", &id).await.snapshot_id;
    let copy = h.path("local/.snapshots").join(&s);
    assert!(copy.exists());
    let h = build(
        h.stop(),
        berth::os::Os::fake().0,
        None,
        &["--kinds", "block"],
    );
    let unserved = |r: Result<(), tonic::Status>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.code(), Code::FailedPrecondition, "{what}: {e:?}");
        assert!(
            e.message().contains("--kinds") && e.message().contains("local"),
            "{what}: {e:?}"
        );
    };
    unserved(
        h.ctl
            .delete_snapshot(Request::new(csi::DeleteSnapshotRequest {
                snapshot_id: s.clone(),
                ..Default::default()
            }))
            .await
            .map(drop),
        "DeleteSnapshot",
    );
    unserved(
        h.ctl
            .create_snapshot(Request::new(snap_req("s2", &id)))
            .await
            .map(drop),
        "CreateSnapshot",
    );
    unserved(
        h.ctl
            .controller_expand_volume(Request::new(csi::ControllerExpandVolumeRequest {
                volume_id: id.clone(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: 2 * MIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            }))
            .await
            .map(drop),
        "ControllerExpandVolume",
    );
    let rec = h
        .driver
        .store
        .snapshot_get(&s)
        .expect("snapshot record kept");
    assert_eq!(rec.phase, Phase::Ready);
    assert!(h.driver.store.snapshot_by_name("s2").is_none());
    assert_eq!(h.driver.store.get(&id).unwrap().capacity_bytes, MIB);
    assert!(copy.exists());
    // `state check` names the snapshot, as it does the volume.
    let (_, report) = state_check(&h);
    assert!(
        report.lines().any(|l| l.starts_with("warning:")
            && l.contains(&s)
            && l.contains("--kinds does not include local")),
        "{report}"
    );
    // Served again: the snapshot is deleted.
    let h = build(h.stop(), berth::os::Os::fake().0, None, &[]);
    delete_snapshot(&h, &s).await.unwrap();
    assert!(h.driver.store.snapshot_get(&s).is_none());
    assert!(!h.path("local/.snapshots").join(&s).exists());
}

#[tokio::test]
async fn snapshot_requests_are_checked() {
    let h = fake(&[]);
    let v = create_p(&h, "src", MIB, &[]).await;
    let w = create_p(&h, "other", MIB, &[]).await;
    snapshot(&h, "s", &v.volume_id).await;
    let cases = [
        (snap_req("", &v.volume_id), Code::InvalidArgument),
        (snap_req("x", ""), Code::InvalidArgument),
        (
            snap_req(&"n".repeat(129), &v.volume_id),
            Code::InvalidArgument,
        ),
        (
            snap_req("x", "local-0123456789abcdef0123456789abcdef"),
            Code::NotFound,
        ),
        (snap_req("s", &w.volume_id), Code::AlreadyExists),
        (
            csi::CreateSnapshotRequest {
                parameters: [("fsFreeze".to_string(), "no".to_string())].into(),
                ..snap_req("p", &v.volume_id)
            },
            Code::InvalidArgument,
        ),
    ];
    for (req, want) in cases {
        let name = req.name.chars().take(10).collect::<String>();
        assert_eq!(
            code(h.ctl.create_snapshot(Request::new(req)).await),
            want,
            "{name:?}"
        );
    }
    // Keys the external-snapshotter adds are accepted.
    let ok = csi::CreateSnapshotRequest {
        parameters: [(
            "csi.storage.k8s.io/volumesnapshot/name".to_string(),
            "vs".to_string(),
        )]
        .into(),
        ..snap_req("with-meta", &v.volume_id)
    };
    h.ctl.create_snapshot(Request::new(ok)).await.unwrap();
    assert_eq!(
        code(
            h.ctl
                .get_snapshot(Request::new(csi::GetSnapshotRequest {
                    snapshot_id: "local-snap-0123456789abcdef0123456789abcdef".into(),
                    ..Default::default()
                }))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            h.ctl
                .delete_snapshot(Request::new(csi::DeleteSnapshotRequest::default()))
                .await
        ),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn list_snapshots_pages_and_filters() {
    let h = fake(&[]);
    let a = create_p(&h, "a", MIB, &[]).await.volume_id;
    let b = create_p(&h, "b", MIB, &[]).await.volume_id;
    let mut made = Vec::new();
    for (i, src) in [&a, &a, &b].into_iter().enumerate() {
        made.push(snapshot(&h, &format!("s{i}"), src).await.snapshot_id);
    }
    let all = list(&h, Default::default()).await;
    assert_eq!(ids(&all), made);
    assert!(all.next_token.is_empty());
    let p1 = list(
        &h,
        csi::ListSnapshotsRequest {
            max_entries: 2,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ids(&p1), made[..2]);
    let p2 = list(
        &h,
        csi::ListSnapshotsRequest {
            max_entries: 2,
            starting_token: p1.next_token.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ids(&p2), made[2..]);
    assert!(p2.next_token.is_empty());
    let by_source = list(
        &h,
        csi::ListSnapshotsRequest {
            source_volume_id: a.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ids(&by_source), made[..2]);
    let by_id = list(
        &h,
        csi::ListSnapshotsRequest {
            snapshot_id: made[2].clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ids(&by_id), made[2..]);
    let none = list(
        &h,
        csi::ListSnapshotsRequest {
            snapshot_id: "local-snap-0123456789abcdef0123456789abcdef".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(none.entries.is_empty());
    assert_eq!(
        code(
            h.ctl
                .list_snapshots(Request::new(csi::ListSnapshotsRequest {
                    starting_token: "99".into(),
                    ..Default::default()
                }))
                .await
        ),
        Code::Aborted
    );
    assert_eq!(
        code(
            h.ctl
                .list_snapshots(Request::new(csi::ListSnapshotsRequest {
                    max_entries: -1,
                    ..Default::default()
                }))
                .await
        ),
        Code::InvalidArgument
    );
    let g = h
        .ctl
        .get_snapshot(Request::new(csi::GetSnapshotRequest {
            snapshot_id: made[1].clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g.snapshot.unwrap().source_volume_id, a);
}

/// A snapshot interrupted by a crash is never reported ready: start-up
/// removes its record and its unfinished copy; an unfinished restore copy
/// is removed too.
#[tokio::test]
async fn an_interrupted_snapshot_is_removed_at_start() {
    let h = fake(&[]);
    let v = create_p(&h, "src", MIB, &[]).await;
    let id = "local-snap-0123456789abcdef0123456789abcdef".to_string();
    h.driver
        .store
        .snapshot_insert_new(
            SnapshotRecord {
                id: id.clone(),
                name: "crashed".into(),
                kind: berth::state::Kind::Local,
                seq: 0,
                phase: Phase::Creating,
                source_volume_id: v.volume_id.clone(),
                size_bytes: MIB,
                node: NODE.into(),
                parameters: Default::default(),
                created_secs: 1,
                created_nanos: 0,
                block: None,
                file_bytes: None,
                extra: None,
            },
            |_| Ok::<(), berth::state::StateError>(()),
        )
        .unwrap();
    assert!(
        list(&h, Default::default()).await.entries.is_empty(),
        "listed before ready"
    );
    let partial = h.path("local/.snapshots").join(format!(".partial-{id}"));
    std::fs::create_dir_all(partial.join("half")).unwrap();
    let creating = h.path("local/.creating/.partial-local-fedcba9876543210fedcba9876543210");
    std::fs::create_dir_all(&creating).unwrap();
    let (os, f) = berth::os::Os::fake();
    let h = h.restart(os, Some(f));
    assert!(h.driver.store.snapshot_get(&id).is_none());
    assert!(!partial.exists() && !creating.exists());
    assert!(vol_dir(&h, &v.volume_id).is_dir());
}

/// Node-local snapshots live on their source's node: an id made on another
/// node is RESOURCE_EXHAUSTED (the CO places the volume there), an unknown
/// id of this node NOT_FOUND.
#[tokio::test]
async fn a_source_of_another_node_is_resource_exhausted() {
    let h = fake(&[]);
    let v = create_p(&h, "src", MIB, &[]).await;
    let s = snapshot(&h, "s", &v.volume_id).await.snapshot_id;
    let other = fake_node("node-b", &[]);
    assert_eq!(
        code(
            other
                .ctl
                .create_volume(Request::new(from_snapshot("r", MIB, &s)))
                .await
        ),
        Code::ResourceExhausted
    );
    assert_eq!(
        code(
            other
                .ctl
                .create_volume(Request::new(from_volume("c", MIB, &v.volume_id)))
                .await
        ),
        Code::ResourceExhausted
    );
    let unknown = format!("{}{}", &s[..s.len() - 4], "0000");
    assert_eq!(
        code(
            h.ctl
                .create_volume(Request::new(from_snapshot("r", MIB, &unknown)))
                .await
        ),
        Code::NotFound
    );
}

fn out(code: i32, stdout: &str) -> Result<berth::os::CmdOutput, berth::os::OsError> {
    Ok(berth::os::CmdOutput {
        code: Some(code),
        stdout: stdout.into(),
        stderr: String::new(),
    })
}

fn script_blank(f: &berth::os::fake::FakeOs) {
    f.respond("blkid", |_| out(2, ""));
    for p in ["mkfs.ext4", "mkfs.xfs", "resize2fs", "xfs_growfs"] {
        f.respond(p, |_| out(0, ""));
    }
    // exit 1: errors corrected, the filesystem is fine now
    f.respond("e2fsck", |_| out(1, ""));
}

fn img(h: &Harness, id: &str) -> PathBuf {
    h.path("block").join(format!("{id}.img"))
}

fn runs(f: &berth::os::fake::FakeOs, program: &str) -> usize {
    f.calls()
        .iter()
        .filter(|c| matches!(c, Call::Run { program: p, .. } if p == program))
        .count()
}

/// A staged filesystem is frozen for the copy and thawed after, also when
/// the copy fails; the restored volume is formatted already (mounted, never
/// made again) and grown when it is larger.
#[tokio::test]
async fn a_staged_block_filesystem_is_frozen_for_its_snapshot() {
    let h = fake(&["--kinds", "block"]);
    let f = h.fake();
    script_blank(f);
    let v = create_p(&h, "src", 8 * MIB, &[]).await;
    let staging = h.path("staging");
    h.node
        .node_stage_volume(Request::new(stage_req(&v.volume_id, &staging)))
        .await
        .unwrap();
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(img(&h, &v.volume_id))
            .unwrap();
        file.write_all_at(b"filesystem data", 4096).unwrap();
    }
    f.clear_file_ops();
    let s = snapshot(&h, "s", &v.volume_id).await;
    let ops: Vec<(&str, PathBuf)> = f.file_ops().into_iter().map(|o| (o.op, o.path)).collect();
    let at = |op: &str| {
        ops.iter()
            .position(|(o, _)| *o == op)
            .unwrap_or_else(|| panic!("no {op} in {ops:?}"))
    };
    assert!(
        at("freeze") < at("copy") && at("copy") < at("thaw"),
        "{ops:?}"
    );
    assert_eq!(ops[at("freeze")].1, staging);
    // A failed copy still thaws.
    f.clear_file_ops();
    f.fail_next("copy", libc::EIO);
    assert!(h
        .ctl
        .create_snapshot(Request::new(snap_req("s2", &v.volume_id)))
        .await
        .is_err());
    let ops: Vec<&str> = f.file_ops().iter().map(|o| o.op).collect();
    assert!(ops.contains(&"freeze") && ops.contains(&"thaw"), "{ops:?}");
    assert!(h.driver.store.snapshot_by_name("s2").is_none());
    // Restore, larger: formatted already, grown at the first stage.
    let r = h
        .ctl
        .create_volume(Request::new(csi::CreateVolumeRequest {
            parameters: [("kind".to_string(), "block".to_string())].into(),
            ..from_snapshot("r", 16 * MIB, &s.snapshot_id)
        }))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let mut data = vec![0u8; 15];
    {
        use std::os::unix::fs::FileExt;
        std::fs::File::open(img(&h, &r.volume_id))
            .unwrap()
            .read_exact_at(&mut data, 4096)
            .unwrap();
    }
    assert_eq!(&data, b"filesystem data");
    assert_eq!(
        std::fs::metadata(img(&h, &r.volume_id)).unwrap().len(),
        (16 * MIB) as u64
    );
    let rec = h.driver.store.get(&r.volume_id).unwrap().block.unwrap();
    assert!(rec.formatted && rec.grow_fs);
    let mkfs = runs(f, "mkfs.ext4");
    h.node
        .node_stage_volume(Request::new(stage_req(&r.volume_id, &h.path("staging-r"))))
        .await
        .unwrap();
    assert_eq!(
        runs(f, "mkfs.ext4"),
        mkfs,
        "a restored filesystem is never formatted"
    );
    // grown once mounted, online (the kernel journals each step of it, so
    // a crash midway leaves a consistent filesystem): no offline check
    assert_eq!(runs(f, "e2fsck"), 0);
    assert_eq!(runs(f, "resize2fs"), 1);
    assert_eq!(
        grow_order(f, 2),
        ["mount", "resize2fs"],
        "mounted, then grown"
    );
    assert!(
        !h.driver
            .store
            .get(&r.volume_id)
            .unwrap()
            .block
            .unwrap()
            .grow_fs
    );

    // Where the kernel refuses the online resize (no CAP_SYS_RESOURCE):
    // unmounted, checked and grown offline, mounted again.
    let r2 = h
        .ctl
        .create_volume(Request::new(csi::CreateVolumeRequest {
            parameters: [("kind".to_string(), "block".to_string())].into(),
            ..from_snapshot("r2", 16 * MIB, &s.snapshot_id)
        }))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let online = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let first = online.clone();
    f.respond("resize2fs", move |_| {
        if first.swap(false, std::sync::atomic::Ordering::SeqCst) {
            Ok(berth::os::CmdOutput {
                code: Some(1),
                stdout: String::new(),
                stderr: "resize2fs: Permission denied to resize filesystem".into(),
            })
        } else {
            out(0, "")
        }
    });
    let staging_r2 = h.path("staging-r2");
    h.node
        .node_stage_volume(Request::new(stage_req(&r2.volume_id, &staging_r2)))
        .await
        .unwrap();
    assert_eq!(
        grow_order(f, 6),
        [
            "mount",
            "resize2fs",
            "unmount",
            "e2fsck",
            "resize2fs",
            "mount"
        ],
        "online refused, then offline"
    );
    let staged: Vec<PathBuf> = f
        .table()
        .into_iter()
        .filter(|m| m.mount_point == staging_r2)
        .map(|m| m.mount_point)
        .collect();
    assert_eq!(staged.len(), 1, "mounted once at the end");
    assert!(
        !h.driver
            .store
            .get(&r2.volume_id)
            .unwrap()
            .block
            .unwrap()
            .grow_fs
    );

    // A first stage that mounted and then failed to grow (or was killed
    // there): the retry finds it staged already and grows it the same
    // way, offline where online is refused (before, every retry tried
    // online only and answered INTERNAL until someone unstaged it).
    let r3 = h
        .ctl
        .create_volume(Request::new(csi::CreateVolumeRequest {
            parameters: [("kind".to_string(), "block".to_string())].into(),
            ..from_snapshot("r3", 16 * MIB, &s.snapshot_id)
        }))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let calls = n.clone();
    f.respond("resize2fs", move |_| {
        let stderr = match calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
            0 => "resize2fs: Input/output error while trying to resize",
            1 => "resize2fs: Permission denied to resize filesystem",
            _ => return out(0, ""),
        };
        Ok(berth::os::CmdOutput {
            code: Some(1),
            stdout: String::new(),
            stderr: stderr.into(),
        })
    });
    let staging_r3 = h.path("staging-r3");
    let e = h
        .node
        .node_stage_volume(Request::new(stage_req(&r3.volume_id, &staging_r3)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{e:?}");
    let mounted_at_r3 = |f: &berth::os::fake::FakeOs| {
        f.table()
            .into_iter()
            .filter(|m| m.mount_point == staging_r3)
            .count()
    };
    assert_eq!(mounted_at_r3(f), 1, "left mounted by the failed growth");
    h.node
        .node_stage_volume(Request::new(stage_req(&r3.volume_id, &staging_r3)))
        .await
        .unwrap();
    assert_eq!(
        grow_order(f, 5),
        ["resize2fs", "unmount", "e2fsck", "resize2fs", "mount"],
        "staged already: online refused, then offline"
    );
    assert_eq!(mounted_at_r3(f), 1, "mounted once at the end");
    assert!(
        !h.driver
            .store
            .get(&r3.volume_id)
            .unwrap()
            .block
            .unwrap()
            .grow_fs
    );
}

/// The last `n` of the fake's mounts, unmounts, e2fsck and resize2fs runs,
/// in order.
fn grow_order(f: &berth::os::fake::FakeOs, n: usize) -> Vec<&'static str> {
    let order: Vec<&str> = f
        .calls()
        .iter()
        .filter_map(|c| match c {
            Call::Run { program, .. } if program == "e2fsck" => Some("e2fsck"),
            Call::Run { program, .. } if program == "resize2fs" => Some("resize2fs"),
            Call::MountFs { .. } => Some("mount"),
            Call::Unmount { .. } => Some("unmount"),
            _ => None,
        })
        .collect();
    order[order.len().saturating_sub(n)..].to_vec()
}

/// A raw volume in use cannot be frozen: without a filesystem that clones
/// files (this host's ext4), its snapshot is refused rather than made of
/// blocks from different moments. Unused, it is copied.
#[tokio::test]
async fn a_raw_volume_in_use_is_copied_only_while_no_write_begins() {
    let h = fake(&["--kinds", "block"]);
    let f = h.fake();
    script_blank(f);
    let v = create_p(&h, "raw", 8 * MIB, &[]).await;
    let staging = h.path("staging");
    let mut req = stage_req(&v.volume_id, &staging);
    req.volume_capability = Some(block_cap(
        csi::volume_capability::access_mode::Mode::SingleNodeWriter,
    ));
    h.node.node_stage_volume(Request::new(req)).await.unwrap();
    let clones = {
        let t = tempfile::tempdir_in(h.path("block")).unwrap();
        std::fs::write(t.path().join("a"), b"x").unwrap();
        berth::os::copy::copy_file(&t.path().join("a"), &t.path().join("b"))
            .unwrap()
            .cloned
            > 0
    };
    let copies =
        |f: &berth::os::fake::FakeOs| f.file_ops().iter().filter(|o| o.op == "copy").count();
    // Not written meanwhile: one copy.
    f.clear_file_ops();
    snapshot(&h, "quiet", &v.volume_id).await;
    assert_eq!(copies(f), 1);
    // Written during the first two copies: kept from the third.
    f.clear_file_ops();
    f.write_during_copies(2);
    snapshot(&h, "busy-then-quiet", &v.volume_id).await;
    assert_eq!(copies(f), if clones { 1 } else { 3 });
    f.write_during_copies(0);
    // Written throughout: no snapshot, no clone, nothing left behind.
    f.write_during_copies(100);
    f.clear_file_ops();
    let r = h
        .ctl
        .create_snapshot(Request::new(snap_req("always-busy", &v.volume_id)))
        .await;
    if clones {
        assert!(r.is_ok(), "{r:?}");
    } else {
        let e = r.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(
            e.message().contains("written during each of 5 copies"),
            "{e:?}"
        );
        assert_eq!(copies(f), 5);
        // A clone of a raw volume is raw (a block capability).
        let mut clone_req = from_volume("clone", 8 * MIB, &v.volume_id);
        clone_req.volume_capabilities = vec![block_cap(
            csi::volume_capability::access_mode::Mode::SingleNodeWriter,
        )];
        let clone = h.ctl.create_volume(Request::new(clone_req)).await;
        assert_eq!(clone.unwrap_err().code(), Code::FailedPrecondition);
        assert!(h.driver.store.get_by_name("clone").is_none());
        let left: Vec<_> = made_in(&h.path("block/.snapshots"))
            .into_iter()
            .filter(|n| n.to_string_lossy().starts_with(".partial-"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
    f.write_during_copies(0);
    h.node
        .node_unstage_volume(Request::new(csi::NodeUnstageVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
        }))
        .await
        .unwrap();
    let s = snapshot(&h, "s-unused", &v.volume_id).await;
    assert!(Path::new(
        &h.path("block/.snapshots")
            .join(format!("{}.img", s.snapshot_id))
    )
    .is_file());
}

/// A crash while a staged filesystem was frozen for a snapshot (or a clone
/// of a volume in use) leaves it frozen, and every write in the pod waits:
/// start-up thaws the sources of the copies it finds interrupted, before it
/// removes them. Sources of nothing interrupted are left alone.
#[tokio::test]
async fn a_filesystem_frozen_by_an_interrupted_copy_is_thawed_at_start() {
    let h = fake(&["--kinds", "block"]);
    let f = h.fake.clone().expect("fake");
    script_blank(&f);
    let v = create_p(&h, "src", 8 * MIB, &[]).await;
    let other = create_p(&h, "other", 8 * MIB, &[]).await;
    let staging = h.path("staging");
    let staging_other = h.path("staging-other");
    for (id, s) in [(&v.volume_id, &staging), (&other.volume_id, &staging_other)] {
        h.node
            .node_stage_volume(Request::new(stage_req(id, s)))
            .await
            .unwrap();
    }
    let id = "block-snap-0123456789abcdef0123456789abcdef".to_string();
    h.driver
        .store
        .snapshot_insert_new(
            SnapshotRecord {
                id: id.clone(),
                name: "crashed".into(),
                kind: berth::state::Kind::Block,
                seq: 0,
                phase: Phase::Creating,
                source_volume_id: v.volume_id.clone(),
                size_bytes: 8 * MIB,
                node: NODE.into(),
                parameters: Default::default(),
                created_secs: 1,
                created_nanos: 0,
                block: None,
                file_bytes: None,
                extra: None,
            },
            |_| Ok::<(), berth::state::StateError>(()),
        )
        .unwrap();
    f.clear_file_ops();
    // The same fake OS (its mounts stay, as the kernel's do after a crash).
    let os = h.driver.os.clone();
    let h = build(h.stop(), os, Some(f.clone()), &["--kinds", "block"]);
    let ops: Vec<(&str, PathBuf)> = f.file_ops().into_iter().map(|o| (o.op, o.path)).collect();
    let thawed: Vec<&PathBuf> = ops
        .iter()
        .filter(|(o, _)| *o == "thaw")
        .map(|(_, p)| p)
        .collect();
    assert_eq!(thawed, vec![&staging], "{ops:?}");
    assert!(h.driver.store.snapshot_get(&id).is_none());
}

fn snap_img(h: &Harness, id: &str) -> PathBuf {
    h.path("block/.snapshots").join(format!("{id}.img"))
}

fn write_at(path: &Path, data: &[u8], offset: u64) {
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(data, offset)
        .unwrap();
}

fn block_restore(name: &str, size: i64, snap: &str, raw: bool) -> csi::CreateVolumeRequest {
    let mut req = from_snapshot(name, size, snap);
    req.parameters.insert("kind".into(), "block".into());
    if raw {
        req.volume_capabilities = vec![block_cap(
            csi::volume_capability::access_mode::Mode::SingleNodeWriter,
        )];
    }
    req
}

/// A block snapshot's file replaced by a symlink (to another tenant's
/// backing file, to a host file) is never followed: a restore from it is
/// FAILED_PRECONDITION, says the snapshot's copy is damaged and creates
/// nothing, and `state check` reports it as an error. Before, the restore
/// answered OK with the link target's bytes in the new volume, and `check`
/// found nothing.
#[tokio::test]
async fn a_block_snapshot_file_replaced_by_a_symlink_is_never_followed() {
    let h = fake(&["--kinds", "block"]);
    script_blank(h.fake());
    let a = create_p(&h, "a", 8 * MIB, &[]).await;
    let b = create_p(&h, "b", 8 * MIB, &[]).await;
    write_at(&img(&h, &a.volume_id), b"tenant-a", 4096);
    write_at(&img(&h, &b.volume_id), b"tenant-b-secret", 4096);
    let s = snapshot(&h, "s", &a.volume_id).await;
    let (ok, text) = state_check(&h);
    assert!(ok, "{text}");
    let outside = tempfile::tempdir().unwrap();
    let host = outside.path().join("host-file");
    std::fs::write(&host, b"HOST-ONLY-SECRET".repeat(1 << 16)).unwrap();
    let file = snap_img(&h, &s.snapshot_id);
    for (n, target) in [img(&h, &b.volume_id), host.clone()].iter().enumerate() {
        std::fs::remove_file(&file).unwrap();
        std::os::unix::fs::symlink(target, &file).unwrap();
        let before = made_in(&h.path("block"));
        for raw in [false, true] {
            let name = format!("r{n}-{raw}");
            let e = h
                .ctl
                .create_volume(Request::new(block_restore(
                    &name,
                    8 * MIB,
                    &s.snapshot_id,
                    raw,
                )))
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::FailedPrecondition, "{target:?}: {e:?}");
            assert!(
                e.message().contains(&s.snapshot_id)
                    && e.message().contains("damaged")
                    && e.message().contains("not a regular file"),
                "{e:?}"
            );
            assert!(h.driver.store.get_by_name(&name).is_none());
        }
        assert_eq!(made_in(&h.path("block")), before, "something was created");
        let (ok, text) = state_check(&h);
        assert!(
            !ok && text.contains(&s.snapshot_id) && text.contains("symbolic link"),
            "{text}"
        );
    }
    assert_eq!(
        std::fs::read(&host).unwrap(),
        b"HOST-ONLY-SECRET".repeat(1 << 16)
    );
}

/// A block snapshot's file cut short, grown, or removed: a restore from it
/// is FAILED_PRECONDITION naming the damage and creates nothing (before, a
/// short file was padded with zeros to the recorded size and handed out as
/// a volume whose filesystem does not mount), and `state check` reports
/// each as an error. A snapshot taken after ControllerExpandVolume recorded
/// a larger size, before the node grew the file, is shorter than its
/// size_bytes and whole: it restores and checks clean. So does a record
/// from before the file's length was recorded, against its size_bytes.
#[tokio::test]
async fn a_block_snapshot_file_of_the_wrong_length_or_missing_is_refused_and_reported() {
    let h = fake(&["--kinds", "block"]);
    let f = h.fake();
    script_blank(f);
    f.set_usage(
        None,
        berth::os::FsUsage {
            total_bytes: 1000 * MIB as u64,
            available_bytes: 500 * MIB as u64,
            ..Default::default()
        },
    );
    let v = create_p(&h, "v", 8 * MIB, &[]).await;
    write_at(&img(&h, &v.volume_id), b"filesystem data", 4096);
    let short = snapshot(&h, "short", &v.volume_id).await;
    let long = snapshot(&h, "long", &v.volume_id).await;
    let gone = snapshot(&h, "gone", &v.volume_id).await;
    let whole = snapshot(&h, "whole", &v.volume_id).await;
    // Expanded by the controller; the node has not grown the file yet.
    h.ctl
        .controller_expand_volume(Request::new(csi::ControllerExpandVolumeRequest {
            volume_id: v.volume_id.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 16 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert_eq!(
        std::fs::metadata(img(&h, &v.volume_id)).unwrap().len(),
        (8 * MIB) as u64
    );
    let window = snapshot(&h, "window", &v.volume_id).await;
    assert_eq!(window.size_bytes, 16 * MIB);
    // A record of a snapshot made before the file's length was recorded.
    let mut old = serde_json::to_value(h.driver.store.snapshot_get(&whole.snapshot_id)).unwrap();
    old.as_object_mut().unwrap().remove("file_bytes");
    let old: SnapshotRecord = serde_json::from_value(old).unwrap();
    h.driver.store.snapshot_put(&old).unwrap();
    let (ok, text) = state_check(&h);
    assert!(ok, "{text}");

    std::fs::OpenOptions::new()
        .write(true)
        .open(snap_img(&h, &short.snapshot_id))
        .unwrap()
        .set_len(MIB as u64)
        .unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(snap_img(&h, &long.snapshot_id))
        .unwrap()
        .set_len((8 * MIB + 4096) as u64)
        .unwrap();
    std::fs::remove_file(snap_img(&h, &gone.snapshot_id)).unwrap();
    let (ok, text) = state_check(&h);
    assert!(!ok, "{text}");
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 3, "{text}");
    for (s, says) in [
        (&short, "1048576 bytes"),
        (&long, "8392704 bytes"),
        (&gone, "missing"),
    ] {
        assert!(
            errors
                .iter()
                .any(|l| l.contains(&s.snapshot_id) && l.contains(says)),
            "{text}"
        );
    }

    let before = made_in(&h.path("block"));
    for (s, says) in [(&short, "damaged"), (&long, "damaged"), (&gone, "missing")] {
        let e = h
            .ctl
            .create_volume(Request::new(block_restore(
                "r",
                16 * MIB,
                &s.snapshot_id,
                false,
            )))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(
            e.message().contains(&s.snapshot_id) && e.message().contains(says),
            "{e:?}"
        );
        assert!(h.driver.store.get_by_name("r").is_none());
    }
    assert!(
        h.ctl
            .create_volume(Request::new(block_restore(
                "r",
                16 * MIB,
                &short.snapshot_id,
                false
            )))
            .await
            .unwrap_err()
            .message()
            .contains("1048576 bytes"),
        "the message names the length found"
    );
    assert_eq!(made_in(&h.path("block")), before, "something was created");

    for s in [&window, &whole] {
        let r = h
            .ctl
            .create_volume(Request::new(block_restore(
                &format!("from-{}", s.snapshot_id),
                16 * MIB,
                &s.snapshot_id,
                false,
            )))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        let mut data = vec![0u8; 15];
        std::os::unix::fs::FileExt::read_exact_at(
            &std::fs::File::open(img(&h, &r.volume_id)).unwrap(),
            &mut data,
            4096,
        )
        .unwrap();
        assert_eq!(&data, b"filesystem data");
        assert_eq!(
            std::fs::metadata(img(&h, &r.volume_id)).unwrap().len(),
            (16 * MIB) as u64
        );
    }
}

/// A local snapshot's directory replaced by a symlink (to another volume's
/// directory) is never followed: a restore from it is FAILED_PRECONDITION
/// and creates nothing (before, the copy failed half way, INTERNAL), and
/// `state check` reports it, as it reports a missing one.
#[tokio::test]
async fn a_local_snapshot_directory_replaced_by_a_symlink_is_never_followed() {
    let h = fake(&[]);
    let a = create_p(&h, "a", MIB, &[]).await;
    let b = create_p(&h, "b", MIB, &[]).await;
    std::fs::write(vol_dir(&h, &b.volume_id).join("secret"), b"tenant b").unwrap();
    let s = snapshot(&h, "s", &a.volume_id).await;
    let gone = snapshot(&h, "gone", &a.volume_id).await;
    let (ok, text) = state_check(&h);
    assert!(ok, "{text}");
    let dir = h.path("local/.snapshots").join(&s.snapshot_id);
    std::fs::remove_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink(vol_dir(&h, &b.volume_id), &dir).unwrap();
    std::fs::remove_dir_all(h.path("local/.snapshots").join(&gone.snapshot_id)).unwrap();
    let before = made_in(&h.path("local"));
    let e = h
        .ctl
        .create_volume(Request::new(from_snapshot("r", MIB, &s.snapshot_id)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains(&s.snapshot_id)
            && e.message().contains("damaged")
            && e.message().contains("not a directory"),
        "{e:?}"
    );
    let e = h
        .ctl
        .create_volume(Request::new(from_snapshot("r", MIB, &gone.snapshot_id)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("missing"), "{e:?}");
    assert!(h.driver.store.get_by_name("r").is_none());
    assert_eq!(made_in(&h.path("local")), before, "something was created");
    assert_eq!(
        common::unfinished_in_creating(&h.path("local")),
        Vec::<std::ffi::OsString>::new()
    );
    let (ok, text) = state_check(&h);
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("error")).collect();
    assert!(!ok && errors.len() == 2, "{text}");
    assert!(
        errors
            .iter()
            .any(|l| l.contains(&s.snapshot_id) && l.contains("symbolic link")),
        "{text}"
    );
    assert!(
        errors
            .iter()
            .any(|l| l.contains(&gone.snapshot_id) && l.contains("missing")),
        "{text}"
    );
}

/// A snapshot's copy whose record is gone (cut off a journal, or removed
/// by `state repair`): `state check` warns about it, naming the copy, and
/// start-up then keeps it aside in `.orphaned` (never deletes it). Before,
/// check said nothing ("0 errors, 0 warnings").
#[tokio::test]
async fn a_snapshot_copy_without_a_record_is_reported_and_kept_aside() {
    let h = fake(&["--kinds", "local,block"]);
    let f = h.fake();
    script_blank(f);
    let lv = create_p(&h, "lv", MIB, &[]).await;
    let bv = create_p(&h, "bv", 8 * MIB, &[("kind", "block")]).await;
    let ls = snapshot(&h, "ls", &lv.volume_id).await.snapshot_id;
    let bs = snapshot(&h, "bs", &bv.volume_id).await.snapshot_id;
    let copies = [
        h.path("local/.snapshots").join(&ls),
        h.path("block/.snapshots").join(format!("{bs}.img")),
    ];
    assert!(copies.iter().all(|c| c.exists()));
    let (ok, text) = state_check(&h);
    assert!(ok && !text.contains("without a record"), "{text}");
    for id in [&ls, &bs] {
        h.driver.store.snapshot_remove(id).unwrap();
    }
    let (ok, text) = state_check(&h);
    assert!(ok, "warnings only: {text}");
    for c in &copies {
        assert!(
            text.contains(&format!(
                "{} is a snapshot's copy without a record",
                c.display()
            )),
            "{text}"
        );
    }
    let (os, f) = berth::os::Os::fake();
    let h = build(h.stop(), os, Some(f), &["--kinds", "local,block"]);
    for c in &copies {
        assert!(!c.exists(), "{} still there", c.display());
    }
    for (root, name) in [("local", ls.clone()), ("block", format!("{bs}.img"))] {
        let aside = h.path(root).join(".orphaned");
        assert!(
            std::fs::read_dir(&aside).unwrap().any(|e| e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(&name)),
            "{name} kept in {}",
            aside.display()
        );
    }
}

/// Restores, clones and snapshots whose record lost its Ready (a journal
/// cut right after their Creating line, one of the ways records get lost)
/// keep their whole copy: `state check` reports each as an error, and
/// start-up moves it to `.orphaned/`, never deletes it, with the tenant's
/// writes in it. Before, their copies were deleted silently, and check
/// said only that an operation was interrupted. A restore's copy that is
/// not whole yet (a block restore copies under a temporary name) is still
/// removed, and nothing of it is kept.
#[tokio::test]
async fn copies_whose_ready_was_lost_are_kept_aside() {
    for kind in ["local", "block"] {
        let h = fake(&["--kinds", kind]);
        let src = create_p(&h, "src", MIB, &[]).await.volume_id;
        let snap = snapshot(&h, "s", &src).await.snapshot_id;
        let restore = |name: &'static str| {
            let (h, snap) = (&h, snap.clone());
            async move {
                h.ctl
                    .create_volume(Request::new(from_snapshot(name, MIB, &snap)))
                    .await
                    .expect("restore")
                    .into_inner()
                    .volume
                    .expect("volume")
                    .volume_id
            }
        };
        let restored = restore("restored").await;
        let cloned = h
            .ctl
            .create_volume(Request::new(from_volume("cloned", MIB, &src)))
            .await
            .expect("clone")
            .into_inner()
            .volume
            .expect("volume")
            .volume_id;
        let unfinished = restore("unfinished").await;
        // A restore and a snapshot whose records say Ready but whose
        // copies were not moved to their names yet (a crash in between):
        // start-up moves them.
        let late = restore("late").await;
        let late_snap = snapshot(&h, "late", &src).await.snapshot_id;
        let snap_copy = |h: &Harness, id: &str| match kind {
            "local" => h.path("local/.snapshots").join(id),
            _ => h.path("block/.snapshots").join(format!("{id}.img")),
        };
        let (late_tmp, late_snap_tmp) = match kind {
            "local" => (
                h.path("local/.creating").join(&late),
                h.path("local/.snapshots")
                    .join(format!(".partial-{late_snap}")),
            ),
            _ => (
                h.path("block").join(format!(".restoring-{late}.img")),
                h.path("block/.snapshots")
                    .join(format!(".partial-{late_snap}.img")),
            ),
        };
        std::fs::create_dir_all(late_tmp.parent().unwrap()).unwrap();
        std::fs::rename(storage_of(&h, kind, &late), &late_tmp).unwrap();
        std::fs::rename(snap_copy(&h, &late_snap), &late_snap_tmp).unwrap();
        // The tenants write.
        let storage = |h: &Harness, id: &str| storage_of(h, kind, id);
        for id in [&restored, &cloned] {
            match kind {
                "local" => std::fs::write(storage(&h, id).join("tenant"), id.as_bytes()).unwrap(),
                _ => {
                    use std::os::unix::fs::FileExt;
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(storage(&h, id))
                        .unwrap()
                        .write_all_at(id.as_bytes(), 8192)
                        .unwrap();
                }
            }
        }
        // A block restore whose copy had not been renamed into place yet.
        let partial = h.path("block").join(format!(".restoring-{unfinished}.img"));
        if kind == "block" {
            std::fs::rename(img(&h, &unfinished), &partial).unwrap();
        }
        // The Ready records lost.
        for id in [&restored, &cloned, &unfinished] {
            let mut r = h.driver.store.get(id).unwrap();
            h.driver.store.set_phase(&mut r, Phase::Creating).unwrap();
        }
        let mut s = h.driver.store.snapshot_get(&snap).unwrap();
        s.phase = Phase::Creating;
        h.driver.store.snapshot_put(&s).unwrap();
        let (clean, out) = state_check(&h);
        assert!(!clean, "{kind}: {out}");
        for id in [&restored, &cloned, &snap] {
            assert!(
                out.lines()
                    .any(|l| l.starts_with("error") && l.contains(id.as_str())),
                "{kind}: {id} not reported as an error: {out}"
            );
        }
        if kind == "block" {
            assert!(
                !out.lines()
                    .any(|l| l.starts_with("error") && l.contains(&unfinished)),
                "{kind}: {out}"
            );
        }
        // The moves left to start-up are warnings, not damage.
        for id in [&late, &late_snap] {
            assert!(
                !out.lines()
                    .any(|l| l.starts_with("error") && l.contains(id.as_str())),
                "{kind}: {out}"
            );
            assert!(
                out.lines().any(|l| l.starts_with("warning")
                    && l.contains(id.as_str())
                    && l.contains("start-up moves it into place")),
                "{kind}: {id}: {out}"
            );
        }
        let dir = h.stop();
        let (os, f) = berth::os::Os::fake();
        let h = build(dir, os, Some(f), &["--kinds", kind]);
        for id in [&restored, &cloned, &unfinished] {
            assert!(
                h.driver.store.get(id).is_none(),
                "{kind}: {id} not rolled back"
            );
            assert!(!storage(&h, id).exists(), "{kind}: {id} left in place");
        }
        assert!(h.driver.store.snapshot_get(&snap).is_none());
        let aside = h.path(kind).join(".orphaned");
        let kept = |id: &str| match kind {
            "local" => aside.join(id),
            _ => aside.join(format!("{id}.img")),
        };
        for id in [&restored, &cloned] {
            let got = match kind {
                "local" => std::fs::read(kept(id).join("tenant")).unwrap(),
                _ => {
                    use std::os::unix::fs::FileExt;
                    let mut b = vec![0u8; id.len()];
                    std::fs::File::open(kept(id))
                        .unwrap()
                        .read_exact_at(&mut b, 8192)
                        .unwrap();
                    b
                }
            };
            assert_eq!(got, id.as_bytes(), "{kind}: {id}'s writes not kept");
        }
        assert!(kept(&snap).exists(), "{kind}: the snapshot's copy not kept");
        assert!(
            !kept(&unfinished).exists(),
            "{kind}: an unfinished copy kept"
        );
        assert!(!partial.exists(), "{kind}: an unfinished copy left");
        // The source is untouched.
        assert!(storage(&h, &src).exists());
        // The late moves were finished.
        assert!(storage(&h, &late).exists(), "{kind}: the restore not moved");
        assert!(!late_tmp.exists());
        assert!(
            snap_copy(&h, &late_snap).exists(),
            "{kind}: the snapshot not moved"
        );
        assert!(!late_snap_tmp.exists());
        let (_, out) = state_check(&h);
        assert!(!out.contains(&late) && !out.contains(&late_snap), "{out}");
    }
}

/// Where volume `id` of `kind` keeps its storage.
fn storage_of(h: &Harness, kind: &str, id: &str) -> PathBuf {
    match kind {
        "local" => vol_dir(h, id),
        _ => img(h, id),
    }
}
/// A capability: `None` raw block, `Some(fs)` a mount with that fs_type
/// (empty: none named).
fn cap(fs: Option<&str>) -> csi::VolumeCapability {
    use csi::volume_capability::access_mode::Mode;
    match fs {
        None => block_cap(Mode::SingleNodeWriter),
        Some(t) => {
            let mut c = mount_cap(Mode::SingleNodeWriter);
            if let Some(csi::volume_capability::AccessType::Mount(m)) = &mut c.access_type {
                m.fs_type = t.into();
            }
            c
        }
    }
}

async fn confirmed(h: &Harness, id: &str, c: csi::VolumeCapability) -> (bool, String) {
    let r = h
        .ctl
        .validate_volume_capabilities(Request::new(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: id.into(),
            volume_capabilities: vec![c],
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    (r.confirmed.is_some(), r.message)
}

/// A restore or clone inherits how its source was used: raw, or a
/// filesystem of one type. CreateVolume with capabilities that cannot use
/// that is INVALID_ARGUMENT (the spec's "source incompatible") and makes
/// nothing; a source never staged takes either. What is made is confirmed
/// by ValidateVolumeCapabilities and stages. Before, all of these answered
/// OK and ValidateVolumeCapabilities confirmed, then every NodeStageVolume
/// failed FAILED_PRECONDITION ("was first staged as a raw block device",
/// "formatted ext4 ... cannot be mounted as xfs"), forever.
#[tokio::test]
async fn a_restore_or_clone_needs_capabilities_its_source_content_fits() {
    let h = fake(&["--kinds", "block"]);
    let f = h.fake();
    script_blank(f);
    let raw = create_p(&h, "raw", 8 * MIB, &[]).await.volume_id;
    let mut req = stage_req(&raw, &h.path("s-raw"));
    req.volume_capability = Some(cap(None));
    h.node.node_stage_volume(Request::new(req)).await.unwrap();
    let ext4 = create_p(&h, "ext4", 8 * MIB, &[]).await.volume_id;
    h.node
        .node_stage_volume(Request::new(stage_req(&ext4, &h.path("s-ext4"))))
        .await
        .unwrap();
    let blank = create_p(&h, "blank", 8 * MIB, &[]).await.volume_id;
    let s_raw = snapshot(&h, "s-raw", &raw).await.snapshot_id;
    let s_ext4 = snapshot(&h, "s-ext4", &ext4).await.snapshot_id;
    let s_blank = snapshot(&h, "s-blank", &blank).await.snapshot_id;
    let request = |name: &str, snap: Option<&str>, vol: &str, c: Option<&str>| {
        let mut req = match snap {
            Some(s) => from_snapshot(name, 8 * MIB, s),
            None => from_volume(name, 8 * MIB, vol),
        };
        req.volume_capabilities = vec![cap(c)];
        req
    };

    let before = (
        made_in(&h.path("block")),
        made_in(&h.path("block/.snapshots")),
    );
    let refused = [
        (Some(&s_raw), &raw, Some(""), "raw block device"),
        (Some(&s_raw), &raw, Some("ext4"), "raw block device"),
        (None, &raw, Some(""), "raw block device"),
        (Some(&s_ext4), &ext4, None, "an ext4 filesystem"),
        (
            Some(&s_ext4),
            &ext4,
            Some("xfs"),
            "cannot be mounted as xfs",
        ),
        (None, &ext4, None, "an ext4 filesystem"),
        (None, &ext4, Some("xfs"), "cannot be mounted as xfs"),
    ];
    for (n, (snap, vol, c, says)) in refused.into_iter().enumerate() {
        let name = format!("bad-{n}");
        let e = h
            .ctl
            .create_volume(Request::new(request(
                &name,
                snap.map(String::as_str),
                vol,
                c,
            )))
            .await
            .unwrap_err();
        let source = snap.unwrap_or(vol);
        assert_eq!(
            e.code(),
            Code::InvalidArgument,
            "{snap:?} {vol} {c:?}: {e:?}"
        );
        assert!(
            e.message().contains(source.as_str()) && e.message().contains(says),
            "{e:?}"
        );
        assert!(h.driver.store.get_by_name(&name).is_none());
    }
    assert_eq!(
        (
            made_in(&h.path("block")),
            made_in(&h.path("block/.snapshots"))
        ),
        before,
        "something was made"
    );

    // What fits is made, confirmed, and stages; the other way is not
    // confirmed.
    let fits = [
        (Some(&s_raw), &raw, None, Some("")),
        (None, &raw, None, Some("ext4")),
        (Some(&s_ext4), &ext4, Some(""), None),
        (Some(&s_ext4), &ext4, Some("ext4"), Some("xfs")),
        (None, &ext4, Some(""), Some("xfs")),
        (Some(&s_blank), &blank, None, None),
        (Some(&s_blank), &blank, Some(""), None),
        (None, &blank, Some("ext4"), None),
    ];
    for (n, (snap, vol, c, not)) in fits.into_iter().enumerate() {
        let name = format!("good-{n}");
        let id = created_id(
            h.ctl
                .create_volume(Request::new(request(
                    &name,
                    snap.map(String::as_str),
                    vol,
                    c,
                )))
                .await,
        );
        let (ok, why) = confirmed(&h, &id, cap(c)).await;
        assert!(ok, "{name}: {why}");
        if let Some(other) = not {
            let (ok, _) = confirmed(&h, &id, cap(Some(other))).await;
            assert!(!ok, "{name} confirmed as {other}");
        }
        let mut req = stage_req(&id, &h.path(&format!("s-{name}")));
        req.volume_capability = Some(cap(c));
        h.node
            .node_stage_volume(Request::new(req))
            .await
            .unwrap_or_else(|e| panic!("staging {name}: {e:?}"));
    }
}

/// ValidateVolumeCapabilities answers as NodeStageVolume would: a volume
/// used raw is not confirmed for a mount, one formatted ext4 not for xfs
/// nor raw block, whatever it was created with (before, both were
/// confirmed, and the stage was refused).
#[tokio::test]
async fn validate_volume_capabilities_does_not_confirm_what_the_content_refuses() {
    let h = fake(&["--kinds", "block"]);
    script_blank(h.fake());
    // Large enough for xfs: only the content refuses it.
    let raw = create_p(&h, "raw", 300 * MIB, &[]).await.volume_id;
    let ext4 = create_p(&h, "ext4", 300 * MIB, &[]).await.volume_id;
    let blank = create_p(&h, "blank", 300 * MIB, &[]).await.volume_id;
    let mut req = stage_req(&raw, &h.path("s-raw"));
    req.volume_capability = Some(cap(None));
    h.node.node_stage_volume(Request::new(req)).await.unwrap();
    h.node
        .node_stage_volume(Request::new(stage_req(&ext4, &h.path("s-ext4"))))
        .await
        .unwrap();
    for (id, c, ok, says) in [
        (&raw, Some(""), false, "raw block device"),
        (&ext4, Some("xfs"), false, "cannot be mounted as xfs"),
        (&ext4, Some("ext4"), true, ""),
        (&ext4, Some(""), true, ""),
        (&blank, Some("xfs"), true, ""),
        (&blank, Some(""), true, ""),
    ] {
        let (confirmed, why) = confirmed(&h, id, cap(c)).await;
        assert_eq!(confirmed, ok, "{id} {c:?}: {why}");
        assert!(why.contains(says), "{why}");
    }
}

/// A mount capability without fs_type gets the filesystem the volume
/// holds: a restore of an ext4 whose StorageClass said `fsType: xfs` (the
/// capability named ext4) mounts as ext4. Before, it took the inherited
/// default (xfs) and every stage was refused ("formatted ext4 ... cannot
/// be mounted as xfs").
#[tokio::test]
async fn a_mount_without_fs_type_gets_the_filesystem_the_volume_holds() {
    let h = fake(&["--kinds", "block"]);
    let f = h.fake();
    script_blank(f);
    let mut req = create_req("src", 8 * MIB);
    req.parameters.insert("fsType".into(), "xfs".into());
    req.volume_capabilities = vec![cap(Some("ext4"))];
    let src = created_id(h.ctl.create_volume(Request::new(req)).await);
    let mut req = stage_req(&src, &h.path("s-src"));
    req.volume_capability = Some(cap(Some("ext4")));
    h.node.node_stage_volume(Request::new(req)).await.unwrap();
    let s = snapshot(&h, "s", &src).await.snapshot_id;
    let r = created_id(
        h.ctl
            .create_volume(Request::new(from_snapshot("r", 8 * MIB, &s)))
            .await,
    );
    let (ok, why) = confirmed(&h, &r, cap(Some(""))).await;
    assert!(ok, "{why}");
    let staging = h.path("s-r");
    h.node
        .node_stage_volume(Request::new(stage_req(&r, &staging)))
        .await
        .unwrap();
    assert!(f.calls().iter().any(
        |c| matches!(c, Call::MountFs { target, fstype, .. } if target == &staging && fstype == "ext4")
    ));
    assert_eq!(runs(f, "mkfs.xfs"), 0);
}

/// A restore or clone of a block volume never staged (no filesystem was
/// made on it, so its copy holds no data) is formatted, at its first stage
/// with a mount capability that names no filesystem, as its own
/// StorageClass says (`fsType`, and `mkfsOptions`), as a new volume is:
/// the source's class only said what a filesystem would be, and none was
/// made. Before, it took the source's: a restore asked for with `fsType:
/// xfs` was formatted ext4 (and sized for xfs).
#[tokio::test]
async fn a_restore_of_a_source_never_staged_takes_its_own_filesystem() {
    let h = fake(&["--kinds", "block"]);
    let f = h.fake();
    script_blank(f);
    let src = create_p(&h, "src", 320 * MIB, &[("fsType", "ext4")])
        .await
        .volume_id;
    let s = snapshot(&h, "s", &src).await.snapshot_id;
    for (name, mut req) in [
        ("r", from_snapshot("r", 320 * MIB, &s)),
        ("c", from_volume("c", 320 * MIB, &src)),
    ] {
        req.parameters.insert("fsType".into(), "xfs".into());
        let id = created_id(h.ctl.create_volume(Request::new(req)).await);
        let staging = h.path(&format!("s-{name}"));
        let before = (runs(f, "mkfs.xfs"), runs(f, "mkfs.ext4"));
        h.node
            .node_stage_volume(Request::new(stage_req(&id, &staging)))
            .await
            .unwrap();
        assert_eq!(
            (runs(f, "mkfs.xfs"), runs(f, "mkfs.ext4")),
            (before.0 + 1, before.1),
            "{name}: formatted as its own class says"
        );
        assert!(
            f.calls().iter().any(|c| matches!(c, Call::MountFs { target, fstype, .. } if target == &staging && fstype == "xfs")),
            "{name}"
        );
    }
    // A source that holds a filesystem keeps it whatever the class says
    // (`a_mount_without_fs_type_gets_the_filesystem_the_volume_holds`).
}

/// A block restore whose record says Ready but whose file was not moved to
/// its name yet (a kill between the two), the node's only file volume:
/// start-up counts the file as there and moves it. Before, the block root
/// looked empty of its recorded volumes and berth refused to start
/// (suggesting the storage was gone).
#[tokio::test]
async fn a_restore_not_moved_yet_is_there_at_start_up() {
    let h = fake(&["--kinds", "block"]);
    let src = create_p(&h, "src", MIB, &[]).await.volume_id;
    let snap = snapshot(&h, "s", &src).await.snapshot_id;
    delete(&h, &src).await;
    let r = created_id(
        h.ctl
            .create_volume(Request::new(from_snapshot("r", MIB, &snap)))
            .await,
    );
    let tmp = h.path("block").join(format!(".restoring-{r}.img"));
    std::fs::rename(img(&h, &r), &tmp).unwrap();
    let dir = h.stop();
    let (os, f) = berth::os::Os::fake();
    let h = build(dir, os, Some(f), &["--kinds", "block"]);
    assert!(img(&h, &r).is_file() && !tmp.exists());
    assert_eq!(h.driver.store.get(&r).unwrap().phase, Phase::Ready);
}

/// A local copy that fails after it was made (the sync of its directory
/// entry refused; before the snapshot's copy was made straight under its
/// temporary name, its move to that name) is removed with what it made: a
/// failed CreateSnapshot leaves nothing in `.snapshots/` (the temporary
/// copy was left for start-up to remove), and its retry succeeds.
#[tokio::test]
async fn a_failed_local_copy_leaves_nothing() {
    let h = fake(&[]);
    let src = create_p(&h, "src", MIB, &[]).await.volume_id;
    std::fs::write(vol_dir(&h, &src).join("data"), b"x").unwrap();
    let area = h.path("local/.snapshots");
    h.fake().fail_op_under("fsync", &area, libc::EIO);
    let e = h
        .ctl
        .create_snapshot(Request::new(snap_req("s", &src)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{e:?}");
    h.fake().clear_file_faults();
    let left: Vec<_> = std::fs::read_dir(&area)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    snapshot(&h, "s", &src).await;
}

/// The names of the temporary copies (`.partial-*`) in the directory `dir`.
fn partials_in(dir: &Path) -> Vec<std::ffi::OsString> {
    made_in(dir)
        .into_iter()
        .filter(|n| n.to_string_lossy().starts_with(".partial-"))
        .collect()
}

/// A block snapshot first looks for what an earlier try left under its
/// temporary name, through the OS layer (lstat: a symlink there is one);
/// a look that fails otherwise than ENOENT stops it with an error naming
/// the path, copying nothing (before, `Path::exists` read such a failure
/// as "nothing there" and the copy went on). The retry makes it.
#[tokio::test]
async fn a_failed_look_at_a_block_snapshots_temporary_copy_stops_it() {
    let h = fake(&["--kinds", "block"]);
    let src = create_p(&h, "src", MIB, &[]).await.volume_id;
    let area = h.path("block/.snapshots");
    h.fake().fail_op_under("lstat", &area, libc::EIO);
    let e = h
        .ctl
        .create_snapshot(Request::new(snap_req("s", &src)))
        .await
        .unwrap_err();
    h.fake().clear_file_faults();
    assert_eq!(e.code(), Code::Internal, "{e:?}");
    assert!(
        e.message().contains("looking at") && e.message().contains(".partial-"),
        "{e:?}"
    );
    assert!(
        !h.fake().file_ops().iter().any(|o| o.op == "copy"),
        "{:?}",
        h.fake().file_ops()
    );
    assert!(partials_in(&area).is_empty());
    assert!(snapshot(&h, "s", &src).await.ready_to_use);
}

/// A clone whose restore fails removes the unlisted snapshot it copied
/// its source to, once it sees it there (lstat through the OS layer). A
/// look that fails otherwise than ENOENT is a doubt: the copy is left and
/// said so, and start-up removes it (a temporary copy without a record);
/// before, `Path::exists` read that failure as "nothing there", silently.
/// Guard of the first half; the second fails where the look bypassed the
/// OS layer (the copy was removed whatever the fake said).
#[tokio::test]
async fn a_failed_clones_copy_is_removed_or_left_for_start_up() {
    let h = fake(&["--kinds", "block"]);
    let src = create_p(&h, "src", MIB, &[]).await.volume_id;
    let area = h.path("block/.snapshots");
    // Its move into place refused: the clone fails, its copy goes.
    h.fake().fail_op_under("rename", &area, libc::EIO);
    let clone = || {
        h.ctl
            .create_volume(Request::new(from_volume("c", MIB, &src)))
    };
    assert_eq!(code(clone().await), Code::Internal);
    h.fake().clear_file_faults();
    assert!(partials_in(&area).is_empty(), "{:?}", partials_in(&area));
    // Again, and the look at the copy after the failed move fails too.
    let held = h.fake().hold_op_under("rename", &area);
    let fault = async {
        for _ in 0..6000 {
            if held.reached() > 0 {
                h.fake().fail_op_under("rename", &area, libc::EIO);
                h.fake().fail_op_under("lstat", &area, libc::EIO);
                held.release();
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        held.release();
        panic!("the clone never reached its move");
    };
    let (r, ()) = tokio::join!(clone(), fault);
    h.fake().clear_file_faults();
    h.fake().clear_holds();
    assert_eq!(code(r), Code::Internal);
    assert_eq!(partials_in(&area).len(), 1, "{:?}", made_in(&area));
    let dir = h.stop();
    let (os, f) = berth::os::Os::fake();
    let h = build(dir, os, Some(f), &["--kinds", "block"]);
    assert!(partials_in(&area).is_empty(), "{:?}", made_in(&area));
    assert!(h.driver.store.get_by_name("c").is_none());
}

/// The stored copy of snapshot `id` of `kind`.
fn snap_copy(h: &Harness, kind: &str, id: &str) -> PathBuf {
    match kind {
        "local" => h.path("local/.snapshots").join(id),
        _ => h.path("block/.snapshots").join(format!("{id}.img")),
    }
}

/// A snapshot whose stored copy is gone (deleted by hand) or damaged (a
/// symlink in its place, a block file cut short) is not ready to use in
/// ListSnapshots, GetSnapshot and a repeated CreateSnapshot, as
/// CreateVolume from it is refused (the spec: ready_to_use is true once
/// the snapshot can be used as a volume source). Before, each said
/// ready_to_use: true. A whole copy stays ready; each listed snapshot's
/// copy is looked at once (one lstat through the OS layer), nothing more.
#[tokio::test]
async fn a_snapshot_whose_copy_is_gone_is_not_ready_to_use() {
    for kind in ["local", "block"] {
        let h = fake(&["--kinds", kind]);
        let src = create_p(&h, "src", MIB, &[]).await.volume_id;
        let gone = snapshot(&h, "gone", &src).await.snapshot_id;
        let linked = snapshot(&h, "linked", &src).await.snapshot_id;
        let whole = snapshot(&h, "whole", &src).await.snapshot_id;
        let copy = |id: &str| snap_copy(&h, kind, id);
        match kind {
            "local" => {
                std::fs::remove_dir_all(copy(&gone)).unwrap();
                std::fs::remove_dir_all(copy(&linked)).unwrap();
                std::os::unix::fs::symlink(vol_dir(&h, &src), copy(&linked)).unwrap();
            }
            _ => {
                std::fs::remove_file(copy(&gone)).unwrap();
                // Cut short.
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(copy(&linked))
                    .unwrap()
                    .set_len(4096)
                    .unwrap();
            }
        }
        let ready = |s: &csi::Snapshot| (s.snapshot_id.clone(), s.ready_to_use);
        let before = h.fake().lstats().len();
        let listed: Vec<_> = list(&h, Default::default())
            .await
            .entries
            .iter()
            .map(|e| ready(e.snapshot.as_ref().unwrap()))
            .collect();
        assert_eq!(
            listed,
            [
                (gone.clone(), false),
                (linked.clone(), false),
                (whole.clone(), true)
            ],
            "{kind}"
        );
        assert_eq!(h.fake().lstats().len() - before, 3, "{kind}");
        for (id, want) in [(&gone, false), (&linked, false), (&whole, true)] {
            let got = h
                .ctl
                .get_snapshot(Request::new(csi::GetSnapshotRequest {
                    snapshot_id: id.clone(),
                    ..Default::default()
                }))
                .await
                .unwrap()
                .into_inner()
                .snapshot
                .unwrap();
            assert_eq!(got.ready_to_use, want, "{kind} {id}");
            let name = h.driver.store.snapshot_get(id).unwrap().name;
            let again = snapshot(&h, &name, &src).await;
            assert_eq!((again.snapshot_id, again.ready_to_use), (id.clone(), want));
            let restored = h
                .ctl
                .create_volume(Request::new(from_snapshot(&format!("r-{name}"), MIB, id)))
                .await;
            let want_code = if want {
                Code::Ok
            } else {
                Code::FailedPrecondition
            };
            assert_eq!(code(restored), want_code, "{kind} {id}");
        }
        // Filtered by id, a page: the same answer.
        let one = list(
            &h,
            csi::ListSnapshotsRequest {
                snapshot_id: gone.clone(),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(one.entries.len(), 1);
        assert!(!one.entries[0].snapshot.as_ref().unwrap().ready_to_use);
    }
}

/// A local snapshot's copy is made straight under its temporary name,
/// `.snapshots/.partial-<id>`, never under a temporary of that
/// (`.partial-.partial-<id>`, as before); it moves to its name once its
/// record says Ready. Start-up removes every leftover of an interrupted
/// copy: the temporary of a snapshot still Creating, one without a
/// record, and one of the old double name; and a whole copy whose record
/// says Ready goes into place.
#[tokio::test]
async fn a_local_snapshot_is_copied_under_one_temporary_name() {
    let h = fake(&[]);
    let src = create_p(&h, "src", MIB, &[]).await.volume_id;
    std::fs::write(vol_dir(&h, &src).join("data"), b"v1").unwrap();
    let area = h.path("local/.snapshots");
    let ops_before = h.fake().file_ops().len();
    let done = snapshot(&h, "done", &src).await.snapshot_id;
    let partial = area.join(format!(".partial-{done}"));
    let ops: Vec<_> = h.fake().file_ops()[ops_before..].to_vec();
    let copies: Vec<_> = ops.iter().filter(|o| o.op == "copy").collect();
    assert_eq!(copies.len(), 1, "{ops:?}");
    assert_eq!(copies[0].path, partial, "{ops:?}");
    assert!(
        !ops.iter()
            .any(|o| o.path.to_string_lossy().contains(".partial-.partial-")),
        "{ops:?}"
    );
    assert_eq!(std::fs::read(area.join(&done).join("data")).unwrap(), b"v1");
    assert!(!partial.exists());

    // A snapshot whose record says Ready, its copy not moved yet (a crash
    // between the record and the move).
    let late = snapshot(&h, "late", &src).await.snapshot_id;
    let late_tmp = area.join(format!(".partial-{late}"));
    std::fs::rename(area.join(&late), &late_tmp).unwrap();
    // A copy interrupted under its temporary name (its record Creating).
    let cut = snapshot(&h, "cut", &src).await.snapshot_id;
    let mut r = h.driver.store.snapshot_get(&cut).unwrap();
    r.phase = Phase::Creating;
    h.driver.store.snapshot_put(&r).unwrap();
    let cut_tmp = area.join(format!(".partial-{cut}"));
    std::fs::rename(area.join(&cut), &cut_tmp).unwrap();
    // Leftovers of older versions: the temporary of a temporary, of that
    // snapshot and of one without a record.
    let old_cut = area.join(format!(".partial-.partial-{cut}"));
    let stray_id = "local-snap-0123456789abcdef0123456789abcdef";
    let old_stray = area.join(format!(".partial-.partial-{stray_id}"));
    let stray = area.join(format!(".partial-{stray_id}"));
    for d in [&old_cut, &old_stray, &stray] {
        std::fs::create_dir_all(d.join("half")).unwrap();
    }
    let (os, f) = berth::os::Os::fake();
    let h = h.restart(os, Some(f));
    for d in [&cut_tmp, &old_cut, &old_stray, &stray, &late_tmp] {
        assert!(!d.exists(), "{} left", d.display());
    }
    assert!(h.driver.store.snapshot_get(&cut).is_none());
    assert!(!area.join(&cut).exists());
    assert_eq!(std::fs::read(area.join(&late).join("data")).unwrap(), b"v1");
    let mut names: Vec<_> = std::fs::read_dir(&area)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut want = vec![done.clone(), late.clone()];
    want.sort();
    assert_eq!(names, want);
}

/// Whether the restored (or cloned) block volume `id` has its filesystem
/// grown at its next stage.
fn grow_pending(h: &Harness, id: &str) -> bool {
    h.driver
        .store
        .get(id)
        .expect("record")
        .block
        .expect("block info")
        .grow_fs
}

/// A block volume resized while no pod used it has its new size recorded
/// (ControllerExpandVolume) long before its file and filesystem grow (the
/// next stage's NodeExpandVolume). A snapshot taken meanwhile holds the
/// filesystem at the old size and says the new one (`size_bytes`, the
/// restoreSize Kubernetes asks a restore for). A restore or clone of that
/// size must grow the filesystem at its first stage, as a larger restore
/// does; so must a restore of a snapshot (or a clone) of a restored volume
/// whose growth has not happened yet. Before, the restore compared its size
/// with the source's recorded size only: no growth was ever due, no
/// NodeExpandVolume comes for a new claim, and the pod got a filesystem
/// of the old size in a volume of the new one for good.
#[tokio::test]
async fn a_restore_of_a_filesystem_smaller_than_its_snapshot_says_is_grown() {
    let h = fake(&["--kinds", "block"]);
    let f = h.fake();
    script_blank(f);
    let v = create_p(&h, "src", 8 * MIB, &[]).await.volume_id;
    let staging = h.path("staging");
    h.node
        .node_stage_volume(Request::new(stage_req(&v, &staging)))
        .await
        .unwrap();
    h.node
        .node_unstage_volume(Request::new(csi::NodeUnstageVolumeRequest {
            volume_id: v.clone(),
            staging_target_path: staging.display().to_string(),
        }))
        .await
        .unwrap();
    let grown = h
        .ctl
        .controller_expand_volume(Request::new(csi::ControllerExpandVolumeRequest {
            volume_id: v.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 16 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(grown.node_expansion_required);
    assert_eq!(
        std::fs::metadata(img(&h, &v)).unwrap().len(),
        8 * MIB as u64,
        "the file grows at the node's expansion"
    );
    let s = snapshot(&h, "s", &v).await;
    assert_eq!(s.size_bytes, 16 * MIB);
    let block = |name: &str, mut req: csi::CreateVolumeRequest| {
        req.name = name.into();
        req.parameters.insert("kind".into(), "block".into());
        req
    };
    let make = |req: csi::CreateVolumeRequest| async {
        h.ctl
            .create_volume(Request::new(req))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .volume_id
    };
    // Restored and cloned at the size the snapshot and the source say.
    let r = make(block("r", from_snapshot("", 16 * MIB, &s.snapshot_id))).await;
    assert!(grow_pending(&h, &r), "restore of the expansion window");
    let c = make(block("c", from_volume("", 16 * MIB, &v))).await;
    assert!(grow_pending(&h, &c), "clone of the expansion window");
    // From the restore, before its first stage grew it.
    let s2 = snapshot(&h, "s2", &r).await;
    let r2 = make(block("r2", from_snapshot("", 16 * MIB, &s2.snapshot_id))).await;
    assert!(grow_pending(&h, &r2), "restore of a restore not grown yet");
    let c2 = make(block("c2", from_volume("", 16 * MIB, &r))).await;
    assert!(grow_pending(&h, &c2), "clone of a restore not grown yet");
    // The first stage grows it, once.
    let before = runs(f, "resize2fs");
    h.node
        .node_stage_volume(Request::new(stage_req(&r2, &h.path("staging-r2"))))
        .await
        .unwrap();
    assert_eq!(runs(f, "resize2fs"), before + 1);
    assert!(!grow_pending(&h, &r2));
    // A restore of a whole, grown filesystem at its size is not grown.
    let grown_r2 = snapshot(&h, "s3", &r2).await;
    let r3 = make(block(
        "r3",
        from_snapshot("", 16 * MIB, &grown_r2.snapshot_id),
    ))
    .await;
    assert!(!grow_pending(&h, &r3));
}

/// The same for a thick volume, whose file ControllerExpandVolume grows
/// (allocates) at once while its filesystem waits for the node: a snapshot
/// taken in that window has a file as long as its size, and its restore
/// must still grow the filesystem at its first stage. The volume itself,
/// staged before any NodeExpandVolume, has its filesystem grown by that
/// stage; a NodeExpandVolume that grows it leaves nothing pending.
#[tokio::test]
async fn a_thick_expansion_window_restore_is_grown() {
    let h = fake(&["--kinds", "block"]);
    let f = h.fake();
    script_blank(f);
    let thick = [("allocation", "thick")];
    let v = create_p(&h, "src", 8 * MIB, &thick).await.volume_id;
    let staging = h.path("staging");
    let unstage = |id: &str, at: &std::path::Path| csi::NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: at.display().to_string(),
    };
    h.node
        .node_stage_volume(Request::new(stage_req(&v, &staging)))
        .await
        .unwrap();
    h.node
        .node_unstage_volume(Request::new(unstage(&v, &staging)))
        .await
        .unwrap();
    let expand = |id: &str, bytes: i64| csi::ControllerExpandVolumeRequest {
        volume_id: id.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        ..Default::default()
    };
    h.ctl
        .controller_expand_volume(Request::new(expand(&v, 16 * MIB)))
        .await
        .unwrap();
    assert_eq!(
        std::fs::metadata(img(&h, &v)).unwrap().len(),
        16 * MIB as u64,
        "a thick volume's growth is allocated by the controller"
    );
    assert!(grow_pending(&h, &v));
    let s = snapshot(&h, "s", &v).await;
    let mut req = from_snapshot("r", 16 * MIB, &s.snapshot_id);
    req.parameters.insert("kind".into(), "block".into());
    req.parameters.insert("allocation".into(), "thick".into());
    let r = h
        .ctl
        .create_volume(Request::new(req))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    assert!(grow_pending(&h, &r), "restore of the expansion window");
    // The volume's own next stage grows its filesystem, once.
    let before = runs(f, "resize2fs");
    h.node
        .node_stage_volume(Request::new(stage_req(&v, &staging)))
        .await
        .unwrap();
    assert_eq!(runs(f, "resize2fs"), before + 1);
    assert!(!grow_pending(&h, &v));
    // Expanded again while staged: NodeExpandVolume grows it and nothing
    // is left for the next stage.
    h.ctl
        .controller_expand_volume(Request::new(expand(&v, 24 * MIB)))
        .await
        .unwrap();
    assert!(grow_pending(&h, &v));
    h.node
        .node_expand_volume(Request::new(csi::NodeExpandVolumeRequest {
            volume_id: v.clone(),
            volume_path: staging.display().to_string(),
            staging_target_path: staging.display().to_string(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 24 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert_eq!(runs(f, "resize2fs"), before + 2);
    assert!(!grow_pending(&h, &v));
}

/// GetSnapshot looks at the snapshot's stored copy (whether it is ready to
/// use) on an operation's thread, never on the thread that reads and
/// answers every call: a local or block root whose disk stopped answering
/// holds up that GetSnapshot only. Before, the look ran in the handler
/// itself, and while it waited no other call (Probe, GetPluginInfo, any
/// node call) was answered.
#[tokio::test(flavor = "current_thread")]
async fn get_snapshot_never_waits_on_the_disk_in_the_thread_answering_calls() {
    use berth::csi::v1::identity_server::Identity;
    const HUNG: std::time::Duration = std::time::Duration::from_millis(1500);
    for kind in ["local", "block"] {
        let h = fake(&["--kinds", kind]);
        let src = create_p(&h, "src", MIB, &[]).await.volume_id;
        let s = snapshot(&h, "s", &src).await.snapshot_id;
        h.fake()
            .set_lstat_delay(&snap_copy(&h, kind, &s), Some(HUNG));
        let start = std::time::Instant::now();
        let get = h.ctl.get_snapshot(Request::new(csi::GetSnapshotRequest {
            snapshot_id: s.clone(),
            ..Default::default()
        }));
        let other = async {
            h.ident
                .get_plugin_info(Request::new(csi::GetPluginInfoRequest {}))
                .await
                .expect("plugin info");
            start.elapsed()
        };
        let (got, answered_after) = tokio::join!(get, other);
        let got = got.expect("get snapshot").into_inner().snapshot.unwrap();
        assert!(got.ready_to_use, "{kind}");
        assert!(
            start.elapsed() >= HUNG,
            "{kind}: the copy was looked at (through the OS layer)"
        );
        assert!(
            answered_after < HUNG / 2,
            "{kind}: another call waited {answered_after:?} for GetSnapshot's look at the disk"
        );
    }
}

/// A local volume in use is not frozen for its snapshot or clone: its files
/// are copied as they are when the copy reaches them, and one the pod
/// removed before then (a temporary file, a rotated log) is not in the
/// copy, as if it had been removed before the copy began. Before, the
/// first such file failed the whole copy (`stat ...: No such file or
/// directory`), so a volume whose pod kept making and removing files was
/// refused snapshot after snapshot.
#[tokio::test]
async fn a_file_removed_while_a_local_volume_is_copied_is_left_out() {
    const FILES: usize = 3000;
    let h = fake(&[]);
    let src = create_p(&h, "src", 64 * MIB, &[]).await.volume_id;
    let dir = vol_dir(&h, &src);
    std::fs::create_dir(dir.join("kept")).unwrap();
    std::fs::write(dir.join("kept/data"), b"stays").unwrap();
    for (i, area) in [".snapshots", ".creating"].into_iter().enumerate() {
        let tmp = dir.join("tmp");
        std::fs::create_dir(&tmp).unwrap();
        for n in 0..FILES {
            std::fs::write(tmp.join(format!("{n:05}")), n.to_string()).unwrap();
        }
        // The pod removes its temporary files from the last one on, once
        // the copy has begun; then the directory itself.
        let (watch, pod_tmp) = (h.path("local").join(area), tmp.clone());
        let pod = std::thread::spawn(move || {
            let copying = |d: std::fs::ReadDir| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with(".partial-"))
            };
            while !std::fs::read_dir(&watch).is_ok_and(copying) {
                std::thread::yield_now();
            }
            for n in (0..FILES).rev() {
                let _ = std::fs::remove_file(pod_tmp.join(format!("{n:05}")));
            }
            let _ = std::fs::remove_dir(&pod_tmp);
        });
        let copy = if i == 0 {
            let s = h
                .ctl
                .create_snapshot(Request::new(snap_req("s", &src)))
                .await
                .map(|r| r.into_inner().snapshot.unwrap().snapshot_id);
            s.map(|id| h.path("local/.snapshots").join(id))
        } else {
            h.ctl
                .create_volume(Request::new(from_volume("clone", 64 * MIB, &src)))
                .await
                .map(|r| vol_dir(&h, &r.into_inner().volume.unwrap().volume_id))
        };
        pod.join().unwrap();
        let copy = copy.unwrap_or_else(|e| panic!("{area}: {e:?}"));
        assert_eq!(std::fs::read(copy.join("kept/data")).unwrap(), b"stays");
        // What was copied of the rest is whole.
        if let Ok(d) = std::fs::read_dir(copy.join("tmp")) {
            for e in d.flatten() {
                let n: usize = e.file_name().to_str().unwrap().parse().unwrap();
                assert_eq!(std::fs::read(e.path()).unwrap(), n.to_string().as_bytes());
            }
        }
    }
}

/// The symlinks `populate_hostile` makes (target, name): out of the
/// volume to /etc, to the volume `neighbour` and the snapshot area beside
/// it, up past the root, and loops.
fn hostile_links(neighbour: &str) -> [(String, &'static str); 8] {
    [
        ("/etc".into(), "etc"),
        ("/etc/passwd".into(), "passwd"),
        (format!("../{neighbour}"), "neighbour"),
        ("../.snapshots".into(), "snapshots"),
        ("../../../../../../../../..".into(), "up"),
        ("loop2".into(), "loop1"),
        ("loop1".into(), "loop2"),
        ("self".into(), "self"),
    ]
}

/// What a tenant can put in its local volume to reach outside it or to
/// stop berth: symlinks out of it (absolute, to /etc, `../` to another
/// volume, to the snapshot area, up past the root), symlink loops, hard
/// links, a FIFO (opening it for reading would block for ever), a socket
/// being listened on, a device node (where this process may make one), a
/// file and a directory of mode 000, extended attributes. Whether it
/// could make the device node, and set the extended attribute.
fn populate_hostile(dir: &Path, neighbour: &str) -> (bool, bool) {
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    use std::os::unix::fs::{symlink, PermissionsExt};
    for (target, name) in hostile_links(neighbour) {
        symlink(target, dir.join(name)).unwrap();
    }
    std::fs::write(dir.join("f"), b"linked").unwrap();
    std::fs::hard_link(dir.join("f"), dir.join("f2")).unwrap();
    nix::unistd::mkfifo(&dir.join("fifo"), Mode::from_bits_truncate(0o644)).unwrap();
    std::fs::write(dir.join("unreadable"), b"no one may read").unwrap();
    std::fs::set_permissions(dir.join("unreadable"), PermissionsExt::from_mode(0o000)).unwrap();
    std::fs::create_dir(dir.join("closed")).unwrap();
    std::fs::write(dir.join("closed/inside"), b"behind mode 000").unwrap();
    std::fs::set_permissions(dir.join("closed"), PermissionsExt::from_mode(0o000)).unwrap();
    let xattrs = xattr::set(dir.join("f"), "user.tenant", b"kept").is_ok();
    let device = mknod(
        &dir.join("null"),
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        makedev(1, 3),
    )
    .is_ok();
    (device, xattrs)
}

/// `copy` holds what `populate_hostile` made (with its device node and
/// extended attribute where it could make them), every symlink a symlink
/// with its target, nothing followed.
fn check_hostile_copy(copy: &Path, neighbour: &str, (device, xattrs): (bool, bool)) {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = |n: &str| {
        std::fs::symlink_metadata(copy.join(n))
            .unwrap_or_else(|e| panic!("{}: {e}", copy.join(n).display()))
    };
    for (target, name) in hostile_links(neighbour) {
        assert!(m(name).file_type().is_symlink(), "{name}: followed");
        assert_eq!(
            std::fs::read_link(copy.join(name)).unwrap(),
            Path::new(&target),
            "{name}"
        );
    }
    assert_eq!(m("f").ino(), m("f2").ino(), "one inode stays one inode");
    assert_eq!(std::fs::read(copy.join("f2")).unwrap(), b"linked");
    assert!(m("fifo").file_type().is_fifo());
    assert_eq!(m("unreadable").mode() & 0o7777, 0);
    assert_eq!(
        std::fs::read(copy.join("unreadable")).unwrap(),
        b"no one may read"
    );
    assert_eq!(m("closed").mode() & 0o7777, 0);
    assert_eq!(
        std::fs::read(copy.join("closed/inside")).unwrap(),
        b"behind mode 000"
    );
    if xattrs {
        assert_eq!(
            xattr::get(copy.join("f"), "user.tenant")
                .unwrap()
                .as_deref(),
            Some(&b"kept"[..])
        );
    }
    if device {
        assert!(m("null").file_type().is_char_device());
        assert_eq!(m("null").rdev(), nix::sys::stat::makedev(1, 3));
    }
}

/// A tenant's hostile local volume (`populate_hostile`) is snapshotted,
/// restored and cloned as it is (guard: nothing of it is followed,
/// opened, or left out, and no FIFO holds a copy up: each call is bounded
/// in time), and deleting it, its snapshot and copies removes only them:
/// another volume, its snapshot, and what the symlinks point to stay.
#[tokio::test]
async fn a_hostile_local_volume_is_copied_as_it_is_and_deleted_without_reaching_out() {
    fn answer<T>(
        what: &str,
        r: Result<Result<tonic::Response<T>, tonic::Status>, tokio::time::error::Elapsed>,
    ) -> T {
        r.unwrap_or_else(|_| panic!("{what} did not answer in 60 s: blocked?"))
            .unwrap_or_else(|e| panic!("{what}: {e:?}"))
            .into_inner()
    }
    let secs = std::time::Duration::from_secs(60);
    let h = fake(&[]);
    let other = create_p(&h, "other", MIB, &[]).await.volume_id;
    std::fs::write(vol_dir(&h, &other).join("secret"), b"the neighbour's").unwrap();
    let other_snap = snapshot(&h, "other-s", &other).await.snapshot_id;
    let other_copy = h.path("local/.snapshots").join(&other_snap);
    let a = create_p(&h, "hostile", 64 * MIB, &[]).await.volume_id;
    let dir = vol_dir(&h, &a);
    let made = populate_hostile(&dir, &other);
    let listening = std::os::unix::net::UnixListener::bind(dir.join("sock")).unwrap();
    let s = answer(
        "CreateSnapshot",
        tokio::time::timeout(secs, h.ctl.create_snapshot(Request::new(snap_req("s", &a)))).await,
    );
    let s = s.snapshot.unwrap().snapshot_id;
    let mut new_ids = Vec::new();
    for (what, req) in [
        (
            "CreateVolume from the snapshot",
            from_snapshot("r", 64 * MIB, &s),
        ),
        (
            "CreateVolume from the volume",
            from_volume("c", 64 * MIB, &a),
        ),
    ] {
        let v = answer(
            what,
            tokio::time::timeout(secs, h.ctl.create_volume(Request::new(req))).await,
        );
        new_ids.push(v.volume.unwrap().volume_id);
    }
    let (r, c) = (new_ids[0].clone(), new_ids[1].clone());
    for copy in [
        h.path("local/.snapshots").join(&s),
        vol_dir(&h, &r),
        vol_dir(&h, &c),
    ] {
        check_hostile_copy(&copy, &other, made);
        use std::os::unix::fs::FileTypeExt;
        assert!(std::fs::symlink_metadata(copy.join("sock"))
            .unwrap()
            .file_type()
            .is_socket());
    }
    drop(listening);
    for v in [&a, &r, &c] {
        delete(&h, v).await;
        assert!(std::fs::symlink_metadata(vol_dir(&h, v)).is_err(), "{v}");
    }
    delete_snapshot(&h, &s).await.unwrap();
    // Whatever is left in the trash goes on the background thread.
    let trash = h.path("local/.trash");
    let deadline = std::time::Instant::now() + secs;
    while std::fs::read_dir(&trash).is_ok_and(|mut d| d.next().is_some()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the trash was not emptied"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(!h.path("local/.snapshots").join(&s).exists());
    assert_eq!(
        std::fs::read(vol_dir(&h, &other).join("secret")).unwrap(),
        b"the neighbour's"
    );
    assert_eq!(
        std::fs::read(other_copy.join("secret")).unwrap(),
        b"the neighbour's"
    );
    assert!(Path::new("/etc/passwd").is_file());
}

/// A local volume whose tenant made a directory tree deeper than any path
/// (one relative mkdir after another) cannot be copied whole (the copy's
/// paths would pass PATH_MAX): its snapshot fails with what happened,
/// leaves nothing, and berth goes on (the copy takes no stack frame per
/// level it could overflow, nor does the free-space walk before it: both
/// stop at the longest path). 50,000 levels, as a tenant can make.
#[tokio::test]
async fn a_local_volume_deeper_than_any_path_fails_its_snapshot_cleanly() {
    use nix::fcntl::{open, openat, OFlag};
    use nix::sys::stat::{mkdirat, Mode};
    let h = fake(&[]);
    let src = create_p(&h, "src", MIB, &[]).await.volume_id;
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let mut fd = open(&vol_dir(&h, &src), flags, Mode::empty()).unwrap();
    for _ in 0..50_000 {
        mkdirat(&fd, "d", Mode::from_bits_truncate(0o755)).unwrap();
        fd = openat(&fd, "d", flags, Mode::empty()).unwrap();
    }
    drop(fd);
    let e = h
        .ctl
        .create_snapshot(Request::new(snap_req("s", &src)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{e:?}");
    assert!(e.message().contains("File name too long"), "{e:?}");
    let left: Vec<_> = std::fs::read_dir(h.path("local/.snapshots"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    assert!(h.driver.store.snapshot_by_name("s").is_none());
    // The volume goes too (its tree removed level by level).
    delete(&h, &src).await;
}

/// Paging across a restart: a starting_token of the old process still
/// means the same place for the snapshots and volumes that existed before
/// and after (nothing skipped, nothing repeated), or, once it lies past
/// everything left (the last entries deleted, so their sequence numbers
/// are free again after the restart), is ABORTED. A token that was never
/// handed out (huge, negative, not digits, 129 bytes and more) is ABORTED
/// and changes nothing.
#[tokio::test]
async fn paging_tokens_keep_their_place_across_a_restart() {
    let h = fake(&[]);
    let a = create_p(&h, "a", MIB, &[]).await.volume_id;
    let mut snaps = Vec::new();
    let mut vols = vec![a.clone()];
    for i in 0..6 {
        snaps.push(snapshot(&h, &format!("s{i}"), &a).await.snapshot_id);
        vols.push(create_p(&h, &format!("v{i}"), MIB, &[]).await.volume_id);
    }
    let snap_page = |token: &str, max: i32| csi::ListSnapshotsRequest {
        max_entries: max,
        starting_token: token.into(),
        ..Default::default()
    };
    let vol_page = |token: &str, max: i32| csi::ListVolumesRequest {
        max_entries: max,
        starting_token: token.into(),
    };
    let vol_ids = |r: &csi::ListVolumesResponse| -> Vec<String> {
        r.entries
            .iter()
            .map(|e| e.volume.as_ref().unwrap().volume_id.clone())
            .collect()
    };
    let s1 = list(&h, snap_page("", 2)).await;
    assert_eq!(ids(&s1), snaps[..2]);
    let s_far = list(&h, snap_page("", 5)).await;
    assert_eq!(ids(&s_far), snaps[..5]);
    let v1 = h
        .ctl
        .list_volumes(Request::new(vol_page("", 2)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vol_ids(&v1), vols[..2]);
    let v_far = h
        .ctl
        .list_volumes(Request::new(vol_page("", 6)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vol_ids(&v_far), vols[..6]);
    // The last entry of each first page goes (its token stays a place),
    // and the last two of each: the far tokens lie past what is left.
    for s in snaps[4..].iter().chain([&snaps[1]]) {
        delete_snapshot(&h, s).await.unwrap();
    }
    for v in vols[5..].iter().chain([&vols[1]]) {
        h.ctl
            .delete_volume(Request::new(csi::DeleteVolumeRequest {
                volume_id: v.clone(),
                ..Default::default()
            }))
            .await
            .unwrap();
    }
    let (os, f) = berth::os::Os::fake();
    let h = h.restart(os, Some(f));
    // The rest of each walk, from the old process's token.
    let s2 = list(&h, snap_page(&s1.next_token, 0)).await;
    assert_eq!(ids(&s2), snaps[2..4]);
    let v2 = h
        .ctl
        .list_volumes(Request::new(vol_page(&v1.next_token, 0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vol_ids(&v2), vols[2..5]);
    async fn s_code(h: &Harness, t: String) -> Code {
        let req = csi::ListSnapshotsRequest {
            starting_token: t,
            ..Default::default()
        };
        code(h.ctl.list_snapshots(Request::new(req)).await)
    }
    async fn v_code(h: &Harness, t: String) -> Code {
        let req = csi::ListVolumesRequest {
            starting_token: t,
            ..Default::default()
        };
        code(h.ctl.list_volumes(Request::new(req)).await)
    }
    assert_eq!(s_code(&h, s_far.next_token.clone()).await, Code::Aborted);
    assert_eq!(v_code(&h, v_far.next_token.clone()).await, Code::Aborted);
    // Tokens never handed out.
    let hostile = [
        u64::MAX.to_string(),
        "18446744073709551616".to_string(),
        "99999999999999999999999999".to_string(),
        "-1".to_string(),
        "-0".to_string(),
        "0".to_string(),
        "abc".to_string(),
        "1e3".to_string(),
        "1 ".to_string(),
        "\u{0661}".to_string(),
        "1".repeat(129),
        "9".repeat(4096),
        "0".repeat(128) + "1",
    ];
    let before = (
        ids(&list(&h, snap_page("", 0)).await),
        vol_ids(
            &h.ctl
                .list_volumes(Request::new(vol_page("", 0)))
                .await
                .unwrap()
                .into_inner(),
        ),
    );
    for t in &hostile {
        assert_eq!(s_code(&h, t.clone()).await, Code::Aborted, "{t:?}");
        assert_eq!(v_code(&h, t.clone()).await, Code::Aborted, "{t:?}");
    }
    let after = (
        ids(&list(&h, snap_page("", 0)).await),
        vol_ids(
            &h.ctl
                .list_volumes(Request::new(vol_page("", 0)))
                .await
                .unwrap()
                .into_inner(),
        ),
    );
    assert_eq!(before, after);
    let left = |all: &[String], gone: usize, end: usize| -> Vec<String> {
        (0..end)
            .filter(|&i| i != gone)
            .map(|i| all[i].clone())
            .collect()
    };
    assert_eq!(after, (left(&snaps, 1, 4), left(&vols, 1, 5)));
}

/// DeleteSnapshot of a snapshot whose stored copy an operator replaced by
/// hand (a symlink, a regular file or a FIFO where a local snapshot's
/// directory belongs; a directory, with something in it, or a FIFO where a
/// block snapshot's file belongs) or removed succeeds, twice, and leaves
/// nothing at the copy's name: the entry itself is unlinked (never what a
/// symlink points to), and a directory in place of a block snapshot's
/// file, which Berth never makes and whose contents are not Berth's, is
/// kept aside in `.orphaned/`, never deleted. Before, the local ones but
/// the symlink failed (`remove tree ...: Not a directory`), and the block
/// directory failed (`unlink ...: Is a directory`), on every retry: the
/// VolumeSnapshotContent could never be deleted.
#[tokio::test]
async fn a_damaged_snapshot_copy_is_deleted_without_following_it() {
    for kind in ["local", "block"] {
        let h = fake(&["--kinds", kind]);
        if kind == "block" {
            script_blank(h.fake());
        }
        let src = create_p(&h, "src", MIB, &[]).await.volume_id;
        // What a symlink leads to, outside Berth's directories.
        let outside = h.path("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), b"not berth's").unwrap();
        let hows: &[&str] = match kind {
            "local" => &["symlink", "file", "fifo", "gone"],
            _ => &["symlink", "dir", "fifo", "gone"],
        };
        let mut damaged = Vec::new();
        for how in hows {
            let id = snapshot(&h, how, &src).await.snapshot_id;
            let p = snap_copy(&h, kind, &id);
            match kind {
                "local" => std::fs::remove_dir_all(&p).unwrap(),
                _ => std::fs::remove_file(&p).unwrap(),
            }
            match *how {
                "symlink" => std::os::unix::fs::symlink(&outside, &p).unwrap(),
                "file" => std::fs::write(&p, b"by hand").unwrap(),
                "dir" => {
                    std::fs::create_dir(&p).unwrap();
                    std::fs::write(p.join("inside"), b"by hand").unwrap();
                }
                "fifo" => nix::unistd::mkfifo(&p, nix::sys::stat::Mode::S_IRWXU).unwrap(),
                _ => {}
            }
            damaged.push((how, id, p));
        }
        for (how, id, p) in &damaged {
            for attempt in 0..2 {
                let r = h
                    .ctl
                    .delete_snapshot(Request::new(csi::DeleteSnapshotRequest {
                        snapshot_id: id.clone(),
                        ..Default::default()
                    }))
                    .await;
                assert!(r.is_ok(), "{kind} {how} attempt {attempt}: {r:?}");
            }
            assert!(h.driver.store.snapshot_get(id).is_none(), "{kind} {how}");
            assert!(
                std::fs::symlink_metadata(p).is_err(),
                "{kind} {how}: something left at {}",
                p.display()
            );
        }
        assert_eq!(
            std::fs::read(outside.join("keep")).unwrap(),
            b"not berth's",
            "{kind}"
        );
        if kind == "block" {
            let aside = h.path("block/.orphaned");
            let kept: Vec<_> = std::fs::read_dir(&aside)
                .unwrap()
                .map(|e| e.unwrap().path().join("inside"))
                .collect();
            assert_eq!(kept.len(), 1, "{kept:?}");
            assert_eq!(std::fs::read(&kept[0]).unwrap(), b"by hand");
        }
        let (ok, text) = state_check(&h);
        assert!(ok, "{kind}: {text}");
    }
}

/// A root's `.snapshots` replaced by a symlink (the copies moved
/// elsewhere by hand) is not Berth's directory, as start-up and
/// CreateSnapshot already treat it: a restore from a snapshot there is
/// FAILED_PRECONDITION, nothing created, and DeleteSnapshot is
/// FAILED_PRECONDITION naming it, with nothing it leads to removed; once
/// the directory is back, DeleteSnapshot removes the copy. Before, the
/// restore copied what the symlink led to and DeleteSnapshot removed it,
/// outside Berth's directories.
#[tokio::test]
async fn a_snapshots_directory_replaced_by_a_symlink_is_never_followed() {
    for kind in ["local", "block"] {
        let h = fake(&["--kinds", kind]);
        if kind == "block" {
            script_blank(h.fake());
        }
        let src = create_p(&h, "src", MIB, &[]).await.volume_id;
        let s = snapshot(&h, "s", &src).await.snapshot_id;
        let area = h.path(kind).join(".snapshots");
        let elsewhere = h.path("elsewhere");
        std::fs::rename(&area, &elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &area).unwrap();
        let copy = snap_copy(&h, kind, &s);
        let moved = elsewhere.join(copy.file_name().unwrap());
        assert!(std::fs::symlink_metadata(&moved).is_ok());
        let before = made_in(&h.path(kind));
        let e = h
            .ctl
            .create_volume(Request::new(from_snapshot("r", MIB, &s)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{kind}: {e:?}");
        assert!(e.message().contains(".snapshots"), "{kind}: {e:?}");
        assert!(h.driver.store.get_by_name("r").is_none(), "{kind}");
        assert_eq!(made_in(&h.path(kind)), before, "{kind}");
        let del = || {
            h.ctl
                .delete_snapshot(Request::new(csi::DeleteSnapshotRequest {
                    snapshot_id: s.clone(),
                    ..Default::default()
                }))
        };
        let e = del().await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{kind}: {e:?}");
        assert!(e.message().contains(".snapshots"), "{kind}: {e:?}");
        assert!(
            std::fs::symlink_metadata(&moved).is_ok(),
            "{kind}: removed outside Berth's directories"
        );
        // Put back by hand: deleted as usual.
        std::fs::remove_file(&area).unwrap();
        std::fs::rename(&elsewhere, &area).unwrap();
        del().await.unwrap();
        assert!(h.driver.store.snapshot_get(&s).is_none(), "{kind}");
        assert!(std::fs::symlink_metadata(&copy).is_err(), "{kind}");
    }
}

/// Calls on other ids that touch the data a copy reads wait for it
/// (ABORTED; the CO retries), made deterministic by holding the copy: while
/// CreateSnapshot copies a volume, DeleteVolume, ControllerExpandVolume
/// and a clone of it; while a restore copies a snapshot, DeleteSnapshot.
/// A second restore of that snapshot copies beside the first (restores
/// only read it; before, it was ABORTED until the first was done, and a
/// CO restoring many volumes from one snapshot made them one at a time,
/// each after its retries' back-off). Nothing is lost or left behind: the
/// snapshot and the restores hold the data as it was, and once the copies
/// are done every one of those calls succeeds.
#[tokio::test]
async fn calls_on_the_data_a_copy_reads_wait_for_it() {
    let h = fake(&[]);
    let src = create_p(&h, "src", MIB, &[]).await.volume_id;
    std::fs::write(vol_dir(&h, &src).join("data"), b"v1").unwrap();
    let reached = |held: &std::sync::Arc<berth::os::fake::OpHold>| {
        let held = held.clone();
        async move {
            for _ in 0..6000 {
                if held.reached() > 0 {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            panic!("the copy never started");
        }
    };
    // A call that waits on the held copy instead of answering ABORTED
    // lets it go (no hang) and counts as DEADLINE_EXCEEDED.
    async fn soon<T: std::fmt::Debug>(
        held: &berth::os::fake::OpHold,
        call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Code {
        match tokio::time::timeout(std::time::Duration::from_secs(20), call).await {
            Ok(r) => code(r),
            Err(_) => {
                held.release();
                Code::DeadlineExceeded
            }
        }
    }
    let del_vol = |id: &str| {
        h.ctl.delete_volume(Request::new(csi::DeleteVolumeRequest {
            volume_id: id.into(),
            ..Default::default()
        }))
    };
    let del_snap = |id: &str| {
        h.ctl
            .delete_snapshot(Request::new(csi::DeleteSnapshotRequest {
                snapshot_id: id.into(),
                ..Default::default()
            }))
    };
    let held = h.fake().hold_op_under("copy", &h.path("local/.snapshots"));
    let others = async {
        reached(&held).await;
        let expand =
            h.ctl
                .controller_expand_volume(Request::new(csi::ControllerExpandVolumeRequest {
                    volume_id: src.clone(),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: 2 * MIB,
                        limit_bytes: 0,
                    }),
                    ..Default::default()
                }));
        let clone = h
            .ctl
            .create_volume(Request::new(from_volume("c", MIB, &src)));
        let codes = [
            soon(&held, del_vol(&src)).await,
            soon(&held, expand).await,
            soon(&held, clone).await,
        ];
        held.release();
        codes
    };
    let (snap, codes) = tokio::join!(
        h.ctl.create_snapshot(Request::new(snap_req("s", &src))),
        others
    );
    assert_eq!(codes, [Code::Aborted; 3]);
    let s = snap.unwrap().into_inner().snapshot.unwrap();
    assert!(s.ready_to_use);
    let held = h.fake().hold_op_under("copy", &h.path("local/.creating"));
    let others = async {
        reached(&held).await;
        let second = h
            .ctl
            .create_volume(Request::new(from_snapshot("r2", MIB, &s.snapshot_id)));
        let meanwhile = async {
            // The second restore's copy is held beside the first's.
            for _ in 0..500 {
                if held.reached() > 1 {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            let both = held.reached() > 1;
            let deleted = soon(&held, del_snap(&s.snapshot_id)).await;
            held.release();
            (both, deleted)
        };
        let (second, (both, deleted)) = tokio::join!(second, meanwhile);
        (second.map(|_| ()), both, deleted)
    };
    let (r1, (second, both, deleted)) = tokio::join!(
        h.ctl
            .create_volume(Request::new(from_snapshot("r1", MIB, &s.snapshot_id))),
        others
    );
    assert_eq!(deleted, Code::Aborted);
    assert!(
        both,
        "a second restore of the snapshot copies beside the first: {second:?}"
    );
    second.expect("the second restore");
    let r1 = r1.unwrap().into_inner().volume.unwrap().volume_id;
    // Once the copies are done: every call succeeds, nothing lost.
    let r2 = h
        .ctl
        .create_volume(Request::new(from_snapshot("r2", MIB, &s.snapshot_id)))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    del_snap(&s.snapshot_id).await.unwrap();
    del_vol(&src).await.unwrap();
    for r in [&r1, &r2] {
        assert_eq!(std::fs::read(vol_dir(&h, r).join("data")).unwrap(), b"v1");
    }
    assert!(h.driver.store.snapshot_get(&s.snapshot_id).is_none());
    assert_eq!(
        std::fs::read_dir(h.path("local/.snapshots"))
            .unwrap()
            .count(),
        0,
        "a copy left behind"
    );
    let (ok, text) = state_check(&h);
    assert!(ok, "{text}");
}

/// A thick volume expanded while unstaged has its ext4 grown at its next
/// stage, offline where the kernel refuses the online resize (no
/// CAP_SYS_RESOURCE). An offline resize2fs stopped midway (killed at its
/// 30-minute deadline, or with berth, whose commands die with it) leaves
/// errors `e2fsck -p` does not fix, and the volume could not be staged
/// again without a repair by hand. So resize2fs saves what it changes in an
/// undo file (`-z`), and the retry puts that back (`e2undo`) before the
/// filesystem is mounted, then grows it again; the undo file goes once the
/// resize has finished. Before, resize2fs saved nothing and the retry
/// mounted the half-grown filesystem.
#[tokio::test]
async fn an_offline_growth_stopped_midway_is_undone_before_the_retry_mounts() {
    let h = fake(&["--kinds", "block"]);
    let f = h.fake();
    script_blank(f);
    f.respond("e2undo", |_| out(0, ""));
    let v = create_p(&h, "src", 8 * MIB, &[("allocation", "thick")])
        .await
        .volume_id;
    let staging = h.path("staging");
    let unstage = csi::NodeUnstageVolumeRequest {
        volume_id: v.clone(),
        staging_target_path: staging.display().to_string(),
    };
    h.node
        .node_stage_volume(Request::new(stage_req(&v, &staging)))
        .await
        .unwrap();
    h.node
        .node_unstage_volume(Request::new(unstage.clone()))
        .await
        .unwrap();
    h.ctl
        .controller_expand_volume(Request::new(csi::ControllerExpandVolumeRequest {
            volume_id: v.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 16 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert!(grow_pending(&h, &v));
    let undo = h.path("block").join(format!("{v}.e2undo"));
    // Online refused; offline killed midway, having written its undo file.
    let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let calls = n.clone();
    let left = undo.clone();
    f.respond("resize2fs", move |args| {
        match calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
            0 | 2 => Ok(berth::os::CmdOutput {
                code: Some(1),
                stdout: String::new(),
                stderr: "resize2fs: Permission denied to resize filesystem".into(),
            }),
            1 => {
                if args.iter().any(|a| a == "-z") {
                    std::fs::write(&left, b"undo").unwrap();
                }
                Ok(berth::os::CmdOutput {
                    code: None,
                    stdout: String::new(),
                    stderr: String::new(),
                })
            }
            _ => out(0, ""),
        }
    });
    let e = h
        .node
        .node_stage_volume(Request::new(stage_req(&v, &staging)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{e:?}");
    let offline: Vec<Vec<String>> = f
        .calls()
        .iter()
        .filter_map(|c| match c {
            Call::Run { program, args } if program == "resize2fs" && args.len() > 2 => {
                Some(args.clone())
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        offline.last().map(|a| a[..2].to_vec()),
        Some(vec!["-z".to_string(), undo.display().to_string()]),
        "the offline resize saves what it changes: {offline:?}"
    );
    assert!(undo.exists(), "left by the resize that was stopped");
    assert!(grow_pending(&h, &v));
    f.clear_calls();
    h.node
        .node_stage_volume(Request::new(stage_req(&v, &staging)))
        .await
        .unwrap();
    let order: Vec<String> = f
        .calls()
        .iter()
        .filter_map(|c| match c {
            Call::Run { program, args } if program == "e2undo" => {
                assert_eq!(
                    args.iter().rev().nth(1).map(String::as_str),
                    Some(undo.to_str().unwrap()),
                    "{args:?}"
                );
                Some("e2undo".to_string())
            }
            Call::Run { program, .. } if program == "e2fsck" || program == "resize2fs" => {
                Some(program.clone())
            }
            Call::MountFs { .. } => Some("mount".into()),
            Call::Unmount { .. } => Some("unmount".into()),
            _ => None,
        })
        .collect();
    assert_eq!(
        order,
        [
            "e2undo",
            "mount",
            "resize2fs",
            "unmount",
            "e2fsck",
            "resize2fs",
            "mount"
        ],
        "put back before anything mounts it, then grown again"
    );
    assert!(!undo.exists(), "removed once the resize finished");
    assert!(!grow_pending(&h, &v));
    // A resize that finished leaves nothing to put back.
    h.node
        .node_unstage_volume(Request::new(unstage))
        .await
        .unwrap();
    f.clear_calls();
    h.node
        .node_stage_volume(Request::new(stage_req(&v, &staging)))
        .await
        .unwrap();
    assert_eq!(runs(f, "e2undo"), 0);
}

/// Whether ListSnapshots (by id: listed once) and GetSnapshot answer the
/// snapshot `s` ready to use.
async fn ready(h: &Harness, s: &str) -> (bool, bool) {
    let listed = h
        .ctl
        .list_snapshots(Request::new(csi::ListSnapshotsRequest {
            snapshot_id: s.into(),
            ..Default::default()
        }))
        .await
        .expect("list")
        .into_inner()
        .entries;
    assert_eq!(listed.len(), 1, "{listed:?}");
    let got = h
        .ctl
        .get_snapshot(Request::new(csi::GetSnapshotRequest {
            snapshot_id: s.into(),
            ..Default::default()
        }))
        .await
        .expect("get")
        .into_inner()
        .snapshot
        .unwrap();
    let l = listed[0].snapshot.clone().unwrap();
    (l.ready_to_use, got.ready_to_use)
}

/// A snapshot recorded here whose kind was taken out of `--kinds` is still
/// listed (ListSnapshots, GetSnapshot) but not ready to use: CreateVolume
/// from it is refused until its kind is served again, when it is ready
/// again. Before, both answered it ready to use, as for a served one.
#[tokio::test]
async fn a_snapshot_of_a_kind_no_longer_served_is_listed_not_ready() {
    let h = fake(&[]);
    let id = create_p(&h, "a", MIB, &[]).await.volume_id;
    let s = snapshot(&h, "s", &id).await.snapshot_id;
    assert_eq!(ready(&h, &s).await, (true, true));
    let h = build(
        h.stop(),
        berth::os::Os::fake().0,
        None,
        &["--kinds", "block"],
    );
    assert_eq!(ready(&h, &s).await, (false, false));
    let h = build(h.stop(), berth::os::Os::fake().0, None, &[]);
    assert_eq!(ready(&h, &s).await, (true, true));
}

/// A block restore or clone a crash interrupted (its record still
/// Creating, its whole copy under `.restoring-<id>.img`) whose rollback at start-up
/// fails (the copy cannot be removed): its copy is never moved to the
/// volume's name (it was never handed out), and the next retry, once the
/// filesystem works again, removes it with its record. Before, start-up's
/// orphan pass renamed `.restoring-<id>.img` to `<id>.img` for any id with
/// a record, also one still Creating: the retry then took the file for one
/// a restore whose Ready record was lost had handed out and kept it in
/// `.orphaned/`, never deleted.
#[tokio::test]
async fn a_failed_block_restore_rollback_at_start_up_leaves_its_copy_unplaced() {
    use berth::os::Os;
    let h = fake(&["--kinds", "block"]);
    let fake = h.fake.clone().expect("fake os");
    let src = create_p(&h, "src", MIB, &[]).await.volume_id;
    let snap = snapshot(&h, "s", &src).await.snapshot_id;
    let restored = created_id(
        h.ctl
            .create_volume(Request::new(from_snapshot("r", MIB, &snap)))
            .await,
    );
    let cloned = created_id(
        h.ctl
            .create_volume(Request::new(from_volume("c", MIB, &src)))
            .await,
    );
    let partial = |id: &str| h.path("block").join(format!(".restoring-{id}.img"));
    let ids = [restored, cloned];
    for id in &ids {
        // The crash: the record never said Ready, the copy was never
        // moved.
        let mut rec = h.driver.store.get(id).unwrap();
        h.driver.store.set_phase(&mut rec, Phase::Creating).unwrap();
        std::fs::rename(img(&h, id), partial(id)).unwrap();
        // The rollback cannot remove the copy.
        fake.fail_op_under("unlink", &partial(id), libc::EIO);
    }
    let partials: Vec<PathBuf> = ids.iter().map(|id| partial(id)).collect();
    let aside = h.path("block").join(".orphaned");
    let dir = h.stop();
    let h = build(
        dir,
        Os::on_fake(&fake),
        Some(fake.clone()),
        &["--kinds", "block"],
    );
    for (id, partial) in ids.iter().zip(&partials) {
        assert_eq!(
            h.driver.store.get(id).map(|r| r.phase),
            Some(Phase::Creating),
            "the rollback failed: the record stays"
        );
        assert!(
            !img(&h, id).exists(),
            "the copy of a restore or clone still Creating was moved to the volume's name"
        );
        assert!(partial.exists());
    }
    fake.clear_file_faults();
    retry_pending_and_wait(&h).await;
    for (id, partial) in ids.iter().zip(&partials) {
        assert!(h.driver.store.get(id).is_none(), "the retry rolls it back");
        assert!(!img(&h, id).exists());
        assert!(!partial.exists());
        assert!(
            !aside.join(format!("{id}.img")).exists(),
            "a copy never handed out was kept aside as an orphan"
        );
    }
    assert!(img(&h, &src).exists(), "the source is untouched");
}

/// The same for a block snapshot: a copy a crash interrupted (its record
/// still Creating, its copy whole under `.snapshots/.partial-<id>.img`)
/// whose rollback at start-up fails stays where it is, never under the
/// snapshot's name, and the next retry removes it with its record.
/// Before, start-up moved the copy of any snapshot with a record into
/// place, also one still Creating: the retry then kept it in
/// `.orphaned/`, never deleted.
#[tokio::test]
async fn a_failed_block_snapshot_rollback_at_start_up_leaves_its_copy_unplaced() {
    use berth::os::Os;
    let h = fake(&["--kinds", "block"]);
    let fake = h.fake.clone().expect("fake os");
    let src = create_p(&h, "src", MIB, &[]).await.volume_id;
    let sid = snapshot(&h, "s", &src).await.snapshot_id;
    let snaps = h.path("block/.snapshots");
    let whole = snaps.join(format!("{sid}.img"));
    let partial = snaps.join(format!(".partial-{sid}.img"));
    // The crash: the record never said Ready, the copy was never moved.
    let mut s = h.driver.store.snapshot_get(&sid).unwrap();
    s.phase = Phase::Creating;
    h.driver.store.snapshot_put(&s).unwrap();
    std::fs::rename(&whole, &partial).unwrap();
    let aside = h.path("block").join(".orphaned");
    let dir = h.stop();
    // The rollback cannot remove the copy.
    fake.fail_op_under("unlink", &partial, libc::EIO);
    let h = build(
        dir,
        Os::on_fake(&fake),
        Some(fake.clone()),
        &["--kinds", "block"],
    );
    assert_eq!(
        h.driver.store.snapshot_get(&sid).map(|s| s.phase),
        Some(Phase::Creating),
        "the rollback failed: the record stays"
    );
    assert!(
        !whole.exists(),
        "the copy of a snapshot still Creating was moved into place"
    );
    assert!(partial.exists());
    fake.clear_file_faults();
    retry_pending_and_wait(&h).await;
    assert!(
        h.driver.store.snapshot_get(&sid).is_none(),
        "the retry rolls it back"
    );
    assert!(!whole.exists());
    assert!(!partial.exists());
    assert!(
        !aside.join(format!("{sid}.img")).exists(),
        "a copy never handed out was kept aside as an orphan"
    );
}

/// A ListSnapshots answer holds at most the page's bytes, as ListVolumes
/// does (`a_list_of_many_volumes_pages_under_the_limit_in_bytes`), with or
/// without `max_entries`, and a walk by token lists every snapshot once.
#[tokio::test]
async fn a_list_of_many_snapshots_pages_under_the_limit_in_bytes() {
    use prost::Message;
    let limit = 1024;
    let (os, f) = berth::os::Os::fake();
    let h = try_build_with(tempfile::tempdir().unwrap(), os, Some(f), &[], |c| {
        c.list_page_bytes = limit
    })
    .unwrap_or_else(|(_, e)| panic!("{e}"));
    let source = created_id(
        h.ctl
            .create_volume(Request::new(create_req("src", 1 << 20)))
            .await,
    );
    let n = 30;
    for i in 0..n {
        snapshot_id(&h, &format!("s{i}"), &source).await;
    }
    for max in [0, 1000] {
        let (seen, pages) = walk_pages(|token| {
            let h = &h;
            async move {
                let p = h
                    .ctl
                    .list_snapshots(Request::new(csi::ListSnapshotsRequest {
                        max_entries: max,
                        starting_token: token,
                        ..Default::default()
                    }))
                    .await
                    .unwrap()
                    .into_inner();
                let bytes: usize = p.entries.iter().map(|e| e.encoded_len() + 2).sum();
                assert!(bytes <= limit, "max {max}: page of {bytes} bytes");
                let ids = p.entries.iter();
                let ids = ids.map(|e| e.snapshot.as_ref().unwrap().snapshot_id.clone());
                (ids.collect(), p.next_token)
            }
        })
        .await;
        assert!(seen.len() == n && each_once(&seen), "max {max}: {seen:?}");
        assert!(pages >= 3, "max {max}: {pages} pages");
    }
}

/// A snapshot whose record says Deleting (a DeleteSnapshot that did not
/// finish) is gone for the CO: not listed, NOT_FOUND for GetSnapshot and as
/// a restore's source; a volume whose record says Deleting is NOT_FOUND as
/// a snapshot's or a clone's source, and nothing is made from either. Their
/// deletes still finish. A regression guard beside the volume calls'
/// (handlers `a_volume_whose_delete_did_not_finish_is_not_described_or_listed`).
#[tokio::test]
async fn a_snapshot_or_source_whose_delete_did_not_finish_is_not_used() {
    let h = fake(&[]);
    let vol = create_p(&h, "src", MIB, &[]).await.volume_id;
    let snap = snapshot(&h, "s", &vol).await.snapshot_id;
    let mut s = h.driver.store.snapshot_get(&snap).unwrap();
    s.phase = Phase::Deleting;
    h.driver.store.snapshot_put(&s).unwrap();
    let listed = h
        .ctl
        .list_snapshots(Request::new(csi::ListSnapshotsRequest::default()))
        .await
        .expect("list")
        .into_inner();
    assert!(listed.entries.is_empty(), "{listed:?}");
    let by_id = h
        .ctl
        .list_snapshots(Request::new(csi::ListSnapshotsRequest {
            snapshot_id: snap.clone(),
            ..Default::default()
        }))
        .await
        .expect("list by id")
        .into_inner();
    assert!(by_id.entries.is_empty(), "{by_id:?}");
    let e = h
        .ctl
        .get_snapshot(Request::new(csi::GetSnapshotRequest {
            snapshot_id: snap.clone(),
            ..Default::default()
        }))
        .await
        .expect_err("a snapshot being deleted answered");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = h
        .ctl
        .create_volume(Request::new(from_snapshot("restored", MIB, &snap)))
        .await
        .expect_err("restored from a snapshot being deleted");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(h.driver.store.get_by_name("restored").is_none());
    let mut v = h.driver.store.get(&vol).unwrap();
    h.driver.store.set_phase(&mut v, Phase::Deleting).unwrap();
    let e = h
        .ctl
        .create_snapshot(Request::new(snap_req("s2", &vol)))
        .await
        .expect_err("a snapshot of a volume being deleted");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(h.driver.store.snapshot_by_name("s2").is_none());
    let e = h
        .ctl
        .create_volume(Request::new(from_volume("clone", MIB, &vol)))
        .await
        .expect_err("a clone of a volume being deleted");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(h.driver.store.get_by_name("clone").is_none());
    delete_snapshot(&h, &snap).await.expect("delete snapshot");
    assert!(h.driver.store.snapshot_get(&snap).is_none());
    delete(&h, &vol).await;
    assert!(h.driver.store.get(&vol).is_none());
}

/// A snapshot whose create never answered, whose copy cannot be looked at
/// (EIO on its lstat): whether the copy is whole cannot be told, so the
/// rollback removes nothing and keeps the record for the next start, and
/// `state check` says it cannot tell. Before, the failed look read as "no
/// copy": the block rollback then unlinked the copy (its type unknown, it
/// was taken for a file), and the local one dropped the record and left
/// the copy without one; check said the operation was merely interrupted.
/// Once it can look, start-up keeps the copy aside as before.
#[tokio::test]
async fn a_snapshot_copy_that_cannot_be_looked_at_is_not_rolled_back() {
    for kind in ["local", "block"] {
        let h = fake(&["--kinds", kind]);
        let src = create_p(&h, "src", MIB, &[]).await.volume_id;
        let snap = snapshot(&h, "s", &src).await.snapshot_id;
        let copy = match kind {
            "local" => h.path("local/.snapshots").join(&snap),
            _ => h.path("block/.snapshots").join(format!("{snap}.img")),
        };
        let mut s = h.driver.store.snapshot_get(&snap).unwrap();
        s.phase = Phase::Creating;
        h.driver.store.snapshot_put(&s).unwrap();
        h.fake().fail_op_under("lstat", &copy, libc::EIO);
        let (clean, out) = state_check(&h);
        assert!(!clean, "{kind}: {out}");
        assert!(
            out.lines().any(|l| l.starts_with("error")
                && l.contains(&snap)
                && l.contains("cannot be told")),
            "{kind}: {out}"
        );
        let dir = h.stop();
        let (os, f) = berth::os::Os::fake();
        f.fail_op_under("lstat", &copy, libc::EIO);
        let h = build(dir, os, Some(f), &["--kinds", kind]);
        assert!(copy.exists(), "{kind}: the copy was removed");
        assert_eq!(
            h.driver.store.snapshot_get(&snap).map(|s| s.phase),
            Some(Phase::Creating),
            "{kind}: the record was not kept for the next start"
        );
        let dir = h.stop();
        let (os, f) = berth::os::Os::fake();
        let h = build(dir, os, Some(f), &["--kinds", kind]);
        assert!(h.driver.store.snapshot_get(&snap).is_none(), "{kind}");
        let aside = h.path(kind).join(".orphaned");
        assert!(
            std::fs::read_dir(&aside).unwrap().any(|e| e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(&snap)),
            "{kind}: the copy not kept aside in {}",
            aside.display()
        );
    }
}
