//! `WalLogStore`: openraft's `RaftLogStorage` for one shard replica, a view
//! of its node's shared WAL ([`super::node_wal::NodeWal`]): every group on a
//! node appends to the same raft-log WAL, so one fdatasync covers them all.
//! openraft's ordering rules map onto the node WAL's checks because the ids
//! are stored as tuples that order the way openraft's do:
//! log id = ((term, leader), index), vote = ((term, node), committed).
//!
//! Durability: `append` hands openraft's `LogFlushed` callback to raft-log's
//! flush worker, which calls it only after fdatasync; `save_vote` and
//! `truncate` wait for their own sync before returning.

use super::node_wal::{NodeWal, WalLogId, WalVote};
use super::{Entry, LogId, ShardId, ShardTypes, StorageError, Vote, storage_err};
use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{CommittedLeaderId, EntryPayload, ErrorSubject, ErrorVerb, LogState, OptionalSend, RaftLogReader};
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};

/// Payload bytes one AppendEntries carries (at least one entry, whatever
/// its size). openraft gives each AppendEntries `heartbeat_interval` (50 ms)
/// to be sent, written and fsynced; unbounded, a replica catching up from a
/// log of large entries was sent hundreds of them at once, timed out, and
/// was sent them all again.
pub const MAX_APPEND_BYTES: usize = 256 * 1024;

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

/// The log of one shard replica. Clones share the node's WAL (openraft's
/// log reader is a clone).
#[derive(Clone)]
pub struct WalLogStore {
    wal: NodeWal,
    shard: ShardId,
}

impl Debug for WalLogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalLogStore").field("shard", &self.shard).finish_non_exhaustive()
    }
}

impl WalLogStore {
    /// The log of `shard` in the node's `wal` (an empty one if the node
    /// never held the shard).
    pub fn open(wal: &NodeWal, shard: ShardId) -> io::Result<Self> {
        wal.open_shard(shard)?;
        Ok(Self { wal: wal.clone(), shard })
    }

    /// Syncs everything written so far and waits for it.
    async fn sync(&self, subject: ErrorSubject<super::NodeId>, verb: ErrorVerb) -> Result<(), StorageError> {
        self.wal.sync().await.map_err(|e| storage_err(subject, verb, e))
    }

    fn read(&self, from: u64, to: u64, max_bytes: usize) -> Result<Vec<Entry>, StorageError> {
        let records = self
            .wal
            .read(self.shard, from, to, max_bytes)
            .map_err(|e| storage_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
        records.iter().map(|(id, payload)| decode_entry(id, payload)).collect()
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
        self.read(from, to, usize::MAX)
    }

    /// The entries from `start`, up to `end` or [`MAX_APPEND_BYTES`] of
    /// payload, whichever comes first (never none).
    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> Result<Vec<Entry>, StorageError> {
        self.read(start, end, MAX_APPEND_BYTES)
    }
}

impl RaftLogStorage<ShardTypes> for WalLogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<ShardTypes>, StorageError> {
        let (purged, last) =
            self.wal.log_state(self.shard).map_err(|e| storage_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
        let last_purged_log_id = purged.as_ref().map(from_wal_log_id);
        let last_log_id = last.as_ref().map(from_wal_log_id);
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.wal
            .save_vote(self.shard, to_wal_vote(vote))
            .map_err(|e| storage_err(ErrorSubject::Vote, ErrorVerb::Write, e))?;
        // A vote must be on disk before it is granted.
        self.sync(ErrorSubject::Vote, ErrorVerb::Write).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        let vote = self.wal.vote(self.shard).map_err(|e| storage_err(ErrorSubject::Vote, ErrorVerb::Read, e))?;
        Ok(vote.as_ref().map(from_wal_vote))
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
        let write_err = |e| storage_err(ErrorSubject::Logs, ErrorVerb::Write, e);
        if crate::determinism::simulated() {
            self.wal.append(self.shard, records, false, None).map_err(write_err)?;
            callback.log_io_completed(self.wal.write_through(false));
            return Ok(());
        }
        // raft-log's flush worker fdatasyncs (once for every group's appends
        // waiting on it), then calls openraft back.
        let flushed = Flushed::Raft(callback, std::time::Instant::now());
        self.wal.append(self.shard, records, true, Some(flushed)).map_err(write_err)
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.wal
            .truncate(self.shard, log_id.index)
            .map_err(|e| storage_err(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
        self.sync(ErrorSubject::Logs, ErrorVerb::Delete).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.wal
            .purge(self.shard, to_wal_log_id(&log_id))
            .map_err(|e| storage_err(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }
}

/// Data directories written before the node WAL kept one raft-log WAL per
/// replica, in `shards/<n>/wal`. Opening such a replica moves its log into
/// the node WAL once and deletes the old directory.
pub mod legacy {
    use super::{Flushed, NodeWal, WalLogId, WalVote};
    use std::io;
    use std::path::Path;
    use std::sync::Arc;

    /// raft-log type parameters of a per-replica WAL.
    #[derive(Debug, Clone, Default, PartialEq, Eq)]
    pub struct ShardWalTypes;

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

    pub type ShardWal = raft_log::RaftLog<ShardWalTypes>;

    /// Opens a per-replica WAL in `dir`.
    pub fn open(dir: &Path) -> io::Result<ShardWal> {
        let dir = dir
            .to_str()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{dir:?} is not valid UTF-8")))?;
        let wal = raft_log::chunked_wal::Config { dir: dir.to_owned(), ..Default::default() };
        ShardWal::open(Arc::new(raft_log::Config { wal, ..Default::default() }))
    }

    /// Entries moved per append while importing.
    const IMPORT_BATCH: usize = 1024;

    /// Moves the per-replica WAL in `dir` into `wal` as `shard`'s log (its
    /// vote, purge point and entries), syncs it, then deletes `dir`. A
    /// crash before the deletion leaves `dir` in place, and the next start
    /// imports it again from scratch.
    pub fn import(wal: &NodeWal, shard: super::ShardId, dir: &Path) -> io::Result<usize> {
        let old = open(dir)?;
        let state = old.log_state().clone();
        // An earlier import a crash cut short left a partial log.
        wal.remove_shard(shard)?;
        wal.open_shard(shard)?;
        if let Some(vote) = state.vote() {
            wal.save_vote(shard, *vote)?;
        }
        if let Some(purged) = state.purged() {
            wal.purge(shard, *purged)?;
        }
        let from = state.purged().map_or(0, |p| p.1 + 1);
        let to = state.last().map_or(from, |l| l.1 + 1);
        let mut batch = Vec::with_capacity(IMPORT_BATCH);
        let mut moved = 0;
        for item in old.read(from, to) {
            batch.push(item?);
            if batch.len() == IMPORT_BATCH {
                moved += batch.len();
                wal.append(shard, std::mem::take(&mut batch), false, None)?;
            }
        }
        moved += batch.len();
        wal.append(shard, batch, false, None)?;
        wal.write_through(true)?;
        drop(old);
        std::fs::remove_dir_all(dir)?;
        if let Some(parent) = dir.parent() {
            std::fs::File::open(parent)?.sync_all()?;
        }
        Ok(moved)
    }
}
