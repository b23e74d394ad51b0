//! NFS volumes: each volume is a subdirectory of an export on an NFS server
//! the cluster already runs.
//!
//! - The volume id (`id.rs`) encodes server, share, subdirectory and the
//!   onDelete mode, so a node (which has no records) and a controller that
//!   lost its records both know the volume from its id.
//! - Controller (`share.rs`): the share is mounted at a private working
//!   directory under the state dir (one mount per server, share and option
//!   set, reused); CreateVolume makes the subdirectory, DeleteVolume deletes,
//!   archives or keeps it.
//! - Node (`node.rs`): NodePublishVolume runs `mount.nfs` of
//!   `server:/share/subdir` straight at the target (no staging); unpublish
//!   works with the server gone.
//!
//! Every mount and unmount is an external command under `--nfs-timeout`
//! that kills its process group; every statvfs of an NFS mount runs on a
//! helper thread with a short deadline.
pub mod allow;
pub mod id;
mod node;
pub mod params;
pub mod share;
pub mod snapshot;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use self::allow::AllowedShares;
use self::id::{SnapshotId, VolumeId};
use self::params::Params;
use self::share::{Marker, Removal};
use super::{
    Expansion, Growth, Health, NodeExpandArgs, PoolCapacity, PublishArgs, Source, VolumeKind,
    VolumeStats,
};
use crate::error::{Error, Result};
use crate::node::mounts::{self, LazyTable};
use crate::os::bounded::Bounded;
use crate::os::mountinfo::MountEntry;
use crate::os::{nfsmount, FsUsage, Os, OsError};
use crate::state::{AccessMode, AccessType, Capability, Kind, Phase, SnapshotRecord, VolumeRecord};

/// statvfs of an NFS mount waits at most this long (or `--nfs-timeout` if
/// shorter) before the volume is reported as not responding.
pub const STAT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct NfsKind {
    os: Os,
    /// Working mounts of shares (controller), `<state-dir>/nfs`.
    work: PathBuf,
    /// Limit of every mount and umount command.
    timeout: Duration,
    /// Limit of a statvfs of an NFS mount.
    stat_timeout: Duration,
    bounded: Bounded,
    share_locks: Mutex<HashMap<PathBuf, Arc<Mutex<ShareState>>>>,
    /// `--nfs-allowed-shares`.
    allowed: AllowedShares,
}

/// What the calls that mount a share one at a time tell each other.
#[derive(Default)]
pub(crate) struct ShareState {
    /// When a mount of the share last timed out (the server did not
    /// answer): a call that was waiting meanwhile answers that at once
    /// instead of waiting out a timeout of its own, so calls queued on a
    /// dead server do not answer one timeout after another.
    pub(crate) timed_out: Option<std::time::Instant>,
}

/// One call's use of a share's lock (`NfsKind::share_lock`).
pub(crate) struct ShareLock<'a> {
    table: &'a Mutex<HashMap<PathBuf, Arc<Mutex<ShareState>>>>,
    key: PathBuf,
    pub(crate) lock: Arc<Mutex<ShareState>>,
}

impl Drop for ShareLock<'_> {
    fn drop(&mut self) {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        // The table's reference and this one: no other call uses it, and
        // none can take it while the table is locked.
        if Arc::strong_count(&self.lock) == 2 {
            table.remove(&self.key);
        }
    }
}

/// What a bounded statvfs of an NFS mount found.
#[derive(Debug)]
pub(crate) enum Probe {
    Usage(FsUsage),
    /// ESTALE: the directory was removed or re-exported on the server.
    Stale,
    /// No answer in time, or the mount's RPCs gave up (a `soft` mount):
    /// the server is not responding.
    Hung,
    Failed(OsError),
}

pub(crate) fn is_nfs(m: &MountEntry) -> bool {
    m.fs_type == "nfs" || m.fs_type == "nfs4"
}

/// An NFS source as mountinfo shows it, split into the server (`host`,
/// `1.2.3.4` or `[v6]`) and the export path without trailing slashes (`/`
/// for the root; `host:` is `host:/`).
pub(crate) fn split_source(source: &str) -> Option<(&str, &str)> {
    let (host, path) = if source.starts_with('[') {
        let i = source.find("]:")?;
        (&source[..=i], &source[i + 2..])
    } else {
        source.split_once(':')?
    };
    if host.is_empty() || !(path.is_empty() || path.starts_with('/')) {
        return None;
    }
    let path = path.trim_end_matches('/');
    Some((host, if path.is_empty() { "/" } else { path }))
}

/// A server written as an IP literal (`10.0.0.1`, `[fd00::1]`, or `fd00::1`
/// as the kernel's `addr=` shows it).
fn ip_literal(host: &str) -> Option<std::net::IpAddr> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse::<std::net::IpAddr>()
        .ok()
        .map(|a| a.to_canonical())
}

/// The server address the kernel's NFS client talks to: the `addr=` super
/// option of the mount.
fn mount_addr(m: &MountEntry) -> Option<std::net::IpAddr> {
    m.super_options
        .split(',')
        .find_map(|o| o.strip_prefix("addr="))
        .and_then(ip_literal)
}

