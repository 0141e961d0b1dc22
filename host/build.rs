//! Generates the gRPC server of the client API (its messages come from
//! conflux-client, which owns `client/proto`) and the node-to-node cluster
//! service from `proto/`, with a vendored protoc, so a fresh machine needs no
//! system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    unsafe_set_protoc(&protoc);
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // Only the `Conflux` server: every message of `conflux.v1` is
    // conflux-client's (one definition, one set of serde derives).
    tonic_prost_build::configure()
        .build_client(false)
        .extern_path(".conflux.v1", "::conflux_client::pb")
        .codec_path("crate::api::codec::ValidatingCodec")
        .file_descriptor_set_path(out.join("conflux_descriptor.bin"))
        .compile_protos(&["../client/proto/conflux/v1/conflux.proto"], &["../client/proto"])?;
    // Node-to-node messages are opaque bytes checked by their decoder, so the
    // cluster service uses tonic's plain prost codec.
    tonic_prost_build::configure().compile_protos(&["proto/conflux/cluster/v1/cluster.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=../client/proto");
    Ok(())
}

#[allow(unsafe_code)]
fn unsafe_set_protoc(path: &std::path::Path) {
    // SAFETY: the build script has no other threads that read the environment.
    unsafe { std::env::set_var("PROTOC", path) };
}
