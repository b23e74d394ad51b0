//! fallocate(2): preallocation of thick block volume files. A plain function
//! rather than a trait: it touches only Berth's own files and works without
//! privileges, so tests run it for real.
use std::fs::File;
use std::path::Path;

use nix::fcntl::{fallocate, FallocateFlags};

use super::OsError;

/// Allocates the first `len` bytes of `file` (extending it if shorter).
/// Ranges already allocated are left as they are, so a retry is cheap.
pub fn allocate(file: &File, path: &Path, len: u64) -> Result<(), OsError> {
    let len = i64::try_from(len).map_err(|_| {
        OsError::sys(
            "fallocate",
            path,
            std::io::Error::from_raw_os_error(libc::EFBIG),
        )
    })?;
    if len == 0 {
        return Ok(());
    }
    fallocate(file, FallocateFlags::empty(), 0, len).map_err(|e| OsError::sys("fallocate", path, e))
}

/// Bytes of `file` actually allocated on disk.
pub fn allocated_bytes(meta: &std::fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    meta.blocks().saturating_mul(512)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_and_is_idempotent() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f");
        let f = File::create(&p).unwrap();
        allocate(&f, &p, 1 << 20).unwrap();
        allocate(&f, &p, 1 << 20).unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.len(), 1 << 20);
        assert!(allocated_bytes(&m) >= 1 << 20);
    }
}
