//! What Berth remembers about a volume.
use std::collections::{BTreeMap, HashSet};
use std::hash::Hash;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::extra::{keeps_unknown_fields, Extra};

/// The volume kinds, each implemented by a `kinds::VolumeKind`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Local,
    Block,
    Nfs,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Local, Kind::Block, Kind::Nfs];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Local => "local",
            Kind::Block => "block",
            Kind::Nfs => "nfs",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a volume is in its life. Creating and Deleting are intents recorded
/// before the storage is touched.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Creating,
    Ready,
    Deleting,
}

/// CSI access modes (names as in the spec).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AccessMode {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    MultiNodeReaderOnly,
    MultiNodeSingleWriter,
    MultiNodeMultiWriter,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
}

impl AccessMode {
    /// Only one node may use the volume.
    pub fn single_node(self) -> bool {
        matches!(
            self,
            AccessMode::SingleNodeWriter
                | AccessMode::SingleNodeReaderOnly
                | AccessMode::SingleNodeSingleWriter
                | AccessMode::SingleNodeMultiWriter
        )
    }

    /// Only one workload (one publish target) may use the volume.
    pub fn single_target(self) -> bool {
        matches!(self, AccessMode::SingleNodeSingleWriter)
    }

    pub fn read_only(self) -> bool {
        matches!(
            self,
            AccessMode::SingleNodeReaderOnly | AccessMode::MultiNodeReaderOnly
        )
    }
}

/// A capability's access type. Read and written as serde's derived code
/// did (`{"mount":{...}}` or `"block"`), with the fields a newer berth
/// wrote inside its `mount` section kept (`AccessTypeRepr`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(from = "AccessTypeRepr", into = "AccessTypeRepr")]
pub enum AccessType {
    Mount {
        fs_type: String,
        mount_flags: Vec<String>,
        volume_mount_group: String,
        /// Fields a newer berth wrote in the `mount` section that this one
        /// does not know (see `VolumeRecord::extra`): part of the value,
        /// not of what a request is compared with (`same_as`). Before
        /// 2026-12-07 they were dropped at the first rewrite.
        extra: Option<Box<Extra>>,
    },
    Block,
}

impl AccessType {
    /// The same access type as `other` asks, whatever fields a newer
    /// berth recorded in either's `mount` section.
    pub fn same_as(&self, other: &AccessType) -> bool {
        match (self, other) {
            (
                AccessType::Mount {
                    fs_type: a,
                    mount_flags: b,
                    volume_mount_group: c,
                    ..
                },
                AccessType::Mount {
                    fs_type: x,
                    mount_flags: y,
                    volume_mount_group: z,
                    ..
                },
            ) => a == x && b == y && c == z,
            (AccessType::Block, AccessType::Block) => true,
            _ => false,
        }
    }
}

/// `AccessType` as records hold it: serde's externally tagged form
/// (`{"mount":{...}}` or `"block"`), the `mount` section with the fields
/// a newer berth wrote kept (`Kept`).
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum AccessTypeRepr {
    Mount(Kept<MountFields>),
    Block,
}

/// The known fields of a `mount` section.
#[derive(Serialize, Deserialize)]
struct MountFields {
    fs_type: String,
    mount_flags: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    volume_mount_group: String,
}

impl From<AccessTypeRepr> for AccessType {
    fn from(r: AccessTypeRepr) -> Self {
        match r {
            AccessTypeRepr::Mount(Kept { of, extra }) => AccessType::Mount {
                fs_type: of.fs_type,
                mount_flags: of.mount_flags,
                volume_mount_group: of.volume_mount_group,
                extra,
            },
            AccessTypeRepr::Block => AccessType::Block,
        }
    }
}

impl From<AccessType> for AccessTypeRepr {
    fn from(t: AccessType) -> Self {
        match t {
            AccessType::Mount {
                fs_type,
                mount_flags,
                volume_mount_group,
                extra,
            } => AccessTypeRepr::Mount(Kept {
                of: MountFields {
                    fs_type,
                    mount_flags,
                    volume_mount_group,
                },
                extra,
            }),
            AccessType::Block => AccessTypeRepr::Block,
        }
    }
}

/// One requested volume capability. Read and written with its unknown
/// fields kept (`super::extra`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(remote = "Self")]
pub struct Capability {
    pub access_type: AccessType,
    pub access_mode: AccessMode,
    /// Fields a newer berth wrote that this one does not know (see
    /// `VolumeRecord::extra`). Part of the value (a list holding them is
    /// another list than one without: never shared with it), but not of
    /// what a request is compared with (`same_as`).
    #[serde(skip)]
    pub extra: Option<Box<Extra>>,
}

keeps_unknown_fields!(Capability);

impl Capability {
    /// The same capability as `other` asks, whatever fields a newer berth
    /// recorded beside either (a request, a retry, carries none).
    pub fn same_as(&self, other: &Capability) -> bool {
        self.access_type.same_as(&other.access_type) && self.access_mode == other.access_mode
    }

    /// `same_as` for each of two lists, in order.
    pub fn same_list(a: &[Capability], b: &[Capability]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.same_as(y))
    }
}

/// A ControllerPublishVolume that was granted. Read and written with its
/// unknown fields kept (`super::extra`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(remote = "Self")]
pub struct Attachment {
    pub readonly: bool,
    pub capability: Capability,
    /// Fields a newer berth wrote that this one does not know (see
    /// `VolumeRecord::extra`); not compared with a request (`same_as`).
    #[serde(skip)]
    pub extra: Option<Box<Extra>>,
}

keeps_unknown_fields!(Attachment);

impl Attachment {
    /// A grant of this version (nothing a newer berth wrote).
    pub fn new(readonly: bool, capability: Capability) -> Self {
        Attachment {
            readonly,
            capability,
            extra: None,
        }
    }

