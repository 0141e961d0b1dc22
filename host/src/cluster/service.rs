//! What a member does when another calls it: `ClusterNode` runs Raft
//! messages on this node's replicas, invocations forwarded to the shard
//! leaders here, proposals for the groups it leads, joins, replica moves,
//! handoffs and the registry's questions — in domain terms, answering a
//! [`Refusal`] when it will not. `api::cluster` serves it over gRPC and only
//! maps protobuf to these calls and back.

use super::member::Member;
use super::meta::META_SHARD;
use super::raft::{DispatchError, NodeId, ReplicaTable, ShardId, leader_of};
use super::shards::ShardStatus;
use super::wire::{JoinGrant, Refusal, WireError};
use crate::log::{CommitLog, LogError};
use crate::model::{LogIndex, WriteSet};
use crate::registry::{ComponentChunk, Registry, RegistryError, TypeRecord};
use crate::scheduler::{Invocation, InvokeError, Scheduler};
use std::sync::Arc;

/// The largest component chunk a node sends in one answer.
pub const MAX_COMPONENT_CHUNK_BYTES: usize = 4 << 20;

/// This node as the other members call it.
#[derive(Clone)]
pub struct ClusterNode {
    node: NodeId,
    replicas: ReplicaTable,
    /// `None` until the node serves: only Raft messages are run meanwhile.
    serving: Option<Serving>,
    /// Members talk to each other without TLS (warned about when one joins).
    members_in_clear: bool,
}

/// What a serving node answers the rest from.
#[derive(Clone)]
struct Serving {
    scheduler: Scheduler,
    registry: Arc<Registry>,
    member: Member,
}

impl std::fmt::Debug for ClusterNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterNode").field("node", &self.node).finish_non_exhaustive()
    }
}

fn not_serving() -> Refusal {
    Refusal::Unavailable("this node is not serving yet".into())
}

impl ClusterNode {
    /// Runs Raft messages for the replicas in `replicas`; nothing else yet.
    pub fn new(node: NodeId, replicas: ReplicaTable) -> Self {
        Self { node, replicas, serving: None, members_in_clear: true }
    }

    /// Serves forwarded invocations with `scheduler`, what this node serves
    /// of each type from `registry`, and the rest from `member`.
    pub fn serving(mut self, scheduler: Scheduler, registry: Arc<Registry>, member: Member) -> Self {
        self.serving = Some(Serving { scheduler, registry, member });
        self
    }

    /// Whether members talk to each other without TLS.
    pub fn members_in_clear(mut self, in_clear: bool) -> Self {
        self.members_in_clear = in_clear;
        self
    }

    pub fn node(&self) -> NodeId {
        self.node
    }

    fn member(&self) -> Result<&Member, Refusal> {
        self.serving.as_ref().map(|s| &s.member).ok_or_else(not_serving)
    }

    fn registry(&self) -> Result<&Arc<Registry>, Refusal> {
        self.serving.as_ref().map(|s| &s.registry).ok_or_else(not_serving)
    }

    /// Runs an encoded Raft message on this node's replica of `shard`.
    pub async fn raft(&self, shard: ShardId, rpc: &[u8]) -> Result<Vec<u8>, DispatchError> {
        self.replicas.dispatch(self.node, shard, rpc).await
    }

    /// Runs an invocation another node forwarded, if this node leads the
    /// entity's shard (it never forwards it again).
    pub async fn invoke(&self, inv: Invocation) -> Result<Result<Vec<u8>, InvokeError>, Refusal> {
        let Some(serving) = &self.serving else {
            return Err(Refusal::Unavailable("this node is not serving invocations yet".into()));
        };
        Ok(serving.scheduler.invoke_here(inv).await)
    }

    /// Commits `ws` in `shard` through this node's replica, if it leads it.
    pub async fn propose(&self, shard: ShardId, ws: WriteSet) -> Result<Result<LogIndex, LogError>, Refusal> {
        let member = self.member()?;
        let log: Option<Arc<dyn CommitLog>> = if shard == META_SHARD {
            Some(member.meta.log.clone())
        } else {
            member.local.replica(shard).map(|r| r.log as Arc<dyn CommitLog>)
        };
        let Some(log) = log else {
            return Err(Refusal::NotFound(format!("node {} has no replica of shard {shard}", self.node)));
        };
        Ok(log.propose(ws).await)
    }

    /// What this node's replicas know of their shards (none until it serves).
    pub fn shards(&self) -> Vec<ShardStatus> {
        self.serving.as_ref().map(|s| s.member.shards.status()).unwrap_or_default()
    }

