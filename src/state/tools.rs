//! Operator tools: `berth state check`, `berth state export`, `berth state
//! repair` and `berth state release`.
//!
//! - `check` changes nothing: it reads the journal (every flaw, with file,
//!   line and byte), and compares the records with what is on disk: a
//!   volume's directory, backing file or pool disk that is missing or not
//!   what the record says, a snapshot's copy that is missing or damaged,
//!   loop devices of Berth's files without a record, storage without a
//!   record (orphans) and what was moved aside. It takes no lock, so it
//!   can run next to a serving berth; there it reads everything again a
//!   few times and reports only what every reading found, as an operation
//!   in flight shows in one reading as a finding that is not there.
//! - `export` prints every readable record as one JSON document, for backup
//!   and support; damage is listed in it and makes the exit code 1.
//! - `repair` is the operator's decision to drop what is damaged in the
//!   journal: it takes the state directory's lock (berth must be stopped),
//!   copies every journal file into `journal/damaged-<time>/` (and moves
//!   there what is named as one but is not a regular file), writes the
//!   readable records as a new snapshot, takes every other journal file
//!   out (the old generation, logs newer than it), and prints what was
//!   dropped. Afterwards the journal has no flaw `check` reports.
//! - `release` is the operator's decision to end the hold of a pool disk
//!   (`held-<id>`, see `block::hold_disk`) once what it held is saved: the
//!   next start-up erases the disk, then offers it again.
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use serde::Serialize;

use super::journal::{self, Scan};
use super::lock::DirLock;
use super::snapshot_file::Writer as SnapshotWriter;
use super::store::{journal_dir, IdRules};
use super::{legacy, Kind, Phase, SnapshotRecord, StateError, VolumeRecord};
use crate::config::Config;
use crate::os::files::{Files, Open};
use crate::os::{Os, OsError};

#[derive(Debug, Clone, Args)]
pub struct StateArgs {
    #[command(subcommand)]
    pub tool: StateTool,
}

#[derive(Debug, Clone, Subcommand)]
pub enum StateTool {
    /// Check the journal and the records against what is on disk; changes
    /// nothing. Exit code 1 when something is wrong.
    Check,
    /// Print every record as JSON (for backup and support).
    Export,
    /// Drop the damaged lines of a damaged journal, keeping every readable
    /// record (berth must be stopped; the damaged files are kept).
    Repair,
    /// Release a pool disk that start-up held (`check` names it and its
    /// hold's id), once what it holds is saved: berth erases it (as
    /// --disk-wipe says) and returns it to the pool (berth must be stopped).
    Release {
        /// The hold's id (`held-...`), as `check` prints it.
        id: String,
    },
}

/// One finding of `check`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// "error" (acknowledged data at risk or state damaged) or "warning".
    pub severity: &'static str,
    pub what: String,
}

fn error(what: String) -> Finding {
    Finding {
        severity: "error",
        what,
    }
}

fn warning(what: String) -> Finding {
    Finding {
        severity: "warning",
        what,
    }
}

/// Every tool first checks that `state_dir` holds berth's state (its
/// journal, or records of the one-file-per-volume layout): a directory
/// named by mistake (a typo in `--data-dir`, `--state-dir` set to the data
/// directory) would otherwise read as an empty state, which `check` calls
/// sound and `export` backs up, and `repair` and `release` would write a
/// lock file and a journal into it. Only what is not there is absent: a
/// directory that cannot be looked at (`EACCES`: a tool run by a user who
/// is not root on berth's 0700 state directory; `EIO`) is an error naming
/// it and the cause, never "holds no berth state", which sent the
/// operator looking for another directory.
fn require_state(files: &dyn Files, state_dir: &Path) -> Result<(), StateError> {
    let has = |p: PathBuf| match files.lstat(&p) {
        Ok(m) => Ok(m.is_dir()),
        Err(e) if matches!(e.errno(), Some(libc::ENOENT | libc::ENOTDIR)) => Ok(false),
        Err(e) => Err(StateError::Os(e)),
    };
    if has(journal_dir(state_dir))? || has(legacy::dir(state_dir))? {
        Ok(())
    } else {
        Err(StateError::NoState {
            dir: state_dir.to_path_buf(),
        })
    }
}

/// Reads the journal and the old layout without changing anything: the
/// records start-up would load, and what is wrong.
fn read_records(
    files: &dyn Files,
    state_dir: &Path,
) -> Result<(Scan, Vec<VolumeRecord>), StateError> {
    let scan = journal::scan(files, &journal_dir(state_dir))?;
    let mut legacy = legacy::load(files, state_dir)?;
    legacy.retain(|r| !scan.records.contains_key(&r.id));
    Ok((scan, legacy))
}

fn journal_findings(scan: &Scan, legacy: usize, out: &mut Vec<Finding>) {
    for d in &scan.damage {
        out.push(error(format!("journal damaged: {d}")));
    }
    if let Some(t) = &scan.torn {
        out.push(warning(format!(
            "journal {}: the last {} bytes (from byte {}) are an interrupted write, never acknowledged; start-up cuts them off and keeps them beside the log",
            scan.dir.join(journal::log_name(scan.gen)).display(),
            t.len,
            t.offset
        )));
    }
    if scan.unterminated {
        out.push(warning(format!(
            "journal {}: its last change lacks its newline; the change is whole (its checksum holds) and is kept: start-up ends its line",
            scan.dir.join(journal::log_name(scan.gen)).display()
        )));
    }
    if legacy > 0 {
        out.push(warning(format!(
            "{legacy} records of the one-file-per-volume layout will be imported at start-up"
        )));
    }
}

/// Why the configuration checked does not serve the volume `r` (as
/// `Driver::unserved` answers its calls): its kind is not in `--kinds`, or
/// its NFS share not in `--nfs-allowed-shares`.
fn unserved(cfg: &Config, r: &VolumeRecord) -> Option<String> {
    if !crate::kinds::is_volume_id_of(r.kind, &r.id) {
        return None;
    }
    unserved_by(cfg, r.kind, "volume", || {
        crate::kinds::nfs::id::VolumeId::parse(&r.id)
            .ok()
            .map(|v| (v.server, v.share))
    })
}

/// `unserved` for a snapshot record (as `Driver::unserved_snapshot`
/// answers its calls).
fn unserved_snapshot(cfg: &Config, s: &SnapshotRecord) -> Option<String> {
    unserved_by(cfg, s.kind, "snapshot", || {
        crate::kinds::nfs::id::SnapshotId::parse(&s.id)
            .ok()
            .map(|id| (id.server, id.share))
    })
}

/// Why the configuration does not serve a `what` of `kind`: the kind is
/// not in `--kinds`, or, NFS, its share (`share`: server and path, from its
/// id) is not in `--nfs-allowed-shares`.
fn unserved_by(
    cfg: &Config,
    kind: Kind,
    what: &str,
    share: impl FnOnce() -> Option<(String, String)>,
) -> Option<String> {
    if !cfg.serves(kind) {
        return Some(format!(
            "a {kind} {what}, and --kinds does not include {kind}"
        ));
    }
    if kind == Kind::Nfs {
        let (server, share) = share()?;
        let allowed = crate::kinds::nfs::allow::AllowedShares(cfg.nfs_allowed_shares.clone());
        if !allowed.permits(&server, &share) {
            return Some(format!(
                "on share {server}:{share}, which --nfs-allowed-shares does not allow"
            ));
        }
    }
    None
}

