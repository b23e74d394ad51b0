//! A sweep of hostile values through every Controller and Node RPC that
//! takes a string, for each volume kind (local, block, nfs) over the
//! recording fake: each string field of each RPC in turn gets a hostile
//! value (empty, 128 and 129 bytes of ASCII and of multibyte UTF-8, NUL,
//! '/', "..", newline and other control characters, leading and trailing
//! spaces, look-alikes, 64 KiB, many parameters, a secrets map), the other
//! fields staying those of a valid request naming a real volume, snapshot,
//! staging and target path. For every answer:
//! - the code is one the CSI spec (v1.12) lists for that RPC: a value
//!   berth's rules must refuse is INVALID_ARGUMENT (an invalid
//!   starting_token ABORTED, as the spec has it), a well-formed id that
//!   names nothing is NOT_FOUND where the spec says so (OK for the deletes
//!   and unpublishes), and never INTERNAL, UNKNOWN or another code a bad
//!   request cannot earn;
//! - an answer other than OK changed nothing: the fake OS recorded no
//!   call and no filesystem change, its mount table, the volume and
//!   snapshot records and the data directory (every name, size, mode and
//!   mtime) are as before; an OK of an RPC that only looks, deletes
//!   something unknown, or unpublishes something not published changed
//!   nothing either;
//! - the secret put into every request's secrets map never appears in an
//!   error message nor in a log line (everything logged, at TRACE).
//!
//! The values are a fixed list plus generated ones (proptest, a bounded
//! number of cases and no shrinking past a few steps).
mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use berth::csi::v1 as csi;
use berth::csi::v1::controller_server::Controller;
use berth::csi::v1::node_server::Node;
use berth::csi::v1::volume_capability::access_mode::Mode;
use berth::os::{CmdOutput, OsError};
use common::*;
use proptest::prelude::*;
use tonic::{Code, Request};

/// The secret every request carries: it must never come back.
const SECRET: &str = "Sw33p-s3cret-value-4c1d";

/// Where the log lines of every test of this binary go.
fn log_buffer() -> Arc<Mutex<Vec<u8>>> {
    static BUF: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    BUF.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let w = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || LogWriter(w.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one subscriber");
        buf
    })
    .clone()
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// ------------------------------------------------------------ the values

