//! Where each volume is staged: the staging path of the volume's last
//! NodeStageVolume that mounted (recorded just before its mount), forgotten
//! by NodeUnstageVolume there and by DeleteVolume.
//!
//! It tells the volume's own staging path from a second one when the
//! staging mount is gone and the pods' mounts are not: an operator's
//! `umount` (or `umount -l`, or `rmdir` after it) of the staging path
//! while a pod still uses the volume. kubelet stages again at the same
//! path (after its restart) and retries forever, and Berth refused that
//! for as long as the pod lived, as it refuses a second staging path of a
//! mounted volume (two staging paths could never be unstaged, each
//! counting the other as a publication). The kernel cannot tell the two
//! apart (a bind shows the same directory or device either way); this
//! record can: a stage at the path it names is the same staging path again.
//! It also names the mounts of a volume whose storage was moved away by
//! hand (`VolumeDir::moved`, DeleteVolume's wait).
//!
//! Kept in memory and in `<state-dir>/staged.log`, one JSON line per
//! change appended with one write(2) (`{"id":..,"at":..}` records a path,
//! with `"ro":true|false` for a raw disk stage, read-only or not;
//! `{"id":..}` forgets it), read back at start-up and rewritten whole (a
//! new file renamed over it) when it has grown to several times what it
//! records. An append makes no inode: the symlink per volume this replaced
//! (`<state-dir>/staged/<id>`, read once at start-up and removed) cost
//! NodeStage about 170 µs at p50, a write costs a few.
//!
//! Not synced: it outlives any process, and the power loss that could take
//! it takes the mounts too. A failure to write it never fails a stage (the
//! stage then only loses this recovery, logged; the log is removed, so
//! that a restart never reads back a path the volume has left), and a line
//! that cannot be read back is skipped with a warning (a cut last line
//! after a power loss). The staging path is compared as the request
//! resolves it (`Protected::resolve`), as it is stored. Volume ids are checked (a safe
//! path component) before they get here. A line naming a path that no node
//! RPC accepts as a staging path (`Protected::check`: `/`, a system or
//! shared directory, Berth's own directories, a relative path) was not
//! written by Berth, and is skipped as damage: DeleteVolume took `/`
//! (always mounted) for the volume's staging path still mounted, and
//! refused the volume forever.
use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::node::paths::Protected;
use crate::os::files::{Files, Open};
use crate::os::OsError;

/// The log's file name in the state directory.
pub const LOG: &str = "staged.log";
/// The directory of one symlink per volume that earlier versions kept.
const LEGACY_DIR: &str = "staged";
/// A log larger than this is not read (it is not one Berth wrote).
const MAX_LOG: u64 = 64 << 20;
/// Lines beyond twice the live records before the log is rewritten.
const SLACK_LINES: usize = 1024;

#[derive(Serialize, Deserialize)]
struct Line<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    at: Option<Cow<'a, str>>,
    /// With `at`: whether a raw disk stage there is read-only (see
    /// `StagedAt::read_only`); absent for every other stage, and in lines
    /// of versions before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ro: Option<bool>,
}

struct Inner {
    at: HashMap<String, PathBuf>,
    /// Whether the raw disk stage at `at` is read-only, where recorded.
    ro: HashMap<String, bool>,
    /// The log open for writing and its length; None after a failed write
    /// (the next change rewrites it whole).
    log: Option<(File, u64)>,
    /// Lines in the log.
    lines: usize,
}

