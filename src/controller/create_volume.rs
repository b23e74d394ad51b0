//! CreateVolume: idempotent by name. The record is written (phase Creating)
//! before the storage is made and marked Ready after, so a crash in between
//! is rolled back at start-up and the CO's retry creates the volume again.
//! Storage that must be reached first (an NFS share) is reached before the
//! record is written (`VolumeKind::reach`): a create that cannot reach it
//! made nothing and leaves no record.
use std::collections::BTreeMap;
use std::sync::Arc;

use super::snapshot::snap_key;
use super::{topology, volume};
use crate::convert;
use crate::csi::v1 as csi;
use crate::driver::{name_key, now_unix, vol_key, Driver};
use crate::error::{Error, Result};
use crate::kinds::{node_tag, Source, VolumeKind, Written};
use crate::state::store::Admission;
use crate::state::{Capability, ContentSource, Kind, Phase, SnapshotRecord, VolumeRecord};
use crate::validate;

/// Size used when the request gives no capacity range.
pub const DEFAULT_SIZE: i64 = 1 << 30;

/// Parameters the external-provisioner adds (`--extra-create-metadata`) and
/// the generic `kind` key; every other key belongs to the kind.
pub const KIND_KEY: &str = "kind";
const CO_PREFIX: &str = "csi.storage.k8s.io/";

/// The requested size range, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub required: i64,
    pub limit: i64,
}

impl Range {
    pub fn from_proto(r: Option<&csi::CapacityRange>) -> Result<Range> {
        let (required, limit) = r
            .map(|r| (r.required_bytes, r.limit_bytes))
            .unwrap_or((0, 0));
        if required < 0 || limit < 0 {
            return Err(Error::Invalid("capacity_range must not be negative".into()));
        }
        if limit > 0 && required > limit {
            return Err(Error::BadSize(format!(
                "required_bytes {required} is more than limit_bytes {limit}"
            )));
        }
        Ok(Range { required, limit })
    }

    /// The size to allocate.
    pub fn size(&self) -> i64 {
        if self.required > 0 {
            self.required
        } else if self.limit > 0 {
            self.limit.min(DEFAULT_SIZE)
        } else {
            DEFAULT_SIZE
        }
    }

    pub fn admits(&self, size: i64) -> bool {
        size >= self.required && (self.limit == 0 || size <= self.limit)
    }
}

/// Splits the parameters into the kind and what the kind must check.
pub fn kind_of(d: &Driver, params: &BTreeMap<String, String>) -> Result<Kind> {
    match params.get(KIND_KEY) {
        Some(k) => Kind::parse(&k.to_ascii_lowercase())
            .ok_or_else(|| Error::Invalid(format!("parameter kind: unknown volume kind {k:?}")))
            .and_then(|k| d.kind(k).map(|_| k)),
        None => d
            .cfg
            .kinds
            .first()
            .copied()
            .ok_or_else(|| Error::Invalid("no volume kind is served".into())),
    }
}

