//! `ShardLog`: the `CommitLog` of one shard replica, through which the
//! scheduler commits a turn's write set, on every node alike. A
//! proposal resolves once its entry is committed by a majority and applied to
//! this replica's store; only the leader accepts proposals.
//!
//! Group commit: openraft 0.9 appends (and syncs) once per client write, so
//! proposals that wait together are concatenated into one write set and one
//! Raft entry (applying `a ++ b` is applying `a` then `b`: later ops win).
//! Up to `MAX_INFLIGHT_BATCHES` entries are in flight at once. Every proposal
//! of a batch gets the batch's index and its outcome. A fenced proposal
//! (`propose_fenced`, see [`super::ShardWrite`]) shares an entry only with
//! proposals of the same fence; a conditional one (`Op::Expect`) shares it
//! with none. An entry holds at most `max_batch_bytes` of write sets (a
//! larger write set goes alone): a Raft entry is sent to a follower in one
//! AppendEntries, which openraft gives one heartbeat interval.
//!
//! Indexes are the store's: raft index + 1 (see `state_machine`). They grow
//! but are not contiguous: leader and membership changes add entries.
//!
//! Bounded waits: a proposal's whole wait, for room in the queue and for its
//! commit, ends at `commit_timeout_ms` from the call. One that never got into
//! the queue fails with `LogError::QueueTimeout` (certainly not written);
//! one that did may still commit. A proposal whose caller stopped waiting
//! before the batcher took it is dropped unproposed, unless it was placed in
//! order (`propose_in_order`: a later proposal of its proposer may have read
//! its writes, so it is always proposed).

use super::{Raft, Replica, ShardApplied, ShardWrite};
use crate::log::{CommitLog, LogConfig, LogError, LogStats, Placed};
use crate::model::{EntityRef, LogIndex, WriteSet};
use crate::storage::StateStore;
use futures::future::BoxFuture;
use openraft::TryAsRef;
use openraft::error::{ForwardToLeader, RaftError};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Batches handed to Raft and not yet answered. More overlap hides the
/// round trip to the followers; the WAL merges the syncs.
const MAX_INFLIGHT_BATCHES: usize = 4;

type Reply = oneshot::Sender<Result<LogIndex, LogError>>;

/// One proposal waiting for the batcher: its write set, its fence, where the
/// outcome goes, and whether it is proposed even once nobody waits for it
/// (one placed in order: a later proposal may depend on it).
struct Proposal {
    ws: WriteSet,
    fence_term: Option<u64>,
    reply: Reply,
    keep: bool,
}

impl Proposal {
    /// Its proposer stopped waiting, and nothing depends on it.
    fn abandoned(&self) -> bool {
        !self.keep && self.reply.is_closed()
    }
}

#[derive(Default)]
struct Counters {
    proposals: AtomicU64,
    batches: AtomicU64,
    largest_batch: AtomicU64,
    largest_batch_bytes: AtomicU64,
    bytes: AtomicU64,
}

pub struct ShardLog {
    replica: Replica,
    tx: mpsc::Sender<Proposal>,
    counters: Arc<Counters>,
    commit_timeout: std::time::Duration,
}

impl std::fmt::Debug for ShardLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardLog").field("shard", &self.replica.shard).finish_non_exhaustive()
    }
}

impl ShardLog {
    /// Starts the batching task; must be called inside a tokio runtime.
    /// `config` bounds the queue and the batches.
    pub fn new(replica: Replica, config: &LogConfig) -> Self {
        let (tx, rx) = mpsc::channel(config.queue_depth);
        let counters = Arc::new(Counters::default());
        tokio::spawn(batcher(replica.raft.clone(), rx, counters.clone(), config.clone()));
        let commit_timeout = std::time::Duration::from_millis(config.commit_timeout_ms);
        Self { replica, tx, counters, commit_timeout }
    }

    /// The replica's store, which this log applies to.
    pub fn store(&self) -> &Arc<crate::storage::SledStore> {
        self.replica.state.store()
    }
}

fn log_error<E>(e: &RaftError<super::NodeId, E>) -> LogError
where
    E: std::error::Error + TryAsRef<ForwardToLeader<super::NodeId, openraft::BasicNode>>,
{
    if let Some(f) = e.forward_to_leader::<openraft::BasicNode>() {
        return LogError::NotLeader { leader: f.leader_id };
    }
    match e {
        RaftError::Fatal(openraft::error::Fatal::Stopped) => LogError::ShutDown,
        e => LogError::Aborted(e.to_string()),
    }
}

