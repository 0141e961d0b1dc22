//! The sending side: `GrpcTransport`, the cluster layer's [`Wire`] (and so
//! its `Transport` and `Peers`) over tonic — one lazily connected, multiplexed
//! HTTP/2 channel per peer, shared by every shard group on this node, redialled
//! after [`REDIAL_AFTER_FAILED_CALLS`] unanswered calls in a row — mapping each
//! call to protobuf and each status back to the cluster's [`WireError`].

use super::pb::cluster_client::ClusterClient;
use super::raft_batch::{RaftQueue, send_alone};
use super::{
    ClusterSecret, MAX_MESSAGE_BYTES, PeerTls, SECRET_HEADER, answered, invocation_to_pb, invoke_error_of, never_sent,
    pb, report_from_pb, wire_error,
};
use crate::cluster::raft::{NodeId, RaftReply, RaftRpc, ShardId, Transport, TransportError};
use crate::cluster::shards::ShardStatus;
use crate::cluster::wire::{CALL_TIMEOUT, JoinGrant, Peers, Wire, WireError};
use crate::log::LogError;
use crate::model::{LogIndex, WriteSet};
use crate::registry::{ComponentChunk, TypeRecord};
use crate::scheduler::{ErrorKind, Invocation, InvokeError};
use futures::future::BoxFuture;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Response, Status};

/// How long connecting to a peer may take before the message fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The cluster's wire over gRPC: one lazily connected, multiplexed HTTP/2
/// channel per peer, shared by every shard group on this node.
pub struct GrpcTransport {
    secret: ClusterSecret,
    book: PeerBook,
}

/// The peers' channels; clones share them, so a call's future can note its
/// outcome after the transport's borrow ended.
#[derive(Clone, Default)]
pub(super) struct PeerBook {
    /// `None`: the OS's TCP.
    network: Option<crate::api::net::SharedNetwork>,
    /// `None`: plain HTTP/2.
    tls: Option<ClientTlsConfig>,
    /// Bounded by the cluster's membership: one entry per known peer.
    peers: Arc<Mutex<BTreeMap<NodeId, Peer>>>,
    /// `Raft` and `RaftBatch` calls made, to all peers.
    raft_calls: Arc<std::sync::atomic::AtomicU64>,
}

/// One peer's channel, where it was dialled, and how many calls in a row
/// have failed on it without an answer.
struct Peer {
    client: ClusterClient<Channel>,
    addr: String,
    failed_in_a_row: u32,
    /// Raft messages to this peer, started by the first one sent.
    raft: Option<RaftQueue>,
}

/// Calls in a row that may fail without an answer (timeouts, transport
/// errors) before a peer's channel is replaced by a fresh one. A connection
/// can stall without closing (a partition that silently dropped segments, a
/// NAT that forgot the flow); keep-alives should notice, but a fresh dial is
/// cheap and certain. Raft heartbeats (every 50 ms) make this about a second.
pub(super) const REDIAL_AFTER_FAILED_CALLS: u32 = 16;

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
    pub fn with_network(mut self, network: Option<crate::api::net::SharedNetwork>) -> Self {
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

    /// Calls that carried Raft messages so far (a batch counts once).
    pub fn raft_calls(&self) -> u64 {
        self.book.raft_calls.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn client(&self, node: NodeId) -> Option<ClusterClient<Channel>> {
        self.book.client(node)
    }

    fn request<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        req.metadata_mut().insert(SECRET_HEADER, self.secret.raw.clone());
        req.set_timeout(CALL_TIMEOUT);
        req
    }
}

