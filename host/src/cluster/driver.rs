//! Moving shard replicas while the cluster serves. `change_replicas` is the
//! shard leader's side of one move: add a learner, wait until it has caught up
//! (by snapshot and log), then replace the voters in one joint-consensus
//! change, so a shard never has fewer up-to-date voters than before.
//!
//! `PlacementDriver` runs on every member and acts only on the metadata
//! group's leader. Each round it asks every member for its replicas (its
//! failure detector: a member that does not answer becomes suspect, then
//! down after the grace period), records the layout it observed in the
//! metadata group, removes stale replicas, promotes joined members to
//! metadata voters and lets drained members leave, and starts the moves
//! `placement::next_moves` plans and the leadership handoffs
//! `placement::next_leader_moves` plans (off draining members at once,
//! spreading only once replicas are), at most `max_concurrent_moves` at once.
//! It reaches members through [`Mover`]; the decisions are `placement`'s.

use super::placement::{LeaderMove, Move, NodeState, Placement, next_leader_moves, next_moves};
use super::raft::{NodeId, Raft, ShardId};
use super::shape::{ClusterShape, Health, Layout, MoveRecord, Shape, draining_write};
use super::sharded::LocalShard;
use super::shards::ShardStatus;
use crate::log::CommitLog;
use futures::future::BoxFuture;
use openraft::{BasicNode, ChangeMembers};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// What the driver asks of members (itself included).
pub trait Mover: Send + Sync + 'static {
    /// Each node's report of its replicas; `None` if it did not answer.
    fn reports(&self, nodes: Vec<NodeId>) -> BoxFuture<'static, BTreeMap<NodeId, Option<Vec<ShardStatus>>>>;
    /// Opens an empty replica of `shard` on `node`.
    fn add_replica(&self, node: NodeId, shard: ShardId) -> BoxFuture<'static, Result<(), String>>;
    /// Has `leader` add and remove one replica of `shard` ([`change_replicas`]);
    /// returns the log index of the membership that took effect, if any.
    fn change_replicas(
        &self,
        leader: NodeId,
        shard: ShardId,
        add: Option<NodeId>,
        remove: Option<NodeId>,
    ) -> BoxFuture<'static, Result<Option<u64>, String>>;
    /// Has `leader` hand `shard`'s leadership to `to` ([`super::handoff`]).
    fn hand_off(&self, leader: NodeId, shard: ShardId, to: NodeId) -> BoxFuture<'static, Result<(), String>>;
    /// Drops `node`'s replica of `shard`; `removed_as_of` is the log index of
    /// a membership that leaves the node out (see `LocalShards::drop_replica`).
    fn drop_replica(
        &self,
        node: NodeId,
        shard: ShardId,
        removed_as_of: Option<u64>,
    ) -> BoxFuture<'static, Result<(), String>>;
}

/// Tries at dropping a moved replica, `DROP_PAUSE` apart.
const DROP_ATTEMPTS: u32 = 20;
const DROP_PAUSE: Duration = Duration::from_millis(100);

/// How long a shard whose leadership was just handed off is left alone by
/// balancing. Under faults leaders change by election all the time; without
/// a pause the balancer would chase them, pausing shards for each handoff.
const BALANCE_COOLDOWN: Duration = Duration::from_secs(10);

/// Entries a metadata learner may lag and still be promoted to voter.
const PROMOTE_WITHIN_ENTRIES: u64 = 16;

