//! The snapshot file of a journal generation, `snapshot-<G>.bin`: every
//! committed record when the generation began, in a form start-up reads
//! without parsing JSON (a replay of JSON lines was two thirds of start-up
//! with 10,000 volumes).
//!
//! Layout:
//! - `MAGIC`, 8 bytes (`BERTHSN1`: format 1);
//! - frames, each `<payload length, u32 LE><crc32 of the payload, u32 LE>
//!   <payload>`, the payload a postcard-encoded `Frame`;
//! - last, an `End` frame holding the number of frames before it, so a file
//!   cut short at a frame's end is told from a whole one.
//!
//! Values that many records hold equal copies of (a node id, a
//! StorageClass's parameters, a volume context, a capability list, the
//! capability of a publication) are written once each, as their JSON, in a
//! `Value` frame; records name them by that frame's number (counted from 0
//! after the format mark, always before the record), so a damaged frame
//! never shifts what a later record names. A volume record then reads as a
//! few strings and numbers. Other records (snapshot records, and volume
//! records holding fields a newer berth wrote: `VolumeRecord::extra`) are
//! written as their journal JSON (`Frame::Json`).
//!
//! Any flaw is damage (start-up stops; `berth state repair` keeps every
//! readable record): the file is written whole (temp file, fsync, rename)
//! or not at all. The order of `Frame`'s variants and of the enums a
//! `Volume` holds (`Kind`, `Phase`) is part of the format, as postcard
//! writes a variant's position: `the_format_is_pinned` holds it fixed.
use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::journal::{Entry, EntryRef};
use super::record::{
    Attachment, BlockInfo, Capability, Kind, NodeMap, Phase, SnapshotRecord, Source, VolumeRecord,
};
use super::StateError;

pub const MAGIC: &[u8; 8] = b"BERTHSN1";

/// The largest frame a reader accepts: a larger length is damage, never an
/// allocation.
const MAX_FRAME: u32 = 64 << 20;

#[derive(Serialize, Deserialize, Debug)]
enum Frame<'a> {
    /// A shared value's JSON, named by its frame's number.
    Value(&'a str),
    #[serde(borrow)]
    Volume(Volume<'a>),
    /// A journal entry's JSON (`{"snap":...}`).
    Json(&'a str),
    /// The number of frames before this one.
    End(u64),
}

/// A volume record whose shared values are the numbers of `Value` frames.
#[derive(Serialize, Deserialize, Debug)]
struct Volume<'a> {
    id: &'a str,
    name: &'a str,
    kind: Kind,
    seq: u64,
    phase: Phase,
    capacity_bytes: i64,
    node: u32,
    parameters: u32,
    capabilities: u32,
    context: u32,
    #[serde(borrow)]
    published: Vec<Publication<'a>>,
    created_unix: u64,
    /// `BlockInfo` as JSON (its fields are left out when empty, which a
    /// format without field names cannot do).
    block: Option<&'a str>,
    /// `Source` as JSON.
    source: Option<&'a str>,
    project: Option<u32>,
}

#[derive(Serialize, Deserialize, Debug)]
struct Publication<'a> {
    node: &'a str,
    readonly: bool,
    /// The `Value` frame holding the capability.
    capability: u32,
}

fn encode_error(id: &str, e: impl std::fmt::Display) -> StateError {
    StateError::Journal(format!("encoding record {id} for a snapshot: {e}"))
}

/// A section the binary form keeps as JSON (see `Volume`), when present.
fn json_of<T: Serialize>(id: &str, v: Option<&T>) -> Result<Option<String>, StateError> {
    v.map(serde_json::to_string)
        .transpose()
        .map_err(|e| encode_error(id, e))
}

/// Builds a snapshot file: `volume` or `snapshot` for each record, then
/// `finish`.
pub struct Writer<'r> {
    out: Vec<u8>,
    frames: u64,
    /// Values already written, by address and type (the store's index
    /// shares equal values, so most records are found here) and by JSON
    /// text.
    by_address: HashMap<(u8, usize), u32>,
    by_text: HashMap<String, u32>,
    caps: HashMap<&'r Capability, u32>,
}

