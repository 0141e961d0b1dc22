//! The cluster as an operator sees it from any member: `conflux status`
//! (every member's report of its replicas, merged with the shape the metadata
//! group records) and `conflux drain` (recorded in the metadata group, carried
//! out by the placement driver).

use super::member::Member;
use super::placement::NodeState;
use super::raft::NodeId;
use super::shape::{Health, draining_write};
use super::shards::{ShardSummary, merge_status};
use crate::log::LogError;

/// One member as `conflux status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    pub node: NodeId,
    /// Where the others reach it (empty if the shape does not know).
    pub address: String,
    /// `up`, `draining`, `suspect`, `down` or `unreachable`.
    pub state: &'static str,
    pub shards_led: u32,
    pub replicas: u32,
}

/// What `conflux status` shows of a cluster.
#[derive(Debug, Clone)]
pub struct Gathered {
    pub nodes: Vec<MemberStatus>,
    pub shards: Vec<ShardSummary>,
    /// The replica moves running, as the layout records them.
    pub moves: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error("node {node} is not a member of the cluster (members: {members:?})")]
    NoSuchNode { node: NodeId, members: Vec<NodeId> },
    #[error("the last member cannot be drained")]
    LastNode,
    #[error("recording the drain: {0}")]
    NotCommitted(#[source] LogError),
}

/// The cluster as `conflux status` shows it, gathered from every member.
pub struct ClusterView {
    member: Member,
}

impl ClusterView {
    pub fn new(member: Member) -> Self {
        Self { member }
    }

    pub fn node(&self) -> NodeId {
        self.member.node
    }

    /// Every member's state and every shard's replicas, leader and lag.
    pub async fn gather(&self) -> Gathered {
        let shape = self.member.shape.get();
        let reports = self.member.reports(shape.members.keys().copied().collect()).await;
        let (nodes, shards) = merge_status(&reports);
        let nodes = nodes
            .into_iter()
            .map(|n| {
                let state = match (shape.state(n.node), n.up) {
                    (NodeState::Draining, _) => "draining",
                    (_, true) => "up",
                    (_, false) => match shape.layout.health.get(&n.node) {
                        Some(Health::Suspect) => "suspect",
                        Some(Health::Down) => "down",
                        _ => "unreachable",
                    },
                };
                MemberStatus {
                    node: n.node,
                    address: shape.members.get(&n.node).cloned().unwrap_or_default(),
                    state,
                    shards_led: n.leads,
                    replicas: n.replicas,
                }
            })
            .collect();
        Gathered { nodes, shards, moves: shape.layout.moves.iter().map(ToString::to_string).collect() }
    }

    /// Records that `node` drains (unless it already does); the placement
    /// driver then moves its replicas and leaderships away. Returns how many
    /// replicas it holds as the layout records them.
    pub async fn drain(&self, node: NodeId) -> Result<u32, DrainError> {
        let shape = self.member.shape.get();
        if !shape.members.contains_key(&node) {
            let members: Vec<NodeId> = shape.members.keys().copied().collect();
            return Err(DrainError::NoSuchNode { node, members });
        }
        if !shape.draining.contains(&node) {
            let others = shape.members.keys().filter(|n| **n != node && !shape.draining.contains(n)).count();
            if others == 0 {
                return Err(DrainError::LastNode);
            }
            self.member.meta_log.propose(draining_write(node, true)).await.map_err(DrainError::NotCommitted)?;
            tracing::info!(node, "draining");
        }
        Ok(shape.layout.placement.iter().filter(|r| r.contains(&node)).count() as u32)
    }
}
