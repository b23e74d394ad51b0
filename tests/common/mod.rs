//! Helpers shared by the test binaries: a driver over the recording fake,
//! and request builders.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use berth::config::Cli;
use berth::controller::ControllerService;
use berth::csi::v1 as csi;
use berth::csi::v1::volume_capability::access_mode::Mode;
use berth::driver::Driver;
use berth::identity::IdentityService;
use berth::node::NodeService;
use berth::os::fake::FakeOs;
use berth::os::Os;
use clap::Parser;

pub const NODE: &str = "node-a";
pub const TOPO_KEY: &str = "topology.berth.csi.io/node";

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub driver: Arc<Driver>,
    pub fake: Option<Arc<FakeOs>>,
    pub ctl: ControllerService,
    pub node: NodeService,
    pub ident: IdentityService,
}

pub fn args(dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "berth".into(),
        "--data-dir".into(),
        dir.display().to_string(),
    ];
    if !extra.contains(&"--node-id") {
        v.extend(["--node-id".into(), NODE.into()]);
    }
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// A driver over the fake OS in a fresh temp dir, as node `node`.
pub fn fake_node(node: &str, extra: &[&str]) -> Harness {
    let mut v = vec!["--node-id", node];
    v.extend_from_slice(extra);
    fake(&v)
}

/// A driver over the fake OS in a fresh temp dir.
pub fn fake(extra: &[&str]) -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let (os, fake) = Os::fake();
    build(dir, os, Some(fake), extra)
}

pub fn build(dir: tempfile::TempDir, os: Os, fake: Option<Arc<FakeOs>>, extra: &[&str]) -> Harness {
    match try_build(dir, os, fake, extra) {
        Ok(h) => h,
        Err((_, e)) => panic!("driver: {e}"),
    }
}

/// `build`, or the data directory back with the reason the driver did not
/// start.
pub fn try_build(
    dir: tempfile::TempDir,
    os: Os,
    fake: Option<Arc<FakeOs>>,
    extra: &[&str],
) -> Result<Harness, (tempfile::TempDir, String)> {
    try_build_with(dir, os, fake, extra, |_| {})
}

/// `try_build`, with `tweak` applied to the configuration the flags made
/// (settings that are not flags).
pub fn try_build_with(
    dir: tempfile::TempDir,
    os: Os,
    fake: Option<Arc<FakeOs>>,
    extra: &[&str],
    tweak: impl FnOnce(&mut berth::config::Config),
) -> Result<Harness, (tempfile::TempDir, String)> {
    let mut cli = Cli::try_parse_from(args(dir.path(), extra)).expect("args");
    tweak(&mut cli.config);
    let driver = match Driver::new(cli.config, os) {
        Ok(d) => d,
        Err(e) => return Err((dir, e.to_string())),
    };
    // What serve does once the socket is bound.
    driver.start();
    Ok(Harness {
        ctl: ControllerService {
            driver: driver.clone(),
        },
        node: NodeService {
            driver: driver.clone(),
        },
        ident: IdentityService {
            driver: driver.clone(),
        },
        driver,
        fake,
        dir,
    })
}

impl Harness {
    /// The same state and roots, a new driver (a restart).
    pub fn restart(self, os: Os, fake: Option<Arc<FakeOs>>) -> Harness {
        build(self.stop(), os, fake, &[])
    }

    /// A restart that must be refused because the roots hold storage
    /// without a record (a lost record), naming `lost`; then the restart
    /// with `--allow-missing-storage` (and `extra`), which keeps such
    /// storage aside.
    pub fn restart_past_lost_records(
        self,
        lost: &str,
        fake: &dyn Fn() -> (Os, Option<Arc<FakeOs>>),
        extra: &[&str],
    ) -> Harness {
        let (os, f) = fake();
        let (dir, err) = match try_build(self.stop(), os, f, extra) {
            Ok(_) => panic!("berth started beside storage without a record ({lost})"),
            Err(e) => e,
        };
        assert!(
            err.contains("holds no record of")
                && err.contains(lost)
                && err.contains("--allow-missing-storage"),
            "{err}"
        );
        let (os, f) = fake();
        let mut args = vec!["--allow-missing-storage"];
        args.extend_from_slice(extra);
        build(dir, os, f, &args)
    }

