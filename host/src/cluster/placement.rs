//! Shard placement as pure functions of membership and the current placement:
//! which shard an entity lives in, where a new cluster puts each shard's
//! replicas, and which replica moves bring a cluster back to its replication
//! factor and to balance after nodes join, drain or die. No I/O: the cluster
//! layer feeds these decisions to Raft membership changes.

use std::collections::{BTreeMap, BTreeSet};

/// A node's id in the cluster (stable across restarts).
pub type NodeId = u64;
/// A shard's index, `0..shard_count`.
pub type ShardId = u32;

/// How the failure detector and the operator see a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NodeState {
    /// Serving; may receive replicas.
    Up,
    /// Missed heartbeats: keeps its replicas, receives no new ones.
    Suspect,
    /// Down longer than the grace period: its replicas are re-created elsewhere.
    Down,
    /// Being drained by an operator: its replicas move away.
    Draining,
}

impl NodeState {
    /// Whether the node may be given replicas.
    fn accepts_replicas(self) -> bool {
        self == NodeState::Up
    }

    /// Whether the node's replicas count toward the replication factor.
    fn holds_replicas(self) -> bool {
        matches!(self, NodeState::Up | NodeState::Suspect)
    }
}

/// The replicas of every shard; index = shard id. The first replica is the
/// preferred leader.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Placement {
    pub shards: Vec<Vec<NodeId>>,
}

/// One step toward the target placement, for one shard. The cluster carries
/// it out as "add `add` as a learner, let it catch up, promote it, then remove
/// `remove`", so a shard never has fewer up-to-date replicas than before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    pub shard: ShardId,
    pub add: Option<NodeId>,
    pub remove: Option<NodeId>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("a cluster needs at least one shard")]
    NoShards,
    #[error("a cluster needs at least one node")]
    NoNodes,
    #[error("the replication factor must be at least 1")]
    NoReplicas,
    #[error("node {0} is listed twice")]
    DuplicateNode(NodeId),
}

/// The shard of entity `(entity_type, id)` among `shard_count` shards: a
/// stable hash (SHA-256, so it never changes across versions or platforms) of
/// the type and id, separated by a byte no type name contains.
pub fn shard_of(entity_type: &str, id: &str, shard_count: u32) -> ShardId {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(entity_type.as_bytes());
    h.update([0u8]);
    h.update(id.as_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) % u64::from(shard_count.max(1))) as ShardId
}

/// The placement of a new cluster: each shard gets `min(replication_factor,
/// nodes)` replicas on distinct nodes, replicas and preferred leaders spread
/// evenly (node loads differ by at most one).
pub fn initial_placement(
    nodes: &[NodeId],
    shard_count: u32,
    replication_factor: usize,
) -> Result<Placement, PlacementError> {
    check_inputs(nodes, shard_count, replication_factor)?;
    let mut nodes = nodes.to_vec();
    nodes.sort_unstable();
    let rf = replication_factor.min(nodes.len());
    let shards = (0..shard_count as usize).map(|s| (0..rf).map(|k| nodes[(s + k) % nodes.len()]).collect()).collect();
    Ok(Placement { shards })
}

fn check_inputs(nodes: &[NodeId], shard_count: u32, replication_factor: usize) -> Result<(), PlacementError> {
    if shard_count == 0 {
        return Err(PlacementError::NoShards);
    }
    if nodes.is_empty() {
        return Err(PlacementError::NoNodes);
    }
    if replication_factor == 0 {
        return Err(PlacementError::NoReplicas);
    }
    let mut seen = BTreeSet::new();
    for n in nodes {
        if !seen.insert(*n) {
            return Err(PlacementError::DuplicateNode(*n));
        }
    }
    Ok(())
}

