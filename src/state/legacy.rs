//! The one-file-per-volume layout of earlier versions: `<state-dir>/volumes/
//! <id>.json`. Start-up imports those records into the journal (a snapshot
//! holding them is durable before any file is removed), so an upgrade keeps
//! every volume.
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
/// stops start-up (never guess). Listed and read through `files`.
pub fn load(files: &dyn Files, state_dir: &Path) -> Result<Vec<VolumeRecord>, StateError> {
    let dir = dir(state_dir);
    let entries = match files.read_dir(&dir).map_err(crate::os::OsError::into_io) {
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
        let bytes = files.read_regular(&path, None).map_err(|e| {
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
    let entries = match files.read_dir(&dir).map_err(crate::os::OsError::into_io) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The old layout is listed and read through the OS layer: a listing
    /// or a read that fails stops the load (never an empty state), and a
    /// listing that fails removes nothing.
    #[test]
    fn the_old_layout_is_read_through_the_os_layer() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir(d.path())).unwrap();
        let file = dir(d.path()).join("local-ab.json");
        std::fs::write(&file, b"{not json").unwrap();
        let (os, fake) = crate::os::Os::fake();
        let files = os.files.as_ref();
        let e = load(files, d.path()).unwrap_err();
        assert!(matches!(e, StateError::Corrupt { .. }), "{e:?}");
        for op in ["read_dir", "read"] {
            fake.fail_next(op, libc::EIO);
            let e = load(files, d.path()).unwrap_err();
            assert!(
                matches!(&e, StateError::Io { source, .. } if source.raw_os_error() == Some(libc::EIO)),
                "{op}: {e:?}"
            );
        }
        fake.fail_next("read_dir", libc::EIO);
        assert!(remove(d.path(), files).is_err());
        assert!(file.exists());
        remove(d.path(), files).unwrap();
        assert!(!dir(d.path()).exists());
    }
}
