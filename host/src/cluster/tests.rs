//! Shard groups of three replicas on the in-process `LocalNet`: replication,
//! leader crash and restart (catching up by snapshot), partitions and lossy,
//! duplicating, slow networks. Each test checks that no acknowledged write is
//! lost and that every replica ends with identical data.

use crate::cluster::harness::{Faults, LocalNet};
use crate::cluster::raft::{self, NodeId, Replica};
use crate::model::{Keyspace, Op, WriteSet};
use openraft::BasicNode;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) const SHARD: raft::ShardId = 7;

/// One node holding one replica of `SHARD`, for tests of any transport.
pub(crate) struct TestNode {
    pub id: NodeId,
    dir: tempfile::TempDir,
    pub replica: Option<Replica>,
}

pub(crate) fn config(snapshot_every: u64) -> Arc<openraft::Config> {
    let config = openraft::Config {
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(snapshot_every),
        // Purge everything a snapshot covers, so a node that was away must
        // catch up from the snapshot, not the log.
        max_in_snapshot_log_to_keep: 0,
        // The product's timing.
        ..(*raft::raft_config("test", 10_000).unwrap()).clone()
    };
    Arc::new(config.validate().unwrap())
}

impl TestNode {
    async fn start(id: NodeId, dir: tempfile::TempDir, net: &LocalNet, config: Arc<openraft::Config>) -> Self {
        let node = Self::open(id, dir, net.transport(id), config).await;
        net.register(id, SHARD, node.replica().raft.clone());
        node
    }

    /// Opens the replica; the caller makes it reachable over its transport.
    pub(crate) async fn open(
        id: NodeId,
        dir: tempfile::TempDir,
        transport: Arc<dyn raft::Transport>,
        config: Arc<openraft::Config>,
    ) -> Self {
        let sled_dir = dir.path().join("sled");
        // A snapshot being built when the crashed replica shut down lets go
        // of the database only when it finishes on its blocking thread (see
        // `raft::conformance`): a restart in the same process may find it
        // locked for a moment.
        let mut tries = 0;
        let db = loop {
            match sled::Config::new().path(&sled_dir).open() {
                Ok(db) => break db,
                Err(e) if tries < 50 && e.to_string().contains("could not acquire lock") => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("opening {sled_dir:?}: {e}"),
            }
        };
        let host = raft::ReplicaHost {
            node: id,
            data_dir: dir.path().to_path_buf(),
            db,
            sled_dir,
            config,
            transport,
            wal: raft::open_node_wal(dir.path(), Duration::from_micros(100)).unwrap(),
            apply_buffer: crate::storage::ApplyBuffer::default(),
        };
        let replica = host.open(SHARD).await.unwrap();
        Self { id, dir, replica: Some(replica) }
    }

    pub(crate) fn replica(&self) -> &Replica {
        self.replica.as_ref().expect("node is running")
    }

    /// kill -9 as far as the network and the disk can tell: off the network,
    /// the store's apply buffer lost (nothing reaches sled any more), Raft
    /// stopped, files closed. What was synced stays.
    async fn crash(&mut self, net: &LocalNet) -> tempfile::TempDir {
        net.remove_node(self.id);
        let replica = self.replica.take().expect("node is running");
        replica.state.store().close_discarding();
        replica.raft.shutdown().await.unwrap();
        drop(replica);
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }

    pub(crate) fn data(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut pairs = Vec::new();
        let view = self.replica().state.store().point_in_time(&[]).unwrap();
        view.scan(|k, v| {
            pairs.push((k.to_vec(), v.to_vec()));
            Ok(())
        })
        .unwrap();
        pairs.sort();
        pairs
    }
}

async fn start_cluster(net: &LocalNet, config: Arc<openraft::Config>) -> Vec<TestNode> {
    let mut nodes = Vec::new();
    for id in 1..=3 {
        nodes.push(TestNode::start(id, tempfile::tempdir().unwrap(), net, config.clone()).await);
    }
    initialize(&nodes).await;
    nodes
}

/// Makes the nodes the group's voters (from the first node).
pub(crate) async fn initialize(nodes: &[TestNode]) {
    let members: BTreeMap<NodeId, BasicNode> =
        nodes.iter().map(|n| (n.id, BasicNode::new(format!("node-{}", n.id)))).collect();
    nodes[0].replica().raft.initialize(members).await.unwrap();
}

pub(crate) fn put(key: &str, value: &str) -> WriteSet {
    WriteSet {
        ops: vec![Op::Put {
            keyspace: Keyspace::State,
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
        }],
    }
}

