//! Conversions between the generated CSI messages and Berth's own types.
use std::collections::HashMap;

use crate::csi::v1 as csi;
use crate::csi::v1::volume_capability::access_mode::Mode;
use crate::error::{Error, Result};
use crate::state::{AccessMode, AccessType, Capability};

pub fn access_mode(m: i32) -> Result<AccessMode> {
    Ok(match Mode::try_from(m) {
        Ok(Mode::SingleNodeWriter) => AccessMode::SingleNodeWriter,
        Ok(Mode::SingleNodeReaderOnly) => AccessMode::SingleNodeReaderOnly,
        Ok(Mode::MultiNodeReaderOnly) => AccessMode::MultiNodeReaderOnly,
        Ok(Mode::MultiNodeSingleWriter) => AccessMode::MultiNodeSingleWriter,
        Ok(Mode::MultiNodeMultiWriter) => AccessMode::MultiNodeMultiWriter,
        Ok(Mode::SingleNodeSingleWriter) => AccessMode::SingleNodeSingleWriter,
        Ok(Mode::SingleNodeMultiWriter) => AccessMode::SingleNodeMultiWriter,
        Ok(Mode::Unknown) | Err(_) => {
            return Err(Error::Invalid(format!(
                "volume_capability access_mode {m} is not a known mode"
            )))
        }
    })
}

fn mode_to_proto(m: AccessMode) -> Mode {
    match m {
        AccessMode::SingleNodeWriter => Mode::SingleNodeWriter,
        AccessMode::SingleNodeReaderOnly => Mode::SingleNodeReaderOnly,
        AccessMode::MultiNodeReaderOnly => Mode::MultiNodeReaderOnly,
        AccessMode::MultiNodeSingleWriter => Mode::MultiNodeSingleWriter,
        AccessMode::MultiNodeMultiWriter => Mode::MultiNodeMultiWriter,
        AccessMode::SingleNodeSingleWriter => Mode::SingleNodeSingleWriter,
        AccessMode::SingleNodeMultiWriter => Mode::SingleNodeMultiWriter,
    }
}

/// The most capabilities one request may list (there are 2 access types
/// and 7 access modes).
pub const MAX_CAPABILITIES: usize = 32;

/// One capability from a request; INVALID_ARGUMENT when incomplete.
pub fn capability(c: &csi::VolumeCapability) -> Result<Capability> {
    let access_type = match &c.access_type {
        Some(csi::volume_capability::AccessType::Mount(m)) => {
            // The spec's limits, and no other: "The total size of this
            // repeated field SHALL NOT exceed 4 KiB" (the flags' bytes
            // together), each flag a string of at most 128 bytes (its
            // Size Limits), and no limit on their number (which the 4 KiB
            // bounds: before, more than 64 flags were refused, short
            // ones too). The message names no flag: one may carry a
            // secret.
            let total: usize = m.mount_flags.iter().map(String::len).sum();
            if total > crate::validate::MAX_MAP {
                return Err(Error::Invalid(format!(
                    "mount_flags are {total} bytes in total, more than the {} bytes (4 KiB) the CSI spec allows",
                    crate::validate::MAX_MAP
                )));
            }
            // Kept once each, in the order given: a repeated flag changes
            // nothing on the mount, and the record stays bounded.
            // (A set: thousands of short flags are within the limit.)
            let mut mount_flags: Vec<String> = Vec::with_capacity(m.mount_flags.len());
            let mut seen = std::collections::HashSet::with_capacity(m.mount_flags.len());
            for f in &m.mount_flags {
                if f.is_empty() || f.len() > crate::validate::MAX_STRING || f.contains('\0') {
                    return Err(Error::Invalid(
                        "a mount flag is empty, contains NUL or is longer than 128 bytes (the CSI spec's limit of a string)".into(),
                    ));
                }
                // Named by the character only: a flag's value may be a
                // secret (`os::option_shown`).
                if let Some(c) = f.chars().find(|c| c.is_control()) {
                    return Err(Error::Invalid(format!(
                        "a mount flag contains the control character U+{:04X}",
                        u32::from(c)
                    )));
                }
                if seen.insert(f.as_str()) {
                    mount_flags.push(f.clone());
                }
            }
            if m.fs_type.len() > 32 || m.volume_mount_group.len() > crate::validate::MAX_STRING {
                return Err(Error::Invalid(
                    "fs_type or volume_mount_group too long".into(),
                ));
            }
            for (field, v) in [
                ("fs_type", &m.fs_type),
                ("volume_mount_group", &m.volume_mount_group),
            ] {
                if let Some(c) = v.chars().find(|c| c.is_control()) {
                    return Err(Error::Invalid(format!(
                        "{field} contains the control character U+{:04X}",
                        u32::from(c)
                    )));
                }
            }
            AccessType::Mount {
                fs_type: m.fs_type.clone(),
                mount_flags,
                volume_mount_group: m.volume_mount_group.clone(),
                extra: None,
            }
        }
        Some(csi::volume_capability::AccessType::Block(_)) => AccessType::Block,
        None => {
            return Err(Error::Invalid(
                "volume_capability has no access_type (mount or block)".into(),
            ))
        }
    };
    let mode = c
        .access_mode
        .as_ref()
        .ok_or_else(|| Error::Invalid("volume_capability has no access_mode".into()))?;
    Ok(Capability {
        access_type,
        access_mode: access_mode(mode.mode)?,
        extra: None,
    })
}

