//! Volume kinds. Each kind implements `VolumeKind`; the RPC handlers do the
//! generic work (validation, guards, records, topology, idempotency) and call
//! the kind for what touches storage.
//!
//! | file       | kind                                         |
//! |------------|----------------------------------------------|
//! | `local/`   | local directories under `--local-root`, held to their size by project quotas where the filesystem enforces them (`local/quota.rs`) |
//! | `block/`   | loop-backed files under `--block-root`, and whole disks of `--disk-pool` |
//! | `nfs/`     | subdirectories of an export on an existing NFS server |

pub mod block;
pub mod local;
pub mod nfs;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::node::mounts::LazyTable;
use crate::os::FsUsage;
use crate::state::{Capability, Kind, SnapshotRecord, VolumeRecord};

pub use block::BlockKind;
pub use local::LocalKind;
pub use nfs::NfsKind;

/// A new id `<prefix><32 lower-case hex>` (a random UUID).
pub fn new_hex_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

/// The 8 hex digits that tag the ids a node makes (a hash of its id).
pub fn node_tag(node: &str) -> String {
    format!("{:08x}", crc32fast::hash(node.as_bytes()))
}

/// A new id `<prefix><32 lower-case hex>` whose first 8 digits are
/// `node_tag(node)` and the rest random: the id says which node made it,
/// so another node's controller can tell "lives elsewhere" (the CO then
/// places the request there) from "does not exist".
pub fn new_node_id(prefix: &str, node: &str) -> String {
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}{}{}", node_tag(node), &random[8..])
}

/// The node tag of an id made by `new_node_id` (ids of older versions carry
/// a random one: only a mismatch with a known node means anything).
pub fn id_node_tag<'a>(prefix: &str, id: &'a str) -> Option<&'a str> {
    is_hex_id(prefix, id).then(|| &id[prefix.len()..prefix.len() + 8])
}

/// Whether `id` is exactly `<prefix><32 lower-case hex>`: such an id is a
/// safe path component.
pub fn is_hex_id(prefix: &str, id: &str) -> bool {
    // One table lookup a byte, without a branch: start-up checks every
    // name in each root twice (tens of thousands of calls).
    id.strip_prefix(prefix)
        .is_some_and(|h| h.len() == 32 && h.bytes().fold(true, |ok, b| ok & LOWER_HEX[b as usize]))
}

/// Why `id`, read back from the journal as the id of a volume record of
/// kind `kind`, is not an id such a record can have (None when it is one):
/// checked as an id from an RPC is (`validate::volume_id`, then the kind's
/// structure: `local-` or `block-` and 32 hex digits, the block kind's
/// `wipe-` and `held-` records, an NFS id that parses). A record with any
/// other id was not written by berth (forged by hand, or damaged in a way
/// its checksum does not catch): berth never acts on it, as its id may
/// name a path outside its directories (`Store::open`).
pub fn volume_id_flaw(kind: Kind, id: &str) -> Option<String> {
    if let Err(e) = crate::validate::volume_id(id) {
        return Some(e.to_string());
    }
    let fits = match kind {
        Kind::Local => local::is_volume_id(id),
        Kind::Block => block::is_record_id(id),
        Kind::Nfs => nfs::id::VolumeId::parse(id).is_ok(),
    };
    (!fits).then(|| format!("not the id of a {kind} volume"))
}

/// The key of the storage a volume of `kind` with id `id` names, for the
/// store's index of storage (see `Store`'s `Admission::overlapping`): for
/// ids that describe their storage (NFS: server, share and subdirectory),
/// which two volumes may name nested; None for ids that are unique storage
/// by themselves (CreateVolume's id check is enough).
pub fn storage_key(kind: Kind, id: &str) -> Option<String> {
    match kind {
        Kind::Nfs => nfs::id::VolumeId::parse(id).ok().map(|v| v.storage_key()),
        Kind::Local | Kind::Block => None,
    }
}

/// Whether `id` is the id of a volume of kind `kind` that an RPC may name
/// (not an internal record's, such as the block kind's `wipe-` and
/// `held-`), whatever this instance's configuration serves.
pub fn is_volume_id_of(kind: Kind, id: &str) -> bool {
    match kind {
        Kind::Local => local::is_volume_id(id),
        Kind::Block => block::is_volume_id(id),
        Kind::Nfs => nfs::id::VolumeId::parse(id).is_ok(),
    }
}

/// `volume_id_flaw` for the id of a snapshot record of kind `kind`
/// (`local-snap-` or `block-snap-` and 32 hex digits, an NFS snapshot id
/// that parses).
pub fn snapshot_id_flaw(kind: Kind, id: &str) -> Option<String> {
    if let Err(e) = crate::validate::snapshot_id(id) {
        return Some(e.to_string());
    }
    let fits = match kind {
        Kind::Local => local::is_snapshot_id(id),
        Kind::Block => block::is_snapshot_id(id),
        Kind::Nfs => nfs::id::SnapshotId::parse(id).is_ok(),
    };
    (!fits).then(|| format!("not the id of a {kind} snapshot"))
}

