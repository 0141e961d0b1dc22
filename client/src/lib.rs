//! The Conflux API client, for anything that calls a node from outside: the
//! `conflux` CLI, `conflux-bench` and the end-to-end tests. It owns the
//! protobuf messages of `conflux.v1` ([`pb`], with serde for the JSON views of
//! replies, see [`json`]) and the client stubs; connecting in plaintext or TLS
//! with an optional bearer token ([`connect`], [`connect_with`]); the
//! chunking of a Deploy ([`deploy_messages`]); and the error-kind metadata
//! key. It links none of the daemon (no wasmtime, openraft or sled): the
//! daemon's server side is generated in conflux-host against these messages.

mod connect;
pub mod json;
mod secret;

pub use connect::{AuthClient, BearerToken, ClientError, ClientOptions, MAX_REPLY_BYTES, connect, connect_with};
pub use pb::conflux_client::ConfluxClient;
pub use secret::Secret;

/// The messages and client stubs of `conflux/v1/conflux.proto`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("conflux.v1");
}

/// Metadata key (gRPC) and header (HTTP) naming the kind of failure, for
/// clients that branch on it.
pub const ERROR_KIND_HEADER: &str = "conflux-error-kind";

/// Largest deploy chunk a client should send; [`deploy_messages`] uses this.
pub const DEPLOY_CHUNK_BYTES: usize = 64 << 10;

/// The messages of one Deploy call: `header` (with `size_bytes` filled in), then
/// `bytes` in chunks of [`DEPLOY_CHUNK_BYTES`].
pub fn deploy_messages(mut header: pb::DeployHeader, bytes: &[u8]) -> Vec<pb::DeployRequest> {
    header.size_bytes = bytes.len() as u64;
    std::iter::once(pb::deploy_request::Part::Header(header))
        .chain(bytes.chunks(DEPLOY_CHUNK_BYTES).map(|c| pb::deploy_request::Part::Chunk(c.to_vec())))
        .map(|part| pb::DeployRequest { part: Some(part) })
        .collect()
}

/// The `conflux-error-kind` of a failed call, if the node named one.
pub fn error_kind(status: &tonic::Status) -> Option<&str> {
    status.metadata().get(ERROR_KIND_HEADER).and_then(|v| v.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deploys_are_a_header_then_bounded_chunks() {
        let bytes = vec![7u8; 2 * DEPLOY_CHUNK_BYTES + 1];
        let header = pb::DeployHeader { entity_type: "t".into(), ..Default::default() };
        let messages = deploy_messages(header, &bytes);
        assert_eq!(messages.len(), 4);
        match &messages[0].part {
            Some(pb::deploy_request::Part::Header(h)) => assert_eq!(h.size_bytes, bytes.len() as u64),
            other => panic!("first message is not the header: {other:?}"),
        }
        let sizes: Vec<usize> = messages[1..]
            .iter()
            .map(|m| match &m.part {
                Some(pb::deploy_request::Part::Chunk(c)) => c.len(),
                other => panic!("not a chunk: {other:?}"),
            })
            .collect();
        assert_eq!(sizes, [DEPLOY_CHUNK_BYTES, DEPLOY_CHUNK_BYTES, 1]);
    }

    #[test]
    fn error_kinds_are_read_from_metadata() {
        let mut s = tonic::Status::unavailable("down");
        assert_eq!(error_kind(&s), None);
        s.metadata_mut().insert(ERROR_KIND_HEADER, tonic::metadata::MetadataValue::from_static("no-leader"));
        assert_eq!(error_kind(&s), Some("no-leader"));
    }
}
