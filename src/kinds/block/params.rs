//! StorageClass parameters of block volumes, and volume sizes.
use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::os::mkfs::{self, Filesystem};
use crate::state::{AccessType, Allocation, Capability};

pub const ALLOCATION: &str = "allocation";
pub const FS_TYPE: &str = "fsType";
pub const MKFS_OPTIONS: &str = "mkfsOptions";
pub const POOL: &str = "pool";
const KNOWN: [&str; 4] = [ALLOCATION, FS_TYPE, MKFS_OPTIONS, POOL];

/// Keys the CO adds and the generic `kind` key; not the kind's business
/// (the same split as CreateVolume's).
const KIND_KEY: &str = "kind";
const CO_PREFIX: &str = "csi.storage.k8s.io/";

/// Sizes of file-backed volumes are multiples of this.
pub const GRANULE: i64 = 1 << 20;

/// Which pool a volume comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// A file under the block root.
    File(Allocation),
    /// A whole disk of `--disk-pool`.
    Disk,
}

/// Parsed block parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    pub pool: Pool,
    /// Filesystem of mount volumes whose capability names none.
    pub default_fs: Filesystem,
    /// Checked extra mkfs arguments for `default_fs`.
    pub mkfs_options: Vec<String>,
}

/// The kind's own parameters out of a record's full parameter map.
pub fn own(params: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    params
        .iter()
        .filter(|(k, _)| k.as_str() != KIND_KEY && !k.starts_with(CO_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Parses and checks the kind's parameters; INVALID_ARGUMENT naming the key
/// for anything unknown or malformed.
pub fn parse(params: &BTreeMap<String, String>) -> Result<Params> {
    if let Some(k) = params.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(Error::Invalid(format!(
            "unknown parameter {k:?} for block volumes (known: {})",
            KNOWN.join(", ")
        )));
    }
    let allocation = match params.get(ALLOCATION).map(String::as_str) {
        None | Some("thin") => Allocation::Thin,
        Some("thick") => Allocation::Thick,
        Some(v) => {
            return Err(Error::Invalid(format!(
                "parameter {ALLOCATION}: {v:?} is not thin or thick"
            )))
        }
    };
    let pool = match params.get(POOL).map(String::as_str) {
        None => Pool::File(allocation),
        Some("disk") => {
            if params.contains_key(ALLOCATION) {
                return Err(Error::Invalid(format!(
                    "parameter {ALLOCATION} does not apply to whole disks ({POOL}: disk)"
                )));
            }
            Pool::Disk
        }
        Some(v) => {
            return Err(Error::Invalid(format!(
                "parameter {POOL}: {v:?} is not a pool (the only one is \"disk\"; leave it out for files under the block root)"
            )))
        }
    };
    let default_fs = match params.get(FS_TYPE) {
        None => Filesystem::Ext4,
        Some(v) => Filesystem::parse(v).ok_or_else(|| {
            Error::Invalid(format!("parameter {FS_TYPE}: {v:?} is not ext4 or xfs"))
        })?,
    };
    let mkfs_options = match params.get(MKFS_OPTIONS) {
        None => Vec::new(),
        Some(v) => mkfs::check_options(default_fs, v)
            .map_err(|e| Error::Invalid(format!("parameter {e}")))?,
    };
    Ok(Params {
        pool,
        default_fs,
        mkfs_options,
    })
}

/// The filesystem a mount capability asks for (`None` for raw block);
/// INVALID_ARGUMENT for a type Berth does not make.
pub fn capability_fs(cap: &Capability, default_fs: Filesystem) -> Result<Option<Filesystem>> {
    match &cap.access_type {
        AccessType::Block => Ok(None),
        AccessType::Mount { fs_type, .. } if fs_type.is_empty() => Ok(Some(default_fs)),
        AccessType::Mount { fs_type, .. } => {
            Filesystem::parse(fs_type).map(Some).ok_or_else(|| {
                Error::Capability(format!(
                    "fs_type {:?} is not supported for block volumes (ext4, xfs)",
                    fs_type.chars().take(32).collect::<String>()
                ))
            })
        }
    }
}

/// `size` rounded up to the granule.
pub fn round_up(size: i64) -> Result<i64> {
    let g = GRANULE;
    size.max(1)
        .checked_add(g - 1)
        .map(|s| s / g * g)
        .ok_or_else(|| Error::BadSize(format!("{size} bytes is too large")))
}

/// The largest of what mkfs needs for the filesystems `caps` may be
/// formatted with (xfs: 300 MiB), and that filesystem; none for raw block
/// capabilities only.
pub fn fs_min_bytes(p: &Params, caps: &[Capability]) -> Result<Option<(Filesystem, i64)>> {
    let mut most: Option<(Filesystem, i64)> = None;
    for c in caps {
        if let Some(fs) = capability_fs(c, p.default_fs)? {
            if most.is_none_or(|(_, m)| fs.min_bytes() > m) {
                most = Some((fs, fs.min_bytes()));
            }
        }
    }
    Ok(most)
}

/// The size of a new file-backed volume: `wanted` rounded up to a whole
/// MiB, or down when rounding up passes `limit` and the whole MiB below
/// still holds `required` (a range such as 0 to 64 MiB + 1 is 64 MiB, not
/// refused); at least what the filesystems it may be formatted with need;
/// at most `limit`. OUT_OF_RANGE when no such size exists.
pub fn file_size(
    p: &Params,
    caps: &[Capability],
    wanted: i64,
    required: i64,
    limit: i64,
) -> Result<i64> {
    let mut size = round_up(wanted)?;
    if limit > 0 && size > limit {
        let down = limit / GRANULE * GRANULE;
        if down > 0 && down >= required {
            size = down;
        }
    }
    let mut mkfs_needs = None;
    for c in caps {
        if let Some(fs) = capability_fs(c, p.default_fs)? {
            if fs.min_bytes() > size {
                size = fs.min_bytes();
                mkfs_needs = Some(fs);
            }
        }
    }
    if limit > 0 && size > limit {
        return Err(Error::BadSize(match mkfs_needs {
            Some(fs) => format!(
                "a block volume that may be formatted {fs} takes at least {size} bytes ({} refuses less), more than limit_bytes {limit}",
                fs.mkfs_program()
            ),
            None => format!(
                "a block volume takes whole MiB, and none lies between required_bytes {required} and limit_bytes {limit} (asked for {wanted} bytes)"
            ),
        }));
    }
    Ok(size)
}

/// The size a volume of `current` bytes grows to for a request of at least
/// `required` and at most `limit` bytes: never smaller than it is.
pub fn grown_size(current: i64, required: i64, limit: i64) -> Result<i64> {
    let want = if required > 0 { round_up(required)? } else { 0 };
    let size = want.max(current);
    if limit > 0 && size > limit {
        return Err(Error::BadSize(format!(
            "the volume would be {size} bytes (it has {current}, whole MiB), more than limit_bytes {limit}"
        )));
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::AccessMode;

    fn m(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn mount(fs: &str) -> Capability {
        Capability {
            access_type: AccessType::Mount {
                fs_type: fs.into(),
                mount_flags: vec![],
                volume_mount_group: String::new(),
                extra: None,
            },
            access_mode: AccessMode::SingleNodeWriter,
            extra: None,
        }
    }

    #[test]
    fn parameters() {
        let p = parse(&m(&[])).unwrap();
        assert_eq!(p.pool, Pool::File(Allocation::Thin));
        assert_eq!(p.default_fs, Filesystem::Ext4);
        let p = parse(&m(&[("allocation", "thick"), ("fsType", "xfs")])).unwrap();
        assert_eq!(p.pool, Pool::File(Allocation::Thick));
        assert_eq!(p.default_fs, Filesystem::Xfs);
        assert_eq!(parse(&m(&[("pool", "disk")])).unwrap().pool, Pool::Disk);
        let p = parse(&m(&[("fsType", "xfs"), ("mkfsOptions", "-m bigtime=0")])).unwrap();
        assert_eq!(p.mkfs_options, ["-m", "bigtime=0"]);
        for bad in [
            m(&[("allocation", "fat")]),
            m(&[("pool", "tape")]),
            m(&[("pool", "disk"), ("allocation", "thin")]),
            m(&[("fsType", "btrfs")]),
            m(&[("mkfsOptions", "-E offset=4096")]),
            m(&[("size", "1")]),
        ] {
            let e = parse(&bad).unwrap_err();
            assert!(matches!(e, Error::Invalid(_)), "{bad:?}");
        }
        let e = parse(&m(&[("colour", "red")])).unwrap_err();
        assert!(e.to_string().contains("\"colour\""), "{e}");
        let full = m(&[
            ("kind", "block"),
            ("csi.storage.k8s.io/pvc/name", "x"),
            ("fsType", "xfs"),
        ]);
        assert_eq!(own(&full), m(&[("fsType", "xfs")]));
    }

    #[test]
    fn sizes() {
        let p = parse(&m(&[])).unwrap();
        let mib = GRANULE;
        assert_eq!(file_size(&p, &[], 1, 1, 0).unwrap(), mib);
        assert_eq!(file_size(&p, &[], mib, mib, mib).unwrap(), mib);
        assert_eq!(file_size(&p, &[], mib + 1, mib + 1, 0).unwrap(), 2 * mib);
        // No whole MiB between required and limit.
        assert!(matches!(
            file_size(&p, &[], mib + 1, mib + 1, mib + 1),
            Err(Error::BadSize(_))
        ));
        let e = file_size(&p, &[], 64 * mib + 1, 64 * mib + 1, 64 * mib + mib / 2).unwrap_err();
        assert!(
            e.to_string()
                .contains("none lies between required_bytes 67108865"),
            "{e}"
        );
        assert!(matches!(
            file_size(&p, &[], mib / 2, 0, mib / 2),
            Err(Error::BadSize(_))
        ));
        // Rounding up would pass the limit: down, when that still holds
        // what is required.
        for (wanted, required, limit) in [
            (64 * mib + 1, 0, 64 * mib + 1),
            (64 * mib + mib / 2, 0, 64 * mib + mib / 2),
            (64 * mib + 1, 10, 64 * mib + 1),
            (64 * mib + 1, 64 * mib, 64 * mib + 1),
        ] {
            assert_eq!(
                file_size(&p, &[], wanted, required, limit).unwrap(),
                64 * mib,
                "{wanted} {required} {limit}"
            );
        }
        // xfs needs 300 MiB; rounded up when the limit allows.
        assert_eq!(
            file_size(&p, &[mount("xfs")], mib, mib, 0).unwrap(),
            300 * mib
        );
        let e = file_size(&p, &[mount("xfs")], mib, mib, 10 * mib).unwrap_err();
        assert!(
            matches!(e, Error::BadSize(_)) && e.to_string().contains("mkfs.xfs"),
            "{e}"
        );
        assert_eq!(
            file_size(&p, &[mount("xfs")], 300 * mib + 1, 0, 300 * mib + 1).unwrap(),
            300 * mib
        );
        assert!(matches!(
            file_size(&p, &[mount("zfs")], mib, mib, 0),
            Err(Error::Capability(_))
        ));
        assert!(round_up(i64::MAX).is_err());
        assert_eq!(grown_size(4 * mib, 3 * mib, 0).unwrap(), 4 * mib);
        assert_eq!(grown_size(4 * mib, 5 * mib - 1, 0).unwrap(), 5 * mib);
        assert_eq!(grown_size(4 * mib, 0, 0).unwrap(), 4 * mib);
        assert!(matches!(
            grown_size(4 * mib, 6 * mib, 5 * mib),
            Err(Error::BadSize(_))
        ));
    }
}
