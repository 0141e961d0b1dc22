//! A clustered node's view of its shard replicas as one store and one commit
//! log, and its router. Every store key names its entity
//! ([`crate::model::entity_of_key`]), so `LocalShards` sends a read or a write
//! to the replica of that entity's shard; the scheduler above it does not know
//! there are shards. Scans that span entities (the outbox, due timers, expired
//! idempotency records, entity listings) merge the shards this node leads and
//! has caught up on, so background work runs exactly where the turns run.
//! `ClusterRouter` tells the scheduler where each entity's turns run and
//! forwards the rest through [`Peers`] (`super::wire`).

use super::placement::shard_of;
use super::raft::{NodeId, Raft, ShardId, ShardLog};
use super::shape::ClusterShape;
use super::shards::{ShardSet, ShardSetError};
use super::wire::Peers;
use crate::log::{CommitLog, LogConfig, LogError, LogStats};
use crate::model::{EntityRef, Keyspace, LogIndex, WriteSet, entity_of_key};
use crate::scheduler::{Invocation, InvokeError, Route, Router};
use crate::storage::{KvPairs, ScanPage, SledStore, StateStore, StorageError};
use futures::future::BoxFuture;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// Confirms a leadership openraft restored on restart. Such a leader has
/// no new entry of its own: its last applied entry may be of its term and
/// yet its store may lack entries committed before the stop (sled is synced
/// lazily; the WAL replays them once they commit again), or the others may
/// have elected a new leader meanwhile. An empty entry committed in the
/// restored term settles both: everything before it has applied, and a
/// majority still follows this term. If it fails, the term has moved on and
/// the restored one is never served.
async fn confirm_restored_lead(raft: Raft, term: u64, check: Arc<tokio::sync::watch::Sender<LeadCheck>>) {
    let outcome = match raft.client_write(super::raft::ShardWrite::default()).await {
        Ok(r) if r.log_id.leader_id.term == term => {
            tracing::info!(term, "confirmed the leadership restored on restart");
            LeadCheck::Confirmed
        }
        Ok(_) => LeadCheck::Over(term),
        Err(e) => {
            tracing::info!(term, "the leadership restored on restart is over: {e}");
            LeadCheck::Over(term)
        }
    };
    check.send_replace(outcome);
}

/// Where the check of a leadership restored on restart stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LeadCheck {
    /// Nothing to confirm (no leadership was restored), or confirmed.
    Confirmed,
    /// The restored term, while its empty entry is on its way.
    Pending(u64),
    /// The restored term, which was not confirmed: never served.
    Over(u64),
}

impl LeadCheck {
    /// The restored term that must not be served (yet).
    fn unconfirmed_term(self) -> Option<u64> {
        match self {
            LeadCheck::Confirmed => None,
            LeadCheck::Pending(t) | LeadCheck::Over(t) => Some(t),
        }
    }
}

/// One replica this node holds.
#[derive(Clone)]
pub struct LocalShard {
    pub raft: Raft,
    pub store: Arc<SledStore>,
    pub log: Arc<ShardLog>,
    /// Set while this node hands the shard's leadership off
    /// ([`super::handoff`]): it runs no turns for it meanwhile.
    handing_off: Arc<AtomicBool>,
    /// The check of a leadership openraft restored when the replica opened
    /// ([`super::raft::Replica::restored_lead`]): its term is not served
    /// until an entry proposed since then has applied.
    lead_check: Arc<tokio::sync::watch::Sender<LeadCheck>>,
}

impl LocalShard {
    /// Must be called inside a tokio runtime: a restored leadership is
    /// confirmed by a background write.
    pub fn new(raft: Raft, store: Arc<SledStore>, log: Arc<ShardLog>) -> Self {
        let restored = log.restored_lead();
        let lead_check =
            Arc::new(tokio::sync::watch::Sender::new(restored.map_or(LeadCheck::Confirmed, LeadCheck::Pending)));
        if let Some(term) = restored {
            tokio::spawn(confirm_restored_lead(raft.clone(), term, lead_check.clone()));
        }
        Self { raft, store, log, handing_off: Arc::default(), lead_check }
    }

