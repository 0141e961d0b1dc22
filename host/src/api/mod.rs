//! The client API: gRPC (tonic) and, on the same port, the HTTP/JSON gateway,
//! `/metrics` and the dashboard ([`http`]). The only module that knows
//! protobuf. Maps requests to scheduler and registry calls and their errors to
//! meaningful status codes. Every error carries a machine-readable
//! `conflux-error-kind`. Each call first passes [`auth`] (bearer tokens, when
//! configured); the listener optionally speaks TLS (rustls). This file holds
//! [`Api`] (listener, routes, TLS) and the status mapping; `service.rs` the
//! `Conflux` handlers; [`cluster`] the node-to-node service, as mapping only.

pub mod auth;
pub mod browser;
pub mod cluster;

pub mod codec;
pub mod http;
pub mod net;
mod service;

/// The messages of `conflux.v1` (conflux-client's, with their client stubs)
/// and the `Conflux` server generated here against them.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    pub use ::conflux_client::pb::*;
    tonic::include_proto!("conflux.v1");
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("conflux_descriptor");
}

use crate::cluster::view::ClusterView;
use crate::config::ApiConfig;
use crate::log::CommitLog;
use crate::registry::{Registry, RegistryError};
use crate::runtime::{GuestLogs, TurnError};
use crate::scheduler::{ErrorKind, InvokeError, Scheduler};
use crate::storage::StateStore;
use auth::{Authenticator, Rpc};
use pb::conflux_server::ConfluxServer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tonic::{Code, Request, Status};

pub use conflux_client::{DEPLOY_CHUNK_BYTES, ERROR_KIND_HEADER};

/// What a request message may hold beyond its payload (entity, operation,
/// idempotency key, protobuf framing): the decoding limit is the payload
/// limit plus this, so only an over-limit payload can exceed it.
pub const MESSAGE_HEADROOM_BYTES: usize = 64 << 10;