    /// Drops every handle on the driver (which releases its directory
    /// locks, as an exit does) and returns the data directory.
    pub fn stop(self) -> tempfile::TempDir {
        let Harness {
            dir,
            driver,
            ctl,
            node,
            ident,
            ..
        } = self;
        drop((ctl, node, ident, driver));
        dir
    }

    pub fn path(&self, p: &str) -> std::path::PathBuf {
        self.dir.path().join(p)
    }

    pub fn fake(&self) -> &FakeOs {
        self.fake.as_deref().expect("fake os")
    }
}

pub fn mount_cap(mode: Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(csi::volume_capability::AccessType::Mount(
            csi::volume_capability::MountVolume::default(),
        )),
        access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
    }
}

pub fn mount_cap_flags(mode: Mode, flags: &[&str]) -> csi::VolumeCapability {
    let mut c = mount_cap(mode);
    if let Some(csi::volume_capability::AccessType::Mount(m)) = &mut c.access_type {
        m.mount_flags = flags.iter().map(|s| s.to_string()).collect();
    }
    c
}

pub fn block_cap(mode: Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(csi::volume_capability::AccessType::Block(
            csi::volume_capability::BlockVolume {},
        )),
        access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
    }
}

pub fn rwo() -> csi::VolumeCapability {
    mount_cap(Mode::SingleNodeWriter)
}

/// ControllerPublishVolume of `id` to `node`, single-node writer.
pub async fn controller_publish(h: &Harness, id: &str, node: &str) -> Result<(), tonic::Status> {
    use berth::csi::v1::controller_server::Controller;
    h.ctl
        .controller_publish_volume(tonic::Request::new(csi::ControllerPublishVolumeRequest {
            volume_id: id.into(),
            node_id: node.into(),
            volume_capability: Some(rwo()),
            ..Default::default()
        }))
        .await
        .map(|_| ())
}

/// ControllerUnpublishVolume of `id` from `node`: its answer.
pub async fn controller_unpublish(h: &Harness, id: &str, node: &str) -> Result<(), tonic::Status> {
    use berth::csi::v1::controller_server::Controller;
    h.ctl
        .controller_unpublish_volume(tonic::Request::new(csi::ControllerUnpublishVolumeRequest {
            volume_id: id.into(),
            node_id: node.into(),
            ..Default::default()
        }))
        .await
        .map(|_| ())
}

/// DeleteVolume of `id`, which must succeed.
pub async fn delete(h: &Harness, id: &str) {
    try_delete(h, id).await.expect("delete");
}

/// DeleteVolume of `id`: its answer.
pub async fn try_delete(h: &Harness, id: &str) -> Result<(), tonic::Status> {
    use berth::csi::v1::controller_server::Controller;
    h.ctl
        .delete_volume(tonic::Request::new(csi::DeleteVolumeRequest {
            volume_id: id.into(),
            ..Default::default()
        }))
        .await
        .map(|_| ())
}

/// The retry of pending deletes that runs every minute, waited for.
pub async fn retry_pending_and_wait(h: &Harness) {
    let pending = h
        .driver
        .store
        .filter(|r| r.phase != berth::state::Phase::Ready);
    h.driver.retry_pending(false);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for r in pending {
        while h
            .driver
            .locks
            .try_lock(berth::driver::vol_key(&r.id))
            .is_err()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the retry never ended"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

/// The records of pool disks to wipe once they are back (`wipe-<id>`).
pub fn wipe_records(h: &Harness) -> usize {
    h.driver.store.filter(|r| r.id.starts_with("wipe-")).len()
}

pub fn create_req(name: &str, size: i64) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: size,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![rwo()],
        ..Default::default()
    }
}