/// Only proposals with the same fence share an entry: a fenced entry that
/// lands in another term is skipped whole.
async fn batcher(raft: Raft, mut rx: mpsc::Receiver<Proposal>, counters: Arc<Counters>, config: LogConfig) {
    let inflight = Arc::new(Semaphore::new(MAX_INFLIGHT_BATCHES));
    // A proposal taken from the queue that did not fit the last batch.
    let mut held: Option<Proposal> = None;
    loop {
        let first = match held.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => break,
            },
        };
        // A proposer whose deadline passed while its proposal waited in the
        // queue was told the outcome is unknown; not proposing it at all is
        // one of the outcomes it allowed for, and spares a log that could
        // not keep up.
        if first.abandoned() {
            continue;
        }
        let fence_term = first.fence_term;
        let mut bytes = first.ws.approx_bytes();
        // A conditional write set is skipped whole when its precondition
        // fails, so it never shares an entry with others.
        let alone = first.ws.is_conditional();
        let mut batch = vec![first];
        while !alone && batch.len() < config.max_batch_entries {
            let Ok(next) = rx.try_recv() else { break };
            if next.abandoned() {
                continue;
            }
            // An entry never grows past `max_batch_bytes` (one write set
            // alone excepted, which configuration keeps below it): every
            // entry must reach the followers within openraft's per-message
            // budget, one heartbeat interval.
            let next_bytes = next.ws.approx_bytes();
            if next.fence_term != fence_term || next.ws.is_conditional() || bytes + next_bytes > config.max_batch_bytes
            {
                held = Some(next);
                break;
            }
            bytes += next_bytes;
            batch.push(next);
        }
        let Ok(permit) = inflight.clone().acquire_owned().await else { break };
        // The wait for a permit may have outlasted some proposers.
        batch.retain(|p| !p.abandoned());
        if batch.is_empty() {
            continue;
        }
        let bytes: usize = batch.iter().map(|p| p.ws.approx_bytes()).sum();
        let mut ws = WriteSet::default();
        let mut replies = Vec::with_capacity(batch.len());
        for p in batch {
            ws.ops.extend(p.ws.ops);
            replies.push(p.reply);
        }
        crate::telemetry::metrics().commit_batch_writes.observe(replies.len() as f64);
        counters.batches.fetch_add(1, Ordering::Relaxed);
        counters.largest_batch.fetch_max(replies.len() as u64, Ordering::Relaxed);
        counters.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        counters.largest_batch_bytes.fetch_max(bytes as u64, Ordering::Relaxed);
        let raft = raft.clone();
        let counters = counters.clone();
        // client_write queues the entry when first polled; polling it here
        // before taking the next batch keeps batches in submission order.
        let mut write = Box::pin(async move { raft.client_write(ShardWrite { ws, fence_term }).await });
        let first_poll = futures::poll!(&mut write);
        tokio::spawn(async move {
            let res = match first_poll {
                std::task::Poll::Ready(res) => res,
                std::task::Poll::Pending => write.await,
            };
            let outcome = match res {
                Ok(r) => match r.data {
                    ShardApplied::Applied => Ok(r.log_id.index + 1),
                    ShardApplied::Fenced { entry_term } => {
                        Err(LogError::Fenced { fence_term: fence_term.unwrap_or_default(), entry_term })
                    }
                    ShardApplied::Conflict { key } => Err(LogError::Conflict {
                        key: String::from_utf8_lossy(&key).into_owned(),
                        index: r.log_id.index + 1,
                    }),
                },
                Err(e) => Err(log_error(&e)),
            };
            if outcome.is_ok() {
                counters.proposals.fetch_add(replies.len() as u64, Ordering::Relaxed);
            }
            for reply in replies {
                // A proposer that stopped waiting no longer needs the answer.
                let _ = reply.send(outcome.clone());
            }
            drop(permit);
        });
    }
}

impl ShardLog {
    /// See [`Replica::restored_lead`].
    pub fn restored_lead(&self) -> Option<u64> {
        self.replica.restored_lead
    }

