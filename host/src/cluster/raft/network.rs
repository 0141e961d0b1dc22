//! The Raft wire: `RaftRpc`/`RaftReply` (what one replica says to another,
//! always addressed to a shard), the `Transport` that carries them between
//! nodes (tonic between processes, the fault-injecting in-process transport
//! in the test harness), and openraft's network adapter over any transport.
//! openraft 0.9 has no multi-raft support: the shard id on every message is
//! what lets one connection between two nodes serve all their shard groups.

use super::{NodeId, Raft, ShardId, ShardTypes};
use futures::future::BoxFuture;
use openraft::BasicNode;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// A request from one replica of a shard to another.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RaftRpc {
    AppendEntries(AppendEntriesRequest<ShardTypes>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<ShardTypes>),
}

/// The answer to a `RaftRpc`, including the remote Raft's refusal.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftReply {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
}

impl RaftRpc {
    pub fn encode(&self) -> Result<Vec<u8>, postcard::Error> {
        postcard::to_allocvec(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(bytes)
    }
}

impl RaftReply {
    pub fn encode(&self) -> Result<Vec<u8>, postcard::Error> {
        postcard::to_allocvec(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(bytes)
    }
}

/// Why a message did not get an answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    /// The target could not be reached (down, partitioned, refused us). Raft
    /// backs off before retrying it.
    #[error("node {node} unreachable: {reason}")]
    Unreachable { node: NodeId, reason: String },
    /// The message may or may not have arrived (timeout, broken stream).
    #[error("network error talking to node {node}: {reason}")]
    Network { node: NodeId, reason: String },
    /// The target has no replica of the shard (not created yet, or moved).
    #[error("node {node} has no replica of shard {shard}")]
    NoSuchShard { node: NodeId, shard: ShardId },
}

/// Carries Raft messages between nodes. `timeout` is openraft's deadline for
/// this message; a transport must not wait longer.
pub trait Transport: Send + Sync + 'static {
    fn send(
        &self,
        target: NodeId,
        shard: ShardId,
        rpc: RaftRpc,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<RaftReply, TransportError>>;
}

/// This node's replicas by shard, where incoming messages find them.
#[derive(Clone, Default)]
pub struct ReplicaTable(Arc<std::sync::RwLock<std::collections::BTreeMap<ShardId, Raft>>>);

impl std::fmt::Debug for ReplicaTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shards: Vec<ShardId> = self.read().keys().copied().collect();
        f.debug_tuple("ReplicaTable").field(&shards).finish()
    }
}

impl ReplicaTable {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, std::collections::BTreeMap<ShardId, Raft>> {
        // The map is only ever inserted into or removed from; a panic elsewhere
        // cannot leave it half-changed.
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn insert(&self, shard: ShardId, raft: Raft) {
        self.0.write().unwrap_or_else(|e| e.into_inner()).insert(shard, raft);
    }

    pub fn remove(&self, shard: ShardId) -> Option<Raft> {
        self.0.write().unwrap_or_else(|e| e.into_inner()).remove(&shard)
    }

    pub fn get(&self, shard: ShardId) -> Option<Raft> {
        self.read().get(&shard).cloned()
    }

