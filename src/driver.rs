//! The driver: configuration, state, guards, OS interfaces and the volume
//! kinds, shared by the Identity, Controller and Node services.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::kinds::nfs::allow::AllowedShares;
use crate::kinds::{BlockKind, LocalKind, NfsKind, VolumeKind};
use crate::locks::{OpGuard, OpLocks};
use crate::os::Os;
use crate::state::lock::DirLock;
use crate::state::{ContentSource, Kind, Phase, Store, VolumeRecord};

pub struct Driver {
    /// The locks of the state directory and of the kinds' roots, held for
    /// the driver's life: one berth per directory (a second one would lose
    /// this one's records or take its volumes for orphans).
    dir_locks: std::sync::Mutex<Vec<DirLock>>,
    pub cfg: Config,
    pub node_id: String,
    pub topology_key: String,
    pub store: Arc<Store>,
    pub locks: Arc<OpLocks>,
    pub os: Os,
    /// Berth's own directories, which no node RPC may mount on or remove.
    pub protected: crate::node::paths::Protected,
    /// Where each volume is staged (`node::staged`).
    pub staged: Arc<crate::node::staged::StagedAt>,
    kinds: BTreeMap<Kind, Arc<dyn VolumeKind>>,
    /// True while start-up work that runs after the socket is up (remote
    /// kinds' interrupted operations) is not done: Probe is not ready.
    reconciling: AtomicBool,
}

impl Driver {
    /// Opens the state, prepares each enabled kind and reconciles records left
    /// half done by a crash.
    pub fn new(mut cfg: Config, os: Os) -> Result<Arc<Driver>> {
        cfg.absolutize(os.files.as_ref())
            .map_err(|e| Error::os("resolving the data directories", e))?;
        let node_id = cfg.resolved_node_id().map_err(Error::Invalid)?;
        check_dirs_apart(&os, &cfg)?;
        check_other_berths(&os, &cfg)?;
        for (flag, d) in own_dirs_resolved(&os, &cfg)? {
            crate::os::files::check_dir_usable(&d)
                .map_err(|why| Error::Invalid(format!("{flag}: {why}")))?;
        }
        let state_dir = cfg.state_dir();
        let mut dir_locks = vec![prepare_dir(&os, &state_dir, "state directory")?];
        // Files of Probe checks a kill interrupted (the lock is ours: no
        // check of another berth is running).
        crate::identity::remove_probe_leftovers(os.files.as_ref(), &state_dir);
        for k in &cfg.kinds {
            match k {
                Kind::Local => dir_locks.push(prepare_dir(&os, &cfg.local_root(), "local root")?),
                Kind::Block => dir_locks.push(prepare_dir(&os, &cfg.block_root(), "block root")?),
                Kind::Nfs => {}
            }
        }
        // A local root of thousands of volumes is listed (for
        // `reconcile_orphans`) while the state is read.
        let local_root = cfg.kinds.contains(&Kind::Local).then(|| cfg.local_root());
        let (store, mut listed) = std::thread::scope(|sc| {
            let files = os.files.as_ref();
            let listed = local_root
                .as_deref()
                .map(|root| sc.spawn(move || crate::kinds::local::list_root(files, root)));
            let store = Store::open(&state_dir, os.files.clone());
            (store, listed.and_then(|h| h.join().ok()))
        });
        let store = Arc::new(store?);
        // Before anything is acted on: records made under another driver
        // name are stranded under this one (`state::driver_name`).
        crate::state::driver_name::check(
            os.files.as_ref(),
            &state_dir,
            &cfg.driver_name,
            store.len() + store.snapshot_len(),
        )
        .map_err(|e| match e {
            crate::state::StateError::DriverName { .. } => Error::WrongState(e.to_string()),
            e => Error::State(e),
        })?;
        let protected = crate::node::paths::Protected::new(
            os.files.as_ref(),
            &[state_dir.clone(), cfg.local_root(), cfg.block_root()],
            &cfg.socket_path()
                .ok()
                .and_then(|p| std::path::absolute(p).ok())
                .into_iter()
                .collect::<Vec<_>>(),
        )
        .map_err(|e| Error::os("resolving Berth's own directories and socket", e))?;
        // Read once the state directory is this process's (`Store::open`
        // takes its lock); a path no node RPC accepts is not taken in.
        let staged = Arc::new(crate::node::staged::StagedAt::open(
            &state_dir,
            os.files.clone(),
            &protected,
        ));
        // The local kind first: the block kind keeps its promises in mind
        // where the two roots share a filesystem.
        let local = if cfg.kinds.contains(&Kind::Local) {
            Some(Arc::new(LocalKind::new(
                cfg.local_root(),
                &node_id,
                os.clone(),
                store.clone(),
                staged.clone(),
                listed.take(),
                usize::try_from(cfg.local_spare_dirs).unwrap_or(0),
            )?))
        } else {
            None
        };
        let mut kinds: BTreeMap<Kind, Arc<dyn VolumeKind>> = BTreeMap::new();
        for k in &cfg.kinds {
            let imp: Arc<dyn VolumeKind> = match (k, &local) {
                (Kind::Local, Some(l)) => l.clone(),
                (Kind::Local, None) => continue,
                (Kind::Block, _) => Arc::new(BlockKind::new(
                    &cfg,
                    &node_id,
                    os.clone(),
                    store.clone(),
                    local.clone(),
                    staged.clone(),
                )?),
                (Kind::Nfs, _) => Arc::new(NfsKind::new(
                    state_dir.join("nfs"),
                    std::time::Duration::from_secs(cfg.nfs_timeout),
                    AllowedShares(cfg.nfs_allowed_shares.clone()),
                    os.clone(),
                )),
            };
            kinds.insert(*k, imp);
        }
        check_presence(&kinds, &store, &node_id, cfg.allow_missing_storage)?;
        let d = Arc::new(Driver {
            protected,
            staged,
            dir_locks: std::sync::Mutex::new(dir_locks),
            topology_key: cfg.topology_key(),
            node_id,
            cfg,
            store,
            locks: OpLocks::new(),
            os,
            kinds,
            reconciling: AtomicBool::new(false),
        });
        d.reconcile()?;
        Ok(d)
    }