/// Which bytes are lower-case hex digits.
static LOWER_HEX: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = matches!(b as u8, b'0'..=b'9' | b'a'..=b'f');
        b += 1;
    }
    t
};

/// Which of a root's recorded volumes have their storage in it
/// (`VolumeKind::presence`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    /// The root, and what it is called (`local root`, `block root`).
    pub root: std::path::PathBuf,
    pub what: &'static str,
    /// Ready volumes whose storage should be in the root.
    pub expected: usize,
    /// Those whose storage is there.
    pub present: usize,
    /// A few of the missing ones (at most 3), for the message.
    pub missing: Vec<String>,
    /// Records of this kind in the state, in any phase.
    pub recorded: usize,
    /// Volumes in the root that no record names: how many, and a few of
    /// them (at most 3). Creates record a volume before its storage is in
    /// the root and deletes take it out before removing the record, so
    /// only records that were lost (a damaged or cut journal, a state
    /// directory from an older backup or from another berth, `berth state
    /// repair`) leave one.
    pub unrecorded: (usize, Vec<String>),
}

/// `Presence::unrecorded` of these ids.
pub fn some_unrecorded<S: AsRef<str>>(ids: &[S]) -> (usize, Vec<String>) {
    (
        ids.len(),
        ids.iter().take(3).map(|s| s.as_ref().to_string()).collect(),
    )
}

/// Up to 3 ids of `ids` that `here` does not hold (for `Presence::missing`).
pub fn some_missing<'a>(
    ids: impl Iterator<Item = &'a str>,
    here: &dyn Fn(&str) -> bool,
) -> Vec<String> {
    ids.filter(|id| !here(id))
        .take(3)
        .map(str::to_string)
        .collect()
}

/// Free space a kind can still hand out, before subtracting promises.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolCapacity {
    /// Bytes free in the pool right now.
    pub free_bytes: i64,
    /// Largest single volume the pool could ever hold.
    pub max_volume_bytes: i64,
}

/// What volumes wrote within their promises, per volume
/// (`VolumeKind::written_within_promises`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Written(pub Vec<(String, i64)>);

impl Written {
    /// What every volume read wrote.
    pub fn total(&self) -> i64 {
        self.0.iter().fold(0i64, |t, (_, b)| t.saturating_add(*b))
    }

    /// What the volumes that `present` still holds wrote: a volume deleted
    /// since the usage was read has no promise left to take its writes
    /// off again (and its data may still take space, in the trash), so
    /// they are not added back.
    pub fn of(&self, present: impl Fn(&str) -> bool) -> i64 {
        self.0
            .iter()
            .filter(|(id, _)| present(id))
            .fold(0i64, |t, (_, b)| t.saturating_add(*b))
    }
}

/// Health of a volume's backing storage.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    pub abnormal: bool,
    pub message: String,
}

impl Health {
    pub fn ok() -> Self {
        Health {
            abnormal: false,
            message: "volume is healthy".into(),
        }
    }
    pub fn abnormal(message: impl Into<String>) -> Self {
        Health {
            abnormal: true,
            message: message.into(),
        }
    }
}

/// Arguments of a NodePublishVolume, validated.
#[derive(Debug, Clone)]
pub struct PublishArgs<'a> {
    /// Empty for a kind that does not stage (`node_local` false) when the
    /// CO gave no staging path.
    pub staging: &'a Path,
    pub target: &'a Path,
    pub capability: &'a Capability,
    pub readonly: bool,
}

/// Usage numbers for NodeGetVolumeStats.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeStats {
    pub usage: FsUsage,
    /// Raw block volumes report only their size.
    pub block_size_only: Option<i64>,
}

/// A request to grow a volume: at least `required` bytes (0: no minimum),
/// at most `limit` (0: no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Growth {
    pub required: i64,
    pub limit: i64,
}

/// What ControllerExpandVolume answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expansion {
    pub capacity_bytes: i64,
    pub node_expansion_required: bool,
}

/// Arguments of a NodeExpandVolume, validated.
#[derive(Debug, Clone)]
pub struct NodeExpandArgs<'a> {
    pub volume_path: &'a Path,
    pub staging: Option<&'a Path>,
    pub capability: Option<&'a Capability>,
    pub growth: Growth,
}

/// What a new volume is made from, besides nothing.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    Snapshot(&'a SnapshotRecord),
    Volume(&'a VolumeRecord),
}

/// What is wrong with the stored copy of a local or block snapshot (its
/// directory or file under the root's `.snapshots/`), as found without
/// following a symlink: a restore from it is refused and `berth state
/// check` reports it. Never repaired: a copy that is not what Berth made is
/// not restored from.
#[derive(Debug)]
pub enum CopyFlaw {
    /// Nothing at its path (or the path cannot be looked at).
    Missing {
        path: PathBuf,
        error: std::io::Error,
    },
    /// Something else than what Berth made there: a symlink (never
    /// followed: it could name another volume's storage or a host file), a
    /// FIFO, a file where a directory belongs, ...
    NotOurs {
        path: PathBuf,
        found: &'static str,
        want: &'static str,
    },
    /// A block snapshot's file of another length than it was made with
    /// (cut short, or grown, by hand or by a damaged filesystem).
    WrongLength { path: PathBuf, have: u64, want: u64 },
}

