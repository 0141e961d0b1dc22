//! Node-to-node gRPC, as mapping only: the `Cluster` service's protobuf
//! (`host/proto/conflux/cluster/v1/cluster.proto`) ↔ the cluster layer's
//! domain calls. [`server::ClusterService`] serves
//! [`crate::cluster::service::ClusterNode`] (what a member does when called);
//! [`client::GrpcTransport`] implements the cluster's port,
//! [`crate::cluster::wire::Wire`], over pooled tonic channels. Both sides
//! authenticate with the cluster's shared secret ([`ClusterSecret`]): a
//! process without it can neither send Raft traffic to a node nor get answers
//! from one. With mutual TLS ([`PeerTls`]) members also talk TLS to each
//! other, each presenting its certificate, and a cluster call must come with
//! a client certificate the cluster's CA signed.

use crate::cluster::raft::NodeId;
use crate::cluster::shards::ShardStatus;
use crate::cluster::wire::{Refusal, WireError};
use crate::model::{AskFailure, EntityRef, MessageKind, RefusalKind};
use crate::scheduler::{ErrorKind, Invocation, InvokeError};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};
use tonic::{Code, Request, Status};

mod client;
mod raft_batch;
mod server;
#[cfg(test)]
mod tests;

pub use client::GrpcTransport;
pub use server::ClusterService;

pub mod pb {
    tonic::include_proto!("conflux.cluster.v1");
}

/// Metadata entry that carries the cluster secret on every node-to-node call.
pub const SECRET_HEADER: &str = "conflux-cluster-secret";
/// Shortest accepted secret: a guessable secret would let anyone join.
pub const MIN_SECRET_BYTES: usize = 16;
/// Largest Raft message a node accepts (a snapshot chunk or a batch of
/// entries; openraft chunks snapshots well below this).
const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// Most Raft messages one `RaftBatch` call carries: bounds the work one call
/// starts on the receiver.
const MAX_RAFT_BATCH_MESSAGES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum ClusterApiError {
    #[error("the cluster secret must be at least {MIN_SECRET_BYTES} bytes")]
    SecretTooShort,
    #[error("the cluster secret must be visible ASCII (it travels as gRPC metadata)")]
    SecretNotAscii,
    #[error("cannot read the {what} {path:?} for mutual TLS between members: {source}")]
    TlsFile { what: &'static str, path: std::path::PathBuf, source: std::io::Error },
    #[error("the mutual TLS settings between members are unusable: {0}")]
    Tls(String),
}

/// What a cluster call must carry: the shared secret (kept as a digest so
/// comparing takes constant time) and, under mutual TLS, a client
/// certificate the TLS layer verified against the cluster's CA.
#[derive(Clone)]
pub struct ClusterSecret {
    raw: tonic::metadata::AsciiMetadataValue,
    digest: [u8; 32],
    certificate_required: bool,
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

impl ClusterSecret {
    pub fn new(secret: &str) -> Result<Self, ClusterApiError> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(ClusterApiError::SecretTooShort);
        }
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ClusterApiError::SecretNotAscii);
        }
        let raw = secret.parse().map_err(|_| ClusterApiError::SecretNotAscii)?;
        Ok(Self { raw, digest: Sha256::digest(secret.as_bytes()).into(), certificate_required: false })
    }

    /// Also requires a verified client certificate on every call (mutual TLS
    /// between members: the listener verifies any certificate a client
    /// presents against the cluster's CA, but lets API clients in without one).
    pub fn requiring_client_certificate(mut self, required: bool) -> Self {
        self.certificate_required = required;
        self
    }

    /// Lets a call through only if it carries the secret (and, under mutual
    /// TLS, came with a verified client certificate).
    fn admit<T>(&self, req: &Request<T>) -> Result<(), Status> {
        if self.certificate_required && req.peer_certs().is_none_or(|certs| certs.is_empty()) {
            return Err(Status::unauthenticated(
                "cluster calls need a client certificate signed by the cluster's CA (cluster.tls_ca_path)",
            ));
        }
        if self.admits(req) { Ok(()) } else { Err(Status::unauthenticated("missing or wrong cluster secret")) }
    }

    fn admits<T>(&self, req: &Request<T>) -> bool {
        let Some(presented) = req.metadata().get(SECRET_HEADER).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let presented: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        bool::from(presented.ct_eq(&self.digest))
    }
}

/// Mutual TLS between members: the CA that signs every member's certificate,
/// and this member's own certificate and key (its API listener's).
#[derive(Clone)]
pub struct PeerTls {
    ca: Certificate,
    identity: Identity,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerTls(..)")
    }
}

