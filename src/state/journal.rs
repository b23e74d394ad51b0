//! The state journal: an append-only log of record changes with group
//! commit, compacted into snapshots.
//!
//! Files, all under `<state-dir>/journal/`:
//! - `snapshot-<G>.jsonl`: every live record when generation G began,
//!   written to a temp file, fsynced and renamed, so it exists whole or not
//!   at all;
//! - `log-<G>.jsonl`: the changes made since, appended. A compaction makes
//!   the next, empty log just before it renames the next snapshot into
//!   place, so an empty log newer than every snapshot is an interrupted
//!   compaction (removed at start-up); a non-empty one stops start-up.
//!
//! Each line is `<crc32 of the JSON, 8 hex digits> <JSON>\n`, the JSON being
//! `{"put":<record>}` or `{"del":"<id>"}`. Start-up reads the snapshot of the
//! highest generation and replays its log. A line that fails its checksum or
//! lacks its newline can only be the unacknowledged tail of the last write
//! (one writer, and no write is acknowledged before its fdatasync): the log
//! is cut there and the cut bytes are kept beside it. A line whose checksum
//! holds but which does not parse, or any flaw in a snapshot, stops start-up.
//!
//! Group commit: a change is encoded by its caller, queued, and the caller
//! waits; one of the waiting callers writes everything queued with one
//! write and one fdatasync, so concurrent changes share one disk flush. A
//! write that fails is cut off again (the log stays a sequence of whole
//! lines); a failed fdatasync poisons the journal — the page cache may have
//! dropped the data — and every later change fails until a restart replays
//! the log.
use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use super::record::VolumeRecord;
use super::StateError;

/// One change, as read back.
#[derive(Deserialize, Debug)]
#[serde(rename_all = "lowercase")]
pub enum Entry {
    Put(Box<VolumeRecord>),
    Del(String),
}

/// One change, as written (the same JSON as `Entry`, without copying the
/// record).
#[derive(Serialize, Debug)]
#[serde(rename_all = "lowercase")]
pub enum EntryRef<'a> {
    Put(&'a VolumeRecord),
    Del(&'a str),
}

/// Appends the journal line of `entry` to `out`.
pub fn encode(entry: &EntryRef<'_>, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
    let start = out.len();
    out.extend_from_slice(b"00000000 ");
    serde_json::to_writer(&mut *out, entry)?;
    let crc = crc32fast::hash(&out[start + 9..]);
    out[start..start + 8].copy_from_slice(format!("{crc:08x}").as_bytes());
    out.push(b'\n');
    Ok(())
}

/// What a line of a journal file holds.
enum Line {
    Entry(Entry),
    /// Fails its checksum or has no newline.
    Torn,
}

fn decode(line: &[u8], path: &Path) -> Result<Line, StateError> {
    let Some(body) = line.strip_suffix(b"\n") else {
        return Ok(Line::Torn);
    };
    if body.len() < 10 || body[8] != b' ' {
        return Ok(Line::Torn);
    }
    let want = std::str::from_utf8(&body[..8])
        .ok()
        .and_then(|h| u32::from_str_radix(h, 16).ok());
    let json = &body[9..];
    if want != Some(crc32fast::hash(json)) {
        return Ok(Line::Torn);
    }
    serde_json::from_slice(json)
        .map(Line::Entry)
        .map_err(|source| StateError::Corrupt {
            path: path.to_path_buf(),
            source,
        })
}

/// Splits `bytes` into lines, each with its newline (the last may lack it).
fn lines(bytes: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    let mut pos = 0;
    std::iter::from_fn(move || {
        if pos >= bytes.len() {
            return None;
        }
        let start = pos;
        let end = bytes[start..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(bytes.len(), |i| start + i + 1);
        pos = end;
        Some((start, &bytes[start..end]))
    })
}

fn snapshot_name(gen: u64) -> String {
    format!("snapshot-{gen}.jsonl")
}

fn log_name(gen: u64) -> String {
    format!("log-{gen}.jsonl")
}

/// `prefix-<n>.jsonl` → n.
fn generation(name: &str, prefix: &str) -> Option<u64> {
    name.strip_prefix(prefix)?
        .strip_suffix(".jsonl")?
        .parse()
        .ok()
}

fn sync_dir(dir: &Path) -> Result<(), StateError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StateError::io("fsync", dir, e))
}

