//! Node-to-node gRPC: the `Cluster` service that receives Raft messages for
//! this node's shard replicas, invocations forwarded to the shard leaders here
//! and proposals for the groups this node leads; and `GrpcTransport`, the
//! cluster layer's `Transport` and `Peers` over pooled tonic channels. Both sides authenticate with the
//! cluster's shared secret: a process without it can neither send Raft
//! traffic to a node nor get answers from one. With mutual TLS ([`PeerTls`])
//! members also talk TLS to each other, each presenting its certificate, and
//! a cluster call must come with a client certificate the cluster's CA signed.

use crate::cluster::driver::{Mover, change_replicas};
use crate::cluster::handoff;
use crate::cluster::meta::META_SHARD;
use crate::cluster::raft::{
    DispatchError, NodeId, RaftReply, RaftRpc, ReplicaTable, ShardId, Transport, TransportError,
};
use crate::cluster::shape::{ClusterShape, Health};
use crate::cluster::sharded::{LocalShard, LocalShards, Peers};
use crate::cluster::shards::{ShardSet, ShardStatus, merge_status};
use crate::log::{CommitLog, LogError};
use crate::model::{EntityRef, LogIndex, WriteSet};
use crate::scheduler::{ErrorKind, Invocation, InvokeError, Scheduler};
use futures::future::BoxFuture;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use subtle::ConstantTimeEq;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};
use tonic::{Code, Request, Response, Status};

pub mod pb {
    tonic::include_proto!("conflux.cluster.v1");
}

use pb::cluster_client::ClusterClient;
use pb::cluster_server::{Cluster, ClusterServer};

/// Metadata entry that carries the cluster secret on every node-to-node call.
pub const SECRET_HEADER: &str = "conflux-cluster-secret";
/// Shortest accepted secret: a guessable secret would let anyone join.
pub const MIN_SECRET_BYTES: usize = 16;
/// Largest Raft message a node accepts (a snapshot chunk or a batch of
/// entries; openraft chunks snapshots well below this).
const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// The largest component chunk a node sends in one `ReadComponent` reply.
const MAX_COMPONENT_CHUNK_BYTES: usize = 4 << 20;
/// How long connecting to a peer may take before the message fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a forwarded invocation or proposal may take on the leader
/// (queueing, the turn, the commit) before the caller gives up on it.
const FORWARD_CALL_TIMEOUT: Duration = Duration::from_secs(30);

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
    #[error("invalid address {addr:?} for node {node}: {reason}")]
    BadAddress { node: NodeId, addr: String, reason: String },
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

/// What a clustered node's cluster-facing parts share: its replicas, its
/// copy of the cluster's shape, the metadata group and the transport.
#[derive(Clone)]
pub struct Member {
    pub node: NodeId,
    pub transport: Arc<GrpcTransport>,
    pub shape: Arc<ClusterShape>,
    pub shards: Arc<ShardSet>,
    pub local: Arc<LocalShards>,
    /// This node's replica of the metadata group.
    pub meta: LocalShard,
    /// Commits metadata writes through the group's leader, from any member.
    pub meta_log: Arc<dyn CommitLog>,
    pub shard_count: u32,
    pub replication_factor: usize,
    /// How long a new replica may take to catch up before its move fails.
    pub catch_up: Duration,
    /// Set once this node votes in the metadata group and its registry has
    /// loaded what the group holds: only then may it take replicas (and so
    /// lead shards and run their turns).
    pub ready: Arc<std::sync::atomic::AtomicBool>,
}

impl Member {
    /// Each node's report of its replicas (this node's without a call);
    /// `None` for a node that did not answer within [`STATUS_TIMEOUT`].
    pub fn reports(&self, nodes: Vec<NodeId>) -> BoxFuture<'static, BTreeMap<NodeId, Option<Vec<ShardStatus>>>> {
        let asks: Vec<_> = nodes
            .into_iter()
            .map(|node| {
                let local = (node == self.node).then(|| self.shards.status());
                let client = self.transport.client(node);
                let mut req = self.transport.request(pb::ShardsRequest {});
                req.set_timeout(STATUS_TIMEOUT);
                async move {
                    if let Some(local) = local {
                        return (node, Some(local));
                    }
                    let Some(mut client) = client else { return (node, None) };
                    let report = match tokio::time::timeout(STATUS_TIMEOUT, client.shards(req)).await {
                        Ok(Ok(r)) => Some(r.into_inner().shards.into_iter().map(|r| report_from_pb(node, r)).collect()),
                        _ => None,
                    };
                    (node, report)
                }
            })
            .collect();
        Box::pin(async move { futures::future::join_all(asks).await.into_iter().collect() })
    }

    /// Runs `local` here, or `remote` on `node` through its client.
    fn on<T, F, R>(&self, node: NodeId, local: F, remote: R) -> BoxFuture<'static, Result<T, String>>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, String>> + Send + 'static,
        R: FnOnce(ClusterClient<Channel>) -> BoxFuture<'static, Result<T, Status>>,
    {
        if node == self.node {
            return Box::pin(local);
        }
        let Some(client) = self.transport.client(node) else {
            return Box::pin(async move { Err(format!("node {node} has no known address")) });
        };
        let call = remote(client);
        Box::pin(async move { call.await.map_err(|s| format!("node {node}: {}: {}", s.code(), s.message())) })
    }
}

