//! The durable commit log's port: the `CommitLog` trait, its errors,
//! statistics and configuration. Its one provider is a shard replica's
//! `cluster::raft::ShardLog` (every node commits through its shard groups);
//! the conformance suite here runs against it on disk. The log is the
//! durability boundary: a proposal is acknowledged only once its entry is
//! fdatasync'd and applied to the `StateStore`; on start-up the store is
//! caught up by replaying the log.

#[cfg(test)]
pub(crate) mod conformance;

use crate::model::{LogIndex, WriteSet};
use crate::storage::StorageError;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Errors of the commit log. Cheap to clone (sources are shared) because one
/// failure is reported to every proposer of the affected batch.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    #[error("commit log I/O failed: {0}")]
    Io(#[source] Arc<std::io::Error>),
    #[error("state store failed: {0}")]
    Storage(#[source] Arc<StorageError>),
    #[error("commit log is shut down")]
    ShutDown,
    #[error("commit log stopped before completing this request: {0}")]
    Aborted(String),
    #[error("invalid log config: {0}")]
    Config(String),
    /// A replicated log only accepts proposals on the leader of its group.
    #[error("this replica does not lead its shard (leader: {})", leader.map_or("unknown".to_string(), |l| format!("node {l}")))]
    NotLeader { leader: Option<u64> },
    /// A fenced proposal landed in another leadership term than the one it
    /// was computed in, so it was committed as a no-op: nothing of it applied.
    #[error("leadership moved from term {fence_term} to term {entry_term} before the write committed: not applied")]
    Fenced { fence_term: u64, entry_term: u64 },
    /// The proposal's deadline passed before the log's queue had room for
    /// it (a shard leader cut off from its majority stops draining it): it
    /// was never proposed, so nothing of it can commit.
    #[error("the commit queue had no room within {waited_ms} ms (the shard may have lost its majority): not written")]
    QueueTimeout { waited_ms: u64 },
    /// A conditional write set (`Op::Expect`) committed, but a precondition
    /// did not hold when it applied: nothing of it applied. `key` names it;
    /// `index` is the (no-op) entry's, so a reader can wait until it sees
    /// what the write conflicted with.
    #[error("conflict: {key} changed since it was read; nothing was written")]
    Conflict { key: String, index: LogIndex },
}

impl LogError {
    /// Whether the failed proposal certainly wrote nothing and never will
    /// (otherwise its outcome is unknown until a later write commits).
    pub fn never_written(&self) -> bool {
        matches!(self, LogError::Fenced { .. } | LogError::QueueTimeout { .. } | LogError::Conflict { .. })
    }
}

impl From<std::io::Error> for LogError {
    fn from(e: std::io::Error) -> Self {
        LogError::Io(Arc::new(e))
    }
}

impl From<StorageError> for LogError {
    fn from(e: StorageError) -> Self {
        LogError::Storage(Arc::new(e))
    }
}

/// Counters for tests, metrics and benchmarks. Monotonic except
/// `largest_batch` and `largest_batch_bytes` (maxima).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Proposals appended to the log.
    pub proposals: u64,
    /// Batches appended with one sync flush request each.
    pub sync_batches: u64,
    /// Most entries in one batch.
    pub largest_batch: u64,
    /// Payload bytes (encoded write sets) appended.
    pub bytes_written: u64,
    /// Most payload bytes (write sets) in one batch: on a cluster, one Raft
    /// entry, bounded by `max_batch_bytes` unless one write set is larger.
    pub largest_batch_bytes: u64,
    /// fdatasyncs of the node's WAL (one covers the appends of every group
    /// waiting on it; 0 where no WAL is in view).
    pub wal_fdatasyncs: u64,
}

/// Tuning of the commit log (each shard's `ShardLog`). Every field has a default; in a config file any may
/// be omitted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Most proposals appended and synced as one batch.
    pub max_batch_entries: usize,
    /// Most payload bytes of one batch, which on a cluster is one Raft
    /// entry: a batch ends before the write set that would exceed it (one
    /// write set alone may, but configuration keeps every turn's write set
    /// below it). Bounded so an entry reaches the followers within one
    /// AppendEntries, which openraft gives one heartbeat interval.
    pub max_batch_bytes: usize,
    /// Proposals that may wait for the writer; further `propose` calls wait
    /// for room (backpressure).
    pub queue_depth: usize,
    /// Persist the store and purge the log after this many applied entries.
    pub compact_every_entries: u64,
    /// How long raft-log's flush worker waits for more flush requests to
    /// share one fdatasync. Adds at most this much latency to a lone proposal.
    pub wal_flush_wait_micros: u64,
    /// How long a proposal may wait, for room in the queue and then to be
    /// committed and applied. A shard leader cut off from its majority can
    /// never commit: its callers get an error (not written, or outcome
    /// unknown) instead of waiting forever.
    pub commit_timeout_ms: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            max_batch_entries: 1024,
            // A 4 MiB write set, a 1 MiB stored reply and bookkeeping fit.
            max_batch_bytes: 6 * 1024 * 1024,
            queue_depth: 8192,
            compact_every_entries: 100_000,
            wal_flush_wait_micros: 100,
            commit_timeout_ms: 10_000,
        }
    }
}