fn create_file(path: &Path) -> Result<File, StateError> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| StateError::io("create", path, e))
}

/// The file being appended to; only the caller that holds `writing` touches
/// it.
struct Writer {
    file: File,
    gen: u64,
    /// Bytes of whole, written lines.
    len: u64,
    /// Size of this generation's snapshot (0 for none).
    snapshot_len: u64,
    /// The log size at which to compact next.
    compact_at: u64,
    /// The smallest log worth compacting.
    min_compact: u64,
}

/// Smallest log worth compacting: replaying this much takes a few tens of
/// milliseconds.
const MIN_COMPACT: u64 = 4 << 20;

impl Writer {
    fn set_threshold(&mut self) {
        self.compact_at = self.min_compact.max(2 * self.snapshot_len);
    }

    /// Writes one batch and flushes it. A failed write is cut off again; an
    /// error says whether the journal must be poisoned.
    fn write(&mut self, batch: &[u8], path: &Path) -> Result<(), (StateError, bool)> {
        if let Err(e) = self.file.write_all_at(batch, self.len) {
            let undo = self
                .file
                .set_len(self.len)
                .and_then(|_| self.file.sync_data());
            return Err((StateError::io("write", path, e), undo.is_err()));
        }
        if let Err(e) = self.file.sync_data() {
            return Err((StateError::io("fdatasync", path, e), true));
        }
        self.len += batch.len() as u64;
        Ok(())
    }
}

impl Queue {
    /// Marks tickets [start, end) finished with `why` as their error.
    fn fail(&mut self, start: u64, end: u64, why: String) {
        self.failed.push_back((start, end, why));
        // A waiter looks its round up right after the wake-up; far older
        // rounds have no waiter left.
        while self.failed.len() > 1024 {
            self.failed.pop_front();
        }
    }
}

#[derive(Default)]
struct Queue {
    pending: Vec<u8>,
    next_ticket: u64,
    /// Every ticket below this is finished (written or failed).
    done_below: u64,
    /// Ticket ranges [start, end) whose write failed, newest last.
    failed: VecDeque<(u64, u64, String)>,
    writing: bool,
    poisoned: Option<String>,
}

pub struct Journal {
    dir: PathBuf,
    queue: Mutex<Queue>,
    cv: Condvar,
    writer: Mutex<Writer>,
}

/// What `open` found.
pub struct Replay {
    pub journal: Journal,
    /// Every live record, in no particular order.
    pub records: Vec<VolumeRecord>,
}

fn read_file(path: &Path) -> Result<Vec<u8>, StateError> {
    fs::read(path).map_err(|e| StateError::io("read", path, e))
}

