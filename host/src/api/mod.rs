//! The client API: gRPC (tonic) and, on the same port, the HTTP/JSON gateway,
//! `/metrics` and the dashboard ([`http`]). The only module that knows
//! protobuf. Maps requests to scheduler and registry calls and their errors to
//! meaningful status codes. Every error carries a machine-readable
//! `conflux-error-kind`. Each call first passes [`auth`] (bearer tokens, when
//! configured); the listener optionally speaks TLS (rustls).

pub mod auth;
pub mod browser;
pub mod cluster;

pub mod codec;
pub mod http;
pub mod net;

/// The messages of `conflux.v1` (conflux-client's, with their client stubs)
/// and the `Conflux` server generated here against them.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    pub use ::conflux_client::pb::*;
    tonic::include_proto!("conflux.v1");
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("conflux_descriptor");
}

use crate::cluster::view::{ClusterView, DrainError};
use crate::config::ApiConfig;
use crate::log::CommitLog;
use crate::model::{EntityRef, Keyspace, entity_prefix};
use crate::registry::{Registry, RegistryError};
use crate::runtime::{GuestLogLine, GuestLogs, TurnError};
use crate::scheduler::{ErrorKind, Invocation, InvokeError, Scheduler};
use crate::storage::StateStore;
use auth::{Authenticator, Rpc};
use futures::StreamExt;
use pb::conflux_server::{Conflux, ConfluxServer};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;
use tonic::{Code, Request, Response, Status, Streaming};

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

/// Entities a dry run samples when the request does not say.
const DRY_RUN_SAMPLE_DEFAULT: usize = 100;

/// Default and maximum page size of GetState.
const STATE_PAGE_DEFAULT: u32 = 1000;
const STATE_PAGE_MAX: u32 = 10_000;

/// Default and maximum page size of ListEntities.
const ENTITY_PAGE_DEFAULT: u32 = 100;
const ENTITY_PAGE_MAX: u32 = 10_000;

/// Default and maximum number of recent lines StreamLogs sends first.
const LOG_TAIL_DEFAULT: u32 = 100;
const LOG_TAIL_MAX: u32 = 10_000;

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