impl Mover for Member {
    fn reports(&self, nodes: Vec<NodeId>) -> BoxFuture<'static, BTreeMap<NodeId, Option<Vec<ShardStatus>>>> {
        Member::reports(self, nodes)
    }

    fn add_replica(&self, node: NodeId, shard: ShardId) -> BoxFuture<'static, Result<(), String>> {
        let here = self.clone();
        let req = self.transport.request(pb::ReplicaRequest { shard, removed_as_of: None });
        self.on(node, async move { here.add_here(shard).await }, |mut c| {
            Box::pin(async move { c.add_replica(req).await.map(drop) })
        })
    }

    fn change_replicas(
        &self,
        leader: NodeId,
        shard: ShardId,
        add: Option<NodeId>,
        remove: Option<NodeId>,
    ) -> BoxFuture<'static, Result<Option<u64>, String>> {
        let here = self.clone();
        let mut req = self.transport.request(pb::ChangeReplicasRequest { shard, add, remove });
        req.set_timeout(self.catch_up + FORWARD_CALL_TIMEOUT);
        self.on(leader, async move { here.change_here(shard, add, remove).await }, |mut c| {
            Box::pin(async move { c.change_replicas(req).await.map(|r| r.into_inner().membership_index) })
        })
    }

    fn hand_off(&self, leader: NodeId, shard: ShardId, to: NodeId) -> BoxFuture<'static, Result<(), String>> {
        let here = self.clone();
        let mut req = self.transport.request(pb::HandOffRequest { shard, to });
        req.set_timeout(HANDOFF_WAIT * 3 + FORWARD_CALL_TIMEOUT);
        self.on(leader, async move { here.hand_off_here(shard, to).await }, |mut c| {
            Box::pin(async move { c.hand_off(req).await.map(drop) })
        })
    }

    fn drop_replica(
        &self,
        node: NodeId,
        shard: ShardId,
        removed_as_of: Option<u64>,
    ) -> BoxFuture<'static, Result<(), String>> {
        let local = self.local.clone();
        let req = self.transport.request(pb::ReplicaRequest { shard, removed_as_of });
        self.on(
            node,
            async move { local.drop_replica(shard, removed_as_of).await.map_err(|e| e.to_string()) },
            |mut c| Box::pin(async move { c.drop_replica(req).await.map(drop) }),
        )
    }
}

impl Member {
    /// This node's replica of `shard`, the metadata group's included.
    fn replica_here(&self, shard: ShardId) -> Result<LocalShard, String> {
        if shard == META_SHARD {
            return Ok(self.meta.clone());
        }
        self.local.replica(shard).ok_or_else(|| format!("node {} has no replica of shard {shard}", self.node))
    }

    async fn hand_off_here(&self, shard: ShardId, to: NodeId) -> Result<(), String> {
        let replica = self.replica_here(shard)?;
        let mut req = self.transport.request(pb::ReplicaRequest { shard, removed_as_of: None });
        // Paused meanwhile: a target that does not answer soon is not taking over.
        req.set_timeout(Duration::from_secs(1));
        let campaign = self.on(to, self.clone().campaign_here(shard), |mut c| {
            Box::pin(async move { c.campaign(req).await.map(drop) })
        });
        handoff::hand_off(&replica, to, HANDOFF_WAIT, campaign).await.map_err(|e| e.to_string())
    }

    async fn campaign_here(self, shard: ShardId) -> Result<(), String> {
        self.replica_here(shard)?.raft.trigger().elect().await.map_err(|e| e.to_string())
    }

    /// Before this node stops: hands every shard it leads (the metadata
    /// group included) to the voter that has most of its log, all at once,
    /// so callers wait for a handoff rather than an election timeout.
    pub async fn hand_off_all(&self) {
        let mut led = self.local.replicas();
        led.push((META_SHARD, self.meta.clone()));
        let handoffs = led.into_iter().filter_map(|(shard, replica)| {
            let m = replica.raft.metrics().borrow().clone();
            if crate::cluster::raft::leader_of(&m) != Some(self.node) {
                return None;
            }
            let voters: Vec<NodeId> =
                m.membership_config.membership().voter_ids().filter(|v| *v != self.node).collect();
            let matched = |v: NodeId| crate::cluster::raft::matched_index(&m, v);
            let to = voters.iter().max_by_key(|v| (matched(**v), std::cmp::Reverse(**v))).copied()?;
            Some(async move {
                match self.hand_off_here(shard, to).await {
                    Ok(()) => tracing::info!(shard, to, "handed the lead off before stopping"),
                    Err(e) => tracing::warn!(shard, to, "handing the lead off before stopping: {e}"),
                }
            })
        });
        futures::future::join_all(handoffs).await;
    }

    async fn add_here(&self, shard: ShardId) -> Result<(), String> {
        if !self.ready.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(format!("node {} has not caught up with the metadata group yet", self.node));
        }
        self.local.add_replica(shard).await.map_err(|e| e.to_string())
    }

    async fn change_here(
        &self,
        shard: ShardId,
        add: Option<NodeId>,
        remove: Option<NodeId>,
    ) -> Result<Option<u64>, String> {
        let replica =
            self.local.replica(shard).ok_or_else(|| format!("node {} has no replica of shard {shard}", self.node))?;
        change_replicas(&replica.raft, &self.shape.get().members, add, remove, self.catch_up).await
    }
}

/// How long a handoff waits for its target to catch up while the shard
/// still serves (the pause that follows is bounded in `handoff`).
const HANDOFF_WAIT: Duration = Duration::from_secs(2);

