//! The record store: an in-memory index over the journal (see `journal`)
//! of two kinds of records, volumes and snapshots (`Record`), each with its
//! own ids, names and creation order.
//!
//! A change is applied to the index and queued in the journal in one step
//! under the index's write lock, then the caller waits for it to be
//! durable. Until then the index remembers, per record, what it held
//! before each change not yet committed (`Pending`), so that
//! - a change whose write fails is undone (also when a later change of the
//!   same record is already queued: the later one then replaces a value
//!   that never became durable);
//! - a compaction's snapshot holds only committed changes: for a record
//!   with a change still in flight it writes the value before that change.
//!
//! Whoever opens a store holds the state directory's lock (see `lock`):
//! one writer per state directory.
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use super::journal::{encode, Committed, EntryRef, Journal, Replay, Ticket};
use super::record::{Kind, Phase, Shared, SnapshotRecord, VolumeRecord};
use super::snapshot_file::Writer as SnapshotWriter;
use super::table::Table;
use super::{legacy, StateError};
use crate::os::files::Files;

/// What the store keeps: volume and snapshot records.
pub trait Record: Clone + Send + Sync + 'static {
    fn id(&self) -> &str;
    fn name(&self) -> &str;
    fn seq(&self) -> u64;
    fn set_seq(&mut self, seq: u64);
    /// The key of the storage this record names, for the index of
    /// storage (`Admission::overlapping`; see `kinds::storage_key`).
    fn storage(&self) -> Option<String> {
        None
    }
    /// Bytes this record promises to its kind (see `Store::promised`).
    fn promise(&self) -> Option<(Kind, i64)> {
        None
    }
    /// The journal line that writes it.
    fn put(&self) -> EntryRef<'_>;
    /// The journal line that removes the record with this id.
    fn del(id: &str) -> EntryRef<'_>;
    /// Adds the record to a snapshot file.
    fn write_to<'r>(&'r self, w: &mut SnapshotWriter<'r>) -> Result<(), StateError>;
    fn index(ix: &Indexes) -> &Index<Self>;
    fn index_mut(ix: &mut Indexes) -> &mut Index<Self>;
    /// Points the record at values other records hold too (see `Shared`).
    fn share(&mut self, _shared: &mut Shared) {}
}

impl Record for VolumeRecord {
    fn id(&self) -> &str {
        &self.id
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn seq(&self) -> u64 {
        self.seq
    }
    fn set_seq(&mut self, seq: u64) {
        self.seq = seq;
    }
    fn storage(&self) -> Option<String> {
        crate::kinds::storage_key(self.kind, &self.id)
    }
    fn promise(&self) -> Option<(Kind, i64)> {
        Some((self.kind, self.capacity_bytes))
    }
    fn put(&self) -> EntryRef<'_> {
        EntryRef::Put(self)
    }
    fn del(id: &str) -> EntryRef<'_> {
        EntryRef::Del(id)
    }
    fn write_to<'r>(&'r self, w: &mut SnapshotWriter<'r>) -> Result<(), StateError> {
        w.volume(self)
    }
    fn index(ix: &Indexes) -> &Index<Self> {
        &ix.volumes
    }
    fn index_mut(ix: &mut Indexes) -> &mut Index<Self> {
        &mut ix.volumes
    }
    fn share(&mut self, shared: &mut Shared) {
        shared.share(self);
    }
}

impl Record for SnapshotRecord {
    fn id(&self) -> &str {
        &self.id
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn seq(&self) -> u64 {
        self.seq
    }
    fn set_seq(&mut self, seq: u64) {
        self.seq = seq;
    }
    fn put(&self) -> EntryRef<'_> {
        EntryRef::Snap(self)
    }
    fn del(id: &str) -> EntryRef<'_> {
        EntryRef::DelSnap(id)
    }
    fn write_to<'r>(&'r self, w: &mut SnapshotWriter<'r>) -> Result<(), StateError> {
        w.snapshot(self)
    }
    fn index(ix: &Indexes) -> &Index<Self> {
        &ix.snapshots
    }
    fn index_mut(ix: &mut Indexes) -> &mut Index<Self> {
        &mut ix.snapshots
    }
}

/// A change not yet committed: its ticket and the record before it.
#[derive(Debug)]
struct Pending<R> {
    ticket: Ticket,
    old: Option<R>,
    /// The record was a memory-only reservation before this change.
    was_reserved: bool,
}

/// The index of one kind of record.
pub struct Index<R> {
    records: Table<R>,
    shared: Shared,
    last_seq: u64,
    promised: HashMap<Kind, i64>,
    /// The storage keys of the records that have one (`Record::storage`),
    /// each with its record's id: CreateVolume's check for nested storage
    /// looks a key's parents and children up here instead of walking every
    /// record (`Admission::overlapping`).
    storage: BTreeSet<(String, String)>,
    /// Records held in memory only until their first `put` (see `reserve`);
    /// snapshots leave them out.
    reserved: HashSet<String>,
    /// Changes queued in the journal and not yet settled, per id, oldest
    /// first.
    inflight: HashMap<String, Vec<Pending<R>>>,
}

impl<R: Record> Default for Index<R> {
    fn default() -> Self {
        Index {
            records: Table::default(),
            shared: Shared::default(),
            last_seq: 0,
            promised: HashMap::new(),
            storage: BTreeSet::new(),
            reserved: HashSet::new(),
            inflight: HashMap::new(),
        }
    }
}

/// Both indexes, behind the store's one lock.
#[derive(Default)]
pub struct Indexes {
    volumes: Index<VolumeRecord>,
    snapshots: Index<SnapshotRecord>,
}

impl<R: Record> Index<R> {
    /// Inserts or replaces a record; returns the one it replaced. The seq
    /// must be unique (callers assign it).
    fn insert(&mut self, rec: R) -> Option<R> {
        self.insert_box(Box::new(rec))
    }

    fn insert_box(&mut self, mut rec: Box<R>) -> Option<R> {
        rec.share(&mut self.shared);
        self.last_seq = self.last_seq.max(rec.seq());
        if let Some((k, b)) = rec.promise() {
            *self.promised.entry(k).or_default() += b;
        }
        let key = rec.storage().map(|k| (k, rec.id().to_string()));
        let old = self.records.insert(rec);
        if let Some(old) = &old {
            self.unpromise(old);
        }
        if let Some(key) = key {
            self.storage.insert(key);
        }
        old
    }

    /// Takes what `old`, replaced or removed, added to the promises and
    /// the index of storage back out.
    fn unpromise(&mut self, old: &R) {
        if let Some((k, b)) = old.promise() {
            *self.promised.entry(k).or_default() -= b;
        }
        if let Some(k) = old.storage() {
            self.storage.remove(&(k, old.id().to_string()));
        }
    }

    fn remove(&mut self, id: &str) -> Option<R> {
        let old = self.records.remove(id)?;
        self.unpromise(&old);
        Some(old)
    }

    /// Puts `old` back in place of whatever `id` has now.
    fn restore(&mut self, id: &str, old: Option<R>) {
        self.remove(id);
        if let Some(o) = old {
            self.insert(o);
        }
    }

    /// The seq a record with this id keeps: its current one, or the next.
    fn seq_for(&mut self, id: &str) -> u64 {
        match self.records.get(id) {
            Some(r) => r.seq(),
            None => {
                self.last_seq += 1;
                self.last_seq
            }
        }
    }

    /// Forgets the pending change `t` of `id`. When it failed (`undo`),
    /// its effect is taken back: the index gets the old value if nothing
    /// newer is queued for `id`, else the next change inherits it as its
    /// old value (it then replaces a value that never became durable).
    fn settle(&mut self, id: &str, t: Ticket, undo: bool) {
        let Some(v) = self.inflight.get_mut(id) else {
            return;
        };
        let Some(pos) = v.iter().position(|p| p.ticket == t) else {
            return;
        };
        let p = v.remove(pos);
        let last = pos == v.len();
        if !undo {
            if v.is_empty() {
                self.inflight.remove(id);
            }
            return;
        }
        if !last {
            v[pos].old = p.old;
            v[pos].was_reserved = p.was_reserved;
            return;
        }
        if v.is_empty() {
            self.inflight.remove(id);
        }
        self.restore(id, p.old);
        if p.was_reserved {
            self.reserved.insert(id.to_string());
        } else {
            self.reserved.remove(id);
        }
    }

    /// The committed value of `id` for a snapshot: the value before its
    /// oldest change not in `c`, else what the index holds; None for
    /// nothing durable (absent, or a reservation).
    fn committed<'a>(&'a self, id: &str, c: &Committed) -> Option<&'a R> {
        if let Some(p) = self
            .inflight
            .get(id)
            .and_then(|v| v.iter().find(|p| !c.contains(p.ticket)))
        {
            return if p.was_reserved { None } else { p.old.as_ref() };
        }
        if self.reserved.contains(id) {
            return None;
        }
        self.records.get(id)
    }

    /// Adds every committed record to a snapshot file.
    fn snapshot<'r>(
        &'r self,
        c: &Committed,
        out: &mut SnapshotWriter<'r>,
    ) -> Result<(), StateError> {
        let deleted_in_flight = self
            .inflight
            .keys()
            .filter(|id| !self.records.contains(id))
            .map(String::as_str);
        let mut recs: Vec<&R> = self
            .records
            .values()
            .map(R::id)
            .chain(deleted_in_flight)
            .filter_map(|id| self.committed(id, c))
            .collect();
        // in seq order, as start-up's `load` sorts them (the slab mostly
        // holds them so: a sort of runs)
        recs.sort_by(|a, b| (a.seq(), a.id()).cmp(&(b.seq(), b.id())));
        for rec in recs {
            rec.write_to(out)?;
        }
        Ok(())
    }

    fn page(&self, after_seq: u64, max: usize) -> (Vec<R>, Option<u64>) {
        let mut out = Vec::new();
        let mut it = self.records.after_seq(after_seq);
        for rec in it.by_ref() {
            out.push(rec.clone());
            if max > 0 && out.len() == max {
                break;
            }
        }
        let more = it.next().is_some();
        let next = if more {
            out.last().map(|r| r.seq())
        } else {
            None
        };
        (out, next)
    }

    /// Records matching `f` in seq order after `after_seq`, at most `max`
    /// (0 = all), and whether more match: a walk of the seq index that
    /// copies only what it returns and stops at the first match past the
    /// page.
    fn page_matching(&self, after_seq: u64, max: usize, f: impl Fn(&R) -> bool) -> (Vec<R>, bool) {
        let mut out = Vec::new();
        let mut it = self.records.after_seq(after_seq).filter(|r| f(r));
        for rec in it.by_ref() {
            out.push(rec.clone());
            if max > 0 && out.len() == max {
                break;
            }
        }
        let more = max > 0 && out.len() == max && it.next().is_some();
        (out, more)
    }

    /// Loads replayed records into an empty index, giving each a unique
    /// seq: in seq order, a record whose seq is 0 or already taken (records
    /// of old versions rebuilt from an NFS id carried 0) gets the next free
    /// one.
    fn load(&mut self, mut records: Vec<Box<R>>) {
        records.sort_by(|a, b| (a.seq(), a.id()).cmp(&(b.seq(), b.id())));
        let max = records
            .iter()
            .map(|r| r.seq())
            .max()
            .unwrap_or(0)
            .max(self.last_seq);
        let mut next = max;
        self.records.reserve(records.len());
        for mut r in records {
            if r.seq() == 0 || self.records.seq_taken(r.seq()) {
                next += 1;
                tracing::info!(id = %r.id(), old_seq = r.seq(), new_seq = next, "record given a unique sequence number");
                r.set_seq(next);
            }
            self.insert_box(r);
        }
    }
}