impl<'r> Writer<'r> {
    pub fn new(records: usize) -> Writer<'r> {
        let mut out = Vec::with_capacity(64 + records * 128);
        out.extend_from_slice(MAGIC);
        Writer {
            out,
            frames: 0,
            by_address: HashMap::new(),
            by_text: HashMap::new(),
            caps: HashMap::new(),
        }
    }

    fn frame(&mut self, id: &str, f: &Frame<'_>) -> Result<(), StateError> {
        let start = self.out.len();
        self.out.extend_from_slice(&[0; 8]);
        self.out = postcard::to_extend(f, std::mem::take(&mut self.out))
            .map_err(|e| encode_error(id, e))?;
        let payload = &self.out[start + 8..];
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|&l| l <= MAX_FRAME)
            .ok_or_else(|| encode_error(id, "larger than a frame may be"))?;
        let crc = crc32fast::hash(payload);
        self.out[start..start + 4].copy_from_slice(&len.to_le_bytes());
        self.out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        self.frames += 1;
        Ok(())
    }

    /// The frame number of the value `v`, written now if new; `tag` tells
    /// types apart in the address cache.
    fn value<T: Serialize + ?Sized>(
        &mut self,
        id: &str,
        tag: u8,
        v: &Arc<T>,
    ) -> Result<u32, StateError> {
        let addr = (tag, Arc::as_ptr(v) as *const () as usize);
        if let Some(&n) = self.by_address.get(&addr) {
            return Ok(n);
        }
        let n = self.value_text(id, &**v)?;
        self.by_address.insert(addr, n);
        Ok(n)
    }

    fn value_text<T: Serialize + ?Sized>(&mut self, id: &str, v: &T) -> Result<u32, StateError> {
        let text = serde_json::to_string(v).map_err(|e| encode_error(id, e))?;
        if let Some(&n) = self.by_text.get(&text) {
            return Ok(n);
        }
        let n = u32::try_from(self.frames).map_err(|e| encode_error(id, e))?;
        self.frame(id, &Frame::Value(&text))?;
        self.by_text.insert(text, n);
        Ok(n)
    }

    /// Adds a volume record.
    pub fn volume(&mut self, r: &'r VolumeRecord) -> Result<(), StateError> {
        let id = r.id.as_str();
        if r.extra.is_some() || r.published.iter().any(|(_, a)| a.extra.is_some()) {
            // Fields a newer berth wrote, which `Volume` has no place for
            // (at its top, or in a publication: a capability's are in its
            // JSON): the record as its journal JSON, which keeps them.
            let json = serde_json::to_string(&EntryRef::Put(r)).map_err(|e| encode_error(id, e))?;
            return self.frame(id, &Frame::Json(&json));
        }
        let node = self.value(id, 0, &r.node)?;
        let parameters = self.value(id, 1, &r.parameters)?;
        let capabilities = self.value(id, 2, &r.capabilities)?;
        let context = self.value(id, 1, &r.context)?;
        let mut published = Vec::with_capacity(r.published.len());
        for (n, a) in r.published.iter() {
            let capability = match self.caps.get(&a.capability) {
                Some(&c) => c,
                None => {
                    let c = self.value_text(id, &a.capability)?;
                    self.caps.insert(&a.capability, c);
                    c
                }
            };
            published.push(Publication {
                node: n,
                readonly: a.readonly,
                capability,
            });
        }
        let block = json_of(id, r.block.as_deref())?;
        let source = json_of(id, r.source.as_deref())?;
        let v = Volume {
            id,
            name: &r.name,
            kind: r.kind,
            seq: r.seq,
            phase: r.phase,
            capacity_bytes: r.capacity_bytes,
            node,
            parameters,
            capabilities,
            context,
            published,
            created_unix: r.created_unix,
            block: block.as_deref(),
            source: source.as_deref(),
            project: r.project(),
        };
        self.frame(id, &Frame::Volume(v))
    }

    /// Adds a snapshot record (as its journal JSON).
    pub fn snapshot(&mut self, r: &SnapshotRecord) -> Result<(), StateError> {
        let json = serde_json::to_string(&EntryRef::Snap(r)).map_err(|e| encode_error(&r.id, e))?;
        self.frame(&r.id, &Frame::Json(&json))
    }

    /// The file's bytes.
    pub fn finish(mut self) -> Result<Vec<u8>, StateError> {
        let n = self.frames;
        self.frame("(end mark)", &Frame::End(n))?;
        Ok(self.out)
    }
}