/// How long a joining node keeps asking to be let in.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Asks the member at `join_addr` to add this node (`node`, reached at
/// `addr`) to the cluster; returns the cluster's shard count and replication
/// factor. Retried while the cluster elects or the member is not up yet.
pub async fn join(
    join_addr: &str,
    secret: &ClusterSecret,
    tls: Option<&PeerTls>,
    network: Option<super::net::SharedNetwork>,
    node: NodeId,
    addr: &str,
) -> Result<(u32, usize), String> {
    let transport = GrpcTransport::new(secret.clone()).with_network(network).with_tls(tls);
    // The member's id is unknown; 0 names no member.
    transport.set_peer(0, join_addr).map_err(|e| e.to_string())?;
    let mut client = transport.client(0).expect("just set");
    let deadline = tokio::time::Instant::now() + JOIN_TIMEOUT;
    loop {
        let req = transport.request(pb::JoinRequest { node, addr: addr.to_owned() });
        let outcome = client.join(req).await;
        match outcome {
            Ok(r) => {
                let r = r.into_inner();
                return Ok((r.shard_count, r.replication_factor as usize));
            }
            // Unknown and Cancelled are what a connection lost mid-call gives
            // (the member asked was stopped): another try may reach it.
            Err(s)
                if matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled)
                    && tokio::time::Instant::now() < deadline =>
            {
                tracing::info!("joining through {join_addr}: {}; retrying", s.message());
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(s) => return Err(format!("joining through {join_addr}: {}: {}", s.code(), s.message())),
        }
    }
}

/// The receiving side: runs Raft messages on this node's replicas, and
/// forwarded invocations, proposals and replica moves when it leads their
/// shard.
#[derive(Clone)]
pub struct ClusterService {
    node: NodeId,
    secret: ClusterSecret,
    replicas: ReplicaTable,
    scheduler: Option<Scheduler>,
    registry: Option<Arc<crate::registry::Registry>>,
    member: Option<Member>,
}

impl std::fmt::Debug for ClusterService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterService").field("node", &self.node).finish_non_exhaustive()
    }
}

impl ClusterService {
    pub fn new(node: NodeId, secret: ClusterSecret, replicas: ReplicaTable) -> Self {
        Self { node, secret, replicas, scheduler: None, registry: None, member: None }
    }

    /// Serves forwarded invocations with `scheduler`, what this node serves
    /// of each type from `registry`, and the rest from `member`.
    pub fn with_node(mut self, scheduler: Scheduler, registry: Arc<crate::registry::Registry>, member: Member) -> Self {
        self.scheduler = Some(scheduler);
        self.registry = Some(registry);
        self.member = Some(member);
        self
    }

