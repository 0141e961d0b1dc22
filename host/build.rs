//! Generates the gRPC code from `proto/` with a vendored protoc, so a fresh
//! machine needs no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    unsafe_set_protoc(&protoc);
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let mut build = tonic_prost_build::configure().codec_path("crate::api::codec::ValidatingCodec");
    // The replies users see as JSON (HTTP gateway, `--json`) serialize with serde;
    // payload bytes are shown as the JSON they hold.
    for message in JSON_MESSAGES {
        build = build.type_attribute(format!(".conflux.v1.{message}"), "#[derive(serde::Serialize)]");
    }
    for field in JSON_BYTES_FIELDS {
        build = build
            .field_attribute(format!(".conflux.v1.{field}"), "#[serde(serialize_with = \"crate::api::json::bytes\")]");
    }
    build
        .file_descriptor_set_path(out.join("conflux_descriptor.bin"))
        .compile_protos(&["proto/conflux/v1/conflux.proto"], &["proto"])?;
    // Node-to-node messages are opaque bytes checked by their decoder, so the
    // cluster service uses tonic's plain prost codec.
    tonic_prost_build::configure().compile_protos(&["proto/conflux/cluster/v1/cluster.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}

const JSON_MESSAGES: &[&str] = &[
    "DeployResponse",
    "DryRunReport",
    "DryRunFailure",
    "ActivateResponse",
    "EntityRef",
    "InvokeResponse",
    "VersionInfo",
    "CanaryInfo",
    "TypeInfo",
    "ListTypesResponse",
    "StatusResponse",
    "DrainResponse",
    "NodeInfo",
    "ShardInfo",
    "DeadLetterInfo",
    "ListDeadLettersResponse",
    "StateEntry",
    "GetStateResponse",
    "ListEntitiesResponse",
    "LogLine",
];

const JSON_BYTES_FIELDS: &[&str] = &["InvokeResponse.reply", "DeadLetterInfo.payload", "StateEntry.value"];

#[allow(unsafe_code)]
fn unsafe_set_protoc(path: &std::path::Path) {
    // SAFETY: the build script has no other threads that read the environment.
    unsafe { std::env::set_var("PROTOC", path) };
}