    /// Lets go of the directory locks, as process exit does. For tests that
    /// simulate a crash by leaking a driver in the same process.
    #[doc(hidden)]
    pub fn release_dir_locks(&self) {
        self.dir_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Starts what runs once the socket is up: emptying the local trash
    /// start-up found (on the background thread: a deleted volume of
    /// millions of files holds up no RPC), and the interrupted creates and
    /// deletes of remote kinds (NFS), on their own thread holding their
    /// volumes' guards, so a server that does not answer delays only them
    /// (Probe answers ready meanwhile: `identity::probe`). Call once, after
    /// binding the socket.
    pub fn start(self: &Arc<Self>) {
        // What start-up left to the background thread: the local trash.
        for k in self.kinds.values() {
            k.start_background();
        }
        let remote = |k: &Kind| self.kinds.get(k).is_some_and(|k| k.remote());
        let pending = self
            .store
            .filter(|r| r.phase != Phase::Ready && remote(&r.kind));
        let snaps = self
            .store
            .snapshot_filter(|s| s.phase != Phase::Ready && remote(&s.kind));
        if pending.is_empty() && snaps.is_empty() {
            return;
        }
        let mut work = Vec::new();
        for rec in pending {
            let mut guard = match self.locks.try_lock(vol_key(&rec.id)) {
                Ok(g) => g,
                Err(_) => continue,
            };
            if guard.also(name_key(&rec.name)).is_err() {
                continue;
            }
            work.push((guard, rec));
        }
        let mut snap_work = Vec::new();
        for snap in snaps {
            let guard = self
                .locks
                .try_lock(crate::controller::snapshot::snap_key(&snap.id))
                .and_then(|mut g| {
                    g.also(crate::controller::snapshot::snap_name_key(&snap.name))?;
                    Ok(g)
                });
            if let Ok(g) = guard {
                snap_work.push((g, snap));
            }
        }
        self.reconciling.store(true, Ordering::SeqCst);
        let (d, count) = (self.clone(), crate::rpc::InFlight::start());
        std::thread::spawn(move || {
            let _count = count;
            // Interrupted snapshots first: never reported ready, removed.
            for (guard, snap) in snap_work {
                let _guard = guard;
                if let Ok(k) = d.kind(snap.kind).cloned() {
                    d.remove_pending_snapshot(k.as_ref(), &snap.id);
                }
            }
            for (guard, rec) in work {
                let _guard = guard;
                tracing::info!(volume_id = %rec.id, phase = ?rec.phase, "reconciling interrupted operation");
                let done = d
                    .kind(rec.kind)
                    .cloned()
                    .and_then(|k| d.finish_delete(k.as_ref(), &rec));
                if let Err(e) = done {
                    tracing::error!(volume_id = %rec.id, error = %e.render(), "could not finish interrupted operation; will retry");
                }
            }
            d.reconciling.store(false, Ordering::SeqCst);
            tracing::info!("interrupted operations of remote volumes reconciled");
        });
    }

    /// RESOURCE_EXHAUSTED for a request that would write a new record
    /// (CreateVolume, CreateSnapshot) while the filesystem of the state
    /// directory is full and the journal's reserve is short
    /// (`Store::reserve_short`): what is left of the reserve is kept for
    /// the changes that give space back (deletes). Otherwise a retried
    /// create on the full filesystem (a CreateSnapshot that fails copying,
    /// retried by the snapshot controller: two lines each) used it up, and
    /// the deletes that would have freed space failed with ENOSPC.
    pub fn check_journal_room(&self) -> Result<()> {
        if self.store.reserve_short() {
            return Err(Error::NoSpace(format!(
                "the filesystem of the state directory {} is full: the journal keeps what space it has left for deletes; free space there (delete volumes or snapshots)",
                self.cfg.state_dir().display()
            )));
        }
        Ok(())
    }

    /// True until the work `start` began is done.
    pub fn reconciling(&self) -> bool {
        self.reconciling.load(Ordering::SeqCst)
    }

    /// The implementation of a kind this instance serves.
    pub fn kind(&self, k: Kind) -> Result<&Arc<dyn VolumeKind>> {
        self.kinds.get(&k).ok_or_else(|| {
            Error::Invalid(format!(
                "volume kind {k} is not served by this instance (--kinds)"
            ))
        })
    }

    pub fn kinds(&self) -> impl Iterator<Item = &Arc<dyn VolumeKind>> {
        self.kinds.values()
    }

    /// True when the volume id has the structure of some served kind.
    pub fn id_is_plausible(&self, id: &str) -> bool {
        self.kinds.values().any(|k| k.owns_id(id))
    }

    /// Why a volume recorded here is out of reach of this instance's
    /// configuration: its kind was taken out of `--kinds`, or (NFS) its
    /// share out of `--nfs-allowed-shares`, while it existed. None for an
    /// id a served kind owns, or one without a record. Such an id is not
    /// plausible, and was answered as an unknown one: DeleteVolume OK with
    /// the record and the storage left behind for good, node calls "does
    /// not exist".
    pub fn unserved(&self, id: &str) -> Option<String> {
        if self.id_is_plausible(id) {
            return None;
        }
        self.unserved_of(&self.store.get(id)?)
    }

    /// `unserved` of a record already read (no look at the store: it can
    /// be asked under the store's own lock, as a page is walked).
    pub fn unserved_of(&self, rec: &VolumeRecord) -> Option<String> {
        let id = rec.id.as_str();
        if self.id_is_plausible(id) {
            return None;
        }
        if !crate::kinds::is_volume_id_of(rec.kind, id) {
            return None;
        }
        let kind = rec.kind;
        if self.kinds.contains_key(&kind) {
            return (kind == Kind::Nfs).then(|| format!(
                "volume {id} was made by this berth on a share that --nfs-allowed-shares does not list any more: list the share again to use or delete the volume (its record and its directory on the share are kept)"
            ));
        }
        let served: Vec<&str> = self.cfg.kinds.iter().map(|k| k.as_str()).collect();
        Some(format!(
            "volume {id} is a {kind} volume recorded by this berth, which does not serve {kind} volumes any more (--kinds {}): serve {kind} again (--kinds) to use or delete the volume (its record and its storage are kept)",
            served.join(",")
        ))
    }

    /// `unserved` for a snapshot recorded here: why it is out of reach of
    /// this instance's configuration (its kind taken out of `--kinds`, or,
    /// NFS, its share out of `--nfs-allowed-shares`), None when it is
    /// served. Such a snapshot is not an unknown one: DeleteSnapshot
    /// answering OK would have the CO forget it while its record and its
    /// copy stay for good.
    pub fn unserved_snapshot(&self, rec: &crate::state::SnapshotRecord) -> Option<String> {
        let kind = rec.kind;
        if let Some(k) = self.kinds.get(&kind) {
            // An NFS snapshot on a share --nfs-allowed-shares no longer
            // lists: the kind takes its id for one that is not Berth's,
            // and its delete did nothing while the record went.
            let off_share = kind == Kind::Nfs
                && crate::kinds::nfs::id::SnapshotId::parse(&rec.id).is_ok()
                && !k.owns_snapshot_id(&rec.id);
            return off_share.then(|| format!(
                "snapshot {} was made by this berth on a share that --nfs-allowed-shares does not list any more: list the share again to use or delete the snapshot (its record and its copy on the share are kept)",
                rec.id
            ));
        }
        let served: Vec<&str> = self.cfg.kinds.iter().map(|k| k.as_str()).collect();
        Some(format!(
            "snapshot {} is a {kind} snapshot recorded by this berth, which does not serve {kind} volumes any more (--kinds {}): serve {kind} again (--kinds) to use or delete the snapshot (its record and its copy are kept)",
            rec.id,
            served.join(",")
        ))
    }

    /// The record of a volume that exists (not still Creating) but is out
    /// of reach of this configuration (`unserved`): the controller's
    /// queries report it, with an abnormal condition saying why
    /// (`controller::volume::condition`), rather than NOT_FOUND, which
    /// has a CO take it for gone. None for any other id.
    pub fn unserved_record(&self, id: &str) -> Option<VolumeRecord> {
        self.unserved(id)?;
        self.store.get(id).filter(|r| r.phase != Phase::Creating)
    }

    /// NOT_FOUND for `id`, saying why when it is recorded here but out of
    /// reach of the configuration (`unserved`).
    fn not_found(&self, id: &str) -> Error {
        Error::NotFound(
            self.unserved(id)
                .unwrap_or_else(|| format!("volume {id} does not exist")),
        )
    }

    /// The record of an existing volume (NOT_FOUND otherwise). Records still
    /// being created do not exist yet for other RPCs. A volume with a
    /// self-describing id (NFS) that has no record here (a node plugin, or a
    /// controller that lost its state) gets the record its id describes.
    pub fn volume(&self, id: &str) -> Result<VolumeRecord> {
        if !self.id_is_plausible(id) {
            return Err(self.not_found(id));
        }
        match self.store.get(id) {
            Some(r) if r.phase != Phase::Creating => Ok(r),
            Some(_) => Err(Error::NotFound(format!("volume {id} does not exist"))),
            None => self
                .record_from_id(id)
                .ok_or_else(|| Error::NotFound(format!("volume {id} does not exist"))),
        }
    }

    /// `volume` for controller calls: a volume with a self-describing id and
    /// no record here exists only when its storage says so (NFS: the
    /// directory's marker names the id), else NOT_FOUND.
    pub fn controller_volume(&self, id: &str) -> Result<VolumeRecord> {
        let missing = || Error::NotFound(format!("volume {id} does not exist"));
        if !self.id_is_plausible(id) {
            return Err(self.not_found(id));
        }
        match self.store.get(id) {
            Some(r) if r.phase != Phase::Creating => Ok(r),
            Some(_) => Err(missing()),
            None => {
                for k in self.kinds.values() {
                    if let Some(rec) = k.confirm_from_id(id)? {
                        return Ok(rec);
                    }
                }
                Err(missing())
            }
        }
    }

    /// The `op_deadline` of the kind that owns the snapshot id `id`, if
    /// any (`query_within`).
    pub fn snapshot_deadline(&self, id: &str) -> Option<std::time::Duration> {
        self.kinds
            .values()
            .find(|k| k.owns_snapshot_id(id))
            .and_then(|k| k.op_deadline())
    }

    /// A snapshot with a self-describing id (NFS) and no record here, once
    /// its storage proves that it is complete (blocking: it may mount a
    /// share). None for any other id.
    pub fn snapshot_from_storage(&self, id: &str) -> Result<Option<crate::state::SnapshotRecord>> {
        for k in self.kinds.values() {
            if k.owns_snapshot_id(id) {
                if let Some(s) = k.confirm_snapshot(id)? {
                    return Ok(Some(s));
                }
            }
        }
        Ok(None)
    }

    /// The served kind whose id structure `id` has, record or not.
    pub fn kind_of_id(&self, id: &str) -> Option<&Arc<dyn VolumeKind>> {
        self.kinds.values().find(|k| k.owns_id(id))
    }

    /// NodeUnpublishVolume of `id` at `target`, by the kind whose id it
    /// has; for an id no served kind has (an NFS share no longer allowed,
    /// a kind no longer served), by NFS when it is served (it unmounts NFS
    /// and any other mounts), else plainly; never a mount of another
    /// volume's storage (`refuse_volume_storage`).
    pub fn unpublish(&self, id: &str, target: &std::path::Path) -> Result<()> {
        let owner = self.kind_of_id(id);
        if owner.is_none() || !self.store.contains(id) {
            self.refuse_volume_storage(id, target)?;
        }
        if let Some(k) = owner {
            return k.unpublish(id, target);
        }
        match self.kinds.get(&Kind::Nfs) {
            Some(k) => k.unpublish(id, target),
            None => crate::node::mounts::unpublish(&self.os, target),
        }
    }

    /// For an id without a record here (or one no served kind owns):
    /// FAILED_PRECONDITION when `path` shows a directory in the state
    /// directory or a kind's root (a volume's storage), other than
    /// `<root>/<id>` itself (the volume of a kind no longer served, which
    /// its own id still tears down), or storage a served kind recorded for
    /// another volume (a block volume's loop device or disk: its
    /// filesystem, or its device node bound for a raw volume), whatever
    /// the id looks like: an id no served kind owns must not take down a
    /// block volume's mounts any more than an unknown block id does.
    pub fn refuse_volume_storage(&self, id: &str, path: &std::path::Path) -> Result<()> {
        let roots = [
            self.cfg.state_dir(),
            self.cfg.local_root(),
            self.cfg.block_root(),
        ];
        crate::node::mounts::refuse_root_storage(&self.os, &roots, id, path)?;
        for k in self.kinds.values() {
            k.refuse_recorded(id, path)?;
        }
        Ok(())
    }

    /// The record a served kind rebuilds from a self-describing id alone.
    pub fn record_from_id(&self, id: &str) -> Option<VolumeRecord> {
        self.kinds.values().find_map(|k| k.record_from_id(id))
    }

    /// Runs a blocking operation to completion on another thread (see
    /// `handoff`), holding the per-volume guard. If the client goes away
    /// the operation still finishes (and only then releases the guard).
    pub async fn run<T, F>(self: &Arc<Self>, guard: OpGuard, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Driver) -> Result<T> + Send + 'static,
    {
        let d = self.clone();
        let count = crate::rpc::InFlight::start();
        crate::handoff::run(move || {
            let _count = count;
            let _guard = guard;
            f(&d)
        })
        .await
        .map_err(|e| Error::Internal(format!("operation task failed: {e}")))?
    }

    /// `run`, answering DEADLINE_EXCEEDED once `deadline` (a kind's
    /// `op_deadline`) passed: the operation goes on on its thread and
    /// keeps `guard` until it ends (its result is then dropped), so a
    /// retry meanwhile is ABORTED rather than a second operation on the
    /// same storage, and the retry after it finds what it did.
    pub async fn run_within<T, F>(
        self: &Arc<Self>,
        guard: OpGuard,
        deadline: Option<std::time::Duration>,
        f: F,
    ) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Driver) -> Result<T> + Send + 'static,
    {
        let Some(limit) = deadline else {
            return self.run(guard, f).await;
        };
        match tokio::time::timeout(limit, self.run(guard, f)).await {
            Ok(r) => r,
            Err(_) => Err(Error::Deadline(format!(
                "the operation did not end within {} s (the storage does not answer); it goes on, and a retry is ABORTED until it ends",
                limit.as_secs()
            ))),
        }
    }

