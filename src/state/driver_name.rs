//! The CSI driver name the state is served under, recorded in
//! `<state-dir>/driver-name`.
//!
//! Kubernetes names a volume's driver in its PersistentVolume
//! (`spec.csi.driver`) and a snapshot's in its VolumeSnapshotContent, and
//! never changes either. A berth started on the same state under another
//! `--driver-name` (a Helm value or a manifest changed at an upgrade)
//! registers a driver those objects do not name: kubelet finds no driver
//! to unmount their volumes with, the provisioner of their name never
//! deletes them, and new volumes are made under the new name beside them.
//! So start-up refuses a state that holds records under another name
//! (`check`); a state without records takes the new name.
use std::path::{Path, PathBuf};

use super::StateError;
use crate::os::files::{Files, Open};

/// The file's name in the state directory.
pub const FILE: &str = "driver-name";

/// Where the name is recorded.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// The recorded name (None when none is: a state from before names were
/// recorded, or a new one). A file berth did not write (not a regular
/// file, not a driver name) is an error: never guessed.
pub fn read(state_dir: &Path) -> Result<Option<String>, StateError> {
    let p = path(state_dir);
    // A name is at most 63 bytes; a huge file is not berth's.
    let bytes = match crate::os::files::read_regular(&p, Some(256)) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(match crate::os::files::not_regular(&e) {
                Some(n) => StateError::Unexpected {
                    path: p,
                    why: n.to_string(),
                },
                None => StateError::io("read", &p, e),
            })
        }
    };
    let name = std::str::from_utf8(&bytes)
        .ok()
        .and_then(|s| s.strip_suffix('\n'))
        .filter(|s| crate::validate::driver_name(s).is_ok());
    match name {
        Some(n) => Ok(Some(n.to_string())),
        None => Err(StateError::Unexpected {
            path: p,
            why: format!(
                "not a driver name as berth records it (one line): {:?}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(80)])
            ),
        }),
    }
}

/// Records `name` (temp file, fsync, rename, the directory synced).
fn write(files: &dyn Files, state_dir: &Path, name: &str) -> Result<(), StateError> {
    let p = path(state_dir);
    let tmp = state_dir.join(format!(".{FILE}.tmp"));
    let f = files
        .open(&tmp, Open::CreateOrTruncate)
        .map_err(StateError::Os)?;
    let line = format!("{name}\n");
    files
        .write_at(&f, &tmp, line.as_bytes(), 0)
        .and_then(|_| files.set_len(&f, &tmp, line.len() as u64))
        .and_then(|_| files.sync(&f, &tmp))
        .and_then(|_| files.rename(&tmp, &p))
        .and_then(|_| files.sync_dir(state_dir))
        .map_err(StateError::Os)
}

/// Start-up's check (the state directory's lock held): `records` is how
/// many volume and snapshot records the state holds. The first start
/// records `name`; a start under another name is refused while the state
/// holds records, and takes the new name when it holds none.
pub fn check(
    files: &dyn Files,
    state_dir: &Path,
    name: &str,
    records: usize,
) -> Result<(), StateError> {
    match read(state_dir)? {
        Some(recorded) if recorded == name => Ok(()),
        Some(recorded) if records > 0 => Err(StateError::DriverName {
            dir: state_dir.to_path_buf(),
            recorded,
            name: name.to_string(),
            records,
        }),
        Some(recorded) => {
            tracing::warn!(
                from = %recorded,
                to = %name,
                "the state directory was served as another CSI driver; it holds no volume or snapshot, so it is served under the new name"
            );
            write(files, state_dir, name)
        }
        None if records > 0 => {
            // A berth from before names were recorded (an upgrade), or a
            // file removed since: taken, as an upgrade needs, but said,
            // as the name is then the one this start was given.
            tracing::warn!(
                file = %path(state_dir).display(),
                name = %name,
                records,
                "{}",
                unrecorded(state_dir, name, records)
            );
            write(files, state_dir, name)
        }
        None => write(files, state_dir, name),
    }
}

/// What start-up logs, and `berth state check` reports, of a state that
/// holds records and no recorded name.
fn unrecorded(state_dir: &Path, name: &str, records: usize) -> String {
    format!(
        "{} is missing while the state holds {records} volume and snapshot records (a berth from before names were recorded, or the file was removed): the name they are served under is taken from --driver-name {name}; if their PVs name another driver, stop berth and run it with that --driver-name",
        path(state_dir).display()
    )
}