/// Up to `max_moves` moves toward the target placement, most urgent first:
/// 1. repair: a shard with fewer live replicas (on up or suspect nodes) than
///    the replication factor gets one on the least loaded up node holding none
///    of its replicas, replacing a replica on a down or draining node if it has
///    one; a shard with enough live replicas drops such a replica, or, above
///    the factor, its replica on the most loaded node;
/// 2. balance: replicas move from the most to the least loaded up node until
///    loads differ by at most one.
///
/// At most one move per shard is returned (a shard changes one replica at a
/// time). An empty result means the placement is at its target. A node not in
/// `members` is treated as down.
pub fn next_moves(
    members: &BTreeMap<NodeId, NodeState>,
    placement: &Placement,
    replication_factor: usize,
    max_moves: usize,
) -> Vec<Move> {
    let state = |n: &NodeId| members.get(n).copied().unwrap_or(NodeState::Down);
    let holders = members.values().filter(|s| s.holds_replicas()).count();
    let rf = replication_factor.min(holders).max(1);
    // Replicas per up node, updated as moves are planned.
    let mut load: BTreeMap<NodeId, usize> =
        members.iter().filter(|(_, s)| s.accepts_replicas()).map(|(n, _)| (*n, 0)).collect();
    for r in placement.shards.iter().flatten() {
        if let Some(l) = load.get_mut(r) {
            *l += 1;
        }
    }
    let mut moves = Vec::new();
    let mut moved = BTreeSet::new();

    // 1. Repair.
    for (s, replicas) in placement.shards.iter().enumerate() {
        if moves.len() == max_moves {
            return moves;
        }
        let shard = s as ShardId;
        let live = replicas.iter().filter(|r| state(r).holds_replicas()).count();
        let gone = replicas.iter().copied().find(|r| !state(r).holds_replicas());
        let m = if live < rf {
            let to =
                load.iter().filter(|(n, _)| !replicas.contains(n)).min_by_key(|(n, l)| (**l, **n)).map(|(n, _)| *n);
            to.map(|to| Move { shard, add: Some(to), remove: gone })
        } else if gone.is_some() {
            Some(Move { shard, add: None, remove: gone })
        } else if live > rf {
            let busiest = replicas.iter().copied().max_by_key(|r| (load.get(r).copied().unwrap_or(usize::MAX), *r));
            Some(Move { shard, add: None, remove: busiest })
        } else {
            None
        };
        if let Some(m) = m {
            if let Some(l) = m.add.and_then(|n| load.get_mut(&n)) {
                *l += 1;
            }
            if let Some(l) = m.remove.and_then(|n| load.get_mut(&n)) {
                *l -= 1;
            }
            moves.push(m);
            moved.insert(s);
        }
    }
    // 2. Balance: from the most loaded up node to the least loaded one.
    while moves.len() < max_moves {
        let Some((&hi, &hi_load)) = load.iter().max_by_key(|(n, l)| (**l, std::cmp::Reverse(**n))) else { break };
        let Some((&lo, &lo_load)) = load.iter().min_by_key(|(n, l)| (**l, **n)) else { break };
        if hi_load <= lo_load + 1 {
            break;
        }
        // Some shard on `hi` lacks `lo` (else `lo` would carry at least as
        // much); it may only be taken this round already.
        let candidate = placement
            .shards
            .iter()
            .enumerate()
            .find(|(s, replicas)| !moved.contains(s) && replicas.contains(&hi) && !replicas.contains(&lo));
        let Some((s, _)) = candidate else { break };
        *load.get_mut(&hi).expect("hi is up") -= 1;
        *load.get_mut(&lo).expect("lo is up") += 1;
        moves.push(Move { shard: s as ShardId, add: Some(lo), remove: Some(hi) });
        moved.insert(s);
    }
    moves
}

/// The placement after `m` has completed. An added replica takes the removed
/// one's position, so a preferred leader that moves keeps leadership spread.
pub fn apply_move(placement: &mut Placement, m: Move) {
    let Some(replicas) = placement.shards.get_mut(m.shard as usize) else { return };
    let slot = m.remove.and_then(|r| replicas.iter().position(|x| *x == r));
    match (m.add.filter(|a| !replicas.contains(a)), slot) {
        (Some(add), Some(i)) => replicas[i] = add,
        (Some(add), None) => replicas.push(add),
        (None, Some(i)) => {
            replicas.remove(i);
        }
        (None, None) => {}
    }
}

