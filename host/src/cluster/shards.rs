//! `ShardSet`: the shard replicas one node holds. It opens them from a
//! placement (a pure decision of `placement`), makes them reachable through
//! the node's `ReplicaTable`, forms each new group from its first replica,
//! and reports per shard who leads, the term, what is applied and how far
//! each follower lags. The scheduler and the API build on it.

use super::placement::Placement;
use super::raft::{NodeId, Replica, ReplicaError, ReplicaHost, ReplicaTable, ShardId};
use openraft::BasicNode;
use std::collections::BTreeMap;
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum ShardSetError {
    #[error("shard {shard}: {source}")]
    Replica { shard: ShardId, source: Box<ReplicaError> },
    #[error("shard {shard}: cannot form the group: {message}")]
    Initialize { shard: ShardId, message: String },
    #[error("node {node} has no address")]
    NoAddress { node: NodeId },
    #[error("this node's replicas are fixed")]
    Fixed,
    #[error("shard {shard}: this node leads it, so it is still a member")]
    StillLeading { shard: ShardId },
    #[error("shard {shard}: this node was added back to the group (membership at index {known}), so it is a member")]
    AddedBack { shard: ShardId, known: u64 },
    #[error("shard {shard}: cannot delete the replica's data: {message}")]
    Delete { shard: ShardId, message: String },
    #[error("the node's WAL: {0}")]
    Wal(#[source] std::io::Error),
}

/// One shard as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardStatus {
    pub shard: ShardId,
    /// The node reporting.
    pub node: NodeId,
    /// Voting members of the group.
    pub replicas: Vec<NodeId>,
    /// Members that receive the log without voting (replicas being added).
    pub learners: Vec<NodeId>,
    pub leader: Option<NodeId>,
    pub term: u64,
    /// Raft index of the last entry applied here.
    pub applied_index: Option<u64>,
    /// On the leader only: entries each follower is behind the leader's log.
    pub lag: BTreeMap<NodeId, u64>,
    /// Log index of the group membership this replica knows.
    pub membership_index: Option<u64>,
}

/// One node in a cluster-wide status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSummary {
    pub node: NodeId,
    /// It answered the status request.
    pub up: bool,
    pub leads: u32,
    pub replicas: u32,
}

/// One shard in a cluster-wide status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSummary {
    pub shard: ShardId,
    pub replicas: Vec<NodeId>,
    pub leader: Option<NodeId>,
    /// Entries the furthest-behind replica lacks (a replica on a node that did
    /// not answer counts as behind by everything its leader reports).
    pub lag: u64,
}

/// Merges what each member reported of its replicas (`None`: it did not
/// answer) into one view: the leader's report wins for its shard, since only
/// the leader knows each follower's lag.
pub fn merge_status(reports: &BTreeMap<NodeId, Option<Vec<ShardStatus>>>) -> (Vec<NodeSummary>, Vec<ShardSummary>) {
    let mut by_shard: BTreeMap<ShardId, Vec<&ShardStatus>> = BTreeMap::new();
    for r in reports.values().flatten().flatten() {
        by_shard.entry(r.shard).or_default().push(r);
    }
    let shards: Vec<ShardSummary> = by_shard
        .into_iter()
        .map(|(shard, views)| {
            let leading = views.iter().find(|v| v.leader == Some(v.node));
            match leading {
                Some(l) => ShardSummary {
                    shard,
                    replicas: l.replicas.clone(),
                    leader: Some(l.node),
                    lag: l.lag.values().copied().max().unwrap_or(0),
                },
                // No leader answered: compare what the replicas applied.
                None => {
                    let applied = views.iter().map(|v| v.applied_index.unwrap_or(0));
                    let lag = applied.clone().max().unwrap_or(0) - applied.min().unwrap_or(0);
                    ShardSummary { shard, replicas: views[0].replicas.clone(), leader: None, lag }
                }
            }
        })
        .collect();
    let nodes = reports
        .iter()
        .map(|(node, report)| NodeSummary {
            node: *node,
            up: report.is_some(),
            leads: shards.iter().filter(|s| s.leader == Some(*node)).count() as u32,
            replicas: shards.iter().filter(|s| s.replicas.contains(node)).count() as u32,
        })
        .collect();
    (nodes, shards)
}