/// On the leader of a shard: adds `add` and removes `remove` as voters. A new
/// replica is first a learner and becomes a voter only once it has the log
/// up to its own addition (or `catch_up` runs out: the move fails and the
/// learner is cleaned up later). Removing a node that is only a learner
/// removes it outright. Returns the log index of the membership that took
/// effect (`None` if nothing changed): what a drop of the removed replica is
/// fenced by.
pub async fn change_replicas(
    raft: &Raft,
    addrs: &BTreeMap<NodeId, String>,
    add: Option<NodeId>,
    remove: Option<NodeId>,
    catch_up: Duration,
) -> Result<Option<u64>, String> {
    let m = raft.metrics().borrow().clone();
    if super::raft::leader_of(&m) != Some(m.id) {
        return Err(format!("node {} does not lead this shard (leader: {:?})", m.id, super::raft::leader_of(&m)));
    }
    let membership = m.membership_config.membership().clone();
    let before: BTreeSet<NodeId> = membership.voter_ids().collect();
    let mut voters = before.clone();
    if let Some(a) = add.filter(|a| !before.contains(a)) {
        let addr = addrs.get(&a).ok_or_else(|| format!("node {a} is not a member of the cluster"))?;
        let added = raft.add_learner(a, BasicNode::new(addr), false).await.map_err(|e| e.to_string())?;
        let at = added.log_id.index;
        raft.wait(Some(catch_up))
            .metrics(|m| super::raft::matched_index(m, a).is_some_and(|i| i >= at), "the new replica caught up")
            .await
            .map_err(|e| format!("replica on node {a} did not catch up: {e}"))?;
        voters.insert(a);
    }
    if let Some(r) = remove {
        voters.remove(&r);
    }
    if voters.is_empty() {
        return Err("a shard keeps at least one replica".into());
    }
    let changed = if voters != before {
        raft.change_membership(ChangeMembers::ReplaceAllVoters(voters), false).await.map_err(|e| e.to_string())?
    } else if let Some(r) = remove.filter(|r| membership.learner_ids().any(|l| l == *r)) {
        raft.change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([r])), false)
            .await
            .map_err(|e| e.to_string())?
    } else {
        return Ok(None);
    };
    Ok(Some(changed.log_id.index))
}

/// The driver's settings (from `[cluster]`).
#[derive(Debug, Clone)]
pub struct DriverConfig {
    pub shard_count: u32,
    pub replication_factor: usize,
    pub max_concurrent_moves: usize,
    pub interval: Duration,
    pub suspect_after: Duration,
    pub down_after: Duration,
    /// The longest one move may take, catching up included.
    pub move_timeout: Duration,
}

/// Moves this driver started and when moves last ended, per shard.
#[derive(Default)]
struct Moves {
    running: BTreeMap<ShardId, MoveRecord>,
    /// Leadership handoffs under way.
    handoffs: BTreeMap<ShardId, LeaderMove>,
    /// When each shard's last handoff ended: a shard is not rebalanced again
    /// within `BALANCE_COOLDOWN` (bounded by the shard count).
    handed_at: BTreeMap<ShardId, Instant>,
    /// Bumped when a move ends; a round ignores shards whose move ended
    /// after it asked for reports (the reports may predate the move).
    ended: BTreeMap<ShardId, u64>,
    generation: u64,
}

pub struct PlacementDriver {
    me: NodeId,
    meta: LocalShard,
    meta_log: Arc<dyn CommitLog>,
    shape: Arc<ClusterShape>,
    mover: Arc<dyn Mover>,
    cfg: DriverConfig,
    moves: Arc<Mutex<Moves>>,
    /// Wakes the loop when a move ends, so the next one starts at once.
    ended: Arc<tokio::sync::Notify>,
}

/// What the leader of one shard reported.
struct Led {
    leader: NodeId,
    term: u64,
    voters: Vec<NodeId>,
    learners: Vec<NodeId>,
    /// The log index of the membership the leader reported.
    membership_index: Option<u64>,
}

impl PlacementDriver {
    pub fn new(
        me: NodeId,
        meta: LocalShard,
        meta_log: Arc<dyn CommitLog>,
        shape: Arc<ClusterShape>,
        mover: Arc<dyn Mover>,
        cfg: DriverConfig,
    ) -> Self {
        Self { me, meta, meta_log, shape, mover, cfg, moves: Arc::default(), ended: Arc::default() }
    }