/// Compares the records with the storage they name, and looks for storage
/// without a record.
pub fn storage_findings(cfg: &Config, os: &Os, records: &[VolumeRecord]) -> Vec<Finding> {
    let mut out = Vec::new();
    let by_id: BTreeMap<&str, &VolumeRecord> = records.iter().map(|r| (r.id.as_str(), r)).collect();
    let local_root = cfg.local_root();
    let block_root = cfg.block_root();
    let own_dirs = cfg.own_dirs();
    let serves_block = cfg.serves(Kind::Block);
    let files = os.files.as_ref();
    // `.trash` is listed once, when first needed: where an interrupted
    // delete left a volume's directory, and what a flag keeps there.
    let trash = local_root.join(".trash");
    let mut trash_names: Option<Vec<String>> = None;
    for r in records {
        // A disk no record makes Berth's: never erased (`outside_pool`).
        if let Some(d) = r.block.as_ref().and_then(|b| b.disk.as_ref()) {
            let own = crate::kinds::block::OwnFiles::new(files, &block_root, &own_dirs);
            let found = crate::kinds::block::identify_disk(os, &own, d);
            if let Some(why) = found
                .ok()
                .filter(|_| serves_block)
                .and_then(|dev| crate::kinds::block::outside_pool(os, &cfg.disk_pool, &dev))
            {
                out.push(error(format!("volume {} ({}): {why}", r.id, r.name)));
            }
            if let Some(why) = crate::kinds::block::weak_identity(os, d) {
                out.push(warning(format!("volume {} ({}): {why}", r.id, r.name)));
            }
        }
        if r.id.starts_with("wipe-") {
            let disk = r.block.as_ref().and_then(|b| b.disk.as_ref());
            out.push(warning(format!(
                "disk {} was missing when its volume was deleted: it stays out of the pool until it is back and erased",
                disk.map(|d| d.by_id.as_deref().unwrap_or(&d.path).display().to_string())
                    .unwrap_or_default()
            )));
            continue;
        }
        if r.id.starts_with(crate::kinds::block::HELD_PREFIX) {
            let vol = crate::kinds::block::held_volume(&r.id)
                .and_then(|id| by_id.get(id.as_str()).copied());
            if vol.is_some_and(|v| crate::kinds::block::hold_taken_back(r, v)) {
                out.push(warning(format!(
                    "{} is left beside the Ready record of its volume {}, which was taken back from it with the same disk (the journal write that ends the hold failed): start-up removes it",
                    r.id,
                    vol.map(|v| v.id.as_str()).unwrap_or_default()
                )));
            } else {
                let mut finding = crate::kinds::block::held_disk_finding(r);
                // A hold bearing the id of a volume that has a record of
                // its own, unlike it: that volume's DeleteVolume is
                // refused while the hold is there.
                if let Some((v, what)) =
                    vol.and_then(|v| crate::kinds::block::hold_differs(r, v).map(|what| (v, what)))
                {
                    finding.push_str(&format!(
                        ". Volume {} ({}) has a record of its own, yet this hold bears its id and {what}: another claimant may own its disk, so its DeleteVolume is refused (nothing erased) while this hold is there",
                        v.id, v.name
                    ));
                }
                out.push(error(finding));
            }
            continue;
        }
        if let Some(why) = unserved(cfg, r) {
            out.push(warning(format!(
                "volume {} ({}): {why}; berth keeps it and its storage, and every call naming it fails saying so until it is served again",
                r.id, r.name
            )));
        }
        if r.phase != Phase::Ready {
            out.push(warning(format!(
                "volume {} ({}) is {:?}: an operation was interrupted; start-up finishes it",
                r.id, r.name, r.phase
            )));
            if let Some(d) = unanswered_disk(r) {
                let disk = d.by_id.as_deref().unwrap_or(&d.path).display();
                let what = if r.source.is_some() {
                    "restore or clone"
                } else {
                    "create"
                };
                let marker = crate::kinds::block::disk_marker(&block_root, &r.id);
                let legacy = r.block.as_ref().is_none_or(|b| !b.marker);
                let held = crate::kinds::block::held_id(&r.id);
                if legacy
                    || by_id.contains_key(held.as_str())
                    || crate::kinds::block::disk_marked(os.files.as_ref(), &block_root, &r.id)
                {
                    let why = if legacy {
                        "its record predates disk markers, so nothing tells whether it got as far as its Ready record".to_string()
                    } else if by_id.contains_key(held.as_str()) {
                        format!("its disk is held already ({held})")
                    } else {
                        format!(
                            "yet it got as far as its Ready record ({} is there)",
                            marker.display()
                        )
                    };
                    out.push(error(format!(
                        "volume {} ({}): its {what} onto disk {disk} never answered, {why}: was its Ready record lost? start-up holds the disk, never erases it nor offers it to a new volume",
                        r.id,
                        r.name,
                    )));
                } else {
                    let then = if r.source.is_some() {
                        "erases the disk and returns it to the pool"
                    } else {
                        "returns the disk to the pool (nothing was written to it)"
                    };
                    out.push(warning(format!(
                        "volume {} ({}): its {what} onto disk {disk} never reached its Ready record (no {}), so it was never handed out; start-up {then}",
                        r.id,
                        r.name,
                        marker.display()
                    )));
                }
            }
            if let Some(f) =
                unanswered_create_with_data(files, &local_root, &block_root, r, &mut out)
            {
                out.push(error(format!(
                    "volume {} ({}): its create never answered, yet {} holds data (was its Ready record lost?); start-up keeps it aside in .orphaned, never deletes it",
                    r.id,
                    r.name,
                    f.display()
                )));
            }
            continue;
        }
        match r.kind {
            Kind::Local => {
                let dir = crate::kinds::local::volume_dir(&local_root, &r.id);
                match files.lstat(&dir).map_err(OsError::into_io) {
                    Ok(m) if m.is_dir() => {
                        if let Some(why) = crate::kinds::local::made_by_hand(
                            os.files.as_ref(),
                            &r.id,
                            r.created_unix,
                            &dir,
                            &m,
                        ) {
                            out.push(warning(format!("volume {} ({}): {why}", r.id, r.name)));
                        }
                    }
                    Ok(_) => out.push(error(format!(
                        "volume {} ({}): {} is not a directory",
                        r.id,
                        r.name,
                        dir.display()
                    ))),
                    Err(e) => {
                        // Where an interrupted create or delete left it.
                        let creating = local_root.join(".creating").join(&*r.id);
                        let trash_prefix = format!("{}-", r.id);
                        let trashed = trash_names
                            .get_or_insert_with(|| names_in(files, &trash, TRASH_UNSEEN, &mut out))
                            .iter()
                            .find(|n| n.starts_with(&trash_prefix))
                            .cloned();
                        let unknown = "whether an interrupted create left the volume's directory there is not known";
                        if looked_at(files.stat(&creating), &creating, unknown, &mut out)
                            .is_some_and(|m| m.is_dir())
                        {
                            out.push(warning(format!(
                                "volume {} ({}): its directory is still in {} (a create interrupted after its record said Ready); start-up moves it into place",
                                r.id,
                                r.name,
                                creating.display()
                            )));
                        } else if let Some(t) = trashed {
                            out.push(warning(format!(
                                "volume {} ({}): its directory is in {} (a delete interrupted before its record was removed); start-up puts it back",
                                r.id,
                                r.name,
                                trash.join(t).display()
                            )));
                        } else {
                            out.push(error(format!(
                                "volume {} ({}): its directory {} is missing ({e})",
                                r.id,
                                r.name,
                                dir.display()
                            )));
                        }
                    }
                }
            }
            Kind::Block => match r.block.as_ref().and_then(|b| b.disk.as_ref()) {
                Some(d) => {
                    // The rule the block kind uses (`identify_disk`).
                    let own = crate::kinds::block::OwnFiles::new(files, &block_root, &own_dirs);
                    if let Err(e) = crate::kinds::block::identify_disk(os, &own, d) {
                        out.push(error(format!("volume {} ({}): {e}", r.id, r.name)));
                    }
                }
                None => {
                    let f = crate::kinds::block::volume_file(&block_root, &r.id);
                    let restoring = crate::kinds::block::restoring_path(&block_root, &r.id);
                    match files.lstat(&f).map_err(OsError::into_io) {
                        Ok(m) if m.file_type().is_file() => {
                            let made = r.block.as_ref().and_then(|b| b.file_bytes);
                            if let Some(made) = made.filter(|&made| m.len() < made) {
                                out.push(error(format!(
                                    "volume {} ({}): {}",
                                    r.id,
                                    r.name,
                                    crate::kinds::block::cut_short(&r.id, &f, m.len(), made)
                                )));
                            } else if (m.len() as i64) < r.capacity_bytes {
                                out.push(warning(format!(
                                    "volume {} ({}): {} has {} bytes, less than the recorded {} (an interrupted expansion; the next stage grows it)",
                                    r.id, r.name, f.display(), m.len(), r.capacity_bytes
                                )));
                            }
                        }
                        Ok(_) => out.push(error(format!(
                            "volume {} ({}): {} is not a regular file",
                            r.id,
                            r.name,
                            f.display()
                        ))),
                        Err(_)
                            if looked_at(
                                files.stat(&restoring),
                                &restoring,
                                "whether an interrupted restore left the volume's file there is not known",
                                &mut out,
                            )
                            .is_some_and(|m| m.is_file()) =>
                        {
                            out.push(warning(format!(
                                "volume {} ({}): its file is still {} (a restore interrupted after its record said Ready); start-up moves it into place",
                                r.id,
                                r.name,
                                restoring.display()
                            )))
                        }
                        Err(e) => out.push(error(format!(
                            "volume {} ({}): its backing file {} is missing ({e})",
                            r.id,
                            r.name,
                            f.display()
                        ))),
                    }
                }
            },
            Kind::Nfs => {}
        }
    }
    // Storage without a record.
    if cfg.serves(Kind::Local) {
        for name in names_in(files, &local_root, ROOT_UNSEEN, &mut out) {
            if is_volume_id("local-", &name) && !by_id.contains_key(name.as_str()) {
                // Creates make their directories under .creating/: one in
                // the root without a record lost its record.
                out.push(error(format!(
                    "{} {LOST_RECORD}",
                    local_root.join(&name).display()
                )));
            }
        }
        let names = match trash_names.take() {
            Some(names) => names,
            None => names_in(files, &trash, TRASH_UNSEEN, &mut out),
        };
        out.extend(locked_trash(files, &trash, names, &by_id));
    }
    if cfg.serves(Kind::Block) {
        for name in names_in(files, &block_root, ROOT_UNSEEN, &mut out) {
            if let Some(id) = name.strip_suffix(".img") {
                if is_volume_id("block-", id) && !by_id.contains_key(id) {
                    out.push(error(format!(
                        "{} {LOST_RECORD}",
                        block_root.join(&name).display()
                    )));
                }
            }
        }
        let markers = block_root.join(crate::kinds::block::DISK_MARKERS);
        let unseen = "disk markers without a record of their volume are not looked for";
        for id in names_in(files, &markers, unseen, &mut out) {
            let held = crate::kinds::block::held_id(&id);
            if is_volume_id("block-", &id)
                && !by_id.contains_key(id.as_str())
                && !by_id.contains_key(held.as_str())
            {
                out.push(warning(format!(
                    "disk marker {} has no record of its volume (a delete, or a failed create, stopped after its record was removed); start-up removes it",
                    markers.join(&id).display()
                )));
            }
        }
        match os.loops.list() {
            // Not "no loop device": nothing read is not nothing found.
            Err(e) => out.push(error(format!(
                "the loop devices cannot be listed ({}): loop devices attached to berth's files without a record are not looked for",
                crate::error::chain(&e)
            ))),
            Ok(loops) => for l in loops
                .iter()
                .filter(|l| l.backing_file.starts_with(&block_root))
            {
                let id = l
                    .backing_file
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(".img"));
                if !id.is_some_and(|id| by_id.contains_key(id)) || l.backing_deleted {
                    out.push(warning(format!(
                        "loop device {} is attached to {}{} without a record",
                        l.device.display(),
                        l.backing_file.display(),
                        if l.backing_deleted { " (deleted)" } else { "" }
                    )));
                }
            },
        }
    }
    for root in [&local_root, &block_root] {
        let aside = root.join(".orphaned");
        let unseen = "what was moved aside into it is not counted";
        let n = names_in(files, &aside, unseen, &mut out).len();
        if n > 0 {
            out.push(warning(format!(
                "{} holds {n} entries moved aside (storage found without a record; never deleted by berth)",
                aside.display()
            )));
        }
    }
    out
}