    /// The tonic service, to add to a server's routes.
    pub fn into_server(self) -> ClusterServer<Self> {
        ClusterServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    fn member(&self) -> Result<&Member, Status> {
        self.member.as_ref().ok_or_else(|| Status::unavailable("this node is not serving yet"))
    }
}

fn refused(e: impl std::fmt::Display) -> Status {
    Status::failed_precondition(e.to_string())
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn raft(&self, req: Request<pb::RaftMessage>) -> Result<Response<pb::RaftMessageReply>, Status> {
        self.secret.admit(&req)?;
        let msg = req.into_inner();
        match self.replicas.dispatch(self.node, msg.shard, &msg.rpc).await {
            Ok(reply) => Ok(Response::new(pb::RaftMessageReply { reply })),
            Err(e @ DispatchError::NoSuchShard { .. }) => Err(Status::not_found(e.to_string())),
            Err(e @ DispatchError::Decode(_)) => Err(Status::invalid_argument(e.to_string())),
            Err(e @ DispatchError::Encode(_)) => Err(Status::internal(e.to_string())),
        }
    }

    async fn invoke(&self, req: Request<pb::ForwardedInvocation>) -> Result<Response<pb::ForwardedReply>, Status> {
        self.secret.admit(&req)?;
        let Some(scheduler) = &self.scheduler else {
            return Err(Status::unavailable("this node is not serving invocations yet"));
        };
        let inv = invocation_from_pb(req.into_inner())?;
        let outcome = match scheduler.invoke_here(inv).await {
            Ok(reply) => pb::forwarded_reply::Outcome::Reply(reply),
            Err(e) => pb::forwarded_reply::Outcome::Failure(failure_of(e)),
        };
        Ok(Response::new(pb::ForwardedReply { outcome: Some(outcome) }))
    }

    async fn propose(&self, req: Request<pb::ProposeRequest>) -> Result<Response<pb::ProposeReply>, Status> {
        self.secret.admit(&req)?;
        let req = req.into_inner();
        let member = self.member()?;
        let log: Option<Arc<dyn CommitLog>> = if req.shard == META_SHARD {
            Some(member.meta.log.clone())
        } else {
            member.local.replica(req.shard).map(|r| r.log as Arc<dyn CommitLog>)
        };
        let Some(log) = log else {
            return Err(Status::not_found(format!("node {} has no replica of shard {}", self.node, req.shard)));
        };
        let ws: WriteSet =
            postcard::from_bytes(&req.write_set).map_err(|e| Status::invalid_argument(format!("write set: {e}")))?;
        let outcome = match log.propose(ws).await {
            Ok(index) => pb::propose_reply::Outcome::Index(index),
            Err(LogError::NotLeader { leader }) => pb::propose_reply::Outcome::Failure(pb::Failure {
                kind: ErrorKind::NotLeader.as_str().into(),
                code: Code::Unavailable as i32,
                message: format!("node {} does not lead shard {}", self.node, req.shard),
                leader,
                index: None,
            }),
            Err(LogError::Conflict { key, index }) => pb::propose_reply::Outcome::Failure(pb::Failure {
                kind: ErrorKind::Conflict.as_str().into(),
                code: Code::Aborted as i32,
                message: key,
                leader: None,
                index: Some(index),
            }),
            Err(e) => pb::propose_reply::Outcome::Failure(pb::Failure {
                kind: ErrorKind::Commit.as_str().into(),
                code: Code::Unavailable as i32,
                message: e.to_string(),
                leader: None,
                index: None,
            }),
        };
        Ok(Response::new(pb::ProposeReply { outcome: Some(outcome) }))
    }

    async fn shards(&self, req: Request<pb::ShardsRequest>) -> Result<Response<pb::ShardsReply>, Status> {
        self.secret.admit(&req)?;
        let shards = self.member.as_ref().map(|m| m.shards.status()).unwrap_or_default();
        Ok(Response::new(pb::ShardsReply { shards: shards.into_iter().map(report_to_pb).collect() }))
    }

    async fn join(&self, req: Request<pb::JoinRequest>) -> Result<Response<pb::JoinReply>, Status> {
        self.secret.admit(&req)?;
        let member = self.member()?;
        let req = req.into_inner();
        if req.node == 0 {
            return Err(Status::invalid_argument("node ids start at 1"));
        }
        let reply =
            pb::JoinReply { shard_count: member.shard_count, replication_factor: member.replication_factor as u32 };
        if let Some(addr) = member.shape.get().members.get(&req.node) {
            if *addr == req.addr {
                return Ok(Response::new(reply)); // joined before; the reply was lost
            }
            return Err(refused(format!("node id {} is taken by the member at {addr}", req.node)));
        }
        let leader = crate::cluster::raft::leader_of(&member.meta.raft.metrics().borrow());
        match leader {
            Some(l) if l == self.node => {
                member.transport.set_peer(req.node, &req.addr).map_err(|e| Status::invalid_argument(e.to_string()))?;
                member
                    .meta
                    .raft
                    .add_learner(req.node, openraft::BasicNode::new(&req.addr), false)
                    .await
                    .map_err(|e| Status::unavailable(format!("adding node {} to the metadata group: {e}", req.node)))?;
                tracing::info!(node = req.node, addr = %req.addr, "a node joined the cluster");
                if !self.secret.certificate_required {
                    tracing::warn!(
                        "members talk to each other without TLS: the cluster secret, Raft traffic and entity state \
                         cross the network in clear (set cluster.tls_ca_path and api.tls_*)"
                    );
                }
                Ok(Response::new(reply))
            }
            Some(l) => {
                let Some(mut client) = member.transport.client(l) else {
                    return Err(Status::unavailable(format!("the metadata leader {l} has no known address")));
                };
                client.join(member.transport.request(req)).await
            }
            None => Err(Status::unavailable("the metadata group has no leader; retry")),
        }
    }

    async fn add_replica(&self, req: Request<pb::ReplicaRequest>) -> Result<Response<pb::ReplicaReply>, Status> {
        self.secret.admit(&req)?;
        let shard = req.into_inner().shard;
        self.member()?.add_here(shard).await.map_err(Status::unavailable)?;
        Ok(Response::new(pb::ReplicaReply {}))
    }

    async fn change_replicas(
        &self,
        req: Request<pb::ChangeReplicasRequest>,
    ) -> Result<Response<pb::ChangeReplicasReply>, Status> {
        self.secret.admit(&req)?;
        let r = req.into_inner();
        let membership_index = self.member()?.change_here(r.shard, r.add, r.remove).await.map_err(refused)?;
        Ok(Response::new(pb::ChangeReplicasReply { membership_index }))
    }

    async fn drop_replica(&self, req: Request<pb::ReplicaRequest>) -> Result<Response<pb::ReplicaReply>, Status> {
        self.secret.admit(&req)?;
        let req = req.into_inner();
        self.member()?.local.drop_replica(req.shard, req.removed_as_of).await.map_err(refused)?;
        Ok(Response::new(pb::ReplicaReply {}))
    }

    async fn hand_off(&self, req: Request<pb::HandOffRequest>) -> Result<Response<pb::ReplicaReply>, Status> {
        self.secret.admit(&req)?;
        let r = req.into_inner();
        self.member()?.hand_off_here(r.shard, r.to).await.map_err(refused)?;
        Ok(Response::new(pb::ReplicaReply {}))
    }

    async fn campaign(&self, req: Request<pb::ReplicaRequest>) -> Result<Response<pb::ReplicaReply>, Status> {
        self.secret.admit(&req)?;
        let shard = req.into_inner().shard;
        self.member()?.clone().campaign_here(shard).await.map_err(refused)?;
        Ok(Response::new(pb::ReplicaReply {}))
    }

    async fn read_component(
        &self,
        req: Request<pb::ReadComponentRequest>,
    ) -> Result<Response<pb::ReadComponentReply>, Status> {
        self.secret.admit(&req)?;
        let Some(registry) = self.registry.clone() else {
            return Err(Status::unavailable("this node is not serving yet"));
        };
        let req = req.into_inner();
        let max = (req.max_bytes as usize).min(MAX_COMPONENT_CHUNK_BYTES);
        let read =
            crate::determinism::blocking(move || registry.read_component_chunk(&req.digest, req.offset, max)).await;
        match read.map_err(|e| Status::internal(e.to_string()))? {
            Ok(c) => Ok(Response::new(pb::ReadComponentReply { data: c.data, total_bytes: c.total_bytes })),
            Err(e @ crate::registry::RegistryError::MissingComponent { .. }) => Err(Status::not_found(e.to_string())),
            Err(e @ crate::registry::RegistryError::Corrupt { .. }) => Err(Status::invalid_argument(e.to_string())),
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }

    async fn loaded_type(&self, req: Request<pb::LoadedTypeRequest>) -> Result<Response<pb::LoadedTypeReply>, Status> {
        self.secret.admit(&req)?;
        let Some(registry) = &self.registry else {
            return Err(Status::unavailable("this node is not serving yet"));
        };
        let record_json = match registry.get(&req.into_inner().type_name) {
            Ok(record) => serde_json::to_vec(&record).map_err(|e| Status::internal(e.to_string()))?,
            Err(_) => Vec::new(),
        };
        Ok(Response::new(pb::LoadedTypeReply { record_json }))
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

/// How long `conflux status` waits for each member's report.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// The cluster as `conflux status` shows it, gathered from every member.
pub struct ClusterView {
    member: Member,
}

/// What `conflux status` shows of a cluster.
pub struct Gathered {
    pub nodes: Vec<super::pb::NodeInfo>,
    pub shards: Vec<super::pb::ShardInfo>,
    pub moves: Vec<String>,
}

impl ClusterView {
    pub fn new(member: Member) -> Self {
        Self { member }
    }

    pub fn node(&self) -> NodeId {
        self.member.node
    }

    /// What this node's cluster parts share (a drain records through it).
    pub fn member(&self) -> &Member {
        &self.member
    }

    /// Every member's nodes and shards, as the public API reports them.
    pub async fn gather(&self) -> Gathered {
        let shape = self.member.shape.get();
        let reports = self.member.reports(shape.members.keys().copied().collect()).await;
        let (nodes, shards) = merge_status(&reports);
        let name = |n: NodeId| n.to_string();
        let nodes = nodes
            .into_iter()
            .map(|n| {
                let state = match (shape.state(n.node), n.up) {
                    (crate::cluster::placement::NodeState::Draining, _) => "draining",
                    (_, true) => "up",
                    (_, false) => match shape.layout.health.get(&n.node) {
                        Some(Health::Suspect) => "suspect",
                        Some(Health::Down) => "down",
                        _ => "unreachable",
                    },
                };
                super::pb::NodeInfo {
                    node_id: name(n.node),
                    address: shape.members.get(&n.node).cloned().unwrap_or_default(),
                    state: state.to_owned(),
                    shards_led: n.leads,
                    replicas: n.replicas,
                }
            })
            .collect();
        let shards = shards
            .into_iter()
            .map(|s| super::pb::ShardInfo {
                shard_id: s.shard,
                replicas: s.replicas.into_iter().map(name).collect(),
                leader: s.leader.map(name).unwrap_or_default(),
                replication_lag: s.lag,
            })
            .collect();
        Gathered { nodes, shards, moves: shape.layout.moves.iter().map(ToString::to_string).collect() }
    }
}

/// How long a deploy waits for the other members to serve it.
const PROPAGATION_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a deploy asks a member whether it serves the new record yet.
const PROPAGATION_POLL: Duration = Duration::from_millis(50);

/// The other members of a cluster, asked whether they serve a record.
pub struct MemberRegistries {
    node: NodeId,
    transport: Arc<GrpcTransport>,
    shape: Arc<ClusterShape>,
}

impl MemberRegistries {
    pub fn new(node: NodeId, transport: Arc<GrpcTransport>, shape: Arc<ClusterShape>) -> Self {
        Self { node, transport, shape }
    }
}

impl crate::registry::Propagation for MemberRegistries {
    fn await_members(&self, record: &crate::registry::TypeRecord) -> BoxFuture<'static, Result<(), String>> {
        let others: Vec<NodeId> = self.shape.members().into_iter().filter(|n| *n != self.node).collect();
        let waits: Vec<_> = others
            .iter()
            .map(|node| {
                let (node, client, transport) = (*node, self.transport.client(*node), self.transport.clone());
                let want = record.clone();
                async move {
                    let Some(mut client) = client else { return Ok(()) };
                    let deadline = tokio::time::Instant::now() + PROPAGATION_TIMEOUT;
                    loop {
                        let mut r = transport.request(pb::LoadedTypeRequest { type_name: want.name.clone() });
                        r.set_timeout(Duration::from_secs(5));
                        match client.loaded_type(r).await {
                            Ok(reply) => {
                                let served = serde_json::from_slice::<crate::registry::TypeRecord>(
                                    &reply.into_inner().record_json,
                                )
                                .ok();
                                // A later revision includes this change or
                                // a concurrent one that followed it.
                                if served.as_ref().is_some_and(|s| s == &want || s.revision > want.revision) {
                                    return Ok(());
                                }
                            }
                            // Down: it loads the record when it starts.
                            Err(s) if never_sent(&s) => return Ok(()),
                            Err(_) => {}
                        }
                        if tokio::time::Instant::now() >= deadline {
                            return Err(node);
                        }
                        tokio::time::sleep(PROPAGATION_POLL).await;
                    }
                }
            })
            .collect();
        Box::pin(async move {
            let late: Vec<NodeId> =
                futures::future::join_all(waits).await.into_iter().filter_map(Result::err).collect();
            if late.is_empty() {
                Ok(())
            } else {
                Err(format!("nodes {late:?} did not load it within {PROPAGATION_TIMEOUT:?}"))
            }
        })
    }
}

/// The other members, as the registry's source of components it lacks.
pub struct MemberComponents {
    node: NodeId,
    transport: Arc<GrpcTransport>,
    shape: Arc<ClusterShape>,
}

impl MemberComponents {
    pub fn new(node: NodeId, transport: Arc<GrpcTransport>, shape: Arc<ClusterShape>) -> Self {
        Self { node, transport, shape }
    }
}

impl crate::registry::ComponentPeers for MemberComponents {
    /// Starting after this node, so members do not all ask the same one.
    fn members(&self) -> Vec<u64> {
        let members = self.shape.members();
        let (after, before): (Vec<NodeId>, Vec<NodeId>) =
            members.into_iter().filter(|n| *n != self.node).partition(|n| *n > self.node);
        after.into_iter().chain(before).collect()
    }

    fn read_chunk(
        &self,
        node: u64,
        digest: &str,
        offset: u64,
        max_bytes: u32,
    ) -> BoxFuture<'static, Result<crate::registry::ComponentChunk, String>> {
        let client = self.transport.client(node);
        let req = self.transport.request(pb::ReadComponentRequest { digest: digest.to_owned(), offset, max_bytes });
        let book = self.transport.book.clone();
        Box::pin(async move {
            let Some(mut client) = client else { return Err("address unknown".to_owned()) };
            let reply = client.read_component(req).await;
            book.note_call(node, reply.as_ref().map_or_else(answered, |_| true));
            let reply = reply.map_err(|s| format!("{}: {}", s.code(), s.message()))?.into_inner();
            Ok(crate::registry::ComponentChunk { data: reply.data, total_bytes: reply.total_bytes })
        })
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
    })
}

fn invocation_to_pb(inv: Invocation) -> pb::ForwardedInvocation {
    let (caller_type, caller_id) = match inv.caller {
        Some(c) => (Some(c.entity_type), Some(c.id)),
        None => (None, None),
    };
    pb::ForwardedInvocation {
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

/// The sending side: one lazily connected, multiplexed HTTP/2 channel per
/// peer, shared by every shard group on this node.
pub struct GrpcTransport {
    secret: ClusterSecret,
    book: PeerBook,
}

/// The peers' channels; clones share them, so a call's future can note its
/// outcome after the transport's borrow ended.
#[derive(Clone, Default)]
struct PeerBook {
    /// `None`: the OS's TCP.
    network: Option<super::net::SharedNetwork>,
    /// `None`: plain HTTP/2.
    tls: Option<ClientTlsConfig>,
    /// Bounded by the cluster's membership: one entry per known peer.
    peers: Arc<Mutex<BTreeMap<NodeId, Peer>>>,
}

/// One peer's channel, where it was dialled, and how many calls in a row
/// have failed on it without an answer.
struct Peer {
    client: ClusterClient<Channel>,
    addr: String,
    failed_in_a_row: u32,
}

/// Calls in a row that may fail without an answer (timeouts, transport
/// errors) before a peer's channel is replaced by a fresh one. A connection
/// can stall without closing (a partition that silently dropped segments, a
/// NAT that forgot the flow); keep-alives should notice, but a fresh dial is
/// cheap and certain. Raft heartbeats (every 50 ms) make this about a second.
const REDIAL_AFTER_FAILED_CALLS: u32 = 16;

impl std::fmt::Debug for GrpcTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcTransport").finish_non_exhaustive()
    }
}

impl GrpcTransport {
    pub fn new(secret: ClusterSecret) -> Self {
        Self { secret, book: PeerBook::default() }
    }