impl PeerTls {
    /// Reads the PEM files and checks rustls accepts them, so a bad file
    /// fails start-up rather than the first call to a peer.
    pub fn load(ca: &std::path::Path, cert: &std::path::Path, key: &std::path::Path) -> Result<Self, ClusterApiError> {
        let read = |what, path: &std::path::Path| {
            std::fs::read(path).map_err(|source| ClusterApiError::TlsFile { what, path: path.to_owned(), source })
        };
        let tls = Self {
            ca: Certificate::from_pem(read("CA certificate", ca)?),
            identity: Identity::from_pem(read("certificate", cert)?, read("key", key)?),
        };
        let unusable = |e: tonic::transport::Error| ClusterApiError::Tls(crate::api::error_chain(&e));
        Endpoint::from_static("https://127.0.0.1").tls_config(tls.client()).map_err(unusable)?;
        tonic::transport::Server::builder().tls_config(tls.server(ServerTlsConfig::new())).map_err(unusable)?;
        Ok(tls)
    }

    /// How this member dials its peers: it trusts only the cluster's CA and
    /// presents its own certificate.
    fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new().ca_certificate(self.ca.clone()).identity(self.identity.clone())
    }

    /// The listener's TLS, verifying any client certificate against the
    /// cluster's CA. Optional at the handshake, so API clients need none;
    /// cluster calls without one are refused ([`ClusterSecret::admit`]).
    pub fn server(&self, tls: ServerTlsConfig) -> ServerTlsConfig {
        tls.identity(self.identity.clone()).client_ca_root(self.ca.clone()).client_auth_optional(true)
    }
}

fn report_to_pb(s: ShardStatus) -> pb::ShardReport {
    pb::ShardReport {
        shard: s.shard,
        replicas: s.replicas,
        leader: s.leader,
        term: s.term,
        applied_index: s.applied_index,
        lag: s.lag.into_iter().collect(),
        learners: s.learners,
        membership_index: s.membership_index,
    }
}

fn report_from_pb(node: NodeId, r: pb::ShardReport) -> ShardStatus {
    ShardStatus {
        shard: r.shard,
        node,
        replicas: r.replicas,
        leader: r.leader,
        term: r.term,
        applied_index: r.applied_index,
        lag: r.lag.into_iter().collect(),
        learners: r.learners,
        membership_index: r.membership_index,
    }
}

fn entity(ty: String, id: String) -> Result<EntityRef, Status> {
    EntityRef::new(ty, id).map_err(|e| Status::invalid_argument(e.to_string()))
}

fn invocation_from_pb(p: pb::ForwardedInvocation) -> Result<Invocation, Status> {
    let caller = match (p.caller_type, p.caller_id) {
        (Some(ty), Some(id)) => Some(entity(ty, id)?),
        (None, None) => None,
        _ => return Err(Status::invalid_argument("a caller needs both a type and an id")),
    };
    Ok(Invocation {
        entity: entity(p.entity_type, p.id)?,
        operation: p.operation,
        payload: p.payload,
        caller,
        idempotency_key: p.idempotency_key,
        message_seq: p.message_seq,
        kind: kind_from_pb(p.ask, p.reply)?,
    })
}

fn kind_from_pb(ask: bool, reply: Option<pb::AskReply>) -> Result<MessageKind, Status> {
    use pb::ask_reply::Outcome;
    let refused = |kind, message| Err(AskFailure::Refused { kind, message });
    Ok(match (ask, reply) {
        (false, None) => MessageKind::Send,
        (true, None) => MessageKind::Ask,
        (false, Some(r)) => {
            let outcome = match r.outcome {
                Some(Outcome::Value(v)) => Ok(v),
                Some(Outcome::RefusedBadRequest(m)) => refused(RefusalKind::BadRequest, m),
                Some(Outcome::RefusedUnknownOperation(m)) => refused(RefusalKind::UnknownOperation, m),
                Some(Outcome::RefusedFailed(m)) => refused(RefusalKind::Failed, m),
                Some(Outcome::TimedOut(_)) => Err(AskFailure::TimedOut),
                Some(Outcome::Undeliverable(m)) => Err(AskFailure::Undeliverable(m)),
                None => return Err(Status::invalid_argument("a reply needs an outcome")),
            };
            MessageKind::Reply { ask_seq: r.ask_seq, outcome }
        }
        (true, Some(_)) => return Err(Status::invalid_argument("an invocation is an ask or a reply, not both")),
    })
}