/// The fixed hostile values: lengths at and past 128 bytes in 1-, 2-, 3-
/// and 4-byte characters, separators, control characters, spaces,
/// look-alikes, option-like text, 64 KiB.
fn fixed_values() -> Vec<String> {
    let mut v: Vec<String> = [
        "",
        "/",
        "..",
        ".",
        "../../../etc",
        "a/../b",
        "\0",
        "a\0b",
        "\n",
        "a\nb",
        "\t",
        "a\tb",
        "\u{1b}[31mred",
        "\u{7}",
        "\u{7f}",
        "\u{85}",
        " ",
        " a",
        "a ",
        "\u{a0}a",
        "а",
        "ｌｏｃａｌ",
        "\u{202e}lacol",
        "\u{200b}",
        "\u{feff}a",
        "%2e%2e%2f",
        "..\\..\\x",
        "-o",
        "--",
        "a,b",
        "a=b",
        "ro,remount",
        "*",
        "$(id)",
        "\u{fffd}",
        "\u{10ffff}",
        "1",
        "0",
        "-1",
        "01",
        "18446744073709551616",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for unit in ["a", "é", "€", "𝕍"] {
        let n = 128 / unit.len();
        v.push(unit.repeat(n));
        // 129 bytes: one ASCII byte more, and (multibyte) one character
        // more, which is still 129+ bytes but fewer than 129 characters.
        v.push(format!("{}a", unit.repeat(n)));
        if unit.len() > 1 {
            v.push(unit.repeat(n + 1));
        }
    }
    // 128 bytes made of a 3-byte character and ASCII: 42 * 3 + 2.
    v.push(format!("ab{}", "€".repeat(42)));
    v.push(format!("ab{}", "€".repeat(42)) + "c");
    v.push("x".repeat(64 << 10));
    v
}

/// Generated hostile values.
fn generated() -> impl Strategy<Value = String> {
    prop_oneof![
        "[\\x00-\\x1f\\x7f ./a\\\\,=-]{0,10}",
        "[a-z0-9./ -]{120,136}",
        "\\PC{40,70}",
        ".{0,140}",
        proptest::collection::vec(proptest::char::any(), 0..40)
            .prop_map(|v| v.into_iter().collect::<String>()),
    ]
}

// ------------------------------------------------------------ the world

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KindUnderTest {
    Local,
    Block,
    Nfs,
}

/// A driver with one volume (staged where the kind stages, published),
/// one snapshot where the kind makes them, and what a valid request of
/// each RPC names.
struct World {
    kind: KindUnderTest,
    h: Harness,
    vol: String,
    snap: Option<String>,
    staging: PathBuf,
    target: PathBuf,
    params: HashMap<String, String>,
    cap: csi::VolumeCapability,
}

fn blank_block(f: &berth::os::fake::FakeOs) {
    let out = |code: i32| -> Result<CmdOutput, OsError> {
        Ok(CmdOutput {
            code: Some(code),
            stdout: String::new(),
            stderr: String::new(),
        })
    };
    f.respond("blkid", move |_| out(2));
    for p in ["mkfs.ext4", "mkfs.xfs", "resize2fs", "xfs_growfs", "wipefs"] {
        f.respond(p, move |_| out(0));
    }
}

async fn world(kind: KindUnderTest) -> World {
    let (h, params, cap) = match kind {
        KindUnderTest::Local => (
            fake(&["--kinds", "local"]),
            HashMap::from([("kind".to_string(), "local".to_string())]),
            rwo(),
        ),
        KindUnderTest::Block => {
            let h = fake(&["--kinds", "block"]);
            blank_block(h.fake());
            (
                h,
                HashMap::from([("kind".to_string(), "block".to_string())]),
                rwo(),
            )
        }
        KindUnderTest::Nfs => {
            let h = fake(&["--kinds", "nfs", "--nfs-timeout", "2"]);
            h.fake().emulate_nfs_mounts();
            (
                h,
                HashMap::from([
                    ("kind".to_string(), "nfs".to_string()),
                    ("server".to_string(), "127.0.0.1".to_string()),
                    ("share".to_string(), "/export".to_string()),
                ]),
                mount_cap(Mode::MultiNodeMultiWriter),
            )
        }
    };
    set_free(&h, 1 << 40, 1 << 39);
    let mut req = create_req("vol", 8 << 20);
    req.parameters = params.clone();
    req.volume_capabilities = vec![cap.clone()];
    let vol = created_id(h.ctl.create_volume(Request::new(req)).await);
    let snap = match h
        .ctl
        .create_snapshot(Request::new(csi::CreateSnapshotRequest {
            source_volume_id: vol.clone(),
            name: "snap".into(),
            ..Default::default()
        }))
        .await
    {
        Ok(r) => Some(r.into_inner().snapshot.expect("snapshot").snapshot_id),
        Err(e) => {
            assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
            None
        }
    };
    // Published to this node where the kind has ControllerPublish: an
    // unpublish from a node id that only looks like it must keep that.
    let _ = controller_publish(&h, &vol, NODE).await;
    let (staging, target) = (h.path("staging"), h.path("target"));
    std::fs::create_dir_all(&staging).unwrap();
    let stages = kind != KindUnderTest::Nfs;
    if stages {
        h.node
            .node_stage_volume(Request::new(csi::NodeStageVolumeRequest {
                volume_capability: Some(cap.clone()),
                ..stage_req(&vol, &staging)
            }))
            .await
            .expect("stage");
    }
    let mut publish = publish_req(&vol, &staging, &target, false);
    publish.volume_capability = Some(cap.clone());
    if !stages {
        publish.staging_target_path.clear();
    }
    h.node
        .node_publish_volume(Request::new(publish))
        .await
        .expect("publish");
    World {
        kind,
        h,
        vol,
        snap,
        staging,
        target,
        params,
        cap,
    }
}

static SEEN_NANOS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// What "nothing changed" compares.
#[derive(Debug, PartialEq)]
struct Seen {
    volumes: Vec<berth::state::VolumeRecord>,
    snapshots: Vec<berth::state::SnapshotRecord>,
    table: Vec<berth::os::MountEntry>,
    tree: BTreeMap<PathBuf, (u64, u32, i64, i64)>,
}

fn tree(dir: &Path, out: &mut BTreeMap<PathBuf, (u64, u32, i64, i64)>) {
    use std::os::unix::fs::MetadataExt;
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        out.insert(p.clone(), (m.len(), m.mode(), m.mtime(), m.mtime_nsec()));
        if m.is_dir() {
            tree(&p, out);
        }
    }
}

impl World {
    fn seen(&self) -> Seen {
        let t = std::time::Instant::now();
        let s = self.seen_now();
        SEEN_NANOS.fetch_add(
            t.elapsed().as_nanos() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        s
    }

    fn seen_now(&self) -> Seen {
        let mut volumes = self.h.driver.store.filter(|_| true);
        volumes.sort_by(|a, b| a.id.cmp(&b.id));
        let mut snapshots = self.h.driver.store.snapshot_filter(|_| true);
        snapshots.sort_by(|a, b| a.id.cmp(&b.id));
        let mut t = BTreeMap::new();
        tree(self.h.dir.path(), &mut t);
        Seen {
            volumes,
            snapshots,
            table: self.h.fake().table(),
            tree: t,
        }
    }
}

// ------------------------------------------------------------ the RPCs

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rpc {
    CreateVolume,
    DeleteVolume,
    ControllerPublishVolume,
    ControllerUnpublishVolume,
    ValidateVolumeCapabilities,
    ListVolumes,
    GetCapacity,
    CreateSnapshot,
    DeleteSnapshot,
    ListSnapshots,
    ControllerExpandVolume,
    ControllerGetVolume,
    GetSnapshot,
    ControllerModifyVolume,
    NodeStageVolume,
    NodeUnstageVolume,
    NodePublishVolume,
    NodeUnpublishVolume,
    NodeGetVolumeStats,
    NodeExpandVolume,
}

const RPCS: [Rpc; 20] = [
    Rpc::CreateVolume,
    Rpc::DeleteVolume,
    Rpc::ControllerPublishVolume,
    Rpc::ControllerUnpublishVolume,
    Rpc::ValidateVolumeCapabilities,
    Rpc::ListVolumes,
    Rpc::GetCapacity,
    Rpc::CreateSnapshot,
    Rpc::DeleteSnapshot,
    Rpc::ListSnapshots,
    Rpc::ControllerExpandVolume,
    Rpc::ControllerGetVolume,
    Rpc::GetSnapshot,
    Rpc::ControllerModifyVolume,
    Rpc::NodeStageVolume,
    Rpc::NodeUnstageVolume,
    Rpc::NodePublishVolume,
    Rpc::NodeUnpublishVolume,
    Rpc::NodeGetVolumeStats,
    Rpc::NodeExpandVolume,
];

/// The string fields a hostile value goes into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    VolumeId,
    SnapshotId,
    /// CreateVolume's content source (a volume), CreateSnapshot's and
    /// ListSnapshots' source_volume_id.
    SourceVolumeId,
    /// CreateVolume's content source (a snapshot).
    SourceSnapshotId,
    Name,
    NodeId,
    TargetPath,
    StagingPath,
    VolumePath,
    ParamKey,
    ParamValue,
    /// 300 parameters (or context entries), each with the value.
    ManyParams,
    ContextKey,
    ContextValue,
    PublishContextKey,
    PublishContextValue,
    MutableKey,
    MutableValue,
    MountFlag,
    FsType,
    MountGroup,
    TopologyValue,
    Token,
    SecretKey,
    SecretValue,
}