impl Journal {
    /// Opens the journal in `dir` (created if missing) and replays it.
    pub fn open(dir: &Path) -> Result<Replay, StateError> {
        if !dir.exists() {
            fs::create_dir_all(dir).map_err(|e| StateError::io("create", dir, e))?;
            if let Some(parent) = dir.parent() {
                sync_dir(parent)?;
            }
        }
        let mut snapshots = Vec::new();
        let mut logs = Vec::new();
        for entry in fs::read_dir(dir).map_err(|e| StateError::io("read", dir, e))? {
            let entry = entry.map_err(|e| StateError::io("read", dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                let p = entry.path();
                fs::remove_file(&p).map_err(|e| StateError::io("remove", &p, e))?;
            } else if let Some(g) = generation(&name, "snapshot-") {
                snapshots.push(g);
            } else if let Some(g) = generation(&name, "log-") {
                logs.push(g);
            }
        }
        let gen = snapshots.iter().copied().max().unwrap_or(0);
        for g in logs.iter().filter(|&&g| g > gen) {
            // A compaction makes the next log, empty, just before it renames
            // the snapshot into place: an empty log newer than every
            // snapshot is that, interrupted. Anything else was not made by
            // this code: refuse rather than guess which is current.
            let p = dir.join(log_name(*g));
            let len = fs::metadata(&p)
                .map_err(|e| StateError::io("stat", &p, e))?
                .len();
            if len > 0 {
                return Err(StateError::Unexpected {
                    path: p,
                    why: format!("newer than the newest snapshot (generation {gen}) and not empty"),
                });
            }
            fs::remove_file(&p).map_err(|e| StateError::io("remove", &p, e))?;
        }
        logs.retain(|&g| g <= gen);
        let mut map = std::collections::HashMap::new();
        let snapshot_len = if snapshots.contains(&gen) {
            let path = dir.join(snapshot_name(gen));
            let bytes = read_file(&path)?;
            for (_, line) in lines(&bytes) {
                match decode(line, &path)? {
                    Line::Entry(Entry::Put(r)) => {
                        map.insert(r.id.clone(), *r);
                    }
                    Line::Entry(Entry::Del(_)) | Line::Torn => {
                        return Err(StateError::Unexpected {
                            path,
                            why: "a snapshot line is damaged or not a record".into(),
                        })
                    }
                }
            }
            bytes.len() as u64
        } else {
            0
        };
        let log_path = dir.join(log_name(gen));
        let bytes = match fs::read(&log_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(StateError::io("read", &log_path, e)),
        };
        let mut good = bytes.len();
        for (at, line) in lines(&bytes) {
            match decode(line, &log_path)? {
                Line::Entry(Entry::Put(r)) => {
                    map.insert(r.id.clone(), *r);
                }
                Line::Entry(Entry::Del(id)) => {
                    map.remove(&id);
                }
                Line::Torn => {
                    good = at;
                    break;
                }
            }
        }
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&log_path)
            .map_err(|e| StateError::io("open", &log_path, e))?;
        if good < bytes.len() {
            // The unacknowledged tail of the last write before a crash. Kept
            // beside the log for inspection, then cut off.
            let keep = dir.join(format!(
                "{}.torn-{}",
                log_name(gen),
                crate::driver::now_nanos()
            ));
            fs::write(&keep, &bytes[good..]).map_err(|e| StateError::io("write", &keep, e))?;
            file.set_len(good as u64)
                .and_then(|_| file.sync_all())
                .map_err(|e| StateError::io("truncate", &log_path, e))?;
            tracing::warn!(
                log = %log_path.display(),
                bytes = bytes.len() - good,
                kept = %keep.display(),
                "cut an incomplete tail off the state journal (a write interrupted by a crash, never acknowledged)"
            );
        }
        if bytes.is_empty() {
            sync_dir(dir)?;
        }
        for g in snapshots.iter().chain(&logs).filter(|&&g| g < gen) {
            for name in [snapshot_name(*g), log_name(*g)] {
                let _ = fs::remove_file(dir.join(name));
            }
        }
        let mut writer = Writer {
            file,
            gen,
            len: good as u64,
            snapshot_len,
            compact_at: 0,
            min_compact: MIN_COMPACT,
        };
        writer.set_threshold();
        Ok(Replay {
            journal: Journal {
                dir: dir.to_path_buf(),
                queue: Mutex::new(Queue::default()),
                cv: Condvar::new(),
                writer: Mutex::new(writer),
            },
            records: map.into_values().collect(),
        })
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes `lines` (whole encoded lines) durable; returns once they are on
    /// disk. `snapshot` encodes every live record, for compaction; it is
    /// called without any journal lock held, at a moment when everything
    /// already written to the log is reflected in what it returns.
    pub fn commit(
        &self,
        lines: &[u8],
        snapshot: &dyn Fn() -> Result<Vec<u8>, StateError>,
    ) -> Result<(), StateError> {
        let mut q = self.queue();
        if let Some(why) = &q.poisoned {
            return Err(StateError::Poisoned(why.clone()));
        }
        q.pending.extend_from_slice(lines);
        let ticket = q.next_ticket;
        q.next_ticket += 1;
        loop {
            if q.done_below > ticket {
                return match q.failed.iter().find(|f| f.0 <= ticket && ticket < f.1) {
                    Some(f) => Err(StateError::Journal(f.2.clone())),
                    None => Ok(()),
                };
            }
            if q.writing {
                q = self.cv.wait(q).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            if let Some(why) = q.poisoned.clone() {
                // Queued before the journal was poisoned: never written (a
                // later flush could succeed over the lost one and leave a
                // hole that start-up would take for a torn tail).
                q.pending.clear();
                let (start, end) = (q.done_below, q.next_ticket);
                q.done_below = end;
                q.fail(start, end, why);
                self.cv.notify_all();
                continue;
            }
            q.writing = true;
            let batch = std::mem::take(&mut q.pending);
            let (start, end) = (q.done_below, q.next_ticket);
            drop(q);
            let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            let path = self.dir.join(log_name(w.gen));
            let r = w.write(&batch, &path);
            let compact = r.is_ok() && w.len >= w.compact_at;
            q = self.queue();
            q.done_below = end;
            if let Err((e, poison)) = r {
                let msg = e.to_string();
                tracing::error!(error = %msg, poisoned = poison, "state journal write failed");
                if poison {
                    q.poisoned = Some(msg.clone());
                }
                q.fail(start, end, msg);
            }
            if compact {
                // The waiters of this round may go; later ones queue until
                // the log is switched.
                self.cv.notify_all();
                drop(q);
                let poison = match self.compact(&mut w, snapshot) {
                    Ok(()) => None,
                    Err((e, true)) => {
                        tracing::error!(error = %e, "state journal compaction failed after its snapshot was in place; no further changes until a restart");
                        Some(e.to_string())
                    }
                    Err((e, false)) => {
                        // The old log is still whole and current; try again
                        // after it has grown by half as much again.
                        w.compact_at = w.len + w.compact_at / 2;
                        tracing::warn!(error = %e, "state journal compaction failed; continuing with the old log");
                        None
                    }
                };
                drop(w);
                q = self.queue();
                if poison.is_some() {
                    q.poisoned = poison;
                }
            } else {
                drop(w);
            }
            q.writing = false;
            self.cv.notify_all();
        }
    }

    /// Starts the next generation: a snapshot of every live record and an
    /// empty log; the old files are removed after. Until the snapshot is
    /// renamed into place nothing has changed (a failure cleans up and the
    /// old log stays current); once it is, only the new log may be written,
    /// so a failure to make that durable poisons the journal (no write can
    /// then land in a log that start-up would not read).
    fn compact(
        &self,
        w: &mut Writer,
        snapshot: &dyn Fn() -> Result<Vec<u8>, StateError>,
    ) -> Result<(), (StateError, bool)> {
        let gen = w.gen + 1;
        let bytes = snapshot().map_err(|e| (e, false))?;
        let path = self.dir.join(snapshot_name(gen));
        let tmp = self.dir.join(format!("{}.tmp", snapshot_name(gen)));
        let log_path = self.dir.join(log_name(gen));
        let prepared = create_file(&tmp)
            .and_then(|mut f| {
                f.write_all(&bytes)
                    .and_then(|_| f.sync_all())
                    .map_err(|e| StateError::io("write", &tmp, e))
            })
            .and_then(|_| create_file(&log_path))
            .and_then(|file| {
                fs::rename(&tmp, &path)
                    .map(|_| file)
                    .map_err(|e| StateError::io("rename", &path, e))
            });
        let file = match prepared {
            Ok(f) => f,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                let _ = fs::remove_file(&log_path);
                return Err((e, false));
            }
        };
        sync_dir(&self.dir).map_err(|e| (e, true))?;
        let old = w.gen;
        *w = Writer {
            file,
            gen,
            len: 0,
            snapshot_len: bytes.len() as u64,
            compact_at: 0,
            min_compact: w.min_compact,
        };
        w.set_threshold();
        for name in [snapshot_name(old), log_name(old)] {
            let _ = fs::remove_file(self.dir.join(name));
        }
        tracing::debug!(
            generation = gen,
            snapshot_bytes = bytes.len(),
            "state journal compacted"
        );
        Ok(())
    }

    /// Writes a snapshot of `records` as generation G+1 at once (used when
    /// importing records kept in the older one-file-per-volume layout).
    pub fn rebase(
        &self,
        snapshot: &dyn Fn() -> Result<Vec<u8>, StateError>,
    ) -> Result<(), StateError> {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        self.compact(&mut w, snapshot).map_err(|(e, poison)| {
            if poison {
                self.queue().poisoned = Some(e.to_string());
            }
            e
        })
    }

    /// Current generation and log length (for tests and metrics).
    pub fn position(&self) -> (u64, u64) {
        let w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        (w.gen, w.len)
    }

    /// Set when a failed fdatasync stopped all changes.
    pub fn poisoned(&self) -> Option<String> {
        self.queue().poisoned.clone()
    }

    #[cfg(test)]
    pub fn replace_file(&self, file: File) {
        self.writer.lock().unwrap_or_else(|e| e.into_inner()).file = file;
    }

    /// Compacts once the log reaches `bytes` (or twice the snapshot).
    #[cfg(test)]
    pub fn set_compact_at(&self, bytes: u64) {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        w.min_compact = bytes;
        w.set_threshold();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_and_damage_is_torn() {
        let mut out = Vec::new();
        encode(&EntryRef::Del("a b\nc"), &mut out).unwrap();
        let p = Path::new("x");
        assert!(matches!(decode(&out, p).unwrap(), Line::Entry(Entry::Del(id)) if id == "a b\nc"));
        // Exactly one newline, at the end: ids with newlines are escaped.
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
        let mut flipped = out.clone();
        flipped[12] ^= 1;
        assert!(matches!(decode(&flipped, p).unwrap(), Line::Torn));
        assert!(matches!(
            decode(&out[..out.len() - 1], p).unwrap(),
            Line::Torn
        ));
        // A valid checksum over something that is not an entry is corrupt,
        // not torn.
        let json = b"{\"nope\":1}";
        let mut odd = format!("{:08x} ", crc32fast::hash(json)).into_bytes();
        odd.extend_from_slice(json);
        odd.push(b'\n');
        assert!(matches!(decode(&odd, p), Err(StateError::Corrupt { .. })));
    }

    /// Changes queued behind a write whose flush poisons the journal are
    /// never written: they fail, and the log holds only what came before.
    #[test]
    fn nothing_queued_is_written_once_poisoned() {
        use std::sync::Arc;
        let d = tempfile::tempdir().unwrap();
        let j = Arc::new(Journal::open(d.path()).unwrap().journal);
        let line = |id: &str| {
            let mut v = Vec::new();
            encode(&EntryRef::Del(id), &mut v).unwrap();
            v
        };
        let none = || -> Result<Vec<u8>, StateError> { Ok(Vec::new()) };
        // Hold the writer: the first commit takes its batch and blocks.
        let held = j.writer.lock().unwrap();
        let (a, b) = (line("a"), line("b"));
        let ta = {
            let (j, a) = (j.clone(), a.clone());
            std::thread::spawn(move || j.commit(&a, &none))
        };
        while !j.queue().writing {
            std::thread::yield_now();
        }
        let tb = {
            let (j, b) = (j.clone(), b.clone());
            std::thread::spawn(move || j.commit(&b, &none))
        };
        while j.queue().next_ticket < 2 {
            std::thread::yield_now();
        }
        // The flush of the first batch "fails": the journal is poisoned
        // while the second change waits in the queue.
        j.queue().poisoned = Some("fdatasync: EIO".into());
        drop(held);
        assert!(ta.join().unwrap().is_ok(), "taken before the poison");
        assert!(matches!(tb.join().unwrap(), Err(StateError::Journal(_))));
        assert_eq!(j.position().1, a.len() as u64);
        assert!(matches!(j.commit(&b, &none), Err(StateError::Poisoned(_))));
    }

    #[test]
    fn lines_split_keeps_offsets() {
        let v: Vec<_> = lines(b"ab\ncd\nef").collect();
        assert_eq!(
            v,
            vec![(0, &b"ab\n"[..]), (3, &b"cd\n"[..]), (6, &b"ef"[..])]
        );
    }
}