/// The largest gRPC message the public service decodes: a payload of
/// `api.max_payload_bytes` (or a deploy chunk) plus [`MESSAGE_HEADROOM_BYTES`].
/// tonic refuses larger ones before our code runs; [`transport_status`] maps
/// that refusal into the error contract.
pub fn max_message_bytes(cfg: &ApiConfig) -> usize {
    cfg.max_payload_bytes.max(DEPLOY_CHUNK_BYTES) + MESSAGE_HEADROOM_BYTES
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(String),
    #[error("cannot read TLS {what} {path}: {source}")]
    TlsFile { what: &'static str, path: std::path::PathBuf, source: std::io::Error },
    #[error("TLS certificate {cert} / key {key} not usable: {message}")]
    Tls { cert: std::path::PathBuf, key: std::path::PathBuf, message: String },
}

/// A refusal of `kind`, answered with the kind's gRPC code.
fn status(kind: ErrorKind, message: impl Into<String>) -> Status {
    status_with_code(kind.grpc_code(), kind, message)
}

/// A refusal of `kind` under another code than its own: a failure the shard's
/// leader reported, or a transport refusal keeping tonic's code.
fn status_with_code(code: Code, kind: ErrorKind, message: impl Into<String>) -> Status {
    let mut s = Status::new(code, message);
    s.metadata_mut().insert(ERROR_KIND_HEADER, tonic::metadata::MetadataValue::from_static(kind.as_str()));
    s
}

/// The message the public API gives for a failed invocation: an entity's own
/// words without the host's framing.
pub(crate) fn invoke_message(e: InvokeError) -> String {
    match e {
        InvokeError::Turn(TurnError::BadRequest(m) | TurnError::UnknownOperation(m) | TurnError::Failed(m)) => m,
        e => e.to_string(),
    }
}

/// A status tonic answered for the public service without our code (the
/// request never reached it), mapped into the error contract: every status
/// carries a kind, and a message over the decoding limit is the caller's
/// INVALID_ARGUMENT like any other over-limit input. `method` is the RPC's name.
pub(crate) fn transport_status(method: &str, s: &Status, cfg: &ApiConfig) -> Status {
    match s.code() {
        Code::OutOfRange => {
            let (kind, what) = if method == "Invoke" {
                (ErrorKind::PayloadTooLarge, "field `payload`")
            } else {
                (ErrorKind::MessageTooLarge, "the request message")
            };
            status(
                kind,
                format!(
                    "{what} is too large: a message may be {} bytes (api.max_payload_bytes {} plus {} for the rest); {}",
                    max_message_bytes(cfg),
                    cfg.max_payload_bytes,
                    MESSAGE_HEADROOM_BYTES,
                    s.message()
                ),
            )
        }
        Code::Unimplemented => status(ErrorKind::Unimplemented, s.message().to_owned()),
        code => status_with_code(code, ErrorKind::Transport, s.message().to_owned()),
    }
}

fn invoke_status(e: InvokeError) -> Status {
    let (kind, code) = (e.kind(), e.grpc_code());
    status_with_code(code, kind, invoke_message(e))
}

fn storage_status(e: crate::storage::StorageError) -> Status {
    match e {
        // A cluster member holds only some shards.
        e @ crate::storage::StorageError::NotLocal { .. } => status(ErrorKind::NotHere, e.to_string()),
        e => status(ErrorKind::Storage, e.to_string()),
    }
}

fn registry_status(e: RegistryError) -> Status {
    let msg = e.to_string();
    match e {
        RegistryError::UnknownType(_) => status(ErrorKind::UnknownType, msg),
        RegistryError::BadTypeName(_) => status(ErrorKind::BadTypeName, msg),
        RegistryError::TooLarge { .. } => status(ErrorKind::TooLarge, msg),
        RegistryError::Invalid(_) => status(ErrorKind::InvalidComponent, msg),
        RegistryError::UnknownVersion { .. } => status(ErrorKind::UnknownVersion, msg),
        RegistryError::BadCanary(_) => status(ErrorKind::BadCanary, msg),
        RegistryError::NotPropagated(_) => status(ErrorKind::NotPropagated, msg),
        RegistryError::Conflict { .. } => status(ErrorKind::Conflict, msg),
        RegistryError::Loading { .. } => status(ErrorKind::ComponentLoading, msg),
        RegistryError::Fetch { .. } => status(ErrorKind::ComponentFetch, msg),
        // The metadata group had no leader or lost the write's outcome.
        RegistryError::Log(_) => status(ErrorKind::Commit, msg),
        _ => status(ErrorKind::Registry, msg),
    }
}

/// Refuses a call to `rpc` unless its metadata carries the token it needs.
fn authorize<T>(auth: &Authenticator, rpc: Rpc, request: &Request<T>) -> Result<(), Status> {
    auth.check(rpc, request.metadata()).map_err(|e| status(ErrorKind::Unauthenticated, e.to_string()))
}

/// An error and its sources, joined with ": " (tonic's transport error alone says little).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(&format!(": {s}"));
        source = s.source();
    }
    out
}

/// Reads the listener's PEM certificate and key and checks rustls accepts them.
fn load_tls(cfg: &ApiConfig) -> Result<Option<tonic::transport::ServerTlsConfig>, ApiError> {
    let (Some(cert), Some(key)) = (&cfg.tls_cert_path, &cfg.tls_key_path) else {
        return Ok(None);
    };
    let read = |what, path: &std::path::PathBuf| {
        std::fs::read(path).map_err(|source| ApiError::TlsFile { what, path: path.clone(), source })
    };
    let identity = tonic::transport::Identity::from_pem(read("certificate", cert)?, read("key", key)?);
    let tls = tonic::transport::ServerTlsConfig::new().identity(identity);
    // Building a server parses the PEM now, so a bad file fails start-up, not the first call.
    tonic::transport::Server::builder().tls_config(tls.clone()).map_err(|e| ApiError::Tls {
        cert: cert.clone(),
        key: key.clone(),
        message: error_chain(&e),
    })?;
    Ok(Some(tls))
}

/// The gRPC service of one node.
pub struct Api {
    auth: Authenticator,
    tls: Option<tonic::transport::ServerTlsConfig>,
    scheduler: Scheduler,
    registry: Arc<Registry>,
    store: Arc<dyn StateStore>,
    log: Arc<dyn CommitLog>,
    cfg: ApiConfig,
    max_component_bytes: usize,
    data_dir: String,
    started: Instant,
    guest_logs: Arc<GuestLogs>,
    /// The address the listener bound (known once serving).
    bound: Option<SocketAddr>,
    /// Becomes true when the node shuts down: ends `StreamLogs --follow`
    /// streams, which would otherwise hold the graceful shutdown open.
    stopping: tokio::sync::watch::Sender<bool>,
    /// Node-to-node traffic, served on the same port (taken when serving).
    cluster: Option<cluster::ClusterService>,
    /// This member's view of every member, for Status and Drain.
    cluster_view: Arc<ClusterView>,
    /// Started with peers (founders or a cluster to join), so node-to-node
    /// traffic crosses the network from the start. A node started alone has
    /// none until one joins it, and that join is what it warns about.
    has_peers: bool,
}