    /// Dials peers through `network` instead of TCP (the simulation).
    pub fn with_network(mut self, network: Option<super::net::SharedNetwork>) -> Self {
        self.book.network = network;
        self
    }

    /// Dials peers over TLS, presenting this member's certificate.
    pub fn with_tls(mut self, tls: Option<&PeerTls>) -> Self {
        self.book.tls = tls.map(PeerTls::client);
        self
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, BTreeMap<NodeId, Peer>> {
        self.book.peers()
    }

    /// Where `node` listens (`host:port`). Replaces an earlier address.
    pub fn set_peer(&self, node: NodeId, addr: &str) -> Result<(), ClusterApiError> {
        let client = self.book.dial(node, addr)?;
        self.peers().insert(node, Peer { client, addr: addr.to_owned(), failed_in_a_row: 0 });
        Ok(())
    }

    pub fn remove_peer(&self, node: NodeId) {
        self.peers().remove(&node);
    }

    fn client(&self, node: NodeId) -> Option<ClusterClient<Channel>> {
        self.peers().get(&node).map(|p| p.client.clone())
    }

    fn request<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        req.metadata_mut().insert(SECRET_HEADER, self.secret.raw.clone());
        req.set_timeout(FORWARD_CALL_TIMEOUT);
        req
    }
}

impl Peers for GrpcTransport {
    fn invoke(&self, node: NodeId, inv: Invocation) -> BoxFuture<'static, Result<Vec<u8>, InvokeError>> {
        let client = self.client(node);
        let req = self.request(invocation_to_pb(inv));
        let book = self.book.clone();
        Box::pin(async move {
            let Some(mut client) = client else {
                return Err(InvokeError::Unreachable { node, message: "address unknown".into() });
            };
            let reply = client.invoke(req).await;
            book.note_call(node, reply.as_ref().map_or_else(answered, |_| true));
            let reply = match reply {
                Ok(r) => r.into_inner(),
                Err(s) if never_sent(&s) => {
                    return Err(InvokeError::Unreachable { node, message: format!("{}: {}", s.code(), s.message()) });
                }
                Err(s) => return Err(InvokeError::Lost { node, message: format!("{}: {}", s.code(), s.message()) }),
            };
            match reply.outcome {
                Some(pb::forwarded_reply::Outcome::Reply(bytes)) => Ok(bytes),
                Some(pb::forwarded_reply::Outcome::Failure(f)) => Err(invoke_error_of(node, f)),
                None => Err(InvokeError::Internal(format!("node {node} sent an empty reply"))),
            }
        })
    }

