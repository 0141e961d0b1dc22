//! One shard = one openraft group. This module owns the group's type
//! configuration and the pieces openraft asks the application for: the log
//! storage on a raft-log WAL ([`log_store`]), the state machine on a sled tree
//! ([`state_machine`]), and the network adapter that carries a shard id on
//! every message over any [`Transport`] ([`network`]). The leader replicates
//! each turn's write set, never the operation: followers only apply bytes.

// openraft's `StorageError` (224 bytes) is the error type its storage traits
// require; helpers that produce it return it as is.
#![allow(clippy::result_large_err)]

pub mod log_store;
pub mod network;
pub mod node_wal;
pub mod shard_log;
pub mod snapshot_file;
pub mod state_machine;

pub use log_store::WalLogStore;
pub use network::{
    DispatchError, NoPeers, RaftReply, RaftRpc, ReplicaTable, ShardNetworkFactory, Transport, TransportError,
};
pub use node_wal::{NodeWal, NodeWalOptions};
pub use shard_log::ShardLog;
pub use state_machine::ShardStateMachine;

use crate::model::WriteSet;
use openraft::TokioRuntime;
use std::future::Future;

/// What one Raft entry of a shard carries.
///
/// `fence_term` is the leadership term the write set was computed in: the
/// leader read the entity's state while leading in that term. If the entry
/// lands in another term (this node lost leadership and won it again while
/// the turn waited or ran), a leader in between may have changed that state,
/// so every replica skips the write set rather than write over what it does
/// not know. The check runs at apply time, from the entry alone, so all
/// replicas decide alike. `None` for writes that read nothing they overwrite
/// (outbox and expiry bookkeeping, barriers, forwarded proposals).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShardWrite {
    pub ws: WriteSet,
    pub fence_term: Option<u64>,
}

impl From<WriteSet> for ShardWrite {
    fn from(ws: WriteSet) -> Self {
        Self { ws, fence_term: None }
    }
}

impl ShardWrite {
    /// Whether the write set applies in an entry of `entry_term`.
    pub fn admits(&self, entry_term: u64) -> bool {
        self.fence_term.is_none_or(|t| t == entry_term)
    }
}

/// What applying one entry did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ShardApplied {
    Applied,
    /// The write set's fence named another term than the entry's: skipped.
    Fenced {
        entry_term: u64,
    },
    /// A precondition of the write set (an `Op::Expect` on `key`) did not
    /// hold: skipped whole.
    Conflict {
        key: Vec<u8>,
    },
}

/// A node's id in the cluster (and in every shard group it belongs to).
pub type NodeId = u64;

/// Index of a shard: `0..shard_count`, fixed at cluster creation.
pub type ShardId = u32;

openraft::declare_raft_types!(
    /// The openraft configuration of a shard group: entries carry write sets,
    /// each fenced by the term it was computed in or not; applying one says
    /// whether it was applied.
    pub ShardTypes:
        D = ShardWrite,
        R = ShardApplied,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        SnapshotData = snapshot_file::SnapshotFile,
        AsyncRuntime = ShardRuntime,
);

/// openraft's tokio runtime, with election timeouts drawn from
/// [`crate::determinism::RaftRng`] (seeded by a simulation, so a seed
/// replays the same elections) instead of `rand::thread_rng`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ShardRuntime;

impl openraft::AsyncRuntime for ShardRuntime {
    type JoinError = <TokioRuntime as openraft::AsyncRuntime>::JoinError;
    type JoinHandle<T: openraft::OptionalSend + 'static> = <TokioRuntime as openraft::AsyncRuntime>::JoinHandle<T>;
    type Sleep = <TokioRuntime as openraft::AsyncRuntime>::Sleep;
    type Instant = <TokioRuntime as openraft::AsyncRuntime>::Instant;
    type TimeoutError = <TokioRuntime as openraft::AsyncRuntime>::TimeoutError;
    type Timeout<R, T: Future<Output = R> + openraft::OptionalSend> =
        <TokioRuntime as openraft::AsyncRuntime>::Timeout<R, T>;
    type ThreadLocalRng = crate::determinism::RaftRng;
    type OneshotSender<T: openraft::OptionalSend> = <TokioRuntime as openraft::AsyncRuntime>::OneshotSender<T>;
    type OneshotReceiverError = <TokioRuntime as openraft::AsyncRuntime>::OneshotReceiverError;
    type OneshotReceiver<T: openraft::OptionalSend> = <TokioRuntime as openraft::AsyncRuntime>::OneshotReceiver<T>;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + openraft::OptionalSend + 'static,
        T::Output: openraft::OptionalSend + 'static,
    {
        TokioRuntime::spawn(future)
    }

    fn sleep(duration: std::time::Duration) -> Self::Sleep {
        TokioRuntime::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        TokioRuntime::sleep_until(deadline)
    }

