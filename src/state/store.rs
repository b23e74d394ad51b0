//! The record store: files under `<state-dir>/volumes/`, index in memory.
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use super::dirsync::DirSync;
use super::record::{Kind, Phase, VolumeRecord};
use super::StateError;

#[derive(Default)]
struct Index {
    by_id: HashMap<String, VolumeRecord>,
    by_name: HashMap<String, String>,
    by_seq: BTreeMap<u64, String>,
    last_seq: u64,
    promised: HashMap<Kind, i64>,
}

impl Index {
    fn insert(&mut self, rec: VolumeRecord) {
        if let Some(old) = self.by_id.remove(&rec.id) {
            self.unlink(&old);
        }
        self.last_seq = self.last_seq.max(rec.seq);
        self.by_name.insert(rec.name.clone(), rec.id.clone());
        self.by_seq.insert(rec.seq, rec.id.clone());
        *self.promised.entry(rec.kind).or_default() += rec.capacity_bytes;
        self.by_id.insert(rec.id.clone(), rec);
    }

    fn unlink(&mut self, old: &VolumeRecord) {
        if self.by_name.get(&old.name) == Some(&old.id) {
            self.by_name.remove(&old.name);
        }
        self.by_seq.remove(&old.seq);
        *self.promised.entry(old.kind).or_default() -= old.capacity_bytes;
    }

    fn remove(&mut self, id: &str) -> Option<VolumeRecord> {
        let old = self.by_id.remove(id)?;
        self.unlink(&old);
        Some(old)
    }
}

pub struct Store {
    dir: PathBuf,
    dir_sync: DirSync,
    index: RwLock<Index>,
}

