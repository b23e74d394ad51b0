//! Root tests of snapshots, restores and clones on real filesystems: a
//! restored volume holds the tree as it was when the snapshot was taken
//! (content, modes, owners, nanosecond times, symlinks, hard-link groups,
//! xattrs, FIFOs, device nodes, sockets, sparseness), for local directories, ext4
//! and xfs on block volumes, and raw block volumes; a staged filesystem is
//! frozen for its snapshot, and on a block root that clones files (xfs with
//! reflink) a raw volume in use is snapshotted by one atomic clone.
//! Ignored unless asked for (tests/run-all.sh runs them as root in a
//! private mount namespace); every mount and loop device is removed even
//! when a test fails.
mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use berth::csi::v1 as csi;
use berth::csi::v1::controller_server::Controller;
use berth::csi::v1::node_server::Node;
use berth::csi::v1::volume_capability::access_mode::Mode;
use common::*;
use tonic::Request;

const MIB: i64 = 1 << 20;

/// What a tree holds, as a snapshot must keep it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    len: u64,
    mtime: (i64, i64),
    content: Vec<u8>,
    target: Option<PathBuf>,
    rdev: u64,
    xattrs: BTreeMap<String, Vec<u8>>,
    /// The first path (in walk order) of the entry's inode: hard links.
    inode_of: PathBuf,
    /// Allocated bytes, for regular files (sparseness).
    allocated: u64,
}

fn manifest(root: &Path) -> BTreeMap<PathBuf, Entry> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, PathBuf> = BTreeMap::new();
    walk(root, root, &mut out, &mut inodes);
    out
}