impl CopyFlaw {
    /// How the copy is: "missing" or "damaged".
    pub fn state(&self) -> &'static str {
        match self {
            CopyFlaw::Missing { .. } => "missing",
            _ => "damaged",
        }
    }

    /// The error a restore from snapshot `id` answers (FAILED_PRECONDITION).
    pub fn error(&self, id: &str) -> Error {
        Error::WrongState(format!(
            "the copy of snapshot {id} is {}: {self}; nothing is restored from it",
            self.state()
        ))
    }
}

impl std::fmt::Display for CopyFlaw {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CopyFlaw::Missing { path, error } => write!(f, "{}: {error}", path.display()),
            CopyFlaw::NotOurs { path, found, want } => {
                write!(f, "{} is {found}, not {want}", path.display())
            }
            CopyFlaw::WrongLength { path, have, want } => write!(
                f,
                "{} has {have} bytes, not the {want} it was made with (cut short or changed since)",
                path.display()
            ),
        }
    }
}

/// The metadata of a snapshot's stored copy at `path` (a symlink there is
/// not followed), or what is wrong with it: missing, or not a directory
/// (`want_dir`) or regular file (otherwise).
pub(crate) fn stored_copy(
    files: &dyn crate::os::Files,
    path: &Path,
    want_dir: bool,
) -> Result<std::fs::Metadata, CopyFlaw> {
    judge_copy(
        path,
        files.lstat(path).map_err(crate::os::OsError::into_io),
        want_dir,
    )
}

/// `stored_copy` of what a look at `path` (lstat) `found`.
pub(crate) fn judge_copy(
    path: &Path,
    found: std::io::Result<std::fs::Metadata>,
    want_dir: bool,
) -> Result<std::fs::Metadata, CopyFlaw> {
    let m = match found {
        Ok(m) => m,
        Err(error) => {
            return Err(CopyFlaw::Missing {
                path: path.to_path_buf(),
                error,
            })
        }
    };
    let t = m.file_type();
    if (want_dir && t.is_dir()) || (!want_dir && t.is_file()) {
        return Ok(m);
    }
    let found = crate::os::files::type_name(t);
    Err(CopyFlaw::NotOurs {
        path: path.to_path_buf(),
        found,
        want: if want_dir {
            "a directory"
        } else {
            "a regular file"
        },
    })
}

/// Whether a root's `.snapshots` directory (`area`) is there, looked at
/// without following a symlink: Ok(false) when it is missing (no copy can
/// be there). Anything else in its place (a symlink to where copies were
/// moved by hand, a file) is not Berth's directory, as start-up and
/// CreateSnapshot already treat it (`files::read_own_dir`, `ensure_dir`):
/// FAILED_PRECONDITION, so that no restore reads, and no DeleteSnapshot
/// removes, what it leads to, outside Berth's directories.
pub(crate) fn snapshots_area(files: &dyn crate::os::files::Files, area: &Path) -> Result<bool> {
    match files.lstat(area) {
        Ok(m) if m.is_dir() => Ok(true),
        Err(e) if e.errno() == Some(libc::ENOENT) => Ok(false),
        Ok(m) => Err(Error::WrongState(format!(
            "{} is {}, not a directory of Berth's own (put there by hand?): no snapshot copy is read or removed through it; put the directory back in its place",
            area.display(),
            crate::os::files::type_name(m.file_type())
        ))),
        Err(e) => Err(Error::os(format!("inspecting {}", area.display()), e)),
    }
}

/// The whole copy at `copy` of snapshot `s` when its create never
/// answered (`Creating`): its rollback keeps it aside instead of removing
/// it (`snapshot_kept_on_rollback` of each kind). ENOENT is "none"; any
/// other failed look is the error, never "none": the copy may be there,
/// and the rollback must then remove nothing.
pub fn kept_on_rollback(
    files: &dyn crate::os::files::Files,
    copy: PathBuf,
    s: &SnapshotRecord,
) -> std::result::Result<Option<PathBuf>, crate::os::OsError> {
    if s.phase != crate::state::Phase::Creating {
        return Ok(None);
    }
    Ok(crate::os::files::lstat_present(files, &copy)?.map(|_| copy))
}

/// RESOURCE_EXHAUSTED, before anything is copied (or frozen), when a copy
/// (`what`, for the message) cannot fit in `area`: its `need` (what
/// `Files::copy_need` or `Files::tree_copy_need` answered: a lower bound,
/// known only where the copy cannot clone and the filesystem shows holes,
/// so a copy that would fit is never refused) is more than the free bytes
/// of `area`'s filesystem (for root, which berth is: ext4's reserved
/// blocks count). Such a copy would run until the filesystem, which the
/// state, the block and the local root usually share, were full, and only
/// then be removed: meanwhile every other volume's write there fails with
/// ENOSPC (a thin block volume's filesystem sees an I/O error), at every
/// retry of the snapshot, restore or clone. When the need or the free
/// space cannot be read, the copy goes on (and fails as it would have).
pub(crate) fn check_room_for_copy(
    os: &crate::os::Os,
    what: &str,
    need: std::result::Result<Option<u64>, crate::os::OsError>,
    area: &Path,
) -> Result<()> {
    let need = match need {
        Ok(Some(n)) => n,
        Ok(None) => return Ok(()),
        Err(e) => {
            tracing::warn!(copy = %what, error = %e, "could not tell how much data a copy takes; copying");
            return Ok(());
        }
    };
    let free = match os.fs.statvfs(area) {
        Ok(u) => u.total_bytes.saturating_sub(u.used_bytes),
        Err(e) => {
            tracing::warn!(copy = %what, error = %e, "could not read the free space for a copy; copying");
            return Ok(());
        }
    };
    if need > free {
        return Err(Error::NoSpace(format!(
            "{what} takes {need} bytes of data, and the filesystem of {} has {free} bytes free",
            area.display()
        )));
    }
    Ok(())
}

