//! `LocalNet`: an in-process network between nodes for tests and simulations.
//! Every message is encoded and decoded as on the wire (so it is counted in
//! messages and bytes, and must be serializable), and can be dropped,
//! delayed, duplicated or blocked by a partition, on command. Faults are
//! drawn from a seeded RNG so a failing run can be replayed with its seed.
//!
//! A node registers its replicas with `register`; `transport(node)` gives the
//! `Transport` that node's shard groups send through.

use crate::cluster::raft::{NodeId, Raft, RaftReply, RaftRpc, ReplicaTable, ShardId, Transport, TransportError};
use futures::future::BoxFuture;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Faults applied to every message (both directions of a call).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults {
    /// Chance a request (or its reply) is lost: the sender sees a timeout.
    pub drop_rate: f64,
    /// Chance a request is delivered twice.
    pub duplicate_rate: f64,
    /// Extra latency per message, drawn uniformly from this range.
    pub delay: Option<(Duration, Duration)>,
}

/// Counters of what crossed the network.
#[derive(Debug, Default)]
pub struct NetStats {
    /// Requests delivered (a duplicate counts twice).
    pub messages: AtomicU64,
    /// Encoded request and reply bytes delivered.
    pub bytes: AtomicU64,
    pub dropped: AtomicU64,
    pub duplicated: AtomicU64,
    /// Messages refused by a partition or a down node.
    pub blocked: AtomicU64,
}

impl NetStats {
    pub fn messages(&self) -> u64 {
        self.messages.load(Ordering::Relaxed)
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

struct State {
    nodes: HashMap<NodeId, ReplicaTable>,
    /// Pairs (a, b) with a < b that cannot talk.
    cut: BTreeSet<(NodeId, NodeId)>,
    faults: Faults,
    rng: StdRng,
}

/// The in-process network. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct LocalNet {
    state: Arc<Mutex<State>>,
    stats: Arc<NetStats>,
}

impl std::fmt::Debug for LocalNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalNet").field("stats", &self.stats).finish_non_exhaustive()
    }
}

/// What the network decided to do with one message.
enum Fate {
    Blocked,
    Deliver { delay: Duration, drop_request: bool, drop_reply: bool, duplicate: bool, to: ReplicaTable },
}