/// What `insert_new` and `reserve` show their `admit` check, under the
/// store's write lock: the bytes already promised to the record's kind and
/// every record (so a check for overlapping storage and the insert are one
/// step).
pub struct Admission<'a, R = VolumeRecord> {
    pub promised: i64,
    records: &'a Table<R>,
    storage: &'a BTreeSet<(String, String)>,
}

impl<R: Record> Admission<'_, R> {
    /// The record with this id, if any.
    pub fn get(&self, id: &str) -> Option<&R> {
        self.records.get(id)
    }

    /// A record whose storage key (`Record::storage`, see
    /// `kinds::storage_key`) is `key`, holds it or lies within it: the key
    /// itself or one of its parents up to a `/`, or the key followed by
    /// `/` and more. A few lookups in the index of storage, whatever the
    /// number of records.
    pub fn overlapping(&self, key: &str) -> Option<&R> {
        let first_with = |k: &str| {
            self.storage
                .range((k.to_string(), String::new())..)
                .next()
                .filter(|(found, _)| found.as_str() == k)
        };
        let parents = key
            .match_indices('/')
            .map(|(i, _)| &key[..i])
            .chain([key])
            .find_map(first_with);
        let inside = || {
            let below = format!("{key}/");
            self.storage
                .range((below.clone(), String::new())..)
                .next()
                .filter(|(found, _)| found.starts_with(&below))
        };
        parents
            .or_else(inside)
            .and_then(|(_, id)| self.records.get(id))
    }
}

/// How ids read back from the journal are checked (`Store::open_with`).
#[derive(Clone, Copy)]
pub struct IdRules {
    /// Why a volume record's id is not one of its kind (None when it is).
    pub volume: fn(Kind, &str) -> Option<String>,
    /// The same for a snapshot record's id.
    pub snapshot: fn(Kind, &str) -> Option<String>,
}

impl IdRules {
    /// The kinds' own rules, as for ids from RPCs
    /// (`kinds::volume_id_flaw`, `kinds::snapshot_id_flaw`).
    pub const KINDS: IdRules = IdRules {
        volume: crate::kinds::volume_id_flaw,
        snapshot: crate::kinds::snapshot_id_flaw,
    };
}

/// Records in the journal whose ids are not ids of their kind (forged by
/// hand, or damaged in a way no checksum catches; `IdRules`): damage.
/// They are kept (written into every snapshot, so the journal keeps them
/// until an operator runs `berth state repair`), but outside the index:
/// nothing reads, lists, finishes or deletes them, and their ids are never
/// made into paths.
#[derive(Default)]
pub struct SetAside {
    pub volumes: Vec<(VolumeRecord, String)>,
    pub snapshots: Vec<(SnapshotRecord, String)>,
}

impl SetAside {
    /// Takes the records `check` finds a flaw in out of `records`.
    fn take<R: Record>(
        records: &mut Vec<Box<R>>,
        check: impl Fn(&R) -> Option<String>,
        into: &mut Vec<(R, String)>,
    ) {
        records.retain(|r| match check(r) {
            None => true,
            Some(why) => {
                into.push(((**r).clone(), why));
                false
            }
        });
    }

    pub fn is_empty(&self) -> bool {
        self.volumes.is_empty() && self.snapshots.is_empty()
    }

    /// Logs each (once, at start-up: nothing retries them).
    fn log(&self) {
        for (r, why) in &self.volumes {
            tracing::error!(volume_id = ?r.id, kind = %r.kind, phase = ?r.phase, why = %why, "the state journal holds a volume record whose id is not one of its kind (forged by hand or damaged): berth never acts on it and keeps it as is; `berth state check` reports it, `berth state repair` drops it");
        }
        for (r, why) in &self.snapshots {
            tracing::error!(snapshot_id = ?r.id, kind = %r.kind, phase = ?r.phase, why = %why, "the state journal holds a snapshot record whose id is not one of its kind (forged by hand or damaged): berth never acts on it and keeps it as is; `berth state check` reports it, `berth state repair` drops it");
        }
    }
}

pub struct Store {
    journal: Journal,
    index: RwLock<Indexes>,
    /// Records whose ids are not of their kind (see `SetAside`).
    set_aside: SetAside,
    /// Orders the space checks of kinds that share a filesystem (see
    /// `space_shared`).
    space: RwLock<()>,
}

