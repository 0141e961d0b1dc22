//! `LocalLog`: the single-node `CommitLog`. Owns a raft-log WAL, a writer
//! thread (assigns indexes, appends, requests syncs: group commit) and an
//! applier thread (waits for each batch's sync, applies it to the store as one
//! atomic `apply`, answers the proposers in index order, compacts).
//!
//! Pipeline and bounds:
//!   propose ──tokio mpsc (queue_depth)──▶ writer ──std sync_channel
//!   (APPLIER_QUEUE_BATCHES)──▶ applier.
//! Each batch carries the receiver of its own flush callback, so the applier
//! sees batches in index order and never answers before that batch's sync has
//! completed, while the writer never waits for a sync before taking the next
//! batch. raft-log's flush worker executes flush requests in order and merges
//! those that arrive within `wal_flush_wait_micros` into one fdatasync.
//!
//! Where the sync happens: `RaftLog::flush(true, cb)` →
//! `chunked_wal::ChunkedWal::send_pending` → the flush worker thread,
//! chunked-wal-0.2.3 `src/wal/flush_worker.rs` `FlushWorker::run_inner`,
//! which for a batch containing any `sync` write calls
//! `FlushWorker::sync_data_files`, i.e. `File::sync_data()` (fdatasync) on every
//! chunk file written since the last sync, and only then invokes the callbacks
//! (with the error if the sync failed). A failed sync also stops the worker,
//! so no later callback reports success.

use super::{CommitLog, LogConfig, LogError, LogStats};
use crate::model::{LogIndex, WriteSet};
use crate::storage::StateStore;
use futures::future::BoxFuture;
use raft_log::api::raft_log_writer::RaftLogWriter;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// Term of every entry while the log has a single node. Kept in the log id so
/// that an openraft `LogStorage` can later wrap the same WAL format.
pub const SINGLE_NODE_TERM: u64 = 1;

/// Batches written but not yet applied. Bounds the memory between writer and
/// applier; a full queue blocks the writer, which in turn fills the proposal
/// queue and makes `propose` wait.
const APPLIER_QUEUE_BATCHES: usize = 64;
/// Entries read and applied per `apply` call while replaying at open.
const REPLAY_CHUNK_ENTRIES: u64 = 1024;
/// Size at which a WAL chunk file is closed. Only closed chunks can be removed
/// after a purge, so this bounds what a purge leaves behind.
const WAL_CHUNK_MAX_BYTES: usize = 64 * 1024 * 1024;
/// raft-log caches payloads for reads; this log reads only when replaying, so
/// keep the cache small.
const WAL_CACHE_MAX_ITEMS: usize = 4096;
const WAL_CACHE_MAX_BYTES: usize = 32 * 1024 * 1024;

/// raft-log type parameters. LogId = (term, index), payload = encoded
/// `WriteSet`, vote = (term, node id), so an openraft adapter can share them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WalTypes;

impl raft_log::Types for WalTypes {
    type LogId = (u64, u64);
    type LogPayload = Vec<u8>;
    type Vote = (u64, u64);
    type Callback = std_mpsc::SyncSender<io::Result<()>>;
    type UserData = Vec<u8>;

    fn log_index(log_id: &Self::LogId) -> u64 {
        log_id.1
    }

    fn payload_size(payload: &Self::LogPayload) -> u64 {
        payload.len() as u64
    }
}

type Wal = raft_log::RaftLog<WalTypes>;
type Reply = oneshot::Sender<Result<LogIndex, LogError>>;

enum Msg {
    Propose {
        ws: WriteSet,
        payload: Vec<u8>,
        reply: Reply,
    },
    /// Everything queued before this is processed; everything after is refused.
    Shutdown,
}

/// One group-commit batch on its way to the applier.
struct Batch {
    entries: Vec<(LogIndex, WriteSet, Reply)>,
    /// Fires once raft-log's flush worker has synced (or failed to sync) the batch.
    synced: std_mpsc::Receiver<io::Result<()>>,
    /// When the batch was handed to the WAL, for the sync latency metric.
    appended_at: std::time::Instant,
}