    /// The blocking work of a controller query (ControllerGetVolume,
    /// ValidateVolumeCapabilities, GetSnapshot, ListSnapshots by id) that
    /// may look at the storage of the volume or snapshot whose guard is
    /// `key`. With a kind's `deadline` (`op_deadline`: NFS, whose server
    /// may stop answering) it runs as `run_within` under that guard: the
    /// call answers DEADLINE_EXCEEDED once the deadline passed, and the
    /// look goes on holding the guard, so a query or operation of the same
    /// id meanwhile is ABORTED rather than another look piling up behind a
    /// server that does not answer. Before 2026-12-07 such a query waited
    /// for the server without end. Without a deadline, on a blocking
    /// thread without a guard (`what` names the task in an error).
    pub async fn query_within<T, F>(
        self: &Arc<Self>,
        key: String,
        deadline: Option<std::time::Duration>,
        what: &str,
        f: F,
    ) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Driver) -> Result<T> + Send + 'static,
    {
        if deadline.is_none() {
            let d = self.clone();
            return tokio::task::spawn_blocking(move || f(&d))
                .await
                .map_err(|e| Error::Internal(format!("{what} task failed: {e}")))?;
        }
        let guard = self.locks.try_lock(key)?;
        self.run_within(guard, deadline, f).await
    }

    /// Takes the volume's guard, then runs `f` with its record and kind on a
    /// blocking thread (see `run`). NOT_FOUND for an unknown volume.
    pub async fn with_volume<T, F>(self: &Arc<Self>, id: &str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Driver, VolumeRecord, &dyn VolumeKind) -> Result<T> + Send + 'static,
    {
        self.with_volume_at(id, &[], f).await
    }

    /// `with_volume` for a controller call that changes the volume's
    /// record (ControllerPublishVolume): the volume as
    /// `controller_volume` finds it, so a self-describing id (NFS) without
    /// a record here is a volume only when its storage says so (its
    /// marker), never one made up from the id alone; within the kind's
    /// `op_deadline` (that look may mount a share), as `run_within`.
    pub async fn with_controller_volume<T, F>(self: &Arc<Self>, id: &str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Driver, VolumeRecord, &dyn VolumeKind) -> Result<T> + Send + 'static,
    {
        let guard = self.locks.try_lock(vol_key(id))?;
        let deadline = self.kind_of_id(id).and_then(|k| k.op_deadline());
        let id = id.to_string();
        self.run_within(guard, deadline, move |d| {
            let rec = d.controller_volume(&id)?;
            let kind = d.kind(rec.kind)?.clone();
            f(d, rec, kind.as_ref())
        })
        .await
    }

    /// `with_volume`, also holding the guards of the node paths it mounts
    /// on (`path_key`): an operation of another volume on one of them is
    /// ABORTED rather than mounting there beside this one.
    pub async fn with_volume_at<T, F>(
        self: &Arc<Self>,
        id: &str,
        paths: &[&Path],
        f: F,
    ) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Driver, VolumeRecord, &dyn VolumeKind) -> Result<T> + Send + 'static,
    {
        let mut guard = self.locks.try_lock(vol_key(id))?;
        for p in paths {
            guard.also(path_key(p))?;
        }
        let id = id.to_string();
        self.run(guard, move |d| {
            let rec = d.volume(&id)?;
            let kind = d.kind(rec.kind)?.clone();
            f(d, rec, kind.as_ref())
        })
        .await
    }

    /// The guard of the place a node path reaches when a symlink in its
    /// parents makes that another spelling than the one given (`real`, from
    /// `Protected::resolve`; the given one is guarded before the RPC's
    /// blocking work starts): one place named two ways is still one place,
    /// and another volume's call there is ABORTED. Held while it lives.
    pub fn guard_real_path(&self, real: Option<&Path>) -> Result<Option<OpGuard>> {
        real.map(|r| self.locks.try_lock(path_key(r))).transpose()
    }

    /// NOT_FOUND for a volume whose delete began (its record Deleting: a
    /// DeleteVolume that failed half way, which the CO retries and
    /// `retry_pending` retries every minute without DeleteVolume's check
    /// of attachments): the CO asked for it gone, so it is not published
    /// or staged again. Calls that take a volume down still find it.
    pub fn require_not_deleting(&self, rec: &VolumeRecord) -> Result<()> {
        if rec.phase == Phase::Deleting {
            return Err(Error::NotFound(format!(
                "volume {} is being deleted (a DeleteVolume of it did not finish; its retry does)",
                rec.id
            )));
        }
        Ok(())
    }

    /// NOT_FOUND unless a node-local volume lives on this node.
    pub fn require_local_here(&self, rec: &VolumeRecord) -> Result<()> {
        if !rec.node.is_empty() && *rec.node != *self.node_id {
            return Err(Error::NotFound(format!(
                "volume {} lives on node {}, not on this node {}",
                rec.id, rec.node, self.node_id
            )));
        }
        Ok(())
    }

    /// At a clean exit, with nothing in flight: waits (at most `wait`) for
    /// the background thread's work (a trash being emptied, spares being
    /// made), then removes the spare directories no create took, so that a
    /// stopped berth leaves in its roots only what its volumes hold. Work
    /// still running after `wait` is left to the next start, and so are
    /// the spares then.
    pub fn before_exit(&self, wait: std::time::Duration) {
        if !crate::background::wait_idle(wait) {
            tracing::warn!("background work still running at exit; the next start finishes it");
            return;
        }
        for kind in self.kinds.values() {
            kind.drop_spares();
        }
    }

    /// Finishes what a crash interrupted (remote kinds later, in `start`): a
    /// volume half created is rolled back
    /// (its CreateVolume call failed, and a retry creates it again); a volume
    /// half deleted is deleted. Then each kind cleans up storage without a
    /// record (`reconcile_orphans`).
    pub fn reconcile(self: &Arc<Self>) -> Result<()> {
        self.recover_copy_sources();
        // The trash the deletes finished just now is emptied on the
        // background thread, as is the trash start-up finds
        // (`start_background`, once the socket is up): nothing here waits
        // for it. The orphans are looked for beside it: a trash entry of a
        // volume whose record is gone is only ever removed there, in turn.
        self.retry_pending(true);
        for kind in self.kinds.values() {
            let known = |id: &str| self.store.contains(id) || self.store.snapshot_contains(id);
            if let Err(e) = kind.reconcile_orphans(&known) {
                tracing::error!(kind = %kind.kind(), error = %e.render(), "could not reconcile orphaned storage");
            }
        }
        Ok(())
    }

    /// The sources of copies a crash interrupted (snapshots still Creating,
    /// clones of a volume still Creating) get back what the copy took from
    /// them (`VolumeKind::recover_copy_source`: a frozen filesystem is
    /// thawed). At start-up, before the interrupted operations are removed.
    fn recover_copy_sources(&self) {
        let mut sources: Vec<String> = self
            .store
            .snapshot_filter(|s| s.phase == Phase::Creating)
            .into_iter()
            .map(|s| s.source_volume_id)
            .collect();
        sources.extend(
            self.store
                .filter(|r| {
                    r.phase == Phase::Creating
                        && matches!(r.content_source(), Some(ContentSource::Volume(_)))
                })
                .into_iter()
                .filter_map(|r| match r.content_source() {
                    Some(ContentSource::Volume(v)) => Some(v.clone()),
                    _ => None,
                }),
        );
        sources.sort();
        sources.dedup();
        for id in sources {
            let Some(vol) = self.store.get(&id) else {
                continue;
            };
            if let Ok(kind) = self.kind(vol.kind) {
                kind.recover_copy_source(&vol);
            }
        }
    }

    /// Finishes every record left half created or half deleted that no
    /// operation holds now: at start-up (`startup`: quick ones before
    /// serving), and every `RETRY_INTERVAL` while serving, so a delete that
    /// failed (a disk that was missing, a busy mount) is retried without a
    /// restart. A delete that may take long (`VolumeKind::slow_delete`), and
    /// every retry while serving, runs on its own thread holding the
    /// volume's and the name's guard (other RPCs on that volume answer
    /// ABORTED meanwhile; shutdown waits for it like for any operation).
    pub fn retry_pending(self: &Arc<Self>, startup: bool) {
        self.retry_pending_snapshots(startup);
        let pending = self.store.filter(|r| r.phase != Phase::Ready);
        for rec in pending {
            let Ok(kind) = self.kind(rec.kind).cloned() else {
                if startup {
                    tracing::warn!(volume_id = %rec.id, kind = %rec.kind, "record of a kind not served here left as is");
                }
                continue;
            };
            if startup && kind.remote() {
                // Once the socket is up: see `start`.
                continue;
            }
            let guard = self.locks.try_lock(vol_key(&rec.id)).and_then(|mut g| {
                g.also(name_key(&rec.name))?;
                Ok(g)
            });
            let Ok(guard) = guard else {
                // An operation on it is in flight; it finishes it or fails.
                continue;
            };
            tracing::info!(volume_id = %rec.id, phase = ?rec.phase, "finishing interrupted operation");
            if startup && !kind.slow_delete(&rec) {
                if let Err(e) = self.finish_delete(kind.as_ref(), &rec) {
                    tracing::error!(volume_id = %rec.id, error = %e.render(), "could not finish interrupted operation; will retry");
                }
                drop(guard);
                continue;
            }
            let (d, count) = (self.clone(), crate::rpc::InFlight::start());
            std::thread::spawn(move || {
                let (_guard, _count) = (guard, count);
                // Read again under the guard: it may be done meanwhile.
                let Some(rec) = d.store.get(&rec.id).filter(|r| r.phase != Phase::Ready) else {
                    return;
                };
                if let Err(e) = d.finish_delete(kind.as_ref(), &rec) {
                    tracing::warn!(volume_id = %rec.id, error = %e.render(), "could not finish interrupted operation; will retry");
                }
            });
        }
    }
}