impl Api {
    /// `cfg` holds no tokens by now (the node keeps only `auth`'s digests).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: &ApiConfig,
        auth: Authenticator,
        max_component_bytes: usize,
        data_dir: String,
        scheduler: Scheduler,
        registry: Arc<Registry>,
        store: Arc<dyn StateStore>,
        log: Arc<dyn CommitLog>,
        member: MemberApi<'_>,
    ) -> Result<Self, ApiError> {
        // With `peer_tls` the listener verifies client certificates against
        // the cluster's CA (the configuration requires it to speak TLS then).
        let tls = match (load_tls(cfg)?, member.peer_tls) {
            (Some(tls), Some(peer_tls)) => Some(peer_tls.server(tls)),
            (tls, _) => tls,
        };
        Ok(Self {
            guest_logs: scheduler.guest_logs().clone(),
            auth,
            tls,
            scheduler,
            registry,
            store,
            log,
            cfg: cfg.clone(),
            max_component_bytes,
            data_dir,
            started: Instant::now(),
            bound: None,
            stopping: tokio::sync::watch::channel(false).0,
            cluster: Some(member.service),
            has_peers: member.has_peers,
            cluster_view: Arc::new(member.view),
        })
    }

    /// This node's id in its cluster.
    fn node_id(&self) -> String {
        self.cluster_view.node().to_string()
    }

    /// Serves gRPC (with reflection) and HTTP on `listener` until `shutdown` resolves.
    pub async fn serve(
        mut self,
        listener: impl Into<Listener>,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), ApiError> {
        let listener = listener.into();
        self.bound = match &listener {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Custom(bound, _) => Some(*bound),
        };
        if let Some(bound) = self.bound {
            for warning in exposure_warnings(bound, self.auth.is_open(), self.tls.is_some(), self.has_peers) {
                tracing::warn!("{warning}");
            }
        }
        let max_msg = max_message_bytes(&self.cfg);
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| ApiError::Reflection(e.to_string()))?;
        let mut server = tonic::transport::Server::builder().accept_http1(true);
        if let Some(tls) = self.tls.clone() {
            server = server.tls_config(tls)?;
        }
        let cluster = self.cluster.take();
        let api = Arc::new(self);
        let mut grpc =
            tonic::service::Routes::new(ConfluxServer::from_arc(api.clone()).max_decoding_message_size(max_msg))
                .add_service(reflection);
        if let Some(c) = cluster {
            grpc = grpc.add_service(c.into_server());
        }
        let routes = http::router(api.clone(), grpc.into_axum_router());
        let stopping = api.stopping.clone();
        let shutdown = async move {
            shutdown.await;
            stopping.send_replace(true);
        };
        let router = server.add_routes(tonic::service::Routes::from(routes));
        match listener {
            Listener::Tcp(listener) => {
                // Nagle's algorithm adds ~45% latency to small unary calls (DESIGN.md §5a).
                let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
                router.serve_with_incoming_shutdown(incoming, shutdown).await?
            }
            Listener::Custom(_, incoming) => router.serve_with_incoming_shutdown(incoming, shutdown).await?,
        }
        Ok(())
    }
}

/// What makes the API a member's: the node-to-node service it serves on the
/// same port, its view of the cluster, mutual TLS between members if
/// configured, and whether it was started with peers.
pub struct MemberApi<'a> {
    pub service: cluster::ClusterService,
    pub view: ClusterView,
    pub peer_tls: Option<&'a cluster::PeerTls>,
    pub has_peers: bool,
}