    fn timeout<R, F: Future<Output = R> + openraft::OptionalSend>(
        duration: std::time::Duration,
        future: F,
    ) -> Self::Timeout<R, F> {
        TokioRuntime::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + openraft::OptionalSend>(
        deadline: Self::Instant,
        future: F,
    ) -> Self::Timeout<R, F> {
        TokioRuntime::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        TokioRuntime::is_panic(join_error)
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        crate::determinism::RaftRng
    }

    fn oneshot<T>() -> (Self::OneshotSender<T>, Self::OneshotReceiver<T>)
    where
        T: openraft::OptionalSend,
    {
        TokioRuntime::oneshot()
    }
}

pub type Raft = openraft::Raft<ShardTypes>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type Entry = openraft::Entry<ShardTypes>;
pub type StoredMembership = openraft::StoredMembership<NodeId, openraft::BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, openraft::BasicNode>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type ClientWriteError = openraft::error::ClientWriteError<NodeId, openraft::BasicNode>;

/// Raft timing of a shard group. openraft starts an election only after the
/// leader's lease (= `election_timeout_max`) plus a random election timeout,
/// and a replica with a shorter log waits `2 × election_timeout_max` more; at
/// 200–400 ms that is 0.6–0.8 s after the last heartbeat, 1.6 s at worst,
/// inside the 2 s failover budget. Heartbeats every 50 ms miss four beats
/// before the shortest timeout, so a busy 2-core machine does not depose
/// healthy leaders.
/// A snapshot is taken (and the log behind it purged) every
/// `snapshot_every_entries` applied entries.
pub fn raft_config(
    cluster_name: &str,
    snapshot_every_entries: u64,
) -> Result<std::sync::Arc<openraft::Config>, openraft::ConfigError> {
    let config = openraft::Config {
        cluster_name: cluster_name.to_owned(),
        heartbeat_interval: 50,
        election_timeout_min: 200,
        election_timeout_max: 400,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(snapshot_every_entries),
        // Keep 1000 entries behind a snapshot, so a follower that is briefly
        // behind catches up from the log, not a snapshot.
        max_in_snapshot_log_to_keep: 1000,
        ..Default::default()
    };
    Ok(std::sync::Arc::new(config.validate()?))
}

/// Who leads the group, as this replica's metrics say. openraft keeps naming
/// a leader that stepped down because a membership change removed it (its
/// vote stays committed), so a replica that names itself while not in the
/// leader state knows no leader.
pub fn leader_of(m: &openraft::RaftMetrics<NodeId, openraft::BasicNode>) -> Option<NodeId> {
    match m.current_leader {
        Some(l) if l == m.id && m.state != openraft::ServerState::Leader => None,
        l => l,
    }
}

/// The last log index the leader knows `node` holds (from a leader's
/// metrics); `None` elsewhere or before the first reply.
pub fn matched_index(m: &openraft::RaftMetrics<NodeId, openraft::BasicNode>, node: NodeId) -> Option<u64> {
    m.replication.as_ref().and_then(|r| r.get(&node).cloned().flatten()).map(|id| id.index)
}

/// Converts any error into openraft's storage error for the given verb.
pub(crate) fn storage_err(
    subject: openraft::ErrorSubject<NodeId>,
    verb: openraft::ErrorVerb,
    e: impl std::fmt::Display,
) -> StorageError {
    openraft::StorageIOError::new(subject, verb, openraft::AnyError::error(e.to_string())).into()
}

/// The metadata group's id (see `cluster::meta`) on the wire and on disk;
/// data shards are numbered from 0.
pub const META_SHARD: ShardId = u32::MAX;

/// A group of one on disk in `data_dir` (its WAL under `shards/0`, its store
/// in `state/`), led by this process as node 1 with its log applied by the
/// time this returns: the production log without a cluster around it, for
/// the commit-log conformance suite and in-process tests of what commits.
pub async fn open_solo(data_dir: &std::path::Path, config: &crate::log::LogConfig) -> Result<ShardLog, ReplicaError> {
    open_solo_with(data_dir, config, crate::storage::ApplyBuffer::default()).await
}

/// [`open_solo`] with `apply_buffer` bounding its store's apply buffer.
pub async fn open_solo_with(
    data_dir: &std::path::Path,
    config: &crate::log::LogConfig,
    apply_buffer: crate::storage::ApplyBuffer,
) -> Result<ShardLog, ReplicaError> {
    const ME: NodeId = 1;
    let sled_dir = data_dir.join("state");
    let db = sled::Config::new()
        .path(&sled_dir)
        .open()
        .map_err(|e| ReplicaError::Store(crate::storage::StorageError::Sled(e)))?;
    let form = |e: &dyn std::fmt::Display| ReplicaError::Form(e.to_string());
    let host = ReplicaHost {
        node: ME,
        data_dir: data_dir.to_owned(),
        db,
        sled_dir,
        config: raft_config("conflux", config.compact_every_entries).map_err(|e| form(&e))?,
        transport: std::sync::Arc::new(NoPeers),
        wal: open_node_wal(data_dir, std::time::Duration::from_micros(config.wal_flush_wait_micros))?,
        apply_buffer,
    };
    let replica = host.open(0).await?;
    if !replica.raft.is_initialized().await.map_err(|e| form(&e))? {
        let me = openraft::BasicNode::new("127.0.0.1:0");
        replica.raft.initialize(std::collections::BTreeMap::from([(ME, me)])).await.map_err(|e| form(&e))?;
    }
    led_and_applied(&replica.raft, ME, std::time::Duration::from_secs(60)).await.map_err(|e| form(&e))?;
    Ok(ShardLog::new(replica, config))
}

/// Waits (at most `timeout`) until `me` leads `raft`'s group and has applied
/// every entry its log holds: from then on its store may be read.
pub async fn led_and_applied(raft: &Raft, me: NodeId, timeout: std::time::Duration) -> Result<(), String> {
    raft.wait(Some(timeout))
        .metrics(
            |m| m.current_leader == Some(me) && m.last_applied.map(|id| id.index) >= m.last_log_index,
            "this node leads and has applied its log",
        )
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Everything a node holds for one replica of one shard.
#[derive(Clone)]
pub struct Replica {
    pub shard: ShardId,
    pub raft: Raft,
    pub state: ShardStateMachine,
    /// The term this node led the shard in when it last stopped, if it did:
    /// openraft restores that leadership at once on restart, in the same
    /// term and without a new entry, so an entry of the term proves nothing
    /// (see `LocalShard::ready_term`).
    pub restored_lead: Option<u64>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica").field("shard", &self.shard).finish_non_exhaustive()
    }
}

/// Opens the WAL every replica of the node in `data_dir` shares.
pub fn open_node_wal(data_dir: &std::path::Path, flush_wait: std::time::Duration) -> Result<NodeWal, ReplicaError> {
    NodeWal::open(&data_dir.join("wal"), NodeWalOptions::new(flush_wait)).map_err(ReplicaError::Wal)
}

/// Where a replica of `shard` keeps its snapshot under a node's data
/// directory (its log is in the node's WAL).
pub fn replica_dir(data_dir: &std::path::Path, shard: ShardId) -> std::path::PathBuf {
    if shard == META_SHARD {
        return data_dir.join("shards").join("meta");
    }
    data_dir.join("shards").join(shard.to_string())
}

/// What a node shares among all its shard replicas: its id, its data
/// directory and sled database (one per node, a tree per shard, so a node
/// runs one sled flusher rather than one per shard), the Raft timing and the
/// transport to the other nodes.
#[derive(Clone)]
pub struct ReplicaHost {
    pub node: NodeId,
    pub data_dir: std::path::PathBuf,
    pub db: sled::Db,
    pub sled_dir: std::path::PathBuf,
    pub config: std::sync::Arc<openraft::Config>,
    pub transport: std::sync::Arc<dyn Transport>,
    /// The WAL all the node's replicas append to.
    pub wal: NodeWal,
    /// The bounds of each replica store's apply buffer.
    pub apply_buffer: crate::storage::ApplyBuffer,
}

impl std::fmt::Debug for ReplicaHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaHost")
            .field("node", &self.node)
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

impl ReplicaHost {
    /// Opens (or creates) this node's replica of `shard`: its log in the
    /// node's WAL, its snapshot in `replica_dir`, the data in tree `shard-N`
    /// of the node's database. The group starts as a non-member until `initialize` or a
    /// leader adds it.
    pub async fn open(&self, shard: ShardId) -> Result<Replica, ReplicaError> {
        let dir = replica_dir(&self.data_dir, shard);
        let legacy_wal = dir.join("wal");
        if legacy_wal.exists() {
            let moved = log_store::legacy::import(&self.wal, shard, &legacy_wal).map_err(ReplicaError::Wal)?;
            tracing::info!(shard, entries = moved, "moved a replica's own WAL into the node's WAL");
        }
        let mut log = WalLogStore::open(&self.wal, shard).map_err(ReplicaError::Wal)?;
        let vote = openraft::storage::RaftLogStorage::read_vote(&mut log)
            .await
            .map_err(|e| ReplicaError::Wal(std::io::Error::other(e.to_string())))?;
        let restored_lead = vote.filter(|v| v.committed && v.leader_id.node_id == self.node).map(|v| v.leader_id.term);
        let store = crate::storage::SledStore::in_db(&self.db, &format!("shard-{shard}"), &self.sled_dir)?
            .with_apply_buffer(self.apply_buffer);
        let store = std::sync::Arc::new(store);
        let state = ShardStateMachine::open(store, &dir)?;
        let network = ShardNetworkFactory::new(shard, self.transport.clone());
        let raft = Raft::new(self.node, self.config.clone(), network, log, state.clone()).await?;
        Ok(Replica { shard, raft, state, restored_lead })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("shard WAL: {0}")]
    Wal(#[source] std::io::Error),
    #[error("shard store: {0}")]
    Store(#[from] crate::storage::StorageError),
    #[error("shard state machine: {0}")]
    StateMachine(#[from] StorageError),
    #[error("raft: {0}")]
    Raft(#[from] openraft::error::Fatal<NodeId>),
    #[error("forming a group of one: {0}")]
    Form(String),
}

#[cfg(test)]
mod conformance;
#[cfg(test)]
mod tests;
