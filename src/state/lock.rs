//! One writer per directory: an exclusive `flock` on `<dir>/.berth.lock`,
//! held for the life of the process. A second berth on the same state
//! directory (or data root) refuses to start and names the holder, which
//! the holder writes into the lock file once it has the lock.
//!
//! flock locks belong to the open file: a child process started with the
//! descriptor would keep the lock after berth exits, so it is opened
//! close-on-exec (as every file Berth opens). The kernel drops the lock
//! when berth exits, however it exits (kill -9 included).
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::fcntl::{Flock, FlockArg};

use super::StateError;
use crate::os::files::{Files, Open};

pub const LOCK_FILE: &str = ".berth.lock";

/// A held lock; dropped (closed) at exit.
pub struct DirLock {
    _file: Flock<File>,
    pub path: PathBuf,
}

impl std::fmt::Debug for DirLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirLock").field("path", &self.path).finish()
    }
}

/// Who holds a lock, as its holder wrote it.
fn holder(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => s.trim().chars().take(300).collect(),
        _ => "a process that has not said who it is".into(),
    }
}

/// What a holder writes about itself.
fn about_me() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    format!(
        "berth {} pid {} on host {host}, started at unix time {}",
        env!("CARGO_PKG_VERSION"),
        std::process::id(),
        crate::driver::now_unix()
    )
}

impl DirLock {
    /// Takes the lock of `dir` (which must exist), or fails naming the
    /// directory and the holder. `what` says what the directory is.
    pub fn acquire(files: &Arc<dyn Files>, dir: &Path, what: &str) -> Result<DirLock, StateError> {
        let path = dir.join(LOCK_FILE);
        let file = files
            .open(&path, Open::CreateOrKeep)
            .map_err(StateError::Os)?;
        let locked = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(StateError::Locked {
                    dir: dir.to_path_buf(),
                    what: what.to_string(),
                    holder: holder(&path),
                })
            }
            Err((_, e)) => return Err(StateError::io("flock", &path, e.into())),
        };
        let me = about_me();
        files
            .set_len(&locked, &path, 0)
            .and_then(|_| files.write_at(&locked, &path, format!("{me}\n").as_bytes(), 0))
            .map_err(StateError::Os)?;
        Ok(DirLock {
            _file: locked,
            path,
        })
    }

    /// Who holds the lock of `dir` now, if anyone (for read-only tools,
    /// which take no lock). Never creates the lock file.
    pub fn holder_of(dir: &Path) -> Option<String> {
        let path = dir.join(LOCK_FILE);
        let file = File::open(&path).ok()?;
        match Flock::lock(file, FlockArg::LockSharedNonblock) {
            Ok(_) => None,
            Err(_) => Some(holder(&path)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::os::files::RealFiles;

    #[test]
    fn a_second_holder_is_refused_and_told_who_holds_it() {
        let d = tempfile::tempdir().unwrap();
        let files: Arc<dyn Files> = Arc::new(RealFiles);
        let first = DirLock::acquire(&files, d.path(), "state directory").unwrap();
        assert_eq!(
            DirLock::holder_of(d.path())
                .as_deref()
                .map(|h| h.contains(&format!("pid {}", std::process::id()))),
            Some(true)
        );
        let e = DirLock::acquire(&files, d.path(), "state directory").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(&d.path().display().to_string()), "{msg}");
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        drop(first);
        assert_eq!(DirLock::holder_of(d.path()), None);
        let again = DirLock::acquire(&files, d.path(), "state directory");
        assert!(again.is_ok());
    }
}