/// The replicas of one node, by shard. Bounded by the cluster's shard count.
pub struct ShardSet {
    host: ReplicaHost,
    table: ReplicaTable,
    replicas: Mutex<BTreeMap<ShardId, Replica>>,
}

impl std::fmt::Debug for ShardSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardSet").field("node", &self.host.node).finish_non_exhaustive()
    }
}

impl ShardSet {
    /// Opens this node's replicas under `placement` and registers them in
    /// `table`, where the node's cluster service finds them.
    pub async fn open(host: ReplicaHost, placement: &Placement, table: ReplicaTable) -> Result<Self, ShardSetError> {
        let mut replicas = BTreeMap::new();
        for (shard, nodes) in placement.shards.iter().enumerate() {
            let shard = shard as ShardId;
            if nodes.contains(&host.node) {
                let replica = host
                    .open(shard)
                    .await
                    .map_err(|source| ShardSetError::Replica { shard, source: Box::new(source) })?;
                table.insert(shard, replica.raft.clone());
                replicas.insert(shard, replica);
            }
        }
        Ok(Self { host, table, replicas: Mutex::new(replicas) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<ShardId, Replica>> {
        self.replicas.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn node(&self) -> NodeId {
        self.host.node
    }

    pub fn replica(&self, shard: ShardId) -> Option<Replica> {
        self.lock().get(&shard).cloned()
    }

    pub fn shards(&self) -> Vec<ShardId> {
        self.lock().keys().copied().collect()
    }

    /// Opens this node's replica of `shard` (an empty one if it never had
    /// one: a leader adds it as a learner and sends it a snapshot and the log)
    /// and makes it reachable. Opening one that is open returns it.
    pub async fn open_replica(&self, shard: ShardId) -> Result<Replica, ShardSetError> {
        if let Some(r) = self.replica(shard) {
            return Ok(r);
        }
        let replica =
            self.host.open(shard).await.map_err(|source| ShardSetError::Replica { shard, source: Box::new(source) })?;
        self.table.insert(shard, replica.raft.clone());
        self.lock().insert(shard, replica.clone());
        Ok(replica)
    }

    /// Stops this node's replica of `shard` and deletes its data (WAL,
    /// snapshot and sled tree): its group no longer counts this node. Refused
    /// while this node leads the group.
    pub async fn close_replica(&self, shard: ShardId) -> Result<(), ShardSetError> {
        let Some(replica) = self.replica(shard) else { return Ok(()) };
        if super::raft::leader_of(&replica.raft.metrics().borrow()) == Some(self.host.node) {
            return Err(ShardSetError::StillLeading { shard });
        }
        self.lock().remove(&shard);
        self.table.remove(shard);
        if let Err(e) = replica.raft.shutdown().await {
            tracing::warn!(shard, "stopping shard replica: {e}");
        }
        // Its data is deleted: the store's apply buffer must not be written
        // to the dropped tree when the store's last handle goes.
        replica.state.store().close_discarding();
        let delete = |message: String| ShardSetError::Delete { shard, message };
        self.host.db.drop_tree(format!("shard-{shard}")).map_err(|e| delete(e.to_string()))?;
        let dir = super::raft::replica_dir(&self.host.data_dir, shard);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(delete(format!("{}: {e}", dir.display()))),
        }
        // The removal must reach the disk: a replica directory that comes
        // back after a power cut is opened again as a member of the group.
        match dir.parent().map(std::fs::File::open) {
            Some(Ok(parent)) => parent.sync_all().map_err(|e| delete(format!("{}: fsync: {e}", dir.display())))?,
            Some(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
            Some(Err(e)) => return Err(delete(format!("{}: {e}", dir.display()))),
            None => {}
        }
        // Only then is its log dropped from the node's WAL: a power cut in
        // between leaves a log without a directory, which the next start
        // forgets (`NodeWal::retain_shards`), never a member without its log.
        self.host.wal.remove_shard(shard).map_err(|e| delete(format!("WAL: {e}")))?;
        self.host.wal.sync().await.map_err(|e| delete(format!("WAL: {e}")))
    }

    /// How many fdatasyncs the node's WAL has made.
    pub fn wal_fdatasyncs(&self) -> u64 {
        self.host.wal.fdatasyncs()
    }

    /// Forgets, in the node's WAL, the logs of shards this set has no
    /// replica of (and that are not `also`): removals a power cut cut short.
    pub fn forget_other_logs(&self, also: &[ShardId]) -> Result<(), ShardSetError> {
        let mut keep = self.shards();
        keep.extend_from_slice(also);
        let forgotten = self.host.wal.retain_shards(&keep).map_err(ShardSetError::Wal)?;
        if !forgotten.is_empty() {
            tracing::info!(?forgotten, "dropped the WAL logs of replicas whose removal a crash interrupted");
        }
        Ok(())
    }

    /// Forms the groups this node is the first replica of, once: a group that
    /// already has state (a restart) is left alone. `addrs` names every node.
    pub async fn bootstrap(
        &self,
        placement: &Placement,
        addrs: &BTreeMap<NodeId, String>,
    ) -> Result<(), ShardSetError> {
        for (shard, nodes) in placement.shards.iter().enumerate() {
            let shard = shard as ShardId;
            if nodes.first() != Some(&self.host.node) {
                continue;
            }
            let Some(replica) = self.replica(shard) else { continue };
            let init = |message: String| ShardSetError::Initialize { shard, message };
            if replica.raft.is_initialized().await.map_err(|e| init(e.to_string()))? {
                continue;
            }
            let mut members = BTreeMap::new();
            for node in nodes {
                let addr = addrs.get(node).ok_or(ShardSetError::NoAddress { node: *node })?;
                members.insert(*node, BasicNode::new(addr));
            }
            replica.raft.initialize(members).await.map_err(|e| init(e.to_string()))?;
        }
        Ok(())
    }

    /// Who leads `shard`, as this node's replica believes.
    pub fn leader(&self, shard: ShardId) -> Option<NodeId> {
        self.replica(shard).and_then(|r| super::raft::leader_of(&r.raft.metrics().borrow()))
    }

    pub fn status(&self) -> Vec<ShardStatus> {
        self.lock()
            .values()
            .map(|r| {
                let m = r.raft.metrics().borrow().clone();
                let last = m.last_log_index.unwrap_or(0);
                let lag = m
                    .replication
                    .iter()
                    .flatten()
                    .filter(|(node, _)| **node != m.id)
                    .map(|(node, matched)| (*node, last.saturating_sub(matched.map_or(0, |id| id.index))))
                    .collect();
                ShardStatus {
                    shard: r.shard,
                    node: m.id,
                    replicas: m.membership_config.membership().voter_ids().collect(),
                    learners: m.membership_config.membership().learner_ids().collect(),
                    leader: super::raft::leader_of(&m),
                    term: m.current_term,
                    applied_index: m.last_applied.map(|id| id.index),
                    lag,
                    membership_index: m.membership_config.log_id().map(|id| id.index),
                }
            })
            .collect()
    }

    /// Stops every replica and unregisters it. In-flight writes fail.
    pub async fn shutdown(&self) {
        let replicas: Vec<Replica> = std::mem::take(&mut *self.lock()).into_values().collect();
        for r in replicas {
            self.table.remove(r.shard);
            if let Err(e) = r.raft.shutdown().await {
                tracing::warn!(shard = r.shard, "stopping shard replica: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(node: NodeId, shard: ShardId, leader: Option<NodeId>, applied: u64, lag: &[(NodeId, u64)]) -> ShardStatus {
        ShardStatus {
            shard,
            node,
            replicas: vec![1, 2, 3],
            learners: vec![],
            leader,
            term: 1,
            applied_index: Some(applied),
            lag: lag.iter().copied().collect(),
            membership_index: None,
        }
    }

    #[test]
    fn the_leaders_report_wins_and_silent_nodes_are_down() {
        let reports = BTreeMap::from([
            (1, Some(vec![view(1, 0, Some(1), 10, &[(2, 0), (3, 7)]), view(1, 1, None, 4, &[])])),
            (2, Some(vec![view(2, 0, Some(1), 10, &[]), view(2, 1, None, 9, &[])])),
            (3, None),
        ]);
        let (nodes, shards) = merge_status(&reports);
        assert_eq!(shards[0], ShardSummary { shard: 0, replicas: vec![1, 2, 3], leader: Some(1), lag: 7 });
        assert_eq!(shards[1], ShardSummary { shard: 1, replicas: vec![1, 2, 3], leader: None, lag: 5 });
        assert_eq!(nodes[0], NodeSummary { node: 1, up: true, leads: 1, replicas: 2 });
        assert_eq!(nodes[2], NodeSummary { node: 3, up: false, leads: 0, replicas: 2 });
    }
}
