//! The cluster's one port for node-to-node calls, in domain terms: what a
//! member asks of another. Raft messages ride the narrower [`Transport`] (the
//! shard groups need nothing else), forwarded invocations and proposals the
//! narrower [`Peers`] (the router and the metadata log need nothing else);
//! [`Wire`] extends both with the calls the member's other parts make — shard
//! reports, join, replica moves, handoffs, component chunks, loaded types —
//! and the peer book (where each member listens). `api::cluster` implements
//! it over gRPC and maps it to protobuf; nothing here knows the encoding.
//! [`Refusal`] is what a member's handler answers when it will not do a call;
//! [`WireError`] how a call failed as the caller sees it.

use super::raft::{NodeId, ShardId, Transport};
use super::shards::ShardStatus;
use crate::log::LogError;
use crate::model::{LogIndex, WriteSet};
use crate::registry::{ComponentChunk, TypeRecord};
use crate::scheduler::{Invocation, InvokeError};
use futures::future::BoxFuture;
use std::time::Duration;

/// How long a call to another member may take unless the caller says
/// otherwise: a forwarded invocation or proposal (queueing, the turn, the
/// commit on the leader), a join, a replica added or dropped, a chunk.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// What a node asks of its peers to run and commit on the leader: a
/// forwarded invocation, a proposal to a group's leader.
pub trait Peers: Send + Sync + 'static {
    /// Runs `inv` on `node` if it leads the entity's shard.
    fn invoke(&self, node: NodeId, inv: Invocation) -> BoxFuture<'static, Result<Vec<u8>, InvokeError>>;
    /// Commits `ws` in `shard` through `node`, its leader; returns the log index
    /// (raft index + 1, as `ShardLog` does).
    fn propose(&self, node: NodeId, shard: ShardId, ws: WriteSet) -> BoxFuture<'static, Result<LogIndex, LogError>>;
}

/// What a cluster tells a node it let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JoinGrant {
    pub shard_count: u32,
    pub replication_factor: usize,
}

/// Every call one member makes to another, and where each listens.
pub trait Wire: Transport + Peers {
    /// Where `node` listens (`host:port`). Replaces an earlier address.
    fn set_peer(&self, node: NodeId, addr: &str) -> Result<(), WireError>;
    fn remove_peer(&self, node: NodeId);
    /// What `node`'s replicas know of their shards.
    fn shard_reports(&self, node: NodeId, timeout: Duration)
    -> BoxFuture<'static, Result<Vec<ShardStatus>, WireError>>;
    /// Asks `via` to let `joiner`, reached at `addr`, into the cluster.
    fn join(&self, via: NodeId, joiner: NodeId, addr: &str) -> BoxFuture<'static, Result<JoinGrant, WireError>>;
    /// Opens an empty replica of `shard` on `node`.
    fn add_replica(&self, node: NodeId, shard: ShardId) -> BoxFuture<'static, Result<(), WireError>>;
    /// On `leader`: adds `add` and removes `remove` in one membership change;
    /// the raft log index of the membership that took effect, if any.
    fn change_replicas(
        &self,
        leader: NodeId,
        shard: ShardId,
        add: Option<NodeId>,
        remove: Option<NodeId>,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Option<u64>, WireError>>;
    /// Stops `node`'s replica of `shard` and deletes its data (refused if it
    /// knows a membership naming it later than `removed_as_of`).
    fn drop_replica(
        &self,
        node: NodeId,
        shard: ShardId,
        removed_as_of: Option<u64>,
    ) -> BoxFuture<'static, Result<(), WireError>>;
    /// On `leader`: hands the shard's leadership to `to`.
    fn hand_off(
        &self,
        leader: NodeId,
        shard: ShardId,
        to: NodeId,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<(), WireError>>;
    /// Has `node`'s replica of `shard` start an election now.
    fn campaign(&self, node: NodeId, shard: ShardId, timeout: Duration) -> BoxFuture<'static, Result<(), WireError>>;
    /// Up to `max_bytes` of the component `digest` stores on `node`, from `offset`.
    fn read_component(
        &self,
        node: NodeId,
        digest: &str,
        offset: u64,
        max_bytes: u32,
    ) -> BoxFuture<'static, Result<ComponentChunk, WireError>>;
    /// The record of `type_name` `node` serves; `None` if it serves none.
    fn loaded_type(
        &self,
        node: NodeId,
        type_name: &str,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Option<TypeRecord>, WireError>>;
}

/// Why a member's handler would not do a call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not now: the node is not serving yet, the metadata group has no
    /// leader, a replica cannot open yet. Another try may succeed.
    #[error("{0}")]
    Unavailable(String),
    /// The request itself is wrong (a node id 0, an undecodable message).
    #[error("{0}")]
    Invalid(String),
    /// Not in this state: a taken node id, no replica to change, a change
    /// or handoff that failed.
    #[error("{0}")]
    Rejected(String),
    /// What the call names is not here (a shard's replica, a component).
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Internal(String),
}

/// How a call to another member failed, as the caller sees it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WireError {
    #[error("node {node} has no known address")]
    NoAddress { node: NodeId },
    #[error("invalid address {addr:?} for node {node}: {reason}")]
    BadAddress { node: NodeId, addr: String, reason: String },
    /// Nothing reached the peer (connection refused, no route, unknown
    /// name): nothing ran there.
    #[error("node {node}: {reason}")]
    Unreachable { node: NodeId, reason: String },
    /// The peer refused the call's credentials (the cluster secret, the
    /// client certificate): nothing ran there.
    #[error("node {node}: {reason}")]
    Unauthenticated { node: NodeId, reason: String },
    /// No answer to act on: a timeout, a connection lost mid-call, or the
    /// peer said it cannot take the call now. It may have run; another try
    /// may succeed.
    #[error("node {node}: {reason}")]
    Unavailable { node: NodeId, reason: String },
    /// The peer's handler refused the call.
    #[error("node {node}: {refusal}")]
    Refused { node: NodeId, refusal: Refusal },
}

impl WireError {
    /// Whether the call certainly never ran on the peer.
    pub fn never_sent(&self) -> bool {
        matches!(self, Self::NoAddress { .. } | Self::Unreachable { .. } | Self::Unauthenticated { .. })
    }

    /// Whether trying again later may succeed (the peer is down, busy or
    /// between leaders), as opposed to a refusal that will stand.
    pub fn may_succeed_later(&self) -> bool {
        matches!(
            self,
            Self::Unreachable { .. }
                | Self::Unavailable { .. }
                | Self::Refused { refusal: Refusal::Unavailable(_), .. }
        )
    }

    /// What went wrong, without naming the node (for callers that do).
    pub fn reason(&self) -> String {
        match self {
            Self::NoAddress { .. } => "address unknown".to_owned(),
            Self::BadAddress { addr, reason, .. } => format!("invalid address {addr:?}: {reason}"),
            Self::Unreachable { reason, .. }
            | Self::Unauthenticated { reason, .. }
            | Self::Unavailable { reason, .. } => reason.clone(),
            Self::Refused { refusal, .. } => refusal.to_string(),
        }
    }

    /// As this node answers a call it passed on (a join to the metadata
    /// leader): what the caller should make of it.
    pub fn into_refusal(self) -> Refusal {
        match self {
            Self::Refused { refusal, .. } => refusal,
            e @ (Self::NoAddress { .. } | Self::Unreachable { .. } | Self::Unavailable { .. }) => {
                Refusal::Unavailable(e.to_string())
            }
            e @ (Self::BadAddress { .. } | Self::Unauthenticated { .. }) => Refusal::Rejected(e.to_string()),
        }
    }
}
