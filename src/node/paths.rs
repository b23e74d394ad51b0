//! The paths a node RPC may mount on, unmount or remove: an absolute,
//! normal path (see `validate::abs_path`) with no component longer than a
//! file name may be, and never one of Berth's own directories. A target or
//! staging path at or below the state directory or a kind's root (a volume's
//! directory, the journal, a backing file), or at or above one of them or
//! the socket (a mount there would hide them), is INVALID_ARGUMENT for
//! every node RPC, before anything is touched. The path is compared as
//! given (`Protected::check`, on the async thread: it reads nothing) and
//! with its parent resolved (`Protected::resolve`, symlinks in the
//! directories above it, on the RPC's blocking thread: resolving reads
//! the filesystem, which a dead NFS server can hang), so a link to Berth's
//! directories does not get around it; the last component is never
//! followed (the kinds refuse a symlink there).
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::os::{Files, OsError};
use crate::validate;

/// The longest file name (one path component) Linux filesystems take.
const NAME_MAX: usize = 255;

/// Directories whose every subdirectory belongs to the system (the kernel's
/// pseudo-filesystems, its boot files, installed software, configuration):
/// no state directory or root is taken in them, and no node RPC mounts,
/// unmounts or removes anything in them.
pub const SYSTEM_TREES: &[&str] = &[
    "/proc", "/sys", "/dev", "/boot", "/etc", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64",
    "/libx32",
];

/// Directories shared by everything on a host: a directory of Berth's own
/// may be made inside them, but none of them is one (Berth would make its
/// `.creating`, `.trash` and volumes among everyone else's files), and
/// none is a staging or target path (a volume mounted there would hide
/// what the host keeps in it).
pub const SHARED_DIRS: &[&str] = &[
    "/var",
    "/var/lib",
    "/var/log",
    "/var/run",
    "/var/tmp",
    "/var/cache",
    "/var/spool",
    "/run",
    "/tmp",
    "/home",
    "/root",
    "/srv",
    "/opt",
    "/mnt",
    "/media",
    "/var/lib/kubelet",
    "/var/lib/kubelet/pods",
    "/var/lib/kubelet/plugins",
    "/var/lib/containerd",
    "/var/lib/docker",
];

/// Berth's own directories, as configured and resolved.
#[derive(Debug, Default, Clone)]
pub struct Protected {
    /// Nothing may be mounted at, below or above these (state directory,
    /// kinds' roots).
    roots: Vec<PathBuf>,
    /// Nothing may be mounted at or above these (the socket).
    above: Vec<PathBuf>,
}

impl Protected {
    /// `roots`: the state directory and the kinds' roots; `above`: paths
    /// only their ancestors of which are off limits (the socket). Each is
    /// kept as given and as the kernel resolves it (a root that is itself a
    /// symlink protects where it points), resolved through `files`
    /// (`resolved_fully`); one that cannot be resolved is an error, never
    /// protected as written only.
    pub fn new(
        files: &dyn Files,
        roots: &[PathBuf],
        above: &[PathBuf],
    ) -> std::result::Result<Self, OsError> {
        let both = |ps: &[PathBuf]| -> std::result::Result<Vec<PathBuf>, OsError> {
            let mut v = Vec::new();
            for p in ps {
                v.push(p.clone());
                let c = resolved_fully(files, p)?;
                if &c != p {
                    v.push(c);
                }
            }
            Ok(v)
        };
        Ok(Self {
            roots: both(roots)?,
            above: both(above)?,
        })
    }

    /// Validates a node RPC's path field by its text and refuses Berth's
    /// own directories as written (INVALID_ARGUMENT). Touches nothing, so
    /// it runs on the async thread before anything else; where the path
    /// resolves to is checked by `resolve`, on a blocking thread.
    pub fn check(&self, field: &'static str, v: &str) -> Result<NodePath> {
        let p = validate::abs_path(field, v)?;
        if p.components().any(|c| c.as_os_str().len() > NAME_MAX) {
            return Err(Error::Invalid(format!(
                "{field} has a component longer than {NAME_MAX} bytes"
            )));
        }
        self.refuse(field, &p, &p)?;
        Ok(NodePath { field, path: p })
    }

