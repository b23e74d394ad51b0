//! Where the records of one kind live in memory: each record boxed once in
//! a slab of slots, found by id and by name through hash tables of slot
//! numbers (four bytes an entry, no copy of either string), and in creation
//! order through a map from seq to slot. A record costs its own box and
//! strings plus a few dozen bytes of index (see the README's
//! "Performance"); a `HashMap<String, Record>` costs a copy of the id and
//! a whole record-sized bucket for every empty one.
use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};

use hashbrown::{DefaultHashBuilder, HashTable};

use super::store::Record;

pub struct Table<R> {
    slots: Vec<Option<Box<R>>>,
    /// Empty slots, reused before the slab grows.
    free: Vec<u32>,
    by_id: HashTable<u32>,
    /// The newest record of each name.
    by_name: HashTable<u32>,
    by_seq: BTreeMap<u64, u32>,
    hasher: DefaultHashBuilder,
    /// Records handed out by walks of every record (`values`) so far: what
    /// a test reads to see that a call looks records up rather than walks
    /// them (`Store::records_walked`).
    walked: AtomicU64,
}

impl<R> Default for Table<R> {
    fn default() -> Self {
        Table {
            slots: Vec::new(),
            free: Vec::new(),
            by_id: HashTable::new(),
            by_name: HashTable::new(),
            by_seq: BTreeMap::new(),
            hasher: DefaultHashBuilder::default(),
            walked: AtomicU64::new(0),
        }
    }
}

/// A walk of every record (`Table::values`), counted once it ends.
struct Walk<'a, I> {
    it: I,
    n: u64,
    walked: &'a AtomicU64,
}

impl<'a, R: 'a, I: Iterator<Item = &'a R>> Iterator for Walk<'a, I> {
    type Item = &'a R;

    fn next(&mut self) -> Option<&'a R> {
        let r = self.it.next();
        self.n += u64::from(r.is_some());
        r
    }
}

impl<I> Drop for Walk<'_, I> {
    fn drop(&mut self) {
        self.walked.fetch_add(self.n, Ordering::Relaxed);
    }
}

/// The record in a slot the tables point to (they never point to an empty
/// one).
fn at<R>(slots: &[Option<Box<R>>], s: u32) -> Option<&R> {
    slots.get(s as usize).and_then(|b| b.as_deref())
}

