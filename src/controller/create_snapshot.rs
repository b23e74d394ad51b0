//! CreateSnapshot: idempotent by name (the same name with another source is
//! ALREADY_EXISTS). The record is written (phase Creating) before the copy
//! is made and marked Ready once the copy is complete and durable, so a
//! snapshot is never reported ready before it is, and one interrupted by a
//! crash is removed at start-up. The source volume's guard is held for the
//! whole copy (it cannot be deleted or expanded meanwhile). Kinds whose
//! snapshot ids say where the snapshot lives (NFS) derive the id from the
//! name and the source (its guard is held too), and a source volume with
//! such an id and no record here is found from its storage. A source
//! recorded here whose kind (or NFS share) is no longer served is
//! FAILED_PRECONDITION (`Driver::unserved`).
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use super::snapshot::{self, snap_key, snap_name_key};
use crate::csi::v1 as csi;
use crate::driver::{vol_key, Driver};
use crate::error::{Error, Result};
use crate::state::{Phase, SnapshotRecord};
use crate::validate;

/// Parameter keys the external-snapshotter adds (`--extra-create-metadata`);
/// VolumeSnapshotClasses of Berth take no other parameter.
const CO_PREFIX: &str = "csi.storage.k8s.io/";

pub async fn handle(
    d: Arc<Driver>,
    req: csi::CreateSnapshotRequest,
) -> Result<csi::CreateSnapshotResponse> {
    validate::secrets(&req.secrets)?;
    snapshot::require(&d)?;
    let name = validate::name(&req.name)?.to_string();
    if req.source_volume_id.is_empty() {
        return Err(Error::Invalid("source_volume_id is required".into()));
    }
    let source = validate::volume_id(&req.source_volume_id)?.to_string();
    let params = validate::map("parameters", &req.parameters)?;
    if let Some(k) = params.keys().find(|k| !k.starts_with(CO_PREFIX)) {
        return Err(Error::Invalid(format!(
            "unknown snapshot parameter {:?} (VolumeSnapshotClass parameters of Berth: none)",
            k.chars().take(64).collect::<String>()
        )));
    }
    // A source recorded here whose kind (or NFS share) this configuration
    // no longer serves exists: not NOT_FOUND nor INVALID_ARGUMENT, and
    // nothing is copied.
    if let Some(why) = d.unserved(&source) {
        return Err(Error::WrongState(why));
    }
    let derived = match d.kind_of_id(&source) {
        Some(k) => k.snapshot_id_for(&name, &source)?,
        None => None,
    };
    let mut guard = d.locks.try_lock(snap_name_key(&name))?;
    guard.also(vol_key(&source))?;
    if let Some(id) = &derived {
        guard.also(snap_key(id))?;
    }
    let deadline = d.kind_of_id(&source).and_then(|k| k.op_deadline());
    let snap = d
        .run_within(guard, deadline, move |d| {
            create(d, name, source, derived, params).map(|s| snapshot::to_proto_checked(d, &s))
        })
        .await?;
    Ok(csi::CreateSnapshotResponse {
        snapshot: Some(snap),
    })
}

fn create(
    d: &Driver,
    name: String,
    source: String,
    derived: Option<String>,
    params: BTreeMap<String, String>,
) -> Result<SnapshotRecord> {
    if let Some(s) = d.store.snapshot_by_name(&name) {
        if s.source_volume_id != source {
            return Err(Error::Conflict(format!(
                "snapshot {} named {name} exists of another volume ({})",
                s.id, s.source_volume_id
            )));
        }
        match s.phase {
            Phase::Ready => {
                // A retry of a create whose answer was an error after its
                // record said Ready: the copy may still have to move.
                d.kind(s.kind)?.snapshot_ready(&s)?;
                return Ok(s);
            }
            Phase::Deleting => {
                return Err(Error::Busy(format!(
                    "snapshot {} named {name} is being deleted",
                    s.id
                )))
            }
            // An earlier attempt failed half way: its copy is removed and
            // made again below, under the same id.
            Phase::Creating => {}
        }
    }
    let missing = || Error::NotFound(format!("source volume {source} does not exist"));
    let vol = match d.store.get(&source) {
        Some(v) if v.phase == Phase::Ready => v,
        Some(_) => return Err(missing()),
        // A self-describing id without a record: its storage says.
        None => d.controller_volume(&source)?,
    };
    d.require_local_here(&vol)?;
    let kind = d.kind(vol.kind)?.clone();
    if !kind.snapshots() {
        return Err(Error::Invalid(format!(
            "{} volumes have no snapshots",
            vol.kind
        )));
    }
    d.check_journal_room()?;
    let mut rec = match d.store.snapshot_by_name(&name) {
        Some(s) => {
            kind.rollback_snapshot(&s)?;
            s
        }
        None => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            let rec = SnapshotRecord {
                id: derived.unwrap_or_else(|| kind.new_snapshot_id()),
                name,
                kind: vol.kind,
                seq: 0,
                phase: Phase::Creating,
                source_volume_id: source,
                size_bytes: vol.capacity_bytes,
                node: vol.node.to_string(),
                parameters: params,
                created_secs: i64::try_from(now.as_secs()).unwrap_or(i64::MAX),
                created_nanos: i32::try_from(now.subsec_nanos()).unwrap_or(0),
                block: None,
                file_bytes: None,
                extra: None,
            };
            d.store.snapshot_insert_new(rec, |_| Ok::<(), Error>(()))?
        }
    };
    if let Err(e) = kind.create_snapshot(&vol, &mut rec) {
        // Roll back; if that fails too, start-up finishes it.
        if kind.rollback_snapshot(&rec).is_ok() {
            let _ = d.store.snapshot_remove(&rec.id);
        }
        return Err(e);
    }
    rec.phase = Phase::Ready;
    d.store.snapshot_put(&rec)?;
    kind.snapshot_ready(&rec)?;
    Ok(rec)
}