fn walk(
    root: &Path,
    dir: &Path,
    out: &mut BTreeMap<PathBuf, Entry>,
    inodes: &mut BTreeMap<u64, PathBuf>,
) {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    for p in names {
        let rel = p.strip_prefix(root).unwrap().to_path_buf();
        if rel.as_os_str() == "lost+found" {
            continue;
        }
        let m = std::fs::symlink_metadata(&p).unwrap();
        let ft = m.file_type();
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_file() {
            "file"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_fifo() {
            "fifo"
        } else if ft.is_char_device() {
            "char"
        } else if ft.is_socket() {
            "socket"
        } else {
            "other"
        };
        let xattrs = xattr::list(&p)
            .map(|names| {
                names
                    .filter_map(|n| {
                        let v = xattr::get(&p, &n).ok()??;
                        Some((n.to_string_lossy().into_owned(), v))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let inode_of = inodes.entry(m.ino()).or_insert_with(|| rel.clone()).clone();
        out.insert(
            rel.clone(),
            Entry {
                kind,
                mode: if ft.is_symlink() {
                    0
                } else {
                    m.mode() & 0o7777
                },
                uid: m.uid(),
                gid: m.gid(),
                len: if ft.is_dir() { 0 } else { m.len() },
                mtime: if ft.is_dir() {
                    (0, 0)
                } else {
                    (m.mtime(), m.mtime_nsec())
                },
                content: if ft.is_file() {
                    std::fs::read(&p).unwrap()
                } else {
                    Vec::new()
                },
                target: ft.is_symlink().then(|| std::fs::read_link(&p).unwrap()),
                rdev: m.rdev(),
                xattrs,
                inode_of,
                allocated: if ft.is_file() { m.blocks() * 512 } else { 0 },
            },
        );
        if ft.is_dir() {
            walk(root, &p, out, inodes);
        }
    }
}

/// Fills `dir` with every kind of entry a snapshot must keep.
fn populate(dir: &Path) {
    std::fs::create_dir_all(dir.join("a/b")).unwrap();
    std::fs::write(dir.join("a/b/f"), b"hello").unwrap();
    std::fs::set_permissions(dir.join("a/b/f"), std::fs::Permissions::from_mode(0o4750)).unwrap();
    nix::unistd::chown(
        &dir.join("a/b/f"),
        Some(nix::unistd::Uid::from_raw(1234)),
        Some(nix::unistd::Gid::from_raw(5678)),
    )
    .unwrap();
    std::fs::set_permissions(dir.join("a/b/f"), std::fs::Permissions::from_mode(0o4750)).unwrap();
    std::fs::hard_link(dir.join("a/b/f"), dir.join("a/link")).unwrap();
    std::os::unix::fs::symlink("b/f", dir.join("a/sym")).unwrap();
    std::os::unix::fs::symlink("/nowhere", dir.join("dangling")).unwrap();
    nix::unistd::mkfifo(
        &dir.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o640),
    )
    .unwrap();
    nix::sys::stat::mknod(
        &dir.join("null"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    // A socket a program listened on (its node stays when it stops).
    drop(std::os::unix::net::UnixListener::bind(dir.join("sock")).unwrap());
    let sparse = std::fs::File::create(dir.join("sparse")).unwrap();
    sparse.set_len(64 << 20).unwrap();
    sparse.write_all_at(b"start", 0).unwrap();
    sparse.write_all_at(b"middle", 40 << 20).unwrap();
    sparse.sync_all().unwrap();
    let _ = xattr::set(dir.join("a/b/f"), "user.berth", b"kept");
    let _ = xattr::set(dir.join("a"), "trusted.berth", b"dir");
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        &dir.join("a/b/f"),
        &nix::sys::time::TimeSpec::new(1_600_000_000, 1),
        &nix::sys::time::TimeSpec::new(1_600_000_001, 123_456_789),
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
}

/// After the snapshot: changes that must not reach it.
fn change(dir: &Path) {
    std::fs::write(dir.join("a/b/f"), b"changed").unwrap();
    std::fs::remove_file(dir.join("a/sym")).unwrap();
    std::fs::write(dir.join("new"), b"new").unwrap();
}

fn same_tree(at_snapshot: &BTreeMap<PathBuf, Entry>, restored: &BTreeMap<PathBuf, Entry>) {
    assert_eq!(
        at_snapshot.keys().collect::<Vec<_>>(),
        restored.keys().collect::<Vec<_>>()
    );
    for (p, want) in at_snapshot {
        let got = &restored[p];
        let mut want = want.clone();
        let mut got = got.clone();
        // Sparseness: the copy allocates no more than the data needs (a
        // few blocks either way).
        assert!(
            got.allocated <= want.allocated + (1 << 20),
            "{}: {} bytes allocated, {} in the source",
            p.display(),
            got.allocated,
            want.allocated
        );
        want.allocated = 0;
        got.allocated = 0;
        assert_eq!(got, want, "{}", p.display());
    }
}

/// A driver serving block volumes on the real machine in a temp dir, and
/// the guard that detaches its loop devices.
fn block_driver() -> (Harness, BlockGuard) {
    let dir = tempfile::tempdir().unwrap();
    let guard = BlockGuard(dir.path().to_path_buf());
    (
        build(dir, berth::os::Os::real(), None, &["--kinds", "block"]),
        guard,
    )
}

/// A 16 MiB raw block volume "src" staged at `stage`: its id, staging
/// path and device node.
async fn staged_raw(h: &Harness) -> (String, PathBuf, PathBuf) {
    let raw = block_cap(Mode::SingleNodeWriter);
    let id = create(h, "src", 16 * MIB, &[("kind", "block")], raw.clone()).await;
    let s = h.path("stage");
    stage(h, &id, &s, raw).await;
    let dev = s.join(&id);
    (id, s, dev)
}

/// A CreateVolumeRequest with these parameters and capability.
fn volume_req(
    name: &str,
    size: i64,
    params: &[(&str, &str)],
    cap: csi::VolumeCapability,
) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        volume_capabilities: vec![cap],
        ..create_req(name, size)
    }
}

async fn restore(
    h: &Harness,
    name: &str,
    size: i64,
    snap: &str,
    params: &[(&str, &str)],
    cap: csi::VolumeCapability,
) -> String {
    created_id(
        h.ctl
            .create_volume(Request::new(csi::CreateVolumeRequest {
                volume_content_source: Some(csi::VolumeContentSource {
                    r#type: Some(csi::volume_content_source::Type::Snapshot(
                        csi::volume_content_source::SnapshotSource {
                            snapshot_id: snap.into(),
                        },
                    )),
                }),
                ..volume_req(name, size, params, cap)
            }))
            .await,
    )
}

async fn create(
    h: &Harness,
    name: &str,
    size: i64,
    params: &[(&str, &str)],
    cap: csi::VolumeCapability,
) -> String {
    created_id(
        h.ctl
            .create_volume(Request::new(volume_req(name, size, params, cap)))
            .await,
    )
}

async fn stage(h: &Harness, id: &str, s: &Path, cap: csi::VolumeCapability) {
    h.node
        .node_stage_volume(Request::new(csi::NodeStageVolumeRequest {
            volume_capability: Some(cap),
            ..stage_req(id, s)
        }))
        .await
        .expect("stage");
}

/// Unstages as kubelet does (`unstage_as_kubelet`): EBUSY (the test's own
/// read of the device, inherited for a moment by a child the driver in this
/// process is spawning for another test) is retried, anything else fails
/// the test.
async fn unstage(h: &Harness, id: &str, s: &Path) {
    unstage_as_kubelet(h, id, s).await.expect("unstage");
}

#[tokio::test]
#[ignore = "needs root"]
async fn local_restore_is_the_tree_at_snapshot_time() {
    let (h, _g) = real(&[]);
    let id = create(&h, "src", 64 * MIB, &[], rwo()).await;
    let dir = h.path("local").join(&id);
    populate(&dir);
    let before = manifest(&dir);
    let snap = snapshot_id(&h, "s", &id).await;
    change(&dir);
    let r = restore(&h, "r", 64 * MIB, &snap, &[], rwo()).await;
    same_tree(&before, &manifest(&h.path("local").join(&r)));
    // Not a hard link into the snapshot: the restored volume is its own.
    let restored = h.path("local").join(&r).join("a/b/f");
    let in_snapshot = h.path("local/.snapshots").join(&snap).join("a/b/f");
    assert_ne!(
        std::fs::metadata(&restored).unwrap().ino(),
        std::fs::metadata(&in_snapshot).unwrap().ino()
    );
    std::fs::write(&restored, b"restored and written").unwrap();
    assert_eq!(std::fs::read(&in_snapshot).unwrap(), b"hello");
}

/// ext4 and xfs volumes: snapshot while staged (frozen), restore, stage the
/// restored volume (mounted as it is, never formatted), compare.
#[tokio::test]
#[ignore = "needs root"]
async fn block_filesystem_restore_is_the_tree_at_snapshot_time() {
    for fs in ["ext4", "xfs"] {
        let dir = tempfile::tempdir().unwrap();
        let guard = BlockGuard(dir.path().to_path_buf());
        let h = build(dir, berth::os::Os::real(), None, &["--kinds", "block"]);
        let params = [("kind", "block"), ("fsType", fs)];
        let id = create(&h, "src", 320 * MIB, &params, rwo()).await;
        let s = h.path("stage-src");
        stage(&h, &id, &s, rwo()).await;
        populate(&s);
        let before = manifest(&s);
        let snap = snapshot_id(&h, "s", &id).await;
        change(&s);
        // Into a larger volume, whose filesystem the first stage grows:
        // ext4 before it mounts it (offline: no CAP_SYS_RESOURCE needed,
        // which this host's root lacks), xfs once mounted.
        let r = restore(&h, "r", 400 * MIB, &snap, &params, rwo()).await;
        let rs = h.path("stage-r");
        stage(&h, &r, &rs, rwo()).await;
        same_tree(&before, &manifest(&rs));
        let st = nix::sys::statvfs::statvfs(&rs).unwrap();
        let size = st.blocks() as u64 * st.fragment_size() as u64;
        assert!(
            size > 330 * MIB as u64,
            "{fs}: {size} bytes after restore into 400 MiB"
        );
        unstage(&h, &r, &rs).await;
        unstage(&h, &id, &s).await;
        drop(h);
        drop(guard);
    }
}

/// A raw volume: the device's bytes at snapshot time.
#[tokio::test]
#[ignore = "needs root"]
async fn raw_restore_is_the_device_at_snapshot_time() {
    let (h, _guard) = block_driver();
    let raw = block_cap(Mode::SingleNodeWriter);
    let (id, s, dev) = staged_raw(&h).await;
    let f = std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
    f.write_all_at(b"at snapshot time", 3 * MIB as u64).unwrap();
    f.sync_all().unwrap();
    drop(f);
    unstage(&h, &id, &s).await;
    let snap = snapshot_id(&h, "s", &id).await;
    stage(&h, &id, &s, raw.clone()).await;
    let f = std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
    f.write_all_at(b"written later!!!", 3 * MIB as u64).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let r = restore(&h, "r", 16 * MIB, &snap, &[("kind", "block")], raw.clone()).await;
    let rs = h.path("stage-r");
    stage(&h, &r, &rs, raw.clone()).await;
    let mut buf = [0u8; 16];
    std::fs::File::open(rs.join(&r))
        .unwrap()
        .read_exact_at(&mut buf, 3 * MIB as u64)
        .unwrap();
    assert_eq!(&buf, b"at snapshot time");
    unstage(&h, &r, &rs).await;
    unstage(&h, &id, &s).await;
}

/// On a block root that cannot clone files (this machine's ext4), a raw
/// volume in use is copied range by range and the copy kept only if no
/// write began while it was made: a quiet device's snapshot is the device
/// at snapshot time; while a writer runs, a snapshot either fails
/// (FAILED_PRECONDITION, nothing left) or is a point in time. The writer
/// puts the same counter at two offsets, the first before the second, each
/// synced: any point-in-time image has `second <= first <= second + 1`,
/// which a copy that overlapped writes breaks (without the check, every
/// run here made such copies).
#[tokio::test]
#[ignore = "needs root"]
async fn a_raw_volume_in_use_is_snapshotted_at_a_point_in_time() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let (h, _guard) = block_driver();
    let raw = block_cap(Mode::SingleNodeWriter);
    let (id, s, dev) = staged_raw(&h).await;
    let write = |what: &[u8], at: i64| {
        let f = std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
        f.write_all_at(what, at as u64).unwrap();
        f.sync_data().unwrap();
    };
    let read = |r: &str, rs: &Path, at: i64| {
        let mut buf = [0u8; 16];
        std::fs::File::open(rs.join(r))
            .unwrap()
            .read_exact_at(&mut buf, at as u64)
            .unwrap();
        buf
    };
    // Quiet while in use: the snapshot is the device as it was.
    write(b"at snapshot time", 3 * MIB);
    let snap = snapshot_id(&h, "quiet", &id).await;
    write(b"written later!!!", 3 * MIB);
    let r = restore(&h, "r", 16 * MIB, &snap, &[("kind", "block")], raw.clone()).await;
    let rs = h.path("stage-r");
    stage(&h, &r, &rs, raw.clone()).await;
    assert_eq!(&read(&r, &rs, 3 * MIB), b"at snapshot time");
    unstage(&h, &r, &rs).await;

    // A writer running: each snapshot fails or is a point in time. The
    // device full of data, so that a copy takes a while, and the counter's
    // first offset after its second: a copy that reads on while writes go
    // on sees a newer first than second.
    write(&vec![0x5a; 16 * MIB as usize], 0);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (dev, stop) = (dev.clone(), stop.clone());
        std::thread::spawn(move || {
            let f = std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
            let mut k = 0u64;
            while !stop.load(Ordering::SeqCst) {
                k += 1;
                for at in [15 * MIB, MIB] {
                    f.write_all_at(&k.to_le_bytes(), at as u64).unwrap();
                    f.sync_data().unwrap();
                }
                std::thread::sleep(std::time::Duration::from_millis(k % 4));
            }
            k
        })
    };
    let (mut made, mut refused) = (0, 0);
    for i in 0..6 {
        let req = csi::CreateSnapshotRequest {
            name: format!("busy-{i}"),
            source_volume_id: id.clone(),
            ..Default::default()
        };
        match h.ctl.create_snapshot(Request::new(req)).await {
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
                refused += 1;
            }
            Ok(resp) => {
                let snap = resp.into_inner().snapshot.unwrap().snapshot_id;
                let name = format!("busy-r-{i}");
                let r = restore(
                    &h,
                    &name,
                    16 * MIB,
                    &snap,
                    &[("kind", "block")],
                    raw.clone(),
                )
                .await;
                let rs = h.path(&format!("stage-{name}"));
                stage(&h, &r, &rs, raw.clone()).await;
                let num = |at| u64::from_le_bytes(read(&r, &rs, at)[..8].try_into().unwrap());
                let (first, second) = (num(15 * MIB), num(MIB));
                assert!(
                    second <= first && first <= second + 1,
                    "snapshot {i} is no point in time: {first} at the first offset, {second} at the second"
                );
                unstage(&h, &r, &rs).await;
                made += 1;
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    let writes = writer.join().unwrap();
    eprintln!("with a writer running ({writes} rounds): {made} snapshots made, {refused} refused");
    let left: Vec<_> = made_in(&h.path("block/.snapshots"))
        .into_iter()
        .filter(|n| n.to_string_lossy().starts_with(".partial-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    unstage(&h, &id, &s).await;
}

/// Mounts a fresh 1 GiB xfs with reflink (a block root that clones files)
/// at `<dir>/xfs-root`, from a loop device of a file in `dir` (the test's
/// `BlockGuard` detaches it); returns the block root to serve from it.
fn xfs_reflink_root(dir: &Path) -> PathBuf {
    let img = dir.join("root.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let ok = std::process::Command::new("mkfs.xfs")
        .args(["-q", "-m", "reflink=1"])
        .arg(&img)
        .status()
        .unwrap();
    assert!(ok.success());
    let root = dir.join("xfs-root");
    std::fs::create_dir(&root).unwrap();
    let dev = berth::os::LoopDevices::attach(
        &berth::os::RealLoopDevices::default(),
        &img,
        Default::default(),
    )
    .unwrap()
    .device;
    nix::mount::mount(
        Some(&dev),
        &root,
        Some("xfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    root.join("block")
}

/// Serves block volumes from `block_root`.
fn serve_block_root(dir: tempfile::TempDir, block_root: &Path) -> Harness {
    let args = [
        "--kinds",
        "block",
        "--block-root",
        block_root.to_str().unwrap(),
    ];
    build(dir, berth::os::Os::real(), None, &args)
}

/// On a block root that clones files (xfs with reflink), a raw volume in
/// use is snapshotted by one atomic clone, and its copy shares extents.
#[tokio::test]
#[ignore = "needs root"]
async fn a_reflink_block_root_clones_a_raw_volume_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let guard = BlockGuard(dir.path().to_path_buf());
    let block_root = xfs_reflink_root(dir.path());
    let root = dir.path().join("xfs-root");
    let h = serve_block_root(dir, &block_root);
    let raw = block_cap(Mode::SingleNodeWriter);
    let id = create(&h, "src", 64 * MIB, &[("kind", "block")], raw.clone()).await;
    let s = h.path("stage");
    stage(&h, &id, &s, raw.clone()).await;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(s.join(&id))
        .unwrap();
    f.write_all_at(&vec![7u8; 8 * MIB as usize], 0).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let snap = snapshot_id(&h, "s", &id).await;
    let copy = block_root.join(".snapshots").join(format!("{snap}.img"));
    let frag = std::process::Command::new("filefrag")
        .arg("-v")
        .arg(&copy)
        .output();
    if let Ok(o) = frag {
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(
            text.contains("shared"),
            "the snapshot shares no extent: {text}"
        );
    }
    unstage(&h, &id, &s).await;
    drop(h);
    let _ = nix::mount::umount(&root);
    drop(guard);
}

/// The logical sector size of the block device `dev`.
fn sector_size(dev: &Path) -> String {
    let o = std::process::Command::new("blockdev")
        .arg("--getss")
        .arg(dev)
        .output()
        .unwrap();
    assert!(o.status.success(), "blockdev --getss {}", dev.display());
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// On a block root that clones files, a volume's file shares extents once
/// it has a snapshot, and a restore's from the start; the kernel then
/// aligns direct I/O to the filesystem's 4 KiB blocks. Berth's loop devices
/// keep 512-byte sectors all the same: the ext4 (1 KiB blocks, as on every
/// volume under 512 MiB) made on the volume mounts again after the
/// snapshot, and on the restore; a raw volume keeps its sector size. Before
/// 2026-12-05 the device came up with 4096-byte sectors, and both stages
/// failed (EINVAL).
#[tokio::test]
#[ignore = "needs root"]
async fn on_a_reflink_block_root_volumes_keep_their_sector_size() {
    let dir = tempfile::tempdir().unwrap();
    let guard = BlockGuard(dir.path().to_path_buf());
    let block_root = xfs_reflink_root(dir.path());
    let root = dir.path().join("xfs-root");
    let h = serve_block_root(dir, &block_root);
    let fs = mount_cap(Mode::SingleNodeWriter);
    let id = create(&h, "src", 64 * MIB, &[("kind", "block")], fs.clone()).await;
    let s = h.path("stage");
    stage(&h, &id, &s, fs.clone()).await;
    std::fs::write(s.join("data"), b"before the snapshot").unwrap();
    unstage(&h, &id, &s).await;
    let snap = snapshot_id(&h, "s", &id).await;
    stage(&h, &id, &s, fs.clone()).await;
    assert_eq!(
        std::fs::read(s.join("data")).unwrap(),
        b"before the snapshot"
    );
    unstage(&h, &id, &s).await;
    let restored = restore(&h, "r", 64 * MIB, &snap, &[("kind", "block")], fs.clone()).await;
    let rs = h.path("restored");
    stage(&h, &restored, &rs, fs).await;
    assert_eq!(
        std::fs::read(rs.join("data")).unwrap(),
        b"before the snapshot"
    );
    unstage(&h, &restored, &rs).await;

    let raw = block_cap(Mode::SingleNodeWriter);
    let rid = create(&h, "raw", 16 * MIB, &[("kind", "block")], raw.clone()).await;
    let raws = h.path("raw");
    stage(&h, &rid, &raws, raw.clone()).await;
    assert_eq!(sector_size(&raws.join(&rid)), "512");
    let _ = snapshot_id(&h, "rs", &rid).await;
    unstage(&h, &rid, &raws).await;
    stage(&h, &rid, &raws, raw).await;
    assert_eq!(
        sector_size(&raws.join(&rid)),
        "512",
        "the raw volume's sector size changed after its snapshot"
    );
    unstage(&h, &rid, &raws).await;
    drop(h);
    let _ = nix::mount::umount(&root);
    drop(guard);
}

/// A filesystem restored into a larger volume and first staged read-only
/// (a `ro` mount flag, a reader-only access mode): the kernel grows no
/// filesystem mounted read-only (xfs_growfs: "Read-only file system";
/// ext4 likewise where berth may resize online), so the stage mounts it as
/// it is and leaves the growth to the first read-write stage. Before, the
/// read-only stage tried to grow it, failed, and so did every retry: the
/// restored xfs volume could not be used read-only at all.
#[tokio::test]
#[ignore = "needs root"]
async fn a_larger_restore_staged_read_only_mounts_and_grows_later() {
    for fs in ["xfs", "ext4"] {
        let dir = tempfile::tempdir().unwrap();
        let guard = BlockGuard(dir.path().to_path_buf());
        let h = build(dir, berth::os::Os::real(), None, &["--kinds", "block"]);
        let params = [("kind", "block"), ("fsType", fs)];
        let id = create(&h, "src", 320 * MIB, &params, rwo()).await;
        let s = h.path("stage-src");
        stage(&h, &id, &s, rwo()).await;
        std::fs::write(s.join("kept"), b"before the snapshot").unwrap();
        let snap = snapshot_id(&h, "s", &id).await;
        unstage(&h, &id, &s).await;
        let r = restore(&h, "r", 400 * MIB, &snap, &params, rwo()).await;
        let size_at = |p: &Path| {
            let st = nix::sys::statvfs::statvfs(p).unwrap();
            st.blocks() as u64 * st.fragment_size() as u64
        };
        let rs = h.path("stage-r");
        let ro = mount_cap_flags(Mode::SingleNodeWriter, &["ro"]);
        for attempt in ["first", "repeated"] {
            let staged = h
                .node
                .node_stage_volume(Request::new(csi::NodeStageVolumeRequest {
                    volume_capability: Some(ro.clone()),
                    ..stage_req(&r, &rs)
                }))
                .await;
            assert!(
                staged.is_ok(),
                "{fs}, {attempt} read-only stage: {staged:?}"
            );
        }
        assert_eq!(
            std::fs::read(rs.join("kept")).unwrap(),
            b"before the snapshot",
            "{fs}"
        );
        assert!(
            std::fs::write(rs.join("new"), b"x").is_err(),
            "{fs}: staged read-only"
        );
        unstage(&h, &r, &rs).await;
        // The first read-write stage grows it.
        stage(&h, &r, &rs, rwo()).await;
        let size = size_at(&rs);
        assert!(
            size > 330 * MIB as u64,
            "{fs}: {size} bytes after the read-write stage of a 400 MiB restore"
        );
        assert_eq!(
            std::fs::read(rs.join("kept")).unwrap(),
            b"before the snapshot"
        );
        unstage(&h, &r, &rs).await;
        drop(h);
        drop(guard);
    }
}

/// Takes every free block of the filesystem at `root` into one file
/// (`root/filler`), as another tenant filling it would.
fn fill(root: &Path) -> PathBuf {
    use std::os::fd::AsRawFd;
    let path = root.join("filler");
    let f = std::fs::File::create(&path).unwrap();
    let (mut at, mut chunk): (i64, i64) = (0, 64 * MIB);
    while chunk >= 4096 {
        // SAFETY: a plain fallocate(2) on a descriptor this function owns.
        if unsafe { libc::fallocate(f.as_raw_fd(), 0, at, chunk) } == 0 {
            at += chunk;
        } else {
            assert_eq!(
                std::io::Error::last_os_error().raw_os_error(),
                Some(libc::ENOSPC)
            );
            chunk /= 2;
        }
    }
    path
}

/// Writes `byte` over the first `len` bytes of `file` and flushes it.
fn overwrite(file: &Path, byte: u8, len: usize) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open(file)?;
    f.write_all_at(&vec![byte; len], 0)?;
    f.sync_all()
}

/// A thick volume takes its space when it is made, so writing into it
/// never fails for want of space. On a block root that clones files (xfs
/// with reflink) a snapshot or a restore clones the file: its blocks are
/// then shared, and a write to one needs a new block (copy on write). A
/// snapshot of a thick volume, and a thick restore or clone, therefore
/// take blocks of their own (unshared), so that every thick volume keeps
/// its own. Before, once the filesystem was full, writing into a thick
/// volume that had a snapshot, or into a thick restore, failed with ENOSPC.
#[tokio::test]
#[ignore = "needs root"]
async fn thick_volumes_keep_their_blocks_on_a_reflink_block_root() {
    let dir = tempfile::tempdir().unwrap();
    let guard = BlockGuard(dir.path().to_path_buf());
    let block_root = xfs_reflink_root(dir.path());
    let root = dir.path().join("xfs-root");
    let h = serve_block_root(dir, &block_root);
    let raw = block_cap(Mode::SingleNodeWriter);
    let thick = [("kind", "block"), ("allocation", "thick")];
    let len = 96 * MIB as usize;
    let id = create(&h, "thick", 96 * MIB, &thick, raw.clone()).await;
    let file = block_root.join(format!("{id}.img"));
    overwrite(&file, 7, len).unwrap();
    let snap = snapshot_id(&h, "s", &id).await;
    let restored = restore(&h, "r", 96 * MIB, &snap, &thick, raw.clone()).await;
    let filler = fill(&root);
    for (what, f) in [
        ("the snapshotted volume", file),
        (
            "the thick restore",
            block_root.join(format!("{restored}.img")),
        ),
    ] {
        let r = overwrite(&f, 9, len);
        assert!(r.is_ok(), "writing into {what} on a full filesystem: {r:?}");
    }
    std::fs::remove_file(filler).unwrap();
    drop(h);
    let _ = nix::mount::umount(&root);
    drop(guard);
}

/// Every regular file under `dir` (symlinks and mounts never followed)
/// whose content is `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if m.is_dir() && !mounts_under(&p).contains(&p) {
            out.extend(files_holding(&p, needle));
        } else if m.is_file() && std::fs::read(&p).is_ok_and(|c| c == needle) {
            out.push(p);
        }
    }
    out
}

async fn clone_of(h: &Harness, name: &str, source: &str) -> Result<String, tonic::Status> {
    h.ctl
        .create_volume(Request::new(csi::CreateVolumeRequest {
            volume_content_source: Some(csi::VolumeContentSource {
                r#type: Some(csi::volume_content_source::Type::Volume(
                    csi::volume_content_source::VolumeSource {
                        volume_id: source.into(),
                    },
                )),
            }),
            ..volume_req(name, 64 * MIB, &[], rwo())
        }))
        .await
        .map(|r| r.into_inner().volume.expect("volume").volume_id)
}

async fn try_snapshot(h: &Harness, name: &str, source: &str) -> Result<String, tonic::Status> {
    h.ctl
        .create_snapshot(Request::new(csi::CreateSnapshotRequest {
            name: name.into(),
            source_volume_id: source.into(),
            ..Default::default()
        }))
        .await
        .map(|r| r.into_inner().snapshot.expect("snapshot").snapshot_id)
}

/// A pod with Bidirectional propagation can mount inside its volume (a
/// host directory, another tenant's volume, a host file over one of its
/// own); DeleteVolume refuses to enter such a mount, and so must a
/// snapshot's or a clone's copy: it is FAILED_PRECONDITION naming the
/// mount, and nothing mounted there lands in a snapshot or a new volume.
/// Before, both copied the mounted tree and file into the tenant's
/// snapshot and clone (a host secret the tenant could then restore).
#[tokio::test]
#[ignore = "needs root"]
async fn what_a_pod_mounts_inside_its_local_volume_is_never_copied() {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    let (h, _g) = real(&[]);
    let id = create(&h, "src", 64 * MIB, &[], rwo()).await;
    let dir = h.path("local").join(&id);
    std::fs::write(dir.join("own"), b"the tenant's own").unwrap();
    // Outside every volume: what the host keeps.
    let outside = h.path("host");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret"), b"host secret").unwrap();
    std::fs::write(outside.join("file"), b"host file").unwrap();
    let bind = |from: &Path, to: &Path| {
        mount(Some(from), to, None::<&str>, MsFlags::MS_BIND, None::<&str>).unwrap()
    };
    // A directory deeper down (a host directory bound there), and a file
    // (a host file bound over one of the volume's).
    std::fs::create_dir_all(dir.join("d/sub")).unwrap();
    std::fs::write(dir.join("f"), b"tenant's file").unwrap();
    let local = h.path("local");
    let leaked = || {
        let mut v = files_holding(&local, b"host secret");
        v.extend(files_holding(&local, b"host file"));
        v.retain(|p| !p.starts_with(&dir));
        v
    };
    let rounds = [
        (dir.join("d/sub"), outside.clone()),
        (dir.join("f"), outside.join("file")),
    ];
    for (n, (at, from)) in rounds.iter().enumerate() {
        bind(from, at);
        let snap = try_snapshot(&h, &format!("s-{n}"), &id).await;
        let clone = clone_of(&h, &format!("c-{n}"), &id).await;
        assert_eq!(leaked(), Vec::<PathBuf>::new(), "{at:?}");
        for r in [snap, clone] {
            let e = r.expect_err("a copy of a volume with a mount inside");
            assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{at:?}: {e:?}");
            let named = format!("{} is a mount point", at.display());
            assert!(e.message().contains(&named), "{at:?}: {e:?}");
        }
        umount2(at, MntFlags::empty()).unwrap();
    }
    // Once the pod's mounts are gone: copied as usual.
    let snap = snapshot_id(&h, "s", &id).await;
    let c = clone_of(&h, "c", &id).await.expect("clone");
    for copy in [local.join(".snapshots").join(&snap), local.join(&c)] {
        assert_eq!(
            std::fs::read(copy.join("own")).unwrap(),
            b"the tenant's own"
        );
        assert_eq!(std::fs::read(copy.join("f")).unwrap(), b"tenant's file");
    }
    assert_eq!(leaked(), Vec::<PathBuf>::new());
}

/// A file's capabilities (`security.capability`, what `setcap` writes:
/// here cap_net_raw, permitted and effective) are kept by a local
/// snapshot, its restore and a clone, as `cp -a` keeps them. The kernel
/// removes them from a file whose owner is set (chown, even to the owner
/// it has), so they are set after it. Before 2026-12-07 the copy set every
/// extended attribute first and the owner after: each copy lost them (a
/// volume holding programs restored with `ping` unable to open its raw
/// socket).
#[tokio::test]
#[ignore = "needs root"]
async fn a_local_copy_keeps_file_capabilities() {
    const CAP: &str = "security.capability";
    // VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE, then permitted and
    // inheritable of the low and high words: CAP_NET_RAW (13) permitted.
    let caps: [u8; 20] = [
        0x01, 0, 0, 0x02, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let (h, _g) = real(&[]);
    let id = create(&h, "src", 64 * MIB, &[], rwo()).await;
    let local = h.path("local");
    let f = local.join(&id).join("ping");
    std::fs::write(&f, b"a program").unwrap();
    nix::unistd::chown(
        &f,
        Some(nix::unistd::Uid::from_raw(1000)),
        Some(nix::unistd::Gid::from_raw(1000)),
    )
    .unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
    xattr::set(&f, CAP, &caps).unwrap();
    assert_eq!(xattr::get(&f, CAP).unwrap().as_deref(), Some(&caps[..]));
    let snap = snapshot_id(&h, "s", &id).await;
    let r = restore(&h, "r", 64 * MIB, &snap, &[], rwo()).await;
    let c = clone_of(&h, "c", &id).await.expect("clone");
    for copy in [
        local.join(".snapshots").join(&snap),
        local.join(&r),
        local.join(&c),
    ] {
        let p = copy.join("ping");
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (1000, 1000, 0o755));
        assert_eq!(
            xattr::get(&p, CAP).unwrap().as_deref(),
            Some(&caps[..]),
            "{}: its capabilities",
            p.display()
        );
    }
}

/// Bytes free on the filesystem of `p` (what a write can take).
fn free_bytes(p: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(p).unwrap();
    s.blocks_available() as u64 * s.fragment_size() as u64
}

/// Writes `len` bytes that no copy can leave as holes into `file`.
fn write_data(file: &Path, len: usize) {
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 + 1).collect();
    let f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(file)
        .unwrap();
    f.write_all_at(&data, 0).unwrap();
    f.sync_all().unwrap();
}

