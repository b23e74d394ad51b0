//! Probe: ready only when the state directory is writable, the state journal
//! accepts changes and every served kind's pool is present;
//! FAILED_PRECONDITION otherwise (the livenessprobe sidecar then has the
//! container restarted, which replays the journal). Start-up work that
//! runs after the socket is up (interrupted NFS creates and deletes and
//! snapshots, `Driver::start`) does not make the answer `ready: false`:
//! it holds the guards of its own volumes (calls on those answer
//! `ABORTED` meanwhile) and every other call is served. The livenessprobe
//! sidecar fails its check on `ready: false`, and kubelet would restart
//! the container after a minute of that; a reconcile that waits on a dead
//! NFS server (each operation up to `--nfs-timeout`) would then start
//! again at every restart, and the container would crash-loop, with no
//! NFS volume provisioned or deleted on any share meanwhile.
//!
//! The writability check writes and removes a file of its own
//! (`.probe-<n>.tmp`, n counting the checks of this process): checks that
//! overlap (the livenessprobe sidecar's Probe and kubelet's /healthz, or
//! many Probes at once) never remove each other's file. A check killed
//! half way leaves its file behind; start-up removes such leftovers
//! (`remove_leftovers`).
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::csi::v1 as csi;
use crate::driver::Driver;
use crate::error::{Error, Result};

pub async fn handle(d: Arc<Driver>) -> Result<csi::ProbeResponse> {
    tokio::task::spawn_blocking(move || check(&d))
        .await
        .map_err(|e| Error::Internal(format!("probe task failed: {e}")))??;
    Ok(csi::ProbeResponse { ready: Some(true) })
}

/// Counts the writability checks of this process: each writes its own file.
static CHECKS: AtomicU64 = AtomicU64::new(0);

/// Whether `name` is a file a writability check writes: `.probe-<n>.tmp`,
/// or `.probe.tmp` (the one name every check shared in earlier versions).
pub fn is_probe_file(name: &str) -> bool {
    name == ".probe.tmp"
        || name
            .strip_prefix(".probe-")
            .and_then(|n| n.strip_suffix(".tmp"))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

pub fn check(d: &Driver) -> Result<()> {
    let dir = d.cfg.state_dir();
    let probe = dir.join(format!(
        ".probe-{}.tmp",
        CHECKS.fetch_add(1, Ordering::Relaxed)
    ));
    let f = d.os.files.as_ref();
    f.open(&probe, crate::os::files::Open::CreateOrTruncate)
        .and_then(|file| f.write_at(&file, &probe, b"ok", 0))
        .and_then(|_| f.remove_file(&probe))
        .map_err(|e| {
            Error::WrongState(format!(
                "state directory {} is not writable: {}",
                dir.display(),
                crate::error::chain(&e)
            ))
        })?;
    if let Some(why) = d.store.poisoned() {
        return Err(Error::WrongState(format!(
            "the state journal stopped accepting changes ({why}); restart berth"
        )));
    }
    for k in d.kinds() {
        k.pool_capacity().map_err(|e| {
            Error::WrongState(format!("{} pool is not ready: {}", k.kind(), e.render()))
        })?;
    }
    Ok(())
}

/// Removes what writability checks of an earlier run left in the state
/// directory `dir` (killed between writing and removing their file): not
/// state, never damage. Only regular files are removed; anything else of
/// such a name was not made by berth and is left alone, with a warning. A
/// failure is logged: the next check reports a state directory that
/// cannot be written to.
pub fn remove_leftovers(files: &dyn crate::os::Files, dir: &Path) {
    let Ok(entries) = files.read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        if !name.to_str().is_some_and(is_probe_file) {
            continue;
        }
        let path = e.path();
        match e.file_type() {
            Ok(t) if t.is_file() => {
                if let Err(err) = files.remove_file(&path) {
                    tracing::warn!(path = %path.display(), error = %crate::error::chain(&err), "could not remove a writability check's leftover file");
                }
            }
            _ => {
                tracing::warn!(path = %path.display(), "not a regular file, so not a writability check's leftover (put there by hand?); left alone")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_file_names() {
        for yes in [
            ".probe.tmp",
            ".probe-0.tmp",
            ".probe-18446744073709551615.tmp",
        ] {
            assert!(is_probe_file(yes), "{yes}");
        }
        for no in [
            ".probe-.tmp",
            ".probe-1x.tmp",
            "probe-1.tmp",
            ".probe-1.tmp.x",
            ".berth.lock",
        ] {
            assert!(!is_probe_file(no), "{no}");
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// Leftover check files go through the OS layer: a directory that
    /// cannot be read removes nothing and fails nothing; a leftover that
    /// cannot be removed leaves the others to be removed; anything but a
    /// regular file of such a name, and every other name, stays.
    #[test]
    fn leftovers_are_removed_through_the_os_layer() {
        let d = tempfile::tempdir().unwrap();
        for f in [".probe-1.tmp", ".probe-2.tmp", ".probe.tmp", "keep"] {
            std::fs::write(d.path().join(f), b"ok").unwrap();
        }
        std::fs::create_dir(d.path().join(".probe-3.tmp")).unwrap();
        let (os, fake) = crate::os::Os::fake();
        fake.fail_next("read_dir", libc::EIO);
        remove_leftovers(os.files.as_ref(), d.path());
        assert_eq!(
            names(d.path()),
            [
                ".probe-1.tmp",
                ".probe-2.tmp",
                ".probe-3.tmp",
                ".probe.tmp",
                "keep"
            ]
        );
        assert!(fake.file_ops().is_empty(), "{:?}", fake.file_ops());
        fake.fail_op_under("unlink", &d.path().join(".probe-1.tmp"), libc::EROFS);
        remove_leftovers(os.files.as_ref(), d.path());
        assert_eq!(names(d.path()), [".probe-1.tmp", ".probe-3.tmp", "keep"]);
        fake.clear_file_faults();
        remove_leftovers(os.files.as_ref(), d.path());
        assert_eq!(names(d.path()), [".probe-3.tmp", "keep"]);
    }
}
