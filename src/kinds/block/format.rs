//! Whether a device may be formatted. Formatting destroys data, so the rule
//! is narrow: Berth formats only a volume its own record says was never
//! formatted AND that `blkid -p` reports blank, or one where the record shows
//! Berth's own mkfs was interrupted and the only thing on the device is the
//! filesystem that mkfs was writing. Everything else (a probe error, a
//! partition table, LUKS, LVM, another filesystem) refuses with a message.
use crate::os::blkid::Probe;
use crate::os::mkfs::Filesystem;
use crate::state::BlockInfo;

/// What NodeStageVolume does with the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Formatted already (by Berth): mount it.
    Mount,
    /// Make a new filesystem; `force` to overwrite Berth's own interrupted
    /// attempt (mkfs.xfs refuses an existing signature without it).
    Format { force: bool },
    /// Neither: FAILED_PRECONDITION with this message.
    Refuse(String),
}

/// Decides from the record, the requested filesystem and the probe of the
/// device (`probe` is consulted only when the record does not settle it;
/// an `Err` is a probe that could not be made or read).
pub fn decide(
    info: &BlockInfo,
    fs: Filesystem,
    device_in_use: bool,
    probe: impl FnOnce() -> Result<Probe, String>,
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
    if device_in_use {
        return Decision::Refuse(
            "the device is mounted or in use but Berth never finished formatting it; refusing to format a device in use".into(),
        );
    }
    match probe() {
        Err(e) => Decision::Refuse(format!(
            "cannot tell whether the device is blank ({e}); refusing to format it"
        )),
        Ok(Probe::Blank) => Decision::Format { force: false },
        Ok(p) if info.formatting == fs.as_str() && p.is_only_filesystem(fs.as_str()) => {
            // Our own mkfs was interrupted (or finished without being
            // recorded): nothing but what it wrote is there.
            Decision::Format { force: true }
        }
        Ok(p) => Decision::Refuse(format!(
            "the device holds {} that Berth did not write (its record says the volume was never formatted); refusing to format it",
            p.describe()
        )),
    }
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

    fn info(formatted: &str, formatting: &str) -> BlockInfo {
        BlockInfo {
            formatted: !formatted.is_empty(),
            fs_type: formatted.into(),
            formatting: formatting.into(),
            ..Default::default()
        }
    }

    #[test]
    fn decision_table() {
        use Decision::*;
        let ext4 = Filesystem::Ext4;
        let xfs = Filesystem::Xfs;
        let never = || -> Result<Probe, String> { panic!("probe must not run") };
        let ext4_sig = || sig(&[("TYPE", "ext4"), ("USAGE", "filesystem")]);
        let refused = |d: Decision| matches!(d, Refuse(_));

        // New volume, blank device: format.
        assert_eq!(
            decide(&info("", ""), ext4, false, || Ok(Probe::Blank)),
            Format { force: false }
        );
        // Formatted by Berth: mount, without probing.
        assert_eq!(decide(&info("ext4", ""), ext4, false, never), Mount);
        assert_eq!(decide(&info("ext4", ""), ext4, true, never), Mount);
        // ... but not as another filesystem.
        assert!(refused(decide(&info("ext4", ""), xfs, false, never)));
        // Record says new, device has a filesystem: refuse.
        assert!(refused(decide(&info("", ""), ext4, false, ext4_sig)));
        // Unknown signatures: refuse.
        for s in [
            sig(&[("TYPE", "crypto_LUKS"), ("USAGE", "crypto")]),
            sig(&[("TYPE", "LVM2_member"), ("USAGE", "raid")]),
            sig(&[("PTTYPE", "gpt")]),
            sig(&[("TYPE", "ext4"), ("PTTYPE", "dos")]),
        ] {
            assert!(refused(decide(&info("", "ext4"), ext4, false, || s.clone())));
        }
        // Probe errors: refuse.
        assert!(refused(decide(&info("", ""), ext4, false, || Err(
            "exit 4".into()
        ))));
        assert!(refused(decide(&info("", "ext4"), ext4, false, || Err(
            "exit 2 with output".into()
        ))));
        // Interrupted mkfs of ours: blank or our own filesystem: format again.
        assert_eq!(
            decide(&info("", "ext4"), ext4, false, || Ok(Probe::Blank)),
            Format { force: false }
        );
        assert_eq!(
            decide(&info("", "ext4"), ext4, false, ext4_sig),
            Format { force: true }
        );
        // ... but not over another filesystem than the one it was writing.
        assert!(refused(decide(&info("", "xfs"), xfs, false, ext4_sig)));
        assert!(refused(decide(&info("", "ext4"), xfs, false, ext4_sig)));
        // A device in use is never formatted.
        assert!(refused(decide(&info("", ""), ext4, true, || Ok(
            Probe::Blank
        ))));
    }
}