/// One thing a snapshot file holds, as read.
#[derive(Debug)]
pub enum Item {
    Volume(Box<VolumeRecord>, At),
    Snapshot(Box<SnapshotRecord>, At),
    /// A flaw at byte `offset` in frame `frame` (1-based), with the id of
    /// the record it cost when that is known.
    Damage {
        offset: u64,
        frame: u64,
        why: String,
        id: Option<String>,
    },
}

/// Where a record was read: its frame's byte offset and number (1-based).
#[derive(Debug, Clone, Copy)]
pub struct At {
    pub offset: u64,
    pub frame: u64,
}

/// A shared value as read: its text, and what it was read as (once per
/// type).
#[derive(Default)]
struct Slot<'a> {
    text: &'a str,
    node: Option<Arc<str>>,
    map: Option<Arc<BTreeMap<String, String>>>,
    caps: Option<Arc<[Capability]>>,
    cap: Option<Capability>,
}

/// The values read so far, by frame number (ascending).
struct Values<'a>(Vec<(u32, Slot<'a>)>);

impl<'a> Values<'a> {
    /// Value `n` read as a `T` (parsed once, then cloned).
    fn get<T: Clone + serde::de::DeserializeOwned>(
        &mut self,
        n: u32,
        what: &str,
        cached: for<'s> fn(&'s mut Slot<'a>) -> &'s mut Option<T>,
    ) -> Result<T, String> {
        let i = self.0.binary_search_by_key(&n, |(f, _)| *f).map_err(|_| {
            format!("its {what} is the value in frame {n}, which the file does not hold before it (damaged, or not a value)")
        })?;
        let slot = &mut self.0[i].1;
        let text = slot.text;
        if let Some(v) = cached(slot) {
            return Ok(v.clone());
        }
        let v: T = serde_json::from_str(text)
            .map_err(|e| format!("its {what} (frame {n}) does not read: {e}"))?;
        *cached(slot) = Some(v.clone());
        Ok(v)
    }
}

/// A volume record from its frame.
fn to_record(v: Volume<'_>, values: &mut Values<'_>) -> Result<VolumeRecord, String> {
    let node = values.get(v.node, "node", |s| &mut s.node)?;
    let parameters = values.get(v.parameters, "parameters", |s| &mut s.map)?;
    let capabilities = values.get(v.capabilities, "capabilities", |s| &mut s.caps)?;
    let context = values.get(v.context, "context", |s| &mut s.map)?;
    let mut published = NodeMap::new();
    for p in v.published {
        let capability = values.get(p.capability, "publication's capability", |s| &mut s.cap)?;
        let a = Attachment::new(p.readonly, capability);
        if published.insert(p.node.to_string(), a).is_some() {
            return Err(format!("it is published to node {:?} twice", p.node));
        }
    }
    let block = v
        .block
        .map(serde_json::from_str::<BlockInfo>)
        .transpose()
        .map_err(|e| format!("its block section does not read: {e}"))?
        .map(Box::new);
    let source = v
        .source
        .map(serde_json::from_str::<Source>)
        .transpose()
        .map_err(|e| format!("its content source does not read: {e}"))?
        .map(Box::new);
    let project = match v.project {
        None => None,
        Some(p) => Some(NonZeroU32::new(p).ok_or("its project id is 0")?),
    };
    Ok(VolumeRecord {
        id: v.id.to_string(),
        name: v.name.to_string(),
        kind: v.kind,
        seq: v.seq,
        phase: v.phase,
        capacity_bytes: v.capacity_bytes,
        node,
        parameters,
        capabilities,
        context,
        published,
        created_unix: v.created_unix,
        block,
        source,
        project,
        extra: None,
    })
}