/// A required list of capabilities, sorted so that retries compare equal.
pub fn capabilities(cs: &[csi::VolumeCapability]) -> Result<Vec<Capability>> {
    if cs.is_empty() {
        return Err(Error::Invalid("volume_capabilities are required".into()));
    }
    if cs.len() > MAX_CAPABILITIES {
        return Err(Error::Invalid(format!(
            "{} volume_capabilities, more than the {MAX_CAPABILITIES} allowed",
            cs.len()
        )));
    }
    let mut v = cs.iter().map(capability).collect::<Result<Vec<_>>>()?;
    v.sort();
    v.dedup();
    Ok(v)
}

/// A required single capability.
pub fn required_capability(c: Option<&csi::VolumeCapability>) -> Result<Capability> {
    capability(c.ok_or_else(|| Error::Invalid("volume_capability is required".into()))?)
}

pub fn capability_to_proto(c: &Capability) -> csi::VolumeCapability {
    let access_type = match &c.access_type {
        AccessType::Mount {
            fs_type,
            mount_flags,
            volume_mount_group,
            ..
        } => csi::volume_capability::AccessType::Mount(csi::volume_capability::MountVolume {
            fs_type: fs_type.clone(),
            mount_flags: mount_flags.clone(),
            volume_mount_group: volume_mount_group.clone(),
        }),
        AccessType::Block => {
            csi::volume_capability::AccessType::Block(csi::volume_capability::BlockVolume {})
        }
    };
    csi::VolumeCapability {
        access_type: Some(access_type),
        access_mode: Some(csi::volume_capability::AccessMode {
            mode: mode_to_proto(c.access_mode) as i32,
        }),
    }
}

/// The topology segment of one node.
pub fn node_topology(key: &str, node: &str) -> csi::Topology {
    csi::Topology {
        segments: HashMap::from([(key.to_string(), node.to_string())]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use csi::volume_capability::{access_mode::Mode, AccessMode, AccessType, MountVolume};

    fn mount(flags: &[&str]) -> csi::VolumeCapability {
        csi::VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: String::new(),
                mount_flags: flags.iter().map(|f| f.to_string()).collect(),
                volume_mount_group: String::new(),
            })),
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
        }
    }

    #[test]
    fn mount_flags_are_bounded_and_kept_once() {
        let c = capability(&mount(&["noatime", "ro", "noatime", "ro", "nodev"])).unwrap();
        match c.access_type {
            crate::state::AccessType::Mount { mount_flags, .. } => {
                assert_eq!(mount_flags, ["noatime", "ro", "nodev"])
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(capability(&mount(&[""])), Err(Error::Invalid(_))));
        let too_many = vec![mount(&[]); MAX_CAPABILITIES + 1];
        assert!(matches!(capabilities(&too_many), Err(Error::Invalid(_))));
        assert_eq!(
            capabilities(&too_many[..MAX_CAPABILITIES]).unwrap().len(),
            1
        );
    }

    fn flags_of(c: &Capability) -> usize {
        match &c.access_type {
            crate::state::AccessType::Mount { mount_flags, .. } => mount_flags.len(),
            other => panic!("{other:?}"),
        }
    }

    /// The spec's limits of `mount_flags`, at their edges: 4 KiB of flags
    /// together (4,096 bytes taken, 4,097 refused) whatever their number,
    /// each flag at most 128 bytes. Before, a 65th flag was refused
    /// however short the flags were (65 flags of 3 bytes: 195 bytes).
    #[test]
    fn mount_flags_are_held_to_the_spec_limits_and_no_other() {
        let invalid = |flags: &[String]| {
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            match capability(&mount(&flags)) {
                Err(Error::Invalid(m)) => m,
                other => panic!("{} flags: {other:?}", flags.len()),
            }
        };
        let taken = |flags: &[String]| {
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            flags_of(&capability(&mount(&flags)).expect("taken"))
        };
        // 65 short flags, and 1,024 of 4 bytes (4,096 bytes): taken.
        let short: Vec<String> = (0..65).map(|i| format!("f{i:02}")).collect();
        assert_eq!(taken(&short), 65);
        let many: Vec<String> = (0..1024).map(|i| format!("{i:04}")).collect();
        assert_eq!(many.iter().map(String::len).sum::<usize>(), 4096);
        assert_eq!(taken(&many), 1024);
        // One byte more (a 1,025th flag of 1 byte): refused, naming no flag.
        let mut over = many.clone();
        over.push("x".into());
        let m = invalid(&over);
        assert!(m.contains("4097 bytes") && !m.contains("0001"), "{m}");
        // 32 flags of 128 bytes (4,096 bytes): taken; a 129-byte flag is
        // refused, and so is a 33rd flag of 1 byte.
        let long: Vec<String> = (0..32)
            .map(|i| format!("{i:02}{}", "x".repeat(126)))
            .collect();
        assert_eq!(taken(&long), 32);
        let mut too_long = long[..30].to_vec();
        too_long.push(format!("99{}", "x".repeat(127)));
        let m = invalid(&too_long);
        assert!(!m.contains("bytes in total"), "{m}");
        let mut over = long.clone();
        over.push("y".into());
        invalid(&over);
        // Repeats count toward the size as sent, and are kept once.
        let twice: Vec<String> = vec!["noatime".to_string(); 585];
        assert_eq!(taken(&twice), 1);
        let mut over = twice.clone();
        over.push("noatime".into());
        assert_eq!(over.len() * 7, 4102);
        invalid(&over);
    }
}
