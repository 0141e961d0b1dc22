//! `WalLogStore`: openraft's `RaftLogStorage` for one shard replica, on its
//! own raft-log WAL (an fdatasync'd, group-committing write-ahead log).
//! raft-log keeps the vote, the entries and the
//! purge point; openraft's ordering rules map onto raft-log's checks because
//! the ids are stored as tuples that order the way openraft's do:
//! log id = ((term, leader), index), vote = ((term, node), committed).
//!
//! Durability: `append` hands openraft's `LogFlushed` callback to raft-log's
//! flush worker, which calls it only after fdatasync; `save_vote` and
//! `truncate` wait for their own sync before returning.

use super::{Entry, LogId, NodeId, ShardTypes, StorageError, Vote, storage_err};
use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{CommittedLeaderId, EntryPayload, ErrorSubject, ErrorVerb, LogState, OptionalSend, RaftLogReader};
use raft_log::api::raft_log_writer::RaftLogWriter;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Closed WAL chunks are removed after a purge; 16 MiB keeps what a purge
/// leaves behind small for a shard (a node hosts dozens).
const WAL_CHUNK_MAX_BYTES: usize = 16 * 1024 * 1024;
/// Followers and lagging replication read recent entries back; a small cache
/// per shard serves them without disk reads.
const WAL_CACHE_MAX_ITEMS: usize = 1024;
const WAL_CACHE_MAX_BYTES: usize = 8 * 1024 * 1024;
/// Payload bytes one AppendEntries carries (at least one entry, whatever
/// its size). openraft gives each AppendEntries `heartbeat_interval` (50 ms)
/// to be sent, written and fsynced; unbounded, a replica catching up from a
/// log of large entries was sent hundreds of them at once, timed out, and
/// was sent them all again.
pub const MAX_APPEND_BYTES: usize = 256 * 1024;

/// raft-log type parameters of a shard log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardWalTypes;

/// ((term, leader node), index).
type WalLogId = ((u64, u64), u64);
/// ((term, voted-for node), committed).
type WalVote = ((u64, u64), bool);

impl raft_log::Types for ShardWalTypes {
    type LogId = WalLogId;
    /// postcard-encoded `EntryPayload` (the log id is the record's key).
    type LogPayload = Vec<u8>;
    type Vote = WalVote;
    type Callback = Flushed;
    type UserData = Vec<u8>;

    fn log_index(log_id: &Self::LogId) -> u64 {
        log_id.1
    }

    fn payload_size(payload: &Self::LogPayload) -> u64 {
        payload.len() as u64
    }
}

/// Who is told when a flush has reached the disk.
pub enum Flushed {
    /// openraft's append callback, and when the append asked for the sync
    /// (for the fsync latency metric).
    Raft(LogFlushed<ShardTypes>, std::time::Instant),
    /// A caller awaiting its own write (vote, truncate).
    Wait(tokio::sync::oneshot::Sender<io::Result<()>>),
    /// A caller blocking on its own write: under a simulation, where a
    /// write must end in the simulated instant it began in.
    Block(std::sync::mpsc::SyncSender<io::Result<()>>),
}

impl raft_log::Callback for Flushed {
    fn send(self, res: io::Result<()>) {
        match self {
            Flushed::Raft(cb, asked_at) => {
                crate::telemetry::metrics().fsync_seconds.observe(asked_at.elapsed().as_secs_f64());
                cb.log_io_completed(res)
            }
            Flushed::Wait(tx) => {
                // The waiter may have been cancelled; then nobody needs to know.
                let _ = tx.send(res);
            }
            Flushed::Block(tx) => {
                // Gone only if the blocked thread panicked.
                let _ = std::sync::mpsc::SyncSender::send(&tx, res);
            }
        }
    }
}

type Wal = raft_log::RaftLog<ShardWalTypes>;

fn to_wal_log_id(id: &LogId) -> WalLogId {
    ((id.leader_id.term, id.leader_id.node_id), id.index)
}

fn from_wal_log_id(id: &WalLogId) -> LogId {
    LogId::new(CommittedLeaderId::new(id.0.0, id.0.1), id.1)
}

fn to_wal_vote(v: &Vote) -> WalVote {
    ((v.leader_id.term, v.leader_id.node_id), v.committed)
}

fn from_wal_vote(v: &WalVote) -> Vote {
    if v.1 { Vote::new_committed(v.0.0, v.0.1) } else { Vote::new(v.0.0, v.0.1) }
}

/// The log of one shard replica. Clones share the WAL (openraft's log reader
/// is a clone).
#[derive(Clone)]
pub struct WalLogStore {
    wal: Arc<Mutex<Wal>>,
}

impl Debug for WalLogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalLogStore").finish_non_exhaustive()
    }
}