/// Whether `shown`, the server mountinfo shows for the NFS mount `m`, is
/// `server` (from a volume id). The kernel shares one client (and the host
/// spelling of whichever mount made it) among all mounts of one server
/// address, so another spelling is accepted:
/// - equal without ASCII case, or the same IP address;
/// - `server` an IP literal: the mount's `addr=` is that address;
/// - `server` a host name: any other spelling. Berth does not resolve the
///   name again: the address it resolves to now need not be the one the
///   mount used (changed or round-robin records), and a resolver that does
///   not answer must not keep an unmount from working; the export path and
///   the fs type still have to match exactly (`is_mount_of`), and on the
///   controller the working mount's private, hashed directory and the
///   markers on the share decide what is touched.
pub(crate) fn same_server(m: &MountEntry, shown: &str, server: &str) -> bool {
    if shown.eq_ignore_ascii_case(server) {
        return true;
    }
    match ip_literal(server) {
        Some(ip) => ip_literal(shown) == Some(ip) || mount_addr(m) == Some(ip),
        None => true,
    }
}

/// Whether mountinfo's `m` is an NFS mount of `path` (an absolute export
/// path: a volume's `/share/subdir` or a share) on `server`, allowing
/// another spelling of the server (`same_server`). The path must be the
/// same up to trailing slashes: a mount of another path is never this one.
pub(crate) fn is_mount_of(m: &MountEntry, server: &str, path: &str) -> bool {
    let want = path.trim_end_matches('/');
    let want = if want.is_empty() { "/" } else { want };
    is_nfs(m)
        && split_source(&m.source)
            .is_some_and(|(host, p)| p == want && same_server(m, host, server))
}

/// Whether `m` is the NFS mount of volume `vid` made before Berth refused
/// shares that the server resolves to another path (a symlink in the share:
/// `/export/lnk` shows as `/export/target`): the server matches and the
/// path shown ends with the volume's subdirectory, below another share.
/// Berth makes every component of a subdirectory itself and never follows
/// a symlink there, so only the share part can differ. Only unpublish
/// accepts this (such a volume must still come off its pods); publish and
/// stats do not.
fn shows_resolved_share(m: &MountEntry, vid: &VolumeId) -> bool {
    let Some((host, path)) = is_nfs(m).then(|| split_source(&m.source)).flatten() else {
        return false;
    };
    let Some(share) = path.strip_suffix(vid.subdir.as_str()) else {
        return false;
    };
    share.len() > 1
        && share.ends_with('/')
        && share.trim_end_matches('/') != vid.share
        && same_server(m, host, &vid.server)
}

/// The `Bounded` key of a statvfs of `path`.
pub(crate) fn probe_key(path: &Path) -> String {
    format!("statvfs {}", path.display())
}

fn flags_of(cap: &Capability) -> &[String] {
    match &cap.access_type {
        AccessType::Mount { mount_flags, .. } => mount_flags,
        AccessType::Block => &[],
    }
}

fn check_flags(flags: &[String]) -> Result<Vec<String>> {
    nfsmount::check_options(flags).map_err(Error::Invalid)
}

/// Options of a node's mount: the StorageClass mountOptions, the default
/// version, `ro` when read-only is asked for or the access mode is.
pub fn node_options(cap: &Capability, readonly: bool) -> Result<Vec<String>> {
    let opts = check_flags(flags_of(cap))?;
    Ok(nfsmount::with_defaults(
        opts,
        readonly || cap.access_mode.read_only(),
    ))
}

/// Options of the controller's working mount: the volume's mount options
/// (from its record) without ro/rw, plus the default version.
pub fn controller_options(rec: &VolumeRecord) -> Result<Vec<String>> {
    Ok(controller_option_sets(rec)?.swap_remove(0))
}

/// The option sets the controller's working mount tries, in order. With a
/// version in the volume's mount options, only those. Without one (the
/// StorageClass named none, or the record is lost and the options with it):
/// the default version, then NFSv4.0, then NFSv3 without the lock protocol
/// (the controller only makes and removes directories, so it needs no
/// locks, and nolock spares it rpc.statd), so a server that speaks only an
/// older version is still reached.
pub fn controller_option_sets(rec: &VolumeRecord) -> Result<Vec<Vec<String>>> {
    let flags = rec
        .capabilities
        .iter()
        .find(|c| matches!(c.access_type, AccessType::Mount { .. }))
        .map(flags_of)
        .unwrap_or(&[]);
    let mut opts = check_flags(flags)?;
    opts.retain(|o| o != "ro" && o != "rw");
    if nfsmount::has_version(&opts) {
        return Ok(vec![opts]);
    }
    let with = |extra: &[&str]| {
        let mut o = opts.clone();
        for e in extra {
            if !o.iter().any(|x| x == e || (*e == "nolock" && x == "lock")) {
                o.push(e.to_string());
            }
        }
        o
    };
    Ok(vec![
        nfsmount::with_defaults(opts.clone(), false),
        with(&["nfsvers=4.0"]),
        with(&["nfsvers=3", "nolock"]),
    ])
}

impl NfsKind {
    /// `work` is where the controller mounts shares (made when first
    /// needed); `timeout` bounds every mount and umount; `allowed` are the
    /// shares Berth may use (`--nfs-allowed-shares`).
    pub fn new(work: PathBuf, timeout: Duration, allowed: AllowedShares, os: Os) -> Self {
        NfsKind {
            os,
            work,
            timeout,
            stat_timeout: STAT_TIMEOUT.min(timeout),
            bounded: Bounded::new(),
            share_locks: Mutex::new(HashMap::new()),
            allowed,
        }
    }

    /// Parses an id and checks that its share is allowed: an id on a share
    /// Berth may not use is not Berth's.
    fn vid(&self, id: &str) -> std::result::Result<VolumeId, String> {
        let v = VolumeId::parse(id)?;
        if !self.allowed.permits(&v.server, &v.share) {
            return Err(self.allowed.refusal(&v.server, &v.share));
        }
        Ok(v)
    }