    fn propose(&self, node: NodeId, shard: ShardId, ws: WriteSet) -> BoxFuture<'static, Result<LogIndex, LogError>> {
        let client = self.client(node);
        let bytes = postcard::to_allocvec(&ws);
        let req = bytes.map(|write_set| self.request(pb::ProposeRequest { shard, write_set }));
        Box::pin(async move {
            let req = req.map_err(|e| LogError::Aborted(format!("encoding a write set: {e}")))?;
            let Some(mut client) = client else {
                return Err(LogError::NotLeader { leader: None });
            };
            let reply = match client.propose(req).await {
                Ok(r) => r.into_inner(),
                // Nothing reached the node: look for the leader elsewhere.
                Err(s) if never_sent(&s) => return Err(LogError::NotLeader { leader: None }),
                Err(s) => return Err(LogError::Aborted(format!("node {node}: {}: {}", s.code(), s.message()))),
            };
            match reply.outcome {
                Some(pb::propose_reply::Outcome::Index(i)) => Ok(i),
                Some(pb::propose_reply::Outcome::Failure(f)) if f.kind == ErrorKind::NotLeader.as_str() => {
                    Err(LogError::NotLeader { leader: f.leader })
                }
                Some(pb::propose_reply::Outcome::Failure(f)) if f.kind == ErrorKind::Conflict.as_str() => {
                    Err(LogError::Conflict { key: f.message, index: f.index.unwrap_or_default() })
                }
                Some(pb::propose_reply::Outcome::Failure(f)) => Err(LogError::Aborted(f.message)),
                None => Err(LogError::Aborted(format!("node {node} sent an empty reply"))),
            }
        })
    }
}

