//! One writer per directory: an exclusive `flock` on `<dir>/.berth.lock`,
//! held for the life of the process. A second berth on the same state
//! directory (or data root) refuses to start and names the holder, which
//! the holder writes into the lock file once it has the lock.
//!
//! The directory itself is locked too (flock on a descriptor of the
//! directory): a lock file removed by hand while berth runs (`rm -f
//! state/.berth.lock`) would otherwise let a second berth lock a new file of
//! the same name and write the same journal. A berth of an older version
//! locks only the file, which is still taken, so the two exclude each
//! other as well.
//!
//! flock locks belong to the open file: a child process started with the
//! descriptor would keep the lock after berth exits, so it is opened
//! close-on-exec (as every file Berth opens). The kernel drops the lock
//! when berth exits, however it exits (kill -9 included).
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

use super::StateError;
use crate::os::files::{Files, Open};

pub const LOCK_FILE: &str = ".berth.lock";

/// A held lock; dropped (closed) at exit.
pub struct DirLock {
    /// None on a filesystem that does not lock directories (the file's
    /// lock then stands alone).
    _dir: Option<Flock<File>>,
    _file: Flock<File>,
    pub path: PathBuf,
}

impl std::fmt::Debug for DirLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirLock").field("path", &self.path).finish()
    }
}