    /// `vid` for node calls: NOT_FOUND when the id is not Berth's.
    fn parse_id(&self, id: &str) -> Result<VolumeId> {
        self.vid(id)
            .map_err(|e| Error::NotFound(format!("volume {id} is not an NFS volume: {e}")))
    }

    /// The StorageClass parameters, checked, on an allowed share.
    fn allowed_params(&self, params: &BTreeMap<String, String>) -> Result<Params> {
        let p = Params::parse(params)?;
        if !self.allowed.permits(&p.server, &p.share) {
            return Err(Error::Invalid(self.allowed.refusal(&p.server, &p.share)));
        }
        Ok(p)
    }

    /// The lock of a share's working mounts (`key`: `share_key`, one per
    /// server and share whatever the options), shared by the calls that
    /// use it now; its entry is removed when the last of them is done, so the
    /// table holds only shares in use (ids, which name the share, are the
    /// client's to choose: one entry per share ever named grew without
    /// bound).
    fn share_lock(&self, key: &Path) -> ShareLock<'_> {
        let lock = self
            .share_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.to_path_buf())
            .or_default()
            .clone();
        ShareLock {
            table: &self.share_locks,
            key: key.to_path_buf(),
            lock,
        }
    }

    /// statvfs of `path` on a helper thread, at most `stat_timeout`. A
    /// statvfs that gives up because the server did not answer (a `soft`
    /// mount's RPCs: ETIMEDOUT with `softerr`, EIO without) is `Hung` like
    /// one that does not return: the server is not responding either way.
    pub(crate) fn probe(&self, path: &Path) -> Probe {
        let fs = self.os.fs.clone();
        let p = path.to_path_buf();
        let key = probe_key(path);
        match self
            .bounded
            .run(&key, self.stat_timeout, move || fs.statvfs(&p))
        {
            None => Probe::Hung,
            Some(Ok(u)) => Probe::Usage(u),
            Some(Err(e)) if e.errno() == Some(libc::ESTALE) => Probe::Stale,
            Some(Err(e)) if matches!(e.errno(), Some(libc::ETIMEDOUT | libc::EIO)) => {
                tracing::warn!(path = %path.display(), error = %e, "statvfs of an NFS mount gave up: server not responding");
                Probe::Hung
            }
            Some(Err(e)) => Probe::Failed(e),
        }
    }
}

/// The marker the create of `rec` writes on its directory.
fn marker_of(rec: &VolumeRecord) -> Marker {
    Marker {
        id: rec.id.clone(),
        name: rec.name.clone(),
        created_unix: rec.created_unix,
        released_unix: None,
        filled: Some(share::Filled::of(rec.content_source())),
    }
}

impl NfsKind {
    /// Makes the directory of the recorded volume `rec`: empty, or filled
    /// from `from` (a restore or a clone, copied inside the share's working
    /// mount before the directory gets its name).
    fn make_dir(&self, rec: &mut VolumeRecord, from: Option<Source<'_>>) -> Result<()> {
        let vid = VolumeId::parse(&rec.id)
            .map_err(|e| Error::Internal(format!("volume id {}: {e}", rec.id)))?;
        let params = self.allowed_params(&rec.parameters)?;
        if let Some(from) = from {
            self.check_source(&rec.id, &rec.capabilities, from)?;
        }
        let root = self.new_volume_share(&vid, &controller_option_sets(rec)?)?;
        let marker = marker_of(rec);
        let files = self.os.files.as_ref();
        // What the new directory is filled from, opened (and checked) first.
        let src = match from {
            None => None,
            Some(Source::Snapshot(s)) => {
                let sid = SnapshotId::parse(&s.id)
                    .map_err(|e| Error::Internal(format!("snapshot id {}: {e}", s.id)))?;
                Some(snapshot::open_data(
                    files,
                    &share::open_root(&root)?,
                    &sid.key,
                    &s.id,
                )?)
            }
            Some(Source::Volume(v)) => {
                let svid = VolumeId::parse(&v.id)
                    .map_err(|e| Error::Internal(format!("volume id {}: {e}", v.id)))?;
                Some(snapshot::open_volume(
                    files,
                    &share::open_root(&root)?,
                    &svid.subdir,
                    &v.id,
                )?)
            }
        };
        let fill = |dst: &Path| -> Result<()> {
            let Some(src) = &src else {
                return Ok(());
            };
            // Through the directory ("N/."), not the descriptor's link.
            let from = share::fd_path(src, ".");
            let st = files
                .copy_into(&from, dst, &[share::MARKER])
                .map_err(|e| super::local::copy_error(format!("copying into {}", vid.subdir), e))?;
            tracing::info!(volume_id = %rec.id, cloned = st.cloned, copied = st.copied, bytes = st.bytes, links = st.links, "volume filled from its source");
            Ok(())
        };
        share::create_subdir(
            files,
            &root,
            &vid.subdir,
            params.mount_permissions,
            &marker,
            src.is_some()
                .then_some(&fill as &dyn Fn(&Path) -> Result<()>),
        )?;
        rec.context = Arc::new(BTreeMap::from([
            ("server".to_string(), vid.server.clone()),
            ("share".to_string(), vid.share.clone()),
            ("subDir".to_string(), vid.subdir.clone()),
        ]));
        Ok(())
    }

    /// A parsed snapshot id on an allowed share.
    fn snap_id(&self, id: &str) -> std::result::Result<SnapshotId, String> {
        let s = SnapshotId::parse(id)?;
        if !self.allowed.permits(&s.server, &s.share) {
            return Err(self.allowed.refusal(&s.server, &s.share));
        }
        Ok(s)
    }