    /// Waits (at most `timeout`) until the leadership restored on restart,
    /// if any, is confirmed; an error if it was not (the term moved on) or
    /// the wait timed out. A group whose only voter is this node is
    /// confirmed within one commit: a node started alone waits for it
    /// before it serves, so its first reads see every shard it leads.
    pub async fn restored_lead_confirmed(&self, timeout: Duration) -> Result<(), String> {
        let mut check = self.lead_check.subscribe();
        let settled = tokio::time::timeout(timeout, check.wait_for(|c| !matches!(c, LeadCheck::Pending(_))))
            .await
            .map_err(|_| format!("the leadership restored on restart was not confirmed within {timeout:?}"))?
            .map_err(|e| e.to_string())?;
        match *settled {
            LeadCheck::Over(term) => Err(format!("the leadership of term {term} restored on restart is over")),
            _ => Ok(()),
        }
    }

    /// The term this node leads the shard in, once it has applied an entry of
    /// that term (so everything committed before it too) and while it is not
    /// handing the lead off; `None` otherwise.
    pub fn ready_term(&self, me: NodeId) -> Option<u64> {
        if self.handing_off.load(Ordering::Acquire) {
            return None;
        }
        let m = self.raft.metrics();
        let m = m.borrow();
        let caught_up = m.last_applied.is_some_and(|id| id.leader_id.term == m.current_term)
            && self.lead_check.borrow().unconfirmed_term() != Some(m.current_term);
        (super::raft::leader_of(&m) == Some(me) && caught_up).then_some(m.current_term)
    }

    pub(super) fn set_handing_off(&self, on: bool) {
        self.handing_off.store(on, Ordering::Release);
    }

    fn leader(&self) -> Option<NodeId> {
        super::raft::leader_of(&self.raft.metrics().borrow())
    }
}

/// This node's data shards, addressed by entity. Replicas come and go as the
/// placement driver moves them (`add_replica`, `drop_replica`).
pub struct LocalShards {
    node: NodeId,
    shard_count: u32,
    /// The recorded placement, for shards held elsewhere.
    shape: Arc<ClusterShape>,
    shards: RwLock<BTreeMap<ShardId, LocalShard>>,
    /// Opens and deletes replicas; `None` in tests that fix the replicas.
    set: Option<Arc<ShardSet>>,
    log_config: LogConfig,
    /// One replica added or dropped at a time.
    changes: tokio::sync::Mutex<()>,
}

impl LocalShards {
    pub fn new(
        node: NodeId,
        shard_count: u32,
        shape: Arc<ClusterShape>,
        shards: BTreeMap<ShardId, LocalShard>,
    ) -> Self {
        Self {
            node,
            shard_count,
            shape,
            shards: RwLock::new(shards),
            set: None,
            log_config: LogConfig::default(),
            changes: tokio::sync::Mutex::new(()),
        }
    }

    /// Lets replicas be added and dropped through `set`, their logs built
    /// with `log_config`.
    pub fn with_set(mut self, set: Arc<ShardSet>, log_config: LogConfig) -> Self {
        self.set = Some(set);
        self.log_config = log_config;
        self
    }