/// A data directory on a tmpfs of `mib` MiB of its own (state, local and
/// block roots all on it, as under one `--data-dir`), unmounted when the
/// guard drops, also when the test fails.
fn tmpfs_data_dir(mib: u64) -> (tempfile::TempDir, UnmountOnDrop) {
    let dir = tempfile::tempdir().unwrap();
    let guard = UnmountOnDrop(dir.path().to_path_buf());
    nix::mount::mount(
        Some("tmpfs"),
        dir.path(),
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some(format!("size={mib}m,mode=0700").as_str()),
    )
    .unwrap();
    (dir, guard)
}

/// A data directory on an ext4 of `mib` MiB of its own (no blocks kept
/// back for root), made in a file of `images` and mounted with `mount -o
/// loop`, whose loop device the unmount of the guard detaches.
fn ext4_data_dir(mib: u64, images: &Path) -> (tempfile::TempDir, UnmountOnDrop) {
    let dir = tempfile::tempdir().unwrap();
    let guard = UnmountOnDrop(dir.path().to_path_buf());
    let img = images.join("fs.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
    let run = |c: &mut std::process::Command| {
        let o = c.output().unwrap();
        assert!(o.status.success(), "{c:?}: {o:?}");
    };
    run(std::process::Command::new("mkfs.ext4")
        .args(["-q", "-m", "0"])
        .arg(&img));
    run(std::process::Command::new("mount")
        .args(["-o", "loop"])
        .arg(&img)
        .arg(dir.path()));
    (dir, guard)
}

/// Entries a failed copy could leave: the snapshots' area and the
/// unfinished creates of the local root, the restores' temporary files of
/// the block root, and (once the background thread emptied it) the trash;
/// the copies of the snapshots recorded Ready are not leftovers.
fn copy_leftovers(h: &Harness) -> Vec<PathBuf> {
    let ready: Vec<String> = h
        .driver
        .store
        .snapshot_filter(|s| s.phase == berth::state::Phase::Ready)
        .into_iter()
        .map(|s| s.id)
        .collect();
    let made = |p: &PathBuf| {
        let n = p.file_name().unwrap_or_default().to_string_lossy();
        ready
            .iter()
            .any(|id| *n == **id || *n == format!("{id}.img"))
    };
    let mut out = Vec::new();
    for area in [
        "local/.snapshots",
        "block/.snapshots",
        "local/.trash",
        "local/.orphaned",
        "block/.orphaned",
    ] {
        if let Ok(d) = std::fs::read_dir(h.path(area)) {
            out.extend(d.flatten().map(|e| e.path()));
        }
    }
    out.extend(
        unfinished_in_creating(&h.path("local"))
            .into_iter()
            .map(|n| h.path("local/.creating").join(n)),
    );
    if let Ok(d) = std::fs::read_dir(h.path("block")) {
        out.extend(
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().contains(".restoring-")),
        );
    }
    out.retain(|p| !made(p));
    out
}