    /// Mounts the share of a snapshot with the options of a volume record
    /// that has none (the default version first, then older ones).
    fn snapshot_share(&self, sid: &SnapshotId) -> Result<PathBuf> {
        let vid = VolumeId {
            on_delete: id::OnDelete::Retain,
            server: sid.server.clone(),
            share: sid.share.clone(),
            subdir: "x".into(),
        };
        let rec = self.record_from_id(&vid.to_string()).ok_or_else(|| {
            Error::Internal(format!("no record for share {}", sid.share_source()))
        })?;
        self.share_mount(&vid, &controller_option_sets(&rec)?)
    }
}

impl Drop for NfsKind {
    /// Unmounts the controller's working mounts of shares when the driver
    /// goes away (shutdown), so that removing the state directory later can
    /// never reach into a share. After a crash they stay, and are found
    /// and reused at the next start.
    fn drop(&mut self) {
        let Ok(t) = mounts::table(&self.os) else {
            return;
        };
        let mut points: Vec<PathBuf> = t
            .iter()
            .filter(|m| is_nfs(m) && m.mount_point.parent() == Some(self.work.as_path()))
            .map(|m| m.mount_point.clone())
            .collect();
        points.dedup();
        for mp in points {
            match self.unmount_target(&mp) {
                Ok(()) => {
                    let _ = self.os.files.remove_dir(&mp);
                    tracing::info!(at = %mp.display(), "unmounted NFS share");
                }
                Err(e) => {
                    tracing::warn!(at = %mp.display(), error = %e.render(), "could not unmount NFS share")
                }
            }
        }
    }
}

impl VolumeKind for NfsKind {
    fn kind(&self) -> Kind {
        Kind::Nfs
    }

    /// NFS ids are derived from the parameters and name (`id_for`); this
    /// placeholder is never owned by any kind.
    fn new_id(&self) -> String {
        String::new()
    }

    fn id_for(&self, name: &str, params: &BTreeMap<String, String>) -> Result<String> {
        self.allowed_params(params)?.volume_id(name, params)
    }

    fn owns_id(&self, id: &str) -> bool {
        self.vid(id).is_ok()
    }

    fn record_from_id(&self, id: &str) -> Option<VolumeRecord> {
        let v = self.vid(id).ok()?;
        let info = BTreeMap::from([
            ("server".to_string(), v.server.clone()),
            ("share".to_string(), v.share.clone()),
            ("subDir".to_string(), v.subdir.clone()),
        ]);
        let mut parameters = info.clone();
        parameters.insert("kind".into(), "nfs".into());
        parameters.insert("onDelete".into(), v.on_delete.as_str().into());
        Some(VolumeRecord {
            id: id.to_string(),
            name: id.to_string(),
            kind: Kind::Nfs,
            seq: 0,
            phase: Phase::Ready,
            capacity_bytes: 0,
            node: "".into(),
            parameters: parameters.into(),
            capabilities: Arc::from([Capability {
                access_type: AccessType::Mount {
                    fs_type: String::new(),
                    mount_flags: vec![],
                    volume_mount_group: String::new(),
                    extra: None,
                },
                access_mode: AccessMode::MultiNodeMultiWriter,
                extra: None,
            }]),
            context: info.into(),
            published: Default::default(),
            created_unix: 0,
            block: None,
            source: None,
            project: None,
            extra: None,
        })
    }

    /// Without a record: the volume exists when the directory the id names
    /// carries the id's marker (the share is mounted to look).
    fn confirm_from_id(&self, id: &str) -> Result<Option<VolumeRecord>> {
        let Some(rec) = self.record_from_id(id) else {
            return Ok(None);
        };
        let vid = self.parse_id(id)?;
        let root = self.share_mount(&vid, &controller_option_sets(&rec)?)?;
        Ok(share::marked_as(self.os.files.as_ref(), &root, &vid.subdir, id)?.then_some(rec))
    }

    fn check_parameters(&self, params: &BTreeMap<String, String>) -> Result<()> {
        self.allowed_params(params).map(|_| ())
    }

    /// The parameters name the volume's server, share and onDelete (what
    /// its id records; a subDir template cannot be compared without the
    /// CO's metadata, and mountPermissions applied once at creation).
    fn parameters_match(
        &self,
        rec: &VolumeRecord,
        params: &BTreeMap<String, String>,
    ) -> std::result::Result<(), String> {
        let p = Params::parse(params).map_err(|e| e.to_string())?;
        let v = VolumeId::parse(&rec.id)?;
        if !id::same_host(&p.server, &v.server) || p.share != v.share {
            return Err(format!(
                "the parameters name share {}:{}, the volume is on {}:{}",
                p.server, p.share, v.server, v.share
            ));
        }
        if p.on_delete != v.on_delete {
            return Err(format!(
                "the parameters say onDelete {}, the volume was made with {}",
                p.on_delete.as_str(),
                v.on_delete.as_str()
            ));
        }
        Ok(())
    }

    /// Reaching the storage needs the NFS server, which may be down.
    fn remote(&self) -> bool {
        true
    }

    /// The working mount is `hard`: a server that stops answering holds
    /// any file call on it until it answers again. The call answers after
    /// a mount's timeout and a statvfs's (the share reached) and one more
    /// mount's timeout for the directory work; the work goes on (see
    /// `VolumeKind::op_deadline`).
    fn op_deadline(&self) -> Option<Duration> {
        Some(self.timeout * 2 + self.stat_timeout)
    }