fn transport_error(node: NodeId, shard: ShardId, status: &Status) -> TransportError {
    match status.code() {
        Code::NotFound => TransportError::NoSuchShard { node, shard },
        // Refused or not connected: nothing was delivered.
        Code::Unauthenticated | Code::Unavailable => {
            TransportError::Unreachable { node, reason: format!("{}: {}", status.code(), status.message()) }
        }
        _ => TransportError::Network { node, reason: format!("{}: {}", status.code(), status.message()) },
    }
}

impl PeerBook {
    fn peers(&self) -> std::sync::MutexGuard<'_, BTreeMap<NodeId, Peer>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes how a call to `node` ended: `answered` if the peer replied at
    /// all (an error status included). Replaces the channel after
    /// `REDIAL_AFTER_FAILED_CALLS` unanswered calls in a row.
    fn note_call(&self, node: NodeId, answered: bool) {
        let mut peers = self.peers();
        let Some(peer) = peers.get_mut(&node) else { return };
        if answered {
            peer.failed_in_a_row = 0;
            return;
        }
        peer.failed_in_a_row += 1;
        if peer.failed_in_a_row >= REDIAL_AFTER_FAILED_CALLS {
            peer.failed_in_a_row = 0;
            if let Ok(client) = self.dial(node, &peer.addr) {
                tracing::info!(node, addr = %peer.addr, "redialled a peer after {REDIAL_AFTER_FAILED_CALLS} unanswered calls");
                peer.client = client;
            }
        }
    }

    fn dial(&self, node: NodeId, addr: &str) -> Result<ClusterClient<Channel>, ClusterApiError> {
        let bad = |reason: String| ClusterApiError::BadAddress { node, addr: addr.to_owned(), reason };
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}")).map_err(|e| bad(e.to_string()))?;
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone()).map_err(|e| bad(e.to_string()))?;
        }
        let endpoint = endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            // Keep-alives notice a dead peer's connection between messages.
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5));
        let channel = match &self.network {
            None => endpoint.connect_lazy(),
            Some(network) => endpoint.connect_with_connector_lazy(super::net::connector(network.clone())),
        };
        Ok(ClusterClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }
}