/// Reads a snapshot file, calling `each` with every record and every flaw
/// in file order.
pub fn read(bytes: &[u8], mut each: impl FnMut(Item)) {
    let damage = |offset: usize, frame: u64, why: String, id: Option<String>| Item::Damage {
        offset: offset as u64,
        frame,
        why,
        id,
    };
    if bytes.get(..MAGIC.len()) != Some(&MAGIC[..]) {
        each(damage(
            0,
            1,
            "not a berth snapshot file (it does not begin with the format mark BERTHSN1)".into(),
            None,
        ));
        return;
    }
    let mut values = Values(Vec::new());
    let mut at = MAGIC.len();
    // frames read (the number, 1-based, of the current one)
    let mut n: u64 = 0;
    let mut ended = false;
    while at < bytes.len() {
        n += 1;
        let Some(head) = bytes.get(at..at + 8) else {
            each(damage(
                at,
                n,
                "cut short inside a frame's header".into(),
                None,
            ));
            return;
        };
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        let end = at + 8 + len as usize;
        if len > MAX_FRAME || end > bytes.len() {
            each(damage(
                at,
                n,
                format!("a frame of {len} bytes runs past the end of the file (cut short, or its length is damaged)"),
                None,
            ));
            return;
        }
        let payload = &bytes[at + 8..end];
        let frame_at = at;
        at = end;
        if ended {
            each(damage(
                frame_at,
                n,
                "a frame after the end mark".into(),
                None,
            ));
            continue;
        }
        if crc32fast::hash(payload) != crc {
            // a record naming this frame's value reports it missing
            each(damage(frame_at, n, "checksum mismatch".into(), None));
            continue;
        }
        let place = At {
            offset: frame_at as u64,
            frame: n,
        };
        match postcard::from_bytes::<Frame<'_>>(payload) {
            Ok(Frame::Value(text)) => match u32::try_from(n - 1) {
                Ok(f) => values.0.push((
                    f,
                    Slot {
                        text,
                        ..Slot::default()
                    },
                )),
                Err(_) => each(damage(
                    frame_at,
                    n,
                    "a value beyond frame 2^32".into(),
                    None,
                )),
            },
            Ok(Frame::Volume(v)) => {
                let id = v.id.to_string();
                match to_record(v, &mut values) {
                    Ok(r) => each(Item::Volume(Box::new(r), place)),
                    Err(why) => each(damage(frame_at, n, format!("volume {id}: {why}"), Some(id))),
                }
            }
            Ok(Frame::Json(j)) => match serde_json::from_str::<Entry>(j) {
                Ok(Entry::Put(r)) => each(Item::Volume(r, place)),
                Ok(Entry::Snap(r)) => each(Item::Snapshot(r, place)),
                Ok(Entry::Del(_) | Entry::DelSnap(_)) => {
                    each(damage(frame_at, n, "a deletion in a snapshot".into(), None))
                }
                Err(e) => each(damage(frame_at, n, format!("not a record ({e})"), None)),
            },
            Ok(Frame::End(count)) => {
                ended = true;
                if count != n - 1 {
                    each(damage(
                        frame_at,
                        n,
                        format!(
                            "the end mark counts {count} frames before it, the file holds {}",
                            n - 1
                        ),
                        None,
                    ));
                }
            }
            Err(e) => each(damage(frame_at, n, format!("not a frame ({e})"), None)),
        }
    }
    if !ended {
        each(damage(
            bytes.len(),
            n + 1,
            "no end mark: the file is cut short".into(),
            None,
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::record::{
        AccessMode, AccessType, Allocation, BlockAccess, ContentSource, DiskRef,
    };

    fn cap(fs: &str) -> Capability {
        Capability {
            access_type: AccessType::Mount {
                fs_type: fs.into(),
                mount_flags: vec!["noatime".into()],
                volume_mount_group: String::new(),
                extra: None,
            },
            access_mode: AccessMode::SingleNodeWriter,
            extra: None,
        }
    }

    fn local(id: &str, params: &Arc<BTreeMap<String, String>>) -> VolumeRecord {
        VolumeRecord {
            id: id.into(),
            name: format!("pvc-{id}"),
            kind: Kind::Local,
            seq: id.len() as u64,
            phase: Phase::Ready,
            capacity_bytes: 1 << 20,
            node: "node-1".into(),
            parameters: params.clone(),
            capabilities: vec![cap("ext4")].into(),
            context: Default::default(),
            published: Default::default(),
            created_unix: 1_700_000_000,
            block: None,
            source: None,
            project: None,
            extra: None,
        }
    }

    /// Records of every shape: shared and unshared values, publications,
    /// a block section, a content source, a project id, a volume without
    /// a node, odd bytes in names, every phase.
    fn records() -> Vec<VolumeRecord> {
        let params = Arc::new(BTreeMap::from([("kind".to_string(), "local".to_string())]));
        let mut v: Vec<VolumeRecord> = (0..4).map(|i| local(&format!("v{i}"), &params)).collect();
        v[1].phase = Phase::Creating;
        v[1].published
            .insert("node-2".into(), Attachment::new(true, cap("xfs")));
        v[1].published
            .insert("node-1".into(), Attachment::new(false, cap("ext4")));
        v[2].phase = Phase::Deleting;
        v[2].project = NonZeroU32::new(7);
        v[2].source = Some(Box::new(ContentSource::Snapshot("s1".into()).into()));
        v[2].name = "a \"name\"\n with\u{0} odd bytes é".into();
        v[3].kind = Kind::Block;
        v[3].capabilities = vec![AccessType::Block]
            .into_iter()
            .map(|access_type| Capability {
                access_type,
                access_mode: AccessMode::MultiNodeMultiWriter,
                extra: None,
            })
            .collect();
        v[3].block = Some(Box::new(BlockInfo {
            allocation: Allocation::Thick,
            disk: Some(DiskRef {
                path: "/dev/sdb".into(),
                device: "/dev/sdb".into(),
                by_id: None,
                major: 8,
                minor: 16,
                size_bytes: 1 << 30,
                loop_backing: None,
                loop_range: None,
                extra: None,
            }),
            default_fs: "ext4".into(),
            formatted: true,
            access: Some(BlockAccess::Filesystem),
            ..BlockInfo::default()
        }));
        let mut nfs = local("n0", &Arc::new(BTreeMap::new()));
        nfs.kind = Kind::Nfs;
        nfs.node = "".into();
        nfs.context = Arc::new(BTreeMap::from([("server".into(), "10.0.0.1".into())]));
        v.push(nfs);
        v
    }

    fn snapshot_record() -> SnapshotRecord {
        SnapshotRecord {
            id: "s1".into(),
            name: "snap-1".into(),
            kind: Kind::Local,
            seq: 1,
            phase: Phase::Ready,
            source_volume_id: "v0".into(),
            size_bytes: 5,
            node: "node-1".into(),
            parameters: BTreeMap::new(),
            created_secs: 3,
            created_nanos: 4,
            block: None,
            file_bytes: None,
            extra: None,
        }
    }

    fn write(vols: &[VolumeRecord], snaps: &[SnapshotRecord]) -> Vec<u8> {
        let mut w = Writer::new(vols.len());
        for r in vols {
            w.volume(r).expect("volume");
        }
        for s in snaps {
            w.snapshot(s).expect("snapshot");
        }
        w.finish().expect("finish")
    }

    fn value_frames(bytes: &[u8]) -> usize {
        let mut at = MAGIC.len();
        let mut values = 0;
        while at < bytes.len() {
            let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
            let frame = postcard::from_bytes::<Frame<'_>>(&bytes[at + 8..at + 8 + len]);
            values += usize::from(matches!(frame, Ok(Frame::Value(_))));
            at += 8 + len;
        }
        values
    }

    fn read_all(bytes: &[u8]) -> (Vec<VolumeRecord>, Vec<SnapshotRecord>, Vec<String>) {
        let (mut v, mut s, mut d) = (Vec::new(), Vec::new(), Vec::new());
        read(bytes, |i| match i {
            Item::Volume(r, _) => v.push(*r),
            Item::Snapshot(r, _) => s.push(*r),
            Item::Damage { why, .. } => d.push(why),
        });
        (v, s, d)
    }

    #[test]
    fn every_record_reads_back_as_written_and_equal_values_are_one_copy() {
        let vols = records();
        let snaps = vec![snapshot_record()];
        let bytes = write(&vols, &snaps);
        let (v, s, d) = read_all(&bytes);
        assert!(d.is_empty(), "{d:?}");
        assert_eq!(v, vols);
        assert_eq!(s, snaps);
        // one copy of each shared value, as the index would hold it
        assert!(Arc::ptr_eq(&v[0].parameters, &v[2].parameters));
        assert!(Arc::ptr_eq(&v[0].capabilities, &v[1].capabilities));
        assert!(Arc::ptr_eq(&v[0].node, &v[3].node));
        // each distinct value written once: two nodes (node-1 and none),
        // three maps ({kind: local}, {}, the NFS context), two capability
        // lists and two capabilities of publications
        assert_eq!(value_frames(&bytes), 9);
        // an empty file of records is a whole file
        let (v, s, d) = read_all(&write(&[], &[]));
        assert!(v.is_empty() && s.is_empty() && d.is_empty(), "{d:?}");
    }

    /// postcard writes an enum variant's position: reordering `Frame`,
    /// `Kind` or `Phase` would make every snapshot read wrong. These bytes
    /// are format 1; change `MAGIC` with them.
    #[test]
    fn the_format_is_pinned() {
        let params = Arc::new(BTreeMap::new());
        let mut r = local("v", &params);
        r.kind = Kind::Nfs;
        r.phase = Phase::Deleting;
        r.capabilities = Arc::from(Vec::new());
        let bytes = write(&[r], &[]);
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, PINNED, "format 1 changed");
    }

    const PINNED: &str = "4245525448534e310a0000002b60c8820008226e6f64652d312204000000cea6bfc000027b7d04000000a4a2556e00025b5d1d0000007f6363f0010176057076632d7602010280808001000102010080e2cfaa06000000020000002585996d0304";

    fn volumes_read_are_among(bytes: &[u8], vols: &[VolumeRecord]) -> usize {
        let mut damage = 0;
        read(bytes, |i| match i {
            Item::Volume(r, _) => assert!(
                vols.contains(&r),
                "a record read that was never written: {r:?}"
            ),
            Item::Snapshot(r, _) => assert_eq!(*r, snapshot_record()),
            Item::Damage { .. } => damage += 1,
        });
        damage
    }

    #[test]
    fn any_flipped_bit_is_damage_and_never_a_different_record() {
        let vols = records();
        let bytes = write(&vols, &[snapshot_record()]);
        for at in 0..bytes.len() {
            for bit in [0x01, 0x80] {
                let mut b = bytes.clone();
                b[at] ^= bit;
                assert!(
                    volumes_read_are_among(&b, &vols) > 0,
                    "byte {at} bit {bit:#x} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn a_file_cut_short_anywhere_is_damage() {
        let vols = records();
        let bytes = write(&vols, &[snapshot_record()]);
        for len in 0..bytes.len() {
            assert!(
                volumes_read_are_among(&bytes[..len], &vols) > 0,
                "cut at {len} went unnoticed"
            );
        }
        // and bytes after the end mark too
        let mut b = bytes.clone();
        b.extend_from_slice(&bytes[MAGIC.len()..]);
        assert!(volumes_read_are_among(&b, &vols) > 0);
    }

    #[test]
    fn a_record_whose_value_is_damaged_is_reported_with_its_id() {
        let vols = records();
        let bytes = write(&vols[..1], &[]);
        // the first frame is v0's node value: damage its checksum
        let mut b = bytes.clone();
        b[MAGIC.len() + 4] ^= 1;
        let mut ids = Vec::new();
        read(&b, |i| {
            if let Item::Damage { id, why, .. } = i {
                ids.push((id, why));
            }
        });
        assert_eq!(ids.len(), 2, "{ids:?}");
        assert_eq!(ids[0].0, None);
        assert_eq!(ids[1].0.as_deref(), Some("v0"), "{ids:?}");
        assert!(ids[1].1.contains("frame 0"), "{ids:?}");
    }
}