/// State shared between the handle and the threads.
#[derive(Default)]
struct Shared {
    closing: AtomicBool,
    poisoned: AtomicBool,
    last_durable: AtomicU64,
    applied: AtomicU64,
    proposals: AtomicU64,
    sync_batches: AtomicU64,
    largest_batch: AtomicU64,
    bytes_written: AtomicU64,
    replayed: AtomicU64,
    compactions: AtomicU64,
    purged: AtomicU64,
    /// Set by the applier after a store persist: the writer may purge up to here.
    purge_request: AtomicU64,
}

type Done = Option<Result<(), LogError>>;

/// Single-node durable commit log. See the module docs.
pub struct LocalLog {
    /// The only long-lived strong sender; taken on shutdown/drop so the writer
    /// sees the end of the queue.
    tx: Mutex<Option<mpsc::Sender<Msg>>>,
    /// What `propose` futures hold, so an idle future does not keep the
    /// writer alive after shutdown.
    weak_tx: mpsc::WeakSender<Msg>,
    shared: Arc<Shared>,
    done: watch::Receiver<Done>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl std::fmt::Debug for LocalLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalLog").field("stats", &self.stats()).finish_non_exhaustive()
    }
}

/// Runs one blocking sync flush (used at open, before anything is read back).
fn blocking_sync(wal: &mut Wal) -> Result<(), LogError> {
    let (tx, rx) = std_mpsc::sync_channel(1);
    wal.flush(true, Some(tx))?;
    rx.recv().map_err(|_| LogError::Aborted("WAL flush worker stopped".into()))??;
    Ok(())
}

impl LocalLog {
    /// Opens the WAL in `dir` (creating it), replays every entry after
    /// `store.applied_index()` into the store, then starts serving proposals.
    pub fn open(dir: &Path, store: Arc<dyn StateStore>, config: LogConfig) -> Result<LocalLog, LogError> {
        config.validate()?;
        crate::storage::durable_file::create_dir_all_durably(dir)?;
        let dir_str =
            dir.to_str().ok_or_else(|| LogError::Config(format!("log directory {dir:?} is not valid UTF-8")))?;
        let wal_config = raft_log::Config {
            wal: raft_log::chunked_wal::Config {
                dir: dir_str.to_owned(),
                // About one compaction interval per chunk, so purges free whole files.
                chunk_max_records: Some(usize::try_from(config.compact_every_entries).unwrap_or(usize::MAX)),
                chunk_max_size: Some(WAL_CHUNK_MAX_BYTES),
                flush_batch_wait: Some(Duration::from_micros(config.wal_flush_wait_micros)),
                ..Default::default()
            },
            log_cache_max_items: Some(WAL_CACHE_MAX_ITEMS),
            log_cache_capacity: Some(WAL_CACHE_MAX_BYTES),
        };
        // raft-log takes an exclusive lock on the directory: a second open fails here.
        let mut wal = Wal::open(Arc::new(wal_config))?;
        // Entries found on disk may still be only in the page cache (previous
        // process crashed before syncing). Sync them before applying any to the
        // store, or a persisted store could end up ahead of the log after a
        // power loss.
        blocking_sync(&mut wal)?;

        let state = wal.log_state();
        let last = state.last().map_or(0, |id| id.1);
        let purged = state.purged().map_or(0, |id| id.1);
        let applied = store.applied_index()?;
        if applied > last {
            return Err(LogError::StoreAheadOfLog { applied, last });
        }
        if applied < purged {
            return Err(LogError::StoreBehindLog { applied, purged });
        }
        let replayed = replay(&wal, store.as_ref(), applied, last)?;

        let shared = Arc::new(Shared::default());
        shared.last_durable.store(last, Ordering::Release);
        shared.applied.store(last, Ordering::Release);
        shared.replayed.store(replayed, Ordering::Relaxed);
        shared.purged.store(purged, Ordering::Relaxed);
        shared.purge_request.store(purged, Ordering::Relaxed);

        let (tx, rx) = mpsc::channel(config.queue_depth);
        let (batch_tx, batch_rx) = std_mpsc::sync_channel(APPLIER_QUEUE_BATCHES);
        let (done_tx, done_rx) = watch::channel(None);

        let writer = Writer { wal, rx, batch_tx, shared: shared.clone(), config: config.clone(), next_index: last + 1 };
        let writer = std::thread::Builder::new().name("conflux-log-writer".into()).spawn(move || writer.run())?;
        let applier = Applier {
            rx: batch_rx,
            store,
            shared: shared.clone(),
            compact_every: config.compact_every_entries,
            since_compaction: 0,
            done: done_tx,
        };
        let applier = std::thread::Builder::new().name("conflux-log-applier".into()).spawn(move || applier.run())?;

        let weak_tx = tx.downgrade();
        Ok(LocalLog {
            tx: Mutex::new(Some(tx)),
            weak_tx,
            shared,
            done: done_rx,
            threads: Arc::new(Mutex::new(vec![writer, applier])),
        })
    }