    /// The path of `p` once it is also refused with the symlinks in its
    /// parent directories resolved (a link to Berth's directories does not
    /// get around `check`). This reads the filesystem (the parent's
    /// components, which a dead NFS mount may hang): call it where the
    /// RPC's blocking work runs (`Driver::run`), never on the async thread.
    ///
    /// Returns the path as given and, when a symlink in its parents makes
    /// the kernel reach it under another spelling, that spelling (whose
    /// guard the caller takes too: `Driver::guard_real_path`). The
    /// filesystem is read through `files`.
    pub fn resolve(&self, files: &dyn Files, p: NodePath) -> Result<(PathBuf, Option<PathBuf>)> {
        if let Ok(r) = resolved(files, &p.path) {
            if r != p.path {
                self.refuse(p.field, &p.path, &r)?;
                return Ok((p.path, Some(r)));
            }
        }
        Ok((p.path, None))
    }

    /// INVALID_ARGUMENT when `form` (the path `given`, as written or
    /// resolved) is at, in or above one of Berth's directories, or at or
    /// above its socket.
    fn refuse(&self, field: &str, given: &Path, form: &Path) -> Result<()> {
        refuse_host_dir(field, given, form)?;
        if let Some(r) = self
            .roots
            .iter()
            .find(|r| form.starts_with(r) || r.starts_with(form))
        {
            return Err(Error::Invalid(format!(
                "{field} {} is {} Berth's own directory {}",
                given.display(),
                if form.starts_with(r) { "in" } else { "above" },
                r.display()
            )));
        }
        if let Some(a) = self.above.iter().find(|a| a.starts_with(form)) {
            return Err(Error::Invalid(format!(
                "{field} {} is at or above Berth's socket {}",
                given.display(),
                a.display()
            )));
        }
        Ok(())
    }
}

/// What of the host's a path is, when it is one of its own directories.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostDir {
    /// `/`.
    Root,
    /// In this system tree (`SYSTEM_TREES`).
    System(&'static str),
    /// One of `SHARED_DIRS` itself.
    Shared,
}

/// Whether `p` (absolute, resolved as the caller needs) is `/`, in a system
/// tree or a directory the whole host shares: never a root of Berth's, nor
/// a staging or target path.
pub fn host_dir(p: &Path) -> Option<HostDir> {
    if p.parent().is_none() {
        return Some(HostDir::Root);
    }
    if let Some(sys) = SYSTEM_TREES.iter().find(|s| p.starts_with(s)) {
        return Some(HostDir::System(sys));
    }
    SHARED_DIRS
        .iter()
        .any(|s| p == Path::new(s))
        .then_some(HostDir::Shared)
}

/// INVALID_ARGUMENT when `form` (the path `given`, as written or
/// resolved) is one of the host's own directories (`host_dir`): kubelet
/// never gives such a path (its own are under its root directory,
/// `/var/lib/kubelet` by default), and a volume mounted there would hide
/// the host's files, or its unpublish remove them.
fn refuse_host_dir(field: &str, given: &Path, form: &Path) -> Result<()> {
    let what = match host_dir(form) {
        None => return Ok(()),
        Some(HostDir::Root) => "the root directory".to_string(),
        Some(HostDir::System(sys)) => format!("in the system directory {sys}"),
        Some(HostDir::Shared) => "a directory the whole host shares".to_string(),
    };
    Err(Error::Invalid(format!(
        "{field} {} is {what}: not a path for a volume",
        given.display()
    )))
}

/// A node RPC's path that passed `Protected::check` (its text), waiting
/// for `Protected::resolve` (where it leads). Not comparable as a whole
/// (it carries the field's name): compare `path()`.
#[derive(Debug, Clone)]
pub struct NodePath {
    field: &'static str,
    path: PathBuf,
}