/// File name for an id: safe characters kept, everything else %XX, so no id
/// can name a file outside the directory or a temp file.
fn file_name(id: &str) -> String {
    let mut s = String::with_capacity(id.len() + 5);
    for (i, b) in id.bytes().enumerate() {
        let keep = b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (b == b'.' && i > 0);
        if keep {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s.push_str(".json");
    s
}

impl Store {
    /// Opens (creating if needed) the store in `state_dir` and loads every
    /// record. Leftover temp files from an interrupted write are removed; a
    /// record that cannot be parsed stops start-up (never guess).
    pub fn open(state_dir: &Path) -> Result<Store, StateError> {
        let dir = state_dir.join("volumes");
        fs::create_dir_all(&dir).map_err(|e| StateError::io("create", &dir, e))?;
        let dir_handle = File::open(&dir).map_err(|e| StateError::io("open", &dir, e))?;
        let mut index = Index::default();
        for entry in fs::read_dir(&dir).map_err(|e| StateError::io("read", &dir, e))? {
            let entry = entry.map_err(|e| StateError::io("read", &dir, e))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let path = entry.path();
            if name.starts_with('.') && name.ends_with(".tmp") {
                fs::remove_file(&path).map_err(|e| StateError::io("remove", &path, e))?;
                continue;
            }
            if !name.ends_with(".json") {
                continue;
            }
            let bytes = fs::read(&path).map_err(|e| StateError::io("read", &path, e))?;
            let rec: VolumeRecord =
                serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt {
                    path: path.clone(),
                    source,
                })?;
            index.insert(rec);
        }
        Ok(Store {
            dir,
            dir_sync: DirSync::new(dir_handle),
            index: RwLock::new(index),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, id: &str) -> Option<VolumeRecord> {
        self.read().by_id.get(id).cloned()
    }

    pub fn get_by_name(&self, name: &str) -> Option<VolumeRecord> {
        let idx = self.read();
        idx.by_name
            .get(name)
            .and_then(|id| idx.by_id.get(id))
            .cloned()
    }

    pub fn len(&self) -> usize {
        self.read().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes promised to volumes of `kind` (every phase counts).
    pub fn promised(&self, kind: Kind) -> i64 {
        self.read().promised.get(&kind).copied().unwrap_or(0)
    }

    /// Highest sequence number handed out so far.
    pub fn last_seq(&self) -> u64 {
        self.read().last_seq
    }

    /// Records in creation order after `after_seq`, at most `max` (0 = all),
    /// and the sequence number to continue after if more remain.
    pub fn page(&self, after_seq: u64, max: usize) -> (Vec<VolumeRecord>, Option<u64>) {
        let idx = self.read();
        let mut out = Vec::new();
        let mut it = idx
            .by_seq
            .range(after_seq.saturating_add(1)..)
            .filter_map(|(_, id)| idx.by_id.get(id));
        for rec in it.by_ref() {
            out.push(rec.clone());
            if max > 0 && out.len() == max {
                break;
            }
        }
        let more = it.next().is_some();
        let next = if more {
            out.last().map(|r| r.seq)
        } else {
            None
        };
        (out, next)
    }

    /// All records matching `f`.
    pub fn filter(&self, f: impl Fn(&VolumeRecord) -> bool) -> Vec<VolumeRecord> {
        self.read()
            .by_id
            .values()
            .filter(|r| f(r))
            .cloned()
            .collect()
    }

    /// Inserts a new record with the next sequence number, after `admit`
    /// accepted it given the bytes already promised to its kind (checked and
    /// reserved under one lock, so concurrent creates cannot overcommit).
    pub fn insert_new<E>(
        &self,
        mut rec: VolumeRecord,
        admit: impl FnOnce(i64) -> Result<(), E>,
    ) -> Result<VolumeRecord, E>
    where
        E: From<StateError>,
    {
        {
            let mut idx = self.write();
            admit(idx.promised.get(&rec.kind).copied().unwrap_or(0))?;
            rec.seq = idx.last_seq + 1;
            idx.insert(rec.clone());
        }
        if let Err(e) = self.persist(&rec) {
            self.write().remove(&rec.id);
            return Err(e.into());
        }
        Ok(rec)
    }

    /// Like `insert_new`, but only in memory: the record is written by the
    /// `put` that follows once the storage exists. For kinds whose storage
    /// left behind by a crash is recognisable as an orphan (see
    /// `VolumeKind::reconcile_orphans`), this saves a durable write.
    pub fn reserve<E>(
        &self,
        mut rec: VolumeRecord,
        admit: impl FnOnce(i64) -> Result<(), E>,
    ) -> Result<VolumeRecord, E> {
        let mut idx = self.write();
        admit(idx.promised.get(&rec.kind).copied().unwrap_or(0))?;
        rec.seq = idx.last_seq + 1;
        idx.insert(rec.clone());
        Ok(rec)
    }

    /// Drops a record from memory only (a reservation that failed).
    pub fn forget(&self, id: &str) {
        self.write().remove(id);
    }

    /// Writes a record (new or changed) durably, then updates the index.
    pub fn put(&self, rec: &VolumeRecord) -> Result<(), StateError> {
        self.persist(rec)?;
        self.write().insert(rec.clone());
        Ok(())
    }

    /// Sets a record's phase and writes it.
    pub fn set_phase(&self, rec: &mut VolumeRecord, phase: Phase) -> Result<(), StateError> {
        rec.phase = phase;
        self.put(rec)
    }

    /// Removes a record durably.
    pub fn remove(&self, id: &str) -> Result<(), StateError> {
        let path = self.dir.join(file_name(id));
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StateError::io("remove", &path, e)),
        }
        self.dir_sync
            .sync()
            .map_err(|e| StateError::io("fsync", &self.dir, e))?;
        self.write().remove(id);
        Ok(())
    }

    fn persist(&self, rec: &VolumeRecord) -> Result<(), StateError> {
        let bytes = serde_json::to_vec(rec).map_err(|source| StateError::Encode {
            id: rec.id.clone(),
            source,
        })?;
        let name = file_name(&rec.id);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let dst = self.dir.join(&name);
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| StateError::io("create", &tmp, e))?;
        f.write_all(&bytes)
            .and_then(|_| f.sync_all())
            .map_err(|e| StateError::io("write", &tmp, e))?;
        drop(f);
        fs::rename(&tmp, &dst).map_err(|e| StateError::io("rename", &dst, e))?;
        self.dir_sync
            .sync()
            .map_err(|e| StateError::io("fsync", &self.dir, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::record::*;

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
            capabilities: vec![],
            context: Default::default(),
            published: Default::default(),
            created_unix: 0,
            block: None,
        }
    }

    fn ok(_: i64) -> Result<(), StateError> {
        Ok(())
    }

    #[test]
    fn survives_reopen_and_pages_in_order() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        for i in 0..5 {
            s.insert_new(rec(&format!("id{i}"), &format!("n{i}"), 10), ok)
                .unwrap();
        }
        s.remove("id2").unwrap();
        assert_eq!(s.promised(Kind::Local), 40);
        drop(s);
        let s = Store::open(d.path()).unwrap();
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
        let s = Store::open(d.path()).unwrap();
        let r: Result<_, StateError> = s.insert_new(rec("a", "a", 5), |promised| {
            assert_eq!(promised, 0);
            Err(StateError::io("admit", "/", std::io::Error::other("full")))
        });
        assert!(r.is_err());
        assert!(s.is_empty());
        assert_eq!(fs::read_dir(d.path().join("volumes")).unwrap().count(), 0);
    }

    #[test]
    fn temp_files_are_cleaned_and_corrupt_records_refused() {
        let d = tempfile::tempdir().unwrap();
        let vols = d.path().join("volumes");
        fs::create_dir_all(&vols).unwrap();
        fs::write(vols.join(".x.json.tmp"), b"partial").unwrap();
        let s = Store::open(d.path()).unwrap();
        assert!(s.is_empty());
        assert!(!vols.join(".x.json.tmp").exists());
        drop(s);
        fs::write(vols.join("bad.json"), b"{not json").unwrap();
        assert!(matches!(
            Store::open(d.path()),
            Err(StateError::Corrupt { .. })
        ));
    }

    #[test]
    fn hostile_ids_stay_in_the_directory() {
        assert_eq!(file_name("../etc/passwd"), "%2E.%2Fetc%2Fpasswd.json");
        assert_eq!(file_name(".hidden"), "%2Ehidden.json");
        assert_eq!(file_name("local-ab.c"), "local-ab.c.json");
    }
}
