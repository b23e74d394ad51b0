//! Block volumes against the recording fake OS: the format decision as the
//! handlers apply it, loop attach/detach logic, raw block publishing,
//! expansion steps and their idempotency, and the whole-disk pool. No root
//! needed: backing files are real files in a temp dir, loop devices, disks,
//! mounts and commands are the fake's.
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use berth::csi::v1 as csi;
use berth::csi::v1::controller_server::Controller;
use berth::csi::v1::identity_server::Identity;
use berth::csi::v1::node_server::Node;
use berth::csi::v1::volume_capability::access_mode::Mode;
use berth::os::fake::{Call, FakeOs};
use berth::os::{CmdOutput, FsUsage, OsError};
use berth::state::Allocation;
use berth::state::{Phase, VolumeRecord};
use common::*;
use tonic::{Code, Request};

const MIB: i64 = 1 << 20;

fn block(extra: &[&str]) -> Harness {
    let mut args = vec!["--kinds", "block"];
    args.extend_from_slice(extra);
    fake(&args)
}

fn restart(h: Harness, extra: &[&str]) -> (Harness, Arc<FakeOs>) {
    let dir = h.stop();
    let (os, f) = berth::os::Os::fake();
    let mut args = vec!["--kinds", "block"];
    args.extend_from_slice(extra);
    (build(dir, os, Some(f.clone()), &args), f)
}

fn out(code: i32, stdout: &str) -> Result<CmdOutput, OsError> {
    Ok(CmdOutput {
        code: Some(code),
        stdout: stdout.into(),
        stderr: String::new(),
    })
}

/// blkid finds nothing, mkfs and growers succeed.
/// The block part of a volume's record.
fn block_info(h: &Harness, id: &str) -> berth::state::BlockInfo {
    *h.driver.store.get(id).unwrap().block.unwrap()
}

fn script_blank(f: &FakeOs) {
    f.respond("blkid", |_| out(2, ""));
    for p in ["mkfs.ext4", "mkfs.xfs", "resize2fs", "xfs_growfs", "wipefs"] {
        f.respond(p, |_| out(0, ""));
    }
}

fn params(kv: &[(&str, &str)]) -> HashMap<String, String> {
    let mut m: HashMap<String, String> = kv
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    m.insert("kind".into(), "block".into());
    m
}

fn create_req_p(name: &str, size: i64, kv: &[(&str, &str)]) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        parameters: params(kv),
        ..create_req(name, size)
    }
}

async fn create(h: &Harness, name: &str, size: i64, kv: &[(&str, &str)]) -> csi::Volume {
    h.ctl
        .create_volume(Request::new(create_req_p(name, size, kv)))
        .await
        .expect("create")
        .into_inner()
        .volume
        .expect("volume")
}

/// A new file-backed volume named "a" (8 MiB), staged as the default
/// filesystem at `staging` over a blank device (the fake's blkid finds
/// nothing, so NodeStage formats it).
async fn staged_blank(h: &Harness, staging: &Path) -> csi::Volume {
    script_blank(h.fake());
    let v = create(h, "a", 8 * MIB, &[]).await;
    h.node
        .node_stage_volume(Request::new(stage_req(&v.volume_id, staging)))
        .await
        .unwrap();
    v
}

fn raw_cap() -> csi::VolumeCapability {
    block_cap(Mode::SingleNodeWriter)
}

fn stage_with(id: &str, staging: &Path, cap: csi::VolumeCapability) -> csi::NodeStageVolumeRequest {
    csi::NodeStageVolumeRequest {
        volume_capability: Some(cap),
        ..stage_req(id, staging)
    }
}

fn unstage(id: &str, staging: &Path) -> csi::NodeUnstageVolumeRequest {
    csi::NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
    }
}

fn img(h: &Harness, id: &str) -> PathBuf {
    h.path("block").join(format!("{id}.img"))
}

/// Writes `data` into the file `path` at `offset` (what a tenant or an
/// interrupted mkfs left on a volume).
fn write_at(path: &Path, data: &[u8], offset: u64) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(data, offset).unwrap();
}

fn uuid_like(s: &str) -> bool {
    s.len() == 36 && s.chars().filter(|&c| c == '-').count() == 4
}

fn runs(f: &FakeOs, program: &str) -> Vec<Vec<String>> {
    f.calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::Run { program: p, args } if p == program => Some(args),
            _ => None,
        })
        .collect()
}

fn count(f: &FakeOs, pred: impl Fn(&Call) -> bool) -> usize {
    f.calls().iter().filter(|c| pred(c)).count()
}

fn is_attach(c: &Call) -> bool {
    matches!(c, Call::LoopAttach { .. })
}

fn is_detach(c: &Call) -> bool {
    matches!(c, Call::LoopDetach { .. })
}

// ------------------------------------------------------------ CreateVolume

#[tokio::test]
async fn create_makes_a_sparse_or_preallocated_file_of_whole_mib() {
    let h = block(&[]);
    let v = create(&h, "thin", 5 * MIB + 1, &[]).await;
    assert!(v.volume_id.starts_with("block-") && v.volume_id.len() == 38);
    assert_eq!(v.capacity_bytes, 6 * MIB);
    assert_eq!(v.accessible_topology, vec![topo(NODE)]);
    let m = std::fs::metadata(img(&h, &v.volume_id)).unwrap();
    assert_eq!(m.len(), 6 * MIB as u64);
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert!(m.blocks() * 512 < MIB as u64, "thin files are sparse");
    assert_eq!(m.permissions().mode() & 0o777, 0o600);
    let rec = h.driver.store.get(&v.volume_id).unwrap();
    let b = rec.block.unwrap();
    assert_eq!(
        (b.allocation, b.default_fs.as_str(), b.formatted),
        (Allocation::Thin, "ext4", false)
    );

    let t = create(&h, "thick", 3 * MIB, &[("allocation", "thick")]).await;
    let m = std::fs::metadata(img(&h, &t.volume_id)).unwrap();
    assert!(
        m.blocks() * 512 >= 3 * MIB as u64,
        "thick files are allocated"
    );
    // Idempotent by name.
    assert_eq!(
        create(&h, "thick", 3 * MIB, &[("allocation", "thick")])
            .await
            .volume_id,
        t.volume_id
    );
    // The block root is private.
    let mode = std::fs::metadata(h.path("block"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
}

#[tokio::test]
async fn create_rejects_what_it_cannot_make() {
    let h = block(&[]);
    let cases: Vec<(csi::CreateVolumeRequest, Code, &str)> = vec![
        (
            create_req_p("a", MIB, &[("colour", "red")]),
            Code::InvalidArgument,
            "colour",
        ),
        (
            create_req_p("a", MIB, &[("fsType", "btrfs")]),
            Code::InvalidArgument,
            "fsType",
        ),
        (
            create_req_p("a", MIB, &[("allocation", "fat")]),
            Code::InvalidArgument,
            "allocation",
        ),
        (
            create_req_p("a", MIB, &[("mkfsOptions", "-E offset=1")]),
            Code::InvalidArgument,
            "mkfsOptions",
        ),
        (
            create_req_p("a", MIB, &[("pool", "disk")]),
            Code::ResourceExhausted,
            "disk-pool",
        ),
        (
            csi::CreateVolumeRequest {
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: MIB + 1,
                    limit_bytes: MIB + 1,
                }),
                ..create_req_p("a", 0, &[])
            },
            Code::OutOfRange,
            "limit",
        ),
        (
            csi::CreateVolumeRequest {
                volume_capabilities: vec![mount_cap(Mode::MultiNodeMultiWriter)],
                ..create_req_p("a", MIB, &[])
            },
            Code::InvalidArgument,
            "one node",
        ),
        (
            csi::CreateVolumeRequest {
                volume_capabilities: vec![{
                    let mut c = rwo();
                    if let Some(csi::volume_capability::AccessType::Mount(m)) = &mut c.access_type {
                        m.fs_type = "zfs".into();
                    }
                    c
                }],
                ..create_req_p("a", MIB, &[])
            },
            Code::InvalidArgument,
            "zfs",
        ),
        (create_req_p("a", 1 << 50, &[]), Code::OutOfRange, "largest"),
    ];
    for (req, want, needle) in cases {
        let e = h.ctl.create_volume(Request::new(req)).await.unwrap_err();
        assert_eq!(e.code(), want, "{e:?}");
        assert!(
            e.message().contains(needle),
            "{needle:?} not in {:?}",
            e.message()
        );
    }
    assert!(h.driver.store.is_empty());
    assert_eq!(made_in(&h.path("block")), Vec::<std::ffi::OsString>::new());
}