/// What `berth state check` says of the recorded name, given the one it
/// was run with and how many records the state holds: an error when the
/// file is not one berth wrote (start-up stops on it), a warning when the
/// name differs (start-up under the name check was given is refused; an
/// operator who ran check without the driver's `--driver-name` learns the
/// state's name, and the state itself is sound), and a warning when the
/// state holds records and no name (the next start takes the name it is
/// given, unchecked: an upgrade from a berth that kept none, or a file
/// removed since); None otherwise (a state without records takes the name
/// at its next start).
pub fn finding(state_dir: &Path, name: &str, records: usize) -> Option<(bool, String)> {
    match read(state_dir) {
        Err(e) => Some((
            true,
            format!(
                "{}: {}; berth does not start until it holds the driver name the state is served under",
                path(state_dir).display(),
                crate::error::chain(&e)
            ),
        )),
        Ok(Some(recorded)) if recorded != name && records > 0 => Some((
            false,
            format!(
                "the state's {records} volume and snapshot records are served as CSI driver {recorded} ({}), and this check was given --driver-name {name}: a berth started with that name refuses to start on this state (their PVs name {recorded})",
                path(state_dir).display()
            ),
        )),
        Ok(None) if records > 0 => Some((false, unrecorded(state_dir, name, records))),
        Ok(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logging::Sink;
    use crate::os::files::RealFiles;

    /// The first start records the name; the same name starts; another
    /// is refused while records exist and taken when none do; a file
    /// berth did not write (not one name, a FIFO: never opened) stops
    /// start-up instead of being taken for a name or overwritten.
    #[test]
    fn the_name_is_recorded_kept_and_never_guessed() {
        let d = tempfile::tempdir().unwrap();
        let p = path(d.path());
        check(&RealFiles, d.path(), "a.example.org", 0).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"a.example.org\n");
        check(&RealFiles, d.path(), "a.example.org", 3).unwrap();
        let e = check(&RealFiles, d.path(), "b.example.org", 3).unwrap_err();
        assert!(
            matches!(e, StateError::DriverName { ref recorded, records: 3, .. } if recorded == "a.example.org"),
            "{e}"
        );
        assert_eq!(std::fs::read(&p).unwrap(), b"a.example.org\n");
        assert!(finding(d.path(), "b.example.org", 3).is_some_and(|(err, _)| !err));
        assert!(finding(d.path(), "a.example.org", 3).is_none());
        check(&RealFiles, d.path(), "b.example.org", 0).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"b.example.org\n");
        for bad in [
            &b"b.example.org"[..],
            b"b.example.org\nc.example.org\n",
            b"B!\n",
            b"\xff\n",
        ] {
            std::fs::write(&p, bad).unwrap();
            let e = check(&RealFiles, d.path(), "b.example.org", 0).unwrap_err();
            assert!(matches!(e, StateError::Unexpected { .. }), "{e}");
            assert_eq!(std::fs::read(&p).unwrap(), bad);
            assert!(finding(d.path(), "b.example.org", 0).is_some_and(|(err, _)| err));
        }
        std::fs::remove_file(&p).unwrap();
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = check(&RealFiles, d.path(), "b.example.org", 0).unwrap_err();
        assert!(matches!(e, StateError::Unexpected { .. }), "{e}");
    }

    /// A state that holds records and no `driver-name` (removed, or kept
    /// by a berth from before names were recorded) still takes the name a
    /// start is given (upgrades need it), but start-up logs a warning
    /// naming the file and the name taken, and `berth state check`
    /// reports it; before, both said nothing. Without records, nothing is
    /// said (a new state).
    #[test]
    fn a_missing_name_beside_records_is_taken_and_said() {
        let d = tempfile::tempdir().unwrap();
        let p = path(d.path());
        let file = p.display().to_string();
        let said = |f: &dyn Fn()| {
            let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
            let w = out.clone();
            let sub = tracing_subscriber::fmt()
                .with_writer(move || Sink(w.clone()))
                .with_ansi(false)
                .finish();
            tracing::subscriber::with_default(sub, f);
            let got = out.lock().unwrap().clone();
            String::from_utf8(got).unwrap()
        };
        let f = finding(d.path(), "a.example.org", 2).expect("reported");
        assert!(
            !f.0 && f.1.contains(&file) && f.1.contains("a.example.org"),
            "{f:?}"
        );
        let log = said(&|| check(&RealFiles, d.path(), "a.example.org", 2).unwrap());
        assert!(
            log.contains("WARN") && log.contains(&file) && log.contains("a.example.org"),
            "{log}"
        );
        assert_eq!(std::fs::read(&p).unwrap(), b"a.example.org\n");
        assert!(finding(d.path(), "a.example.org", 2).is_none());
        // a new state: taken without a word
        std::fs::remove_file(&p).unwrap();
        assert!(finding(d.path(), "a.example.org", 0).is_none());
        let log = said(&|| check(&RealFiles, d.path(), "a.example.org", 0).unwrap());
        assert!(log.is_empty(), "{log}");
        assert_eq!(std::fs::read(&p).unwrap(), b"a.example.org\n");
    }
}