pub fn kind_parameters(params: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    params
        .iter()
        .filter(|(k, _)| k.as_str() != KIND_KEY && !k.starts_with(CO_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

struct Request {
    id: String,
    name: String,
    kind: Kind,
    caps: Vec<Capability>,
    params: BTreeMap<String, String>,
    range: Range,
    node: String,
    /// The request's accessibility_requirements (node-local kinds).
    topology: Option<csi::TopologyRequirement>,
    /// Why this node may not make a new volume for the request (another
    /// node's topology); a volume that exists may still answer it.
    misplaced: Option<Error>,
    source: Option<ContentSource>,
}

/// The content source of a request, checked.
fn content_source(s: Option<&csi::VolumeContentSource>) -> Result<Option<ContentSource>> {
    use csi::volume_content_source::Type;
    let Some(s) = s else {
        return Ok(None);
    };
    match &s.r#type {
        Some(Type::Snapshot(x)) => Ok(Some(ContentSource::Snapshot(
            validate::snapshot_id(&x.snapshot_id)?.to_string(),
        ))),
        Some(Type::Volume(x)) => Ok(Some(ContentSource::Volume(
            validate::volume_id(&x.volume_id)?.to_string(),
        ))),
        None => Err(Error::Invalid(
            "volume_content_source names neither a snapshot nor a volume".into(),
        )),
    }
}

/// A source resolved to its record: what a restore or clone copies.
enum Resolved {
    Snapshot(Box<SnapshotRecord>),
    Volume(VolumeRecord),
}

impl Resolved {
    fn size(&self) -> i64 {
        match self {
            Resolved::Snapshot(s) => s.size_bytes,
            Resolved::Volume(v) => v.capacity_bytes,
        }
    }

    fn as_source(&self) -> Source<'_> {
        match self {
            Resolved::Snapshot(s) => Source::Snapshot(s),
            Resolved::Volume(v) => Source::Volume(v),
        }
    }
}

/// Finds the source of a restore or clone in this instance's store; one
/// with a self-describing id (NFS) and no record here is found from its
/// storage (its marker). One that is not here but whose id says it lives on
/// another node is RESOURCE_EXHAUSTED (the CO then places the volume
/// elsewhere, as it does for a node without room); one that is nowhere is
/// NOT_FOUND. A source of another kind is INVALID_ARGUMENT.
fn resolve(d: &Driver, imp: &dyn VolumeKind, kind: Kind, s: &ContentSource) -> Result<Resolved> {
    let (what, id) = match s {
        ContentSource::Snapshot(id) => ("snapshot", id),
        ContentSource::Volume(id) => ("volume", id),
    };
    let found = match s {
        ContentSource::Snapshot(id) => match d.store.snapshot_get(id) {
            Some(r) => {
                (r.phase == Phase::Ready).then_some((r.kind, Resolved::Snapshot(Box::new(r))))
            }
            None => imp
                .confirm_snapshot(id)?
                .map(|r| (r.kind, Resolved::Snapshot(Box::new(r)))),
        },
        ContentSource::Volume(id) => match d.store.get(id) {
            Some(r) => (r.phase == Phase::Ready).then_some((r.kind, Resolved::Volume(r))),
            None => imp
                .confirm_from_id(id)?
                .map(|r| (r.kind, Resolved::Volume(r))),
        },
    };
    match found {
        Some((k, r)) if k == kind => Ok(r),
        Some((k, _)) => Err(Error::Invalid(format!(
            "source {what} {id} is a {k} {what}; a {kind} volume cannot be made from it"
        ))),
        None => match imp.node_tag_of(id) {
            Some(tag) if tag != node_tag(&d.node_id) => Err(Error::WrongNode(format!(
                "source {what} {id} lives on another node; a volume made from it is created there"
            ))),
            _ => Err(Error::NotFound(format!(
                "source {what} {id} does not exist"
            ))),
        },
    }
}

/// A spare id taken for this request (`VolumeKind::take_spare_id`),
/// given back when dropped unless the kind's `create` used it.
struct SpareId {
    kind: Arc<dyn VolumeKind>,
    id: String,
}

impl Drop for SpareId {
    fn drop(&mut self) {
        self.kind.spare_unused(&self.id);
    }
}

pub async fn handle(
    d: Arc<Driver>,
    req: csi::CreateVolumeRequest,
) -> Result<csi::CreateVolumeResponse> {
    validate::secrets(&req.secrets)?;
    let name = validate::name(&req.name)?.to_string();
    let caps = convert::capabilities(&req.volume_capabilities)?;
    let params = validate::map("parameters", &req.parameters)?;
    if !req.mutable_parameters.is_empty() {
        return Err(Error::Invalid(
            "mutable_parameters are not supported (no MODIFY_VOLUME capability)".into(),
        ));
    }
    let kind = kind_of(&d, &params)?;
    let imp = d.kind(kind)?;
    imp.check_parameters(&kind_parameters(&params))?;
    for c in &caps {
        imp.check_capability(c)?;
    }
    let source = content_source(req.volume_content_source.as_ref())?;
    if source.is_some() && !imp.snapshots() {
        return Err(Error::Invalid(format!(
            "{kind} volumes cannot be created from a snapshot or a volume"
        )));
    }
    let range = Range::from_proto(req.capacity_range.as_ref())?;
    // Node-local volumes are made on this node only. A request placed
    // elsewhere is RESOURCE_EXHAUSTED (the CO places the volume on another
    // node), unless the name exists: then it is a repeat, or ALREADY_EXISTS
    // when the volume does not satisfy the request (`compatible`), decided
    // under the name's guard in `create`.
    let (node, misplaced) = match kind {
        Kind::Nfs => (String::new(), None),
        Kind::Local | Kind::Block => (
            d.node_id.clone(),
            topology::placement(
                &d.topology_key,
                &d.node_id,
                req.accessibility_requirements.as_ref(),
            )
            .err(),
        ),
    };
    let misplaced = match misplaced {
        Some(e) if d.store.get_by_name(&name).is_none() => return Err(e),
        m => m,
    };
    // The id a new volume would get. Kinds with self-describing ids (NFS)
    // derive it from the name and parameters, so two names can ask for the
    // same id: it is guarded too.
    // A new volume without a source may take an id whose storage is made
    // already (the local kind's spare directories): given back when
    // dropped unless its create used it.
    let spare = (source.is_none() && d.store.get_by_name(&name).is_none())
        .then(|| imp.take_spare_id())
        .flatten()
        .map(|id| SpareId {
            kind: imp.clone(),
            id,
        });
    let id = match &spare {
        Some(s) => s.id.clone(),
        None => imp.id_for(&name, &params)?,
    };
    let mut guard = d.locks.try_lock(name_key(&name))?;
    guard.also(vol_key(&id))?;
    // The source may not go away (or change) while it is copied. Restores
    // only read a snapshot: those of one snapshot share its key and copy
    // side by side; its DeleteSnapshot, which holds it alone, waits.
    match &source {
        Some(ContentSource::Snapshot(s)) => guard.also_shared(snap_key(s))?,
        Some(ContentSource::Volume(v)) => guard.also(vol_key(v))?,
        None => {}
    }
    let r = Request {
        id,
        name,
        kind,
        caps,
        params,
        range,
        topology: match kind {
            Kind::Nfs => None,
            Kind::Local | Kind::Block => req.accessibility_requirements,
        },
        node,
        misplaced,
        source,
    };
    let rec = d
        .run_within(guard, imp.op_deadline(), move |d| {
            // Given back (or not, once used) under the guard.
            let _spare = spare;
            create(d, r)
        })
        .await?;
    Ok(csi::CreateVolumeResponse {
        volume: Some(volume::to_proto(&d, &rec)),
    })
}

fn compatible(d: &Driver, rec: &VolumeRecord, r: &Request) -> Result<()> {
    if !topology::satisfies(&d.topology_key, &rec.node, r.topology.as_ref()) {
        return Err(Error::Conflict(format!(
            "volume {} named {} exists on node {}, which is not among the requisite topologies ({}={})",
            rec.id,
            rec.name,
            rec.node,
            d.topology_key,
            r.topology
                .iter()
                .flat_map(|t| &t.requisite)
                .map(|t| t.segments.get(&d.topology_key).map_or("-", String::as_str))
                .collect::<Vec<_>>()
                .join(","),
        )));
    }
    let what = if rec.kind != r.kind {
        "kind"
    } else if !r.range.admits(rec.capacity_bytes) {
        "capacity"
    } else if !Capability::same_list(&rec.capabilities, &r.caps) {
        "volume capabilities"
    } else if *rec.parameters != r.params {
        "parameters"
    } else if *rec.node != *r.node {
        "topology"
    } else if rec.content_source() != r.source.as_ref() {
        "content source"
    } else {
        return Ok(());
    };
    Err(Error::Conflict(format!(
        "volume {} named {} exists with a different {what}",
        rec.id, rec.name
    )))
}

fn create(d: &Driver, mut r: Request) -> Result<VolumeRecord> {
    let imp = d.kind(r.kind)?.clone();
    if let Some(mut rec) = d.store.get_by_name(&r.name) {
        compatible(d, &rec, &r)?;
        match rec.phase {
            // A repeat: also finishes a move into place that failed after
            // the record said Ready (`VolumeKind::ready`).
            Phase::Ready => {
                imp.ready(&rec)?;
                return Ok(rec);
            }
            Phase::Deleting => {
                return Err(Error::Busy(format!(
                    "volume {} named {} is being deleted",
                    rec.id, rec.name
                )))
            }
            Phase::Creating => {
                make_storage(d, imp.as_ref(), &mut rec)?;
                d.store.set_phase(&mut rec, Phase::Ready)?;
                imp.ready(&rec)?;
                return Ok(rec);
            }
        }
    }
    // The name was found before its guard was taken and is gone now: a
    // new volume, which this node cannot make for this request.
    if let Some(e) = r.misplaced.take() {
        return Err(e);
    }
    let kparams = kind_parameters(&r.params);
    // A create of this name that a kill cut short between making its
    // storage durable as handed out and its Ready record, which start-up
    // held (a whole disk): this request is its retry, and gets that volume
    // back as it is. A request that differs makes a new volume.
    if let Some(mut rec) = imp.held_by_name(&r.name, &kparams) {
        rec.capabilities = r.caps.clone().into();
        if compatible(d, &rec, &r).is_ok() {
            imp.adopt_held(&rec)?;
            d.store.set_phase(&mut rec, Phase::Ready)?;
            imp.ready(&rec)?;
            return Ok(rec);
        }
    }
    imp.can_create(&kparams)?;
    // A restore or clone is at least as large as its source, and its
    // capabilities must be able to use the source's content.
    let (wanted, required) = match &r.source {
        Some(s) => {
            let src = resolve(d, imp.as_ref(), r.kind, s)?;
            imp.check_source(&r.id, &r.caps, src.as_source())?;
            if r.range.limit > 0 && r.range.limit < src.size() {
                return Err(Error::BadSize(format!(
                    "limit_bytes {} is less than the source's {} bytes",
                    r.range.limit,
                    src.size()
                )));
            }
            (
                r.range.size().max(src.size()),
                r.range.required.max(src.size()),
            )
        }
        None => (r.range.size(), r.range.required),
    };
    let size = imp.size_for(&kparams, &r.caps, wanted, required, r.range.limit)?;
    // From reading the free space until the promise is recorded, no thick
    // block file is allocated on it (`Store::space_shared`): the figure
    // admitted against is the one there is.
    let promises = imp.capacity_is_promise();
    let space = promises.then(|| d.store.space_shared());
    let pool = imp.capacity_for(&kparams)?;
    if size > pool.max_volume_bytes {
        return Err(Error::BadSize(format!(
            "{size} bytes is more than the largest volume this pool can hold ({} bytes)",
            pool.max_volume_bytes
        )));
    }
    let rec = VolumeRecord {
        id: r.id,
        name: r.name,
        kind: r.kind,
        seq: 0,
        phase: Phase::Creating,
        capacity_bytes: size,
        node: r.node.into(),
        parameters: r.params.into(),
        capabilities: r.caps.into(),
        context: Default::default(),
        published: Default::default(),
        created_unix: now_unix(),
        block: None,
        source: r.source.clone().map(|s| Box::new(s.into())),
        project: None,
        extra: None,
    };
    // Self-describing ids can name nested storage (an NFS subdirectory
    // inside another volume's): deleting one would touch the other. Checked
    // under the store's lock together with the insert, so two creates of
    // nested storage cannot both pass.
    // Looked up in the store's index of storage, so the check costs the
    // same with any number of volumes.
    let storage = crate::kinds::storage_key(rec.kind, &rec.id);
    let id = rec.id.clone();
    let conflicts = |a: &Admission<'_>| {
        if let Some(other) = a.get(&id) {
            return Err(Error::Conflict(format!(
                "volume {} named {} already uses the storage this request names",
                other.id, other.name
            )));
        }
        if let Some(key) = &storage {
            if let Some(other) = a.overlapping(key) {
                return Err(Error::Conflict(format!(
                    "volume {} named {} overlaps the storage this request names ({id})",
                    other.id, other.name
                )));
            }
        }
        Ok(())
    };
    // `written`: what the volumes still recorded wrote within their
    // promises, added to the free space (`VolumeKind::written_within_promises`).
    let admit = |a: &Admission<'_>, free: i64, written: &Written| {
        conflicts(a)?;
        let promised = if promises { a.promised } else { 0 };
        let free = free
            .saturating_add(written.of(|id| a.get(id).is_some()))
            .saturating_sub(promised);
        if size > free {
            Err(Error::NoSpace(format!(
                "not enough space: {size} bytes asked, {} bytes free",
                free.max(0)
            )))
        } else {
            Ok(())
        }
    };
    // With a durable intent, a crash before Ready is rolled back at start-up
    // from the record; without one, the kind recognises the orphan. A
    // restore or clone always writes one: its storage holds data from the
    // moment the copy is in place, and storage with data but no record is
    // kept aside at start-up (it could be a volume whose record was lost),
    // never removed; a Creating record says it was never handed out.
    let durable = imp.durable_intent() || rec.source.is_some();
    let admit_with = |rec: VolumeRecord, free: i64, written: &Written| {
        if durable {
            d.store.insert_new(rec, |a| admit(a, free, written))
        } else {
            d.store.reserve(rec, |a| admit(a, free, written))
        }
    };
    // Storage that must be reached first (an NFS share, mounted) is reached
    // before the record is written, and the record is written before
    // anything is made there: a create that cannot reach its storage (a
    // mount that fails or times out) leaves no record and has nothing to
    // roll back, so it costs one wait, not a second one for the rollback,
    // and the storage it names is free at once for the next request. A
    // request the records refuse is refused before that wait.
    d.store.check_admission(rec.kind, conflicts)?;
    d.check_journal_room()?;
    imp.reach(&rec)?;
    // The promises alone leave no room: a kind that holds its volumes to
    // their sizes adds back what they wrote (read before the free space
    // again), so what is left is the free space minus what the volumes may
    // still write. Never more than there is.
    let admitted =
        |rec: VolumeRecord, free: i64| match admit_with(rec.clone(), free, &Written::default()) {
            Err(Error::NoSpace(m)) => match imp.written_within_promises()? {
                w if w.total() == 0 => Err(Error::NoSpace(m)),
                written => admit_with(rec, imp.capacity_for(&kparams)?.free_bytes, &written),
            },
            r => r,
        };
    let mut rec = crate::background::after_space_freed(
        admitted(rec.clone(), pool.free_bytes),
        |e| matches!(e, Error::NoSpace(_)),
        || admitted(rec, imp.capacity_for(&kparams)?.free_bytes),
    )?;
    drop(space);
    if let Err(e) = make_storage(d, imp.as_ref(), &mut rec) {
        // Roll back; if that fails too, start-up reconciliation finishes it.
        if imp.rollback_create(&rec).is_ok() {
            let gone = if durable {
                d.store.remove(&rec.id).is_ok()
            } else {
                d.store.forget(&rec.id);
                true
            };
            if gone {
                imp.purge(&rec);
            }
        }
        return Err(e);
    }
    d.store.set_phase(&mut rec, Phase::Ready)?;
    imp.ready(&rec)?;
    Ok(rec)
}

/// Makes a recorded volume's storage: empty, or from its content source.
fn make_storage(d: &Driver, imp: &dyn VolumeKind, rec: &mut VolumeRecord) -> Result<()> {
    match rec.content_source().cloned() {
        None => imp.create(rec),
        Some(s) => {
            let src = resolve(d, imp, rec.kind, &s)?;
            imp.create_from(rec, src.as_source())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(Range::from_proto(None).unwrap().size(), DEFAULT_SIZE);
        let r = |req, lim| {
            Range::from_proto(Some(&csi::CapacityRange {
                required_bytes: req,
                limit_bytes: lim,
            }))
        };
        assert_eq!(r(10, 0).unwrap().size(), 10);
        assert_eq!(r(0, 10).unwrap().size(), 10);
        assert_eq!(r(0, 2 * DEFAULT_SIZE).unwrap().size(), DEFAULT_SIZE);
        assert!(matches!(r(11, 10), Err(Error::BadSize(_))));
        assert!(matches!(r(-1, 0), Err(Error::Invalid(_))));
        let x = r(10, 20).unwrap();
        assert!(x.admits(10) && x.admits(20) && !x.admits(21) && !x.admits(9));
    }
}