impl LocalNet {
    /// A network without faults whose random choices follow `seed`.
    pub fn new(seed: u64) -> Self {
        let state = State {
            nodes: HashMap::new(),
            cut: BTreeSet::new(),
            faults: Faults::default(),
            rng: StdRng::seed_from_u64(seed),
        };
        Self { state: Arc::new(Mutex::new(state)), stats: Arc::new(NetStats::default()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock is a harness bug; keep going with
        // the state as it was.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn stats(&self) -> &NetStats {
        &self.stats
    }

    /// Makes `node` reachable (again) with its replicas as registered so far.
    pub fn add_node(&self, node: NodeId) {
        self.lock().nodes.entry(node).or_default();
    }

    /// Makes `node` reachable with `table` as its replicas (a `ShardSet`
    /// keeps it up to date).
    pub fn attach(&self, node: NodeId, table: ReplicaTable) {
        self.lock().nodes.insert(node, table);
    }

    /// Registers `node`'s replica of `shard`, adding the node if needed.
    pub fn register(&self, node: NodeId, shard: ShardId, raft: Raft) {
        let replicas = self.lock().nodes.entry(node).or_default().clone();
        replicas.insert(shard, raft);
    }

    /// Takes `node` off the network (a crash): messages to and from it fail
    /// as unreachable until it is added again.
    pub fn remove_node(&self, node: NodeId) {
        self.lock().nodes.remove(&node);
    }

    /// Cuts every link between a node in `side_a` and a node in `side_b`.
    pub fn partition(&self, side_a: &[NodeId], side_b: &[NodeId]) {
        let mut st = self.lock();
        for &a in side_a {
            for &b in side_b {
                if a != b {
                    st.cut.insert((a.min(b), a.max(b)));
                }
            }
        }
    }

    /// Cuts `node` off from everyone else.
    pub fn isolate(&self, node: NodeId) {
        let others: Vec<NodeId> = self.lock().nodes.keys().copied().filter(|n| *n != node).collect();
        self.partition(&[node], &others);
    }

    /// Restores every link.
    pub fn heal(&self) {
        self.lock().cut.clear();
    }

    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    /// The transport `node`'s shard groups send through.
    pub fn transport(&self, node: NodeId) -> Arc<dyn Transport> {
        Arc::new(LocalTransport { net: self.clone(), from: node })
    }

    fn fate(&self, from: NodeId, to: NodeId) -> Fate {
        let mut st = self.lock();
        let (Some(_), Some(target)) = (st.nodes.get(&from), st.nodes.get(&to).cloned()) else {
            return Fate::Blocked;
        };
        if st.cut.contains(&(from.min(to), from.max(to))) {
            return Fate::Blocked;
        }
        let faults = st.faults.clone();
        let rng = &mut st.rng;
        let delay = match faults.delay {
            Some((lo, hi)) if hi > lo => rng.random_range(lo..=hi),
            Some((lo, _)) => lo,
            None => Duration::ZERO,
        };
        let lost = faults.drop_rate > 0.0 && rng.random_bool(faults.drop_rate.min(1.0));
        // Half the losses hit the request, half the reply: the second kind
        // means the receiver acted on a message its sender thinks was lost.
        let reply_side = rng.random_bool(0.5);
        let duplicate = faults.duplicate_rate > 0.0 && rng.random_bool(faults.duplicate_rate.min(1.0));
        Fate::Deliver {
            delay,
            drop_request: lost && !reply_side,
            drop_reply: lost && reply_side,
            duplicate,
            to: target,
        }
    }
}

struct LocalTransport {
    net: LocalNet,
    from: NodeId,
}

async fn deliver(replicas: &ReplicaTable, to: NodeId, shard: ShardId, bytes: &[u8]) -> Result<Vec<u8>, TransportError> {
    replicas.dispatch(to, shard, bytes).await.map_err(|e| e.into_transport(to))
}

impl Transport for LocalTransport {
    fn send(
        &self,
        target: NodeId,
        shard: ShardId,
        rpc: RaftRpc,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<RaftReply, TransportError>> {
        let net = self.net.clone();
        let from = self.from;
        Box::pin(async move {
            let stats = net.stats.clone();
            let bytes = rpc.encode().map_err(|e| TransportError::Network { node: target, reason: e.to_string() })?;
            let Fate::Deliver { delay, drop_request, drop_reply, duplicate, to } = net.fate(from, target) else {
                stats.blocked.fetch_add(1, Ordering::Relaxed);
                return Err(TransportError::Unreachable { node: target, reason: "down or partitioned".into() });
            };
            let timed_out = || TransportError::Network { node: target, reason: format!("no reply within {timeout:?}") };
            if drop_request {
                stats.dropped.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(timeout).await;
                return Err(timed_out());
            }
            let call = async {
                // Not even a zero sleep: tokio rounds a deadline up to its
                // next 1 ms tick, which cost every message up to a millisecond.
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                stats.messages.fetch_add(1, Ordering::Relaxed);
                let reply = deliver(&to, target, shard, &bytes).await?;
                stats.bytes.fetch_add((bytes.len() + reply.len()) as u64, Ordering::Relaxed);
                if duplicate {
                    // The copy arrives after the original was handled; its
                    // reply goes nowhere, as a real duplicate's would.
                    stats.duplicated.fetch_add(1, Ordering::Relaxed);
                    stats.messages.fetch_add(1, Ordering::Relaxed);
                    let (to, bytes) = (to.clone(), bytes.clone());
                    tokio::spawn(async move {
                        let _ = deliver(&to, target, shard, &bytes).await;
                    });
                }
                Ok::<_, TransportError>(reply)
            };
            let reply = tokio::time::timeout(timeout, call).await.map_err(|_| timed_out())??;
            if drop_reply {
                stats.dropped.fetch_add(1, Ordering::Relaxed);
                return Err(timed_out());
            }
            RaftReply::decode(&reply).map_err(|e| TransportError::Network { node: target, reason: e.to_string() })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::raft::RaftRpc;

    /// A message the faults leave alone is delivered at once, on no timer:
    /// a zero sleep waited for tokio's next 1 ms tick, and that alone made
    /// a sequential commit through three replicas look 5× one replica's.
    #[test]
    fn a_message_without_faults_waits_on_no_timer() {
        let net = LocalNet::new(7);
        net.add_node(1);
        net.add_node(2);
        let from = net.transport(1);
        // A paused clock moves only when every task waits on a timer, so it
        // measures exactly the timer waits the message made.
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        let vote = RaftRpc::Vote(openraft::raft::VoteRequest { vote: openraft::Vote::new(1, 1), last_log_id: None });
        let (err, waited) = rt.block_on(async {
            // Between two of the timer's 1 ms ticks, as a real clock mostly is.
            tokio::time::advance(Duration::from_micros(500)).await;
            let started = tokio::time::Instant::now();
            let err = from.send(2, 9, vote, Duration::from_secs(1)).await.unwrap_err();
            (err, started.elapsed())
        });
        assert_eq!(waited, Duration::ZERO, "the message waited on a timer");
        assert!(matches!(err, TransportError::NoSuchShard { node: 2, shard: 9 }), "{err}");
    }
}
