//! Mount logic shared by the kinds that stage a volume at the staging path
//! and bind-mount it into targets. Every decision reads /proc/self/mountinfo
//! (through `os.mounts`); nothing trusts `stat`.
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::os::mountinfo::{self, MountEntry};
use crate::os::{MountFlags, Os};
use crate::state::{AccessType, Capability};

/// The filesystem object a mount shows: device and directory within it.
pub type Object = (u32, u32, PathBuf);

pub fn object(e: &MountEntry) -> Object {
    (e.major, e.minor, e.root.clone())
}

pub fn table(os: &Os) -> Result<Vec<MountEntry>> {
    os.mounts
        .mounts()
        .map_err(|e| Error::os("reading the mount table", e))
}

/// Mount flags a bind mount accepts from `mount_flags` (an allowlist); any
/// other flag is INVALID_ARGUMENT, so nothing reaches the kernel unchecked.
pub fn bind_flags(cap: &Capability) -> Result<MountFlags> {
    let mut f = MountFlags::default();
    if let AccessType::Mount { mount_flags, .. } = &cap.access_type {
        for flag in mount_flags {
            for opt in flag.split(',') {
                match opt.trim() {
                    "" | "rw" | "defaults" | "bind" => {}
                    "ro" => f.readonly = true,
                    "nosuid" => f.nosuid = true,
                    "nodev" => f.nodev = true,
                    "noexec" => f.noexec = true,
                    "noatime" => f.noatime = true,
                    "nodiratime" => f.nodiratime = true,
                    "relatime" => f.relatime = true,
                    other => {
                        return Err(Error::InvalidArgument(format!(
                            "mount flag {:?} is not supported (allowed: ro, rw, nosuid, nodev, noexec, noatime, nodiratime, relatime)",
                            other.chars().take(64).collect::<String>()
                        )))
                    }
                }
            }
        }
    }
    Ok(f)
}

/// Creates a directory if it is missing (not its parents); true when it
/// created it.
pub fn ensure_dir(path: &Path) -> Result<bool> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            match std::fs::symlink_metadata(path) {
                Ok(m) if m.is_dir() => Ok(false),
                Ok(_) => Err(Error::FailedPrecondition(format!(
                    "{} exists and is not a directory",
                    path.display()
                ))),
                // A broken mount point answers stat with an error; it is a
                // directory as far as mounting is concerned.
                Err(_) => Ok(false),
            }
        }
        Err(e) => Err(Error::io(format!("creating {}", path.display()), e)),
    }
}

/// Runs `mount` onto the directory `target`, creating the directory first
/// if it is missing; when the mount fails, a directory created here is
/// removed again, so a failed publish leaves nothing behind.
pub fn mount_on_dir(target: &Path, mount: impl FnOnce() -> Result<()>) -> Result<()> {
    let created = ensure_dir(target)?;
    let r = mount();
    if r.is_err() && created {
        let _ = std::fs::remove_dir(target);
    }
    r
}

/// Stages by bind-mounting `source` (a directory) at `staging`. Idempotent:
/// an existing bind of the same directory is success; any other mount there
/// is ALREADY_EXISTS.
pub fn stage_bind(os: &Os, source: &Path, staging: &Path) -> Result<()> {
    let t = table(os)?;
    let obj = mountinfo::object_of(&t, source)
        .ok_or_else(|| Error::Internal(format!("no mount holds {}", source.display())))?;
    if let Some(top) = mountinfo::at(&t, staging).last() {
        if object(top) == obj {
            return Ok(());
        }
        return Err(Error::AlreadyExists(format!(
            "staging path {} already has another mount",
            staging.display()
        )));
    }
    ensure_dir(staging)?;
    os.mounter
        .bind(source, staging, MountFlags::default())
        .map_err(|e| Error::os(format!("staging at {}", staging.display()), e))
}

/// The object staged at `staging`, if the top mount there is `expected` (or
/// any object when `expected` is None).
pub fn staged_object(
    t: &[MountEntry],
    staging: &Path,
    expected: Option<&Object>,
) -> Result<Object> {
    let top = mountinfo::at(t, staging)
        .last()
        .map(|e| object(e))
        .ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "volume is not staged at {} (call NodeStageVolume first)",
                staging.display()
            ))
        })?;
    if let Some(exp) = expected {
        if &top != exp {
            return Err(Error::FailedPrecondition(format!(
                "{} holds a different volume",
                staging.display()
            )));
        }
    }
    Ok(top)
}