fn kind_to_pb(kind: MessageKind) -> (bool, Option<pb::AskReply>) {
    use pb::ask_reply::Outcome;
    match kind {
        MessageKind::Send => (false, None),
        MessageKind::Ask => (true, None),
        MessageKind::Reply { ask_seq, outcome } => {
            let outcome = match outcome {
                Ok(v) => Outcome::Value(v),
                Err(AskFailure::Refused { kind: RefusalKind::BadRequest, message }) => {
                    Outcome::RefusedBadRequest(message)
                }
                Err(AskFailure::Refused { kind: RefusalKind::UnknownOperation, message }) => {
                    Outcome::RefusedUnknownOperation(message)
                }
                Err(AskFailure::Refused { kind: RefusalKind::Failed, message }) => Outcome::RefusedFailed(message),
                Err(AskFailure::TimedOut) => Outcome::TimedOut(true),
                Err(AskFailure::Undeliverable(m)) => Outcome::Undeliverable(m),
            };
            (false, Some(pb::AskReply { ask_seq, outcome: Some(outcome) }))
        }
    }
}

fn invocation_to_pb(inv: Invocation) -> pb::ForwardedInvocation {
    let (caller_type, caller_id) = match inv.caller {
        Some(c) => (Some(c.entity_type), Some(c.id)),
        None => (None, None),
    };
    let (ask, reply) = kind_to_pb(inv.kind);
    pb::ForwardedInvocation {
        ask,
        reply,
        entity_type: inv.entity.entity_type,
        id: inv.entity.id,
        operation: inv.operation,
        payload: inv.payload,
        caller_type,
        caller_id,
        idempotency_key: inv.idempotency_key,
        message_seq: inv.message_seq,
    }
}

fn failure_of(e: InvokeError) -> pb::Failure {
    let leader = match &e {
        InvokeError::NotHere { leader } => *leader,
        _ => None,
    };
    let (kind, code) = (e.kind(), e.grpc_code());
    pb::Failure {
        kind: kind.as_str().to_owned(),
        code: code as i32,
        message: super::invoke_message(e),
        leader,
        index: None,
    }
}

fn invoke_error_of(node: NodeId, f: pb::Failure) -> InvokeError {
    let kind = ErrorKind::parse(&f.kind);
    if kind == Some(ErrorKind::NotLeader) {
        return InvokeError::NotHere { leader: f.leader };
    }
    let message = if kind.is_none() {
        format!("node {node} failed with an unknown kind {:?}: {}", f.kind, f.message)
    } else {
        f.message
    };
    InvokeError::Remote { kind: kind.unwrap_or(ErrorKind::Internal), code: f.code, message }
}

/// A member's refusal as the status it answers with.
fn refusal_status(r: Refusal) -> Status {
    match r {
        Refusal::Unavailable(m) => Status::unavailable(m),
        Refusal::Invalid(m) => Status::invalid_argument(m),
        Refusal::Rejected(m) => Status::failed_precondition(m),
        Refusal::NotFound(m) => Status::not_found(m),
        Refusal::Internal(m) => Status::internal(m),
    }
}

/// A failed call's status as the cluster layer sees it.
fn wire_error(node: NodeId, s: &Status) -> WireError {
    let reason = || format!("{}: {}", s.code(), s.message());
    let refused = |refusal| WireError::Refused { node, refusal };
    match s.code() {
        Code::Unauthenticated => WireError::Unauthenticated { node, reason: reason() },
        Code::Unavailable if never_sent(s) => WireError::Unreachable { node, reason: reason() },
        _ if !answered(s) => WireError::Unavailable { node, reason: reason() },
        Code::InvalidArgument => refused(Refusal::Invalid(s.message().to_owned())),
        Code::FailedPrecondition => refused(Refusal::Rejected(s.message().to_owned())),
        Code::NotFound => refused(Refusal::NotFound(s.message().to_owned())),
        _ => refused(Refusal::Internal(reason())),
    }
}

/// Whether a failed call's status came from the peer (not from a timeout or
/// a broken connection on the way).
fn answered(status: &Status) -> bool {
    !matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded)
}

/// Whether a failed call certainly never reached the peer's handler.
fn never_sent(status: &Status) -> bool {
    match status.code() {
        Code::Unauthenticated => true,
        Code::Unavailable => {
            let m = status.message().to_ascii_lowercase();
            m.contains("connect") || m.contains("refused") || m.contains("dns")
        }
        _ => false,
    }
}