    pub fn shard_of(&self, entity: &EntityRef) -> ShardId {
        shard_of(&entity.entity_type, &entity.id, self.shard_count)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<ShardId, LocalShard>> {
        self.shards.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn replica(&self, shard: ShardId) -> Option<LocalShard> {
        self.read().get(&shard).cloned()
    }

    /// Opens a replica of `shard` here (empty, until its leader adds it).
    pub async fn add_replica(&self, shard: ShardId) -> Result<(), ShardSetError> {
        let set = self.set.as_ref().ok_or(ShardSetError::Fixed)?;
        let _one = self.changes.lock().await;
        if self.replica(shard).is_some() {
            return Ok(());
        }
        let replica = set.open_replica(shard).await?;
        let (raft, store) = (replica.raft.clone(), replica.state.store().clone());
        let log = Arc::new(ShardLog::new(replica, &self.log_config));
        self.shards.write().unwrap_or_else(|e| e.into_inner()).insert(shard, LocalShard::new(raft, store, log));
        tracing::info!(shard, "opened a replica");
        Ok(())
    }

    /// Stops this node's replica of `shard` and deletes its data.
    /// `removed_as_of` is the log index of a membership that left this node
    /// out: a replica that has since been added back (it knows a later
    /// membership naming it) is a member again and refuses. Without that
    /// check, a drop decided before a re-add and carried out after it would
    /// delete entries a majority counted on.
    pub async fn drop_replica(&self, shard: ShardId, removed_as_of: Option<u64>) -> Result<(), ShardSetError> {
        let set = self.set.as_ref().ok_or(ShardSetError::Fixed)?;
        let _one = self.changes.lock().await;
        if let Some(r) = self.replica(shard) {
            if r.leader() == Some(self.node) {
                return Err(ShardSetError::StillLeading { shard });
            }
            // Asked of the Raft core, not its metrics (published a step
            // later): an entry it has acknowledged is in what it answers.
            let me = self.node;
            let (known, named) = r
                .raft
                .with_raft_state(move |st| {
                    let e = st.membership_state.effective();
                    (e.log_id().map(|id| id.index), e.membership().nodes().any(|(id, _)| *id == me))
                })
                .await
                .map_err(|e| ShardSetError::Delete { shard, message: e.to_string() })?;
            if let (Some(known), Some(removed)) = (known, removed_as_of)
                && known > removed
                && named
            {
                return Err(ShardSetError::AddedBack { shard, known });
            }
        }
        self.shards.write().unwrap_or_else(|e| e.into_inner()).remove(&shard);
        set.close_replica(shard).await?;
        tracing::info!(shard, "dropped a replica");
        Ok(())
    }

    fn shard_of_key(&self, keyspace: Keyspace, key: &[u8]) -> Option<ShardId> {
        entity_of_key(keyspace, key).map(|(ty, id)| shard_of(ty, id, self.shard_count))
    }

    fn local(&self, shard: ShardId) -> Result<LocalShard, StorageError> {
        self.replica(shard).ok_or(StorageError::NotLocal { shard })
    }

    /// The shards whose background work (delivery, timers, sweeps) runs here.
    fn led(&self) -> Vec<LocalShard> {
        self.read().values().filter(|s| s.ready_term(self.node).is_some()).cloned().collect()
    }

    fn all(&self) -> Vec<LocalShard> {
        self.read().values().cloned().collect()
    }

    /// Every replica held here, by shard.
    pub fn replicas(&self) -> Vec<(ShardId, LocalShard)> {
        self.read().iter().map(|(s, r)| (*s, r.clone())).collect()
    }
}

impl StateStore for LocalShards {
    fn get(&self, keyspace: Keyspace, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        let shard = self
            .shard_of_key(keyspace, key)
            .ok_or(StorageError::Unsupported("this key belongs to no entity, so to no shard"))?;
        self.local(shard)?.store.get(keyspace, key)
    }

    fn scan(
        &self,
        keyspace: Keyspace,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<KvPairs, StorageError> {
        if let Some(shard) = self.shard_of_key(keyspace, prefix) {
            return self.local(shard)?.store.scan(keyspace, prefix, start_after, limit);
        }
        // Each shard's first `limit` keys hold the merged first `limit`.
        let mut all = Vec::new();
        for s in self.led() {
            all.extend(s.store.scan(keyspace, prefix, start_after, limit)?);
        }
        all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        all.truncate(limit);
        Ok(all)
    }

    fn scan_page(
        &self,
        keyspace: Keyspace,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<ScanPage, StorageError> {
        if let Some(shard) = self.shard_of_key(keyspace, prefix) {
            return self.local(shard)?.store.scan_page(keyspace, prefix, start_after, limit, max_bytes);
        }
        let mut pages = Vec::new();
        for s in self.led() {
            pages.push(s.store.scan_page(keyspace, prefix, start_after, limit, max_bytes)?);
        }
        Ok(crate::storage::merge_pages(pages, limit, max_bytes))
    }

    /// Shards apply independently; there is no node-wide index.
    fn applied_index(&self) -> Result<LogIndex, StorageError> {
        Ok(self.all().iter().map(|s| s.store.applied_index().unwrap_or(0)).sum())
    }

    fn persist(&self) -> Result<(), StorageError> {
        self.all().iter().try_for_each(|s| s.store.persist())
    }
}

impl LocalShards {
    /// Splits `ws` by shard and proposes each part to this node's replica,
    /// fenced by `fence_term` if given.
    fn propose_parts(&self, ws: WriteSet, fence_term: Option<u64>) -> BoxFuture<'static, Result<LogIndex, LogError>> {
        let mut parts: BTreeMap<ShardId, WriteSet> = BTreeMap::new();
        for op in ws.ops {
            let Some(shard) = self.shard_of_key(op.keyspace(), op.key()) else {
                return Box::pin(async { Err(LogError::Aborted("a write names no entity, so no shard".into())) });
            };
            parts.entry(shard).or_default().ops.push(op);
        }
        let mut proposals = Vec::with_capacity(parts.len());
        for (shard, part) in parts {
            match self.replica(shard) {
                Some(s) => proposals.push(match fence_term {
                    Some(epoch) => s.log.propose_fenced(part, epoch),
                    None => s.log.propose(part),
                }),
                None => {
                    let leader = self.shape.replicas(shard).first().copied();
                    return Box::pin(async move { Err(LogError::NotLeader { leader }) });
                }
            }
        }
        Box::pin(async move {
            let mut last = 0;
            for p in futures::future::join_all(proposals).await {
                last = last.max(p?);
            }
            Ok(last)
        })
    }
}

impl CommitLog for LocalShards {
    /// A turn's write set names one entity, so one shard, and commits
    /// atomically there. Background deletes that span entities are split by
    /// shard; each part commits on its own.
    fn propose(&self, ws: WriteSet) -> BoxFuture<'static, Result<LogIndex, LogError>> {
        self.propose_parts(ws, None)
    }

    /// A turn's write set, fenced by the term its leader read the entity in.
    fn propose_fenced(&self, ws: WriteSet, epoch: u64) -> BoxFuture<'static, Result<LogIndex, LogError>> {
        self.propose_parts(ws, Some(epoch))
    }

    /// A turn's write set names one entity, so one shard: placed in that
    /// shard's log. One spanning shards has no single order to hold a place
    /// in; it is proposed whole before it counts as placed.
    fn propose_in_order(&self, ws: WriteSet, epoch: u64) -> BoxFuture<'static, crate::log::Placed> {
        let mut shards = ws.ops.iter().map(|op| self.shard_of_key(op.keyspace(), op.key()));
        let first = shards.next().flatten();
        let one = first.filter(|&s| shards.all(|t| t == Some(s)));
        match one.map(|shard| (shard, self.replica(shard))) {
            Some((_, Some(s))) => s.log.propose_in_order(ws, epoch),
            Some((shard, None)) => {
                let leader = self.shape.replicas(shard).first().copied();
                Box::pin(async move { Err(LogError::NotLeader { leader }) })
            }
            None => {
                let outcome = self.propose_parts(ws, Some(epoch));
                Box::pin(async move {
                    let outcome = outcome.await;
                    Ok(Box::pin(async move { outcome }) as BoxFuture<'static, _>)
                })
            }
        }
    }

    fn confirm_lead(&self, entity: &EntityRef, epoch: u64) -> BoxFuture<'static, Result<(), LogError>> {
        match self.replica(self.shard_of(entity)) {
            Some(s) => s.log.confirm_lead(entity, epoch),
            None => Box::pin(async { Err(LogError::NotLeader { leader: None }) }),
        }
    }