const FIELDS: [Field; 25] = [
    Field::VolumeId,
    Field::SnapshotId,
    Field::SourceVolumeId,
    Field::SourceSnapshotId,
    Field::Name,
    Field::NodeId,
    Field::TargetPath,
    Field::StagingPath,
    Field::VolumePath,
    Field::ParamKey,
    Field::ParamValue,
    Field::ManyParams,
    Field::ContextKey,
    Field::ContextValue,
    Field::PublishContextKey,
    Field::PublishContextValue,
    Field::MutableKey,
    Field::MutableValue,
    Field::MountFlag,
    Field::FsType,
    Field::MountGroup,
    Field::TopologyValue,
    Field::Token,
    Field::SecretKey,
    Field::SecretValue,
];

/// The size of every volume of the sweep (creates, expansions: nothing
/// to grow).
const SIZE: csi::CapacityRange = csi::CapacityRange {
    required_bytes: 8 << 20,
    limit_bytes: 0,
};

/// One request's fields: the valid ones of the world, one of them
/// replaced.
struct Fill<'a> {
    w: &'a World,
    field: Field,
    value: &'a str,
    /// Fields the request carries (collected while it is built).
    used: std::cell::RefCell<Vec<Field>>,
}

impl Fill<'_> {
    fn pick(&self, f: Field, valid: &str) -> String {
        self.used.borrow_mut().push(f);
        if f == self.field {
            self.value.to_string()
        } else {
            valid.to_string()
        }
    }

    fn vol(&self) -> String {
        self.pick(Field::VolumeId, &self.w.vol)
    }

    fn snap(&self) -> String {
        let s = self.w.snap.clone().unwrap_or_else(|| "no-snapshot".into());
        self.pick(Field::SnapshotId, &s)
    }

    fn path(&self, f: Field, valid: &Path) -> String {
        self.pick(f, &valid.display().to_string())
    }

    /// A map of `valid` entries, with the key or value fields `k` and `v`
    /// (and `ManyParams` when `many`).
    fn map(
        &self,
        k: Field,
        v: Field,
        valid: &HashMap<String, String>,
        many: bool,
    ) -> HashMap<String, String> {
        let mut m = valid.clone();
        self.used.borrow_mut().extend([k, v]);
        if self.field == k {
            m.insert(self.value.to_string(), "v".into());
        }
        if self.field == v {
            // A key berth leaves to the CO (parameters) or ignores
            // (contexts): the value is all there is to refuse.
            m.insert("csi.storage.k8s.io/pvc/name".into(), self.value.to_string());
        }
        if many {
            self.used.borrow_mut().push(Field::ManyParams);
            if self.field == Field::ManyParams {
                for i in 0..300 {
                    m.insert(format!("csi.storage.k8s.io/k{i}"), self.value.to_string());
                }
            }
        }
        m
    }

    fn secrets(&self) -> HashMap<String, String> {
        self.used
            .borrow_mut()
            .extend([Field::SecretKey, Field::SecretValue]);
        let mut m = HashMap::from([("password".to_string(), SECRET.to_string())]);
        if self.field == Field::SecretKey {
            m.insert(self.value.to_string(), SECRET.into());
        }
        if self.field == Field::SecretValue {
            m.insert("token".into(), format!("{SECRET}{}", self.value));
            m.insert("ca.crt".into(), format!("{}{SECRET}", self.value));
        }
        m
    }

    fn cap(&self) -> csi::VolumeCapability {
        self.used
            .borrow_mut()
            .extend([Field::MountFlag, Field::FsType, Field::MountGroup]);
        let mut c = self.w.cap.clone();
        if let Some(csi::volume_capability::AccessType::Mount(m)) = &mut c.access_type {
            match self.field {
                Field::MountFlag => m.mount_flags.push(self.value.to_string()),
                Field::FsType => m.fs_type = self.value.to_string(),
                Field::MountGroup => m.volume_mount_group = self.value.to_string(),
                _ => {}
            }
        }
        c
    }

    fn publish_context(&self) -> HashMap<String, String> {
        self.map(
            Field::PublishContextKey,
            Field::PublishContextValue,
            &HashMap::new(),
            false,
        )
    }

    /// A node call's volume_context.
    fn node_volume_context(&self) -> HashMap<String, String> {
        self.map(
            Field::ContextKey,
            Field::ContextValue,
            &HashMap::new(),
            true,
        )
    }

    /// The staging path of a kind that stages, else none.
    fn staging_if(&self, stages: bool) -> String {
        if stages {
            self.path(Field::StagingPath, &self.w.staging)
        } else {
            String::new()
        }
    }

    fn topology(&self) -> csi::Topology {
        topo(&self.pick(Field::TopologyValue, NODE))
    }
}