impl GrpcTransport {
    /// One call to `node` through `send`, within `timeout`; `noted`: its
    /// outcome counts towards redialling the peer (as the calls that run
    /// often do: Raft messages, invocations, component chunks).
    fn call<T, R>(
        &self,
        node: NodeId,
        msg: T,
        timeout: Duration,
        noted: bool,
        send: impl FnOnce(ClusterClient<Channel>, Request<T>) -> BoxFuture<'static, Result<Response<R>, Status>>,
    ) -> BoxFuture<'static, Result<R, WireError>>
    where
        R: Send + 'static,
    {
        let Some(client) = self.client(node) else {
            return Box::pin(async move { Err(WireError::NoAddress { node }) });
        };
        let mut req = self.request(msg);
        req.set_timeout(timeout);
        let call = send(client, req);
        let book = self.book.clone();
        Box::pin(async move {
            let reply = call.await;
            if noted {
                book.note_call(node, reply.as_ref().map_or_else(answered, |_| true));
            }
            reply.map(Response::into_inner).map_err(|s| wire_error(node, &s))
        })
    }
}

impl Wire for GrpcTransport {
    fn set_peer(&self, node: NodeId, addr: &str) -> Result<(), WireError> {
        let client = self.book.dial(node, addr)?;
        self.peers().insert(node, Peer { client, addr: addr.to_owned(), failed_in_a_row: 0, raft: None });
        Ok(())
    }

    fn remove_peer(&self, node: NodeId) {
        self.peers().remove(&node);
    }

    fn shard_reports(
        &self,
        node: NodeId,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Vec<ShardStatus>, WireError>> {
        let call = self
            .call(node, pb::ShardsRequest {}, timeout, false, |mut c, r| Box::pin(async move { c.shards(r).await }));
        Box::pin(async move {
            let reply = tokio::time::timeout(timeout, call)
                .await
                .map_err(|_| WireError::Unavailable { node, reason: format!("no reply within {timeout:?}") })??;
            Ok(reply.shards.into_iter().map(|r| report_from_pb(node, r)).collect())
        })
    }

    fn join(&self, via: NodeId, joiner: NodeId, addr: &str) -> BoxFuture<'static, Result<JoinGrant, WireError>> {
        let msg = pb::JoinRequest { node: joiner, addr: addr.to_owned() };
        let call = self.call(via, msg, CALL_TIMEOUT, false, |mut c, r| Box::pin(async move { c.join(r).await }));
        Box::pin(async move {
            let r = call.await?;
            Ok(JoinGrant { shard_count: r.shard_count, replication_factor: r.replication_factor as usize })
        })
    }

