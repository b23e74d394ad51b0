//! A recording fake of every OS interface. It keeps a mount table that
//! follows the calls made on it (a bind mount shows the source's device and
//! directory, an unmount removes the topmost entry), so logic built on
//! mountinfo can be unit-tested without root.
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use super::blockdev::{BlockDevices, DeviceClaim, DeviceInfo};
use super::command::{CmdOutput, Runner};
use super::files::{Files, Open, RealFiles};
use super::loopdev::{AttachOptions, LoopDevices, LoopInfo, LoopStatus};
use super::mount::{BindCalls, MountAttr};
use super::mountinfo::{self, MountEntry, MountTable};
use super::mountpoint::MountProbe;
use super::quota::{Project, ProjectQuota, QuotaState, Quotas};
use super::{FsStats, FsUsage, MountFlags, Mounter, OsError};

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Bind {
        /// What the bind reached, as mount(2) follows it (a symlink at
        /// the source followed; a descriptor's `/proc/self/fd/N`, a
        /// `Files::pin`, as the path of the object it holds).
        source: PathBuf,
        target: PathBuf,
        flags: MountFlags,
    },
    MountFs {
        source: PathBuf,
        target: PathBuf,
        fstype: String,
        flags: MountFlags,
        data: String,
    },
    Unmount {
        target: PathBuf,
    },
    Run {
        program: String,
        args: Vec<String>,
    },
    LoopAttach {
        file: PathBuf,
        read_only: bool,
        direct_io: bool,
    },
    LoopDetach {
        device: PathBuf,
    },
    LoopClearAutoclear {
        device: PathBuf,
    },
    LoopSetCapacity {
        device: PathBuf,
    },
    ZeroOut {
        device: PathBuf,
        size_bytes: u64,
    },
    Claim {
        device: PathBuf,
        size_bytes: u64,
    },
    ZeroSample {
        device: PathBuf,
        size_bytes: u64,
    },
    SetReadOnly {
        device: PathBuf,
        read_only: bool,
    },
    SetProject {
        dir: PathBuf,
        project: Project,
    },
    SetLimits {
        id: u32,
        bytes: u64,
        inodes: u64,
    },
}

/// One filesystem change made through `Files` (kept apart from `calls`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileOp {
    pub op: &'static str,
    pub path: PathBuf,
}

/// A loop device of the fake.
#[derive(Debug, Clone)]
struct FakeLoop {
    backing: PathBuf,
    id: (u64, u64),
    /// Where the device starts in its file, and at most how many bytes
    /// it shows (0: to the file's end), as `LOOP_GET_STATUS64` tells
    /// (`add_loop_at`). Reads and writes of the fake device ignore them.
    offset: u64,
    sizelimit: u64,
    read_only: bool,
    direct_io: bool,
    autoclear: bool,
    size: u64,
}

type CmdReply = Result<CmdOutput, OsError>;

/// See `FakeOs::emulate_nfs_naming`.
#[derive(Debug, Default, Clone)]
struct NfsNaming {
    hosts: HashMap<String, String>,
    links: Vec<(String, String)>,
}
type Responder = Box<dyn Fn(&[String]) -> Option<CmdReply> + Send>;
type Hook = Box<dyn FnOnce() + Send>;