/// The trash entries of deleted local volumes (no record) that an
/// immutable or append-only entry keeps from being removed (a tenant's
/// `chattr +i`/`+a` in its volume): each with the entry, its flag and the
/// commands an operator runs (`Locks::note`). Berth never clears the flag,
/// so such an entry stays (its space, and its quota project, held) until
/// an operator does; before 2026-12-07 only berth's log said so, at each
/// start. Looks at the first `LOCKED_BUDGET` entries of each.
/// `names`: what `trash` holds (`names_in`).
fn locked_trash(
    files: &dyn Files,
    trash: &Path,
    names: Vec<String>,
    by_id: &BTreeMap<&str, &VolumeRecord>,
) -> Vec<Finding> {
    let mut out = Vec::new();
    for name in names {
        let id = if is_volume_id("local-", &name) {
            name.as_str()
        } else {
            name.rsplit_once('-').map_or(name.as_str(), |(id, _)| id)
        };
        if by_id.contains_key(id) {
            continue;
        }
        let entry = trash.join(&name);
        let found = crate::os::files::find_locked(files, &entry, LOCKED_BUDGET);
        if let Some((at, locks)) = found.locked {
            out.push(warning(format!(
                "{} (the directory of the deleted volume {id}) stays in the trash: {}; once it is cleared, berth's next start removes the entry (until then its space and its quota project stay held)",
                entry.display(),
                locks.note(&at)
            )));
        } else if let Some((at, e)) = found.unread {
            // Not "no flag there": nothing read is not nothing found.
            out.push(unlooked(&at, &e, &format!(
                "whether an immutable or append-only flag there keeps {} (the directory of the deleted volume {id}) in the trash is not known",
                entry.display()
            )));
        }
    }
    out
}

/// How many entries of one trash entry `locked_trash` looks at.
const LOCKED_BUDGET: usize = 100_000;

/// The storage of a volume whose plain create never answered that its
/// rollback keeps aside instead of deleting (`block::kept_on_rollback`,
/// `local::kept_on_rollback`: it may hold a tenant's data). Storage that
/// cannot be looked at is an error finding in `out` (`looked_at`).
fn unanswered_create_with_data(
    files: &dyn Files,
    local_root: &Path,
    block_root: &Path,
    r: &VolumeRecord,
    out: &mut Vec<Finding>,
) -> Option<PathBuf> {
    let unknown =
        "whether the unanswered create left data there (which start-up keeps aside) is not known";
    match r.kind {
        Kind::Block if r.block.as_ref().is_none_or(|b| b.disk.is_none()) => {
            let f = crate::kinds::block::volume_file(block_root, &r.id);
            let m = looked_at(files.lstat(&f), &f, unknown, out)?;
            (m.is_file() && crate::kinds::block::kept_on_rollback(files, r, &f)).then_some(f)
        }
        Kind::Local => {
            let dir = crate::kinds::local::volume_dir(local_root, &r.id);
            let m = looked_at(files.lstat(&dir), &dir, unknown, out)?;
            (m.is_dir() && crate::kinds::local::kept_on_rollback(files, r, &dir)).then_some(dir)
        }
        _ => None,
    }
}

/// The disk of a disk volume whose create (plain, restore or clone) never
/// answered: start-up holds it if the volume's marker says it got as far
/// as its Ready record (`BlockKind::hold_disk`), and erases or releases it
/// otherwise.
fn unanswered_disk(r: &VolumeRecord) -> Option<&crate::state::DiskRef> {
    (r.kind == Kind::Block && r.phase == Phase::Creating)
        .then(|| r.block.as_ref().and_then(|b| b.disk.as_ref()))
        .flatten()
}

/// Compares the snapshot records with their stored copies (local and block
/// snapshots; NFS snapshots live on their share): a copy that is missing,
/// not what Berth made there (a symlink: a restore never follows it), or
/// a block snapshot's file not as long as it was made is an error, as a
/// restore from it is refused.
pub fn snapshot_findings(
    cfg: &Config,
    files: &dyn Files,
    snapshots: &[&SnapshotRecord],
) -> Vec<Finding> {
    let mut out = Vec::new();
    let local_root = cfg.local_root();
    let block_root = cfg.block_root();
    for s in snapshots {
        if let Some(why) = unserved_snapshot(cfg, s) {
            out.push(warning(format!(
                "snapshot {} ({}): {why}; berth keeps it and its copy, and every call naming it fails saying so (a restore from it is refused) until it is served again",
                s.id, s.name
            )));
        }
        let kept = match s.kind {
            Kind::Local => crate::kinds::local::snapshot_kept_on_rollback(files, &local_root, s),
            Kind::Block => crate::kinds::block::snapshot_kept_on_rollback(files, &block_root, s),
            Kind::Nfs => Ok(None),
        };
        let kept = match kept {
            Ok(kept) => kept,
            Err(e) => {
                out.push(error(format!(
                    "snapshot {} ({}) of volume {}: its create never answered, and whether its copy is whole cannot be told: {}; start-up's rollback stops for it (nothing removed) until it can look",
                    s.id,
                    s.name,
                    s.source_volume_id,
                    crate::error::chain(&e)
                )));
                continue;
            }
        };
        if let Some(whole) = kept {
            out.push(error(format!(
                "snapshot {} ({}) of volume {}: its create never answered, yet its copy {} is whole (was its Ready record lost?); start-up keeps it aside in .orphaned, never deletes it",
                s.id,
                s.name,
                s.source_volume_id,
                whole.display()
            )));
            continue;
        }
        if s.phase != Phase::Ready {
            out.push(warning(format!(
                "snapshot {} ({}) is {:?}: an operation was interrupted; start-up removes it",
                s.id, s.name, s.phase
            )));
            continue;
        }
        let (flaw, partial) = match s.kind {
            Kind::Local => (
                crate::kinds::local::snapshot_copy_flaw(files, &local_root, s),
                Some(crate::kinds::local::snapshot_partial_dir(
                    &local_root,
                    &s.id,
                )),
            ),
            Kind::Block => (
                crate::kinds::block::snapshot_copy_flaw(files, &block_root, s),
                Some(crate::kinds::block::snapshot_partial_path(
                    &block_root,
                    &s.id,
                )),
            ),
            Kind::Nfs => (None, None),
        };
        // A missing copy may still be under its partial name.
        let unknown = "whether an interrupted snapshot left the copy there is not known";
        let still_partial = match (&flaw, partial) {
            (Some(crate::kinds::CopyFlaw::Missing { .. }), Some(p)) => {
                looked_at(files.stat(&p), &p, unknown, &mut out).map(|_| p)
            }
            _ => None,
        };
        if let Some(p) = still_partial {
            out.push(warning(format!(
                "snapshot {} ({}): its copy is still {} (a snapshot interrupted after its record said Ready); start-up moves it into place",
                s.id,
                s.name,
                p.display()
            )));
        } else if let Some(flaw) = flaw {
            out.push(error(format!(
                "snapshot {} ({}) of volume {}: its copy is {}: {flaw}; a restore from it is refused",
                s.id,
                s.name,
                s.source_volume_id,
                flaw.state()
            )));
        }
    }
    // Copies without a record (the record lost, or cut off a journal):
    // start-up keeps them aside, as it does a volume's storage without one.
    let known: std::collections::HashSet<&str> = snapshots.iter().map(|s| s.id.as_str()).collect();
    let areas = [
        (
            Kind::Local,
            local_root.join(".snapshots"),
            "local-snap-",
            "",
        ),
        (
            Kind::Block,
            block_root.join(".snapshots"),
            "block-snap-",
            ".img",
        ),
    ];
    for (kind, area, prefix, suffix) in areas {
        if !cfg.serves(kind) {
            continue;
        }
        let unseen = "snapshot copies in it without a record are not looked for";
        for name in names_in(files, &area, unseen, &mut out) {
            let id = name.strip_suffix(suffix).unwrap_or(&name);
            if is_volume_id(prefix, id) && !known.contains(id) {
                out.push(warning(format!(
                    "{} is a snapshot's copy without a record (its record was lost): start-up moves it aside to .orphaned, never deletes it; no VolumeSnapshot can use it",
                    area.join(&name).display()
                )));
            }
        }
    }
    out
}