pub fn topo(node: &str) -> csi::Topology {
    csi::Topology {
        segments: HashMap::from([(TOPO_KEY.to_string(), node.to_string())]),
    }
}

pub fn stage_req(id: &str, staging: &Path) -> csi::NodeStageVolumeRequest {
    csi::NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(rwo()),
        ..Default::default()
    }
}

pub fn publish_req(
    id: &str,
    staging: &Path,
    target: &Path,
    readonly: bool,
) -> csi::NodePublishVolumeRequest {
    csi::NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(rwo()),
        readonly,
        ..Default::default()
    }
}

/// The id of the volume a CreateVolume answered with (panics on an error
/// or an answer without a volume).
pub fn created_id(r: Result<tonic::Response<csi::CreateVolumeResponse>, tonic::Status>) -> String {
    r.expect("create")
        .into_inner()
        .volume
        .expect("volume")
        .volume_id
}

pub fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> tonic::Code {
    match r {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    }
}

/// True when running as root; root tests are `#[ignore]`d by default and run
/// by tests/run-all.sh inside a private mount namespace.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Mount points at or under `dir`, deepest first, from /proc/self/mountinfo.
pub fn mounts_under(dir: &Path) -> Vec<std::path::PathBuf> {
    read_mounts_under(dir).unwrap_or_default()
}

/// `mounts_under`, or None when the mount table cannot be read.
fn read_mounts_under(dir: &Path) -> Option<Vec<std::path::PathBuf>> {
    let text = std::fs::read("/proc/self/mountinfo").ok()?;
    let mut v: Vec<_> = berth::os::mountinfo::parse(&text)
        .ok()?
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    Some(v)
}

/// Unmounts everything under a directory when dropped, then removes the
/// directory, so a test leaks no mount and no temp dir, also when it fails
/// (a temp dir removed while something was still mounted in it keeps the
/// mount points: the removal stops at them).
pub struct UnmountOnDrop(pub std::path::PathBuf);

impl Drop for UnmountOnDrop {
    fn drop(&mut self) {
        unmount_under(&self.0);
        remove_unmounted(&self.0);
    }
}

