//! Durable driver state: an append-only journal of record changes with group
//! commit (concurrent changes share one fdatasync), compacted into a snapshot
//! when it grows (see `journal`), so every change costs one appended line and
//! a crash at any point leaves either the old or the new record. An in-memory
//! index (by id, by name, by creation order) is built at start-up and answers
//! every read. Records kept by older versions, one JSON file per volume under
//! `volumes/`, are imported into the journal at start-up (see `legacy`).
//!
//! Records carry an intent (`Phase::Creating` / `Phase::Deleting`) written
//! before the storage is touched; `Driver::reconcile` finishes or rolls back
//! such records on start-up.

pub mod driver_name;
pub mod extra;
pub mod journal;
pub mod legacy;
pub mod lock;
pub mod record;
pub mod snapshot_file;
pub mod store;
pub mod table;
pub mod tools;

pub use record::{
    AccessMode, AccessType, Allocation, Attachment, BlockAccess, BlockInfo, Capability,
    ContentSource, DiskRef, FileId, Kept, Kind, LoopRange, Phase, SnapshotRecord, Source,
    VolumeRecord,
};
pub use store::Store;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("record {path} is corrupt; refusing to guess (move it away to start)")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {why}; refusing to guess (move it away to start)")]
    Unexpected { path: PathBuf, why: String },
    #[error("{0}")]
    Os(#[from] crate::os::OsError),
    #[error("the state directory {dir} holds no berth state (no journal/, no volumes/): it is not one a berth has served on; name the one berth uses (--state-dir, or --data-dir whose state/ is the default, as the driver was given them)")]
    NoState { dir: PathBuf },
    #[error("the state journal {path} is damaged at byte {offset}, {why}; {recover}")]
    Damaged {
        path: PathBuf,
        offset: u64,
        why: String,
        recover: &'static str,
    },
    #[error("the {what} {dir} is in use by another process ({holder}); refusing to start: two writers would lose each other's volumes")]
    Locked {
        dir: PathBuf,
        what: String,
        holder: String,
    },
    #[error("the state directory {dir} holds {records} volume and snapshot records served as CSI driver {recorded}, and this berth runs as --driver-name {name}: their PersistentVolumes and VolumeSnapshotContents name {recorded}, which Kubernetes never changes, so kubelet and the sidecars would find no driver for them (no unmount, no delete) while new volumes were made under {name}. Berth does not start: run it with --driver-name {recorded} (BERTH_DRIVER_NAME; the Helm values driverNames). Only if every one of them is now known to Kubernetes under {name} (their PVs made again naming it), write {name} into {dir}/driver-name, berth stopped")]
    DriverName {
        dir: PathBuf,
        recorded: String,
        name: String,
        records: usize,
    },
    #[error("the state journal stopped accepting changes after a failed flush ({0}); restart berth to replay it")]
    Poisoned(String),
    #[error("writing the state journal: {0}")]
    Journal(String),
    /// `Journal` for a write the filesystem refused for want of space.
    #[error("writing the state journal: {0}")]
    JournalFull(String),
    #[error("encoding record {id}")]
    Encode {
        id: String,
        #[source]
        source: serde_json::Error,
    },
}

impl StateError {
    /// Whether the filesystem refused the change for want of space
    /// (ENOSPC, EDQUOT).
    pub fn is_no_space(&self) -> bool {
        let errno = match self {
            StateError::JournalFull(_) => return true,
            StateError::Os(e) => e.errno(),
            StateError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        };
        matches!(errno, Some(libc::ENOSPC | libc::EDQUOT))
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StateError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
