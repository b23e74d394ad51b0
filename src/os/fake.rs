//! A recording fake of every OS interface. It keeps a mount table that
//! follows the calls made on it (a bind mount shows the source's device and
//! directory, an unmount removes the topmost entry), so logic built on
//! mountinfo can be unit-tested without root.
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use super::command::{CmdOutput, Runner};
use super::mountinfo::{self, MountEntry, MountTable};
use super::{FsStats, FsUsage, MountFlags, Mounter, OsError};

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Bind {
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
}

type CmdReply = Result<CmdOutput, OsError>;

pub struct FakeOs {
    calls: Mutex<Vec<Call>>,
    table: Mutex<Vec<MountEntry>>,
    next_id: Mutex<u32>,
    usage: Mutex<HashMap<PathBuf, FsUsage>>,
    default_usage: Mutex<FsUsage>,
    failures: Mutex<HashMap<&'static str, VecDeque<i32>>>,
    replies: Mutex<HashMap<String, VecDeque<CmdReply>>>,
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
            failures: Mutex::new(HashMap::new()),
            replies: Mutex::new(HashMap::new()),
        }
    }

    /// Every call made so far.
    pub fn calls(&self) -> Vec<Call> {
        lock(&self.calls).clone()
    }

    /// Forgets the recorded calls (the mount table stays).
    pub fn clear_calls(&self) {
        lock(&self.calls).clear();
    }

    /// The current fake mount table.
    pub fn table(&self) -> Vec<MountEntry> {
        lock(&self.table).clone()
    }

    /// Adds a mount of a new filesystem (its own device) at `mount_point`.
    pub fn add_filesystem(&self, mount_point: &Path, major: u32, minor: u32) {
        let id = self.alloc_id();
        lock(&self.table).push(MountEntry {
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

    /// Makes the next call of `op` ("bind", "mount_fs", "unmount",
    /// "statvfs", "mounts") fail with `errno`.
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

    fn alloc_id(&self) -> u32 {
        let mut n = lock(&self.next_id);
        *n += 1;
        *n
    }

    fn injected(&self, op: &'static str, path: &Path) -> Result<(), OsError> {
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Mounter for FakeOs {
    fn bind(&self, source: &Path, target: &Path, flags: MountFlags) -> Result<(), OsError> {
        lock(&self.calls).push(Call::Bind {
            source: source.into(),
            target: target.into(),
            flags,
        });
        self.injected("bind", target)?;
        let id = self.alloc_id();
        let mut t = lock(&self.table);
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
        t.push(MountEntry {
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
        let id = self.alloc_id();
        lock(&self.table).push(MountEntry {
            id,
            parent: 1,
            major: 7,
            minor: id,
            root: PathBuf::from("/"),
            mount_point: target.into(),
            options: Self::options(flags),
            fs_type: fstype.into(),
            source: source.to_string_lossy().into_owned(),
            super_options: data.into(),
        });
        Ok(())
    }

    fn unmount(&self, target: &Path) -> Result<(), OsError> {
        lock(&self.calls).push(Call::Unmount {
            target: target.into(),
        });
        self.injected("unmount", target)?;
        let mut t = lock(&self.table);
        match t.iter().rposition(|m| m.mount_point == target) {
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
        self.injected("mounts", Path::new("/proc/self/mountinfo"))?;
        Ok(self.table())
    }
}

impl FsStats for FakeOs {
    fn statvfs(&self, path: &Path) -> Result<FsUsage, OsError> {
        self.injected("statvfs", path)?;
        if let Some(u) = lock(&self.usage).get(path) {
            return Ok(*u);
        }
        Ok(*lock(&self.default_usage))
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
        lock(&self.replies)
            .get_mut(program)
            .and_then(|q| q.pop_front())
            .unwrap_or_else(|| {
                Err(OsError::Failed {
                    program: program.into(),
                    status: "no reply scripted in the fake".into(),
                    stderr: String::new(),
                })
            })
    }
}