/// What `check`, `export` and `repair` say of a volume record whose id
/// is not one of its kind (`store::SetAside`), None for one whose id is.
fn volume_id_flaw(r: &VolumeRecord) -> Option<String> {
    let why = (IdRules::KINDS.volume)(r.kind, &r.id)?;
    Some(format!(
        "volume record {:?} ({}, {:?}) in the journal: its id is {why}: not written by berth (forged by hand, or damaged where no checksum tells); berth never acts on it and keeps it as is; `berth state repair` (berth stopped) drops it",
        r.id, r.kind, r.phase
    ))
}

/// `volume_id_flaw` of a snapshot record.
fn snapshot_id_flaw(r: &SnapshotRecord) -> Option<String> {
    let why = (IdRules::KINDS.snapshot)(r.kind, &r.id)?;
    Some(format!(
        "snapshot record {:?} ({}, {:?}) in the journal: its id is {why}: not written by berth (forged by hand, or damaged where no checksum tells); berth never acts on it and keeps it as is; `berth state repair` (berth stopped) drops it",
        r.id, r.kind, r.phase
    ))
}

/// What `check` sees at `path` (`looked`: its stat or lstat): its
/// metadata, or None when it is not there (ENOENT). One that cannot be
/// looked at (EIO, EACCES) is None too, and an error finding naming it,
/// the cause and what is therefore `unknown`, never "not there" (before
/// 2026-12-07 such an error read as nothing there: `.creating/<id>`, a
/// restore's file, a snapshot's partial copy, the storage of a create
/// that never answered).
fn looked_at(
    looked: Result<std::fs::Metadata, OsError>,
    path: &Path,
    unknown: &str,
    out: &mut Vec<Finding>,
) -> Option<std::fs::Metadata> {
    match looked {
        Ok(m) => Some(m),
        Err(e) if e.errno() == Some(libc::ENOENT) => None,
        Err(e) => {
            out.push(unlooked(path, &e.into_io(), unknown));
            None
        }
    }
}

/// The error finding of `path`, which `check` could not look at
/// (`cause`), saying what is therefore `unknown`.
fn unlooked(path: &Path, cause: &dyn std::fmt::Display, unknown: &str) -> Finding {
    error(format!(
        "{} cannot be looked at ({cause}): {unknown}",
        path.display()
    ))
}

/// What `check` says of a volume's storage found without a record.
const LOST_RECORD: &str = "has no record: its record was lost (berth does not start while it is there; with --allow-missing-storage start-up keeps it aside in .orphaned, never deletes it)";

/// What `check` did not look for when a volume root cannot be listed.
const ROOT_UNSEEN: &str =
    "storage in it without a record is not looked for, and start-up cannot look either";

/// What `check` did not look at when `.trash` cannot be listed.
const TRASH_UNSEEN: &str = "the directories of deleted volumes in it are not looked at (where an interrupted delete left a volume's directory, entries an immutable or append-only flag keeps)";

/// The names in `dir`, sorted, for a finding that looks through them (a
/// volume root, `.trash`, `.orphaned`, the disk markers, a snapshot
/// area): a directory that cannot be listed (EIO, EACCES, not a
/// directory), or whose listing breaks off, is an error finding naming
/// it, the cause and what is therefore not looked at (`unseen`), never
/// "nothing there" (nothing read is not nothing found; before 2026-12-07
/// all but the roots read as empty). A directory that is not there holds
/// nothing (a kind whose first volume is still to come, nothing deleted
/// or moved aside yet).
fn names_in(files: &dyn Files, dir: &Path, unseen: &str, out: &mut Vec<Finding>) -> Vec<String> {
    let unlisted = |e: &dyn std::fmt::Display| {
        error(format!(
            "{} cannot be listed ({e}): {unseen}",
            dir.display()
        ))
    };
    let rd = match files.read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.errno() == Some(libc::ENOENT) => return Vec::new(),
        Err(e) => {
            out.push(unlisted(&e.into_io()));
            return Vec::new();
        }
    };
    let mut v = Vec::new();
    for e in rd {
        match e {
            Ok(e) => v.push(e.file_name().to_string_lossy().into_owned()),
            Err(e) => {
                out.push(unlisted(&e));
                break;
            }
        }
    }
    v.sort();
    v
}

fn is_volume_id(prefix: &str, s: &str) -> bool {
    crate::kinds::is_hex_id(prefix, s)
}

/// One reading of the journal and of the storage it names.
struct Pass {
    gen: u64,
    records: usize,
    counts: BTreeMap<&'static str, usize>,
    findings: Vec<Finding>,
}

fn pass(cfg: &Config, os: &Os, state_dir: &Path) -> Result<Pass, StateError> {
    let (scan, legacy) = read_records(os.files.as_ref(), state_dir)?;
    let mut findings = Vec::new();
    journal_findings(&scan, legacy.len(), &mut findings);
    let mut records: Vec<VolumeRecord> = scan.records.values().cloned().chain(legacy).collect();
    records.sort_by(|a, b| (a.seq, &a.id).cmp(&(b.seq, &b.id)));
    let mut counts = BTreeMap::new();
    for r in &records {
        *counts.entry(r.kind.as_str()).or_insert(0) += 1;
    }
    let n = records.len();
    // Records whose ids are not of their kind are damage, and nothing is
    // looked for under their ids (start-up never acts on them either).
    records.retain(|r| match volume_id_flaw(r) {
        None => true,
        Some(f) => {
            findings.push(error(f));
            false
        }
    });
    findings.extend(storage_findings(cfg, os, &records));
    let mut snapshots: Vec<&SnapshotRecord> = scan.snapshots.values().collect();
    snapshots.sort_by(|a, b| (a.seq, &a.id).cmp(&(b.seq, &b.id)));
    snapshots.retain(|s| match snapshot_id_flaw(s) {
        None => true,
        Some(f) => {
            findings.push(error(f));
            false
        }
    });
    findings.extend(snapshot_findings(cfg, os.files.as_ref(), &snapshots));
    if let Some(f) = super::driver_name::finding(
        state_dir,
        &cfg.driver_name,
        n + scan.snapshots.values().count(),
    ) {
        findings.push(if f.0 { error(f.1) } else { warning(f.1) });
    }
    let records = n;
    Ok(Pass {
        gen: scan.gen,
        records,
        counts,
        findings,
    })
}

/// Beside a serving berth, the journal and the roots are read at different
/// moments, and an operation in flight between them shows as a finding
/// that is not there (a create moves its directory into the root after
/// its Ready record; a delete moves it to `.trash` before it removes the
/// record). `check` then reads everything again, up to `LIVE_PASSES` times
/// in all, `LIVE_PAUSE` apart, within `LIVE_BUDGET` (but always twice),
/// and reports only what every reading found: damage that stays is
/// reported every time.
const LIVE_PASSES: usize = 4;
const LIVE_PAUSE: Duration = Duration::from_millis(200);
const LIVE_BUDGET: Duration = Duration::from_secs(2);