    fn moves(&self) -> std::sync::MutexGuard<'_, Moves> {
        self.moves.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs until the task is aborted.
    pub async fn run(self) {
        let mut last_seen: BTreeMap<NodeId, Instant> = BTreeMap::new();
        let mut up_since: BTreeMap<NodeId, Instant> = BTreeMap::new();
        let mut leading_since: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.interval) => {}
                _ = self.ended.notified() => {}
            }
            if self.meta.ready_term(self.me).is_none() {
                leading_since = None;
                continue;
            }
            let since = *leading_since.get_or_insert_with(Instant::now);
            if let Err(e) = self.round(&mut last_seen, &mut up_since, since).await {
                tracing::warn!("placement round: {e}");
            }
        }
    }

    /// `up_since`: when each member last became up (it answered after not
    /// answering), so leaderships are not handed to a member just back.
    async fn round(
        &self,
        last_seen: &mut BTreeMap<NodeId, Instant>,
        up_since: &mut BTreeMap<NodeId, Instant>,
        since: Instant,
    ) -> Result<(), String> {
        let shape = self.shape.get();
        let members: Vec<NodeId> = shape.members.keys().copied().collect();
        let generation = self.moves().generation;
        let reports = self.mover.reports(members.clone()).await;

        // Failure detection: a member is judged from when it last answered,
        // or from when this node began to lead (it knows nothing earlier).
        let now = Instant::now();
        last_seen.retain(|n, _| shape.members.contains_key(n));
        up_since.retain(|n, _| shape.members.contains_key(n));
        let mut health = BTreeMap::new();
        for n in &members {
            if reports.get(n).is_some_and(Option::is_some) {
                last_seen.insert(*n, now);
            }
            let quiet = now - last_seen.get(n).copied().unwrap_or(since).max(since);
            let h = if quiet >= self.cfg.down_after {
                Health::Down
            } else if quiet >= self.cfg.suspect_after {
                Health::Suspect
            } else {
                Health::Up
            };
            if h == Health::Up {
                up_since.entry(*n).or_insert(now);
            } else {
                up_since.remove(n);
            }
            health.insert(*n, h);
        }

        // The placement as the shards' leaders report it.
        let mut placement = shape.layout.placement.clone();
        placement.resize(self.cfg.shard_count as usize, Vec::new());
        let mut led: BTreeMap<ShardId, Led> = BTreeMap::new();
        for (node, report) in &reports {
            for s in report.iter().flatten() {
                let newer = led.get(&s.shard).is_none_or(|l| l.term < s.term);
                if s.leader == Some(*node) && (s.shard as usize) < placement.len() && newer {
                    let (voters, learners) = (s.replicas.clone(), s.learners.clone());
                    led.insert(
                        s.shard,
                        Led { leader: *node, term: s.term, voters, learners, membership_index: s.membership_index },
                    );
                }
            }
        }
        for (shard, l) in &led {
            placement[*shard as usize] = l.voters.clone();
        }
        let (running, settled) = {
            let moves = self.moves();
            let settled: BTreeSet<ShardId> = led
                .keys()
                .copied()
                .filter(|s| !moves.running.contains_key(s) && !moves.handoffs.contains_key(s))
                .filter(|s| moves.ended.get(s).is_none_or(|g| *g <= generation))
                .collect();
            (moves.running.clone(), settled)
        };
        let handing_off = self.moves().handoffs.len();
        // Clean-up waits until this driver has led longer than a move can
        // take: until then, a replica it does not know may be one that an
        // earlier driver's move is adding.
        if now - since > self.cfg.move_timeout + self.cfg.interval {
            self.clean_up(&reports, &led, &settled);
        }
        self.tend_metadata(&shape, &placement, &running).await;

        let layout = Layout { placement: placement.clone(), moves: running.values().copied().collect(), health };
        if layout != shape.layout {
            self.meta_log.propose(layout.write_set()).await.map_err(|e| format!("recording the layout: {e}"))?;
        }

        let room = self.cfg.max_concurrent_moves.saturating_sub(running.len() + handing_off);
        if room == 0 {
            return Ok(());
        }
        let states = Shape { members: shape.members.clone(), draining: shape.draining.clone(), layout }.states();
        let placement = Placement { shards: placement };
        let planned = next_moves(&states, &placement, self.cfg.replication_factor, usize::MAX);
        // Leaderships: off draining members first (so their replicas then
        // move without an election), and spread once replicas are.
        let leaders: Vec<Option<NodeId>> = (0..self.cfg.shard_count).map(|s| led.get(&s).map(|l| l.leader)).collect();
        // Balancing waits for a calm cluster: replicas settled, every member
        // up for a while (a member just back is still catching up), and the
        // shard not handed off lately.
        let calm = planned.is_empty()
            && running.is_empty()
            && states.values().all(|s| matches!(s, NodeState::Up | NodeState::Draining))
            && up_since.values().all(|t| t.elapsed() >= BALANCE_COOLDOWN);
        let cooled = |s: ShardId| self.moves().handed_at.get(&s).is_none_or(|t| t.elapsed() >= BALANCE_COOLDOWN);
        let handoffs: Vec<LeaderMove> = next_leader_moves(&states, &placement, &leaders, usize::MAX)
            .into_iter()
            .filter(|h| settled.contains(&h.shard))
            .filter(|h| states.get(&h.from) == Some(&NodeState::Draining) || (calm && cooled(h.shard)))
            .take(room)
            .collect();
        let room = room - handoffs.len();
        let mut busy = BTreeSet::new();
        for h in handoffs {
            busy.insert(h.shard);
            self.start_handoff(h);
        }
        // A joined member still learning the metadata is not ready for replicas.
        let learning: BTreeSet<NodeId> =
            self.meta.raft.metrics().borrow().membership_config.membership().learner_ids().collect();
        let adds_up = |m: &Move| m.add.is_none_or(|a| states.get(&a) == Some(&NodeState::Up) && !learning.contains(&a));
        for m in planned
            .into_iter()
            .filter(|m| settled.contains(&m.shard) && !busy.contains(&m.shard) && adds_up(m))
            .take(room)
        {
            // A member that does not answer cannot drop its replica now; it is
            // dropped as stale when the member is back.
            let reachable =
                m.remove.is_some_and(|r| matches!(states.get(&r), Some(NodeState::Up | NodeState::Draining)));
            self.start(m, led[&m.shard].leader, reachable);
        }
        Ok(())
    }

    /// Drops replicas a shard's leader does not count (left behind by a
    /// move whose last step failed, or on a member that was down while its
    /// replicas were re-created elsewhere) and learners no move is adding.
    fn clean_up(
        &self,
        reports: &BTreeMap<NodeId, Option<Vec<ShardStatus>>>,
        led: &BTreeMap<ShardId, Led>,
        settled: &BTreeSet<ShardId>,
    ) {
        for (node, report) in reports {
            for s in report.iter().flatten() {
                let Some(l) = led.get(&s.shard).filter(|_| settled.contains(&s.shard)) else { continue };
                if !l.voters.contains(node) && !l.learners.contains(node) {
                    tracing::info!(node, shard = s.shard, "dropping a stale replica");
                    let (mover, node, shard, removed_as_of) = (self.mover.clone(), *node, s.shard, l.membership_index);
                    tokio::spawn(async move {
                        if let Err(e) = mover.drop_replica(node, shard, removed_as_of).await {
                            tracing::warn!(node, shard, "dropping a stale replica: {e}");
                        }
                    });
                }
            }
        }
        for (shard, l) in led.iter().filter(|(s, _)| settled.contains(s)) {
            for learner in &l.learners {
                tracing::info!(node = learner, shard, "removing a stale learner");
                let (mover, leader, shard, learner) = (self.mover.clone(), l.leader, *shard, *learner);
                tokio::spawn(async move {
                    if let Err(e) = mover.change_replicas(leader, shard, None, Some(learner)).await {
                        tracing::warn!(shard, "removing a stale learner: {e}");
                    }
                });
            }
        }
    }

    /// Promotes joined members that have caught up to metadata voters, and
    /// lets a drained member (no replicas left, no move touching it) leave.
    async fn tend_metadata(&self, shape: &Shape, placement: &[Vec<NodeId>], running: &BTreeMap<ShardId, MoveRecord>) {
        let m = self.meta.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership().clone();
        let last = m.last_log_index.unwrap_or(0);
        for learner in membership.learner_ids() {
            if super::raft::matched_index(&m, learner).is_some_and(|i| i + PROMOTE_WITHIN_ENTRIES >= last) {
                let change = ChangeMembers::AddVoterIds(BTreeSet::from([learner]));
                match tokio::time::timeout(self.cfg.move_timeout, self.meta.raft.change_membership(change, false)).await
                {
                    Ok(Ok(_)) => tracing::info!(node = learner, "a joined member now votes in the metadata group"),
                    Ok(Err(e)) => tracing::warn!(node = learner, "promoting a joined member: {e}"),
                    Err(_) => tracing::warn!(node = learner, "promoting a joined member timed out"),
                }
            }
        }
        for node in &shape.draining {
            let holds = placement.iter().any(|r| r.contains(node));
            let moving = running.values().any(|m| m.add == Some(*node) || m.remove == Some(*node));
            let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
            if !membership.nodes().any(|(n, _)| n == node) {
                // Left earlier, and clearing its record failed then.
                if let Err(e) = self.meta_log.propose(draining_write(*node, false)).await {
                    tracing::warn!(node, "clearing the drain record: {e}");
                }
                continue;
            }
            if holds || moving || !voters.contains(node) || voters.len() == 1 {
                continue;
            }
            let change = ChangeMembers::RemoveVoters(BTreeSet::from([*node]));
            let left = tokio::time::timeout(self.cfg.move_timeout, self.meta.raft.change_membership(change, false));
            match left.await {
                Ok(Ok(_)) => {
                    tracing::info!(node, "a drained member left the cluster");
                    if let Err(e) = self.meta_log.propose(draining_write(*node, false)).await {
                        tracing::warn!(node, "clearing the drain record: {e}");
                    }
                }
                Ok(Err(e)) => tracing::warn!(node, "letting a drained member leave: {e}"),
                Err(_) => tracing::warn!(node, "letting a drained member leave timed out"),
            }
        }
    }

    fn start_handoff(&self, h: LeaderMove) {
        tracing::info!(shard = h.shard, from = h.from, to = h.to, "handing a leadership off");
        self.moves().handoffs.insert(h.shard, h);
        let (mover, moves, ended) = (self.mover.clone(), self.moves.clone(), self.ended.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let done = mover.hand_off(h.from, h.shard, h.to).await;
            match &done {
                Ok(()) => tracing::info!(
                    shard = h.shard,
                    to = h.to,
                    ms = started.elapsed().as_millis() as u64,
                    "handed a leadership off"
                ),
                Err(e) => tracing::warn!(shard = h.shard, to = h.to, "leadership handoff failed (retried later): {e}"),
            }
            let mut moves = moves.lock().unwrap_or_else(|e| e.into_inner());
            moves.handoffs.remove(&h.shard);
            moves.handed_at.insert(h.shard, Instant::now());
            moves.generation += 1;
            let g = moves.generation;
            moves.ended.insert(h.shard, g);
            drop(moves);
            if done.is_ok() {
                ended.notify_one();
            }
        });
    }

    fn start(&self, m: Move, leader: NodeId, drop_removed: bool) {
        tracing::info!(shard = m.shard, add = ?m.add, remove = ?m.remove, "moving a replica");
        self.moves().running.insert(m.shard, m.into());
        let (mover, moves, ended, timeout) =
            (self.mover.clone(), self.moves.clone(), self.ended.clone(), self.cfg.move_timeout);
        tokio::spawn(async move {
            let started = Instant::now();
            let steps = async {
                if let Some(a) = m.add {
                    mover.add_replica(a, m.shard).await?;
                }
                let removed_as_of = mover.change_replicas(leader, m.shard, m.add, m.remove).await?;
                if let Some(r) = m.remove.filter(|_| drop_removed) {
                    // A removed leader steps down once it has applied the
                    // change; until then it refuses to drop its replica.
                    for attempt in 1..=DROP_ATTEMPTS {
                        // Fenced by the change that removed it: another
                        // driver (the metadata group's leader changed) may
                        // add the node back meanwhile, and a replica that
                        // votes again must keep its data.
                        match mover.drop_replica(r, m.shard, removed_as_of).await {
                            Ok(()) => break,
                            Err(e) if attempt == DROP_ATTEMPTS => {
                                tracing::warn!(shard = m.shard, node = r, "the moved replica is dropped later: {e}")
                            }
                            Err(_) => tokio::time::sleep(DROP_PAUSE).await,
                        }
                    }
                }
                Ok::<_, String>(())
            };
            let moved = match tokio::time::timeout(timeout, steps).await {
                Ok(Ok(())) => {
                    tracing::info!(shard = m.shard, ms = started.elapsed().as_millis() as u64, "moved a replica");
                    true
                }
                Ok(Err(e)) => {
                    tracing::warn!(shard = m.shard, "replica move failed (retried later): {e}");
                    false
                }
                Err(_) => {
                    tracing::warn!(shard = m.shard, "replica move timed out after {timeout:?} (retried later)");
                    false
                }
            };
            let mut moves = moves.lock().unwrap_or_else(|e| e.into_inner());
            moves.running.remove(&m.shard);
            moves.generation += 1;
            let g = moves.generation;
            moves.ended.insert(m.shard, g);
            drop(moves);
            // The next move starts at once; a failed one waits for the next
            // round, so a member that refuses does not draw a storm of retries.
            if moved {
                ended.notify_one();
            }
        });
    }
}
