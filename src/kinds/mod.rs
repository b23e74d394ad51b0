//! Volume kinds. Each kind implements `VolumeKind`; the RPC handlers do the
//! generic work (validation, guards, records, topology, idempotency) and call
//! the kind for what touches storage.
//!
//! | file       | kind                                         |
//! |------------|----------------------------------------------|
//! | `local.rs` | local directories under `--local-root`       |

pub mod local;

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::Result;
use crate::os::FsUsage;
use crate::state::{Capability, Kind, VolumeRecord};

pub use local::LocalKind;

/// Free space a kind can still hand out, before subtracting promises.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolCapacity {
    /// Bytes free in the pool right now.
    pub free_bytes: i64,
    /// Largest single volume the pool could ever hold.
    pub max_volume_bytes: i64,
}

/// Health of a volume's backing storage.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    pub abnormal: bool,
    pub message: String,
}

impl Health {
    pub fn ok() -> Self {
        Health {
            abnormal: false,
            message: "volume is healthy".into(),
        }
    }
    pub fn abnormal(message: impl Into<String>) -> Self {
        Health {
            abnormal: true,
            message: message.into(),
        }
    }
}

/// Arguments of a NodePublishVolume, validated.
#[derive(Debug, Clone)]
pub struct PublishArgs<'a> {
    pub staging: &'a Path,
    pub target: &'a Path,
    pub capability: &'a Capability,
    pub readonly: bool,
}

/// Usage numbers for NodeGetVolumeStats.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeStats {
    pub usage: FsUsage,
    /// Raw block volumes report only their size.
    pub block_size_only: Option<i64>,
}

pub trait VolumeKind: Send + Sync {
    fn kind(&self) -> Kind;

    /// A fresh volume id for this kind.
    fn new_id(&self) -> String;

    /// True when `id` has this kind's id structure (checked before any use of
    /// the id as a path).
    fn owns_id(&self, id: &str) -> bool;

    /// StorageClass parameters this kind understands beyond the generic ones;
    /// any other key is rejected naming the key.
    fn check_parameters(&self, params: &BTreeMap<String, String>) -> Result<()>;

    /// INVALID_ARGUMENT when this kind cannot provide `cap`.
    fn check_capability(&self, cap: &Capability) -> Result<()>;

    /// Free space of the pool (GetCapacity subtracts promises).
    fn pool_capacity(&self) -> Result<PoolCapacity>;

    /// Creates the storage for a recorded volume. Idempotent: a retry after a
    /// crash finds what an earlier attempt made.
    fn create(&self, rec: &mut VolumeRecord) -> Result<()>;

    /// Removes the storage. Idempotent; touches nothing outside the kind's
    /// own root.
    fn delete(&self, rec: &VolumeRecord) -> Result<()>;

    /// Whether the backing storage is there and usable.
    fn health(&self, rec: &VolumeRecord) -> Health;

    fn stage(&self, rec: &VolumeRecord, staging: &Path, cap: &Capability) -> Result<()>;
    fn unstage(&self, rec: &VolumeRecord, staging: &Path) -> Result<()>;
    fn publish(&self, rec: &VolumeRecord, args: &PublishArgs<'_>) -> Result<()>;
    fn unpublish(&self, rec: &VolumeRecord, target: &Path) -> Result<()>;

    /// NOT_FOUND when the volume is not available at `path`.
    fn stats(&self, rec: &VolumeRecord, path: &Path) -> Result<VolumeStats>;

    /// True when the volume is staged or published anywhere on this node
    /// (DeleteVolume refuses such a volume).
    fn in_use(&self, rec: &VolumeRecord) -> Result<Vec<std::path::PathBuf>>;

    /// Whether volumes live on one node: topology constraints, per-node
    /// capacity, the attach phase (ControllerPublishVolume) and staging.
    /// False for kinds reachable from every node (NFS).
    fn node_local(&self) -> bool {
        true
    }

    /// Whether CreateVolume/DeleteVolume must write a durable intent
    /// (phase Creating/Deleting) before touching storage. A kind may skip it
    /// when `reconcile_orphans` recognises what a crash leaves behind.
    fn durable_intent(&self) -> bool {
        true
    }

    /// At start-up: cleans up storage left by an interrupted create or
    /// delete that has no record (`known` says which ids have one).
    fn reconcile_orphans(&self, _known: &dyn Fn(&str) -> bool) -> Result<()> {
        Ok(())
    }
}