    fn check_capability(&self, cap: &Capability) -> Result<()> {
        match &cap.access_type {
            AccessType::Block => Err(Error::Capability(
                "NFS volumes support only the mount access type".into(),
            )),
            AccessType::Mount {
                fs_type,
                mount_flags,
                ..
            } => {
                if !matches!(fs_type.as_str(), "" | "nfs" | "nfs4") {
                    return Err(Error::Capability(format!(
                        "fs_type {fs_type:?} is not possible for NFS volumes (use nfs or leave it empty)"
                    )));
                }
                check_flags(mount_flags).map(|_| ())
            }
        }
    }

    /// NFS has no per-directory quota and the server's free space is not
    /// Berth's to hand out: no limit.
    fn pool_capacity(&self) -> Result<PoolCapacity> {
        Ok(PoolCapacity {
            free_bytes: i64::MAX,
            max_volume_bytes: i64::MAX,
        })
    }

    fn capacity_is_promise(&self) -> bool {
        false
    }

    /// The size is a record (no quota): expansion records the new size and
    /// needs nothing on the node.
    fn expandable(&self) -> bool {
        true
    }

    fn controller_expand(&self, rec: Option<&VolumeRecord>, growth: Growth) -> Result<Expansion> {
        let have = rec.map(|r| r.capacity_bytes).unwrap_or(0);
        let size = have.max(growth.required);
        if growth.limit > 0 && size > growth.limit {
            return Err(Error::BadSize(format!(
                "the volume has {have} bytes, more than limit_bytes {}",
                growth.limit
            )));
        }
        Ok(Expansion {
            capacity_bytes: size,
            node_expansion_required: false,
        })
    }

    /// Nothing to grow on the node; NOT_FOUND unless the volume is mounted
    /// at the path; OUT_OF_RANGE when its size is more than `limit_bytes`
    /// (it never shrinks).
    fn node_expand(&self, rec: &VolumeRecord, args: &NodeExpandArgs<'_>) -> Result<i64> {
        let vid = self.parse_id(&rec.id)?;
        let t = mounts::table(&self.os)?;
        let here = mounts::at(&self.os, &t, args.volume_path)
            .last()
            .is_some_and(|m| is_mount_of(m, &vid.server, &vid.path()));
        if !here {
            return Err(Error::NotFound(format!(
                "volume {} is not mounted at {}",
                rec.id,
                args.volume_path.display()
            )));
        }
        let size = rec.capacity_bytes.max(args.growth.required);
        if args.growth.limit > 0 && size > args.growth.limit {
            return Err(Error::BadSize(format!(
                "the volume has {} bytes, more than limit_bytes {}",
                rec.capacity_bytes, args.growth.limit
            )));
        }
        Ok(size)
    }

    /// Mounts the share (or finds its working mount) before the record is
    /// written: a share that cannot be mounted leaves no record, and a
    /// record in Creating always means the share was reached and something
    /// may have been made on it (its rollback mounts the share to look).
    fn reach(&self, rec: &VolumeRecord) -> Result<()> {
        let vid = VolumeId::parse(&rec.id)
            .map_err(|e| Error::Internal(format!("volume id {}: {e}", rec.id)))?;
        self.allowed_params(&rec.parameters)?;
        // As a new volume's: a share the server resolves to another path
        // is refused here, and a working mount made for it unmounted.
        let root = self.new_volume_share(&vid, &controller_option_sets(rec)?)?;
        // Never a volume in an empty stand-in for the share.
        self.check_share_for_create(&vid, &root)
    }

    fn create(&self, rec: &mut VolumeRecord) -> Result<()> {
        self.make_dir(rec, None)
    }

    /// A record still being created is rolled back (its directory removed
    /// only if empty and made by that create); otherwise the id's onDelete applies (retain marks
    /// the directory's marker released, so no later create adopts it). The share's
    /// working mount is looked up under its own lock (`share_mount`, which
    /// may mount it), so the RPC's table is not used.
    fn delete_with(&self, rec: &VolumeRecord, _mount_table: &LazyTable) -> Result<()> {
        let Ok(vid) = self.vid(&rec.id) else {
            return Ok(());
        };
        // A rollback removes only the directory its create made: one the
        // create found in place (another volume's of the same id, without
        // records to tell) is not its own.
        let made = marker_of(rec);
        let how = if rec.phase == Phase::Creating {
            Removal::Rollback(Some(&made))
        } else {
            Removal::Apply(vid.on_delete)
        };
        let sets = controller_option_sets(rec)?;
        let remove = |root: &Path| match share::remove_subdir(
            self.os.files.as_ref(),
            root,
            &rec.id,
            &vid.subdir,
            how,
            rec.phase == Phase::Deleting,
            crate::driver::now_unix(),
        )? {
            share::Seen::There => Ok(()),
            // Gone only from a share that looks like the share.
            share::Seen::Absent => {
                self.confirm_absent(&vid, root, &format!("directory {}", vid.subdir))
            }
        };
        if matches!(how, Removal::Rollback(_)) {
            return self.rollback_in_share(&vid, &sets, &remove);
        }
        remove(&self.share_mount(&vid, &sets)?)
    }

