//! Whether a device may be formatted. Formatting destroys data, so the rule
//! is narrow: Berth makes a filesystem only on storage that it created
//! itself and that never held data:
//! - its record says Berth never formatted it and it was first staged as a
//!   filesystem (the access type is recorded at the first stage, so a
//!   volume used raw is never formatted later);
//! - nothing uses the device, it can be read, and `blkid -p` finds nothing;
//! - for a file volume, the file holds no data at all (SEEK_DATA finds
//!   none: created, sized and preallocated, never written); for a disk,
//!   its sample (first and last MiB, spaced 4 KiB blocks) reads as zeros
//!   (the claim checked the same, but a tenant may have written it raw
//!   since, and a record restored from a backup may not know).
//!
//! Before mkfs runs, the record pins the filesystem and the UUID it is
//! about to make. A stage after a crash in the middle finds either nothing
//! (mkfs had not written its signature: the device holds only what Berth's
//! own mkfs wrote, so it is formatted again), or a filesystem. A filesystem
//! is never formatted over: if it is the one pinned (same type and UUID),
//! Berth's mkfs finished, and it is mounted and recorded as it is, data and
//! all (a record rolled back from a backup cannot make Berth format a
//! filesystem in use). The one exception is an xfs that mkfs.xfs itself
//! marks as unfinished (`sb_inprogress`): the kernel never mounts such a
//! filesystem, so it never held data, and mkfs runs again with force.
//! Everything else (a probe error, a partition table, LUKS, LVM, another
//! filesystem or UUID) refuses with a message.
use crate::os::blkid::Probe;
use crate::os::mkfs::Filesystem;
use crate::state::BlockInfo;

/// What NodeStageVolume does with the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Formatted already (by Berth): mount it.
    Mount,
    /// Berth's own interrupted mkfs had finished: mount it, then record it
    /// as formatted. Never mkfs.
    Adopt,
    /// Make a new filesystem; `force` only to redo an xfs that mkfs.xfs
    /// marked unfinished with the pinned UUID.
    Format { force: bool },
    /// Neither: FAILED_PRECONDITION with this message.
    Refuse(String),
}

/// What the volume's storage holds that blkid does not recognise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    /// A file volume: whether its backing file holds data (SEEK_DATA;
    /// None: the filesystem cannot tell, which counts as "it may").
    File(Option<bool>),
    /// A disk: whether its sample (first and last MiB, spaced 4 KiB
    /// blocks) reads as anything but zeros; an error (it could not be
    /// read) counts as "it may".
    Disk(Result<bool, String>),
}

/// What the stage knows about the device and its backing storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// Mounted or held somewhere.
    pub in_use: bool,
    /// Whether the storage holds data; consulted only when blkid finds
    /// nothing and no mkfs of Berth's was interrupted.
    pub data: Data,
}

/// Decides from the record, the requested filesystem, the facts, the probe
/// of the device (`probe` is consulted only when the record does not
/// settle it; an `Err` is a probe that could not be made or read) and, for
/// xfs, whether its superblock says mkfs is still in progress
/// (`xfs_unfinished`, read only when it matters).
pub fn decide(
    info: &BlockInfo,
    fs: Filesystem,
    facts: Facts,
    probe: impl FnOnce() -> Result<Probe, String>,
    xfs_unfinished: impl FnOnce() -> bool,
) -> Decision {
    if info.formatted {
        if info.fs_type == fs.as_str() {
            return Decision::Mount;
        }
        return Decision::Refuse(format!(
            "the volume was formatted {} by Berth; it cannot be mounted as {fs}",
            info.fs_type
        ));
    }
    if facts.in_use {
        return Decision::Refuse(
            "the device is mounted or in use but Berth never finished formatting it; refusing to format a device in use".into(),
        );
    }
    let p = match probe() {
        Err(e) => {
            return Decision::Refuse(format!(
                "cannot tell whether the device is blank ({e}); refusing to format it"
            ))
        }
        Ok(p) => p,
    };
    let ours = info.formatting == fs.as_str() && !info.formatting_uuid.is_empty();
    match p {
        Probe::Blank if ours || info.formatting == fs.as_str() => {
            // Berth's own mkfs was interrupted before it wrote a
            // signature: what the device holds, mkfs wrote.
            Decision::Format { force: false }
        }
        Probe::Blank => match facts.data {
            Data::File(Some(false)) | Data::Disk(Ok(false)) => Decision::Format { force: false },
            Data::File(Some(true)) => Decision::Refuse(
                "blkid finds nothing on the device, but its backing file holds data that Berth did not write (was the volume used as a raw block device?); refusing to format it".into(),
            ),
            Data::File(None) => Decision::Refuse(
                "the block root's filesystem cannot tell whether the backing file holds data; refusing to format it".into(),
            ),
            Data::Disk(Ok(true)) => Decision::Refuse(
                "blkid finds nothing on the disk, but it does not read as zeros (its first and last MiB and spaced blocks): it holds data that Berth did not write (was the volume used as a raw block device?); refusing to format it".into(),
            ),
            Data::Disk(Err(e)) => Decision::Refuse(format!(
                "cannot tell whether the disk holds data ({e}); refusing to format it"
            )),
        },
        p if ours
            && p.is_only_filesystem(fs.as_str())
            && p.uuid().is_some_and(|u| u.eq_ignore_ascii_case(&info.formatting_uuid)) =>
        {
            if fs == Filesystem::Xfs && xfs_unfinished() {
                Decision::Format { force: true }
            } else {
                Decision::Adopt
            }
        }
        p => Decision::Refuse(format!(
            "the device holds {}{} that Berth did not make (its record says the volume was never formatted{}); refusing to format it",
            p.describe(),
            p.uuid().map(|u| format!(" (UUID {u})")).unwrap_or_default(),
            if info.formatting_uuid.is_empty() {
                String::new()
            } else {
                format!(
                    ", and the mkfs it started would have made {} with UUID {}",
                    info.formatting, info.formatting_uuid
                )
            }
        )),
    }
}