impl Driver {
    /// Snapshots left half made (an interrupted CreateSnapshot: never
    /// reported ready) or half deleted: their copy is removed, then their
    /// record. Local copies are removed quickly, so this runs in place;
    /// those of remote kinds (NFS), whose server may not answer, not before
    /// serving (`startup`: `start` does them) and on their own thread
    /// holding their guard while serving.
    fn retry_pending_snapshots(self: &Arc<Self>, startup: bool) {
        for snap in self.store.snapshot_filter(|s| s.phase != Phase::Ready) {
            let Ok(kind) = self.kind(snap.kind).cloned() else {
                continue;
            };
            if startup && kind.remote() {
                continue;
            }
            let guard = self
                .locks
                .try_lock(crate::controller::snapshot::snap_key(&snap.id))
                .and_then(|mut g| {
                    g.also(crate::controller::snapshot::snap_name_key(&snap.name))?;
                    Ok(g)
                });
            let Ok(guard) = guard else {
                continue;
            };
            if kind.remote() {
                let (d, count) = (self.clone(), crate::rpc::InFlight::start());
                std::thread::spawn(move || {
                    let (_guard, _count) = (guard, count);
                    d.remove_pending_snapshot(kind.as_ref(), &snap.id);
                });
            } else {
                self.remove_pending_snapshot(kind.as_ref(), &snap.id);
                drop(guard);
            }
        }
    }