/// The shortest chain of handoffs (breadth first, shards in order) that
/// takes one leadership from `x` to an up member leading at least two fewer.
fn handoff_path(
    x: NodeId,
    led: &BTreeMap<NodeId, usize>,
    placement: &Placement,
    current: &[Option<NodeId>],
    moved: &BTreeSet<usize>,
    up: &dyn Fn(&NodeId) -> bool,
) -> Option<Vec<LeaderMove>> {
    let mut via: BTreeMap<NodeId, LeaderMove> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([x]);
    while let Some(u) = queue.pop_front() {
        if u != x && led[&u] + 2 <= led[&x] {
            let mut path = vec![via[&u]];
            while path.last().expect("not empty").from != x {
                path.push(via[&path.last().expect("not empty").from]);
            }
            path.reverse();
            return Some(path);
        }
        for (shard, replicas) in placement.shards.iter().enumerate() {
            if current[shard] != Some(u) || moved.contains(&shard) {
                continue;
            }
            for v in replicas {
                if up(v) && *v != x && !via.contains_key(v) {
                    via.insert(*v, LeaderMove { shard: shard as ShardId, from: u, to: *v });
                    queue.push_back(*v);
                }
            }
        }
    }
    None
}

/// One leadership handoff: `from`, which leads `shard`, lets `to`, another
/// replica of it, take over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaderMove {
    pub shard: ShardId,
    pub from: NodeId,
    pub to: NodeId,
}

