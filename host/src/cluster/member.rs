//! `Member`: what a node's cluster-facing parts share — its replicas, its
//! copy of the cluster's shape, the metadata group and the [`Wire`] to the
//! others — and the calls that run here or on another member alike: the
//! placement driver's [`Mover`] (reports, add, change, hand off, drop), a
//! campaign, and `hand_off_all` before the node stops. Each runs on this node
//! without a call when it is the one named, else through the wire.

use super::driver::{Mover, change_replicas};
use super::handoff;
use super::meta::META_SHARD;
use super::raft::{NodeId, ShardId, leader_of, matched_index};
use super::shape::ClusterShape;
use super::sharded::{LocalShard, LocalShards};
use super::shards::{ShardSet, ShardStatus};
use super::wire::{CALL_TIMEOUT, Wire, WireError};
use crate::log::CommitLog;
use futures::future::BoxFuture;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How long a handoff waits for its target to catch up while the shard
/// still serves (the pause that follows is bounded in `handoff`).
const HANDOFF_WAIT: Duration = Duration::from_secs(2);

/// How long a paused leader gives its handoff's target to start campaigning:
/// one that does not answer soon is not taking over.
const CAMPAIGN_CALL_TIMEOUT: Duration = Duration::from_secs(1);

/// How long `conflux status` (and the driver's failure detector) waits for
/// each member's report.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// What a node's cluster-facing parts share: its replicas, its copy of the
/// cluster's shape, the metadata group and the wire to the other members.
#[derive(Clone)]
pub struct Member {
    pub node: NodeId,
    pub wire: Arc<dyn Wire>,
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
    pub ready: Arc<AtomicBool>,
}

impl Member {
    /// Each node's report of its replicas (this node's without a call);
    /// `None` for a node that did not answer within [`STATUS_TIMEOUT`].
    pub fn reports(&self, nodes: Vec<NodeId>) -> BoxFuture<'static, BTreeMap<NodeId, Option<Vec<ShardStatus>>>> {
        let asks: Vec<_> = nodes
            .into_iter()
            .map(|node| {
                let report: BoxFuture<'static, Option<Vec<ShardStatus>>> = if node == self.node {
                    let local = self.shards.status();
                    Box::pin(async move { Some(local) })
                } else {
                    let call = self.wire.shard_reports(node, STATUS_TIMEOUT);
                    Box::pin(async move { call.await.ok() })
                };
                async move { (node, report.await) }
            })
            .collect();
        Box::pin(async move { futures::future::join_all(asks).await.into_iter().collect() })
    }

    /// Runs `local` here, or `remote` on `node` through the wire.
    fn on<T, F, R>(&self, node: NodeId, local: F, remote: R) -> BoxFuture<'static, Result<T, String>>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, String>> + Send + 'static,
        R: FnOnce(&dyn Wire) -> BoxFuture<'static, Result<T, WireError>>,
    {
        if node == self.node {
            return Box::pin(local);
        }
        let call = remote(&*self.wire);
        Box::pin(async move { call.await.map_err(|e| e.to_string()) })
    }

    /// This node's replica of `shard`, the metadata group's included.
    fn replica_here(&self, shard: ShardId) -> Result<LocalShard, String> {
        if shard == META_SHARD {
            return Ok(self.meta.clone());
        }
        self.local.replica(shard).ok_or_else(|| format!("node {} has no replica of shard {shard}", self.node))
    }

    /// Opens an empty replica of `shard` here, once this node is ready for
    /// replicas.
    pub async fn add_here(&self, shard: ShardId) -> Result<(), String> {
        if !self.ready.load(Ordering::SeqCst) {
            return Err(format!("node {} has not caught up with the metadata group yet", self.node));
        }
        self.local.add_replica(shard).await.map_err(|e| e.to_string())
    }

    /// On this node, the leader of `shard`: adds `add` and removes `remove`.
    pub async fn change_here(
        &self,
        shard: ShardId,
        add: Option<NodeId>,
        remove: Option<NodeId>,
    ) -> Result<Option<u64>, String> {
        let replica =
            self.local.replica(shard).ok_or_else(|| format!("node {} has no replica of shard {shard}", self.node))?;
        change_replicas(&replica.raft, &self.shape.get().members, add, remove, self.catch_up).await
    }

    /// Drops this node's replica of `shard` (see `LocalShards::drop_replica`).
    pub async fn drop_here(&self, shard: ShardId, removed_as_of: Option<u64>) -> Result<(), String> {
        self.local.drop_replica(shard, removed_as_of).await.map_err(|e| e.to_string())
    }

    /// On this node, the leader of `shard`: hands its leadership to `to`.
    pub async fn hand_off_here(&self, shard: ShardId, to: NodeId) -> Result<(), String> {
        let replica = self.replica_here(shard)?;
        let campaign =
            self.on(to, self.clone().campaign_here(shard), |wire| wire.campaign(to, shard, CAMPAIGN_CALL_TIMEOUT));
        handoff::hand_off(&replica, to, HANDOFF_WAIT, campaign).await.map_err(|e| e.to_string())
    }

    /// Starts an election for this node's replica of `shard` now.
    pub async fn campaign_here(self, shard: ShardId) -> Result<(), String> {
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
            if leader_of(&m) != Some(self.node) {
                return None;
            }
            let voters: Vec<NodeId> =
                m.membership_config.membership().voter_ids().filter(|v| *v != self.node).collect();
            let matched = |v: NodeId| matched_index(&m, v);
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
}

impl Mover for Member {
    fn reports(&self, nodes: Vec<NodeId>) -> BoxFuture<'static, BTreeMap<NodeId, Option<Vec<ShardStatus>>>> {
        Member::reports(self, nodes)
    }

    fn add_replica(&self, node: NodeId, shard: ShardId) -> BoxFuture<'static, Result<(), String>> {
        let here = self.clone();
        self.on(node, async move { here.add_here(shard).await }, |wire| wire.add_replica(node, shard))
    }

    fn change_replicas(
        &self,
        leader: NodeId,
        shard: ShardId,
        add: Option<NodeId>,
        remove: Option<NodeId>,
    ) -> BoxFuture<'static, Result<Option<u64>, String>> {
        let here = self.clone();
        let timeout = self.catch_up + CALL_TIMEOUT;
        self.on(leader, async move { here.change_here(shard, add, remove).await }, |wire| {
            wire.change_replicas(leader, shard, add, remove, timeout)
        })
    }

    fn hand_off(&self, leader: NodeId, shard: ShardId, to: NodeId) -> BoxFuture<'static, Result<(), String>> {
        let here = self.clone();
        self.on(leader, async move { here.hand_off_here(shard, to).await }, |wire| {
            wire.hand_off(leader, shard, to, HANDOFF_WAIT * 3 + CALL_TIMEOUT)
        })
    }

    fn drop_replica(
        &self,
        node: NodeId,
        shard: ShardId,
        removed_as_of: Option<u64>,
    ) -> BoxFuture<'static, Result<(), String>> {
        let here = self.clone();
        self.on(node, async move { here.drop_here(shard, removed_as_of).await }, |wire| {
            wire.drop_replica(node, shard, removed_as_of)
        })
    }
}