/// Removes `dir` only when nothing is mounted under it any more: the
/// removal must never reach into a mounted filesystem (an NFS share).
fn remove_unmounted(dir: &Path) {
    if read_mounts_under(dir).is_some_and(|left| left.is_empty()) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

pub fn unmount_under(dir: &Path) {
    for _ in 0..8 {
        let left = mounts_under(dir);
        if left.is_empty() {
            return;
        }
        for m in left {
            if nix::mount::umount2(&m, nix::mount::MntFlags::empty()).is_err() {
                let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

/// A driver over the real OS; the returned guard unmounts everything under
/// its temp dir when dropped (declare it after the harness so it drops
/// first).
/// A kubelet directory `<dir>/kubelet` with shared propagation and two
/// peers of it in this mount namespace: `<dir>/host-view`, the whole
/// directory bound again (as `/var/lib/kubelet` bound from
/// `/data/kubelet`), and `<dir>/plugins-view`, its `plugins` subdirectory
/// (as a container given both `/var/lib/kubelet` and a directory under
/// it). The kernel copies every mount made under one of them onto the
/// others. Returns the kubelet directory and the two views. Root only; the
/// caller's `UnmountOnDrop` of `dir` takes the mounts off.
pub fn shared_kubelet_dir(dir: &Path) -> (std::path::PathBuf, [std::path::PathBuf; 2]) {
    use nix::mount::{mount, MsFlags};
    let kubelet = dir.join("kubelet");
    let views = [dir.join("host-view"), dir.join("plugins-view")];
    for d in [&kubelet, &kubelet.join("plugins"), &views[0], &views[1]] {
        std::fs::create_dir_all(d).unwrap();
    }
    let bind = |from: &Path, to: &Path| {
        mount(Some(from), to, None::<&str>, MsFlags::MS_BIND, None::<&str>).unwrap()
    };
    bind(&kubelet, &kubelet);
    mount(
        None::<&str>,
        &kubelet,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .unwrap();
    bind(&kubelet, &views[0]);
    bind(&kubelet.join("plugins"), &views[1]);
    (kubelet, views)
}

/// The mount points of `path` and of its copies: `path` under `kubelet`,
/// and the same place under each view of `shared_kubelet_dir`.
pub fn places(
    kubelet: &Path,
    views: &[std::path::PathBuf; 2],
    path: &Path,
) -> [std::path::PathBuf; 3] {
    let rel = path.strip_prefix(kubelet).unwrap();
    let in_plugins = rel.strip_prefix("plugins").unwrap_or(rel);
    [
        path.to_path_buf(),
        views[0].join(rel),
        views[1].join(in_plugins),
    ]
}

/// The mount entries whose mount point is `path`, from this process's
/// mountinfo.
pub fn mount_entries(path: &Path) -> Vec<berth::os::MountEntry> {
    let text = std::fs::read("/proc/self/mountinfo").unwrap();
    berth::os::mountinfo::parse(&text)
        .unwrap()
        .into_iter()
        .filter(|m| m.mount_point == path)
        .collect()
}

pub fn real(extra: &[&str]) -> (Harness, UnmountOnDrop) {
    let dir = tempfile::tempdir().expect("tempdir");
    let guard = UnmountOnDrop(dir.path().to_path_buf());
    (build(dir, berth::os::Os::real(), None, extra), guard)
}

/// Runs NodeStage, NodePublish, NodeUnpublish, NodeUnstage and DeleteVolume
/// of the already created volume `id` (mount access), and says how many
/// times each RPC read the whole mount table (the fake counts reads).
#[allow(dead_code)]
pub async fn mount_table_reads(
    h: &Harness,
    id: &str,
    staging: &Path,
    target: &Path,
) -> Vec<(&'static str, usize)> {
    use berth::csi::v1::controller_server::Controller;
    use berth::csi::v1::node_server::Node;
    use tonic::Request;
    let f = h.fake();
    let mut reads = Vec::new();
    f.clear_calls();
    h.node
        .node_stage_volume(Request::new(stage_req(id, staging)))
        .await
        .unwrap();
    reads.push(("stage", f.table_reads()));
    f.clear_calls();
    h.node
        .node_publish_volume(Request::new(publish_req(id, staging, target, false)))
        .await
        .unwrap();
    reads.push(("publish", f.table_reads()));
    f.clear_calls();
    h.node
        .node_unpublish_volume(Request::new(csi::NodeUnpublishVolumeRequest {
            volume_id: id.to_string(),
            target_path: target.display().to_string(),
        }))
        .await
        .unwrap();
    reads.push(("unpublish", f.table_reads()));
    f.clear_calls();
    h.node
        .node_unstage_volume(Request::new(csi::NodeUnstageVolumeRequest {
            volume_id: id.to_string(),
            staging_target_path: staging.display().to_string(),
        }))
        .await
        .unwrap();
    reads.push(("unstage", f.table_reads()));
    f.clear_calls();
    h.ctl
        .delete_volume(Request::new(csi::DeleteVolumeRequest {
            volume_id: id.to_string(),
            ..Default::default()
        }))
        .await
        .unwrap();
    reads.push(("delete", f.table_reads()));
    reads
}

/// `berth state check` beside the running driver (it takes no lock): whether
/// it found no error, and what it printed.
pub fn state_check(h: &Harness) -> (bool, String) {
    let mut out = Vec::new();
    let ok = berth::state::tools::check(&h.driver.cfg, &h.driver.os, &mut out).unwrap();
    (ok, String::from_utf8(out).unwrap())
}

/// Puts the records of `used` and `blank` back to `Creating`, as a crash
/// during their creates (or a record that lost its Ready) leaves them, and
/// asserts that `state check` reports an error naming `used`, whose
/// storage holds data, and says nothing of the kind about `blank`.
pub fn unanswered_and_checked(h: &Harness, used: &str, blank: &str) {
    for id in [used, blank] {
        let mut r = h.driver.store.get(id).unwrap();
        h.driver
            .store
            .set_phase(&mut r, berth::state::Phase::Creating)
            .unwrap();
    }
    let (clean, out) = state_check(h);
    assert!(!clean, "{out}");
    let flagged: Vec<&str> = out.lines().filter(|l| l.contains("holds data")).collect();
    assert_eq!(flagged.len(), 1, "{out}");
    assert!(flagged[0].contains(used), "{out}");
}

/// CreateSnapshot of `source` named `name`: the snapshot's id.
/// DeleteSnapshot of `id`.
pub async fn delete_snapshot(h: &Harness, id: &str) -> Result<(), tonic::Status> {
    use berth::csi::v1::controller_server::Controller;
    h.ctl
        .delete_snapshot(tonic::Request::new(csi::DeleteSnapshotRequest {
            snapshot_id: id.into(),
            ..Default::default()
        }))
        .await
        .map(drop)
}

pub async fn snapshot_id(h: &Harness, name: &str, source: &str) -> String {
    use berth::csi::v1::controller_server::Controller;
    h.ctl
        .create_snapshot(tonic::Request::new(csi::CreateSnapshotRequest {
            name: name.into(),
            source_volume_id: source.into(),
            ..Default::default()
        }))
        .await
        .expect("snapshot")
        .into_inner()
        .snapshot
        .expect("snapshot")
        .snapshot_id
}

/// The controller RPC capabilities the harness advertises (as i32 types).
#[allow(dead_code)]
pub async fn controller_rpcs(h: &Harness) -> Vec<i32> {
    use berth::csi::v1::controller_server::Controller;
    h.ctl
        .controller_get_capabilities(tonic::Request::new(Default::default()))
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(csi::controller_service_capability::Type::Rpc(r)) => Some(r.r#type),
            _ => None,
        })
        .collect()
}

/// The node RPC capabilities the harness advertises (as i32 types).
#[allow(dead_code)]
pub async fn node_rpcs(h: &Harness) -> Vec<i32> {
    use berth::csi::v1::node_server::Node;
    h.node
        .node_get_capabilities(tonic::Request::new(Default::default()))
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(csi::node_service_capability::Type::Rpc(r)) => Some(r.r#type),
            _ => None,
        })
        .collect()
}

/// The names in `dir` that a volume operation made: everything but the
/// directory lock berth keeps there.
pub fn made_in(dir: &Path) -> Vec<std::ffi::OsString> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != ".berth.lock")
        .collect();
    v.sort();
    v
}

/// What `.creating` under the local root `local` holds besides the spare
/// directories (`kinds::local::spares`: empty, mode 0777, named by a
/// local volume id): what unfinished creates, restores and clones left.
pub fn unfinished_in_creating(local: &Path) -> Vec<std::ffi::OsString> {
    use std::os::unix::fs::PermissionsExt;
    let dir = local.join(".creating");
    if !dir.exists() {
        return Vec::new();
    }
    made_in(&dir)
        .into_iter()
        .filter(|n| {
            let p = dir.join(n);
            let spare = n.to_str().is_some_and(|n| {
                n.strip_prefix("local-").is_some_and(|h| {
                    h.len() == 32
                        && h.bytes()
                            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                })
            }) && std::fs::symlink_metadata(&p)
                .is_ok_and(|m| m.is_dir() && m.permissions().mode() & 0o7777 == 0o777)
                && std::fs::read_dir(&p).is_ok_and(|mut d| d.next().is_none());
            !spare
        })
        .collect()
}

/// Loop devices bound to files under `dir` (device, backing file).
pub fn loops_under(dir: &Path) -> Vec<(std::path::PathBuf, std::path::PathBuf)> {
    use berth::os::LoopDevices;
    berth::os::RealLoopDevices::default()
        .list()
        .unwrap_or_default()
        .into_iter()
        .filter(|l| l.backing_file.starts_with(dir))
        .map(|l| (l.device, l.backing_file))
        .collect()
}

/// Unmounts everything under the directory, detaches every loop device
/// bound to a file under it, then removes the directory, when dropped.
/// Loop devices are detached once before the unmounts too (a busy one is
/// then cleared when its last user goes): a file on a filesystem mounted
/// under the directory (a test's own block root) is named by its full
/// path only while that filesystem is still mounted there.
pub struct BlockGuard(pub std::path::PathBuf);

impl Drop for BlockGuard {
    fn drop(&mut self) {
        use berth::os::LoopDevices;
        let loops = berth::os::RealLoopDevices::default();
        for (dev, _) in loops_under(&self.0) {
            let _ = loops.detach(&dev);
        }
        unmount_under(&self.0);
        for _ in 0..20 {
            let left = loops_under(&self.0);
            if left.is_empty() {
                break;
            }
            for (dev, _) in left {
                let _ = loops.detach(&dev);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        remove_unmounted(&self.0);
    }
}

/// Unmounting RPCs retried the way kubelet retries them: EBUSY is a
/// reference held for a moment (here most often by a child this test
/// process is spawning, whose copy of the test's open files lives until it
/// execs), so it is retried for a while; anything else is returned.
pub async fn retry_busy<T, F, Fut>(mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut attempt = 0;
    loop {
        match call().await {
            Ok(r) => return Ok(r.into_inner()),
            Err(e) if attempt < 40 && e.message().contains("busy") => {
                attempt += 1;
                eprintln!("retrying after EBUSY ({attempt}): {}", e.message());
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// NodeUnstageVolume as kubelet sends it: EBUSY retried (`retry_busy`).
/// NodeStageVolume then NodePublishVolume (read-write) of `id`, both of
/// which must succeed.
pub async fn stage_and_publish(h: &Harness, id: &str, staging: &Path, target: &Path) {
    use berth::csi::v1::node_server::Node;
    h.node
        .node_stage_volume(tonic::Request::new(stage_req(id, staging)))
        .await
        .expect("stage");
    h.node
        .node_publish_volume(tonic::Request::new(publish_req(id, staging, target, false)))
        .await
        .expect("publish");
}

pub async fn unstage_as_kubelet(h: &Harness, id: &str, s: &Path) -> Result<(), tonic::Status> {
    use berth::csi::v1::node_server::Node;
    retry_busy(|| {
        h.node
            .node_unstage_volume(tonic::Request::new(csi::NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: s.display().to_string(),
            }))
    })
    .await
    .map(|_| ())
}

/// NodeUnpublishVolume as kubelet sends it: EBUSY retried (`retry_busy`).
pub async fn unpublish_as_kubelet(h: &Harness, id: &str, t: &Path) -> Result<(), tonic::Status> {
    use berth::csi::v1::node_server::Node;
    retry_busy(|| {
        h.node
            .node_unpublish_volume(tonic::Request::new(csi::NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: t.display().to_string(),
            }))
    })
    .await
    .map(|_| ())
}

/// The disk volume record `rec` as versions before the loop disk's backing
/// file was recorded made it (`DiskRef::loop_backing` unset, and the
/// part of it the loop device showed, `DiskRef::loop_range`, kept later).
#[allow(dead_code)]
pub fn without_loop_backing(rec: &berth::state::VolumeRecord) -> berth::state::VolumeRecord {
    let mut r = rec.clone();
    if let Some(d) = r.block.as_mut().and_then(|b| b.disk.as_mut()) {
        d.loop_backing = None;
        d.loop_range = None;
    }
    r
}

/// What the fake's statvfs says of every filesystem without usage of its
/// own: `total` bytes, `free` of them available.
#[allow(dead_code)]
pub fn set_free(h: &Harness, total: i64, free: i64) {
    h.fake().set_usage(
        None,
        berth::os::FsUsage {
            total_bytes: total as u64,
            available_bytes: free as u64,
            used_bytes: (total - free) as u64,
            ..Default::default()
        },
    );
}

/// Appends `put` lines of `vols` and `snap` lines of `snaps` to the log of
/// the stopped state in `dir`, with valid checksums (records forged by
/// hand, or damaged in a way no checksum catches).
pub fn forge_records(
    dir: &std::path::Path,
    vols: &[berth::state::VolumeRecord],
    snaps: &[berth::state::SnapshotRecord],
) {
    use berth::state::journal::{self, EntryRef};
    let mut lines = Vec::new();
    for r in vols {
        journal::encode(&EntryRef::Put(r), &mut lines).unwrap();
    }
    for s in snaps {
        journal::encode(&EntryRef::Snap(s), &mut lines).unwrap();
    }
    append_to_log(dir, &lines);
}

/// Appends `bytes` (whole journal lines) to the log of the stopped state
/// in `dir`, as they are.
pub fn append_to_log(dir: &std::path::Path, bytes: &[u8]) {
    use berth::state::journal;
    use std::io::Write;
    let j = dir.join("state/journal");
    let gen = journal::scan(&berth::os::RealFiles, &j).unwrap().gen;
    std::fs::OpenOptions::new()
        .append(true)
        .open(j.join(journal::log_name(gen)))
        .unwrap()
        .write_all(bytes)
        .unwrap();
}

/// Appends the change `json` (a journal entry's JSON) to the log of the
/// stopped state in `dir` as one line with its checksum.
pub fn append_change(dir: &std::path::Path, json: &str) {
    let line = format!("{:08x} {json}\n", crc32fast::hash(json.as_bytes()));
    append_to_log(dir, line.as_bytes());
}

/// Walks a paged list (ListVolumes, ListSnapshots) from its start:
/// `page(token)` answers one page's ids and its next token. Returns every
/// id listed, in order, and how many pages it took.
pub async fn walk_pages<F, Fut>(mut page: F) -> (Vec<String>, usize)
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = (Vec<String>, String)>,
{
    let (mut seen, mut token, mut pages) = (Vec::new(), String::new(), 0);
    loop {
        let (ids, next) = page(token).await;
        seen.extend(ids);
        pages += 1;
        if next.is_empty() {
            return (seen, pages);
        }
        token = next;
    }
}

/// Whether `ids` holds each of its ids once.
pub fn each_once(ids: &[String]) -> bool {
    let mut unique = ids.to_vec();
    unique.sort();
    unique.dedup();
    unique.len() == ids.len()
}

/// Bytes free on the filesystem of `p` (what a write can take).
pub fn free_bytes(p: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(p).unwrap();
    s.blocks_available() as u64 * s.fragment_size() as u64
}

/// Writes into `dir` until the filesystem refuses for space, as a tenant
/// without a size limit does: big chunks, then smaller ones, again after
/// each flush (ext4 gives back what it held for blocks not yet allocated)
/// until a round writes nothing.
pub fn fill(dir: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join("filler")).unwrap();
    loop {
        let mut wrote = 0;
        for chunk in [64 << 10, 4096, 512, 1] {
            let buf = vec![7u8; chunk];
            loop {
                match f.write(&buf) {
                    Ok(0) => break,
                    Ok(n) => wrote += n,
                    Err(e) => {
                        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
                        break;
                    }
                }
            }
        }
        let _ = f.sync_all();
        if wrote == 0 {
            break;
        }
    }
}

/// The data directory `dir` on a filesystem of its own: a tmpfs of 8 MiB,
/// or `mkfs` of a 16 MiB file (320 MiB for xfs) (`img`, attached to a loop device that the
/// unmount detaches).
pub fn small_filesystem(dir: &Path, fs: &str, img: &Path) {
    if fs == "tmpfs" {
        nix::mount::mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=8m,mode=0700"),
        )
        .unwrap();
        return;
    }
    let run = |c: &mut std::process::Command| {
        let o = c.output().unwrap();
        assert!(o.status.success(), "{c:?}: {o:?}");
    };
    // mkfs.xfs makes nothing below 300 MiB; ext4 without blocks kept
    // back for root (a tenant running as root takes them anyway)
    let (size, args): (u64, &[&str]) = match fs {
        "xfs" => (320 << 20, &["-q"]),
        _ => (16 << 20, &["-q", "-m", "0"]),
    };
    std::fs::File::create(img).unwrap().set_len(size).unwrap();
    run(std::process::Command::new(format!("mkfs.{fs}"))
        .args(args)
        .arg(img));
    run(std::process::Command::new("mount")
        .args(["-o", "loop"])
        .arg(img)
        .arg(dir));
}

/// Lets go of the space the state journal's logs under the data
/// directory `data` keep past their end (ftruncate of each to its own
/// size), as a log an older berth wrote has none; berth must be stopped.
/// The number of logs.
pub fn let_go_of_log_reserve(data: &Path) -> usize {
    let mut logs = 0;
    for e in std::fs::read_dir(data.join("state/journal")).unwrap() {
        let e = e.unwrap();
        if e.file_name().to_string_lossy().starts_with("log-") {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(e.path())
                .unwrap();
            f.set_len(f.metadata().unwrap().len()).unwrap();
            logs += 1;
        }
    }
    logs
}

/// Asserts that `e` is a DeleteVolume refused for want of room in the
/// state's journal (RESOURCE_EXHAUSTED naming the full filesystem and the
/// ENOSPC), saying that the volume's data is removed exactly when `freed`.
pub fn assert_refused_for_room(e: &tonic::Status, freed: bool) {
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("is full") && e.message().contains("No space left"),
        "{e:?}"
    );
    assert_eq!(e.message().contains("its data is removed"), freed, "{e:?}");
}

/// On a full filesystem: deletes `ids` one after another until one is
/// refused (its change needed a new page of the log); that one's id and
/// answer.
pub async fn first_refused_delete(h: &Harness, ids: &[String]) -> (String, tonic::Status) {
    for id in ids {
        if let Err(e) = try_delete(h, id).await {
            return (id.clone(), e);
        }
    }
    panic!("no delete needed a new page of the log");
}

/// Deletes the volumes of `ids` from `from` on; each must succeed.
pub async fn delete_from(h: &Harness, ids: &[String], from: &str) {
    for i in ids.iter().skip_while(|i| **i != from) {
        let r = try_delete(h, i).await;
        assert!(r.is_ok(), "delete of {i} once there is room: {r:?}");
    }
}

/// How long a test waits for a berth it (re)started to serve: start-up
/// replays and fsyncs its state on the host's filesystem, which a loaded
/// machine can stall for many seconds (CI once: a restart after a kill
/// beside release and test builds passed 20 s with nothing logged yet).
/// A start that never comes still fails, with `where_it_waits`.
pub const START_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

/// Where each thread of process `pid` waits in the kernel (its wchan and
/// state), for the message of a start that never came.
pub fn where_it_waits(pid: u32) -> String {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("process {pid} is gone");
    };
    let mut out = Vec::new();
    for t in rd.flatten() {
        let dir = t.path();
        let wchan = std::fs::read_to_string(dir.join("wchan")).unwrap_or_default();
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
        // the state letter follows the command's closing parenthesis
        let state = stat.rsplit_once(") ").map(|(_, r)| &r[..1]).unwrap_or("?");
        out.push(format!(
            "{} {state} {}",
            t.file_name().to_string_lossy(),
            wchan.trim()
        ));
    }
    format!(
        "process {pid} threads (tid state wchan): {}",
        out.join("; ")
    )
}