impl LogConfig {
    pub fn validate(&self) -> Result<(), LogError> {
        let positive = [
            ("max_batch_entries", self.max_batch_entries as u64),
            ("max_batch_bytes", self.max_batch_bytes as u64),
            ("queue_depth", self.queue_depth as u64),
            ("compact_every_entries", self.compact_every_entries),
            ("commit_timeout_ms", self.commit_timeout_ms),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(LogError::Config(format!("{name} must be greater than 0")));
            }
        }
        if self.wal_flush_wait_micros > 100_000 {
            return Err(LogError::Config("wal_flush_wait_micros must be at most 100000".into()));
        }
        Ok(())
    }
}

/// What [`CommitLog::propose_in_order`] gives once the proposal holds its
/// place in the log (or why it never will): the future of its outcome.
pub type Placed = Result<futures::future::BoxFuture<'static, Result<LogIndex, LogError>>, LogError>;

/// An ordered, durable log of write sets that applies each committed entry to
/// a state store.
pub trait CommitLog: Send + Sync + 'static {
    /// Proposes a write set. The returned future resolves once the entry is
    /// durable (fdatasync'd on a majority) AND applied to this replica's
    /// store, with its index. One caller awaiting each proposal before the
    /// next sees increasing indexes; proposals batched into one entry share
    /// its index.
    fn propose(&self, ws: WriteSet) -> futures::future::BoxFuture<'static, Result<LogIndex, LogError>>;
    /// Proposes a write set computed from state read while this replica led
    /// in leadership term `epoch` (what `Route::Here` named). If the entry
    /// lands in another term it commits as a no-op and the proposal fails
    /// with [`LogError::Fenced`]. `epoch` must be a Raft term. A log that
    /// knows no terms proposes unfenced.
    fn propose_fenced(
        &self,
        ws: WriteSet,
        epoch: u64,
    ) -> futures::future::BoxFuture<'static, Result<LogIndex, LogError>> {
        let _ = epoch;
        self.propose(ws)
    }
    /// [`propose_fenced`](Self::propose_fenced) in two steps, for a
    /// proposer that computes its next write set from this one's effects
    /// before they commit (pipelined turns). The outer future resolves once
    /// the proposal holds its place in the log's order: whatever is proposed
    /// after that enters the log after it, and it is proposed even if nobody
    /// waits for its outcome any more, so a later proposal never commits
    /// without it. The inner future resolves with its outcome.
    ///
    /// The default, for a log without a queue, resolves the outer future
    /// only once the proposal's outcome is known: correct, without overlap.
    fn propose_in_order(&self, ws: WriteSet, epoch: u64) -> futures::future::BoxFuture<'static, Placed> {
        let outcome = self.propose_fenced(ws, epoch);
        Box::pin(async move {
            let outcome = outcome.await;
            Ok(Box::pin(async move { outcome }) as futures::future::BoxFuture<'static, _>)
        })
    }
    /// After a read-only turn of `entity` computed in leadership term
    /// `epoch`: confirms this replica still leads in that term, so its reply
    /// is not a deposed leader's stale read. Fails with `NotLeader` or
    /// `Fenced` if not; nothing was written either way. A log whose
    /// leadership never changes has nothing to confirm.
    fn confirm_lead(
        &self,
        entity: &crate::model::EntityRef,
        epoch: u64,
    ) -> futures::future::BoxFuture<'static, Result<(), LogError>> {
        let _ = (entity, epoch);
        Box::pin(async { Ok(()) })
    }
    fn last_durable_index(&self) -> LogIndex;
    fn applied_index(&self) -> LogIndex;
    fn stats(&self) -> LogStats;
    /// Stops accepting proposals, waits for in-flight ones to finish, persists the store. Idempotent.
    fn shutdown(&self) -> futures::future::BoxFuture<'static, Result<(), LogError>>;
}