/// Waits (up to 5 s) until nothing a failed copy could leave is there and
/// the filesystem has at least `free` bytes free again; fails naming what
/// is left.
async fn nothing_left(h: &Harness, free: u64, what: &str) {
    for _ in 0..50 {
        if copy_leftovers(h).is_empty() && free_bytes(h.dir.path()) >= free {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!(
        "{what}: left {:?}, {} bytes free, {free} before",
        copy_leftovers(h),
        free_bytes(h.dir.path())
    );
}

/// Every snapshot record and every volume record not Ready (what a failed
/// create could leave stuck, blocking its name).
fn unfinished_records(h: &Harness) -> Vec<String> {
    let mut v: Vec<String> = h
        .driver
        .store
        .filter(|r| r.phase != berth::state::Phase::Ready)
        .into_iter()
        .map(|r| format!("volume {} {:?}", r.id, r.phase))
        .collect();
    v.extend(
        h.driver
            .store
            .snapshot_filter(|s| s.phase != berth::state::Phase::Ready)
            .into_iter()
            .map(|s| format!("snapshot {} {:?}", s.id, s.phase)),
    );
    v
}

/// CreateVolume named `name` of `size` bytes from `source` (a snapshot id
/// or, with `clone`, a volume id).
async fn try_create_from(
    h: &Harness,
    name: &str,
    size: i64,
    source: &str,
    clone: bool,
    params: &[(&str, &str)],
) -> Result<String, tonic::Status> {
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    let t = if clone {
        Type::Volume(VolumeSource {
            volume_id: source.into(),
        })
    } else {
        Type::Snapshot(SnapshotSource {
            snapshot_id: source.into(),
        })
    };
    h.ctl
        .create_volume(Request::new(csi::CreateVolumeRequest {
            volume_content_source: Some(csi::VolumeContentSource { r#type: Some(t) }),
            ..volume_req(name, size, params, rwo())
        }))
        .await
        .map(|r| r.into_inner().volume.expect("volume").volume_id)
}

/// A snapshot, a restore and a clone that do not fit on the filesystem
/// they copy to (one tmpfs holds the state, the local and the block root,
/// as under one `--data-dir`) fail RESOURCE_EXHAUSTED (CreateSnapshot's
/// "not enough space", CreateVolume's "unable to provision" row, which
/// lets the scheduler pick again), leave no partial copy and no record
/// (the space they took is free again, the journal is clean, no record
/// stuck Creating holds the name), leave the source as it was, and the
/// same requests succeed, with the source's data, once there is room.
async fn copies_that_do_not_fit(kind: &str, fs: &str) {
    assert!(is_root(), "root tests need root");
    let images = tempfile::tempdir().unwrap();
    let (dir, _unmount) = match fs {
        "ext4" => ext4_data_dir(64, images.path()),
        _ => tmpfs_data_dir(64),
    };
    let h = build(
        dir,
        berth::os::Os::real(),
        None,
        &["--kinds", kind, "--local-spare-dirs", "0"],
    );
    let params: &[(&str, &str)] = if kind == "block" {
        &[("kind", "block")]
    } else {
        &[]
    };
    // A volume holding 6 MiB of data: a block volume of 8 MiB, a local
    // one of 1 MiB (its size is a promise only, without project quotas),
    // so that its restore and clone are admitted and fail copying.
    let data = 6 << 20;
    let size = if kind == "block" { 8 * MIB } else { MIB };
    let src = create(&h, "src", size, params, rwo()).await;
    let file = if kind == "block" {
        h.path("block").join(format!("{src}.img"))
    } else {
        h.path("local").join(&src).join("data")
    };
    write_data(&file, data);
    let content = std::fs::read(&file).unwrap();
    let snap = snapshot_id(&h, "first", &src).await;

    // Another tenant leaves 3 MiB free.
    let filler = h.path("filler");
    let leave = 3 << 20;
    write_data(&filler, (free_bytes(h.dir.path()) - leave) as usize);
    let free = free_bytes(h.dir.path());
    assert!(free <= leave && free > leave / 2, "{free} bytes free");
    // What is left of a failed copy: the few journal lines of its record.
    let slack = 256 << 10;

    let snapshot = try_snapshot(&h, "second", &src).await;
    let restore = try_create_from(&h, "restored", size, &snap, false, params).await;
    let clone = try_create_from(&h, "cloned", size, &src, true, params).await;
    for (what, r) in [
        ("snapshot", snapshot.map(|_| ())),
        ("restore", restore.map(|_| ())),
        ("clone", clone.map(|_| ())),
    ] {
        let e = r.expect_err(what);
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{what}: {e:?}");
        nothing_left(&h, free - slack, what).await;
        assert_eq!(unfinished_records(&h), Vec::<String>::new(), "{what}");
        assert_eq!(std::fs::read(&file).unwrap(), content, "{what}: the source");
        let (clean, out) = state_check(&h);
        assert!(clean, "{what}: {out}");
        assert_eq!(h.driver.store.poisoned(), None);
    }
    assert!(h.driver.store.snapshot_by_name("second").is_none());
    assert!(h.driver.store.get_by_name("restored").is_none());
    assert!(h.driver.store.get_by_name("cloned").is_none());

    // Once there is room, the same requests succeed and hold the source's
    // data.
    std::fs::remove_file(&filler).unwrap();
    let second = try_snapshot(&h, "second", &src).await.expect("snapshot");
    let restored = try_create_from(&h, "restored", size, &snap, false, params)
        .await
        .expect("restore");
    let cloned = try_create_from(&h, "cloned", size, &src, true, params)
        .await
        .expect("clone");
    let restored_second = try_create_from(&h, "restored-2", size, &second, false, params)
        .await
        .expect("restore of the second snapshot");
    for id in [&restored, &cloned, &restored_second] {
        let got = if kind == "block" {
            let mut b = std::fs::read(h.path("block").join(format!("{id}.img"))).unwrap();
            b.truncate(content.len());
            b
        } else {
            std::fs::read(h.path("local").join(id).join("data")).unwrap()
        };
        assert!(got == content, "{id} holds the source's data");
    }
    let (clean, out) = state_check(&h);
    assert!(clean, "{out}");
    drop(h);
}

#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn local_copies_that_do_not_fit_leave_nothing_and_succeed_later() {
    copies_that_do_not_fit("local", "tmpfs").await;
}

#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn block_copies_that_do_not_fit_leave_nothing_and_succeed_later() {
    copies_that_do_not_fit("block", "tmpfs").await;
}

/// The same on ext4 (delayed allocation; a directory takes a block).
#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn local_copies_that_do_not_fit_on_ext4_leave_nothing_and_succeed_later() {
    copies_that_do_not_fit("local", "ext4").await;
}

#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn block_copies_that_do_not_fit_on_ext4_leave_nothing_and_succeed_later() {
    copies_that_do_not_fit("block", "ext4").await;
}