pub struct StagedAt {
    state_dir: PathBuf,
    files: Arc<dyn Files>,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for StagedAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagedAt")
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

impl StagedAt {
    /// Reads `<state_dir>/staged.log` (and the symlinks earlier versions
    /// kept under `<state_dir>/staged`, which it then removes). Never
    /// fails: what cannot be read is logged and not known, and so is a
    /// path `protected` refuses as a staging path (Berth never recorded
    /// one).
    pub fn open(state_dir: &Path, files: Arc<dyn Files>, protected: &Protected) -> Self {
        let s = StagedAt {
            state_dir: state_dir.to_path_buf(),
            files,
            inner: Mutex::new(Inner {
                at: HashMap::new(),
                ro: HashMap::new(),
                log: None,
                lines: 0,
            }),
        };
        let mut inner = s.lock();
        let Inner { at, ro, .. } = &mut *inner;
        let (lines, clean) = s.read_log(at, ro, protected);
        inner.lines = lines;
        let legacy = s.read_legacy(&mut inner.at, protected);
        if !clean || legacy.as_ref().is_some_and(|l| !l.is_empty()) || s.oversized(&inner) {
            s.rewrite(&mut inner);
        } else {
            s.reopen(&mut inner);
        }
        // Removed once the log holds them (kept to be read again otherwise).
        if let (Some(seen), true) = (&legacy, inner.log.is_some()) {
            s.remove_legacy(seen);
        }
        drop(inner);
        s
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn log_path(&self) -> PathBuf {
        self.state_dir.join(LOG)
    }

    /// Replays the log into `at`: (lines read, whether every line was
    /// whole and named a staging path `protected` accepts).
    fn read_log(
        &self,
        at: &mut HashMap<String, PathBuf>,
        ro: &mut HashMap<String, bool>,
        protected: &Protected,
    ) -> (usize, bool) {
        let path = self.log_path();
        let bytes = match self.files.read_regular(&path, Some(MAX_LOG + 1)) {
            Ok(b) if b.len() as u64 <= MAX_LOG => b,
            Ok(_) => {
                tracing::warn!(path = %path.display(), "the staging-path log is larger than Berth writes one; not read (it is rewritten)");
                return (0, false);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (0, true),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "could not read the staging-path log (it is rewritten)");
                return (0, false);
            }
        };
        let (mut lines, mut bad) = (0, 0);
        let mut pieces = bytes.split(|b| *b == b'\n').peekable();
        while let Some(raw) = pieces.next() {
            if raw.is_empty() && pieces.peek().is_none() {
                break;
            }
            lines += 1;
            match serde_json::from_slice::<Line<'_>>(raw) {
                Ok(Line { at: Some(p), .. }) if !acceptable(protected, &p) => bad += 1,
                Ok(Line {
                    id,
                    at: Some(p),
                    ro: r,
                }) => {
                    match r {
                        Some(r) => ro.insert(id.to_string(), r),
                        None => ro.remove(id.as_ref()),
                    };
                    at.insert(id.into_owned(), PathBuf::from(p.into_owned()));
                }
                Ok(Line { id, at: None, .. }) => {
                    at.remove(id.as_ref());
                    ro.remove(id.as_ref());
                }
                Err(_) => bad += 1,
            }
        }
        let cut = !bytes.is_empty() && !bytes.ends_with(b"\n");
        if bad > 0 {
            tracing::warn!(path = %path.display(), lines = bad, "skipped staging-path log lines that cannot be read or name no staging path (a line cut by a power loss, or damage): those volumes' staging paths are not known (they are known again at their next stage)");
        }
        (lines, bad == 0 && !cut)
    }

    /// Opens the log as it is for appending.
    fn reopen(&self, inner: &mut Inner) {
        let path = self.log_path();
        let opened = self.files.open(&path, Open::CreateOrKeep).and_then(|f| {
            let len = f
                .metadata()
                .map_err(|e| OsError::sys("fstat", &path, e))?
                .len();
            Ok((f, len))
        });
        match opened {
            Ok(log) => inner.log = Some(log),
            Err(e) => {
                tracing::warn!(error = %e, "could not open the staging-path log (rewritten at the next change)");
            }
        }
    }