    /// The grant `other` asks for, whatever fields a newer berth recorded
    /// beside either.
    pub fn same_as(&self, other: &Attachment) -> bool {
        self.readonly == other.readonly && self.capability.same_as(&other.capability)
    }
}

/// A value a record holds with the fields a newer berth wrote beside it
/// kept (`super::extra`), for a type that is also used outside records
/// (`FileId`, `LoopRange`: compared and hashed as the kernel's values,
/// copied): written as the value alone when there are none. Reads as the
/// value (`Deref`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kept<T> {
    pub of: T,
    /// Fields a newer berth wrote that this one does not know.
    pub extra: Option<Box<Extra>>,
}

impl<T> From<T> for Kept<T> {
    fn from(of: T) -> Self {
        Kept { of, extra: None }
    }
}

impl<T> std::ops::Deref for Kept<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.of
    }
}

impl<T: Serialize> Serialize for Kept<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        super::extra::write(s, &self.of, self.extra.as_deref())
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Kept<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (of, extra) = super::extra::read(d, |c| T::deserialize(c))?;
        Ok(Kept { of, extra })
    }
}

/// Read and written with its unknown fields kept (`super::extra`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(remote = "Self")]
pub struct VolumeRecord {
    pub id: String,
    pub name: String,
    pub kind: Kind,
    /// Creation order; ListVolumes pages by it.
    pub seq: u64,
    pub phase: Phase,
    pub capacity_bytes: i64,
    /// The node the volume lives on; empty for volumes reachable from every
    /// node (NFS). Shared like `parameters`.
    #[serde(deserialize_with = "like_the_last")]
    pub node: Arc<str>,
    /// StorageClass parameters as given (compared on a CreateVolume retry);
    /// one copy in memory for all the volumes of a class (`Shared`).
    #[serde(deserialize_with = "like_the_last")]
    pub parameters: Arc<BTreeMap<String, String>>,
    /// Capabilities as given (sorted, compared on a CreateVolume retry);
    /// shared like `parameters`.
    #[serde(deserialize_with = "like_the_last")]
    pub capabilities: Arc<[Capability]>,
    /// volume_context returned to the CO (empty for most kinds: shared like
    /// `parameters`).
    #[serde(default, deserialize_with = "like_the_last")]
    pub context: Arc<BTreeMap<String, String>>,
    /// ControllerPublishVolume grants, by node id.
    #[serde(default)]
    pub published: NodeMap<Attachment>,
    pub created_unix: u64,
    /// Block volumes: allocation, disk and format state (boxed: the other
    /// kinds' records do not carry its size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<Box<BlockInfo>>,
    /// What the volume was created from (a snapshot or another volume;
    /// boxed, as few volumes have one). `content_source` reads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Box<Source>>,
    /// Local volumes on a root with project quotas: the project id of the
    /// volume's directory, whose limits hold it to its size (see
    /// `kinds::local::quota`). Never held by two records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<std::num::NonZeroU32>,
    /// Fields a newer berth wrote that this one does not know, written
    /// back as read when the record is rewritten (None: there were none).
    #[serde(skip)]
    pub extra: Option<Box<Extra>>,
}

keeps_unknown_fields!(VolumeRecord);

impl VolumeRecord {
    /// The project id of a local volume's directory (see `project`).
    pub fn project(&self) -> Option<u32> {
        self.project.map(std::num::NonZeroU32::get)
    }

    /// What the volume was created from, if anything.
    pub fn content_source(&self) -> Option<&ContentSource> {
        self.source.as_deref().map(|s| &s.of)
    }
}

/// Deserializes a value that the records of a journal mostly hold equal
/// copies of as the copy the previous record of this thread got, when
/// equal: a replay of thousands of records makes one, not thousands that
/// `Shared` then frees (leaving holes in the heap between the records).
/// The value's JSON text is compared with the last one's first, so a value
/// written as the last one was is not parsed at all (most of a replay's
/// records: one StorageClass, one node). Journal lines are parsed from
/// memory (`serde_json::from_str`), which lends the text.
fn like_the_last<'de, D, T>(d: D) -> Result<Arc<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: ?Sized + PartialEq + Send + Sync + 'static,
    Arc<T>: serde::de::DeserializeOwned,
{
    use serde::de::Error as _;
    use std::any::Any;
    use std::cell::RefCell;
    /// The last value of one type and the JSON text it was read from.
    struct Last<T: ?Sized> {
        text: String,
        value: Arc<T>,
    }
    thread_local! {
        static LAST: RefCell<Vec<Box<dyn Any>>> = const { RefCell::new(Vec::new()) };
    }
    let raw = <&'de serde_json::value::RawValue>::deserialize(d)?;
    let text = raw.get();
    LAST.with(|l| {
        let mut l = l.borrow_mut();
        let last = l.iter_mut().find_map(|b| b.downcast_mut::<Last<T>>());
        if let Some(last) = &last {
            if last.text == text {
                return Ok(last.value.clone());
            }
        }
        let v: Arc<T> = serde_json::from_str(text).map_err(D::Error::custom)?;
        match last {
            Some(last) => {
                if *last.value != *v {
                    last.value = v;
                }
                last.text.clear();
                last.text.push_str(text);
                Ok(last.value.clone())
            }
            None => {
                l.push(Box::new(Last {
                    text: text.to_string(),
                    value: v.clone(),
                }));
                Ok(v)
            }
        }
    })
}