/// What the operator should hear about a listener at `bound`: reachable
/// beyond this machine with no token (anyone there can deploy code and call
/// entities), or with tokens but no TLS (they cross the network in clear); a
/// cluster member without TLS (the cluster secret and all data do).
pub fn exposure_warnings(bound: SocketAddr, open: bool, tls: bool, clustered: bool) -> Vec<String> {
    let mut warnings = Vec::new();
    let remote = !bound.ip().to_canonical().is_loopback();
    if remote && open {
        warnings.push(format!(
            "listening on {bound}, beyond loopback, with no api.admin_token or api.invoke_token: anyone who can \
             reach it can deploy code, call entities and read their state"
        ));
    } else if remote && !tls {
        warnings.push(format!(
            "listening on {bound}, beyond loopback, without TLS: bearer tokens cross the network in clear \
             (set api.tls_cert_path and api.tls_key_path)"
        ));
    }
    if clustered && !tls {
        warnings.push(
            "this cluster member talks to its peers without TLS: the cluster secret, Raft traffic and entity \
             state cross the network in clear (set cluster.tls_ca_path and api.tls_*)"
                .to_owned(),
        );
    }
    warnings
}

/// Where the API accepts connections.
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    /// A custom network's connections, and the address they arrive at.
    Custom(std::net::SocketAddr, net::Incoming),
}

impl From<tokio::net::TcpListener> for Listener {
    fn from(l: tokio::net::TcpListener) -> Self {
        Self::Tcp(l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposure_is_warned_about_beyond_loopback_and_between_members_in_clear() {
        let at = |a: &str| a.parse::<SocketAddr>().unwrap();
        assert!(exposure_warnings(at("127.0.0.1:7070"), true, false, false).is_empty());
        assert!(exposure_warnings(at("[::1]:7070"), true, false, false).is_empty());
        // An IPv4-mapped loopback address is loopback too.
        assert!(exposure_warnings(at("[::ffff:127.0.0.1]:7070"), true, false, false).is_empty());
        let open = exposure_warnings(at("0.0.0.0:7070"), true, false, false);
        assert!(open.len() == 1 && open[0].contains("no api.admin_token"), "{open:?}");
        assert!(exposure_warnings(at("[::]:7070"), true, true, false)[0].contains("no api.admin_token"));
        let clear = exposure_warnings(at("10.0.0.5:7070"), false, false, false);
        assert!(clear.len() == 1 && clear[0].contains("without TLS"), "{clear:?}");
        assert!(exposure_warnings(at("10.0.0.5:7070"), false, true, false).is_empty());
        let member = exposure_warnings(at("127.0.0.1:7070"), false, false, true);
        assert!(member.len() == 1 && member[0].contains("cluster.tls_ca_path"), "{member:?}");
        assert!(exposure_warnings(at("10.0.0.5:7070"), false, true, true).is_empty());
    }

    #[test]
    fn transport_refusals_join_the_error_contract() {
        let cfg = ApiConfig::default();
        let kind = |s: &Status| s.metadata().get(ERROR_KIND_HEADER).unwrap().to_str().unwrap().to_owned();
        let tonic_says = Status::out_of_range("Error, decoded message length too large: found 5000010 bytes");
        let s = transport_status("Invoke", &tonic_says, &cfg);
        assert_eq!((s.code(), kind(&s).as_str()), (Code::InvalidArgument, "payload-too-large"));
        assert!(s.message().contains("1114112") && s.message().contains("5000010"), "{}", s.message());
        let s = transport_status("Deploy", &tonic_says, &cfg);
        assert_eq!((s.code(), kind(&s).as_str()), (Code::InvalidArgument, "message-too-large"));
        let s = transport_status("Nope", &Status::unimplemented(""), &cfg);
        assert_eq!((s.code(), kind(&s).as_str()), (Code::Unimplemented, "unimplemented"));
        let s = transport_status("Invoke", &Status::internal("Missing request message."), &cfg);
        assert_eq!((s.code(), kind(&s).as_str()), (Code::Internal, "transport"));
        // The decoding limit follows the payload limit.
        let small = ApiConfig { max_payload_bytes: 1000, ..ApiConfig::default() };
        assert_eq!(max_message_bytes(&small), DEPLOY_CHUNK_BYTES + MESSAGE_HEADROOM_BYTES);
        let large = ApiConfig { max_payload_bytes: 8 << 20, ..ApiConfig::default() };
        assert_eq!(max_message_bytes(&large), (8 << 20) + MESSAGE_HEADROOM_BYTES);
    }
}