    /// Takes in the symlinks earlier versions kept (`<state_dir>/staged/<id>`)
    /// for volumes the log does not know, and those made after the log was
    /// last written (an earlier version run after this one, a rollback, and
    /// this one again: that version staged the volume there after this one
    /// recorded another path, which is stale); returns the symlinks seen (None:
    /// no such directory). Only a directory is read, never what a symlink
    /// at `staged` names (its entries are not Berth's, and removing them
    /// once the log holds them would unlink files wherever it points), and
    /// only its symlinks are taken in and removed: anything else there is
    /// not what earlier versions made. A symlink whose text cannot be read
    /// (EIO) is not understood: not taken in, not removed (with the
    /// directory that holds it), warned about and read again at the next
    /// start.
    fn read_legacy(
        &self,
        at: &mut HashMap<String, PathBuf>,
        protected: &Protected,
    ) -> Option<Vec<PathBuf>> {
        let dir = self.state_dir.join(LEGACY_DIR);
        let meta = self.files.lstat(&dir).ok()?;
        if !meta.file_type().is_dir() {
            tracing::warn!(path = %dir.display(), "the old staging-path directory is not a directory (a symlink?); not read and left as it is");
            return None;
        }
        let rd = self.files.read_dir(&dir).ok()?;
        let log_written = self
            .files
            .lstat(&self.log_path())
            .ok()
            .and_then(|m| m.modified().ok());
        let mut seen = Vec::new();
        for e in rd.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_symlink()) {
                tracing::warn!(path = %e.path().display(), "not a symlink in the old staging-path directory; not read and left as it is");
                continue;
            }
            let p = e.path();
            let target = match self.files.read_link(&p) {
                Ok(t) => t,
                Err(err) => {
                    tracing::warn!(path = %p.display(), error = %err, "could not read a symlink in the old staging-path directory; not taken in and left as it is (read again at the next start)");
                    continue;
                }
            };
            if let Some(id) = e.file_name().to_str() {
                let newer = || {
                    let made = e.metadata().and_then(|m| m.modified()).ok();
                    matches!((made, log_written), (Some(m), Some(w)) if m > w)
                };
                let valid = target.to_str().is_some_and(|t| acceptable(protected, t));
                if valid && !id.starts_with('.') && (!at.contains_key(id) || newer()) {
                    at.insert(id.to_string(), target);
                }
            }
            seen.push(p);
        }
        Some(seen)
    }

    /// Removes the legacy entries (once the log holds them) and their
    /// directory.
    fn remove_legacy(&self, seen: &[PathBuf]) {
        for p in seen {
            if let Err(e) = self.files.remove_file(p) {
                tracing::warn!(path = %p.display(), error = %e, "could not remove an old staging-path record");
            }
        }
        match self.files.remove_dir(&self.state_dir.join(LEGACY_DIR)) {
            Err(e) if e.errno() != Some(libc::ENOENT) => {
                tracing::warn!(error = %e, "could not remove the old staging-path directory");
            }
            _ => {}
        }
    }

    fn oversized(&self, inner: &Inner) -> bool {
        inner.lines > 2 * inner.at.len() + SLACK_LINES
    }

    /// Writes what is known to a new log and renames it over the old one.
    /// A failure is logged, and the old log removed (`drop_stale`); the log
    /// is then not written until the next change tries again.
    fn rewrite(&self, inner: &mut Inner) {
        inner.log = None;
        if let Err(e) = self.try_rewrite(inner) {
            tracing::warn!(error = %e, "could not write the staging-path log (a staging mount unmounted by hand while a pod uses the volume then cannot be made again after a restart until the pod goes)");
            self.drop_stale();
        }
    }

    /// Removes the log once a change could not be written to it: it may
    /// then name a path the volume is no longer staged at (a forget or a
    /// move that did not reach it: ENOSPC, EIO), which a restart would read
    /// back and take for the volume's own staging path, letting a second
    /// one through while the volume is staged elsewhere (two staging paths,
    /// neither of which can then be unstaged). A log that is missing only
    /// loses the recovery; what is known stays in memory and is written
    /// whole at the next change.
    fn drop_stale(&self) {
        match self.files.remove_file(&self.log_path()) {
            Err(e) if !matches!(e.errno(), Some(libc::ENOENT) | Some(libc::EISDIR)) => {
                tracing::warn!(error = %e, "could not remove the staging-path log that a change could not be written to: after a restart it may name staging paths that are no longer the volumes'");
            }
            _ => {}
        }
    }

    fn try_rewrite(&self, inner: &mut Inner) -> Result<(), OsError> {
        let tmp = self.state_dir.join(format!(".{LOG}.tmp"));
        // Its name taken by what Berth never makes there (a symlink, a
        // FIFO, an empty directory, put there by hand): taken away, never
        // what a symlink leads to. Left, it failed every rewrite, and each
        // failure removed the log (`drop_stale`).
        match self.files.lstat(&tmp) {
            Ok(m) if m.is_dir() => self.files.remove_dir(&tmp)?,
            Ok(m) if !m.is_file() => self.files.remove_file(&tmp)?,
            _ => {}
        }
        let f = self.files.open(&tmp, Open::CreateOrTruncate)?;
        let mut buf = Vec::new();
        for (id, p) in &inner.at {
            if let Some(line) = line(id, Some(p), inner.ro.get(id).copied()) {
                buf.extend_from_slice(&line);
            }
        }
        let path = self.log_path();
        let moved = self
            .files
            .write_at(&f, &tmp, &buf, 0)
            .and_then(|_| self.files.rename(&tmp, &path));
        if let Err(e) = moved {
            // Not left behind half written (a full disk keeps it so).
            let _ = self.files.remove_file(&tmp);
            return Err(e);
        }
        inner.lines = inner.at.len();
        inner.log = Some((f, buf.len() as u64));
        Ok(())
    }

    /// Appends one change (or rewrites the log when it has grown, or when
    /// the last write failed).
    fn append(&self, inner: &mut Inner, id: &str, at: Option<&Path>) {
        let ro = at.and(inner.ro.get(id).copied());
        if inner.log.is_none() || self.oversized(inner) {
            return self.rewrite(inner);
        }
        let Some(buf) = line(id, at, ro) else {
            return;
        };
        let path = self.log_path();
        let Some((f, end)) = inner.log.as_mut() else {
            return;
        };
        match self.files.write_at(f, &path, &buf, *end) {
            Ok(()) => {
                *end += buf.len() as u64;
                inner.lines += 1;
            }
            Err(e) => {
                tracing::warn!(volume_id = %id, error = %e, "could not write the staging-path log (rewritten at the next change)");
                inner.log = None;
                self.drop_stale();
            }
        }
    }

    /// Whether `staging` is where volume `id` was last staged (and not
    /// unstaged since).
    pub fn is(&self, id: &str, staging: &Path) -> bool {
        self.lock().at.get(id).is_some_and(|p| p == staging)
    }

    /// Where volume `id` was last staged and not unstaged since, if
    /// anywhere.
    pub fn path(&self, id: &str) -> Option<PathBuf> {
        self.lock().at.get(id).cloned()
    }

    /// Records `staging` as where volume `id` is staged: one write(2)
    /// unless it is recorded already. A failure is logged.
    pub fn remember(&self, id: &str, staging: &Path) {
        self.remember_as(id, staging, None)
    }

    /// `remember`, saying too whether the stage is read-only (a raw disk
    /// stage: the kernel's flag of the disk cannot tell a read-write stage
    /// from a read-only one made before Berth set the flag).
    pub fn remember_as(&self, id: &str, staging: &Path, read_only: Option<bool>) {
        let mut inner = self.lock();
        if inner.at.get(id).is_some_and(|p| p == staging)
            && inner.ro.get(id).copied() == read_only
            && inner.log.is_some()
        {
            return;
        }
        inner.at.insert(id.to_string(), staging.to_path_buf());
        match read_only {
            Some(r) => inner.ro.insert(id.to_string(), r),
            None => inner.ro.remove(id),
        };
        self.append(&mut inner, id, Some(staging));
    }

    /// Whether the stage of volume `id` at `staging` was recorded
    /// read-only (`remember_as`); None when not recorded so.
    pub fn read_only(&self, id: &str, staging: &Path) -> Option<bool> {
        let inner = self.lock();
        if inner.at.get(id).is_some_and(|p| p == staging) {
            inner.ro.get(id).copied()
        } else {
            None
        }
    }

    /// Forgets `staging` as where volume `id` is staged, once it is
    /// unstaged there; a record naming another path is kept.
    pub fn forget(&self, id: &str, staging: &Path) {
        let mut inner = self.lock();
        if inner.at.get(id).is_some_and(|p| p == staging) {
            inner.at.remove(id);
            inner.ro.remove(id);
            self.append(&mut inner, id, None);
        }
    }

    /// Forgets volume `id`'s record, whatever it names (DeleteVolume).
    pub fn discard(&self, id: &str) {
        let mut inner = self.lock();
        inner.ro.remove(id);
        if inner.at.remove(id).is_some() {
            self.append(&mut inner, id, None);
        }
    }
}