/// Values that many records hold equal copies of (a StorageClass's
/// parameters, the capabilities its volumes are asked with), kept once in
/// memory: the store's index hands each record it holds the one copy.
#[derive(Default)]
pub struct Shared {
    parameters: HashSet<Arc<BTreeMap<String, String>>>,
    capabilities: HashSet<Arc<[Capability]>>,
    nodes: HashSet<Arc<str>>,
    /// The shared copies the last records were pointed at, found again by
    /// address (a replay's records mostly hold the copy the previous one
    /// got: `like_the_last`).
    recent: Recent,
    /// Values held at the last sweep of values no record holds any more.
    swept_at: usize,
}

#[derive(Default)]
struct Recent {
    parameters: [Option<Arc<BTreeMap<String, String>>>; 2],
    capabilities: Option<Arc<[Capability]>>,
    node: Option<Arc<str>>,
}

impl Shared {
    fn one<T: ?Sized + Hash + Eq>(set: &mut HashSet<Arc<T>>, v: &mut Arc<T>) {
        match set.get(v) {
            Some(s) => {
                if !Arc::ptr_eq(s, v) {
                    *v = s.clone();
                }
            }
            None => {
                set.insert(v.clone());
            }
        }
    }

    /// `one`, unless `v` is a shared copy handed out just before.
    fn one_of<T: ?Sized + Hash + Eq>(
        set: &mut HashSet<Arc<T>>,
        recent: &mut [Option<Arc<T>>],
        v: &mut Arc<T>,
    ) {
        if recent.iter().flatten().any(|r| Arc::ptr_eq(r, v)) {
            return;
        }
        Self::one(set, v);
        recent.rotate_right(1);
        recent[0] = Some(v.clone());
    }

    /// Points `rec` at the shared copies of its values.
    pub fn share(&mut self, rec: &mut VolumeRecord) {
        let r = &mut self.recent;
        Self::one_of(&mut self.parameters, &mut r.parameters, &mut rec.parameters);
        Self::one_of(&mut self.parameters, &mut r.parameters, &mut rec.context);
        Self::one_of(
            &mut self.capabilities,
            std::slice::from_mut(&mut r.capabilities),
            &mut rec.capabilities,
        );
        Self::one_of(
            &mut self.nodes,
            std::slice::from_mut(&mut r.node),
            &mut rec.node,
        );
        // values only these sets hold are dropped once the sets have
        // doubled since the last sweep (amortised: a sweep is a scan)
        if self.held() > 2 * self.swept_at + 16 {
            self.recent = Recent::default();
            self.parameters.retain(|a| Arc::strong_count(a) > 1);
            self.capabilities.retain(|a| Arc::strong_count(a) > 1);
            self.nodes.retain(|a| Arc::strong_count(a) > 1);
            self.swept_at = self.held();
        }
    }

    fn held(&self) -> usize {
        self.parameters.len() + self.capabilities.len() + self.nodes.len()
    }
}

/// A small map by node id (a volume is published to one node, or a few):
/// a sorted vector, where a `BTreeMap` would allocate a node of eleven
/// entries for the first one, boxed so that the empty map most records hold
/// is one null pointer (a boxed `Vec`, not a boxed slice: a thin pointer,
/// 8 bytes in every record, where a slice's is 16). Written and read as a
/// JSON object.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(clippy::box_collection)]
pub struct NodeMap<V>(Option<Box<Vec<(String, V)>>>);

impl<V> Default for NodeMap<V> {
    fn default() -> Self {
        NodeMap(None)
    }
}

impl<V> NodeMap<V> {
    pub fn new() -> Self {
        Self::default()
    }
    fn items(&self) -> &[(String, V)] {
        self.0.as_deref().map_or(&[], Vec::as_slice)
    }
    fn find(&self, k: &str) -> Result<usize, usize> {
        self.items().binary_search_by(|(n, _)| n.as_str().cmp(k))
    }
    pub fn len(&self) -> usize {
        self.items().len()
    }
    pub fn is_empty(&self) -> bool {
        self.items().is_empty()
    }
    pub fn get(&self, k: &str) -> Option<&V> {
        self.find(k).ok().map(|i| &self.items()[i].1)
    }
    pub fn contains_key(&self, k: &str) -> bool {
        self.find(k).is_ok()
    }
    pub fn insert(&mut self, k: String, v: V) -> Option<V> {
        match self.find(&k) {
            Ok(i) => {
                let items = self.0.as_mut()?;
                Some(std::mem::replace(&mut items[i].1, v))
            }
            Err(i) => {
                self.0.get_or_insert_with(Box::default).insert(i, (k, v));
                None
            }
        }
    }
    pub fn remove(&mut self, k: &str) -> Option<V> {
        let i = self.find(k).ok()?;
        let items = self.0.as_mut()?;
        let v = items.remove(i).1;
        if items.is_empty() {
            self.0 = None;
        }
        Some(v)
    }
    pub fn clear(&mut self) {
        self.0 = None;
    }
    /// Node ids in order.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.items().iter().map(|(k, _)| k)
    }
    pub fn iter(&self) -> impl Iterator<Item = (&String, &V)> {
        self.items().iter().map(|(k, v)| (k, v))
    }
}

impl<V: Serialize> Serialize for NodeMap<V> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for NodeMap<V> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // sorted and unique, whatever the object's order
        let m = BTreeMap::<String, V>::deserialize(d)?;
        if m.is_empty() {
            return Ok(NodeMap(None));
        }
        let mut v: Vec<_> = m.into_iter().collect();
        v.shrink_to_fit();
        Ok(NodeMap(Some(Box::new(v))))
    }
}

/// The content source of a volume: a snapshot restored, a volume cloned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContentSource {
    Snapshot(String),
    Volume(String),
}

/// A volume's content source as its record holds it: written
/// `{"snapshot":"<id>"}` or `{"volume":"<id>"}`, with the fields a newer
/// berth wrote beside it kept (`super::extra`). One that names neither a
/// snapshot nor a volume (a kind of source this version does not know), or
/// both, does not read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub of: ContentSource,
    /// Fields a newer berth wrote that this one does not know.
    pub extra: Option<Box<Extra>>,
}