impl Transport for GrpcTransport {
    fn send(
        &self,
        target: NodeId,
        shard: ShardId,
        rpc: RaftRpc,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<RaftReply, TransportError>> {
        let client = self.client(target);
        let secret = self.secret.raw.clone();
        let book = self.book.clone();
        Box::pin(async move {
            let Some(mut client) = client else {
                return Err(TransportError::Unreachable { node: target, reason: "address unknown".into() });
            };
            let bytes = rpc.encode().map_err(|e| TransportError::Network { node: target, reason: e.to_string() })?;
            let mut req = Request::new(pb::RaftMessage { shard, rpc: bytes });
            req.metadata_mut().insert(SECRET_HEADER, secret);
            req.set_timeout(timeout);
            let reply = tokio::time::timeout(timeout, client.raft(req)).await;
            book.note_call(target, matches!(&reply, Ok(Ok(_))) || matches!(&reply, Ok(Err(s)) if answered(s)));
            let reply = reply
                .map_err(|_| TransportError::Network { node: target, reason: format!("no reply within {timeout:?}") })?
                .map_err(|s| transport_error(target, shard, &s))?;
            RaftReply::decode(&reply.into_inner().reply)
                .map_err(|e| TransportError::Network { node: target, reason: e.to_string() })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::tests::{
        TestNode, applied_everywhere, assert_identical, config, initialize, leader, put, write,
    };
    use std::sync::Arc;

    const SECRET: &str = "correct-horse-battery-staple";

    /// Serves `replicas` on 127.0.0.1 and returns the address.
    async fn serve(node: NodeId, secret: &str, replicas: ReplicaTable) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = ClusterService::new(node, ClusterSecret::new(secret).unwrap(), replicas).into_server();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        addr
    }

    #[test]
    fn short_or_non_ascii_secrets_are_refused() {
        assert!(matches!(ClusterSecret::new("short"), Err(ClusterApiError::SecretTooShort)));
        assert!(matches!(ClusterSecret::new("sixteen bytes with spaces"), Err(ClusterApiError::SecretNotAscii)));
        assert!(ClusterSecret::new(SECRET).is_ok());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_shard_group_replicates_over_grpc_and_refuses_strangers() {
        let transports: Vec<Arc<GrpcTransport>> =
            (0..3).map(|_| Arc::new(GrpcTransport::new(ClusterSecret::new(SECRET).unwrap()))).collect();
        let mut nodes = Vec::new();
        let mut addrs = Vec::new();
        for (i, transport) in transports.iter().enumerate() {
            let id = i as NodeId + 1;
            let node = TestNode::open(id, tempfile::tempdir().unwrap(), transport.clone(), config(1000)).await;
            let table = ReplicaTable::default();
            table.insert(crate::cluster::tests::SHARD, node.replica().raft.clone());
            addrs.push(serve(id, SECRET, table).await);
            nodes.push(node);
        }
        for transport in &transports {
            for (i, addr) in addrs.iter().enumerate() {
                transport.set_peer(i as NodeId + 1, &addr.to_string()).unwrap();
            }
        }
        initialize(&nodes).await;
        let mut acked = Vec::new();
        let mut last = openraft::LogId::default();
        for i in 0..20 {
            last = write(&nodes, put(&format!("g{i}"), "1"), Duration::from_secs(10)).await;
            acked.push(format!("g{i}"));
        }
        applied_everywhere(&nodes, last.index, Duration::from_secs(10)).await;
        assert_identical(&nodes, &acked);

        // A process with the wrong secret asks for votes at a far higher
        // term. Were it heard, the leader would have to step down.
        let l = leader(&nodes, Duration::from_secs(5)).await;
        let term_before = nodes.iter().find(|n| n.id == l).unwrap().replica().raft.metrics().borrow().current_term;
        let stranger = GrpcTransport::new(ClusterSecret::new("not-the-cluster-secret").unwrap());
        for (i, addr) in addrs.iter().enumerate() {
            let target = i as NodeId + 1;
            stranger.set_peer(target, &addr.to_string()).unwrap();
            let vote = openraft::raft::VoteRequest {
                vote: openraft::Vote::new(term_before + 100, 99),
                last_log_id: Some(last),
            };
            let err = stranger
                .send(target, crate::cluster::tests::SHARD, RaftRpc::Vote(vote), Duration::from_secs(2))
                .await
                .unwrap_err();
            assert!(
                matches!(&err, TransportError::Unreachable { reason, .. } if reason.contains("cluster secret")),
                "{err}"
            );
        }
        // A right secret but no such shard is told so.
        let err = transports[0]
            .send(
                2,
                999,
                RaftRpc::Vote(openraft::raft::VoteRequest { vote: openraft::Vote::new(1, 1), last_log_id: None }),
                Duration::from_secs(2),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, TransportError::NoSuchShard { node: 2, shard: 999 }), "{err}");
        assert_eq!(leader(&nodes, Duration::from_secs(5)).await, l);
        let term_after = nodes.iter().find(|n| n.id == l).unwrap().replica().raft.metrics().borrow().current_term;
        assert_eq!(term_before, term_after, "a stranger's vote request changed the term");
        for n in &mut nodes {
            n.replica().raft.shutdown().await.unwrap();
        }
    }

    /// A peer whose connection stalls (it accepted, then never answers) is
    /// dialled afresh after `REDIAL_AFTER_FAILED_CALLS` unanswered calls.
    #[tokio::test]
    async fn a_peer_whose_connection_stalls_is_redialled() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        let holder = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                held.push(conn);
            }
        });
        let transport = GrpcTransport::new(ClusterSecret::new(SECRET).unwrap());
        transport.set_peer(2, &addr.to_string()).unwrap();
        let vote = || RaftRpc::Vote(openraft::raft::VoteRequest { vote: openraft::Vote::new(1, 1), last_log_id: None });
        for _ in 0..REDIAL_AFTER_FAILED_CALLS {
            let err = transport.send(2, 0, vote(), Duration::from_millis(50)).await.unwrap_err();
            assert!(matches!(err, TransportError::Network { .. }), "{err}");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one channel, one connection until the redial");
        let _ = transport.send(2, 0, vote(), Duration::from_millis(50)).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "the stalled connection was not replaced");
        holder.abort();
    }
}
