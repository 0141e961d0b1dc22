//! Generates the gRPC code from `proto/` with a vendored protoc, so a fresh
//! machine needs no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    unsafe_set_protoc(&protoc);
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .codec_path("crate::api::codec::ValidatingCodec")
        .file_descriptor_set_path(out.join("conflux_descriptor.bin"))
        .compile_protos(&["proto/conflux/v1/conflux.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}

#[allow(unsafe_code)]
fn unsafe_set_protoc(path: &std::path::Path) {
    // SAFETY: the build script has no other threads that read the environment.
    unsafe { std::env::set_var("PROTOC", path) };
}