    fn take_sender(&self) -> Option<mpsc::Sender<Msg>> {
        self.shared.closing.store(true, Ordering::Release);
        // A poisoned mutex only means a panic elsewhere; the Option is still valid.
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// Applies WAL entries (applied, last] to the store in bounded chunks.
fn replay(wal: &Wal, store: &dyn StateStore, applied: LogIndex, last: LogIndex) -> Result<u64, LogError> {
    let mut next = applied + 1;
    let mut count = 0;
    while next <= last {
        let end = (next + REPLAY_CHUNK_ENTRIES).min(last + 1);
        let mut chunk = Vec::with_capacity((end - next) as usize);
        for (expected, item) in (next..end).zip(wal.read(next, end)) {
            let ((_term, index), payload) = item?;
            if index != expected {
                return Err(LogError::Corrupt { index: expected, reason: format!("found entry {index} instead") });
            }
            let ws = WriteSet::decode(&payload).map_err(|e| LogError::Corrupt { index, reason: e.to_string() })?;
            chunk.push((index, ws));
        }
        if chunk.len() as u64 != end - next {
            return Err(LogError::Corrupt {
                index: next + chunk.len() as u64,
                reason: "entry missing from log".into(),
            });
        }
        let refs: Vec<(LogIndex, &WriteSet)> = chunk.iter().map(|(i, ws)| (*i, ws)).collect();
        store.apply(&refs)?;
        count += refs.len() as u64;
        next = end;
    }
    Ok(count)
}

struct Writer {
    wal: Wal,
    rx: mpsc::Receiver<Msg>,
    batch_tx: std_mpsc::SyncSender<Batch>,
    shared: Arc<Shared>,
    config: LogConfig,
    next_index: LogIndex,
}

impl Writer {
    fn run(mut self) {
        let mut batch: Vec<(LogIndex, WriteSet, Reply)> = Vec::new();
        let mut payloads: Vec<((u64, u64), Vec<u8>)> = Vec::new();
        'outer: loop {
            self.maybe_purge();
            let Some(first) = self.rx.blocking_recv() else { break };
            let mut bytes = 0usize;
            let mut shutdown = false;
            let mut msg = Some(first);
            // Take what is already queued, without waiting, up to the bounds.
            while let Some(m) = msg.take() {
                match m {
                    Msg::Shutdown => {
                        shutdown = true;
                        break;
                    }
                    Msg::Propose { ws, payload, reply } => {
                        if self.shared.poisoned.load(Ordering::Acquire) {
                            let _ = reply.send(Err(LogError::Poisoned));
                        } else {
                            let index = self.next_index + batch.len() as u64;
                            bytes += payload.len();
                            payloads.push(((SINGLE_NODE_TERM, index), payload));
                            batch.push((index, ws, reply));
                        }
                    }
                }
                if batch.len() < self.config.max_batch_entries && bytes < self.config.max_batch_bytes {
                    msg = self.rx.try_recv().ok();
                }
            }
            if !batch.is_empty() {
                self.write_batch(std::mem::take(&mut batch), &mut payloads, bytes);
            }
            if shutdown {
                // Refuse whatever raced in after the shutdown request, and wake
                // senders waiting for queue space.
                self.rx.close();
                while let Ok(m) = self.rx.try_recv() {
                    if let Msg::Propose { reply, .. } = m {
                        let _ = reply.send(Err(LogError::ShutDown));
                    }
                }
                break 'outer;
            }
        }
        // Dropping the WAL syncs pending data and joins raft-log's flush worker
        // (ChunkedWal::drop → shutdown), which fires every outstanding
        // callback; then the applier sees the end of its queue.
        drop(self.wal);
        drop(self.batch_tx);
    }

    fn write_batch(
        &mut self,
        batch: Vec<(LogIndex, WriteSet, Reply)>,
        payloads: &mut Vec<((u64, u64), Vec<u8>)>,
        bytes: usize,
    ) {
        let n = batch.len() as u64;
        let (sync_tx, sync_rx) = std_mpsc::sync_channel(1);
        let appended_at = std::time::Instant::now();
        let res = self.wal.append(payloads.drain(..)).and_then(|_| self.wal.flush(true, Some(sync_tx)));
        if let Err(e) = res {
            // raft-log's in-memory state may now disagree with the disk; stop.
            self.shared.poisoned.store(true, Ordering::Release);
            tracing::error!(error = %e, "commit log append failed; log poisoned");
            let err = LogError::from(e);
            for (_, _, reply) in batch {
                let _ = reply.send(Err(err.clone()));
            }
            return;
        }
        self.next_index += n;
        self.shared.proposals.fetch_add(n, Ordering::Relaxed);
        self.shared.sync_batches.fetch_add(1, Ordering::Relaxed);
        self.shared.largest_batch.fetch_max(n, Ordering::Relaxed);
        self.shared.bytes_written.fetch_add(bytes as u64, Ordering::Relaxed);
        // Blocks when the applier is APPLIER_QUEUE_BATCHES behind (backpressure).
        // If the applier is gone the replies are dropped and proposers see Aborted.
        crate::telemetry::metrics().commit_batch_writes.observe(n as f64);
        let _ = self.batch_tx.send(Batch { entries: batch, synced: sync_rx, appended_at });
    }

    /// Purges up to the last index the applier persisted. The purge record is
    /// made durable (and whole chunks removed) by the next sync flush.
    fn maybe_purge(&mut self) {
        let upto = self.shared.purge_request.load(Ordering::Acquire);
        if upto <= self.shared.purged.load(Ordering::Relaxed) || self.shared.poisoned.load(Ordering::Acquire) {
            return;
        }
        match self.wal.purge((SINGLE_NODE_TERM, upto)) {
            Ok(_) => self.shared.purged.store(upto, Ordering::Relaxed),
            // Not fatal: the entries stay on disk and the next request retries.
            Err(e) => tracing::warn!(error = %e, upto, "commit log purge failed"),
        }
    }
}

struct Applier {
    rx: std_mpsc::Receiver<Batch>,
    store: Arc<dyn StateStore>,
    shared: Arc<Shared>,
    compact_every: u64,
    since_compaction: u64,
    done: watch::Sender<Done>,
}

impl Applier {
    fn run(mut self) {
        while let Ok(batch) = self.rx.recv() {
            self.handle(batch);
        }
        // Writer gone and every batch answered: make the store durable so the
        // next start replays little.
        let res = if self.shared.poisoned.load(Ordering::Acquire) {
            Err(LogError::Poisoned)
        } else {
            self.store.persist().map_err(LogError::from)
        };
        self.done.send_replace(Some(res));
    }