pub struct FakeOs {
    calls: Mutex<Vec<Call>>,
    table: Mutex<Vec<MountEntry>>,
    next_id: Mutex<u32>,
    usage: Mutex<HashMap<PathBuf, FsUsage>>,
    default_usage: Mutex<FsUsage>,
    /// The filesystem device of paths (`FsStats::device`), as a test set
    /// it (`set_device`).
    fs_devices: Mutex<HashMap<PathBuf, u64>>,
    failures: Mutex<HashMap<&'static str, VecDeque<i32>>>,
    replies: Mutex<HashMap<String, VecDeque<CmdReply>>>,
    responders: Mutex<HashMap<String, Responder>>,
    loops: Mutex<BTreeMap<u32, FakeLoop>>,
    devices: Mutex<BTreeMap<PathBuf, DeviceInfo>>,
    /// The directory of the fake's `/dev/disk/by-id` links
    /// (`set_by_id_dir`); none by default.
    by_id: Mutex<Option<PathBuf>>,
    busy_detaches: Mutex<u32>,
    unreadable: Mutex<HashSet<PathBuf>>,
    /// Devices another process holds exclusively (`BlockDevices::held`).
    held: Mutex<HashSet<PathBuf>>,
    /// Devices claimed exclusively through `BlockDevices::claim` (by any
    /// berth over this fake), each until its claim is dropped.
    claims: std::sync::Arc<Mutex<HashSet<PathBuf>>>,
    /// Devices the kernel holds read-only (`BlockDevices::set_read_only`),
    /// and those that are so whatever is set (`set_write_protected`).
    read_only: Mutex<HashSet<PathBuf>>,
    write_protected: Mutex<HashSet<PathBuf>>,
    /// `mount.nfs` and `umount` runs change the table (see
    /// `emulate_nfs_mounts`).
    nfs_mounts: Mutex<bool>,
    /// How the fake kernel names NFS mounts (see `emulate_nfs_naming`):
    /// host names and the address each resolves to (lower case), and
    /// symlinks on the server (a path and what it resolves to).
    nfs_names: Mutex<Option<NfsNaming>>,
    /// statvfs of these paths sleeps this long first (a hung NFS server).
    stat_delays: Mutex<HashMap<PathBuf, Duration>>,
    /// statvfs of these paths reads the usage, then sleeps this long before
    /// answering it (a figure that is old by the time it is used).
    stale_stats: Mutex<HashMap<PathBuf, Duration>>,
    /// Whether `allocate` takes its bytes from the default usage's free
    /// space, as a real fallocate does.
    allocation_takes_free: Mutex<bool>,
    /// Reads of the whole mount table (`mounts`) and mount-root probes
    /// (`mount_root`) so far; counted apart from `calls`.
    table_reads: Mutex<usize>,
    probes: Mutex<usize>,
    /// Mount-id probes (`root_mount_id`) so far, apart from `probes`.
    mount_id_probes: Mutex<usize>,
    /// Identity probes (`identity`) so far; `root_and_identity` counts as
    /// one mount-root probe only (one statx on a node).
    identity_probes: Mutex<usize>,
    /// The mount-root probe answers "don't know" for these paths.
    probe_unknown: Mutex<HashSet<PathBuf>>,
    /// Filesystem changes so far (`Files`), and the faults to inject into
    /// them: the n-th change from now, and every change under a path.
    file_ops: Mutex<Vec<FileOp>>,
    file_fault_at: Mutex<Option<(usize, i32)>>,
    /// Birth times a test set (`set_born`).
    born: Mutex<HashMap<PathBuf, std::time::SystemTime>>,
    /// Extended attributes a test set (`set_xattr`): path and name.
    xattrs: Mutex<HashMap<(PathBuf, String), Vec<u8>>>,
    file_faults_under: Mutex<Vec<(Option<&'static str>, PathBuf, i32)>>,
    /// Faults of one op under a path that let the first calls go
    /// (`fail_op_under_after`): op, path, calls still let go, errno.
    file_faults_after: Mutex<Vec<(&'static str, PathBuf, usize, i32)>>,
    /// Filesystem changes held until a test lets them go (`hold_op_under`).
    holds: Mutex<Vec<(&'static str, PathBuf, std::sync::Arc<OpHold>)>>,
    /// What `read_durable` answers for a path instead of the file's content
    /// (a disk that lost what the page cache still shows).
    durable: Mutex<HashMap<PathBuf, Option<Vec<u8>>>>,
    /// File copies (`copy_file`) still to run while their source is being
    /// written: each moves the source's change stamp.
    busy_copies: Mutex<u32>,
    /// Paths looked at with `Files::lstat`, in order.
    lstats: Mutex<Vec<PathBuf>>,
    /// Paths opened with `Files::pin`, in order.
    pins: Mutex<Vec<PathBuf>>,
    /// The mount each pin of a path with a mount on it opened, by the
    /// pin's `/proc/self/fd/N`: what a bind through it binds, whatever is
    /// mounted at that path by then.
    pinned_mounts: Mutex<HashMap<PathBuf, MountEntry>>,
    /// What runs at the next call of an op, before it does anything
    /// (`before_next`): a change made between Berth's look and its act.
    hooks: Mutex<Vec<(&'static str, Hook)>>,
    /// `Files::lstat` of these paths sleeps this long first (a disk that
    /// stopped answering).
    lstat_delays: Mutex<HashMap<PathBuf, Duration>>,
    /// Writes pretended per file, added to its change stamp.
    pretended_writes: Mutex<HashMap<PathBuf, u32>>,
    /// Project quotas (see `enable_project_quotas`): what `state` answers
    /// (an errno: ENOSYS by default, like a kernel without quotas), the
    /// project of each directory (following renames and removals made
    /// through `Files`), the limits of each project, and usage a test says
    /// was written.
    quota_state: Mutex<Result<QuotaState, i32>>,
    projects: Mutex<BTreeMap<PathBuf, Project>>,
    limits: Mutex<BTreeMap<u32, (u64, u64)>>,
    written: Mutex<BTreeMap<u32, u64>>,
    /// Quota calls so far (`Quotas`), and the n-th from now that fails.
    quota_ops: Mutex<Vec<&'static str>>,
    quota_fault_at: Mutex<Option<(usize, i32)>>,
}

/// A filesystem change held by `FakeOs::hold_op_under`: how many reached
/// it, and whether it is let go.
#[derive(Default)]
pub struct OpHold {
    state: Mutex<(usize, bool)>,
    changed: std::sync::Condvar,
    /// Changes let through before the hold begins.
    skip: Mutex<usize>,
}

impl OpHold {
    fn wait_here(&self) {
        {
            let mut skip = lock(&self.skip);
            if *skip > 0 {
                *skip -= 1;
                return;
            }
        }
        let mut s = lock(&self.state);
        s.0 += 1;
        self.changed.notify_all();
        while !s.1 {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// How many changes reached the hold so far.
    pub fn reached(&self) -> usize {
        lock(&self.state).0
    }

    /// Waits until a change reached the hold, for at most `timeout`; true
    /// when one did.
    pub fn wait_reached(&self, timeout: Duration) -> bool {
        let s = lock(&self.state);
        let (s, _) = self
            .changed
            .wait_timeout_while(s, timeout, |s| s.0 == 0)
            .unwrap_or_else(|e| e.into_inner());
        s.0 > 0
    }

    /// Lets every held change (and every later one) go on.
    pub fn release(&self) {
        lock(&self.state).1 = true;
        self.changed.notify_all();
    }
}

impl Default for FakeOs {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeOs {
    /// A fake with one root filesystem (device 8:1) mounted at "/" and
    /// 100 GiB free.
    pub fn new() -> Self {
        let root = MountEntry {
            id: 1,
            parent: 0,
            major: 8,
            minor: 1,
            root: PathBuf::from("/"),
            mount_point: PathBuf::from("/"),
            options: "rw,relatime".into(),
            fs_type: "ext4".into(),
            source: "/dev/fake".into(),
            super_options: "rw".into(),
            shared: 0,
            master: 0,
        };
        FakeOs {
            calls: Mutex::new(Vec::new()),
            table: Mutex::new(vec![root]),
            next_id: Mutex::new(2),
            usage: Mutex::new(HashMap::new()),
            default_usage: Mutex::new(FsUsage {
                total_bytes: 200 << 30,
                available_bytes: 100 << 30,
                used_bytes: 100 << 30,
                total_inodes: 1_000_000,
                free_inodes: 900_000,
                used_inodes: 100_000,
            }),
            fs_devices: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            replies: Mutex::new(HashMap::new()),
            responders: Mutex::new(HashMap::new()),
            loops: Mutex::new(BTreeMap::new()),
            devices: Mutex::new(BTreeMap::new()),
            by_id: Mutex::new(None),
            busy_detaches: Mutex::new(0),
            unreadable: Mutex::new(HashSet::new()),
            held: Mutex::new(HashSet::new()),
            claims: Default::default(),
            read_only: Mutex::new(HashSet::new()),
            write_protected: Mutex::new(HashSet::new()),
            nfs_mounts: Mutex::new(false),
            nfs_names: Mutex::new(None),
            stat_delays: Mutex::new(HashMap::new()),
            stale_stats: Mutex::new(HashMap::new()),
            allocation_takes_free: Mutex::new(false),
            table_reads: Mutex::new(0),
            probes: Mutex::new(0),
            mount_id_probes: Mutex::new(0),
            identity_probes: Mutex::new(0),
            probe_unknown: Mutex::new(HashSet::new()),
            file_ops: Mutex::new(Vec::new()),
            file_fault_at: Mutex::new(None),
            born: Mutex::new(HashMap::new()),
            xattrs: Mutex::new(HashMap::new()),
            file_faults_under: Mutex::new(Vec::new()),
            file_faults_after: Mutex::new(Vec::new()),
            holds: Mutex::new(Vec::new()),
            durable: Mutex::new(HashMap::new()),
            busy_copies: Mutex::new(0),
            lstats: Mutex::new(Vec::new()),
            pins: Mutex::new(Vec::new()),
            pinned_mounts: Mutex::new(HashMap::new()),
            hooks: Mutex::new(Vec::new()),
            lstat_delays: Mutex::new(HashMap::new()),
            pretended_writes: Mutex::new(HashMap::new()),
            quota_state: Mutex::new(Err(libc::ENOSYS)),
            projects: Mutex::new(BTreeMap::new()),
            limits: Mutex::new(BTreeMap::new()),
            written: Mutex::new(BTreeMap::new()),
            quota_ops: Mutex::new(Vec::new()),
            quota_fault_at: Mutex::new(None),
        }
    }

    /// Every quota call made so far (`Quotas`: "quota_state",
    /// "project_get", "project_set", "quota_get", "quota_set").
    pub fn quota_ops(&self) -> Vec<&'static str> {
        lock(&self.quota_ops).clone()
    }

    /// Forgets the recorded quota calls.
    pub fn clear_quota_ops(&self) {
        lock(&self.quota_ops).clear();
    }

    /// The `n`-th quota call from now (0: the next one) fails with `errno`
    /// and changes nothing; None clears it.
    pub fn fail_quota_op_at(&self, fault: Option<(usize, i32)>) {
        *lock(&self.quota_fault_at) = fault;
    }

    /// Whether the fault set with `fail_quota_op_at` is still waiting.
    pub fn quota_fault_pending(&self) -> bool {
        lock(&self.quota_fault_at).is_some()
    }

    /// Records a quota call and fails it if a fault says so (`fail_next`,
    /// `fail_quota_op_at`).
    fn quota_op(&self, op: &'static str, path: &Path) -> Result<(), OsError> {
        lock(&self.quota_ops).push(op);
        self.injected(op, path)?;
        let mut at = lock(&self.quota_fault_at);
        if let Some((n, errno)) = *at {
            if n == 0 {
                *at = None;
                return Err(OsError::sys(
                    op,
                    path,
                    std::io::Error::from_raw_os_error(errno),
                ));
            }
            *at = Some((n - 1, errno));
        }
        Ok(())
    }

    /// Project quotas are accounted and enforced from now on (what a
    /// driver started afterwards finds).
    pub fn enable_project_quotas(&self) {
        self.set_quota_state(Ok(QuotaState {
            accounting: true,
            enforced: true,
        }));
    }

    /// What `Quotas::state` answers: a state, or an errno.
    pub fn set_quota_state(&self, state: Result<QuotaState, i32>) {
        *lock(&self.quota_state) = state;
    }

    /// The project of every directory that has one.
    pub fn projects(&self) -> BTreeMap<PathBuf, Project> {
        lock(&self.projects).clone()
    }

    /// The limits (bytes, inodes) of every project that has any.
    pub fn project_limits(&self) -> BTreeMap<u32, (u64, u64)> {
        lock(&self.limits).clone()
    }

    /// Bytes written into project `id` (its usage in bytes from now on).
    pub fn set_project_written(&self, id: u32, bytes: u64) {
        lock(&self.written).insert(id, bytes);
    }

    /// After a rename through `Files`: directories under `from` keep their
    /// project under `to`, as inodes do.
    fn projects_moved(&self, from: &Path, to: &Path) {
        let mut p = lock(&self.projects);
        let moved: Vec<PathBuf> = p.keys().filter(|k| k.starts_with(from)).cloned().collect();
        for k in moved {
            if let (Some(v), Ok(rest)) = (p.remove(&k), k.strip_prefix(from)) {
                let moved = if rest.as_os_str().is_empty() {
                    to.to_path_buf()
                } else {
                    to.join(rest)
                };
                p.insert(moved, v);
            }
        }
    }

    /// After a removal through `Files`: directories under `path` are gone.
    fn projects_removed(&self, path: &Path) {
        lock(&self.projects).retain(|k, _| !k.starts_with(path));
    }

    /// A directory made through `Files` inherits its parent's project when
    /// the parent has the inherit flag, as the kernel does.
    fn project_inherited(&self, dir: &Path) {
        let mut p = lock(&self.projects);
        if let Some(parent) = dir.parent().and_then(|d| p.get(d).copied()) {
            if parent.inherit {
                p.insert(dir.to_path_buf(), parent);
            }
        }
    }

    /// `read_durable(path)` answers `disk` from now on (None: "cannot
    /// tell") instead of the file's content, until `forget_durable`.
    pub fn set_durable(&self, path: &Path, disk: Option<Vec<u8>>) {
        lock(&self.durable).insert(path.to_path_buf(), disk);
    }

    pub fn forget_durable(&self) {
        lock(&self.durable).clear();
    }

    /// Every path looked at with `Files::lstat` so far (not a change: not
    /// in `file_ops`, and no file fault hits it).
    pub fn lstats(&self) -> Vec<PathBuf> {
        lock(&self.lstats).clone()
    }

    /// Every path opened with `Files::pin` so far (a look, not a change).
    pub fn pins(&self) -> Vec<PathBuf> {
        lock(&self.pins).clone()
    }

    /// Runs `f` at the next call of `op` (any op `fail_next` names, and
    /// "lstat" and "pin"), before that call does anything: a path swapped
    /// by someone else between Berth's look at it and its use.
    pub fn before_next(&self, op: &'static str, f: impl FnOnce() + Send + 'static) {
        lock(&self.hooks).push((op, Box::new(f)));
    }

    /// Every filesystem change made through `Files` so far.
    pub fn file_ops(&self) -> Vec<FileOp> {
        lock(&self.file_ops).clone()
    }

    /// The next `n` file copies run while their source is being written
    /// (its change stamp moves during each).
    pub fn write_during_copies(&self, n: u32) {
        *lock(&self.busy_copies) = n;
    }

    /// `Files::born` of `path` answers `t` from now on (the real birth
    /// time of the directory or file then at `path` otherwise).
    pub fn set_born(&self, path: &Path, t: std::time::SystemTime) {
        lock(&self.born).insert(path.to_path_buf(), t);
    }

    /// `Files::get_xattr` of `name` on `path` answers `value` from now on
    /// (what the directory or file then at `path` holds otherwise): an
    /// attribute an unprivileged test cannot set (`trusted.*`).
    pub fn set_xattr(&self, path: &Path, name: &str, value: &[u8]) {
        lock(&self.xattrs).insert((path.to_path_buf(), name.to_string()), value.to_vec());
    }

    /// Forgets the recorded filesystem changes.
    pub fn clear_file_ops(&self) {
        lock(&self.file_ops).clear();
    }

    /// The `n`-th filesystem change from now (0: the next one) fails with
    /// `errno` and changes nothing; None clears it.
    pub fn fail_file_op_at(&self, fault: Option<(usize, i32)>) {
        *lock(&self.file_fault_at) = fault;
    }

    /// Whether the fault set with `fail_file_op_at` is still waiting.
    pub fn file_fault_pending(&self) -> bool {
        lock(&self.file_fault_at).is_some()
    }

    /// Every filesystem change under `path` fails with `errno` (EROFS: a
    /// filesystem gone read-only) until `clear_file_faults`.
    pub fn fail_files_under(&self, path: &Path, errno: i32) {
        lock(&self.file_faults_under).push((None, path.to_path_buf(), errno));
    }

    /// Every `op` ("write", "fsync", ...) under `path` fails with `errno`
    /// until `clear_file_faults`.
    pub fn fail_op_under(&self, op: &'static str, path: &Path, errno: i32) {
        lock(&self.file_faults_under).push((Some(op), path.to_path_buf(), errno));
    }

    /// Every `op` under `path` waits, before it changes anything, until
    /// the hold answered is let go (`OpHold::release`): a removal that
    /// takes as long as the test likes. `op` "read" holds the reads of
    /// `read_regular` (an NFS share's markers: a server that stopped
    /// answering).
    pub fn hold_op_under(&self, op: &'static str, path: &Path) -> std::sync::Arc<OpHold> {
        self.hold_op_under_after(op, path, 0)
    }

    /// `hold_op_under`, letting the first `skip` such changes go on
    /// unheld (not counted as reached).
    pub fn hold_op_under_after(
        &self,
        op: &'static str,
        path: &Path,
        skip: usize,
    ) -> std::sync::Arc<OpHold> {
        let h = std::sync::Arc::new(OpHold {
            skip: Mutex::new(skip),
            ..Default::default()
        });
        lock(&self.holds).push((op, path.to_path_buf(), h.clone()));
        h
    }

    /// Forgets every hold (`hold_op_under`), letting go of any change
    /// waiting at one: a hold set later is the first a change meets again.
    pub fn clear_holds(&self) {
        for (_, _, h) in lock(&self.holds).drain(..) {
            h.release();
        }
    }

    /// `fail_op_under`, letting the first `skip` such calls under `path`
    /// go on unfailed (a second look at a path that fails where the first
    /// answered).
    pub fn fail_op_under_after(&self, op: &'static str, path: &Path, skip: usize, errno: i32) {
        lock(&self.file_faults_after).push((op, path.to_path_buf(), skip, errno));
    }

    pub fn clear_file_faults(&self) {
        lock(&self.file_faults_under).clear();
        lock(&self.file_faults_after).clear();
        *lock(&self.file_fault_at) = None;
    }

    /// Records a filesystem change and fails it if a fault says so
    /// (`fail_next(op, ..)`, `fail_file_op_at`, `fail_files_under`).
    /// The errno a fault set with `fail_op_under` (or, with `any_op`,
    /// `fail_files_under`) gives `op` at `path`.
    fn fault_under(&self, op: &str, path: &Path, any_op: bool) -> Option<i32> {
        lock(&self.file_faults_under)
            .iter()
            .find(|(o, p, _)| o.map_or(any_op, |o| o == op) && path.starts_with(p))
            .map(|(_, _, errno)| *errno)
            .or_else(|| {
                let mut after = lock(&self.file_faults_after);
                let (_, _, skip, errno) = after
                    .iter_mut()
                    .find(|(o, p, _, _)| *o == op && path.starts_with(p))?;
                match skip.checked_sub(1) {
                    Some(left) => {
                        *skip = left;
                        None
                    }
                    None => Some(*errno),
                }
            })
    }

    fn file_op(&self, op: &'static str, path: &Path) -> Result<(), OsError> {
        let path = &through_fd(path);
        lock(&self.file_ops).push(FileOp {
            op,
            path: path.to_path_buf(),
        });
        self.wait_if_held(op, path);
        self.injected(op, path)?;
        let fail = |errno| {
            Err(OsError::sys(
                op,
                path,
                std::io::Error::from_raw_os_error(errno),
            ))
        };
        {
            let mut at = lock(&self.file_fault_at);
            if let Some((n, errno)) = *at {
                if n == 0 {
                    *at = None;
                    return fail(errno);
                }
                *at = Some((n - 1, errno));
            }
        }
        if let Some(errno) = self.fault_under(op, path, true) {
            return fail(errno);
        }
        Ok(())
    }

    /// The error a fault set with `fail_op_under(op, ..)` gives the look
    /// or read `op` at `path` (a read is no change: a fault for every op
    /// under a path, `fail_files_under`, leaves it alone).
    fn read_fault(&self, op: &'static str, path: &Path) -> Result<(), OsError> {
        match self.fault_under(op, path, false) {
            Some(errno) => Err(OsError::sys(
                op,
                path,
                std::io::Error::from_raw_os_error(errno),
            )),
            None => Ok(()),
        }
    }

    /// Waits while a hold set with `hold_op_under(op, ..)` on a directory
    /// holding `path` (a path through `/proc/self/fd` taken as the one it
    /// reaches) is not released.
    fn wait_if_held(&self, op: &str, path: &Path) {
        let hold = lock(&self.holds)
            .iter()
            .find(|(o, p, _)| *o == op && path.starts_with(p))
            .map(|(_, _, h)| h.clone());
        if let Some(h) = hold {
            h.wait_here();
        }
    }

    /// From now on, runs of `mount.nfs SOURCE TARGET ...` and `umount
    /// ... TARGET` that have no scripted reply succeed and change the mount
    /// table like the real commands (an NFS entry with the source and the
    /// ro/rw option; umount removes the top entry or exits 32 "not
    /// mounted").
    pub fn emulate_nfs_mounts(&self) {
        *lock(&self.nfs_mounts) = true;
    }

    /// From now on emulated NFS mounts are named as the kernel names them
    /// (see `emulate_nfs_mounts`): the super options end with `addr=` (the
    /// server's address: an IP literal itself, a host name what `hosts`
    /// maps it to, without case); a mount of an address that already has a
    /// mount in the table shares that mount's client and shows its host
    /// spelling (`localhost` mounted after `127.0.0.1` shows `127.0.0.1`);
    /// and a path at or below `from` of a `links` pair (a symlink on the
    /// server) shows as `to` instead.
    pub fn emulate_nfs_naming(&self, hosts: &[(&str, &str)], links: &[(&str, &str)]) {
        *lock(&self.nfs_names) = Some(NfsNaming {
            hosts: hosts
                .iter()
                .map(|(h, a)| (h.to_ascii_lowercase(), a.to_string()))
                .collect(),
            links: links
                .iter()
                .map(|(f, t)| (f.to_string(), t.to_string()))
                .collect(),
        });
    }

    /// The source and super options the fake kernel shows for a mount of
    /// `source` with `opts` (see `emulate_nfs_naming`).
    fn nfs_shown(&self, source: &str, opts: String) -> (String, String) {
        let Some(n) = lock(&self.nfs_names).clone() else {
            return (source.to_string(), opts);
        };
        let (host, path) = if source.starts_with('[') {
            match source.find("]:") {
                Some(i) => (&source[..=i], &source[i + 2..]),
                None => return (source.to_string(), opts),
            }
        } else {
            match source.split_once(':') {
                Some(hp) => hp,
                None => return (source.to_string(), opts),
            }
        };
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let addr = if bare.parse::<std::net::IpAddr>().is_ok() {
            Some(bare.to_string())
        } else {
            n.hosts.get(&host.to_ascii_lowercase()).cloned()
        };
        let mut path = path.to_string();
        for (from, to) in &n.links {
            if let Some(rest) = path.strip_prefix(from.as_str()) {
                if rest.is_empty() || rest.starts_with('/') {
                    path = format!("{to}{rest}");
                    break;
                }
            }
        }
        let Some(addr) = addr else {
            return (format!("{host}:{path}"), opts);
        };
        let tag = format!("addr={addr}");
        let shared = lock(&self.table)
            .iter()
            .filter(|m| m.fs_type == "nfs" || m.fs_type == "nfs4")
            .find(|m| m.super_options.split(',').any(|o| o == tag))
            .and_then(|m| {
                let s = &m.source;
                if s.starts_with('[') {
                    s.find("]:").map(|i| s[..=i].to_string())
                } else {
                    s.split_once(':').map(|(h, _)| h.to_string())
                }
            });
        let shown_host = shared.unwrap_or_else(|| host.to_string());
        let opts = if opts.is_empty() {
            tag
        } else {
            format!("{opts},{tag}")
        };
        (format!("{shown_host}:{path}"), opts)
    }

    /// `Files::lstat` of `path` sleeps `delay` before answering (None: no
    /// delay).
    pub fn set_lstat_delay(&self, path: &Path, delay: Option<Duration>) {
        match delay {
            Some(d) => {
                lock(&self.lstat_delays).insert(path.to_path_buf(), d);
            }
            None => {
                lock(&self.lstat_delays).remove(path);
            }
        }
    }

    /// statvfs of `path` sleeps `delay` before answering (None: no delay).
    pub fn set_statvfs_delay(&self, path: &Path, delay: Option<Duration>) {
        match delay {
            Some(d) => {
                lock(&self.stat_delays).insert(path.to_path_buf(), d);
            }
            None => {
                lock(&self.stat_delays).remove(path);
            }
        }
    }

    /// statvfs of `path` reads the usage, then sleeps `delay` before it
    /// answers what it read (None: answers at once).
    pub fn set_statvfs_stale(&self, path: &Path, delay: Option<Duration>) {
        match delay {
            Some(d) => {
                lock(&self.stale_stats).insert(path.to_path_buf(), d);
            }
            None => {
                lock(&self.stale_stats).remove(path);
            }
        }
    }

    /// `allocate` takes the bytes it allocates from the default usage's
    /// free space (off by default: tests set the free space themselves).
    pub fn set_allocation_takes_free(&self, on: bool) {
        *lock(&self.allocation_takes_free) = on;
    }

    fn emulate_nfs_command(&self, program: &str, args: &[String]) -> Option<CmdOutput> {
        if !*lock(&self.nfs_mounts) {
            return None;
        }
        let ok = CmdOutput {
            code: Some(0),
            ..Default::default()
        };
        match program {
            "mount.nfs" => {
                let (source, target) = (args.first()?, args.get(1)?);
                let opts = args
                    .windows(2)
                    .find(|w| w[0] == "-o")
                    .map(|w| w[1].clone())
                    .unwrap_or_default();
                let v4 = !opts.split(',').any(|o| o == "vers=3" || o == "nfsvers=3");
                let ro = opts.split(',').any(|o| o == "ro");
                let (source, opts) = self.nfs_shown(source, opts);
                let id = self.alloc_id();
                self.push_mount(MountEntry {
                    id,
                    parent: 1,
                    major: 0,
                    minor: id,
                    root: PathBuf::from("/"),
                    mount_point: PathBuf::from(target),
                    options: if ro { "ro,relatime" } else { "rw,relatime" }.into(),
                    fs_type: if v4 { "nfs4" } else { "nfs" }.into(),
                    source,
                    super_options: opts,
                    shared: 0,
                    master: 0,
                });
                Some(ok)
            }
            "umount" => {
                let target = resolved(Path::new(args.last()?));
                let mut t = lock(&self.table);
                match t.iter().rposition(|m| m.mount_point == target) {
                    Some(i) => {
                        t.remove(i);
                        Some(ok)
                    }
                    None => Some(CmdOutput {
                        code: Some(32),
                        stdout: String::new(),
                        stderr: format!("umount: {}: not mounted.", target.display()),
                    }),
                }
            }
            _ => None,
        }
    }

    /// Answers every run of `program` that has no queued reply with `f`
    /// of its arguments.
    pub fn respond(&self, program: &str, f: impl Fn(&[String]) -> CmdReply + Send + 'static) {
        lock(&self.responders).insert(program.to_string(), Box::new(move |a| Some(f(a))));
    }

    /// Like `respond`, but a run that `f` answers None is left to the
    /// emulation (`emulate_nfs_mounts`), as if nothing were scripted:
    /// scripts the failures of some mounts only.
    pub fn respond_to_some(
        &self,
        program: &str,
        f: impl Fn(&[String]) -> Option<CmdReply> + Send + 'static,
    ) {
        lock(&self.responders).insert(program.to_string(), Box::new(f));
    }

    /// Registers a block device (a disk) at `path`.
    pub fn add_device(&self, path: &Path, major: u32, minor: u32, size_bytes: u64) {
        lock(&self.devices).insert(
            path.to_path_buf(),
            DeviceInfo {
                path: path.to_path_buf(),
                major,
                minor,
                size_bytes,
            },
        );
    }

    /// Makes `dir` the fake's `/dev/disk/by-id`: its symlinks to
    /// registered devices are their stable links (`stable_links`).
    pub fn set_by_id_dir(&self, dir: &Path) {
        *lock(&self.by_id) = Some(dir.to_path_buf());
    }

    /// Removes a registered device (a disk pulled out).
    pub fn remove_device(&self, path: &Path) {
        lock(&self.devices).remove(path);
    }

    /// Another process holds (or, with `false`, no longer holds) the
    /// device at `path` exclusively.
    pub fn set_held(&self, path: &Path, held: bool) {
        let mut h = lock(&self.held);
        if held {
            h.insert(path.to_path_buf());
        } else {
            h.remove(path);
        }
    }

    /// Whether a claim (`BlockDevices::claim`) holds the device at `path`.
    pub fn claimed(&self, path: &Path) -> bool {
        lock(&self.claims).contains(path)
    }

    /// EBUSY while a claim holds the device at `path`: every exclusive
    /// open of it fails so (mkfs, mount, wipefs, the erase).
    fn refuse_claimed(&self, op: &'static str, path: &Path) -> Result<(), OsError> {
        if self.claimed(path) {
            return Err(OsError::sys(
                op,
                path,
                std::io::Error::from_raw_os_error(libc::EBUSY),
            ));
        }
        Ok(())
    }

    /// Makes the device at `path` write-protected: read-only whatever
    /// `set_read_only` sets, as a disk that is so itself.
    pub fn set_write_protected(&self, path: &Path) {
        lock(&self.write_protected).insert(path.to_path_buf());
    }

    /// Makes reads of a device fail (`read_head`, `reads_zero`).
    pub fn set_unreadable(&self, path: &Path) {
        lock(&self.unreadable).insert(path.to_path_buf());
    }

    /// Binds `file` to a loop device as if another process (or an earlier
    /// run of Berth) had attached it; records no call.
    pub fn add_loop(&self, file: &Path) -> LoopInfo {
        self.bind_loop(file, AttachOptions::default())
    }

    /// `add_loop` of the part of `file` from `offset`, of at most
    /// `sizelimit` bytes (0: to its end), as `losetup --offset
    /// --sizelimit` attaches: the device's size is what the kernel gives
    /// it (the file's length less the offset, capped at the size limit).
    /// Reads and writes of the fake device still reach the file from its
    /// start.
    pub fn add_loop_at(&self, file: &Path, offset: u64, sizelimit: u64) -> LoopInfo {
        let info = self.bind_loop(file, AttachOptions::default());
        if let Some(l) = lock(&self.loops).get_mut(&info.minor) {
            l.offset = offset;
            l.sizelimit = sizelimit;
            let rest = l.size.saturating_sub(offset);
            l.size = if sizelimit > 0 {
                rest.min(sizelimit)
            } else {
                rest
            };
        }
        info
    }

    /// The bound fake loop devices.
    pub fn loops(&self) -> Vec<LoopInfo> {
        lock(&self.loops)
            .iter()
            .map(|(n, l)| Self::loop_info(*n, l))
            .collect()
    }

    /// The next `n` detaches behave like LOOP_CLR_FD on a busy device: they
    /// succeed but only set autoclear, leaving the device bound.
    pub fn detach_leaves_bound(&self, n: u32) {
        *lock(&self.busy_detaches) += n;
    }

    fn loop_info(n: u32, l: &FakeLoop) -> LoopInfo {
        LoopInfo {
            device: PathBuf::from(format!("/dev/loop{n}")),
            major: 7,
            minor: n,
            backing_file: l.backing.clone(),
            backing_deleted: false,
            read_only: l.read_only,
            autoclear: l.autoclear,
            direct_io: l.direct_io,
        }
    }

    fn loop_index(device: &Path) -> Option<u32> {
        device.to_str()?.strip_prefix("/dev/loop")?.parse().ok()
    }

    fn bind_loop(&self, file: &Path, opts: AttachOptions) -> LoopInfo {
        let (id, size) = std::fs::metadata(file)
            .map(|m| ((m.dev(), m.ino()), m.len()))
            .unwrap_or(((0, 0), 0));
        let mut loops = lock(&self.loops);
        let n = (0..).find(|i| !loops.contains_key(i)).unwrap_or(0);
        let l = FakeLoop {
            backing: file.to_path_buf(),
            id,
            offset: 0,
            sizelimit: 0,
            read_only: opts.read_only,
            direct_io: opts.direct_io,
            autoclear: false,
            size,
        };
        let info = Self::loop_info(n, &l);
        loops.insert(n, l);
        info
    }

    /// What reads of the device at `path` read: a loop device's backing
    /// file, or the path itself; None when reads of it fail (not a fake
    /// device, or made unreadable).
    fn readable_backing(&self, path: &Path) -> Option<PathBuf> {
        if lock(&self.unreadable).contains(path) || self.device_numbers(path).is_none() {
            return None;
        }
        Some(
            Self::loop_index(path)
                .and_then(|n| lock(&self.loops).get(&n).map(|l| l.backing.clone()))
                .unwrap_or_else(|| path.to_path_buf()),
        )
    }

    /// The file writes to the device at `path` land in: a bound fake loop
    /// device's backing file, or the path itself.
    fn written_file(&self, path: &Path) -> PathBuf {
        Self::loop_index(path)
            .and_then(|n| lock(&self.loops).get(&n).map(|l| l.backing.clone()))
            .unwrap_or_else(|| path.to_path_buf())
    }

    /// Major and minor of a fake device node, if it is one.
    fn device_numbers(&self, path: &Path) -> Option<(u32, u32)> {
        if let Some(n) = Self::loop_index(path) {
            if lock(&self.loops).contains_key(&n) {
                return Some((7, n));
            }
        }
        lock(&self.devices).get(path).map(|d| (d.major, d.minor))
    }

    /// Every call made so far.
    pub fn calls(&self) -> Vec<Call> {
        lock(&self.calls).clone()
    }

    /// Forgets the recorded calls and zeroes the read and probe counts (the
    /// mount table stays).
    pub fn clear_calls(&self) {
        lock(&self.calls).clear();
        *lock(&self.table_reads) = 0;
        *lock(&self.probes) = 0;
        *lock(&self.mount_id_probes) = 0;
        *lock(&self.identity_probes) = 0;
    }

    /// How many times the whole mount table was read (`mounts`, successful
    /// or failed) since the start or the last `clear_calls`.
    pub fn table_reads(&self) -> usize {
        *lock(&self.table_reads)
    }

    /// How many mount-root probes (`mount_root`) were made since the start
    /// or the last `clear_calls`.
    pub fn probes(&self) -> usize {
        *lock(&self.probes)
    }

    /// How many mount-id probes (`root_mount_id`, one statx each on a real
    /// node) were made since the start or the last `clear_calls`.
    pub fn mount_id_probes(&self) -> usize {
        *lock(&self.mount_id_probes)
    }

    /// How many identity probes (`identity`, one statx each on a real node)
    /// were made since the start or the last `clear_calls`.
    pub fn identity_probes(&self) -> usize {
        *lock(&self.identity_probes)
    }

    /// From now on the mount-root probe of `path` answers None ("don't
    /// know", as statx on a broken mount or an old kernel does) when
    /// `unknown`, or from the table again when not. `fail_next("mount_root",
    /// errno)` makes only the next probe of any path answer None.
    pub fn set_probe_unknown(&self, path: &Path, unknown: bool) {
        let mut u = lock(&self.probe_unknown);
        if unknown {
            u.insert(path.to_path_buf());
        } else {
            u.remove(path);
        }
    }

    /// The current fake mount table.
    pub fn table(&self) -> Vec<MountEntry> {
        lock(&self.table).clone()
    }

    /// Every mount showing the directory `from` shows `to` from now on, as
    /// mountinfo follows a directory renamed under its mounts (`to`
    /// `<from>//deleted` for one removed).
    pub fn follow_rename(&self, from: &Path, to: &Path) {
        for m in lock(&self.table).iter_mut().filter(|m| m.root == from) {
            m.root = to.to_path_buf();
        }
    }

    /// Adds a mount of a new filesystem (its own device) at `mount_point`.
    pub fn add_filesystem(&self, mount_point: &Path, major: u32, minor: u32) {
        let id = self.alloc_id();
        self.push_mount(MountEntry {
            id,
            parent: 1,
            major,
            minor,
            root: PathBuf::from("/"),
            mount_point: mount_point.to_path_buf(),
            options: "rw,relatime".into(),
            fs_type: "ext4".into(),
            source: format!("/dev/fake{major}:{minor}"),
            super_options: "rw".into(),
            shared: 0,
            master: 0,
        });
    }

    /// Sets what statvfs reports, for every path or for one path.
    pub fn set_usage(&self, path: Option<&Path>, usage: FsUsage) {
        match path {
            Some(p) => {
                lock(&self.usage).insert(p.to_path_buf(), usage);
            }
            None => *lock(&self.default_usage) = usage,
        }
    }

    /// Sets the filesystem device `FsStats::device` answers for `path`
    /// (see `FsStats::device` for the default).
    pub fn set_device(&self, path: &Path, dev: u64) {
        lock(&self.fs_devices).insert(path.to_path_buf(), dev);
    }

    /// Makes the next call of `op` ("bind", "mount_fs", "unmount",
    /// "statvfs", "device", "mounts", "mount_root") fail with `errno` (a failed
    /// "mount_root" answers None).
    pub fn fail_next(&self, op: &'static str, errno: i32) {
        lock(&self.failures).entry(op).or_default().push_back(errno);
    }

    /// Queues the reply of the next run of `program`.
    pub fn reply(&self, program: &str, reply: CmdReply) {
        lock(&self.replies)
            .entry(program.to_string())
            .or_default()
            .push_back(reply);
    }

    /// Adds a mount as the kernel would: at the resolved mount point (a
    /// symlinked parent followed), its parent the mount it is mounted on
    /// (the top one at the same point when stacked).
    fn push_mount(&self, mut e: MountEntry) {
        e.mount_point = resolved(&e.mount_point);
        let mut t = lock(&self.table);
        e.parent = t
            .iter()
            .rev()
            .find(|m| m.mount_point == e.mount_point)
            .or_else(|| mountinfo::containing(&t, &e.mount_point))
            .map(|m| m.id)
            .unwrap_or(1);
        t.push(e);
    }

    fn alloc_id(&self) -> u32 {
        let mut n = lock(&self.next_id);
        *n += 1;
        *n
    }

    fn injected(&self, op: &'static str, path: &Path) -> Result<(), OsError> {
        self.run_hook(op);
        self.failed(op, path)
    }

    /// Runs the hook `before_next(op, ..)` set, if any.
    fn run_hook(&self, op: &'static str) {
        let hook = {
            let mut h = lock(&self.hooks);
            h.iter().position(|(o, _)| *o == op).map(|i| h.remove(i).1)
        };
        if let Some(f) = hook {
            f();
        }
    }

    /// The failure `fail_next(op, ..)` queued, if any.
    fn failed(&self, op: &'static str, path: &Path) -> Result<(), OsError> {
        if let Some(errno) = lock(&self.failures).get_mut(op).and_then(|q| q.pop_front()) {
            return Err(OsError::sys(
                op,
                path,
                std::io::Error::from_raw_os_error(errno),
            ));
        }
        Ok(())
    }

    fn options(flags: MountFlags) -> String {
        let mut o = vec![if flags.readonly { "ro" } else { "rw" }];
        for (on, name) in [
            (flags.nosuid, "nosuid"),
            (flags.nodev, "nodev"),
            (flags.noexec, "noexec"),
            (flags.noatime, "noatime"),
        ] {
            if on {
                o.push(name);
            }
        }
        o.join(",")
    }
}

/// `path` with its parent resolved (symlinks followed), as mount(2),
/// umount(2) and statx(2) see it; as it is when the parent does not exist.
fn resolved(path: &Path) -> PathBuf {
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => match std::fs::canonicalize(parent) {
            Ok(p) => p.join(name),
            Err(_) => path.to_path_buf(),
        },
        _ => path.to_path_buf(),
    }
}

/// What a bind mount's `source` reaches, as mount(2) looks it up: a
/// symlink at it followed, and a descriptor's magic link
/// (`/proc/self/fd/N`, `Files::pin`) to the object opened, wherever that
/// is now; as `resolved` when it does not exist.
fn followed(source: &Path) -> PathBuf {
    if source.starts_with("/proc/self/fd") {
        return through_fd(source);
    }
    std::fs::canonicalize(source).unwrap_or_else(|_| resolved(source))
}

/// A path through a directory descriptor (`/proc/self/fd/N/rest`, as the
/// NFS controller builds them) as the real path it names, so recorded
/// operations and `fail_files_under` see real paths.
fn through_fd(path: &Path) -> PathBuf {
    let mut c = path.components();
    let fd_dir = Path::new("/proc/self/fd");
    if !path.starts_with(fd_dir) {
        return path.to_path_buf();
    }
    for _ in fd_dir.components() {
        c.next();
    }
    let Some(n) = c.next() else {
        return path.to_path_buf();
    };
    match std::fs::read_link(fd_dir.join(n)) {
        Ok(dir) if c.as_path().as_os_str().is_empty() => dir,
        Ok(dir) => dir.join(c.as_path()),
        Err(_) => path.to_path_buf(),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Mounter for FakeOs {
    /// Recorded with the source as the kernel reaches it (`followed`: a
    /// symlink followed, a descriptor's `/proc/self/fd/N` as the object
    /// it holds), after a hook `before_next("bind", ..)` ran.
    fn bind(&self, source: &Path, target: &Path, flags: MountFlags) -> Result<(), OsError> {
        self.run_hook("bind");
        let pinned = lock(&self.pinned_mounts).get(source).cloned();
        let source = &followed(source);
        lock(&self.calls).push(Call::Bind {
            source: source.clone(),
            target: target.into(),
            flags,
        });
        self.failed("bind", target)?;
        let id = self.alloc_id();
        let t = lock(&self.table);
        let (major, minor, root, fs_type, src) = match pinned {
            Some(m) => (m.major, m.minor, m.root, m.fs_type, m.source),
            None => {
                let (major, minor, root) = mountinfo::object_of(&t, source).ok_or_else(|| {
                    OsError::sys(
                        "bind mount",
                        source,
                        std::io::Error::from_raw_os_error(libc::ENOENT),
                    )
                })?;
                let (fs_type, src) = mountinfo::containing(&t, source)
                    .map(|m| (m.fs_type.clone(), m.source.clone()))
                    .unwrap_or_default();
                (major, minor, root, fs_type, src)
            }
        };
        drop(t);
        self.push_mount(MountEntry {
            id,
            parent: 1,
            major,
            minor,
            root,
            mount_point: target.into(),
            options: Self::options(flags),
            fs_type,
            source: src,
            super_options: "rw".into(),
            shared: 0,
            master: 0,
        });
        Ok(())
    }

    fn mount_fs(
        &self,
        source: &Path,
        target: &Path,
        fstype: &str,
        flags: MountFlags,
        data: &str,
    ) -> Result<(), OsError> {
        lock(&self.calls).push(Call::MountFs {
            source: source.into(),
            target: target.into(),
            fstype: fstype.into(),
            flags,
            data: data.into(),
        });
        self.injected("mount_fs", target)?;
        self.refuse_claimed("mount", source)?;
        let id = self.alloc_id();
        let (major, minor) = self.device_numbers(source).unwrap_or((7, id));
        self.push_mount(MountEntry {
            id,
            parent: 1,
            major,
            minor,
            root: PathBuf::from("/"),
            mount_point: target.into(),
            options: Self::options(flags),
            fs_type: fstype.into(),
            source: source.to_string_lossy().into_owned(),
            super_options: data.into(),
            shared: 0,
            master: 0,
        });
        Ok(())
    }

    fn unmount(&self, target: &Path) -> Result<(), OsError> {
        lock(&self.calls).push(Call::Unmount {
            target: target.into(),
        });
        self.injected("unmount", target)?;
        let real = resolved(target);
        let mut t = lock(&self.table);
        match t.iter().rposition(|m| m.mount_point == real) {
            Some(i) => {
                t.remove(i);
                Ok(())
            }
            None => Err(OsError::sys(
                "unmount",
                target,
                std::io::Error::from_raw_os_error(libc::EINVAL),
            )),
        }
    }
}

impl MountTable for FakeOs {
    fn mounts(&self) -> Result<Vec<MountEntry>, OsError> {
        *lock(&self.table_reads) += 1;
        self.injected("mounts", Path::new("/proc/self/mountinfo"))?;
        Ok(self.table())
    }
}

impl MountProbe for FakeOs {
    /// Whether the table has an entry at exactly `path` (its parent
    /// resolved, as the kernel resolves it); None for paths set with
    /// `set_probe_unknown` and after `fail_next("mount_root", _)`.
    fn mount_root(&self, path: &Path) -> Option<bool> {
        *lock(&self.probes) += 1;
        if self.injected("mount_root", path).is_err() || lock(&self.probe_unknown).contains(path) {
            return None;
        }
        let path = resolved(path);
        Some(lock(&self.table).iter().any(|m| m.mount_point == path))
    }

    /// The real file's device and inode of what the top mount at `path`
    /// shows (a bind's root is a real path in the fake), else of `path`
    /// itself; None for paths set with `set_probe_unknown`.
    fn identity(&self, path: &Path) -> Option<(u64, u64)> {
        *lock(&self.identity_probes) += 1;
        self.identity_uncounted(path)
    }

    /// Both answers as `mount_root` and `identity` give them, counted as
    /// one mount-root probe (one statx on a node).
    fn root_and_identity(&self, path: &Path) -> (Option<bool>, Option<(u64, u64)>) {
        (self.mount_root(path), self.identity_uncounted(path))
    }

    /// The id of the top entry at `path` (its parent resolved); None for
    /// paths set with `set_probe_unknown`.
    fn root_mount_id(&self, path: &Path) -> Option<Option<u64>> {
        *lock(&self.mount_id_probes) += 1;
        if lock(&self.probe_unknown).contains(path) {
            return None;
        }
        let path = resolved(path);
        Some(
            lock(&self.table)
                .iter()
                .rev()
                .find(|m| m.mount_point == path)
                .map(|m| u64::from(m.id)),
        )
    }
}

impl FakeOs {
    /// `identity` without counting it.
    fn identity_uncounted(&self, path: &Path) -> Option<(u64, u64)> {
        if self.injected("identity", path).is_err() || lock(&self.probe_unknown).contains(path) {
            return None;
        }
        let path = resolved(path);
        let shown = lock(&self.table)
            .iter()
            .rev()
            .find(|m| m.mount_point == path)
            .map(|m| m.root.clone())
            .unwrap_or_else(|| path.to_path_buf());
        std::fs::symlink_metadata(shown)
            .ok()
            .map(|m| (m.dev(), m.ino()))
    }
}

impl FsStats for FakeOs {
    fn statvfs(&self, path: &Path) -> Result<FsUsage, OsError> {
        let delay = lock(&self.stat_delays).get(path).copied();
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        self.injected("statvfs", path)?;
        let u = lock(&self.usage)
            .get(path)
            .copied()
            .unwrap_or_else(|| *lock(&self.default_usage));
        let stale = lock(&self.stale_stats).get(path).copied();
        if let Some(d) = stale {
            std::thread::sleep(d);
        }
        Ok(u)
    }

    /// As set with `set_device`; otherwise as statvfs answers: a path with
    /// a usage of its own (`set_usage` with a path) is a filesystem of its
    /// own, every other path shares the root filesystem (8:1) and its
    /// usage.
    fn device(&self, path: &Path) -> Result<u64, OsError> {
        self.injected("device", path)?;
        if let Some(d) = lock(&self.fs_devices).get(path) {
            return Ok(*d);
        }
        if lock(&self.usage).contains_key(path) {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            path.hash(&mut h);
            return Ok(h.finish() | 1 << 63);
        }
        Ok(libc::makedev(8, 1))
    }
}

impl Runner for FakeOs {
    fn run(
        &self,
        program: &str,
        args: &[String],
        _timeout: Duration,
    ) -> Result<CmdOutput, OsError> {
        lock(&self.calls).push(Call::Run {
            program: program.into(),
            args: args.to_vec(),
        });
        let mut scripted = lock(&self.replies)
            .get_mut(program)
            .and_then(|q| q.pop_front());
        if scripted.is_none() {
            scripted = lock(&self.responders).get(program).and_then(|f| f(args));
        }
        if scripted.is_none() {
            if let Some(out) = self.emulate_nfs_command(program, args) {
                return Ok(out);
            }
        }
        scripted.unwrap_or_else(|| {
            Err(OsError::Failed {
                program: program.into(),
                status: "no reply scripted in the fake".into(),
                stderr: String::new(),
            })
        })
    }
}

impl LoopDevices for FakeOs {
    fn list(&self) -> Result<Vec<LoopInfo>, OsError> {
        self.injected("loop_list", Path::new("/sys/block"))?;
        Ok(self.loops())
    }

    fn status(&self, device: &Path) -> Result<LoopStatus, OsError> {
        Self::loop_index(device)
            .and_then(|n| {
                lock(&self.loops).get(&n).map(|l| LoopStatus {
                    dev: l.id.0,
                    ino: l.id.1,
                    offset: l.offset,
                    sizelimit: l.sizelimit,
                })
            })
            .ok_or_else(|| {
                OsError::sys(
                    "LOOP_GET_STATUS64",
                    device,
                    std::io::Error::from_raw_os_error(libc::ENXIO),
                )
            })
    }

    fn attach(&self, file: &Path, opts: AttachOptions) -> Result<LoopInfo, OsError> {
        lock(&self.calls).push(Call::LoopAttach {
            file: file.into(),
            read_only: opts.read_only,
            direct_io: opts.direct_io,
        });
        self.injected("loop_attach", file)?;
        if !file.is_file() {
            return Err(OsError::sys(
                "open",
                file,
                std::io::Error::from_raw_os_error(libc::ENOENT),
            ));
        }
        Ok(self.bind_loop(file, opts))
    }

    fn detach(&self, device: &Path) -> Result<(), OsError> {
        lock(&self.calls).push(Call::LoopDetach {
            device: device.into(),
        });
        self.injected("loop_detach", device)?;
        let Some(n) = Self::loop_index(device) else {
            return Ok(());
        };
        {
            let mut busy = lock(&self.busy_detaches);
            if *busy > 0 {
                *busy -= 1;
                if let Some(l) = lock(&self.loops).get_mut(&n) {
                    l.autoclear = true;
                }
                return Ok(());
            }
        }
        lock(&self.loops).remove(&n);
        Ok(())
    }

    fn clear_autoclear(&self, device: &Path) -> Result<(), OsError> {
        lock(&self.calls).push(Call::LoopClearAutoclear {
            device: device.into(),
        });
        if let Some(n) = Self::loop_index(device) {
            if let Some(l) = lock(&self.loops).get_mut(&n) {
                l.autoclear = false;
            }
        }
        Ok(())
    }

    fn set_capacity(&self, device: &Path) -> Result<(), OsError> {
        lock(&self.calls).push(Call::LoopSetCapacity {
            device: device.into(),
        });
        self.injected("set_capacity", device)?;
        let n = Self::loop_index(device).ok_or_else(|| {
            OsError::sys(
                "LOOP_SET_CAPACITY",
                device,
                std::io::Error::from_raw_os_error(libc::ENXIO),
            )
        })?;
        let mut loops = lock(&self.loops);
        let l = loops.get_mut(&n).ok_or_else(|| {
            OsError::sys(
                "LOOP_SET_CAPACITY",
                device,
                std::io::Error::from_raw_os_error(libc::ENXIO),
            )
        })?;
        l.size = std::fs::metadata(&l.backing)
            .map(|m| m.len())
            .unwrap_or(l.size);
        Ok(())
    }
}

impl FakeOs {
    /// EPERM, as the kernel answers, for a write to a device it holds
    /// read-only.
    fn is_read_only(&self, path: &Path) -> bool {
        lock(&self.read_only).contains(path) || lock(&self.write_protected).contains(path)
    }

    fn refuse_read_only(&self, op: &'static str, path: &Path) -> Result<(), OsError> {
        if self.is_read_only(path) {
            return Err(OsError::sys(
                op,
                path,
                std::io::Error::from_raw_os_error(libc::EPERM),
            ));
        }
        Ok(())
    }
}

impl BlockDevices for FakeOs {
    /// A link to a fake loop device (an entry of a pool directory), or
    /// to a registered device (a by-id link, `set_by_id_dir`), resolves
    /// to it, as the real one follows links.
    fn inspect(&self, path: &Path) -> Result<DeviceInfo, OsError> {
        self.injected("inspect", path)?;
        let link = std::fs::read_link(path)
            .ok()
            .filter(|t| Self::loop_index(t).is_some())
            .or_else(|| {
                std::fs::symlink_metadata(path)
                    .is_ok_and(|m| m.is_symlink())
                    .then(|| std::fs::canonicalize(path).ok())
                    .flatten()
                    .and_then(|t| {
                        lock(&self.devices)
                            .keys()
                            .find(|k| std::fs::canonicalize(k).ok().as_ref() == Some(&t))
                            .cloned()
                    })
            });
        let path = link.as_deref().unwrap_or(path);
        if let Some(n) = Self::loop_index(path) {
            if let Some(l) = lock(&self.loops).get(&n) {
                return Ok(DeviceInfo {
                    path: path.to_path_buf(),
                    major: 7,
                    minor: n,
                    size_bytes: l.size,
                });
            }
        }
        lock(&self.devices).get(path).cloned().ok_or_else(|| {
            OsError::sys(
                "resolve",
                path,
                std::io::Error::from_raw_os_error(libc::ENOENT),
            )
        })
    }

    /// The links in the fake's by-id directory (`set_by_id_dir`) that
    /// resolve to the device, sorted by name.
    fn stable_links(&self, dev: &DeviceInfo) -> Vec<PathBuf> {
        let Some(dir) = lock(&self.by_id).clone() else {
            return Vec::new();
        };
        let Ok(rd) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let target = std::fs::canonicalize(&dev.path).ok();
        let mut links: Vec<PathBuf> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| target.is_some() && std::fs::canonicalize(p).ok() == target)
            .collect();
        links.sort();
        links
    }

    /// The first 4 KiB of the device: of a loop device's backing file or a
    /// stand-in disk that is a regular file; zeros for other fake devices.
    fn read_head(&self, path: &Path) -> Result<Vec<u8>, OsError> {
        self.injected("read_head", path)?;
        let Some(backing) = self.readable_backing(path) else {
            return Err(OsError::sys(
                "read",
                path,
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        };
        let mut head = vec![0u8; 4096];
        if backing.is_file() {
            use std::io::Read;
            if let Ok(f) = std::fs::File::open(&backing) {
                let _ = f.take(4096).read(&mut head);
            }
        }
        Ok(head)
    }

    /// The sample of the device as `read_head` reads it: bytes past the end
    /// of a backing or stand-in file, and every byte of other fake
    /// devices, are zeros.
    fn reads_zero(&self, path: &Path, size_bytes: u64) -> Result<bool, OsError> {
        self.injected("reads_zero", path)?;
        let Some(backing) = self.readable_backing(path) else {
            return Err(OsError::sys(
                "read sample",
                path,
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        };
        if !backing.is_file() {
            return Ok(true);
        }
        let data = std::fs::read(&backing).map_err(|e| OsError::sys("read sample", path, e))?;
        Ok(super::blockdev::sample_ranges(size_bytes)
            .into_iter()
            .all(|(start, len)| {
                let end = usize::try_from(start + len).unwrap_or(usize::MAX);
                let start = usize::try_from(start).unwrap_or(usize::MAX);
                data.get(start.min(data.len())..end.min(data.len()))
                    .is_none_or(|r| r.iter().all(|&b| b == 0))
            }))
    }

    fn held(&self, path: &Path) -> Result<bool, OsError> {
        self.injected("held", path)?;
        Ok(lock(&self.held).contains(path) || self.claimed(path))
    }

    /// Records the call; EBUSY while another process (`set_held`) or
    /// another claim holds the device, which is claimed until the claim
    /// is dropped.
    fn claim(&self, path: &Path, size_bytes: u64) -> Result<DeviceClaim, OsError> {
        lock(&self.calls).push(Call::Claim {
            device: path.to_path_buf(),
            size_bytes,
        });
        self.injected("claim", path)?;
        if lock(&self.held).contains(path) || !lock(&self.claims).insert(path.to_path_buf()) {
            return Err(OsError::sys(
                "claim exclusively",
                path,
                std::io::Error::from_raw_os_error(libc::EBUSY),
            ));
        }
        struct Guard(std::sync::Arc<Mutex<HashSet<PathBuf>>>, PathBuf);
        impl Drop for Guard {
            fn drop(&mut self) {
                lock(&self.0).remove(&self.1);
            }
        }
        Ok(DeviceClaim::new(Box::new(Guard(
            self.claims.clone(),
            path.to_path_buf(),
        ))))
    }

    /// Records the call; a stand-in disk that is a regular file, or the
    /// backing file of a fake loop device, is overwritten with zeros, so
    /// tests can read what is left.
    fn zero_out(&self, path: &Path, size_bytes: u64) -> Result<(), OsError> {
        lock(&self.calls).push(Call::ZeroOut {
            device: path.to_path_buf(),
            size_bytes,
        });
        self.injected("zero_out", path)?;
        self.refuse_claimed("open exclusively", path)?;
        self.refuse_read_only("BLKZEROOUT", path)?;
        let target = self.written_file(path);
        if std::fs::metadata(&target).is_ok_and(|m| m.is_file()) {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&target)
                .map_err(|e| OsError::sys("open", path, e))?;
            f.set_len(0)
                .and_then(|_| f.set_len(size_bytes))
                .map_err(|e| OsError::sys("zero", path, e))?;
        }
        Ok(())
    }

    /// Records the call; the sample ranges of a stand-in disk that is a
    /// regular file are overwritten with zeros (within its length).
    fn zero_sample(&self, path: &Path, size_bytes: u64) -> Result<(), OsError> {
        lock(&self.calls).push(Call::ZeroSample {
            device: path.to_path_buf(),
            size_bytes,
        });
        self.injected("zero_sample", path)?;
        self.refuse_claimed("open exclusively", path)?;
        self.refuse_read_only("BLKZEROOUT", path)?;
        let target = self.written_file(path);
        if std::fs::metadata(&target).is_ok_and(|m| m.is_file()) {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&target)
                .map_err(|e| OsError::sys("open", path, e))?;
            let have = f
                .metadata()
                .map_err(|e| OsError::sys("stat", path, e))?
                .len();
            for (start, len) in super::blockdev::sample_ranges(size_bytes) {
                let len = len.min(have.saturating_sub(start));
                let zeros = vec![0u8; usize::try_from(len).unwrap_or(0)];
                f.write_all_at(&zeros, start)
                    .map_err(|e| OsError::sys("zero", path, e))?;
            }
        }
        Ok(())
    }

    fn read_only(&self, path: &Path) -> Result<bool, OsError> {
        self.injected("read_only", path)?;
        Ok(self.is_read_only(path))
    }

    /// Records the call; the device's flag is what `read_only` answers,
    /// and `zero_out` and `zero_sample` fail with EPERM while it is set.
    fn set_read_only(&self, path: &Path, read_only: bool) -> Result<(), OsError> {
        lock(&self.calls).push(Call::SetReadOnly {
            device: path.to_path_buf(),
            read_only,
        });
        self.injected("set_read_only", path)?;
        let mut ro = lock(&self.read_only);
        if read_only {
            ro.insert(path.to_path_buf());
        } else {
            ro.remove(path);
        }
        Ok(())
    }
}

/// The real filesystem, with every change recorded and open to injected
/// faults (see `FakeOs::file_op`).
impl Files for FakeOs {
    fn create_dir(&self, path: &Path, mode: u32) -> Result<(), OsError> {
        self.file_op("mkdir", path)?;
        RealFiles.create_dir(path, mode)?;
        self.project_inherited(path);
        Ok(())
    }

    fn set_mode(&self, path: &Path, mode: u32) -> Result<(), OsError> {
        self.file_op("chmod", path)?;
        RealFiles.set_mode(path, mode)
    }

    fn set_group(&self, path: &Path, gid: u32) -> Result<(), OsError> {
        self.file_op("chown", path)?;
        RealFiles.set_group(path, gid)
    }

    fn bind_socket(&self, path: &Path) -> Result<std::os::unix::net::UnixListener, OsError> {
        self.file_op("bind", path)?;
        RealFiles.bind_socket(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> Result<(), OsError> {
        self.file_op("rename", from)?;
        RealFiles.rename(from, to)?;
        self.projects_moved(from, to);
        Ok(())
    }

    fn rename_noreplace(&self, from: &Path, to: &Path) -> Result<(), OsError> {
        self.file_op("rename", from)?;
        RealFiles.rename_noreplace(from, to)?;
        self.projects_moved(from, to);
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> Result<(), OsError> {
        self.file_op("unlink", path)?;
        RealFiles.remove_file(path)
    }

    fn symlink(&self, target: &Path, link: &Path) -> Result<(), OsError> {
        self.file_op("symlink", link)?;
        RealFiles.symlink(target, link)
    }

    fn born(&self, path: &Path, m: &std::fs::Metadata) -> Option<std::time::SystemTime> {
        lock(&self.born)
            .get(path)
            .copied()
            .or_else(|| RealFiles.born(path, m))
    }

    fn remove_dir(&self, path: &Path) -> Result<(), OsError> {
        self.file_op("rmdir", path)?;
        RealFiles.remove_dir(path)?;
        self.projects_removed(path);
        Ok(())
    }

    fn remove_tree(&self, path: &Path) -> Result<(), OsError> {
        self.file_op("remove tree", path)?;
        RealFiles.remove_tree(path)?;
        self.projects_removed(path);
        Ok(())
    }

    fn open(&self, path: &Path, how: Open) -> Result<std::fs::File, OsError> {
        if how != Open::Existing {
            self.file_op("open", path)?;
        }
        RealFiles.open(path, how)
    }

    fn write_at(
        &self,
        file: &std::fs::File,
        path: &Path,
        buf: &[u8],
        offset: u64,
    ) -> Result<(), OsError> {
        self.file_op("write", path)?;
        RealFiles.write_at(file, path, buf, offset)
    }

    fn set_len(&self, file: &std::fs::File, path: &Path, len: u64) -> Result<(), OsError> {
        self.file_op("truncate", path)?;
        RealFiles.set_len(file, path, len)
    }

    fn unshare(&self, file: &std::fs::File, path: &Path, len: u64) -> Result<(), OsError> {
        self.file_op("unshare", path)?;
        RealFiles.unshare(file, path, len)
    }

    fn punch(&self, file: &std::fs::File, path: &Path, len: u64) -> Result<(), OsError> {
        self.file_op("punch", path)?;
        RealFiles.punch(file, path, len)
    }

    fn reserve(
        &self,
        file: &std::fs::File,
        path: &Path,
        offset: u64,
        len: u64,
    ) -> Result<(), OsError> {
        self.file_op("reserve", path)?;
        RealFiles.reserve(file, path, offset, len)
    }

    fn allocate(&self, file: &std::fs::File, path: &Path, len: u64) -> Result<(), OsError> {
        self.file_op("fallocate", path)?;
        let before = file
            .metadata()
            .map(|m| super::files::allocated_bytes(&m))
            .unwrap_or(0);
        RealFiles.allocate(file, path, len)?;
        if *lock(&self.allocation_takes_free) {
            let taken = len.saturating_sub(before);
            let mut u = lock(&self.default_usage);
            u.available_bytes = u.available_bytes.saturating_sub(taken);
            u.used_bytes = u.used_bytes.saturating_add(taken);
        }
        Ok(())
    }

    fn sync(&self, file: &std::fs::File, path: &Path) -> Result<(), OsError> {
        self.file_op("fsync", path)?;
        RealFiles.sync(file, path)
    }

    fn sync_data(&self, file: &std::fs::File, path: &Path) -> Result<(), OsError> {
        self.file_op("fdatasync", path)?;
        RealFiles.sync_data(file, path)
    }

    fn sync_dir(&self, path: &Path) -> Result<(), OsError> {
        self.file_op("fsync", path)?;
        RealFiles.sync_dir(path)
    }

    fn copy_file(&self, src: &Path, dst: &Path) -> Result<super::copy::CopyStats, OsError> {
        self.file_op("copy", dst)?;
        let stats = RealFiles.copy_file(src, dst)?;
        // A writer busy while the copy ran: the source's stamp moves.
        let mut busy = lock(&self.busy_copies);
        if *busy > 0 {
            *busy -= 1;
            *lock(&self.pretended_writes)
                .entry(src.to_path_buf())
                .or_default() += 1;
        }
        Ok(stats)
    }

    /// What the real copy would need of the real file (not a change:
    /// not recorded); fails as `fail_next("copy_need", ..)` asks.
    fn copy_need(&self, src: &Path) -> Result<Option<u64>, OsError> {
        self.injected("copy_need", src)?;
        RealFiles.copy_need(src)
    }

    /// Recorded in `lstats` as `root/rel`, delayed and failed as `lstat`
    /// of that path is (`set_lstat_delay`, `fail_next("lstat", ..)`).
    fn lstat_beneath(&self, root: &Path, rel: &str) -> Result<std::fs::Metadata, OsError> {
        let path = root.join(rel);
        lock(&self.lstats).push(path.clone());
        let delay = lock(&self.lstat_delays).get(&path).copied();
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        self.injected("lstat", &path)?;
        RealFiles.lstat_beneath(root, rel)
    }

    /// Recorded (`lstats`); fails as `fail_next("lstat", ..)` asks, and
    /// under a path given to `fail_op_under("lstat", ..)` (a look is no
    /// change: a fault for every op under a path leaves it alone).
    fn lstat(&self, path: &Path) -> Result<std::fs::Metadata, OsError> {
        lock(&self.lstats).push(path.to_path_buf());
        let delay = lock(&self.lstat_delays).get(path).copied();
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        self.injected("lstat", path)?;
        if let Some(errno) = self.fault_under("lstat", path, false) {
            return Err(OsError::sys(
                "lstat",
                path,
                std::io::Error::from_raw_os_error(errno),
            ));
        }
        RealFiles.lstat(path)
    }

    /// Recorded (`pins`); runs a hook set with `before_next("pin", ..)`
    /// first, and fails as `fail_next("pin", ..)` asks. The path itself is
    /// opened for real; the fake's mounts are then taken as the kernel
    /// takes mounts: a path with one on it opens as that mount's root
    /// (its identity what the mount shows, as `identity` has it), and
    /// a bind through the pin binds that mount (`pinned_mounts`).
    fn pin(&self, path: &Path, dir: bool) -> Result<super::pin::Pinned, OsError> {
        lock(&self.pins).push(path.to_path_buf());
        self.injected("pin", path)?;
        let mut p = RealFiles.pin(path, dir)?;
        let real = resolved(path);
        let t = lock(&self.table);
        match t.iter().rev().find(|m| m.mount_point == real) {
            Some(m) => {
                p.mount_root = Some(true);
                p.mount_id = Some(u64::from(m.id));
                if let Ok(shown) = std::fs::symlink_metadata(&m.root) {
                    p.id = (shown.dev(), shown.ino());
                }
                lock(&self.pinned_mounts).insert(p.path(), m.clone());
            }
            None => {
                p.mount_root = Some(false);
                p.mount_id = mountinfo::containing(&t, &real).map(|m| u64::from(m.id));
                lock(&self.pinned_mounts).remove(&p.path());
            }
        }
        Ok(p)
    }

    /// What `set_xattr` set, else the real attribute; fails as
    /// `fail_next("getxattr", ..)` asks.
    fn get_xattr(&self, path: &Path, name: &str) -> Result<Option<Vec<u8>>, OsError> {
        self.injected("getxattr", path)?;
        let set = lock(&self.xattrs)
            .get(&(path.to_path_buf(), name.to_string()))
            .cloned();
        match set {
            Some(v) => Ok(Some(v)),
            None => RealFiles.get_xattr(path, name),
        }
    }

    /// None (the kernel cannot tell) as `fail_next("openat2", ..)` asks.
    fn free_of_symlinks(&self, dir: &Path) -> Option<bool> {
        self.injected("openat2", dir).ok()?;
        RealFiles.free_of_symlinks(dir)
    }

    /// Fails as `fail_next("realpath", ..)` asks, and under a path given
    /// to `fail_op_under("realpath", ..)`.
    fn canonicalize(&self, path: &Path) -> Result<PathBuf, OsError> {
        self.injected("realpath", path)?;
        self.read_fault("realpath", path)?;
        RealFiles.canonicalize(path)
    }

    /// Fails as `fail_next("readlink", ..)` asks, and under a path given
    /// to `fail_op_under("readlink", ..)`.
    fn read_link(&self, path: &Path) -> Result<PathBuf, OsError> {
        self.injected("readlink", path)?;
        self.read_fault("readlink", path)?;
        RealFiles.read_link(path)
    }

    /// Fails as `fail_next("read", ..)` asks (a read is no change: not
    /// recorded in `file_ops`); waits under a `hold_op_under("read", ..)`
    /// (a read on a share whose server stopped answering).
    fn read_regular(&self, path: &Path, max: Option<u64>) -> std::io::Result<Vec<u8>> {
        self.wait_if_held("read", &through_fd(path));
        self.injected("read", path).map_err(OsError::into_io)?;
        RealFiles.read_regular(path, max)
    }

    /// Fails as `fail_next("list_names", ..)` asks, and under a path
    /// given to `fail_op_under("list_names", ..)`.
    fn list_names(&self, path: &Path) -> std::io::Result<Vec<u8>> {
        self.injected("list_names", path)
            .map_err(OsError::into_io)?;
        if let Some(errno) = self.fault_under("list_names", path, false) {
            return Err(std::io::Error::from_raw_os_error(errno));
        }
        RealFiles.list_names(path)
    }

    /// Fails as `fail_next("open_regular", ..)` asks.
    fn open_regular(&self, path: &Path) -> std::io::Result<std::fs::File> {
        self.injected("open_regular", path)
            .map_err(OsError::into_io)?;
        RealFiles.open_regular(path)
    }

    /// Fails as `fail_next("open_dir", ..)` asks.
    fn open_dir(&self, path: &Path) -> std::io::Result<std::fs::File> {
        self.injected("open_dir", path).map_err(OsError::into_io)?;
        RealFiles.open_dir(path)
    }

    /// Fails as `fail_next("flock", ..)` asks (EWOULDBLOCK: held by
    /// another).
    fn flock(
        &self,
        file: std::fs::File,
        path: &Path,
        how: nix::fcntl::FlockArg,
    ) -> Result<nix::fcntl::Flock<std::fs::File>, (std::fs::File, nix::errno::Errno)> {
        if let Err(e) = self.injected("flock", path) {
            let errno = e.errno().unwrap_or(libc::EIO);
            return Err((file, nix::errno::Errno::from_raw(errno)));
        }
        RealFiles.flock(file, path, how)
    }

    /// Fails as `fail_next("connect", ..)` asks (the error the connect
    /// gave), and under a path given to `fail_op_under("connect", ..)`.
    fn socket_answers(&self, path: &Path) -> std::io::Result<bool> {
        self.injected("connect", path).map_err(OsError::into_io)?;
        self.read_fault("connect", path).map_err(OsError::into_io)?;
        RealFiles.socket_answers(path)
    }

    /// Fails as `fail_next("getgrnam", ..)` asks.
    fn group_id(&self, name: &str) -> Result<Option<u32>, OsError> {
        self.injected("getgrnam", Path::new("/etc/group"))?;
        RealFiles.group_id(name)
    }

    /// Fails as `fail_next("stat", ..)` asks, and under a path given to
    /// `fail_op_under("stat", ..)` (a look is no change: a fault for
    /// every op under a path leaves it alone).
    fn stat(&self, path: &Path) -> Result<std::fs::Metadata, OsError> {
        self.injected("stat", path)?;
        self.read_fault("stat", path)?;
        RealFiles.stat(path)
    }

    /// The flags of `path`, as the kernel tells; fails as
    /// `fail_next("statx", ..)` asks, and under a path given to
    /// `fail_op_under("statx", ..)`.
    fn locks(&self, path: &Path) -> Result<super::files::Locks, OsError> {
        self.injected("statx", path)?;
        self.read_fault("statx", path)?;
        RealFiles.locks(path)
    }

    /// Fails as `fail_next("read_dir", ..)` asks, and under a path given
    /// to `fail_op_under("read_dir", ..)` (a read is no change: a fault
    /// for every op under a path leaves it alone); a directory read through
    /// its descriptor (`/proc/self/fd/N`) is under its real path.
    fn read_dir(&self, path: &Path) -> Result<std::fs::ReadDir, OsError> {
        self.injected("read_dir", path)?;
        if let Some(errno) = self.fault_under("read_dir", &through_fd(path), false) {
            return Err(OsError::sys(
                "read_dir",
                path,
                std::io::Error::from_raw_os_error(errno),
            ));
        }
        RealFiles.read_dir(path)
    }

    fn copy_tree(&self, src: &Path, dst: &Path) -> Result<super::copy::CopyStats, OsError> {
        self.file_op("copy", dst)?;
        let stats = RealFiles.copy_tree(src, dst)?;
        self.project_inherited(dst);
        Ok(stats)
    }

    /// What the real copy would take of the real tree (not a change: not
    /// recorded); fails as `fail_next("tree_copy_need", ..)` asks.
    fn tree_copy_need(&self, src: &Path) -> Result<Option<u64>, OsError> {
        self.injected("tree_copy_need", src)?;
        RealFiles.tree_copy_need(src)
    }

    fn copy_into(
        &self,
        src: &Path,
        dst: &Path,
        skip: &[&str],
    ) -> Result<super::copy::CopyStats, OsError> {
        self.file_op("copy", dst)?;
        RealFiles.copy_into(src, dst, skip)
    }

    fn copy_from_device(
        &self,
        src: &Path,
        dst: &Path,
        len: u64,
    ) -> Result<super::copy::CopyStats, OsError> {
        self.file_op("copy", dst)?;
        RealFiles.copy_from_device(src, dst, len)
    }

    fn copy_to_device(&self, src: &Path, dst: &Path) -> Result<super::copy::CopyStats, OsError> {
        self.file_op("copy", dst)?;
        RealFiles.copy_to_device(src, dst)
    }

    /// Recorded (as a filesystem change "freeze"/"thaw"); nothing is
    /// frozen.
    fn freeze(&self, mount_point: &Path) -> Result<(), OsError> {
        self.file_op("freeze", mount_point)
    }

    fn thaw(&self, mount_point: &Path) -> Result<(), OsError> {
        self.file_op("thaw", mount_point)
    }

    fn change_stamp(&self, path: &Path) -> Result<Option<super::files::ChangeStamp>, OsError> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(path).map_err(|e| OsError::sys("stat", path, e))?;
        // The real times, moved on by every write the fake pretended.
        let writes = lock(&self.pretended_writes).get(path).copied().unwrap_or(0);
        Ok(Some(super::files::ChangeStamp {
            ctime: (m.ctime() + writes as i64, m.ctime_nsec()),
            mtime: (m.mtime() + writes as i64, m.mtime_nsec()),
            size: m.len(),
        }))
    }

    fn still_named(&self, file: &std::fs::File, path: &Path) -> Result<bool, OsError> {
        self.injected("still_named", path)?;
        RealFiles.still_named(file, path)
    }

    fn read_durable(&self, path: &Path) -> Result<Option<Vec<u8>>, OsError> {
        if let Some(d) = lock(&self.durable).get(path) {
            return Ok(d.clone());
        }
        RealFiles.read_durable(path)
    }
}

/// Project quotas kept in memory: a project's inodes are the directories
/// that have it (the fake does not see files written into them), its bytes
/// what `set_project_written` said. Each call is recorded (`quota_ops`)
/// and can be failed with `fail_next` ("quota_state", "project_get",
/// "project_set", "quota_get", "quota_set") or `fail_quota_op_at`.
impl Quotas for FakeOs {
    fn state(&self, fs: &Path) -> Result<QuotaState, OsError> {
        self.quota_op("quota_state", fs)?;
        (*lock(&self.quota_state)).map_err(|errno| {
            OsError::sys(
                "quotactl Q_XGETQSTATV",
                fs,
                std::io::Error::from_raw_os_error(errno),
            )
        })
    }

    fn project(&self, path: &Path) -> Result<Project, OsError> {
        self.quota_op("project_get", path)?;
        if std::fs::symlink_metadata(path).is_err() {
            return Err(OsError::sys(
                "open",
                path,
                std::io::Error::from_raw_os_error(libc::ENOENT),
            ));
        }
        Ok(lock(&self.projects).get(path).copied().unwrap_or_default())
    }

    fn set_project(&self, dir: &Path, project: Project) -> Result<(), OsError> {
        lock(&self.calls).push(Call::SetProject {
            dir: dir.to_path_buf(),
            project,
        });
        self.quota_op("project_set", dir)?;
        if !dir.is_dir() {
            return Err(OsError::sys(
                "open",
                dir,
                std::io::Error::from_raw_os_error(libc::ENOENT),
            ));
        }
        let mut p = lock(&self.projects);
        if project == Project::default() {
            p.remove(dir);
        } else {
            p.insert(dir.to_path_buf(), project);
        }
        Ok(())
    }

    fn get(&self, fs: &Path, id: u32) -> Result<ProjectQuota, OsError> {
        self.quota_op("quota_get", fs)?;
        let inodes = lock(&self.projects).values().filter(|p| p.id == id).count() as u64;
        let (limit_bytes, limit_inodes) = lock(&self.limits).get(&id).copied().unwrap_or((0, 0));
        Ok(ProjectQuota {
            used_bytes: if inodes > 0 {
                lock(&self.written).get(&id).copied().unwrap_or(0)
            } else {
                0
            },
            used_inodes: inodes,
            limit_bytes,
            limit_inodes,
        })
    }

    fn set_limits(&self, fs: &Path, id: u32, bytes: u64, inodes: u64) -> Result<(), OsError> {
        lock(&self.calls).push(Call::SetLimits { id, bytes, inodes });
        self.quota_op("quota_set", fs)?;
        let mut l = lock(&self.limits);
        if bytes == 0 && inodes == 0 {
            l.remove(&id);
        } else {
            l.insert(id, (bytes.div_ceil(1024) * 1024, inodes));
        }
        Ok(())
    }
}

/// One call made through `FakeBindCalls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindCall {
    OpenTree(PathBuf),
    TreeFlags,
    SetAttr(MountAttr),
    Attach(PathBuf),
    Bind(PathBuf),
    Flags(PathBuf),
    Remount(PathBuf, MountFlags),
    Unmount(PathBuf),
}

impl BindCall {
    /// The call's name, as `FakeBindCalls::fail_next` takes it.
    pub fn name(&self) -> &'static str {
        match self {
            BindCall::OpenTree(_) => "open_tree",
            BindCall::TreeFlags => "tree_flags",
            BindCall::SetAttr(_) => "set_attr",
            BindCall::Attach(_) => "attach",
            BindCall::Bind(_) => "bind",
            BindCall::Flags(_) => "flags",
            BindCall::Remount(..) => "remount",
            BindCall::Unmount(_) => "unmount",
        }
    }
}

/// A recording fake of the system calls one bind mount is made of
/// (`mount::BindCalls`), for the choice between the atomic and the
/// two-step way (`mount::bind_with`). Every source mount has the flags
/// given to `new`; the fake keeps what is mounted at each target with its
/// per-mount flags, changed as the kernel changes them: mount_setattr sets
/// and clears the bits it names (the atime setting as a whole, only with
/// all of `MOUNT_ATTR__ATIME` cleared, else EINVAL); a bind remount sets
/// every flag to what it is given, relatime unless noatime, and keeps the
/// atime setting when given none of noatime, nodiratime, relatime. Any call
/// can be failed (`fail_next`), before it changes anything.
pub struct FakeBindCalls {
    source: MountFlags,
    calls: Mutex<Vec<BindCall>>,
    failures: Mutex<HashMap<&'static str, VecDeque<i32>>>,
    mounted: Mutex<Vec<(PathBuf, MountFlags)>>,
}

/// A detached copy of a mount in `FakeBindCalls`: its flags.
pub struct FakeTree(Cell<MountFlags>);

impl FakeBindCalls {
    pub fn new(source: MountFlags) -> Self {
        FakeBindCalls {
            source,
            calls: Mutex::new(Vec::new()),
            failures: Mutex::new(HashMap::new()),
            mounted: Mutex::new(Vec::new()),
        }
    }

    /// The next call named `op` (`BindCall::name`) fails with `errno`.
    pub fn fail_next(&self, op: &'static str, errno: i32) {
        lock(&self.failures).entry(op).or_default().push_back(errno);
    }

    /// The names of the calls made so far, in order.
    pub fn calls(&self) -> Vec<&'static str> {
        lock(&self.calls).iter().map(BindCall::name).collect()
    }

    /// The calls made so far, with their arguments.
    pub fn full_calls(&self) -> Vec<BindCall> {
        lock(&self.calls).clone()
    }

    pub fn clear_calls(&self) {
        lock(&self.calls).clear();
    }

    /// What is mounted, bottom first: target and per-mount flags.
    pub fn mounted(&self) -> Vec<(PathBuf, MountFlags)> {
        lock(&self.mounted).clone()
    }

    fn call(&self, c: BindCall, path: &Path) -> Result<(), OsError> {
        let op = c.name();
        lock(&self.calls).push(c);
        match lock(&self.failures).get_mut(op).and_then(|q| q.pop_front()) {
            Some(errno) => Err(OsError::sys(
                op,
                path,
                std::io::Error::from_raw_os_error(errno),
            )),
            None => Ok(()),
        }
    }

    fn top(&self, target: &Path) -> Result<MountFlags, OsError> {
        lock(&self.mounted)
            .iter()
            .rev()
            .find(|(p, _)| p == target)
            .map(|(_, f)| *f)
            .ok_or_else(|| {
                OsError::sys(
                    "fake",
                    target,
                    std::io::Error::from_raw_os_error(libc::EINVAL),
                )
            })
    }
}

impl BindCalls for FakeBindCalls {
    type Tree = FakeTree;

    fn open_tree(&self, source: &Path) -> Result<FakeTree, OsError> {
        self.call(BindCall::OpenTree(source.into()), source)?;
        Ok(FakeTree(Cell::new(self.source)))
    }

    fn tree_flags(&self, tree: &FakeTree) -> Result<MountFlags, OsError> {
        self.call(BindCall::TreeFlags, Path::new("tree"))?;
        Ok(tree.0.get())
    }

    fn set_attr(&self, tree: &FakeTree, attr: MountAttr) -> Result<(), OsError> {
        self.call(BindCall::SetAttr(attr), Path::new("tree"))?;
        let einval = || {
            OsError::sys(
                "mount_setattr",
                "tree",
                std::io::Error::from_raw_os_error(libc::EINVAL),
            )
        };
        let mut f = tree.0.get();
        for (flag, bit) in [
            (&mut f.readonly, libc::MOUNT_ATTR_RDONLY),
            (&mut f.nosuid, libc::MOUNT_ATTR_NOSUID),
            (&mut f.nodev, libc::MOUNT_ATTR_NODEV),
            (&mut f.noexec, libc::MOUNT_ATTR_NOEXEC),
            (&mut f.nodiratime, libc::MOUNT_ATTR_NODIRATIME),
        ] {
            if attr.clr & bit != 0 {
                *flag = false;
            }
            if attr.set & bit != 0 {
                *flag = true;
            }
        }
        let atime = libc::MOUNT_ATTR__ATIME;
        match attr.clr & atime {
            0 if attr.set & atime != 0 => return Err(einval()),
            0 => {}
            c if c != atime => return Err(einval()),
            _ => match attr.set & atime {
                libc::MOUNT_ATTR_RELATIME => (f.relatime, f.noatime) = (true, false),
                libc::MOUNT_ATTR_NOATIME => (f.relatime, f.noatime) = (false, true),
                libc::MOUNT_ATTR_STRICTATIME => (f.relatime, f.noatime) = (false, false),
                _ => return Err(einval()),
            },
        }
        tree.0.set(f);
        Ok(())
    }

    fn attach(&self, tree: FakeTree, target: &Path) -> Result<(), OsError> {
        self.call(BindCall::Attach(target.into()), target)?;
        lock(&self.mounted).push((target.into(), tree.0.get()));
        Ok(())
    }

    fn bind(&self, _source: &Path, target: &Path) -> Result<(), OsError> {
        self.call(BindCall::Bind(target.into()), target)?;
        lock(&self.mounted).push((target.into(), self.source));
        Ok(())
    }

    fn flags(&self, target: &Path) -> Result<MountFlags, OsError> {
        self.call(BindCall::Flags(target.into()), target)?;
        self.top(target)
    }

    fn remount(&self, target: &Path, flags: MountFlags) -> Result<(), OsError> {
        self.call(BindCall::Remount(target.into(), flags), target)?;
        let old = self.top(target)?;
        let mut new = MountFlags {
            relatime: !flags.noatime,
            ..flags
        };
        if !(flags.noatime || flags.nodiratime || flags.relatime) {
            (new.noatime, new.nodiratime, new.relatime) =
                (old.noatime, old.nodiratime, old.relatime);
        }
        let mut m = lock(&self.mounted);
        if let Some(e) = m.iter_mut().rev().find(|(p, _)| p == target) {
            e.1 = new;
        }
        Ok(())
    }

    fn unmount(&self, target: &Path) -> Result<(), OsError> {
        self.call(BindCall::Unmount(target.into()), target)?;
        let mut m = lock(&self.mounted);
        match m.iter().rposition(|(p, _)| p == target) {
            Some(i) => {
                m.remove(i);
                Ok(())
            }
            None => Err(OsError::sys(
                "unmount",
                target,
                std::io::Error::from_raw_os_error(libc::EINVAL),
            )),
        }
    }
}