    fn last_durable_index(&self) -> LogIndex {
        StateStore::applied_index(self).unwrap_or(0)
    }

    fn applied_index(&self) -> LogIndex {
        StateStore::applied_index(self).unwrap_or(0)
    }

    fn stats(&self) -> LogStats {
        let mut total = LogStats::default();
        for s in self.all() {
            let one = s.log.stats();
            total.proposals += one.proposals;
            total.sync_batches += one.sync_batches;
            total.largest_batch = total.largest_batch.max(one.largest_batch);
            total.largest_batch_bytes = total.largest_batch_bytes.max(one.largest_batch_bytes);
            total.bytes_written += one.bytes_written;
        }
        total.wal_fdatasyncs = self.set.as_ref().map_or(0, |set| set.wal_fdatasyncs());
        total
    }

    fn shutdown(&self) -> BoxFuture<'static, Result<(), LogError>> {
        let logs: Vec<Arc<ShardLog>> = self.all().into_iter().map(|s| s.log).collect();
        Box::pin(async move {
            for r in futures::future::join_all(logs.iter().map(|l| l.shutdown())).await {
                r?;
            }
            Ok(())
        })
    }
}

/// Where an entity's turns run on a cluster, and the hop to get there.
pub struct ClusterRouter {
    shards: Arc<LocalShards>,
    peers: Arc<dyn Peers>,
    forward_timeout: Duration,
    /// Leaders learned from refusals, for shards this node holds no replica
    /// of. Bounded by the shard count.
    hints: Mutex<BTreeMap<ShardId, NodeId>>,
}