    /// One deadline, `commit_timeout` from the call, bounds every wait: for
    /// room in the queue (a leader without a majority stops draining it,
    /// and its callers hold entity mailboxes meanwhile) and for the commit.
    fn submit(&self, ws: WriteSet, fence_term: Option<u64>) -> BoxFuture<'static, Result<LogIndex, LogError>> {
        let placed = self.place(ws, fence_term, false);
        Box::pin(async move { placed.await?.await })
    }

    /// Queues a proposal (`keep`: proposed even once nobody waits for its
    /// outcome); resolves once it is in the queue, whose order is the log's,
    /// with the future of its outcome. Both waits end at one deadline.
    fn place(&self, ws: WriteSet, fence_term: Option<u64>, keep: bool) -> BoxFuture<'static, Placed> {
        let (tx, timeout) = (self.tx.clone(), self.commit_timeout);
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + timeout;
            let (reply, rx) = oneshot::channel();
            match tokio::time::timeout_at(deadline, tx.send(Proposal { ws, fence_term, reply, keep })).await {
                Ok(sent) => sent.map_err(|_| LogError::ShutDown)?,
                Err(_) => return Err(LogError::QueueTimeout { waited_ms: timeout.as_millis() as u64 }),
            }
            Ok(Box::pin(async move {
                match tokio::time::timeout_at(deadline, rx).await {
                    Ok(reply) => reply.map_err(|_| LogError::ShutDown)?,
                    Err(_) => Err(LogError::Aborted(format!(
                        "not committed within {timeout:?}: the shard may have lost its majority (the write may \
                         still commit later)"
                    ))),
                }
            }) as BoxFuture<'static, _>)
        })
    }
}

impl CommitLog for ShardLog {
    fn propose(&self, ws: WriteSet) -> BoxFuture<'static, Result<LogIndex, LogError>> {
        self.submit(ws, None)
    }

    fn propose_fenced(&self, ws: WriteSet, epoch: u64) -> BoxFuture<'static, Result<LogIndex, LogError>> {
        self.submit(ws, Some(epoch))
    }

    /// The queue is the log's order (the batcher proposes in it, each entry
    /// queued in Raft before the next is taken), and a kept proposal is
    /// never dropped: one placed after it commits only if it does.
    fn propose_in_order(&self, ws: WriteSet, epoch: u64) -> BoxFuture<'static, Placed> {
        self.place(ws, Some(epoch), true)
    }

    /// Heartbeats a quorum (openraft's `ensure_linearizable`), then checks
    /// the term: a leader that was deposed (and has not heard of it, e.g.
    /// behind a broken connection) finds out here instead of answering from
    /// its stale store.
    fn confirm_lead(&self, _entity: &EntityRef, epoch: u64) -> BoxFuture<'static, Result<(), LogError>> {
        let (raft, timeout) = (self.replica.raft.clone(), self.commit_timeout);
        Box::pin(async move {
            match tokio::time::timeout(timeout, raft.ensure_linearizable()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(log_error(&e)),
                Err(_) => return Err(LogError::NotLeader { leader: None }),
            }
            let term = raft.metrics().borrow().current_term;
            if term != epoch {
                return Err(LogError::Fenced { fence_term: epoch, entry_term: term });
            }
            Ok(())
        })
    }

    /// What this replica has applied: an applied entry is committed, so on
    /// a majority of disks.
    fn last_durable_index(&self) -> LogIndex {
        self.applied_index()
    }

    fn applied_index(&self) -> LogIndex {
        self.replica.state.store().applied_index().unwrap_or(0)
    }

    fn stats(&self) -> LogStats {
        let c = &self.counters;
        LogStats {
            proposals: c.proposals.load(Ordering::Relaxed),
            sync_batches: c.batches.load(Ordering::Relaxed),
            largest_batch: c.largest_batch.load(Ordering::Relaxed),
            largest_batch_bytes: c.largest_batch_bytes.load(Ordering::Relaxed),
            bytes_written: c.bytes.load(Ordering::Relaxed),
            wal_fdatasyncs: 0,
        }
    }

    fn shutdown(&self) -> BoxFuture<'static, Result<(), LogError>> {
        let replica = self.replica.clone();
        Box::pin(async move {
            replica.raft.shutdown().await.map_err(|e| LogError::Aborted(e.to_string()))?;
            replica.state.store().persist().map_err(LogError::from)
        })
    }
}