impl NodePath {
    /// The path as given (checked by its text only).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// `p` with the symlinks in its parent directories resolved (the last
/// component as it is); an error when the parent does not resolve. `p` is
/// absolute and normal (`Protected::check`: no `.` or `..`), so a parent
/// reached without a symlink is its own resolved form: one openat2
/// (`os::resolve`) tells that, and only a parent with a symlink (or a
/// kernel that cannot tell) takes the readlink per component of a
/// realpath. Both through `files`.
fn resolved(files: &dyn Files, p: &Path) -> std::io::Result<PathBuf> {
    match (p.parent(), p.file_name()) {
        (Some(parent), Some(name)) => {
            if files.free_of_symlinks(parent) == Some(true) {
                return Ok(p.to_path_buf());
            }
            Ok(files
                .canonicalize(parent)
                .map_err(OsError::into_io)?
                .join(name))
        }
        _ => files.canonicalize(p).map_err(OsError::into_io),
    }
}

/// `p` as the kernel would resolve it: its longest existing ancestor with
/// symlinks and `..` resolved (a symlink to what does not exist yet
/// followed too, at most 40 deep, as the kernel does), then the rest (which
/// does not exist yet, so holds no symlink) with `.` and `..` applied.
/// Read through `files` (realpath, readlink). Only what is not there
/// (ENOENT; ENOTDIR: a file on the way) is taken as not existing yet; any
/// other error is returned, never read as "not there": a symlinked root
/// that could not be resolved was taken as its own spelling, and where it
/// leads went unprotected.
pub fn resolved_fully(files: &dyn Files, p: &Path) -> std::result::Result<PathBuf, OsError> {
    resolved_within(files, p, 40)
}

/// Whether the failed look `e` says that nothing is there.
fn absent(e: &OsError) -> bool {
    matches!(e.errno(), Some(libc::ENOENT | libc::ENOTDIR))
}

fn resolved_within(
    files: &dyn Files,
    p: &Path,
    links: u32,
) -> std::result::Result<PathBuf, OsError> {
    let mut rest = Vec::new();
    let mut at = p;
    let base = loop {
        match files.canonicalize(at) {
            Ok(c) => break c,
            Err(e) if absent(&e) => {}
            Err(e) => return Err(e),
        }
        // Not there as a whole: a symlink to what does not exist yet?
        // (EINVAL: there, and no symlink.)
        match files.read_link(at) {
            Ok(target) => {
                if let (Some(parent), true) = (at.parent(), links > 0) {
                    break resolved_within(files, &parent.join(target), links - 1)?;
                }
            }
            Err(e) if absent(&e) || e.errno() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
        match (at.parent(), at.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                at = parent;
            }
            // `..` as the last component, or `/`: leave it lexical.
            _ => break at.to_path_buf(),
        }
    };
    let mut out = base;
    for c in rest.iter().rev() {
        out.push(c);
    }
    let mut norm = PathBuf::new();
    for c in out.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                norm.pop();
            }
            c => norm.push(c),
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::os::RealFiles;

    fn setup() -> (tempfile::TempDir, Protected) {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("data");
        for s in ["state", "local", "block"] {
            std::fs::create_dir_all(data.join(s)).unwrap();
        }
        let p = Protected::new(
            &RealFiles,
            &[data.join("state"), data.join("local"), data.join("block")],
            &[data.join("csi.sock")],
        )
        .unwrap();
        (d, p)
    }

    /// Both checks, as a node RPC makes them.
    fn full(p: &Protected, v: &str) -> Result<PathBuf> {
        p.check("target_path", v)
            .and_then(|n| p.resolve(&RealFiles, n).map(|(given, _)| given))
    }