/// Handoffs that spread shard leaderships over the up members, at most
/// `max_moves`, moving as few as it can. `leaders[s]` is who leads shard `s`
/// now (`None`: unknown or an election). A leader on a draining member hands
/// off to the up replica leading fewest; then, while a chain of handoffs
/// (`x` leads a shard of which `z` is a replica, `z` one of which `y` is...)
/// takes a leadership from the member leading most to one leading at least
/// two fewer, it plans that chain. Each chain lowers the sum of squared
/// counts, so repeating it ends.
pub fn next_leader_moves(
    members: &BTreeMap<NodeId, NodeState>,
    placement: &Placement,
    leaders: &[Option<NodeId>],
    max_moves: usize,
) -> Vec<LeaderMove> {
    let up = |n: &NodeId| members.get(n) == Some(&NodeState::Up);
    let mut led: BTreeMap<NodeId, usize> = members.keys().filter(|n| up(n)).map(|n| (*n, 0)).collect();
    let mut current: Vec<Option<NodeId>> = leaders.to_vec();
    current.resize(placement.shards.len(), None);
    for l in current.iter().flatten() {
        if let Some(c) = led.get_mut(l) {
            *c += 1;
        }
    }
    let mut moves = Vec::new();
    let least_loaded_up = |led: &BTreeMap<NodeId, usize>, replicas: &[NodeId], not: NodeId| {
        replicas.iter().filter(|r| **r != not && up(r)).min_by_key(|r| (led[*r], **r)).copied()
    };
    // Leaders on draining members.
    for (shard, replicas) in placement.shards.iter().enumerate() {
        if moves.len() >= max_moves {
            return moves;
        }
        let Some(from) = current[shard].filter(|l| members.get(l) == Some(&NodeState::Draining)) else { continue };
        if let Some(to) = least_loaded_up(&led, replicas, from) {
            moves.push(LeaderMove { shard: shard as ShardId, from, to });
            *led.get_mut(&to).expect("up") += 1;
            current[shard] = Some(to);
        }
    }
    // Balance among the up members: from the member leading most, follow
    // "leads a shard of which the next is an up replica" until a member
    // leading at least two fewer; handing off along that path moves one
    // leadership from the first to the last and leaves the rest even.
    let mut moved: BTreeSet<usize> = moves.iter().map(|m| m.shard as usize).collect();
    'balance: while moves.len() < max_moves {
        let mut sources: Vec<NodeId> = led.keys().copied().collect();
        sources.sort_by_key(|n| (std::cmp::Reverse(led[n]), *n));
        for x in sources {
            let Some(path) = handoff_path(x, &led, placement, &current, &moved, &up) else { continue };
            if moves.len() + path.len() > max_moves && !moves.is_empty() {
                break 'balance;
            }
            for m in path {
                current[m.shard as usize] = Some(m.to);
                moved.insert(m.shard as usize);
                moves.push(m);
            }
            let to = moves.last().expect("a path has a step").to;
            *led.get_mut(&x).expect("up") -= 1;
            *led.get_mut(&to).expect("up") += 1;
            continue 'balance;
        }
        break;
    }
    moves
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn members(states: &[(NodeId, NodeState)]) -> BTreeMap<NodeId, NodeState> {
        states.iter().copied().collect()
    }

    fn loads(p: &Placement) -> BTreeMap<NodeId, usize> {
        let mut l = BTreeMap::new();
        for r in p.shards.iter().flatten() {
            *l.entry(*r).or_default() += 1;
        }
        l
    }

    /// Runs `next_moves` to a fixpoint, checking after every move that no
    /// shard has a node twice and none lost a live replica.
    fn settle(m: &BTreeMap<NodeId, NodeState>, mut p: Placement, rf: usize) -> (Placement, usize) {
        let live = |p: &Placement, s: usize| {
            p.shards[s].iter().filter(|r| m.get(r).is_some_and(|st| st.holds_replicas())).count()
        };
        for round in 0..10_000 {
            let moves = next_moves(m, &p, rf, 4);
            if moves.is_empty() {
                return (p, round);
            }
            let mut shards = BTreeSet::new();
            for mv in moves {
                assert!(shards.insert(mv.shard), "two moves for one shard in a round");
                let before = live(&p, mv.shard as usize);
                apply_move(&mut p, mv);
                let r = &p.shards[mv.shard as usize];
                assert_eq!(r.iter().collect::<BTreeSet<_>>().len(), r.len(), "duplicate replica after {mv:?}: {r:?}");
                assert!(live(&p, mv.shard as usize) >= before.min(rf), "{mv:?} lost a live replica");
            }
        }
        panic!("placement did not converge");
    }

    #[test]
    fn shards_are_stable_and_spread() {
        assert_eq!(shard_of("counter", "c1", 64), shard_of("counter", "c1", 64));
        assert_ne!(shard_of("a", "bc", 1 << 20), shard_of("ab", "c", 1 << 20), "the separator matters");
        let mut per_shard = vec![0u32; 64];
        for i in 0..64_000 {
            per_shard[shard_of("user", &i.to_string(), 64) as usize] += 1;
        }
        assert!(per_shard.iter().all(|n| (800..1200).contains(n)), "{per_shard:?}");
    }

    #[test]
    fn initial_placement_is_even_and_distinct() {
        let p = initial_placement(&[3, 1, 2], 64, 3).unwrap();
        assert!(p.shards.iter().all(|r| r.len() == 3 && r.iter().collect::<BTreeSet<_>>().len() == 3));
        assert_eq!(loads(&p).values().copied().collect::<Vec<_>>(), [64, 64, 64]);
        let leaders = p.shards.iter().fold(BTreeMap::<NodeId, usize>::new(), |mut m, r| {
            *m.entry(r[0]).or_default() += 1;
            m
        });
        assert!(leaders.values().all(|n| (21..=22).contains(n)), "{leaders:?}");
        // A smaller cluster gets fewer replicas, never two on one node.
        let p = initial_placement(&[7], 4, 3).unwrap();
        assert!(p.shards.iter().all(|r| r == &[7]));
        assert_eq!(initial_placement(&[1, 1], 4, 3), Err(PlacementError::DuplicateNode(1)));
        assert_eq!(initial_placement(&[], 4, 3), Err(PlacementError::NoNodes));
        assert_eq!(initial_placement(&[1], 0, 3), Err(PlacementError::NoShards));
    }

    #[test]
    fn a_settled_placement_needs_no_moves() {
        let m = members(&[(1, NodeState::Up), (2, NodeState::Up), (3, NodeState::Up)]);
        let p = initial_placement(&[1, 2, 3], 64, 3).unwrap();
        assert!(next_moves(&m, &p, 3, 100).is_empty());
    }

    #[test]
    fn joining_nodes_receive_an_even_share() {
        let p = initial_placement(&[1, 2, 3], 64, 3).unwrap();
        let m = members(&[
            (1, NodeState::Up),
            (2, NodeState::Up),
            (3, NodeState::Up),
            (4, NodeState::Up),
            (5, NodeState::Up),
        ]);
        let (p, _) = settle(&m, p, 3);
        let l = loads(&p);
        assert_eq!(l.values().sum::<usize>(), 192);
        assert!(l.values().all(|n| (38..=39).contains(n)), "{l:?}");
    }

    #[test]
    fn a_drained_node_ends_with_nothing_and_a_dead_one_is_replaced() {
        let p = initial_placement(&[1, 2, 3, 4], 16, 3).unwrap();
        let m = members(&[(1, NodeState::Up), (2, NodeState::Draining), (3, NodeState::Up), (4, NodeState::Up)]);
        let (drained, _) = settle(&m, p.clone(), 3);
        assert!(!loads(&drained).contains_key(&2));
        assert!(drained.shards.iter().all(|r| r.len() == 3));
        let m = members(&[(1, NodeState::Up), (2, NodeState::Down), (3, NodeState::Up), (4, NodeState::Up)]);
        let (healed, _) = settle(&m, p, 3);
        assert!(healed.shards.iter().all(|r| r.len() == 3 && !r.contains(&2)), "{healed:?}");
    }

    #[test]
    fn suspect_nodes_keep_their_replicas_but_get_no_new_ones() {
        let p = initial_placement(&[1, 2, 3], 8, 3).unwrap();
        let m = members(&[(1, NodeState::Up), (2, NodeState::Suspect), (3, NodeState::Up), (4, NodeState::Up)]);
        let moves = next_moves(&m, &p, 3, 100);
        assert!(!moves.is_empty(), "node 4 takes a share");
        assert!(moves.iter().all(|mv| mv.add != Some(2) && mv.remove != Some(2)), "{moves:?}");
    }

    /// Repeats `next_leader_moves` until it plans nothing; checks each move.
    fn settle_leaders(
        m: &BTreeMap<NodeId, NodeState>,
        p: &Placement,
        mut leaders: Vec<Option<NodeId>>,
    ) -> Vec<Option<NodeId>> {
        for _ in 0..10_000 {
            let moves = next_leader_moves(m, p, &leaders, 3);
            if moves.is_empty() {
                return leaders;
            }
            for mv in moves {
                assert_eq!(leaders[mv.shard as usize], Some(mv.from), "{mv:?} does not start at the leader");
                assert!(p.shards[mv.shard as usize].contains(&mv.to), "{mv:?} goes to a non-replica");
                assert_eq!(m.get(&mv.to), Some(&NodeState::Up), "{mv:?} goes to a member that is not up");
                leaders[mv.shard as usize] = Some(mv.to);
            }
        }
        panic!("leaderships did not converge");
    }

    fn lead_counts(m: &BTreeMap<NodeId, NodeState>, leaders: &[Option<NodeId>]) -> Vec<usize> {
        let up = m.iter().filter(|(_, s)| **s == NodeState::Up).map(|(n, _)| *n);
        up.map(|n| leaders.iter().filter(|l| **l == Some(n)).count()).collect()
    }

    #[test]
    fn leaders_move_off_a_grown_clusters_old_members_and_off_draining_ones() {
        // 3 → 5: replicas already spread, every leader still on the first three.
        let m5 = members(&[
            (1, NodeState::Up),
            (2, NodeState::Up),
            (3, NodeState::Up),
            (4, NodeState::Up),
            (5, NodeState::Up),
        ]);
        let (p, _) = settle(&m5, initial_placement(&[1, 2, 3], 64, 3).unwrap(), 3);
        let leaders: Vec<Option<NodeId>> =
            p.shards.iter().map(|r| r.iter().copied().filter(|n| *n <= 3).min()).collect();
        let settled = settle_leaders(&m5, &p, leaders);
        let counts = lead_counts(&m5, &settled);
        assert!(counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1, "{counts:?}");

        // Node 2 drains: it leads nothing once an up replica can take over.
        let mut m = m5.clone();
        m.insert(2, NodeState::Draining);
        let after = settle_leaders(&m, &p, settled);
        assert!(after.iter().all(|l| *l != Some(2)), "{after:?}");
        // Nothing to do when balanced.
        assert!(next_leader_moves(&m, &p, &after, 8).is_empty());
    }

    fn state() -> impl Strategy<Value = NodeState> {
        prop_oneof![
            6 => Just(NodeState::Up),
            1 => Just(NodeState::Suspect),
            1 => Just(NodeState::Down),
            1 => Just(NodeState::Draining),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// From any valid placement and any membership: moves never put two
        /// replicas of a shard on one node nor drop a live replica below the
        /// factor, and they converge to full replication on up nodes with
        /// loads within one of each other.
        #[test]
        fn moves_converge_to_a_balanced_valid_placement(
            initial_nodes in 1u64..7,
            extra in 0u64..4,
            states in proptest::collection::vec(state(), 10),
            shards in 1u32..40,
            rf in 1usize..4,
        ) {
            let nodes: Vec<NodeId> = (1..=initial_nodes).collect();
            let p = initial_placement(&nodes, shards, rf).unwrap();
            let m: BTreeMap<NodeId, NodeState> =
                (1..=initial_nodes + extra).map(|n| (n, states[n as usize % states.len()])).collect();
            let up: BTreeSet<NodeId> = m.iter().filter(|(_, s)| **s == NodeState::Up).map(|(n, _)| *n).collect();
            prop_assume!(!up.is_empty());
            let (settled, _) = settle(&m, p, rf);
            let holders = m.values().filter(|s| s.holds_replicas()).count();
            let eff_rf = rf.min(holders);
            // Every shard can be fully repaired when up nodes alone suffice.
            if up.len() >= eff_rf {
                for r in &settled.shards {
                    let live = r.iter().filter(|n| matches!(m.get(n), Some(NodeState::Up | NodeState::Suspect))).count();
                    prop_assert_eq!(live, eff_rf, "{:?} of {:?}", r, m);
                    prop_assert_eq!(r.len(), eff_rf, "nothing left on down or draining nodes: {:?}", r);
                }
            }
            let l: Vec<usize> = up.iter().map(|n| settled.shards.iter().filter(|r| r.contains(n)).count()).collect();
            prop_assert!(l.iter().max().unwrap() - l.iter().min().unwrap() <= 1, "loads {l:?}");
        }

        /// From any leaders on a settled placement: handoffs only go to up
        /// replicas, end, leave no leader on a draining member where an up
        /// replica could lead, and leave no pair that one handoff would
        /// bring closer.
        #[test]
        fn leader_moves_converge_to_spread_leaderships(
            nodes in 1u64..8,
            states in proptest::collection::vec(state(), 8),
            shards in 1u32..40,
            rf in 1usize..4,
            picks in proptest::collection::vec(0usize..3, 40),
        ) {
            let ids: Vec<NodeId> = (1..=nodes).collect();
            let m: BTreeMap<NodeId, NodeState> = ids.iter().map(|n| (*n, states[*n as usize % states.len()])).collect();
            prop_assume!(m.values().any(|s| *s == NodeState::Up));
            let (p, _) = settle(&m, initial_placement(&ids, shards, rf).unwrap(), rf);
            let leaders: Vec<Option<NodeId>> =
                p.shards.iter().enumerate().map(|(s, r)| r.get(picks[s % picks.len()] % r.len().max(1)).copied()).collect();
            let settled = settle_leaders(&m, &p, leaders);
            let up = |n: &NodeId| m.get(n) == Some(&NodeState::Up);
            let counts: BTreeMap<NodeId, usize> =
                m.keys().filter(|n| up(n)).map(|n| (*n, settled.iter().filter(|l| **l == Some(*n)).count())).collect();
            for (s, r) in p.shards.iter().enumerate() {
                let Some(l) = settled[s] else { continue };
                let draining = m.get(&l) == Some(&NodeState::Draining);
                prop_assert!(!draining || !r.iter().any(up), "shard {} led by draining {}", s, l);
                if up(&l) {
                    for y in r.iter().filter(|y| up(y)) {
                        prop_assert!(counts[y] + 1 >= counts[&l], "shard {} could move from {} to {}: {:?}", s, l, y, counts);
                    }
                }
            }
        }
    }
}