    /// Removes the copy, then the record, of the snapshot `id` if it is
    /// still unfinished or half deleted (read again under its guard).
    fn remove_pending_snapshot(&self, kind: &dyn VolumeKind, id: &str) {
        let Some(snap) = self
            .store
            .snapshot_get(id)
            .filter(|s| s.phase != Phase::Ready)
        else {
            return;
        };
        tracing::info!(snapshot_id = %snap.id, phase = ?snap.phase, "removing an interrupted snapshot");
        let r = kind
            .delete_snapshot(&snap)
            .and_then(|_| Ok(self.store.snapshot_remove(&snap.id)?));
        if let Err(e) = r {
            tracing::warn!(snapshot_id = %snap.id, error = %e.render(), "could not remove an interrupted snapshot; will retry");
        }
    }
}

/// How often a serving berth retries what is left half done.
pub const RETRY_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

impl Driver {
    /// Deletes the storage of an interrupted create or delete, then its
    /// record. A delete (record Deleting) is refused, as DeleteVolume
    /// refuses it, while the volume is still published to a node or
    /// mounted here (`refuse_in_use`): what was in place before its delete
    /// began, or what its check did not see, is not erased, trashed or
    /// archived under its user. Retried every minute until the CO has
    /// taken it down (ControllerUnpublishVolume, NodeUnpublishVolume and
    /// NodeUnstageVolume still find the record). An unfinished create
    /// (Creating) is left to the kind, which keeps or holds what may have
    /// been handed out (`delete_with`) rather than refusing.
    fn finish_delete(&self, kind: &dyn VolumeKind, rec: &VolumeRecord) -> Result<()> {
        let mount_table = crate::node::mounts::LazyTable::new();
        if rec.phase == Phase::Deleting {
            crate::controller::delete_volume::refuse_in_use(self, rec, kind, &mount_table)?;
        }
        kind.delete_with(rec, &mount_table)?;
        self.store.remove(&rec.id)?;
        kind.purge(rec);
        self.staged.discard(&rec.id);
        Ok(())
    }
}