pub trait VolumeKind: Send + Sync {
    fn kind(&self) -> Kind;

    /// A fresh volume id for this kind.
    fn new_id(&self) -> String;

    /// True when `id` has this kind's id structure (checked before any use of
    /// the id as a path).
    fn owns_id(&self, id: &str) -> bool;

    /// The id of a new volume named `name` created with all of `params`
    /// (the CO's `csi.storage.k8s.io/` keys included). Default: `new_id`.
    /// Kinds whose ids describe the volume (NFS) derive it from both.
    fn id_for(&self, name: &str, params: &BTreeMap<String, String>) -> Result<String> {
        let _ = (name, params);
        Ok(self.new_id())
    }

    /// The id of a new volume without a content source whose storage is
    /// made already (the local kind's spare directories); None when there
    /// is none, and then `id_for` gives the id. The caller gives it back
    /// with `spare_unused` unless `create` used it.
    fn take_spare_id(&self) -> Option<String> {
        None
    }

    /// A spare id from `take_spare_id` that no `create` used (the name
    /// existed, the request was refused first): it may go to another
    /// create. Nothing for an id `create` used.
    fn spare_unused(&self, id: &str) {
        let _ = id;
    }

    /// At a clean exit: removes the spares no create took (start-up
    /// removes them otherwise).
    fn drop_spares(&self) {}

    /// For self-describing ids (NFS): the record a volume with this id has,
    /// rebuilt from the id alone, for instances that hold no record of it (a
    /// node plugin; a controller whose state was lost). None otherwise.
    fn record_from_id(&self, id: &str) -> Option<VolumeRecord> {
        let _ = id;
        None
    }

    /// For self-describing ids, without a record: the record of the volume
    /// once its storage proves that it exists (NFS: the directory the id
    /// names carries the id's marker); None when it does not. Controller
    /// calls use it (ControllerGetVolume, ValidateVolumeCapabilities,
    /// ControllerExpandVolume); node calls trust the id. Default: None.
    fn confirm_from_id(&self, id: &str) -> Result<Option<VolumeRecord>> {
        let _ = id;
        Ok(None)
    }

    /// ValidateVolumeCapabilities: whether `params` (the kind's own keys,
    /// as a StorageClass gives them) describe the volume `rec`; the reason
    /// when not. Default: the kind accepts them and they are the ones the
    /// volume was created with.
    fn parameters_match(
        &self,
        rec: &VolumeRecord,
        params: &BTreeMap<String, String>,
    ) -> std::result::Result<(), String> {
        self.check_parameters(params).map_err(|e| e.to_string())?;
        let own = crate::controller::kind_parameters(&rec.parameters);
        if &own != params {
            return Err("the parameters differ from the ones the volume was created with".into());
        }
        Ok(())
    }

    /// ValidateVolumeCapabilities: whether the volume `rec`, as created,
    /// can be used with `cap` (a capability the kind supports); the reason
    /// when not. Default: it can.
    fn capability_fits(
        &self,
        rec: &VolumeRecord,
        cap: &Capability,
    ) -> std::result::Result<(), String> {
        let _ = (rec, cap);
        Ok(())
    }

    /// Whether reaching the storage needs a server that may not answer
    /// (NFS): start-up then finishes interrupted creates and deletes of the
    /// kind after the socket is up (Probe answering ready meanwhile),
    /// instead of before serving.
    fn remote(&self) -> bool {
        false
    }

    /// How long a controller call (CreateVolume, DeleteVolume and the
    /// snapshot calls) of this kind waits for its operation before it
    /// answers DEADLINE_EXCEEDED (`Driver::run_within`); the operation goes
    /// on and keeps its guards until it ends, so a retry meanwhile is
    /// ABORTED, never a second operation beside it. None: no deadline.
    fn op_deadline(&self) -> Option<std::time::Duration> {
        None
    }

    /// StorageClass parameters this kind understands beyond the generic ones;
    /// any other key is rejected naming the key.
    fn check_parameters(&self, params: &BTreeMap<String, String>) -> Result<()>;

    /// INVALID_ARGUMENT when this kind cannot provide `cap`.
    fn check_capability(&self, cap: &Capability) -> Result<()>;

    /// Free space of the pool (GetCapacity subtracts promises).
    fn pool_capacity(&self) -> Result<PoolCapacity>;