impl ClusterRouter {
    pub fn new(shards: Arc<LocalShards>, peers: Arc<dyn Peers>, forward_timeout: Duration) -> Self {
        Self { shards, peers, forward_timeout, hints: Mutex::new(BTreeMap::new()) }
    }

    fn hints(&self) -> std::sync::MutexGuard<'_, BTreeMap<ShardId, NodeId>> {
        self.hints.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Router for ClusterRouter {
    fn route(&self, entity: &EntityRef) -> Route {
        let me = self.shards.node;
        let shard = self.shards.shard_of(entity);
        let local = self.shards.replica(shard);
        let local_leader = local.as_ref().and_then(|l| l.leader());
        if let Some(local) = &local {
            if let Some(epoch) = local.ready_term(me) {
                return Route::Here { epoch };
            }
            if local_leader == Some(me) {
                return Route::Unknown; // elected, not yet caught up: wait
            }
        }
        // A refusal's hint is fresher than a follower's view, which may be a
        // replica's that was removed from the group and never heard of it.
        // Never this node itself: it does not lead (or it would have
        // returned above), and forwarding to itself would only name itself
        // again to whoever asked (a loop the simulation found).
        if let Some(node) = self.hints().get(&shard).filter(|n| **n != me) {
            return Route::There { node: *node };
        }
        if let Some(node) = local_leader {
            return Route::There { node };
        }
        // Ask a replica; it names the leader if it is not.
        match self.shards.shape.replicas(shard).first() {
            Some(node) => Route::There { node: *node },
            None => Route::Unknown,
        }
    }

    fn forward(&self, node: NodeId, inv: Invocation) -> BoxFuture<'static, Result<Vec<u8>, InvokeError>> {
        self.peers.invoke(node, inv)
    }

    fn hint(&self, entity: &EntityRef, leader: Option<NodeId>) {
        let shard = self.shards.shard_of(entity);
        let mut hints = self.hints();
        // A replica that still believes this node leads is behind.
        match leader.filter(|l| *l != self.shards.node) {
            Some(l) => {
                hints.insert(shard, l);
            }
            None => {
                // No leader named, or the node asked is unreachable: ask the
                // shard's next replica.
                let me = self.shards.node;
                let replicas = self.shards.shape.replicas(shard);
                let current = hints.get(&shard).copied().or(replicas.first().copied());
                let pos = current.and_then(|c| replicas.iter().position(|r| *r == c)).unwrap_or(0);
                let others = replicas.iter().cycle().skip(pos + 1).take(replicas.len());
                match others.copied().find(|r| *r != me) {
                    Some(next) => {
                        hints.insert(shard, next);
                    }
                    None => {
                        hints.remove(&shard);
                    }
                }
            }
        }
    }

