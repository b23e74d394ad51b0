//! What Berth remembers about a volume.
use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The volume kinds, each implemented by a `kinds::VolumeKind`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Local,
    Block,
    Nfs,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Local, Kind::Block, Kind::Nfs];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Local => "local",
            Kind::Block => "block",
            Kind::Nfs => "nfs",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a volume is in its life. Creating and Deleting are intents recorded
/// before the storage is touched.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Creating,
    Ready,
    Deleting,
}

/// CSI access modes (names as in the spec).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AccessMode {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    MultiNodeReaderOnly,
    MultiNodeSingleWriter,
    MultiNodeMultiWriter,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
}

impl AccessMode {
    /// Only one node may use the volume.
    pub fn single_node(self) -> bool {
        matches!(
            self,
            AccessMode::SingleNodeWriter
                | AccessMode::SingleNodeReaderOnly
                | AccessMode::SingleNodeSingleWriter
                | AccessMode::SingleNodeMultiWriter
        )
    }

    /// Only one workload (one publish target) may use the volume.
    pub fn single_target(self) -> bool {
        matches!(self, AccessMode::SingleNodeSingleWriter)
    }

    pub fn read_only(self) -> bool {
        matches!(
            self,
            AccessMode::SingleNodeReaderOnly | AccessMode::MultiNodeReaderOnly
        )
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum AccessType {
    Mount {
        fs_type: String,
        mount_flags: Vec<String>,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        volume_mount_group: String,
    },
    Block,
}

/// One requested volume capability.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Capability {
    pub access_type: AccessType,
    pub access_mode: AccessMode,
}

/// A ControllerPublishVolume that was granted.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub readonly: bool,
    pub capability: Capability,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct VolumeRecord {
    pub id: String,
    pub name: String,
    pub kind: Kind,
    /// Creation order; ListVolumes pages by it.
    pub seq: u64,
    pub phase: Phase,
    pub capacity_bytes: i64,
    /// The node the volume lives on; empty for volumes reachable from every
    /// node (NFS).
    pub node: String,
    /// StorageClass parameters as given (compared on a CreateVolume retry).
    pub parameters: BTreeMap<String, String>,
    /// Capabilities as given (sorted, compared on a CreateVolume retry).
    pub capabilities: Vec<Capability>,
    /// volume_context returned to the CO.
    #[serde(default)]
    pub context: BTreeMap<String, String>,
    /// ControllerPublishVolume grants, by node id.
    #[serde(default)]
    pub published: BTreeMap<String, Attachment>,
    pub created_unix: u64,
    /// Block volumes: allocation, disk and format state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<BlockInfo>,
    /// What the volume was created from (a snapshot or another volume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<ContentSource>,
    /// Local volumes on a root with project quotas: the project id of the
    /// volume's directory, whose limits hold it to its size (see
    /// `kinds::local::quota`). Never held by two records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<u32>,
}

/// The content source of a volume: a snapshot restored, a volume cloned.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ContentSource {
    Snapshot(String),
    Volume(String),
}

/// How the file of a loop-backed block volume is allocated.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Allocation {
    /// Sparse: blocks are allocated as they are written.
    #[default]
    Thin,
    /// Preallocated with fallocate when created (and when grown).
    Thick,
}

/// A whole disk handed out as a volume, and what identifies it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DiskRef {
    /// The path the disk pool listed it under.
    pub path: PathBuf,
    /// The device node that path resolved to when the volume was created.
    pub device: PathBuf,
    /// A /dev/disk/by-id link to it, used in preference to `path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by_id: Option<PathBuf>,
    pub major: u32,
    pub minor: u32,
    pub size_bytes: u64,
}

/// What Berth remembers about a block volume beyond the generic record.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockInfo {
    #[serde(default)]
    pub allocation: Allocation,
    /// Set for volumes of the whole-disk pool (no backing file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskRef>,
    /// Filesystem used when a mount capability names none (StorageClass
    /// parameter fsType, default ext4).
    #[serde(default)]
    pub default_fs: String,
    /// Checked extra mkfs arguments for `default_fs` (parameter mkfsOptions).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mkfs_options: Vec<String>,
    /// True once Berth's mkfs of `fs_type` finished: never formatted again.
    #[serde(default)]
    pub formatted: bool,
    /// The filesystem Berth made (set with `formatted`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub fs_type: String,
    /// Intent written before mkfs starts: a mkfs of this type may have run
    /// (partly) on the device. Cleared when `formatted` is set.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub formatting: String,
    /// The UUID that mkfs (`formatting`) gives the filesystem, pinned with
    /// the intent: a retry adopts a filesystem only if it has this UUID.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub formatting_uuid: String,
    /// How the volume was first staged (raw device or filesystem), recorded
    /// before anything is written: the other way is refused later (a volume
    /// written raw is never formatted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<BlockAccess>,
    /// The filesystem is smaller than the volume (restored or cloned into a
    /// larger one): the next stage grows it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub grow_fs: bool,
    /// The filesystem is a copy of another volume's (a restore or clone)
    /// and has its UUID: xfs refuses to mount a second filesystem with a
    /// UUID already mounted, so it is mounted with `nouuid`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared_uuid: bool,
}

/// How a block volume is used.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BlockAccess {
    Raw,
    Filesystem,
}

/// A point-in-time copy of a volume (CreateSnapshot).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRecord {
    pub id: String,
    pub name: String,
    pub kind: Kind,
    /// Creation order; ListSnapshots pages by it.
    pub seq: u64,
    /// Creating until the copy is complete and durable (`ready_to_use`);
    /// Deleting while its storage is removed.
    pub phase: Phase,
    pub source_volume_id: String,
    /// What a volume restored from it needs: the source's capacity when
    /// the snapshot was taken.
    pub size_bytes: i64,
    /// The node it lives on (the source's); empty for NFS.
    pub node: String,
    /// VolumeSnapshotClass parameters as given.
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    /// Creation time (seconds and nanoseconds since the epoch).
    pub created_secs: i64,
    pub created_nanos: i32,
    /// Block sources: what a restored volume inherits (allocation,
    /// filesystem made, access type, defaults).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<BlockInfo>,
}