/// What a change does to a record.
enum Change<'a, R> {
    Put(&'a R),
    Del(&'a str),
}

impl Store {
    /// Opens (creating if needed) the store in `state_dir` and replays the
    /// journal; the caller holds the directory's lock (`DirLock`). Records
    /// of the older one-file-per-volume layout are imported first (see
    /// `legacy`).
    ///
    /// A record whose id is not an id of its kind is set aside (see
    /// `SetAside`) and logged once.
    pub fn open(state_dir: &Path, files: Arc<dyn Files>) -> Result<Store, StateError> {
        Self::open_with(state_dir, files, IdRules::KINDS)
    }

    /// `open`, with ids checked by `rules`.
    pub fn open_with(
        state_dir: &Path,
        files: Arc<dyn Files>,
        rules: IdRules,
    ) -> Result<Store, StateError> {
        let Replay {
            journal,
            mut records,
            mut snapshots,
        } = Journal::open(&journal_dir(state_dir), files.clone())?;
        let mut set_aside = SetAside::default();
        let volume_flaw = |r: &VolumeRecord| (rules.volume)(r.kind, &r.id);
        SetAside::take(&mut records, volume_flaw, &mut set_aside.volumes);
        SetAside::take(
            &mut snapshots,
            |r: &SnapshotRecord| (rules.snapshot)(r.kind, &r.id),
            &mut set_aside.snapshots,
        );
        let mut index = Indexes::default();
        index.volumes.load(records);
        index.snapshots.load(snapshots);
        let old = legacy::load(files.as_ref(), state_dir)?;
        let import = !old.is_empty();
        // After an import interrupted before the old files were removed,
        // both hold the same records; the journal is newer.
        let mut old: Vec<_> = old
            .into_iter()
            .filter(|r| {
                !index.volumes.records.contains(&r.id)
                    && !set_aside.volumes.iter().any(|(s, _)| s.id == r.id)
            })
            .map(Box::new)
            .collect();
        SetAside::take(&mut old, volume_flaw, &mut set_aside.volumes);
        index.volumes.load(old);
        // New records never take the seq of one set aside.
        for (r, _) in &set_aside.volumes {
            index.volumes.last_seq = index.volumes.last_seq.max(r.seq);
        }
        for (r, _) in &set_aside.snapshots {
            index.snapshots.last_seq = index.snapshots.last_seq.max(r.seq);
        }
        set_aside.log();
        let store = Store {
            journal,
            index: RwLock::new(index),
            set_aside,
            space: RwLock::new(()),
        };
        if import {
            store
                .journal
                .rebase(&|| store.snapshot(&Committed::all()))?;
            legacy::remove(state_dir, files.as_ref())?;
            tracing::info!(
                volumes = store.len(),
                "imported the records of the one-file-per-volume layout into the state journal"
            );
        }
        Ok(store)
    }

    /// Held from reading a filesystem's free space until the space asked
    /// for is recorded as promised (local admission, which many may do at
    /// once: the promises order them). `space_exclusive` excludes it.
    pub fn space_shared(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.space.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Held from reading the free space until it is taken (a thick block
    /// file's allocation): no admission reads the free space in between
    /// and admits against the figure from before the allocation.
    pub fn space_exclusive(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.space.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Indexes> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Indexes> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

    /// At exit: writes a snapshot of every committed record if the log
    /// holds at least `min_log` bytes, so the next start reads the
    /// snapshot rather than replaying the log (see `Journal::checkpoint`).
    pub fn checkpoint(&self, min_log: u64) -> Result<bool, StateError> {
        self.journal.checkpoint(min_log, &|c| self.snapshot(c))
    }

    /// A snapshot file of every committed record (see `Index::committed`).
    fn snapshot(&self, c: &Committed) -> Result<Vec<u8>, StateError> {
        let ix = self.read();
        let aside = &self.set_aside;
        let mut out = SnapshotWriter::new(
            ix.volumes.records.len()
                + ix.snapshots.records.len()
                + aside.volumes.len()
                + aside.snapshots.len(),
        );
        ix.volumes.snapshot(c, &mut out)?;
        ix.snapshots.snapshot(c, &mut out)?;
        // kept as they are (see `SetAside`)
        for (r, _) in &aside.volumes {
            out.volume(r)?;
        }
        for (r, _) in &aside.snapshots {
            out.snapshot(r)?;
        }
        out.finish()
    }

    /// Applies `change` to the index and queues it in the journal as one
    /// step (under the index's write lock, after `prepare`, which may
    /// refuse or adjust the record), then waits until it is durable; a
    /// failed write undoes it. Returns the record as stored.
    fn apply<R: Record, E: From<StateError>>(
        &self,
        change: Change<'_, R>,
        prepare: impl FnOnce(&mut Index<R>, Option<&mut R>) -> Result<(), E>,
    ) -> Result<Option<R>, E> {
        let (id, ticket, stored) = {
            let mut ix = self.write();
            let idx = R::index_mut(&mut ix);
            match change {
                Change::Put(r) => {
                    let mut rec = r.clone();
                    prepare(idx, Some(&mut rec))?;
                    let mut line = Vec::with_capacity(1024);
                    encode(&rec.put(), &mut line).map_err(|source| StateError::Encode {
                        id: rec.id().to_string(),
                        source,
                    })?;
                    let ticket = self.journal.enqueue(&line)?;
                    let id = rec.id().to_string();
                    let was_reserved = idx.reserved.remove(&id);
                    let old = idx.insert(rec.clone());
                    idx.inflight.entry(id.clone()).or_default().push(Pending {
                        ticket,
                        old,
                        was_reserved,
                    });
                    (id, ticket, Some(rec))
                }
                Change::Del(id) => {
                    prepare(idx, None)?;
                    if !idx.records.contains(id) {
                        return Ok(None);
                    }
                    if idx.reserved.remove(id) {
                        // Never written, so nothing to remove on disk.
                        idx.remove(id);
                        return Ok(None);
                    }
                    let mut line = Vec::with_capacity(64);
                    encode(&R::del(id), &mut line).map_err(|source| StateError::Encode {
                        id: id.to_string(),
                        source,
                    })?;
                    let ticket = self.journal.enqueue(&line)?;
                    let old = idx.remove(id);
                    idx.inflight
                        .entry(id.to_string())
                        .or_default()
                        .push(Pending {
                            ticket,
                            old,
                            was_reserved: false,
                        });
                    (id.to_string(), ticket, None)
                }
            }
        };
        let r = self.journal.wait(ticket, &|c| self.snapshot(c), || {
            R::index_mut(&mut self.write()).settle(&id, ticket, true)
        });
        if r.is_ok() {
            R::index_mut(&mut self.write()).settle(&id, ticket, false);
        }
        r?;
        Ok(stored)
    }

    fn get_of<R: Record>(&self, id: &str) -> Option<R> {
        R::index(&self.read()).records.get(id).cloned()
    }

    fn get_by_name_of<R: Record>(&self, name: &str) -> Option<R> {
        let ix = self.read();
        let idx = R::index(&ix);
        idx.records.by_name(name).cloned()
    }

    fn filter_of<R: Record>(&self, f: impl Fn(&R) -> bool) -> Vec<R> {
        R::index(&self.read())
            .records
            .values()
            .filter(|r| f(r))
            .cloned()
            .collect()
    }

    fn insert_new_of<R: Record, E: From<StateError>>(
        &self,
        rec: R,
        kind: Option<Kind>,
        admit: impl FnOnce(&Admission<'_, R>) -> Result<(), E>,
    ) -> Result<R, E> {
        let stored = self.apply::<R, E>(Change::Put(&rec), |idx, r| {
            admit(&Admission {
                promised: kind
                    .and_then(|k| idx.promised.get(&k).copied())
                    .unwrap_or(0),
                records: &idx.records,
                storage: &idx.storage,
            })?;
            if let Some(r) = r {
                idx.last_seq += 1;
                r.set_seq(idx.last_seq);
            }
            Ok(())
        })?;
        Ok(stored.unwrap_or(rec))
    }

    fn put_of<R: Record>(&self, rec: &R) -> Result<(), StateError> {
        self.apply(Change::Put(rec), |idx, r: Option<&mut R>| {
            if let Some(r) = r {
                let seq = idx.seq_for(r.id());
                r.set_seq(seq);
            }
            Ok::<(), StateError>(())
        })?;
        Ok(())
    }

    fn remove_of<R: Record>(&self, id: &str) -> Result<(), StateError> {
        self.apply::<R, StateError>(Change::Del(id), |_, _| Ok(()))?;
        Ok(())
    }

    /// The records set aside at start-up because their ids are not of
    /// their kind (see `SetAside`).
    pub fn set_aside(&self) -> &SetAside {
        &self.set_aside
    }

    /// Refills the journal's reserve once space was freed
    /// (`Journal::keep_reserve`).
    pub fn keep_reserve(&self) {
        self.journal.keep_reserve();
    }

    /// The journal's reserve is short and cannot be taken again for want
    /// of space (`Journal::reserve_short`).
    pub fn reserve_short(&self) -> bool {
        self.journal.reserve_short()
    }

    /// Set when the journal stopped accepting changes (see `journal`).
    pub fn poisoned(&self) -> Option<String> {
        self.journal.poisoned()
    }

    // ------------------------------------------------------------ volumes

    pub fn get(&self, id: &str) -> Option<VolumeRecord> {
        self.get_of(id)
    }

    /// A volume record with this id exists (no copy made).
    pub fn contains(&self, id: &str) -> bool {
        self.read().volumes.records.contains(id)
    }

    pub fn get_by_name(&self, name: &str) -> Option<VolumeRecord> {
        self.get_by_name_of(name)
    }

    /// Volume records.
    /// Volume records handed out by walks of every volume record so far
    /// (listings by a filter, counts, snapshots of the journal): a test
    /// reads it to see that a call looks records up instead.
    pub fn records_walked(&self) -> u64 {
        self.read().volumes.records.walked()
    }

    pub fn len(&self) -> usize {
        self.read().volumes.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes promised to volumes of `kind` (every phase counts).
    pub fn promised(&self, kind: Kind) -> i64 {
        self.read()
            .volumes
            .promised
            .get(&kind)
            .copied()
            .unwrap_or(0)
    }

    /// `promised`, and what `f` answers given whether a volume record with
    /// an id exists, under one lock: the promises and the volumes they
    /// belong to as one moment saw them.
    pub fn promised_and<T>(
        &self,
        kind: Kind,
        f: impl FnOnce(&dyn Fn(&str) -> bool) -> T,
    ) -> (i64, T) {
        let ix = self.read();
        let promised = ix.volumes.promised.get(&kind).copied().unwrap_or(0);
        (promised, f(&|id: &str| ix.volumes.records.contains(id)))
    }

    /// Highest volume sequence number handed out so far.
    pub fn last_seq(&self) -> u64 {
        self.read().volumes.last_seq
    }

    /// Volumes in creation order after `after_seq`, at most `max` (0 =
    /// all), and the sequence number to continue after if more remain.
    pub fn page(&self, after_seq: u64, max: usize) -> (Vec<VolumeRecord>, Option<u64>) {
        self.read().volumes.page(after_seq, max)
    }

    /// Volume records matching `f` in creation order after `after_seq`, at
    /// most `max` (0 = all), and whether more match. `f` runs under the
    /// store's lock: it must not look at the store.
    pub fn page_matching(
        &self,
        after_seq: u64,
        max: usize,
        f: impl Fn(&VolumeRecord) -> bool,
    ) -> (Vec<VolumeRecord>, bool) {
        self.read().volumes.page_matching(after_seq, max, f)
    }

    /// All volume records matching `f`.
    pub fn filter(&self, f: impl Fn(&VolumeRecord) -> bool) -> Vec<VolumeRecord> {
        self.filter_of(f)
    }

    /// How many volume records match `f` (no copy made).
    pub fn count(&self, f: impl Fn(&VolumeRecord) -> bool) -> usize {
        self.read()
            .volumes
            .records
            .values()
            .filter(|r| f(r))
            .count()
    }

    /// How many of `ids` name a volume record that matches `f`, under one
    /// lock (a start-up's check of thousands of directories).
    pub fn count_held<'a>(
        &self,
        ids: impl Iterator<Item = &'a str>,
        f: impl Fn(&VolumeRecord) -> bool,
    ) -> usize {
        let ix = self.read();
        ids.filter(|id| ix.volumes.records.get(id).is_some_and(&f))
            .count()
    }

    /// In one look per id, under one lock (a start-up's check of thousands
    /// of directories): how many of `ids` name a volume record that matches
    /// `f`, and those that name no record at all.
    pub fn held_and_unrecorded<'a>(
        &self,
        ids: impl Iterator<Item = &'a str>,
        f: impl Fn(&VolumeRecord) -> bool,
    ) -> (usize, Vec<&'a str>) {
        let ix = self.read();
        let mut held = 0;
        let mut unrecorded = Vec::new();
        for id in ids {
            match ix.volumes.records.get(id) {
                Some(r) if f(r) => held += 1,
                Some(_) => {}
                None => unrecorded.push(id),
            }
        }
        (held, unrecorded)
    }

    /// Whether the volume record with this id exists and matches `f` (no
    /// copy made).
    pub fn holds(&self, id: &str, f: impl Fn(&VolumeRecord) -> bool) -> bool {
        self.read().volumes.records.get(id).is_some_and(f)
    }

    /// Inserts a new volume record with the next sequence number, after
    /// `admit` accepted it given the bytes already promised to its kind
    /// (checked and reserved under one lock, so concurrent creates cannot
    /// overcommit).
    pub fn insert_new<E>(
        &self,
        rec: VolumeRecord,
        admit: impl FnOnce(&Admission<'_>) -> Result<(), E>,
    ) -> Result<VolumeRecord, E>
    where
        E: From<StateError>,
    {
        let kind = rec.kind;
        self.insert_new_of(rec, Some(kind), admit)
    }

    /// Runs `admit` as `insert_new` would for a new record of `kind`, and
    /// inserts nothing: a check before slow work that must come before the
    /// insert (the insert checks again).
    pub fn check_admission<E>(
        &self,
        kind: Kind,
        admit: impl FnOnce(&Admission<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        let ix = self.read();
        let idx = &ix.volumes;
        admit(&Admission {
            promised: idx.promised.get(&kind).copied().unwrap_or(0),
            records: &idx.records,
            storage: &idx.storage,
        })
    }

    /// Like `insert_new`, but only in memory: the record is written by the
    /// `put` that follows once the storage exists. For kinds whose storage
    /// left behind by a crash is recognisable as an orphan (see
    /// `VolumeKind::reconcile_orphans`), this saves a durable write.
    pub fn reserve<E>(
        &self,
        mut rec: VolumeRecord,
        admit: impl FnOnce(&Admission<'_>) -> Result<(), E>,
    ) -> Result<VolumeRecord, E> {
        let mut ix = self.write();
        let idx = &mut ix.volumes;
        admit(&Admission {
            promised: idx.promised.get(&rec.kind).copied().unwrap_or(0),
            records: &idx.records,
            storage: &idx.storage,
        })?;
        idx.last_seq += 1;
        rec.seq = idx.last_seq;
        idx.insert(rec.clone());
        idx.reserved.insert(rec.id.clone());
        Ok(rec)
    }

    /// Drops a record from memory only (a reservation that failed).
    pub fn forget(&self, id: &str) {
        let mut ix = self.write();
        if ix.volumes.reserved.remove(id) {
            ix.volumes.remove(id);
        }
    }

    /// Writes a record (new or changed) durably; returns once it is on
    /// disk. A record keeps the seq it has in the store; a new one gets the
    /// next (whatever `rec.seq` says: records rebuilt from an id carry 0).
    pub fn put(&self, rec: &VolumeRecord) -> Result<(), StateError> {
        self.put_of(rec)
    }

    /// Writes a changed volume record (a volume that grew) after `admit`
    /// accepted it given the bytes promised to its kind now (its old
    /// promise included), under the store's lock like `insert_new`: two
    /// volumes growing at once, or one growing while another is created,
    /// cannot overcommit.
    pub fn put_admitted<E>(
        &self,
        rec: &VolumeRecord,
        admit: impl FnOnce(&Admission<'_>) -> Result<(), E>,
    ) -> Result<(), E>
    where
        E: From<StateError>,
    {
        let kind = rec.kind;
        self.apply::<VolumeRecord, E>(Change::Put(rec), |idx, r| {
            admit(&Admission {
                promised: idx.promised.get(&kind).copied().unwrap_or(0),
                records: &idx.records,
                storage: &idx.storage,
            })?;
            if let Some(r) = r {
                let seq = idx.seq_for(r.id());
                r.set_seq(seq);
            }
            Ok(())
        })?;
        Ok(())
    }

    /// Sets a record's phase and writes it.
    pub fn set_phase(&self, rec: &mut VolumeRecord, phase: Phase) -> Result<(), StateError> {
        rec.phase = phase;
        self.put(rec)
    }

    /// Removes a volume record durably (an unknown id is already removed).
    pub fn remove(&self, id: &str) -> Result<(), StateError> {
        self.remove_of::<VolumeRecord>(id)
    }

    // ---------------------------------------------------------- snapshots

    pub fn snapshot_get(&self, id: &str) -> Option<SnapshotRecord> {
        self.get_of(id)
    }

    /// A snapshot record with this id exists (no copy made).
    pub fn snapshot_contains(&self, id: &str) -> bool {
        self.read().snapshots.records.contains(id)
    }

    pub fn snapshot_by_name(&self, name: &str) -> Option<SnapshotRecord> {
        self.get_by_name_of(name)
    }

    /// Snapshots in creation order after `after_seq`, at most `max` (0 =
    /// all), and the sequence number to continue after if more remain.
    pub fn snapshot_page(&self, after_seq: u64, max: usize) -> (Vec<SnapshotRecord>, Option<u64>) {
        self.read().snapshots.page(after_seq, max)
    }

    /// Snapshots matching `f` in creation order after `after_seq`, at most
    /// `max` (0 = all), and whether more match.
    pub fn snapshot_page_matching(
        &self,
        after_seq: u64,
        max: usize,
        f: impl Fn(&SnapshotRecord) -> bool,
    ) -> (Vec<SnapshotRecord>, bool) {
        self.read().snapshots.page_matching(after_seq, max, f)
    }

    /// Highest snapshot sequence number handed out so far.
    /// How many snapshot records there are.
    pub fn snapshot_len(&self) -> usize {
        self.read().snapshots.records.len()
    }

    pub fn snapshot_last_seq(&self) -> u64 {
        self.read().snapshots.last_seq
    }

    pub fn snapshot_filter(&self, f: impl Fn(&SnapshotRecord) -> bool) -> Vec<SnapshotRecord> {
        self.filter_of(f)
    }

    /// Inserts a new snapshot record with the next sequence number after
    /// `admit` accepted it (under the store's lock).
    pub fn snapshot_insert_new<E: From<StateError>>(
        &self,
        rec: SnapshotRecord,
        admit: impl FnOnce(&Admission<'_, SnapshotRecord>) -> Result<(), E>,
    ) -> Result<SnapshotRecord, E> {
        self.insert_new_of(rec, None, admit)
    }

    pub fn snapshot_put(&self, rec: &SnapshotRecord) -> Result<(), StateError> {
        self.put_of(rec)
    }

    pub fn snapshot_remove(&self, id: &str) -> Result<(), StateError> {
        self.remove_of::<SnapshotRecord>(id)
    }
}

pub fn journal_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("journal")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::record::*;
    use std::collections::HashSet;
    use std::fs::{self, OpenOptions};
    use std::io::Write;

    fn rec(id: &str, name: &str, cap: i64) -> VolumeRecord {
        VolumeRecord {
            id: id.into(),
            name: name.into(),
            kind: Kind::Local,
            seq: 0,
            phase: Phase::Ready,
            capacity_bytes: cap,
            node: "n1".into(),
            parameters: Default::default(),
            capabilities: vec![].into(),
            context: Default::default(),
            published: Default::default(),
            created_unix: 0,
            block: None,
            source: None,
            project: None,
            extra: None,
        }
    }

    fn ok(_: &Admission<'_>) -> Result<(), StateError> {
        Ok(())
    }

    /// Any id is one (these tests' ids are short names).
    const ANY: IdRules = IdRules {
        volume: |_, _| None,
        snapshot: |_, _| None,
    };

    fn open(p: &Path) -> Result<Store, StateError> {
        Store::open_with(p, Arc::new(crate::os::files::RealFiles), ANY)
    }

    /// Records of the one-file-per-volume layout whose ids are not of
    /// their kind are set aside as the journal's are, and kept in the
    /// journal the import writes; the others are imported.
    #[test]
    fn imported_records_whose_ids_are_not_of_their_kind_are_set_aside_and_kept() {
        let d = tempfile::tempdir().unwrap();
        let old = legacy::dir(d.path());
        fs::create_dir_all(&old).unwrap();
        let good = format!("local-{}", "c".repeat(32));
        let bad = "local-../../victim";
        for (file, id) in [("a.json", good.as_str()), ("b.json", bad)] {
            let mut r = rec(id, id, 1);
            r.phase = Phase::Deleting;
            fs::write(old.join(file), serde_json::to_vec(&r).unwrap()).unwrap();
        }
        let files = Arc::new(crate::os::files::RealFiles);
        for round in 0..2 {
            let s = Store::open(d.path(), files.clone()).unwrap();
            assert!(s.get(&good).is_some(), "round {round}");
            assert!(s.get(bad).is_none(), "round {round}");
            assert_eq!(s.set_aside().volumes.len(), 1, "round {round}");
            assert_eq!(s.set_aside().volumes[0].0.id, bad);
            drop(s);
            assert!(!old.exists(), "the old layout was imported");
            let scan =
                super::super::journal::scan(&crate::os::files::RealFiles, &journal_dir(d.path()))
                    .unwrap();
            assert!(scan.records.contains_key(bad), "round {round}: dropped");
        }
    }

    /// Records whose ids are not of their kind (forged into the journal
    /// with valid checksums) are set aside: not served, their seqs never
    /// given again, kept as they are through a compaction and a restart.
    #[test]
    fn records_whose_ids_are_not_of_their_kind_are_set_aside_and_kept() {
        let d = tempfile::tempdir().unwrap();
        let good = format!("local-{}", "a".repeat(32));
        let bad = [
            "local-../../victim",
            "block-0",
            &format!("local-{}", "A".repeat(32)),
        ];
        let mut log = Vec::new();
        let mut put = |id: &str, kind: Kind, seq: u64| {
            let mut r = rec(id, id, 1);
            r.kind = kind;
            r.seq = seq;
            r.phase = Phase::Deleting;
            encode(&EntryRef::Put(&r), &mut log).unwrap();
        };
        put(&good, Kind::Local, 1);
        put(bad[0], Kind::Local, 7);
        put(bad[1], Kind::Block, 2);
        put(bad[2], Kind::Local, 3);
        // a block id in a local record
        put(&format!("block-{}", "b".repeat(32)), Kind::Local, 4);
        let snap = crate::state::SnapshotRecord {
            id: "local-snap-../x".into(),
            name: "s".into(),
            kind: Kind::Local,
            seq: 9,
            phase: Phase::Deleting,
            source_volume_id: good.clone(),
            size_bytes: 1,
            node: "n1".into(),
            parameters: Default::default(),
            created_secs: 0,
            created_nanos: 0,
            block: None,
            file_bytes: None,
            extra: None,
        };
        encode(&EntryRef::Snap(&snap), &mut log).unwrap();
        let j = journal_dir(d.path());
        fs::create_dir_all(&j).unwrap();
        fs::write(j.join(super::super::journal::log_name(0)), &log).unwrap();
        let files = Arc::new(crate::os::files::RealFiles);
        for round in 0..2 {
            let s = Store::open(d.path(), files.clone()).unwrap();
            assert_eq!(s.len(), 1 + round, "round {round}");
            assert!(s.get(&good).is_some());
            assert!(s.filter(|r| r.phase != Phase::Ready).len() == 1);
            assert!(s.snapshot_filter(|_| true).is_empty());
            let aside = s.set_aside();
            assert_eq!(aside.volumes.len(), 4, "round {round}");
            assert_eq!(aside.snapshots.len(), 1);
            assert!(aside.volumes.iter().all(|(_, why)| !why.is_empty()));
            // a new record's seq follows every seq in the journal
            let r = s
                .insert_new(
                    rec(&format!("local-{}", round.to_string().repeat(32)), "new", 1),
                    ok,
                )
                .unwrap();
            assert!(r.seq > 7, "seq {}", r.seq);
            assert!(s.checkpoint(0).unwrap());
            drop(s);
            let scan = super::super::journal::scan(&crate::os::files::RealFiles, &j).unwrap();
            assert!(scan.damage.is_empty());
            for id in bad {
                assert!(scan.records.contains_key(id), "round {round}: {id} dropped");
            }
            assert!(scan.snapshots.contains_key("local-snap-../x"));
        }
    }

    #[test]
    fn survives_reopen_and_pages_in_order() {
        let d = tempfile::tempdir().unwrap();
        let s = open(d.path()).unwrap();
        for i in 0..5 {
            s.insert_new(rec(&format!("id{i}"), &format!("n{i}"), 10), ok)
                .unwrap();
        }
        s.remove("id2").unwrap();
        assert_eq!(s.promised(Kind::Local), 40);
        drop(s);
        let s = open(d.path()).unwrap();
        assert_eq!(s.len(), 4);
        assert_eq!(s.promised(Kind::Local), 40);
        assert_eq!(s.get_by_name("n3").unwrap().id, "id3");
        let (p1, next) = s.page(0, 2);
        assert_eq!(
            p1.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["id0", "id1"]
        );
        let (p2, next2) = s.page(next.unwrap(), 2);
        assert_eq!(
            p2.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["id3", "id4"]
        );
        assert_eq!(next2, None);
        // A new record sorts after everything that exists.
        let r = s.insert_new(rec("id9", "n9", 1), ok).unwrap();
        assert_eq!(r.seq, 6);
    }

    #[test]
    fn admit_can_refuse_and_nothing_is_written() {
        let d = tempfile::tempdir().unwrap();
        let s = open(d.path()).unwrap();
        let r: Result<_, StateError> = s.insert_new(rec("a", "a", 5), |a| {
            assert_eq!(a.promised, 0);
            Err(StateError::io("admit", "/", std::io::Error::other("full")))
        });
        assert!(r.is_err());
        assert!(s.is_empty());
        assert_eq!(s.journal.position(), (0, 0));
    }

    fn log_path(d: &Path, gen: u64) -> PathBuf {
        journal_dir(d).join(format!("log-{gen}.jsonl"))
    }

    fn ids(s: &Store) -> Vec<String> {
        let mut v: Vec<_> = s.filter(|_| true).into_iter().map(|r| r.id).collect();
        v.sort();
        v
    }

    /// A store in `dir` with records "a" and "b", closed again; the length
    /// of its log.
    fn two_records(dir: &Path) -> u64 {
        let s = open(dir).unwrap();
        s.insert_new(rec("a", "a", 1), ok).unwrap();
        s.insert_new(rec("b", "b", 1), ok).unwrap();
        s.journal.position().1
    }

    #[test]
    fn a_torn_tail_is_cut_kept_aside_and_writing_goes_on() {
        let d = tempfile::tempdir().unwrap();
        let len = two_records(d.path());
        // A crash in the middle of the next write: a line with a block
        // that never reached the disk, and half a line.
        let mut f = OpenOptions::new()
            .append(true)
            .open(log_path(d.path(), 0))
            .unwrap();
        let mut torn = b"0badc0de {\"del\":\"".to_vec();
        while (len as usize + torn.len()) % 512 != 0 {
            torn.push(b'x');
        }
        torn.extend_from_slice(&[0; 512]);
        torn.extend_from_slice(b"x\"}\n{\"put\":");
        f.write_all(&torn).unwrap();
        drop(f);
        let s = open(d.path()).unwrap();
        assert_eq!(ids(&s), ["a", "b"]);
        assert_eq!(s.journal.position(), (0, len));
        let kept: Vec<_> = fs::read_dir(journal_dir(d.path()))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".torn-"))
            .collect();
        assert_eq!(kept.len(), 1);
        s.remove("a").unwrap();
        drop(s);
        assert_eq!(ids(&open(d.path()).unwrap()), ["b"]);
    }

    /// A berth killed again and again while it writes leaves a torn tail
    /// at each crash: start-up keeps a copy of each, and only the newest
    /// `KEEP_TORN` stay (a file named otherwise is never touched). Before,
    /// every copy stayed for good, each up to 64 MiB, on the filesystem
    /// the volumes share.
    #[test]
    fn only_the_newest_copies_of_torn_tails_are_kept() {
        use crate::state::journal::KEEP_TORN;
        let d = tempfile::tempdir().unwrap();
        let len = two_records(d.path());
        let jd = journal_dir(d.path());
        fs::write(jd.join("log-0.jsonl.torn-mine"), b"hand-made").unwrap();
        let mut tails = Vec::new();
        for i in 0..KEEP_TORN + 4 {
            let torn = format!("0badc0de {{\"del\":\"crash-{i:02}").into_bytes();
            OpenOptions::new()
                .append(true)
                .open(log_path(d.path(), 0))
                .unwrap()
                .write_all(&torn)
                .unwrap();
            let s = open(d.path()).unwrap();
            assert_eq!(ids(&s), ["a", "b"]);
            assert_eq!(s.journal.position(), (0, len));
            drop(s);
            tails.push(torn);
        }
        let mut names: Vec<String> = fs::read_dir(&jd)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".torn-") && !n.ends_with("mine"))
            .collect();
        names.sort();
        let kept: Vec<Vec<u8>> = names
            .iter()
            .map(|n| fs::read(jd.join(n)).unwrap())
            .collect();
        assert_eq!(kept, tails[tails.len() - KEEP_TORN..]);
        assert_eq!(
            fs::read(jd.join("log-0.jsonl.torn-mine")).unwrap(),
            b"hand-made"
        );
        assert_eq!(ids(&open(d.path()).unwrap()), ["a", "b"]);
    }

    /// The last change without its newline (one byte lost at the end of
    /// the log, or a crash between the line and its newline): it is whole,
    /// so it is kept, and its line is ended so the log goes on. Before, it
    /// was cut off as a torn tail: an acknowledged block volume was rolled
    /// back and its file deleted.
    #[test]
    fn a_whole_last_change_without_its_newline_is_kept() {
        let d = tempfile::tempdir().unwrap();
        let len = two_records(d.path());
        let log = log_path(d.path(), 0);
        OpenOptions::new()
            .write(true)
            .open(&log)
            .unwrap()
            .set_len(len - 1)
            .unwrap();
        let s = open(d.path()).unwrap();
        assert_eq!(ids(&s), ["a", "b"]);
        assert_eq!(s.journal.position(), (0, len));
        assert_eq!(fs::read(&log).unwrap().last(), Some(&b'\n'));
        s.insert_new(rec("c", "c", 1), ok).unwrap();
        drop(s);
        assert_eq!(ids(&open(d.path()).unwrap()), ["a", "b", "c"]);
    }

    /// The last change whole, and its newline alone in a disk sector that
    /// never got written (a NUL in its place, where the sector begins): the
    /// newline never reached the disk, as when it is missing, so the
    /// change is kept and its line ended in place. Before, the NUL read as
    /// an unwritten sector, the torn tail of a crash, and the whole change
    /// was cut off with it.
    #[test]
    fn a_whole_last_change_whose_newline_sector_never_got_written_is_kept() {
        let probe = tempfile::tempdir().unwrap();
        let short = two_records(probe.path());
        // b's name padded so that its newline starts a sector
        let pad = ((512 - (short - 1) % 512) % 512) as usize;
        let d = tempfile::tempdir().unwrap();
        let s = open(d.path()).unwrap();
        s.insert_new(rec("a", "a", 1), ok).unwrap();
        s.insert_new(rec("b", &format!("b{}", "x".repeat(pad)), 1), ok)
            .unwrap();
        let len = s.journal.position().1;
        drop(s);
        assert_eq!((len - 1) % 512, 0, "{len}");
        let log = log_path(d.path(), 0);
        let mut bytes = fs::read(&log).unwrap();
        assert_eq!(bytes.len() as u64, len);
        bytes[len as usize - 1] = 0;
        fs::write(&log, &bytes).unwrap();
        let s = open(d.path()).unwrap();
        assert_eq!(ids(&s), ["a", "b"]);
        assert_eq!(s.journal.position(), (0, len));
        let now = fs::read(&log).unwrap();
        assert_eq!(now.len() as u64, len);
        assert_eq!(now.last(), Some(&b'\n'));
        let torn: Vec<_> = fs::read_dir(journal_dir(d.path()))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("torn"))
            .collect();
        assert!(torn.is_empty(), "{torn:?}");
        s.insert_new(rec("c", "c", 1), ok).unwrap();
        drop(s);
        assert_eq!(ids(&open(d.path()).unwrap()), ["a", "b", "c"]);
    }

    /// The newline of the last line changed into another byte (a NUL
    /// where no disk sector begins too), or one byte of the last line
    /// turned NUL where no disk sector begins: changed bytes, not a torn
    /// write. Start-up stops (nothing is dropped without an operator); a
    /// change whose newline alone changed is still read (so `state
    /// repair` keeps it; before, one whose newline turned NUL was not).
    #[test]
    fn a_changed_byte_in_the_last_line_stops_start_up() {
        for (at_end, byte) in [(true, 0x0b_u8), (true, 0), (false, 0)] {
            let d = tempfile::tempdir().unwrap();
            let len = two_records(d.path());
            let log = log_path(d.path(), 0);
            let mut bytes = fs::read(&log).unwrap();
            let i = if at_end {
                len as usize - 1
            } else {
                len as usize - 20
            };
            assert_ne!((i % 512), 0);
            bytes[i] = byte;
            fs::write(&log, &bytes).unwrap();
            let e = open(d.path()).err().expect("start-up stops");
            assert!(
                e.to_string().contains("log-0.jsonl") && e.to_string().contains("changed"),
                "{e}"
            );
            let scan =
                super::super::journal::scan(&crate::os::files::RealFiles, &journal_dir(d.path()))
                    .unwrap();
            assert!(scan.torn.is_none());
            assert_eq!(scan.records.contains_key("b"), at_end, "{at_end}");
        }
    }

    #[test]
    fn damage_that_is_not_a_torn_tail_stops_start_up() {
        let d = tempfile::tempdir().unwrap();
        drop(open(d.path()).unwrap());
        // A checksum that holds over something that is not an entry.
        let json = b"{\"put\":{\"id\":1}}";
        let mut line = format!("{:08x} ", crc32fast::hash(json)).into_bytes();
        line.extend_from_slice(json);
        line.push(b'\n');
        fs::write(log_path(d.path(), 0), &line).unwrap();
        assert!(matches!(open(d.path()), Err(StateError::Damaged { .. })));
        // A damaged snapshot.
        fs::write(log_path(d.path(), 0), b"").unwrap();
        fs::write(journal_dir(d.path()).join("snapshot-3.jsonl"), b"garbage\n").unwrap();
        assert!(matches!(open(d.path()), Err(StateError::Damaged { .. })));
        // An empty log newer than every snapshot is a compaction
        // interrupted before its snapshot was renamed into place: removed.
        fs::remove_file(journal_dir(d.path()).join("snapshot-3.jsonl")).unwrap();
        fs::write(log_path(d.path(), 7), b"").unwrap();
        assert!(open(d.path()).unwrap().is_empty());
        assert!(!log_path(d.path(), 7).exists());
        // One with something in it was not made by berth.
        fs::write(log_path(d.path(), 7), b"x").unwrap();
        assert!(matches!(open(d.path()), Err(StateError::Damaged { .. })));
    }

    /// At exit a log worth it is folded into a snapshot: the next start
    /// replays nothing, and reads the same records.
    #[test]
    fn a_checkpoint_folds_the_log_into_a_snapshot() {
        let d = tempfile::tempdir().unwrap();
        let s = open(d.path()).unwrap();
        for id in ["a", "b", "c"] {
            s.insert_new(rec(id, id, 1), ok).unwrap();
        }
        s.remove("b").unwrap();
        let (_, len) = s.journal.position();
        assert!(
            !s.checkpoint(len + 1).unwrap(),
            "a log shorter than asked stays"
        );
        assert_eq!(s.journal.position(), (0, len));
        assert!(s.checkpoint(len).unwrap());
        assert_eq!(s.journal.position(), (1, 0));
        assert!(
            !s.checkpoint(0).unwrap(),
            "an empty log is not folded again"
        );
        s.insert_new(rec("d", "d", 1), ok).unwrap();
        drop(s);
        let mut files: Vec<_> = fs::read_dir(journal_dir(d.path()))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(files, ["log-1.jsonl", "snapshot-1.bin", "snapshot-1.jsonl"]);
        let s = open(d.path()).unwrap();
        assert_eq!(ids(&s), ["a", "c", "d"]);
        assert_eq!(s.last_seq(), 4);
    }

    /// Versions before the binary snapshot wrote snapshots as JSON lines:
    /// such a generation is read as it is, and the next compaction writes
    /// a binary one and removes it. Two snapshots of one generation are
    /// damage.
    #[test]
    fn a_snapshot_of_json_lines_is_read_and_replaced_by_a_binary_one() {
        let d = tempfile::tempdir().unwrap();
        drop(open(d.path()).unwrap());
        let j = journal_dir(d.path());
        let mut snapshot = Vec::new();
        for id in ["a", "b"] {
            encode(&EntryRef::Put(&rec(id, id, 1)), &mut snapshot).unwrap();
        }
        let mut log = Vec::new();
        encode(&EntryRef::Put(&rec("c", "c", 1)), &mut log).unwrap();
        encode(&EntryRef::Del("a"), &mut log).unwrap();
        fs::write(j.join("snapshot-1.jsonl"), &snapshot).unwrap();
        fs::write(log_path(d.path(), 1), &log).unwrap();
        let s = open(d.path()).unwrap();
        assert_eq!(ids(&s), ["b", "c"]);
        assert!(
            !log_path(d.path(), 0).exists(),
            "an older generation is stale"
        );
        s.journal.rebase(&|| s.snapshot(&Committed::all())).unwrap();
        drop(s);
        let mut files: Vec<_> = fs::read_dir(&j)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(files, ["log-2.jsonl", "snapshot-2.bin", "snapshot-2.jsonl"]);
        let bin = fs::read(j.join("snapshot-2.bin")).unwrap();
        assert!(bin.starts_with(crate::state::snapshot_file::MAGIC));
        // beside it, the guard against a berth from before binary
        // snapshots: the one line of what such a berth reads as this
        // generation's snapshot, not a change, so it stops there
        let guard = fs::read(j.join("snapshot-2.jsonl")).unwrap();
        assert_eq!(guard, crate::state::journal::downgrade_guard(2));
        assert!(matches!(
            crate::state::journal::decode(&guard),
            crate::state::journal::Line::NotAnEntry(e) if e.contains("binary")
        ));
        assert_eq!(ids(&open(d.path()).unwrap()), ["b", "c"]);
        fs::write(j.join("snapshot-2.jsonl"), &snapshot).unwrap();
        match open(d.path()) {
            Err(StateError::Damaged { why, .. }) => assert!(why.contains("two snapshots"), "{why}"),
            other => panic!("two snapshots of one generation opened: {:?}", other.err()),
        }
        // a damaged binary snapshot names the frame
        fs::remove_file(j.join("snapshot-2.jsonl")).unwrap();
        let mut b = bin.clone();
        let last = b.len() - 1;
        b[last] ^= 1;
        fs::write(j.join("snapshot-2.bin"), &b).unwrap();
        match open(d.path()) {
            Err(e @ StateError::Damaged { .. }) => {
                let e = e.to_string();
                assert!(e.contains("snapshot-2.bin") && e.contains("frame"), "{e}");
            }
            other => panic!("a damaged snapshot opened: {:?}", other.err()),
        }
    }

    #[test]
    fn compaction_keeps_every_record_and_drops_old_files() {
        let d = tempfile::tempdir().unwrap();
        let s = open(d.path()).unwrap();
        s.journal.set_compact_at(2000);
        let mut want = Vec::new();
        for i in 0..60 {
            let id = format!("v{i:02}");
            s.insert_new(rec(&id, &id, 1), ok).unwrap();
            let mut r = s.get(&id).unwrap();
            s.set_phase(&mut r, Phase::Deleting).unwrap();
            if i % 3 == 0 {
                s.remove(&id).unwrap();
            } else {
                want.push(id);
            }
        }
        // A reservation is not durable: a snapshot taken now leaves it out.
        s.reserve(rec("r", "r", 1), ok).unwrap();
        let (gen, _) = s.journal.position();
        assert!(gen >= 2, "compacted {gen} times");
        s.journal.rebase(&|| s.snapshot(&Committed::all())).unwrap();
        s.insert_new(rec("last", "last", 1), ok).unwrap();
        want.push("last".into());
        want.sort();
        assert_eq!(s.last_seq(), 62);
        let files: Vec<_> = fs::read_dir(journal_dir(d.path()))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(files.len(), 3, "{files:?}");
        drop(s);
        let s = open(d.path()).unwrap();
        assert_eq!(ids(&s), want);
        assert_eq!(s.get("v01").unwrap().phase, Phase::Deleting);
        assert_eq!(s.promised(Kind::Local), want.len() as i64);
    }

    #[test]
    fn a_compaction_interrupted_before_removing_the_old_files_opens() {
        let d = tempfile::tempdir().unwrap();
        let j = journal_dir(d.path());
        let listing = || {
            let mut files: Vec<_> = fs::read_dir(&j)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            files.sort();
            files
        };
        let s = open(d.path()).unwrap();
        s.insert_new(rec("a", "a", 1), ok).unwrap();
        s.journal.rebase(&|| s.snapshot(&Committed::all())).unwrap();
        s.insert_new(rec("b", "b", 1), ok).unwrap();
        // the previous generation's snapshot, guard and log, as a kill -9
        // after the next snapshot's rename (before their removal) leaves them
        let old: Vec<_> = listing()
            .into_iter()
            .map(|n| (fs::read(j.join(&n)).unwrap(), n))
            .collect();
        assert_eq!(old.len(), 3, "{:?}", listing());
        s.journal.rebase(&|| s.snapshot(&Committed::all())).unwrap();
        s.insert_new(rec("c", "c", 1), ok).unwrap();
        let now = listing();
        drop(s);
        for (bytes, name) in &old {
            fs::write(j.join(name), bytes).unwrap();
        }
        assert_eq!(listing().len(), 6);
        let s = open(d.path()).unwrap();
        assert_eq!(ids(&s), ["a", "b", "c"]);
        assert_eq!(listing(), now);
    }

    #[test]
    fn records_of_the_old_layout_are_imported() {
        let d = tempfile::tempdir().unwrap();
        let vols = d.path().join("volumes");
        fs::create_dir_all(&vols).unwrap();
        let mut r = rec("local-ab", "pvc-1", 7);
        r.seq = 4;
        fs::write(vols.join("local-ab.json"), serde_json::to_vec(&r).unwrap()).unwrap();
        fs::write(vols.join(".x.json.tmp"), b"partial").unwrap();
        let s = open(d.path()).unwrap();
        assert_eq!(s.get_by_name("pvc-1").unwrap().id, "local-ab");
        assert!(!vols.exists());
        drop(s);
        let s = open(d.path()).unwrap();
        assert_eq!(s.get("local-ab").unwrap().capacity_bytes, 7);
        assert_eq!(s.last_seq(), 4);
        // A corrupt old record stops start-up instead of being dropped.
        fs::create_dir_all(&vols).unwrap();
        fs::write(vols.join("bad.json"), b"{not json").unwrap();
        drop(s);
        assert!(matches!(open(d.path()), Err(StateError::Corrupt { .. })));
    }

    #[test]
    fn a_failed_write_undoes_the_change_and_poisons_the_journal() {
        let d = tempfile::tempdir().unwrap();
        let s = open(d.path()).unwrap();
        s.insert_new(rec("a", "a", 1), ok).unwrap();
        // Every write to /dev/full fails with ENOSPC, and it cannot be
        // truncated back either.
        s.journal
            .replace_file(OpenOptions::new().write(true).open("/dev/full").unwrap());
        let mut r = s.get("a").unwrap();
        r.capacity_bytes = 9;
        assert!(s.put(&r).is_err());
        assert_eq!(s.get("a").unwrap().capacity_bytes, 1);
        assert!(s.remove("a").is_err());
        assert!(s.get("a").is_some());
        assert!(s.poisoned().is_some());
        assert!(matches!(
            s.insert_new(rec("b", "b", 1), ok),
            Err(StateError::Poisoned(_))
        ));
        assert!(s.get("b").is_none());
        drop(s);
        assert_eq!(ids(&open(d.path()).unwrap()), ["a"]);
    }

    /// The admit check and the insert are one step: a second insert whose
    /// check runs while the first is still admitting sees the first record.
    #[test]
    fn admit_and_insert_are_one_step() {
        let d = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(open(d.path()).unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        let first = {
            let s = s.clone();
            std::thread::spawn(move || {
                s.insert_new(rec("a", "a", 1), |_| {
                    tx.send(()).unwrap();
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    Ok::<(), StateError>(())
                })
                .unwrap();
            })
        };
        rx.recv().unwrap();
        let second = s.insert_new(rec("b", "b", 1), |a| match a.get("a") {
            Some(_) => Err(StateError::io(
                "admit",
                "/",
                std::io::Error::other("overlaps a"),
            )),
            None => Ok(()),
        });
        first.join().unwrap();
        assert!(
            second.is_err(),
            "the second check ran before the first insert"
        );
        assert_eq!(ids(&s), ["a"]);
    }

    #[test]
    fn concurrent_changes_all_survive() {
        let d = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(open(d.path()).unwrap());
        s.journal.set_compact_at(50_000);
        let threads: Vec<_> = (0..16)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in 0..40 {
                        let id = format!("t{t}-{i}");
                        s.insert_new(rec(&id, &id, 1), ok).unwrap();
                        let mut r = s.get(&id).unwrap();
                        s.set_phase(&mut r, Phase::Deleting).unwrap();
                        if i % 2 == 0 {
                            s.remove(&id).unwrap();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let before = ids(&s);
        assert_eq!(before.len(), 16 * 20);
        assert!(s.journal.position().0 >= 1);
        drop(s);
        assert_eq!(ids(&open(d.path()).unwrap()), before);
    }

    fn open_on(p: &Path, f: &Arc<crate::os::fake::FakeOs>) -> Result<Store, StateError> {
        Store::open_with(p, f.clone(), ANY)
    }

    /// Records rebuilt from an NFS id carry seq 0: each gets its own seq
    /// (two with the same one shared a slot of the by-seq index, and one
    /// vanished from ListVolumes and from the next snapshot).
    #[test]
    fn records_put_without_a_seq_get_unique_ones() {
        let d = tempfile::tempdir().unwrap();
        let s = open(d.path()).unwrap();
        s.insert_new(rec("a", "a", 1), ok).unwrap();
        s.put(&rec("nfs-1", "nfs-1", 0)).unwrap();
        s.put(&rec("nfs-2", "nfs-2", 0)).unwrap();
        let (page, _) = s.page(0, 0);
        assert_eq!(page.len(), 3);
        let seqs: HashSet<u64> = page.iter().map(|r| r.seq).collect();
        assert_eq!(seqs.len(), 3);
        // A second put keeps the seq.
        let before = s.get("nfs-1").unwrap().seq;
        s.put(&rec("nfs-1", "nfs-1", 5)).unwrap();
        assert_eq!(s.get("nfs-1").unwrap().seq, before);
        s.journal.rebase(&|| s.snapshot(&Committed::all())).unwrap();
        drop(s);
        let s = open(d.path()).unwrap();
        assert_eq!(ids(&s), ["a", "nfs-1", "nfs-2"]);
        assert_eq!(s.page(0, 0).0.len(), 3);
    }

    /// A journal written by an older version, with two records of seq 0:
    /// both load, with unique seqs.
    #[test]
    fn duplicate_seqs_on_disk_are_made_unique_at_load() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(journal_dir(d.path())).unwrap();
        let mut bytes = Vec::new();
        for id in ["x", "y", "z"] {
            let mut r = rec(id, id, 1);
            r.seq = if id == "z" { 1 } else { 0 };
            encode(&EntryRef::Put(&r), &mut bytes).unwrap();
        }
        fs::write(log_path(d.path(), 0), &bytes).unwrap();
        let s = open(d.path()).unwrap();
        let (page, _) = s.page(0, 0);
        assert_eq!(page.len(), 3, "{page:?}");
        let seqs: HashSet<u64> = page.iter().map(|r| r.seq).collect();
        assert_eq!(seqs.len(), 3);
    }

    /// A compaction snapshots only committed changes: a change applied to
    /// the index but queued behind the compacting round, whose own write
    /// then fails, is in neither the snapshot nor the index. (Before, the
    /// snapshot took the index as it was: a failed `Deleting` answered
    /// INTERNAL, and the next start deleted the volume.)
    #[test]
    fn a_snapshot_never_holds_a_change_whose_write_failed() {
        let d = tempfile::tempdir().unwrap();
        let (_, f) = crate::os::Os::fake();
        let s = Arc::new(open_on(d.path(), &f).unwrap());
        s.insert_new(rec("keep", "keep", 1), ok).unwrap();
        s.journal.set_compact_at(1);
        // Round 1 (x) blocks on the writer; the Deleting of `keep` is
        // applied and queued behind it.
        let held = s.journal.writer_for_test();
        let t1 = {
            let s = s.clone();
            std::thread::spawn(move || s.insert_new(rec("x", "x", 1), ok).map(|_| ()))
        };
        // `keep` took ticket 0; x has ticket 1 once queued, and its round
        // is the one blocked on the writer.
        while s.journal.queued() < 2 || !s.journal.writing() {
            std::thread::yield_now();
        }
        let t2 = {
            let s = s.clone();
            std::thread::spawn(move || {
                let mut r = s.get("keep").unwrap();
                s.set_phase(&mut r, Phase::Deleting)
            })
        };
        while s.get("keep").unwrap().phase != Phase::Deleting {
            std::thread::yield_now();
        }
        // Round 1's write succeeds and compacts into generation 1; the
        // write of round 2 (into log-1) fails.
        f.fail_op_under("write", &log_path(d.path(), 1), libc::EIO);
        drop(held);
        t1.join().unwrap().unwrap();
        assert!(t2.join().unwrap().is_err());
        assert_eq!(s.get("keep").unwrap().phase, Phase::Ready);
        assert!(s.journal.position().0 >= 1, "compacted");
        f.clear_file_faults();
        drop(s);
        let s = open(d.path()).unwrap();
        assert_eq!(s.get("keep").unwrap().phase, Phase::Ready);
        assert_eq!(ids(&s), ["keep", "x"]);
    }

    /// Index-level rule: the snapshot value of a record with a change in
    /// flight is the one before its oldest uncommitted change.
    #[test]
    fn the_committed_value_is_the_one_before_the_oldest_uncommitted_change() {
        let mut idx: Index<VolumeRecord> = Index::default();
        let v = |cap| rec("a", "a", cap);
        idx.insert(v(1));
        let old = idx.insert(v(2));
        idx.inflight.entry("a".into()).or_default().push(Pending {
            ticket: 7,
            old,
            was_reserved: false,
        });
        let old = idx.insert(v(3));
        idx.inflight.entry("a".into()).or_default().push(Pending {
            ticket: 8,
            old,
            was_reserved: false,
        });
        fn cap(idx: &Index<VolumeRecord>, c: Committed) -> Option<i64> {
            idx.committed("a", &c).map(|r| r.capacity_bytes)
        }
        let c = Committed::for_test;
        assert_eq!(cap(&idx, c(7, vec![])), Some(1));
        assert_eq!(cap(&idx, c(8, vec![])), Some(2));
        assert_eq!(cap(&idx, c(9, vec![])), Some(3));
        assert_eq!(cap(&idx, c(9, vec![(7, 8)])), Some(1));
        // Undo of the failed first change: the second inherits its old
        // value, and the index keeps the second's value.
        idx.settle("a", 7, true);
        assert_eq!(
            idx.records.get("a").map(|r| r.capacity_bytes).unwrap_or(-1),
            3
        );
        assert_eq!(cap(&idx, c(8, vec![])), Some(1));
        idx.settle("a", 8, true);
        assert_eq!(
            idx.records.get("a").map(|r| r.capacity_bytes).unwrap_or(-1),
            1
        );
        assert!(idx.inflight.is_empty());
    }

    /// After a failed flush the page cache may show data the disk never
    /// got: start-up compares with the disk and writes the log again.
    #[test]
    fn start_up_rewrites_a_log_the_disk_lost() {
        let d = tempfile::tempdir().unwrap();
        let (_, f) = crate::os::Os::fake();
        let s = open_on(d.path(), &f).unwrap();
        s.insert_new(rec("a", "a", 1), ok).unwrap();
        let after_a = fs::read(log_path(d.path(), 0)).unwrap();
        s.insert_new(rec("b", "b", 1), ok).unwrap();
        drop(s);
        // The disk holds only the first line.
        f.set_durable(&log_path(d.path(), 0), Some(after_a));
        f.clear_file_ops();
        let s = open_on(d.path(), &f).unwrap();
        assert_eq!(ids(&s), ["a", "b"]);
        let ops: Vec<(&str, String)> = f
            .file_ops()
            .iter()
            .map(|o| {
                (
                    o.op,
                    o.path.file_name().unwrap().to_string_lossy().into_owned(),
                )
            })
            .collect();
        let tmp = "log-0.jsonl.tmp".to_string();
        for want in [
            ("write", tmp.clone()),
            ("fsync", tmp.clone()),
            ("rename", tmp),
            ("fsync", "journal".into()),
        ] {
            assert!(
                ops.contains(&(want.0, want.1.clone())),
                "{want:?} not in {ops:?}"
            );
        }
        f.forget_durable();
        drop(s);
        // Nothing to rewrite when the disk agrees.
        f.clear_file_ops();
        let s = open_on(d.path(), &f).unwrap();
        assert!(!f.file_ops().iter().any(|o| o.op == "rename"));
        assert_eq!(ids(&s), ["a", "b"]);
    }

    /// Every step of a change that fails (ENOSPC, EIO, EROFS at the write
    /// or the flush) fails the change and leaves the store, and the store
    /// after a restart, as it was.
    #[test]
    fn a_failed_step_is_never_acknowledged_and_loses_nothing() {
        for errno in [libc::ENOSPC, libc::EIO, libc::EROFS] {
            for op in ["write", "fdatasync"] {
                let d = tempfile::tempdir().unwrap();
                let (_, f) = crate::os::Os::fake();
                let s = open_on(d.path(), &f).unwrap();
                s.insert_new(rec("a", "a", 1), ok).unwrap();
                f.fail_next(op, errno);
                let mut r = s.get("a").unwrap();
                assert!(
                    s.set_phase(&mut r, Phase::Deleting).is_err(),
                    "{op} {errno}"
                );
                assert_eq!(s.get("a").unwrap().phase, Phase::Ready);
                assert!(s.insert_new(rec("b", "b", 1), ok).is_err() == (op == "fdatasync"));
                drop(s);
                let s = open_on(d.path(), &f).unwrap();
                assert_eq!(s.get("a").unwrap().phase, Phase::Ready, "{op} {errno}");
                let want: &[&str] = if op == "fdatasync" {
                    &["a"]
                } else {
                    &["a", "b"]
                };
                assert_eq!(ids(&s), want);
            }
        }
    }

    /// The log removed by hand (alone, or with its whole directory) while
    /// the store is open: the next change fails (it went to a file no start
    /// would read, so it is not acknowledged), every committed record is
    /// written again as a new generation at once, later changes succeed,
    /// and a restart finds every acknowledged record.
    #[test]
    fn a_log_removed_while_open_is_written_again_and_nothing_is_lost() {
        for whole_dir in [false, true] {
            let d = tempfile::tempdir().unwrap();
            let s = open(d.path()).unwrap();
            s.insert_new(rec("a", "a", 1), ok).unwrap();
            let j = journal_dir(d.path());
            if whole_dir {
                fs::remove_dir_all(&j).unwrap();
            } else {
                for e in fs::read_dir(&j).unwrap().flatten() {
                    if e.file_name().to_string_lossy().starts_with("log-") {
                        fs::remove_file(e.path()).unwrap();
                    }
                }
            }
            let e = s.insert_new(rec("b", "b", 1), ok).unwrap_err();
            assert!(e.to_string().contains("removed or replaced"), "{e}");
            assert!(s.get("b").is_none());
            assert!(s.poisoned().is_none(), "written again at once");
            s.insert_new(rec("c", "c", 1), ok).unwrap();
            drop(s);
            let s = open(d.path()).unwrap();
            assert_eq!(ids(&s), ["a", "c"], "whole dir {whole_dir}");
        }
    }

    /// A snapshot without its log (removed by hand after a compaction) is
    /// damage: the changes made since the snapshot would be lost without a
    /// word. `state repair` makes a state that opens again.
    #[test]
    fn a_missing_log_beside_its_snapshot_is_damage() {
        let d = tempfile::tempdir().unwrap();
        let s = open(d.path()).unwrap();
        // ids of their kind: `repair` drops any other
        let (a, b) = (
            format!("local-{}", "a".repeat(32)),
            format!("local-{}", "b".repeat(32)),
        );
        s.insert_new(rec(&a, "a", 1), ok).unwrap();
        assert!(s.checkpoint(1).unwrap());
        s.insert_new(rec(&b, "b", 1), ok).unwrap();
        drop(s);
        let j = journal_dir(d.path());
        let log = fs::read_dir(&j)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("log-"))
            .unwrap();
        fs::remove_file(&log).unwrap();
        match open(d.path()) {
            Err(e @ StateError::Damaged { .. }) => {
                let e = e.to_string();
                assert!(e.contains("missing") && e.contains("log-"), "{e}");
            }
            other => panic!("a snapshot without its log opened: {:?}", other.err()),
        }
        crate::state::tools::repair(d.path(), Arc::new(crate::os::files::RealFiles)).unwrap();
        assert_eq!(ids(&open(d.path()).unwrap()), [a]);
    }

    /// The binary snapshot of the current generation removed (by hand, or
    /// lost with a restore that missed it) while the guard beside it
    /// stays: start-up, `check` and `repair` name the snapshot as missing
    /// and say its records are lost. Before, the guard was read as the
    /// snapshot: the flaw named `snapshot-<G>.jsonl` "not a record" and
    /// nothing said `snapshot-<G>.bin`, which held every record, was gone.
    #[test]
    fn a_missing_binary_snapshot_beside_its_guard_is_named() {
        let d = tempfile::tempdir().unwrap();
        let s = open(d.path()).unwrap();
        let (a, b) = (
            format!("local-{}", "a".repeat(32)),
            format!("local-{}", "b".repeat(32)),
        );
        s.insert_new(rec(&a, "a", 1), ok).unwrap();
        assert!(s.checkpoint(1).unwrap());
        s.insert_new(rec(&b, "b", 1), ok).unwrap();
        let gen = s.journal.position().0;
        drop(s);
        let j = journal_dir(d.path());
        let bin = j.join(crate::state::journal::snapshot_name(gen));
        assert!(j
            .join(crate::state::journal::json_snapshot_name(gen))
            .exists());
        fs::remove_file(&bin).unwrap();
        match open(d.path()) {
            Err(e @ StateError::Damaged { .. }) => {
                let e = e.to_string();
                assert!(
                    e.contains(&bin.display().to_string()) && e.contains("missing"),
                    "{e}"
                );
            }
            other => panic!("opened without its snapshot: {:?}", other.err()),
        }
        let report =
            crate::state::tools::repair(d.path(), Arc::new(crate::os::files::RealFiles)).unwrap();
        assert!(report.contains("is missing"), "{report}");
        assert_eq!(ids(&open(d.path()).unwrap()), [b]);
    }

    /// A full disk says so: the errno reaches the change's error.
    #[test]
    fn a_full_disk_is_named_in_the_error() {
        let d = tempfile::tempdir().unwrap();
        let (_, f) = crate::os::Os::fake();
        let s = open_on(d.path(), &f).unwrap();
        f.fail_next("write", libc::ENOSPC);
        let e = s.insert_new(rec("a", "a", 1), ok).unwrap_err();
        assert!(e.to_string().contains("No space left on device"), "{e}");
    }

    /// Bytes allocated to the file at `p` (its blocks, past its end too).
    fn allocated(p: &Path) -> u64 {
        crate::os::files::allocated_bytes(&fs::metadata(p).unwrap())
    }

    /// The log keeps `RESERVE` bytes allocated past its end (so appends
    /// need no new block on a full filesystem), which no reader sees: its
    /// size is the end of its last line, start-up finds no torn tail or
    /// damage in it and keeps what it found, a failed write's cut (which
    /// frees it) takes it again, and so does each compaction's new log.
    #[test]
    fn the_log_keeps_space_past_its_end_that_no_reader_sees() {
        use crate::state::journal::RESERVE;
        let d = tempfile::tempdir().unwrap();
        let (_, f) = crate::os::Os::fake();
        let s = open_on(d.path(), &f).unwrap();
        let log = log_path(d.path(), 0);
        assert!(allocated(&log) >= RESERVE, "{}", allocated(&log));
        for id in ["a", "b", "c"] {
            s.insert_new(rec(id, id, 1), ok).unwrap();
        }
        let len = s.journal.position().1;
        assert_eq!(fs::metadata(&log).unwrap().len(), len);
        assert!(allocated(&log) >= RESERVE, "{}", allocated(&log));
        f.fail_next("write", libc::ENOSPC);
        assert!(s.insert_new(rec("d", "d", 1), ok).is_err());
        assert_eq!(fs::metadata(&log).unwrap().len(), len);
        assert!(allocated(&log) >= RESERVE, "taken again after the cut");
        drop(s);
        let reserve_calls =
            |f: &crate::os::fake::FakeOs| f.file_ops().iter().filter(|o| o.op == "reserve").count();
        let (_, f) = crate::os::Os::fake();
        let s = open_on(d.path(), &f).unwrap();
        assert_eq!(
            reserve_calls(&f),
            0,
            "what was kept is kept, not taken again"
        );
        assert_eq!(ids(&s), ["a", "b", "c"]);
        let scan =
            crate::state::journal::scan(&crate::os::files::RealFiles, &journal_dir(d.path()))
                .unwrap();
        assert!(scan.error().is_none() && scan.torn.is_none());
        assert!(s.checkpoint(0).unwrap());
        assert!(allocated(&log_path(d.path(), 1)) >= RESERVE);
        assert_eq!(fs::metadata(log_path(d.path(), 1)).unwrap().len(), 0);
        s.insert_new(rec("e", "e", 1), ok).unwrap();
        // A filesystem that keeps no space ahead (no fallocate) still
        // compacts, without a reserve.
        f.fail_next("reserve", libc::EOPNOTSUPP);
        assert!(s.checkpoint(0).unwrap());
        assert_eq!(s.journal.position(), (2, 0));
        drop(s);
        assert_eq!(ids(&open(d.path()).unwrap()), ["a", "b", "c", "e"]);
    }

    /// The reserve counts as short (creates refused, `check_journal_room`)
    /// only when the filesystem has no room for it, never when it keeps
    /// no space ahead at all; and no longer once there is room again,
    /// without a change written meanwhile.
    #[test]
    fn the_reserve_is_short_only_for_want_of_space() {
        for (errno, short) in [
            (libc::ENOSPC, true),
            (libc::EDQUOT, true),
            (libc::EOPNOTSUPP, false),
        ] {
            let d = tempfile::tempdir().unwrap();
            let (_, f) = crate::os::Os::fake();
            f.fail_op_under("reserve", d.path(), errno);
            let s = open_on(d.path(), &f).unwrap();
            assert_eq!(s.reserve_short(), short, "errno {errno}");
            s.insert_new(rec("a", "a", 1), ok).unwrap();
            assert_eq!(s.reserve_short(), short, "errno {errno}");
            f.clear_file_faults();
            assert!(!s.reserve_short(), "errno {errno}: room again");
        }
    }

    /// A compaction that cannot keep space for its new log (a full
    /// filesystem) switches to nothing: the old generation, with its own
    /// reserve, stays current and whole, no file of the new one is left,
    /// and changes go on in the old log.
    #[test]
    fn a_compaction_without_room_for_its_new_log_keeps_the_old_one() {
        let d = tempfile::tempdir().unwrap();
        let (_, f) = crate::os::Os::fake();
        let s = open_on(d.path(), &f).unwrap();
        s.insert_new(rec("a", "a", 1), ok).unwrap();
        let before = s.journal.position();
        f.fail_next("reserve", libc::ENOSPC);
        let e = crate::error::chain(&s.checkpoint(0).unwrap_err());
        assert!(e.contains("No space left on device"), "{e}");
        assert_eq!(s.journal.position(), before);
        assert_eq!(s.poisoned(), None);
        s.insert_new(rec("b", "b", 1), ok).unwrap();
        let mut names: Vec<_> = fs::read_dir(journal_dir(d.path()))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["log-0.jsonl"]);
        drop(s);
        assert_eq!(ids(&open(d.path()).unwrap()), ["a", "b"]);
    }

    fn snap(id: &str, name: &str, source: &str) -> SnapshotRecord {
        SnapshotRecord {
            id: id.into(),
            name: name.into(),
            kind: Kind::Local,
            seq: 0,
            phase: Phase::Ready,
            source_volume_id: source.into(),
            size_bytes: 1,
            node: "n1".into(),
            parameters: Default::default(),
            created_secs: 1,
            created_nanos: 2,
            block: None,
            file_bytes: None,
            extra: None,
        }
    }

    /// Snapshot records live beside volume records: their own names and
    /// order, in the same journal, through compaction and reopen.
    #[test]
    fn snapshots_are_kept_beside_volumes() {
        let d = tempfile::tempdir().unwrap();
        let s = open(d.path()).unwrap();
        s.journal.set_compact_at(1);
        s.insert_new(rec("v", "same-name", 1), ok).unwrap();
        let a = s
            .snapshot_insert_new(snap("s1", "same-name", "v"), |_| Ok::<(), StateError>(()))
            .unwrap();
        let b = s
            .snapshot_insert_new(snap("s2", "other", "v"), |a| match a.get("s1") {
                Some(_) => Ok::<(), StateError>(()),
                None => panic!("admit does not see snapshot s1"),
            })
            .unwrap();
        assert_eq!((a.seq, b.seq), (1, 2));
        assert_eq!(s.get_by_name("same-name").unwrap().id, "v");
        assert_eq!(s.snapshot_by_name("same-name").unwrap().id, "s1");
        s.snapshot_remove("s2").unwrap();
        assert!(s.journal.position().0 >= 1, "compacted");
        drop(s);
        let s = open(d.path()).unwrap();
        assert_eq!(s.len(), 1);
        let (page, next) = s.snapshot_page(0, 0);
        assert_eq!(
            page.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["s1"]
        );
        assert_eq!(next, None);
        assert_eq!(s.snapshot_get("s1").unwrap().created_nanos, 2);
        assert!(s.snapshot_get("v").is_none() && s.get("s1").is_none());
    }

    /// A page of the snapshots matching a filter: in creation order after
    /// the given seq, at most `max`, and "more" only when a further one
    /// matches (a page that ends exactly at the last match says none).
    #[test]
    fn snapshot_pages_match_in_order_and_say_when_more_match() {
        let d = tempfile::tempdir().unwrap();
        let s = open(d.path()).unwrap();
        for (id, src) in [("a", "v"), ("b", "w"), ("c", "v"), ("d", "w"), ("e", "v")] {
            s.snapshot_insert_new(snap(id, id, src), |_| Ok::<(), StateError>(()))
                .unwrap();
        }
        let ids = |(p, more): (Vec<SnapshotRecord>, bool)| {
            (p.into_iter().map(|r| r.id).collect::<Vec<_>>(), more)
        };
        let of_v = |r: &SnapshotRecord| r.source_volume_id == "v";
        let sv = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            ids(s.snapshot_page_matching(0, 0, of_v)),
            (sv(&["a", "c", "e"]), false)
        );
        assert_eq!(
            ids(s.snapshot_page_matching(0, 2, of_v)),
            (sv(&["a", "c"]), true)
        );
        // after c (seq 3): only e is left, and it ends the list
        assert_eq!(
            ids(s.snapshot_page_matching(3, 1, of_v)),
            (sv(&["e"]), false)
        );
        assert_eq!(ids(s.snapshot_page_matching(5, 1, of_v)), (sv(&[]), false));
        assert_eq!(
            ids(s.snapshot_page_matching(1, 2, |_| true)),
            (sv(&["b", "c"]), true)
        );
    }
}