/// `berth state check`: prints findings; Ok(true) when nothing is wrong
/// (warnings allowed).
pub fn check(cfg: &Config, os: &Os, out: &mut dyn Write) -> Result<bool, StateError> {
    let state_dir = cfg.state_dir();
    require_state(os.files.as_ref(), &state_dir)?;
    let io = |e| StateError::io("write", "stdout", e);
    writeln!(out, "state directory {}", state_dir.display()).map_err(io)?;
    let live = DirLock::holder_of(os.files.as_ref(), &state_dir);
    if let Some(h) = &live {
        writeln!(out, "note: in use by {h}; reading a live journal").map_err(io)?;
    }
    let deadline = Instant::now() + LIVE_BUDGET;
    let mut last = pass(cfg, os, &state_dir)?;
    let mut passes = 1;
    while live.is_some()
        && !last.findings.is_empty()
        && passes < LIVE_PASSES
        && (passes < 2 || Instant::now() + LIVE_PAUSE < deadline)
    {
        std::thread::sleep(LIVE_PAUSE);
        let mut next = pass(cfg, os, &state_dir)?;
        next.findings.retain(|f| last.findings.contains(f));
        last = next;
        passes += 1;
    }
    if live.is_some() && passes == 1 {
        writeln!(
            out,
            "note: beside a serving berth: one reading of the journal and the disk, which found nothing"
        )
        .map_err(io)?;
    } else if live.is_some() {
        writeln!(
            out,
            "note: beside a serving berth: a finding is reported only when each of {passes} consecutive readings ({} ms apart) shows it; what an operation in flight shows in one reading is left out",
            LIVE_PAUSE.as_millis()
        )
        .map_err(io)?;
    }
    writeln!(
        out,
        "journal generation {}: {} records ({})",
        last.gen,
        last.records,
        last.counts
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    )
    .map_err(io)?;
    let findings = last.findings;
    for f in &findings {
        writeln!(out, "{}: {}", f.severity, f.what).map_err(io)?;
    }
    let errors = findings.iter().filter(|f| f.severity == "error").count();
    writeln!(
        out,
        "{} errors, {} warnings",
        errors,
        findings.len() - errors
    )
    .map_err(io)?;
    Ok(errors == 0)
}

#[derive(Serialize)]
struct Export<'a> {
    state_dir: PathBuf,
    generation: u64,
    records: Vec<&'a VolumeRecord>,
    snapshots: Vec<&'a SnapshotRecord>,
    damage: Vec<String>,
    torn_tail_bytes: u64,
}

/// `berth state export`: every readable record as one JSON document.
/// Ok(false) when the journal is damaged (what could be read is printed).
pub fn export(cfg: &Config, files: &dyn Files, out: &mut dyn Write) -> Result<bool, StateError> {
    let state_dir = cfg.state_dir();
    require_state(files, &state_dir)?;
    let (scan, legacy) = read_records(files, &state_dir)?;
    let mut records: Vec<&VolumeRecord> = scan.records.values().chain(legacy.iter()).collect();
    records.sort_by(|a, b| (a.seq, &a.id).cmp(&(b.seq, &b.id)));
    let mut snapshots: Vec<_> = scan.snapshots.values().collect();
    snapshots.sort_by(|a, b| (a.seq, &a.id).cmp(&(b.seq, &b.id)));
    let damage: Vec<String> = scan
        .damage
        .iter()
        .map(|d| d.to_string())
        .chain(records.iter().filter_map(|r| volume_id_flaw(r)))
        .chain(snapshots.iter().filter_map(|r| snapshot_id_flaw(r)))
        .collect();
    let clean = damage.is_empty();
    let doc = Export {
        state_dir,
        generation: scan.gen,
        records,
        snapshots,
        damage,
        torn_tail_bytes: scan.torn.as_ref().map_or(0, |t| t.len),
    };
    serde_json::to_writer_pretty(&mut *out, &doc).map_err(|source| StateError::Encode {
        id: "export".into(),
        source,
    })?;
    writeln!(out).map_err(|e| StateError::io("write", "stdout", e))?;
    Ok(clean)
}

/// `release`: the operator's decision to end the hold `id` of a pool disk
/// (`BlockKind::hold_disk`), after saving what it held: the hold becomes
/// a record that has the disk erased (`block::released`), which the next
/// start-up does (as `--disk-wipe` says) before the disk is offered again;
/// the hold is removed after it, so a crash in between leaves the disk
/// held. Takes the state directory's lock (berth must be stopped).
pub fn release(state_dir: &Path, files: Arc<dyn Files>, id: &str) -> Result<String, StateError> {
    require_state(files.as_ref(), state_dir)?;
    let _lock = DirLock::acquire(&files, state_dir, "state directory")?;
    let store = super::Store::open(state_dir, files)?;
    let found = store.get(id).and_then(|r| {
        let wipe = crate::kinds::block::released(&r)?;
        Some((r, wipe))
    });
    let Some((held, wipe)) = found else {
        return Err(StateError::Unexpected {
            path: journal_dir(state_dir),
            why: format!(
                "no held disk has the id {id} (`berth state check` names each hold, held-...)"
            ),
        });
    };
    store.put(&wipe)?;
    store.remove(&held.id)?;
    let disk = held
        .block
        .as_ref()
        .and_then(|b| b.disk.as_ref())
        .map(|d| d.path.display().to_string())
        .unwrap_or_default();
    Ok(format!(
        "released disk {disk} ({id}): berth erases it when it starts, then offers it to new volumes\n"
    ))
}

/// `berth state repair`: see the module comment. Returns what it did, for
/// printing.
pub fn repair(state_dir: &Path, files: Arc<dyn Files>) -> Result<String, StateError> {
    require_state(files.as_ref(), state_dir)?;
    let _lock = DirLock::acquire(&files, state_dir, "state directory")?;
    let dir = journal_dir(state_dir);
    let scan = journal::scan(files.as_ref(), &dir)?;
    // Records whose ids are not of their kind: dropped too (their lines
    // are in the copy).
    let bad_ids: Vec<String> = scan
        .records
        .values()
        .filter_map(volume_id_flaw)
        .chain(scan.snapshots.values().filter_map(snapshot_id_flaw))
        .collect();
    if scan.damage.is_empty() && bad_ids.is_empty() {
        return Ok(format!(
            "the journal in {} has no damage; nothing to repair",
            dir.display()
        ));
    }
    let f = files.as_ref();
    let keep = dir.join(format!("damaged-{}", crate::driver::now_nanos()));
    f.create_dir(&keep, 0o700).map_err(StateError::Os)?;
    let mut report = String::new();
    report.push_str(&format!(
        "repaired the state journal in {}\n",
        dir.display()
    ));
    for d in &scan.damage {
        report.push_str(&format!("damage: {d}\n"));
    }
    for f in &bad_ids {
        report.push_str(&format!("dropped the {f}\n"));
    }
    for d in &scan.dropped {
        report.push_str(&format!(
            "dropped line {} (byte {}){}\n",
            d.line,
            d.offset,
            d.id_hint
                .as_ref()
                .map(|id| format!(", about volume {id}"))
                .unwrap_or_default()
        ));
    }
    // 1. Copies of every journal file (the damaged bytes stay available);
    //    what is named as a journal file but is not a regular file (a FIFO,
    //    a directory, a symlink: never opened) is moved there itself.
    //    A listing that breaks off, or an entry whose type cannot be
    //    told, stops the repair here, before anything is removed (step 3
    //    removes the old generation's files, whose copies must be kept).
    for entry in f
        .read_dir(&dir)
        .map_err(|e| StateError::io("read", &dir, e.into_io()))?
    {
        let e = entry.map_err(|e| StateError::io("read", &dir, e))?;
        let name = e.file_name();
        let kind = e
            .file_type()
            .map_err(|err| StateError::io("stat", dir.join(&name), err))?;
        if !kind.is_file() {
            continue;
        }
        let from = dir.join(&name);
        let bytes = f
            .read_regular(&from, None)
            .map_err(|e| StateError::io("read", &from, e))?;
        write_durable(f, &keep.join(&name), &bytes)?;
    }
    for p in &scan.foreign {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let to = crate::os::files::move_aside(f, p, &keep, &name).map_err(StateError::Os)?;
        report.push_str(&format!(
            "moved {} (not a regular file) to {}\n",
            p.display(),
            to.display()
        ));
    }
    // A log newer than the newest snapshot, not empty: its changes follow a
    // snapshot that is not there (or it was not made by berth), so none is
    // replayed; it is taken out of the journal (step 3), its copy kept.
    for p in &scan.newer {
        report.push_str(&format!(
            "took {} out of the journal (a log newer than the newest snapshot: none of its changes is kept; its bytes are in {})\n",
            p.display(),
            keep.display()
        ));
    }
    write_durable(f, &keep.join("README.txt"), report.as_bytes())?;
    f.sync_dir(&keep).map_err(StateError::Os)?;
    // 2. The readable records as the next generation's snapshot: from the
    //    moment it is renamed into place start-up reads it, and the old
    //    generation's files are stale.
    let gen = scan
        .gen
        .checked_add(1)
        .ok_or_else(|| StateError::Unexpected {
            path: dir.join(journal::snapshot_name(scan.gen)),
            why: "no generation can follow this one".into(),
        })?;
    let mut records: Vec<&VolumeRecord> = scan
        .records
        .values()
        .filter(|r| volume_id_flaw(r).is_none())
        .collect();
    records.sort_by(|a, b| (a.seq, &a.id).cmp(&(b.seq, &b.id)));
    let snapshots: Vec<&SnapshotRecord> = scan
        .snapshots
        .values()
        .filter(|r| snapshot_id_flaw(r).is_none())
        .collect();
    let mut w = SnapshotWriter::new(records.len() + snapshots.len());
    for r in &records {
        w.volume(r)?;
    }
    for r in snapshots {
        w.snapshot(r)?;
    }
    let bytes = w.finish()?;
    let tmp = dir.join(format!("{}.tmp", journal::snapshot_name(gen)));
    write_durable(f, &tmp, &bytes)?;
    // The generation's (empty) log first, as a compaction makes it: a
    // snapshot without its log is damage.
    write_durable(f, &dir.join(journal::log_name(gen)), b"")?;
    f.rename(&tmp, &dir.join(journal::snapshot_name(gen)))
        .and_then(|_| f.sync_dir(&dir))
        .map_err(StateError::Os)?;
    // best effort, as in a compaction: the repaired state is in place
    if let Err(e) = journal::write_downgrade_guard(f, &dir, gen).and_then(|_| f.sync_dir(&dir)) {
        report.push_str(&format!(
            "warning: could not write the guard against a berth from before binary snapshots: {e}\n"
        ));
    }
    // 3. The old generation, temp files and the logs newer than it, now
    //    stale (their copies are kept), but never a file of the new
    //    generation (an empty log of generation G+1 was stale before it
    //    was the new log: removing it would leave a snapshot without its
    //    log, which is damage).
    let new_files = [
        dir.join(journal::snapshot_name(gen)),
        dir.join(journal::json_snapshot_name(gen)),
        dir.join(journal::log_name(gen)),
    ];
    let old = [
        journal::snapshot_name(scan.gen),
        journal::json_snapshot_name(scan.gen),
        journal::log_name(scan.gen),
    ]
    .map(|n| dir.join(n));
    for p in old.iter().chain(&scan.stale).chain(&scan.newer) {
        if !new_files.contains(p) && f.exists(p) {
            f.remove_file(p).map_err(StateError::Os)?;
        }
    }
    f.sync_dir(&dir).map_err(StateError::Os)?;
    report.push_str(&format!(
        "kept {} records in generation {gen}; the damaged files are in {}\nrun `berth state check` next\n",
        records.len(),
        keep.display()
    ));
    if !scan.dropped.is_empty() || !scan.foreign.is_empty() || !scan.newer.is_empty() {
        report.push_str(
            "a volume whose record was dropped keeps its storage, but berth does not start while storage without a record is there: once you know its record is gone for good, start berth once with --allow-missing-storage, which keeps such storage aside in .orphaned (never deleted)\n",
        );
    }
    Ok(report)
}