    fn add_replica(&self, node: NodeId, shard: ShardId) -> BoxFuture<'static, Result<(), WireError>> {
        let msg = pb::ReplicaRequest { shard, removed_as_of: None };
        let call =
            self.call(node, msg, CALL_TIMEOUT, false, |mut c, r| Box::pin(async move { c.add_replica(r).await }));
        Box::pin(async move { call.await.map(drop) })
    }

    fn change_replicas(
        &self,
        leader: NodeId,
        shard: ShardId,
        add: Option<NodeId>,
        remove: Option<NodeId>,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Option<u64>, WireError>> {
        let msg = pb::ChangeReplicasRequest { shard, add, remove };
        let call =
            self.call(leader, msg, timeout, false, |mut c, r| Box::pin(async move { c.change_replicas(r).await }));
        Box::pin(async move { call.await.map(|r| r.membership_index) })
    }

    fn drop_replica(
        &self,
        node: NodeId,
        shard: ShardId,
        removed_as_of: Option<u64>,
    ) -> BoxFuture<'static, Result<(), WireError>> {
        let msg = pb::ReplicaRequest { shard, removed_as_of };
        let call =
            self.call(node, msg, CALL_TIMEOUT, false, |mut c, r| Box::pin(async move { c.drop_replica(r).await }));
        Box::pin(async move { call.await.map(drop) })
    }

    fn hand_off(
        &self,
        leader: NodeId,
        shard: ShardId,
        to: NodeId,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<(), WireError>> {
        let msg = pb::HandOffRequest { shard, to };
        let call = self.call(leader, msg, timeout, false, |mut c, r| Box::pin(async move { c.hand_off(r).await }));
        Box::pin(async move { call.await.map(drop) })
    }

    fn campaign(&self, node: NodeId, shard: ShardId, timeout: Duration) -> BoxFuture<'static, Result<(), WireError>> {
        let msg = pb::ReplicaRequest { shard, removed_as_of: None };
        let call = self.call(node, msg, timeout, false, |mut c, r| Box::pin(async move { c.campaign(r).await }));
        Box::pin(async move { call.await.map(drop) })
    }

    fn read_component(
        &self,
        node: NodeId,
        digest: &str,
        offset: u64,
        max_bytes: u32,
    ) -> BoxFuture<'static, Result<ComponentChunk, WireError>> {
        let msg = pb::ReadComponentRequest { digest: digest.to_owned(), offset, max_bytes };
        let call =
            self.call(node, msg, CALL_TIMEOUT, true, |mut c, r| Box::pin(async move { c.read_component(r).await }));
        Box::pin(async move {
            let r = call.await?;
            Ok(ComponentChunk { data: r.data, total_bytes: r.total_bytes })
        })
    }

    fn loaded_type(
        &self,
        node: NodeId,
        type_name: &str,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Option<TypeRecord>, WireError>> {
        let msg = pb::LoadedTypeRequest { type_name: type_name.to_owned() };
        let call = self.call(node, msg, timeout, false, |mut c, r| Box::pin(async move { c.loaded_type(r).await }));
        // Empty (no such type) or unreadable: not served.
        Box::pin(async move { Ok(serde_json::from_slice::<TypeRecord>(&call.await?.record_json).ok()) })
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

impl PeerBook {
    /// The channel to `node`, if its address is known.
    pub(super) fn client(&self, node: NodeId) -> Option<ClusterClient<Channel>> {
        self.peers().get(&node).map(|p| p.client.clone())
    }

    /// Counts a call that carries Raft messages.
    pub(super) fn count_raft_call(&self) {
        self.raft_calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// `node`'s Raft queue, started on first use (on the current runtime).
    fn raft_queue(&self, node: NodeId, secret: &tonic::metadata::AsciiMetadataValue) -> Option<RaftQueue> {
        let mut peers = self.peers();
        let peer = peers.get_mut(&node)?;
        Some(peer.raft.get_or_insert_with(|| RaftQueue::start(node, self.clone(), secret.clone())).clone())
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, BTreeMap<NodeId, Peer>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes how a call to `node` ended: `answered` if the peer replied at
    /// all (an error status included). Replaces the channel after
    /// `REDIAL_AFTER_FAILED_CALLS` unanswered calls in a row.
    pub(super) fn note_call(&self, node: NodeId, answered: bool) {
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

    fn dial(&self, node: NodeId, addr: &str) -> Result<ClusterClient<Channel>, WireError> {
        let bad = |reason: String| WireError::BadAddress { node, addr: addr.to_owned(), reason };
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
            Some(network) => endpoint.connect_with_connector_lazy(crate::api::net::connector(network.clone())),
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
        let bytes = rpc.encode().map_err(|e| TransportError::Network { node: target, reason: e.to_string() });
        // A snapshot chunk may take its receiver a while to write: it goes
        // in a call of its own, past the queue other groups' messages use.
        let queued = !matches!(rpc, RaftRpc::InstallSnapshot(_));
        let secret = self.secret.raw.clone();
        let book = self.book.clone();
        Box::pin(async move {
            let bytes = bytes?;
            let queue = if queued { book.raft_queue(target, &secret) } else { None };
            let reply = match queue {
                Some(queue) => queue.send(shard, bytes, timeout).await?,
                None => send_alone(&book, secret, target, shard, bytes, timeout).await?,
            };
            RaftReply::decode(&reply).map_err(|e| TransportError::Network { node: target, reason: e.to_string() })
        })
    }
}