impl From<ContentSource> for Source {
    fn from(of: ContentSource) -> Self {
        Source { of, extra: None }
    }
}

/// The fields of `Source` as written.
#[derive(Serialize)]
struct SourceOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    snapshot: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    volume: Option<&'a str>,
}

/// The fields of `Source` as read.
#[derive(Deserialize)]
struct SourceIn {
    #[serde(default)]
    snapshot: Option<String>,
    #[serde(default)]
    volume: Option<String>,
}

impl Serialize for Source {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let known = match &self.of {
            ContentSource::Snapshot(id) => SourceOut {
                snapshot: Some(id.as_str()),
                volume: None,
            },
            ContentSource::Volume(id) => SourceOut {
                snapshot: None,
                volume: Some(id.as_str()),
            },
        };
        super::extra::write(s, &known, self.extra.as_deref())
    }
}

impl<'de> Deserialize<'de> for Source {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let (known, extra) = super::extra::read(d, |c| SourceIn::deserialize(c))?;
        let of = match known {
            SourceIn {
                snapshot: Some(id),
                volume: None,
            } => ContentSource::Snapshot(id),
            SourceIn {
                snapshot: None,
                volume: Some(id),
            } => ContentSource::Volume(id),
            _ => {
                return Err(D::Error::custom(
                    "a content source names one snapshot or one volume",
                ))
            }
        };
        Ok(Source { of, extra })
    }
}

/// How the file of a loop-backed block volume is allocated.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Allocation {
    /// Sparse: blocks are allocated as they are written.
    #[default]
    Thin,
    /// Preallocated with fallocate when created (and when grown).
    Thick,
}

/// A whole disk handed out as a volume, and what identifies it. Read and
/// written with its unknown fields kept (`super::extra`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(remote = "Self")]
pub struct DiskRef {
    /// The path the disk pool listed it under.
    pub path: PathBuf,
    /// The device node that path resolved to when the volume was created.
    pub device: PathBuf,
    /// A /dev/disk/by-id link to it, used in preference to `path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by_id: Option<PathBuf>,
    pub major: u32,
    pub minor: u32,
    pub size_bytes: u64,
    /// For a loop device used as a disk (which has no by-id link): the
    /// device and inode number of its backing file when the volume was
    /// created (`LOOP_GET_STATUS64`); a loop device backed by another file
    /// later is not this disk. None for other disks and in records made
    /// before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loop_backing: Option<Kept<FileId>>,
    /// For a loop device used as a disk: the part of its backing file it
    /// showed when the volume was created (`LOOP_GET_STATUS64`); the same
    /// file attached at another offset or size limit later is not this
    /// disk. None for other disks and in records made before it was kept
    /// (2026-12-07), which accept the file at any offset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loop_range: Option<Kept<LoopRange>>,
    /// Fields a newer berth wrote that this one does not know (see
    /// `VolumeRecord::extra`).
    #[serde(skip)]
    pub extra: Option<Box<Extra>>,
}

/// Where a loop device starts in its backing file, and at most how many
/// bytes of it it shows (0: to the file's end).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoopRange {
    pub offset: u64,
    pub sizelimit: u64,
}

keeps_unknown_fields!(DiskRef);

impl DiskRef {
    /// The identity of a loop disk's backing file (`loop_backing`).
    pub fn backing(&self) -> Option<FileId> {
        self.loop_backing.as_deref().copied()
    }

    /// The part of its backing file a loop disk showed (`loop_range`).
    pub fn range(&self) -> Option<LoopRange> {
        self.loop_range.as_deref().copied()
    }
}

/// A file as the kernel identifies it: its filesystem's device number
/// (`st_dev`) and its inode number.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

/// What Berth remembers about a block volume beyond the generic record.
/// Read and written with its unknown fields kept (`super::extra`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(remote = "Self")]
pub struct BlockInfo {
    #[serde(default)]
    pub allocation: Allocation,
    /// Set for volumes of the whole-disk pool (no backing file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskRef>,
    /// The disk volume's create writes a marker before its Ready record
    /// (`kinds::block::disk_marker`): set with `disk`, in the same write,
    /// so a record still Creating that names its disk and lacks its marker
    /// never reached Ready. False in records of versions before markers,
    /// whose marker's absence tells nothing: such a disk is held
    /// (`BlockKind::hold_disk`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub marker: bool,
    /// Filesystem used when a mount capability names none (StorageClass
    /// parameter fsType, default ext4).
    #[serde(default)]
    pub default_fs: String,
    /// Checked extra mkfs arguments for `default_fs` (parameter mkfsOptions).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mkfs_options: Vec<String>,
    /// True once Berth's mkfs of `fs_type` finished: never formatted again.
    #[serde(default)]
    pub formatted: bool,
    /// The filesystem Berth made (set with `formatted`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub fs_type: String,
    /// Intent written before mkfs starts: a mkfs of this type may have run
    /// (partly) on the device. Cleared when `formatted` is set.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub formatting: String,
    /// The UUID that mkfs (`formatting`) gives the filesystem, pinned with
    /// the intent: a retry adopts a filesystem only if it has this UUID.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub formatting_uuid: String,
    /// How the volume was first staged (raw device or filesystem), recorded
    /// before anything is written: the other way is refused later (a volume
    /// written raw is never formatted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<BlockAccess>,
    /// The filesystem is smaller than the volume (restored or cloned into a
    /// larger one, or a thick volume whose growth ControllerExpandVolume
    /// allocated): the next stage, or NodeExpandVolume, grows it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub grow_fs: bool,
    /// The filesystem is a copy of another volume's (a restore or clone)
    /// and has its UUID: xfs refuses to mount a second filesystem with a
    /// UUID already mounted, so it is mounted with `nouuid`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared_uuid: bool,
    /// The length Berth last made the backing file (file pool only; None
    /// in records of older versions and of disk volumes). Berth never
    /// shrinks a file: shorter than this, it was cut short outside Berth
    /// and is damage, never grown back with zeros; between this and
    /// `capacity_bytes`, an expansion is under way and the next stage or
    /// NodeExpandVolume completes it. Only ever grows (`save_info`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_bytes: Option<u64>,
    /// Fields a newer berth wrote that this one does not know (see
    /// `VolumeRecord::extra`); in the volume's record (boxed there, so
    /// they cost the other kinds' records nothing) and in a snapshot's.
    #[serde(skip)]
    pub extra: Option<Box<Extra>>,
}