/// Creates `dir` (mode 0700, parents as needed) if it is missing and takes
/// its lock. What is there is looked at through the OS layer (stat, a
/// symlink followed, as `Path::exists` looks); a look that fails takes the
/// directory for missing, and `ensure_dir` then finds it there.
fn prepare_dir(os: &Os, dir: &std::path::Path, what: &str) -> Result<DirLock> {
    let exists = |p: &std::path::Path| os.files.stat(p).is_ok();
    if !exists(dir) {
        let mut missing: Vec<&std::path::Path> =
            dir.ancestors().take_while(|p| !exists(p)).collect();
        missing.reverse();
        for p in missing {
            crate::os::files::ensure_dir(os.files.as_ref(), p, 0o700)
                .map_err(|e| Error::os(format!("creating {what} {}", dir.display()), e))?;
        }
        if let Some(parent) = dir.parent() {
            os.files
                .sync_dir(parent)
                .map_err(|e| Error::os(format!("creating {what} {}", dir.display()), e))?;
        }
    }
    Ok(DirLock::acquire(&os.files, dir, what)?)
}

/// Guard key of a volume id.
pub fn vol_key(id: &str) -> String {
    format!("vol/{id}")
}

/// Guard key of a node path (a staging or target path as checked,
/// `Protected::check`): the node RPCs that mount or unmount there hold it,
/// so two volumes are never mounted at one path by calls that both looked
/// before either mounted.
pub fn path_key(p: &Path) -> String {
    format!("path {}", p.display())
}