    #[test]
    fn berths_own_directories_are_refused_and_their_neighbours_are_not() {
        let (d, p) = setup();
        let data = d.path().join("data");
        let s = |p: PathBuf| p.display().to_string();
        for bad in [
            data.join("state"),
            data.join("state/journal/log-0.jsonl"),
            data.join("local/local-0123"),
            data.join("block"),
            data.clone(),
            d.path().to_path_buf(),
        ] {
            let r = full(&p, &s(bad.clone()));
            assert!(
                matches!(r, Err(Error::Invalid(_))),
                "{}: {r:?}",
                bad.display()
            );
        }
        for good in [
            data.join("stage"),
            data.join("targets/t1"),
            data.join("csi.sock.d"),
            data.join("localx"),
            d.path().join("elsewhere/t"),
        ] {
            assert_eq!(full(&p, &s(good.clone())).unwrap(), good);
        }
    }

    /// `/`, the system trees and the directories the whole host shares are
    /// never a staging or target path (by their text, and where a symlink
    /// above the path leads); kubelet's own paths below them are.
    #[test]
    fn the_hosts_own_directories_are_refused() {
        let (d, p) = setup();
        for bad in [
            "/",
            "/etc",
            "/etc/kubernetes/manifests",
            "/usr/lib/x",
            "/proc/1",
            "/sys/fs/cgroup",
            "/dev/shm",
            "/boot",
            "/tmp",
            "/var",
            "/var/lib",
            "/var/lib/kubelet",
            "/var/lib/kubelet/pods",
            "/home",
            "/root",
            "/run",
        ] {
            let r = p.check("target_path", bad);
            assert!(matches!(r, Err(Error::Invalid(_))), "{bad}: {r:?}");
        }
        for good in [
            "/var/lib/kubelet/pods/0e6e5ae4/volumes/kubernetes.io~csi/pv-1/mount",
            "/var/lib/kubelet/plugins/kubernetes.io/csi/berth.csi.io/0abc/globalmount",
            "/tmp/csi-mount",
            "/var/snap/microk8s/common/var/lib/kubelet/pods/u/volumes/v",
        ] {
            assert!(p.check("target_path", good).is_ok(), "{good}");
        }
        let link = d.path().join("etc-link");
        std::os::unix::fs::symlink("/etc", &link).unwrap();
        let v = link.join("x").display().to_string();
        assert!(p.check("target_path", &v).is_ok(), "the text alone is fine");
        let r = full(&p, &v);
        assert!(matches!(r, Err(Error::Invalid(_))), "{r:?}");
    }

    #[test]
    fn a_symlink_above_the_path_does_not_get_around_it() {
        let (d, p) = setup();
        let link = d.path().join("link");
        std::os::unix::fs::symlink(d.path().join("data/state"), &link).unwrap();
        let v = link.join("journal").display().to_string();
        let r = full(&p, &v);
        assert!(matches!(r, Err(Error::Invalid(_))), "{r:?}");
        // The text alone is fine: only `resolve`, which reads the
        // filesystem (on a blocking thread), sees where it leads.
        let n = p.check("target_path", &v).unwrap();
        let r = p.resolve(&RealFiles, n);
        assert!(matches!(r, Err(Error::Invalid(_))), "{r:?}");
    }

    /// `resolve` reads the filesystem through the OS layer: where the
    /// kernel cannot tell that a parent holds no symlink (openat2), or a
    /// parent cannot be resolved (realpath), the path has no other
    /// spelling; a symlinked parent otherwise gives where it leads.
    #[test]
    fn paths_are_resolved_through_the_os_layer() {
        let d = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(d.path()).unwrap();
        std::fs::create_dir(base.join("real")).unwrap();
        std::os::unix::fs::symlink(base.join("real"), base.join("link")).unwrap();
        let p = Protected::new(&RealFiles, &[], &[]).unwrap();
        let (os, fake) = crate::os::Os::fake();
        let files = os.files.as_ref();
        let node = |v: &Path| p.check("target_path", &v.display().to_string()).unwrap();
        let (free, linked) = (base.join("real/t"), base.join("link/t"));
        let resolve = |v: &Path| p.resolve(files, node(v)).unwrap();
        assert_eq!(resolve(&linked), (linked.clone(), Some(free.clone())));
        assert_eq!(resolve(&free), (free.clone(), None));
        // A parent free of symlinks is told by openat2 alone: realpath is
        // asked only when openat2 cannot tell.
        fake.fail_next("openat2", libc::ENOSYS);
        fake.fail_next("realpath", libc::EIO);
        assert_eq!(resolve(&free), (free.clone(), None));
        assert_eq!(resolve(&linked), (linked.clone(), Some(free.clone())));
        fake.fail_next("realpath", libc::EIO);
        assert_eq!(resolve(&linked), (linked, None));
    }

