//! Compiles proto/csi.proto with protox (pure Rust, no system protoc) and
//! keeps the file descriptor set for gRPC reflection.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/csi.proto");
    let fds = protox::compile(["csi.proto"], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let bytes = prost::Message::encode_to_vec(&fds);
    std::fs::write(out.join("csi_descriptor.bin"), bytes)?;
    // (a request that does not decode is INVALID_ARGUMENT: src/codec.rs)
    tonic_prost_build::configure()
        .codec_path("crate::codec::CsiCodec")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