/// Who holds a lock, as its holder wrote it (never blocking on what is
/// there: a FIFO in the lock file's place is no holder's note).
fn holder(files: &dyn Files, path: &Path) -> String {
    let text = files
        .read_regular(path, Some(4096))
        .map(|b| String::from_utf8_lossy(&b).into_owned());
    match text {
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

/// How long a lock found taken is tried again before it is taken for a
/// holder's: `holder_of` (`berth state check`, and a starting berth looking
/// at the directories around its own) tests a lock by taking it shared
/// for a moment, and a berth starting at that moment refused to start,
/// naming whoever last wrote the lock file (a process long gone). A real
/// holder keeps it for its whole life.
const TAKEN_FOR: Duration = Duration::from_millis(500);
const TAKEN_PAUSE: Duration = Duration::from_millis(5);

/// An exclusive lock on `f` (named `path`), tried again for `TAKEN_FOR`
/// while it is taken.
fn lock_exclusive(
    files: &dyn Files,
    f: File,
    path: &Path,
) -> Result<Flock<File>, (File, nix::errno::Errno)> {
    let until = Instant::now() + TAKEN_FOR;
    let mut f = f;
    loop {
        match files.flock(f, path, FlockArg::LockExclusiveNonblock) {
            Err((back, nix::errno::Errno::EWOULDBLOCK)) if Instant::now() < until => {
                f = back;
                std::thread::sleep(TAKEN_PAUSE);
            }
            r => return r,
        }
    }
}

impl DirLock {
    /// Takes the lock of `dir` (which must exist), or fails naming the
    /// directory and the holder. `what` says what the directory is.
    pub fn acquire(files: &Arc<dyn Files>, dir: &Path, what: &str) -> Result<DirLock, StateError> {
        let path = dir.join(LOCK_FILE);
        let locked = |holder| StateError::Locked {
            dir: dir.to_path_buf(),
            what: what.to_string(),
            holder,
        };
        let d = files
            .open_dir(dir)
            .map_err(|e| StateError::io("open", dir, e))?;
        let dir_lock = match lock_exclusive(files.as_ref(), d, dir) {
            Ok(l) => Some(l),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(locked(holder(files.as_ref(), &path)))
            }
            Err((_, e)) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot lock the directory itself; its lock file alone keeps a second berth out (do not remove it while berth runs)");
                None
            }
        };
        let file = files
            .open(&path, Open::CreateOrKeep)
            .map_err(StateError::Os)?;
        let locked = match lock_exclusive(files.as_ref(), file, &path) {
            Ok(l) => l,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(locked(holder(files.as_ref(), &path)))
            }
            Err((_, e)) => return Err(StateError::io("flock", &path, e.into())),
        };
        let me = about_me();
        files
            .set_len(&locked, &path, 0)
            .and_then(|_| files.write_at(&locked, &path, format!("{me}\n").as_bytes(), 0))
            .map_err(StateError::Os)?;
        Ok(DirLock {
            _dir: dir_lock,
            _file: locked,
            path,
        })
    }

    /// Who holds the lock of `dir` now, if anyone (for read-only tools,
    /// which take no lock). Never creates the lock file.
    pub fn holder_of(files: &dyn Files, dir: &Path) -> Option<String> {
        let path = dir.join(LOCK_FILE);
        let dir_held = files.open_dir(dir).is_ok_and(|d| {
            matches!(
                files.flock(d, dir, FlockArg::LockSharedNonblock),
                Err((_, nix::errno::Errno::EWOULDBLOCK))
            )
        });
        let file_held = files
            .open_regular(&path)
            .is_ok_and(|f| files.flock(f, &path, FlockArg::LockSharedNonblock).is_err());
        (dir_held || file_held).then(|| holder(files, &path))
    }

    /// The first directory at or below `dir`, at most `depth` levels down
    /// and at most `budget` entries looked at (every entry read counts, a
    /// file as a directory: a trash holding a huge tree costs start-up no
    /// more than this), whose lock another process holds now (a berth
    /// serving there), with its holder. Symlinks are not followed; what
    /// cannot be read is passed over. For start-up, before Berth removes
    /// what its own work directories hold.
    pub fn held_below(
        files: &dyn Files,
        dir: &Path,
        depth: u32,
        budget: &mut usize,
    ) -> Option<(PathBuf, String)> {
        if *budget == 0 {
            return None;
        }
        *budget -= 1;
        let is_dir = files.lstat(dir).is_ok_and(|m| m.is_dir());
        if !is_dir {
            return None;
        }
        if files.lstat(&dir.join(LOCK_FILE)).is_ok() {
            if let Some(h) = DirLock::holder_of(files, dir) {
                return Some((dir.to_path_buf(), h));
            }
        }
        if depth == 0 {
            return None;
        }
        for e in files.read_dir(dir).ok()?.flatten() {
            if *budget == 0 {
                break;
            }
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                *budget -= 1;
                continue;
            }
            if let Some(found) = DirLock::held_below(files, &e.path(), depth - 1, budget) {
                return Some(found);
            }
            if *budget == 0 {
                break;
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::os::files::RealFiles;

    /// Every entry read counts against the budget, files as directories:
    /// a work directory holding a huge tree costs start-up no more than
    /// the budget; a held lock within it is found.
    #[test]
    fn held_below_counts_every_entry_against_its_budget() {
        let d = tempfile::tempdir().unwrap();
        let files: Arc<dyn Files> = Arc::new(RealFiles);
        let w = d.path().join("work");
        std::fs::create_dir(&w).unwrap();
        for i in 0..300 {
            std::fs::write(w.join(format!("f{i}")), b"").unwrap();
        }
        let mut budget = 1000;
        assert_eq!(
            DirLock::held_below(files.as_ref(), &w, 4, &mut budget),
            None
        );
        assert_eq!(budget, 1000 - 301);
        let mut budget = 50;
        assert_eq!(
            DirLock::held_below(files.as_ref(), &w, 4, &mut budget),
            None
        );
        assert_eq!(budget, 0);
        let state = w.join("b/state");
        std::fs::create_dir_all(&state).unwrap();
        let _held = DirLock::acquire(&files, &state, "state directory").unwrap();
        let mut budget = 1000;
        let found = DirLock::held_below(files.as_ref(), &w, 4, &mut budget).map(|(p, _)| p);
        assert_eq!(found, Some(state));
    }

    #[test]
    fn a_second_holder_is_refused_and_told_who_holds_it() {
        let d = tempfile::tempdir().unwrap();
        let files: Arc<dyn Files> = Arc::new(RealFiles);
        let first = DirLock::acquire(&files, d.path(), "state directory").unwrap();
        assert_eq!(
            DirLock::holder_of(files.as_ref(), d.path())
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
        assert_eq!(DirLock::holder_of(files.as_ref(), d.path()), None);
        let again = DirLock::acquire(&files, d.path(), "state directory");
        assert!(again.is_ok());
    }

    /// A FIFO in the lock file's place: taking the lock fails at once,
    /// saying what is there, and asking who holds it never waits either
    /// (opening a FIFO waits for its other end).
    #[test]
    fn a_fifo_for_a_lock_file_fails_at_once() {
        let d = tempfile::tempdir().unwrap();
        nix::unistd::mkfifo(&d.path().join(LOCK_FILE), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let dir = d.path().to_path_buf();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let files: Arc<dyn Files> = Arc::new(RealFiles);
            let held = DirLock::holder_of(files.as_ref(), &dir);
            let taken = DirLock::acquire(&files, &dir, "state directory").map(|_| ());
            let _ = tx.send((held, taken.map_err(|e| crate::error::chain(&e))));
        });
        let (held, taken) = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("blocked on a FIFO lock file");
        assert_eq!(held, None);
        let e = taken.unwrap_err();
        assert!(e.contains("FIFO") && e.contains(LOCK_FILE), "{e}");
    }

    /// `holder_of` (what `berth state check` asks before it reads a live
    /// journal, and a starting berth of the directories around its own)
    /// tests the lock by taking it shared for a moment: a berth starting
    /// at that moment must still get its lock, not refuse to start naming
    /// the holder written by a process long gone.
    #[test]
    fn a_lock_looked_at_by_a_reader_is_still_taken() {
        let d = tempfile::tempdir().unwrap();
        let files: Arc<dyn Files> = Arc::new(RealFiles);
        // The lock file as a killed berth leaves it: its note, no holder.
        std::fs::write(d.path().join(LOCK_FILE), "berth 0.0.1 pid 1 on host gone\n").unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let looker = {
            let (dir, stop) = (d.path().to_path_buf(), stop.clone());
            std::thread::spawn(move || {
                let mut looks = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = DirLock::holder_of(&RealFiles, &dir);
                    looks += 1;
                }
                looks
            })
        };
        let mut refused = Vec::new();
        for _ in 0..300 {
            match DirLock::acquire(&files, d.path(), "state directory") {
                Ok(l) => drop(l),
                Err(e) => refused.push(e.to_string()),
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let looks = looker.join().unwrap();
        assert!(looks > 0);
        assert!(
            refused.is_empty(),
            "{} of 300 takings refused while a reader looked ({looks} looks), e.g. {}",
            refused.len(),
            refused[0]
        );
    }

    /// The lock file's note read through the OS layer: one that cannot be
    /// read (EIO) names no holder, and the second taking is refused all
    /// the same.
    #[test]
    fn a_lock_file_that_cannot_be_read_names_no_holder() {
        let d = tempfile::tempdir().unwrap();
        let (os, fake) = crate::os::Os::fake();
        let first = DirLock::acquire(&os.files, d.path(), "state directory").unwrap();
        fake.fail_next("read", libc::EIO);
        let e = DirLock::acquire(&os.files, d.path(), "state directory").unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, StateError::Locked { .. }), "{msg}");
        assert!(
            msg.contains("a process that has not said who it is"),
            "{msg}"
        );
        assert!(
            !msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        fake.fail_next("read", libc::EIO);
        assert_eq!(
            DirLock::holder_of(os.files.as_ref(), d.path()).as_deref(),
            Some("a process that has not said who it is")
        );
        drop(first);
    }

    /// The directory's descriptor and both locks taken through the OS
    /// layer: a directory that cannot be opened fails the taking, naming
    /// it; a directory that cannot be locked (not EWOULDBLOCK) leaves the
    /// file's lock alone to keep a second berth out; a lock file that
    /// cannot be locked fails the taking.
    #[test]
    fn the_locks_are_taken_through_the_os_layer() {
        let d = tempfile::tempdir().unwrap();
        let (os, fake) = crate::os::Os::fake();
        fake.fail_next("open_dir", libc::EACCES);
        let e = DirLock::acquire(&os.files, d.path(), "state directory").unwrap_err();
        let msg = crate::error::chain(&e);
        assert!(msg.contains(&d.path().display().to_string()), "{msg}");
        fake.fail_next("flock", libc::ENOLCK);
        let file_only = DirLock::acquire(&os.files, d.path(), "state directory").unwrap();
        assert!(file_only._dir.is_none());
        let e = DirLock::acquire(&os.files, d.path(), "state directory").unwrap_err();
        assert!(matches!(e, StateError::Locked { .. }), "{e}");
        drop(file_only);
        fake.fail_next("flock", libc::ENOLCK);
        fake.fail_next("flock", libc::ENOLCK);
        let e = DirLock::acquire(&os.files, d.path(), "state directory").unwrap_err();
        let msg = crate::error::chain(&e);
        assert!(msg.contains("flock") && msg.contains(LOCK_FILE), "{msg}");
        // Held by another: taken again until it is let go (here at once).
        fake.fail_next("flock", libc::EWOULDBLOCK);
        assert!(DirLock::acquire(&os.files, d.path(), "state directory").is_ok());
    }

    /// `held_below` looks through the OS layer: a held lock below a
    /// directory that cannot be listed, or looked at, is not found (what
    /// cannot be read is passed over).
    #[test]
    fn held_below_passes_over_what_cannot_be_read() {
        let d = tempfile::tempdir().unwrap();
        let (os, fake) = crate::os::Os::fake();
        let state = d.path().join("b/state");
        std::fs::create_dir_all(&state).unwrap();
        let _held = DirLock::acquire(&os.files, &state, "state directory").unwrap();
        let found = |budget: &mut usize| {
            DirLock::held_below(os.files.as_ref(), d.path(), 4, budget).map(|(p, _)| p)
        };
        assert_eq!(found(&mut 100), Some(state.clone()));
        fake.fail_op_under("read_dir", &d.path().join("b"), libc::EIO);
        assert_eq!(found(&mut 100), None);
        fake.clear_file_faults();
        fake.fail_next("lstat", libc::EIO);
        assert_eq!(found(&mut 100), None);
        assert_eq!(found(&mut 100), Some(state));
    }

    #[test]
    fn a_lock_file_removed_by_hand_lets_no_second_holder_in() {
        let d = tempfile::tempdir().unwrap();
        let files: Arc<dyn Files> = Arc::new(RealFiles);
        let first = DirLock::acquire(&files, d.path(), "state directory").unwrap();
        std::fs::remove_file(d.path().join(LOCK_FILE)).unwrap();
        assert!(DirLock::holder_of(files.as_ref(), d.path()).is_some());
        let e = DirLock::acquire(&files, d.path(), "state directory").unwrap_err();
        assert!(matches!(e, StateError::Locked { .. }), "{e}");
        drop(first);
        assert_eq!(DirLock::holder_of(files.as_ref(), d.path()), None);
        assert!(DirLock::acquire(&files, d.path(), "state directory").is_ok());
    }
}