/// A requested page size: 0 asks for `default`; more than `max` gets `max`.
fn page_size(requested: u32, default: u32, max: u32) -> usize {
    let n = if requested == 0 { default } else { requested.min(max) };
    n as usize
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

fn entity_ref(r: Option<pb::EntityRef>) -> Result<EntityRef, Status> {
    let r = r.ok_or_else(|| status(ErrorKind::BadEntity, "field `entity` is required"))?;
    EntityRef::new(r.entity_type, r.id).map_err(|e| status(ErrorKind::BadEntity, format!("field `entity`: {e}")))
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

/// One guest line on the wire.
fn log_line(l: &GuestLogLine, dropped: u64) -> pb::LogLine {
    let (entity_type, id) = l.entity.split_once('/').unwrap_or((&l.entity, ""));
    pb::LogLine {
        at_ms: l.at_ms,
        entity: Some(pb::EntityRef { entity_type: entity_type.to_owned(), id: id.to_owned() }),
        invocation_id: l.invocation_id.to_string(),
        stream: l.stream.to_owned(),
        line: l.line.clone(),
        dropped,
    }
}

fn canary_info(c: crate::registry::CanaryRecord) -> pb::CanaryInfo {
    pb::CanaryInfo { version: c.version, ids: c.ids }
}

impl Api {
    /// Rollback and promote: the same registry change, named differently for the user.
    async fn activate(&self, req: pb::ActivateRequest) -> Result<Response<pb::ActivateResponse>, Status> {
        if req.version == 0 {
            return Err(status(ErrorKind::BadVersion, "field `version` is required (versions start at 1)"));
        }
        let o = self.registry.activate(&req.entity_type, req.version).await.map_err(registry_status)?;
        Ok(Response::new(pb::ActivateResponse {
            entity_type: req.entity_type,
            active_version: o.active,
            previous_active_version: o.previous_active,
            unchanged: o.unchanged,
            ended_canary: o.ended_canary.map(canary_info),
        }))
    }
}

#[tonic::async_trait]
impl Conflux for Api {
    type StreamLogsStream = Pin<Box<dyn futures::Stream<Item = Result<pb::LogLine, Status>> + Send>>;

    async fn list_entities(
        &self,
        request: Request<pb::ListEntitiesRequest>,
    ) -> Result<Response<pb::ListEntitiesResponse>, Status> {
        authorize(&self.auth, Rpc::ListEntities, &request)?;
        let req = request.into_inner();
        self.registry.active(&req.entity_type).map_err(registry_status)?;
        let limit = page_size(req.limit, ENTITY_PAGE_DEFAULT, ENTITY_PAGE_MAX);
        let store = self.store.clone();
        let start_after = (!req.start_after.is_empty()).then_some(req.start_after);
        let mut ids = crate::determinism::blocking(move || {
            crate::storage::entity_ids(store.as_ref(), &req.entity_type, &req.prefix, start_after.as_deref(), limit + 1)
        })
        .await
        .map_err(|e| status(ErrorKind::Internal, e.to_string()))?
        .map_err(storage_status)?;
        let next_start_after = if ids.len() > limit {
            ids.truncate(limit);
            ids.last().cloned().unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListEntitiesResponse { ids, next_start_after }))
    }

    async fn stream_logs(
        &self,
        request: Request<pb::StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        authorize(&self.auth, Rpc::StreamLogs, &request)?;
        let req = request.into_inner();
        if !req.id.is_empty() && req.entity_type.is_empty() {
            return Err(status(ErrorKind::BadEntity, "field `id` needs field `entity_type`"));
        }
        let wanted: Arc<str> = match (req.entity_type.is_empty(), req.id.is_empty()) {
            (true, _) => "".into(),
            (false, true) => format!("{}/", req.entity_type).into(),
            (false, false) => format!("{}/{}", req.entity_type, req.id).into(),
        };
        let whole_entity = !req.id.is_empty();
        let keep = move |l: &GuestLogLine| {
            if whole_entity { *l.entity == *wanted } else { l.entity.starts_with(&*wanted) }
        };
        let tail = page_size(req.tail, LOG_TAIL_DEFAULT, LOG_TAIL_MAX);
        let (recent, live) = self.guest_logs.tail_and_follow(tail, &keep);
        let head = futures::stream::iter(recent.into_iter().map(|l| Ok(log_line(&l, 0))).collect::<Vec<_>>());
        if !req.follow {
            return Ok(Response::new(Box::pin(head)));
        }
        let stopping = self.stopping.subscribe();
        let follow = futures::stream::unfold((live, stopping, 0u64), move |(mut live, mut stopping, mut dropped)| {
            let keep = keep.clone();
            async move {
                loop {
                    use tokio::sync::broadcast::error::RecvError;
                    let next = tokio::select! {
                        next = live.recv() => next,
                        _ = stopping.wait_for(|s| *s) => return None,
                    };
                    match next {
                        Ok(l) if keep(&l) => return Some((Ok(log_line(&l, dropped)), (live, stopping, 0))),
                        Ok(_) => {}
                        Err(RecvError::Lagged(n)) => dropped += n,
                        Err(RecvError::Closed) => return None,
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(head.chain(follow))))
    }

    async fn deploy(
        &self,
        request: Request<Streaming<pb::DeployRequest>>,
    ) -> Result<Response<pb::DeployResponse>, Status> {
        authorize(&self.auth, Rpc::Deploy, &request)?;
        let mut stream = request.into_inner();
        let header = match stream.next().await {
            Some(Ok(pb::DeployRequest { part: Some(pb::deploy_request::Part::Header(h)) })) => h,
            Some(Err(e)) => return Err(e),
            _ => {
                return Err(status(
                    ErrorKind::BadUpload,
                    "the first Deploy message must be a header naming the entity type",
                ));
            }
        };
        let limit = self.max_component_bytes;
        if header.size_bytes as usize > limit {
            return Err(registry_status(RegistryError::TooLarge { size: header.size_bytes as usize, limit }));
        }
        let mut bytes = Vec::with_capacity(header.size_bytes as usize);
        while let Some(msg) = stream.next().await {
            match msg?.part {
                Some(pb::deploy_request::Part::Chunk(c)) => {
                    if bytes.len() + c.len() > limit {
                        return Err(registry_status(RegistryError::TooLarge { size: bytes.len() + c.len(), limit }));
                    }
                    bytes.extend_from_slice(&c);
                }
                _ => {
                    return Err(status(ErrorKind::BadUpload, "only the first Deploy message may be a header"));
                }
            }
        }
        if header.size_bytes != 0 && bytes.len() as u64 != header.size_bytes {
            return Err(status(
                ErrorKind::TruncatedUpload,
                format!("upload truncated: received {} of {} bytes", bytes.len(), header.size_bytes),
            ));
        }
        if header.dry_run {
            if !header.canary_ids.is_empty() {
                return Err(status(ErrorKind::BadUpload, "a dry run cannot also be a canary"));
            }
            let candidate =
                self.registry.compile_candidate(&header.entity_type, bytes).await.map_err(registry_status)?;
            let sample = match header.dry_run_sample {
                0 => DRY_RUN_SAMPLE_DEFAULT,
                n => n as usize,
            };
            let version = candidate.version;
            let r = self.scheduler.dry_run_migration(candidate.loaded, sample).await.map_err(invoke_status)?;
            let previous = self.registry.get(&header.entity_type).map(|t| t.active).unwrap_or(0);
            return Ok(Response::new(pb::DeployResponse {
                entity_type: header.entity_type,
                version,
                digest: candidate.digest,
                unchanged: false,
                reused: false,
                previous_active_version: previous,
                canary_ids: vec![],
                dry_run: Some(pb::DryRunReport {
                    sampled: r.sampled,
                    migrated: r.migrated,
                    failed: r.failed,
                    up_to_date: r.up_to_date,
                    failures: r
                        .failures
                        .into_iter()
                        .map(|(id, from_version, error)| pb::DryRunFailure { id, from_version, error })
                        .collect(),
                    has_migration: r.has_migration,
                }),
            }));
        }
        let canary = (!header.canary_ids.is_empty()).then_some(header.canary_ids);
        let outcome = self.registry.deploy(&header.entity_type, bytes, canary).await.map_err(registry_status)?;
        Ok(Response::new(pb::DeployResponse {
            entity_type: header.entity_type,
            version: outcome.version,
            digest: outcome.digest,
            unchanged: outcome.unchanged,
            reused: outcome.reused,
            previous_active_version: outcome.previous_active.unwrap_or(0),
            canary_ids: outcome.canary.unwrap_or_default(),
            dry_run: None,
        }))
    }

    async fn rollback(&self, request: Request<pb::ActivateRequest>) -> Result<Response<pb::ActivateResponse>, Status> {
        authorize(&self.auth, Rpc::Rollback, &request)?;
        self.activate(request.into_inner()).await
    }

    async fn promote(&self, request: Request<pb::ActivateRequest>) -> Result<Response<pb::ActivateResponse>, Status> {
        authorize(&self.auth, Rpc::Promote, &request)?;
        self.activate(request.into_inner()).await
    }

    async fn invoke(&self, request: Request<pb::InvokeRequest>) -> Result<Response<pb::InvokeResponse>, Status> {
        authorize(&self.auth, Rpc::Invoke, &request)?;
        let req = request.into_inner();
        let entity = entity_ref(req.entity)?;
        if req.payload.len() > self.cfg.max_payload_bytes {
            return Err(status(
                ErrorKind::PayloadTooLarge,
                format!("field `payload` is {} bytes; the limit is {}", req.payload.len(), self.cfg.max_payload_bytes),
            ));
        }
        let idempotency_key = (!req.idempotency_key.is_empty()).then_some(req.idempotency_key);
        let inv = Invocation {
            entity,
            operation: req.operation,
            payload: req.payload,
            caller: None,
            idempotency_key,
            message_seq: None,
        };
        let reply = self.scheduler.invoke(inv).await.map_err(invoke_status)?;
        Ok(Response::new(pb::InvokeResponse { reply }))
    }

    async fn list_types(
        &self,
        request: Request<pb::ListTypesRequest>,
    ) -> Result<Response<pb::ListTypesResponse>, Status> {
        authorize(&self.auth, Rpc::ListTypes, &request)?;
        let types = self
            .registry
            .list()
            .into_iter()
            .map(|t| pb::TypeInfo {
                canary: t.canary.map(canary_info),
                name: t.name,
                active_version: t.active,
                versions: t
                    .versions
                    .into_iter()
                    .map(|v| pb::VersionInfo {
                        version: v.version,
                        digest: v.digest,
                        size_bytes: v.size_bytes,
                        deployed_at_ms: v.deployed_at_ms,
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::ListTypesResponse { types }))
    }

    async fn status(&self, request: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        authorize(&self.auth, Rpc::Status, &request)?;
        let s = self.scheduler.stats();
        let l = self.log.stats();
        let me = self.node_id();
        let g = self.cluster_view.gather().await;
        let name = |n: u64| n.to_string();
        let nodes = g
            .nodes
            .into_iter()
            .map(|n| pb::NodeInfo {
                node_id: name(n.node),
                address: n.address,
                state: n.state.to_owned(),
                shards_led: n.shards_led,
                replicas: n.replicas,
            })
            .collect();
        let shards = g
            .shards
            .into_iter()
            .map(|s| pb::ShardInfo {
                shard_id: s.shard,
                replicas: s.replicas.into_iter().map(name).collect(),
                leader: s.leader.map(name).unwrap_or_default(),
                replication_lag: s.lag,
            })
            .collect();
        let moves = g.moves;
        Ok(Response::new(pb::StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            entity_types: self.registry.list().len() as u32,
            active_entities: s.active_entities as u64,
            resident_instances: s.resident_instances as u64,
            inflight_invocations: s.inflight_invocations as u64,
            turns_ok: s.turns_ok,
            turns_failed: s.turns_failed,
            applied_index: self.log.applied_index(),
            durable_index: self.log.last_durable_index(),
            log_sync_batches: l.sync_batches,
            data_dir: self.data_dir.clone(),
            outbox_messages: s.outbox_messages,
            messages_delivered: s.messages_delivered,
            dead_letters: s.dead_letters,
            nodes,
            shards,
            node_id: me,
            moves,
            guest_memory_bytes: s.guest_memory_bytes as u64,
            guest_memory_limit_bytes: s.guest_memory_limit_bytes as u64,
        }))
    }

    async fn drain(&self, request: Request<pb::DrainRequest>) -> Result<Response<pb::DrainResponse>, Status> {
        authorize(&self.auth, Rpc::Drain, &request)?;
        let raw = request.into_inner().node_id;
        let node: u64 =
            raw.parse().map_err(|_| status(ErrorKind::BadNode, format!("field `node_id` {raw:?} is not a node id")))?;
        let replicas = self.cluster_view.drain(node).await.map_err(|e| {
            let kind = match &e {
                DrainError::NoSuchNode { .. } => ErrorKind::NoSuchNode,
                DrainError::LastNode => ErrorKind::LastNode,
                DrainError::NotCommitted(_) => ErrorKind::NotCommitted,
            };
            status(kind, e.to_string())
        })?;
        Ok(Response::new(pb::DrainResponse { replicas }))
    }

    async fn list_dead_letters(
        &self,
        request: Request<pb::ListDeadLettersRequest>,
    ) -> Result<Response<pb::ListDeadLettersResponse>, Status> {
        authorize(&self.auth, Rpc::ListDeadLetters, &request)?;
        let req = request.into_inner();
        let limit = page_size(req.limit, 100, 1000);
        let start = if req.start_after.is_empty() {
            None
        } else {
            Some(
                hex::decode(&req.start_after)
                    .map_err(|_| status(ErrorKind::BadCursor, "field `start_after` is not a cursor from this RPC"))?,
            )
        };
        let scheduler = self.scheduler.clone();
        let max_bytes = self.cfg.max_page_bytes;
        let (rows, more) =
            crate::determinism::blocking(move || scheduler.dead_letters(start.as_deref(), limit, max_bytes))
                .await
                .map_err(|e| status(ErrorKind::Internal, e.to_string()))?
                .map_err(invoke_status)?;
        let next_start_after = match rows.last() {
            Some((key, _)) if more => hex::encode(key),
            _ => String::new(),
        };
        let wire = |r: &EntityRef| pb::EntityRef { entity_type: r.entity_type.clone(), id: r.id.clone() };
        let dead_letters = rows
            .into_iter()
            .map(|(_, d)| pb::DeadLetterInfo {
                sender: Some(wire(&d.message.sender)),
                seq: d.message.seq,
                target: Some(wire(&d.message.target)),
                operation: d.message.operation,
                payload: d.message.payload,
                reason: d.reason,
                attempts: d.attempts,
                at_ms: d.at_ms,
            })
            .collect();
        Ok(Response::new(pb::ListDeadLettersResponse { dead_letters, next_start_after }))
    }

    async fn get_state(&self, request: Request<pb::GetStateRequest>) -> Result<Response<pb::GetStateResponse>, Status> {
        authorize(&self.auth, Rpc::GetState, &request)?;
        let req = request.into_inner();
        let entity = entity_ref(req.entity)?;
        self.registry.active(&entity.entity_type).map_err(registry_status)?;
        let limit = page_size(req.limit, STATE_PAGE_DEFAULT, STATE_PAGE_MAX);
        let prefix = entity_prefix(&entity);
        let plen = prefix.len();
        let start = (!req.start_after.is_empty()).then(|| {
            let mut k = prefix.clone();
            k.extend_from_slice(req.start_after.as_bytes());
            k
        });
        let store = self.store.clone();
        let max_bytes = self.cfg.max_page_bytes;
        let page = crate::determinism::blocking(move || {
            store.scan_page(Keyspace::State, &prefix, start.as_deref(), limit, max_bytes)
        })
        .await
        .map_err(|e| status(ErrorKind::Internal, e.to_string()))?
        .map_err(storage_status)?;
        let entries: Vec<pb::StateEntry> = page
            .entries
            .into_iter()
            .map(|(k, v)| pb::StateEntry { key: String::from_utf8_lossy(&k[plen..]).into_owned(), value: v })
            .collect();
        let next_start_after =
            if page.more { entries.last().map(|e| e.key.clone()).unwrap_or_default() } else { String::new() };
        Ok(Response::new(pb::GetStateResponse { entries, next_start_after }))
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