    /// Lets `joiner`, reached at `addr`, into the cluster: on the metadata
    /// group's leader, as a learner of the group (the driver promotes it
    /// once it has caught up); elsewhere, passed on to that leader. A node
    /// that joined before at the same address is let in again (its answer
    /// was lost).
    pub async fn join(&self, joiner: NodeId, addr: String) -> Result<JoinGrant, Refusal> {
        let member = self.member()?;
        if joiner == 0 {
            return Err(Refusal::Invalid("node ids start at 1".into()));
        }
        let grant = JoinGrant { shard_count: member.shard_count, replication_factor: member.replication_factor };
        if let Some(known) = member.shape.get().members.get(&joiner) {
            if *known == addr {
                return Ok(grant); // joined before; the answer was lost
            }
            return Err(Refusal::Rejected(format!("node id {joiner} is taken by the member at {known}")));
        }
        let leader = leader_of(&member.meta.raft.metrics().borrow());
        match leader {
            Some(l) if l == self.node => {
                member.wire.set_peer(joiner, &addr).map_err(|e| Refusal::Invalid(e.to_string()))?;
                member
                    .meta
                    .raft
                    .add_learner(joiner, openraft::BasicNode::new(&addr), false)
                    .await
                    .map_err(|e| Refusal::Unavailable(format!("adding node {joiner} to the metadata group: {e}")))?;
                tracing::info!(node = joiner, %addr, "a node joined the cluster");
                if self.members_in_clear {
                    tracing::warn!(
                        "members talk to each other without TLS: the cluster secret, Raft traffic and entity state \
                         cross the network in clear (set cluster.tls_ca_path and api.tls_*)"
                    );
                }
                Ok(grant)
            }
            Some(l) => member.wire.join(l, joiner, &addr).await.map_err(|e| match e {
                WireError::NoAddress { .. } => {
                    Refusal::Unavailable(format!("the metadata leader {l} has no known address"))
                }
                e => e.into_refusal(),
            }),
            None => Err(Refusal::Unavailable("the metadata group has no leader; retry".into())),
        }
    }

    /// Opens an empty replica of `shard` here (a replica move's first step).
    pub async fn add_replica(&self, shard: ShardId) -> Result<(), Refusal> {
        self.member()?.add_here(shard).await.map_err(Refusal::Unavailable)
    }

    /// On the shard's leader: adds `add` and removes `remove`.
    pub async fn change_replicas(
        &self,
        shard: ShardId,
        add: Option<NodeId>,
        remove: Option<NodeId>,
    ) -> Result<Option<u64>, Refusal> {
        self.member()?.change_here(shard, add, remove).await.map_err(Refusal::Rejected)
    }

    /// Stops this node's replica of `shard` and deletes its data.
    pub async fn drop_replica(&self, shard: ShardId, removed_as_of: Option<u64>) -> Result<(), Refusal> {
        self.member()?.drop_here(shard, removed_as_of).await.map_err(Refusal::Rejected)
    }

    /// On the shard's leader: hands its leadership to `to`.
    pub async fn hand_off(&self, shard: ShardId, to: NodeId) -> Result<(), Refusal> {
        self.member()?.hand_off_here(shard, to).await.map_err(Refusal::Rejected)
    }

    /// Starts an election for this node's replica of `shard` now.
    pub async fn campaign(&self, shard: ShardId) -> Result<(), Refusal> {
        self.member()?.clone().campaign_here(shard).await.map_err(Refusal::Rejected)
    }

    /// Up to `max_bytes` (at most [`MAX_COMPONENT_CHUNK_BYTES`]) of the
    /// component `digest` this node stores, from `offset`.
    pub async fn read_component(&self, digest: String, offset: u64, max_bytes: u32) -> Result<ComponentChunk, Refusal> {
        let registry = self.registry()?.clone();
        let max = (max_bytes as usize).min(MAX_COMPONENT_CHUNK_BYTES);
        let read = crate::determinism::blocking(move || registry.read_component_chunk(&digest, offset, max)).await;
        match read.map_err(|e| Refusal::Internal(e.to_string()))? {
            Ok(chunk) => Ok(chunk),
            Err(e @ RegistryError::MissingComponent { .. }) => Err(Refusal::NotFound(e.to_string())),
            Err(e @ RegistryError::Corrupt { .. }) => Err(Refusal::Invalid(e.to_string())),
            Err(e) => Err(Refusal::Internal(e.to_string())),
        }
    }

    /// The record of `type_name` this node serves, if any.
    pub fn loaded_type(&self, type_name: &str) -> Result<Option<TypeRecord>, Refusal> {
        Ok(self.registry()?.get(type_name).ok())
    }
}