impl WalLogStore {
    /// Opens (creating if needed) the WAL in `dir`. raft-log locks the
    /// directory, so a second opener fails. `flush_wait` is how long the flush
    /// worker waits to merge syncs (group commit across concurrent turns).
    pub fn open(dir: &Path, flush_wait: Duration) -> io::Result<Self> {
        // raft-log syncs the directory's own entries (chunk files); the
        // directories above it must be durable before anything is appended.
        crate::storage::durable_file::create_dir_all_durably(dir)?;
        let dir_str = dir
            .to_str()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{dir:?} is not valid UTF-8")))?;
        let config = raft_log::Config {
            wal: raft_log::chunked_wal::Config {
                dir: dir_str.to_owned(),
                chunk_max_size: Some(WAL_CHUNK_MAX_BYTES),
                flush_batch_wait: Some(flush_wait),
                ..Default::default()
            },
            log_cache_max_items: Some(WAL_CACHE_MAX_ITEMS),
            log_cache_capacity: Some(WAL_CACHE_MAX_BYTES),
        };
        let wal = Wal::open(Arc::new(config))?;
        Ok(Self { wal: Arc::new(Mutex::new(wal)) })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Wal>, StorageError> {
        self.wal.lock().map_err(|_| storage_err(ErrorSubject::Logs, ErrorVerb::Read, "WAL lock poisoned"))
    }

    /// Writes what is buffered and blocks this thread until the flush worker
    /// has (`sync`: fdatasynced it too). Only a simulation does this: its
    /// crashes drop a node's process state but not the machine's page cache,
    /// so a write need not be synced to survive one, but it must be done
    /// before the simulation moves on, whatever the real disk's speed.
    fn write_through(&self, sync: bool) -> io::Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.wal.lock().map_err(|_| io::Error::other("WAL lock poisoned"))?.flush(sync, Some(Flushed::Block(tx)))?;
        rx.recv().map_err(|_| io::Error::other("WAL flush worker stopped"))?
    }

    /// Syncs everything written so far and waits for it.
    async fn sync(&self, subject: ErrorSubject<NodeId>, verb: ErrorVerb) -> Result<(), StorageError> {
        if crate::determinism::simulated() {
            return self.write_through(true).map_err(|e| storage_err(subject, verb, e));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.lock()?.flush(true, Some(Flushed::Wait(tx))).map_err(|e| storage_err(subject.clone(), verb, e))?;
        match rx.await {
            Ok(res) => res.map_err(|e| storage_err(subject, verb, e)),
            Err(_) => Err(storage_err(subject, verb, "WAL flush worker stopped")),
        }
    }
}

fn decode_entry(id: &WalLogId, payload: &[u8]) -> Result<Entry, StorageError> {
    let log_id = from_wal_log_id(id);
    let payload: EntryPayload<ShardTypes> =
        postcard::from_bytes(payload).map_err(|e| storage_err(ErrorSubject::Log(log_id), ErrorVerb::Read, e))?;
    Ok(Entry { log_id, payload })
}

impl RaftLogReader<ShardTypes> for WalLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let from = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let to = match range.end_bound() {
            Bound::Included(i) => i.saturating_add(1),
            Bound::Excluded(i) => *i,
            Bound::Unbounded => u64::MAX,
        };
        let wal = self.lock()?;
        wal.read(from, to)
            .map(|item| {
                let (id, payload) = item.map_err(|e| storage_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
                decode_entry(&id, &payload)
            })
            .collect()
    }

    /// The entries from `start`, up to `end` or [`MAX_APPEND_BYTES`] of
    /// payload, whichever comes first (never none).
    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> Result<Vec<Entry>, StorageError> {
        let wal = self.lock()?;
        let (mut entries, mut bytes) = (Vec::new(), 0usize);
        for item in wal.read(start, end) {
            let (id, payload) = item.map_err(|e| storage_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
            bytes += payload.len();
            if !entries.is_empty() && bytes > MAX_APPEND_BYTES {
                break;
            }
            entries.push(decode_entry(&id, &payload)?);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<ShardTypes> for WalLogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<ShardTypes>, StorageError> {
        let wal = self.lock()?;
        let state = wal.log_state();
        let last_purged_log_id = state.purged().map(from_wal_log_id);
        let last_log_id = state.last().map(from_wal_log_id).or(last_purged_log_id);
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.lock()?.save_vote(to_wal_vote(vote)).map_err(|e| storage_err(ErrorSubject::Vote, ErrorVerb::Write, e))?;
        // A vote must be on disk before it is granted.
        self.sync(ErrorSubject::Vote, ErrorVerb::Write).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self.lock()?.log_state().vote().map(from_wal_vote))
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<ShardTypes>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut records = Vec::new();
        for entry in entries {
            let payload = postcard::to_allocvec(&entry.payload)
                .map_err(|e| storage_err(ErrorSubject::Log(entry.log_id), ErrorVerb::Write, e))?;
            records.push((to_wal_log_id(&entry.log_id), payload));
        }
        let mut wal = self.lock()?;
        wal.append(records).map_err(|e| storage_err(ErrorSubject::Logs, ErrorVerb::Write, e))?;
        if crate::determinism::simulated() {
            drop(wal);
            callback.log_io_completed(self.write_through(false));
            return Ok(());
        }
        // raft-log's flush worker fdatasyncs, then calls openraft back.
        wal.flush(true, Some(Flushed::Raft(callback, std::time::Instant::now())))
            .map_err(|e| storage_err(ErrorSubject::Logs, ErrorVerb::Write, e))
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.lock()?.truncate(log_id.index).map_err(|e| storage_err(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
        self.sync(ErrorSubject::Logs, ErrorVerb::Delete).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut wal = self.lock()?;
        wal.purge(to_wal_log_id(&log_id)).map_err(|e| storage_err(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
        // A purge need not be durable at once (a lost purge only keeps
        // entries longer); a sync flush is what removes the freed chunk files.
        wal.flush(true, None).map_err(|e| storage_err(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }
}