fn write_durable(f: &dyn Files, path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let file = f
        .open(path, Open::CreateOrTruncate)
        .map_err(StateError::Os)?;
    f.write_at(&file, path, bytes, 0)
        .and_then(|_| f.sync(&file, path))
        .map_err(StateError::Os)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::os::files::RealFiles;
    use crate::state::journal::tests::{at_once, make_not_regular};
    use crate::state::journal::EntryRef;
    use std::fs;

    fn line(id: &str) -> Vec<u8> {
        let mut v = Vec::new();
        journal::encode(&EntryRef::Del(id), &mut v).unwrap();
        v
    }

    /// A state directory whose journal is damaged by `damage` (called
    /// with the journal directory, which holds a valid log of generation
    /// 0 of three lines).
    fn damaged(damage: impl FnOnce(&Path)) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let j = journal_dir(d.path());
        fs::create_dir_all(&j).unwrap();
        fs::write(
            j.join(journal::log_name(0)),
            [line("a"), line("b"), line("c")].concat(),
        )
        .unwrap();
        damage(&j);
        d
    }

    fn local_config(dir: &Path) -> Config {
        let args = [
            "berth",
            "--data-dir",
            dir.to_str().unwrap(),
            "--node-id",
            "n1",
        ];
        <crate::config::Cli as clap::Parser>::try_parse_from(args)
            .unwrap()
            .config
    }

    fn ready_local(id: &str) -> VolumeRecord {
        VolumeRecord {
            id: id.into(),
            name: "pvc".into(),
            kind: Kind::Local,
            seq: 0,
            phase: Phase::Ready,
            capacity_bytes: 1 << 20,
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

    /// A state directory that cannot be looked at (its `journal/`'s lstat
    /// fails with EACCES, as for `berth state check` run by a user who is
    /// not root on berth's 0700 state directory, or with EIO) stops every
    /// tool with that error, naming the directory; before, each said the
    /// directory "holds no berth state", and sent the operator looking for
    /// another one.
    #[test]
    fn a_state_directory_that_cannot_be_looked_at_is_not_called_stateless() {
        let d = tempfile::tempdir().unwrap();
        let cfg = local_config(d.path());
        let state = cfg.state_dir();
        let j = journal_dir(&state);
        fs::create_dir_all(&j).unwrap();
        fs::write(j.join(journal::log_name(0)), line("a")).unwrap();
        for errno in [libc::EACCES, libc::EIO] {
            let cause = std::io::Error::from_raw_os_error(errno).to_string();
            for tool in ["check", "export", "repair", "release"] {
                let (os, fake) = crate::os::Os::fake();
                fake.fail_next("lstat", errno);
                let mut out = Vec::new();
                let e = match tool {
                    "check" => check(&cfg, &os, &mut out).map(|_| ()),
                    "export" => export(&cfg, os.files.as_ref(), &mut out).map(|_| ()),
                    "repair" => repair(&state, os.files.clone()).map(|_| ()),
                    _ => release(&state, os.files.clone(), "held-x").map(|_| ()),
                }
                .unwrap_err();
                let msg = crate::error::chain(&e);
                assert!(
                    !matches!(e, StateError::NoState { .. })
                        && msg.contains(&j.display().to_string())
                        && msg.contains(&cause),
                    "{tool}, {cause}: {msg}"
                );
                assert!(out.is_empty(), "{tool}: {}", String::from_utf8_lossy(&out));
            }
        }
        // Nothing written by the refused tools; the state still reads.
        let (os, _) = crate::os::Os::fake();
        let mut out = Vec::new();
        assert!(export(&cfg, os.files.as_ref(), &mut out).unwrap());
        assert!(!state.join(".berth.lock").exists());
    }

    /// `state check` looks at the storage through the OS layer: a root
    /// that cannot be listed (EIO, EACCES) is an error naming it and the
    /// cause, never "no storage without a record" (before, check said
    /// nothing and exited 0: nothing read was taken for nothing found), a
    /// root that is not there holds nothing, and a volume's directory that
    /// cannot be looked at is reported missing, with the error.
    #[test]
    fn check_looks_at_storage_through_the_os_layer() {
        let d = tempfile::tempdir().unwrap();
        let cfg = local_config(d.path());
        let root = cfg.local_root();
        let (kept, lost) = (
            format!("local-{}", "a".repeat(32)),
            format!("local-{}", "b".repeat(32)),
        );
        for id in [&kept, &lost] {
            fs::create_dir_all(root.join(id)).unwrap();
        }
        let (os, fake) = crate::os::Os::fake();
        let records = [ready_local(&kept)];
        let j = journal_dir(&cfg.state_dir());
        fs::create_dir_all(&j).unwrap();
        let mut put = Vec::new();
        journal::encode(&EntryRef::Put(&records[0]), &mut put).unwrap();
        fs::write(j.join(journal::log_name(0)), put).unwrap();
        let whats = || -> Vec<String> {
            storage_findings(&cfg, &os, &records)
                .into_iter()
                .map(|f| f.what)
                .collect()
        };
        let found = whats();
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains(&lost) && found[0].contains(LOST_RECORD));
        for errno in [libc::EIO, libc::EACCES] {
            // (the fault reaches what is under the root too: `.trash`
            // and `.orphaned` are each reported as well)
            fake.fail_op_under("read_dir", &root, errno);
            let cause = std::io::Error::from_raw_os_error(errno).to_string();
            let found = storage_findings(&cfg, &os, &records);
            let unlisted = [root.clone(), root.join(".trash"), root.join(".orphaned")];
            assert!(
                found.len() == unlisted.len()
                    && found.iter().zip(&unlisted).all(|(f, dir)| {
                        f.severity == "error"
                            && f.what
                                .starts_with(&format!("{} cannot be listed", dir.display()))
                            && f.what.contains(&cause)
                    }),
                "{errno}: {:?}",
                found.iter().map(|f| &f.what).collect::<Vec<_>>()
            );
            // and the whole check fails (exit 1), saying so
            let mut out = Vec::new();
            assert!(!check(&cfg, &os, &mut out).unwrap());
            let text = String::from_utf8_lossy(&out);
            assert!(text.contains("cannot be listed"), "{text}");
            fake.clear_file_faults();
        }
        fake.fail_op_under("read_dir", &root, libc::ENOENT);
        assert_eq!(
            whats(),
            Vec::<String>::new(),
            "a root not there holds nothing"
        );
        fake.clear_file_faults();
        fake.fail_next("lstat", libc::EIO);
        let found = whats();
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            found[0].contains(&kept) && found[0].contains("is missing (Input/output error"),
            "{found:?}"
        );
    }

    /// A configuration serving local and block volumes, whose state (an
    /// empty journal) `check` reads.
    fn local_and_block_state(dir: &Path) -> Config {
        let mut cfg = local_config(dir);
        cfg.kinds = vec![Kind::Local, Kind::Block];
        let j = journal_dir(&cfg.state_dir());
        fs::create_dir_all(&j).unwrap();
        fs::write(j.join(journal::log_name(0)), b"").unwrap();
        cfg
    }

    /// What `check` finds on the storage of a state without records.
    fn all_findings(cfg: &Config, os: &Os) -> Vec<Finding> {
        let mut v = storage_findings(cfg, os, &[]);
        v.extend(snapshot_findings(cfg, os.files.as_ref(), &[]));
        v
    }

    /// Every directory `state check` lists to look for something besides
    /// the roots (`.trash`, `.orphaned`, the disk markers, the snapshot
    /// areas, local and block), and the loop devices: one that cannot be
    /// listed (EIO, EACCES) is one error naming it and the cause, and the
    /// whole check fails saying so. Before, each such listing read as
    /// empty: check found nothing there and exited 0.
    #[test]
    fn check_reports_each_directory_it_cannot_list() {
        let d = tempfile::tempdir().unwrap();
        let cfg = local_and_block_state(d.path());
        let (local, block) = (cfg.local_root(), cfg.block_root());
        let dirs = [
            local.join(".trash"),
            local.join(".orphaned"),
            local.join(".snapshots"),
            block.join(".orphaned"),
            block.join(crate::kinds::block::DISK_MARKERS),
            block.join(".snapshots"),
        ];
        for dir in &dirs {
            fs::create_dir_all(dir).unwrap();
        }
        let (os, fake) = crate::os::Os::fake();
        let found = || all_findings(&cfg, &os);
        assert_eq!(found(), Vec::new());
        let one_error = |found: &[Finding], named: &str, cause: &str| {
            assert!(
                found.len() == 1
                    && found[0].severity == "error"
                    && found[0].what.contains(named)
                    && found[0].what.contains("cannot be listed")
                    && found[0].what.contains(cause),
                "{named}, {cause}: {found:?}"
            );
        };
        for errno in [libc::EIO, libc::EACCES] {
            let cause = std::io::Error::from_raw_os_error(errno).to_string();
            for dir in &dirs {
                fake.fail_op_under("read_dir", dir, errno);
                one_error(&found(), &dir.display().to_string(), &cause);
                let mut out = Vec::new();
                assert!(!check(&cfg, &os, &mut out).unwrap(), "{}", dir.display());
                let text = String::from_utf8_lossy(&out);
                assert!(text.contains("cannot be listed"), "{text}");
                fake.clear_file_faults();
            }
            fake.fail_next("loop_list", errno);
            one_error(&found(), "loop devices", &cause);
        }
        assert_eq!(found(), Vec::new());
    }

    /// `.trash`, which a missing volume's directory is looked for in and
    /// the flags that keep entries are looked for in, is listed once: one
    /// that cannot be listed is one error, beside the missing directory.
    #[test]
    fn an_unlisted_trash_is_reported_once() {
        let d = tempfile::tempdir().unwrap();
        let cfg = local_config(d.path());
        let trash = cfg.local_root().join(".trash");
        fs::create_dir_all(&trash).unwrap();
        let gone = format!("local-{}", "c".repeat(32));
        let (os, fake) = crate::os::Os::fake();
        fake.fail_op_under("read_dir", &trash, libc::EIO);
        let found = storage_findings(&cfg, &os, &[ready_local(&gone)]);
        let unlisted: Vec<_> = found
            .iter()
            .filter(|f| f.what.contains("cannot be listed"))
            .collect();
        assert!(
            found.len() == 2
                && unlisted.len() == 1
                && unlisted[0].what.contains(&trash.display().to_string())
                && found
                    .iter()
                    .any(|f| f.what.contains(&gone) && f.what.contains("is missing")),
            "{found:?}"
        );
    }

    /// Guard: a directory that is not there (ENOENT, made or injected)
    /// holds nothing: no finding, and check stays clean.
    #[test]
    fn a_directory_not_there_holds_nothing() {
        let d = tempfile::tempdir().unwrap();
        let cfg = local_and_block_state(d.path());
        let (os, fake) = crate::os::Os::fake();
        let clean = || {
            assert_eq!(all_findings(&cfg, &os), Vec::new());
            let mut out = Vec::new();
            assert!(
                check(&cfg, &os, &mut out).unwrap(),
                "{}",
                String::from_utf8_lossy(&out)
            );
        };
        // nothing made: no root, no .trash, .orphaned, .disks, .snapshots
        clean();
        let (local, block) = (cfg.local_root(), cfg.block_root());
        for dir in [&local, &block] {
            fs::create_dir_all(dir.join(".trash")).unwrap();
            fake.fail_op_under("read_dir", dir, libc::ENOENT);
        }
        clean();
    }

    /// Where an interrupted operation leaves what `check` looks for when
    /// a volume's or a snapshot's storage is missing (`.creating/<id>`, a
    /// restore's file, a snapshot's partial copy), and the storage of a
    /// create that never answered (looked at for data start-up keeps
    /// aside): one that cannot be looked at (EIO, EACCES on its stat or
    /// lstat) is one error naming it and the cause, beside the other
    /// findings; before 2026-12-07 it read as not there and nothing said
    /// check could not tell. One not there (ENOENT) adds nothing.
    #[test]
    fn what_check_cannot_look_at_is_an_error_never_not_there() {
        let d = tempfile::tempdir().unwrap();
        let cfg = local_and_block_state(d.path());
        let (local, block) = (cfg.local_root(), cfg.block_root());
        let local_id = format!("local-{}", "c".repeat(32));
        let block_id = format!("block-{}", "d".repeat(32));
        let snap_id = format!("local-snap-{}", "e".repeat(32));
        let mut block_rec = ready_local(&block_id);
        block_rec.kind = Kind::Block;
        // and two creates that never answered, whose storage check looks
        // at for data (made: the fault is on the look)
        let creating = |id: &str, kind: Kind| {
            let mut r = ready_local(id);
            (r.kind, r.phase) = (kind, Phase::Creating);
            r
        };
        let (local_new, block_new) = (
            format!("local-{}", "7".repeat(32)),
            format!("block-{}", "8".repeat(32)),
        );
        let local_dir = crate::kinds::local::volume_dir(&local, &local_new);
        let block_file = crate::kinds::block::volume_file(&block, &block_new);
        fs::create_dir_all(&local_dir).unwrap();
        fs::create_dir_all(&block).unwrap();
        fs::write(&block_file, b"").unwrap();
        let records = [
            ready_local(&local_id),
            block_rec,
            creating(&local_new, Kind::Local),
            creating(&block_new, Kind::Block),
        ];
        // a ready local snapshot (its copy, where check looks, not made)
        let snapshot: SnapshotRecord = serde_json::from_str(&format!(
            r#"{{"id":"{snap_id}","name":"s","kind":"local","seq":0,"phase":"ready","source_volume_id":"{local_id}","size_bytes":1,"node":"n1","created_secs":0,"created_nanos":0}}"#
        ))
        .unwrap();
        let (os, fake) = crate::os::Os::fake();
        let found = || {
            let mut v = storage_findings(&cfg, &os, &records);
            v.extend(snapshot_findings(&cfg, os.files.as_ref(), &[&snapshot]));
            v
        };
        // the storage itself missing: one error each; the creates: a
        // warning each
        let missing = found();
        assert_eq!(missing.len(), 5, "{missing:?}");
        let looked_for = [
            ("stat", local.join(".creating").join(&local_id)),
            (
                "stat",
                crate::kinds::block::restoring_path(&block, &block_id),
            ),
            (
                "stat",
                crate::kinds::local::snapshot_partial_dir(&local, &snap_id),
            ),
            ("lstat", local_dir),
            ("lstat", block_file),
        ];
        for (op, path) in &looked_for {
            for errno in [libc::EIO, libc::EACCES] {
                fake.fail_op_under(op, path, errno);
                let cause = std::io::Error::from_raw_os_error(errno).to_string();
                let now = found();
                let unlooked: Vec<_> = now.iter().filter(|f| !missing.contains(f)).collect();
                assert!(
                    now.len() == missing.len() + 1
                        && unlooked.len() == 1
                        && unlooked[0].severity == "error"
                        && unlooked[0].what.starts_with(&format!(
                            "{} cannot be looked at ({cause})",
                            path.display()
                        )),
                    "{}: {now:?}",
                    path.display()
                );
                fake.clear_file_faults();
            }
            fake.fail_op_under(op, path, libc::ENOENT);
            assert_eq!(found(), missing, "{} not there", path.display());
            fake.clear_file_faults();
        }
    }

    /// A deleted volume's trash entry that `check` cannot look through for
    /// an immutable or append-only flag (its listing, a listing below it,
    /// an entry's flags: EIO, EACCES) is one error naming what could not
    /// be read and the cause, as such a flag may keep it; before
    /// 2026-12-07 it was skipped, as if no flag were there. An entry gone
    /// meanwhile (ENOENT: start-up empties the trash beside check) is
    /// nothing.
    #[test]
    fn a_trash_entry_check_cannot_look_through_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let cfg = local_and_block_state(d.path());
        let gone = format!("local-{}", "f".repeat(32));
        let entry = cfg.local_root().join(".trash").join(format!("{gone}-1"));
        let below = entry.join("data");
        fs::create_dir_all(&below).unwrap();
        fs::write(below.join("file"), b"x").unwrap();
        let (os, fake) = crate::os::Os::fake();
        let found = || all_findings(&cfg, &os);
        assert_eq!(found(), Vec::new());
        let faults = [
            ("read_dir", &entry, &entry),
            ("read_dir", &below, &below),
            ("statx", &below.join("file"), &below.join("file")),
            ("statx", &entry, &entry),
        ];
        for (op, at, named) in faults {
            for errno in [libc::EIO, libc::EACCES] {
                fake.fail_op_under(op, at, errno);
                let cause = std::io::Error::from_raw_os_error(errno).to_string();
                let now = found();
                assert!(
                    now.len() == 1
                        && now[0].severity == "error"
                        && now[0].what.starts_with(&format!(
                            "{} cannot be looked at ({cause})",
                            named.display()
                        ))
                        && now[0].what.contains(&entry.display().to_string())
                        && now[0].what.contains(&gone),
                    "{op} {}: {now:?}",
                    at.display()
                );
                let mut out = Vec::new();
                assert!(!check(&cfg, &os, &mut out).unwrap(), "{op}");
                fake.clear_file_faults();
            }
            fake.fail_op_under(op, at, libc::ENOENT);
            assert_eq!(found(), Vec::new(), "{op} {}: not there", at.display());
            fake.clear_file_faults();
        }
    }

    /// `repair` reads the journal directory and the files it keeps copies
    /// of through the OS layer: one that cannot be read fails the repair,
    /// naming it, and leaves the journal for a repair that can.
    #[test]
    fn repair_reads_the_journal_through_the_os_layer() {
        let d = damaged(|j: &Path| {
            let p = j.join(journal::log_name(0));
            let mut b = fs::read(&p).unwrap();
            b[12] ^= 1;
            fs::write(&p, b).unwrap();
        });
        let j = journal_dir(d.path());
        let (os, fake) = crate::os::Os::fake();
        fake.fail_next("read_dir", libc::EIO);
        let e = repair(d.path(), os.files.clone()).unwrap_err();
        let msg = crate::error::chain(&e);
        assert!(msg.contains(&j.display().to_string()), "{msg}");
        fake.fail_next("read", libc::EIO);
        let e = repair(d.path(), os.files.clone()).unwrap_err();
        let msg = crate::error::chain(&e);
        assert!(msg.contains(journal::log_name(0).as_str()), "{msg}");
        assert!(!journal::scan(&RealFiles, &j).unwrap().damage.is_empty());
        let report = repair(d.path(), os.files.clone()).unwrap();
        assert!(report.contains("damaged-"), "{report}");
        assert!(journal::scan(&RealFiles, &j).unwrap().damage.is_empty());
    }

    /// Whatever `scan` reports as damage, `repair` resolves: afterwards
    /// the journal has no flaw, start-up opens it, and a second repair
    /// finds nothing to do. (A log newer than the newest snapshot used to
    /// stay where it was: repair said "repaired", and check and start-up
    /// kept refusing, pointing back to repair.) What it takes out of the
    /// journal is kept in the `damaged-<time>` directory.
    #[test]
    fn repair_leaves_no_flaw_that_check_reports() {
        let flip = |j: &Path| {
            let p = j.join(journal::log_name(0));
            let mut b = fs::read(&p).unwrap();
            b[12] ^= 1;
            fs::write(&p, b).unwrap();
        };
        type Damage = Box<dyn FnOnce(&Path)>;
        let cases: Vec<(&str, Damage)> = vec![
            ("a flipped byte", Box::new(flip)),
            (
                "a non-empty log newer than the newest snapshot",
                Box::new(|j: &Path| fs::write(j.join(journal::log_name(7)), line("x")).unwrap()),
            ),
            (
                "a non-empty log of the generation repair writes next",
                Box::new(|j: &Path| fs::write(j.join(journal::log_name(1)), line("x")).unwrap()),
            ),
            (
                "the largest generation",
                Box::new(|j: &Path| {
                    fs::write(j.join(journal::log_name(u64::MAX)), line("x")).unwrap()
                }),
            ),
            (
                "an empty log of the generation repair writes next, and a flipped byte",
                Box::new(move |j: &Path| {
                    fs::write(j.join(journal::log_name(1)), b"").unwrap();
                    flip(j);
                }),
            ),
            (
                "a snapshot without its log",
                Box::new(|j: &Path| {
                    fs::remove_file(j.join(journal::log_name(0))).unwrap();
                    fs::write(j.join(journal::json_snapshot_name(2)), line("x")).unwrap();
                }),
            ),
            (
                "two snapshots of one generation",
                Box::new(|j: &Path| {
                    fs::write(j.join(journal::json_snapshot_name(0)), b"").unwrap();
                    let empty = super::SnapshotWriter::new(0).finish().unwrap();
                    fs::write(j.join(journal::snapshot_name(0)), empty).unwrap();
                }),
            ),
            (
                "a FIFO for the log",
                Box::new(|j: &Path| {
                    fs::remove_file(j.join(journal::log_name(0))).unwrap();
                    make_not_regular("fifo", &j.join(journal::log_name(0)));
                }),
            ),
            (
                "a directory for the next snapshot",
                Box::new(|j: &Path| make_not_regular("dir", &j.join(journal::snapshot_name(1)))),
            ),
            (
                "a symlink for an old snapshot, a socket for a temp file",
                Box::new(|j: &Path| {
                    let empty = super::SnapshotWriter::new(0).finish().unwrap();
                    fs::write(j.join(journal::snapshot_name(1)), empty).unwrap();
                    fs::write(j.join(journal::log_name(1)), b"").unwrap();
                    make_not_regular("symlink", &j.join(journal::snapshot_name(0)));
                    make_not_regular("socket", &j.join("x.tmp"));
                }),
            ),
        ];
        for (what, damage) in cases {
            let d = damaged(damage);
            let j = journal_dir(d.path());
            let before = journal::scan(&RealFiles, &j).unwrap();
            assert!(!before.damage.is_empty(), "{what}: no damage made");
            let damaged_files: Vec<String> = before
                .damage
                .iter()
                .filter(|d| fs::symlink_metadata(&d.path).is_ok())
                .map(|d| d.path.file_name().unwrap().to_string_lossy().into_owned())
                .collect();
            let state = d.path().to_path_buf();
            let report = at_once(what, move || repair(&state, Arc::new(RealFiles)))
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let after = journal::scan(&RealFiles, &j).unwrap();
            assert!(
                after.damage.is_empty(),
                "{what}: still damaged after repair: {:?}\n{report}",
                after.damage
            );
            assert!(report.contains("damaged-"), "{what}: {report}");
            crate::state::Store::open(d.path(), Arc::new(RealFiles))
                .unwrap_or_else(|e| panic!("{what}: start-up after repair: {e}"));
            let again = repair(d.path(), Arc::new(RealFiles)).unwrap();
            assert!(again.contains("nothing to repair"), "{what}: {again}");
            // What was taken out is kept: every damaged file, by name.
            let kept: Vec<String> = fs::read_dir(&j)
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("damaged-"))
                .flat_map(|e| fs::read_dir(e.path()).unwrap().flatten())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            for name in &damaged_files {
                assert!(kept.contains(name), "{what}: {name} not kept: {kept:?}");
            }
        }
    }
}
