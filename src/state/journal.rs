//! The state journal: an append-only log of record changes with group
//! commit, compacted into snapshots.
//!
//! Files, all under `<state-dir>/journal/`:
//! - `snapshot-<G>.bin`: every committed record when generation G began,
//!   written to a temp file, fsynced and renamed, so it exists whole or not
//!   at all (binary, see `snapshot_file`; a `snapshot-<G>.jsonl` of JSON
//!   lines, as versions before it wrote, is read too);
//! - `log-<G>.jsonl`: the changes made since, appended. A compaction makes
//!   the next, empty log just before it renames the next snapshot into
//!   place, so an empty log newer than every snapshot is an interrupted
//!   compaction (removed at start-up); a non-empty one stops start-up.
//!
//! Each line of a log is `<crc32 of the JSON, 8 hex digits> <JSON>\n`, the
//! JSON being `{"put":<record>}` or `{"del":"<id>"}`. Start-up reads the
//! snapshot of the highest generation and replays its log. A clean exit
//! folds a log worth it into a new snapshot (`checkpoint`).
//!
//! **Damage.** The only damage start-up tolerates is the unacknowledged
//! tail of the last write before a crash: a write is acknowledged only after
//! its fdatasync, and a crash leaves a write cut short (a last line without
//! its newline) or with blocks that never reached the disk (NUL bytes).
//! So a damaged region is taken for a torn tail only when it runs to the
//! end of the log, holds no valid line, and each of its complete lines has
//! a NUL byte in it. A complete line without one that fails its checksum
//! (a flipped bit), a valid line after a damaged one, a line whose checksum
//! holds but which is not an entry, and any flaw in a snapshot stop
//! start-up with an error naming the file, the offset and the way to
//! recover (`berth state check`, `berth state repair`): no acknowledged
//! record is dropped without an operator's decision. A torn tail is cut
//! off and kept beside the log. Anything named like a journal file that is
//! not a regular file (a FIFO, socket, device, directory or symlink) is
//! damage as well, found from its directory entry: it is never opened (a
//! FIFO would block the reader until a writer came), and every read of a
//! journal file checks the type again (`files::read_regular`).
//!
//! **Group commit.** A change is encoded by its caller and queued
//! (`enqueue`, which hands out a ticket); the caller then waits (`wait`).
//! One of the waiting callers writes everything queued with one write and
//! one fdatasync, so concurrent changes share one disk flush. A write that
//! fails is cut off again (the log stays a sequence of whole lines); so is
//! one whose fdatasync fails, which also poisons the journal (the disk may
//! lack it, whatever the page cache shows) and every later change fails
//! until a restart. Every waiter of
//! a failed write gets the failure: failed rounds are kept until each of
//! their waiters has seen its own, and a waiter's undo of its change runs
//! before its round is forgotten (see `wait`).
//!
//! **Space kept for the log.** The state directory usually shares its
//! filesystem with the volumes (everything under `--data-dir`), which a
//! tenant can fill. So the log keeps `RESERVE` bytes allocated past its
//! end (fallocate with FALLOC_FL_KEEP_SIZE: the file's size stays the end
//! of its last line, so a reader sees exactly what was written, never
//! zeros past it): an append within them needs no new block and cannot
//! fail for space, and the changes that free space (DeleteVolume's
//! Deleting and removal) still go through on a full filesystem. The
//! reserve is topped up once less than half of it is left, when the
//! filesystem has room (else tried again at the next write); a failed
//! write's cut frees it, so it is taken again then. A compaction makes the
//! new log's reserve before it switches to it, and otherwise keeps the old
//! generation (with its reserve) current: it cannot leave the log without
//! one on a full filesystem.
//!
//! **Snapshots hold only committed changes.** The store applies a change to
//! its index before the change is durable; compaction asks it for a
//! snapshot as of the log written so far, telling it which tickets are
//! committed (`Committed`), so a change still queued, or one whose write
//! failed and is being undone, is never in a snapshot.
//!
//! **Start-up makes what it replays durable.** After a failed fdatasync the
//! kernel may keep the data in its page cache, marked clean, while the disk
//! lacks it: a restart would replay it and serve it without it ever being
//! durable. Start-up reads the log and the snapshot back from the disk
//! itself (O_DIRECT, bypassing the page cache); where the disk differs from
//! what was replayed, it writes the log again (temp file, fsync, rename)
//! before serving.
use std::collections::BTreeMap;
use std::fs::File;
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use super::record::{SnapshotRecord, VolumeRecord};
use super::{snapshot_file, StateError};
use crate::os::files::{Files, Open};

/// One change, as read back: a volume record written or removed, a
/// snapshot record written or removed.
#[derive(Deserialize, Debug)]
#[serde(rename_all = "lowercase")]
pub enum Entry {
    Put(Box<VolumeRecord>),
    Del(String),
    Snap(Box<SnapshotRecord>),
    DelSnap(String),
}

