//! What Berth remembers about a volume.
use std::collections::BTreeMap;

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
}
