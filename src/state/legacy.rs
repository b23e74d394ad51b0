//! The one-file-per-volume layout of earlier versions: `<state-dir>/volumes/
//! <id>.json`. Start-up imports those records into the journal (a snapshot
//! holding them is durable before any file is removed), so an upgrade keeps
//! every volume.
use std::fs;
use std::path::{Path, PathBuf};

use super::record::VolumeRecord;
use super::StateError;
use crate::os::files::Files;

/// The directory of the old layout.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("volumes")
}

/// Every record of the old layout (empty when there is none). Leftover temp
/// files of an interrupted write are ignored; a record that cannot be parsed
/// stops start-up (never guess).
pub fn load(state_dir: &Path) -> Result<Vec<VolumeRecord>, StateError> {
    let dir = dir(state_dir);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StateError::io("read", &dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| StateError::io("read", &dir, e))?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || !name.ends_with(".json") {
            continue;
        }
        let bytes = crate::os::files::read_regular(&path, None).map_err(|e| {
            match crate::os::files::not_regular(&e) {
                // (never opened: a FIFO blocked start-up here)
                Some(n) => StateError::Unexpected {
                    path: path.clone(),
                    why: n.to_string(),
                },
                None => StateError::io("read", &path, e),
            }
        })?;
        let rec = serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt {
            path: path.clone(),
            source,
        })?;
        out.push(rec);
    }
    Ok(out)
}

/// Removes the old layout's record and temp files once their records are
/// durable in the journal, then the directory if nothing else is in it.
pub fn remove(state_dir: &Path, files: &dyn Files) -> Result<(), StateError> {
    let dir = dir(state_dir);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StateError::io("read", &dir, e)),
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".json") || (name.starts_with('.') && name.ends_with(".tmp")) {
            files.remove_file(&entry.path()).map_err(StateError::Os)?;
        }
    }
    if let Err(e) = files.remove_dir(&dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "left the old state directory in place");
    }
    Ok(())
}
