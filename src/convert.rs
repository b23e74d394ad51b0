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
            return Err(Error::InvalidArgument(format!(
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

/// One capability from a request; INVALID_ARGUMENT when incomplete.
pub fn capability(c: &csi::VolumeCapability) -> Result<Capability> {
    let access_type = match &c.access_type {
        Some(csi::volume_capability::AccessType::Mount(m)) => {
            for f in &m.mount_flags {
                if f.len() > crate::validate::MAX_STRING || f.contains('\0') {
                    return Err(Error::InvalidArgument("invalid mount flag".into()));
                }
            }
            if m.fs_type.len() > 32 || m.volume_mount_group.len() > crate::validate::MAX_STRING {
                return Err(Error::InvalidArgument(
                    "fs_type or volume_mount_group too long".into(),
                ));
            }
            AccessType::Mount {
                fs_type: m.fs_type.clone(),
                mount_flags: m.mount_flags.clone(),
                volume_mount_group: m.volume_mount_group.clone(),
            }
        }
        Some(csi::volume_capability::AccessType::Block(_)) => AccessType::Block,
        None => {
            return Err(Error::InvalidArgument(
                "volume_capability has no access_type (mount or block)".into(),
            ))
        }
    };
    let mode = c
        .access_mode
        .as_ref()
        .ok_or_else(|| Error::InvalidArgument("volume_capability has no access_mode".into()))?;
    Ok(Capability {
        access_type,
        access_mode: access_mode(mode.mode)?,
    })
}

/// A required list of capabilities, sorted so that retries compare equal.
pub fn capabilities(cs: &[csi::VolumeCapability]) -> Result<Vec<Capability>> {
    if cs.is_empty() {
        return Err(Error::InvalidArgument(
            "volume_capabilities are required".into(),
        ));
    }
    let mut v = cs.iter().map(capability).collect::<Result<Vec<_>>>()?;
    v.sort();
    v.dedup();
    Ok(v)
}

/// A required single capability.
pub fn required_capability(c: Option<&csi::VolumeCapability>) -> Result<Capability> {
    capability(c.ok_or_else(|| Error::InvalidArgument("volume_capability is required".into()))?)
}

pub fn capability_to_proto(c: &Capability) -> csi::VolumeCapability {
    let access_type = match &c.access_type {
        AccessType::Mount {
            fs_type,
            mount_flags,
            volume_mount_group,
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