/// One change, as written (the same JSON as `Entry`, without copying the
/// record).
#[derive(Serialize, Debug)]
#[serde(rename_all = "lowercase")]
pub enum EntryRef<'a> {
    Put(&'a VolumeRecord),
    Del(&'a str),
    Snap(&'a SnapshotRecord),
    DelSnap(&'a str),
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

/// Records by id as a replay finds them, each boxed once where it was
/// parsed and found through its own id (no copy of the id as a key: start-up
/// moves pointers, not records, and leaves no holes between them). They are
/// handed on in the order they were first put (a snapshot's is by seq, so
/// the index's sort by seq finds them sorted).
pub struct Records<R> {
    /// Each record in order of its first put; None once deleted.
    items: Vec<Option<Box<R>>>,
    /// Each live record's id hash and place in `items` (the hash kept so
    /// that growing the table never reads the records again: a replay of
    /// thousands of them would, once per doubling, each a cache miss).
    table: hashbrown::HashTable<(u64, u32)>,
    hasher: hashbrown::DefaultHashBuilder,
}

impl<R> Default for Records<R> {
    fn default() -> Self {
        Records {
            items: Vec::new(),
            table: hashbrown::HashTable::new(),
            hasher: Default::default(),
        }
    }
}

impl<R: super::store::Record> Records<R> {
    fn find(&self, h: u64, id: &str) -> Option<u32> {
        let items = &self.items;
        self.table
            .find(h, |&(oh, i)| {
                oh == h && items[i as usize].as_ref().is_some_and(|o| o.id() == id)
            })
            .map(|&(_, i)| i)
    }

    pub fn insert(&mut self, r: Box<R>) {
        let h = self.hasher.hash_one(r.id());
        match self.find(h, r.id()) {
            Some(i) => self.items[i as usize] = Some(r),
            None => {
                // more than 2^32 records is beyond any state berth writes
                let i = self.items.len() as u32;
                self.items.push(Some(r));
                self.table.insert_unique(h, (h, i), |&(oh, _)| oh);
            }
        }
    }

    pub fn remove(&mut self, id: &str) {
        let h = self.hasher.hash_one(id);
        if let Some(i) = self.find(h, id) {
            self.items[i as usize] = None;
            if let Ok(e) = self.table.find_entry(h, |&(_, o)| o == i) {
                e.remove();
            }
        }
    }

    pub fn contains_key(&self, id: &str) -> bool {
        self.find(self.hasher.hash_one(id), id).is_some()
    }

    pub fn values(&self) -> impl Iterator<Item = &R> {
        self.items.iter().filter_map(|b| b.as_deref())
    }

    pub fn into_values(self) -> impl Iterator<Item = Box<R>> {
        self.items.into_iter().flatten()
    }
}

/// What one line of a journal file is.
#[derive(Debug)]
pub enum Line {
    Entry(Entry),
    /// Its checksum holds but it is not an entry.
    NotAnEntry(String),
    /// It fails its checksum or has no newline.
    Damaged,
}

pub fn decode(line: &[u8]) -> Line {
    let Some(body) = line.strip_suffix(b"\n") else {
        return Line::Damaged;
    };
    decode_body(body)
}

/// `decode` of a line without its newline (`body`), never copied: a last
/// line without a newline may be a log's whole size (padded by hand).
fn decode_body(body: &[u8]) -> Line {
    if body.len() < 10 || body[8] != b' ' {
        return Line::Damaged;
    }
    let want = std::str::from_utf8(&body[..8])
        .ok()
        .and_then(|h| u32::from_str_radix(h, 16).ok());
    let json = &body[9..];
    if want != Some(crc32fast::hash(json)) {
        return Line::Damaged;
    }
    // The line checked as UTF-8 once, as a whole: parsed from a `str`,
    // serde_json does not check each string of it again (a fifth of a
    // replay's instructions, once).
    let json = match std::str::from_utf8(json) {
        Ok(j) => j,
        Err(e) => return Line::NotAnEntry(format!("not UTF-8: {e}")),
    };
    match serde_json::from_str(json) {
        Ok(e) => Line::Entry(e),
        Err(e) => Line::NotAnEntry(e.to_string()),
    }
}

/// Splits `bytes` into lines, each with its newline (the last may lack it),
/// with their offsets.
pub fn lines(bytes: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    let mut pos = 0;
    std::iter::from_fn(move || {
        if pos >= bytes.len() {
            return None;
        }
        let start = pos;
        let end = memchr::memchr(b'\n', &bytes[start..]).map_or(bytes.len(), |i| start + i + 1);
        pos = end;
        Some((start, &bytes[start..end]))
    })
}

/// The snapshot file of generation `gen` as written now (binary, see
/// `snapshot_file`).
pub fn snapshot_name(gen: u64) -> String {
    format!("snapshot-{gen}.bin")
}

/// The snapshot file of generation `gen` as versions before the binary
/// format wrote it (JSON lines, like the log); still read.
pub fn json_snapshot_name(gen: u64) -> String {
    format!("snapshot-{gen}.jsonl")
}

pub fn log_name(gen: u64) -> String {
    format!("log-{gen}.jsonl")
}

/// What `snapshot-<G>.jsonl` holds beside a binary snapshot: one line whose
/// checksum holds but which is not a change. A berth from before binary
/// snapshots does not know `snapshot-<G>.bin`; without this file it would
/// take the (often empty) `log-<G>.jsonl` for an interrupted compaction,
/// remove it and start with no records. With it, it reads this line as
/// generation G's snapshot and stops ("not a record"), naming the file,
/// whose text says why.
pub fn downgrade_guard(gen: u64) -> Vec<u8> {
    let json = format!(
        r#"{{"binary":"{}","why":"this state directory has a binary snapshot, which berth versions before 2026-12-03 cannot read: run a newer berth"}}"#,
        snapshot_name(gen)
    );
    let mut line = format!("{:08x} ", crc32fast::hash(json.as_bytes())).into_bytes();
    line.extend_from_slice(json.as_bytes());
    line.push(b'\n');
    line
}

/// Writes `downgrade_guard(gen)` into place (temp file, fsync, rename; the
/// caller syncs the directory, before it so that the snapshot's name is
/// durable first, and after). Best effort: a failure leaves the state as
/// good for this berth, only unguarded against an older one.
pub fn write_downgrade_guard(
    f: &dyn Files,
    dir: &Path,
    gen: u64,
) -> Result<(), crate::os::OsError> {
    let path = dir.join(json_snapshot_name(gen));
    let tmp = dir.join(format!("{}.tmp", json_snapshot_name(gen)));
    let r = f
        .open(&tmp, Open::CreateOrTruncate)
        .and_then(|t| {
            f.write_at(&t, &tmp, &downgrade_guard(gen), 0)
                .and_then(|_| f.sync(&t, &tmp))
        })
        .and_then(|_| f.rename(&tmp, &path));
    if r.is_err() {
        let _ = f.remove_file(&tmp);
    }
    r
}

/// `prefix-<n><suffix>` → n.
fn generation(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    let n = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
    // digits only: `parse` would take a sign
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// The generation of a snapshot file's name, and whether it is binary.
fn snapshot_generation(name: &str) -> Option<(u64, bool)> {
    generation(name, "snapshot-", ".bin")
        .map(|g| (g, true))
        .or_else(|| generation(name, "snapshot-", ".jsonl").map(|g| (g, false)))
}

/// A flaw start-up will not repair on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub path: PathBuf,
    /// Byte offset of the flawed line (0 for a whole-file flaw).
    pub offset: u64,
    /// 1-based line number (0 for a whole-file flaw).
    pub line: u64,
    pub why: String,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line > 0 {
            write!(
                f,
                "{} {} {} (byte {}): {}",
                self.path.display(),
                self.unit(),
                self.line,
                self.offset,
                self.why
            )
        } else {
            write!(f, "{}: {}", self.path.display(), self.why)
        }
    }
}

impl Damage {
    /// What `line` counts: lines of a journal file, frames of a binary
    /// snapshot.
    pub fn unit(&self) -> &'static str {
        if self.path.extension().is_some_and(|e| e == "bin") {
            "frame"
        } else {
            "line"
        }
    }
}

/// The torn tail of the log: bytes from `offset` to the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Torn {
    pub offset: u64,
    pub len: u64,
}

/// A damaged line of the log, for `repair`: what was lost.
#[derive(Debug, Clone)]
pub struct Dropped {
    pub offset: u64,
    pub line: u64,
    /// The volume id the line seems to be about, when it can be read.
    pub id_hint: Option<String>,
}

/// What a read-only look at a journal directory found (`scan`).
pub struct Scan {
    pub dir: PathBuf,
    /// The current generation.
    pub gen: u64,
    /// Bytes of the current snapshot (0 for none).
    pub snapshot_len: u64,
    /// The current snapshot's file (None when there is none).
    pub snapshot_path: Option<PathBuf>,
    /// The current snapshot's bytes as read (None when there is none).
    pub snapshot: Option<Vec<u8>>,
    /// The current log's bytes as read.
    pub log: Vec<u8>,
    /// The length of the log that replays (everything but a torn tail).
    pub log_good: u64,
    pub torn: Option<Torn>,
    /// The log's last line is a whole change without its newline (its
    /// checksum holds): replayed, and `s.log` ends with the newline it
    /// lacked; start-up writes that newline.
    pub unterminated: bool,
    /// Every record the readable lines give (damaged lines skipped).
    pub records: Records<VolumeRecord>,
    /// Every snapshot record, likewise.
    pub snapshots: Records<SnapshotRecord>,
    /// Flaws that stop start-up.
    pub damage: Vec<Damage>,
    /// Damaged lines skipped in `records` (for `repair`).
    pub dropped: Vec<Dropped>,
    /// Files start-up removes: temp files, older generations, an empty log
    /// of an interrupted compaction.
    pub stale: Vec<PathBuf>,
    /// Logs newer than the newest snapshot that are not empty (damage; not
    /// read): `repair` takes them out of the journal.
    pub newer: Vec<PathBuf>,
    /// Entries named as journal files (snapshots, logs, temp files) that
    /// are not regular files: a FIFO, socket, device, directory or symlink
    /// (damage; never opened, so never waited on): `repair` moves them
    /// aside.
    pub foreign: Vec<PathBuf>,
}

/// A volume id in a damaged line, if one can be made out.
fn id_hint(line: &[u8]) -> Option<String> {
    // A record's id comes early in its line: never scan a whole huge one.
    let s = String::from_utf8_lossy(&line[..line.len().min(4096)]);
    for key in ["\"id\":\"", "\"del\":\""] {
        if let Some(i) = s.find(key) {
            let rest = &s[i + key.len()..];
            let id: String = rest.chars().take_while(|&c| c != '"').take(200).collect();
            if !id.is_empty() {
                return Some(id);
            }
        }
    }
    None
}

const RECOVER: &str = "berth does not start on a damaged journal, so no acknowledged record is dropped without an operator's decision: run `berth state check` to see every flaw, then restore the state directory from a copy of it taken with berth stopped (`berth state export` keeps the readable records as JSON for reference: no tool loads them back), or run `berth state repair` to keep every readable record and drop the damaged lines (their bytes are kept beside the journal)";

impl Scan {
    /// Records that `path`, named as a journal file, is not a regular file
    /// (`why` says what it is).
    fn not_regular(&mut self, path: PathBuf, why: String) {
        self.damage.push(Damage {
            path: path.clone(),
            offset: 0,
            line: 0,
            why: format!(
                "{why}: berth keeps only regular files here, so it was not made by berth; it is never opened"
            ),
        });
        self.foreign.push(path);
    }

    /// A second record of the same id in a snapshot, at byte `offset` of
    /// `path` (line or frame `unit`): berth writes each record once there,
    /// so which of the two holds is unknown. Damage; the first is kept
    /// (for `repair`), this one dropped.
    fn twice(&mut self, path: &Path, offset: u64, unit: u64, what: &str, id: &str) {
        self.damage.push(Damage {
            path: path.to_path_buf(),
            offset,
            line: unit,
            why: format!(
                "a second record of {what} {id} in the snapshot (berth writes each record once in a snapshot, so which one holds is unknown; repair keeps the first)"
            ),
        });
        self.dropped.push(Dropped {
            offset,
            line: unit,
            id_hint: Some(id.to_string()),
        });
    }

    /// The error start-up reports for the damage found (None when none).
    pub fn error(&self) -> Option<StateError> {
        let first = self.damage.first()?;
        Some(StateError::Damaged {
            path: first.path.clone(),
            offset: first.offset,
            why: if self.damage.len() > 1 {
                format!(
                    "{} {}: {} (and {} more flaws)",
                    first.unit(),
                    first.line,
                    first.why,
                    self.damage.len() - 1
                )
            } else {
                format!("{} {}: {}", first.unit(), first.line, first.why)
            },
            recover: RECOVER,
        })
    }
}

/// How many times `scan` reads a journal that changed while it was read.
const SCAN_TRIES: usize = 8;

/// Reads the journal in `dir` without changing anything. A missing
/// directory is an empty journal.
///
/// The tools read the journal of a serving berth (`state check`,
/// `state export`), which may compact it meanwhile: a new generation's
/// files appear and the old one's go. A reading that met that (the names
/// of the journal's files differ after it from before it) is thrown away
/// and the journal read again: before 2026-12-06 the old log vanished
/// under the reader and read as an empty journal, and `state export`
/// printed no records with exit code 0 (or a later generation's files,
/// gone, stopped it with an error). Appends need no such care: a log read
/// while a line is appended reads whole lines and at most a torn tail.
pub fn scan(files: &dyn Files, dir: &Path) -> Result<Scan, StateError> {
    let mut tries = 0;
    loop {
        tries += 1;
        let before = journal_names(files, dir)?;
        let s = scan_once(files, dir);
        if journal_names(files, dir)? == before {
            return s;
        }
        if tries == SCAN_TRIES {
            return Err(StateError::Unexpected {
                path: dir.to_path_buf(),
                why: format!(
                    "the journal changed each of the {SCAN_TRIES} times it was read (compacted by a serving berth every time?)"
                ),
            });
        }
    }
}

/// The names of the journal's files in `dir` (snapshots, logs, temp
/// files), sorted; none for a missing directory.
fn journal_names(files: &dyn Files, dir: &Path) -> Result<Vec<std::ffi::OsString>, StateError> {
    let entries = match files.read_dir(dir).map_err(crate::os::OsError::into_io) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StateError::io("read", dir, e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let name = entry
            .map_err(|e| StateError::io("read", dir, e))?
            .file_name();
        let n = name.to_string_lossy();
        if snapshot_generation(&n).is_some()
            || generation(&n, "log-", ".jsonl").is_some()
            || n.ends_with(".tmp")
        {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// One reading of the journal in `dir` (`scan`).
fn scan_once(files: &dyn Files, dir: &Path) -> Result<Scan, StateError> {
    let mut out = Scan {
        dir: dir.to_path_buf(),
        gen: 0,
        snapshot_len: 0,
        snapshot_path: None,
        snapshot: None,
        log: Vec::new(),
        log_good: 0,
        torn: None,
        unterminated: false,
        records: Records::default(),
        snapshots: Records::default(),
        damage: Vec::new(),
        dropped: Vec::new(),
        stale: Vec::new(),
        newer: Vec::new(),
        foreign: Vec::new(),
    };
    let entries = match files.read_dir(dir).map_err(crate::os::OsError::into_io) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(StateError::io("read", dir, e)),
    };
    let mut snapshots = Vec::new();
    let mut logs = Vec::new();
    // The names of the journal's regular files: only those are read or
    // removed.
    let mut regular = std::collections::BTreeSet::new();
    for entry in entries {
        let entry = entry.map_err(|e| StateError::io("read", dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let snapshot = snapshot_generation(&name);
        let log = generation(&name, "log-", ".jsonl");
        let tmp = name.ends_with(".tmp");
        if snapshot.is_none() && log.is_none() && !tmp {
            continue;
        }
        // (the type from the directory entry, which never follows a
        // symlink; each read checks it again)
        let t = entry
            .file_type()
            .map_err(|e| StateError::io("stat", entry.path(), e))?;
        if !t.is_file() {
            // Never opened, never removed, and no generation of its own:
            // a FIFO here blocked every reader.
            let why = crate::os::files::NotRegular::of(t).to_string();
            out.not_regular(entry.path(), why);
            continue;
        }
        regular.insert(name);
        if tmp {
            out.stale.push(entry.path());
        } else if let Some(g) = snapshot {
            snapshots.push(g);
        } else if let Some(g) = log {
            logs.push(g);
        }
    }
    #[cfg(test)]
    tests::after_listing(dir);
    let gen = snapshots.iter().map(|&(g, _)| g).max().unwrap_or(0);
    out.gen = gen;
    for g in logs.iter().copied().filter(|&g| g > gen) {
        let p = dir.join(log_name(g));
        let len = files
            .lstat(&p)
            .map_err(|e| StateError::io("stat", &p, e.into_io()))?
            .len();
        if len > 0 {
            out.damage.push(Damage {
                path: p.clone(),
                offset: 0,
                line: 0,
                why: format!(
                    "a log newer than the newest snapshot (generation {gen}) that is not empty: not made by berth, or its snapshot is missing"
                ),
            });
            out.newer.push(p);
        } else {
            out.stale.push(p);
        }
    }
    // Each older generation once: a compaction interrupted after its
    // snapshot was renamed into place leaves the previous generation's
    // snapshot, guard and log, and each of those names would list the
    // generation again (and its files with it, whose second removal would
    // fail and stop start-up).
    let older: std::collections::BTreeSet<u64> = snapshots
        .iter()
        .map(|&(g, _)| g)
        .chain(logs.iter().copied())
        .filter(|&g| g < gen)
        .collect();
    for g in older {
        for name in [snapshot_name(g), json_snapshot_name(g), log_name(g)] {
            if regular.contains(&name) {
                out.stale.push(dir.join(name));
            }
        }
    }
    let binary = snapshots.contains(&(gen, true));
    let guarded = || {
        let guard = downgrade_guard(gen);
        files
            .read_regular(
                &dir.join(json_snapshot_name(gen)),
                Some(guard.len() as u64 + 1),
            )
            .is_ok_and(|b| b == guard)
    };
    if binary && snapshots.contains(&(gen, false)) && !guarded() {
        out.damage.push(Damage {
            path: dir.join(snapshot_name(gen)),
            offset: 0,
            line: 0,
            why: format!(
                "two snapshots of generation {gen}, {} and {}: not made by berth",
                snapshot_name(gen),
                json_snapshot_name(gen)
            ),
        });
    }
    // The guard alone: the binary snapshot it stands beside is gone (read
    // as a snapshot, the guard said only "not a record", and that the
    // state has a binary snapshot: nothing named the file that is missing).
    let lost_binary = !binary && snapshots.contains(&(gen, false)) && guarded();
    if lost_binary {
        out.damage.push(Damage {
            path: dir.join(snapshot_name(gen)),
            offset: 0,
            line: 0,
            why: format!(
                "the snapshot of generation {gen} is missing, though the guard berth writes beside it ({}) is there: every record it held is lost (removed by hand?); restore it from a copy of the state directory",
                json_snapshot_name(gen)
            ),
        });
    }
    if snapshots.iter().any(|&(g, _)| g == gen) && !lost_binary {
        let path = dir.join(if binary {
            snapshot_name(gen)
        } else {
            json_snapshot_name(gen)
        });
        match read_journal_file(files, &path)? {
            Ok(bytes) => {
                out.snapshot_len = bytes.len() as u64;
                if binary {
                    read_binary_snapshot(&mut out, &path, &bytes);
                } else {
                    read_json_snapshot(&mut out, &path, &bytes);
                }
                out.snapshot = Some(bytes);
                out.snapshot_path = Some(path);
            }
            Err(why) => out.not_regular(path, why),
        }
    }
    let log_path = dir.join(log_name(gen));
    let read = if out.foreign.contains(&log_path) {
        // reported above
        Ok(Ok(Vec::new()))
    } else {
        read_journal_file(files, &log_path)
    };
    out.log = match read {
        Ok(Ok(b)) => b,
        Ok(Err(why)) => {
            out.not_regular(log_path.clone(), why);
            Vec::new()
        }
        Err(StateError::Io { source: e, .. }) if e.kind() == std::io::ErrorKind::NotFound => {
            // Berth makes a generation's log before it puts its snapshot in
            // place (compaction, repair): a snapshot without its log lost
            // every change made since it (the log removed by hand).
            if let Some(snap) = &out.snapshot_path {
                out.damage.push(Damage {
                    path: log_path.clone(),
                    offset: 0,
                    line: 0,
                    why: format!(
                        "the log of generation {gen} is missing, though its snapshot {} is there: the changes made since that snapshot are lost (removed by hand?)",
                        snap.display()
                    ),
                });
            }
            Vec::new()
        }
        Err(e) => return Err(e),
    };
    replay_log(&mut out, &log_path);
    Ok(out)
}

/// The bytes of the journal file `path`, or (the inner error) why it is
/// not a regular file (it was replaced after the directory was listed).
fn read_journal_file(
    files: &dyn Files,
    path: &Path,
) -> Result<Result<Vec<u8>, String>, StateError> {
    match files.read_regular(path, None) {
        Ok(b) => Ok(Ok(b)),
        Err(e) => match crate::os::files::not_regular(&e) {
            Some(n) => Ok(Err(n.to_string())),
            None => Err(StateError::io("read", path, e)),
        },
    }
}

/// Adds the records of a binary snapshot file (see `snapshot_file`) to
/// `s`, and its flaws.
fn read_binary_snapshot(s: &mut Scan, path: &Path, bytes: &[u8]) {
    snapshot_file::read(bytes, |item| match item {
        snapshot_file::Item::Volume(r, at) => {
            if s.records.contains_key(&r.id) {
                s.twice(path, at.offset, at.frame, "volume", &r.id);
            } else {
                s.records.insert(r);
            }
        }
        snapshot_file::Item::Snapshot(r, at) => {
            if s.snapshots.contains_key(&r.id) {
                s.twice(path, at.offset, at.frame, "snapshot", &r.id);
            } else {
                s.snapshots.insert(r);
            }
        }
        snapshot_file::Item::Damage {
            offset,
            frame,
            why,
            id,
        } => {
            s.damage.push(Damage {
                path: path.to_path_buf(),
                offset,
                line: frame,
                why: format!("snapshot record damaged: {why}"),
            });
            s.dropped.push(Dropped {
                offset,
                line: frame,
                id_hint: id,
            });
        }
    });
}

/// Adds the records of a snapshot of JSON lines (written by versions
/// before the binary format) to `s`, and its flaws.
fn read_json_snapshot(s: &mut Scan, path: &Path, bytes: &[u8]) {
    for (n, (at, line)) in lines(bytes).enumerate() {
        let why = match decode(line) {
            Line::Entry(Entry::Put(r)) => {
                if s.records.contains_key(&r.id) {
                    s.twice(path, at as u64, n as u64 + 1, "volume", &r.id);
                } else {
                    s.records.insert(r);
                }
                continue;
            }
            Line::Entry(Entry::Snap(r)) => {
                if s.snapshots.contains_key(&r.id) {
                    s.twice(path, at as u64, n as u64 + 1, "snapshot", &r.id);
                } else {
                    s.snapshots.insert(r);
                }
                continue;
            }
            Line::Entry(Entry::Del(_) | Entry::DelSnap(_)) => {
                "a deletion in a snapshot".to_string()
            }
            Line::NotAnEntry(e) => format!("not a record ({e})"),
            Line::Damaged => "checksum mismatch or cut short".to_string(),
        };
        s.damage.push(Damage {
            path: path.to_path_buf(),
            offset: at as u64,
            line: n as u64 + 1,
            why: format!("snapshot line damaged: {why}"),
        });
        s.dropped.push(Dropped {
            offset: at as u64,
            line: n as u64 + 1,
            id_hint: id_hint(line),
        });
    }
}

/// Applies the log's readable lines to `s.records` and sorts its flaws
/// into a torn tail or damage (see the module comment).
fn replay_log(s: &mut Scan, path: &Path) {
    let bytes = std::mem::take(&mut s.log);
    let flaws_before = s.damage.len();
    let mut first_bad: Option<(usize, u64)> = None;
    let mut late_valid: Option<(usize, u64)> = None;
    let mut clean_bad: Option<(usize, u64)> = None;
    // every line that fails its checksum, for the report
    let mut bad: Vec<(usize, u64)> = Vec::new();
    for (n, (at, line)) in lines(&bytes).enumerate() {
        let n = n as u64 + 1;
        let mut decoded = decode(line);
        if matches!(decoded, Line::Damaged) && !line.ends_with(b"\n") {
            // The last line, without its newline: a whole change whose
            // newline is missing or changed is not the torn tail of a
            // write (whose cut-short line never checks).
            match unterminated(line, at + line.len()) {
                Some((e, None)) => {
                    s.unterminated = true;
                    decoded = Line::Entry(e);
                }
                Some((e, Some(b))) => {
                    s.damage.push(Damage {
                        path: path.to_path_buf(),
                        offset: (at + line.len() - 1) as u64,
                        line: n,
                        why: format!(
                            "the last line ends in byte {b:#04x} where its newline belongs: a changed byte, not an interrupted write; the change it holds is whole (its checksum holds), and `berth state repair` keeps it"
                        ),
                    });
                    decoded = Line::Entry(e);
                }
                None => {}
            }
        }
        match decoded {
            Line::Entry(e) => {
                if first_bad.is_some() {
                    late_valid.get_or_insert((at, n));
                }
                match e {
                    Entry::Put(r) => {
                        s.records.insert(r);
                    }
                    Entry::Del(id) => {
                        s.records.remove(&id);
                    }
                    Entry::Snap(r) => {
                        s.snapshots.insert(r);
                    }
                    Entry::DelSnap(id) => {
                        s.snapshots.remove(&id);
                    }
                }
            }
            Line::NotAnEntry(e) => {
                s.damage.push(Damage {
                    path: path.to_path_buf(),
                    offset: at as u64,
                    line: n,
                    why: format!("the checksum holds but the line is not a change ({e})"),
                });
                s.dropped.push(Dropped {
                    offset: at as u64,
                    line: n,
                    id_hint: id_hint(line),
                });
                if first_bad.is_some() {
                    late_valid.get_or_insert((at, n));
                }
            }
            Line::Damaged => {
                first_bad.get_or_insert((at, n));
                bad.push((at, n));
                // A torn write leaves its line cut short, or disk blocks
                // that never got written (NULs from a sector boundary to
                // a sector boundary or the end): anything else is changed
                // bytes.
                let complete = line.ends_with(b"\n");
                let unwritten_only = unwritten_blocks_only(line, at, bytes.len());
                if !unwritten_only || (complete && !line.contains(&0)) {
                    clean_bad.get_or_insert((at, n));
                }
                s.dropped.push(Dropped {
                    offset: at as u64,
                    line: n,
                    id_hint: id_hint(line),
                });
            }
        }
    }
    s.log_good = bytes.len() as u64;
    if let Some((at, n)) = first_bad {
        if let Some((vat, vn)) = late_valid {
            s.damage.push(Damage {
                path: path.to_path_buf(),
                offset: at as u64,
                line: n,
                why: format!(
                    "checksum mismatch, and valid changes follow it (the first at line {vn}, byte {vat}): not the torn tail of an interrupted write"
                ),
            });
            // Every other damaged line too: `repair` drops each, and the
            // operator decides knowing which.
            others(s, path, &bad, &[(at, n)]);
        } else if let Some((cat, cn)) = clean_bad {
            s.damage.push(Damage {
                path: path.to_path_buf(),
                offset: cat as u64,
                line: cn,
                why: "a line whose checksum does not match, with changed bytes (not an interrupted write, which leaves its line cut short or whole disk sectors of NULs)".into(),
            });
            others(s, path, &bad, &[(cat, cn)]);
        } else if bytes.len() - at > MAX_TORN {
            s.damage.push(Damage {
                path: path.to_path_buf(),
                offset: at as u64,
                line: n,
                why: format!(
                    "{} bytes without a whole line at the end: longer than any write berth makes (at most {} MiB at a time), so not the torn tail of an interrupted write (grown or padded by hand?)",
                    bytes.len() - at,
                    MAX_ROUND >> 20
                ),
            });
        } else {
            s.torn = Some(Torn {
                offset: at as u64,
                len: (bytes.len() - at) as u64,
            });
            s.log_good = at as u64;
            // Torn tails are not dropped records: nothing in them was ever
            // acknowledged.
            s.dropped.retain(|d| d.offset < at as u64);
        }
    }
    // in the order of the log (lines that are not changes were noted as
    // they were read)
    s.damage[flaws_before..].sort_by_key(|d| d.offset);
    let mut bytes = bytes;
    if s.unterminated {
        // in the place of the NUL of a sector never written, or added
        match bytes.last_mut() {
            Some(b) if *b == 0 => *b = b'\n',
            _ => bytes.push(b'\n'),
        }
        s.log_good = bytes.len() as u64;
    }
    s.log = bytes;
}

/// Adds a flaw for each damaged line of `bad` (offset, line) but `except`
/// (reported already).
fn others(s: &mut Scan, path: &Path, bad: &[(usize, u64)], except: &[(usize, u64)]) {
    for &(at, n) in bad.iter().filter(|b| !except.contains(b)) {
        s.damage.push(Damage {
            path: path.to_path_buf(),
            offset: at as u64,
            line: n,
            why: "checksum mismatch or cut short".into(),
        });
    }
}

/// The size of the disk sectors a torn write leaves unwritten (as NULs).
const SECTOR: usize = 512;

/// Whether every run of NUL bytes in `line` (at byte `at` of a log of
/// `len` bytes) starts on a sector boundary or where the line starts (the
/// end of the previous write, whose last sector held NULs after it) and
/// ends on a sector boundary or at the end of the log: what sectors that
/// never reached the disk look like. A line without NULs qualifies.
fn unwritten_blocks_only(line: &[u8], at: usize, len: usize) -> bool {
    let mut i = 0;
    while let Some(start) = memchr::memchr(0, &line[i..]).map(|k| i + k) {
        let end = line[start..]
            .iter()
            .position(|&b| b != 0)
            .map_or(line.len(), |k| start + k);
        let (from, to) = (at + start, at + end);
        if (start != 0 && from % SECTOR != 0) || (to % SECTOR != 0 && to != len) {
            return false;
        }
        i = end;
    }
    true
}

/// The change in `line`, the last of a log (ending at byte `end` of it),
/// when it is whole but for its newline: missing (None) or another byte in
/// its place (Some(that byte)). A NUL in its place where a disk sector
/// begins is the newline missing too: the one byte of the write in a
/// sector that never reached the disk (before, the whole change went with
/// it as a torn tail). None when it is not whole (cut short, or changed
/// elsewhere).
fn unterminated(line: &[u8], end: usize) -> Option<(Entry, Option<u8>)> {
    if let Line::Entry(e) = decode_body(line) {
        return Some((e, None));
    }
    let (&last, body) = line.split_last()?;
    match decode_body(body) {
        Line::Entry(e) if last == 0 && (end - 1) % SECTOR == 0 => Some((e, None)),
        Line::Entry(e) => Some((e, Some(last))),
        _ => None,
    }
}

/// The file being appended to; only the caller that holds `writing` touches
/// it.
pub struct Writer {
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
    /// The file offset up to which blocks are known to be allocated (the
    /// log and its reserve past `len`).
    reserved: u64,
    /// The last top-up of the reserve failed (logged once until one works).
    short: bool,
    /// That failure was for want of space (ENOSPC, EDQUOT), not a
    /// filesystem that keeps no space ahead (`Journal::reserve_short`).
    full: bool,
}

/// Most bytes one write round appends (unless a single change is bigger:
/// then that change alone). Changes queued beyond it wait for the next
/// round.
const MAX_ROUND: usize = 16 << 20;

/// A damaged tail longer than this is not the torn tail of an interrupted
/// write: a crash tears at most the round being written (`MAX_ROUND`; a
/// change bigger than that alone would take a record of megabytes, which
/// no request makes), so such a tail is damage for the operator (`state
/// repair`), never cut off at start-up without a word. Four times the
/// round, for margin.
const MAX_TORN: usize = 4 * MAX_ROUND;

/// Smallest log worth compacting: replaying this much takes a few tens of
/// milliseconds.
const MIN_COMPACT: u64 = 4 << 20;

/// Bytes kept allocated past the end of the log (see "Space kept for the
/// log" above): a local DeleteVolume appends 58 bytes (its record's
/// removal; measured), so thousands of deletes go through on a full
/// filesystem; while less than half is left and there is no room to take
/// it again, creates are refused so that the rest is the deletes'
/// (`Journal::reserve_short`).
pub const RESERVE: u64 = 1 << 20;

impl Writer {
    fn set_threshold(&mut self) {
        self.compact_at = self.min_compact.max(2 * self.snapshot_len);
    }

    /// Takes `RESERVE` bytes past the end of the log again once less than
    /// half of it is left. Best effort: on a full filesystem the log goes
    /// on with what it has left, and this is tried at the next write.
    fn top_up(&mut self, files: &dyn Files, path: &Path) {
        if self.reserved >= self.len.saturating_add(RESERVE / 2) {
            return;
        }
        match files.reserve(&self.file, path, self.len, RESERVE) {
            Ok(()) => {
                self.reserved = self.len + RESERVE;
                self.full = false;
                if self.short {
                    self.short = false;
                    tracing::info!(log = %path.display(), "space past the end of the state journal's log is kept again");
                }
            }
            Err(e) => {
                self.full = matches!(e.errno(), Some(libc::ENOSPC | libc::EDQUOT));
                if !self.short {
                    self.short = true;
                    tracing::warn!(log = %path.display(), left = self.reserved.saturating_sub(self.len), error = %e, "cannot keep space past the end of the state journal's log; changes go on in what is left of it, and it is taken again once there is room");
                }
            }
        }
    }
}

/// A place in the queue of changes.
pub type Ticket = u64;

/// Tells a snapshot which changes are committed (durable in the log the
/// snapshot replaces).
pub struct Committed {
    done_below: Ticket,
    failed: Vec<(Ticket, Ticket)>,
}

impl Committed {
    pub fn contains(&self, t: Ticket) -> bool {
        t < self.done_below && !self.failed.iter().any(|&(s, e)| s <= t && t < e)
    }

    #[cfg(test)]
    pub fn for_test(done_below: Ticket, failed: Vec<(Ticket, Ticket)>) -> Committed {
        Committed { done_below, failed }
    }

    /// Everything is committed (a snapshot of a journal being opened).
    pub fn all() -> Committed {
        Committed {
            done_below: Ticket::MAX,
            failed: Vec::new(),
        }
    }
}

/// A snapshot of every committed record as journal lines.
pub type SnapshotFn<'a> = &'a dyn Fn(&Committed) -> Result<Vec<u8>, StateError>;

/// A round whose write failed: its tickets [start, end), why, and how many
/// of its waiters have not yet seen it.
struct Failed {
    end: Ticket,
    why: String,
    unseen: u64,
    /// The write failed for want of space (ENOSPC, EDQUOT).
    no_space: bool,
}

#[derive(Default)]
struct Queue {
    pending: Vec<u8>,
    /// Where each pending change's lines end in `pending`, in ticket order
    /// (the first is ticket `done_below`).
    pending_ends: std::collections::VecDeque<usize>,
    next_ticket: Ticket,
    /// Every ticket below this is finished (written or failed).
    done_below: Ticket,
    /// Failed rounds by first ticket, kept until every waiter has seen its
    /// failure.
    failed: BTreeMap<Ticket, Failed>,
    writing: bool,
    poisoned: Option<String>,
}

impl Queue {
    /// Takes the next round off the queue: the changes queued first, up to
    /// `max` bytes (at least one change, however big), with the tickets
    /// they cover (`start..end`). A crash tears at most one round, which
    /// bounds a torn tail (`MAX_TORN`).
    fn take_round(&mut self, max: usize) -> (Vec<u8>, Ticket, Ticket) {
        let n = self
            .pending_ends
            .iter()
            .take_while(|&&e| e <= max)
            .count()
            .max(1)
            .min(self.pending_ends.len());
        let bytes = n.checked_sub(1).map_or(0, |i| self.pending_ends[i]);
        let batch: Vec<u8> = if bytes == self.pending.len() {
            std::mem::take(&mut self.pending)
        } else {
            self.pending.drain(..bytes).collect()
        };
        self.pending_ends.drain(..n);
        for e in self.pending_ends.iter_mut() {
            *e -= bytes;
        }
        let start = self.done_below;
        (batch, start, start + n as Ticket)
    }

    fn fail(&mut self, start: Ticket, end: Ticket, why: String, no_space: bool) {
        if end > start {
            self.failed.insert(
                start,
                Failed {
                    end,
                    why,
                    unseen: end - start,
                    no_space,
                },
            );
        }
    }

    fn failure_of(&self, t: Ticket) -> Option<(Ticket, &Failed)> {
        self.failed
            .range(..=t)
            .next_back()
            .filter(|(_, f)| t < f.end)
            .map(|(s, f)| (*s, f))
    }

    fn committed(&self) -> Committed {
        Committed {
            done_below: self.done_below,
            failed: self.failed.iter().map(|(s, f)| (*s, f.end)).collect(),
        }
    }
}

pub struct Journal {
    dir: PathBuf,
    files: Arc<dyn Files>,
    /// Set when the log was found removed or replaced under its name after
    /// a write (`write`): every change fails until a compaction has
    /// written every committed record again (`write_round`).
    log_gone: std::sync::atomic::AtomicBool,
    queue: Mutex<Queue>,
    cv: Condvar,
    writer: Mutex<Writer>,
}

/// Writes `torn` (the torn tail of the log) to the new file `keep`,
/// flushed; removed again when it cannot be written whole.
fn keep_torn(files: &dyn Files, keep: &Path, torn: &[u8]) -> Result<(), crate::os::OsError> {
    let k = files.open(keep, Open::CreateNew)?;
    files
        .write_at(&k, keep, torn, 0)
        .and_then(|_| files.sync(&k, keep))
        .inspect_err(|_| {
            let _ = files.remove_file(keep);
        })
}

/// How many copies of torn tails (`log-<G>.jsonl.torn-<time>`) start-up
/// keeps beside the log: the newest ones. Each crash that tore a write
/// leaves one (up to `MAX_TORN` bytes), and a berth killed again and again
/// while it writes (an OOM kill, a node that loses power) would otherwise
/// fill the state directory's filesystem with them, which the volumes
/// share.
pub const KEEP_TORN: usize = 8;

/// The time in the name of a copy of a torn tail, `log-<G>.jsonl.torn-<time>`
/// (None for any other name).
fn torn_copy_time(name: &str) -> Option<u128> {
    let (log, time) = name.split_once(".torn-")?;
    generation(log, "log-", ".jsonl")?;
    if time.is_empty() || !time.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    time.parse().ok()
}

/// Removes the copies of torn tails in `dir` but the newest `KEEP_TORN`
/// (by the time in their names), each named in a warning. A torn tail is
/// never an acknowledged change (see the module comment): its copy is kept
/// for inspection only. Nothing else is removed, and a copy that cannot be
/// removed is left (a warning), never stopping start-up.
fn prune_torn(files: &dyn Files, dir: &Path) {
    let entries = match files.read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "could not list the copies of torn tails of the state journal");
            return;
        }
    };
    let mut copies: Vec<(u128, PathBuf)> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| {
            let t = torn_copy_time(&e.file_name().to_string_lossy())?;
            Some((t, e.path()))
        })
        .collect();
    if copies.len() <= KEEP_TORN {
        return;
    }
    copies.sort();
    let old = copies.len() - KEEP_TORN;
    for (_, p) in copies.drain(..old) {
        match files.remove_file(&p) {
            Ok(()) => tracing::warn!(
                removed = %p.display(),
                kept = KEEP_TORN,
                "removed an old copy of a torn tail of the state journal (an interrupted write, never acknowledged): only the newest are kept"
            ),
            Err(e) => tracing::warn!(
                copy = %p.display(),
                error = %e,
                "could not remove an old copy of a torn tail of the state journal"
            ),
        }
    }
}

/// What `open` found.
pub struct Replay {
    pub journal: Journal,
    /// Every live record, in no particular order.
    pub records: Vec<Box<VolumeRecord>>,
    pub snapshots: Vec<Box<SnapshotRecord>>,
}

impl Journal {
    /// Opens the journal in `dir` (created if missing) and replays it: cuts
    /// a torn tail (kept beside the log), removes stale files, and makes
    /// what it replayed durable; any other damage is an error.
    pub fn open(dir: &Path, files: Arc<dyn Files>) -> Result<Replay, StateError> {
        if files.stat(dir).is_err() {
            files.create_dir(dir, 0o700).map_err(StateError::Os)?;
            if let Some(parent) = dir.parent() {
                files.sync_dir(parent).map_err(StateError::Os)?;
            }
        }
        // The disk's own copies of the newest snapshot and log are read
        // (around the page cache, see `make_durable`) while the page
        // cache's are parsed: the one waits for the disk, the other for
        // the CPU.
        let (s, early) = std::thread::scope(|sc| {
            let early = sc.spawn(|| DurableCopies::read(files.as_ref(), dir));
            let s = scan(files.as_ref(), dir);
            (s, early.join().ok().flatten())
        });
        let s = s?;
        if let Some(e) = s.error() {
            return Err(e);
        }
        for p in &s.stale {
            files.remove_file(p).map_err(StateError::Os)?;
        }
        let log_path = dir.join(log_name(s.gen));
        let file = files
            .open(&log_path, Open::CreateOrKeep)
            .map_err(StateError::Os)?;
        if let Some(t) = &s.torn {
            // The unacknowledged tail of the last write before a crash.
            // Kept beside the log for inspection, then cut off.
            let keep = dir.join(format!(
                "{}.torn-{}",
                log_name(s.gen),
                crate::driver::now_nanos()
            ));
            let torn = &s.log[t.offset as usize..];
            let kept = keep_torn(files.as_ref(), &keep, torn).or_else(|e| {
                if !matches!(e.errno(), Some(libc::ENOSPC | libc::EDQUOT)) {
                    return Err(e);
                }
                // A full filesystem (a tenant filled it, then the crash):
                // the space the log keeps past its end (`RESERVE`, taken
                // again below when there is room) is let go, the log's
                // bytes untouched, and the copy made in it.
                tracing::warn!(log = %log_path.display(), bytes = torn.len(), "no room to keep the torn tail of the state journal beside it: letting go of the space kept past the log's end for it");
                files
                    .set_len(&file, &log_path, s.log.len() as u64)
                    .and_then(|_| keep_torn(files.as_ref(), &keep, torn))
            });
            if let Err(e) = kept {
                // Nothing is cut without its copy: start-up stops (the
                // next start tries again), and leaves no copy that is not
                // whole.
                let _ = files.remove_file(&keep);
                return Err(StateError::Os(e));
            }
            files
                .set_len(&file, &log_path, t.offset)
                .map_err(StateError::Os)?;
            tracing::warn!(
                log = %log_path.display(),
                offset = t.offset,
                bytes = t.len,
                kept = %keep.display(),
                "cut an interrupted write off the end of the state journal (never acknowledged)"
            );
        }
        prune_torn(files.as_ref(), dir);
        if s.unterminated {
            // A whole change whose newline never reached the disk (or was
            // lost since): kept, and its line ended, so the next write
            // starts a line of its own.
            let at = s.log_good - 1;
            files
                .set_len(&file, &log_path, at)
                .and_then(|_| files.write_at(&file, &log_path, b"\n", at))
                .and_then(|_| files.sync(&file, &log_path))
                .map_err(StateError::Os)?;
            tracing::warn!(
                log = %log_path.display(),
                offset = at,
                "the last change in the state journal lacked its newline; it is whole (its checksum holds), so it is kept and its line ended"
            );
        }
        let early = early.filter(|e| e.gen == s.gen && s.torn.is_none() && !s.unterminated);
        let file = make_durable(files.as_ref(), dir, &s, file, early)?;
        // What a berth before this one kept past the end is still there
        // (allocated blocks, the size unchanged): counted, not taken again,
        // so a start on a full filesystem needs no new block.
        let allocated = file
            .metadata()
            .map_or(0, |m| crate::os::files::allocated_bytes(&m));
        let mut writer = Writer {
            file,
            gen: s.gen,
            len: s.log_good,
            snapshot_len: s.snapshot_len,
            compact_at: 0,
            min_compact: MIN_COMPACT,
            reserved: allocated.max(s.log_good),
            short: false,
            full: false,
        };
        writer.set_threshold();
        writer.top_up(files.as_ref(), &log_path);
        Ok(Replay {
            journal: Journal {
                dir: dir.to_path_buf(),
                files,
                log_gone: std::sync::atomic::AtomicBool::new(false),
                queue: Mutex::new(Queue::default()),
                cv: Condvar::new(),
                writer: Mutex::new(writer),
            },
            records: s.records.into_values().collect(),
            snapshots: s.snapshots.into_values().collect(),
        })
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `lines` (whole encoded lines) to be written; the ticket is
    /// for `wait`. Tickets are handed out in call order.
    pub fn enqueue(&self, lines: &[u8]) -> Result<Ticket, StateError> {
        let mut q = self.queue();
        if let Some(why) = &q.poisoned {
            return Err(StateError::Poisoned(why.clone()));
        }
        q.pending.extend_from_slice(lines);
        let end = q.pending.len();
        q.pending_ends.push_back(end);
        let t = q.next_ticket;
        q.next_ticket += 1;
        Ok(t)
    }

    /// Returns once the change of ticket `t` is durable. If its write
    /// failed, `undo` runs first (with no journal lock held), and only then
    /// is the failure forgotten, so a snapshot taken meanwhile still knows
    /// the change is not committed. `snapshot` is for compaction (see
    /// `SnapshotFn`); it is called with no journal lock held, when
    /// everything already written to the log is reflected in what it
    /// returns.
    pub fn wait(
        &self,
        t: Ticket,
        snapshot: SnapshotFn<'_>,
        undo: impl FnOnce(),
    ) -> Result<(), StateError> {
        let mut q = self.queue();
        loop {
            if q.done_below > t {
                let Some((start, f)) = q.failure_of(t) else {
                    return Ok(());
                };
                let (why, no_space) = (f.why.clone(), f.no_space);
                drop(q);
                undo();
                let mut q = self.queue();
                if let Some(f) = q.failed.get_mut(&start) {
                    f.unseen -= 1;
                    if f.unseen == 0 {
                        q.failed.remove(&start);
                    }
                }
                return Err(if no_space {
                    StateError::JournalFull(why)
                } else {
                    StateError::Journal(why)
                });
            }
            if q.writing {
                q = self.cv.wait(q).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            if let Some(why) = q.poisoned.clone() {
                // Queued before the journal was poisoned: never written (a
                // later flush could succeed over the lost one and leave a
                // hole that start-up would take for damage).
                q.pending.clear();
                q.pending_ends.clear();
                let (start, end) = (q.done_below, q.next_ticket);
                q.done_below = end;
                q.fail(start, end, why, false);
                self.cv.notify_all();
                continue;
            }
            q = self.write_round(q, snapshot);
        }
    }

    /// Writes everything queued as one round (the caller holds no other
    /// journal lock; `q` is the queue, not writing). Returns the queue.
    fn write_round<'a>(
        &'a self,
        mut q: MutexGuard<'a, Queue>,
        snapshot: SnapshotFn<'_>,
    ) -> MutexGuard<'a, Queue> {
        q.writing = true;
        let (batch, start, end) = q.take_round(MAX_ROUND);
        drop(q);
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let r = self.write(&mut w, &batch);
        let gone = self.log_gone.load(std::sync::atomic::Ordering::Relaxed);
        let compact = gone || (r.is_ok() && w.len >= w.compact_at);
        q = self.queue();
        q.done_below = end;
        if let Err((e, poison)) = r {
            let msg = crate::error::chain(&e);
            tracing::error!(error = %msg, poisoned = poison, "state journal write failed");
            if poison {
                q.poisoned = Some(msg.clone());
                self.mark_sync_failed();
            }
            q.fail(start, end, msg, e.is_no_space());
        }
        if compact {
            // The waiters of this round may go; later ones queue until the
            // log is switched.
            let committed = q.committed();
            self.cv.notify_all();
            drop(q);
            let poison = match self.compact(&mut w, &|| snapshot(&committed)) {
                Ok(()) => {
                    if gone {
                        self.log_gone
                            .store(false, std::sync::atomic::Ordering::Relaxed);
                        tracing::error!(generation = w.gen, "the state journal's log had been removed or replaced while berth was running; every committed record was written again from memory as a new generation (the change in flight was not acknowledged)");
                    }
                    None
                }
                Err((e, true)) => {
                    let e = crate::error::chain(&e);
                    tracing::error!(error = %e, "state journal compaction failed after its snapshot was in place; no further changes until a restart");
                    Some(e)
                }
                Err((e, false)) => {
                    // The old log is still whole and current; try again
                    // after it has grown by half as much again. (A log
                    // found gone is tried again at the next change.)
                    w.compact_at = w.len + w.compact_at / 2;
                    tracing::warn!(error = %crate::error::chain(&e), "state journal compaction failed; continuing with the old log");
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
        q
    }

    /// Writes one batch and flushes it. A failed write is cut off again; an
    /// error says whether the journal must be poisoned.
    fn write(&self, w: &mut Writer, batch: &[u8]) -> Result<(), (StateError, bool)> {
        let path = self.dir.join(log_name(w.gen));
        let f = self.files.as_ref();
        if let Err(e) = f.write_at(&w.file, &path, batch, w.len) {
            // (the cut frees the reserve past it too: taken again)
            let undo = f
                .set_len(&w.file, &path, w.len)
                .and_then(|_| f.sync_data(&w.file, &path));
            w.reserved = w.len;
            if undo.is_ok() {
                w.top_up(f, &path);
            }
            return Err((StateError::Os(e), undo.is_err()));
        }
        if let Err(e) = f.sync_data(&w.file, &path) {
            // The batch is not acknowledged: cut it off, so a restart (which
            // replays the page cache) does not bring it back either. The
            // journal is poisoned all the same: what the disk holds of the
            // file is uncertain until start-up has checked it.
            let _ = f.set_len(&w.file, &path, w.len);
            w.reserved = w.len;
            return Err((StateError::Os(e), true));
        }
        // Durable, but in the file this berth has open: if that is no longer
        // the log (removed, or replaced, by hand), start-up would never read
        // it. Not acknowledged then; `write_round` writes every committed
        // record again as a new generation.
        match f.still_named(&w.file, &path) {
            Ok(true) => {}
            Ok(false) => {
                self.log_gone
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                return Err((
                    StateError::Journal(format!(
                        "the state journal's log {} was removed or replaced while berth was running; this change is not acknowledged",
                        path.display()
                    )),
                    false,
                ));
            }
            Err(e) => {
                tracing::warn!(error = %crate::error::chain(&e), "could not tell whether the state journal's log is still in place");
            }
        }
        w.len += batch.len() as u64;
        w.reserved = w.reserved.max(w.len);
        w.top_up(f, &path);
        Ok(())
    }

    /// After a failed flush: leaves a mark for the next start (best
    /// effort; `make_durable` does not depend on it).
    fn mark_sync_failed(&self) {
        let p = self.dir.join(SYNC_FAILED);
        if let Ok(f) = self.files.open(&p, Open::CreateOrTruncate) {
            let _ = self
                .files
                .write_at(&f, &p, b"a flush of the state journal failed\n", 0);
        }
    }

    /// Starts the next generation: a snapshot of every committed record and
    /// an empty log with its reserve (`RESERVE`); the old files are removed
    /// after. Until the snapshot is renamed into place nothing has changed
    /// (a failure, a full filesystem included, cleans up and the old log
    /// stays current, with its own reserve); once it is, only the new log
    /// may be written, so a failure to make that durable poisons the
    /// journal (no write can then land in a log that start-up would not
    /// read). A log found gone is replaced without a reserve when none can
    /// be had (nothing could be written otherwise), and so is any log whose
    /// reserve fails for another reason than space (a filesystem without
    /// fallocate would otherwise never compact).
    fn compact(
        &self,
        w: &mut Writer,
        snapshot: &dyn Fn() -> Result<Vec<u8>, StateError>,
    ) -> Result<(), (StateError, bool)> {
        let gen = w.gen + 1;
        let bytes = snapshot().map_err(|e| (e, false))?;
        if self.log_gone.load(std::sync::atomic::Ordering::Relaxed) {
            // The journal directory may have gone with the log.
            let made = crate::os::files::ensure_dir(self.files.as_ref(), &self.dir, 0o700)
                .map_err(|e| (StateError::Os(e), false))?;
            if let (true, Some(parent)) = (made, self.dir.parent()) {
                self.files
                    .sync_dir(parent)
                    .map_err(|e| (StateError::Os(e), false))?;
            }
        }
        let path = self.dir.join(snapshot_name(gen));
        let tmp = self.dir.join(format!("{}.tmp", snapshot_name(gen)));
        let log_path = self.dir.join(log_name(gen));
        let f = self.files.as_ref();
        let gone = self.log_gone.load(std::sync::atomic::Ordering::Relaxed);
        let mut reserved = RESERVE;
        let prepared = f
            .open(&tmp, Open::CreateOrTruncate)
            .and_then(|t| {
                f.write_at(&t, &tmp, &bytes, 0)
                    .and_then(|_| f.sync(&t, &tmp))
            })
            .and_then(|_| f.open(&log_path, Open::CreateOrTruncate))
            .and_then(|file| match f.reserve(&file, &log_path, 0, RESERVE) {
                // Short of space: the old log keeps its reserve instead.
                // Anything else (a filesystem without fallocate) would
                // stop every compaction for good.
                Err(e) if gone || !matches!(e.errno(), Some(libc::ENOSPC | libc::EDQUOT)) => {
                    tracing::warn!(log = %log_path.display(), error = %e, "cannot keep space past the end of the state journal's new log");
                    reserved = 0;
                    Ok(file)
                }
                r => r.map(|_| file),
            })
            .and_then(|file| f.rename(&tmp, &path).map(|_| file));
        let file = match prepared {
            Ok(file) => file,
            Err(e) => {
                let _ = f.remove_file(&tmp);
                let _ = f.remove_file(&log_path);
                return Err((StateError::Os(e), false));
            }
        };
        f.sync_dir(&self.dir)
            .map_err(|e| (StateError::Os(e), true))?;
        // only once the snapshot's name is durable: a guard never stands
        // where its snapshot is not
        if let Err(e) = write_downgrade_guard(f, &self.dir, gen).and_then(|_| f.sync_dir(&self.dir))
        {
            tracing::warn!(error = %e, "could not write the guard that stops a berth from before binary snapshots on this state");
        }
        let old = w.gen;
        *w = Writer {
            file,
            gen,
            len: 0,
            snapshot_len: bytes.len() as u64,
            compact_at: 0,
            min_compact: w.min_compact,
            reserved,
            short: reserved == 0,
            full: false,
        };
        w.set_threshold();
        for name in [snapshot_name(old), json_snapshot_name(old), log_name(old)] {
            let p = self.dir.join(name);
            if f.stat(&p).is_ok() {
                let _ = f.remove_file(&p);
            }
        }
        tracing::debug!(
            generation = gen,
            snapshot_bytes = bytes.len(),
            "state journal compacted"
        );
        Ok(())
    }

    /// Compacts now if the log holds at least `min_log` bytes and no round
    /// is being written (at exit, so that the next start reads a snapshot
    /// instead of replaying the log). Changes queued meanwhile wait and go
    /// to the new log, as during any compaction. Returns whether it did.
    pub fn checkpoint(&self, min_log: u64, snapshot: SnapshotFn<'_>) -> Result<bool, StateError> {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let mut q = self.queue();
        if q.poisoned.is_some() || q.writing || w.len < min_log.max(1) {
            return Ok(false);
        }
        q.writing = true;
        let committed = q.committed();
        drop(q);
        let r = self.compact(&mut w, &|| snapshot(&committed));
        drop(w);
        let mut q = self.queue();
        if let Err((e, true)) = &r {
            q.poisoned = Some(crate::error::chain(e));
        }
        q.writing = false;
        self.cv.notify_all();
        r.map(|()| true).map_err(|(e, _)| e)
    }

    /// Writes a snapshot of `records` as generation G+1 at once (importing
    /// records of the older one-file-per-volume layout; `repair`).
    pub fn rebase(
        &self,
        snapshot: &dyn Fn() -> Result<Vec<u8>, StateError>,
    ) -> Result<(), StateError> {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        self.compact(&mut w, snapshot).map_err(|(e, poison)| {
            if poison {
                self.queue().poisoned = Some(crate::error::chain(&e));
            }
            e
        })
    }

    /// Takes the space kept past the end of the log again if less than
    /// half of it is left (`Writer::top_up`), without waiting for the next
    /// change: called once storage was removed, so that the space a delete
    /// freed refills the reserve before a tenant can take it again. A
    /// no-op while the reserve is whole; best effort.
    pub fn keep_reserve(&self) {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let path = self.dir.join(log_name(w.gen));
        w.top_up(self.files.as_ref(), &path);
    }

    /// Less than half of the space kept past the end of the log is left
    /// and the filesystem has no room to take it again (ENOSPC, EDQUOT;
    /// tried again now, when the last top-up failed: space may have come
    /// back without a change written since): what is left is for the
    /// changes that give space back. Never for a filesystem that keeps no
    /// space ahead at all (no fallocate).
    pub fn reserve_short(&self) -> bool {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if w.short && w.full {
            let path = self.dir.join(log_name(w.gen));
            w.top_up(self.files.as_ref(), &path);
        }
        w.short && w.full
    }

    /// Current generation and log length (for tests and metrics).
    pub fn position(&self) -> (u64, u64) {
        let w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        (w.gen, w.len)
    }

    /// Set when a failed fdatasync stopped all changes, or while the log
    /// found removed has not been written again (`log_gone`).
    pub fn poisoned(&self) -> Option<String> {
        if self.log_gone.load(std::sync::atomic::Ordering::Relaxed) {
            return Some(format!(
                "the log in {} was removed or replaced while berth was running and could not be written again yet",
                self.dir.display()
            ));
        }
        self.queue().poisoned.clone()
    }

    /// Holds the writer (tests: a round then blocks before its write).
    #[cfg(test)]
    pub fn writer_for_test(&self) -> MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a round is being written (tests).
    #[cfg(test)]
    pub fn writing(&self) -> bool {
        self.queue().writing
    }

    /// Changes handed a ticket so far (tests).
    #[cfg(test)]
    pub fn queued(&self) -> u64 {
        self.queue().next_ticket
    }

    /// Failed rounds still waiting for a waiter to see them (tests).
    #[cfg(test)]
    pub fn unseen_failures(&self) -> usize {
        self.queue().failed.len()
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

/// The mark a failed flush leaves in the journal directory.
const SYNC_FAILED: &str = "sync-failed";

/// Makes sure the disk holds what start-up replayed: the current snapshot
/// and the first `good` bytes of the log. Each is read back from the disk
/// itself (bypassing the page cache); a log the disk does not hold as
/// replayed is written again (temp file, fsync, rename, directory fsync). A
/// snapshot the disk does not hold is an error (it was renamed into place
/// only after its fsync succeeded, so the disk itself is failing). Where the
/// filesystem cannot read around its cache (tmpfs), fsync is all there is.
/// Returns the log file to append to.
fn make_durable(
    files: &dyn Files,
    dir: &Path,
    s: &Scan,
    file: File,
    early: Option<DurableCopies>,
) -> Result<File, StateError> {
    let gen = s.gen;
    let (early_snapshot, early_log) = match early {
        Some(e) => (Some(e.snapshot), e.log),
        None => (None, None),
    };
    let good = &s.log[..s.log_good as usize];
    let log_path = dir.join(log_name(gen));
    if let (Some(cached), Some(snap)) = (&s.snapshot, &s.snapshot_path) {
        if durable_differs(files, snap, cached, early_snapshot)? {
            return Err(StateError::Unexpected {
                path: snap.clone(),
                why: "the disk does not hold what the page cache shows (a failed write); restore the state directory from a backup".into(),
            });
        }
    }
    let mark = dir.join(SYNC_FAILED);
    if durable_differs(files, &log_path, good, early_log)? || files.stat(&mark).is_ok() {
        tracing::warn!(log = %log_path.display(), "the state journal on disk differs from what was replayed (a flush failed before the restart); writing it again");
        let tmp = dir.join(format!("{}.tmp", log_name(gen)));
        let t = files
            .open(&tmp, Open::CreateOrTruncate)
            .map_err(StateError::Os)?;
        files
            .write_at(&t, &tmp, good, 0)
            .and_then(|_| files.sync(&t, &tmp))
            .and_then(|_| files.rename(&tmp, &log_path))
            .and_then(|_| files.sync_dir(dir))
            .map_err(StateError::Os)?;
        drop(file);
        if files.stat(&mark).is_ok() {
            files.remove_file(&mark).map_err(StateError::Os)?;
        }
        return files
            .open(&log_path, Open::Existing)
            .map_err(StateError::Os);
    }
    files.sync(&file, &log_path).map_err(StateError::Os)?;
    files.sync_dir(dir).map_err(StateError::Os)?;
    Ok(file)
}

/// Whether the disk's copy of `path` (read around the page cache, or as
/// read `early`) differs from `expected`. False when the filesystem cannot
/// tell.
fn durable_differs(
    files: &dyn Files,
    path: &Path,
    expected: &[u8],
    early: Option<Result<Option<Vec<u8>>, crate::os::OsError>>,
) -> Result<bool, StateError> {
    let disk = match early {
        Some(r) => r,
        None => files.read_durable(path),
    };
    match disk.map_err(StateError::Os)? {
        None => Ok(false),
        Some(disk) => Ok(disk != expected),
    }
}

/// The disk's copies of the newest generation's snapshot and log, read
/// while start-up parses them.
struct DurableCopies {
    gen: u64,
    snapshot: Result<Option<Vec<u8>>, crate::os::OsError>,
    /// None when the log was too big to read beside `scan`'s copy
    /// (`EARLY_LOG_MAX`): `make_durable` reads it then, if it gets there.
    log: Option<Result<Option<Vec<u8>>, crate::os::OsError>>,
}

/// The biggest log read early, beside `scan`'s own copy: a log larger than
/// that (far beyond any compaction threshold: grown by hand, or while
/// compaction kept failing) is read once at a time, so start-up never
/// holds two copies of it.
const EARLY_LOG_MAX: u64 = 256 << 20;

impl DurableCopies {
    /// None when the directory cannot be listed (`scan` says why).
    fn read(files: &dyn Files, dir: &Path) -> Option<DurableCopies> {
        // the newest generation, its binary snapshot before a JSON one
        // (as `scan` chooses)
        let mut newest = None;
        for e in files.read_dir(dir).ok()? {
            let e = e.ok()?;
            // (what is not a regular file is damage: `scan` reports it)
            if !e.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            if let Some(g) = e.file_name().to_str().and_then(snapshot_generation) {
                newest = newest.max(Some(g));
            }
        }
        let (gen, binary) = newest.unwrap_or((0, true));
        let name = if binary {
            snapshot_name(gen)
        } else {
            json_snapshot_name(gen)
        };
        let snapshot = files.read_durable(&dir.join(name));
        let log_path = dir.join(log_name(gen));
        let log = files
            .lstat(&log_path)
            .map_or(true, |m| m.len() <= EARLY_LOG_MAX)
            .then(|| files.read_durable(&log_path));
        Some(DurableCopies { gen, snapshot, log })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::os::files::RealFiles;
    use std::fs;

    type Hook = Box<dyn FnMut(&Path)>;

    thread_local! {
        /// Runs in `scan_once` between listing the journal and reading it
        /// (what a serving berth may do to it meanwhile).
        static AFTER_LISTING: std::cell::RefCell<Option<Hook>> = const { std::cell::RefCell::new(None) };
    }

    pub(crate) fn after_listing(dir: &Path) {
        AFTER_LISTING.with(|h| {
            if let Some(f) = h.borrow_mut().as_mut() {
                f(dir)
            }
        })
    }

    /// A volume record of id `id`.
    fn volume(id: &str, seq: u64) -> VolumeRecord {
        serde_json::from_str(&format!(
            r#"{{"id":"{id}","name":"n-{id}","kind":"local","seq":{seq},"phase":"ready","capacity_bytes":1,"node":"x","parameters":{{}},"capabilities":[],"created_unix":0}}"#
        ))
        .unwrap()
    }

    /// Every single bit flipped anywhere in a log of whole records, in
    /// turn: start-up never takes the log for sound with a record lost or
    /// changed. Either the flip is reported as damage, or what replays is
    /// exactly what was written (a flip in a checksum's hex digit that
    /// only changes its case).
    #[test]
    fn no_single_bit_flip_drops_or_changes_a_record_silently() {
        let recs: Vec<VolumeRecord> = (1..=2)
            .map(|i| volume(&format!("local-{}", i.to_string().repeat(32)), i))
            .collect();
        let mut log = Vec::new();
        for r in &recs {
            encode(&EntryRef::Put(r), &mut log).unwrap();
        }
        encode(&EntryRef::Del(&recs[0].id), &mut log).unwrap();
        let want = |s: &Scan| {
            let got: Vec<&VolumeRecord> = s.records.values().collect();
            got == [&recs[1]]
        };
        assert!(want(&scan_log(&log)));
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join(log_name(0));
        let mut silent = Vec::new();
        for at in 0..log.len() {
            // the lowest bit, a case bit (hex digits), a bit that makes
            // a NUL of a space, the highest bit
            for bit in [0, 3, 5, 7] {
                let mut bytes = log.clone();
                bytes[at] ^= 1 << bit;
                fs::write(&path, &bytes).unwrap();
                let s = scan(&RealFiles, d.path()).unwrap();
                if s.damage.is_empty() && s.torn.is_none() && !want(&s) {
                    silent.push((at, bit));
                }
                // A torn tail is only what a crash leaves: never a flip.
                if s.damage.is_empty() && s.torn.is_some() {
                    silent.push((at, bit));
                }
            }
        }
        assert!(silent.is_empty(), "flips taken for a sound log: {silent:?}");
    }

    /// A snapshot holding two records of one id (berth writes each record
    /// once there: a snapshot written by hand, or joined from two) is
    /// damage naming the second, binary or JSON lines, volume or snapshot
    /// record alike: which of the two holds is unknown. Before, the second
    /// silently replaced the first (the first record's volume, here its
    /// name and size, was gone without a word).
    #[test]
    fn a_snapshot_holding_an_id_twice_is_damage() {
        let a = volume("local-11111111111111111111111111111111", 1);
        let mut a2 = volume("local-11111111111111111111111111111111", 2);
        a2.name = "other".into();
        a2.capacity_bytes = 7;
        let snap: SnapshotRecord = serde_json::from_str(
            r#"{"id":"snap-1","name":"s","kind":"local","seq":1,"phase":"ready","source_volume_id":"v","size_bytes":1,"node":"x","created_secs":0,"created_nanos":0}"#,
        )
        .unwrap();
        let mut w = snapshot_file::Writer::new(2);
        w.volume(&a).unwrap();
        w.volume(&a2).unwrap();
        w.snapshot(&snap).unwrap();
        w.snapshot(&snap).unwrap();
        let bin = w.finish().unwrap();
        let mut json = Vec::new();
        for e in [
            EntryRef::Put(&a),
            EntryRef::Put(&a2),
            EntryRef::Snap(&snap),
            EntryRef::Snap(&snap),
        ] {
            encode(&e, &mut json).unwrap();
        }
        for (name, bytes) in [(snapshot_name(1), bin), (json_snapshot_name(1), json)] {
            let d = tempfile::tempdir().unwrap();
            fs::write(d.path().join(&name), &bytes).unwrap();
            fs::write(d.path().join(log_name(1)), b"").unwrap();
            let s = scan(&RealFiles, d.path()).unwrap();
            let why: Vec<&str> = s.damage.iter().map(|d| d.why.as_str()).collect();
            assert_eq!(s.damage.len(), 2, "{name}: {why:?}");
            assert!(
                why[0].contains(&format!("second record of volume {}", a.id)),
                "{why:?}"
            );
            assert!(
                why[1].contains("second record of snapshot snap-1"),
                "{why:?}"
            );
            // (the binary file's frames 1-3 are the values they share)
            let unit = if name.ends_with(".bin") { 5 } else { 2 };
            assert_eq!(s.damage[0].line, unit, "{name}");
            assert!(s.error().is_some());
            // repair keeps the first, and says which id it drops
            let kept: Vec<&VolumeRecord> = s.records.values().collect();
            assert_eq!(kept, [&a]);
            assert_eq!(s.dropped[0].id_hint.as_deref(), Some(a.id.as_str()));
        }
    }

    /// A log cut short at any byte (a crash, a copy cut off) replays
    /// exactly the changes of its whole lines: a cut inside a line is a
    /// torn tail (never damage, never a change), a cut that takes only the
    /// last newline keeps that change. Found no defect.
    #[test]
    fn a_log_cut_anywhere_replays_exactly_its_whole_lines() {
        let recs: Vec<VolumeRecord> = (1..=3)
            .map(|i| volume(&format!("local-{}", i.to_string().repeat(32)), i))
            .collect();
        let entries = [
            EntryRef::Put(&recs[0]),
            EntryRef::Put(&recs[1]),
            EntryRef::Del(&recs[0].id),
            EntryRef::Put(&recs[2]),
        ];
        let mut log = Vec::new();
        let mut ends = Vec::new();
        for e in &entries {
            encode(e, &mut log).unwrap();
            ends.push(log.len());
        }
        let live_after = |n: usize| -> Vec<&VolumeRecord> {
            match n {
                0 => vec![],
                1 => vec![&recs[0]],
                2 => vec![&recs[0], &recs[1]],
                3 => vec![&recs[1]],
                _ => vec![&recs[1], &recs[2]],
            }
        };
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join(log_name(0));
        for cut in 0..=log.len() {
            fs::write(&path, &log[..cut]).unwrap();
            let s = scan(&RealFiles, d.path()).unwrap();
            assert!(s.damage.is_empty(), "cut at {cut}: {:?}", s.damage);
            let whole = ends.iter().filter(|&&e| e <= cut + 1).count();
            let mut got: Vec<&VolumeRecord> = s.records.values().collect();
            got.sort_by_key(|r| r.seq);
            assert_eq!(got, live_after(whole), "cut at {cut}");
            let at_end = cut == 0 || ends.contains(&cut);
            assert_eq!(
                s.torn.is_none(),
                at_end || ends.contains(&(cut + 1)),
                "cut at {cut}"
            );
            assert_eq!(s.unterminated, ends.contains(&(cut + 1)), "cut at {cut}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]
        /// Hostile edits of a log (bytes changed, inserted or removed,
        /// lines repeated, invalid UTF-8, huge strings): the loader never
        /// panics, and whatever it replays is a record that was written,
        /// never one made up of damaged bytes. Found no defect.
        #[test]
        fn a_log_edited_at_random_never_panics_nor_makes_up_a_record(
            edits in proptest::collection::vec((0usize..4, 0usize..4096, proptest::prelude::any::<u8>(), 0usize..300), 1..6)
        ) {
            let big = "\u{fffd}".repeat(2000);
            let mut recs: Vec<VolumeRecord> = (1..=3)
                .map(|i| volume(&format!("local-{}", i.to_string().repeat(32)), i))
                .collect();
            recs[2].name = big;
            let mut log = Vec::new();
            for r in &recs {
                encode(&EntryRef::Put(r), &mut log).unwrap();
            }
            encode(&EntryRef::Del(&recs[0].id), &mut log).unwrap();
            for (op, at, byte, len) in edits {
                let at = at % (log.len() + 1);
                match op {
                    0 => {
                        if at < log.len() {
                            log[at] = byte;
                        }
                    }
                    1 => {
                        let ins = vec![byte; len];
                        log.splice(at..at, ins);
                    }
                    2 => {
                        let end = (at + len).min(log.len());
                        log.drain(at..end);
                    }
                    _ => {
                        // repeat the line at `at`
                        let start = log[..at].iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
                        let end = log[at..].iter().position(|&b| b == b'\n').map_or(log.len(), |i| at + i + 1);
                        let line = log[start..end].to_vec();
                        log.splice(end..end, line);
                    }
                }
            }
            let s = scan_log(&log);
            for r in s.records.values() {
                proptest::prop_assert!(recs.contains(r), "made up: {r:?}");
            }
            let _ = s.error();
        }
    }

    /// Several damaged lines in a log are each reported (file, line,
    /// byte), as `state check` promises ("every flaw"): the operator
    /// decides on `state repair` knowing every line it drops. Before, only
    /// the first was named (with "valid changes follow it"): a later
    /// damaged line, a `del` among them, went unnamed until repair dropped
    /// it.
    #[test]
    fn every_damaged_line_of_a_log_is_reported() {
        let ids = ["a", "b", "c", "d", "e", "f"];
        let mut lines: Vec<Vec<u8>> = ids.iter().map(|i| line(&EntryRef::Del(i))).collect();
        for k in [1, 3, 5] {
            lines[k][11] ^= 1;
        }
        let at = |k: usize| lines[..k].iter().map(Vec::len).sum::<usize>() as u64;
        let s = scan_log(&lines.concat());
        let named: Vec<(u64, u64)> = s.damage.iter().map(|d| (d.line, d.offset)).collect();
        assert_eq!(
            named,
            [(2, at(1)), (4, at(3)), (6, at(5))],
            "{:?}",
            s.damage
        );
        assert_eq!(s.dropped.len(), 3);
        assert!(s.torn.is_none());
        // and the error start-up stops with counts them
        let e = s.error().unwrap().to_string();
        assert!(
            e.contains("line 2") && e.contains("and 2 more flaws"),
            "{e}"
        );
    }

    /// The advice of a damaged journal's error names only ways out that
    /// exist: no tool loads `state export`'s output back, so it is not the
    /// backup to restore from (before, the error called it one).
    #[test]
    fn the_advice_for_a_damaged_journal_names_no_restore_from_an_export() {
        let mut log = line(&EntryRef::Del("a"));
        log[12] ^= 1;
        log.extend(line(&EntryRef::Del("b")));
        let e = scan_log(&log).error().expect("damage").to_string();
        assert!(
            e.contains("berth state repair") && e.contains("no tool loads them back"),
            "{e}"
        );
        assert!(!e.contains("backup (`berth state export`)"), "{e}");
    }

    /// A serving berth that compacts its journal while `state export` or
    /// `state check` reads it: the reader's listing names the old log,
    /// which is gone when it is read. The journal is read again, and every
    /// record is there. Before, the vanished log read as an empty journal
    /// (0 records, no damage: `state export` printed an empty backup with
    /// exit code 0), or a vanished snapshot stopped the reader.
    #[test]
    fn a_journal_compacted_while_it_is_read_is_read_again_whole() {
        let recs: Vec<VolumeRecord> = (1..=3)
            .map(|i| volume(&format!("local-{}", i.to_string().repeat(32)), i))
            .collect();
        for from_gen in [0u64, 4] {
            let d = tempfile::tempdir().unwrap();
            let mut log = Vec::new();
            for r in &recs {
                encode(&EntryRef::Put(r), &mut log).unwrap();
            }
            if from_gen > 0 {
                // generation 4: the records in its snapshot, its log empty
                let mut w = snapshot_file::Writer::new(recs.len());
                for r in &recs {
                    w.volume(r).unwrap();
                }
                fs::write(d.path().join(snapshot_name(from_gen)), w.finish().unwrap()).unwrap();
                log.clear();
            }
            fs::write(d.path().join(log_name(from_gen)), &log).unwrap();
            // The compaction, once, between the first listing and reading.
            let recs2 = recs.clone();
            let mut done = false;
            AFTER_LISTING.with(|h| {
                *h.borrow_mut() = Some(Box::new(move |dir: &Path| {
                    if std::mem::replace(&mut done, true) {
                        return;
                    }
                    let next = from_gen + 1;
                    let mut w = snapshot_file::Writer::new(recs2.len());
                    for r in &recs2 {
                        w.volume(r).unwrap();
                    }
                    fs::write(dir.join(log_name(next)), b"").unwrap();
                    fs::write(dir.join(snapshot_name(next)), w.finish().unwrap()).unwrap();
                    fs::remove_file(dir.join(log_name(from_gen))).unwrap();
                    let _ = fs::remove_file(dir.join(snapshot_name(from_gen)));
                }))
            });
            let s = scan(&RealFiles, d.path());
            AFTER_LISTING.with(|h| *h.borrow_mut() = None);
            let s = s.unwrap_or_else(|e| panic!("from generation {from_gen}: {e}"));
            assert!(s.damage.is_empty(), "{:?}", s.damage);
            assert_eq!(s.gen, from_gen + 1);
            assert_eq!(s.records.values().count(), 3, "from generation {from_gen}");
        }
    }

    fn line(e: &EntryRef<'_>) -> Vec<u8> {
        let mut v = Vec::new();
        encode(e, &mut v).unwrap();
        v
    }

    #[test]
    fn lines_round_trip_and_damage_is_detected() {
        let out = line(&EntryRef::Del("a b\nc"));
        assert!(matches!(decode(&out), Line::Entry(Entry::Del(id)) if id == "a b\nc"));
        // Exactly one newline, at the end: ids with newlines are escaped.
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
        let mut flipped = out.clone();
        flipped[12] ^= 1;
        assert!(matches!(decode(&flipped), Line::Damaged));
        assert!(matches!(decode(&out[..out.len() - 1]), Line::Damaged));
        // A valid checksum over something that is not an entry.
        let json = b"{\"nope\":1}";
        let mut odd = format!("{:08x} ", crc32fast::hash(json)).into_bytes();
        odd.extend_from_slice(json);
        odd.push(b'\n');
        assert!(matches!(decode(&odd), Line::NotAnEntry(_)));
        // And over bytes that are not UTF-8 (in an id, and outside strings).
        for json in [&b"{\"del\":\"a\xff\"}"[..], b"{\"del\":\"a\"}\xc3"] {
            let mut odd = format!("{:08x} ", crc32fast::hash(json)).into_bytes();
            odd.extend_from_slice(json);
            odd.push(b'\n');
            assert!(
                matches!(decode(&odd), Line::NotAnEntry(ref e) if e.contains("UTF-8")),
                "{:?}",
                decode(&odd)
            );
        }
    }

    /// The journal is listed, looked at and read through the OS layer
    /// (`scan`, and `Journal::open`'s look for its directory): a listing,
    /// a look at a newer log or a read that fails is an error, never an
    /// empty journal.
    #[test]
    fn the_journal_is_read_through_the_os_layer() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join(log_name(0)), b"").unwrap();
        fs::write(d.path().join(log_name(1)), b"").unwrap();
        let (os, fake) = crate::os::Os::fake();
        let files = os.files.as_ref();
        let s = scan(files, d.path()).unwrap();
        assert_eq!(s.stale, [d.path().join(log_name(1))]);
        for op in ["read_dir", "lstat", "read"] {
            fake.fail_next(op, libc::EIO);
            let e = scan(files, d.path()).err();
            assert!(
                matches!(&e, Some(StateError::Io { source, .. }) if source.raw_os_error() == Some(libc::EIO)),
                "{op}: {e:?}"
            );
        }
        assert!(scan(files, d.path()).is_ok());
        fake.fail_next("stat", libc::EIO);
        assert!(Journal::open(d.path(), os.files.clone()).is_err());
        assert!(Journal::open(d.path(), os.files.clone()).is_ok());
    }

    fn scan_log(bytes: &[u8]) -> Scan {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join(log_name(0)), bytes).unwrap();
        scan(&RealFiles, d.path()).unwrap()
    }

    /// Which damaged regions count as the torn tail of a crash and which
    /// stop start-up.
    #[test]
    fn only_an_interrupted_write_at_the_end_is_a_torn_tail() {
        let a = line(&EntryRef::Del("a"));
        let b = line(&EntryRef::Del("b"));
        let ok = [a.clone(), b.clone()].concat();
        // Cut short.
        let s = scan_log(&[&ok[..], &b[..5]].concat());
        assert!(s.damage.is_empty());
        assert_eq!(
            s.torn,
            Some(Torn {
                offset: ok.len() as u64,
                len: 5
            })
        );
        // Sectors that never reached the disk: NULs from a sector
        // boundary to the end, newline included.
        let long = line(&EntryRef::Del(&"b".repeat(1200)));
        let start = 512 - ok.len() % 512;
        let mut holey = long.clone();
        holey[start..].fill(0);
        let s = scan_log(&[&ok[..], &holey[..]].concat());
        assert!(s.damage.is_empty(), "{:?}", s.damage);
        assert_eq!(s.log_good, ok.len() as u64);
        // ... or to the next boundary, with the newline written.
        let mut holey = long.clone();
        holey[start..start + 512].fill(0);
        let s = scan_log(&[&ok[..], &holey[..]].concat());
        assert!(s.damage.is_empty(), "{:?}", s.damage);
        assert!(s.torn.is_some());
        // NULs that no sector boundary explains: changed bytes.
        let mut nul = long.clone();
        nul[start + 3..start + 9].fill(0);
        let s = scan_log(&[&ok[..], &nul[..]].concat());
        assert_eq!(s.damage.len(), 1, "{:?}", s.damage);
        assert!(s.torn.is_none());
        let mut holey = b.clone();
        holey[3..9].fill(0);
        // A whole line with a flipped bit at the end: changed bytes.
        let mut flipped = b.clone();
        flipped[12] ^= 1;
        let s = scan_log(&[&a[..], &flipped[..]].concat());
        assert_eq!(s.damage.len(), 1, "{:?}", s.damage);
        assert_eq!(s.damage[0].offset, a.len() as u64);
        assert_eq!(s.damage[0].line, 2);
        // Damage in the middle, valid lines after: never a tail.
        let s = scan_log(&[&a[..], &holey[..], &b[..]].concat());
        assert_eq!(s.damage.len(), 1);
        assert_eq!(s.damage[0].offset, a.len() as u64);
        assert!(s.damage[0].why.contains("valid changes follow"));
        assert!(s.torn.is_none());
        let e = s.error().unwrap().to_string();
        assert!(
            e.contains(&d_log_name()) && e.contains("byte") && e.contains("berth state repair"),
            "{e}"
        );
    }

    /// A round takes the changes queued first up to the bound, at least
    /// one however big, and leaves the rest, with their tickets, queued.
    #[test]
    fn a_round_takes_at_most_its_bound_and_at_least_one_change() {
        let mut q = Queue::default();
        for (t, size) in [(0u8, 6usize), (1, 6), (2, 30), (3, 2)] {
            q.pending.extend(std::iter::repeat_n(b'a' + t, size));
            let end = q.pending.len();
            q.pending_ends.push_back(end);
            q.next_ticket += 1;
        }
        let (b, s, e) = q.take_round(16);
        assert_eq!((b, s, e), (b"aaaaaabbbbbb".to_vec(), 0, 2));
        q.done_below = e;
        let (b, s, e) = q.take_round(16);
        assert_eq!(
            (b.len(), s, e),
            (30, 2, 3),
            "a change over the bound goes alone"
        );
        assert!(b.iter().all(|&c| c == b'c'));
        q.done_below = e;
        let (b, s, e) = q.take_round(16);
        assert_eq!((b, s, e), (b"dd".to_vec(), 3, 4));
        assert!(q.pending.is_empty() && q.pending_ends.is_empty());
        q.done_below = e;
        let (b, s, e) = q.take_round(16);
        assert_eq!((b.len(), s, e), (0, 4, 4), "nothing queued: an empty round");
    }

    /// A tail without a whole line that is longer than any round is damage,
    /// not a torn tail to cut off (a log padded by hand).
    #[test]
    fn a_tail_longer_than_any_write_is_damage() {
        let ok = line(&EntryRef::Del("a"));
        let s = scan_log(&[&ok[..], &vec![0u8; MAX_ROUND][..]].concat());
        assert!(s.damage.is_empty(), "{:?}", s.damage);
        assert_eq!(s.torn.as_ref().map(|t| t.len), Some(MAX_ROUND as u64));
        let s = scan_log(&[&ok[..], &vec![0u8; MAX_TORN + 1][..]].concat());
        assert!(s.torn.is_none());
        assert_eq!(s.damage.len(), 1, "{:?}", s.damage);
        assert_eq!(s.damage[0].offset, ok.len() as u64);
        assert!(
            s.damage[0].why.contains("not the torn tail"),
            "{:?}",
            s.damage
        );
        assert!(s.dropped.iter().all(|d| d.id_hint.is_none()));
    }

    fn d_log_name() -> String {
        log_name(0)
    }

    /// Changes queued behind a write whose flush poisons the journal are
    /// never written: they fail, and the log holds only what came before.
    #[test]
    fn nothing_queued_is_written_once_poisoned() {
        let d = tempfile::tempdir().unwrap();
        let j = Arc::new(
            Journal::open(d.path(), Arc::new(RealFiles))
                .unwrap()
                .journal,
        );
        let none = |_: &Committed| -> Result<Vec<u8>, StateError> { Ok(Vec::new()) };
        // Hold the writer: the first commit takes its batch and blocks.
        let held = j.writer.lock().unwrap();
        let (a, b) = (line(&EntryRef::Del("a")), line(&EntryRef::Del("b")));
        let ta = {
            let (j, a) = (j.clone(), a.clone());
            std::thread::spawn(move || {
                let t = j.enqueue(&a).unwrap();
                j.wait(t, &none, || {})
            })
        };
        while !j.queue().writing {
            std::thread::yield_now();
        }
        let tb = {
            let (j, b) = (j.clone(), b.clone());
            std::thread::spawn(move || {
                let t = j.enqueue(&b).unwrap();
                j.wait(t, &none, || {})
            })
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
        assert!(matches!(j.enqueue(&b), Err(StateError::Poisoned(_))));
        assert_eq!(j.unseen_failures(), 0);
    }

    /// However many rounds fail before a waiter looks, it sees its own
    /// failure (a bounded ring of failures once evicted old ones, and their
    /// waiters returned OK).
    #[test]
    fn every_failure_reaches_its_waiter() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path(), Arc::new(RealFiles))
            .unwrap()
            .journal;
        let none = |_: &Committed| -> Result<Vec<u8>, StateError> { Ok(Vec::new()) };
        let first = j.enqueue(&line(&EntryRef::Del("first"))).unwrap();
        // 2,000 failed rounds, each of one change, before the first waiter
        // looks.
        {
            let mut q = j.queue();
            q.pending.clear();
            q.pending_ends.clear();
            q.done_below = 1;
            q.fail(0, 1, "write: ENOSPC".into(), false);
            for _ in 0..2000 {
                let t = q.next_ticket;
                q.next_ticket += 1;
                q.done_below = t + 1;
                q.fail(t, t + 1, "write: ENOSPC".into(), false);
            }
        }
        let mut undone = false;
        let r = j.wait(first, &none, || undone = true);
        assert!(
            matches!(r, Err(StateError::Journal(ref m)) if m.contains("ENOSPC")),
            "{r:?}"
        );
        assert!(undone, "the undo ran before the failure was reported");
        assert_eq!(j.unseen_failures(), 2000);
        assert_eq!(j.position().1, 0, "nothing was written");
    }

    /// Runs `f` on a thread of its own; its result, or a panic if it has
    /// not returned within 5 s (blocked on a FIFO).
    pub(crate) fn at_once<T: Send + 'static>(
        what: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(5))
            .unwrap_or_else(|_| panic!("{what} did not return within 5 s"))
    }

    /// Makes something that is not a regular file at `p`: "fifo", "dir",
    /// "symlink" (to a valid file), "socket".
    pub(crate) fn make_not_regular(kind: &str, p: &Path) {
        match kind {
            "fifo" => nix::unistd::mkfifo(p, nix::sys::stat::Mode::S_IRWXU).unwrap(),
            "dir" => fs::create_dir(p).unwrap(),
            "symlink" => {
                let target = p.with_extension("target");
                fs::write(&target, b"").unwrap();
                std::os::unix::fs::symlink(&target, p).unwrap();
            }
            "socket" => {
                std::mem::forget(std::os::unix::net::UnixListener::bind(p).unwrap());
            }
            _ => unreachable!(),
        }
    }

    /// A FIFO, directory, symlink or socket named as a journal file (a
    /// snapshot, a log, a temp file) is damage, found without opening it: a
    /// FIFO used to block `scan`, and with it start-up and every `berth
    /// state` tool, for ever. It takes no generation (the records of the
    /// regular files are read), and start-up refuses, naming it.
    #[test]
    fn what_is_not_a_regular_file_is_damage_found_at_once() {
        for kind in ["fifo", "dir", "symlink", "socket"] {
            for name in [
                log_name(0),
                log_name(1),
                snapshot_name(1),
                json_snapshot_name(0),
                snapshot_name(3),
                "snapshot-1.bin.tmp".to_string(),
            ] {
                let d = tempfile::tempdir().unwrap();
                let dir = d.path().to_path_buf();
                // generation 1 with one record, unless `name` takes its place
                if name != snapshot_name(1) {
                    let empty = snapshot_file::Writer::new(0).finish().unwrap();
                    fs::write(dir.join(snapshot_name(1)), empty).unwrap();
                    fs::write(dir.join(json_snapshot_name(1)), downgrade_guard(1)).unwrap();
                }
                if name != log_name(1) {
                    fs::write(dir.join(log_name(1)), b"").unwrap();
                }
                let p = dir.join(&name);
                make_not_regular(kind, &p);
                let what = format!("scan with a {kind} as {name}");
                let at = dir.clone();
                let s = at_once(&what, move || scan(&RealFiles, &at).unwrap());
                assert_eq!(s.damage.len(), 1, "{what}: {:?}", s.damage);
                assert_eq!(s.damage[0].path, p, "{what}");
                assert!(
                    s.damage[0].why.contains("not a regular file"),
                    "{what}: {}",
                    s.damage[0]
                );
                assert_eq!(s.foreign, vec![p.clone()], "{what}");
                assert!(!s.stale.contains(&p), "{what}");
                let want_gen = if name == snapshot_name(1) { 0 } else { 1 };
                assert_eq!(s.gen, want_gen, "{what}");
                let at = dir.clone();
                let r = at_once(&what, move || {
                    Journal::open(&at, Arc::new(RealFiles))
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                });
                let e = r.unwrap_err();
                assert!(
                    e.contains(&name) && e.contains("not a regular file"),
                    "{what}: {e}"
                );
                assert!(
                    fs::symlink_metadata(&p).is_ok(),
                    "{what}: start-up removed it"
                );
            }
        }
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