/// What statvfs says of the filesystem of `p`, for the fake to answer.
fn usage_of(p: &Path) -> berth::os::FsUsage {
    let s = nix::sys::statvfs::statvfs(p).unwrap();
    let frag = s.fragment_size() as u64;
    berth::os::FsUsage {
        total_bytes: s.blocks() as u64 * frag,
        available_bytes: s.blocks_available() as u64 * frag,
        used_bytes: (s.blocks() as u64 - s.blocks_free() as u64) * frag,
        total_inodes: s.files() as u64,
        free_inodes: s.files_free() as u64,
        used_inodes: s.files() as u64 - s.files_free() as u64,
    }
}

/// A snapshot of a block volume holding more data than its filesystem
/// has free (the state, the local and the block root share it, as under
/// one `--data-dir`) is RESOURCE_EXHAUSTED before anything is copied.
/// Before, the copy ran until the filesystem was full, and only then was
/// it removed: meanwhile every other tenant's write on the node failed
/// with ENOSPC (a thin block volume in use, whose loop device then gives
/// its filesystem an I/O error; a local volume), and the
/// external-snapshotter's retries did it again and again. Real files on a
/// real tmpfs, through the recording fake, whose hold on the removal of
/// the failed copy keeps that moment long enough to write in it; the fake
/// answers statvfs with what the tmpfs says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn a_block_snapshot_that_cannot_fit_never_fills_the_filesystem() {
    assert!(is_root(), "root tests need root");
    let (dir, _unmount) = tmpfs_data_dir(32);
    let (os, fake) = berth::os::Os::fake();
    let h = build(dir, os, Some(fake.clone()), &["--kinds", "block"]);
    let block = [("kind", "block")];
    let src = create(&h, "src", 8 * MIB, &block, rwo()).await;
    let file = h.path("block").join(format!("{src}.img"));
    write_data(&file, 6 << 20);
    let content = std::fs::read(&file).unwrap();
    let filler = h.path("filler");
    write_data(&filler, (free_bytes(h.dir.path()) - (3 << 20)) as usize);
    fake.set_usage(None, usage_of(h.dir.path()));
    let free = free_bytes(h.dir.path());

    let held = fake.hold_op_under("unlink", &h.path("block/.snapshots"));
    let ctl = berth::controller::ControllerService {
        driver: h.driver.clone(),
    };
    let call = tokio::spawn(async move {
        ctl.create_snapshot(Request::new(csi::CreateSnapshotRequest {
            name: "s".into(),
            source_volume_id: src,
            ..Default::default()
        }))
        .await
    });
    let waiting = held.clone();
    let filled = tokio::task::spawn_blocking(move || {
        waiting.wait_reached(std::time::Duration::from_secs(3))
    })
    .await
    .unwrap();
    // Another tenant writes 64 KiB while the snapshot's removals (of its
    // failed copy, or its rollback's) wait.
    let other = h.path("other-tenant");
    let wrote = std::fs::write(&other, vec![1u8; 64 << 10]);
    held.release();
    let r = call.await.unwrap();
    assert!(filled, "the snapshot's removals are held");
    assert!(
        wrote.is_ok(),
        "a snapshot that could not fit filled the filesystem: another tenant's write meanwhile: {wrote:?}"
    );
    let e = r.expect_err("the snapshot cannot fit");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(
        !fake
            .file_ops()
            .iter()
            .any(|o| o.op == "copy" && o.path.starts_with(h.path("block/.snapshots"))),
        "nothing copied"
    );
    std::fs::remove_file(&other).unwrap();
    nothing_left(&h, free - (256 << 10), "snapshot").await;
    assert_eq!(std::fs::read(&file).unwrap(), content);
    assert_eq!(unfinished_records(&h), Vec::<String>::new());

    // With room it is made.
    std::fs::remove_file(&filler).unwrap();
    fake.set_usage(None, usage_of(h.dir.path()));
    try_snapshot(&h, "s", &h.driver.store.get_by_name("src").unwrap().id)
        .await
        .expect("snapshot");
    drop(h);
}