/// Whether an xfs superblock (the first 512 bytes of the device) says
/// mkfs.xfs has not finished (`sb_inprogress`, byte 126). Anything that is
/// not an xfs superblock is "finished" (never a reason to force).
pub fn xfs_in_progress(sb: &[u8]) -> bool {
    sb.len() > 126 && &sb[..4] == b"XFSB" && sb[126] != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn sig(kv: &[(&str, &str)]) -> Result<Probe, String> {
        Ok(Probe::Signature(
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        ))
    }

    fn info(formatted: &str, formatting: &str, uuid: &str) -> BlockInfo {
        BlockInfo {
            formatted: !formatted.is_empty(),
            fs_type: formatted.into(),
            formatting: formatting.into(),
            formatting_uuid: uuid.into(),
            ..Default::default()
        }
    }

    const U: &str = "0b3c1f53-4a44-4d2c-9d3e-8f7c2b4a1e01";
    const NEW: Facts = Facts {
        in_use: false,
        data: Data::File(Some(false)),
    };

    #[test]
    fn decision_table() {
        use Decision::*;
        let ext4 = Filesystem::Ext4;
        let xfs = Filesystem::Xfs;
        let never = || -> Result<Probe, String> { panic!("probe must not run") };
        let unfinished = || true;
        let finished = || false;
        let ext4_sig =
            |uuid: &str| sig(&[("TYPE", "ext4"), ("USAGE", "filesystem"), ("UUID", uuid)]);
        let refused = |d: Decision| matches!(d, Refuse(_));

        // New volume, blank device, file never written: format.
        assert_eq!(
            decide(&info("", "", ""), ext4, NEW, || Ok(Probe::Blank), finished),
            Format { force: false }
        );
        // Blank per blkid, but the file holds data (used raw): refuse;
        // a filesystem that cannot tell: refuse.
        const WRITTEN: Facts = Facts {
            data: Data::File(Some(true)),
            ..NEW
        };
        assert!(refused(decide(
            &info("", "", ""),
            ext4,
            WRITTEN,
            || Ok(Probe::Blank),
            finished
        )));
        let unknown = Facts {
            data: Data::File(None),
            ..NEW
        };
        assert!(refused(decide(
            &info("", "", ""),
            ext4,
            unknown,
            || Ok(Probe::Blank),
            finished
        )));
        // A disk: formatted only when its sample reads as zeros; data
        // (written raw, say, with the record restored from before) or a
        // sample that cannot be read refuses.
        let disk = |data| Facts {
            data: Data::Disk(data),
            ..NEW
        };
        assert_eq!(
            decide(
                &info("", "", ""),
                ext4,
                disk(Ok(false)),
                || Ok(Probe::Blank),
                finished
            ),
            Format { force: false }
        );
        for data in [Ok(true), Err("read sample /dev/sdx: EIO".to_string())] {
            let d = decide(
                &info("", "", ""),
                ext4,
                disk(data),
                || Ok(Probe::Blank),
                finished,
            );
            assert!(
                matches!(&d, Refuse(m) if m.contains("disk") && m.contains("refusing to format")),
                "{d:?}"
            );
        }
        // ... except the retry of an mkfs of Berth's own that was
        // interrupted before its signature (mkfs wrote what is there).
        assert_eq!(
            decide(
                &info("", "ext4", U),
                ext4,
                disk(Ok(true)),
                || Ok(Probe::Blank),
                finished
            ),
            Format { force: false }
        );
        // Formatted by Berth: mount, without probing.
        assert_eq!(
            decide(&info("ext4", "", ""), ext4, NEW, never, finished),
            Mount
        );
        assert_eq!(
            decide(
                &info("ext4", "", ""),
                ext4,
                Facts {
                    in_use: true,
                    ..NEW
                },
                never,
                finished
            ),
            Mount
        );
        // ... but not as another filesystem.
        assert!(refused(decide(
            &info("ext4", "", ""),
            xfs,
            NEW,
            never,
            finished
        )));
        // Record says new, device has a filesystem: refuse.
        assert!(refused(decide(
            &info("", "", ""),
            ext4,
            NEW,
            || ext4_sig(U),
            finished
        )));
        // Unknown signatures: refuse.
        for s in [
            sig(&[("TYPE", "crypto_LUKS"), ("USAGE", "crypto")]),
            sig(&[("TYPE", "LVM2_member"), ("USAGE", "raid")]),
            sig(&[("PTTYPE", "gpt")]),
            sig(&[("TYPE", "ext4"), ("PTTYPE", "dos"), ("UUID", U)]),
        ] {
            assert!(refused(decide(
                &info("", "ext4", U),
                ext4,
                NEW,
                || s.clone(),
                finished
            )));
        }
        // Probe errors: refuse.
        assert!(refused(decide(
            &info("", "", ""),
            ext4,
            NEW,
            || Err("exit 4".into()),
            finished
        )));
        // Interrupted mkfs of ours before its signature: format again (the
        // file has data: mkfs wrote it).
        assert_eq!(
            decide(
                &info("", "ext4", U),
                ext4,
                WRITTEN,
                || Ok(Probe::Blank),
                finished
            ),
            Format { force: false }
        );
        // Our mkfs finished (pinned type and UUID): mount it as it is,
        // never mkfs over it, whatever it holds.
        assert_eq!(
            decide(
                &info("", "ext4", U),
                ext4,
                WRITTEN,
                || ext4_sig(U),
                finished
            ),
            Adopt
        );
        assert_eq!(
            decide(
                &info("", "ext4", U),
                ext4,
                WRITTEN,
                || ext4_sig(&U.to_uppercase()),
                finished
            ),
            Adopt
        );
        // A stale or rolled-back intent whose UUID is not the device's:
        // refuse (the old rule formatted over any ext4 here).
        assert!(refused(decide(
            &info("", "ext4", U),
            ext4,
            WRITTEN,
            || ext4_sig("11111111-2222-3333-4444-555555555555"),
            finished
        )));
        // An intent of an older version, without a UUID: refuse.
        assert!(refused(decide(
            &info("", "ext4", ""),
            ext4,
            WRITTEN,
            || ext4_sig(U),
            finished
        )));
        // Another filesystem than the one it was writing.
        let xfs_sig = || sig(&[("TYPE", "xfs"), ("USAGE", "filesystem"), ("UUID", U)]);
        assert!(refused(decide(
            &info("", "ext4", U),
            xfs,
            WRITTEN,
            xfs_sig,
            finished
        )));
        assert!(refused(decide(
            &info("", "xfs", U),
            ext4,
            WRITTEN,
            || ext4_sig(U),
            finished
        )));
        // xfs: ours and unfinished (never mountable): force; finished: adopt.
        assert_eq!(
            decide(&info("", "xfs", U), xfs, WRITTEN, xfs_sig, unfinished),
            Format { force: true }
        );
        assert_eq!(
            decide(&info("", "xfs", U), xfs, WRITTEN, xfs_sig, finished),
            Adopt
        );
        // A device in use is never formatted.
        assert!(refused(decide(
            &info("", "", ""),
            ext4,
            Facts {
                in_use: true,
                ..NEW
            },
            || Ok(Probe::Blank),
            finished
        )));
    }

    #[test]
    fn xfs_superblock_in_progress() {
        let mut sb = vec![0u8; 512];
        sb[..4].copy_from_slice(b"XFSB");
        assert!(!xfs_in_progress(&sb));
        sb[126] = 1;
        assert!(xfs_in_progress(&sb));
        sb[0] = b'Y';
        assert!(!xfs_in_progress(&sb));
        assert!(!xfs_in_progress(&[]));
    }
}