    /// Decodes a message for `shard`, runs it on the local replica (`node`
    /// is this node, for errors) and encodes the reply.
    pub async fn dispatch(&self, node: NodeId, shard: ShardId, rpc: &[u8]) -> Result<Vec<u8>, DispatchError> {
        let raft = self.get(shard).ok_or(DispatchError::NoSuchShard { node, shard })?;
        let rpc = RaftRpc::decode(rpc).map_err(DispatchError::Decode)?;
        handle(&raft, rpc).await.encode().map_err(DispatchError::Encode)
    }
}

/// Why an incoming message could not be run.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("node {node} has no replica of shard {shard}")]
    NoSuchShard { node: NodeId, shard: ShardId },
    #[error("undecodable raft message: {0}")]
    Decode(#[source] postcard::Error),
    #[error("cannot encode raft reply: {0}")]
    Encode(#[source] postcard::Error),
}

impl DispatchError {
    /// As the sender's transport reports it.
    pub fn into_transport(self, node: NodeId) -> TransportError {
        match self {
            DispatchError::NoSuchShard { node, shard } => TransportError::NoSuchShard { node, shard },
            e => TransportError::Network { node, reason: e.to_string() },
        }
    }
}

/// The transport of a group of one outside any cluster ([`super::open_solo`],
/// tests): a group whose
/// only voter is this node never sends, and anything it tries is refused.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoPeers;

impl Transport for NoPeers {
    fn send(
        &self,
        target: NodeId,
        _shard: ShardId,
        _rpc: RaftRpc,
        _timeout: Duration,
    ) -> BoxFuture<'static, Result<RaftReply, TransportError>> {
        Box::pin(async move {
            Err(TransportError::Unreachable { node: target, reason: "a group of one has no peers".into() })
        })
    }
}

/// Runs a message that arrived for one of this node's replicas.
pub async fn handle(raft: &Raft, rpc: RaftRpc) -> RaftReply {
    match rpc {
        RaftRpc::AppendEntries(req) => RaftReply::AppendEntries(raft.append_entries(req).await),
        RaftRpc::Vote(req) => RaftReply::Vote(raft.vote(req).await),
        RaftRpc::InstallSnapshot(req) => RaftReply::InstallSnapshot(raft.install_snapshot(req).await),
    }
}

/// openraft's network factory for one shard group on one node.
#[derive(Clone)]
pub struct ShardNetworkFactory {
    shard: ShardId,
    transport: Arc<dyn Transport>,
}

impl ShardNetworkFactory {
    pub fn new(shard: ShardId, transport: Arc<dyn Transport>) -> Self {
        Self { shard, transport }
    }
}

impl RaftNetworkFactory<ShardTypes> for ShardNetworkFactory {
    type Network = ShardNetwork;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Self::Network {
        ShardNetwork { shard: self.shard, target, transport: self.transport.clone() }
    }
}

/// openraft's connection from one replica to another.
pub struct ShardNetwork {
    shard: ShardId,
    target: NodeId,
    transport: Arc<dyn Transport>,
}

fn rpc_error<E: std::error::Error>(e: TransportError) -> RPCError<NodeId, BasicNode, E> {
    match e {
        TransportError::Unreachable { .. } | TransportError::NoSuchShard { .. } => {
            RPCError::Unreachable(Unreachable::new(&e))
        }
        TransportError::Network { .. } => RPCError::Network(NetworkError::new(&e)),
    }
}

fn wrong_reply<E: std::error::Error>(target: NodeId, expected: &str) -> RPCError<NodeId, BasicNode, E> {
    rpc_error(TransportError::Network { node: target, reason: format!("reply is not a {expected} reply") })
}

impl ShardNetwork {
    async fn send(&self, rpc: RaftRpc, option: &RPCOption) -> Result<RaftReply, TransportError> {
        self.transport.send(self.target, self.shard, rpc, option.hard_ttl()).await
    }
}

impl RaftNetwork<ShardTypes> for ShardNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<ShardTypes>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        match self.send(RaftRpc::AppendEntries(rpc), &option).await.map_err(rpc_error)? {
            RaftReply::AppendEntries(res) => {
                res.map_err(|e| RPCError::RemoteError(openraft::error::RemoteError::new(self.target, e)))
            }
            _ => Err(wrong_reply(self.target, "append-entries")),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<ShardTypes>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>>
    {
        match self.send(RaftRpc::InstallSnapshot(rpc), &option).await.map_err(rpc_error)? {
            RaftReply::InstallSnapshot(res) => {
                res.map_err(|e| RPCError::RemoteError(openraft::error::RemoteError::new(self.target, e)))
            }
            _ => Err(wrong_reply(self.target, "install-snapshot")),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        match self.send(RaftRpc::Vote(rpc), &option).await.map_err(rpc_error)? {
            RaftReply::Vote(res) => {
                res.map_err(|e| RPCError::RemoteError(openraft::error::RemoteError::new(self.target, e)))
            }
            _ => Err(wrong_reply(self.target, "vote")),
        }
    }

    fn backoff(&self) -> openraft::network::Backoff {
        // openraft's default waits 500 ms after an unreachable peer; 200 ms
        // lets a restarted node rejoin replication quickly.
        openraft::network::Backoff::new(std::iter::repeat(Duration::from_millis(200)))
    }
}