#[tokio::test]
async fn xfs_volumes_get_at_least_what_mkfs_xfs_needs() {
    let h = block(&[]);
    let v = create(&h, "x", MIB, &[("fsType", "xfs")]).await;
    assert_eq!(v.capacity_bytes, 300 * MIB);
    // Raw block volumes are not formatted: no minimum.
    let r = h
        .ctl
        .create_volume(Request::new(csi::CreateVolumeRequest {
            volume_capabilities: vec![raw_cap()],
            ..create_req_p("r", MIB, &[("fsType", "xfs")])
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.volume.unwrap().capacity_bytes, MIB);
}

/// ValidateVolumeCapabilities does not confirm a filesystem the volume is
/// too small for: an 8 MiB volume (made for ext4) cannot hold an xfs, which
/// CreateVolume makes at least 300 MiB; ext4 and raw block are confirmed,
/// and a volume as large as xfs needs is confirmed for xfs.
#[tokio::test]
async fn validate_refuses_a_filesystem_the_volume_is_too_small_for() {
    let h = block(&[]);
    let small = create(&h, "s", 8 * MIB, &[]).await.volume_id;
    let big = create(&h, "b", 300 * MIB, &[]).await.volume_id;
    let raw = created_id(
        h.ctl
            .create_volume(Request::new(csi::CreateVolumeRequest {
                volume_capabilities: vec![raw_cap()],
                ..create_req_p("r", MIB, &[])
            }))
            .await,
    );
    let fs = |t: &str| {
        let mut c = rwo();
        if let Some(csi::volume_capability::AccessType::Mount(m)) = &mut c.access_type {
            m.fs_type = t.into();
        }
        c
    };
    for (id, cap, ok) in [
        (&small, fs("xfs"), false),
        (&small, fs("ext4"), true),
        (&small, fs(""), true),
        (&big, fs("xfs"), true),
        (&raw, raw_cap(), true),
    ] {
        let r = h
            .ctl
            .validate_volume_capabilities(Request::new(csi::ValidateVolumeCapabilitiesRequest {
                volume_id: id.clone(),
                volume_capabilities: vec![cap.clone()],
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.confirmed.is_some(), ok, "{id} {cap:?}: {}", r.message);
        if !ok {
            assert!(r.message.contains("mkfs.xfs"), "{}", r.message);
        }
    }
}

#[tokio::test]
async fn capacity_is_free_space_without_promises() {
    let h = block(&[]);
    h.fake().set_usage(
        None,
        FsUsage {
            total_bytes: 100 * MIB as u64,
            available_bytes: 40 * MIB as u64,
            ..Default::default()
        },
    );
    create(&h, "a", 30 * MIB, &[]).await;
    let c = h
        .ctl
        .get_capacity(Request::new(csi::GetCapacityRequest {
            parameters: params(&[]),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    // Thin volumes take space as they are written (statvfs shows it); they
    // promise nothing.
    assert_eq!(c.available_capacity, 40 * MIB);
    assert_eq!(c.maximum_volume_size, Some(40 * MIB));
    let e = h
        .ctl
        .create_volume(Request::new(create_req_p("big", 50 * MIB, &[])))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    let e = h
        .ctl
        .create_volume(Request::new(create_req_p("huge", 200 * MIB, &[])))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange);
}

/// GetCapacity of the file pool answers whole MiB (what a file volume
/// takes): a volume of `maximum_volume_size` bytes, or of the whole
/// `available_capacity`, can be made. Before, 40 MiB + 4 KiB free were
/// answered as such, and a CreateVolume of that size (rounded up to
/// 41 MiB) was RESOURCE_EXHAUSTED on the node the scheduler had picked
/// for it.
#[tokio::test]
async fn capacity_of_the_file_pool_is_what_a_volume_can_take() {
    let h = block(&[]);
    h.fake().set_usage(
        None,
        FsUsage {
            total_bytes: 100 * MIB as u64 + 512,
            available_bytes: 40 * MIB as u64 + 4096,
            ..Default::default()
        },
    );
    let c = h
        .ctl
        .get_capacity(Request::new(csi::GetCapacityRequest {
            parameters: params(&[]),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.available_capacity, 40 * MIB);
    assert_eq!(c.maximum_volume_size, Some(40 * MIB));
    let v = create(&h, "max", c.available_capacity, &[]).await;
    assert_eq!(v.capacity_bytes, 40 * MIB);
    // A byte more than the whole MiB left is refused, as before.
    let e = h
        .ctl
        .create_volume(Request::new(create_req_p("more", 40 * MIB + 1, &[])))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
}

/// GetCapacity for a capability whose filesystem needs more than the pool
/// holds (xfs: 300 MiB) says no volume fits, and names the smallest
/// volume it makes for those capabilities (minimum_volume_size). Before,
/// 200 MiB free answered 200 MiB as both available and the largest
/// volume: the scheduler placed a 100 MiB xfs PVC on the node, and
/// CreateVolume, which makes such a volume 300 MiB, refused it there
/// (RESOURCE_EXHAUSTED) on every retry.
#[tokio::test]
async fn capacity_for_a_filesystem_larger_than_the_free_space_is_none() {
    let h = block(&[]);
    h.fake().set_usage(
        None,
        FsUsage {
            total_bytes: 1000 * MIB as u64,
            available_bytes: 200 * MIB as u64,
            ..Default::default()
        },
    );
    let xfs = params(&[("fsType", "xfs")]);
    let ask = |parameters: &HashMap<String, String>, caps: Vec<csi::VolumeCapability>| {
        csi::GetCapacityRequest {
            parameters: parameters.clone(),
            volume_capabilities: caps,
            ..Default::default()
        }
    };
    let mount = mount_cap(Mode::SingleNodeWriter);
    let c = h
        .ctl
        .get_capacity(Request::new(ask(&xfs, vec![mount.clone()])))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            c.available_capacity,
            c.maximum_volume_size,
            c.minimum_volume_size
        ),
        (0, Some(0), Some(300 * MIB)),
        "{c:?}"
    );
    // What CreateVolume does with such a claim on this node.
    let mut req = create_req_p("x", 100 * MIB, &[("fsType", "xfs")]);
    req.volume_capabilities = vec![mount.clone()];
    let e = h.ctl.create_volume(Request::new(req)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    // A raw block volume of the same class fits, as does ext4.
    for (p, cap) in [(&xfs, raw_cap()), (&params(&[]), mount.clone())] {
        let c = h
            .ctl
            .get_capacity(Request::new(ask(p, vec![cap])))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (
                c.available_capacity,
                c.maximum_volume_size,
                c.minimum_volume_size
            ),
            (200 * MIB, Some(200 * MIB), Some(MIB)),
            "{c:?}"
        );
    }
    // With room for it, the xfs class answers the free space and its
    // minimum.
    h.fake().set_usage(
        None,
        FsUsage {
            total_bytes: 1000 * MIB as u64,
            available_bytes: 400 * MIB as u64,
            ..Default::default()
        },
    );
    let c = h
        .ctl
        .get_capacity(Request::new(ask(&xfs, vec![mount.clone()])))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            c.available_capacity,
            c.maximum_volume_size,
            c.minimum_volume_size
        ),
        (400 * MIB, Some(400 * MIB), Some(300 * MIB)),
        "{c:?}"
    );
}

// ------------------------------------------------------- Stage and format

#[tokio::test]
async fn stage_formats_a_new_volume_once_and_mounts_it() {
    let h = block(&[]);
    let f = h.fake();
    let staging = h.path("stage");
    let v = staged_blank(&h, &staging).await;
    let calls = f.calls();
    assert!(calls.contains(&Call::LoopAttach {
        file: img(&h, &v.volume_id),
        read_only: false,
        direct_io: true,
    }));
    assert_eq!(
        runs(f, "blkid"),
        [["-p", "-o", "export", "--", "/dev/loop0"]]
    );
    let mkfs = runs(f, "mkfs.ext4");
    assert_eq!(mkfs.len(), 1);
    assert_eq!(
        mkfs[0][..6],
        [
            "-q",
            "-m",
            "0",
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
            "-U",
        ]
    );
    // The UUID pinned before mkfs ran.
    assert!(uuid_like(&mkfs[0][6]), "{:?}", mkfs[0]);
    assert_eq!(mkfs[0][7..], ["--", "/dev/loop0"]);
    assert!(calls
        .iter()
        .any(|c| matches!(c, Call::MountFs { source, target, fstype, .. }
        if source == Path::new("/dev/loop0") && target == &staging && fstype == "ext4")));
    let b = block_info(&h, &v.volume_id);
    assert!(b.formatted && b.fs_type == "ext4" && b.formatting.is_empty());

    // A repeat is a no-op.
    f.clear_calls();
    h.node
        .node_stage_volume(Request::new(stage_req(&v.volume_id, &staging)))
        .await
        .unwrap();
    assert!(
        f.calls().iter().all(|c| !matches!(
            c,
            Call::Run { .. } | Call::MountFs { .. } | Call::LoopAttach { .. }
        )),
        "{:?}",
        f.calls()
    );

    // Unstage unmounts and detaches; restaging mounts without probing or
    // formatting again.
    h.node
        .node_unstage_volume(Request::new(unstage(&v.volume_id, &staging)))
        .await
        .unwrap();
    assert!(f.loops().is_empty());
    f.clear_calls();
    h.node
        .node_stage_volume(Request::new(stage_req(&v.volume_id, &staging)))
        .await
        .unwrap();
    assert!(runs(f, "blkid").is_empty() && runs(f, "mkfs.ext4").is_empty());
    assert_eq!(count(f, is_attach), 1);
}

#[tokio::test]
async fn stage_refuses_to_format_what_it_did_not_make() {
    let cases: Vec<(&str, Result<CmdOutput, OsError>)> = vec![
        (
            "existing filesystem",
            out(0, "TYPE=ext4\nUSAGE=filesystem\n"),
        ),
        ("LUKS", out(0, "TYPE=crypto_LUKS\nUSAGE=crypto\n")),
        ("partition table", out(0, "PTTYPE=gpt\n")),
        ("ambivalent", out(8, "")),
        ("exit 2 with output", out(2, "TYPE=xfs\n")),
        (
            "killed",
            Err(OsError::Timeout {
                program: "blkid".into(),
                secs: 60,
            }),
        ),
    ];
    for (what, reply) in cases {
        let h = block(&[]);
        let f = h.fake();
        f.reply("blkid", reply);
        let v = create(&h, "a", 8 * MIB, &[]).await;
        let e = h
            .node
            .node_stage_volume(Request::new(stage_req(&v.volume_id, &h.path("s"))))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{what}: {e:?}");
        assert!(
            e.message().contains("refusing to format"),
            "{what}: {}",
            e.message()
        );
        assert!(runs(f, "mkfs.ext4").is_empty(), "{what}");
        assert!(
            !f.calls().iter().any(|c| matches!(c, Call::MountFs { .. })),
            "{what}"
        );
        let b = block_info(&h, &v.volume_id);
        assert!(!b.formatted && b.formatting.is_empty(), "{what}");
    }
}

#[tokio::test]
async fn an_unreadable_device_is_not_probed_or_formatted() {
    let h = block(&[]);
    let f = h.fake();
    script_blank(f);
    let v = create(&h, "a", 8 * MIB, &[]).await;
    f.fail_next("read_head", libc::EIO);
    let e = h
        .node
        .node_stage_volume(Request::new(stage_req(&v.volume_id, &h.path("s"))))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(runs(f, "blkid").is_empty() && runs(f, "mkfs.ext4").is_empty());
}

/// A blank 8 MiB volume whose first NodeStage (at `s`) failed in
/// mkfs.ext4, half way: the intent stays recorded, with the UUID mkfs was
/// given. Returns the volume, the staging path and that UUID.
async fn interrupted_mkfs(h: &Harness) -> (csi::Volume, PathBuf, String) {
    let f = h.fake();
    script_blank(f);
    let v = create(h, "a", 8 * MIB, &[]).await;
    f.reply("mkfs.ext4", out(1, ""));
    let s = h.path("s");
    let e = h
        .node
        .node_stage_volume(Request::new(stage_req(&v.volume_id, &s)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Internal);
    let b = block_info(h, &v.volume_id);
    assert_eq!((b.formatted, b.formatting.as_str()), (false, "ext4"));
    assert_eq!(runs(f, "mkfs.ext4")[0][6], b.formatting_uuid);
    (v, s, b.formatting_uuid)
}

/// A killed berth's mkfs may still be running when the restarted one is
/// asked to stage (it holds the device exclusively): nothing is probed,
/// decided or formatted, and the answer is ABORTED (retry), not an error
/// that says to delete the volume. A mount that finds the device busy is
/// ABORTED too.
#[tokio::test]
async fn a_device_held_by_another_process_is_aborted_and_nothing_is_decided() {
    let h = block(&[]);
    let f = h.fake();
    let (v, s, uuid) = interrupted_mkfs(&h).await;
    let stage = || {
        h.node
            .node_stage_volume(Request::new(stage_req(&v.volume_id, &s)))
    };
    let dev = f.loops()[0].device.clone();
    f.set_held(&dev, true);
    let before = (runs(f, "blkid").len(), runs(f, "mkfs.ext4").len());
    let e = stage().await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{}", e.message());
    assert!(
        e.message().contains("held by another process"),
        "{}",
        e.message()
    );
    assert_eq!((runs(f, "blkid").len(), runs(f, "mkfs.ext4").len()), before);
    assert!(!s.exists(), "no staging directory left");
    // The mkfs finished meanwhile (its filesystem, with the pinned UUID)
    // but the mount still finds the device busy: ABORTED, not "delete the
    // volume"; nothing recorded.
    f.set_held(&dev, false);
    f.reply(
        "blkid",
        out(0, &format!("UUID={uuid}\nTYPE=ext4\nUSAGE=filesystem\n")),
    );
    f.fail_next("mount_fs", libc::EBUSY);
    let e = stage().await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{}", e.message());
    let b = block_info(&h, &v.volume_id);
    assert!(!b.formatted && b.formatting == "ext4");
    // Once free, the finished filesystem is adopted, never made again.
    f.reply(
        "blkid",
        out(0, &format!("UUID={uuid}\nTYPE=ext4\nUSAGE=filesystem\n")),
    );
    stage().await.unwrap();
    assert_eq!(runs(f, "mkfs.ext4").len(), 1);
    let b = block_info(&h, &v.volume_id);
    assert!(b.formatted && b.formatting.is_empty());
}

/// A snapshot or clone of a volume whose first mkfs a crash interrupted
/// holds what that mkfs wrote, with the UUID Berth gave it: the copy's
/// first stage adopts that filesystem as the source's would (before,
/// the copy forgot the interrupted format and refused "a filesystem that
/// Berth did not make", so it could never be staged).
#[tokio::test]
async fn a_copy_of_a_volume_whose_mkfs_was_interrupted_adopts_its_filesystem() {
    let h = block(&[]);
    let f = h.fake();
    let (v, _, uuid) = interrupted_mkfs(&h).await;
    let snap = snapshot_id(&h, "s", &v.volume_id).await;
    let from = |name: &str, source: csi::volume_content_source::Type| {
        let mut req = create_req_p(name, 8 * MIB, &[]);
        req.volume_content_source = Some(csi::VolumeContentSource {
            r#type: Some(source),
        });
        req
    };
    let restored = h
        .ctl
        .create_volume(Request::new(from(
            "r",
            csi::volume_content_source::Type::Snapshot(
                csi::volume_content_source::SnapshotSource {
                    snapshot_id: snap.clone(),
                },
            ),
        )))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let clone = h
        .ctl
        .create_volume(Request::new(from(
            "c",
            csi::volume_content_source::Type::Volume(csi::volume_content_source::VolumeSource {
                volume_id: v.volume_id.clone(),
            }),
        )))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    f.reply(
        "blkid",
        out(0, &format!("UUID={uuid}\nTYPE=ext4\nUSAGE=filesystem\n")),
    );
    f.reply(
        "blkid",
        out(0, &format!("UUID={uuid}\nTYPE=ext4\nUSAGE=filesystem\n")),
    );
    for (copy, at) in [(&restored, "rs"), (&clone, "cs")] {
        let b = block_info(&h, &copy.volume_id);
        assert_eq!(
            (
                b.formatted,
                b.formatting.as_str(),
                b.formatting_uuid.as_str()
            ),
            (false, "ext4", uuid.as_str()),
            "{}",
            copy.volume_id
        );
        h.node
            .node_stage_volume(Request::new(stage_req(&copy.volume_id, &h.path(at))))
            .await
            .unwrap_or_else(|e| panic!("staging {}: {e:?}", copy.volume_id));
        let b = block_info(&h, &copy.volume_id);
        assert!(b.formatted && b.fs_type == "ext4" && b.formatting.is_empty());
    }
    assert_eq!(runs(f, "mkfs.ext4").len(), 1, "a copy was formatted");
}

#[tokio::test]
async fn an_interrupted_mkfs_is_never_redone_over_a_filesystem() {
    let h = block(&[]);
    let f = h.fake();
    let (v, s, uuid) = interrupted_mkfs(&h).await;
    // The retry finds an ext4 with another UUID (a stale intent): refused,
    // never formatted (the old rule forced mkfs over any ext4 here).
    f.reply(
        "blkid",
        out(
            0,
            "UUID=11111111-2222-3333-4444-555555555555\nTYPE=ext4\nUSAGE=filesystem\n",
        ),
    );
    let e = h
        .node
        .node_stage_volume(Request::new(stage_req(&v.volume_id, &s)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains(&uuid), "{}", e.message());
    assert_eq!(runs(f, "mkfs.ext4").len(), 1);
    // It finds the filesystem with the pinned UUID: Berth's mkfs had
    // finished. Mounted as it is (it may hold data), never formatted again.
    f.reply(
        "blkid",
        out(0, &format!("UUID={uuid}\nTYPE=ext4\nUSAGE=filesystem\n")),
    );
    h.node
        .node_stage_volume(Request::new(stage_req(&v.volume_id, &s)))
        .await
        .unwrap();
    assert_eq!(runs(f, "mkfs.ext4").len(), 1);
    assert!(f
        .calls()
        .iter()
        .any(|c| matches!(c, Call::MountFs { target, .. } if target == &s)));
    let b = block_info(&h, &v.volume_id);
    assert!(b.formatted && b.fs_type == "ext4" && b.formatting.is_empty());

    // Asked as xfs after an interrupted ext4 mkfs: refused.
    let h = block(&[]);
    let f = h.fake();
    script_blank(f);
    let v = create(&h, "a", 300 * MIB, &[]).await;
    f.reply("mkfs.ext4", out(1, ""));
    let _ = h
        .node
        .node_stage_volume(Request::new(stage_req(&v.volume_id, &h.path("s"))))
        .await;
    let uuid = block_info(&h, &v.volume_id).formatting_uuid;
    f.reply(
        "blkid",
        out(0, &format!("UUID={uuid}\nTYPE=ext4\nUSAGE=filesystem\n")),
    );
    let mut xfs = rwo();
    if let Some(csi::volume_capability::AccessType::Mount(m)) = &mut xfs.access_type {
        m.fs_type = "xfs".into();
    }
    let e = h
        .node
        .node_stage_volume(Request::new(stage_with(&v.volume_id, &h.path("s"), xfs)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(runs(f, "mkfs.xfs").is_empty());
}

/// An interrupted mkfs.xfs leaves a superblock marked "in progress" that
/// the kernel never mounts (so it never held data): with the pinned UUID,
/// and only then, mkfs runs again with force and the same UUID.
#[tokio::test]
async fn an_unfinished_xfs_of_berths_own_mkfs_is_made_again() {
    let h = block(&[]);
    let f = h.fake();
    script_blank(f);
    let v = create(&h, "x", 300 * MIB, &[("fsType", "xfs")]).await;
    f.reply("mkfs.xfs", out(1, ""));
    let s = h.path("s");
    assert!(h
        .node
        .node_stage_volume(Request::new(stage_req(&v.volume_id, &s)))
        .await
        .is_err());
    let uuid = block_info(&h, &v.volume_id).formatting_uuid;
    // What mkfs.xfs left: a superblock with sb_inprogress set.
    let mut sb = vec![0u8; 512];
    sb[..4].copy_from_slice(b"XFSB");
    sb[126] = 1;
    write_at(&img(&h, &v.volume_id), &sb, 0);
    f.respond("blkid", move |_| {
        out(0, &format!("UUID={uuid}\nTYPE=xfs\nUSAGE=filesystem\n"))
    });
    h.node
        .node_stage_volume(Request::new(stage_req(&v.volume_id, &s)))
        .await
        .unwrap();
    let mkfs = runs(f, "mkfs.xfs");
    assert_eq!(mkfs.len(), 2);
    assert!(mkfs[1].contains(&"-f".to_string()) && !mkfs[0].contains(&"-f".to_string()));
    assert_eq!(mkfs[0][3], mkfs[1][3], "the same UUID");
    // Finished (the flag cleared): never forced.
    let v = create(&h, "y", 300 * MIB, &[("fsType", "xfs")]).await;
    f.respond("blkid", |_| out(2, ""));
    f.reply("mkfs.xfs", out(1, ""));
    let s2 = h.path("s2");
    assert!(h
        .node
        .node_stage_volume(Request::new(stage_req(&v.volume_id, &s2)))
        .await
        .is_err());
    let uuid = block_info(&h, &v.volume_id).formatting_uuid;
    sb[126] = 0;
    write_at(&img(&h, &v.volume_id), &sb, 0);
    f.respond("blkid", move |_| {
        out(0, &format!("UUID={uuid}\nTYPE=xfs\nUSAGE=filesystem\n"))
    });
    h.node
        .node_stage_volume(Request::new(stage_req(&v.volume_id, &s2)))
        .await
        .unwrap();
    assert_eq!(runs(f, "mkfs.xfs").len(), 3, "adopted, not made again");
}

/// NodeStage takes raw or filesystem from the volume, not only from the
/// request: a volume first staged raw (and written: no signature) is never
/// formatted when it is later staged as a filesystem, and a filesystem is
/// never handed out raw. A file that holds data Berth did not write is not
/// formatted either, even when its record was lost or rolled back.
#[tokio::test]
async fn a_volume_used_raw_is_never_formatted() {
    let h = block(&[]);
    let f = h.fake();
    script_blank(f);
    let v = create(&h, "a", 8 * MIB, &[]).await;
    let s = h.path("s");
    h.node
        .node_stage_volume(Request::new(stage_with(&v.volume_id, &s, raw_cap())))
        .await
        .unwrap();
    h.node
        .node_unstage_volume(Request::new(csi::NodeUnstageVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: s.display().to_string(),
        }))
        .await
        .unwrap();
    let e = h
        .node
        .node_stage_volume(Request::new(stage_req(&v.volume_id, &s)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("raw"), "{}", e.message());
    assert!(runs(f, "mkfs.ext4").is_empty() && runs(f, "blkid").is_empty());

    // And the other way round.
    let w = create(&h, "b", 8 * MIB, &[]).await;
    let s2 = h.path("s2");
    h.node
        .node_stage_volume(Request::new(stage_req(&w.volume_id, &s2)))
        .await
        .unwrap();
    let e = h
        .node
        .node_stage_volume(Request::new(stage_with(
            &w.volume_id,
            &h.path("s3"),
            raw_cap(),
        )))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);

    // A record that does not know (lost, or of an older version) and a file
    // that holds data: not new, not formatted.
    let x = create(&h, "c", 8 * MIB, &[]).await;
    write_at(&img(&h, &x.volume_id), b"tenant data", 5 * MIB as u64);
    let before = runs(f, "mkfs.ext4").len();
    let e = h
        .node
        .node_stage_volume(Request::new(stage_req(&x.volume_id, &h.path("s4"))))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("holds data"), "{}", e.message());
    assert_eq!(runs(f, "mkfs.ext4").len(), before);
}

/// A record naming a filesystem Berth does not know is damaged: an error,
/// never a silent ext4.
#[tokio::test]
async fn an_unknown_filesystem_in_a_record_is_an_error() {
    let h = block(&[]);
    let f = h.fake();
    script_blank(f);
    let v = create(&h, "a", 8 * MIB, &[]).await;
    let mut r = h.driver.store.get(&v.volume_id).unwrap();
    r.block.as_mut().unwrap().default_fs = "btrfs".into();
    h.driver.store.put(&r).unwrap();
    let e = h
        .node
        .node_stage_volume(Request::new(stage_req(&v.volume_id, &h.path("s"))))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("btrfs"), "{}", e.message());
    assert!(runs(f, "mkfs.ext4").is_empty());
}

#[tokio::test]
async fn fs_type_mount_flags_and_mkfs_options_reach_the_os_checked() {
    let h = block(&[]);
    let f = h.fake();
    script_blank(f);
    let v = create(
        &h,
        "x",
        300 * MIB,
        &[("fsType", "xfs"), ("mkfsOptions", "-m bigtime=0")],
    )
    .await;
    let s = h.path("s");
    let mut req = stage_req(&v.volume_id, &s);
    req.volume_capability = Some(mount_cap_flags(
        Mode::SingleNodeReaderOnly,
        &["noatime,nodev"],
    ));
    h.node.node_stage_volume(Request::new(req)).await.unwrap();
    let mkfs = runs(f, "mkfs.xfs");
    assert_eq!(mkfs.len(), 1);
    assert_eq!(mkfs[0][..3], ["-q", "-K", "-m"]);
    let uuid = mkfs[0][3].strip_prefix("bigtime=0,uuid=").unwrap();
    assert!(uuid_like(uuid), "{:?}", mkfs[0]);
    assert_eq!(mkfs[0][4..], ["--", "/dev/loop0"]);
    let mounted = f.calls().into_iter().find_map(|c| match c {
        Call::MountFs { fstype, flags, .. } => Some((fstype, flags)),
        _ => None,
    });
    let (fstype, flags) = mounted.unwrap();
    assert_eq!(fstype, "xfs");
    assert!(flags.readonly && flags.noatime && flags.nodev && !flags.nosuid);
    // A formatted volume is not mounted as another type.
    h.node
        .node_unstage_volume(Request::new(unstage(&v.volume_id, &s)))
        .await
        .unwrap();
    let mut ext4 = rwo();
    if let Some(csi::volume_capability::AccessType::Mount(m)) = &mut ext4.access_type {
        m.fs_type = "ext4".into();
    }
    let e = h
        .node
        .node_stage_volume(Request::new(stage_with(&v.volume_id, &s, ext4)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    // Bad flags never reach mount.
    let mut req = stage_req(&v.volume_id, &s);
    req.volume_capability = Some(mount_cap_flags(Mode::SingleNodeWriter, &["exec,suid"]));
    let e = h
        .node
        .node_stage_volume(Request::new(req))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

/// mkfsOptions that mkfs.xfs or mkfs.ext4 refuses (a suboption given
/// twice, "option respecified"; a value out of its range or of the wrong
/// form) are INVALID_ARGUMENT at CreateVolume, naming the option, and
/// nothing is made; the forms mkfs takes still pass. Before, they passed
/// the allowlist (any alphanumeric value, any number): the volume was made,
/// and every NodeStageVolume failed in mkfs, for good.
#[tokio::test]
async fn mkfs_options_that_mkfs_refuses_are_invalid_at_create() {
    let h = block(&[]);
    h.fake().clear_calls();
    let bad = [
        ("xfs", "-m crc=1,crc=0"),
        ("xfs", "-m crc=0 -m crc=1"),
        ("xfs", "-b size=4k -b size=4k"),
        ("xfs", "-m crc=2"),
        ("xfs", "-m bigtime=yes"),
        ("xfs", "-i maxpct=101"),
        ("xfs", "-i attr=3"),
        ("xfs", "-l version=3"),
        ("xfs", "-i size=4k"),
        ("xfs", "-b size=4x"),
        ("xfs", "-b size=04096"),
        ("ext4", "-i 0"),
        ("ext4", "-i 999999999999"),
        ("ext4", "-N 999999999999"),
    ];
    for (fs, opts) in bad {
        let r = h
            .ctl
            .create_volume(Request::new(create_req_p(
                "a",
                300 * MIB,
                &[("fsType", fs), ("mkfsOptions", opts)],
            )))
            .await;
        let e = r.expect_err(opts);
        assert_eq!(e.code(), Code::InvalidArgument, "{opts}: {e:?}");
        assert!(e.message().contains("mkfsOptions"), "{opts}: {e:?}");
    }
    assert!(h.driver.store.is_empty());
    assert_eq!(made_in(&h.path("block")), Vec::<std::ffi::OsString>::new());
    assert_eq!(h.fake().calls(), vec![], "nothing reaches the OS");
    let good = [
        ("xfs", "-m crc=1 -m finobt=1"),
        ("xfs", "-b size=4K -s size=512 -n size=8k -l size=64m"),
        ("xfs", "-i size=512,maxpct=25 -m bigtime=0,inobtcount=0"),
        ("xfs", "-b size=4096"),
        ("ext4", "-i 16384 -N 100000 -b 4096 -I 256"),
        ("ext4", "-i 1024"),
        ("ext4", "-i 67108864 -N 4294967295"),
    ];
    for (i, (fs, opts)) in good.iter().enumerate() {
        let r = h
            .ctl
            .create_volume(Request::new(create_req_p(
                &format!("g{i}"),
                300 * MIB,
                &[("fsType", fs), ("mkfsOptions", opts)],
            )))
            .await;
        assert!(r.is_ok(), "{opts}: {r:?}");
    }
}

// ------------------------------------------------------ Loop attachments

#[tokio::test]
async fn an_existing_attachment_is_reused_after_a_restart() {
    let h = block(&[]);
    script_blank(h.fake());
    let v = create(&h, "a", 8 * MIB, &[]).await;
    let (h, f) = restart(h, &[]);
    script_blank(&f);
    // The kernel still has the file attached from before the restart (with
    // autoclear set by an earlier busy detach).
    let pre = f.add_loop(&img(&h, &v.volume_id));
    f.detach_leaves_bound(1);
    use berth::os::LoopDevices;
    f.detach(&pre.device).unwrap();
    assert!(f.loops()[0].autoclear);
    f.clear_calls();
    h.node
        .node_stage_volume(Request::new(stage_req(&v.volume_id, &h.path("s"))))
        .await
        .unwrap();
    assert_eq!(count(&f, is_attach), 0, "{:?}", f.calls());
    assert!(f.calls().contains(&Call::LoopClearAutoclear {
        device: pre.device.clone()
    }));
    assert_eq!(f.loops().len(), 1);
    assert!(!f.loops()[0].autoclear);
}

#[tokio::test]
async fn a_file_attached_twice_is_not_used() {
    let h = block(&[]);
    let f = h.fake();
    script_blank(f);
    let v = create(&h, "a", 8 * MIB, &[]).await;
    f.add_loop(&img(&h, &v.volume_id));
    f.add_loop(&img(&h, &v.volume_id));
    let e = h
        .node
        .node_stage_volume(Request::new(stage_req(&v.volume_id, &h.path("s"))))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("several loop devices"));
    // Another file with the same name elsewhere is not ours.
    let h = block(&[]);
    let f = h.fake();
    script_blank(f);
    let v = create(&h, "a", 8 * MIB, &[]).await;
    let other = h.path(&format!("{}.img", v.volume_id));
    std::fs::write(&other, b"x").unwrap();
    f.add_loop(&other);
    h.node
        .node_stage_volume(Request::new(stage_req(&v.volume_id, &h.path("s"))))
        .await
        .unwrap();
    assert_eq!(count(f, is_attach), 1);
}

#[tokio::test]
async fn a_detach_that_leaves_the_device_bound_is_an_error_to_retry() {
    let h = block(&[]);
    let f = h.fake();
    let s = h.path("s");
    let v = staged_blank(&h, &s).await;
    f.detach_leaves_bound(1);
    let e = h
        .node
        .node_unstage_volume(Request::new(unstage(&v.volume_id, &s)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("still in use"), "{}", e.message());
    // Berth never leaves autoclear set.
    assert_eq!(f.loops().len(), 1);
    assert!(!f.loops()[0].autoclear);
    // The retry detaches (the staging mount is already gone).
    h.node
        .node_unstage_volume(Request::new(unstage(&v.volume_id, &s)))
        .await
        .unwrap();
    assert!(f.loops().is_empty());
    assert_eq!(count(f, is_detach), 2);
}

#[tokio::test]
async fn unstage_refuses_while_published_and_delete_while_staged() {
    let h = block(&[]);
    let f = h.fake();
    script_blank(f);
    let v = create(&h, "a", 8 * MIB, &[]).await;
    let (s, t) = (h.path("s"), h.path("t"));
    stage_and_publish(&h, &v.volume_id, &s, &t).await;
    let e = h
        .node
        .node_unstage_volume(Request::new(unstage(&v.volume_id, &s)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let del = csi::DeleteVolumeRequest {
        volume_id: v.volume_id.clone(),
        ..Default::default()
    };
    let e = h
        .ctl
        .delete_volume(Request::new(del.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(count(f, is_detach), 0);
    h.node
        .node_unpublish_volume(Request::new(csi::NodeUnpublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            target_path: t.display().to_string(),
        }))
        .await
        .unwrap();
    h.node
        .node_unstage_volume(Request::new(unstage(&v.volume_id, &s)))
        .await
        .unwrap();
    h.ctl
        .delete_volume(Request::new(del.clone()))
        .await
        .unwrap();
    assert!(!img(&h, &v.volume_id).exists());
    h.ctl.delete_volume(Request::new(del)).await.unwrap();
}

/// Whole mount-table reads per RPC of a file-backed ext4 lifecycle:
/// stage decides "in use?" from the same read as "already staged?",
/// unpublish reads once to tell that the target holds this volume's device
/// (not another's), unstage reads once for its decisions and once
/// more (after unmounting) before detaching the loop device, and
/// DeleteVolume of a detached volume reads nothing.
#[tokio::test]
async fn block_lifecycle_mount_table_reads() {
    let h = block(&[]);
    let f = h.fake();
    script_blank(f);
    let mut reads = Vec::new();
    f.clear_calls();
    let id = create(&h, "a", 8 * MIB, &[]).await.volume_id;
    reads.push(("create", f.table_reads()));
    let (s, t) = (h.path("s"), h.path("t"));
    reads.extend(mount_table_reads(&h, &id, &s, &t).await);
    assert_eq!(
        reads,
        vec![
            ("create", 0),
            ("stage", 1),
            ("publish", 1),
            ("unpublish", 1),
            ("unstage", 2),
            ("delete", 0),
        ]
    );
    assert!(f.loops().is_empty());
    assert!(!img(&h, &id).exists());
}

/// DeleteVolume of a volume whose file is still attached (a leftover)
/// reads the table once for the "in use?" check and the detach check.
#[tokio::test]
async fn delete_of_an_attached_volume_reads_the_table_once() {
    let h = block(&[]);
    let f = h.fake();
    let id = create(&h, "a", 8 * MIB, &[]).await.volume_id;
    f.add_loop(&img(&h, &id));
    f.clear_calls();
    h.ctl
        .delete_volume(Request::new(csi::DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert_eq!(f.table_reads(), 1);
    assert!(f.loops().is_empty());
}

#[tokio::test]
async fn delete_detaches_a_leftover_attachment_and_removes_only_its_file() {
    let h = block(&[]);
    let f = h.fake();
    let v = create(&h, "a", 8 * MIB, &[]).await;
    f.add_loop(&img(&h, &v.volume_id));
    let keep = h.path("block").join("not-ours.img");
    std::fs::write(&keep, b"x").unwrap();
    h.ctl
        .delete_volume(Request::new(csi::DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert!(f.loops().is_empty());
    assert!(!img(&h, &v.volume_id).exists());
    assert!(keep.exists());
    // Hostile ids touch nothing.
    for id in [
        "block-../../etc",
        "../block-x",
        "block-0123456789abcdef0123456789abcde",
    ] {
        h.ctl
            .delete_volume(Request::new(csi::DeleteVolumeRequest {
                volume_id: id.into(),
                ..Default::default()
            }))
            .await
            .unwrap();
    }
    assert!(keep.exists());
}

// ------------------------------------------------------------ Raw block

/// A raw volume's loop device detached by hand while published (the
/// kernel allows it: a bind of the device node does not hold the device):
/// NodeGetVolumeStats answers an abnormal condition that says so, with no
/// numbers (before: NOT_FOUND, as if the pod's path held nothing). A path
/// that holds nothing is still NOT_FOUND.
#[tokio::test]
async fn stats_of_a_raw_volume_whose_loop_device_was_detached() {
    let h = block(&[]);
    let f = h.fake();
    let id = created_id(
        h.ctl
            .create_volume(Request::new(csi::CreateVolumeRequest {
                volume_capabilities: vec![raw_cap()],
                ..create_req_p("r", 4 * MIB, &[])
            }))
            .await,
    );
    let (s, t) = (h.path("s"), h.path("t"));
    std::fs::create_dir(&s).unwrap();
    h.node
        .node_stage_volume(Request::new(stage_with(&id, &s, raw_cap())))
        .await
        .unwrap();
    h.node
        .node_publish_volume(Request::new(csi::NodePublishVolumeRequest {
            volume_capability: Some(raw_cap()),
            ..publish_req(&id, &s, &t, false)
        }))
        .await
        .unwrap();
    use berth::os::LoopDevices;
    f.detach(Path::new("/dev/loop0")).unwrap();
    assert!(f.loops().is_empty());
    let stats = |path: &Path| csi::NodeGetVolumeStatsRequest {
        volume_id: id.clone(),
        volume_path: path.display().to_string(),
        staging_target_path: String::new(),
    };
    let st = h
        .node
        .node_get_volume_stats(Request::new(stats(&t)))
        .await
        .unwrap()
        .into_inner();
    assert!(st.usage.is_empty(), "{:?}", st.usage);
    let c = st.volume_condition.unwrap();
    assert!(
        c.abnormal && c.message.contains("/dev/loop0") && c.message.contains("no longer attached"),
        "{c:?}"
    );
    assert_eq!(
        code(
            h.node
                .node_get_volume_stats(Request::new(stats(&h.path("nothing"))))
                .await
        ),
        Code::NotFound
    );
}

#[tokio::test]
async fn raw_block_stages_and_publishes_the_device_node() {
    let h = block(&[]);
    let f = h.fake();
    let v = h
        .ctl
        .create_volume(Request::new(csi::CreateVolumeRequest {
            volume_capabilities: vec![raw_cap()],
            ..create_req_p("r", 4 * MIB, &[])
        }))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let id = v.volume_id;
    let (s, t, ro) = (h.path("s"), h.path("t"), h.path("ro"));
    std::fs::create_dir(&s).unwrap();
    for _ in 0..2 {
        h.node
            .node_stage_volume(Request::new(stage_with(&id, &s, raw_cap())))
            .await
            .unwrap();
    }
    let marker = s.join(&id);
    assert!(marker.is_file());
    assert_eq!(
        f.calls()
            .iter()
            .filter(|c| matches!(c, Call::Bind { source, target, .. } if source == Path::new("/dev/loop0") && target == &marker))
            .count(),
        1
    );
    // Nothing is probed or formatted for raw block.
    assert!(runs(f, "blkid").is_empty());
    let publish = |target: &Path, readonly: bool| csi::NodePublishVolumeRequest {
        volume_capability: Some(raw_cap()),
        ..publish_req(&id, &s, target, readonly)
    };
    for _ in 0..2 {
        h.node
            .node_publish_volume(Request::new(publish(&t, false)))
            .await
            .unwrap();
    }
    h.node
        .node_publish_volume(Request::new(publish(&ro, true)))
        .await
        .unwrap();
    assert!(t.is_file() && ro.is_file());
    // Published with a mount capability, a raw-staged volume is refused
    // for what it is (not "not staged"), and nothing is mounted.
    let calls = f.calls().len();
    let e = h
        .node
        .node_publish_volume(Request::new(csi::NodePublishVolumeRequest {
            volume_capability: Some(rwo()),
            ..publish_req(&id, &s, &h.path("fs"), false)
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(
        e.message().contains("staged as a raw block device"),
        "{}",
        e.message()
    );
    assert_eq!(f.calls().len(), calls);
    assert!(!h.path("fs").exists());
    let ro_flags = f.calls().into_iter().find_map(|c| match c {
        Call::Bind { target, flags, .. } if target == ro => Some(flags),
        _ => None,
    });
    assert!(ro_flags.unwrap().readonly);
    let e = h
        .node
        .node_publish_volume(Request::new(publish(&t, true)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    // Stats: the device size.
    let st = h
        .node
        .node_get_volume_stats(Request::new(csi::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: t.display().to_string(),
            staging_target_path: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.usage.len(), 1);
    assert_eq!(st.usage[0].total, 4 * MIB);
    assert!(!st.volume_condition.unwrap().abnormal);
    // Unstage refuses while published.
    assert_eq!(
        code(
            h.node
                .node_unstage_volume(Request::new(unstage(&id, &s)))
                .await
        ),
        Code::FailedPrecondition
    );
    for target in [&t, &ro] {
        h.node
            .node_unpublish_volume(Request::new(csi::NodeUnpublishVolumeRequest {
                volume_id: id.clone(),
                target_path: target.display().to_string(),
            }))
            .await
            .unwrap();
        assert!(!target.exists());
    }
    h.node
        .node_unstage_volume(Request::new(unstage(&id, &s)))
        .await
        .unwrap();
    assert!(!marker.exists() && s.is_dir());
    assert!(f.loops().is_empty());
    // Publishing an unstaged volume fails cleanly.
    let e = h
        .node
        .node_publish_volume(Request::new(publish(&t, false)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(!t.exists());
}

#[tokio::test]
async fn raw_block_with_a_read_only_access_mode_attaches_read_only() {
    let h = block(&[]);
    let f = h.fake();
    let v = create(&h, "r", 4 * MIB, &[]).await;
    let s = h.path("s");
    h.node
        .node_stage_volume(Request::new(stage_with(
            &v.volume_id,
            &s,
            block_cap(Mode::SingleNodeReaderOnly),
        )))
        .await
        .unwrap();
    assert!(f.calls().contains(&Call::LoopAttach {
        file: img(&h, &v.volume_id),
        read_only: true,
        direct_io: true,
    }));
}

#[tokio::test]
async fn condition_is_abnormal_when_the_backing_file_is_gone() {
    let h = block(&[]);
    let v = create(&h, "a", 4 * MIB, &[]).await;
    let get = || csi::ControllerGetVolumeRequest {
        volume_id: v.volume_id.clone(),
    };
    let c = h
        .ctl
        .controller_get_volume(Request::new(get()))
        .await
        .unwrap()
        .into_inner();
    assert!(!c.status.unwrap().volume_condition.unwrap().abnormal);
    std::fs::remove_file(img(&h, &v.volume_id)).unwrap();
    let c = h
        .ctl
        .controller_get_volume(Request::new(get()))
        .await
        .unwrap()
        .into_inner();
    let cond = c.status.unwrap().volume_condition.unwrap();
    assert!(
        cond.abnormal && cond.message.contains("missing"),
        "{cond:?}"
    );
}

/// A CreateVolume of a whole-disk volume of `required` to `limit` bytes.
fn disk_req(name: &str, required: i64, limit: i64) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        capacity_range: Some(csi::CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        }),
        ..create_req_p(name, 0, &[("pool", "disk")])
    }
}

/// A node reboot under a staged and published raw volume and a staged and
/// published filesystem volume: every mount and loop device is gone (a new
/// fake), an unrelated file has taken the loop number the raw volume had,
/// and the directories and files stay. kubelet then tears the raw
/// volume's pod down at its old paths (nothing mounted there) and stages
/// and publishes the other again at the same paths. Nothing is stranded,
/// the unrelated device stays attached, the filesystem is not made again,
/// and what Berth made at the old paths is gone (kubelet's own clean-up
/// of the publish directory, `os.Remove`, fails on a file left in it).
#[tokio::test]
async fn a_reboot_strands_nothing_and_leaves_nothing_behind() {
    let h = block(&[]);
    script_blank(h.fake());
    let r = h
        .ctl
        .create_volume(Request::new(csi::CreateVolumeRequest {
            volume_capabilities: vec![raw_cap()],
            ..create_req_p("r", 4 * MIB, &[])
        }))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let fsv = create(&h, "f", 8 * MIB, &[]).await.volume_id;
    let (sr, pr) = (h.path("stage-r"), h.path("publish-r"));
    let (sf, pods) = (h.path("stage-f"), h.path("pods"));
    for d in [&sr, &pr, &sf, &pods] {
        std::fs::create_dir(d).unwrap();
    }
    let (tr, tf) = (pr.join("pod1"), pods.join("pod2"));
    let raw_publish = |t: &Path| csi::NodePublishVolumeRequest {
        volume_capability: Some(raw_cap()),
        ..publish_req(&r, &sr, t, false)
    };
    h.node
        .node_stage_volume(Request::new(stage_with(&r, &sr, raw_cap())))
        .await
        .unwrap();
    h.node
        .node_publish_volume(Request::new(raw_publish(&tr)))
        .await
        .unwrap();
    stage_and_publish(&h, &fsv, &sf, &tf).await;
    assert_eq!(runs(h.fake(), "mkfs.ext4").len(), 1);
    let old_r = h
        .fake()
        .loops()
        .into_iter()
        .find(|l| l.backing_file == img(&h, &r))
        .unwrap()
        .device;

    // The reboot.
    let (h, f) = restart(h, &[]);
    script_blank(&f);
    let other = h.path("unrelated.img");
    std::fs::write(&other, vec![0u8; 4096]).unwrap();
    assert_eq!(f.add_loop(&other).device, old_r, "the number is reused");

    // (a) The raw volume's pod was deleted meanwhile.
    unpublish_as_kubelet(&h, &r, &tr).await.unwrap();
    unstage_as_kubelet(&h, &r, &sr).await.unwrap();
    assert!(!tr.exists(), "the publish file Berth made is left");
    assert!(!sr.join(&r).exists(), "the staging marker is left");
    assert_eq!(f.loops().len(), 1);
    assert_eq!(f.loops()[0].backing_file, other);
    // (b) The other's pod is still scheduled: same paths again.
    stage_and_publish(&h, &fsv, &sf, &tf).await;
    assert!(runs(&f, "mkfs.ext4").is_empty(), "formatted again");
    // (c) Stats.
    let stats = |id: &str, p: &Path| csi::NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: p.display().to_string(),
        staging_target_path: String::new(),
    };
    let st = h
        .node
        .node_get_volume_stats(Request::new(stats(&fsv, &tf)))
        .await
        .unwrap()
        .into_inner();
    assert!(!st.volume_condition.unwrap().abnormal);
    assert_eq!(
        code(
            h.node
                .node_get_volume_stats(Request::new(stats(&r, &tr)))
                .await
        ),
        Code::NotFound
    );
    // Reconstruction: a target of the volume never published again.
    let never = pods.join("pod0");
    std::fs::create_dir(&never).unwrap();
    unpublish_as_kubelet(&h, &fsv, &never).await.unwrap();
    assert!(!never.exists());
    unpublish_as_kubelet(&h, &fsv, &tf).await.unwrap();
    unstage_as_kubelet(&h, &fsv, &sf).await.unwrap();
    assert_eq!(f.loops().len(), 1);
    assert!(f
        .table()
        .iter()
        .all(|m| !m.mount_point.starts_with(h.dir.path())));
}

/// NodeUnstageVolume at a path where the volume is not staged (nothing
/// mounted there) while it is staged, and published, at its own staging
/// path: OK, as the spec asks, and nothing of the volume is touched (its
/// device stays attached, its mounts stay). It failed with
/// FAILED_PRECONDITION ("/dev/loopN ... is still mounted at <staging>")
/// on every retry, a filesystem volume and a raw one alike.
#[tokio::test]
async fn unstage_where_the_volume_is_not_staged_is_ok_and_touches_nothing() {
    let h = block(&[]);
    let f = h.fake();
    script_blank(f);
    let fsv = create(&h, "f", 8 * MIB, &[]).await.volume_id;
    let raw = h
        .ctl
        .create_volume(Request::new(csi::CreateVolumeRequest {
            volume_capabilities: vec![raw_cap()],
            ..create_req_p("r", 4 * MIB, &[])
        }))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    for (id, cap) in [(&fsv, rwo()), (&raw, raw_cap())] {
        let (s, t, other) = (
            h.path(&format!("s-{id}")),
            h.path(&format!("t-{id}")),
            h.path(&format!("other-{id}")),
        );
        std::fs::create_dir(&s).unwrap();
        std::fs::create_dir(&other).unwrap();
        h.node
            .node_stage_volume(Request::new(stage_with(id, &s, cap.clone())))
            .await
            .unwrap();
        h.node
            .node_publish_volume(Request::new(csi::NodePublishVolumeRequest {
                volume_capability: Some(cap.clone()),
                ..publish_req(id, &s, &t, false)
            }))
            .await
            .unwrap();
        let (loops, table) = (f.loops().len(), f.table().len());
        for _ in 0..2 {
            h.node
                .node_unstage_volume(Request::new(unstage(id, &other)))
                .await
                .unwrap_or_else(|e| panic!("{id}: {e:?}"));
        }
        assert_eq!((f.loops().len(), f.table().len()), (loops, table), "{id}");
        // Its own staging path: still refused while published, then done.
        assert_eq!(
            code(
                h.node
                    .node_unstage_volume(Request::new(unstage(id, &s)))
                    .await
            ),
            Code::FailedPrecondition
        );
        unpublish_as_kubelet(&h, id, &t).await.unwrap();
        unstage_as_kubelet(&h, id, &s).await.unwrap();
    }
    assert!(f.loops().is_empty());
    assert!(f
        .table()
        .iter()
        .all(|m| !m.mount_point.starts_with(h.dir.path())));
}

// ------------------------------------------------------------- Expansion

fn expand_req(id: &str, required: i64, limit: i64) -> csi::ControllerExpandVolumeRequest {
    csi::ControllerExpandVolumeRequest {
        volume_id: id.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        }),
        ..Default::default()
    }
}

fn node_expand_req(
    id: &str,
    path: &Path,
    staging: &Path,
    required: i64,
) -> csi::NodeExpandVolumeRequest {
    csi::NodeExpandVolumeRequest {
        volume_id: id.into(),
        volume_path: path.display().to_string(),
        staging_target_path: staging.display().to_string(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: required,
            limit_bytes: 0,
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn expansion_is_advertised_with_block_volumes() {
    let h = block(&[]);
    use csi::controller_service_capability::rpc::Type;
    assert!(controller_rpcs(&h)
        .await
        .contains(&(Type::ExpandVolume as i32)));
    use csi::node_service_capability::rpc::Type as NType;
    assert!(node_rpcs(&h).await.contains(&(NType::ExpandVolume as i32)));
    let p = h
        .ident
        .get_plugin_capabilities(Request::new(Default::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(p.capabilities.iter().any(|c| matches!(&c.r#type,
        Some(csi::plugin_capability::Type::VolumeExpansion(e))
            if e.r#type == csi::plugin_capability::volume_expansion::Type::Online as i32)));
}

#[tokio::test]
async fn controller_expansion_checks_and_records() {
    let h = block(&[]);
    h.fake().set_usage(
        None,
        FsUsage {
            total_bytes: 1000 * MIB as u64,
            available_bytes: 100 * MIB as u64,
            ..Default::default()
        },
    );
    let v = create(&h, "a", 8 * MIB, &[]).await;
    let id = v.volume_id.clone();
    let r = h
        .ctl
        .controller_expand_volume(Request::new(expand_req(&id, 20 * MIB - 5, 0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.capacity_bytes, r.node_expansion_required),
        (20 * MIB, true)
    );
    assert_eq!(h.driver.store.get(&id).unwrap().capacity_bytes, 20 * MIB);
    // Smaller than it is: success, never a shrink.
    let r = h
        .ctl
        .controller_expand_volume(Request::new(expand_req(&id, 4 * MIB, 0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 20 * MIB);
    // Thin volumes may grow up to the filesystem's size; not beyond.
    assert_eq!(
        code(
            h.ctl
                .controller_expand_volume(Request::new(expand_req(&id, 900 * MIB, 0)))
                .await
        ),
        Code::Ok
    );
    assert_eq!(
        code(
            h.ctl
                .controller_expand_volume(Request::new(expand_req(&id, 2000 * MIB, 0)))
                .await
        ),
        Code::OutOfRange
    );
    assert_eq!(
        code(
            h.ctl
                .controller_expand_volume(Request::new(expand_req(&id, 0, 10 * MIB)))
                .await
        ),
        Code::OutOfRange
    );
    // Thick volumes need the free space now.
    let t = create(&h, "t", 8 * MIB, &[("allocation", "thick")]).await;
    assert_eq!(
        code(
            h.ctl
                .controller_expand_volume(Request::new(expand_req(&t.volume_id, 200 * MIB, 0)))
                .await
        ),
        Code::OutOfRange
    );
    // Validation.
    let mut no_range = expand_req(&id, 1, 0);
    no_range.capacity_range = None;
    assert_eq!(
        code(h.ctl.controller_expand_volume(Request::new(no_range)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            h.ctl
                .controller_expand_volume(Request::new(expand_req("", MIB, 0)))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            h.ctl
                .controller_expand_volume(Request::new(expand_req("nfs-x", MIB, 0)))
                .await
        ),
        Code::NotFound
    );
    // A block volume of another node: the node does the work and checks.
    let other = "block-0123456789abcdef0123456789abcdef";
    let r = h
        .ctl
        .controller_expand_volume(Request::new(expand_req(other, 3 * MIB + 1, 0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.capacity_bytes, r.node_expansion_required),
        (4 * MIB, true)
    );
    assert!(h.driver.store.get(other).is_none());
    // One this node made (its id carries this node's tag) that it does not
    // hold does not exist anywhere.
    let gone = format!("block-{}{}", berth::kinds::node_tag(NODE), "0".repeat(24));
    assert_eq!(
        code(
            h.ctl
                .controller_expand_volume(Request::new(expand_req(&gone, 3 * MIB, 0)))
                .await
        ),
        Code::NotFound
    );
    let deleted = create(&h, "deleted", 8 * MIB, &[]).await.volume_id;
    h.ctl
        .delete_volume(Request::new(csi::DeleteVolumeRequest {
            volume_id: deleted.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert_eq!(
        code(
            h.ctl
                .controller_expand_volume(Request::new(expand_req(&deleted, 16 * MIB, 0)))
                .await
        ),
        Code::NotFound
    );
}

/// Volume `id`'s file is still `bytes` long and its loop device was not
/// told to take a new size.
fn not_grown(h: &Harness, f: &FakeOs, id: &str, bytes: i64) {
    assert_eq!(std::fs::metadata(img(h, id)).unwrap().len(), bytes as u64);
    assert!(f
        .calls()
        .iter()
        .all(|c| !matches!(c, Call::LoopSetCapacity { .. })));
}

#[tokio::test]
async fn node_expansion_grows_file_device_and_filesystem_idempotently() {
    let h = block(&[]);
    let f = h.fake();
    script_blank(f);
    let v = create(&h, "a", 8 * MIB, &[]).await;
    let id = v.volume_id.clone();
    let (s, t) = (h.path("s"), h.path("t"));
    stage_and_publish(&h, &id, &s, &t).await;
    // A volume_path (and staging path) that does not hold the volume:
    // NOT_FOUND, and nothing grows.
    f.clear_calls();
    let mut elsewhere = node_expand_req(&id, Path::new("/etc"), &s, 16 * MIB);
    elsewhere.staging_target_path.clear();
    assert_eq!(
        code(h.node.node_expand_volume(Request::new(elsewhere)).await),
        Code::NotFound
    );
    not_grown(&h, f, &id, 8 * MIB);
    // A block capability for a volume that holds a filesystem:
    // INVALID_ARGUMENT, and nothing grows (before, the file grew, the
    // filesystem did not, and the answer said it was expanded).
    let mut raw = node_expand_req(&id, &t, &s, 16 * MIB);
    raw.volume_capability = Some(raw_cap());
    assert_eq!(
        code(h.node.node_expand_volume(Request::new(raw)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        std::fs::metadata(img(&h, &id)).unwrap().len(),
        8 * MIB as u64
    );
    f.clear_calls();
    let r = h
        .node
        .node_expand_volume(Request::new(node_expand_req(&id, &t, &s, 16 * MIB)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 16 * MIB);
    assert_eq!(
        std::fs::metadata(img(&h, &id)).unwrap().len(),
        16 * MIB as u64
    );
    assert!(f.calls().contains(&Call::LoopSetCapacity {
        device: "/dev/loop0".into()
    }));
    assert_eq!(runs(f, "resize2fs"), [["--", "/dev/loop0"]]);
    assert_eq!(h.driver.store.get(&id).unwrap().capacity_bytes, 16 * MIB);
    // Again: nothing to grow; the device is not touched, the filesystem
    // grow is a no-op for resize2fs.
    f.clear_calls();
    let r = h
        .node
        .node_expand_volume(Request::new(node_expand_req(&id, &t, &s, 16 * MIB)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 16 * MIB);
    assert!(!f
        .calls()
        .iter()
        .any(|c| matches!(c, Call::LoopSetCapacity { .. })));
    // A crash after the file grew but before the device did: the retry
    // repairs it.
    std::fs::OpenOptions::new()
        .write(true)
        .open(img(&h, &id))
        .unwrap()
        .set_len(24 * MIB as u64)
        .unwrap();
    f.clear_calls();
    let r = h
        .node
        .node_expand_volume(Request::new(node_expand_req(&id, &t, &s, 24 * MIB)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 24 * MIB);
    assert!(f
        .calls()
        .iter()
        .any(|c| matches!(c, Call::LoopSetCapacity { .. })));
    assert_eq!(runs(f, "resize2fs").len(), 1);
    // Never shrinks.
    let r = h
        .node
        .node_expand_volume(Request::new(node_expand_req(&id, &t, &s, 2 * MIB)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 24 * MIB);
    // Beyond the pool: OUT_OF_RANGE, nothing changes.
    let e = h
        .node
        .node_expand_volume(Request::new(node_expand_req(&id, &t, &s, 1 << 50)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange);
    assert_eq!(
        std::fs::metadata(img(&h, &id)).unwrap().len(),
        24 * MIB as u64
    );
    // A failing resize2fs is an error (the CO retries).
    f.reply("resize2fs", out(1, ""));
    assert_eq!(
        code(
            h.node
                .node_expand_volume(Request::new(node_expand_req(&id, &t, &s, 32 * MIB)))
                .await
        ),
        Code::Internal
    );
    assert_eq!(
        code(
            h.node
                .node_expand_volume(Request::new(node_expand_req(&id, &t, &s, 32 * MIB)))
                .await
        ),
        Code::Ok
    );
}

/// A formatted volume whose filesystem has no read-write mount (its mounts
/// taken away by hand while the loop device stays attached, or not staged
/// at all) cannot grow its filesystem: NodeExpandVolume is
/// FAILED_PRECONDITION, and its file and device are left as they were.
/// Before, the file grew first (a thick volume allocated) and then the
/// request was refused.
/// A volume_capability the volume does not offer (an access mode for
/// several nodes, a filesystem type other than ext4 and xfs) is the
/// spec's "Exceeds capabilities" row of ControllerExpandVolume and
/// NodeExpandVolume: INVALID_ARGUMENT, and nothing grows or is recorded.
/// Before, both expand RPCs checked only the capability's form and grew
/// the volume.
#[tokio::test]
async fn an_expansion_with_a_capability_the_volume_does_not_offer_is_invalid() {
    let h = block(&[]);
    let f = h.fake();
    script_blank(f);
    let id = create(&h, "a", 8 * MIB, &[("allocation", "thick")])
        .await
        .volume_id;
    let (s, t) = (h.path("s"), h.path("t"));
    stage_and_publish(&h, &id, &s, &t).await;
    f.clear_calls();
    for cap in [
        mount_cap(Mode::MultiNodeMultiWriter),
        block_cap(Mode::MultiNodeReaderOnly),
        fs_cap("btrfs"),
    ] {
        let r = h
            .ctl
            .controller_expand_volume(Request::new(csi::ControllerExpandVolumeRequest {
                volume_capability: Some(cap.clone()),
                ..expand_req(&id, 16 * MIB, 0)
            }))
            .await;
        assert_eq!(code(r), Code::InvalidArgument, "{cap:?}");
        let r = h
            .node
            .node_expand_volume(Request::new(csi::NodeExpandVolumeRequest {
                volume_capability: Some(cap.clone()),
                ..node_expand_req(&id, &t, &s, 16 * MIB)
            }))
            .await;
        assert_eq!(code(r), Code::InvalidArgument, "{cap:?}");
    }
    not_grown(&h, f, &id, 8 * MIB);
    assert!(runs(f, "resize2fs").is_empty());
    assert_eq!(h.driver.store.get(&id).unwrap().capacity_bytes, 8 * MIB);
}

#[tokio::test]
async fn a_refused_node_expansion_grows_nothing() {
    let h = block(&[]);
    let f = h.fake();
    script_blank(f);
    let id = create(&h, "a", 8 * MIB, &[("allocation", "thick")])
        .await
        .volume_id;
    let (s, t) = (h.path("s"), h.path("t"));
    stage_and_publish(&h, &id, &s, &t).await;
    let refused = |e: tonic::Status| {
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(
            e.message().contains("not mounted read-write"),
            "{}",
            e.message()
        );
    };
    let grew_nothing = |f: &FakeOs| {
        not_grown(&h, f, &id, 8 * MIB);
        assert!(runs(f, "resize2fs").is_empty());
        assert_eq!(h.driver.store.get(&id).unwrap().capacity_bytes, 8 * MIB);
    };
    // Unstaged by hand (unmounted, the loop device detached): the
    // filesystem is grown once staged. (One mounted read-only only is
    // grown at its next read-write stage:
    // a_node_expansion_of_a_filesystem_staged_read_only_is_finished_at_the_next_read_write_stage.)
    use berth::os::Mounter;
    f.unmount(&t).unwrap();
    f.unmount(&s).unwrap();
    assert_eq!(f.loops().len(), 1);
    use berth::os::LoopDevices;
    f.detach(&f.loops()[0].device).unwrap();
    assert!(f.loops().is_empty());
    f.clear_calls();
    refused(
        h.node
            .node_expand_volume(Request::new(node_expand_req(&id, &t, &s, 16 * MIB)))
            .await
            .unwrap_err(),
    );
    grew_nothing(f);
}

/// Cuts the backing file of volume `id` to `len` bytes, as an operator's
/// `truncate` would.
fn cut(h: &Harness, id: &str, len: i64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(img(h, id))
        .unwrap()
        .set_len(len as u64)
        .unwrap();
}

/// A backing file cut short by hand (here to half its size while staged
/// and published, its data past the cut gone) is damage: NodeExpandVolume,
/// CreateSnapshot and NodeStageVolume (again, or after an unstage) refuse
/// it (FAILED_PRECONDITION) and say so; it is not grown back with zeros,
/// as an interrupted expansion is, and `state check` reports it as an
/// error. Before, the next stage or expansion grew it back, reported
/// healthy.
#[tokio::test]
async fn a_backing_file_cut_short_is_damage_not_grown_back() {
    let h = block(&[]);
    let f = h.fake();
    script_blank(f);
    let id = create(&h, "a", 16 * MIB, &[]).await.volume_id;
    assert_eq!(block_info(&h, &id).file_bytes, Some(16 << 20));
    let (s, t) = (h.path("s"), h.path("t"));
    stage_and_publish(&h, &id, &s, &t).await;
    write_at(&img(&h, &id), b"the tenant's last page", (12 * MIB) as u64);
    cut(&h, &id, 8 * MIB);
    f.clear_calls();
    let refused = |e: tonic::Status| {
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(
            e.message().contains("cut short")
                && e.message().contains(&format!("has {} bytes", 8 * MIB))
                && e.message()
                    .contains(&format!("the {} Berth made it", 16 * MIB)),
            "{}",
            e.message()
        );
    };
    refused(
        h.node
            .node_expand_volume(Request::new(node_expand_req(&id, &t, &s, 32 * MIB)))
            .await
            .unwrap_err(),
    );
    refused(
        h.ctl
            .create_snapshot(Request::new(csi::CreateSnapshotRequest {
                name: "s".into(),
                source_volume_id: id.clone(),
                ..Default::default()
            }))
            .await
            .unwrap_err(),
    );
    refused(
        h.node
            .node_stage_volume(Request::new(stage_req(&id, &s)))
            .await
            .unwrap_err(),
    );
    unpublish_as_kubelet(&h, &id, &t).await.unwrap();
    unstage_as_kubelet(&h, &id, &s).await.unwrap();
    refused(
        h.node
            .node_stage_volume(Request::new(stage_req(&id, &s)))
            .await
            .unwrap_err(),
    );
    // Nothing was grown, attached, resized or formatted.
    assert_eq!(
        std::fs::metadata(img(&h, &id)).unwrap().len(),
        8 * MIB as u64
    );
    assert_eq!(count(f, is_attach), 0);
    assert!(f
        .calls()
        .iter()
        .all(|c| !matches!(c, Call::LoopSetCapacity { .. })));
    assert!(runs(f, "mkfs.ext4").is_empty() && runs(f, "resize2fs").is_empty());
    let (ok, text) = state_check(&h);
    assert!(!ok, "{text}");
    assert!(text.contains(&id) && text.contains("cut short"), "{text}");
    // The whole file put back: staged as before.
    cut(&h, &id, 16 * MIB);
    h.node
        .node_stage_volume(Request::new(stage_req(&id, &s)))
        .await
        .unwrap();
    assert!(state_check(&h).0);
}

/// An expansion recorded by ControllerExpandVolume whose file has not grown
/// yet (the volume was not staged, or a crash came between) is not damage:
/// the next stage grows the file and records its new length. A record of
/// an older version, which does not know the length Berth made the file,
/// is grown as before.
#[tokio::test]
async fn an_expansion_under_way_is_completed_at_stage_and_recorded() {
    let h = block(&[]);
    let f = h.fake();
    script_blank(f);
    let id = create(&h, "a", 8 * MIB, &[]).await.volume_id;
    h.ctl
        .controller_expand_volume(Request::new(expand_req(&id, 24 * MIB, 0)))
        .await
        .unwrap();
    assert_eq!(h.driver.store.get(&id).unwrap().capacity_bytes, 24 * MIB);
    assert_eq!(block_info(&h, &id).file_bytes, Some(8 << 20));
    let (ok, text) = state_check(&h);
    assert!(ok && text.contains("interrupted expansion"), "{text}");
    let s = h.path("s");
    h.node
        .node_stage_volume(Request::new(stage_req(&id, &s)))
        .await
        .unwrap();
    assert_eq!(
        std::fs::metadata(img(&h, &id)).unwrap().len(),
        24 * MIB as u64
    );
    assert_eq!(block_info(&h, &id).file_bytes, Some(24 << 20));
    h.node
        .node_unstage_volume(Request::new(unstage(&id, &s)))
        .await
        .unwrap();
    // A record without the length (older versions): a short file is grown
    // back as before, and its length is recorded from then on.
    let mut rec = h.driver.store.get(&id).unwrap();
    rec.block.as_mut().unwrap().file_bytes = None;
    h.driver.store.put(&rec).unwrap();
    cut(&h, &id, 16 * MIB);
    h.node
        .node_stage_volume(Request::new(stage_req(&id, &s)))
        .await
        .unwrap();
    assert_eq!(
        std::fs::metadata(img(&h, &id)).unwrap().len(),
        24 * MIB as u64
    );
    assert_eq!(block_info(&h, &id).file_bytes, Some(24 << 20));
}

/// Two thick volumes of 8 MiB with 84 MiB free beside them, each
/// expanded to 80 MiB by ControllerExpandVolume (72 MiB more each, 144 in
/// all). Before, both were answered OK: each checked the free space and
/// took none of it, so the second's NodeExpandVolume failed OUT_OF_RANGE
/// at every retry (its PV said 80 MiB the pool never had), and GetCapacity
/// still offered the space meanwhile. Now ControllerExpandVolume allocates
/// a thick volume's growth before it answers: the second is OUT_OF_RANGE
/// and records nothing, GetCapacity shows the space taken, and the first
/// one's NodeExpandVolume finds its file grown.
#[tokio::test]
async fn thick_expansions_never_promise_more_than_is_free() {
    let h = block(&[]);
    let f = h.fake();
    script_blank(f);
    f.set_usage(
        None,
        FsUsage {
            total_bytes: 1000 * MIB as u64,
            available_bytes: 100 * MIB as u64,
            ..Default::default()
        },
    );
    f.set_allocation_takes_free(true);
    let a = create(&h, "a", 8 * MIB, THICK).await.volume_id;
    let b = create(&h, "b", 8 * MIB, THICK).await.volume_id;
    let free = capacity_of(&h, "block", THICK).await;
    assert!((83 * MIB..=84 * MIB).contains(&free), "{free}");
    let r = h
        .ctl
        .controller_expand_volume(Request::new(expand_req(&a, 80 * MIB, 0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.capacity_bytes, r.node_expansion_required),
        (80 * MIB, true)
    );
    let left = capacity_of(&h, "block", THICK).await;
    assert!(left <= free - 72 * MIB, "{left} of {free} still offered");
    let e = h
        .ctl
        .controller_expand_volume(Request::new(expand_req(&b, 80 * MIB, 0)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert_eq!(h.driver.store.get(&b).unwrap().capacity_bytes, 8 * MIB);
    assert_eq!(
        std::fs::metadata(img(&h, &b)).unwrap().len(),
        8 * MIB as u64
    );
    // The first one's node finishes: the device and the filesystem grow.
    let (s, t) = (h.path("s"), h.path("t"));
    stage_and_publish(&h, &a, &s, &t).await;
    let r = h
        .node
        .node_expand_volume(Request::new(node_expand_req(&a, &t, &s, 80 * MIB)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 80 * MIB);
    assert_eq!(
        std::fs::metadata(img(&h, &a)).unwrap().len(),
        80 * MIB as u64
    );
    assert_eq!(block_info(&h, &a).file_bytes, Some(80 << 20));
}

#[tokio::test]
async fn xfs_grows_on_the_mount_point_and_unmounted_filesystems_wait() {
    let h = block(&[]);
    let f = h.fake();
    script_blank(f);
    let v = create(&h, "x", 300 * MIB, &[("fsType", "xfs")]).await;
    let id = v.volume_id.clone();
    let s = h.path("s");
    h.node
        .node_stage_volume(Request::new(stage_req(&id, &s)))
        .await
        .unwrap();
    h.node
        .node_expand_volume(Request::new(node_expand_req(&id, &s, &s, 400 * MIB)))
        .await
        .unwrap();
    assert_eq!(
        runs(f, "xfs_growfs"),
        [["--".to_string(), s.display().to_string()]]
    );
    h.node
        .node_unstage_volume(Request::new(unstage(&id, &s)))
        .await
        .unwrap();
    // Formatted but not staged: the file grows, the filesystem cannot (the
    // CO retries once the volume is staged).
    let e = h
        .node
        .node_expand_volume(Request::new(node_expand_req(&id, &s, &s, 500 * MIB)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    // Unknown volumes and missing paths.
    assert_eq!(
        code(
            h.node
                .node_expand_volume(Request::new(node_expand_req(
                    "block-0123456789abcdef0123456789abcdef",
                    &s,
                    &s,
                    MIB
                )))
                .await
        ),
        Code::NotFound
    );
    let mut no_path = node_expand_req(&id, &s, &s, MIB);
    no_path.volume_path.clear();
    assert_eq!(
        code(h.node.node_expand_volume(Request::new(no_path)).await),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn raw_volumes_grow_the_device_only() {
    let h = block(&[]);
    let f = h.fake();
    let v = create(&h, "r", 4 * MIB, &[]).await;
    let id = v.volume_id.clone();
    let s = h.path("s");
    std::fs::create_dir(&s).unwrap();
    h.node
        .node_stage_volume(Request::new(stage_with(&id, &s, raw_cap())))
        .await
        .unwrap();
    let mut req = node_expand_req(&id, &s.join(&id), &s, 8 * MIB);
    req.volume_capability = Some(raw_cap());
    let r = h
        .node
        .node_expand_volume(Request::new(req))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 8 * MIB);
    assert!(f
        .calls()
        .iter()
        .any(|c| matches!(c, Call::LoopSetCapacity { .. })));
    assert!(runs(f, "resize2fs").is_empty() && runs(f, "xfs_growfs").is_empty());
}

// ------------------------------------------------------------ Disk pool

/// Three stand-in disks (regular files the pool lists; the fake answers
/// for them as block devices): 10, 20 and 30 MiB, each with a by-id link
/// (`by-id/ata-DISK_<name>` beside the pool's directory). blkid finds a
/// signature on `busy` only.
fn disks(h: &Harness, busy: Option<&str>) -> PathBuf {
    let dir = h.path("disks");
    register_disks(h.fake(), &dir, busy);
    dir
}

/// `disks` on a fake of its own (one made before a restart).
fn register_disks(f: &FakeOs, dir: &Path, busy: Option<&str>) {
    std::fs::create_dir_all(dir).unwrap();
    let by_id = dir.with_file_name("by-id");
    std::fs::create_dir_all(&by_id).unwrap();
    for (i, (name, size)) in [("d10", 10), ("d20", 20), ("d30", 30)]
        .into_iter()
        .enumerate()
    {
        let p = dir.join(name);
        if !p.exists() {
            std::fs::write(&p, b"").unwrap();
        }
        f.add_device(&p, 8, 16 * (i as u32 + 1), (size * MIB) as u64);
        // Its by-id link (a serial's), as udev makes.
        let link = by_id.join(format!("ata-DISK_{name}"));
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(&p, &link).unwrap();
        }
    }
    f.set_by_id_dir(&by_id);
    let busy = busy.map(|b| dir.join(b).display().to_string());
    f.respond("blkid", move |args| {
        if args.last() == busy.as_ref() {
            out(0, "TYPE=xfs\nUSAGE=filesystem\n")
        } else {
            out(2, "")
        }
    });
    for p in ["mkfs.ext4", "wipefs", "resize2fs"] {
        f.respond(p, |_| out(0, ""));
    }
}

fn disk_harness() -> Harness {
    // --disk-pool is parsed before the disks exist; it is expanded on use.
    let dir = tempfile::tempdir().unwrap();
    let pool = format!("{}/disks/d*", dir.path().display());
    let (os, f) = berth::os::Os::fake();
    build(
        dir,
        os,
        Some(f),
        &["--kinds", "block", "--disk-pool", &pool],
    )
}

/// The marker of disk volume `id` (`block::disk_marker`).
fn disk_marker(h: &Harness, id: &str) -> PathBuf {
    h.path("block").join(".disks").join(id)
}

async fn disk_capacity(h: &Harness) -> (i64, Option<i64>) {
    let c = h
        .ctl
        .get_capacity(Request::new(csi::GetCapacityRequest {
            parameters: params(&[("pool", "disk")]),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    (c.available_capacity, c.maximum_volume_size)
}

/// A disk record naming a device the pool does not name (forged into the
/// journal with a valid checksum and an id of its kind, or the device
/// taken out of `--disk-pool` since): berth never erases it. Before, the
/// "interrupted delete" of such a record zeroed that device at start-up
/// (whatever it held: the host's own disk, if its numbers and size were
/// given), since a disk's record was trusted as proof that the disk was
/// Berth's. `state check` reports it as an error.
#[tokio::test]
async fn a_disk_record_naming_a_device_outside_the_pool_never_erases_it() {
    use berth::state::{DiskRef, Phase};
    let h = disk_harness();
    disks(&h, None);
    let a = create(&h, "a", 5 * MIB, &[("pool", "disk")]).await;
    let template = h.driver.store.get(&a.volume_id).unwrap();
    let dir = h.stop();
    let host = dir.path().join("host-sda");
    std::fs::write(&host, b"the host's own data").unwrap();
    let mut forged = template.clone();
    forged.id = format!("block-{}", "f".repeat(32));
    forged.name = "forged".into();
    forged.seq = 100;
    forged.phase = Phase::Deleting;
    let mut info = forged.block.clone().unwrap();
    info.disk = Some(DiskRef {
        path: host.clone(),
        device: host.clone(),
        by_id: None,
        major: 8,
        minor: 0,
        size_bytes: (64 * MIB) as u64,
        loop_backing: None,
        loop_range: None,
        extra: None,
    });
    forged.block = Some(info);
    forge_records(dir.path(), &[forged.clone()], &[]);

    let (os, f) = berth::os::Os::fake();
    let f = f.clone();
    register_disks(&f, &dir.path().join("disks"), None);
    f.add_device(&host, 8, 0, (64 * MIB) as u64);
    let pool = format!("{}/disks/d*", dir.path().display());
    let h = build(
        dir,
        os,
        Some(f.clone()),
        &["--kinds", "block", "--disk-pool", &pool],
    );
    retry_pending_and_wait(&h).await;
    let erased: Vec<_> = f
        .calls()
        .into_iter()
        .filter(|c| {
            matches!(c, Call::ZeroOut { device, .. } | Call::ZeroSample { device, .. } if device == &host)
        })
        .collect();
    assert!(erased.is_empty(), "{erased:?}");
    assert!(runs(&f, "wipefs").is_empty());
    assert_eq!(std::fs::read(&host).unwrap(), b"the host's own data");
    assert!(
        h.driver.store.get(&forged.id).is_some(),
        "the record was dropped"
    );
    let (clean, out) = state_check(&h);
    assert!(!clean, "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("error:")
            && l.contains(&forged.id)
            && l.contains("--disk-pool")),
        "{out}"
    );
    // The pool's own volume is deleted as before: its disk erased.
    delete(&h, &a.volume_id).await;
    assert!(f
        .calls()
        .iter()
        .any(|c| matches!(c, Call::ZeroOut { device, .. } if device == &h.path("disks/d10"))));
}

/// A disk volume that may be formatted xfs gets a disk mkfs.xfs accepts
/// (300 MiB at least), and GetCapacity for that capability says none fits
/// when no free disk is that large. Before, a 5 MiB xfs claim got the
/// 10 MiB disk, which NodeStageVolume then refused to format on every
/// try (the pod never started), and GetCapacity answered 30 MiB.
#[tokio::test]
async fn a_disk_too_small_for_the_filesystem_is_not_handed_out() {
    let h = disk_harness();
    disks(&h, None);
    let xfs = [("pool", "disk"), ("fsType", "xfs")];
    let mount = mount_cap(Mode::SingleNodeWriter);
    let c = h
        .ctl
        .get_capacity(Request::new(csi::GetCapacityRequest {
            parameters: params(&xfs),
            volume_capabilities: vec![mount.clone()],
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            c.available_capacity,
            c.maximum_volume_size,
            c.minimum_volume_size
        ),
        (0, Some(0), Some(300 * MIB)),
        "{c:?}"
    );
    let mut req = create_req_p("x", 5 * MIB, &xfs);
    req.volume_capabilities = vec![mount.clone()];
    let e = h.ctl.create_volume(Request::new(req)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let mut req = create_req_p("y", 5 * MIB, &xfs);
    req.volume_capabilities = vec![mount.clone()];
    req.capacity_range.as_mut().unwrap().limit_bytes = 100 * MIB;
    let e = h.ctl.create_volume(Request::new(req)).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(e.message().contains("mkfs.xfs"), "{e:?}");
    // A raw block volume of the class, or an ext4 one, still gets d10.
    for (name, cap, kv) in [
        ("raw", raw_cap(), &xfs[..]),
        ("ext4", mount.clone(), &xfs[..1]),
    ] {
        let mut req = create_req_p(name, 5 * MIB, kv);
        req.volume_capabilities = vec![cap];
        let v = h
            .ctl
            .create_volume(Request::new(req))
            .await
            .expect(name)
            .into_inner()
            .volume
            .unwrap();
        assert_eq!(v.capacity_bytes, 10 * MIB, "{name}");
        h.ctl
            .delete_volume(Request::new(csi::DeleteVolumeRequest {
                volume_id: v.volume_id,
                ..Default::default()
            }))
            .await
            .unwrap();
        wait_for_block_records(&h, &[]);
    }
    assert!(h.driver.store.filter(|_| true).is_empty());
}

/// A disk create without `required_bytes` (the CSI spec leaves the size
/// to the plugin then) takes the smallest free disk of the range: at
/// least 1 byte, or its source's size for a restore, and at most
/// `limit_bytes`. Before, the file pool's default size was asked for:
/// at least 1 GiB (or exactly `limit_bytes` below it), so a pool of
/// smaller disks answered RESOURCE_EXHAUSTED with every disk free.
#[tokio::test]
async fn a_disk_create_without_required_bytes_takes_the_smallest_free_disk() {
    let h = disk_harness();
    disks(&h, None);
    let no_range = |name: &str| csi::CreateVolumeRequest {
        capacity_range: None,
        ..create_req_p(name, 0, &[("pool", "disk")])
    };
    let size = |r: csi::CreateVolumeResponse| r.volume.unwrap().capacity_bytes;
    let a = h
        .ctl
        .create_volume(Request::new(no_range("a")))
        .await
        .unwrap_or_else(|e| panic!("no range: {e:?}"))
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(a.capacity_bytes, 10 * MIB);
    // Its repeat is the same volume.
    let again = h
        .ctl
        .create_volume(Request::new(no_range("a")))
        .await
        .unwrap();
    assert_eq!(again.into_inner().volume.unwrap().volume_id, a.volume_id);
    // A restore: at least its source's 10 MiB (d20, not nothing).
    let snap = snapshot_id(&h, "s", &a.volume_id).await;
    let mut req = no_range("r");
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource { snapshot_id: snap },
        )),
    });
    let r = h.ctl.create_volume(Request::new(req)).await;
    assert_eq!(size(r.unwrap().into_inner()), 20 * MIB);
    // limit_bytes only: the smallest free disk of at most it.
    let e = h
        .ctl
        .create_volume(Request::new(disk_req("b", 0, 25 * MIB)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains(" to 26214400 bytes"),
        "{}",
        e.message()
    );
    let b = h
        .ctl
        .create_volume(Request::new(disk_req("b", 0, 40 * MIB)))
        .await;
    assert_eq!(size(b.unwrap().into_inner()), 30 * MIB);
}

#[tokio::test]
async fn disk_pool_hands_out_the_smallest_fitting_blank_disk() {
    let h = disk_harness();
    let dir = disks(&h, Some("d20"));
    // d20 has a signature: not offered.
    assert_eq!(disk_capacity(&h).await, (40 * MIB, Some(30 * MIB)));
    let a = create(&h, "a", 5 * MIB, &[("pool", "disk")]).await;
    assert_eq!(a.capacity_bytes, 10 * MIB);
    let rec = h.driver.store.get(&a.volume_id).unwrap();
    let disk = rec.block.unwrap().disk.unwrap();
    assert_eq!(
        (disk.path.clone(), disk.major, disk.minor),
        (dir.join("d10"), 8, 16)
    );
    assert!(
        !img(&h, &a.volume_id).exists(),
        "no backing file for a disk"
    );
    assert_eq!(disk_capacity(&h).await, (30 * MIB, Some(30 * MIB)));
    // The next one gets d30 (d10 is claimed, d20 is not blank).
    let b = create(&h, "b", 5 * MIB, &[("pool", "disk")]).await;
    assert_eq!(b.capacity_bytes, 30 * MIB);
    assert_eq!(disk_capacity(&h).await, (0, Some(0)));
    let e = h
        .ctl
        .create_volume(Request::new(create_req_p(
            "c",
            5 * MIB,
            &[("pool", "disk")],
        )))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    let e = h
        .ctl
        .create_volume(Request::new(create_req_p(
            "d",
            40 * MIB,
            &[("pool", "disk")],
        )))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().contains("has no disk"), "{}", e.message());
    // Idempotent by name.
    assert_eq!(
        create(&h, "a", 5 * MIB, &[("pool", "disk")])
            .await
            .volume_id,
        a.volume_id
    );

    // Stage uses the disk itself: no loop device.
    let f = h.fake();
    f.clear_calls();
    let s = h.path("s");
    h.node
        .node_stage_volume(Request::new(stage_req(&a.volume_id, &s)))
        .await
        .unwrap();
    assert_eq!(count(f, is_attach), 0);
    assert_eq!(
        runs(f, "mkfs.ext4").last().unwrap().last().unwrap(),
        &dir.join("d10").display().to_string()
    );
    // A disk cannot grow beyond itself.
    assert_eq!(
        code(
            h.ctl
                .controller_expand_volume(Request::new(expand_req(&a.volume_id, 20 * MIB, 0)))
                .await
        ),
        Code::OutOfRange
    );
    let r = h
        .ctl
        .controller_expand_volume(Request::new(expand_req(&a.volume_id, 10 * MIB, 0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.capacity_bytes, r.node_expansion_required),
        (10 * MIB, false)
    );
    h.node
        .node_unstage_volume(Request::new(unstage(&a.volume_id, &s)))
        .await
        .unwrap();

    // What the tenant wrote (the stand-in disk is a plain file).
    std::fs::write(dir.join("d10"), b"tenant data").unwrap();
    // Delete wipes the disk and gives it back, reading the mount table
    // once for the "in use?" check and its own check before wiping.
    let reads = f.table_reads();
    h.ctl
        .delete_volume(Request::new(csi::DeleteVolumeRequest {
            volume_id: a.volume_id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert_eq!(f.table_reads() - reads, 1);
    // The default --disk-wipe zero: the whole disk, not only signatures.
    assert!(runs(f, "wipefs").is_empty());
    assert!(f.calls().contains(&Call::ZeroOut {
        device: dir.join("d10"),
        size_bytes: (10 * MIB) as u64,
    }));
    let left = std::fs::read(dir.join("d10")).unwrap();
    assert_eq!(left.len() as i64, 10 * MIB);
    assert!(
        left.iter().all(|&b| b == 0),
        "the last tenant's data is readable"
    );
    assert_eq!(disk_capacity(&h).await, (10 * MIB, Some(10 * MIB)));
}

/// A crash left one disk volume half deleted and another half created
/// (killed before its marker and Ready record: no marker): at start-up the
/// first is zeroed in the background (start-up does not wait for a
/// whole-disk wipe) and the second released without a wipe (never handed
/// out, nothing written).
#[tokio::test]
async fn interrupted_disk_deletes_finish_in_the_background_and_creates_release() {
    let h = disk_harness();
    let dir = disks(&h, None);
    let a = create(&h, "a", 5 * MIB, &[("pool", "disk")]).await;
    let b = create(&h, "b", 15 * MIB, &[("pool", "disk")]).await;
    let store = &h.driver.store;
    let mut ra = store.get(&a.volume_id).unwrap();
    store.set_phase(&mut ra, Phase::Deleting).unwrap();
    let mut rb = store.get(&b.volume_id).unwrap();
    store.set_phase(&mut rb, Phase::Creating).unwrap();
    std::fs::remove_file(disk_marker(&h, &b.volume_id)).unwrap();
    std::fs::write(dir.join("d10"), b"tenant a").unwrap();
    let pool = format!("{}/d*", dir.display());
    let tmp = h.stop();
    let (os, f) = berth::os::Os::fake();
    register_disks(&f, &dir, None);
    let h = build(
        tmp,
        os,
        Some(f.clone()),
        &["--kinds", "block", "--disk-pool", &pool],
    );
    assert!(h.driver.store.get(&b.volume_id).is_none());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while h.driver.store.get(&a.volume_id).is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the interrupted delete never finished"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let zeroed: Vec<_> = f
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::ZeroOut { device, .. } => Some(device),
            _ => None,
        })
        .collect();
    assert_eq!(zeroed, [dir.join("d10")]);
    assert!(std::fs::read(dir.join("d10"))
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    assert_eq!(disk_capacity(&h).await, (60 * MIB, Some(30 * MIB)));
}

/// `size` bytes of `byte` everywhere but in the sample of a disk of that
/// size (which stays zeros): a disk that counts as free though it holds
/// data.
fn outside_sample(size: i64, byte: u8) -> Vec<u8> {
    let mut v = vec![byte; size as usize];
    for (start, len) in berth::os::blockdev::sample_ranges(size as u64) {
        v[start as usize..(start + len) as usize].fill(0);
    }
    v
}

/// What a raw tenant leaves on a stand-in disk of `size` bytes: data in
/// its first and last MiB, in one of its spaced sampled blocks and
/// between two of them. Returns where the last one is.
fn tenant_writes_raw(disk: &Path, size: i64) -> u64 {
    let r = berth::os::blockdev::sample_ranges(size as u64);
    let gap = r[2].0 + r[2].1 + 100;
    for at in [0, r[3].0 + 10, (size - 10) as u64, gap] {
        write_at(disk, b"tenant data", at);
    }
    gap
}

/// --disk-wipe signatures: wipefs, then the disk's sample is zeroed (the
/// pool offers only disks whose sample reads as zeros, so a disk Berth
/// erased itself stays in the pool), nothing else: a byte of the last
/// tenant's between the sampled blocks is still there. The same when a
/// disk missing at delete is back and its wipe is retried.
#[tokio::test]
async fn disk_wipe_signatures_runs_wipefs_and_zeroes_the_sample_only() {
    let dir = tempfile::tempdir().unwrap();
    let pool = format!("{}/disks/d*", dir.path().display());
    let (os, f) = berth::os::Os::fake();
    let h = build(
        dir,
        os,
        Some(f),
        &[
            "--kinds",
            "block",
            "--disk-pool",
            &pool,
            "--disk-wipe",
            "signatures",
        ],
    );
    let dir = disks(&h, None);
    let a = create(&h, "a", 5 * MIB, &[("pool", "disk")]).await;
    let f = h.fake();
    let d10 = dir.join("d10");
    let gap = tenant_writes_raw(&d10, 10 * MIB);
    h.ctl
        .delete_volume(Request::new(csi::DeleteVolumeRequest {
            volume_id: a.volume_id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert_eq!(
        runs(f, "wipefs"),
        [["-a".to_string(), "--".into(), d10.display().to_string()]]
    );
    assert!(!f.calls().iter().any(|c| matches!(c, Call::ZeroOut { .. })));
    assert!(f.calls().contains(&Call::ZeroSample {
        device: d10.clone(),
        size_bytes: (10 * MIB) as u64,
    }));
    let left = std::fs::read(&d10).unwrap();
    for (start, len) in berth::os::blockdev::sample_ranges((10 * MIB) as u64) {
        let end = ((start + len) as usize).min(left.len());
        assert!(
            left[start as usize..end].iter().all(|&b| b == 0),
            "sample at {start} not zeroed"
        );
    }
    assert_eq!(&left[gap as usize..gap as usize + 11], b"tenant data");
    // Offered again.
    assert_eq!(disk_capacity(&h).await, (60 * MIB, Some(30 * MIB)));

    // A disk missing at delete, back at its path: the retried wipe is the
    // same, and the disk is offered again.
    let b = create(&h, "b", 15 * MIB, &[("pool", "disk")]).await;
    assert_eq!(b.capacity_bytes, 20 * MIB);
    let d20 = dir.join("d20");
    tenant_writes_raw(&d20, 20 * MIB);
    f.remove_device(&d20);
    h.ctl
        .delete_volume(Request::new(csi::DeleteVolumeRequest {
            volume_id: b.volume_id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert_eq!(h.driver.store.len(), 1, "the wipe is remembered");
    f.add_device(&d20, 8, 32, (20 * MIB) as u64);
    assert_eq!(disk_capacity(&h).await, (40 * MIB, Some(30 * MIB)));
    h.driver.retry_pending(false);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !h.driver.store.is_empty() {
        assert!(std::time::Instant::now() < deadline, "the wipe never ran");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(f.calls().contains(&Call::ZeroSample {
        device: d20.clone(),
        size_bytes: (20 * MIB) as u64,
    }));
    assert_eq!(disk_capacity(&h).await, (60 * MIB, Some(30 * MIB)));
}

#[tokio::test]
async fn a_limit_below_every_fitting_disk_is_resource_exhausted() {
    let h = disk_harness();
    disks(&h, None);
    let e = h
        .ctl
        .create_volume(Request::new(disk_req("a", 11 * MIB, 19 * MIB)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    let v = h
        .ctl
        .create_volume(Request::new(disk_req("a", 11 * MIB, 25 * MIB)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.volume.unwrap().capacity_bytes, 20 * MIB);
}

#[tokio::test]
async fn a_replaced_disk_is_neither_used_nor_wiped() {
    let h = disk_harness();
    let dir = disks(&h, None);
    let a = create(&h, "a", 5 * MIB, &[("pool", "disk")]).await;
    let f = h.fake();
    // Another disk of another size now answers at the same path.
    f.add_device(&dir.join("d10"), 8, 16, (12 * MIB) as u64);
    let e = h
        .node
        .node_stage_volume(Request::new(stage_req(&a.volume_id, &h.path("s"))))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let get = || {
        h.ctl
            .controller_get_volume(Request::new(csi::ControllerGetVolumeRequest {
                volume_id: a.volume_id.clone(),
            }))
    };
    let c = get().await.unwrap().into_inner();
    assert!(c.status.unwrap().volume_condition.unwrap().abnormal);
    let e = h
        .ctl
        .delete_volume(Request::new(csi::DeleteVolumeRequest {
            volume_id: a.volume_id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(runs(f, "wipefs").is_empty() && runs(f, "mkfs.ext4").is_empty());
    // Its delete began (the record says Deleting): NOT_FOUND for
    // ControllerGetVolume, as for every call that describes or uses it.
    let e = get().await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    // A disk that is gone: deleting the volume wipes nothing (there is
    // nothing to wipe)...
    f.remove_device(&dir.join("d10"));
    h.ctl
        .delete_volume(Request::new(csi::DeleteVolumeRequest {
            volume_id: a.volume_id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert!(runs(f, "wipefs").is_empty());
    // ... but the disk is remembered: when it comes back (the tenant's
    // data still on it) it is not offered until it has been wiped. (It was
    // released unwiped, and the next volume got the old data.)
    let listed = h
        .ctl
        .list_volumes(Request::new(Default::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.entries.is_empty(), "{listed:?}");
    std::fs::write(dir.join("d10"), b"tenant a's data").unwrap();
    f.add_device(&dir.join("d10"), 8, 16, (10 * MIB) as u64);
    let (total, _) = disk_capacity(&h).await;
    assert_eq!(total, 50 * MIB, "d10 offered before it was wiped");
    let e = h
        .ctl
        .create_volume(Request::new(create_req_p(
            "b",
            10 * MIB,
            &[("pool", "disk")],
        )))
        .await
        .unwrap();
    assert_ne!(e.into_inner().volume.unwrap().capacity_bytes, 10 * MIB);
    h.driver.retry_pending(false);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while h.driver.store.len() > 1 {
        assert!(std::time::Instant::now() < deadline, "the wipe never ran");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(f
        .calls()
        .iter()
        .any(|c| matches!(c, Call::ZeroOut { device, .. } if device == &dir.join("d10"))));
    assert!(std::fs::read(dir.join("d10"))
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    let c = create(&h, "c", 10 * MIB, &[("pool", "disk")]).await;
    assert_eq!(c.capacity_bytes, 10 * MIB, "offered again once wiped");
}

/// Two disks of the pool listed by their `/dev/disk/by-id` links (as
/// `--disk-pool=/dev/disk/by-id/nvme-*`, the README's example, does), named
/// by the kernel the other way round after a reboot (NVMe drives probed in
/// another order: the link of the first now leads to the second's node and
/// device number). Each volume is its disk, found by the link its record
/// names: staged and erased there, never at the other's node. Before, a
/// record whose pool path was itself the disk's by-id link (no other link
/// recorded) asked for the device number too: after the reboot both
/// volumes' stages and deletes answered FAILED_PRECONDITION for good.
#[tokio::test]
async fn disks_listed_by_id_renumbered_at_a_reboot_are_still_their_volumes() {
    renumbered_at_a_reboot(true).await;
}

/// Two disks of the pool listed by their kernel names, with by-id links
/// (recorded), named the other way round after a reboot: each volume is
/// found by its link, and the disk freed by a delete is offered again.
/// Before, the other volume's record still claimed its old kernel name
/// and device number, now the freed disk's: it was never offered again
/// while that volume lived.
#[tokio::test]
async fn a_disk_freed_after_the_drives_were_renumbered_is_offered_again() {
    renumbered_at_a_reboot(false).await;
}

/// Two 10 MiB disks with by-id links nvme-A and nvme-B, the pool listing
/// the links (`listed_by_id`) or the kernel names; a volume on each, then
/// a reboot swaps the kernel names; each volume is staged, deleted.
async fn renumbered_at_a_reboot(listed_by_id: bool) {
    let h = disk_harness();
    let nodes = h.path("nodes");
    std::fs::create_dir_all(&nodes).unwrap();
    let nodes = std::fs::canonicalize(nodes).unwrap();
    let by_id = h.path("by-id");
    std::fs::create_dir_all(&by_id).unwrap();
    let (n0, n1) = (nodes.join("nvme0n1"), nodes.join("nvme1n1"));
    let (la, lb) = (by_id.join("nvme-A"), by_id.join("nvme-B"));
    let boot = |f: &FakeOs, a: &Path, b: &Path| {
        for (n, minor) in [(&n0, 0), (&n1, 1)] {
            if !n.exists() {
                std::fs::write(n, b"").unwrap();
            }
            f.add_device(n, 259, minor, (10 * MIB) as u64);
        }
        for (l, t) in [(&la, a), (&lb, b)] {
            let _ = std::fs::remove_file(l);
            std::os::unix::fs::symlink(t, l).unwrap();
        }
        f.set_by_id_dir(&by_id);
        script_blank(f);
    };
    let pool = if listed_by_id {
        format!("{}/nvme-*", by_id.display())
    } else {
        format!("{}/nvme*n1", nodes.display())
    };
    let (h, f) = restart(h, &["--disk-pool", &pool]);
    boot(&f, &n0, &n1);
    let a = create(&h, "a", 10 * MIB, &[("pool", "disk")])
        .await
        .volume_id;
    let b = create(&h, "b", 10 * MIB, &[("pool", "disk")])
        .await
        .volume_id;
    let disk = |h: &Harness, id: &str| block_info(h, id).disk.unwrap();
    if listed_by_id {
        assert_eq!(disk(&h, &a).path, la);
        assert_eq!(disk(&h, &a).by_id, None, "the pool path is the link");
        assert_eq!(disk(&h, &b).path, lb);
    } else {
        assert_eq!(disk(&h, &a).path, n0);
        assert_eq!(disk(&h, &a).by_id, Some(la.clone()));
        assert_eq!(disk(&h, &b).by_id, Some(lb.clone()));
    }
    assert_eq!((disk(&h, &a).major, disk(&h, &a).minor), (259, 0));

    // The reboot: nvme-A is now nvme1n1 (259:1), nvme-B nvme0n1 (259:0).
    let (h, f) = restart(h, &["--disk-pool", &pool]);
    boot(&f, &n1, &n0);
    let cap = block_cap(Mode::SingleNodeWriter);
    for (id, s) in [(&a, h.path("sa")), (&b, h.path("sb"))] {
        std::fs::create_dir_all(&s).unwrap();
        h.node
            .node_stage_volume(Request::new(stage_with(id, &s, cap.clone())))
            .await
            .unwrap_or_else(|e| panic!("stage of {id}: {e:?}"));
        h.node
            .node_unstage_volume(Request::new(unstage(id, &s)))
            .await
            .unwrap();
    }
    f.clear_calls();
    h.ctl
        .delete_volume(Request::new(csi::DeleteVolumeRequest {
            volume_id: a.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
    let zeroed: Vec<PathBuf> = f
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::ZeroOut { device, .. } => Some(device),
            _ => None,
        })
        .collect();
    assert_eq!(
        zeroed,
        vec![n1.clone()],
        "a's disk is nvme-A's, now nvme1n1"
    );
    // b's disk is still b's: the one free disk is a's.
    let (total, _) = disk_capacity(&h).await;
    assert_eq!(total, 10 * MIB);
    h.ctl
        .delete_volume(Request::new(csi::DeleteVolumeRequest {
            volume_id: b.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert!(f
        .calls()
        .iter()
        .any(|c| matches!(c, Call::ZeroOut { device, .. } if device == &n0)));
    assert_eq!(disk_capacity(&h).await.0, 20 * MIB);
}

/// A pool disk (not a loop device) without a `/dev/disk/by-id` link (a
/// VM's disk without a serial, or by-id not visible to berth) is not
/// offered: its volume's record could find it again only by its kernel
/// name, number and size, which another disk of its size that gets its
/// name (a swap, drives probed in another order at a reboot) has too; that
/// disk, another tenant's, would be handed to the volume and erased at its
/// delete. Before, it was offered like any other. Once it has a link, it is
/// offered.
#[tokio::test]
async fn a_pool_disk_without_a_by_id_link_is_not_offered() {
    let h = disk_harness();
    let dir = disks(&h, None);
    let link = dir.with_file_name("by-id").join("ata-DISK_d10");
    std::fs::remove_file(&link).unwrap();
    assert_eq!(disk_capacity(&h).await, (50 * MIB, Some(30 * MIB)));
    let a = create(&h, "a", 5 * MIB, &[("pool", "disk")]).await;
    assert_eq!(a.capacity_bytes, 20 * MIB, "not d10");
    let e = h
        .ctl
        .create_volume(Request::new(create_req_p(
            "b",
            10 * MIB,
            &[("pool", "disk")],
        )))
        .await
        .unwrap();
    assert_eq!(e.into_inner().volume.unwrap().capacity_bytes, 30 * MIB);
    std::os::unix::fs::symlink(dir.join("d10"), &link).unwrap();
    assert_eq!(disk_capacity(&h).await, (10 * MIB, Some(10 * MIB)));
}

/// Records made before pool disks without a by-id link were refused (no
/// by-id link recorded, the pool path a kernel name), or before a loop
/// disk's backing file was kept, find their disk by its name, number and
/// size only: `state check` warns of each, naming the volume and saying
/// what the operator should do. Before, it said nothing: such a volume
/// checked clean. Records that name a by-id link, whose pool path is one,
/// or that keep a loop disk's file are not flagged.
#[tokio::test]
async fn state_check_warns_of_disk_records_without_a_stable_name() {
    let h = disk_harness();
    let dir = disks(&h, None);
    let a = create(&h, "a", 5 * MIB, &[("pool", "disk")])
        .await
        .volume_id;
    let b = create(&h, "b", 15 * MIB, &[("pool", "disk")])
        .await
        .volume_id;
    loop_disk(&h, "d40", 40 * MIB);
    let c = create(&h, "c", 40 * MIB, &[("pool", "disk")])
        .await
        .volume_id;
    assert!(block_info(&h, &c).disk.unwrap().loop_backing.is_some());
    // No finding for records as made now.
    let (clean, out) = state_check(&h);
    assert!(clean, "{out}");
    assert!(!out.contains("only ("), "{out}");
    // a: as made on a disk without a by-id link before 2026-12-07.
    let mut r = h.driver.store.get(&a).unwrap();
    let disk = r.block.as_mut().unwrap().disk.as_mut().unwrap();
    assert_eq!(disk.path, dir.join("d10"));
    disk.by_id = None;
    h.driver.store.put(&r).unwrap();
    std::fs::remove_file(dir.with_file_name("by-id").join("ata-DISK_d10")).unwrap();
    // b: its pool path is its by-id link (a pool of by-id links).
    let mut r = h.driver.store.get(&b).unwrap();
    let disk = r.block.as_mut().unwrap().disk.as_mut().unwrap();
    disk.path = disk.by_id.take().unwrap();
    h.driver.store.put(&r).unwrap();
    // c: a loop disk recorded before its file was kept.
    let r = h.driver.store.get(&c).unwrap();
    h.driver.store.put(&without_loop_backing(&r)).unwrap();
    let (clean, out) = state_check(&h);
    assert!(clean, "warnings only: {out}");
    let flagged: Vec<&str> = out.lines().filter(|l| l.contains("only (")).collect();
    assert_eq!(flagged.len(), 2, "{out}");
    assert!(
        flagged[0].starts_with(&format!("warning: volume {a} (a): "))
            && flagged[0].contains(&format!("{} by its kernel name", dir.join("d10").display()))
            && flagged[0].contains("Move the data to a new volume"),
        "{out}"
    );
    assert!(
        flagged[1].starts_with(&format!("warning: volume {c} (c): "))
            && flagged[1].contains("attach the disk's file at /dev/loop"),
        "{out}"
    );
    assert!(!out.contains(&b), "{out}");
}

/// A pool disk that another process holds exclusively (a device-mapper,
/// md or bcache device stacked on it, or a raw user that claimed it), with
/// no signature, is not free: it was offered and handed to a tenant, who
/// read the holder's blocks. Once it is let go, it is offered.
#[tokio::test]
async fn a_pool_disk_another_process_holds_is_not_offered() {
    let h = disk_harness();
    let dir = disks(&h, None);
    let f = h.fake();
    f.set_held(&dir.join("d10"), true);
    assert_eq!(disk_capacity(&h).await, (50 * MIB, Some(30 * MIB)));
    let a = create(&h, "a", 5 * MIB, &[("pool", "disk")]).await;
    assert_eq!(a.capacity_bytes, 20 * MIB, "the held disk was handed out");
    // The holder lets go: offered again.
    f.set_held(&dir.join("d10"), false);
    assert_eq!(disk_capacity(&h).await, (40 * MIB, Some(30 * MIB)));
    let b = create(&h, "b", 5 * MIB, &[("pool", "disk")]).await;
    assert_eq!(b.capacity_bytes, 10 * MIB);
    // Any other failure to open it exclusively: not offered either.
    f.fail_next("held", libc::EACCES);
    assert_eq!(disk_capacity(&h).await, (0, Some(0)));
}

/// A pool disk with no signature that does not read as zeros where the
/// pool looks (its first and last MiB, spaced 4 KiB blocks) holds someone's
/// data: it is not offered (it was claimed and formatted at its first
/// stage). Erased, it is offered again; one that cannot be read is not.
#[tokio::test]
async fn a_pool_disk_holding_data_without_a_signature_is_not_offered() {
    let h = disk_harness();
    let dir = disks(&h, None);
    let f = h.fake();
    // Data in the middle of d20 (in a sampled block), in the last bytes of
    // d10; d30 holds data only between its sampled blocks.
    std::fs::write(dir.join("d20"), vec![0u8; (20 * MIB) as usize]).unwrap();
    write_at(&dir.join("d20"), &vec![0x5au8; 512 << 10], (8 * MIB) as u64);
    write_at(&dir.join("d10"), b"raw", (10 * MIB - 3) as u64);
    std::fs::write(dir.join("d30"), outside_sample(30 * MIB, 0x5a)).unwrap();
    assert_eq!(disk_capacity(&h).await, (30 * MIB, Some(30 * MIB)));
    // Asked again (GetCapacity is polled): the same answer.
    assert_eq!(disk_capacity(&h).await, (30 * MIB, Some(30 * MIB)));
    let e = h
        .ctl
        .create_volume(Request::new(disk_req("a", 5 * MIB, 20 * MIB)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().contains("no free disk"), "{}", e.message());
    assert!(runs(f, "mkfs.ext4").is_empty());
    // Erased (as `blkdiscard -z` does): offered again.
    std::fs::write(dir.join("d20"), vec![0u8; (20 * MIB) as usize]).unwrap();
    assert_eq!(disk_capacity(&h).await, (50 * MIB, Some(30 * MIB)));
    std::fs::write(dir.join("d10"), b"").unwrap();
    assert_eq!(disk_capacity(&h).await, (60 * MIB, Some(30 * MIB)));
    // A sample that cannot be read (d10's, read first): not offered.
    f.fail_next("reads_zero", libc::EIO);
    assert_eq!(disk_capacity(&h).await, (50 * MIB, Some(30 * MIB)));
    let a = create(&h, "a", 15 * MIB, &[("pool", "disk")]).await;
    assert_eq!(a.capacity_bytes, 20 * MIB);
}

/// A disk volume written raw by its tenant, whose record is then restored
/// from a backup taken before its first stage (it says: never staged, never
/// formatted), is never formatted: blkid finds nothing on it, but it does
/// not read as zeros. (Disks were taken as blank whatever they held; a
/// file volume is refused the same way by SEEK_DATA.) A sample that cannot
/// be read refuses too.
#[tokio::test]
async fn a_disk_written_raw_is_never_formatted_after_a_record_restore() {
    let h = disk_harness();
    let dir = disks(&h, None);
    let f = h.fake();
    let a = create(&h, "a", 5 * MIB, &[("pool", "disk")]).await;
    let backup = h.driver.store.get(&a.volume_id).unwrap();
    let s = h.path("s");
    h.node
        .node_stage_volume(Request::new(stage_with(&a.volume_id, &s, raw_cap())))
        .await
        .unwrap();
    write_at(&dir.join("d10"), b"TENANT-DATABASE-PAGE", 0);
    h.node
        .node_unstage_volume(Request::new(unstage(&a.volume_id, &s)))
        .await
        .unwrap();
    // The operator restores the older state.
    h.driver.store.put(&backup).unwrap();
    assert_eq!(block_info(&h, &a.volume_id).access, None);
    let e = h
        .node
        .node_stage_volume(Request::new(stage_req(&a.volume_id, &h.path("s2"))))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("does not read as zeros"),
        "{}",
        e.message()
    );
    assert!(runs(f, "mkfs.ext4").is_empty(), "formatted over raw data");
    assert!(!block_info(&h, &a.volume_id).formatted);
    assert_eq!(
        &std::fs::read(dir.join("d10")).unwrap()[..20],
        b"TENANT-DATABASE-PAGE"
    );
    // A new disk volume whose sample cannot be read: refused as well.
    let b = create(&h, "b", 15 * MIB, &[("pool", "disk")]).await;
    f.fail_next("reads_zero", libc::EIO);
    let e = h
        .node
        .node_stage_volume(Request::new(stage_req(&b.volume_id, &h.path("s3"))))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message()
            .contains("cannot tell whether the disk holds data"),
        "{}",
        e.message()
    );
    assert!(runs(f, "mkfs.ext4").is_empty());
    // Its retry reads it: zeros, no signature, never staged: formatted.
    h.node
        .node_stage_volume(Request::new(stage_req(&b.volume_id, &h.path("s3"))))
        .await
        .unwrap();
    assert_eq!(runs(f, "mkfs.ext4").len(), 1);
}

/// A disk missing when its volume was deleted, back under another pool
/// path and device number and without a by-id link, is not recognised by
/// its `wipe-` record; blkid calls it blank, but it does not read as
/// zeros: it is not offered (it was, and the next tenant read the last
/// one's data).
#[tokio::test]
async fn a_missing_disk_back_under_another_name_is_not_offered_unwiped() {
    let h = disk_harness();
    let dir = disks(&h, None);
    let f = h.fake();
    let a = create(&h, "a", 5 * MIB, &[("pool", "disk")]).await;
    let s = h.path("s");
    h.node
        .node_stage_volume(Request::new(stage_with(&a.volume_id, &s, raw_cap())))
        .await
        .unwrap();
    write_at(&dir.join("d10"), b"TENANT-A-SECRET", 0);
    h.node
        .node_unstage_volume(Request::new(unstage(&a.volume_id, &s)))
        .await
        .unwrap();
    f.remove_device(&dir.join("d10"));
    h.ctl
        .delete_volume(Request::new(csi::DeleteVolumeRequest {
            volume_id: a.volume_id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
    // Back as d15, another device number.
    std::fs::rename(dir.join("d10"), dir.join("d15")).unwrap();
    f.add_device(&dir.join("d15"), 8, 99, (10 * MIB) as u64);
    assert_eq!(disk_capacity(&h).await, (50 * MIB, Some(30 * MIB)));
    let e = h
        .ctl
        .create_volume(Request::new(disk_req("b", 5 * MIB, 10 * MIB)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(!f
        .calls()
        .iter()
        .any(|c| matches!(c, Call::ZeroOut { .. } | Call::ZeroSample { .. })));
}

/// A loop device over a sparse file of `size` bytes (outside Berth's
/// directories), listed in the pool directory as `disks/<name>`, a link to
/// its node: a loop device used as a disk.
fn loop_disk(h: &Harness, name: &str, size: i64) -> (PathBuf, berth::os::LoopInfo) {
    loop_disk_at(h, name, size, 0, 0)
}

/// `loop_disk` over a file of `len` bytes, the loop device showing the
/// part of it from `offset`, of at most `sizelimit` bytes (0: to its end).
fn loop_disk_at(
    h: &Harness,
    name: &str,
    len: i64,
    offset: i64,
    sizelimit: i64,
) -> (PathBuf, berth::os::LoopInfo) {
    let file = h.path(&format!("{name}.img"));
    std::fs::File::create(&file)
        .unwrap()
        .set_len(len as u64)
        .unwrap();
    let l = h.fake().add_loop_at(&file, offset as u64, sizelimit as u64);
    let dir = h.path("disks");
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink(&l.device, dir.join(name)).unwrap();
    (file, l)
}

/// The loop disk `l` is pulled (`losetup -d`): its node stays, with 0
/// bytes.
fn pull(f: &FakeOs, l: &berth::os::LoopInfo) {
    berth::os::LoopDevices::detach(f, &l.device).unwrap();
    f.add_device(&l.device, 7, l.minor, 0);
}

fn erasures(f: &FakeOs) -> usize {
    count(f, |c| {
        matches!(c, Call::ZeroOut { .. } | Call::ZeroSample { .. })
    })
}

async fn get_volume(h: &Harness, id: &str) -> csi::VolumeCondition {
    h.ctl
        .controller_get_volume(Request::new(csi::ControllerGetVolumeRequest {
            volume_id: id.into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap()
        .volume_condition
        .unwrap()
}

/// NodeStageVolume (raw, at `staging`) and DeleteVolume of the disk
/// volume `id`, whose recorded disk is now a loop device of Berth's own
/// file: both FAILED_PRECONDITION, saying so.
async fn refused_as_berths_own(h: &Harness, id: &str, staging: &Path) {
    let e = h
        .node
        .node_stage_volume(Request::new(stage_with(id, staging, raw_cap())))
        .await
        .unwrap_err();
    let e2 = try_delete(h, id).await.unwrap_err();
    for e in [e, e2] {
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("Berth's own file"), "{}", e.message());
    }
}

/// A loop device used as a pool disk is detached (the disk pulled), and
/// the next loop attach, Berth's own for a file volume of the same size,
/// gets its number. That volume's device was taken for the disk: once its
/// unstage left it attached (something held it open), DeleteVolume of the
/// disk volume zeroed the file volume's file, NodeStageVolume handed it to
/// the disk volume's tenant, and the disk volume was "healthy". A loop
/// device of Berth's own file is never a disk, whatever the record says
/// (as made now, with the loop's backing file, or as made before, without).
#[tokio::test]
async fn a_detached_loop_disk_is_never_berths_own_volume_at_its_number() {
    let h = disk_harness();
    let f = h.fake();
    script_blank(f);
    let (_, l) = loop_disk(&h, "d0", 64 * MIB);
    let v = create(&h, "v", 64 * MIB, &[("pool", "disk")]).await;
    assert_eq!(v.capacity_bytes, 64 * MIB);
    let s = h.path("s");
    h.node
        .node_stage_volume(Request::new(stage_with(&v.volume_id, &s, raw_cap())))
        .await
        .unwrap();
    h.node
        .node_unstage_volume(Request::new(unstage(&v.volume_id, &s)))
        .await
        .unwrap();
    pull(f, &l);
    let w = create(&h, "w", 64 * MIB, &[]).await;
    let sw = h.path("sw");
    h.node
        .node_stage_volume(Request::new(stage_with(&w.volume_id, &sw, raw_cap())))
        .await
        .unwrap();
    let wl = f.loops();
    assert_eq!(
        (wl[0].device.clone(), wl[0].backing_file.clone()),
        (l.device.clone(), img(&h, &w.volume_id))
    );
    write_at(&img(&h, &w.volume_id), b"W-DATA", 0);
    // Its unstage unmounts, but the device stays attached (held open).
    f.detach_leaves_bound(1);
    let e = h
        .node
        .node_unstage_volume(Request::new(unstage(&w.volume_id, &sw)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert_eq!(f.loops().len(), 1);
    let rec = h.driver.store.get(&v.volume_id).unwrap();
    for old_record in [false, true] {
        if old_record {
            h.driver.store.put(&without_loop_backing(&rec)).unwrap();
        }
        // Abnormal, saying why, until its delete begins (the record says
        // Deleting: NOT_FOUND then, as for every call that describes it).
        let c = get_volume(&h, &v.volume_id).await;
        assert!(
            c.abnormal && c.message.contains("Berth's own file"),
            "{c:?}"
        );
        refused_as_berths_own(&h, &v.volume_id, &h.path("s2")).await;
    }
    assert_eq!(erasures(f), 0, "{:?}", f.calls());
    assert_eq!(
        &std::fs::read(img(&h, &w.volume_id)).unwrap()[..6],
        b"W-DATA"
    );
}

/// A loop disk detached (the disk pulled; its node shows 0 bytes) is
/// missing: DeleteVolume remembers it for a wipe and answers OK (it
/// answered FAILED_PRECONDITION forever). A file of the same size attached
/// at its number later is not the disk (the record keeps the loop's
/// backing file): never wiped, not offered. The disk's own file attached
/// again is the disk: wiped, then offered.
#[tokio::test]
async fn a_detached_loop_disk_is_missing_and_another_file_at_its_number_is_not_it() {
    let h = disk_harness();
    let f = h.fake();
    script_blank(f);
    let (file, l) = loop_disk(&h, "d0", 64 * MIB);
    let v = create(&h, "v", 64 * MIB, &[("pool", "disk")]).await;
    assert!(block_info(&h, &v.volume_id)
        .disk
        .unwrap()
        .loop_backing
        .is_some());
    let s = h.path("s");
    h.node
        .node_stage_volume(Request::new(stage_with(&v.volume_id, &s, raw_cap())))
        .await
        .unwrap();
    write_at(&file, b"V-DATA", 0);
    h.node
        .node_unstage_volume(Request::new(unstage(&v.volume_id, &s)))
        .await
        .unwrap();
    pull(f, &l);
    let c = get_volume(&h, &v.volume_id).await;
    assert!(c.abnormal && c.message.contains("0 bytes"), "{c:?}");
    try_delete(&h, &v.volume_id).await.unwrap();
    assert_eq!(wipe_records(&h), 1);
    // Someone's file of the same size, with data, at the disk's number.
    let foreign = h.path("foreign.img");
    std::fs::write(&foreign, vec![0x5au8; (64 * MIB) as usize]).unwrap();
    let fl = f.add_loop(&foreign);
    assert_eq!(fl.device, l.device);
    retry_pending_and_wait(&h).await;
    assert_eq!(erasures(f), 0, "{:?}", f.calls());
    assert!(std::fs::read(&foreign).unwrap().iter().all(|&b| b == 0x5a));
    assert_eq!(wipe_records(&h), 1);
    assert_eq!(disk_capacity(&h).await, (0, Some(0)));
    // The disk back at its number: wiped, and offered again.
    berth::os::LoopDevices::detach(f, &fl.device).unwrap();
    assert_eq!(f.add_loop(&file).device, l.device);
    retry_pending_and_wait(&h).await;
    assert!(f.calls().contains(&Call::ZeroOut {
        device: l.device.clone(),
        size_bytes: (64 * MIB) as u64,
    }));
    assert!(std::fs::read(&file).unwrap().iter().all(|&b| b == 0));
    assert_eq!(wipe_records(&h), 0);
    assert_eq!(disk_capacity(&h).await, (64 * MIB, Some(64 * MIB)));
}

/// A loop device of Berth's own file under a path outside its directories
/// (a hard link; another mount namespace shows other paths too) is told
/// by its file's inode: not offered as a pool disk (it was: a blank file
/// volume reads as zeros), and not taken for a recorded disk.
#[tokio::test]
async fn a_loop_of_berths_own_file_under_another_path_is_no_disk() {
    let h = disk_harness();
    let f = h.fake();
    script_blank(f);
    let (_, l1) = loop_disk(&h, "d1", 32 * MIB);
    let v = create(&h, "v", 32 * MIB, &[("pool", "disk")]).await;
    let w = create(&h, "w", 64 * MIB, &[]).await;
    let link = h.path("d0.img");
    std::fs::hard_link(img(&h, &w.volume_id), &link).unwrap();
    let l0 = f.add_loop(&link);
    std::os::unix::fs::symlink(&l0.device, h.path("disks").join("d0")).unwrap();
    assert_eq!(disk_capacity(&h).await, (0, Some(0)));
    // A record (made before records kept the loop's file) naming it.
    let mut r = h.driver.store.get(&v.volume_id).unwrap();
    let d = r.block.as_mut().unwrap().disk.as_mut().unwrap();
    assert_eq!(d.minor, l1.minor);
    (d.path, d.device, d.minor, d.size_bytes, d.loop_backing) = (
        h.path("disks").join("d0"),
        l0.device.clone(),
        l0.minor,
        (64 * MIB) as u64,
        None,
    );
    h.driver.store.put(&r).unwrap();
    refused_as_berths_own(&h, &v.volume_id, &h.path("s")).await;
    assert_eq!(erasures(f), 0);
}

/// A reboot of a node whose pool has the loop disk `d0` (64 MiB) under
/// disk volume `v`: the fake is new, someone's file of the same size is
/// attached first (so at the disk's old number, /dev/loop0), then the
/// disk's own file, which gets /dev/loop1. Returns the harness, its fake,
/// the volume's id, the disk's file, and the foreign loop.
async fn loop_disk_renumbered(
    write: bool,
) -> (Harness, Arc<FakeOs>, String, PathBuf, berth::os::LoopInfo) {
    let h = disk_harness();
    script_blank(h.fake());
    let (file, l) = loop_disk(&h, "d0", 64 * MIB);
    assert_eq!(l.device, PathBuf::from("/dev/loop0"));
    let v = create(&h, "v", 64 * MIB, &[("pool", "disk")]).await;
    assert_eq!(v.capacity_bytes, 64 * MIB);
    if write {
        write_at(&file, b"V-DATA", 0);
    }
    let pool = format!("{}/d*", h.path("disks").display());
    let (h, f) = restart(h, &["--disk-pool", &pool]);
    script_blank(&f);
    let foreign = h.path("foreign.img");
    std::fs::write(&foreign, vec![0x5au8; (64 * MIB) as usize]).unwrap();
    let fl = f.add_loop(&foreign);
    assert_eq!(fl.device, l.device);
    assert_eq!(f.add_loop(&file).device, PathBuf::from("/dev/loop1"));
    (h, f, v.volume_id, file, fl)
}

/// A loop disk attached again after a reboot at another number (its old
/// one taken by someone's file of its size), the pool's link to it moved
/// there, is still its volume: found by its backing file (device and
/// inode) and size, staged there, checked clean, and erased there at its
/// delete; the foreign file at its old number is never touched. Before,
/// the device number was asked for too: every stage and delete answered
/// FAILED_PRECONDITION until an operator stepped in (pods stranded). A
/// file attached twice, or a copy of the disk's file, is never taken for
/// it.
#[tokio::test]
async fn a_loop_disk_attached_again_at_another_number_is_still_its_volume() {
    let (h, f, v, file, fl) = loop_disk_renumbered(true).await;
    let link = h.path("disks").join("d0");
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink("/dev/loop1", &link).unwrap();
    let s = h.path("s");
    h.node
        .node_stage_volume(Request::new(stage_with(&v, &s, raw_cap())))
        .await
        .unwrap_or_else(|e| panic!("stage: {e:?}"));
    assert!(
        f.calls()
            .iter()
            .any(|c| matches!(c, Call::Bind { source, .. } if source == Path::new("/dev/loop1"))),
        "{:?}",
        f.calls()
    );
    h.node
        .node_unstage_volume(Request::new(unstage(&v, &s)))
        .await
        .unwrap();
    // Attached twice: which one is the disk cannot be told.
    let twice = f.add_loop(&file);
    raw_stage_refused(&h, &v, &s, "2 loop devices").await;
    let e = try_delete(&h, &v).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert_eq!(erasures(&f), 0, "{:?}", f.calls());
    berth::os::LoopDevices::detach(f.as_ref(), &twice.device).unwrap();
    let (clean, out) = state_check(&h);
    assert!(clean, "{out}");
    assert_eq!(disk_capacity(&h).await, (0, Some(0)));
    try_delete(&h, &v).await.unwrap();
    let zeroed: Vec<PathBuf> = f
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::ZeroOut { device, .. } => Some(device),
            _ => None,
        })
        .collect();
    assert_eq!(zeroed, vec![PathBuf::from("/dev/loop1")]);
    assert!(std::fs::read(h.path("foreign.img"))
        .unwrap()
        .iter()
        .all(|&b| b == 0x5a));
    assert_eq!(fl.device, PathBuf::from("/dev/loop0"));
}

/// A copy of a loop disk's file (same size and content, another inode)
/// attached after a reboot is not the disk: refused, nothing erased.
#[tokio::test]
async fn a_copy_of_a_loop_disks_file_is_not_its_disk() {
    let (h, f, v, file, _) = loop_disk_renumbered(true).await;
    berth::os::LoopDevices::detach(f.as_ref(), Path::new("/dev/loop1")).unwrap();
    let copy = h.path("copy.img");
    std::fs::copy(&file, &copy).unwrap();
    assert_eq!(f.add_loop(&copy).device, PathBuf::from("/dev/loop1"));
    let link = h.path("disks").join("d0");
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink("/dev/loop1", &link).unwrap();
    let e = h
        .node
        .node_stage_volume(Request::new(stage_with(&v, &h.path("s"), raw_cap())))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = try_delete(&h, &v).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert_eq!(erasures(&f), 0, "{:?}", f.calls());
}

/// A loop disk of a volume, never written (it reads as zeros), attached
/// again after a reboot at another number that the pool lists under
/// another name (`d1`; `d0` still leads to its old number, now someone
/// else's file): it is the volume's disk, never offered to another
/// volume. Before, only the recorded number and pool path were claimed:
/// it was offered (64 MiB) and the next create got the volume's disk,
/// two tenants on the same blocks.
#[tokio::test]
async fn a_loop_disk_attached_again_at_another_number_is_not_offered() {
    let (h, _f, v, _, _) = loop_disk_renumbered(false).await;
    std::os::unix::fs::symlink("/dev/loop1", h.path("disks").join("d1")).unwrap();
    assert_eq!(disk_capacity(&h).await, (0, Some(0)));
    let e = h
        .ctl
        .create_volume(Request::new(create_req_p(
            "w",
            64 * MIB,
            &[("pool", "disk")],
        )))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    h.node
        .node_stage_volume(Request::new(stage_with(&v, &h.path("s"), raw_cap())))
        .await
        .unwrap_or_else(|e| panic!("stage: {e:?}"));
}

/// NodeStageVolume of `id`, raw at `staging`: FAILED_PRECONDITION, saying
/// `says`.
async fn raw_stage_refused(h: &Harness, id: &str, staging: &Path, says: &str) {
    let e = h
        .node
        .node_stage_volume(Request::new(stage_with(id, staging, raw_cap())))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains(says), "{}", e.message());
}

/// NodeStageVolume of `id`, raw at `staging`, then its NodeUnstageVolume:
/// both must succeed (`what` says which case failed).
async fn stage_and_unstage_raw(h: &Harness, id: &str, staging: &Path, what: &str) {
    h.node
        .node_stage_volume(Request::new(stage_with(id, staging, raw_cap())))
        .await
        .unwrap_or_else(|e| panic!("stage of {what}: {e:?}"));
    h.node
        .node_unstage_volume(Request::new(unstage(id, staging)))
        .await
        .unwrap_or_else(|e| panic!("unstage of {what}: {e:?}"));
}

/// Fields a newer berth wrote beside a loop disk's backing file (its
/// device and inode) and the part of it the disk shows, in the disk's
/// record, are kept when this version rewrites the record (the stage
/// records the access), and the disk is still told by its file: the
/// values compared are the kernel's, the fields are only carried. Before,
/// serde dropped them on read and the first rewrite lost them.
#[tokio::test]
async fn fields_a_newer_berth_recorded_beside_a_loop_disks_file_survive_a_rewrite() {
    let h = disk_harness();
    script_blank(h.fake());
    loop_disk(&h, "d0", 64 * MIB);
    let id = create(&h, "v", 64 * MIB, &[("pool", "disk")])
        .await
        .volume_id;
    let json = serde_json::to_string(&h.driver.store.get(&id).unwrap()).unwrap();
    assert_eq!(json.matches(r#""loop_backing":{"#).count(), 1, "{json}");
    assert_eq!(json.matches(r#""loop_range":{"#).count(), 1, "{json}");
    let forged = json
        .replace(
            r#""loop_backing":{"#,
            r#""loop_backing":{"newer_id":{"gen":7},"#,
        )
        .replace(r#""loop_range":{"#, r#""loop_range":{"newer_range":[1],"#);
    // As read from a journal a newer berth wrote.
    h.driver
        .store
        .put(&serde_json::from_str(&forged).expect("the record reads"))
        .unwrap();
    let kept = |when: &str| {
        let r = h.driver.store.get(&id).expect("the record");
        let j = serde_json::to_value(&r).unwrap();
        let d = &j["block"]["disk"];
        assert_eq!(
            d["loop_backing"]["newer_id"],
            serde_json::json!({"gen": 7}),
            "{when}: {j}"
        );
        assert_eq!(
            d["loop_range"]["newer_range"],
            serde_json::json!([1]),
            "{when}: {j}"
        );
        r
    };
    kept("read");
    stage_and_unstage_raw(&h, &id, &h.path("s"), "a disk with a newer berth's fields").await;
    let r = kept("after a stage");
    assert_eq!(
        r.block.as_ref().and_then(|b| b.access),
        Some(berth::state::BlockAccess::Raw)
    );
}

/// A loop disk over the first 64 MiB of a 65 MiB file: its volume's
/// record keeps the part of the file the device shows (offset 0, size
/// limit 64 MiB). The file attached again at the disk's number showing
/// another part of it, of the same size (1 MiB further in; or from 1 MiB
/// to its end, without a size limit), is not the disk: NodeStageVolume
/// and DeleteVolume answer FAILED_PRECONDITION naming what differs,
/// ControllerGetVolume says abnormal, and nothing is erased. Before, only
/// the file and the size were compared, so that device passed for the
/// disk: handed to the volume's pods and zeroed at its delete. A record
/// made before the part was kept takes it, as before; the disk's own part
/// attached again is the disk.
#[tokio::test]
async fn a_loop_disks_file_attached_at_another_offset_is_not_its_disk() {
    use berth::os::LoopDevices;
    let h = disk_harness();
    let f = h.fake();
    script_blank(f);
    let (file, l) = loop_disk_at(&h, "d0", 65 * MIB, 0, 64 * MIB);
    let v = create(&h, "v", 64 * MIB, &[("pool", "disk")])
        .await
        .volume_id;
    let rec = h.driver.store.get(&v).unwrap();
    assert_eq!(
        rec.block.as_ref().unwrap().disk.as_ref().unwrap().range(),
        Some(berth::state::LoopRange {
            offset: 0,
            sizelimit: (64 * MIB) as u64,
        })
    );
    let s = h.path("s");
    for (offset, sizelimit, says) in [
        (MIB, 64 * MIB, "offset is 1048576, the disk's was 0"),
        (MIB, 0, "sizelimit is 0, the disk's was 67108864"),
    ] {
        LoopDevices::detach(f, &l.device).unwrap();
        let moved = f.add_loop_at(&file, offset as u64, sizelimit as u64);
        assert_eq!(
            (moved.device.clone(), moved.minor),
            (l.device.clone(), l.minor)
        );
        raw_stage_refused(&h, &v, &s, says).await;
        let c = get_volume(&h, &v).await;
        assert!(c.abnormal && c.message.contains(says), "{c:?}");
    }
    // A record made before the part was kept: taken, as before.
    let mut old = rec.clone();
    old.block
        .as_mut()
        .unwrap()
        .disk
        .as_mut()
        .unwrap()
        .loop_range = None;
    h.driver.store.put(&old).unwrap();
    stage_and_unstage_raw(&h, &v, &s, "a record without the part").await;
    let mut now = h.driver.store.get(&v).unwrap();
    now.block.as_mut().unwrap().disk = rec.block.as_ref().unwrap().disk.clone();
    h.driver.store.put(&now).unwrap();
    // The disk's own part again: the disk.
    LoopDevices::detach(f, &l.device).unwrap();
    f.add_loop_at(&file, 0, (64 * MIB) as u64);
    stage_and_unstage_raw(&h, &v, &s, "the disk's own part").await;
    // Moved again: its delete erases nothing.
    LoopDevices::detach(f, &l.device).unwrap();
    f.add_loop_at(&file, MIB as u64, (64 * MIB) as u64);
    let e = try_delete(&h, &v).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("offset"), "{}", e.message());
    assert_eq!(erasures(f), 0, "{:?}", f.calls());
}

/// A plain disk create cut short after its disk was claimed and before
/// its marker (its record says Creating, no marker), the disk a loop
/// device; its number now shows another file of the same size, with
/// someone's data. The CO's retry of that CreateVolume answers ABORTED
/// and makes nothing Ready (no marker, no mkfs, no erase); the rollback
/// that runs every minute (as at start-up) releases the record without
/// touching the device; a later retry finds no free disk
/// (RESOURCE_EXHAUSTED: the other file holds data). Before, the retry
/// answered with the volume, Ready and marked, on a disk that every
/// stage then refused. With its marker there (a create cut short between
/// marker and Ready record), the rollback holds the disk, never erases
/// the device at its path, and the retry does not take the volume back
/// while its disk is not found (guard).
#[tokio::test]
async fn a_creating_disk_record_whose_device_path_shows_another_device_never_uses_it() {
    use berth::os::LoopDevices;
    for marked in [false, true] {
        let h = disk_harness();
        let f = h.fake();
        script_blank(f);
        let (_, l) = loop_disk(&h, "d0", 64 * MIB);
        let req = create_req_p("v", 64 * MIB, &[("pool", "disk")]);
        let v = created_id(h.ctl.create_volume(Request::new(req.clone())).await);
        let mut r = h.driver.store.get(&v).unwrap();
        h.driver.store.set_phase(&mut r, Phase::Creating).unwrap();
        if !marked {
            std::fs::remove_file(disk_marker(&h, &v)).unwrap();
        }
        LoopDevices::detach(f, &l.device).unwrap();
        let other = h.path("other.img");
        std::fs::write(&other, vec![0x5au8; (64 * MIB) as usize]).unwrap();
        assert_eq!(f.add_loop(&other).device, l.device);
        f.clear_calls();
        if !marked {
            let e = h
                .ctl
                .create_volume(Request::new(req.clone()))
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::Aborted, "{e:?}");
            assert!(
                e.message().contains("not found as recorded"),
                "{}",
                e.message()
            );
            assert_eq!(h.driver.store.get(&v).unwrap().phase, Phase::Creating);
            assert!(!disk_marker(&h, &v).exists(), "marked");
        }
        retry_pending_and_wait(&h).await;
        assert!(
            h.driver.store.get(&v).is_none(),
            "marked {marked}: not rolled back"
        );
        let held = berth::kinds::block::held_id(&v);
        assert_eq!(
            h.driver.store.get(&held).is_some(),
            marked,
            "marked {marked}"
        );
        let e = h
            .ctl
            .create_volume(Request::new(req.clone()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "marked {marked}: {e:?}");
        assert_eq!(erasures(f), 0, "marked {marked}: {:?}", f.calls());
        assert!(
            !f.calls().iter().any(|c| format!("{c:?}").contains("mkfs")),
            "{:?}",
            f.calls()
        );
        assert!(std::fs::read(&other).unwrap().iter().all(|&b| b == 0x5a));
    }
}

#[tokio::test]
async fn concurrent_disk_creates_never_share_a_disk() {
    let h = disk_harness();
    disks(&h, None);
    let mut tasks = Vec::new();
    for i in 0..6 {
        let ctl = berth::controller::ControllerService {
            driver: h.driver.clone(),
        };
        tasks.push(tokio::spawn(async move {
            ctl.create_volume(Request::new(create_req_p(
                &format!("v{i}"),
                MIB,
                &[("pool", "disk")],
            )))
            .await
        }));
    }
    // Losers of a race for the same disk get ABORTED and retry, as the CO
    // does; once the pool is empty the answer is RESOURCE_EXHAUSTED.
    let mut ok = 0;
    let mut retry = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) if e.code() == Code::Aborted => retry.push(i),
            Err(e) => assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}"),
        }
    }
    for i in retry {
        let r = h
            .ctl
            .create_volume(Request::new(create_req_p(
                &format!("v{i}"),
                MIB,
                &[("pool", "disk")],
            )))
            .await;
        match r {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}"),
        }
    }
    assert_eq!(ok, 3);
    let mut seen: Vec<(u32, u32)> = h
        .driver
        .store
        .filter(|r| r.block.is_some())
        .into_iter()
        .filter_map(|r| r.block.and_then(|b| b.disk).map(|d| (d.major, d.minor)))
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 3);
}

/// A backing file without a record (a lost record, or a file put there by
/// hand) stops start-up, naming it, with nothing moved; once the operator
/// says its record is gone for good (`--allow-missing-storage`) it is
/// moved aside, data intact, never deleted; files of recorded volumes and
/// files that are not volume files stay. With no block record at all, the
/// same.
#[tokio::test]
async fn files_without_a_record_are_moved_aside_at_start() {
    let h = block(&[]);
    let kept = create(&h, "kept", 8 * MIB, &[]).await.volume_id;
    let stray = format!("block-{}", "ab".repeat(16));
    std::fs::write(img(&h, &stray), b"someone's data").unwrap();
    std::fs::write(h.path("block").join("notes.txt"), b"not a volume").unwrap();
    let h = h.restart_past_lost_records(&stray, &fresh_fake, &["--kinds", "block"]);
    assert!(img(&h, &kept).exists());
    assert!(!img(&h, &stray).exists());
    assert_eq!(
        std::fs::read(h.path("block/.orphaned").join(format!("{stray}.img"))).unwrap(),
        b"someone's data"
    );
    assert!(h.path("block/notes.txt").exists());
    // The same name again (a state directory restored twice): the earlier
    // orphan is never overwritten (rename(2) replaced it).
    std::fs::write(img(&h, &stray), b"more data").unwrap();
    let h = h.restart_past_lost_records(&stray, &fresh_fake, &["--kinds", "block"]);
    assert_eq!(
        std::fs::read(h.path("block/.orphaned").join(format!("{stray}.img"))).unwrap(),
        b"someone's data"
    );
    assert_eq!(
        std::fs::read(h.path("block/.orphaned").join(format!("{stray}.img.1"))).unwrap(),
        b"more data"
    );
    // No block record at all: the same.
    delete(&h, &kept).await;
    assert!(!img(&h, &kept).exists());
    std::fs::write(img(&h, &stray), b"third").unwrap();
    let h = h.restart_past_lost_records(&stray, &fresh_fake, &["--kinds", "block"]);
    assert_eq!(
        std::fs::read(h.path("block/.orphaned").join(format!("{stray}.img.2"))).unwrap(),
        b"third"
    );
}

fn fresh_fake() -> (berth::os::Os, Option<Arc<FakeOs>>) {
    let (os, f) = berth::os::Os::fake();
    (os, Some(f))
}

/// A stage whose mount fails (a filesystem volume's mount, a raw volume's
/// device bind) leaves neither the staging directory it created nor the
/// raw volume's device file behind.
#[tokio::test]
async fn a_failed_stage_leaves_nothing_behind() {
    let h = block(&[]);
    let f = h.fake();
    script_blank(f);
    let v = create(&h, "a", 8 * MIB, &[]).await;
    let staging = h.path("stage");
    f.fail_next("mount_fs", libc::EIO);
    let r = h
        .node
        .node_stage_volume(Request::new(stage_req(&v.volume_id, &staging)))
        .await;
    assert!(r.is_err());
    assert!(
        !staging.exists(),
        "filesystem: staging directory left behind"
    );
    // A raw volume (a volume keeps the access type of its first stage).
    let v = create(&h, "b", 8 * MIB, &[]).await;
    f.fail_next("bind", libc::EIO);
    let r = h
        .node
        .node_stage_volume(Request::new(stage_with(&v.volume_id, &staging, raw_cap())))
        .await;
    assert!(r.is_err());
    assert!(
        !staging.exists(),
        "raw: staging directory or device file left behind"
    );
    // The next attempt works.
    h.node
        .node_stage_volume(Request::new(stage_with(&v.volume_id, &staging, raw_cap())))
        .await
        .unwrap();
}

/// A whole-disk volume is snapshotted into a sparse file and restored onto
/// another disk (erased first) or onto a file; a restore onto a disk whose
/// record still says Creating at start-up (a crash during the copy, or a
/// Ready record lost: nothing tells them apart) is rolled back and its
/// disk held, never erased (before, it was erased).
#[tokio::test]
async fn whole_disk_snapshots_restore_onto_disks_and_files() {
    let h = disk_harness();
    let dir = disks(&h, None);
    let f = h.fake();
    let a = create(&h, "a", 10 * MIB, &[("pool", "disk")]).await;
    write_at(&dir.join("d10"), b"tenant a", MIB as u64);
    let snap = h
        .ctl
        .create_snapshot(Request::new(csi::CreateSnapshotRequest {
            name: "s".into(),
            source_volume_id: a.volume_id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(snap.size_bytes, 10 * MIB);
    let file = h
        .path("block/.snapshots")
        .join(format!("{}.img", snap.snapshot_id));
    let m = std::fs::metadata(&file).unwrap();
    assert_eq!(m.len(), (10 * MIB) as u64);
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&m) * 512 < (2 * MIB) as u64,
        "not sparse"
    );
    let restore = |name: &str, kv: &[(&str, &str)]| {
        let mut p = params(kv);
        p.insert("kind".into(), "block".into());
        csi::CreateVolumeRequest {
            parameters: p,
            volume_content_source: Some(csi::VolumeContentSource {
                r#type: Some(csi::volume_content_source::Type::Snapshot(
                    csi::volume_content_source::SnapshotSource {
                        snapshot_id: snap.snapshot_id.clone(),
                    },
                )),
            }),
            ..create_req(name, 10 * MIB)
        }
    };
    // Onto a disk: the next free one (d20) is erased, then written. (An
    // earlier tenant's data between its sampled blocks, which the pool
    // does not see, is gone too.)
    std::fs::write(dir.join("d20"), outside_sample(20 * MIB, 0x77)).unwrap();
    let b = h
        .ctl
        .create_volume(Request::new(restore("b", &[("pool", "disk")])))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(b.capacity_bytes, 20 * MIB);
    let d20 = std::fs::read(dir.join("d20")).unwrap();
    assert_eq!(&d20[MIB as usize..MIB as usize + 8], b"tenant a");
    assert!(
        d20[..MIB as usize].iter().all(|&x| x == 0),
        "old data shows through"
    );
    assert!(f
        .calls()
        .iter()
        .any(|c| matches!(c, Call::ZeroOut { device, .. } if device == &dir.join("d20"))));
    // Onto a file.
    let c = h
        .ctl
        .create_volume(Request::new(restore("c", &[])))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let mut buf = [0u8; 8];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(img(&h, &c.volume_id)).unwrap(),
        &mut buf,
        MIB as u64,
    )
    .unwrap();
    assert_eq!(&buf, b"tenant a");
    // A restore onto a disk whose record says Creating at start-up: its
    // rollback holds the disk (a plain create's rollback releases a disk
    // it never wrote).
    let mut rb = h.driver.store.get(&b.volume_id).unwrap();
    h.driver.store.set_phase(&mut rb, Phase::Creating).unwrap();
    let pool = format!("{}/d*", dir.display());
    let tmp = h.stop();
    let (os, f) = berth::os::Os::fake();
    register_disks(&f, &dir, None);
    let h = build(
        tmp,
        os,
        Some(f.clone()),
        &["--kinds", "block", "--disk-pool", &pool],
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while h.driver.store.get(&b.volume_id).is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the rollback never finished"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(!f
        .calls()
        .iter()
        .any(|c| matches!(c, Call::ZeroOut { .. } | Call::ZeroSample { .. })));
    let d20 = std::fs::read(dir.join("d20")).unwrap();
    assert_eq!(&d20[MIB as usize..MIB as usize + 8], b"tenant a");
    let held = berth::kinds::block::held_id(&b.volume_id);
    let hold = h.driver.store.get(&held).expect("a hold");
    assert_eq!(hold.block.unwrap().disk.unwrap().path, dir.join("d20"));
}

/// The pool disks of a staged and published filesystem volume and raw
/// volume are pulled out: unpublish and unstage still work from the paths
/// (unmount, remove the raw volume's file) instead of FAILED_PRECONDITION
/// forever; so does unstage when the record is gone.
#[tokio::test]
async fn unstage_of_a_volume_whose_disk_is_gone_unmounts_by_path() {
    let h = disk_harness();
    let dir = disks(&h, None);
    let f = h.fake();
    let fs_vol = create(&h, "a", 5 * MIB, &[("pool", "disk")])
        .await
        .volume_id;
    let raw_vol = create(&h, "b", 15 * MIB, &[("pool", "disk")])
        .await
        .volume_id;
    let (s1, t1, s2, t2) = (h.path("s1"), h.path("t1"), h.path("s2"), h.path("t2"));
    stage_and_publish(&h, &fs_vol, &s1, &t1).await;
    h.node
        .node_stage_volume(Request::new(stage_with(&raw_vol, &s2, raw_cap())))
        .await
        .unwrap();
    let mut p = publish_req(&raw_vol, &s2, &t2, false);
    p.volume_capability = Some(raw_cap());
    h.node.node_publish_volume(Request::new(p)).await.unwrap();
    f.remove_device(&dir.join("d10"));
    f.remove_device(&dir.join("d20"));
    for (id, s, t) in [(&fs_vol, &s1, &t1), (&raw_vol, &s2, &t2)] {
        for _ in 0..2 {
            h.node
                .node_unpublish_volume(Request::new(csi::NodeUnpublishVolumeRequest {
                    volume_id: id.clone(),
                    target_path: t.display().to_string(),
                }))
                .await
                .unwrap();
            h.node
                .node_unstage_volume(Request::new(unstage(id, s)))
                .await
                .unwrap();
        }
    }
    assert!(
        !s2.join(&raw_vol).exists(),
        "the raw volume's file is removed"
    );
    for p in [&s1, &t1, &s2, &t2] {
        assert!(
            !f.table().iter().any(|m| m.mount_point.starts_with(p)),
            "{p:?}"
        );
    }
    // Without the record: the same, from the id and the path.
    let c = create(&h, "c", 25 * MIB, &[("pool", "disk")])
        .await
        .volume_id;
    let s3 = h.path("s3");
    h.node
        .node_stage_volume(Request::new(stage_req(&c, &s3)))
        .await
        .unwrap();
    h.driver.store.remove(&c).unwrap();
    h.node
        .node_unstage_volume(Request::new(unstage(&c, &s3)))
        .await
        .unwrap();
    assert!(!f.table().iter().any(|m| m.mount_point == s3));
}

/// A block root that holds none of the backing files recorded for it (a
/// changed --block-root, a filesystem not mounted yet) stops start-up
/// before anything is changed; --allow-missing-storage starts anyway.
/// Volumes of the disk pool have no backing file and do not count.
#[tokio::test]
async fn a_block_root_holding_none_of_its_files_stops_start_up() {
    use berth::config::Cli;
    use berth::driver::Driver;
    use berth::os::Os;
    use clap::Parser;
    let h = block(&[]);
    let a = create(&h, "a", 1 << 20, &[]).await.volume_id;
    let b = create(&h, "b", 1 << 20, &[]).await.volume_id;
    let dir = h.stop();
    let other = dir.path().join("elsewhere");
    std::fs::create_dir(&other).unwrap();
    let open = |extra: &[&str]| {
        let mut v = vec!["--kinds", "block", "--block-root", other.to_str().unwrap()];
        v.extend_from_slice(extra);
        let cli = Cli::try_parse_from(args(dir.path(), &v)).unwrap();
        Driver::new(cli.config, Os::fake().0)
    };
    let msg = match open(&[]) {
        Ok(_) => panic!("berth started on a block root that holds none of its volumes"),
        Err(e) => e.to_string(),
    };
    assert!(
        msg.contains("block root") && msg.contains("holds none of the 2 volumes"),
        "{msg}"
    );
    assert!(
        msg.contains("--block-root") && msg.contains("--allow-missing-storage"),
        "{msg}"
    );
    assert!(msg.contains(&a) || msg.contains(&b), "{msg}");
    for id in [&a, &b] {
        assert!(dir.path().join(format!("block/{id}.img")).is_file());
    }
    assert!(open(&["--allow-missing-storage"]).is_ok());
    // The right root: starts.
    let cli = Cli::try_parse_from(args(dir.path(), &["--kinds", "block"])).unwrap();
    assert!(Driver::new(cli.config, Os::fake().0).is_ok());
}

/// A repeat of NodeStageVolume at the same staging path that asks for
/// another filesystem, read-only, or other mount flags is ALREADY_EXISTS
/// (the mount stays as it is); the same request again is OK. A second
/// staging path of a staged volume is FAILED_PRECONDITION.
#[tokio::test]
async fn restage_with_another_capability_is_already_exists() {
    let h = block(&[]);
    let f = h.fake();
    let s = h.path("s");
    let v = staged_blank(&h, &s).await;
    let mut xfs = mount_cap(Mode::SingleNodeWriter);
    if let Some(csi::volume_capability::AccessType::Mount(m)) = &mut xfs.access_type {
        m.fs_type = "xfs".into();
    }
    for cap in [
        xfs,
        mount_cap_flags(Mode::SingleNodeWriter, &["ro"]),
        mount_cap_flags(Mode::SingleNodeWriter, &["noexec"]),
        mount_cap(Mode::SingleNodeReaderOnly),
    ] {
        let r = h
            .node
            .node_stage_volume(Request::new(stage_with(&v.volume_id, &s, cap.clone())))
            .await;
        assert_eq!(code(r), Code::AlreadyExists, "{cap:?}");
    }
    h.node
        .node_stage_volume(Request::new(stage_req(&v.volume_id, &s)))
        .await
        .unwrap();
    let s2 = h.path("s2");
    let r = h
        .node
        .node_stage_volume(Request::new(stage_req(&v.volume_id, &s2)))
        .await;
    assert_eq!(code(r), Code::FailedPrecondition);
    let mounts: Vec<_> = f
        .table()
        .into_iter()
        .filter(|m| m.mount_point == s || m.mount_point == s2)
        .collect();
    assert_eq!(mounts.len(), 1);
    assert!(
        mounts[0].fs_type == "ext4" && !mounts[0].readonly(),
        "{mounts:?}"
    );
}

/// A capability a block volume does not offer (an access mode for several
/// nodes, a filesystem type other than ext4 and xfs) is the spec's
/// "Exceeds capabilities" row of NodeStageVolume and NodePublishVolume:
/// FAILED_PRECONDITION (it was INVALID_ARGUMENT); nothing is attached or
/// mounted for it.
#[tokio::test]
async fn a_capability_the_volume_does_not_offer_is_failed_precondition_at_stage_and_publish() {
    let h = block(&[]);
    script_blank(h.fake());
    let v = create(&h, "a", 8 * MIB, &[]).await;
    let s = h.path("s");
    let t = h.path("t");
    let unfit = [
        mount_cap(Mode::MultiNodeMultiWriter),
        block_cap(Mode::MultiNodeReaderOnly),
        fs_cap("btrfs"),
    ];
    for cap in &unfit {
        let r = h
            .node
            .node_stage_volume(Request::new(stage_with(&v.volume_id, &s, cap.clone())))
            .await;
        assert_eq!(code(r), Code::FailedPrecondition, "{cap:?}");
    }
    assert_eq!(count(h.fake(), is_attach), 0);
    h.node
        .node_stage_volume(Request::new(stage_req(&v.volume_id, &s)))
        .await
        .unwrap();
    for cap in &unfit {
        let r = h
            .node
            .node_publish_volume(Request::new(csi::NodePublishVolumeRequest {
                volume_capability: Some(cap.clone()),
                ..publish_req(&v.volume_id, &s, &t, false)
            }))
            .await;
        assert_eq!(code(r), Code::FailedPrecondition, "{cap:?}");
    }
    assert!(h.fake().table().iter().all(|m| m.mount_point != t));
    assert!(!t.exists());
}

/// A raw volume staged read-write, staged again at the same path with a
/// read-only access mode (or the other way round), is the spec's "staged
/// at staging_target_path but incompatible with the volume_capability":
/// ALREADY_EXISTS, as a filesystem volume's restage with another
/// read-only setting is. It was FAILED_PRECONDITION ("attached read-write;
/// unstage the volume first"), the code for a second staging path, which
/// stays so. The attachment and the staging bind are kept as they were.
#[tokio::test]
async fn a_raw_restage_with_another_read_only_setting_is_already_exists() {
    let h = block(&[]);
    let f = h.fake();
    script_blank(f);
    for (first, second) in [
        (Mode::SingleNodeWriter, Mode::SingleNodeReaderOnly),
        (Mode::SingleNodeReaderOnly, Mode::SingleNodeWriter),
    ] {
        let name = format!("r-{}", first as i32);
        let v = create(&h, &name, 8 * MIB, &[]).await;
        let s = h.path(&format!("s-{name}"));
        h.node
            .node_stage_volume(Request::new(stage_with(&v.volume_id, &s, block_cap(first))))
            .await
            .unwrap();
        let r = h
            .node
            .node_stage_volume(Request::new(stage_with(
                &v.volume_id,
                &s,
                block_cap(second),
            )))
            .await;
        assert_eq!(code(r), Code::AlreadyExists, "{first:?} then {second:?}");
        let r = h
            .node
            .node_stage_volume(Request::new(stage_with(
                &v.volume_id,
                &h.path(&format!("other-{name}")),
                block_cap(second),
            )))
            .await;
        assert_eq!(
            code(r),
            Code::FailedPrecondition,
            "{first:?} then {second:?}"
        );
        h.node
            .node_stage_volume(Request::new(stage_with(&v.volume_id, &s, block_cap(first))))
            .await
            .unwrap();
        let file = img(&h, &v.volume_id);
        let loops: Vec<_> = f
            .loops()
            .into_iter()
            .filter(|l| l.backing_file == file)
            .collect();
        assert_eq!(loops.len(), 1);
        assert_eq!(loops[0].read_only, first == Mode::SingleNodeReaderOnly);
        let marker = s.join(&v.volume_id);
        assert_eq!(
            f.table().iter().filter(|m| m.mount_point == marker).count(),
            1
        );
    }
}

/// NodeUnstageVolume of a volume whose record is gone, whose backing file
/// start-up moved aside into .orphaned/ while it was attached: the loop
/// device of that file is detached too, not left behind.
#[tokio::test]
async fn unstage_by_path_detaches_a_loop_of_a_file_moved_aside() {
    let h = block(&[]);
    let f = h.fake();
    let stray = "block-0123456789abcdef0123456789abcdef";
    let aside = h.path("block/.orphaned");
    std::fs::create_dir_all(&aside).unwrap();
    let file = aside.join(format!("{stray}.img"));
    std::fs::write(&file, b"").unwrap();
    f.add_loop(&file);
    // Another volume's file aside stays attached.
    let other = aside.join("block-fedcba9876543210fedcba9876543210.img");
    std::fs::write(&other, b"").unwrap();
    f.add_loop(&other);
    assert_eq!(f.loops().len(), 2);
    h.node
        .node_unstage_volume(Request::new(unstage(stray, &h.path("s"))))
        .await
        .unwrap();
    let left: Vec<_> = f.loops().into_iter().map(|l| l.backing_file).collect();
    assert_eq!(left, vec![other]);
}

/// A restore onto a whole disk from a snapshot whose file is damaged (a
/// symlink to another volume's file, a file cut short) is refused before a
/// disk is claimed or erased: FAILED_PRECONDITION, no record, every disk
/// still free and unwritten. Before, the link was followed (and the short
/// file written onto the disk as if whole).
#[tokio::test]
async fn a_damaged_snapshot_is_never_restored_onto_a_disk() {
    let h = disk_harness();
    let dir = disks(&h, None);
    let f = h.fake();
    script_blank(f);
    let a = create(&h, "a", 8 * MIB, &[]).await;
    let b = create(&h, "b", 8 * MIB, &[]).await;
    write_at(&img(&h, &b.volume_id), b"tenant b", MIB as u64);
    let snap = h
        .ctl
        .create_snapshot(Request::new(csi::CreateSnapshotRequest {
            name: "s".into(),
            source_volume_id: a.volume_id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    let file = h
        .path("block/.snapshots")
        .join(format!("{}.img", snap.snapshot_id));
    let restore = || {
        let mut req = create_req_p("r", 8 * MIB, &[("pool", "disk")]);
        req.volume_content_source = Some(csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Snapshot(
                csi::volume_content_source::SnapshotSource {
                    snapshot_id: snap.snapshot_id.clone(),
                },
            )),
        });
        req
    };
    let damage: [&dyn Fn(); 2] = [
        &|| {
            std::fs::remove_file(&file).unwrap();
            std::os::unix::fs::symlink(img(&h, &b.volume_id), &file).unwrap();
        },
        &|| {
            std::fs::remove_file(&file).unwrap();
            std::fs::write(&file, vec![0u8; MIB as usize]).unwrap();
        },
    ];
    for d in damage {
        d();
        f.clear_calls();
        let e = h
            .ctl
            .create_volume(Request::new(restore()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("damaged"), "{e:?}");
        assert!(h.driver.store.get_by_name("r").is_none());
        assert!(
            !f.calls().iter().any(|c| matches!(c, Call::ZeroOut { .. })),
            "a disk was erased"
        );
        for d in ["d10", "d20", "d30"] {
            assert!(
                std::fs::read(dir.join(d)).unwrap().is_empty(),
                "{d} was written"
            );
        }
    }
}

/// The block root's `.snapshots` replaced by a symlink to a directory
/// outside the root: start-up removes no unfinished-copy file
/// (`.partial-*`) there (it did, through the link).
#[tokio::test]
async fn start_up_never_removes_what_a_symlinked_snapshot_area_leads_to() {
    let h = block(&[]);
    let area = h.path("block").join(".snapshots");
    let outside = tempfile::tempdir().unwrap();
    let partial = outside.path().join(".partial-x");
    std::fs::write(&partial, b"keep me").unwrap();
    if area.exists() {
        std::fs::remove_dir(&area).unwrap();
    }
    std::os::unix::fs::symlink(outside.path(), &area).unwrap();
    let (_h, _f) = restart(h, &[]);
    assert_eq!(std::fs::read(&partial).unwrap(), b"keep me");
    assert!(std::fs::symlink_metadata(&area)
        .unwrap()
        .file_type()
        .is_symlink());
}

/// An id without a record (a block id never created here) never takes down
/// a recorded block volume's staging or target mount: its device tells
/// whose the mount is. Nor does it take down a local volume's (a directory
/// in the local root) in an instance serving both kinds.
#[tokio::test]
async fn ids_without_a_record_never_unmount_a_block_volumes_mounts() {
    let h = block(&["--kinds", "local,block"]);
    let s = h.path("s");
    let v = staged_blank(&h, &s).await;
    let t = h.path("t");
    h.node
        .node_publish_volume(Request::new(publish_req(&v.volume_id, &s, &t, false)))
        .await
        .unwrap();
    let unknown = format!("{}{}", &v.volume_id[..14], "0".repeat(24));
    assert_ne!(unknown, v.volume_id);
    let mounted = |p: &Path| h.fake().table().iter().any(|m| m.mount_point == p);
    let e = unpublish_as_kubelet(&h, &unknown, &t).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = unstage_as_kubelet(&h, &unknown, &s).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(mounted(&t) && mounted(&s));
    // A local volume's staging path and target.
    let local = created_id(
        h.ctl
            .create_volume(Request::new(create_req("loc", MIB)))
            .await,
    );
    let (ls, lt) = (h.path("ls"), h.path("lt"));
    stage_and_publish(&h, &local, &ls, &lt).await;
    let e = unpublish_as_kubelet(&h, &unknown, &lt).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = unstage_as_kubelet(&h, &unknown, &ls).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(mounted(&lt) && mounted(&ls));
    // Each volume's own id still tears it down.
    unpublish_as_kubelet(&h, &v.volume_id, &t).await.unwrap();
    unstage_as_kubelet(&h, &v.volume_id, &s).await.unwrap();
    unpublish_as_kubelet(&h, &local, &lt).await.unwrap();
    unstage_as_kubelet(&h, &local, &ls).await.unwrap();
    assert!(!mounted(&t) && !mounted(&s) && !mounted(&lt) && !mounted(&ls));
}

/// A volume whose record says its create never answered (`Creating`) is
/// rolled back at start-up. Its file is deleted only when nothing ever
/// wrote to it; one that holds data was handed out after all (a record
/// that lost its Ready) and is kept aside in `.orphaned/`, never deleted,
/// and `state check` says so before start-up does it.
#[tokio::test]
async fn rollback_of_an_unanswered_create_keeps_a_file_that_holds_data() {
    let h = block(&[]);
    let used = create(&h, "used", 4 * MIB, &[]).await.volume_id;
    let blank = create(&h, "blank", 4 * MIB, &[("allocation", "thick")])
        .await
        .volume_id;
    write_at(&img(&h, &used), b"tenant a", MIB as u64);
    unanswered_and_checked(&h, &used, &blank);
    let dir = h.stop();

    let (os, f) = berth::os::Os::fake();
    let h = build(dir, os, Some(f), &["--kinds", "block"]);
    for id in [&used, &blank] {
        assert!(h.driver.store.get(id).is_none(), "{id} was not rolled back");
        assert!(!img(&h, id).exists());
    }
    let aside = h.path("block").join(".orphaned");
    let kept = aside.join(format!("{used}.img"));
    let mut buf = [0u8; 8];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(&kept).unwrap(),
        &mut buf,
        MIB as u64,
    )
    .unwrap();
    assert_eq!(&buf, b"tenant a");
    let names: Vec<_> = std::fs::read_dir(&aside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, [std::ffi::OsString::from(format!("{used}.img"))]);
}

/// A mount capability with this fs_type (empty: none named).
fn fs_cap(fs: &str) -> csi::VolumeCapability {
    let mut c = rwo();
    if let Some(csi::volume_capability::AccessType::Mount(m)) = &mut c.access_type {
        m.fs_type = fs.into();
    }
    c
}

/// Whole disks restore and clone as files do: the copy inherits how the
/// source disk was used, and capabilities that cannot use that are
/// INVALID_ARGUMENT before any disk is claimed or erased; a disk source
/// never staged takes either.
#[tokio::test]
async fn a_disk_restore_or_clone_needs_capabilities_its_source_content_fits() {
    let h = disk_harness();
    let dir = disks(&h, None);
    let f = h.fake();
    script_blank(f);
    let raw = create(&h, "raw", 10 * MIB, &[("pool", "disk")])
        .await
        .volume_id;
    h.node
        .node_stage_volume(Request::new(stage_with(&raw, &h.path("s1"), raw_cap())))
        .await
        .unwrap();
    let fs = create(&h, "fs", 20 * MIB, &[("pool", "disk")])
        .await
        .volume_id;
    h.node
        .node_stage_volume(Request::new(stage_req(&fs, &h.path("s2"))))
        .await
        .unwrap();
    assert_eq!(block_info(&h, &fs).fs_type, "ext4");
    // (A whole disk in use as a raw device is not snapshotted.)
    h.node
        .node_unstage_volume(Request::new(unstage(&raw, &h.path("s1"))))
        .await
        .unwrap();
    let s_raw = snapshot_id(&h, "s-raw", &raw).await;
    let s_fs = snapshot_id(&h, "s-fs", &fs).await;
    let from = |name: &str, source: csi::volume_content_source::Type, pool: &[(&str, &str)], c| {
        csi::CreateVolumeRequest {
            volume_capabilities: vec![c],
            volume_content_source: Some(csi::VolumeContentSource {
                r#type: Some(source),
            }),
            ..create_req_p(name, 10 * MIB, pool)
        }
    };
    let snap = |id: &str| {
        csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource {
            snapshot_id: id.into(),
        })
    };
    let vol = |id: &str| {
        csi::volume_content_source::Type::Volume(csi::volume_content_source::VolumeSource {
            volume_id: id.into(),
        })
    };
    let disk = [("pool", "disk")];
    let zero_outs = |f: &FakeOs| count(f, |c| matches!(c, Call::ZeroOut { .. }));
    let (zeroed, files) = (zero_outs(f), made_in(&h.path("block")));
    for (n, (source, pool, c, says)) in [
        (snap(&s_raw), &disk[..], rwo(), "raw block device"),
        (snap(&s_raw), &[][..], rwo(), "raw block device"),
        (vol(&raw), &disk[..], fs_cap("ext4"), "raw block device"),
        (snap(&s_fs), &disk[..], raw_cap(), "an ext4 filesystem"),
        (
            snap(&s_fs),
            &[][..],
            fs_cap("xfs"),
            "cannot be mounted as xfs",
        ),
        (vol(&fs), &disk[..], raw_cap(), "an ext4 filesystem"),
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("bad-{n}");
        let e = h
            .ctl
            .create_volume(Request::new(from(&name, source, pool, c)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{name}: {e:?}");
        assert!(e.message().contains(says), "{name}: {e:?}");
        assert!(h.driver.store.get_by_name(&name).is_none());
    }
    assert_eq!(zero_outs(f), zeroed, "a disk was erased");
    assert_eq!(made_in(&h.path("block")), files, "a file was made");
    // The raw disk's copy onto the free disk (d30) as a raw volume.
    let r = created_id(
        h.ctl
            .create_volume(Request::new(from("r", snap(&s_raw), &disk, raw_cap())))
            .await,
    );
    assert_eq!(
        block_info(&h, &r).disk.unwrap().path,
        dir.join("d30"),
        "{r}"
    );
    h.node
        .node_stage_volume(Request::new(stage_with(&r, &h.path("s3"), raw_cap())))
        .await
        .unwrap();
}

/// Block sizes are whole MiB. When rounding up would pass limit_bytes,
/// the whole MiB below it is taken if it still holds required_bytes (and
/// the source of a restore): 0 to 64 MiB + 1 is 64 MiB. Before, that was
/// OUT_OF_RANGE ("takes 68157440 bytes (whole MiB)"). A range that holds
/// no whole MiB is still OUT_OF_RANGE.
#[tokio::test]
async fn a_size_rounds_down_to_a_whole_mib_within_limit_bytes() {
    let h = block(&[]);
    script_blank(h.fake());
    let ranged = |name: &str, required: i64, limit: i64| {
        let mut r = create_req_p(name, 0, &[]);
        r.capacity_range = Some(csi::CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        });
        r
    };
    let mut ids = Vec::new();
    for (n, (required, limit)) in [
        (0, 64 * MIB + 1),
        (0, 64 * MIB + MIB / 2),
        (64 * MIB - 1, 64 * MIB + 1),
        (64 * MIB, 64 * MIB + 1),
    ]
    .into_iter()
    .enumerate()
    {
        let v = h
            .ctl
            .create_volume(Request::new(ranged(&format!("v{n}"), required, limit)))
            .await
            .unwrap_or_else(|e| panic!("{required} {limit}: {e:?}"))
            .into_inner()
            .volume
            .unwrap();
        assert_eq!(v.capacity_bytes, 64 * MIB, "{required} {limit}");
        assert_eq!(
            std::fs::metadata(img(&h, &v.volume_id)).unwrap().len(),
            (64 * MIB) as u64
        );
        ids.push(v.volume_id);
    }
    for (required, limit) in [(64 * MIB + 1, 64 * MIB + MIB / 2), (0, MIB / 2)] {
        let e = h
            .ctl
            .create_volume(Request::new(ranged("none", required, limit)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange, "{required} {limit}: {e:?}");
        assert!(e.message().contains("whole MiB"), "{e:?}");
    }
    // A restore of the 64 MiB volume.
    let s = snapshot_id(&h, "s", &ids[0]).await;
    let restore = |name: &str, required: i64, limit: i64| {
        let mut r = ranged(name, required, limit);
        r.volume_content_source = Some(csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Snapshot(
                csi::volume_content_source::SnapshotSource {
                    snapshot_id: s.clone(),
                },
            )),
        });
        r
    };
    let r = h
        .ctl
        .create_volume(Request::new(restore("r", 0, 64 * MIB + 1)))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(r.capacity_bytes, 64 * MIB);
    let e = h
        .ctl
        .create_volume(Request::new(restore(
            "r2",
            64 * MIB + 1,
            64 * MIB + MIB / 2,
        )))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(h.driver.store.get_by_name("none").is_none());
    assert!(h.driver.store.get_by_name("r2").is_none());
}

// The block root beside the local root. The default install puts both on
// one filesystem (`/var/lib/berth/local`, `/var/lib/berth/block`): its free
// space is there once, for both kinds.

/// A driver serving local and block volumes over the fake (both roots on
/// the fake's one filesystem unless a test says otherwise), with the
/// filesystem `total` bytes large and `free` bytes free; with `quotas`, the
/// local root enforces project quotas.
fn local_and_block(quotas: bool, total: i64, free: i64) -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let (os, f) = berth::os::Os::fake();
    if quotas {
        f.enable_project_quotas();
    }
    let h = build(dir, os, Some(f), &["--kinds", "local,block"]);
    set_free(&h, total, free);
    h
}

fn kind_params(kind: &str, kv: &[(&str, &str)]) -> HashMap<String, String> {
    let mut m = params(kv);
    m.insert("kind".into(), kind.into());
    m
}

async fn capacity_of(h: &Harness, kind: &str, kv: &[(&str, &str)]) -> i64 {
    h.ctl
        .get_capacity(Request::new(csi::GetCapacityRequest {
            parameters: kind_params(kind, kv),
            ..Default::default()
        }))
        .await
        .expect("get capacity")
        .into_inner()
        .available_capacity
}

async fn create_kind(
    h: &Harness,
    kind: &str,
    name: &str,
    size: i64,
    kv: &[(&str, &str)],
) -> Result<csi::Volume, tonic::Status> {
    h.ctl
        .create_volume(Request::new(csi::CreateVolumeRequest {
            parameters: kind_params(kind, kv),
            ..create_req(name, size)
        }))
        .await
        .map(|r| r.into_inner().volume.expect("volume"))
}

const THICK: &[(&str, &str)] = &[("allocation", "thick")];

/// The cluster's reproduction, in MiB: 58 free, a local volume of 35 (a
/// promise: its directory holds nothing yet), then thick block volumes of
/// 25. Before, block's GetCapacity offered all 58 and both thick volumes
/// were allocated, leaving the local volume 8 of its 35. Now the file pool
/// keeps back what local volumes may still write: its GetCapacity (thick
/// and thin alike), thick and thin creates, and thick expansion see 23;
/// the local kind's own accounting is unchanged.
#[tokio::test]
async fn block_files_leave_what_local_volumes_were_promised_on_a_shared_filesystem() {
    let h = local_and_block(false, 100 * MIB, 58 * MIB);
    create_kind(&h, "local", "l1", 35 * MIB, &[]).await.unwrap();
    assert_eq!(capacity_of(&h, "local", &[]).await, 23 * MIB);
    let e = create_kind(&h, "local", "l2", 35 * MIB, &[])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    // Block: the free space less the local promise, thick or thin.
    assert_eq!(capacity_of(&h, "block", THICK).await, 23 * MIB);
    assert_eq!(capacity_of(&h, "block", &[]).await, 23 * MIB);
    let e = create_kind(&h, "block", "b1", 25 * MIB, THICK)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(h.driver.store.get_by_name("b1").is_none());
    // Thin volumes promise nothing, but are not made in space promised to
    // local volumes either.
    let e = create_kind(&h, "block", "t1", 24 * MIB, &[])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    // What is left is the block pool's.
    let b = create_kind(&h, "block", "b2", 20 * MIB, THICK)
        .await
        .unwrap();
    set_free(&h, 100 * MIB, 38 * MIB);
    assert_eq!(capacity_of(&h, "block", THICK).await, 3 * MIB);
    assert_eq!(capacity_of(&h, "local", &[]).await, 3 * MIB);
    // A thick volume grows only into what is left.
    let e = h
        .ctl
        .controller_expand_volume(Request::new(expand_req(&b.volume_id, 24 * MIB, 0)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(e.message().contains("local volumes"), "{}", e.message());
    assert_eq!(
        h.driver.store.get(&b.volume_id).unwrap().capacity_bytes,
        20 * MIB
    );
    let r = h
        .ctl
        .controller_expand_volume(Request::new(expand_req(&b.volume_id, 22 * MIB, 0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 22 * MIB);
    // The local volume deleted: its promise is the block pool's again.
    let l1 = h.driver.store.get_by_name("l1").unwrap().id;
    delete(&h, &l1).await;
    assert_eq!(capacity_of(&h, "block", THICK).await, 38 * MIB);
}

/// With project quotas the local kind keeps back what its volumes may
/// still write (their sizes less what they wrote, which the free space
/// lacks already); the file pool keeps back the same, not the whole sizes.
#[tokio::test]
async fn block_files_leave_what_local_volumes_may_still_write_under_quotas() {
    let h = local_and_block(true, 100 * MIB, 58 * MIB);
    let l = create_kind(&h, "local", "l1", 35 * MIB, &[]).await.unwrap();
    let project = h
        .driver
        .store
        .get(&l.volume_id)
        .and_then(|r| r.project())
        .expect("a project");
    // 10 MiB written into the local volume: the filesystem has 10 less.
    h.fake().set_project_written(project, 10 * MIB as u64);
    set_free(&h, 100 * MIB, 48 * MIB);
    assert_eq!(capacity_of(&h, "local", &[]).await, 23 * MIB);
    assert_eq!(capacity_of(&h, "block", THICK).await, 23 * MIB);
    let e = create_kind(&h, "block", "b1", 24 * MIB, THICK)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    create_kind(&h, "block", "b2", 23 * MIB, THICK)
        .await
        .unwrap();
    // Probe (and the metrics) ask the block pool without reading each
    // local volume's usage: no quota read, and the local promise whole.
    h.fake().clear_quota_ops();
    h.ident
        .probe(Request::new(Default::default()))
        .await
        .unwrap();
    assert!(
        h.fake().quota_ops().is_empty(),
        "{:?}",
        h.fake().quota_ops()
    );
}

/// Roots on different filesystems (another device): the block pool's
/// free space is its own, whatever local volumes were promised.
#[tokio::test]
async fn block_capacity_ignores_local_promises_on_another_filesystem() {
    let h = local_and_block(false, 100 * MIB, 58 * MIB);
    h.fake()
        .set_device(&h.driver.cfg.block_root(), libc::makedev(8, 17));
    create_kind(&h, "local", "l1", 35 * MIB, &[]).await.unwrap();
    assert_eq!(capacity_of(&h, "local", &[]).await, 23 * MIB);
    assert_eq!(capacity_of(&h, "block", THICK).await, 58 * MIB);
    create_kind(&h, "block", "b1", 25 * MIB, THICK)
        .await
        .unwrap();
    create_kind(&h, "block", "b2", 25 * MIB, THICK)
        .await
        .unwrap();
}

/// The other way round: local admission reads the filesystem's free
/// space, which lacks the thick block files already (allocated when they
/// were made), so they are counted once: not added back, not subtracted
/// twice.
#[tokio::test]
async fn local_volumes_see_thick_block_files_in_the_free_space() {
    let h = local_and_block(false, 100 * MIB, 58 * MIB);
    create_kind(&h, "block", "b1", 25 * MIB, THICK)
        .await
        .unwrap();
    // fallocate took 25 MiB.
    set_free(&h, 100 * MIB, 33 * MIB);
    assert_eq!(capacity_of(&h, "local", &[]).await, 33 * MIB);
    let e = create_kind(&h, "local", "l1", 35 * MIB, &[])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    create_kind(&h, "local", "l2", 30 * MIB, &[]).await.unwrap();
    assert_eq!(capacity_of(&h, "local", &[]).await, 3 * MIB);
    assert_eq!(capacity_of(&h, "block", THICK).await, 3 * MIB);
}

/// A local create that read the free space (58 MiB) while a thick block
/// file of 25 MiB is allocated on the same filesystem is not admitted
/// against the figure from before the allocation: both kinds order their
/// space checks (`Store::space_shared`, `space_exclusive`), so of a local
/// volume of 35 MiB and a thick one of 25 MiB only one fits. Before, both
/// were made (60 MiB on 58), the local volume's read coming first and its
/// promise after the allocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_admission_and_a_thick_allocation_do_not_both_take_the_last_space() {
    let h = local_and_block(false, 100 * MIB, 58 * MIB);
    h.fake().set_allocation_takes_free(true);
    let local_root = h.driver.cfg.local_root();
    h.fake()
        .set_statvfs_stale(&local_root, Some(std::time::Duration::from_millis(600)));
    let local = create_kind(&h, "local", "l1", 35 * MIB, &[]);
    let block = async {
        // The local create is inside its free-space read by now.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        create_kind(&h, "block", "b1", 25 * MIB, THICK).await
    };
    let (l, b) = tokio::join!(local, block);
    h.fake().set_statvfs_stale(&local_root, None);
    assert!(l.is_ok(), "the local create came first: {l:?}");
    let e = b.expect_err("the thick volume does not fit beside the local promise");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(h.driver.store.get_by_name("b1").is_none());
    assert_eq!(capacity_of(&h, "local", &[]).await, 23 * MIB);
}

/// The same for a local volume's growth (a larger promise) racing a thick
/// allocation: 10 MiB grown to 45 on 58 free, a thick 25 MiB at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_growth_and_a_thick_allocation_do_not_both_take_the_last_space() {
    let h = local_and_block(false, 100 * MIB, 58 * MIB);
    let l = create_kind(&h, "local", "l1", 10 * MIB, &[]).await.unwrap();
    h.fake().set_allocation_takes_free(true);
    let local_root = h.driver.cfg.local_root();
    h.fake()
        .set_statvfs_stale(&local_root, Some(std::time::Duration::from_millis(600)));
    let grow = h
        .ctl
        .controller_expand_volume(Request::new(expand_req(&l.volume_id, 45 * MIB, 0)));
    let block = async {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        create_kind(&h, "block", "b1", 25 * MIB, THICK).await
    };
    let (g, b) = tokio::join!(grow, block);
    h.fake().set_statvfs_stale(&local_root, None);
    assert!(g.is_ok(), "the growth came first: {g:?}");
    let e = b.expect_err("the thick volume does not fit beside the grown promise");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
}

/// Cuts the state journal of a stopped berth at the start of the last line
/// that names `id` (the lines after it are lost as well), as a damaged or
/// truncated journal loses a record's last change; returns what was cut.
fn cut_journal_before_last(state: &Path, id: &str) -> String {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(state.join("journal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("log-") && n.ends_with(".jsonl"))
        })
        .collect();
    logs.sort();
    let log = logs.last().expect("a journal log");
    let text = std::fs::read_to_string(log).unwrap();
    let at = text
        .match_indices('\n')
        .map(|(i, _)| i + 1)
        .chain(std::iter::once(0))
        .filter(|&start| text[start..].split('\n').next().unwrap().contains(id))
        .max()
        .expect("a line naming the volume");
    let cut = text[at..].to_string();
    std::fs::OpenOptions::new()
        .write(true)
        .open(log)
        .unwrap()
        .set_len(at as u64)
        .unwrap();
    cut
}

/// The 4 KiB-aligned offsets of a disk of `size` bytes that the pool's
/// blank test does not read (`sample_ranges`).
fn unsampled_offsets(size: u64) -> Vec<u64> {
    let ranges = berth::os::blockdev::sample_ranges(size);
    (0..size)
        .step_by(4096)
        .filter(|&o| ranges.iter().all(|&(s, l)| o + 4096 <= s || o >= s + l))
        .collect()
}

/// A restore onto a whole disk whose Ready record was lost (the journal
/// cut after CreateVolume answered and the tenant wrote to the disk): a
/// disk has no temporary name, so start-up cannot tell the copy from a
/// volume that was handed out. The disk is held: never erased (before, it
/// was zeroed and returned to the pool, the tenant's data lost), never
/// offered to a new volume nor counted as free by GetCapacity, also after
/// another restart (the restore and the tenant wrote only where the pool's
/// blank test does not look, so nothing but the hold keeps it out); `state
/// check` reports it as an error naming the disk and what to do, and
/// `berth state release` has it erased and returned to the pool.
#[tokio::test]
async fn a_disk_restore_whose_ready_was_lost_is_held_not_erased() {
    let h = disk_harness();
    let dir = disks(&h, None);
    script_blank(h.fake());
    let pool = format!("{}/d*", dir.display());
    let extra = ["--disk-pool", pool.as_str()];
    let src = create(&h, "src", 8 * MIB, &[]).await.volume_id;
    let unsampled = unsampled_offsets(10 * MIB as u64);
    let (from_snap, at) = (unsampled[0], unsampled[unsampled.len() / 2]);
    assert!(from_snap < 8 * MIB as u64);
    write_at(&img(&h, &src), b"snapshot data", from_snap);
    let snap = snapshot_id(&h, "s", &src).await;
    let req = disk_restore_req("r", &snap);
    let vol = created_id(h.ctl.create_volume(Request::new(req)).await);
    let d10 = dir.join("d10");
    let disk = block_info(&h, &vol).disk.unwrap();
    assert_eq!(disk.path, d10);
    // The tenant writes (where the pool's blank test does not look).
    write_at(&d10, b"tenant data", at);
    let read = |at: u64| {
        let mut buf = [0u8; 11];
        std::os::unix::fs::FileExt::read_exact_at(
            &std::fs::File::open(&d10).unwrap(),
            &mut buf,
            at,
        )
        .unwrap();
        buf
    };
    let dir_path = h.stop();
    let cut = cut_journal_before_last(&dir_path.path().join("state"), &vol);
    assert_eq!(cut.lines().count(), 1, "{cut}");
    assert!(cut.contains("Ready") || cut.contains("ready"), "{cut}");

    let restart = |dir: tempfile::TempDir| {
        let (os, f) = berth::os::Os::fake();
        register_disks(&f, &dir.path().join("disks"), None);
        script_blank(&f);
        let mut args = vec!["--kinds", "block"];
        args.extend_from_slice(&extra);
        build(dir, os, Some(f), &args)
    };
    let h = restart(dir_path);
    let held = berth::kinds::block::held_id(&vol);
    let check_held = |h: &Harness| {
        assert!(
            disk_marker(h, &vol).is_file(),
            "the marker stays with the hold"
        );
        assert!(
            !h.fake()
                .calls()
                .iter()
                .any(|c| matches!(c, Call::ZeroOut { .. } | Call::ZeroSample { .. })),
            "a disk was erased"
        );
        assert_eq!(&read(at), b"tenant data");
        assert_eq!(&read(from_snap)[..8], b"snapshot");
        assert!(h.driver.store.get(&vol).is_none(), "not rolled back");
        assert!(h.driver.store.get(&held).is_some(), "no hold");
        let (clean, out) = state_check(h);
        assert!(!clean, "{out}");
        let line = out
            .lines()
            .find(|l| l.contains(&held))
            .unwrap_or_else(|| panic!("{out}"));
        assert!(line.contains("error"), "{line}");
        // Named by its by-id link.
        assert!(line.contains("/by-id/ata-DISK_d10"), "{line}");
        assert!(
            line.contains(&vol) && line.contains("berth state release"),
            "{line}"
        );
        // The metrics count it apart from the volumes.
        let m = berth::metrics::render(&h.driver).unwrap();
        assert!(
            m.contains(r#"berth_volumes{kind="block",phase="held"} 1"#),
            "{m}"
        );
    };
    check_held(&h);
    // Not free, not offered: d20 and d30 only.
    assert_eq!(disk_capacity(&h).await, (50 * MIB, Some(30 * MIB)));
    let other = create(&h, "other", 8 * MIB, &[("pool", "disk")])
        .await
        .volume_id;
    assert_eq!(block_info(&h, &other).disk.unwrap().path, dir.join("d20"));
    assert_eq!(&read(at), b"tenant data");
    // The id of the lost volume reaches nothing, nor does the hold's.
    for id in [&vol, &held] {
        h.ctl
            .delete_volume(Request::new(csi::DeleteVolumeRequest {
                volume_id: id.to_string(),
                ..Default::default()
            }))
            .await
            .unwrap();
    }
    // Another restart keeps it held.
    let h = restart(h.stop());
    check_held(&h);
    assert_eq!(disk_capacity(&h).await, (30 * MIB, Some(30 * MIB)));
    // The operator's release (berth stopped): the next start-up erases the
    // disk, then offers it.
    let dir_path = h.stop();
    let (os, _) = berth::os::Os::fake();
    let state = dir_path.path().join("state");
    let e = berth::state::tools::release(&state, os.files.clone(), &vol).unwrap_err();
    assert!(e.to_string().contains("no held disk"), "{e}");
    let report = berth::state::tools::release(&state, os.files.clone(), &held).unwrap();
    assert!(report.contains(&d10.display().to_string()), "{report}");
    let h = restart(dir_path);
    assert!(h.driver.store.get(&held).is_none());
    // Erased on a thread of its own (zeroing a disk takes long).
    for _ in 0..500 {
        if h.driver
            .store
            .filter(|r| r.kind == berth::state::Kind::Block && r.id != src && r.id != other)
            .is_empty()
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(h
        .fake()
        .calls()
        .iter()
        .any(|c| matches!(c, Call::ZeroOut { device, .. } if device == &d10)));
    assert_eq!(read(at), [0u8; 11]);
    assert_eq!(disk_capacity(&h).await, (40 * MIB, Some(30 * MIB)));
    let (_, out) = state_check(&h);
    assert!(!out.contains("is held"), "{out}");
    // The erase that ends the hold takes the marker with it.
    for _ in 0..500 {
        if !disk_marker(&h, &vol).exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(
        !disk_marker(&h, &vol).exists(),
        "the marker outlived the hold"
    );
}

/// `state check` before start-up: a restore onto a disk whose record says
/// Creating is an error naming the disk (start-up holds it).
#[tokio::test]
async fn state_check_reports_an_unanswered_disk_restore() {
    let h = disk_harness();
    let dir = disks(&h, None);
    script_blank(h.fake());
    let src = create(&h, "src", 8 * MIB, &[]).await.volume_id;
    let snap = snapshot_id(&h, "s", &src).await;
    let req = disk_restore_req("r", &snap);
    let vol = created_id(h.ctl.create_volume(Request::new(req)).await);
    let mut r = h.driver.store.get(&vol).unwrap();
    h.driver.store.set_phase(&mut r, Phase::Creating).unwrap();
    let (clean, out) = state_check(&h);
    assert!(!clean, "{out}");
    let line = out
        .lines()
        .find(|l| l.contains("never answered"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains(&vol), "{line}");
    // Named by its by-id link.
    assert!(
        line.contains(
            &dir.with_file_name("by-id")
                .join("ata-DISK_d10")
                .display()
                .to_string()
        ),
        "{line}"
    );
    assert!(line.contains("holds the disk"), "{line}");
}

/// A restore onto a disk that fails after the disk was claimed and written
/// is rolled back by the create that ran it: the disk is erased and free
/// again, no hold is left.
#[tokio::test]
async fn a_failed_disk_restore_is_rolled_back_not_held() {
    let h = disk_harness();
    let dir = disks(&h, None);
    script_blank(h.fake());
    let src = create(&h, "src", 8 * MIB, &[]).await.volume_id;
    let snap = snapshot_id(&h, "s", &src).await;
    let req = disk_restore_req("r", &snap);
    let d10 = dir.join("d10");
    h.fake().fail_op_under("copy", &d10, libc::EIO);
    let e = h.ctl.create_volume(Request::new(req)).await.unwrap_err();
    assert!(e.message().contains("writing"), "{e:?}");
    assert!(h.driver.store.get_by_name("r").is_none());
    assert!(h
        .driver
        .store
        .filter(|r| r.id.starts_with(berth::kinds::block::HELD_PREFIX))
        .is_empty());
    assert!(h
        .fake()
        .calls()
        .iter()
        .any(|c| matches!(c, Call::ZeroOut { device, .. } if device == &d10)));
    assert_eq!(disk_capacity(&h).await, (60 * MIB, Some(30 * MIB)));
}

/// A restore onto a disk whose copy fails and whose rollback fails too
/// (`--disk-wipe signatures`, wipefs refused): the create answered an
/// error, so its record is left Deleting, not Creating, and the retry at
/// the next start-up erases the disk and returns it to the pool instead
/// of holding it as a restore whose Ready may have been lost.
#[tokio::test]
async fn a_failed_disk_restore_whose_rollback_failed_is_erased_by_the_retry() {
    let dir = tempfile::tempdir().unwrap();
    let pool = format!("{}/disks/d*", dir.path().display());
    let args = [
        "--kinds",
        "block",
        "--disk-pool",
        pool.as_str(),
        "--disk-wipe",
        "signatures",
    ];
    let (os, f) = berth::os::Os::fake();
    let h = build(dir, os, Some(f), &args);
    let dir = disks(&h, None);
    script_blank(h.fake());
    let src = create(&h, "src", 8 * MIB, &[]).await.volume_id;
    let snap = snapshot_id(&h, "s", &src).await;
    let req = disk_restore_req("r", &snap);
    let d10 = dir.join("d10");
    h.fake().fail_op_under("copy", &d10, libc::EIO);
    h.fake().respond("wipefs", |_| out(1, ""));
    let e = h.ctl.create_volume(Request::new(req)).await.unwrap_err();
    assert!(e.message().contains("writing"), "{e:?}");
    let left = h
        .driver
        .store
        .get_by_name("r")
        .expect("the rollback failed");
    assert_eq!(left.phase, Phase::Deleting);
    let id = left.id.clone();
    let tmp = h.stop();
    let (os, f) = berth::os::Os::fake();
    register_disks(&f, &tmp.path().join("disks"), None);
    script_blank(&f);
    let h = build(tmp, os, Some(f.clone()), &args);
    assert!(h.driver.store.get(&id).is_none());
    assert!(h
        .driver
        .store
        .get(&berth::kinds::block::held_id(&id))
        .is_none());
    assert_eq!(
        runs(&f, "wipefs"),
        [["-a".to_string(), "--".into(), d10.display().to_string()]]
    );
    assert_eq!(disk_capacity(&h).await, (60 * MIB, Some(30 * MIB)));
}

/// A restore onto a disk still staged on the node when start-up holds its
/// disk (its record rolled back, a Ready lost): NodeUnstageVolume of the
/// volume's id tears the stage down by its path (the hold is of that very
/// volume's disk, not another volume's: before, unstage refused it as
/// another volume's mount forever); the disk stays held.
#[tokio::test]
async fn a_stage_of_a_volume_whose_disk_is_held_can_be_torn_down() {
    let h = disk_harness();
    let dir = disks(&h, None);
    script_blank(h.fake());
    let src = create(&h, "src", 8 * MIB, &[]).await.volume_id;
    let snap = snapshot_id(&h, "s", &src).await;
    let req = disk_restore_req("r", &snap);
    let vol = created_id(h.ctl.create_volume(Request::new(req)).await);
    let s = h.path("s");
    h.node
        .node_stage_volume(Request::new(stage_req(&vol, &s)))
        .await
        .unwrap();
    let mut r = h.driver.store.get(&vol).unwrap();
    h.driver.store.set_phase(&mut r, Phase::Creating).unwrap();
    // The same OS (its mounts) after the restart.
    h.fake().clear_calls();
    let (os, f) = (h.driver.os.clone(), h.fake.clone());
    let pool = format!("{}/d*", dir.display());
    let h = build(h.stop(), os, f, &["--kinds", "block", "--disk-pool", &pool]);
    let held = berth::kinds::block::held_id(&vol);
    assert!(h.driver.store.get(&vol).is_none());
    assert!(h.driver.store.get(&held).is_some());
    let mounted = |h: &Harness| h.fake().table().iter().any(|m| m.mount_point == s);
    assert!(mounted(&h));
    unstage_as_kubelet(&h, &vol, &s).await.unwrap();
    assert!(!mounted(&h));
    assert!(h.driver.store.get(&held).is_some());
    assert!(!h
        .fake()
        .calls()
        .iter()
        .any(|c| matches!(c, Call::ZeroOut { .. } | Call::ZeroSample { .. })));
}

/// A filesystem volume ("a", 8 MiB) and a raw one ("r", 4 MiB) on blank
/// files: their ids.
async fn fs_and_raw(h: &Harness) -> (String, String) {
    script_blank(h.fake());
    let fs = create(h, "a", 8 * MIB, &[]).await.volume_id;
    let raw = h
        .ctl
        .create_volume(Request::new(csi::CreateVolumeRequest {
            volume_capabilities: vec![raw_cap()],
            ..create_req_p("r", 4 * MIB, &[])
        }))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    (fs, raw)
}

/// An operator's `umount` of a block volume's staging mount (the
/// filesystem at the staging path, or a raw volume's device bound at
/// `<staging>/<id>`) while a pod still uses it: kubelet's re-stage at the
/// same path mounts it again (the pod's mounts are of this volume's own
/// loop device) without formatting or attaching anything anew, and the
/// pod's teardown finishes; another staging path is still refused. Before,
/// every re-stage was FAILED_PRECONDITION until the pod went.
#[tokio::test]
async fn a_block_staging_mount_taken_off_by_hand_is_staged_again() {
    let h = block(&[]);
    let f = h.fake();
    let (fs, raw) = fs_and_raw(&h).await;
    for (id, cap) in [(&fs, rwo()), (&raw, raw_cap())] {
        let (s, t, other) = (
            h.path(&format!("s-{id}")),
            h.path(&format!("t-{id}")),
            h.path("s2"),
        );
        std::fs::create_dir(&s).unwrap();
        let publish = || csi::NodePublishVolumeRequest {
            volume_capability: Some(cap.clone()),
            ..publish_req(id, &s, &t, false)
        };
        h.node
            .node_stage_volume(Request::new(stage_with(id, &s, cap.clone())))
            .await
            .unwrap();
        h.node
            .node_publish_volume(Request::new(publish()))
            .await
            .unwrap();
        let staged_mount = if *id == raw { s.join(id) } else { s.clone() };
        let (mkfs, attaches) = (runs(f, "mkfs.ext4").len(), count(f, is_attach));
        h.driver.os.mounter.unmount(&staged_mount).unwrap();
        let r = h
            .node
            .node_stage_volume(Request::new(stage_with(id, &other, cap.clone())))
            .await;
        assert_eq!(code(r), Code::FailedPrecondition, "a second staging path");
        for _ in 0..2 {
            h.node
                .node_stage_volume(Request::new(stage_with(id, &s, cap.clone())))
                .await
                .unwrap();
            h.node
                .node_publish_volume(Request::new(publish()))
                .await
                .unwrap();
        }
        let at = |p: &Path| f.table().iter().filter(|m| m.mount_point == p).count();
        assert_eq!((at(&staged_mount), at(&t)), (1, 1));
        assert_eq!(
            (runs(f, "mkfs.ext4").len(), count(f, is_attach)),
            (mkfs, attaches)
        );
        h.node
            .node_unpublish_volume(Request::new(csi::NodeUnpublishVolumeRequest {
                volume_id: id.clone(),
                target_path: t.display().to_string(),
            }))
            .await
            .unwrap();
        h.node
            .node_unstage_volume(Request::new(unstage(id, &s)))
            .await
            .unwrap();
        assert_eq!((at(&staged_mount), at(&t)), (0, 0));
        delete(&h, id).await;
    }
}

/// A published block volume's backing file moved away by hand: DeleteVolume
/// waits for the pod's mounts (its recorded staging path, or a raw
/// volume's device bound at `<staging>/<id>`, is still mounted) instead of
/// deleting a volume a pod still uses; the teardown then finishes and the
/// delete succeeds. Before, a raw volume's delete answered OK at once.
#[tokio::test]
async fn delete_of_a_volume_whose_file_was_moved_away_waits_for_its_mounts() {
    let h = block(&[]);
    let (fs, raw) = fs_and_raw(&h).await;
    for (id, cap) in [(&fs, rwo()), (&raw, raw_cap())] {
        let (s, t) = (h.path(&format!("s-{id}")), h.path(&format!("t-{id}")));
        std::fs::create_dir(&s).unwrap();
        h.node
            .node_stage_volume(Request::new(stage_with(id, &s, cap.clone())))
            .await
            .unwrap();
        h.node
            .node_publish_volume(Request::new(csi::NodePublishVolumeRequest {
                volume_capability: Some(cap.clone()),
                ..publish_req(id, &s, &t, false)
            }))
            .await
            .unwrap();
        std::fs::rename(img(&h, id), h.path(&format!("moved-{id}"))).unwrap();
        let e = try_delete(&h, id).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{id}: {e:?}");
        assert!(h.driver.store.contains(id));
        unpublish_as_kubelet(&h, id, &t).await.unwrap();
        unstage_as_kubelet(&h, id, &s).await.unwrap();
        delete(&h, id).await;
        assert!(!h.driver.store.contains(id));
    }
}

/// A restore of snapshot `snap` onto a pool disk, named `name`.
fn disk_restore_req(name: &str, snap: &str) -> csi::CreateVolumeRequest {
    let mut req = create_req_p(name, 8 * MIB, &[("pool", "disk")]);
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: snap.to_string(),
            },
        )),
    });
    req
}

/// A berth on a fake of its own over the disks and state of a stopped one
/// (`dir`), serving block volumes from the pool of stand-in disks.
fn restart_disks(dir: tempfile::TempDir) -> Harness {
    let (os, f) = berth::os::Os::fake();
    register_disks(&f, &dir.path().join("disks"), None);
    script_blank(&f);
    let pool = format!("{}/disks/d*", dir.path().display());
    build(
        dir,
        os,
        Some(f),
        &["--kinds", "block", "--disk-pool", pool.as_str()],
    )
}

/// Waits until no block record but those named in `keep` is left (a
/// whole-disk erase runs on a thread of its own).
fn wait_for_block_records(h: &Harness, keep: &[&str]) {
    for _ in 0..1000 {
        if h.driver
            .store
            .filter(|r| r.kind == berth::state::Kind::Block && !keep.contains(&r.id.as_str()))
            .is_empty()
        {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!(
        "records left: {:?}",
        h.driver
            .store
            .filter(|r| !keep.contains(&r.id.as_str()))
            .iter()
            .map(|r| r.id.clone())
            .collect::<Vec<_>>()
    );
}

/// A restore onto a disk killed during its copy: the disk is claimed and
/// its record says Creating, but the volume has no marker yet (it is
/// written only once the copy is whole, just before the Ready record: the
/// restore's own file operations show that order). Start-up knows it was
/// never handed out: the disk is erased (in the background) and offered
/// again, not held for an operator (before, every kill during a disk
/// restore's copy held its disk). `state check` says so as a warning.
#[tokio::test]
async fn a_disk_restore_killed_during_its_copy_is_erased_and_offered_again() {
    let h = disk_harness();
    let dir = disks(&h, None);
    script_blank(h.fake());
    let src = create(&h, "src", 8 * MIB, &[]).await.volume_id;
    write_at(&img(&h, &src), b"snapshot data", 4096);
    let snap = snapshot_id(&h, "s", &src).await;
    h.fake().clear_file_ops();
    let vol = created_id(
        h.ctl
            .create_volume(Request::new(disk_restore_req("r", &snap)))
            .await,
    );
    let d10 = dir.join("d10");
    assert_eq!(block_info(&h, &vol).disk.unwrap().path, d10);
    let marker = disk_marker(&h, &vol);
    assert!(marker.is_file(), "no marker");
    // The marker is made after the copy onto the disk.
    let ops = h.fake().file_ops();
    let copied = ops
        .iter()
        .position(|o| o.op == "copy" && o.path == d10)
        .expect("a copy onto the disk");
    let marked = ops
        .iter()
        .position(|o| o.path == marker)
        .expect("the marker made");
    assert!(copied < marked, "{ops:?}");
    // What a kill during the copy leaves: the record says Creating, the
    // copy is partly on the disk, no marker.
    let mut r = h.driver.store.get(&vol).unwrap();
    h.driver.store.set_phase(&mut r, Phase::Creating).unwrap();
    std::fs::remove_file(&marker).unwrap();
    let (_, out) = state_check(&h);
    let line = out
        .lines()
        .find(|l| l.contains(&vol) && l.contains("never reached its Ready record"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("warning"), "{line}");
    assert!(line.contains("erases the disk"), "{line}");
    assert!(!out.contains("holds the disk"), "{out}");
    let h = restart_disks(h.stop());
    wait_for_block_records(&h, &[src.as_str()]);
    assert!(h.driver.store.get(&vol).is_none());
    assert!(h
        .driver
        .store
        .get(&berth::kinds::block::held_id(&vol))
        .is_none());
    assert!(h
        .fake()
        .calls()
        .iter()
        .any(|c| matches!(c, Call::ZeroOut { device, .. } if device == &d10)));
    assert!(std::fs::read(&d10).unwrap().iter().all(|&x| x == 0));
    assert_eq!(disk_capacity(&h).await, (60 * MIB, Some(30 * MIB)));
    let next = create(&h, "next", 8 * MIB, &[("pool", "disk")])
        .await
        .volume_id;
    assert_eq!(block_info(&h, &next).disk.unwrap().path, d10);
}

/// A plain raw create onto a disk whose Ready record was lost (the journal
/// cut after CreateVolume answered), whose tenant wrote only where the
/// pool's blank test does not look: its marker says it reached Ready, so
/// start-up holds the disk (before, it released it to the pool without an
/// erase, and the next create got the tenant's data). Not offered, not
/// free, not erased; `state check` reports the hold as an error.
#[tokio::test]
async fn a_raw_disk_create_whose_ready_was_lost_is_held_not_offered() {
    let h = disk_harness();
    let dir = disks(&h, None);
    script_blank(h.fake());
    let mut req = create_req_p("raw", 8 * MIB, &[("pool", "disk")]);
    req.volume_capabilities = vec![raw_cap()];
    let vol = created_id(h.ctl.create_volume(Request::new(req)).await);
    let d10 = dir.join("d10");
    assert_eq!(block_info(&h, &vol).disk.unwrap().path, d10);
    let unsampled = unsampled_offsets(10 * MIB as u64);
    let at = unsampled[unsampled.len() / 2];
    write_at(&d10, b"tenant data", at);
    let dir_path = h.stop();
    let cut = cut_journal_before_last(&dir_path.path().join("state"), &vol);
    assert_eq!(cut.lines().count(), 1, "{cut}");
    assert!(cut.contains("Ready") || cut.contains("ready"), "{cut}");
    let h = restart_disks(dir_path);
    let held = berth::kinds::block::held_id(&vol);
    assert!(h.driver.store.get(&vol).is_none(), "not rolled back");
    assert!(h.driver.store.get(&held).is_some(), "no hold");
    assert!(
        !h.fake()
            .calls()
            .iter()
            .any(|c| matches!(c, Call::ZeroOut { .. } | Call::ZeroSample { .. })),
        "a disk was erased"
    );
    assert!(
        disk_marker(&h, &vol).is_file(),
        "the marker stays with the hold"
    );
    let (clean, out) = state_check(&h);
    assert!(!clean, "{out}");
    let line = out
        .lines()
        .find(|l| l.contains(&held))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("error") && line.contains(&vol), "{line}");
    // Not free, not offered: the next create gets d20.
    assert_eq!(disk_capacity(&h).await, (50 * MIB, Some(30 * MIB)));
    let next = create(&h, "next", 8 * MIB, &[("pool", "disk")])
        .await
        .volume_id;
    assert_eq!(block_info(&h, &next).disk.unwrap().path, dir.join("d20"));
    let mut buf = [0u8; 11];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(&d10).unwrap(), &mut buf, at)
        .unwrap();
    assert_eq!(&buf, b"tenant data");
}

/// A plain disk create ("v", 8 MiB, given d10) killed between its marker
/// and its Ready record (the record says Creating, the marker is there),
/// and the start-up after it, which holds the disk. Returns the harness,
/// the create's request, the volume's id and its hold's.
async fn disk_create_held_at_start_up() -> (Harness, csi::CreateVolumeRequest, String, String) {
    let h = disk_harness();
    let dir = disks(&h, None);
    script_blank(h.fake());
    let req = create_req_p("v", 8 * MIB, &[("pool", "disk")]);
    let vol = created_id(h.ctl.create_volume(Request::new(req.clone())).await);
    assert_eq!(block_info(&h, &vol).disk.unwrap().path, dir.join("d10"));
    // What the kill leaves: the marker made, no Ready record.
    let mut r = h.driver.store.get(&vol).unwrap();
    h.driver.store.set_phase(&mut r, Phase::Creating).unwrap();
    assert!(disk_marker(&h, &vol).is_file());
    let h = restart_disks(h.stop());
    let held = berth::kinds::block::held_id(&vol);
    assert!(h.driver.store.get(&held).is_some(), "no hold");
    assert!(h.driver.store.get(&vol).is_none(), "not rolled back");
    (h, req, vol, held)
}

/// A plain create onto a disk killed between its marker and its Ready
/// record (its record says Creating, its marker is there, as root_kill_block
/// `killed_during_disk_create` leaves it): start-up holds the disk, as for
/// a lost Ready record. The CO's retry of that CreateVolume (the same name
/// and request) gets that volume back, its id and its disk as they are.
/// Before, the retry got a new volume on another disk (RESOURCE_EXHAUSTED
/// on a node without another), and the held disk stayed out of the pool
/// until an operator released it. A create of another name never gets the
/// held disk, nor does a request of the name that differs.
#[tokio::test]
async fn a_disk_create_killed_before_its_ready_record_is_given_to_its_retry() {
    let (h, req, vol, held) = disk_create_held_at_start_up().await;
    let dir = h.path("disks");
    let d10 = dir.join("d10");
    // Another name, or the name with another size, never gets it.
    let other = create(&h, "other", 8 * MIB, &[("pool", "disk")])
        .await
        .volume_id;
    assert_eq!(block_info(&h, &other).disk.unwrap().path, dir.join("d20"));
    let mut bigger = req.clone();
    bigger.capacity_range = Some(csi::CapacityRange {
        required_bytes: 25 * MIB,
        limit_bytes: 0,
    });
    let big = created_id(h.ctl.create_volume(Request::new(bigger)).await);
    assert_ne!(big, vol);
    assert_eq!(block_info(&h, &big).disk.unwrap().path, dir.join("d30"));
    delete(&h, &big).await;
    // The retry.
    let again = created_id(h.ctl.create_volume(Request::new(req.clone())).await);
    assert_eq!(again, vol, "the retry made another volume");
    assert_eq!(block_info(&h, &vol).disk.unwrap().path, d10);
    assert_eq!(h.driver.store.get(&vol).unwrap().phase, Phase::Ready);
    assert!(h.driver.store.get(&held).is_none(), "the hold stays");
    assert!(disk_marker(&h, &vol).is_file(), "no marker");
    assert_eq!(
        created_id(h.ctl.create_volume(Request::new(req)).await),
        vol
    );
    let (clean, out) = state_check(&h);
    assert!(clean, "{out}");
    // Deleted: erased and free again, as every disk.
    delete(&h, &vol).await;
    delete(&h, &other).await;
    assert_eq!(disk_capacity(&h).await, (60 * MIB, Some(30 * MIB)));
    assert!(!disk_marker(&h, &vol).exists());
}

/// A restore of an ext4 volume onto a disk killed between its marker and
/// its Ready record (the journal's last line, the Ready one, never
/// written): start-up holds the disk; the CO's retry of the restore gets
/// the volume back, and what the record knows of the copy (its ext4, the
/// access type) came with it: its first stage mounts the restored
/// filesystem, never mkfs. Before, the record the hold was made of had
/// been written before the copy, so it knew nothing of the filesystem.
#[tokio::test]
async fn a_disk_restore_killed_before_its_ready_record_is_given_to_its_retry() {
    let h = disk_harness();
    let dir = disks(&h, None);
    let staging = h.path("src-staging");
    let src = staged_blank(&h, &staging).await.volume_id;
    assert!(block_info(&h, &src).formatted);
    let snap = snapshot_id(&h, "s", &src).await;
    let req = disk_restore_req("r", &snap);
    let vol = created_id(h.ctl.create_volume(Request::new(req.clone())).await);
    assert_eq!(block_info(&h, &vol).disk.unwrap().path, dir.join("d10"));
    let dir_path = h.stop();
    let cut = cut_journal_before_last(&dir_path.path().join("state"), &vol);
    assert_eq!(cut.lines().count(), 1, "{cut}");
    assert!(cut.contains("Ready") || cut.contains("ready"), "{cut}");
    let h = restart_disks(dir_path);
    let held = berth::kinds::block::held_id(&vol);
    assert!(h.driver.store.get(&held).is_some(), "no hold");
    let again = created_id(h.ctl.create_volume(Request::new(req)).await);
    assert_eq!(again, vol, "the retry made another volume");
    assert!(h.driver.store.get(&held).is_none(), "the hold stays");
    let info = block_info(&h, &vol);
    assert!(info.formatted && info.fs_type == "ext4", "{info:?}");
    h.fake().clear_calls();
    let rs = h.path("r-staging");
    h.node
        .node_stage_volume(Request::new(stage_req(&vol, &rs)))
        .await
        .unwrap();
    assert!(
        !h.fake()
            .calls()
            .iter()
            .any(|c| format!("{c:?}").contains("mkfs")),
        "the restored disk was formatted: {:?}",
        h.fake().calls()
    );
}

/// Runs `op` with the journal write that comes `skip` writes from now
/// failing (ENOSPC, as on a full state filesystem); the writes before it,
/// and those after the fault is cleared, go through. With the answer,
/// whether that write was reached at all (within 10 s).
async fn with_journal_write_failing<T>(
    h: &Harness,
    skip: usize,
    op: impl std::future::Future<Output = T>,
) -> (T, bool) {
    let f = h.fake.clone().unwrap();
    let state = h.path("state");
    let held = f.hold_op_under_after("write", &state, skip);
    let f2 = f.clone();
    let injector = tokio::task::spawn_blocking(move || {
        let reached = held.wait_reached(std::time::Duration::from_secs(10));
        if reached {
            f2.fail_op_under("write", &state, libc::ENOSPC);
        }
        held.release();
        reached
    });
    let out = op.await;
    let reached = injector.await.unwrap();
    f.clear_file_faults();
    f.clear_holds();
    (out, reached)
}

/// A plain disk create killed between its marker and its Ready record,
/// held at start-up, whose CO retry takes the volume back from its hold
/// while the journal write that removes the hold (the take-back's last)
/// fails: the retry fails, the volume's record says Creating beside its
/// hold. Returns the harness, the request, the volume's id and its hold's.
async fn taken_back_while_the_holds_removal_fails(
) -> (Harness, csi::CreateVolumeRequest, String, String) {
    let (h, req, vol, held) = disk_create_held_at_start_up().await;
    // The take-back writes the volume's record, then removes the hold.
    let (r, reached) =
        with_journal_write_failing(&h, 1, h.ctl.create_volume(Request::new(req.clone()))).await;
    assert!(reached, "the hold's removal was never written");
    assert!(r.is_err(), "{r:?}");
    assert!(h.driver.store.get(&held).is_some());
    assert_eq!(h.driver.store.get(&vol).unwrap().phase, Phase::Creating);
    (h, req, vol, held)
}

/// The CO's retry of a disk create whose hold's removal failed (the last
/// journal write of taking the volume back from its hold, `adopt_held`)
/// makes the volume Ready and removes the hold. Before, the hold stayed
/// beside the finished volume for good: `berth state check` reported its
/// disk as held, and once the volume was deleted the disk was never
/// offered again (the hold still claimed it).
#[tokio::test]
async fn a_hold_whose_removal_failed_is_removed_by_the_retry_of_its_create() {
    let (h, req, vol, held) = taken_back_while_the_holds_removal_fails().await;
    let again = created_id(h.ctl.create_volume(Request::new(req)).await);
    assert_eq!(again, vol);
    assert_eq!(h.driver.store.get(&vol).unwrap().phase, Phase::Ready);
    assert!(
        h.driver.store.get(&held).is_none(),
        "the hold stays beside the finished volume"
    );
    let (clean, out) = state_check(&h);
    assert!(clean && !out.contains(&held), "{out}");
    delete(&h, &vol).await;
    assert_eq!(disk_capacity(&h).await, (60 * MIB, Some(30 * MIB)));
    assert!(!disk_marker(&h, &vol).exists());
}

/// The retry of that create makes the volume Ready, and the hold's
/// removal fails again (or berth stops before it): the hold is left
/// beside the Ready record of the volume taken back from it, with the
/// same disk. `berth state check` says so (a warning, not a held disk),
/// and the next start-up removes it. Before, nothing ever did.
#[tokio::test]
async fn a_hold_left_beside_its_ready_volume_is_removed_at_start_up() {
    let (h, req, vol, held) = taken_back_while_the_holds_removal_fails().await;
    // The record says Ready (write 0), the hold's removal fails (write 1).
    let (r, reached) =
        with_journal_write_failing(&h, 1, h.ctl.create_volume(Request::new(req))).await;
    assert!(reached, "the retry never removed the hold");
    assert_eq!(created_id(r), vol, "the volume is whole: answered");
    assert_eq!(h.driver.store.get(&vol).unwrap().phase, Phase::Ready);
    assert!(h.driver.store.get(&held).is_some());
    let (_, out) = state_check(&h);
    let line = out
        .lines()
        .find(|l| l.contains(&held))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("start-up removes it"), "{line}");
    let h = restart_disks(h.stop());
    assert!(h.driver.store.get(&held).is_none(), "the hold stays");
    assert_eq!(h.driver.store.get(&vol).unwrap().phase, Phase::Ready);
    assert!(disk_marker(&h, &vol).is_file());
    let (clean, out) = state_check(&h);
    assert!(clean, "{out}");
    delete(&h, &vol).await;
    assert_eq!(disk_capacity(&h).await, (60 * MIB, Some(30 * MIB)));
}

/// A hold beside the Ready record of its volume that does not name the
/// same disk, or the same volume name, is no leftover of a take-back:
/// start-up leaves it, and `berth state check` reports the disk as held.
/// Guard.
#[tokio::test]
async fn a_hold_unlike_its_ready_volume_is_never_removed() {
    for differs in ["disk", "name"] {
        let (h, req, vol, held) = taken_back_while_the_holds_removal_fails().await;
        let (r, reached) =
            with_journal_write_failing(&h, 1, h.ctl.create_volume(Request::new(req))).await;
        assert!(reached);
        assert_eq!(created_id(r), vol);
        hold_unlike_its_volume(&h, &held, differs);
        let h = restart_disks(h.stop());
        assert!(h.driver.store.get(&held).is_some(), "{differs}: removed");
        let (clean, out) = state_check(&h);
        let line = out
            .lines()
            .find(|l| l.contains(&held))
            .unwrap_or_else(|| panic!("{out}"));
        assert!(!clean && line.contains("is held"), "{differs}: {line}");
    }
}

/// A DeleteVolume of a disk volume beside the hold left from taking it
/// back (the hold's removal failed at the take-back and again at the
/// retry that made the volume Ready; berth not restarted since) removes
/// that hold: the disk is erased and offered again, its marker goes, and
/// `berth state check` is clean. Before, the hold stayed for good: the
/// disk was reported held and never offered again. (A hold that names
/// another disk or another volume name refuses the delete:
/// `a_hold_unlike_its_volume_refuses_its_delete`.)
#[tokio::test]
async fn a_hold_left_beside_its_ready_volume_goes_with_its_delete() {
    let (h, vol, held) = ready_beside_its_hold().await;
    delete(&h, &vol).await;
    assert!(h.driver.store.get(&vol).is_none());
    assert!(
        h.driver.store.get(&held).is_none(),
        "the hold stays after its volume's delete"
    );
    assert!(!disk_marker(&h, &vol).exists());
    assert_eq!(disk_capacity(&h).await, (60 * MIB, Some(30 * MIB)));
    let (clean, out) = state_check(&h);
    assert!(clean, "{out}");
}

/// A disk volume made Ready by the retry of its create, beside the hold
/// it was taken back from (whose removal failed at the take-back and
/// again at that retry; berth not restarted since). Returns the harness,
/// the volume's id and its hold's.
async fn ready_beside_its_hold() -> (Harness, String, String) {
    let (h, req, vol, held) = taken_back_while_the_holds_removal_fails().await;
    let (r, reached) =
        with_journal_write_failing(&h, 1, h.ctl.create_volume(Request::new(req))).await;
    assert!(reached, "the retry never removed the hold");
    assert_eq!(created_id(r), vol);
    assert_eq!(h.driver.store.get(&vol).unwrap().phase, Phase::Ready);
    assert!(h.driver.store.get(&held).is_some(), "no hold left");
    (h, vol, held)
}

/// Makes the hold `held` unlike its volume in `differs`: "disk" (it holds
/// d20, not the volume's disk) or "name" (it names the volume "another").
/// Returns what a message naming that difference says.
fn hold_unlike_its_volume(h: &Harness, held: &str, differs: &str) -> &'static str {
    let mut hold = h.driver.store.get(held).unwrap();
    let what = if differs == "disk" {
        let dir = h.path("disks");
        let d = hold.block.as_mut().unwrap().disk.as_mut().unwrap();
        d.path = dir.join("d20");
        d.device = dir.join("d20");
        d.by_id = Some(dir.with_file_name("by-id").join("ata-DISK_d20"));
        (d.major, d.minor, d.size_bytes) = (8, 32, (20 * MIB) as u64);
        "ata-DISK_d20"
    } else {
        let mut context = (*hold.context).clone();
        context.insert("volume-name".into(), "another".into());
        hold.context = context.into();
        "\"another\""
    };
    h.driver.store.put(&hold).unwrap();
    what
}

/// Asserts that each record `(id, as it was)` is in the store as it was
/// (`what` says which case failed).
fn unchanged<const N: usize>(h: &Harness, before: [(&String, VolumeRecord); N], what: &str) {
    for (id, was) in before {
        assert_eq!(h.driver.store.get(id), Some(was), "{what}: {id} changed");
    }
}

/// A hold that bears a disk volume's id (`held-<id>`) but names another
/// volume name, or another disk, says another claimant may own the disk:
/// the volume's DeleteVolume is refused (FAILED_PRECONDITION naming the
/// hold and what differs), nothing erased and nothing changed (its record
/// still Ready as it was, the hold as it was, its marker there), and
/// `berth state check` reports the hold (held, and that it refuses the
/// volume's delete). Once the hold is gone the delete goes through.
/// Before, such a hold was left alone and the volume's disk erased.
#[tokio::test]
async fn a_hold_unlike_its_volume_refuses_its_delete() {
    for differs in ["disk", "name"] {
        let (h, vol, held) = ready_beside_its_hold().await;
        let what = hold_unlike_its_volume(&h, &held, differs);
        let (rec, hold) = (
            h.driver.store.get(&vol).unwrap(),
            h.driver.store.get(&held).unwrap(),
        );
        let f = h.fake();
        f.clear_calls();
        let e = try_delete(&h, &vol).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{differs}: {e:?}");
        let m = e.message();
        assert!(
            m.contains(&held) && m.contains(what) && m.contains("nothing was erased"),
            "{differs}: {m}"
        );
        assert_eq!(erasures(f), 0, "{differs}: {:?}", f.calls());
        unchanged(&h, [(&vol, rec), (&held, hold)], differs);
        assert!(disk_marker(&h, &vol).is_file(), "{differs}");
        let (clean, out) = state_check(&h);
        let line = out
            .lines()
            .find(|l| l.contains(&held))
            .unwrap_or_else(|| panic!("{out}"));
        assert!(
            !clean && line.contains("is held") && line.contains("DeleteVolume is refused"),
            "{differs}: {line}"
        );
        // The operator settles the hold: the delete goes through.
        h.driver.store.remove(&held).unwrap();
        delete(&h, &vol).await;
        assert_eq!(erasures(f), 1, "{differs}: {:?}", f.calls());
    }
}

/// A disk create whose record still says Creating at start-up, its
/// marker there (its Ready record lost), beside a hold that bears its id
/// but holds another disk, or names another volume: start-up never
/// writes its own hold over that one (which would end that hold's claim
/// of its disk, or its name). Both records stay as they were, nothing is
/// erased, neither disk is offered, and `berth state check` reports the
/// hold. Before, start-up wrote the volume's hold over it.
#[tokio::test]
async fn a_hold_unlike_an_unanswered_create_is_never_written_over() {
    for differs in ["disk", "name"] {
        let h = disk_harness();
        let dir = disks(&h, None);
        script_blank(h.fake());
        let vol = create(&h, "v", 8 * MIB, &[("pool", "disk")])
            .await
            .volume_id;
        assert_eq!(block_info(&h, &vol).disk.unwrap().path, dir.join("d10"));
        let mut r = h.driver.store.get(&vol).unwrap();
        h.driver.store.set_phase(&mut r, Phase::Creating).unwrap();
        assert!(disk_marker(&h, &vol).is_file());
        let held = berth::kinds::block::held_id(&vol);
        let mut context = std::collections::BTreeMap::new();
        context.insert("volume-name".to_string(), "v".to_string());
        let hold = VolumeRecord {
            id: held.clone(),
            name: held.clone(),
            phase: Phase::Ready,
            context: context.into(),
            ..r.clone()
        };
        h.driver.store.put(&hold).unwrap();
        hold_unlike_its_volume(&h, &held, differs);
        let (r, hold) = (
            h.driver.store.get(&vol).unwrap(),
            h.driver.store.get(&held).unwrap(),
        );
        let h = restart_disks(h.stop());
        unchanged(&h, [(&vol, r), (&held, hold)], differs);
        assert_eq!(erasures(h.fake()), 0, "{differs}: {:?}", h.fake().calls());
        // d10 is the record's; d20 the hold's when it holds it.
        let free = if differs == "disk" { 30 } else { 50 };
        assert_eq!(
            disk_capacity(&h).await,
            (free * MIB, Some(30 * MIB)),
            "{differs}"
        );
        let (clean, out) = state_check(&h);
        let line = out
            .lines()
            .find(|l| l.contains(&held))
            .unwrap_or_else(|| panic!("{out}"));
        assert!(!clean && line.contains("is held"), "{differs}: {line}");
    }
}

/// `berth state release` of a hold writes the record that has its disk
/// erased (`wipe-`), then removes the hold; should that removal fail, both
/// are left. A CreateVolume of the held volume's name must not then take
/// the volume back from the hold: the operator released the disk and its
/// erase is due (berth's next retry of pending deletes does it). Before,
/// it was taken back, and the claim got its volume on a disk being, or
/// about to be, zeroed. The hold stays (it matches no Ready record).
#[tokio::test]
async fn a_released_hold_is_never_taken_back() {
    let (h, req, vol, held) = disk_create_held_at_start_up().await;
    let dir = h.path("disks");
    let hold = h.driver.store.get(&held).unwrap();
    let wipe = berth::kinds::block::released(&hold).unwrap();
    h.driver.store.put(&wipe).unwrap();
    let again = created_id(h.ctl.create_volume(Request::new(req)).await);
    assert_ne!(again, vol, "taken back from a released hold");
    assert_eq!(block_info(&h, &again).disk.unwrap().path, dir.join("d20"));
    assert!(h.driver.store.get(&held).is_some());
    assert!(h.driver.store.get(&vol).is_none());
}

/// A disk volume made before disk markers were (a Ready record, no
/// marker) gets its marker at start-up, so a Ready record it loses later
/// holds its disk as well.
#[tokio::test]
async fn start_up_marks_ready_disk_volumes_made_before_markers() {
    let h = disk_harness();
    let dir = disks(&h, None);
    script_blank(h.fake());
    let file = create(&h, "file", 8 * MIB, &[]).await.volume_id;
    let vol = create(&h, "old", 8 * MIB, &[("pool", "disk")])
        .await
        .volume_id;
    std::fs::remove_file(disk_marker(&h, &vol)).unwrap();
    let h = restart_disks(h.stop());
    assert!(disk_marker(&h, &vol).is_file(), "not marked at start-up");
    assert!(
        !disk_marker(&h, &file).exists(),
        "a file volume is not a disk"
    );
    // Its Ready record lost later: held, not released.
    let dir_path = h.stop();
    cut_journal_before_last(&dir_path.path().join("state"), &vol);
    let h = restart_disks(dir_path);
    assert!(h.driver.store.get(&vol).is_none());
    let hold = h
        .driver
        .store
        .get(&berth::kinds::block::held_id(&vol))
        .expect("a hold");
    assert_eq!(hold.block.unwrap().disk.unwrap().path, dir.join("d10"));
}

/// DeleteVolume of a disk volume removes its marker once the disk is
/// erased and the record gone; a marker without any record (a delete
/// stopped after its record was removed) is reported by `state check`
/// and removed at start-up; the markers of live volumes stay.
#[tokio::test]
async fn disk_markers_go_with_their_volumes() {
    let h = disk_harness();
    let dir = disks(&h, None);
    script_blank(h.fake());
    let a = create(&h, "a", 8 * MIB, &[("pool", "disk")])
        .await
        .volume_id;
    let b = create(&h, "b", 8 * MIB, &[("pool", "disk")])
        .await
        .volume_id;
    assert!(disk_marker(&h, &a).is_file() && disk_marker(&h, &b).is_file());
    h.ctl
        .delete_volume(Request::new(csi::DeleteVolumeRequest {
            volume_id: a.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert!(h
        .fake()
        .calls()
        .iter()
        .any(|c| matches!(c, Call::ZeroOut { device, .. } if device == &dir.join("d10"))));
    assert!(h.driver.store.get(&a).is_none());
    assert!(
        !disk_marker(&h, &a).exists(),
        "the marker outlived its volume"
    );
    assert!(disk_marker(&h, &b).is_file());
    // A marker left behind by a delete that stopped after its record.
    std::fs::write(disk_marker(&h, &a), b"").unwrap();
    let (_, out) = state_check(&h);
    let line = out
        .lines()
        .find(|l| l.contains(&disk_marker(&h, &a).display().to_string()))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.contains("warning") && line.contains("no record"),
        "{line}"
    );
    let h = restart_disks(h.stop());
    assert!(!disk_marker(&h, &a).exists(), "a leftover marker stays");
    assert!(
        disk_marker(&h, &b).is_file(),
        "a live volume lost its marker"
    );
    assert!(h.driver.store.get(&b).is_some());
}

/// A create onto a disk (plain, and a restore) that fails at its last
/// step, the marker (its fsync refused): the create answers the error and
/// rolls itself back, the restore's disk erased and the plain create's
/// released, and the marker it had begun is removed, so nothing is held
/// and the disks are free again.
#[tokio::test]
async fn a_disk_create_that_fails_at_its_marker_is_rolled_back_without_it() {
    let h = disk_harness();
    let dir = disks(&h, None);
    script_blank(h.fake());
    let src = create(&h, "src", 8 * MIB, &[]).await.volume_id;
    let snap = snapshot_id(&h, "s", &src).await;
    let markers = h.path("block").join(".disks");
    h.fake().fail_op_under("fsync", &markers, libc::EIO);
    for (name, req) in [
        ("plain", create_req_p("plain", 8 * MIB, &[("pool", "disk")])),
        ("restore", disk_restore_req("restore", &snap)),
    ] {
        h.fake().clear_calls();
        let e = h.ctl.create_volume(Request::new(req)).await.unwrap_err();
        assert!(e.message().contains(".disks"), "{name}: {e:?}");
        assert!(h.driver.store.get_by_name(name).is_none(), "{name}");
        let erased = h
            .fake()
            .calls()
            .iter()
            .any(|c| matches!(c, Call::ZeroOut { device, .. } if device == &dir.join("d10")));
        assert_eq!(erased, name == "restore", "{name}");
    }
    assert!(h
        .driver
        .store
        .filter(|r| r.id.starts_with(berth::kinds::block::HELD_PREFIX))
        .is_empty());
    let left: Vec<_> = std::fs::read_dir(&markers)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    h.fake().clear_file_faults();
    assert_eq!(disk_capacity(&h).await, (60 * MIB, Some(30 * MIB)));
}

/// Disk volumes whose records were made before disk markers (no `marker`
/// flag in their block section) and still say Creating at start-up: the
/// marker's absence tells nothing for them (the journal may have lost the
/// Ready line of a volume made, and handed out, before the upgrade), so
/// their disks are held, a plain create's as well as a restore's, as
/// `state check` says first; nothing is erased.
#[tokio::test]
async fn creating_disk_records_from_before_markers_are_held() {
    let h = disk_harness();
    let dir = disks(&h, None);
    script_blank(h.fake());
    let src = create(&h, "src", 8 * MIB, &[]).await.volume_id;
    let snap = snapshot_id(&h, "s", &src).await;
    let plain = create(&h, "plain", 8 * MIB, &[("pool", "disk")])
        .await
        .volume_id;
    let restored = created_id(
        h.ctl
            .create_volume(Request::new(disk_restore_req("r", &snap)))
            .await,
    );
    for id in [&plain, &restored] {
        let mut r = h.driver.store.get(id).unwrap();
        let mut b = r.block.clone().unwrap();
        assert!(b.marker, "{id}: a new record knows it has a marker");
        b.marker = false;
        r.block = Some(b);
        h.driver.store.put(&r).unwrap();
        h.driver.store.set_phase(&mut r, Phase::Creating).unwrap();
        std::fs::remove_file(disk_marker(&h, id)).unwrap();
    }
    let (clean, out) = state_check(&h);
    assert!(!clean, "{out}");
    for id in [&plain, &restored] {
        let line = out
            .lines()
            .find(|l| l.contains(id.as_str()) && l.contains("predates disk markers"))
            .unwrap_or_else(|| panic!("{out}"));
        assert!(
            line.contains("error") && line.contains("holds the disk"),
            "{line}"
        );
    }
    let h = restart_disks(h.stop());
    assert!(
        !h.fake()
            .calls()
            .iter()
            .any(|c| matches!(c, Call::ZeroOut { .. } | Call::ZeroSample { .. })),
        "a disk was erased"
    );
    for (id, disk) in [(&plain, "d10"), (&restored, "d20")] {
        assert!(h.driver.store.get(id).is_none(), "{id}");
        let hold = h
            .driver
            .store
            .get(&berth::kinds::block::held_id(id))
            .unwrap_or_else(|| panic!("{id}: no hold"));
        assert_eq!(hold.block.unwrap().disk.unwrap().path, dir.join(disk));
    }
    assert_eq!(disk_capacity(&h).await, (30 * MIB, Some(30 * MIB)));
}

/// A loop device of another berth's block volume (`--disk-pool
/// /dev/loop*` on a node that runs two berths; its file lies in the other
/// berth's block root, known by its lock file) is never a disk of the
/// pool: not counted, not handed out, never erased. Before, only files in
/// this berth's own directories were kept out, and a blank raw volume of
/// the other berth was offered, handed to a tenant and zeroed at delete.
#[tokio::test]
async fn another_berths_volume_file_on_a_loop_device_is_never_a_pool_disk() {
    let h = disk_harness();
    let f = h.fake();
    script_blank(f);
    let other = h.path("other-berth/block");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join(".berth.lock"), "berth 0.1.0 pid 1\n").unwrap();
    let file = other.join("block-0123456789abcdef0123456789abcdef.img");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(64 * MIB as u64)
        .unwrap();
    let l = f.add_loop(&file);
    let disks = h.path("disks");
    std::fs::create_dir_all(&disks).unwrap();
    std::os::unix::fs::symlink(&l.device, disks.join("d0")).unwrap();
    assert_eq!(disk_capacity(&h).await.0, 0);
    let e = h
        .ctl
        .create_volume(Request::new(disk_req("v", 64 * MIB, 0)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    // A loop disk over a file of no berth's is offered, as before.
    loop_disk(&h, "d1", 32 * MIB);
    assert_eq!(disk_capacity(&h).await.0, 32 * MIB);
    let v = create(&h, "w", 32 * MIB, &[("pool", "disk")]).await;
    assert_eq!(v.capacity_bytes, 32 * MIB);
    assert_eq!(erasures(f), 0, "{:?}", f.calls());
}

/// Whether a pool loop disk's file is one of Berth's own under another
/// path (a hard link of a block volume's file; another mount namespace
/// shows other paths too) is told by the device and inode of every file
/// of the block root, its `.snapshots/` and its `.orphaned/`. When one of
/// them cannot be listed (EIO), or a file in one cannot be looked at,
/// that cannot be told, and the doubt is Berth's: no loop disk outside
/// Berth's directories is offered, Berth's or not. Before, a failed
/// listing or look read as "no file of Berth's there": a hard link of a
/// blank file volume was offered, handed to a tenant and zeroed at its
/// delete. (Here the faults come from the fake, which main's own reads
/// went around: `d0`, the hard link, was refused there all the same, and
/// what failed was `d1`, a file of no one's, offered while Berth's files
/// could not be read.) Once they can be read again, `d1` is offered and
/// `d0` is not.
#[tokio::test]
async fn a_pool_loop_disk_is_not_offered_while_berths_own_files_cannot_be_read() {
    let h = disk_harness();
    let f = h.fake();
    script_blank(f);
    let root = h.path("block");
    let w = create(&h, "w", 64 * MIB, &[]).await.volume_id;
    let link = h.path("d0.img");
    std::fs::hard_link(img(&h, &w), &link).unwrap();
    let (_, l1) = loop_disk(&h, "d1", 32 * MIB);
    let l0 = f.add_loop(&link);
    std::os::unix::fs::symlink(&l0.device, h.path("disks").join("d0")).unwrap();
    for (op, path) in [
        ("read_dir", root.clone()),
        ("read_dir", root.join(".snapshots")),
        ("read_dir", root.join(".orphaned")),
        ("lstat", img(&h, &w)),
    ] {
        f.fail_op_under(op, &path, libc::EIO);
        assert_eq!(
            disk_capacity(&h).await,
            (0, Some(0)),
            "{op} {} failing",
            path.display()
        );
        let e = h
            .ctl
            .create_volume(Request::new(disk_req("v", 32 * MIB, 0)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{op}: {e:?}");
        f.clear_file_faults();
    }
    assert_eq!(disk_capacity(&h).await, (32 * MIB, Some(32 * MIB)));
    let v = create(&h, "v", 32 * MIB, &[("pool", "disk")]).await;
    let d = block_info(&h, &v.volume_id).disk.unwrap();
    assert_eq!(d.minor, l1.minor);
    assert_eq!(erasures(f), 0, "{:?}", f.calls());
}

/// Whether a pool loop disk's file lies in a directory of a berth (this
/// one's or another's) is told by a lock file (`.berth.lock`) in a
/// directory above it. A lock file that cannot be looked at (EACCES,
/// EIO) is a doubt, and the doubt is a berth's: the disk is not offered,
/// and a volume already on it is refused (NodeStageVolume and
/// DeleteVolume FAILED_PRECONDITION saying what could not be told;
/// ControllerGetVolume abnormal), never erased. Before, any failed look
/// read as "no lock there": the disk was offered, handed to a tenant and
/// zeroed at delete. ENOENT and ENOTDIR are "no lock there": offered
/// (guard); while the lock file can be looked at the volume is staged,
/// and deleted (its disk erased), as before.
#[tokio::test]
async fn a_lock_file_that_cannot_be_looked_at_makes_its_directory_a_berths() {
    let h = disk_harness();
    let f = h.fake();
    script_blank(f);
    let (file, _) = loop_disk(&h, "d0", 64 * MIB);
    let lock = file.parent().unwrap().join(".berth.lock");
    for (errno, offered) in [
        (libc::ENOENT, 64 * MIB),
        (libc::ENOTDIR, 64 * MIB),
        (libc::EACCES, 0),
        (libc::EIO, 0),
    ] {
        f.fail_op_under("lstat", &lock, errno);
        assert_eq!(
            disk_capacity(&h).await,
            (offered, Some(offered)),
            "lstat of the lock file: errno {errno}"
        );
        f.clear_file_faults();
    }
    let v = create(&h, "v", 64 * MIB, &[("pool", "disk")])
        .await
        .volume_id;
    let s = h.path("s");
    f.fail_op_under("lstat", &lock, libc::EACCES);
    let c = get_volume(&h, &v).await;
    assert!(c.abnormal && c.message.contains("cannot be told"), "{c:?}");
    raw_stage_refused(&h, &v, &s, "cannot be told").await;
    f.clear_file_faults();
    stage_and_unstage_raw(&h, &v, &s, "the lock file looked at again").await;
    f.fail_op_under("lstat", &lock, libc::EACCES);
    let e = try_delete(&h, &v).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("cannot be told"), "{}", e.message());
    assert_eq!(erasures(f), 0, "{:?}", f.calls());
    f.clear_file_faults();
    delete(&h, &v).await;
    assert_eq!(erasures(f), 1, "{:?}", f.calls());
    assert_eq!(disk_capacity(&h).await, (64 * MIB, Some(64 * MIB)));
}

/// A recorded loop disk whose ownership cannot be told (a lock file above
/// its backing file cannot be looked at) is refused, at its recorded path
/// and when found again at another loop number, with a message that says
/// what happened: its backing file's ownership cannot be told, what could
/// not be read, that nothing was erased, and what to check. Before, it
/// began "... is not at <path>" (the disk was there) or "... is now ...,
/// not the disk the volume was created on" (it was).
#[tokio::test]
async fn a_loop_disk_whose_ownership_cannot_be_told_is_refused_saying_so() {
    for renumbered in [false, true] {
        let (h, f, v, file) = if renumbered {
            let (h, f, v, file, _) = loop_disk_renumbered(false).await;
            (h, f, v, file)
        } else {
            let h = disk_harness();
            script_blank(h.fake());
            let (file, _) = loop_disk(&h, "d0", 64 * MIB);
            let v = create(&h, "v", 64 * MIB, &[("pool", "disk")])
                .await
                .volume_id;
            let f = h.fake.clone().unwrap();
            (h, f, v, file)
        };
        let at = if renumbered {
            "/dev/loop1"
        } else {
            "/dev/loop0"
        };
        let lock = file.parent().unwrap().join(".berth.lock");
        f.fail_op_under("lstat", &lock, libc::EACCES);
        let s = h.path("s");
        raw_stage_refused(&h, &v, &s, "ownership of the backing file").await;
        let e = try_delete(&h, &v).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        let m = e.message();
        let (device, lock_file) = (
            format!("loop device {at}, file {}", file.display()),
            lock.display().to_string(),
        );
        for says in [
            "ownership of the backing file",
            device.as_str(),
            "cannot be told",
            lock_file.as_str(),
            "Nothing was erased",
            "Check that",
        ] {
            assert!(
                m.contains(says),
                "renumbered {renumbered}: {says:?} not in: {m}"
            );
        }
        for not in ["is not at", "is now", "not the disk"] {
            assert!(!m.contains(not), "renumbered {renumbered}: {not:?} in: {m}");
        }
        assert_eq!(erasures(&f), 0, "{:?}", f.calls());
        f.clear_file_faults();
    }
}

/// A node reboot under disk volumes: a raw one staged and published
/// read-only (the kernel's read-only flag of its disk set), and one with
/// a filesystem. After it the flags are gone and the disks come back; one
/// under its own name, the other where the pool now finds a disk of
/// another size (its name taken by another disk). kubelet stages and
/// publishes the raw one again at its paths (read-only again in the
/// kernel) and tears the other down at its old paths: OK, though its disk
/// is not where the record says, and nothing is erased or formatted.
#[tokio::test]
async fn a_reboot_under_disk_volumes_strands_nothing() {
    let h = disk_harness();
    let dir = disks(&h, None);
    let ro = block_cap(Mode::SingleNodeReaderOnly);
    let r = h
        .ctl
        .create_volume(Request::new(csi::CreateVolumeRequest {
            volume_capabilities: vec![ro.clone()],
            ..disk_req("r", 5 * MIB, 0)
        }))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let fsv = create(&h, "f", 15 * MIB, &[("pool", "disk")])
        .await
        .volume_id;
    let (sr, tr) = (h.path("sr"), h.path("tr"));
    let (sf, tf) = (h.path("sf"), h.path("tf"));
    std::fs::create_dir(&sr).unwrap();
    h.node
        .node_stage_volume(Request::new(stage_with(&r, &sr, ro.clone())))
        .await
        .unwrap();
    let publish_ro = csi::NodePublishVolumeRequest {
        volume_capability: Some(ro.clone()),
        ..publish_req(&r, &sr, &tr, true)
    };
    h.node
        .node_publish_volume(Request::new(publish_ro.clone()))
        .await
        .unwrap();
    stage_and_publish(&h, &fsv, &sf, &tf).await;
    assert!(kernel_ro(h.fake(), &dir.join("d10")));

    // The reboot: d20's name now shows a disk of another size.
    let (h, f) = restart(h, &["--disk-pool", &format!("{}/d*", dir.display())]);
    register_disks(&f, &dir, None);
    f.add_device(&dir.join("d20"), 8, 96, (25 * MIB) as u64);
    assert!(!kernel_ro(&f, &dir.join("d10")));
    f.clear_calls();

    h.node
        .node_stage_volume(Request::new(stage_with(&r, &sr, ro.clone())))
        .await
        .unwrap();
    h.node
        .node_publish_volume(Request::new(publish_ro))
        .await
        .unwrap();
    assert!(kernel_ro(&f, &dir.join("d10")), "read-only again");
    unpublish_as_kubelet(&h, &fsv, &tf).await.unwrap();
    unstage_as_kubelet(&h, &fsv, &sf).await.unwrap();
    assert_eq!(erasures(&f), 0, "{:?}", f.calls());
    assert!(runs(&f, "mkfs.ext4").is_empty() && runs(&f, "wipefs").is_empty());
    unpublish_as_kubelet(&h, &r, &tr).await.unwrap();
    unstage_as_kubelet(&h, &r, &sr).await.unwrap();
    assert!(!kernel_ro(&f, &dir.join("d10")));
    assert!(!tr.exists() && !sr.join(&r).exists());
}

/// Whether the fake kernel holds the device `dev` read-only.
fn kernel_ro(f: &FakeOs, dev: &Path) -> bool {
    berth::os::BlockDevices::read_only(f, dev).unwrap()
}

/// A raw disk volume staged with a read-only access mode is held
/// read-only by the kernel (BLKROSET), as a file volume's loop device is
/// attached read-only: a read-only bind of the device node does not stop
/// writes through it. A repeat is OK, a read-write stage at the same path
/// ALREADY_EXISTS (as for files); the unstage clears the flag, once the
/// publish is gone; a read-write stage never sets it. Before, the disk
/// stayed writable and only the publish bind was read-only.
#[tokio::test]
async fn a_raw_disk_staged_read_only_is_read_only_in_the_kernel() {
    let h = disk_harness();
    let dir = disks(&h, None);
    let f = h.fake();
    let d10 = dir.join("d10");
    let a = create(&h, "a", 5 * MIB, &[("pool", "disk")]).await;
    let id = a.volume_id;
    let (s, t) = (h.path("s"), h.path("t"));
    let ro = block_cap(Mode::SingleNodeReaderOnly);
    for _ in 0..2 {
        h.node
            .node_stage_volume(Request::new(stage_with(&id, &s, ro.clone())))
            .await
            .unwrap();
    }
    assert!(kernel_ro(f, &d10));
    let sets = |f: &FakeOs| {
        f.calls()
            .into_iter()
            .filter(|c| matches!(c, Call::SetReadOnly { .. }))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        sets(f),
        [Call::SetReadOnly {
            device: d10.clone(),
            read_only: true
        }]
    );
    let e = h
        .node
        .node_stage_volume(Request::new(stage_with(&id, &s, raw_cap())))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains("read-only"), "{}", e.message());
    assert!(kernel_ro(f, &d10));
    h.node
        .node_publish_volume(Request::new(csi::NodePublishVolumeRequest {
            volume_capability: Some(ro.clone()),
            ..publish_req(&id, &s, &t, true)
        }))
        .await
        .unwrap();
    // The staging bind taken off by hand under the publish: a stage
    // read-write there would make the pod's device writable: refused; the
    // same stage again is made.
    berth::os::Mounter::unmount(f, &s.join(&id)).unwrap();
    let e = h
        .node
        .node_stage_volume(Request::new(stage_with(&id, &s, raw_cap())))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(kernel_ro(f, &d10));
    h.node
        .node_stage_volume(Request::new(stage_with(&id, &s, ro.clone())))
        .await
        .unwrap();
    let e = h
        .node
        .node_unstage_volume(Request::new(unstage(&id, &s)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(kernel_ro(f, &d10), "cleared under a publish");
    h.node
        .node_unpublish_volume(Request::new(csi::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: t.display().to_string(),
        }))
        .await
        .unwrap();
    h.node
        .node_unstage_volume(Request::new(unstage(&id, &s)))
        .await
        .unwrap();
    assert!(!kernel_ro(f, &d10), "left read-only after unstage");
    f.clear_calls();
    h.node
        .node_stage_volume(Request::new(stage_with(&id, &s, raw_cap())))
        .await
        .unwrap();
    assert!(sets(f).is_empty(), "{:?}", sets(f));
    assert!(!kernel_ro(f, &d10));
    h.node
        .node_unstage_volume(Request::new(unstage(&id, &s)))
        .await
        .unwrap();
}

/// A read-only flag left on a disk (a raw read-only stage killed before
/// its bind, never unstaged; or set by someone else) is cleared before
/// the disk is used read-write: a read-write raw stage, a filesystem
/// stage (mkfs and a read-write mount would fail) and the erase at
/// delete (BLKZEROOUT fails with EPERM on a read-only disk: the delete
/// failed forever). A disk that stays read-only (write-protected) is
/// FAILED_PRECONDITION.
#[tokio::test]
async fn a_read_only_flag_left_on_a_disk_is_cleared_before_writing() {
    use berth::os::BlockDevices;
    let h = disk_harness();
    let dir = disks(&h, None);
    let f = h.fake();
    let (d10, d20) = (dir.join("d10"), dir.join("d20"));
    let a = create(&h, "a", 5 * MIB, &[("pool", "disk")]).await;
    let b = create(&h, "b", 15 * MIB, &[("pool", "disk")]).await;
    let s = h.path("s");
    f.set_read_only(&d10, true).unwrap();
    h.node
        .node_stage_volume(Request::new(stage_with(&a.volume_id, &s, raw_cap())))
        .await
        .unwrap();
    assert!(!kernel_ro(f, &d10));
    h.node
        .node_unstage_volume(Request::new(unstage(&a.volume_id, &s)))
        .await
        .unwrap();
    f.set_read_only(&d10, true).unwrap();
    h.ctl
        .delete_volume(Request::new(csi::DeleteVolumeRequest {
            volume_id: a.volume_id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert!(!kernel_ro(f, &d10));
    assert!(f.calls().contains(&Call::ZeroOut {
        device: d10.clone(),
        size_bytes: (10 * MIB) as u64,
    }));
    f.set_read_only(&d20, true).unwrap();
    h.node
        .node_stage_volume(Request::new(stage_req(&b.volume_id, &s)))
        .await
        .unwrap();
    assert!(!kernel_ro(f, &d20));
    assert_eq!(runs(f, "mkfs.ext4").len(), 1);
    h.node
        .node_unstage_volume(Request::new(unstage(&b.volume_id, &s)))
        .await
        .unwrap();
    // Write-protected: the flag does not go.
    let c = create(&h, "c", 5 * MIB, &[("pool", "disk")]).await;
    f.set_write_protected(&d10);
    let e = h
        .node
        .node_stage_volume(Request::new(stage_with(&c.volume_id, &s, raw_cap())))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("stays read-only"), "{}", e.message());
}

/// A filesystem stage of a raw disk volume staged read-only elsewhere
/// (its record restored from a backup taken before its first stage, so
/// the record does not say it is raw) is refused before the disk's
/// read-only flag is touched: the raw stage stays read-only.
#[tokio::test]
async fn a_refused_filesystem_stage_leaves_a_read_only_disk_read_only() {
    let h = disk_harness();
    let dir = disks(&h, None);
    let f = h.fake();
    let d10 = dir.join("d10");
    let a = create(&h, "a", 5 * MIB, &[("pool", "disk")]).await;
    let backup = h.driver.store.get(&a.volume_id).unwrap();
    let s = h.path("s");
    h.node
        .node_stage_volume(Request::new(stage_with(
            &a.volume_id,
            &s,
            block_cap(Mode::SingleNodeReaderOnly),
        )))
        .await
        .unwrap();
    h.driver.store.put(&backup).unwrap();
    let e = h
        .node
        .node_stage_volume(Request::new(stage_req(&a.volume_id, &h.path("s2"))))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(kernel_ro(f, &d10), "cleared by a refused stage");
    assert!(runs(f, "mkfs.ext4").is_empty());
}

/// A raw disk volume staged read-only by a version of Berth before the
/// disk's read-only flag (the flag is clear, its publishes are read-only
/// binds) is made read-only in the kernel when the stage is repeated (as
/// a CO does after its restart), not refused with ALREADY_EXISTS,
/// which would fail the pods' volume setup. A read-write publish says the
/// stage is read-write: a read-only repeat is ALREADY_EXISTS, nothing set.
#[tokio::test]
async fn a_read_only_disk_stage_made_before_the_flag_is_enforced_at_its_repeat() {
    use berth::os::BlockDevices;
    let h = disk_harness();
    let dir = disks(&h, None);
    let f = h.fake();
    let d10 = dir.join("d10");
    let id = create(&h, "a", 5 * MIB, &[("pool", "disk")])
        .await
        .volume_id;
    let (s, t) = (h.path("s"), h.path("t"));
    let ro = block_cap(Mode::SingleNodeReaderOnly);
    let stage = |cap: csi::VolumeCapability| {
        h.node
            .node_stage_volume(Request::new(stage_with(&id, &s, cap)))
    };
    let publish = |cap: csi::VolumeCapability, readonly: bool| {
        h.node
            .node_publish_volume(Request::new(csi::NodePublishVolumeRequest {
                volume_capability: Some(cap),
                ..publish_req(&id, &s, &t, readonly)
            }))
    };
    stage(ro.clone()).await.unwrap();
    publish(ro.clone(), true).await.unwrap();
    // As an older version left it.
    f.set_read_only(&d10, false).unwrap();
    stage(ro.clone()).await.unwrap();
    assert!(kernel_ro(f, &d10));
    h.node
        .node_unpublish_volume(Request::new(csi::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: t.display().to_string(),
        }))
        .await
        .unwrap();
    h.node
        .node_unstage_volume(Request::new(unstage(&id, &s)))
        .await
        .unwrap();
    // Staged and published read-write: a read-only repeat is refused.
    stage(raw_cap()).await.unwrap();
    publish(raw_cap(), false).await.unwrap();
    let e = stage(ro.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(!kernel_ro(f, &d10));
}

/// A first stage that fails before Berth wrote anything records nothing.
/// A filesystem stage refused because the volume holds data (a raw
/// volume whose record was restored from a backup taken before its first
/// stage): the tenant stages it raw again. Before, the refused stage
/// recorded the volume as a filesystem first, and every raw stage after
/// it was refused ("first staged with a filesystem").
#[tokio::test]
async fn a_refused_filesystem_stage_does_not_claim_a_raw_volume() {
    let h = disk_harness();
    let dir = disks(&h, None);
    let a = create(&h, "a", 5 * MIB, &[("pool", "disk")]).await;
    let backup = h.driver.store.get(&a.volume_id).unwrap();
    let s = h.path("s");
    h.node
        .node_stage_volume(Request::new(stage_with(&a.volume_id, &s, raw_cap())))
        .await
        .unwrap();
    write_at(&dir.join("d10"), b"TENANT-DATABASE-PAGE", 0);
    h.node
        .node_unstage_volume(Request::new(unstage(&a.volume_id, &s)))
        .await
        .unwrap();
    h.driver.store.put(&backup).unwrap();
    let e = h
        .node
        .node_stage_volume(Request::new(stage_req(&a.volume_id, &s)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    h.node
        .node_stage_volume(Request::new(stage_with(&a.volume_id, &s, raw_cap())))
        .await
        .unwrap();
    // The other way: a raw stage refused while the volume is mounted as
    // a filesystem elsewhere leaves its stage's repeat (kubelet's, after
    // a restart) working.
    let b = create(&h, "b", 15 * MIB, &[("pool", "disk")]).await;
    let backup = h.driver.store.get(&b.volume_id).unwrap();
    let s3 = h.path("s3");
    h.node
        .node_stage_volume(Request::new(stage_req(&b.volume_id, &s3)))
        .await
        .unwrap();
    h.driver.store.put(&backup).unwrap();
    let e = h
        .node
        .node_stage_volume(Request::new(stage_with(
            &b.volume_id,
            &h.path("s4"),
            raw_cap(),
        )))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    h.node
        .node_stage_volume(Request::new(stage_req(&b.volume_id, &s3)))
        .await
        .unwrap();
}

/// NodeUnstageVolume of a raw disk volume staged read-only finishes when
/// the disk's read-only flag cannot be cleared after the unmount: a
/// write-protected disk (the flag stays), or one whose BLKROGET fails (a
/// disk that stopped answering). The flag is cleared before any
/// read-write use anyway (a filesystem stage, the erase at delete);
/// failing the unstage after its unmount failed every retry too, so the
/// volume could never be unstaged.
#[tokio::test]
async fn an_unstage_finishes_when_the_disks_read_only_flag_cannot_be_cleared() {
    let h = disk_harness();
    let dir = disks(&h, None);
    let f = h.fake();
    let d10 = dir.join("d10");
    let s = h.path("s");
    let ro = block_cap(Mode::SingleNodeReaderOnly);
    let a = create(&h, "a", 5 * MIB, &[("pool", "disk")])
        .await
        .volume_id;
    f.set_write_protected(&d10);
    h.node
        .node_stage_volume(Request::new(stage_with(&a, &s, ro.clone())))
        .await
        .unwrap();
    assert!(kernel_ro(f, &d10));
    h.node
        .node_unstage_volume(Request::new(unstage(&a, &s)))
        .await
        .unwrap();
    assert!(!s.join(&a).exists(), "the staging bind's file stays");
    let b = create(&h, "b", 5 * MIB, &[("pool", "disk")])
        .await
        .volume_id;
    h.node
        .node_stage_volume(Request::new(stage_with(&b, &s, ro.clone())))
        .await
        .unwrap();
    f.fail_next("read_only", libc::EIO);
    h.node
        .node_unstage_volume(Request::new(unstage(&b, &s)))
        .await
        .unwrap();
    assert!(!s.join(&b).exists(), "the staging bind's file stays");
}

/// A raw disk volume staged read-write (its disk's flag clear, nothing
/// published yet) and then staged again at the same path with a
/// read-only access mode is ALREADY_EXISTS, as a file volume's is: the
/// repeat of a stage made before the flag existed cannot be told from it
/// by the mounts alone, but Berth knows how it staged the disk itself.
/// Before, the repeat answered OK and set the disk read-only under the
/// read-write stage: the pod's read-write device then failed every write
/// with EPERM.
#[tokio::test]
async fn a_read_only_repeat_of_a_read_write_raw_disk_stage_is_already_exists() {
    let h = disk_harness();
    let dir = disks(&h, None);
    let f = h.fake();
    let d10 = dir.join("d10");
    let id = create(&h, "a", 5 * MIB, &[("pool", "disk")])
        .await
        .volume_id;
    let s = h.path("s");
    h.node
        .node_stage_volume(Request::new(stage_with(&id, &s, raw_cap())))
        .await
        .unwrap();
    assert!(!kernel_ro(f, &d10));
    let e = h
        .node
        .node_stage_volume(Request::new(stage_with(
            &id,
            &s,
            block_cap(Mode::SingleNodeReaderOnly),
        )))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(
        !kernel_ro(f, &d10),
        "made read-only under a read-write stage"
    );
}

/// A pool disk the kernel holds read-only (write-protected by the device,
/// or `blockdev --setro`) is not offered: no read-write use of it can
/// work (a read-write stage fails with 'stays read-only') and it could
/// never be erased at its delete (BLKZEROOUT fails with EPERM). Before,
/// it was free like any blank disk, and CreateVolume handed it out.
#[tokio::test]
async fn a_read_only_pool_disk_is_not_offered() {
    let h = disk_harness();
    let dir = disks(&h, None);
    let f = h.fake();
    // A flag that cannot be read (d10's, asked first): not offered.
    f.fail_next("read_only", libc::EIO);
    assert_eq!(disk_capacity(&h).await, (50 * MIB, Some(30 * MIB)));
    assert_eq!(disk_capacity(&h).await, (60 * MIB, Some(30 * MIB)));
    f.set_write_protected(&dir.join("d10"));
    assert_eq!(disk_capacity(&h).await, (50 * MIB, Some(30 * MIB)));
    let a = create(&h, "a", 5 * MIB, &[("pool", "disk")]).await;
    assert_eq!(
        a.capacity_bytes,
        20 * MIB,
        "the read-only disk was handed out"
    );
    assert_eq!(disk_capacity(&h).await, (30 * MIB, Some(30 * MIB)));
    assert_eq!(erasures(f), 0);
}

/// A pool disk whose device node is bind-mounted (a raw block volume's
/// stage or publish: of another berth given the same `--disk-pool`, or of
/// anything else) is in use and not offered: a bind of the node shows
/// the filesystem holding the node in mountinfo, not the disk's numbers,
/// and a raw user need not open the disk exclusively. Before, only mounts
/// by the disk's numbers counted: a second berth handed the disk that a
/// pod of the first used raw to a new volume (and formatted it at its
/// stage, or zeroed it at a delete while the pod did not hold it).
/// Two berths given the same pool (two data directories on a node): the
/// disk of a volume one of them created and has not staged reads as blank
/// and nothing mounts it, yet the other neither counts nor hands it out,
/// as the first holds it exclusively (an O_EXCL claim) whenever nothing of
/// its own mounts it: from its create, again after its unstage and after
/// a restart, until its delete. Before, the second berth handed the disk
/// to a second volume.
#[tokio::test]
async fn a_disk_of_a_volume_not_staged_is_not_offered_to_a_second_berth() {
    let h1 = disk_harness();
    let dir = disks(&h1, None);
    let f = h1.fake.clone().unwrap();
    let pool = format!("{}/d*", dir.display());
    let args = ["--kinds", "block", "--disk-pool", &pool];
    let h2 = build(
        tempfile::tempdir().unwrap(),
        berth::os::Os::on_fake(&f),
        Some(f.clone()),
        &args,
    );
    let d10 = dir.join("d10");
    let a = create(&h1, "a", 5 * MIB, &[("pool", "disk")]).await;
    let id = a.volume_id;
    assert_eq!(block_info(&h1, &id).disk.unwrap().path, d10);
    assert!(f.claimed(&d10), "the created volume's disk is not claimed");
    assert_eq!(disk_capacity(&h2).await, (50 * MIB, Some(30 * MIB)));
    let b = create(&h2, "b", 5 * MIB, &[("pool", "disk")]).await;
    assert_eq!(
        block_info(&h2, &b.volume_id).disk.unwrap().path,
        dir.join("d20"),
        "the second berth handed out the disk of the first one's volume"
    );
    // Staged, the claim is let go for the mount (which holds the disk
    // itself): the mount succeeds.
    let s = h1.path("s");
    h1.node
        .node_stage_volume(Request::new(stage_req(&id, &s)))
        .await
        .unwrap();
    assert!(!f.claimed(&d10));
    assert_eq!(
        count(
            &f,
            |c| matches!(c, Call::MountFs { source, .. } if source == &d10)
        ),
        1
    );
    assert_eq!(disk_capacity(&h2).await, (30 * MIB, Some(30 * MIB)));
    // Unstaged, it is claimed again.
    h1.node
        .node_unstage_volume(Request::new(unstage(&id, &s)))
        .await
        .unwrap();
    assert!(f.claimed(&d10), "the unstaged volume's disk is not claimed");
    assert_eq!(disk_capacity(&h2).await, (30 * MIB, Some(30 * MIB)));
    // A restart of the first berth lets it go (its exit) and claims it
    // again at start-up.
    let h1 = build(
        h1.stop(),
        berth::os::Os::on_fake(&f),
        Some(f.clone()),
        &args,
    );
    assert!(f.claimed(&d10), "the disk is not claimed again at start-up");
    assert_eq!(disk_capacity(&h2).await, (30 * MIB, Some(30 * MIB)));
    // Deleted, it is let go for the erase, then free for either.
    h1.ctl
        .delete_volume(Request::new(csi::DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert_eq!(erasures(&f), 1);
    assert!(!f.claimed(&d10));
    assert_eq!(disk_capacity(&h2).await, (40 * MIB, Some(30 * MIB)));
}

/// A disk chosen by CreateVolume that something else claims between the
/// free check and berth's claim (another berth choosing it at the same
/// time) is not handed out: berth claims it as it chooses it, under the
/// same lock, and without its claim it is no free disk (ABORTED: a retry
/// chooses again).
#[tokio::test]
async fn a_disk_claimed_elsewhere_as_it_is_chosen_is_not_handed_out() {
    let h = disk_harness();
    let dir = disks(&h, None);
    let f = h.fake.clone().unwrap();
    f.fail_next("claim", libc::EBUSY);
    let e = h
        .ctl
        .create_volume(Request::new(create_req_p(
            "a",
            5 * MIB,
            &[("pool", "disk")],
        )))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e:?}");
    assert!(!f.claimed(&dir.join("d10")));
    // Free again (the other claim gone), the retry takes it.
    let a = create(&h, "a", 5 * MIB, &[("pool", "disk")]).await;
    assert_eq!(
        block_info(&h, &a.volume_id).disk.unwrap().path,
        dir.join("d10")
    );
    assert!(f.claimed(&dir.join("d10")));
}

#[tokio::test]
async fn a_pool_disk_whose_device_node_is_bound_is_not_offered() {
    let h1 = disk_harness();
    let dir = disks(&h1, None);
    let f = h1.fake.clone().unwrap();
    let pool = format!("{}/d*", dir.display());
    let h2 = build(
        tempfile::tempdir().unwrap(),
        berth::os::Os::on_fake(&f),
        Some(f.clone()),
        &["--kinds", "block", "--disk-pool", &pool],
    );
    let a = create(&h1, "a", 5 * MIB, &[("pool", "disk")]).await;
    let id = a.volume_id;
    assert_eq!(block_info(&h1, &id).disk.unwrap().path, dir.join("d10"));
    let (s, t) = (h1.path("s"), h1.path("t"));
    h1.node
        .node_stage_volume(Request::new(stage_with(&id, &s, raw_cap())))
        .await
        .unwrap();
    h1.node
        .node_publish_volume(Request::new(csi::NodePublishVolumeRequest {
            volume_capability: Some(raw_cap()),
            ..publish_req(&id, &s, &t, false)
        }))
        .await
        .unwrap();
    assert_eq!(disk_capacity(&h2).await, (50 * MIB, Some(30 * MIB)));
    let b = create(&h2, "b", 5 * MIB, &[("pool", "disk")]).await;
    assert_eq!(
        block_info(&h2, &b.volume_id).disk.unwrap().path,
        dir.join("d20"),
        "the second berth handed out the disk the first one's pod uses raw"
    );
    // Its stage taken off by hand, the publish alone keeps it in use.
    berth::os::Mounter::unmount(f.as_ref(), &s.join(&id)).unwrap();
    assert_eq!(disk_capacity(&h2).await, (30 * MIB, Some(30 * MIB)));
    // Unused, it is blank where the second berth looks, and the first
    // berth's record is not the second one's: offered (not proof of use).
    berth::os::Mounter::unmount(f.as_ref(), &t).unwrap();
    assert_eq!(disk_capacity(&h2).await, (40 * MIB, Some(30 * MIB)));
    assert_eq!(erasures(&f), 0);
}

/// A volume whose DeleteVolume failed half way (its record Deleting: the
/// file could not be removed) was deleted at the CO's request and is
/// finished by a retry: ControllerPublishVolume, NodeStageVolume and
/// NodePublishVolume of it are NOT_FOUND, and nothing is attached or
/// mounted; the retry of the delete then removes it. Before, the record
/// was taken for a volume's like any other: ControllerPublishVolume
/// answered OK and recorded the node (DeleteVolume's retry then refused
/// it as still published), and NodeStageVolume attached and mounted the
/// file, handing a pod a volume being deleted, whose delete the retry
/// every minute then failed to finish (its loop device mounted).
#[tokio::test]
async fn a_volume_whose_delete_failed_half_way_is_not_published_or_staged() {
    let h = block(&[]);
    script_blank(h.fake());
    let id = create(&h, "a", 8 * MIB, &[]).await.volume_id;
    let file = img(&h, &id);
    h.fake().fail_op_under("unlink", &file, libc::EIO);
    try_delete(&h, &id).await.expect_err("the file stays");
    assert_eq!(h.driver.store.get(&id).unwrap().phase, Phase::Deleting);
    h.fake().clear_file_faults();
    h.fake().clear_calls();
    let e = controller_publish(&h, &id, NODE)
        .await
        .expect_err("published while being deleted");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(h.driver.store.get(&id).unwrap().published.is_empty());
    let staging = h.path("stage");
    let e = h
        .node
        .node_stage_volume(Request::new(stage_req(&id, &staging)))
        .await
        .expect_err("staged while being deleted");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let target = h.path("target");
    let e = h
        .node
        .node_publish_volume(Request::new(publish_req(&id, &staging, &target, false)))
        .await
        .expect_err("published on the node while being deleted");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(h.fake().loops().is_empty());
    assert!(h
        .fake()
        .table()
        .iter()
        .all(|m| !m.mount_point.starts_with(h.dir.path())));
    retry_pending_and_wait(&h).await;
    assert!(h.driver.store.get(&id).is_none());
    assert!(!file.exists());
}

/// A volume whose record says Deleting (a DeleteVolume that did not
/// finish, left staged and published: what the delete's check did not
/// see, or a journal from before 4bc682a) is NOT_FOUND for
/// ControllerExpandVolume and NodeExpandVolume, as for ControllerPublish,
/// NodeStage and NodePublish, and nothing grows; the node can still take
/// it down, and the retry then finishes the delete. Before,
/// ControllerExpandVolume answered ABORTED (an operation in progress, which
/// the resizer retries for good) and NodeExpandVolume grew the file, the
/// loop device and the filesystem of the volume being deleted.
#[tokio::test]
async fn a_volume_whose_delete_did_not_finish_is_not_expanded() {
    let h = block(&[]);
    let f = h.fake();
    script_blank(f);
    let id = create(&h, "a", 8 * MIB, &[]).await.volume_id;
    let (s, t) = (h.path("s"), h.path("t"));
    stage_and_publish(&h, &id, &s, &t).await;
    let mut rec = h.driver.store.get(&id).unwrap();
    h.driver.store.set_phase(&mut rec, Phase::Deleting).unwrap();
    f.clear_calls();
    let e = h
        .ctl
        .controller_expand_volume(Request::new(expand_req(&id, 16 * MIB, 0)))
        .await
        .expect_err("expanded while being deleted");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("being deleted"), "{e:?}");
    let e = h
        .node
        .node_expand_volume(Request::new(node_expand_req(&id, &t, &s, 16 * MIB)))
        .await
        .expect_err("grown on the node while being deleted");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    not_grown(&h, f, &id, 8 * MIB);
    assert!(runs(f, "resize2fs").is_empty());
    let rec = h.driver.store.get(&id).unwrap();
    assert_eq!((rec.phase, rec.capacity_bytes), (Phase::Deleting, 8 * MIB));
    unpublish_as_kubelet(&h, &id, &t).await.expect("unpublish");
    unstage_as_kubelet(&h, &id, &s).await.expect("unstage");
    retry_pending_and_wait(&h).await;
    assert!(h.driver.store.get(&id).is_none());
    assert!(!img(&h, &id).exists());
}

/// Block start-up finishes each of its leftovers on its own: one it
/// cannot remove (here an unfinished snapshot copy whose unlink fails) is
/// logged and left for the next start-up, and the rest of the work is
/// still done: the disk of a Ready disk volume is claimed again, and a
/// Ready restore whose copy a crash left under its temporary name is moved
/// to its name. Before, the first leftover that could not be removed
/// ended the whole pass (`?`): the Ready restore's file stayed under
/// `.restoring-<id>.img` (every NodeStageVolume of it FAILED_PRECONDITION,
/// its file missing) and no disk was claimed (a second berth given the
/// same pool took the Ready volume's disk for blank).
#[tokio::test]
async fn one_leftover_start_up_cannot_remove_does_not_stop_the_others() {
    let h = disk_harness();
    let dir = disks(&h, None);
    script_blank(h.fake());
    let f = h.fake.clone().unwrap();
    let d10 = dir.join("d10");
    let a = create(&h, "a", 5 * MIB, &[("pool", "disk")])
        .await
        .volume_id;
    assert_eq!(block_info(&h, &a).disk.unwrap().path, d10);
    let src = create(&h, "src", MIB, &[]).await.volume_id;
    let snap = snapshot_id(&h, "s", &src).await;
    let mut req = create_req_p("r", MIB, &[]);
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: snap.clone(),
            },
        )),
    });
    let r = created_id(h.ctl.create_volume(Request::new(req)).await);
    // The crash: the restore's record said Ready, its copy was not moved
    // to its name yet.
    let restoring = h.path("block").join(format!(".restoring-{r}.img"));
    std::fs::rename(img(&h, &r), &restoring).unwrap();
    // An unfinished snapshot copy that start-up cannot remove.
    let stuck = h
        .path("block/.snapshots")
        .join(".partial-block-snap-00000000000000000000000000000000.img");
    std::fs::write(&stuck, b"").unwrap();
    let pool = format!("{}/d*", dir.display());
    let args = ["--kinds", "block", "--disk-pool", &pool];
    let state = h.stop();
    f.fail_op_under("unlink", &stuck, libc::EIO);
    let h = build(state, berth::os::Os::on_fake(&f), Some(f.clone()), &args);
    assert!(stuck.exists(), "the fault let the removal through");
    assert!(
        img(&h, &r).is_file() && !restoring.exists(),
        "the Ready restore's file was not moved to its name"
    );
    assert!(
        f.claimed(&d10),
        "the Ready disk volume's disk was not claimed at start-up"
    );
    // The next start-up removes the leftover once it can.
    f.clear_file_faults();
    let h = build(h.stop(), berth::os::Os::on_fake(&f), Some(f.clone()), &args);
    assert!(!stuck.exists());
    assert!(img(&h, &r).is_file());
}

/// ControllerExpandVolume's capacity_range is REQUIRED, and a CapacityRange
/// must specify at least one of its fields (0 is "unspecified"): one with
/// neither is INVALID_ARGUMENT, for a thin and a thick volume and one of
/// another node, and nothing changes. It answered OK with the old size,
/// a no-op an external-resizer would have taken for a finished expansion.
#[tokio::test]
async fn controller_expansion_with_an_empty_capacity_range_is_invalid() {
    let h = block(&[]);
    let thin = create(&h, "a", 8 * MIB, &[]).await;
    let thick = create(&h, "t", 8 * MIB, &[("allocation", "thick")]).await;
    let other = "block-0123456789abcdef0123456789abcdef";
    for id in [thin.volume_id.as_str(), thick.volume_id.as_str(), other] {
        let before = h.driver.store.get(id);
        let e = h
            .ctl
            .controller_expand_volume(Request::new(expand_req(id, 0, 0)))
            .await
            .expect_err("an empty capacity_range should be refused");
        assert_eq!(e.code(), Code::InvalidArgument, "{id}: {}", e.message());
        assert!(e.message().contains("capacity_range"), "{}", e.message());
        assert_eq!(h.driver.store.get(id), before, "{id}");
    }
}

/// A filesystem volume staged read-only (a read-only access mode), thin
/// and thick: NodeExpandVolume grows its file and its loop device and
/// answers OK with the new size; the filesystem, which the kernel does not
/// grow while it is mounted read-only, is flagged (`grow_fs`) before the
/// file grows and grown at the next read-write stage, which clears the
/// flag. A retry is OK and changes nothing more. Before, it was
/// FAILED_PRECONDITION ("not mounted read-write; it is grown online once
/// the volume is staged", though it was staged), nothing grew, and the
/// kubelet retried for as long as the volume stayed staged read-only.
#[tokio::test]
async fn a_node_expansion_of_a_filesystem_staged_read_only_is_finished_at_the_next_read_write_stage(
) {
    let h = block(&[]);
    let f = h.fake();
    script_blank(f);
    for (name, kv) in [("thin", &[][..]), ("thick", &[("allocation", "thick")][..])] {
        let id = create(&h, name, 8 * MIB, kv).await.volume_id;
        if name == "thick" {
            h.ctl
                .controller_expand_volume(Request::new(expand_req(&id, 16 * MIB, 0)))
                .await
                .unwrap();
        }
        let s = h.path(&format!("s-{name}"));
        // Formatted by a read-write stage, then staged read-only.
        h.node
            .node_stage_volume(Request::new(stage_req(&id, &s)))
            .await
            .unwrap();
        h.node
            .node_unstage_volume(Request::new(unstage(&id, &s)))
            .await
            .unwrap();
        let ro = mount_cap(Mode::SingleNodeReaderOnly);
        h.node
            .node_stage_volume(Request::new(stage_with(&id, &s, ro.clone())))
            .await
            .unwrap();
        f.clear_calls();
        for _ in 0..2 {
            let mut r = node_expand_req(&id, &s, &s, 16 * MIB);
            r.volume_capability = Some(ro.clone());
            let r = h
                .node
                .node_expand_volume(Request::new(r))
                .await
                .unwrap_or_else(|e| panic!("{name}: {e:?}"))
                .into_inner();
            assert_eq!(r.capacity_bytes, 16 * MIB, "{name}");
            assert_eq!(
                std::fs::metadata(img(&h, &id)).unwrap().len(),
                16 * MIB as u64,
                "{name}"
            );
            assert!(block_info(&h, &id).grow_fs, "{name}: flagged");
            assert_eq!(h.driver.store.get(&id).unwrap().capacity_bytes, 16 * MIB);
        }
        // The device takes the file's size once (a thick file was grown
        // by ControllerExpandVolume, before its device was attached).
        assert_eq!(
            count(f, |c| matches!(c, Call::LoopSetCapacity { .. })),
            usize::from(name == "thin"),
            "{name}"
        );
        assert!(runs(f, "resize2fs").is_empty(), "{name}");
        // The next read-write stage grows the filesystem.
        h.node
            .node_unstage_volume(Request::new(unstage(&id, &s)))
            .await
            .unwrap();
        f.clear_calls();
        h.node
            .node_stage_volume(Request::new(stage_req(&id, &s)))
            .await
            .unwrap();
        assert!(!runs(f, "resize2fs").is_empty(), "{name}: {:?}", f.calls());
        assert!(!block_info(&h, &id).grow_fs, "{name}: done");
        h.node
            .node_unstage_volume(Request::new(unstage(&id, &s)))
            .await
            .unwrap();
    }
}

/// The retry of an unfinished delete (start-up and every minute) never
/// erases a whole disk a pod still uses: two disk volumes whose records
/// say Deleting, one staged with a filesystem, the other staged raw and
/// published, are left in place (no erase, records kept), then erased
/// once they are unpublished and unstaged. The retry does DeleteVolume's
/// own check (`refuse_in_use`) before the kind's.
#[tokio::test]
async fn the_retry_of_a_delete_never_erases_a_disk_in_use() {
    let h = disk_harness();
    disks(&h, None);
    let f = h.fake();
    let a = create(&h, "a", 5 * MIB, &[("pool", "disk")])
        .await
        .volume_id;
    let b = create(&h, "b", 5 * MIB, &[("pool", "disk")])
        .await
        .volume_id;
    let (sa, sb, tb) = (h.path("sa"), h.path("sb"), h.path("tb"));
    h.node
        .node_stage_volume(Request::new(stage_req(&a, &sa)))
        .await
        .expect("stage a");
    h.node
        .node_stage_volume(Request::new(stage_with(&b, &sb, raw_cap())))
        .await
        .expect("stage b raw");
    h.node
        .node_publish_volume(Request::new(csi::NodePublishVolumeRequest {
            volume_capability: Some(raw_cap()),
            ..publish_req(&b, &sb, &tb, false)
        }))
        .await
        .expect("publish b raw");
    for id in [&a, &b] {
        let mut rec = h.driver.store.get(id).unwrap();
        h.driver.store.set_phase(&mut rec, Phase::Deleting).unwrap();
    }
    f.clear_calls();
    retry_pending_and_wait(&h).await;
    assert_eq!(erasures(f), 0, "a disk in use was erased");
    for id in [&a, &b] {
        assert_eq!(
            h.driver.store.get(id).map(|r| r.phase),
            Some(Phase::Deleting)
        );
    }
    unpublish_as_kubelet(&h, &b, &tb)
        .await
        .expect("unpublish b");
    unstage_as_kubelet(&h, &b, &sb).await.expect("unstage b");
    unstage_as_kubelet(&h, &a, &sa).await.expect("unstage a");
    retry_pending_and_wait(&h).await;
    assert!(h.driver.store.get(&a).is_none());
    assert!(h.driver.store.get(&b).is_none());
    assert_eq!(erasures(f), 2);
}

/// Fields a newer berth wrote inside a block volume's record, in its
/// block section and in its content source, are kept when this version
/// rewrites the record (a ControllerPublishVolume, then a
/// ControllerUnpublishVolume), through a restart (the journal replayed),
/// and through a compaction (the snapshot file) and the restart after it,
/// as a top-level field is (handlers
/// `a_field_a_newer_berth_recorded_survives_a_rewrite_by_this_one`).
/// Before, the block section's were dropped on read, and the first
/// rewrite wrote the record without them; a content source holding one
/// did not read at all (start-up refused the journal).
#[tokio::test]
async fn fields_a_newer_berth_recorded_in_a_block_record_survive_a_rewrite() {
    let h = block(&[]);
    let v = create(&h, "a", 8 * MIB, &[]).await;
    let mut req = create_req_p("c", 8 * MIB, &[]);
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Volume(
            csi::volume_content_source::VolumeSource {
                volume_id: v.volume_id.clone(),
            },
        )),
    });
    let id = created_id(h.ctl.create_volume(Request::new(req)).await);
    let rec = h.driver.store.get(&id).unwrap();
    let dir = h.stop();
    // The record as a newer berth writes it: one field more in each
    // section, appended to the log with its checksum.
    let json = serde_json::to_string(&berth::state::journal::EntryRef::Put(&rec)).unwrap();
    let source = format!(r#""source":{{"volume":"{}"}}"#, v.volume_id);
    assert_eq!(json.matches(&source).count(), 1, "{json}");
    assert_eq!(json.matches(r#""block":{"#).count(), 1, "{json}");
    let json = json
        .replace(
            &source,
            &format!(
                r#""source":{{"volume":"{}","newer_source":7}}"#,
                v.volume_id
            ),
        )
        .replace(
            r#""block":{"#,
            r#""block":{"newer_block":{"x":[1,"a\"b"],"y":null},"#,
        );
    append_change(dir.path(), &json);
    let kept = |h: &Harness, when: &str| {
        let r = h.driver.store.get(&id).expect("the record");
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v["block"]["newer_block"],
            serde_json::json!({"x": [1, "a\"b"], "y": null}),
            "{when}: {v}"
        );
        assert_eq!(v["source"]["newer_source"], 7, "{when}: {v}");
        r
    };
    let (os, f) = berth::os::Os::fake();
    let h = build(dir, os, Some(f), &["--kinds", "block"]);
    kept(&h, "read");
    controller_publish(&h, &id, NODE).await.expect("publish");
    let r = kept(&h, "after publish");
    assert!(r.published.contains_key(NODE));
    let (h, _) = restart(h, &[]);
    let r = kept(&h, "after publish and a restart");
    assert!(r.published.contains_key(NODE));
    controller_unpublish(&h, &id, NODE)
        .await
        .expect("unpublish");
    assert!(h.driver.store.checkpoint(0).unwrap());
    let (h, _) = restart(h, &[]);
    let r = kept(&h, "after unpublish, a compaction and a restart");
    assert!(r.published.is_empty());
    // The rest of the record reads as before.
    assert_eq!(r.capacity_bytes, rec.capacity_bytes);
    assert_eq!(
        r.block.as_deref().map(|b| (&b.default_fs, b.allocation)),
        rec.block.as_deref().map(|b| (&b.default_fs, b.allocation))
    );
    delete(&h, &id).await;
    assert!(h.driver.store.get(&id).is_none());
}

/// A file volume's DeleteVolume on a full state filesystem (the block root
/// on it too): the journal cannot take its Deleting phase (ENOSPC). Before,
/// that delete failed (INTERNAL) on every retry while the filesystem stayed
/// full, and the volume's file, which could make the room, stayed. Now the
/// file is emptied in place (its blocks punched out, its size kept, its
/// loop device detached) and the phase written again: with room, the delete
/// goes through; without, RESOURCE_EXHAUSTED, the volume Ready with its
/// own file at its name (zeros), and a retry with room finishes it. A file
/// with no blocks to give back frees nothing: RESOURCE_EXHAUSTED, as it
/// was. Only the volume's own file is punched.
#[tokio::test]
async fn a_delete_without_room_for_its_intent_frees_the_volumes_own_file() {
    let h = block(&[]);
    let punched = |h: &Harness| -> Vec<PathBuf> {
        h.fake()
            .file_ops()
            .into_iter()
            .filter(|o| o.op == "punch")
            .map(|o| o.path)
            .collect()
    };
    let with_data = |id: &str| write_at(&img(&h, id), &[7u8; 64 << 10], MIB as u64);
    // Data to free: the phase is written at the second attempt.
    let full = create(&h, "full", 4 * MIB, &[]).await.volume_id;
    let other = create(&h, "other", 4 * MIB, &[]).await.volume_id;
    with_data(&full);
    with_data(&other);
    h.fake().fail_next("write", libc::ENOSPC);
    let r = try_delete(&h, &full).await;
    assert!(r.is_ok(), "{r:?}");
    assert!(h.driver.store.get(&full).is_none());
    assert!(!img(&h, &full).exists());
    assert_eq!(punched(&h), vec![img(&h, &full)]);
    // Nothing to free (a thin file never written): refused, as it was.
    let empty = create(&h, "empty", 4 * MIB, &[]).await.volume_id;
    h.fake().fail_next("write", libc::ENOSPC);
    let e = try_delete(&h, &empty).await.unwrap_err();
    assert_refused_for_room(&e, false);
    assert_eq!(h.driver.store.get(&empty).unwrap().phase, Phase::Ready);
    assert_eq!(std::fs::metadata(img(&h, &empty)).unwrap().len(), 4 << 20);
    assert_eq!(punched(&h).len(), 1);
    delete(&h, &empty).await;
    assert!(h.driver.store.get(&empty).is_none());
    // Data freed, and still no room: refused, emptied, in place, Ready.
    let stuck = create(&h, "stuck", 4 * MIB, &[]).await.volume_id;
    with_data(&stuck);
    h.fake()
        .fail_op_under("write", &h.path("state"), libc::ENOSPC);
    let e = try_delete(&h, &stuck).await.unwrap_err();
    h.fake().clear_file_faults();
    assert_refused_for_room(&e, true);
    assert_eq!(h.driver.store.get(&stuck).unwrap().phase, Phase::Ready);
    let left = std::fs::read(img(&h, &stuck)).unwrap();
    assert_eq!(left.len(), 4 << 20);
    assert!(left.iter().all(|b| *b == 0));
    assert_eq!(punched(&h), vec![img(&h, &full), img(&h, &stuck)]);
    // The other volume is untouched, and nothing was moved aside.
    let kept = std::fs::read(img(&h, &other)).unwrap();
    assert_eq!(&kept[MIB as usize..][..64 << 10], &[7u8; 64 << 10][..]);
    assert!(!h.path("block/.orphaned").exists());
    // A restart (or a crash) here finds the volume as its record says.
    let (h, _f) = restart(h, &[]);
    assert_eq!(h.driver.store.get(&stuck).unwrap().phase, Phase::Ready);
    assert_eq!(std::fs::metadata(img(&h, &stuck)).unwrap().len(), 4 << 20);
    assert!(!h.path("block/.orphaned").exists());
    delete(&h, &stuck).await;
    assert!(h.driver.store.get(&stuck).is_none());
    assert!(!img(&h, &stuck).exists());
    assert_eq!(h.driver.store.get(&other).unwrap().phase, Phase::Ready);
}

/// A new file-backed volume of 4 MiB named `name`, for raw block: its id.
async fn create_raw(h: &Harness, name: &str) -> String {
    let req = csi::CreateVolumeRequest {
        volume_capabilities: vec![raw_cap()],
        ..create_req_p(name, 4 * MIB, &[])
    };
    let v = h
        .ctl
        .create_volume(Request::new(req))
        .await
        .expect("create");
    v.into_inner().volume.expect("volume").volume_id
}

/// The mount a fake table shows at `p` (the top one).
fn top_at(f: &FakeOs, p: &Path) -> berth::os::MountEntry {
    f.table()
        .into_iter()
        .rev()
        .find(|m| m.mount_point == p)
        .unwrap_or_else(|| panic!("nothing mounted at {}", p.display()))
}

/// A raw volume's staging bind (`<staging>/<id>`) swapped for another
/// volume's device node after NodePublishVolume's checks and just before
/// its bind: the pod's target gets the device that was checked, never
/// the other (a bind by path gave it the other volume's device).
#[tokio::test]
async fn a_raw_publish_binds_the_staged_device_though_its_marker_is_swapped() {
    use berth::os::Mounter;
    let h = block(&[]);
    let f = h.fake.clone().unwrap();
    let mut staged = Vec::new();
    for name in ["r1", "r2"] {
        let id = create_raw(&h, name).await;
        let s = h.path(&format!("s-{name}"));
        std::fs::create_dir(&s).unwrap();
        h.node
            .node_stage_volume(Request::new(stage_with(&id, &s, raw_cap())))
            .await
            .unwrap();
        staged.push((id.clone(), s.join(&id)));
    }
    let (id, marker) = staged[0].clone();
    let (own, other) = (top_at(&f, &marker).root, top_at(&f, &staged[1].1).root);
    assert_ne!(own, other);
    let (f2, m2, dev2) = (f.clone(), marker.clone(), other.clone());
    f.before_next("bind", move || {
        f2.unmount(&m2).unwrap();
        f2.bind(&dev2, &m2, berth::os::MountFlags::default())
            .unwrap();
    });
    let t = h.path("t");
    h.node
        .node_publish_volume(Request::new(csi::NodePublishVolumeRequest {
            volume_capability: Some(raw_cap()),
            ..publish_req(&id, marker.parent().unwrap(), &t, false)
        }))
        .await
        .unwrap();
    assert_eq!(top_at(&f, &marker).root, other, "the swap was made");
    assert_eq!(top_at(&f, &t).root, own);
}