    fn health(&self, rec: &VolumeRecord) -> Health {
        let Ok(vid) = self.vid(&rec.id) else {
            return Health::abnormal("not an NFS volume id");
        };
        let Some(root) = controller_option_sets(rec)
            .ok()
            .and_then(|sets| self.existing_share_mount(&vid, &sets))
        else {
            return Health::ok();
        };
        // The share first: while a probe of it is stuck, every volume on it
        // answers at once instead of waiting out its own timeout.
        match self.probe(&root) {
            Probe::Usage(_) => {}
            Probe::Hung => {
                return Health::abnormal(format!("NFS server {} is not responding", vid.server))
            }
            Probe::Stale => {
                return Health::abnormal(format!("the mount of share {} is stale", vid.share))
            }
            Probe::Failed(e) => return Health::abnormal(format!("share {}: {e}", vid.share)),
        }
        // Below the share's root without following a symlink anywhere on
        // the way: a symlinked parent on the share must not lead the look
        // out of it (to the controller's own filesystem).
        let key = format!("stat {}", root.join(&vid.subdir).display());
        let files = self.os.files.clone();
        let subdir = vid.subdir.clone();
        match self.bounded.run(&key, self.stat_timeout, move || {
            files.lstat_beneath(&root, &subdir)
        }) {
            None => Health::abnormal(format!("NFS server {} is not responding", vid.server)),
            Some(Ok(m)) if m.is_dir() => Health::ok(),
            Some(Ok(_)) => {
                Health::abnormal(format!("{} on the share is not a directory", vid.subdir))
            }
            Some(Err(e)) if e.errno() == Some(libc::ENOENT) => Health::abnormal(format!(
                "subdirectory {} is missing on the share",
                vid.subdir
            )),
            Some(Err(e)) if matches!(e.errno(), Some(libc::ELOOP | libc::ENOTDIR)) => {
                Health::abnormal(format!(
                    "a parent of {} on the share is not a plain directory (a symlink or a file): the volume's directory is not reached",
                    vid.subdir
                ))
            }
            Some(Err(e)) => Health::abnormal(format!("{} on the share: {e}", vid.subdir)),
        }
    }

    /// No staging for NFS: NodeStageVolume of an NFS volume (on a node that
    /// also serves node-local kinds) only checks the capability.
    fn stage(&self, _rec: &VolumeRecord, _staging: &Path, cap: &Capability) -> Result<()> {
        self.check_capability(cap)
    }

    fn unstage(&self, _rec: &VolumeRecord, _staging: &Path) -> Result<()> {
        Ok(())
    }

    /// NFS volumes are never staged: nothing to undo.
    fn unstage_path(&self, _id: &str, _staging: &Path) -> Result<()> {
        Ok(())
    }

    fn publish(&self, rec: &VolumeRecord, a: &PublishArgs<'_>) -> Result<()> {
        self.check_capability(a.capability)?;
        let vid = self.parse_id(&rec.id)?;
        self.publish_nfs(&vid, a.target, a.capability, a.readonly)
    }

    fn unpublish(&self, id: &str, target: &Path) -> Result<()> {
        // The top mount at the target must be this volume's directory (or
        // a mount whose directory is gone); an id that is not an NFS id (a
        // kind no longer served) cannot tell.
        if let Ok(vid) = self.parse_id(id) {
            let t = mounts::table(&self.os)?;
            if let Some(top) = mounts::at(&self.os, &t, target).last() {
                let ours =
                    is_mount_of(top, &vid.server, &vid.path()) || shows_resolved_share(top, &vid);
                if !ours && !mounts::deleted(top) {
                    return Err(mounts::foreign(target, id, top));
                }
            }
        }
        self.unmount_target(target)?;
        mounts::remove_target(&self.os, target, false)
    }

    fn stats(&self, rec: &VolumeRecord, path: &Path) -> Result<VolumeStats> {
        self.stats_and_health(rec, path).map(|(s, _)| s)
    }

    fn stats_and_health(&self, rec: &VolumeRecord, path: &Path) -> Result<(VolumeStats, Health)> {
        let vid = self.parse_id(&rec.id)?;
        self.node_stats(&vid, path)
    }

    fn in_use(&self, rec: &VolumeRecord, mount_table: &LazyTable) -> Result<Vec<PathBuf>> {
        let vid = self.parse_id(&rec.id)?;
        let path = vid.path();
        Ok(mount_table
            .get(&self.os)?
            .iter()
            .filter(|m| is_mount_of(m, &vid.server, &path))
            .map(|m| m.mount_point.clone())
            .collect())
    }

    fn node_local(&self) -> bool {
        false
    }

    // ---------------------------------------------- snapshots and clones

    fn snapshots(&self) -> bool {
        true
    }

    /// NFS snapshot ids are derived (`snapshot_id_for`); this placeholder
    /// is never owned by any kind.
    fn new_snapshot_id(&self) -> String {
        String::new()
    }

    fn snapshot_id_for(&self, name: &str, source: &str) -> Result<Option<String>> {
        let Ok(vid) = self.vid(source) else {
            return Ok(None);
        };
        SnapshotId::derive(&vid, name)
            .encode()
            .map(Some)
            .map_err(Error::Invalid)
    }

    fn owns_snapshot_id(&self, id: &str) -> bool {
        self.snap_id(id).is_ok()
    }

    fn snapshot_from_id(&self, id: &str) -> Option<SnapshotRecord> {
        self.snap_id(id).ok()?;
        Some(SnapshotRecord {
            id: id.to_string(),
            name: id.to_string(),
            kind: Kind::Nfs,
            seq: 0,
            phase: Phase::Ready,
            source_volume_id: String::new(),
            size_bytes: 0,
            node: String::new(),
            parameters: BTreeMap::new(),
            created_secs: 0,
            created_nanos: 0,
            block: None,
            file_bytes: None,
            extra: None,
        })
    }