keeps_unknown_fields!(BlockInfo);

/// How a block volume is used.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BlockAccess {
    Raw,
    Filesystem,
}

/// A point-in-time copy of a volume (CreateSnapshot). Read and written
/// with its unknown fields kept (`super::extra`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(remote = "Self")]
pub struct SnapshotRecord {
    pub id: String,
    pub name: String,
    pub kind: Kind,
    /// Creation order; ListSnapshots pages by it.
    pub seq: u64,
    /// Creating until the copy is complete and durable (`ready_to_use`);
    /// Deleting while its storage is removed.
    pub phase: Phase,
    pub source_volume_id: String,
    /// What a volume restored from it needs: the source's capacity when
    /// the snapshot was taken.
    pub size_bytes: i64,
    /// The node it lives on (the source's); empty for NFS.
    pub node: String,
    /// VolumeSnapshotClass parameters as given.
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    /// Creation time (seconds and nanoseconds since the epoch).
    pub created_secs: i64,
    pub created_nanos: i32,
    /// Block sources: what a restored volume inherits (allocation,
    /// filesystem made, access type, defaults).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<BlockInfo>,
    /// Block snapshots: the length of the snapshot's file as it was made
    /// (the source's file or disk then), which a restore and `berth state
    /// check` require the file to have. It can be less than `size_bytes`: a
    /// volume whose new size ControllerExpandVolume recorded has its file
    /// grown on its node later. None in records made before it was
    /// recorded (2026-12-05): their files were made `size_bytes` long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_bytes: Option<u64>,
    /// Fields a newer berth wrote that this one does not know (see
    /// `VolumeRecord::extra`).
    #[serde(skip)]
    pub extra: Option<Box<Extra>>,
}

keeps_unknown_fields!(SnapshotRecord);

#[cfg(test)]
mod tests {
    use super::*;

    fn json(id: &str, fs: &str, params: &str) -> String {
        format!(
            r#"{{"id":"{id}","name":"n-{id}","kind":"local","seq":1,"phase":"ready","capacity_bytes":1,"node":"x","parameters":{params},"capabilities":[{{"access_type":{{"mount":{{"fs_type":"{fs}","mount_flags":[]}}}},"access_mode":"SINGLE_NODE_WRITER"}}],"created_unix":0}}"#
        )
    }