    /// A root configured as a symlink protects the directory it points to.
    #[test]
    fn a_root_that_is_a_symlink_protects_where_it_points() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("disk/local");
        std::fs::create_dir_all(&real).unwrap();
        let link = d.path().join("local");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let p = Protected::new(&RealFiles, std::slice::from_ref(&link), &[]).unwrap();
        let r = full(&p, &real.join("vol").display().to_string());
        assert!(matches!(r, Err(Error::Invalid(_))), "{r:?}");
        let ok = d.path().join("disk/pods/t");
        assert!(full(&p, &ok.display().to_string()).is_ok());
    }

    /// A root that cannot be resolved (realpath or readlink failing
    /// otherwise than "not there": EIO, EACCES) is an error, never
    /// protected as written only: before, the failure read as "not there
    /// yet", the symlinked root was kept as its own spelling, and a target
    /// where it leads passed. What is not there yet (ENOENT) is resolved
    /// as before, also through a dangling symlink.
    #[test]
    fn a_root_that_cannot_be_resolved_is_an_error_never_unprotected() {
        let d = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(d.path()).unwrap();
        let real = base.join("disk/local");
        std::fs::create_dir_all(&real).unwrap();
        let link = base.join("local");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let (os, fake) = crate::os::Os::fake();
        let files = os.files.as_ref();
        assert_eq!(resolved_fully(files, &link).unwrap(), real);
        // Every look below `base` fails (a disk that stopped answering).
        for errno in [libc::EIO, libc::EACCES] {
            fake.fail_op_under("realpath", &base, errno);
            fake.fail_op_under("readlink", &base, errno);
            let e = Protected::new(files, std::slice::from_ref(&link), &[]).unwrap_err();
            assert_eq!(e.errno(), Some(errno), "{e}");
            fake.clear_file_faults();
        }
        // One failed realpath is enough.
        fake.fail_next("realpath", libc::EIO);
        let e = resolved_fully(files, &link).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EIO), "{e}");
        // Not there yet: its parent resolved (realpath ENOENT, readlink
        // ENOENT), and a dangling symlink followed (readlink answers).
        let later = link.join("new/vol");
        assert_eq!(resolved_fully(files, &later).unwrap(), real.join("new/vol"));
        let dangling = base.join("dangling");
        std::os::unix::fs::symlink(base.join("disk/to-be"), &dangling).unwrap();
        assert_eq!(
            resolved_fully(files, &dangling.join("x")).unwrap(),
            base.join("disk/to-be/x")
        );
        // A readlink that fails otherwise than "not there" or "no
        // symlink" (EINVAL) is an error too.
        fake.fail_next("readlink", libc::EIO);
        let e = resolved_fully(files, &dangling).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EIO), "{e}");
        let p = Protected::new(files, std::slice::from_ref(&link), &[]).unwrap();
        let r = full(&p, &real.join("vol").display().to_string());
        assert!(matches!(r, Err(Error::Invalid(_))), "{r:?}");
    }

    #[test]
    fn a_component_longer_than_a_file_name_is_invalid() {
        let (_d, p) = setup();
        let long = format!("/tmp/{}", "a".repeat(256));
        assert!(matches!(
            p.check("target_path", &long),
            Err(Error::Invalid(_))
        ));
        let ok = format!("/tmp/{}", "a".repeat(255));
        assert!(p.check("target_path", &ok).is_ok());
    }
}