/// A well-formed id of the same kind that names nothing: `id` with its
/// last (hex) digit changed.
fn other_id(id: &str) -> String {
    let mut s = id.to_string();
    let last = s.pop().unwrap_or('0');
    s.push(if last == '0' { '1' } else { '0' });
    s
}

/// A name no request used before.
fn fresh_name() -> String {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    format!(
        "fresh-{}",
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// Sends `rpc` with `field` set to `value`: None when the RPC has no such
/// field.
async fn send(w: &World, rpc: Rpc, field: Field, value: &str) -> Option<Result<(), tonic::Status>> {
    let f = Fill {
        w,
        field,
        value,
        used: Default::default(),
    };
    let (c, n) = (&w.h.ctl, &w.h.node);
    let none = HashMap::new();
    let ctx = HashMap::from([("k".to_string(), "v".to_string())]);
    let stages = w.kind != KindUnderTest::Nfs;
    // Requests are built first (which fields they carry is known then),
    // sent only when they carry the field.
    macro_rules! go {
        ($call:expr) => {{
            if !f.used.borrow().contains(&field) {
                return None;
            }
            Some($call.await.map(|_| ()))
        }};
    }
    match rpc {
        Rpc::CreateVolume => {
            let source = match field {
                Field::SourceSnapshotId => Some(csi::volume_content_source::Type::Snapshot(
                    csi::volume_content_source::SnapshotSource {
                        snapshot_id: f.pick(Field::SourceSnapshotId, ""),
                    },
                )),
                Field::SourceVolumeId => Some(csi::volume_content_source::Type::Volume(
                    csi::volume_content_source::VolumeSource {
                        volume_id: f.pick(Field::SourceVolumeId, ""),
                    },
                )),
                _ => None,
            };
            let topology =
                matches!(w.kind, KindUnderTest::Local | KindUnderTest::Block).then(|| {
                    csi::TopologyRequirement {
                        requisite: vec![f.topology()],
                        preferred: vec![],
                    }
                });
            // A name of its own for each source: a name taken with
            // another source is ALREADY_EXISTS, whatever the source.
            let name = match field {
                Field::SourceSnapshotId | Field::SourceVolumeId => fresh_name(),
                _ => "hostile-sweep".to_string(),
            };
            let r = csi::CreateVolumeRequest {
                name: f.pick(Field::Name, &name),
                capacity_range: Some(SIZE),
                volume_capabilities: vec![f.cap()],
                parameters: f.map(Field::ParamKey, Field::ParamValue, &w.params, true),
                mutable_parameters: f.map(Field::MutableKey, Field::MutableValue, &none, false),
                secrets: f.secrets(),
                volume_content_source: source.map(|t| csi::VolumeContentSource { r#type: Some(t) }),
                accessibility_requirements: topology,
            };
            go!(c.create_volume(Request::new(r)))
        }
        Rpc::DeleteVolume => {
            // The volume is staged and published, so a delete of it is
            // refused anyway; a well-formed id of none all the same.
            let r = csi::DeleteVolumeRequest {
                volume_id: f.pick(Field::VolumeId, &other_id(&w.vol)),
                secrets: f.secrets(),
            };
            go!(c.delete_volume(Request::new(r)))
        }
        Rpc::ControllerPublishVolume => {
            let r = csi::ControllerPublishVolumeRequest {
                volume_id: f.vol(),
                node_id: f.pick(Field::NodeId, NODE),
                volume_capability: Some(f.cap()),
                readonly: false,
                secrets: f.secrets(),
                volume_context: f.map(Field::ContextKey, Field::ContextValue, &ctx, true),
            };
            go!(c.controller_publish_volume(Request::new(r)))
        }
        Rpc::ControllerUnpublishVolume => {
            let r = csi::ControllerUnpublishVolumeRequest {
                volume_id: f.vol(),
                node_id: f.pick(Field::NodeId, "node-never-published"),
                secrets: f.secrets(),
            };
            go!(c.controller_unpublish_volume(Request::new(r)))
        }
        Rpc::ValidateVolumeCapabilities => {
            let r = csi::ValidateVolumeCapabilitiesRequest {
                volume_id: f.vol(),
                volume_context: f.map(Field::ContextKey, Field::ContextValue, &none, true),
                volume_capabilities: vec![f.cap()],
                parameters: f.map(Field::ParamKey, Field::ParamValue, &w.params, false),
                mutable_parameters: f.map(Field::MutableKey, Field::MutableValue, &none, false),
                secrets: f.secrets(),
            };
            go!(c.validate_volume_capabilities(Request::new(r)))
        }
        Rpc::ListVolumes => {
            let r = csi::ListVolumesRequest {
                max_entries: 1,
                starting_token: f.pick(Field::Token, ""),
            };
            go!(c.list_volumes(Request::new(r)))
        }
        Rpc::GetCapacity => {
            let r = csi::GetCapacityRequest {
                volume_capabilities: vec![f.cap()],
                parameters: f.map(Field::ParamKey, Field::ParamValue, &w.params, true),
                accessible_topology: Some(f.topology()),
            };
            go!(c.get_capacity(Request::new(r)))
        }
        Rpc::CreateSnapshot => {
            let r = csi::CreateSnapshotRequest {
                source_volume_id: f.pick(Field::SourceVolumeId, &w.vol),
                name: f.pick(
                    Field::Name,
                    &if field == Field::SourceVolumeId {
                        fresh_name()
                    } else {
                        "hostile-snap".to_string()
                    },
                ),
                secrets: f.secrets(),
                parameters: f.map(Field::ParamKey, Field::ParamValue, &none, true),
            };
            go!(c.create_snapshot(Request::new(r)))
        }
        Rpc::DeleteSnapshot => {
            // A well-formed id of no snapshot: a valid request must not
            // delete the real one.
            let s = w.snap.as_deref().map(other_id).unwrap_or_default();
            let r = csi::DeleteSnapshotRequest {
                snapshot_id: f.pick(Field::SnapshotId, &s),
                secrets: f.secrets(),
            };
            go!(c.delete_snapshot(Request::new(r)))
        }
        Rpc::ListSnapshots => {
            let r = csi::ListSnapshotsRequest {
                max_entries: 1,
                starting_token: f.pick(Field::Token, ""),
                source_volume_id: f.pick(Field::SourceVolumeId, ""),
                snapshot_id: f.pick(Field::SnapshotId, ""),
                secrets: f.secrets(),
            };
            go!(c.list_snapshots(Request::new(r)))
        }
        Rpc::ControllerExpandVolume => {
            let r = csi::ControllerExpandVolumeRequest {
                volume_id: f.vol(),
                // The size it has: nothing to grow.
                capacity_range: Some(SIZE),
                secrets: f.secrets(),
                volume_capability: Some(f.cap()),
            };
            go!(c.controller_expand_volume(Request::new(r)))
        }
        Rpc::ControllerGetVolume => {
            let r = csi::ControllerGetVolumeRequest { volume_id: f.vol() };
            go!(c.controller_get_volume(Request::new(r)))
        }
        Rpc::GetSnapshot => {
            let r = csi::GetSnapshotRequest {
                snapshot_id: f.snap(),
                secrets: f.secrets(),
            };
            go!(c.get_snapshot(Request::new(r)))
        }
        Rpc::ControllerModifyVolume => {
            let r = csi::ControllerModifyVolumeRequest {
                volume_id: f.vol(),
                secrets: f.secrets(),
                mutable_parameters: f.map(Field::MutableKey, Field::MutableValue, &ctx, true),
            };
            go!(c.controller_modify_volume(Request::new(r)))
        }
        Rpc::NodeStageVolume => {
            let r = csi::NodeStageVolumeRequest {
                volume_id: f.vol(),
                publish_context: f.publish_context(),
                staging_target_path: f.path(Field::StagingPath, &w.staging),
                volume_capability: Some(f.cap()),
                secrets: f.secrets(),
                volume_context: f.node_volume_context(),
            };
            go!(n.node_stage_volume(Request::new(r)))
        }
        Rpc::NodeUnstageVolume => {
            // A path never staged: an unstage of the real one would be
            // a change asked for.
            let r = csi::NodeUnstageVolumeRequest {
                volume_id: f.vol(),
                staging_target_path: f.path(Field::StagingPath, &w.h.path("never-staged")),
            };
            go!(n.node_unstage_volume(Request::new(r)))
        }
        Rpc::NodePublishVolume => {
            let r = csi::NodePublishVolumeRequest {
                volume_id: f.vol(),
                publish_context: f.publish_context(),
                staging_target_path: f.staging_if(stages),
                target_path: f.path(Field::TargetPath, &w.target),
                volume_capability: Some(f.cap()),
                readonly: false,
                secrets: f.secrets(),
                volume_context: f.node_volume_context(),
            };
            go!(n.node_publish_volume(Request::new(r)))
        }
        Rpc::NodeUnpublishVolume => {
            let r = csi::NodeUnpublishVolumeRequest {
                volume_id: f.vol(),
                target_path: f.path(Field::TargetPath, &w.h.path("never-published")),
            };
            go!(n.node_unpublish_volume(Request::new(r)))
        }
        Rpc::NodeGetVolumeStats => {
            let r = csi::NodeGetVolumeStatsRequest {
                volume_id: f.vol(),
                volume_path: f.path(Field::VolumePath, &w.target),
                staging_target_path: f.staging_if(stages),
            };
            go!(n.node_get_volume_stats(Request::new(r)))
        }
        Rpc::NodeExpandVolume => {
            let r = csi::NodeExpandVolumeRequest {
                volume_id: f.vol(),
                volume_path: f.path(Field::VolumePath, &w.target),
                capacity_range: Some(SIZE),
                staging_target_path: f.staging_if(stages),
                volume_capability: Some(f.cap()),
                secrets: f.secrets(),
            };
            go!(n.node_expand_volume(Request::new(r)))
        }
    }
}

// ------------------------------------------------------------ the sweep

/// One answer to a hostile value, for the report of a failed sweep.
#[derive(Debug)]
struct Answer {
    rpc: Rpc,
    field: Field,
    value: String,
    code: Code,
    message: String,
}

fn shown(v: &str) -> String {
    if v.len() > 80 {
        format!(
            "{:?}... ({} bytes)",
            v.chars().take(20).collect::<String>(),
            v.len()
        )
    } else {
        format!("{v:?}")
    }
}

/// The values of `field` made from the hostile `v`: `v` itself (for a
/// path only when it is not absolute: an absolute one would name a place
/// outside the test's directory), and for ids and paths the valid one
/// with `v` appended (an id or path that looks like a real one). Paths
/// of NodeStage and NodePublish get `v` appended to a place whose parent
/// does not exist: a target or staging path that looks like the real one
/// would otherwise be published or staged as asked.
fn variants(w: &World, rpc: Rpc, field: Field, v: &str) -> Vec<String> {
    let path = matches!(
        field,
        Field::TargetPath | Field::StagingPath | Field::VolumePath
    );
    let mut out = vec![];
    if !(path && v.starts_with('/')) {
        out.push(v.to_string());
    }
    let makes = matches!(rpc, Rpc::NodeStageVolume | Rpc::NodePublishVolume);
    let unmade = w.h.path("no-such-parent");
    match field {
        Field::VolumeId | Field::SourceVolumeId => out.push(format!("{}{v}", w.vol)),
        Field::SnapshotId | Field::SourceSnapshotId => {
            if let Some(s) = &w.snap {
                out.push(format!("{s}{v}"));
            }
        }
        Field::TargetPath | Field::StagingPath if makes => {
            out.push(format!("{}/{v}", unmade.display()));
        }
        Field::TargetPath => out.push(format!("{}{v}", w.target.display())),
        Field::StagingPath => out.push(format!("{}{v}", w.staging.display())),
        Field::VolumePath => out.push(format!("{}/{v}", w.target.display())),
        Field::NodeId => out.push(format!("{NODE}{v}")),
        _ => {}
    }
    // What names the real volume, snapshot, node or path as it is (the
    // path spelt with a trailing '/') is not hostile: an unpublish of it
    // would be a change asked for.
    let same_path = |a: &str, b: &Path| a.trim_end_matches('/') == b.display().to_string();
    // Nor is the id of a volume or snapshot a value made before (a
    // CreateVolume named ".." makes NFS subdirectory "vol..", whose id is
    // the real one with ".." appended).
    let store = &w.h.driver.store;
    out.retain(|x| {
        store.get(x).is_none()
            && store.snapshot_get(x).is_none()
            && *x != w.vol
            && Some(x.as_str()) != w.snap.as_deref()
            && x != NODE
            && !same_path(x, &w.target)
            && !same_path(x, &w.staging)
    });
    out.dedup();
    out
}

/// Sends every RPC with every field set to each variant of `v`, checking
/// each answer; returns what was answered, and what was wrong.
async fn sweep_value(w: &World, v: &str, answers: &mut Vec<Answer>) -> Vec<String> {
    let logs = log_buffer();
    let mut wrong = Vec::new();
    // What the state is before each call: looked at again only after a
    // call that may change it, or did.
    let mut before = w.seen();
    for rpc in RPCS {
        for field in FIELDS {
            for value in variants(w, rpc, field, v) {
                w.h.fake().clear_calls();
                w.h.fake().clear_file_ops();
                let Some(r) = send(w, rpc, field, &value).await else {
                    continue;
                };
                let (code, message) = match &r {
                    Ok(()) => (Code::Ok, String::new()),
                    Err(s) => (s.code(), s.message().to_string()),
                };
                let a = Answer {
                    rpc,
                    field,
                    value: value.clone(),
                    code,
                    message,
                };
                let r = check(w, &a, &before);
                if unpublished_all(&a) {
                    // Asked for: the volume is published again for the
                    // values that follow.
                    let _ = controller_publish(&w.h, &w.vol, NODE).await;
                }
                if published_elsewhere(&a) {
                    // An NFS volume published to another node as asked:
                    // unpublished again.
                    let _ = controller_unpublish(&w.h, &w.vol, &a.value).await;
                }
                if let Err(e) = r {
                    wrong.push(e);
                    before = w.seen();
                } else if may_change(&a) {
                    before = w.seen();
                }
                answers.push(a);
            }
        }
    }
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).to_string();
    if let Some(l) = text.lines().find(|l| l.contains(SECRET)) {
        wrong.push(format!("the secret reached a log line: {l}"));
    }
    wrong
}

/// ControllerUnpublishVolume without a node id: the spec's "unpublish the
/// volume from all nodes", a change asked for.
fn unpublished_all(a: &Answer) -> bool {
    a.rpc == Rpc::ControllerUnpublishVolume
        && a.field == Field::NodeId
        && a.value.is_empty()
        && a.code == Code::Ok
}

/// Whether the answer is one that may have changed something: a create,
/// stage or publish that was done, or `unpublished_all`.
/// ControllerPublishVolume of the volume to another node, done (NFS).
fn published_elsewhere(a: &Answer) -> bool {
    a.rpc == Rpc::ControllerPublishVolume && a.field == Field::NodeId && a.code == Code::Ok
}

fn may_change(a: &Answer) -> bool {
    (a.code == Code::Ok
        && matches!(
            a.rpc,
            Rpc::CreateVolume
                | Rpc::CreateSnapshot
                | Rpc::NodePublishVolume
                | Rpc::NodeStageVolume
                | Rpc::NodeExpandVolume
        ))
        || unpublished_all(a)
        || published_elsewhere(a)
}

fn check(w: &World, a: &Answer, before: &Seen) -> Result<(), String> {
    let what = format!(
        "{:?} kind, {:?} with {:?} = {}: {:?} {:?}",
        w.kind,
        a.rpc,
        a.field,
        shown(&a.value),
        a.code,
        shown(&a.message)
    );
    if a.message.contains(SECRET) {
        return Err(format!("the secret in the answer: {what}"));
    }
    if let Some(want) = expected(w, a) {
        if !want.contains(&a.code) {
            return Err(format!("want one of {want:?}: {what}"));
        }
    }
    if matches!(
        a.code,
        Code::Internal
            | Code::Unknown
            | Code::DataLoss
            | Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
    ) {
        return Err(format!("a code no bad input earns: {what}"));
    }
    if may_change(a) {
        return Ok(());
    }
    let f = w.h.fake();
    let calls = f.calls();
    if !calls.is_empty() {
        return Err(format!("OS calls made ({calls:?}): {what}"));
    }
    let after = w.seen();
    // A removal or mkdir tried where nothing is, nor came to be (an rmdir
    // of a target path that is not there: NodeUnpublishVolume removes the
    // target it made, and one not there is gone already), changed
    // nothing; the tree compared below shows what did.
    let inside = |p: &Path| p.starts_with(w.h.dir.path());
    let tried_on_nothing =
        |p: &Path| inside(p) && !before.tree.contains_key(p) && !after.tree.contains_key(p);
    let ops: Vec<_> = f
        .file_ops()
        .into_iter()
        .filter(|o| !tried_on_nothing(&o.path))
        .collect();
    if !ops.is_empty() {
        return Err(format!("filesystem changed ({ops:?}): {what}"));
    }
    if after != *before {
        let changed: Vec<_> = before
            .tree
            .iter()
            .filter(|(p, m)| after.tree.get(*p) != Some(m))
            .map(|(p, _)| p.clone())
            .chain(
                after
                    .tree
                    .keys()
                    .filter(|p| !before.tree.contains_key(*p))
                    .cloned(),
            )
            .collect();
        return Err(format!(
            "state changed ({changed:?}; records same: {}, snapshots same: {}, table same: {}): {what}",
            after.volumes == before.volumes,
            after.snapshots == before.snapshots,
            after.table == before.table
        ));
    }
    Ok(())
}

/// A value of an id field that berth must refuse (CSI string rules):
/// empty, over 128 bytes, or with a control character.
fn bad_id(v: &str) -> bool {
    v.is_empty() || v.len() > 128 || v.chars().any(char::is_control)
}

/// A value of a name field that berth must refuse: the spec allows tab,
/// LF and CR in a name.
fn bad_name(v: &str) -> bool {
    v.is_empty()
        || v.len() > 128
        || v.chars()
            .any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
}

/// A target or staging path that berth must refuse: empty, relative,
/// with a control character, a "." or ".." component, PATH_MAX or more.
fn bad_path(v: &str) -> bool {
    v.is_empty()
        || !v.starts_with('/')
        || v.chars().any(char::is_control)
        || v.split('/').any(|c| c == "." || c == "..")
        || v.len() >= 4096
        || v.split('/').any(|c| c.len() > 255)
}

/// The codes the spec allows for this answer, when the sweep can tell.
fn expected(w: &World, a: &Answer) -> Option<Vec<Code>> {
    use Code::*;
    let v = a.value.as_str();
    let invalid = Some(vec![InvalidArgument]);
    // RPCs of capabilities not offered answer UNIMPLEMENTED whatever the
    // request.
    let snapshots = w.snap.is_some();
    let snapshot_rpc = matches!(
        a.rpc,
        Rpc::CreateSnapshot | Rpc::DeleteSnapshot | Rpc::ListSnapshots | Rpc::GetSnapshot
    );
    if a.rpc == Rpc::ControllerModifyVolume || (snapshot_rpc && !snapshots) {
        return Some(vec![Unimplemented]);
    }
    let expand_rpc = matches!(a.rpc, Rpc::ControllerExpandVolume | Rpc::NodeExpandVolume);
    if expand_rpc && w.kind == KindUnderTest::Nfs {
        // NFS volumes are not expanded.
        return None;
    }
    match a.field {
        Field::SecretKey => {
            let key_ok = !v.is_empty()
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            let total = v.len() + 2 * SECRET.len() + "password".len();
            if !key_ok || total > 4096 {
                return invalid;
            }
        }
        Field::SecretValue => {
            if 2 * v.len() + 3 * SECRET.len() + "passwordtokenca.crt".len() > 4096 {
                return invalid;
            }
        }
        Field::VolumeId | Field::SnapshotId | Field::SourceVolumeId | Field::SourceSnapshotId => {
            let optional = a.rpc == Rpc::ListSnapshots;
            if bad_id(v) && !(optional && v.is_empty()) {
                return invalid;
            }
            let known = v == w.vol || Some(v) == w.snap.as_deref();
            // A node keeps no records of NFS volumes: a well-formed NFS id
            // is a volume to it (NodeStageVolume, not advertised for NFS,
            // does nothing; NodePublishVolume to the real target is
            // ALREADY_EXISTS, another volume's mount is there).
            let node_rpc = matches!(
                a.rpc,
                Rpc::NodeStageVolume
                    | Rpc::NodeUnstageVolume
                    | Rpc::NodePublishVolume
                    | Rpc::NodeUnpublishVolume
                    | Rpc::NodeGetVolumeStats
                    | Rpc::NodeExpandVolume
            );
            if w.kind == KindUnderTest::Nfs && node_rpc {
                return None;
            }
            if !known && !v.is_empty() {
                // A well-formed id that names nothing.
                return Some(match (a.rpc, a.field) {
                    (Rpc::DeleteVolume, _)
                    | (Rpc::ControllerUnpublishVolume, _)
                    | (Rpc::DeleteSnapshot, _)
                    | (Rpc::ListSnapshots, _) => vec![Ok],
                    (Rpc::NodeUnpublishVolume | Rpc::NodeUnstageVolume, _) => vec![Ok, NotFound],
                    (Rpc::CreateSnapshot, _) => vec![NotFound, InvalidArgument],
                    _ => vec![NotFound],
                });
            }
        }
        Field::Name => {
            if bad_name(v) {
                return invalid;
            }
        }
        Field::NodeId => {
            let empty_ok = a.rpc == Rpc::ControllerUnpublishVolume;
            if (v.is_empty() && !empty_ok) || v.len() > 256 || v.chars().any(char::is_control) {
                return invalid;
            }
            // A node-local volume is on this node only; an NFS volume
            // can be used on any node (berth keeps no list of nodes).
            if a.rpc == Rpc::ControllerPublishVolume && v != NODE && w.kind != KindUnderTest::Nfs {
                return Some(vec![NotFound]);
            }
        }
        Field::StagingPath if v.is_empty() => {
            return match a.rpc {
                // Optional there.
                Rpc::NodeGetVolumeStats | Rpc::NodeExpandVolume => None,
                // The spec's "Staging target path not set".
                Rpc::NodePublishVolume => Some(vec![FailedPrecondition]),
                _ => invalid,
            };
        }
        Field::TargetPath | Field::StagingPath => {
            if bad_path(v) {
                return invalid;
            }
        }
        Field::VolumePath => {
            if bad_path(v) {
                // The spec's NOT_FOUND: "not found on the given
                // volume_path"; a malformed one is INVALID_ARGUMENT.
                return Some(vec![InvalidArgument, NotFound]);
            }
        }
        Field::Token => {
            if !v.is_empty() && v.parse::<u64>().map(|t| t.to_string() != v).unwrap_or(true) {
                return Some(vec![Aborted]);
            }
        }
        Field::MountFlag => {
            if v.is_empty() || v.len() > 128 || v.chars().any(char::is_control) {
                return invalid;
            }
        }
        Field::FsType | Field::MountGroup => {
            if v.chars().any(char::is_control) || v.len() > 128 {
                return invalid;
            }
        }
        Field::ParamKey | Field::ContextKey | Field::PublishContextKey | Field::MutableKey => {
            if v.is_empty() || v.len() > 128 || v.chars().any(char::is_control) {
                return invalid;
            }
        }
        Field::ParamValue
        | Field::ContextValue
        | Field::PublishContextValue
        | Field::MutableValue => {
            if v.contains('\0') || 2 * v.len() > 4000 {
                return invalid;
            }
        }
        Field::ManyParams => {
            if 300 * v.len() > 4096 || v.contains('\0') {
                return invalid;
            }
        }
        Field::TopologyValue => {}
    }
    None
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The sweep of one kind: every fixed value, then `cases` generated ones.
/// Fails with every wrong answer (the first of each RPC, field and
/// problem), and, for a generated value, the smallest value proptest
/// found failing.
fn sweep(kind: KindUnderTest, cases: u32) {
    let _ = log_buffer();
    let rt = runtime();
    let w = rt.block_on(world(kind));
    let mut answers = Vec::new();
    let start = std::time::Instant::now();
    let mut wrong = Vec::new();
    for v in fixed_values() {
        wrong.extend(rt.block_on(sweep_value(&w, &v, &mut answers)));
    }
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases,
        max_shrink_iters: 16,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let answers = Mutex::new(answers);
    let r = runner.run(&generated(), |v| {
        let mut a = answers.lock().unwrap_or_else(|e| e.into_inner());
        let wrong = rt.block_on(sweep_value(&w, &v, &mut a));
        match wrong.first() {
            None => Ok(()),
            Some(e) => Err(TestCaseError::fail(e.clone())),
        }
    });
    if let Err(e) = r {
        wrong.push(format!("generated: {e}"));
    }
    let answers = answers.into_inner().unwrap_or_else(|e| e.into_inner());
    if std::env::var_os("SWEEP_REPORT").is_some() {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for a in &answers {
            *counts
                .entry(format!("{:?} {:?} {:?}", a.rpc, a.field, a.code))
                .or_default() += 1;
        }
        for (k, n) in counts {
            eprintln!("{kind:?} {k}: {n}");
        }
    }
    eprintln!(
        "{kind:?}: {} answers in {:.1} s (seen {:.1} s all kinds), {} entries",
        answers.len(),
        start.elapsed().as_secs_f64(),
        SEEN_NANOS.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e9,
        w.seen().tree.len()
    );

    // One line per RPC, field and kind of problem.
    let mut seen = std::collections::HashSet::new();
    let distinct: Vec<&String> = wrong
        .iter()
        .filter(|e| {
            let key: String = e
                .split(" = ")
                .next()
                .unwrap_or(e)
                .chars()
                .take(400)
                .collect();
            let problem: String = e.chars().take(30).collect();
            seen.insert((key, problem))
        })
        .collect();
    assert!(
        distinct.is_empty(),
        "{} wrong answers, {} distinct:\n{}",
        wrong.len(),
        distinct.len(),
        distinct
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The log lines were captured (else the secret's absence from them
    // would say nothing).
    let logged = String::from_utf8_lossy(&log_buffer().lock().unwrap()).to_string();
    assert!(logged.contains("rpc failed"), "no log line was captured");
    // Every RPC answered hostile values.
    for rpc in RPCS {
        assert!(answers.iter().any(|a| a.rpc == rpc), "{rpc:?} never sent");
    }
}

#[test]
fn hostile_values_in_every_field_of_local_volumes() {
    sweep(KindUnderTest::Local, 6);
}

#[test]
fn hostile_values_in_every_field_of_block_volumes() {
    sweep(KindUnderTest::Block, 6);
}

#[test]
fn hostile_values_in_every_field_of_nfs_volumes() {
    sweep(KindUnderTest::Nfs, 6);
}