/// While a local snapshot's copy that does not fit has filled the
/// filesystem (the state and the local root share it; the fake holds the
/// failed copy's removal, real files on a real tmpfs), other volumes'
/// changes to the journal still go through: a DeleteVolume of another
/// volume works (the journal's reserve), a CreateVolume is
/// RESOURCE_EXHAUSTED, never INTERNAL, and leaves no record; once the
/// copy is removed the snapshot is RESOURCE_EXHAUSTED, the reserve is
/// whole again, nothing is left and `state check` is clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn a_local_copy_that_fills_the_filesystem_stops_no_other_volumes_changes() {
    assert!(is_root(), "root tests need root");
    let (dir, _unmount) = tmpfs_data_dir(32);
    let (os, fake) = berth::os::Os::fake();
    let h = build(
        dir,
        os,
        Some(fake.clone()),
        &["--kinds", "local", "--local-spare-dirs", "0"],
    );
    let src = create(&h, "src", MIB, &[], rwo()).await;
    let other = create(&h, "other", MIB, &[], rwo()).await;
    write_data(&h.path("local").join(&src).join("data"), 6 << 20);
    let filler = h.path("filler");
    write_data(&filler, (free_bytes(h.dir.path()) - (3 << 20)) as usize);
    let free = free_bytes(h.dir.path());

    // The copy first removes what an earlier attempt may have left, then
    // (failed) what it copied: that second removal is held. Its need
    // cannot be told (as on a filesystem that may clone), so the check
    // before the copy lets it go (`a_local_copy_that_cannot_fit`).
    fake.fail_next("tree_copy_need", libc::EIO);
    let held = fake.hold_op_under_after("remove tree", &h.path("local/.snapshots"), 1);
    let ctl = berth::controller::ControllerService {
        driver: h.driver.clone(),
    };
    let source = src.clone();
    let call = tokio::spawn(async move {
        ctl.create_snapshot(Request::new(csi::CreateSnapshotRequest {
            name: "s".into(),
            source_volume_id: source,
            ..Default::default()
        }))
        .await
    });
    let waiting = held.clone();
    let reached = tokio::task::spawn_blocking(move || {
        waiting.wait_reached(std::time::Duration::from_secs(10))
    })
    .await
    .unwrap();
    assert!(reached, "the failed copy's removal is held");
    let left = free_bytes(h.dir.path());
    let deleted = try_delete(&h, &other).await;
    // (statvfs through the fake answers what the tmpfs says now.)
    fake.set_usage(None, usage_of(h.dir.path()));
    let created = h
        .ctl
        .create_volume(Request::new(volume_req("new", MIB, &[], rwo())))
        .await
        .map(|_| ());
    held.release();
    let r = call.await.unwrap();
    assert!(
        left < 64 << 10,
        "the copy filled the filesystem: {left} bytes free"
    );
    assert!(
        deleted.is_ok(),
        "delete on the full filesystem: {deleted:?}"
    );
    let e = created.expect_err("no room for a new volume");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(h.driver.store.get_by_name("new").is_none());
    let e = r.expect_err("the snapshot cannot fit");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    nothing_left(&h, free - (256 << 10), "snapshot").await;
    assert_eq!(unfinished_records(&h), Vec::<String>::new());
    assert!(!h.driver.store.reserve_short());
    assert_eq!(h.driver.store.poisoned(), None);
    let (clean, out) = state_check(&h);
    assert!(clean, "{out}");
    drop(h);
}