/// Guard key of a volume name.
pub fn name_key(name: &str) -> String {
    format!("name/{name}")
}

pub fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

use crate::node::paths::{host_dir, HostDir};

/// The state directory and the roots of the kinds served are distinct and
/// none is inside another (a root inside the state directory, or the other
/// way round, would take the other's files for volumes or orphans); none is
/// `/`, a system directory or inside one (`/etc`, `/usr`, `/proc`, ...), or
/// a directory every program shares (`/var`, `/tmp`, `/home`, ...).
/// Compared as the kernel resolves them (symlinks, `..`).
/// INVALID_ARGUMENT before anything is touched.
fn check_dirs_apart(os: &Os, cfg: &Config) -> Result<()> {
    let dirs = own_dirs_resolved(os, cfg)?;
    for (flag, d) in &dirs {
        let why = match host_dir(d) {
            None => continue,
            Some(HostDir::Root) => format!("{flag} must not be /"),
            Some(HostDir::System(sys)) => format!(
                "{flag} {} is in the system directory {sys}: give Berth a directory of its own, e.g. under /var/lib",
                d.display()
            ),
            Some(HostDir::Shared) => format!(
                "{flag} {} is a directory the whole host shares: give Berth a directory of its own inside it, e.g. {}/berth",
                d.display(),
                d.display()
            ),
        };
        return Err(Error::Invalid(why));
    }
    for (i, (fa, a)) in dirs.iter().enumerate() {
        for (fb, b) in &dirs[i + 1..] {
            if a.starts_with(b) || b.starts_with(a) {
                return Err(Error::Invalid(format!(
                    "{fa} {} and {fb} {} overlap: each needs a directory of its own, neither inside the other",
                    a.display(),
                    b.display()
                )));
            }
        }
    }
    Ok(())
}

/// The state directory and the roots of the kinds served, with the flag
/// that names each, as the kernel resolves them (symlinks, `..`), read
/// through `os.files`; one that cannot be resolved is an error.
fn own_dirs_resolved(os: &Os, cfg: &Config) -> Result<Vec<(&'static str, PathBuf)>> {
    let mut dirs = vec![("--state-dir", cfg.state_dir())];
    if cfg.kinds.contains(&Kind::Local) {
        dirs.push(("--local-root", cfg.local_root()));
    }
    if cfg.kinds.contains(&Kind::Block) {
        dirs.push(("--block-root", cfg.block_root()));
    }
    dirs.into_iter()
        .map(|(f, d)| {
            crate::node::paths::resolved_fully(os.files.as_ref(), &d)
                .map(|r| (f, r))
                .map_err(|e| Error::os(format!("resolving {f} {}", d.display()), e))
        })
        .collect()
}

/// How deep below each of the local root's work directories start-up
/// looks for a serving berth's directory (`<work dir>/x/state` is 2).
const OTHER_BERTH_DEPTH: u32 = 4;
/// How many directories it looks at in all, at most.
const OTHER_BERTH_BUDGET: usize = 10_000;

/// No directory of this berth lies inside a directory of another berth
/// (its state directory or a root, known by their lock file, held now or
/// left by a berth that used it), and the local root's work directories,
/// whose contents start-up removes, hold no directory of a berth that
/// serves now. Two berths each check their own directories only against
/// each other: a second berth with `--data-dir <first's local
/// root>/.trash/b` started, and the first one's next start removed the
/// second one's state and volumes while it served. INVALID_ARGUMENT
/// before anything is touched.
fn check_other_berths(os: &Os, cfg: &Config) -> Result<()> {
    use crate::state::lock::{DirLock, LOCK_FILE};
    let dirs = own_dirs_resolved(os, cfg)?;
    for (flag, d) in &dirs {
        for a in d.ancestors().skip(1) {
            let lock = a.join(LOCK_FILE);
            if os.files.lstat(&lock).is_err() {
                continue;
            }
            let who = match DirLock::holder_of(os.files.as_ref(), a) {
                Some(h) => format!("held now by {h}"),
                None => "not held now: a berth used it before".into(),
            };
            return Err(Error::Invalid(format!(
                "{flag} {} lies inside {}, a directory of another berth (its state directory or a root: {} is there, {who}); that berth takes what lies in its directories for its own and may move or remove it. Give this berth directories of its own outside it (if no berth uses {} any more, remove {} first)",
                d.display(),
                a.display(),
                lock.display(),
                a.display(),
                lock.display()
            )));
        }
    }
    if let Some((_, root)) = dirs.iter().find(|(f, _)| *f == "--local-root") {
        let mut budget = OTHER_BERTH_BUDGET;
        for sub in crate::kinds::local::WORK_DIRS {
            let work = root.join(sub);
            if let Some((dir, holder)) =
                DirLock::held_below(os.files.as_ref(), &work, OTHER_BERTH_DEPTH, &mut budget)
            {
                return Err(Error::Invalid(format!(
                    "--local-root {} holds in {}, whose contents berth removes at start-up, {}, a directory of a berth serving now ({holder}): stop that berth and move its directories out of {} before this one starts",
                    root.display(),
                    work.display(),
                    dir.display(),
                    root.display()
                )));
            }
        }
    }
    Ok(())
}