/// Whether `at`, read back from the log, is a staging path a node RPC
/// accepts (by its text: start-up follows nothing it names).
fn acceptable(protected: &Protected, at: &str) -> bool {
    protected.check("staging_target_path", at).is_ok()
}

/// One log line; None for a path that is not UTF-8 (a CSI request's path
/// always is).
fn line(id: &str, at: Option<&Path>, ro: Option<bool>) -> Option<Vec<u8>> {
    let at = match at {
        Some(p) => Some(p.to_str()?),
        None => None,
    };
    let line = Line {
        id: Cow::Borrowed(id),
        at: at.map(Cow::Borrowed),
        ro: ro.filter(|_| at.is_some()),
    };
    let mut buf = serde_json::to_vec(&line).ok()?;
    buf.push(b'\n');
    Some(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::os::files::RealFiles;

    fn open(d: &Path) -> StagedAt {
        StagedAt::open(d, Arc::new(RealFiles), &Protected::default())
    }

    /// A raw disk stage's read-only setting is kept with its path, read
    /// back at start-up, and goes with the path.
    #[test]
    fn a_read_only_setting_lives_with_its_path() {
        let d = tempfile::tempdir().unwrap();
        let (s1, s2) = (Path::new("/stage/1"), Path::new("/stage/2"));
        let s = open(d.path());
        s.remember_as("a", s1, Some(false));
        s.remember_as("b", s1, Some(true));
        s.remember("c", s1);
        assert_eq!(s.read_only("a", s1), Some(false));
        assert_eq!(s.read_only("a", s2), None);
        drop(s);
        let s = open(d.path());
        assert_eq!(s.read_only("a", s1), Some(false));
        assert_eq!(s.read_only("b", s1), Some(true));
        assert_eq!(s.read_only("c", s1), None);
        s.remember("a", s1);
        s.forget("b", s1);
        assert_eq!(s.read_only("a", s1), None);
        drop(s);
        let s = open(d.path());
        assert_eq!(s.read_only("a", s1), None);
        assert!(s.is("a", s1));
        assert_eq!(s.read_only("b", s1), None);
        assert!(!s.is("b", s1));
    }

    #[test]
    fn remembers_replaces_and_forgets_one_path_per_volume() {
        let d = tempfile::tempdir().unwrap();
        let s = open(d.path());
        let (a, b) = (Path::new("/k/a"), Path::new("/k/b"));
        assert!(!s.is("v", a));
        s.remember("v", a);
        assert!(s.is("v", a) && !s.is("v", b) && !s.is("w", a));
        s.remember("v", a);
        assert!(s.is("v", a));
        // A stale record for another path is replaced.
        s.remember("v", b);
        assert!(s.is("v", b) && !s.is("v", a));
        // Forgetting another path keeps the record.
        s.forget("v", a);
        assert!(s.is("v", b));
        s.forget("v", b);
        assert!(!s.is("v", b));
        s.remember("v", a);
        s.discard("v");
        s.discard("v");
        assert!(!s.is("v", a));
        assert_eq!(s.path("v"), None);
    }

    #[test]
    fn a_restart_knows_what_was_recorded_and_not_forgotten() {
        let d = tempfile::tempdir().unwrap();
        let s = open(d.path());
        s.remember("v", Path::new("/k/v"));
        s.remember("w", Path::new("/k/w"));
        // JSON's escapes in a path (a control character is refused by
        // every node RPC, and so when read back: `acceptable`).
        s.remember("x", Path::new(r#"/k/x with "quotes", \040 and \"#));
        s.forget("w", Path::new("/k/w"));
        drop(s);
        let s = open(d.path());
        assert_eq!(s.path("v"), Some(PathBuf::from("/k/v")));
        assert_eq!(s.path("w"), None);
        assert_eq!(
            s.path("x"),
            Some(PathBuf::from(r#"/k/x with "quotes", \040 and \"#))
        );
        // One line per change, no rewrite while it is small.
        let log = std::fs::read_to_string(d.path().join(LOG)).unwrap();
        assert_eq!(log.lines().count(), 4, "{log}");
    }

    #[test]
    fn a_cut_or_damaged_line_is_skipped_and_the_rest_kept() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join(LOG);
        std::fs::write(
            &log,
            "{\"id\":\"v\",\"at\":\"/k/v\"}\ngarbage\n{\"id\":\"w\",\"at\":\"/k/w\"}\n{\"id\":\"x\",\"a",
        )
        .unwrap();
        let s = open(d.path());
        assert_eq!(s.path("v"), Some(PathBuf::from("/k/v")));
        assert_eq!(s.path("w"), Some(PathBuf::from("/k/w")));
        assert_eq!(s.path("x"), None);
        // Rewritten whole: an append after it starts a line of its own.
        s.remember("y", Path::new("/k/y"));
        drop(s);
        let s = open(d.path());
        assert_eq!(s.path("y"), Some(PathBuf::from("/k/y")));
        assert_eq!(s.path("v"), Some(PathBuf::from("/k/v")));
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(!text.contains("garbage"), "{text}");
    }

    /// A line naming a path no node RPC accepts as a staging path (`/`, a
    /// system directory, a relative path) is damage: skipped, and gone
    /// from the log once it is rewritten.
    #[test]
    fn a_line_naming_no_staging_path_is_skipped() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join(LOG);
        std::fs::write(
            &log,
            "{\"id\":\"v\",\"at\":\"/k/v\"}\n{\"id\":\"r\",\"at\":\"/\"}\n{\"id\":\"p\",\"at\":\"/proc/1\"}\n{\"id\":\"d\",\"at\":\"../x\"}\n",
        )
        .unwrap();
        let s = open(d.path());
        assert_eq!(s.path("v"), Some(PathBuf::from("/k/v")));
        for id in ["r", "p", "d"] {
            assert_eq!(s.path(id), None, "{id}");
        }
        drop(s);
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
    }

    #[test]
    fn the_log_is_rewritten_once_it_has_grown() {
        let d = tempfile::tempdir().unwrap();
        let s = open(d.path());
        s.remember("keep", Path::new("/k/keep"));
        for i in 0..(SLACK_LINES + 10) {
            let id = format!("v{i}");
            s.remember(&id, Path::new("/k/a"));
            s.forget(&id, Path::new("/k/a"));
        }
        let lines = std::fs::read_to_string(d.path().join(LOG))
            .unwrap()
            .lines()
            .count();
        assert!(lines < SLACK_LINES + 3, "{lines} lines");
        drop(s);
        let s = open(d.path());
        assert_eq!(s.path("keep"), Some(PathBuf::from("/k/keep")));
        assert_eq!(s.path("v3"), None);
    }

    /// A temp file's name taken by a symlink, a FIFO or an empty
    /// directory (put there by hand): every rewrite failed on it and
    /// removed the log (`drop_stale`), so the log never existed again
    /// while it stayed, and a restart knew no staging path. Now it is
    /// taken away (never what a symlink leads to) and the log written.
    #[test]
    fn a_temp_name_taken_by_something_else_does_not_stop_the_rewrite() {
        for what in ["symlink", "fifo", "dir"] {
            let d = tempfile::tempdir().unwrap();
            let outside = d.path().join("outside");
            std::fs::write(&outside, b"keep").unwrap();
            let tmp = d.path().join(format!(".{LOG}.tmp"));
            match what {
                "symlink" => std::os::unix::fs::symlink(&outside, &tmp).unwrap(),
                "fifo" => {
                    nix::unistd::mkfifo(&tmp, nix::sys::stat::Mode::from_bits_truncate(0o600))
                        .unwrap()
                }
                _ => std::fs::create_dir(&tmp).unwrap(),
            }
            // Damage, so that start-up rewrites the log.
            std::fs::write(d.path().join(LOG), "garbage\n").unwrap();
            let s = open(d.path());
            s.remember("v", Path::new("/k/v"));
            drop(s);
            let s = open(d.path());
            assert_eq!(s.path("v"), Some(PathBuf::from("/k/v")), "{what}");
            assert_eq!(std::fs::read(&outside).unwrap(), b"keep", "{what}");
        }
    }

    /// Writes that fail (a full disk) leave no log and no temp file behind
    /// (a log missing a change must not be read back); memory still knows
    /// every path, and the next change that can be written writes the log
    /// whole again.
    #[test]
    fn a_rewrite_that_fails_leaves_no_file_behind() {
        let d = tempfile::tempdir().unwrap();
        let (os, fake) = crate::os::Os::fake();
        let s = StagedAt::open(d.path(), os.files.clone(), &Protected::default());
        s.remember("v", Path::new("/k/v"));
        fake.fail_op_under("write", d.path(), libc::ENOSPC);
        // A failed append drops the log; the next change rewrites it, and
        // that fails too.
        s.remember("w", Path::new("/k/w"));
        s.remember("x", Path::new("/k/x"));
        let left: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "{left:?}");
        // Memory still knows; the next change that can be written writes
        // it whole.
        fake.clear_file_faults();
        s.remember("y", Path::new("/k/y"));
        drop(s);
        let s = StagedAt::open(d.path(), os.files.clone(), &Protected::default());
        for id in ["v", "w", "x", "y"] {
            assert!(s.path(id).is_some(), "{id}");
        }
    }

    /// This version, then an earlier one (a rollback), then this one again:
    /// the earlier one unstaged the volume at the path the log names
    /// (leaving the log as it was) and staged it at another, with a
    /// symlink. The symlink, newer than the log, wins: the log's path
    /// taken for the volume's own let a stage there through while the
    /// volume was staged at the other (two staging paths, neither of which
    /// could then be unstaged).
    #[test]
    fn a_symlink_newer_than_the_log_wins() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join(LOG);
        std::fs::write(&log, "{\"id\":\"v\",\"at\":\"/k/p\"}\n").unwrap();
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        File::options()
            .write(true)
            .open(&log)
            .unwrap()
            .set_modified(hour_ago)
            .unwrap();
        let legacy = d.path().join(LEGACY_DIR);
        std::fs::create_dir(&legacy).unwrap();
        std::os::unix::fs::symlink("/k/q", legacy.join("v")).unwrap();
        let s = open(d.path());
        assert_eq!(s.path("v"), Some(PathBuf::from("/k/q")));
        assert!(!legacy.exists());
        drop(s);
        let s = open(d.path());
        assert_eq!(s.path("v"), Some(PathBuf::from("/k/q")));
    }

    #[test]
    fn a_symlink_at_the_old_directory_is_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let (kept, link) = (
            elsewhere.path().join("precious"),
            elsewhere.path().join("v"),
        );
        std::fs::write(&kept, "data").unwrap();
        std::os::unix::fs::symlink("/k/v", &link).unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), d.path().join(LEGACY_DIR)).unwrap();
        let s = open(d.path());
        // Nothing there is taken in, and nothing there is removed.
        assert_eq!(s.path("v"), None);
        assert_eq!(std::fs::read_to_string(&kept).unwrap(), "data");
        assert!(link.symlink_metadata().is_ok());
        assert!(d.path().join(LEGACY_DIR).symlink_metadata().is_ok());
    }

    #[test]
    fn only_symlinks_of_the_old_directory_are_removed() {
        let d = tempfile::tempdir().unwrap();
        let legacy = d.path().join(LEGACY_DIR);
        std::fs::create_dir(&legacy).unwrap();
        std::os::unix::fs::symlink("/k/v", legacy.join("v")).unwrap();
        std::fs::write(legacy.join("notes"), "an operator's").unwrap();
        let s = open(d.path());
        assert_eq!(s.path("v"), Some(PathBuf::from("/k/v")));
        assert!(legacy.join("v").symlink_metadata().is_err());
        assert_eq!(
            std::fs::read_to_string(legacy.join("notes")).unwrap(),
            "an operator's"
        );
    }

    /// The log read through the OS layer: a log that cannot be read
    /// (EIO) is not read, nothing it names is known, and it is rewritten
    /// from what is known (nothing), as a damaged one is.
    #[test]
    fn a_log_that_cannot_be_read_is_not_read_and_is_rewritten() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(LOG), "{\"id\":\"v\",\"at\":\"/k/v\"}\n").unwrap();
        let (os, fake) = crate::os::Os::fake();
        fake.fail_next("read", libc::EIO);
        let s = StagedAt::open(d.path(), os.files.clone(), &Protected::default());
        assert_eq!(s.path("v"), None);
        assert_eq!(std::fs::read(d.path().join(LOG)).unwrap(), b"");
        s.remember("w", Path::new("/k/w"));
        drop(s);
        let s = StagedAt::open(d.path(), os.files.clone(), &Protected::default());
        assert_eq!(s.path("v"), None);
        assert_eq!(s.path("w"), Some(PathBuf::from("/k/w")));
    }

    /// The old directory read through the OS layer: one that cannot be
    /// listed (or looked at) is not taken in and left as it is, to be
    /// read at a later start.
    #[test]
    fn an_old_directory_that_cannot_be_read_is_left_as_it_is() {
        let d = tempfile::tempdir().unwrap();
        let legacy = d.path().join(LEGACY_DIR);
        std::fs::create_dir(&legacy).unwrap();
        std::os::unix::fs::symlink("/k/v", legacy.join("v")).unwrap();
        let (os, fake) = crate::os::Os::fake();
        for op in ["lstat", "read_dir"] {
            fake.fail_next(op, libc::EIO);
            let s = StagedAt::open(d.path(), os.files.clone(), &Protected::default());
            assert_eq!(s.path("v"), None, "{op}");
            assert!(legacy.join("v").symlink_metadata().is_ok(), "{op}");
        }
        let s = StagedAt::open(d.path(), os.files.clone(), &Protected::default());
        assert_eq!(s.path("v"), Some(PathBuf::from("/k/v")));
        assert!(!legacy.exists());
    }

    /// A symlink whose text cannot be read (EIO) was not understood: it was
    /// removed with the others all the same, and its volume's staging path
    /// lost for good. Now it is not taken in and left as it is, with its
    /// directory, while the symlinks beside it that can be read are taken
    /// in and removed; the next start reads it.
    #[test]
    fn an_old_symlink_that_cannot_be_read_is_left_as_it_is() {
        let d = tempfile::tempdir().unwrap();
        let legacy = d.path().join(LEGACY_DIR);
        std::fs::create_dir(&legacy).unwrap();
        std::os::unix::fs::symlink("/k/v", legacy.join("v")).unwrap();
        std::os::unix::fs::symlink("/k/w", legacy.join("w")).unwrap();
        let (os, fake) = crate::os::Os::fake();
        // The first symlink read fails, whichever of the two it is.
        let first = std::fs::read_dir(&legacy)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .file_name();
        let (unread, read) = if first == "v" { ("v", "w") } else { ("w", "v") };
        fake.fail_next("readlink", libc::EIO);
        let s = StagedAt::open(d.path(), os.files.clone(), &Protected::default());
        assert_eq!(s.path(unread), None);
        assert_eq!(s.path(read), Some(PathBuf::from(format!("/k/{read}"))));
        assert_eq!(
            std::fs::read_link(legacy.join(unread)).unwrap(),
            PathBuf::from(format!("/k/{unread}"))
        );
        assert!(legacy.join(read).symlink_metadata().is_err());
        drop(s);
        // Read at the next start, then removed.
        let s = StagedAt::open(d.path(), os.files.clone(), &Protected::default());
        assert_eq!(s.path(unread), Some(PathBuf::from(format!("/k/{unread}"))));
        assert_eq!(s.path(read), Some(PathBuf::from(format!("/k/{read}"))));
        assert!(!legacy.exists());
    }

    #[test]
    fn the_symlinks_of_earlier_versions_are_taken_in_and_removed() {
        let d = tempfile::tempdir().unwrap();
        let legacy = d.path().join(LEGACY_DIR);
        std::fs::create_dir(&legacy).unwrap();
        std::os::unix::fs::symlink("/k/old", legacy.join("v")).unwrap();
        std::os::unix::fs::symlink("/k/other", legacy.join("w")).unwrap();
        // The log is newer than any symlink: it wins.
        std::fs::write(d.path().join(LOG), "{\"id\":\"w\",\"at\":\"/k/new\"}\n").unwrap();
        let s = open(d.path());
        assert_eq!(s.path("v"), Some(PathBuf::from("/k/old")));
        assert_eq!(s.path("w"), Some(PathBuf::from("/k/new")));
        assert!(!legacy.exists());
        drop(s);
        let s = open(d.path());
        assert_eq!(s.path("v"), Some(PathBuf::from("/k/old")));
    }
}