/// The content source of a restore of snapshot `id`, or a clone of volume
/// `id`.
fn content_source(clone: bool, id: &str) -> csi::VolumeContentSource {
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    csi::VolumeContentSource {
        r#type: Some(if clone {
            Type::Volume(VolumeSource {
                volume_id: id.into(),
            })
        } else {
            Type::Snapshot(SnapshotSource {
                snapshot_id: id.into(),
            })
        }),
    }
}

/// A local `what` (snapshot, restore, clone) of a tree holding more data
/// than the filesystem has free (the state and the local root share it,
/// as under one `--data-dir`) is RESOURCE_EXHAUSTED before anything is
/// copied. Before, the copy ran until the filesystem was full, and only
/// then was it removed: meanwhile every other tenant's write on the node
/// failed with ENOSPC, and the CO's retries did it again and again. Real
/// files on a real filesystem through the recording fake, whose hold on
/// the removal of a failed copy keeps that moment long enough to write in
/// it; the fake answers statvfs with what the filesystem says. The tree
/// holds 6 MiB of data under three names (one inode), a sparse file of
/// 1 GiB with 4 bytes of data, and a symlink to the filler (some 45 MiB):
/// with 10 MiB free its first snapshot is made (the check counts each inode
/// once, a file's data, never what a symlink points to).
async fn a_local_copy_that_cannot_fit(fs: &str, what: &str) {
    assert!(is_root(), "root tests need root");
    let images = tempfile::tempdir().unwrap();
    let (dir, _unmount) = match fs {
        "ext4" => ext4_data_dir(64, images.path()),
        _ => tmpfs_data_dir(64),
    };
    let (os, fake) = berth::os::Os::fake();
    let h = build(
        dir,
        os,
        Some(fake.clone()),
        &["--kinds", "local", "--local-spare-dirs", "0"],
    );
    let src = create(&h, "src", MIB, &[], rwo()).await;
    let vol = h.path("local").join(&src);
    std::fs::create_dir_all(vol.join("a/b")).unwrap();
    let data = vol.join("a/b/data");
    write_data(&data, 6 << 20);
    std::fs::hard_link(&data, vol.join("again")).unwrap();
    std::fs::hard_link(&data, vol.join("a/and-again")).unwrap();
    let sparse = std::fs::File::create(vol.join("sparse")).unwrap();
    sparse.set_len(1 << 30).unwrap();
    sparse.write_all_at(b"data", 512 << 20).unwrap();
    sparse.sync_all().unwrap();
    drop(sparse);
    let filler = h.path("filler");
    std::os::unix::fs::symlink(&filler, vol.join("a/filler")).unwrap();
    let content = std::fs::read(&data).unwrap();

    write_data(&filler, (free_bytes(h.dir.path()) - (10 << 20)) as usize);
    fake.set_usage(None, usage_of(h.dir.path()));
    let first = try_snapshot(&h, "first", &src)
        .await
        .expect("a snapshot that fits");
    let free = free_bytes(h.dir.path());
    assert!(free < 5 << 20 && free > 2 << 20, "{free} bytes free");
    fake.set_usage(None, usage_of(h.dir.path()));

    // The copy first removes what an earlier attempt may have left, then
    // (failed) what it copied: that second removal is held.
    let area = h.path(match what {
        "snapshot" => "local/.snapshots",
        _ => "local/.creating",
    });
    let held = fake.hold_op_under_after("remove tree", &area, 1);
    let ops = fake.file_ops().len();
    let ctl = berth::controller::ControllerService {
        driver: h.driver.clone(),
    };
    let (w, s, f) = (what.to_string(), src.clone(), first.clone());
    let call = tokio::spawn(async move {
        match w.as_str() {
            "snapshot" => ctl
                .create_snapshot(Request::new(csi::CreateSnapshotRequest {
                    name: "second".into(),
                    source_volume_id: s,
                    ..Default::default()
                }))
                .await
                .map(|_| ()),
            _ => ctl
                .create_volume(Request::new(csi::CreateVolumeRequest {
                    volume_content_source: Some(if w == "clone" {
                        content_source(true, &s)
                    } else {
                        content_source(false, &f)
                    }),
                    ..volume_req(&w, MIB, &[], rwo())
                }))
                .await
                .map(|_| ()),
        }
    });
    let waiting = held.clone();
    let reached = tokio::task::spawn_blocking(move || {
        waiting.wait_reached(std::time::Duration::from_secs(5))
    })
    .await
    .unwrap();
    // Another tenant writes 64 KiB meanwhile.
    let other = h.path("other-tenant");
    let wrote = std::fs::write(&other, vec![1u8; 64 << 10]);
    held.release();
    let r = call.await.unwrap();
    let _ = std::fs::remove_file(&other);
    assert!(
        wrote.is_ok(),
        "a {what} that could not fit filled the filesystem (its removal {}held): another tenant's write meanwhile: {wrote:?}",
        if reached { "" } else { "never " }
    );
    let e = r.expect_err(what);
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{what}: {e:?}");
    assert!(
        e.message().contains("bytes free"),
        "{what}: refused ahead: {e:?}"
    );
    let copies: Vec<_> = fake.file_ops()[ops..]
        .iter()
        .filter(|o| o.op == "copy")
        .map(|o| o.path.clone())
        .collect();
    assert_eq!(copies, Vec::<PathBuf>::new(), "{what}: nothing copied");
    nothing_left(&h, free - (256 << 10), what).await;
    assert_eq!(unfinished_records(&h), Vec::<String>::new(), "{what}");
    assert_eq!(std::fs::read(&data).unwrap(), content, "{what}: the source");

    // With room it is made.
    std::fs::remove_file(&filler).unwrap();
    fake.set_usage(None, usage_of(h.dir.path()));
    let made = match what {
        "snapshot" => {
            try_snapshot(&h, "second", &src).await.expect(what);
            h.path("local/.snapshots")
                .join(&h.driver.store.snapshot_by_name("second").unwrap().id)
        }
        _ => {
            let from = if what == "clone" { &src } else { &first };
            let id = try_create_from(&h, what, MIB, from, what == "clone", &[])
                .await
                .expect(what);
            h.path("local").join(id)
        }
    };
    assert_eq!(std::fs::read(made.join("a/b/data")).unwrap(), content);
    let (clean, out) = state_check(&h);
    assert!(clean, "{what}: {out}");
    drop(h);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn a_local_snapshot_that_cannot_fit_never_fills_the_filesystem() {
    a_local_copy_that_cannot_fit("tmpfs", "snapshot").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn a_local_restore_that_cannot_fit_never_fills_the_filesystem() {
    a_local_copy_that_cannot_fit("tmpfs", "restore").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn a_local_clone_that_cannot_fit_never_fills_the_filesystem() {
    a_local_copy_that_cannot_fit("tmpfs", "clone").await;
}

/// The same on ext4 (a directory takes a block; delayed allocation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn a_local_snapshot_that_cannot_fit_on_ext4_never_fills_the_filesystem() {
    a_local_copy_that_cannot_fit("ext4", "snapshot").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn a_local_clone_that_cannot_fit_on_ext4_never_fills_the_filesystem() {
    a_local_copy_that_cannot_fit("ext4", "clone").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn a_local_restore_that_cannot_fit_on_ext4_never_fills_the_filesystem() {
    a_local_copy_that_cannot_fit("ext4", "restore").await;
}