    /// A disk recorded before the loop backing file was kept reads with
    /// none; one with it keeps it; none is not written.
    #[test]
    fn disk_records_without_a_loop_backing_file_still_read() {
        let old = r#"{"path":"/p/d0","device":"/dev/loop3","major":7,"minor":3,"size_bytes":64}"#;
        let d: DiskRef = serde_json::from_str(old).unwrap();
        assert_eq!(d.loop_backing, None);
        assert_eq!(serde_json::to_string(&d).unwrap(), old);
        let new = DiskRef {
            loop_backing: Some(FileId { dev: 2049, ino: 12 }.into()),
            ..d
        };
        let text = serde_json::to_string(&new).unwrap();
        assert!(
            text.ends_with(r#""loop_backing":{"dev":2049,"ino":12}}"#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<DiskRef>(&text).unwrap(), new);
        let ranged = DiskRef {
            loop_range: Some(
                LoopRange {
                    offset: 4096,
                    sizelimit: 0,
                }
                .into(),
            ),
            ..new.clone()
        };
        let text = serde_json::to_string(&ranged).unwrap();
        assert!(
            text.ends_with(r#""loop_range":{"offset":4096,"sizelimit":0}}"#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<DiskRef>(&text).unwrap(), ranged);
    }

    /// Fields this version does not know (a newer berth's) are kept as
    /// read, escapes and all, and written back; a record without any keeps
    /// none (no allocation) and is written as before.
    #[test]
    fn unknown_fields_are_kept_and_written_back() {
        let v = json("a", "ext4", "{}");
        let with = format!(
            r#"{},"z_new":[1,{{"k":"\u00e9"}}],"a\u0062c":2}}"#,
            v.strip_suffix('}').unwrap()
        );
        let r: VolumeRecord = serde_json::from_str(&with).unwrap();
        let extra = r.extra.as_deref().expect("kept");
        assert_eq!(extra.names().collect::<Vec<_>>(), ["z_new", "abc"]);
        assert_eq!(extra.get("z_new"), Some(r#"[1,{"k":"\u00e9"}]"#));
        assert_eq!(r.name, "n-a");
        let text = serde_json::to_string(&r).unwrap();
        let again: VolumeRecord = serde_json::from_str(&text).unwrap();
        assert_eq!(again, r, "{text}");
        let plain: VolumeRecord = serde_json::from_str(&v).unwrap();
        assert!(plain.extra.is_none());
        let text = serde_json::to_string(&plain).unwrap();
        assert!(!text.contains("z_new") && !text.contains("extra"), "{text}");
        // A snapshot record too.
        let snap = r#"{"id":"s","name":"n","kind":"local","seq":1,"phase":"ready","source_volume_id":"a","size_bytes":1,"node":"x","created_secs":0,"created_nanos":0,"later":{"q":true}}"#;
        let s: SnapshotRecord = serde_json::from_str(snap).unwrap();
        assert_eq!(
            s.extra.as_deref().and_then(|e| e.get("later")),
            Some(r#"{"q":true}"#)
        );
        let back: SnapshotRecord =
            serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    /// Fields a newer berth wrote inside a record's sections (a block
    /// volume's, its disk's, the content source; a snapshot's block
    /// section) are kept as read and written back, as the top-level ones
    /// are: before, serde dropped them on read (and a content source with
    /// one did not read at all). Sections without any are written as
    /// before.
    #[test]
    fn unknown_fields_of_a_records_sections_are_kept() {
        let v = json("b", "ext4", "{}");
        let with = format!(
            r#"{},"block":{{"allocation":"thin","disk":{{"path":"/p/d0","device":"/dev/sdb","major":8,"minor":16,"size_bytes":64,"disk_new":[1]}},"default_fs":"ext4","formatted":false,"block_new":{{"k":"\u00e9"}}}},"source":{{"snapshot":"s1","source_new":true}}}}"#,
            v.strip_suffix('}').unwrap()
        );
        let r: VolumeRecord = serde_json::from_str(&with).unwrap();
        assert!(r.extra.is_none());
        let got = |e: Option<&Extra>, name: &str| e.and_then(|e| e.get(name)).map(String::from);
        let b = r.block.as_deref().expect("block");
        assert_eq!(
            got(b.extra.as_deref(), "block_new").as_deref(),
            Some(r#"{"k":"\u00e9"}"#)
        );
        let d = b.disk.as_ref().expect("disk");
        assert_eq!(got(d.extra.as_deref(), "disk_new").as_deref(), Some("[1]"));
        assert_eq!((d.major, d.size_bytes), (8, 64));
        assert_eq!(
            r.content_source(),
            Some(&ContentSource::Snapshot("s1".into()))
        );
        let s = r.source.as_deref().expect("source");
        assert_eq!(
            got(s.extra.as_deref(), "source_new").as_deref(),
            Some("true")
        );
        // A change of a known field, written and read back: all kept.
        let mut changed = r.clone();
        changed.capacity_bytes = 2;
        let text = serde_json::to_string(&changed).unwrap();
        let again: VolumeRecord = serde_json::from_str(&text).unwrap();
        assert_eq!(again, changed, "{text}");
        assert!(
            text.contains(r#""source":{"snapshot":"s1","source_new":true}"#),
            "{text}"
        );
        // Without unknown fields: written as before.
        let plain = |of: ContentSource| serde_json::to_string(&Source::from(of)).unwrap();
        assert_eq!(
            plain(ContentSource::Volume("v".into())),
            r#"{"volume":"v"}"#
        );
        assert_eq!(
            plain(ContentSource::Snapshot("s".into())),
            r#"{"snapshot":"s"}"#
        );
        let info = BlockInfo::default();
        let text = serde_json::to_string(&info).unwrap();
        assert_eq!(
            text,
            r#"{"allocation":"thin","default_fs":"","formatted":false}"#
        );
        assert_eq!(serde_json::from_str::<BlockInfo>(&text).unwrap(), info);
        // A source of no known kind (or of two) still does not read.
        for bad in ["{}", r#"{"group":"g"}"#, r#"{"snapshot":"a","volume":"b"}"#] {
            assert!(serde_json::from_str::<Source>(bad).is_err(), "{bad}");
        }
        // A snapshot record's block section.
        let snap = r#"{"id":"s","name":"n","kind":"block","seq":1,"phase":"ready","source_volume_id":"a","size_bytes":1,"node":"x","created_secs":0,"created_nanos":0,"block":{"allocation":"thin","default_fs":"ext4","formatted":true,"later":{"q":1}}}"#;
        let s: SnapshotRecord = serde_json::from_str(snap).unwrap();
        let b = s.block.as_ref().expect("block");
        assert_eq!(
            got(b.extra.as_deref(), "later").as_deref(),
            Some(r#"{"q":1}"#)
        );
        let back: SnapshotRecord =
            serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    /// A record whose block section, disk and content source hold fields
    /// a newer berth wrote reads, and is written back with each of them
    /// where it was (its JSON text only). Before, the block section's and
    /// the disk's were dropped, and the record did not read at all with
    /// one in its content source.
    #[test]
    fn a_records_sections_keep_unknown_fields_through_a_rewrite() {
        let v = json("b", "ext4", "{}");
        let with = format!(
            r#"{},"block":{{"allocation":"thin","disk":{{"path":"/p/d0","device":"/dev/sdb","major":8,"minor":16,"size_bytes":64,"disk_new":[1]}},"default_fs":"ext4","formatted":false,"block_new":{{"k":2}}}},"source":{{"volume":"v1","source_new":true}}}}"#,
            v.strip_suffix('}').unwrap()
        );
        let mut r: VolumeRecord = serde_json::from_str(&with).expect("the record reads");
        r.capacity_bytes = 2;
        let text = serde_json::to_string(&r).unwrap();
        for kept in [
            r#""size_bytes":64,"disk_new":[1]}"#,
            r#""formatted":false,"block_new":{"k":2}}"#,
            r#""source":{"volume":"v1","source_new":true}"#,
        ] {
            assert!(text.contains(kept), "{kept} in {text}");
        }
        let again: VolumeRecord = serde_json::from_str(&text).unwrap();
        assert_eq!(serde_json::to_string(&again).unwrap(), text);
    }

    /// A record as this version writes it, every section and value
    /// there (capabilities, a publication, a loop disk's backing file and
    /// range, a content source), without fields of a newer berth.
    const PLAIN: &str = r#"{"id":"b","name":"n-b","kind":"block","seq":1,"phase":"ready","capacity_bytes":1,"node":"x","parameters":{},"capabilities":[{"access_type":{"mount":{"fs_type":"ext4","mount_flags":["noatime"]}},"access_mode":"SINGLE_NODE_WRITER"},{"access_type":"block","access_mode":"MULTI_NODE_READER_ONLY"}],"context":{},"published":{"n1":{"readonly":true,"capability":{"access_type":"block","access_mode":"MULTI_NODE_READER_ONLY"}}},"created_unix":0,"block":{"allocation":"thin","disk":{"path":"/p/d0","device":"/dev/loop3","major":7,"minor":3,"size_bytes":64,"loop_backing":{"dev":2049,"ino":12},"loop_range":{"offset":0,"sizelimit":64}},"default_fs":"ext4","formatted":false},"source":{"volume":"v1"}}"#;

    /// Fields a newer berth wrote inside the values a record holds (a
    /// capability of its list and its access type's `mount` section, a
    /// publication, the capability of that publication, a loop disk's
    /// backing file and range) are kept when
    /// this version rewrites the record (its JSON text only, so it also
    /// runs on code from before). Before, serde dropped them on read, and
    /// the first rewrite lost them.
    #[test]
    fn fields_inside_capabilities_publications_and_file_ids_survive_a_rewrite() {
        let with = PLAIN
            .replace(
                r#""access_mode":"SINGLE_NODE_WRITER"}"#,
                r#""access_mode":"SINGLE_NODE_WRITER","cap_new":[1]}"#,
            )
            .replace(
                r#"{"readonly":true,"capability":{"access_type":"block","access_mode":"MULTI_NODE_READER_ONLY"}}"#,
                r#"{"readonly":true,"capability":{"access_type":"block","access_mode":"MULTI_NODE_READER_ONLY","pcap_new":2},"grant_new":"g"}"#,
            )
            .replace(r#""ino":12}"#, r#""ino":12,"id_new":{"gen":7}}"#)
            .replace(r#""sizelimit":64}"#, r#""sizelimit":64,"range_new":null}"#)
            .replace(
                r#""mount_flags":["noatime"]}"#,
                r#""mount_flags":["noatime"],"mount_new":{"x": 1.0}}"#,
            );
        assert_ne!(with, PLAIN);
        let mut r: VolumeRecord = serde_json::from_str(&with).expect("the record reads");
        r.capacity_bytes = 2;
        let text = serde_json::to_string(&r).unwrap();
        for kept in [
            r#""access_mode":"SINGLE_NODE_WRITER","cap_new":[1]}"#,
            r#""access_mode":"MULTI_NODE_READER_ONLY","pcap_new":2},"grant_new":"g"}"#,
            r#""ino":12,"id_new":{"gen":7}}"#,
            r#""sizelimit":64,"range_new":null}"#,
            r#""mount_flags":["noatime"],"mount_new":{"x": 1.0}}"#,
        ] {
            assert!(text.contains(kept), "{kept} in {text}");
        }
        // the list's other capability, without one, is written as before
        assert!(
            text.contains(r#"{"access_type":"block","access_mode":"MULTI_NODE_READER_ONLY"}],"#),
            "{text}"
        );
        let again: VolumeRecord = serde_json::from_str(&text).unwrap();
        assert_eq!(serde_json::to_string(&again).unwrap(), text);
    }

    /// A record without fields of a newer berth is written byte for byte
    /// as before the values it holds kept them (a guard: the journal's
    /// format does not change for them).
    #[test]
    fn a_record_without_unknown_fields_is_written_as_before() {
        let r: VolumeRecord = serde_json::from_str(PLAIN).unwrap();
        assert_eq!(serde_json::to_string(&r).unwrap(), PLAIN);
        let caps: Vec<Capability> =
            serde_json::from_str(r#"[{"access_type":"block","access_mode":"SINGLE_NODE_WRITER"}]"#)
                .unwrap();
        assert_eq!(
            serde_json::to_string(&caps).unwrap(),
            r#"[{"access_type":"block","access_mode":"SINGLE_NODE_WRITER"}]"#
        );
    }

    /// What a request is compared with (a CreateVolume retry's
    /// capabilities, a ControllerPublishVolume retry's grant) is the known
    /// fields: a newer berth's fields beside them do not make the retry
    /// another request. Yet a list with them is another value than one
    /// without (never shared with it: `Shared` would hand one record the
    /// other's fields).
    #[test]
    fn kept_fields_are_not_compared_with_a_request() {
        let with: VolumeRecord = serde_json::from_str(
            &PLAIN
                .replace(
                    r#""MULTI_NODE_READER_ONLY"}"#,
                    r#""MULTI_NODE_READER_ONLY","n":1}"#,
                )
                .replace(r#""readonly":true,"#, r#""readonly":true,"m":2,"#)
                .replace(
                    r#""mount_flags":["noatime"]"#,
                    r#""mount_flags":["noatime"],"o":3"#,
                ),
        )
        .unwrap();
        let plain: VolumeRecord = serde_json::from_str(PLAIN).unwrap();
        assert!(Capability::same_list(
            &with.capabilities,
            &plain.capabilities
        ));
        assert_ne!(with.capabilities, plain.capabilities);
        let (a, b) = (with.published.get("n1"), plain.published.get("n1"));
        let (a, b) = (a.expect("published"), b.expect("published"));
        assert!(a.same_as(b) && a != b);
        assert!(a.capability.extra.is_some() && a.extra.is_some());
        // the mount section's: not compared either, yet part of the value
        let (m, n) = (&with.capabilities[0], &plain.capabilities[0]);
        assert!(m.same_as(n) && m.extra.is_none() && m != n, "{m:?}");
        let mut other = n.clone();
        if let AccessType::Mount { fs_type, .. } = &mut other.access_type {
            fs_type.push('x');
        }
        assert!(!m.same_as(&other));
        let mut other = b.clone();
        other.readonly = false;
        assert!(!a.same_as(&other));
        assert!(!Capability::same_list(
            &with.capabilities,
            &plain.capabilities[..1]
        ));
        let mut shared = Shared::default();
        let (mut x, mut y) = (with.clone(), plain.clone());
        shared.share(&mut x);
        shared.share(&mut y);
        let text = |r: &VolumeRecord| serde_json::to_string(&r.capabilities).unwrap();
        assert_eq!(text(&x), text(&with));
        assert_eq!(text(&y), text(&plain));
    }

    #[test]
    fn equal_values_read_in_a_row_are_one_copy_and_others_their_own() {
        let p = r#"{"a":"1"}"#;
        let r: Vec<VolumeRecord> = [
            json("a", "ext4", p),
            json("b", "ext4", p),
            json("c", "xfs", "{}"),
        ]
        .iter()
        .map(|j| serde_json::from_str(j).expect("a record"))
        .collect();
        assert!(Arc::ptr_eq(&r[0].capabilities, &r[1].capabilities));
        assert!(Arc::ptr_eq(&r[0].parameters, &r[1].parameters));
        assert_eq!(r[1].parameters.get("a").map(String::as_str), Some("1"));
        assert!(r[2].parameters.is_empty());
        assert!(
            matches!(&r[2].capabilities[0].access_type, AccessType::Mount { fs_type, .. } if fs_type == "xfs")
        );
        assert!(
            matches!(&r[1].capabilities[0].access_type, AccessType::Mount { fs_type, .. } if fs_type == "ext4")
        );
        // and the store's index shares what is equal whatever the order
        let mut shared = Shared::default();
        let (mut x, mut y) = (r[0].clone(), r[2].clone());
        y.parameters = Arc::new(BTreeMap::from([("a".to_string(), "1".to_string())]));
        shared.share(&mut x);
        shared.share(&mut y);
        assert!(Arc::ptr_eq(&x.parameters, &y.parameters));
        assert!(!Arc::ptr_eq(&x.capabilities, &y.capabilities));
    }

    #[test]
    fn values_are_read_right_whether_their_text_repeats_or_not() {
        // Text equal to the last: not parsed, the last copy. Text that
        // differs but means the same (spacing): parsed, still one copy.
        // A different value between two equal ones: each its own.
        let r: Vec<VolumeRecord> = [
            json("a", "ext4", r#"{"a":"1"}"#),
            json("b", "ext4", r#"{ "a" : "1" }"#),
            json("c", "ext4", r#"{"a":"2"}"#),
            json("d", "ext4", r#"{"a":"1"}"#),
            json("e", "ext4", r#"{"a":"1"}"#),
        ]
        .iter()
        .map(|j| serde_json::from_str(j).expect("a record"))
        .collect();
        let a = |i: usize| r[i].parameters.get("a").cloned().unwrap_or_default();
        assert_eq!([a(0), a(1), a(2), a(3), a(4)], ["1", "1", "2", "1", "1"]);
        assert!(Arc::ptr_eq(&r[0].parameters, &r[1].parameters));
        assert!(Arc::ptr_eq(&r[3].parameters, &r[4].parameters));
        assert!(!Arc::ptr_eq(&r[2].parameters, &r[3].parameters));
        // a value that is not what its field holds is an error, not a copy
        assert!(serde_json::from_str::<VolumeRecord>(&json("f", "ext4", r#"["a"]"#)).is_err());
        // and the index's shared copies are found again by address
        let mut shared = Shared::default();
        let mut recs = r.clone();
        for x in &mut recs {
            shared.share(x);
        }
        assert!(Arc::ptr_eq(&recs[0].parameters, &recs[3].parameters));
        assert_eq!(recs[2].parameters.get("a").map(String::as_str), Some("2"));
        assert_eq!(shared.parameters.len(), 3, "{{}}, a=1 and a=2");
    }

    #[test]
    fn a_record_without_publications_holds_no_allocation_for_them() {
        let mut m: NodeMap<i32> = NodeMap::new();
        assert!(m.0.is_none());
        m.insert("a".into(), 1);
        assert!(m.0.is_some());
        assert_eq!(m.remove("a"), Some(1));
        assert!(m.0.is_none(), "emptied: back to no allocation");
        let back: NodeMap<i32> = serde_json::from_str("{}").expect("map");
        assert!(back.0.is_none());
    }

    #[test]
    fn a_node_map_is_sorted_and_reads_and_writes_as_an_object() {
        let mut m = NodeMap::new();
        assert_eq!(m.insert("b".into(), 2), None);
        assert_eq!(m.insert("a".into(), 1), None);
        assert_eq!(m.insert("b".into(), 3), Some(2));
        assert_eq!(m.keys().cloned().collect::<Vec<_>>(), ["a", "b"]);
        let j = serde_json::to_string(&m).expect("json");
        assert_eq!(j, r#"{"a":1,"b":3}"#);
        let back: NodeMap<i32> = serde_json::from_str(r#"{"b":3,"a":1}"#).expect("map");
        assert_eq!(back, m);
        assert_eq!(m.remove("a"), Some(1));
        assert!(m.contains_key("b") && !m.contains_key("a") && m.len() == 1);
        m.clear();
        assert!(m.is_empty() && m.get("b").is_none());
    }
}
