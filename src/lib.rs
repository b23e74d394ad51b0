//! Berth: a Kubernetes CSI driver for local directory, block and NFS volumes.
//!
//! Where to look:
//! - `identity/`, `controller/`, `node/`: the CSI services, one file per RPC;
//! - `kinds/`: the volume kinds behind the `VolumeKind` trait;
//! - `os/`: every system call and external command, each with a fake;
//! - `state/`: durable records; `locks.rs`: the per-volume guard;
//! - `error.rs`: domain errors and their gRPC codes; `rpc.rs`: the server
//!   boundary (spans, logging); `validate.rs`: input hygiene;
//! - `server.rs`: socket and gRPC server; `config.rs`: flags.

pub mod background;
pub mod bench;
pub mod client;
pub mod codec;
pub mod config;
pub mod controller;
pub mod convert;
pub mod csi;
pub mod driver;
pub mod error;
pub mod handoff;
pub mod identity;
pub mod kinds;
pub mod locks;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod node;
pub mod os;
pub mod reflection;
pub mod rpc;
pub mod server;
pub mod state;
pub mod validate;