    /// Free space of the pool that the StorageClass parameters `params`
    /// select (a kind may have several). Default: `pool_capacity`.
    fn capacity_for(&self, params: &BTreeMap<String, String>) -> Result<PoolCapacity> {
        let _ = params;
        self.pool_capacity()
    }

    /// The size a new volume gets when `wanted` bytes are asked for, at
    /// least `required` (0: no minimum; never more than `wanted`) and at
    /// most `limit` (0: no limit): rounded to what the pool allocates, and
    /// OUT_OF_RANGE when no size fits. Default: `wanted` as is.
    fn size_for(
        &self,
        params: &BTreeMap<String, String>,
        caps: &[Capability],
        wanted: i64,
        required: i64,
        limit: i64,
    ) -> Result<i64> {
        let _ = (params, caps, required, limit);
        Ok(wanted)
    }

    /// The smallest volume `size_for` makes for `caps` from the pool that
    /// `params` select, when the pool has one (a file pool: a whole MiB,
    /// or what mkfs needs for the capabilities' filesystem). GetCapacity
    /// answers it as `minimum_volume_size`, and no room when the largest
    /// volume the pool holds is smaller. Default: none.
    fn min_size_for(
        &self,
        params: &BTreeMap<String, String>,
        caps: &[Capability],
    ) -> Result<Option<i64>> {
        let _ = (params, caps);
        Ok(None)
    }

    /// True when a volume's capacity is a promise that the pool's free space
    /// does not show (directories): GetCapacity and CreateVolume subtract
    /// every promise. A kind that takes the space when it creates or grows
    /// a volume answers false.
    fn capacity_is_promise(&self) -> bool {
        true
    }

    /// Bytes already written into volumes within their promises, when the
    /// kind holds its volumes to their sizes (local directories with
    /// project quotas): the free space no longer has them and the promises
    /// still count them, so GetCapacity (and CreateVolume, when the
    /// promises alone leave no room) add them back: what is left is the
    /// free space minus what the volumes may still write. Read before the
    /// free space, so that writes in between only make the answer smaller;
    /// per volume, so that only the volumes whose promises are read after
    /// the free space count (`Written::of`). Default: none.
    fn written_within_promises(&self) -> Result<Written> {
        Ok(Written::default())
    }

    /// Whether this node can create a volume with the StorageClass
    /// parameters `params` (the kind's own keys) at all: a requirement the
    /// node cannot meet (local `capacityEnforcement: required` without
    /// project quotas) is RESOURCE_EXHAUSTED, which makes the distributed
    /// external-provisioner give the volume back to the scheduler for
    /// another node. Default: yes.
    fn can_create(&self, params: &BTreeMap<String, String>) -> Result<()> {
        let _ = params;
        Ok(())
    }

    /// Whether the kind holds its volumes to their sizes here (local: project
    /// quotas on the local root), for the metric; None for kinds where the
    /// question does not arise (their storage has a size of its own).
    fn sizes_enforced(&self) -> Option<bool> {
        None
    }

    /// Whether volumes of this kind can be expanded (EXPAND_VOLUME and
    /// online VolumeExpansion are advertised when a served kind can).
    fn expandable(&self) -> bool {
        false
    }

    /// ControllerExpandVolume of a volume in this instance's store (`Some`),
    /// or of one with this kind's id that lives on another node (`None`).
    fn controller_expand(&self, rec: Option<&VolumeRecord>, growth: Growth) -> Result<Expansion> {
        let _ = (rec, growth);
        Err(Error::Invalid(format!(
            "{} volumes cannot be expanded",
            self.kind()
        )))
    }

    /// NodeExpandVolume: grows the volume on this node and returns its
    /// capacity now. Idempotent; never shrinks.
    fn node_expand(&self, rec: &VolumeRecord, args: &NodeExpandArgs<'_>) -> Result<i64> {
        let _ = (rec, args);
        Err(Error::Invalid(format!(
            "{} volumes cannot be expanded",
            self.kind()
        )))
    }

    /// Reaches the storage a new volume `rec` will be made on, changing
    /// nothing there, before its record is written (NFS: mounts the share).
    /// A create that fails here has no record and has made nothing, so
    /// nothing is rolled back: in particular no second wait for a server
    /// that did not answer, and no record left behind for a share that
    /// cannot be mounted (`create` then makes the storage). Default:
    /// nothing to reach.
    fn reach(&self, rec: &VolumeRecord) -> Result<()> {
        let _ = rec;
        Ok(())
    }

    /// Creates the storage for a recorded volume. Idempotent: a retry after a
    /// crash finds what an earlier attempt made.
    fn create(&self, rec: &mut VolumeRecord) -> Result<()>;

    /// The volume named `name` (of the StorageClass parameters `params`)
    /// whose create a crash cut short after it may have been handed out,
    /// which start-up held instead of rolling back (a whole disk's hold):
    /// its record rebuilt, phase Creating, for CreateVolume to compare with
    /// the request (a retry of that create gets it back, `adopt_held`).
    /// Looks only where such holds can be. Default: none.
    fn held_by_name(&self, name: &str, params: &BTreeMap<String, String>) -> Option<VolumeRecord> {
        let _ = (name, params);
        None
    }