    /// Without a record: the snapshot exists when its directory on the
    /// share carries its marker (the share is mounted to look); the record
    /// comes from the marker.
    fn confirm_snapshot(&self, id: &str) -> Result<Option<SnapshotRecord>> {
        let Ok(sid) = self.snap_id(id) else {
            return Ok(None);
        };
        let root = self.snapshot_share(&sid)?;
        let Some(m) = snapshot::find(self.os.files.as_ref(), &root, &sid.key, id)? else {
            return Ok(None);
        };
        Ok(self.snapshot_from_id(id).map(|r| SnapshotRecord {
            name: m.name,
            source_volume_id: m.source_volume_id,
            size_bytes: m.size_bytes,
            created_secs: m.created_secs,
            created_nanos: m.created_nanos,
            ..r
        }))
    }

    /// A restore or clone copies inside one working mount of one share:
    /// a source on another share is INVALID_ARGUMENT (the spec's "source
    /// incompatible": the CO must ask for a volume on the source's share).
    /// Capabilities play no part: every NFS capability is a mount of the
    /// share's directory (`check_capability`: no raw block, fs_type nfs or
    /// none), which any NFS source fits.
    fn check_source(&self, id: &str, _caps: &[Capability], from: Source<'_>) -> Result<()> {
        let vid = self
            .vid(id)
            .map_err(|e| Error::Invalid(format!("volume id {id}: {e}")))?;
        let (what, src_id, server, share) = match from {
            Source::Snapshot(s) => {
                let sid = SnapshotId::parse(&s.id).map_err(|e| {
                    Error::Invalid(format!("snapshot {} is not an NFS snapshot: {e}", s.id))
                })?;
                ("snapshot", &s.id, sid.server, sid.share)
            }
            Source::Volume(v) => {
                let svid = VolumeId::parse(&v.id).map_err(|e| {
                    Error::Invalid(format!("volume {} is not an NFS volume: {e}", v.id))
                })?;
                ("volume", &v.id, svid.server, svid.share)
            }
        };
        if !id::same_host(&server, &vid.server) || share != vid.share {
            return Err(Error::Invalid(format!(
                "source {what} {src_id} is on share {server}:{share}, the new volume on {}: NFS volumes are restored and cloned only on the source's share (use a StorageClass with the same server and share)",
                vid.share_source()
            )));
        }
        Ok(())
    }

    /// A copy of the volume's directory in `.berth-snapshots/<key>` on its
    /// share (see `snapshot`). The volume is not frozen: files written
    /// while the copy runs are copied as they are when reached.
    fn create_snapshot(&self, vol: &VolumeRecord, snap: &mut SnapshotRecord) -> Result<()> {
        let vid = VolumeId::parse(&vol.id)
            .map_err(|e| Error::Internal(format!("volume id {}: {e}", vol.id)))?;
        let sid = SnapshotId::parse(&snap.id)
            .map_err(|e| Error::Internal(format!("snapshot id {}: {e}", snap.id)))?;
        if !sid.same_share(&vid) {
            return Err(Error::Internal(format!(
                "snapshot {} is not on the share of volume {}",
                snap.id, vol.id
            )));
        }
        let root = self.share_mount(&vid, &controller_option_sets(vol)?)?;
        let marker = snapshot::SnapMarker {
            id: snap.id.clone(),
            name: snap.name.clone(),
            source_volume_id: vol.id.clone(),
            size_bytes: snap.size_bytes,
            created_secs: snap.created_secs,
            created_nanos: snap.created_nanos,
        };
        let m = snapshot::make(self.os.files.as_ref(), &root, &sid, &vid, &marker)?;
        snap.size_bytes = m.size_bytes;
        snap.created_secs = m.created_secs;
        snap.created_nanos = m.created_nanos;
        Ok(())
    }

    /// Removes only a snapshot directory whose marker names the id.
    fn delete_snapshot(&self, snap: &SnapshotRecord) -> Result<()> {
        let Ok(sid) = self.snap_id(&snap.id) else {
            return Ok(());
        };
        let root = self.snapshot_share(&sid)?;
        match snapshot::remove(self.os.files.as_ref(), &root, &sid.key, &snap.id)? {
            share::Seen::There => Ok(()),
            share::Seen::Absent => {
                let vid = VolumeId {
                    on_delete: id::OnDelete::Retain,
                    server: sid.server.clone(),
                    share: sid.share.clone(),
                    subdir: "x".into(),
                };
                self.confirm_absent(&vid, &root, &format!("snapshot {}", snap.id))
            }
        }
    }