impl<R: Record> Table<R> {
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.len() == 0
    }

    /// Makes room for `n` more records, so that inserting them never
    /// grows a table (growing reads every record's id or name again).
    pub fn reserve(&mut self, n: usize) {
        let Table {
            slots,
            by_id,
            by_name,
            hasher,
            ..
        } = self;
        slots.reserve(n);
        by_id.reserve(n, |&o| at(slots, o).map_or(0, |r| hasher.hash_one(r.id())));
        by_name.reserve(n, |&o| {
            at(slots, o).map_or(0, |r| hasher.hash_one(r.name()))
        });
    }

    fn slot_of(&self, id: &str) -> Option<u32> {
        let h = self.hasher.hash_one(id);
        self.by_id
            .find(h, |&s| at(&self.slots, s).is_some_and(|r| r.id() == id))
            .copied()
    }

    pub fn get(&self, id: &str) -> Option<&R> {
        self.slot_of(id).and_then(|s| at(&self.slots, s))
    }

    pub fn contains(&self, id: &str) -> bool {
        self.slot_of(id).is_some()
    }

    /// The newest record named `name`.
    pub fn by_name(&self, name: &str) -> Option<&R> {
        let h = self.hasher.hash_one(name);
        self.by_name
            .find(h, |&s| at(&self.slots, s).is_some_and(|r| r.name() == name))
            .and_then(|&s| at(&self.slots, s))
    }

    pub fn seq_taken(&self, seq: u64) -> bool {
        self.by_seq.contains_key(&seq)
    }

    /// Every record, in no particular order.
    pub fn values(&self) -> impl Iterator<Item = &R> {
        Walk {
            it: self.slots.iter().filter_map(|b| b.as_deref()),
            n: 0,
            walked: &self.walked,
        }
    }

    /// Records handed out by `values` so far.
    pub fn walked(&self) -> u64 {
        self.walked.load(Ordering::Relaxed)
    }

    /// Records with a seq above `after`, in seq order.
    pub fn after_seq(&self, after: u64) -> impl Iterator<Item = &R> {
        self.by_seq
            .range(after.saturating_add(1)..)
            .filter_map(|(_, &s)| at(&self.slots, s))
    }

    /// Inserts or replaces the record with `rec`'s id; returns the one it
    /// replaced. Boxed by the caller (replay parses records into boxes).
    pub fn insert(&mut self, rec: Box<R>) -> Option<R> {
        let (seq, h_id, h_name) = (
            rec.seq(),
            self.hasher.hash_one(rec.id()),
            self.hasher.hash_one(rec.name()),
        );
        let (slot, old) = match self.slot_of(rec.id()) {
            Some(s) => {
                self.unlink(s);
                let old = self.slots[s as usize].replace(rec);
                (s, old.map(|b| *b))
            }
            None => {
                let s = match self.free.pop() {
                    Some(s) => {
                        self.slots[s as usize] = Some(rec);
                        s
                    }
                    None => {
                        self.slots.push(Some(rec));
                        (self.slots.len() - 1) as u32
                    }
                };
                let Table {
                    slots,
                    by_id,
                    hasher,
                    ..
                } = self;
                by_id.insert_unique(h_id, s, |&o| {
                    at(slots, o).map_or(0, |r| hasher.hash_one(r.id()))
                });
                (s, None)
            }
        };
        let Table {
            slots,
            by_name,
            by_seq,
            hasher,
            ..
        } = self;
        let name = at(slots, slot).map(|r| r.name()).unwrap_or_default();
        match by_name.find_mut(h_name, |&o| at(slots, o).is_some_and(|r| r.name() == name)) {
            Some(o) => *o = slot,
            None => {
                by_name.insert_unique(h_name, slot, |&o| {
                    at(slots, o).map_or(0, |r| hasher.hash_one(r.name()))
                });
            }
        }
        by_seq.insert(seq, slot);
        old
    }

    /// Takes the name and seq entries that point to `slot` out of their
    /// tables (the id entry stays).
    fn unlink(&mut self, slot: u32) {
        let Some(r) = at(&self.slots, slot) else {
            return;
        };
        let h = self.hasher.hash_one(r.name());
        if let Ok(e) = self.by_name.find_entry(h, |&o| o == slot) {
            e.remove();
        }
        if self.by_seq.get(&r.seq()) == Some(&slot) {
            self.by_seq.remove(&r.seq());
        }
    }

    pub fn remove(&mut self, id: &str) -> Option<R> {
        let s = self.slot_of(id)?;
        self.unlink(s);
        let h = self.hasher.hash_one(id);
        if let Ok(e) = self.by_id.find_entry(h, |&o| o == s) {
            e.remove();
        }
        let old = self.slots.get_mut(s as usize).and_then(Option::take);
        self.free.push(s);
        old.map(|b| *b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::record::SnapshotRecord;
    use crate::state::record::{Kind, Phase};

    fn rec(id: &str, name: &str, seq: u64) -> Box<SnapshotRecord> {
        Box::new(SnapshotRecord {
            id: id.into(),
            name: name.into(),
            kind: Kind::Local,
            seq,
            phase: Phase::Ready,
            source_volume_id: "v".into(),
            size_bytes: 1,
            node: String::new(),
            parameters: Default::default(),
            created_secs: 0,
            created_nanos: 0,
            block: None,
            file_bytes: None,
            extra: None,
        })
    }

    #[test]
    fn finds_by_id_name_and_seq_through_inserts_replaces_and_removes() {
        let mut t = Table::default();
        assert!(t.insert(rec("a", "na", 1)).is_none());
        assert!(t.insert(rec("b", "nb", 2)).is_none());
        assert!(t.insert(rec("c", "nc", 3)).is_none());
        assert_eq!(t.len(), 3);
        assert_eq!(t.get("b").map(|r| r.seq), Some(2));
        assert_eq!(t.by_name("nc").map(|r| r.id.as_str()), Some("c"));
        // a replacement with another name and seq moves both entries
        let old = t.insert(rec("b", "nb2", 5)).map(|r| r.name);
        assert_eq!(old.as_deref(), Some("nb"));
        assert!(t.by_name("nb").is_none());
        assert_eq!(t.by_name("nb2").map(|r| r.id.as_str()), Some("b"));
        assert!(!t.seq_taken(2) && t.seq_taken(5));
        let order: Vec<_> = t.after_seq(0).map(|r| r.id.as_str()).collect();
        assert_eq!(order, ["a", "c", "b"]);
        assert_eq!(t.after_seq(3).count(), 1);
        // removal frees the slot for the next insert
        assert_eq!(t.remove("a").map(|r| r.id), Some("a".to_string()));
        assert!(t.remove("a").is_none());
        assert!(t.get("a").is_none() && t.by_name("na").is_none() && !t.seq_taken(1));
        t.insert(rec("d", "nd", 6));
        assert_eq!(t.slots.len(), 3, "the freed slot was reused");
        assert_eq!(t.len(), 3);
        let mut ids: Vec<_> = t.values().map(|r| r.id.clone()).collect();
        ids.sort();
        assert_eq!(ids, ["b", "c", "d"]);
    }

    #[test]
    fn a_name_points_to_its_newest_record_until_that_one_goes() {
        let mut t = Table::default();
        t.insert(rec("a", "same", 1));
        t.insert(rec("b", "same", 2));
        assert_eq!(t.by_name("same").map(|r| r.id.as_str()), Some("b"));
        // removing the older one leaves the name with the newer
        t.remove("a");
        assert_eq!(t.by_name("same").map(|r| r.id.as_str()), Some("b"));
        t.remove("b");
        assert!(t.by_name("same").is_none());
    }

    proptest::proptest! {
        /// Against a plain model: any sequence of inserts and removes
        /// leaves the same records findable by id, name and seq order.
        #[test]
        fn behaves_like_a_map(ops in proptest::collection::vec((0u8..2, 0u8..12, 0u8..4, 1u64..40), 1..200)) {
            use std::collections::BTreeMap as M;
            let mut t = Table::default();
            let mut model: M<String, (String, u64)> = M::new();
            for (op, id, name, seq) in ops {
                let id = format!("id{id}");
                if op == 0 {
                    // seqs unique per record, as callers assign them
                    let seq = seq * 100 + id[2..].parse::<u64>().unwrap_or(0);
                    // a name of this id's own: the newest record of a name
                    // is the one it finds (see the test above)
                    let name = format!("n{id}-{name}");
                    let old = t.insert(rec(&id, &name, seq)).map(|r| (r.name, r.seq));
                    proptest::prop_assert_eq!(old, model.insert(id, (name, seq)));
                } else {
                    let old = t.remove(&id).map(|r| (r.name, r.seq));
                    proptest::prop_assert_eq!(old, model.remove(&id));
                }
                proptest::prop_assert_eq!(t.len(), model.len());
                for (id, (name, seq)) in &model {
                    let r = t.get(id).expect("a record in the model");
                    proptest::prop_assert_eq!((&r.name, r.seq), (name, *seq));
                    proptest::prop_assert_eq!(t.by_name(name).map(|r| &r.id), Some(id));
                }
                let mut want: Vec<_> = model.iter().map(|(i, (_, s))| (*s, i.clone())).collect();
                want.sort();
                let got: Vec<_> = t.after_seq(0).map(|r| (r.seq, r.id.clone())).collect();
                proptest::prop_assert_eq!(got, want);
            }
        }
    }
}
#[cfg(test)]
mod sizes {
    /// Every volume's record is one box of this size in memory (see the
    /// README's "Performance"): a field that grows it should be boxed or
    /// shared instead, as `block`, `parameters` and `capabilities` are.
    /// 160 since the fields of a newer berth are kept (`extra`: one
    /// pointer, null when there are none), 152 before.
    #[test]
    fn a_volume_record_stays_compact() {
        let n = std::mem::size_of::<crate::state::record::VolumeRecord>();
        assert!(n <= 160, "VolumeRecord is {n} bytes, more than 160");
    }
}