    /// Takes back the volume `rec` (from `held_by_name`) from its hold, its
    /// storage as it is: its record written again (phase Creating), then
    /// the hold removed. The caller marks it Ready. A crash in between
    /// leaves it held again. Default: nothing held.
    fn adopt_held(&self, rec: &VolumeRecord) -> Result<()> {
        let _ = rec;
        Err(Error::Internal("this kind holds nothing".into()))
    }

    /// DeleteVolume's check before anything is written (the Deleting
    /// phase) or removed, beside `in_use`, and that of the retry of a
    /// delete that did not finish: FAILED_PRECONDITION when the kind knows
    /// the volume's storage must not be removed now (a block disk that a
    /// hold bearing the volume's id says another claimant may own).
    /// Default: nothing to refuse.
    fn refuse_delete(&self, rec: &VolumeRecord) -> Result<()> {
        let _ = rec;
        Ok(())
    }

    /// Removes the storage. Idempotent; touches nothing outside the kind's
    /// own root. Mount checks use `mounts`, which DeleteVolume shares with
    /// `in_use` so that one RPC reads the mount table at most once.
    fn delete_with(&self, rec: &VolumeRecord, mounts: &LazyTable) -> Result<()>;

    /// What is wrong with the stored copy of the snapshot `snap` (missing
    /// or damaged), as a restore from it finds it (and refuses it), told
    /// from one look at it through the OS layer (lstat: nothing is read):
    /// ListSnapshots, GetSnapshot and CreateSnapshot report such a
    /// snapshot not ready to use. Default: nothing to tell (NFS copies
    /// live on their share, which a look may wait on).
    fn snapshot_flaw(&self, snap: &SnapshotRecord) -> Option<CopyFlaw> {
        let _ = snap;
        None
    }

    /// After a new volume's record says Ready (durably): moves its storage
    /// to where the volume lives, if the kind made it elsewhere first (local
    /// directories are made under `.creating/`, so that a directory in the
    /// root without a record is never one of Berth's unfinished creates).
    /// Start-up finishes a move a crash interrupted. Default: nothing.
    fn ready(&self, rec: &VolumeRecord) -> Result<()> {
        let _ = rec;
        Ok(())
    }

    /// After the record of a deleted volume is gone: finishes removing what
    /// `delete_with` only set aside (best effort; a failure is logged, and
    /// start-up finishes it). Set aside first, removed after the record: a
    /// delete whose record could not be removed loses nothing (it is put
    /// back: `undo_delete`, or start-up), unless the journal had no room
    /// for the removal and the data made room (`free_set_aside`). Default:
    /// nothing to do.
    fn purge(&self, rec: &VolumeRecord) {
        let _ = rec;
    }

    /// DeleteVolume could not remove the record of `rec` for want of
    /// space (the state's filesystem is full, the journal's reserve used
    /// up) after `delete_with` set its storage aside: removes the data of
    /// what was set aside, keeping what holds it (removals only, nothing
    /// written), so that the space the volume took makes room for its
    /// record's removal. True when there was something to remove. Default:
    /// nothing set aside that could be freed.
    fn free_set_aside(&self, rec: &VolumeRecord) -> Result<bool> {
        let _ = rec;
        Ok(false)
    }

    /// DeleteVolume could not write the Deleting phase of `rec` (still as
    /// it was in the store) for want of space (the state's filesystem is
    /// full, the journal's reserve used up), after its checks of use
    /// passed: frees the space the volume's own data takes, keeping the
    /// volume itself in place (what holds the data stays, emptied:
    /// removals only, nothing written), so that the write can be made. A
    /// crash at any moment leaves the volume as its record says, at most
    /// emptied: the CO asked for it gone. True when something was freed.
    /// Default: nothing that could be freed before the intent.
    fn free_for_intent(&self, rec: &VolumeRecord, mount_table: &LazyTable) -> Result<bool> {
        let _ = (rec, mount_table);
        Ok(false)
    }

    /// Undoes `delete_with` when the record of `rec` could not be removed:
    /// puts what it set aside back in place (what start-up does with it
    /// otherwise), so that the record and the storage agree. Default:
    /// nothing set aside.
    fn undo_delete(&self, rec: &VolumeRecord) -> Result<()> {
        let _ = rec;
        Ok(())
    }

    /// `delete_with` reading the mount table itself (when it needs it).
    fn delete(&self, rec: &VolumeRecord) -> Result<()> {
        self.delete_with(rec, &LazyTable::new())
    }

    /// Removes the storage of a create this process ran and that failed
    /// before it answered: nothing of it was handed out, so nothing is
    /// kept aside (`delete_with`, from start-up, keeps what a create whose
    /// Ready record was lost may have handed out). Default: `delete`.
    fn rollback_create(&self, rec: &VolumeRecord) -> Result<()> {
        self.delete(rec)
    }

    /// Whether the backing storage is there and usable.
    fn health(&self, rec: &VolumeRecord) -> Health;