    fn poison(&self, err: LogError, entries: Vec<(LogIndex, WriteSet, Reply)>) {
        self.shared.poisoned.store(true, Ordering::Release);
        tracing::error!(error = %err, "commit log poisoned");
        for (_, _, reply) in entries {
            let _ = reply.send(Err(err.clone()));
        }
    }

    fn handle(&mut self, batch: Batch) {
        let synced = batch
            .synced
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("WAL flush worker stopped without reporting the sync")));
        crate::telemetry::metrics().fsync_seconds.observe(batch.appended_at.elapsed().as_secs_f64());
        if self.shared.poisoned.load(Ordering::Acquire) {
            // An earlier batch failed; this one may have reached the disk, but
            // the node must stop, so nothing more is applied or acknowledged.
            for (_, _, reply) in batch.entries {
                let _ = reply.send(Err(LogError::Poisoned));
            }
            return;
        }
        if let Err(e) = synced {
            return self.poison(LogError::from(e), batch.entries);
        }
        let Some(last) = batch.entries.last().map(|e| e.0) else { return };
        self.shared.last_durable.store(last, Ordering::Release);
        let refs: Vec<(LogIndex, &WriteSet)> = batch.entries.iter().map(|(i, ws, _)| (*i, ws)).collect();
        if let Err(e) = self.store.apply(&refs) {
            return self.poison(LogError::from(e), batch.entries);
        }
        self.shared.applied.store(last, Ordering::Release);
        let n = batch.entries.len() as u64;
        for (index, _, reply) in batch.entries {
            let _ = reply.send(Ok(index));
        }
        self.since_compaction += n;
        if self.since_compaction >= self.compact_every {
            self.since_compaction = 0;
            // Persist first: only what the store holds durably may leave the log.
            match self.store.persist() {
                Ok(()) => {
                    self.shared.purge_request.store(last, Ordering::Release);
                    self.shared.compactions.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => self.poison(LogError::from(e), Vec::new()),
            }
        }
    }
}