/// Publishes by bind-mounting the staged volume into `target`, read-only
/// when asked. A repeat with the same arguments is success and adds no
/// mount; the same target with another volume or another read-only setting
/// is ALREADY_EXISTS; a second target of a single-target volume is
/// FAILED_PRECONDITION.
pub fn publish_bind(
    os: &Os,
    expected: impl FnOnce(&[MountEntry]) -> Option<Object>,
    staging: &Path,
    target: &Path,
    cap: &Capability,
    readonly: bool,
) -> Result<()> {
    let mut flags = bind_flags(cap)?;
    flags.readonly |= readonly || cap.access_mode.read_only();
    let t = table(os)?;
    let exp = expected(&t);
    let obj = staged_object(&t, staging, exp.as_ref())?;
    if let Some(top) = mountinfo::at(&t, target).last() {
        if object(top) == obj && top.readonly() == flags.readonly {
            return Ok(());
        }
        return Err(Error::AlreadyExists(format!(
            "target {} is already mounted with a different volume or read-only setting",
            target.display()
        )));
    }
    if cap.access_mode.single_target() {
        let others: Vec<_> = mountinfo::mounts_of(&t, &obj)
            .into_iter()
            .filter(|m| m.mount_point != staging && m.mount_point != target)
            .map(|m| m.mount_point.display().to_string())
            .collect();
        if !others.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "volume has access mode SINGLE_NODE_SINGLE_WRITER and is already published at {}",
                others.join(", ")
            )));
        }
    }
    mount_on_dir(target, || {
        os.mounter
            .bind(staging, target, flags)
            .map_err(|e| Error::os(format!("publishing at {}", target.display()), e))
    })
}

/// Unmounts everything mounted at `path` (stacked mounts included), deciding
/// from mountinfo. EBUSY is returned as an error to retry, never turned into
/// a lazy unmount.
pub fn unmount_all(os: &Os, path: &Path) -> Result<()> {
    unmount_all_in(os, &table(os)?, path)
}

/// `unmount_all` with a mount table the caller already read: unmounts as
/// many times as the table shows mounts at `path`, reading the table again
/// only if the kernel disagrees.
pub fn unmount_all_in(os: &Os, t: &[MountEntry], path: &Path) -> Result<()> {
    let mut n = mountinfo::at(t, path).len();
    for _ in 0..64 {
        if n == 0 {
            return Ok(());
        }
        match os.mounter.unmount(path) {
            Ok(()) => n -= 1,
            // EINVAL: not mounted any more (someone else unmounted): look
            // again.
            Err(e) if e.errno() == Some(libc::EINVAL) => {
                n = mountinfo::at(&table(os)?, path).len();
            }
            Err(e) => return Err(Error::os(format!("unmounting {}", path.display()), e)),
        }
    }
    Err(Error::Internal(format!(
        "{} still mounted after 64 unmounts",
        path.display()
    )))
}

/// Removes a target path the driver created: an empty directory with rmdir
/// or a device file, never recursively. Missing is fine.
pub fn remove_target(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("inspecting {}", path.display()), e)),
        Ok(m) if m.is_dir() => match std::fs::remove_dir(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {
                tracing::warn!(path = %path.display(), "target directory is not empty after unmount; leaving it");
                Ok(())
            }
            Err(e) => Err(Error::io(format!("removing {}", path.display()), e)),
        },
        Ok(_) => std::fs::remove_file(path)
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(|e| Error::io(format!("removing {}", path.display()), e)),
    }
}

/// Unpublishes: unmount everything at `target`, then remove it.
pub fn unpublish(os: &Os, target: &Path) -> Result<()> {
    unmount_all(os, target)?;
    remove_target(target)
}

/// Unstages: refuses while the staged volume is still mounted elsewhere
/// (other than its own source), then unmounts the staging path.
pub fn unstage(os: &Os, staging: &Path, source: Option<&Path>) -> Result<()> {
    let t = table(os)?;
    let Some(top) = mountinfo::at(&t, staging).last().map(|e| object(e)) else {
        return Ok(());
    };
    let others: Vec<_> = mountinfo::mounts_of(&t, &top)
        .into_iter()
        .filter(|m| m.mount_point != staging && Some(m.mount_point.as_path()) != source)
        .map(|m| m.mount_point.display().to_string())
        .collect();
    if !others.is_empty() {
        return Err(Error::FailedPrecondition(format!(
            "volume is still published at {}; unpublish it first",
            others.join(", ")
        )));
    }
    unmount_all_in(os, &t, staging)
}