/// Before anything is changed at start-up: a local or block root that holds
/// none of the volumes recorded for it is the wrong directory (a changed
/// --local-root) or a filesystem not mounted yet (a data disk mounted late
/// at boot). Serving would create new volumes on the wrong filesystem
/// (hidden once the right one is mounted over it) and answer for the
/// recorded ones as if lost, so berth refuses to start, unless told that
/// the storage is gone for good. A root that lacks only some of its
/// volumes is reported. The mirror case stops start-up too: volumes in a
/// root that the state has no record of, some or all of them (records
/// lost: a cut journal, an older state directory, `state repair`), which
/// would otherwise vanish from view; `--allow-missing-storage` keeps them
/// aside. Volumes recorded on another node id (a changed --node-id) are
/// reported too: they cannot be staged here.
fn check_presence(
    kinds: &BTreeMap<Kind, Arc<dyn VolumeKind>>,
    store: &Store,
    node_id: &str,
    allow_missing: bool,
) -> Result<()> {
    for kind in kinds.values() {
        let Some(p) = kind.presence() else { continue };
        if p.unrecorded.0 > 0 && !allow_missing {
            let (n, s) = (p.unrecorded.0, if p.unrecorded.0 == 1 { "" } else { "s" });
            let (what, root) = (p.what, p.root.display());
            let examples = p.unrecorded.1.join(", ");
            let (which, cause) = if p.recorded > 0 {
                (
                    format!("no record of {n} volume{s} in the {what} {root} (e.g. {examples}), though it records {m} other{ms} of that kind", m = p.recorded, ms = if p.recorded == 1 { "" } else { "s" }),
                    "records were lost (a damaged or cut journal, a state directory restored from an older backup, records dropped by `berth state repair`) or another berth's state directory uses this root",
                )
            } else {
                (
                    format!("no record of a volume in the {what} {root}, but it holds {n} volume{s} (e.g. {examples})"),
                    "the state directory is not the one they were made with (was --state-dir or --data-dir changed?) or its journal was removed",
                )
            };
            return Err(Error::WrongState(format!(
                "the state directory holds {which}: {cause}. Berth does not start, so that nothing there is moved and no volume is lost from view: give berth the state directory they were recorded in (`berth state check` lists the volumes without a record); if their records are gone for good, start with --allow-missing-storage (BERTH_ALLOW_MISSING_STORAGE=true): they are then kept aside in {root}/.orphaned, never deleted"
            )));
        }
        if p.present == p.expected {
            continue;
        }
        let examples = p.missing.join(", ");
        if p.present == 0 && !allow_missing {
            return Err(Error::WrongState(format!(
                "the {what} {root} holds none of the {n} volumes recorded for it (missing: {examples}): it is not the directory they were made in (was --{flag} changed?) or its filesystem is not mounted yet. Berth does not start, so that no volume is created on the wrong filesystem: mount the filesystem or give the {what} the volumes were made in; if their storage is gone for good, start with --allow-missing-storage (BERTH_ALLOW_MISSING_STORAGE=true) and delete their PVs (`berth state check` lists them)",
                what = p.what,
                root = p.root.display(),
                n = p.expected,
                flag = p.what.replace(' ', "-"),
            )));
        }
        tracing::error!(
            root = %p.root.display(),
            missing = p.expected - p.present,
            recorded = p.expected,
            examples = %examples,
            "{} volumes recorded for the {} have no storage there: they report an abnormal condition; `berth state check` lists them",
            p.expected - p.present,
            p.what
        );
    }
    let elsewhere = store.count(|r| {
        matches!(r.kind, Kind::Local | Kind::Block) && !r.node.is_empty() && *r.node != *node_id
    });
    if elsewhere > 0 {
        tracing::warn!(
            node = %node_id,
            volumes = elsewhere,
            "{elsewhere} node-local volumes in this state were made by a berth with another node id (was --node-id changed?): they cannot be staged on this node until berth runs with the node id they were made on"
        );
    }
    // Records this configuration does not serve (`Driver::unserved`).
    let unserved = store.count(|r| match kinds.get(&r.kind) {
        None => true,
        Some(k) => r.kind == Kind::Nfs && !k.owns_id(&r.id),
    });
    if unserved > 0 {
        tracing::warn!(
            volumes = unserved,
            "{unserved} records in this state are of a volume kind not in --kinds, or of NFS volumes on a share not in --nfs-allowed-shares (was either changed?): they and their storage are kept as they are, and every call naming such a volume (DeleteVolume included) fails saying so until berth serves it again"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The (mkdir, path) and (fsync, path) changes the fake recorded.
    fn changes(fake: &crate::os::fake::FakeOs) -> Vec<(&'static str, PathBuf)> {
        fake.file_ops()
            .into_iter()
            .filter(|o| matches!(o.op, "mkdir" | "fsync"))
            .map(|o| (o.op, o.path))
            .collect()
    }

    /// `prepare_dir` looks at the directory and its parents through the OS
    /// layer: a directory that is there is left as it is; a missing one is
    /// made with its missing parents and its parent flushed; one whose look
    /// fails is taken for missing, and making it finds it there (no error,
    /// nothing changed in it, its lock taken).
    #[test]
    fn prepare_dir_looks_through_the_os_layer() {
        let d = tempfile::tempdir().unwrap();
        let (os, fake) = Os::fake();
        let there = d.path().join("there");
        std::fs::create_dir(&there).unwrap();
        drop(prepare_dir(&os, &there, "state directory").unwrap());
        assert!(changes(&fake).is_empty());

        let made = d.path().join("a/b");
        drop(prepare_dir(&os, &made, "state directory").unwrap());
        assert!(made.is_dir());
        assert_eq!(
            changes(&fake),
            [
                ("mkdir", d.path().join("a")),
                ("mkdir", made.clone()),
                ("fsync", d.path().join("a")),
            ]
        );

        fake.clear_file_ops();
        std::fs::write(there.join("data"), b"kept").unwrap();
        fake.fail_next("stat", libc::ENOENT);
        fake.fail_next("stat", libc::ENOENT);
        drop(prepare_dir(&os, &there, "state directory").unwrap());
        assert_eq!(
            changes(&fake),
            [("mkdir", there.clone()), ("fsync", d.path().to_path_buf())]
        );
        assert_eq!(std::fs::read(there.join("data")).unwrap(), b"kept");
    }
}