    fn forward_timeout(&self) -> Duration {
        self.forward_timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::raft::{NoPeers, ReplicaHost};
    use crate::model::{Op, state_key};
    use std::collections::BTreeSet;

    /// Peers that are never reached: these tests stay on one node.
    struct Unreachable;

    impl Peers for Unreachable {
        fn invoke(&self, node: NodeId, _: Invocation) -> BoxFuture<'static, Result<Vec<u8>, InvokeError>> {
            Box::pin(async move { Err(InvokeError::Unreachable { node, message: "test".into() }) })
        }
        fn propose(&self, _: NodeId, _: ShardId, _: WriteSet) -> BoxFuture<'static, Result<LogIndex, LogError>> {
            Box::pin(async { Err(LogError::NotLeader { leader: None }) })
        }
    }

    /// An entity of `shard` among `count` shards.
    fn entity_in(shard: ShardId, count: u32) -> EntityRef {
        let id = (0..).map(|k| format!("e{k}")).find(|id| shard_of("t", id, count) == shard).unwrap();
        EntityRef::new("t", id).unwrap()
    }

    fn put(e: &EntityRef) -> Op {
        Op::Put { keyspace: Keyspace::State, key: state_key(e, "k"), value: e.id.as_bytes().to_vec() }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keys_go_to_their_shard_and_scans_merge_the_shards_led_here() {
        let dir = tempfile::tempdir().unwrap();
        let sled_dir = dir.path().join("state");
        let host = ReplicaHost {
            node: 1,
            data_dir: dir.path().to_owned(),
            db: sled::Config::new().path(&sled_dir).open().unwrap(),
            sled_dir,
            config: crate::cluster::raft::raft_config("test", 10_000).unwrap(),
            transport: Arc::new(NoPeers),
            wal: crate::cluster::raft::open_node_wal(dir.path(), Duration::from_micros(100)).unwrap(),
            apply_buffer: crate::storage::ApplyBuffer::default(),
        };
        // Node 1 holds shards 0..3 alone; shard 3 lives on nodes 2 and 3.
        let mut shape = crate::cluster::shape::Shape::default();
        shape.layout.placement = vec![vec![1], vec![1], vec![1], vec![2, 3]];
        let shape = Arc::new(ClusterShape::new(shape));
        let mut shards = BTreeMap::new();
        for shard in 0..3 {
            let replica = host.open(shard).await.unwrap();
            let me = BTreeMap::from([(1, openraft::BasicNode::new("127.0.0.1:1"))]);
            replica.raft.initialize(me).await.unwrap();
            let (raft, store) = (replica.raft.clone(), replica.state.store().clone());
            let log = Arc::new(ShardLog::new(replica, &crate::log::LogConfig::default()));
            shards.insert(shard, LocalShard::new(raft, store, log));
        }
        let set = Arc::new(
            ShardSet::open(host.clone(), &crate::cluster::placement::Placement::default(), Default::default())
                .await
                .unwrap(),
        );
        let local = Arc::new(LocalShards::new(1, 4, shape, shards).with_set(set, crate::log::LogConfig::default()));
        let router = ClusterRouter::new(local.clone(), Arc::new(Unreachable), Duration::from_secs(1));
        let entities: Vec<EntityRef> = (0..4).map(|s| entity_in(s, 4)).collect();
        // Each local shard leads once it has applied its first entry.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while (0..3).any(|s| !matches!(router.route(&entities[s]), Route::Here { .. })) {
            assert!(std::time::Instant::now() < deadline, "the local shards never became ready");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        // One write set naming three entities commits in each one's shard.
        let ws = WriteSet { ops: entities[..3].iter().map(put).collect() };
        local.propose(ws).await.unwrap();
        for (s, e) in entities[..3].iter().enumerate() {
            let store = &local.replica(s as ShardId).unwrap().store;
            assert_eq!(store.get(Keyspace::State, &state_key(e, "k")).unwrap(), Some(e.id.as_bytes().to_vec()));
            assert_eq!(local.get(Keyspace::State, &state_key(e, "k")).unwrap(), Some(e.id.as_bytes().to_vec()));
        }
        // A cross-entity scan merges the shards in key order, up to the limit.
        let mut keys: Vec<Vec<u8>> = entities[..3].iter().map(|e| state_key(e, "k")).collect();
        keys.sort();
        let all: Vec<Vec<u8>> =
            local.scan(Keyspace::State, b"", None, 10).unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(all, keys);
        let first_two: Vec<Vec<u8>> =
            local.scan(Keyspace::State, b"", None, 2).unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(first_two, keys[..2]);
        let after: Vec<Vec<u8>> =
            local.scan(Keyspace::State, b"", Some(&keys[0]), 10).unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(after, keys[1..]);

        // Shard 3 is elsewhere: reads say so, writes name a replica to ask.
        let remote = &entities[3];
        assert!(matches!(
            local.get(Keyspace::State, &state_key(remote, "k")),
            Err(StorageError::NotLocal { shard: 3 })
        ));
        let err = local.propose(WriteSet { ops: vec![put(remote)] }).await.unwrap_err();
        assert!(matches!(err, LogError::NotLeader { leader: Some(2) }), "{err}");
        assert_eq!(router.route(remote), Route::There { node: 2 });
        // A refusal naming the leader is followed; one naming none, or an
        // unreachable node, moves on to the shard's next replica.
        router.hint(remote, Some(3));
        assert_eq!(router.route(remote), Route::There { node: 3 });
        router.hint(remote, None);
        assert_eq!(router.route(remote), Route::There { node: 2 });
        router.hint(remote, None);
        assert_eq!(router.route(remote), Route::There { node: 3 });
        // Hints never override what a local replica knows.
        router.hint(&entities[0], Some(9));
        assert!(matches!(router.route(&entities[0]), Route::Here { .. }));

        // A replica of shard 3 is added here (empty until its leader adds it
        // to the group), then dropped with its data.
        local.add_replica(3).await.unwrap();
        local.add_replica(3).await.unwrap();
        assert!(local.replica(3).is_some());
        let shard_dir = crate::cluster::raft::replica_dir(dir.path(), 3);
        assert!(shard_dir.exists());
        local.drop_replica(3, None).await.unwrap();
        assert!(local.replica(3).is_none() && !shard_dir.exists());
        // A leader is still a member: it keeps its replica.
        assert!(matches!(local.drop_replica(0, None).await, Err(ShardSetError::StillLeading { shard: 0 })));
        assert!(local.replica(0).is_some());

        local.shutdown().await.unwrap();
    }

    /// However the hints rotate (unreachable replicas, refusals naming no
    /// leader or naming this node), a node that does not lead never routes to
    /// itself: it would answer its own forward, and every caller, with its
    /// own name, and the entity's calls would loop until they time out.
    #[test]
    fn a_node_that_does_not_lead_never_routes_to_itself() {
        let mut shape = crate::cluster::shape::Shape::default();
        shape.layout.placement = vec![vec![1, 2, 3]];
        let shape = Arc::new(ClusterShape::new(shape));
        let local = Arc::new(LocalShards::new(3, 1, shape, BTreeMap::new()));
        let router = ClusterRouter::new(local, Arc::new(Unreachable), Duration::from_secs(1));
        let e = entity_in(0, 1);
        let mut seen = BTreeSet::new();
        for k in 0..12 {
            router.hint(&e, if k % 3 == 0 { Some(3) } else { None });
            match router.route(&e) {
                Route::There { node } => {
                    assert_ne!(node, 3, "routed to itself after {} hints", k + 1);
                    seen.insert(node);
                }
                other => panic!("a shard with replicas routed {other:?}"),
            }
        }
        assert_eq!(seen, BTreeSet::from([1, 2]), "the hints rotate over the other replicas");
    }
}