impl CommitLog for LocalLog {
    fn propose(&self, ws: WriteSet) -> BoxFuture<'static, Result<LogIndex, LogError>> {
        let weak = self.weak_tx.clone();
        let shared = self.shared.clone();
        Box::pin(async move {
            if shared.poisoned.load(Ordering::Acquire) {
                return Err(LogError::Poisoned);
            }
            if shared.closing.load(Ordering::Acquire) {
                return Err(LogError::ShutDown);
            }
            let tx = weak.upgrade().ok_or(LogError::ShutDown)?;
            // Encode on the caller's task so the writer thread only does I/O.
            let payload = ws.encode();
            let (reply, rx) = oneshot::channel();
            // Waits for queue space: this is the backpressure.
            tx.send(Msg::Propose { ws, payload, reply }).await.map_err(|_| LogError::ShutDown)?;
            drop(tx);
            rx.await.map_err(|_| LogError::Aborted("log threads stopped".into()))?
        })
    }

    fn last_durable_index(&self) -> LogIndex {
        self.shared.last_durable.load(Ordering::Acquire)
    }

    fn applied_index(&self) -> LogIndex {
        self.shared.applied.load(Ordering::Acquire)
    }

    fn stats(&self) -> LogStats {
        let s = &self.shared;
        LogStats {
            proposals: s.proposals.load(Ordering::Relaxed),
            sync_batches: s.sync_batches.load(Ordering::Relaxed),
            largest_batch: s.largest_batch.load(Ordering::Relaxed),
            bytes_written: s.bytes_written.load(Ordering::Relaxed),
            replayed_entries: s.replayed.load(Ordering::Relaxed),
            compactions: s.compactions.load(Ordering::Relaxed),
            purged_index: s.purged.load(Ordering::Relaxed),
            largest_batch_bytes: 0,
        }
    }

    fn shutdown(&self) -> BoxFuture<'static, Result<(), LogError>> {
        let tx = self.take_sender();
        let mut done = self.done.clone();
        let threads = self.threads.clone();
        Box::pin(async move {
            if let Some(tx) = tx {
                // Fails only if the writer already stopped; then there is nothing to wait for.
                let _ = tx.send(Msg::Shutdown).await;
            }
            let res = match done.wait_for(Option::is_some).await {
                Ok(v) => (*v).clone().unwrap_or(Ok(())),
                Err(_) => Err(LogError::Aborted("applier thread ended without reporting".into())),
            };
            // Both threads have finished their work (the applier reported, the
            // writer dropped the WAL before that), so these joins are short.
            let handles = std::mem::take(&mut *threads.lock().unwrap_or_else(|e| e.into_inner()));
            for h in handles {
                if h.join().is_err() {
                    return Err(LogError::Aborted("a log thread panicked".into()));
                }
            }
            res
        })
    }
}

impl Drop for LocalLog {
    /// Without an explicit `shutdown`, still stop cleanly: queued proposals are
    /// finished, the WAL lock is released and the threads are joined.
    fn drop(&mut self) {
        if let Some(tx) = self.take_sender() {
            // Best effort: if the queue is full, dropping the last sender ends
            // the writer just the same once the queue drains.
            let _ = tx.try_send(Msg::Shutdown);
        }
        let handles = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for h in handles {
            let _ = h.join();
        }
    }
}
