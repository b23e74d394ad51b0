//! Code generated from proto/csi.proto (CSI spec v1.12) by build.rs.
#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("csi.v1");
}

/// The encoded file descriptor set of csi.proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/csi_descriptor.bin"));