    fn create_from(&self, rec: &mut VolumeRecord, from: Source<'_>) -> Result<()> {
        self.make_dir(rec, Some(from))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(flags: &[&str], mode: AccessMode) -> Capability {
        Capability {
            access_type: AccessType::Mount {
                fs_type: String::new(),
                mount_flags: flags.iter().map(|s| s.to_string()).collect(),
                volume_mount_group: String::new(),
                extra: None,
            },
            access_mode: mode,
            extra: None,
        }
    }

    fn nfs_entry(source: &str, fs_type: &str, super_options: &str) -> MountEntry {
        MountEntry {
            id: 2,
            parent: 1,
            major: 0,
            minor: 2,
            root: PathBuf::from("/"),
            mount_point: PathBuf::from("/t"),
            options: "rw".into(),
            fs_type: fs_type.into(),
            source: source.into(),
            super_options: super_options.into(),
            shared: 0,
            master: 0,
        }
    }

    #[test]
    fn mounts_compare_by_path_up_to_trailing_slashes_and_server_spelling() {
        let m = |s: &str| nfs_entry(s, "nfs4", "rw,vers=4.1,addr=10.0.0.1");
        assert!(is_mount_of(&m("h:/e/a/"), "h", "/e/a"));
        assert!(is_mount_of(&m("h:/"), "h", "/"));
        assert!(is_mount_of(&m("h:"), "h", "/"));
        assert!(is_mount_of(&m("H.Example:/e"), "h.example", "/e/"));
        assert!(!is_mount_of(&m("h:/e/a"), "h", "/e/ab"));
        assert!(!is_mount_of(&m("h:/e/ab"), "h", "/e/a"));
        assert!(!is_mount_of(&m("h:/e/a/b"), "h", "/e/a"));
        // Not NFS: never, whatever the source says.
        assert!(!is_mount_of(
            &nfs_entry("h:/e/a", "ext4", "rw"),
            "h",
            "/e/a"
        ));
        assert!(!is_mount_of(
            &nfs_entry("h:/e/a", "tmpfs", "rw"),
            "h",
            "/e/a"
        ));
        // An IP literal: the same address, or the kernel's addr= for
        // another spelling (the client was made by a mount of that name).
        assert!(is_mount_of(&m("localhost:/e"), "10.0.0.1", "/e"));
        assert!(!is_mount_of(&m("localhost:/e"), "10.0.0.2", "/e"));
        assert!(!is_mount_of(
            &nfs_entry("10.0.0.2:/e", "nfs4", "rw,addr=10.0.0.2"),
            "10.0.0.1",
            "/e"
        ));
        assert!(!is_mount_of(
            &nfs_entry("localhost:/e", "nfs4", "rw"),
            "10.0.0.1",
            "/e"
        ));
        let v6 = nfs_entry("[fd00::1]:/e", "nfs4", "rw,addr=fd00::1");
        assert!(is_mount_of(&v6, "[FD00:0::1]", "/e"));
        assert!(is_mount_of(
            &nfs_entry("nfs6:/e", "nfs4", "rw,addr=fd00::1"),
            "[fd00::1]",
            "/e"
        ));
        // A host name: another spelling of the server is accepted (no
        // resolution), the path still has to match.
        assert!(is_mount_of(&m("10.0.0.1:/e/a"), "localhost", "/e/a"));
        assert!(is_mount_of(&m("g:/e/a"), "h", "/e/a"));
        assert!(!is_mount_of(&m("10.0.0.1:/e/b"), "localhost", "/e/a"));
        assert_eq!(split_source("[fd00::1]:/e/"), Some(("[fd00::1]", "/e")));
        assert_eq!(split_source("h:e"), None);
        assert_eq!(split_source(":/e"), None);
    }

    #[test]
    fn a_resolved_share_is_accepted_only_with_the_subdirectory() {
        let vid = VolumeId::parse("nfs#d#10.0.0.1#/export/lnk#ns/pvc").unwrap();
        let m = |s: &str| nfs_entry(s, "nfs4", "rw,addr=10.0.0.1");
        assert!(shows_resolved_share(
            &m("10.0.0.1:/export/victim/ns/pvc"),
            &vid
        ));
        assert!(shows_resolved_share(&m("localhost:/v/ns/pvc"), &vid));
        assert!(!shows_resolved_share(
            &m("10.0.0.1:/export/victim/ns/pvcx"),
            &vid
        ));
        assert!(!shows_resolved_share(
            &m("10.0.0.1:/export/victim/xns/pvc"),
            &vid
        ));
        assert!(!shows_resolved_share(
            &m("10.0.0.1:/export/victim/other"),
            &vid
        ));
        assert!(!shows_resolved_share(
            &nfs_entry("10.0.0.2:/export/victim/ns/pvc", "nfs4", "rw,addr=10.0.0.2"),
            &vid
        ));
        assert!(!shows_resolved_share(
            &nfs_entry("10.0.0.1:/export/victim/ns/pvc", "ext4", "rw"),
            &vid
        ));
    }

    #[test]
    fn options_for_node_and_controller() {
        let c = cap(
            &["nfsvers=3,nolock", "hard"],
            AccessMode::MultiNodeMultiWriter,
        );
        assert_eq!(
            node_options(&c, false).unwrap(),
            ["nfsvers=3", "nolock", "hard"]
        );
        assert_eq!(
            node_options(&c, true).unwrap(),
            ["nfsvers=3", "nolock", "hard", "ro"]
        );
        let ro = cap(&["rw"], AccessMode::MultiNodeReaderOnly);
        assert_eq!(node_options(&ro, false).unwrap(), ["nfsvers=4.1", "ro"]);
        assert!(node_options(
            &cap(&["ro,helper=/bin/sh"], AccessMode::SingleNodeWriter),
            false
        )
        .is_err());
        let os = Os::fake().0;
        let k = NfsKind::new(
            PathBuf::from("/w"),
            Duration::from_secs(30),
            AllowedShares::default(),
            os,
        );
        let mut rec = k.record_from_id("nfs#d#h#/e#v").unwrap();
        assert_eq!(controller_options(&rec).unwrap(), ["nfsvers=4.1"]);
        rec.capabilities = vec![cap(&["ro", "vers=4.2"], AccessMode::MultiNodeReaderOnly)].into();
        assert_eq!(controller_options(&rec).unwrap(), ["vers=4.2"]);
    }

    #[test]
    fn records_from_ids() {
        let k = NfsKind::new(
            PathBuf::from("/w"),
            Duration::from_secs(30),
            AllowedShares::default(),
            Os::fake().0,
        );
        let r = k.record_from_id("nfs#a#10.0.0.1#/exports#ns/p").unwrap();
        assert_eq!(r.kind, Kind::Nfs);
        assert!(r.node.is_empty());
        assert_eq!(r.context["subDir"], "ns/p");
        assert_eq!(r.parameters["onDelete"], "archive");
        assert!(k.record_from_id("nfs#a#10.0.0.1#/exports#..").is_none());
        assert!(k.record_from_id("local-0123").is_none());
    }
}
