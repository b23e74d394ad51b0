//! Durable driver state: one small JSON file per volume, written atomically
//! (temp file, fsync, rename, fsync of the directory), so every operation
//! costs O(1) writes and a crash at any point leaves either the old or the new
//! record. An in-memory index (by id, by name, by creation order) is built at
//! start-up and answers every read.
//!
//! Records carry an intent (`Phase::Creating` / `Phase::Deleting`) written
//! before the storage is touched; `Driver::reconcile` finishes or rolls back
//! such records on start-up.

pub mod dirsync;
pub mod record;
pub mod store;

pub use record::{
    AccessMode, AccessType, Allocation, Attachment, BlockInfo, Capability, DiskRef, Kind, Phase,
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
    #[error("encoding record {id}")]
    Encode {
        id: String,
        #[source]
        source: serde_json::Error,
    },
}

impl StateError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StateError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