    fn stage(&self, rec: &VolumeRecord, staging: &Path, cap: &Capability) -> Result<()>;
    fn unstage(&self, rec: &VolumeRecord, staging: &Path) -> Result<()>;
    /// NodeUnstageVolume of a volume with this kind's id and no record here
    /// (deleted from under the node, or the state lost): works from the
    /// path, as every CSI driver's unstage does: unmounts what is mounted
    /// at `staging` (and what the kind mounts inside it for `id`), refusing
    /// while it is still published elsewhere, releases what the kind
    /// attached for `id` and removes what it created. Never NOT_FOUND, so
    /// the CO can finish tearing the pod down.
    fn unstage_path(&self, id: &str, staging: &Path) -> Result<()>;
    fn publish(&self, rec: &VolumeRecord, args: &PublishArgs<'_>) -> Result<()>;
    /// NodeUnpublishVolume of volume `id` (an id of this kind): unmounts
    /// everything at `target` and removes it. Works from the path alone: no
    /// record is needed. When the kind can tell that the mount at `target`
    /// is not volume `id`'s (another volume's, or not Berth's), it refuses
    /// (FAILED_PRECONDITION) and unmounts nothing; when it cannot tell (no
    /// record, the volume's storage gone), it unmounts.
    fn unpublish(&self, id: &str, target: &Path) -> Result<()>;
    /// For an id without a record here, of any kind or of none:
    /// FAILED_PRECONDITION when the top mount at `path` shows storage that
    /// this kind has recorded for another volume, which that id cannot name
    /// (the directory-shaped storage in the roots is `Driver::
    /// refuse_volume_storage`'s). Default: nothing to tell.
    fn refuse_recorded(&self, _id: &str, _path: &Path) -> Result<()> {
        Ok(())
    }

    /// NOT_FOUND when the volume is not available at `path`.
    fn stats(&self, rec: &VolumeRecord, path: &Path) -> Result<VolumeStats>;

    /// NodeGetVolumeStats: usage and condition. Default: `stats`, then
    /// `health`. A kind whose stats can hang (NFS) answers both from one
    /// bounded call, and an abnormal condition with default stats when it
    /// has no numbers.
    fn stats_and_health(&self, rec: &VolumeRecord, path: &Path) -> Result<(VolumeStats, Health)> {
        let s = self.stats(rec, path)?;
        Ok((s, self.health(rec)))
    }

    /// The mount points where the volume is staged or published on this
    /// node (DeleteVolume refuses such a volume), from `mounts` (read when
    /// first needed, and kept for the `delete_with` of the same RPC).
    fn in_use(&self, rec: &VolumeRecord, mounts: &LazyTable) -> Result<Vec<std::path::PathBuf>>;

    /// Whether volumes live on one node: topology constraints, per-node
    /// capacity, the attach phase (ControllerPublishVolume) and staging.
    /// False for kinds reachable from every node (NFS).
    fn node_local(&self) -> bool {
        true
    }

    /// Whether CreateVolume/DeleteVolume must write a durable intent
    /// (phase Creating/Deleting) before touching storage. A kind may skip it
    /// when `reconcile_orphans` recognises what a crash leaves behind.
    fn durable_intent(&self) -> bool {
        true
    }

    /// Whether deleting this volume can take long (zeroing a whole disk):
    /// start-up then finishes an interrupted delete of it in the
    /// background, holding its guard, instead of before serving.
    fn slow_delete(&self, _rec: &VolumeRecord) -> bool {
        false
    }

    /// At start-up, before interrupted operations are finished: the volume
    /// `vol` was the source of a copy (a snapshot, a clone) that a crash
    /// interrupted; undo what the copy did to it that outlives the process
    /// (a filesystem frozen for the copy stays frozen, and every write in
    /// the pod waits, until it is thawed).
    fn recover_copy_source(&self, _vol: &VolumeRecord) {}

    /// At start-up, before anything is changed: of the ready volumes whose
    /// storage lives in this kind's root, how many have it there (None: the
    /// kind keeps no volume in a root of its own). `Driver::new` refuses to
    /// start when a root holds none of its volumes (see `Presence`).
    fn presence(&self) -> Option<Presence> {
        None
    }

    /// Once the socket is up (`Driver::start`): starts what start-up left
    /// to the background thread (the local trash). Default: nothing.
    fn start_background(&self) {}

    /// At start-up: cleans up storage left by an interrupted create or
    /// delete that has no record (`known` says which ids have one: volume
    /// and snapshot ids alike).
    fn reconcile_orphans(&self, _known: &dyn Fn(&str) -> bool) -> Result<()> {
        Ok(())
    }

    // ---------------------------------------------- snapshots and clones

    /// Whether this kind makes snapshots, restores them and clones volumes
    /// (CREATE_DELETE_SNAPSHOT, LIST_SNAPSHOTS, CLONE_VOLUME are advertised
    /// when a served kind does).
    fn snapshots(&self) -> bool {
        false
    }

    /// A fresh snapshot id.
    fn new_snapshot_id(&self) -> String {
        String::new()
    }

    /// The id of a new snapshot named `name` of the volume `source` (an id
    /// of this kind), for kinds whose snapshot ids say where the snapshot
    /// lives (NFS: derived from the share, the name and the source, so a
    /// retry after the records were lost finds the same copy). None: a
    /// fresh `new_snapshot_id`.
    fn snapshot_id_for(&self, name: &str, source: &str) -> Result<Option<String>> {
        let _ = (name, source);
        Ok(None)
    }

    /// For self-describing snapshot ids (NFS), without a record: a record
    /// rebuilt from the id alone, for DeleteSnapshot (whose
    /// `delete_snapshot` removes only storage that proves it is that
    /// snapshot's). None otherwise.
    fn snapshot_from_id(&self, id: &str) -> Option<SnapshotRecord> {
        let _ = id;
        None
    }

    /// For self-describing snapshot ids, without a record: the record of
    /// the snapshot once its storage proves that it is complete (NFS: its
    /// marker on the share), for restores. Default: None.
    fn confirm_snapshot(&self, id: &str) -> Result<Option<SnapshotRecord>> {
        let _ = id;
        Ok(None)
    }

    /// INVALID_ARGUMENT when the volume `id` (of this kind) with the
    /// capabilities `caps` cannot be made from `from` (the spec's "source
    /// incompatible": NFS, a source on another share; block, a source whose
    /// content the capabilities cannot use, as a filesystem asked for as a
    /// raw device); FAILED_PRECONDITION when the stored copy of a source
    /// snapshot is missing or damaged (local, block: `CopyFlaw`). Called
    /// before the new volume is recorded. Default: it can.
    fn check_source(&self, id: &str, caps: &[Capability], from: Source<'_>) -> Result<()> {
        let _ = (id, caps, from);
        Ok(())
    }

    /// True when `id` has this kind's snapshot id structure.
    fn owns_snapshot_id(&self, id: &str) -> bool {
        let _ = id;
        false
    }

    /// The node tag an id of this kind carries (`new_node_id`), for a
    /// volume or snapshot id this instance does not hold; None when the id
    /// says nothing about where it lives.
    fn node_tag_of(&self, id: &str) -> Option<String> {
        let _ = id;
        None
    }

    /// Makes the snapshot's own copy of `vol`'s data (a point in time:
    /// filesystems in use are frozen around the copy); returns once the
    /// copy is complete and durable. May fill in `snap.block`.
    fn create_snapshot(&self, vol: &VolumeRecord, snap: &mut SnapshotRecord) -> Result<()> {
        let _ = (vol, snap);
        Err(Error::Invalid(format!(
            "{} volumes have no snapshots",
            self.kind()
        )))
    }

    /// After a new snapshot's record says Ready (durably): moves its copy
    /// to the snapshot's name, if the kind made it elsewhere first (local
    /// and block copies are made under a temporary name, so that a copy
    /// at the snapshot's name under a record still Creating is one that was
    /// handed out: `delete_snapshot` keeps it). Start-up finishes a move a
    /// crash interrupted. Default: nothing.
    fn snapshot_ready(&self, snap: &SnapshotRecord) -> Result<()> {
        let _ = snap;
        Ok(())
    }

    /// Removes a snapshot's storage. Idempotent.
    fn delete_snapshot(&self, snap: &SnapshotRecord) -> Result<()> {
        let _ = snap;
        Ok(())
    }

    /// Removes the storage of a CreateSnapshot this process ran and that
    /// failed before it answered (or that its retry starts over): nothing
    /// is kept aside, as `delete_snapshot` keeps the whole copy of a
    /// snapshot whose Ready record was lost. Default: `delete_snapshot`.
    fn rollback_snapshot(&self, snap: &SnapshotRecord) -> Result<()> {
        self.delete_snapshot(snap)
    }

    /// Creates the storage of a recorded volume from `from` instead of
    /// empty (a restore or a clone); `rec.capacity_bytes` may be larger
    /// than the source (the volume grows). Idempotent like `create`.
    fn create_from(&self, rec: &mut VolumeRecord, from: Source<'_>) -> Result<()> {
        let _ = (rec, from);
        Err(Error::Invalid(format!(
            "{} volumes cannot be created from a snapshot or a volume",
            self.kind()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::is_hex_id;

    #[test]
    fn a_hex_id_is_its_prefix_and_32_lower_case_hex_digits() {
        let good = "p-0123456789abcdef0123456789abcdef";
        assert!(is_hex_id("p-", good));
        assert!(!is_hex_id("q-", good));
        assert!(!is_hex_id("p-", &good[..good.len() - 1]));
        assert!(!is_hex_id("p-", &format!("{good}0")));
        for b in 0..=255u8 {
            let want = b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
            for at in [2, 17, 33] {
                let mut id = good.as_bytes().to_vec();
                id[at] = b;
                // Bytes over 0x7f are not a str alone: the check sees only
                // valid UTF-8 ids, so those are tested as a two-byte char.
                let id = match String::from_utf8(id) {
                    Ok(s) => s,
                    Err(_) => {
                        let mut s = good.to_string();
                        s.replace_range(at..at + 1, "é");
                        assert!(!is_hex_id("p-", &s), "{s}");
                        continue;
                    }
                };
                assert_eq!(is_hex_id("p-", &id), want, "{id}");
            }
        }
    }
}
