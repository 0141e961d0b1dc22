//! The cluster's shape, as the metadata group records it, and each node's
//! cached copy. Members and their addresses are the metadata group's own
//! membership: a node belongs to the cluster exactly while it is a voter or
//! learner of that group. Beside it, records under `cluster/` keys of the
//! group's registry keyspace hold which members are being drained and the
//! *layout* the metadata leader's placement driver last observed: where each
//! shard's replicas are, which moves are running and how healthy each member
//! is. Plain data and its encoding; no I/O.

use super::placement::{Move, NodeState, Placement};
use super::raft::{NodeId, ShardId};
use crate::model::{Keyspace, Op, WriteSet};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::RwLock;

/// `cluster/draining/<id>` exists while member `<id>` is being drained.
pub const DRAINING_KEY_PREFIX: &str = "cluster/draining/";
/// The driver's last observed layout (JSON [`Layout`]).
pub const LAYOUT_KEY: &str = "cluster/layout";

/// How the failure detector last judged a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Up,
    Suspect,
    Down,
}

/// One replica move, as recorded while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveRecord {
    pub shard: ShardId,
    pub add: Option<NodeId>,
    pub remove: Option<NodeId>,
}

impl From<Move> for MoveRecord {
    fn from(m: Move) -> Self {
        Self { shard: m.shard, add: m.add, remove: m.remove }
    }
}

impl std::fmt::Display for MoveRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "shard {}:", self.shard)?;
        if let Some(a) = self.add {
            write!(f, " +{a}")?;
        }
        if let Some(r) = self.remove {
            write!(f, " -{r}")?;
        }
        Ok(())
    }
}

/// What the placement driver last observed and decided.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// Voters of each shard (index = shard id), as its leader reported them.
    pub placement: Vec<Vec<NodeId>>,
    /// Moves running now.
    pub moves: Vec<MoveRecord>,
    /// Per member; a member missing here has not been judged yet (up).
    pub health: BTreeMap<NodeId, Health>,
}

impl Layout {
    /// The write that records this layout in the metadata group.
    pub fn write_set(&self) -> WriteSet {
        let value = serde_json::to_vec(self).expect("a layout serialises");
        WriteSet { ops: vec![Op::Put { keyspace: Keyspace::Registry, key: LAYOUT_KEY.as_bytes().to_vec(), value }] }
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// The write that starts (or, with `draining = false`, cancels) a drain.
pub fn draining_write(node: NodeId, draining: bool) -> WriteSet {
    let keyspace = Keyspace::Registry;
    let key = format!("{DRAINING_KEY_PREFIX}{node}").into_bytes();
    let op = if draining { Op::Put { keyspace, key, value: Vec::new() } } else { Op::Delete { keyspace, key } };
    WriteSet { ops: vec![op] }
}

/// The node a `cluster/draining/<id>` key names.
pub fn draining_node(key: &[u8]) -> Option<NodeId> {
    std::str::from_utf8(key).ok()?.strip_prefix(DRAINING_KEY_PREFIX)?.parse().ok()
}

/// The whole shape at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shape {
    /// Every member (voter or learner of the metadata group) and its address.
    pub members: BTreeMap<NodeId, String>,
    pub draining: BTreeSet<NodeId>,
    pub layout: Layout,
}

impl Shape {
    /// A member's state for placement: draining wins over health.
    pub fn state(&self, node: NodeId) -> NodeState {
        if self.draining.contains(&node) {
            return NodeState::Draining;
        }
        match self.layout.health.get(&node) {
            None | Some(Health::Up) => NodeState::Up,
            Some(Health::Suspect) => NodeState::Suspect,
            Some(Health::Down) => NodeState::Down,
        }
    }

    pub fn states(&self) -> BTreeMap<NodeId, NodeState> {
        self.members.keys().map(|n| (*n, self.state(*n))).collect()
    }

    pub fn placement(&self) -> Placement {
        Placement { shards: self.layout.placement.clone() }
    }

    /// The replicas of `shard` as last recorded (empty if unknown).
    pub fn replicas(&self, shard: ShardId) -> Vec<NodeId> {
        self.layout.placement.get(shard as usize).cloned().unwrap_or_default()
    }
}

/// A node's current copy of the shape, replaced whole as its metadata replica
/// applies changes.
#[derive(Debug, Default)]
pub struct ClusterShape(RwLock<Shape>);

impl ClusterShape {
    pub fn new(shape: Shape) -> Self {
        Self(RwLock::new(shape))
    }

    pub fn get(&self) -> Shape {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn replicas(&self, shard: ShardId) -> Vec<NodeId> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).replicas(shard)
    }

    pub fn members(&self) -> Vec<NodeId> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).members.keys().copied().collect()
    }

    pub fn set(&self, shape: Shape) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = shape;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draining_wins_over_health_and_unknown_members_are_up() {
        let mut shape = Shape {
            members: BTreeMap::from([(1, "a:1".into()), (2, "b:1".into()), (3, "c:1".into())]),
            ..Default::default()
        };
        shape.layout.health = BTreeMap::from([(2, Health::Down), (3, Health::Suspect)]);
        shape.draining.insert(3);
        let states = shape.states();
        assert_eq!(states[&1], NodeState::Up);
        assert_eq!(states[&2], NodeState::Down);
        assert_eq!(states[&3], NodeState::Draining);
    }

    #[test]
    fn records_round_trip() {
        let layout = Layout {
            placement: vec![vec![1, 2], vec![2, 3]],
            moves: vec![MoveRecord { shard: 1, add: Some(4), remove: Some(3) }],
            health: BTreeMap::from([(3, Health::Suspect)]),
        };
        let ws = layout.write_set();
        let Op::Put { key, value, .. } = &ws.ops[0] else { panic!("a put") };
        assert_eq!(key, LAYOUT_KEY.as_bytes());
        assert_eq!(Layout::decode(value).unwrap(), layout);
        assert_eq!(layout.moves[0].to_string(), "shard 1: +4 -3");
        let Op::Put { key, .. } = &draining_write(7, true).ops[0] else { panic!("a put") };
        assert_eq!(draining_node(key), Some(7));
        assert!(matches!(draining_write(7, false).ops[0], Op::Delete { .. }));
        assert_eq!(draining_node(b"cluster/layout"), None);
    }
}
