//! Whether a path reaches its directory without following a symlink: one
//! openat2(2) with RESOLVE_NO_SYMLINKS (and an O_PATH descriptor, closed
//! at once), instead of the readlink per component a realpath takes. A
//! read: changes nothing.
use std::path::Path;

use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag, AT_FDCWD};

/// Some(true) when the directory `dir` (absolute) is reached with no
/// symlink in any of its components, itself included; Some(false) when a
/// symlink (or a magic link) is on the way; None when the kernel cannot
/// tell (openat2 missing or refused, `dir` missing, not a directory, not
/// searchable): the caller then resolves it the long way.
pub fn free_of_symlinks(dir: &Path) -> Option<bool> {
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS);
    match openat2(AT_FDCWD, dir, how) {
        Ok(_fd) => Some(true),
        Err(nix::errno::Errno::ELOOP) => Some(false),
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_a_symlink_anywhere_on_the_way() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("a/b");
        std::fs::create_dir_all(&real).unwrap();
        std::os::unix::fs::symlink(d.path().join("a"), d.path().join("link")).unwrap();
        std::os::unix::fs::symlink(&real, d.path().join("last")).unwrap();
        // The temporary directory's own path may hold a symlink (/tmp on
        // some systems): judged against what it is.
        let base = free_of_symlinks(d.path()).unwrap();
        assert_eq!(free_of_symlinks(&real), Some(base));
        assert_eq!(free_of_symlinks(&d.path().join("link/b")), Some(false));
        assert_eq!(free_of_symlinks(&d.path().join("last")), Some(false));
        assert_eq!(free_of_symlinks(&d.path().join("missing")), None);
        std::fs::write(d.path().join("file"), b"").unwrap();
        assert_eq!(free_of_symlinks(&d.path().join("file")), None);
    }
}