/// The leader as the running nodes see it, once all that see one agree.
pub(crate) async fn leader(nodes: &[TestNode], within: Duration) -> NodeId {
    let deadline = Instant::now() + within;
    loop {
        let seen: BTreeSet<Option<NodeId>> =
            nodes.iter().filter_map(|n| n.replica.as_ref()).map(|r| r.raft.metrics().borrow().current_leader).collect();
        if let [Some(l)] = seen.iter().copied().collect::<Vec<_>>()[..]
            && nodes.iter().any(|n| n.id == l && n.replica.is_some())
        {
            return l;
        }
        assert!(Instant::now() < deadline, "no agreed leader within {within:?}: {seen:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes through whoever leads, retrying leader changes and lost messages
/// (the write is an idempotent put) until `within` runs out.
pub(crate) async fn write(nodes: &[TestNode], ws: WriteSet, within: Duration) -> openraft::LogId<NodeId> {
    let deadline = Instant::now() + within;
    loop {
        let l = leader(nodes, deadline.saturating_duration_since(Instant::now())).await;
        let raft = nodes.iter().find(|n| n.id == l).unwrap().replica().raft.clone();
        match tokio::time::timeout(Duration::from_secs(1), raft.client_write(ws.clone().into())).await {
            Ok(Ok(resp)) => return resp.log_id,
            Ok(Err(_)) | Err(_) => {
                assert!(Instant::now() < deadline, "write not acknowledged within {within:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Waits until every running replica has applied `index`.
pub(crate) async fn applied_everywhere(nodes: &[TestNode], index: u64, within: Duration) {
    for n in nodes.iter().filter(|n| n.replica.is_some()) {
        n.replica()
            .raft
            .wait(Some(within))
            .applied_index_at_least(Some(index), "replica catches up")
            .await
            .unwrap_or_else(|e| panic!("node {} did not apply {index}: {e}", n.id));
    }
}

pub(crate) fn assert_identical(nodes: &[TestNode], acked: &[String]) {
    let first = nodes[0].data();
    for n in &nodes[1..] {
        assert!(n.data() == first, "node {} differs from node {}", n.id, nodes[0].id);
    }
    let keys: BTreeSet<Vec<u8>> = first.iter().map(|(k, _)| k[1..].to_vec()).collect();
    for key in acked {
        assert!(keys.contains(key.as_bytes()), "acknowledged write {key} lost");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_leader_is_replaced_and_catches_up_by_snapshot_on_restart() {
    let net = LocalNet::new(1);
    let config = config(20);
    let mut nodes = start_cluster(&net, config.clone()).await;
    let mut acked = Vec::new();
    for i in 0..30 {
        write(&nodes, put(&format!("a{i}"), "1"), Duration::from_secs(10)).await;
        acked.push(format!("a{i}"));
    }
    let old = leader(&nodes, Duration::from_secs(5)).await;
    let pos = nodes.iter().position(|n| n.id == old).unwrap();
    let dir = nodes[pos].crash(&net).await;

    // The survivors elect a leader and commit again; the gap is what a
    // caller would wait.
    let crashed_at = Instant::now();
    write(&nodes, put("after-crash", "1"), Duration::from_secs(10)).await;
    let gap = crashed_at.elapsed();
    assert!(leader(&nodes, Duration::from_secs(5)).await != old);
    acked.push("after-crash".into());
    let mut last = openraft::LogId::default();
    for i in 0..40 {
        last = write(&nodes, put(&format!("b{i}"), "2"), Duration::from_secs(10)).await;
        acked.push(format!("b{i}"));
    }

    // Back from the dead with its old disk: the log it missed has been
    // compacted away, so it must install a snapshot.
    nodes[pos] = TestNode::start(old, dir, &net, config).await;
    applied_everywhere(&nodes, last.index, Duration::from_secs(10)).await;
    assert_identical(&nodes, &acked);
    let restarted = nodes[pos].replica().raft.metrics().borrow().clone();
    assert!(restarted.snapshot.is_some(), "restarted node caught up without a snapshot: {restarted:?}");
    eprintln!("failover gap (crash to next acknowledged write): {gap:?}");
    for n in &mut nodes {
        n.replica().raft.shutdown().await.unwrap();
    }
}

/// A follower that was away catches up through a snapshot larger than one
/// chunk: the leader reads it from its file chunk by chunk, the follower
/// writes the chunks to a file and installs from it, and then holds exactly
/// the leader's data (its snapshot file too, for when it leads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_catches_up_through_a_snapshot_streamed_in_many_chunks() {
    let net = LocalNet::new(17);
    const CHUNK_BYTES: u64 = 4 * 1024;
    let config = Arc::new(
        openraft::Config { snapshot_max_chunk_size: CHUNK_BYTES, ..(*config(20)).clone() }.validate().unwrap(),
    );
    let mut nodes = start_cluster(&net, config.clone()).await;
    let l = leader(&nodes, Duration::from_secs(10)).await;
    let away = nodes.iter().position(|n| n.id != l).unwrap();
    let away_id = nodes[away].id;
    let dir = nodes[away].crash(&net).await;
    let value = "v".repeat(2048);
    let mut acked = Vec::new();
    let mut last = openraft::LogId::default();
    for i in 0..120 {
        last = write(&nodes, put(&format!("k{i:03}"), &value), Duration::from_secs(10)).await;
        acked.push(format!("k{i:03}"));
    }
    nodes[away] = TestNode::start(away_id, dir, &net, config).await;
    applied_everywhere(&nodes, last.index, Duration::from_secs(20)).await;
    assert_identical(&nodes, &acked);
    let metrics = nodes[away].replica().raft.metrics().borrow().clone();
    let snapshot = metrics.snapshot.expect("the follower caught up without a snapshot");
    let file = nodes[away].dir.path().join("shards").join(SHARD.to_string()).join("snapshot.bin");
    let size = std::fs::metadata(&file).unwrap().len();
    assert!(size > 20 * CHUNK_BYTES, "the snapshot ({size} bytes) fits in a few chunks");
    let installed = raft::snapshot_file::validate(&file).unwrap();
    assert_eq!(installed.last_log_id, Some(snapshot), "the installed file is the follower's current snapshot");
    for n in &mut nodes {
        n.replica().raft.shutdown().await.unwrap();
    }
}

/// A leader cut off from its majority stops draining its commit queue. A
/// proposal that finds the queue full waits no longer than its deadline
/// (`commit_timeout_ms`, counted from the call) and is told it was never
/// written; every proposal returns within that bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_to_a_leader_without_quorum_and_a_full_queue_times_out_within_its_deadline() {
    use crate::log::{CommitLog, LogConfig, LogError};
    let net = LocalNet::new(19);
    let commit_timeout = Duration::from_millis(500);
    let log_config = LogConfig {
        queue_depth: 1,
        max_batch_entries: 1,
        commit_timeout_ms: commit_timeout.as_millis() as u64,
        ..LogConfig::default()
    };
    let (nodes, l, _, log) = leader_log(&net, log_config).await;
    net.isolate(l);
    // Four batches in flight (never committed), one held by the batcher, one
    // in the queue: the rest wait for room.
    let proposals: Vec<_> = (0..12)
        .map(|i| {
            let log = log.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let outcome = log.propose(put(&format!("cut-off{i}"), "x")).await;
                (outcome, started.elapsed())
            })
        })
        .collect();
    let bound = commit_timeout + Duration::from_secs(2);
    let mut never_queued = 0;
    for p in proposals {
        let (outcome, took) = tokio::time::timeout(bound, p)
            .await
            .unwrap_or_else(|_| panic!("a proposal waited more than {bound:?} (its deadline is {commit_timeout:?})"))
            .unwrap();
        assert!(took < bound, "a proposal took {took:?}");
        match outcome {
            Err(LogError::QueueTimeout { .. }) => never_queued += 1,
            Err(LogError::Aborted(_)) => {}
            other => panic!("a proposal to a leader without a majority: {other:?}"),
        }
    }
    assert!(never_queued > 0, "no proposal found the queue full");
    net.heal();
    // Proposals never queued, or abandoned in the queue, are not written
    // once the group recovers.
    let after = write(&nodes, put("after-heal", "1"), Duration::from_secs(10)).await;
    applied_everywhere(&nodes, after.index, Duration::from_secs(10)).await;
    let written = nodes[0].data().iter().filter(|(k, _)| k[1..].starts_with(b"cut-off")).count();
    assert!(written <= 4, "{written} writes of a cut-off leader landed; at most the 4 in flight may");
    log.shutdown().await.unwrap();
}

/// openraft restores a leader that restarts in the term it led, with no new
/// entry: its store may lack what committed before the stop, and the others
/// may have moved on. It serves turns only once an entry proposed since the
/// restart has committed in that term: never without a majority.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_leader_serves_only_once_a_majority_confirms_its_term() {
    use crate::cluster::sharded::LocalShard;
    let net = LocalNet::new(13);
    let config = config(1000);
    let mut nodes = start_cluster(&net, config.clone()).await;
    write(&nodes, put("before", "1"), Duration::from_secs(10)).await;
    let l = leader(&nodes, Duration::from_secs(5)).await;
    let term = nodes.iter().find(|n| n.id == l).unwrap().replica().raft.metrics().borrow().current_term;
    // The followers stop first, so nobody takes over; then the leader.
    let mut dirs = BTreeMap::new();
    for n in nodes.iter_mut().filter(|n| n.id != l) {
        dirs.insert(n.id, n.crash(&net).await);
    }
    let pos = nodes.iter().position(|n| n.id == l).unwrap();
    let dir = nodes[pos].crash(&net).await;
    nodes[pos] = TestNode::start(l, dir, &net, config.clone()).await;
    let replica = nodes[pos].replica().clone();
    assert_eq!(replica.restored_lead, Some(term), "the restarted leader's vote names it in term {term}");
    let shard = LocalShard::new(
        replica.raft.clone(),
        replica.state.store().clone(),
        Arc::new(raft::ShardLog::new(replica.clone(), &crate::log::LogConfig::default())),
    );
    // Restored as leader at once, in its old term...
    replica.raft.wait(Some(Duration::from_secs(5))).state(openraft::ServerState::Leader, "restored").await.unwrap();
    assert_eq!(raft::leader_of(&replica.raft.metrics().borrow()), Some(l));
    // ...but alone it cannot confirm the term, so it serves nothing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(shard.ready_term(l), None, "a restored leader served before a majority confirmed its term");
    // One follower back makes a majority: the confirmation commits.
    let (&f, _) = dirs.iter().next().unwrap();
    let fpos = nodes.iter().position(|n| n.id == f).unwrap();
    nodes[fpos] = TestNode::start(f, dirs.remove(&f).unwrap(), &net, config).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while shard.ready_term(l) != Some(term) {
        assert!(Instant::now() < deadline, "the restored leadership was never confirmed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for n in nodes.iter().filter(|n| n.replica.is_some()) {
        n.replica().raft.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_leader_cannot_commit_and_the_majority_keeps_serving() {
    let net = LocalNet::new(2);
    let mut nodes = start_cluster(&net, config(1000)).await;
    write(&nodes, put("before", "1"), Duration::from_secs(10)).await;
    let old = leader(&nodes, Duration::from_secs(5)).await;
    let old_raft = nodes.iter().find(|n| n.id == old).unwrap().replica().raft.clone();
    net.isolate(old);

    // The minority side cannot get a majority: its write is never acknowledged.
    let minority = tokio::spawn(async move { old_raft.client_write(put("minority", "x").into()).await });
    let deadline = Instant::now() + Duration::from_secs(10);
    let new_leader = loop {
        let seen: BTreeSet<NodeId> = nodes
            .iter()
            .filter(|n| n.id != old)
            .filter_map(|n| n.replica().raft.metrics().borrow().current_leader)
            .filter(|l| *l != old)
            .collect();
        if seen.len() == 1 {
            break *seen.iter().next().unwrap();
        }
        assert!(Instant::now() < deadline, "majority elected no leader");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let new_raft = nodes.iter().find(|n| n.id == new_leader).unwrap().replica().raft.clone();
    for i in 0..10 {
        new_raft.client_write(put(&format!("majority{i}"), "1").into()).await.unwrap();
    }
    assert!(!minority.is_finished(), "the isolated leader acknowledged a write");

    net.heal();
    // The old leader learns of the new term; its uncommitted entry is
    // replaced, and its caller is told it did not lead.
    let res = tokio::time::timeout(Duration::from_secs(10), minority).await.unwrap().unwrap();
    assert!(res.is_err(), "minority write must fail, got {res:?}");
    let last = new_raft.client_write(put("after-heal", "1").into()).await.unwrap().log_id;
    applied_everywhere(&nodes, last.index, Duration::from_secs(10)).await;
    let mut acked: Vec<String> = (0..10).map(|i| format!("majority{i}")).collect();
    acked.extend(["before".to_string(), "after-heal".to_string()]);
    assert_identical(&nodes, &acked);
    let data = nodes[0].data();
    assert!(!data.iter().any(|(k, _)| &k[1..] == b"minority"), "an unacknowledged minority write was applied");
    for n in &mut nodes {
        n.replica().raft.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_survive_a_lossy_duplicating_slow_network() {
    let net = LocalNet::new(3);
    let mut nodes = start_cluster(&net, config(25)).await;
    net.set_faults(Faults {
        drop_rate: 0.1,
        duplicate_rate: 0.1,
        delay: Some((Duration::ZERO, Duration::from_millis(20))),
    });
    let mut acked = Vec::new();
    let mut last = openraft::LogId::default();
    for i in 0..60 {
        last = write(&nodes, put(&format!("k{i}"), &i.to_string()), Duration::from_secs(20)).await;
        acked.push(format!("k{i}"));
    }
    net.set_faults(Faults::default());
    applied_everywhere(&nodes, last.index, Duration::from_secs(10)).await;
    assert_identical(&nodes, &acked);
    let stats = net.stats();
    assert!(stats.dropped.load(std::sync::atomic::Ordering::Relaxed) > 0, "no message was dropped");
    assert!(stats.duplicated.load(std::sync::atomic::Ordering::Relaxed) > 0, "no message was duplicated");
    // Every write set is a put with its own value: the stored value proves
    // which write it came from.
    for (k, v) in nodes[0].data() {
        let i: usize = std::str::from_utf8(&k[2..]).unwrap().parse().unwrap();
        assert_eq!(v, i.to_string().into_bytes());
    }
    for n in &mut nodes {
        n.replica().raft.shutdown().await.unwrap();
    }
}

/// One `ShardSet` per node of `ids` on `net`, opened under `placement` (not
/// yet bootstrapped), with their data directories and addresses.
async fn open_sets(
    net: &LocalNet,
    ids: &[NodeId],
    placement: &crate::cluster::placement::Placement,
) -> (BTreeMap<NodeId, Arc<crate::cluster::shards::ShardSet>>, Vec<tempfile::TempDir>, BTreeMap<NodeId, String>) {
    let addrs: BTreeMap<NodeId, String> = ids.iter().map(|id| (*id, format!("node-{id}"))).collect();
    let mut dirs = Vec::new();
    let mut sets = BTreeMap::new();
    for &id in ids {
        let dir = tempfile::tempdir().unwrap();
        let sled_dir = dir.path().join("sled");
        let host = raft::ReplicaHost {
            node: id,
            data_dir: dir.path().to_path_buf(),
            db: sled::Config::new().path(&sled_dir).open().unwrap(),
            sled_dir,
            config: config(1000),
            transport: net.transport(id),
            wal: raft::open_node_wal(dir.path(), Duration::from_micros(100)).unwrap(),
            apply_buffer: crate::storage::ApplyBuffer::default(),
        };
        let table = raft::ReplicaTable::default();
        net.attach(id, table.clone());
        sets.insert(id, Arc::new(crate::cluster::shards::ShardSet::open(host, placement, table).await.unwrap()));
        dirs.push(dir);
    }
    (sets, dirs, addrs)
}

/// A stale-replica drop is fenced by the membership that left the node out:
/// a replica that was added back since (and votes again) refuses it and
/// keeps its data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_added_back_refuses_a_drop_decided_before() {
    use crate::cluster::sharded::{LocalShard, LocalShards};
    use crate::cluster::shards::ShardSetError;
    use crate::storage::StateStore;
    let net = LocalNet::new(13);
    let placement = crate::cluster::placement::Placement { shards: vec![vec![1, 2, 3]] };
    let (sets, _dirs, addrs) = open_sets(&net, &[1, 2, 3], &placement).await;
    for set in sets.values() {
        set.bootstrap(&placement, &addrs).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let l = loop {
        if let Some(l) = sets[&1].leader(0) {
            break l;
        }
        assert!(Instant::now() < deadline, "shard 0 elected no leader");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let victim = if l == 1 { 2 } else { 1 };
    let raft = sets[&l].replica(0).unwrap().raft.clone();
    raft.client_write(put("before", "1").into()).await.unwrap();
    let change =
        |add, remove| crate::cluster::driver::change_replicas(&raft, &addrs, add, remove, Duration::from_secs(30));
    let removed = change(None, Some(victim)).await.unwrap().expect("the removal changed the membership");
    let added = change(Some(victim), None).await.unwrap().expect("the re-add changed the membership");
    assert!(added > removed, "{added} > {removed}");
    let back = sets[&victim].replica(0).unwrap();
    back.raft
        .wait(Some(Duration::from_secs(10)))
        .metrics(|m| m.membership_config.log_id().is_some_and(|id| id.index >= added), "the re-add reached the victim")
        .await
        .unwrap();

    let shape = Arc::new(crate::cluster::shape::ClusterShape::new(crate::cluster::shape::Shape::default()));
    let (raft_v, store_v) = (back.raft.clone(), back.state.store().clone());
    let log_v = Arc::new(raft::ShardLog::new(back, &crate::log::LogConfig::default()));
    let local = LocalShards::new(victim, 1, shape, BTreeMap::from([(0, LocalShard::new(raft_v, store_v, log_v))]))
        .with_set(sets[&victim].clone(), crate::log::LogConfig::default());
    match local.drop_replica(0, Some(removed)).await {
        Err(ShardSetError::AddedBack { shard: 0, known }) => assert!(known >= added, "{known} < {added}"),
        other => {
            panic!("a drop decided at index {removed} was not refused by a replica re-added at {added}: {other:?}")
        }
    }
    assert!(local.replica(0).is_some(), "the refused drop removed the replica");
    let last = raft.client_write(put("after", "1").into()).await.unwrap().log_id;
    let written = |k: &str| sets[&victim].replica(0).unwrap().state.store().get(Keyspace::State, k.as_bytes());
    let deadline = Instant::now() + Duration::from_secs(10);
    while sets[&victim].replica(0).unwrap().state.store().applied_index().unwrap() < last.index + 1 {
        assert!(Instant::now() < deadline, "the re-added replica stopped applying");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        written("before").unwrap().is_some() && written("after").unwrap().is_some(),
        "the re-added replica lost data"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_sets_form_every_group_on_its_placement_and_fail_over_a_lost_node() {
    use crate::cluster::placement::initial_placement;
    let net = LocalNet::new(4);
    let ids: Vec<NodeId> = (1..=5).collect();
    let placement = initial_placement(&ids, 10, 3).unwrap();
    let (sets, _dirs, addrs) = open_sets(&net, &ids, &placement).await;
    for set in sets.values() {
        set.bootstrap(&placement, &addrs).await.unwrap();
        // A second bootstrap (a restart) changes nothing.
        set.bootstrap(&placement, &addrs).await.unwrap();
    }

    // Every shard: one leader, agreed by all its replicas, among them.
    let leaders = |exclude: Option<NodeId>| {
        let mut out = BTreeMap::new();
        for (shard, nodes) in placement.shards.iter().enumerate() {
            let seen: BTreeSet<Option<NodeId>> =
                nodes.iter().filter(|n| Some(**n) != exclude).map(|n| sets[n].leader(shard as raft::ShardId)).collect();
            if let [Some(l)] = seen.into_iter().collect::<Vec<_>>()[..]
                && nodes.contains(&l)
                && Some(l) != exclude
            {
                out.insert(shard, l);
            }
        }
        out
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while leaders(None).len() < placement.shards.len() {
        assert!(Instant::now() < deadline, "not every shard elected a leader: {:?}", leaders(None));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Writes on every shard reach every follower: the leaders report no lag.
    for (shard, leader) in leaders(None) {
        let raft = sets[&leader].replica(shard as raft::ShardId).unwrap().raft;
        for i in 0..5 {
            raft.client_write(put(&format!("s{shard}-{i}"), "1").into()).await.unwrap();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let statuses: Vec<_> = sets.values().flat_map(|s| s.status()).collect();
        let led: Vec<_> = statuses.iter().filter(|s| s.leader == Some(s.node)).collect();
        let caught_up = led.len() == placement.shards.len()
            && led.iter().all(|s| s.lag.len() == 2 && s.lag.values().all(|l| *l == 0));
        if caught_up {
            for s in &statuses {
                let mut expected = placement.shards[s.shard as usize].clone();
                expected.sort_unstable();
                assert_eq!(s.replicas, expected, "shard {} members follow the placement", s.shard);
            }
            break;
        }
        assert!(Instant::now() < deadline, "followers did not catch up: {led:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Lose the leader of shard 0: every shard it led is led elsewhere soon.
    let lost = leaders(None)[&0];
    let led_by_lost: Vec<usize> = leaders(None).into_iter().filter(|(_, l)| *l == lost).map(|(s, _)| s).collect();
    net.remove_node(lost);
    let started = Instant::now();
    loop {
        let now = leaders(Some(lost));
        if led_by_lost.iter().all(|s| now.contains_key(s)) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "shards {led_by_lost:?} found no new leader: {now:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("{} shards re-elected {:?} after losing node {lost}", led_by_lost.len(), started.elapsed());
    for set in sets.values() {
        set.shutdown().await;
        assert!(set.shards().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_log_commits_write_sets_like_the_local_log_and_only_on_the_leader() {
    use crate::log::{CommitLog, LogError};
    use crate::storage::StateStore;
    let net = LocalNet::new(5);
    let nodes = start_cluster(&net, config(50)).await;
    let l = leader(&nodes, Duration::from_secs(10)).await;
    let logs: BTreeMap<NodeId, Arc<raft::ShardLog>> = nodes
        .iter()
        .map(|n| (n.id, Arc::new(raft::ShardLog::new(n.replica().clone(), &crate::log::LogConfig::default()))))
        .collect();
    let log = logs[&l].clone();

    // Concurrent proposers: every proposal resolves, and resolving means
    // applied here. Proposals that waited together share a batch's index.
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let log = log.clone();
        let store = nodes.iter().find(|n| n.id == l).unwrap().replica().state.store().clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for i in 0..25u64 {
                let key = format!("t{t}-{i}");
                let index = log.propose(put(&key, "1")).await.unwrap();
                assert!(log.applied_index() >= index);
                assert!(store.get(Keyspace::State, key.as_bytes()).unwrap().is_some(), "{key} resolved before applied");
                got.push(index);
            }
            got
        }));
    }
    let mut indexes = Vec::new();
    for t in tasks {
        let got = t.await.unwrap();
        assert!(got.windows(2).all(|w| w[0] < w[1]), "one proposer sees increasing indexes");
        indexes.extend(got);
    }
    let distinct: BTreeSet<u64> = indexes.iter().copied().collect();
    let stats = log.stats();
    assert_eq!(stats.proposals, 200);
    assert_eq!(stats.sync_batches as usize, distinct.len(), "one Raft entry per batch");
    assert!(stats.largest_batch > 1, "concurrent proposals were never batched: {stats:?}");

    // Followers refuse and name the leader.
    for (id, follower) in logs.iter().filter(|(id, _)| **id != l) {
        match follower.propose(put("on-follower", "x")).await {
            Err(LogError::NotLeader { leader: Some(named) }) => assert_eq!(named, l, "node {id} names the leader"),
            other => panic!("node {id}: expected NotLeader, got {other:?}"),
        }
    }
    let acked: Vec<String> = (0..8).flat_map(|t| (0..25).map(move |i| format!("t{t}-{i}"))).collect();
    applied_everywhere(&nodes, *distinct.last().unwrap() - 1, Duration::from_secs(10)).await;
    assert_identical(&nodes, &acked);

    for log in logs.values() {
        log.shutdown().await.unwrap();
    }
    assert!(matches!(log.propose(put("after", "x")).await, Err(LogError::ShutDown)));
}

/// A three-node group on `net`, its leader, the leader's term, and a
/// `ShardLog` on the leader's replica.
async fn leader_log(
    net: &LocalNet,
    log_config: crate::log::LogConfig,
) -> (Vec<TestNode>, NodeId, u64, Arc<raft::ShardLog>) {
    let nodes = start_cluster(net, config(1000)).await;
    let l = leader(&nodes, Duration::from_secs(10)).await;
    let replica = nodes.iter().find(|n| n.id == l).unwrap().replica().clone();
    let term = replica.raft.metrics().borrow().current_term;
    let log = Arc::new(raft::ShardLog::new(replica, &log_config));
    (nodes, l, term, log)
}

/// A turn's write set is fenced by the term it was computed in. In another
/// term it commits as a no-op on every replica and its proposer is told so;
/// unfenced proposals waiting beside it are not batched with it and apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_fenced_by_another_term_commits_as_a_no_op_and_spares_its_neighbours() {
    use crate::log::{CommitLog, LogError};
    let net = LocalNet::new(7);
    let (nodes, _, term, log) = leader_log(&net, crate::log::LogConfig::default()).await;

    log.propose_fenced(put("current-term", "1"), term).await.unwrap();
    let mut acked = vec!["current-term".to_string()];
    let mut last = 0;
    for i in 0..20 {
        let (stale, plain) = tokio::join!(
            log.propose_fenced(put(&format!("stale{i}"), "x"), term + 1),
            log.propose(put(&format!("plain{i}"), "1")),
        );
        match stale {
            Err(LogError::Fenced { fence_term, entry_term }) => assert_eq!((fence_term, entry_term), (term + 1, term)),
            other => panic!("a write fenced by term {} in term {term}: {other:?}", term + 1),
        }
        last = last.max(plain.unwrap());
        acked.push(format!("plain{i}"));
    }
    applied_everywhere(&nodes, last - 1, Duration::from_secs(10)).await;
    assert_identical(&nodes, &acked);
    assert!(!nodes[0].data().iter().any(|(k, _)| k[1..].starts_with(b"stale")), "a fenced write was applied");
    log.shutdown().await.unwrap();
}

/// A read-only turn's reply stands only once its node confirms, after the
/// read, that it still leads in the term it read in: a leader cut off from
/// the others cannot, and a node that leads in another term is fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_confirms_a_read_only_with_a_quorum_and_in_its_own_term() {
    use crate::log::{CommitLog, LogConfig, LogError};
    let net = LocalNet::new(11);
    let (_nodes, l, term, log) = leader_log(&net, LogConfig { commit_timeout_ms: 2_000, ..LogConfig::default() }).await;
    let entity = crate::model::EntityRef::new("counter", "c1").unwrap();

    log.confirm_lead(&entity, term).await.unwrap();
    match log.confirm_lead(&entity, term + 1).await {
        Err(LogError::Fenced { fence_term, entry_term }) => assert_eq!((fence_term, entry_term), (term + 1, term)),
        other => panic!("a read of term {} confirmed in term {term}: {other:?}", term + 1),
    }
    net.isolate(l);
    let cut_off = log.confirm_lead(&entity, term).await;
    assert!(cut_off.is_err(), "a leader cut off from every follower confirmed a read: {cut_off:?}");
    net.heal();
    log.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_move_to_a_new_node_under_writes_and_off_the_leader_itself() {
    let net = LocalNet::new(5);
    // Snapshots every 20 entries with nothing kept behind them: the new
    // replica must catch up from a snapshot.
    let config = config(20);
    let mut nodes = start_cluster(&net, config.clone()).await;
    let mut acked = Vec::new();
    for i in 0..50 {
        write(&nodes, put(&format!("a{i}"), "1"), Duration::from_secs(10)).await;
        acked.push(format!("a{i}"));
    }
    nodes.push(TestNode::start(4, tempfile::tempdir().unwrap(), &net, config.clone()).await);
    let addrs: BTreeMap<NodeId, String> = (1..=5).map(|n| (n, format!("node-{n}"))).collect();
    let voters = |nodes: &[TestNode], l: NodeId| -> BTreeSet<NodeId> {
        let raft = &nodes.iter().find(|n| n.id == l).unwrap().replica().raft;
        raft.metrics().borrow().membership_config.membership().voter_ids().collect()
    };

    // 1. Node 4 replaces a follower while writes go on.
    let l = leader(&nodes[..3], Duration::from_secs(5)).await;
    let follower = (1..=3).find(|n| *n != l).unwrap();
    let raft = nodes.iter().find(|n| n.id == l).unwrap().replica().raft.clone();
    let writes = async {
        let mut keys = Vec::new();
        for i in 0..30 {
            // Through the founders: node 4 knows no leader until it is added.
            write(&nodes[..3], put(&format!("b{i}"), "2"), Duration::from_secs(10)).await;
            keys.push(format!("b{i}"));
        }
        keys
    };
    let (moved, keys) = futures::join!(
        crate::cluster::driver::change_replicas(&raft, &addrs, Some(4), Some(follower), Duration::from_secs(30)),
        writes
    );
    moved.unwrap();
    acked.extend(keys);
    let expected: BTreeSet<NodeId> = (1..=4).filter(|n| *n != follower).collect();
    assert_eq!(voters(&nodes, l), expected);
    let pos = nodes.iter().position(|n| n.id == follower).unwrap();
    nodes.remove(pos).crash(&net).await;

    // 2. The leader moves its own replica to node 5: it steps down and the
    // others elect a new leader that keeps committing.
    nodes.push(TestNode::start(5, tempfile::tempdir().unwrap(), &net, config).await);
    change_replicas_on(&nodes, l, &addrs, Some(5), Some(l)).await;
    let pos = nodes.iter().position(|n| n.id == l).unwrap();
    nodes.remove(pos).crash(&net).await;
    let mut last = openraft::LogId::default();
    for i in 0..30 {
        last = write(&nodes, put(&format!("c{i}"), "3"), Duration::from_secs(10)).await;
        acked.push(format!("c{i}"));
    }
    let new_leader = leader(&nodes, Duration::from_secs(5)).await;
    let expected: BTreeSet<NodeId> = nodes.iter().map(|n| n.id).collect();
    assert_eq!(voters(&nodes, new_leader), expected);
    assert!(!expected.contains(&l) && expected.contains(&4) && expected.contains(&5));
    applied_everywhere(&nodes, last.index, Duration::from_secs(10)).await;
    assert_identical(&nodes, &acked);
    let four = nodes.iter().find(|n| n.id == 4).unwrap().replica().raft.metrics().borrow().clone();
    assert!(four.snapshot.is_some(), "the new replica caught up without a snapshot: {four:?}");
    // Only the leader changes its group.
    let follower = nodes.iter().find(|n| n.id != new_leader).unwrap().replica().raft.clone();
    let refused =
        crate::cluster::driver::change_replicas(&follower, &addrs, Some(1), None, Duration::from_secs(1)).await;
    assert!(refused.unwrap_err().contains("does not lead"));
    for n in &mut nodes {
        n.replica().raft.shutdown().await.unwrap();
    }
}

async fn change_replicas_on(
    nodes: &[TestNode],
    leader: NodeId,
    addrs: &BTreeMap<NodeId, String>,
    add: Option<NodeId>,
    remove: Option<NodeId>,
) {
    let raft = nodes.iter().find(|n| n.id == leader).unwrap().replica().raft.clone();
    crate::cluster::driver::change_replicas(&raft, addrs, add, remove, Duration::from_secs(30)).await.unwrap();
}

/// A batch, which is one Raft entry, never holds more than `max_batch_bytes`
/// of write sets (each entry must reach the followers within one
/// AppendEntries), and a conditional write set goes in an entry of its own:
/// a failed precondition skips it without taking others' writes along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_split_at_max_batch_bytes_and_a_conditional_write_goes_alone() {
    use crate::log::{CommitLog, LogError};
    use crate::storage::StateStore;
    let net = LocalNet::new(7);
    let nodes = start_cluster(&net, config(50)).await;
    let l = leader(&nodes, Duration::from_secs(10)).await;
    let node = nodes.iter().find(|n| n.id == l).unwrap();
    let cfg = crate::log::LogConfig { max_batch_bytes: 64 << 10, ..crate::log::LogConfig::default() };
    let log = Arc::new(raft::ShardLog::new(node.replica().clone(), &cfg));
    let value = "v".repeat(10 << 10);
    let mut proposals: Vec<_> = (0..60).map(|i| log.propose(put(&format!("k{i}"), &value))).collect();
    // A compare-and-set expecting a value the key never holds, among them.
    let cas = WriteSet {
        ops: vec![
            Op::Expect { keyspace: Keyspace::State, key: b"k0".to_vec(), value: Some(b"never".to_vec()) },
            Op::Put { keyspace: Keyspace::State, key: b"cas".to_vec(), value: b"x".to_vec() },
        ],
    };
    proposals.insert(30, log.propose(cas));
    let mut outcomes = futures::future::join_all(proposals).await;
    let conditional = outcomes.remove(30);
    assert!(matches!(conditional, Err(LogError::Conflict { ref key, .. }) if key == "k0"), "{conditional:?}");
    for r in outcomes {
        r.unwrap();
    }
    let stats = log.stats();
    assert!(stats.largest_batch > 1, "nothing was batched: {stats:?}");
    assert!(stats.largest_batch_bytes <= 64 << 10, "an entry held {} bytes", stats.largest_batch_bytes);
    let store = node.replica().state.store().clone();
    assert!(store.get(Keyspace::State, b"cas").unwrap().is_none(), "a failed compare-and-set wrote");
    for i in 0..60 {
        assert!(store.get(Keyspace::State, format!("k{i}").as_bytes()).unwrap().is_some(), "k{i} lost");
    }
    log.shutdown().await.unwrap();
}
