//! `NodeWal`: the one write-ahead log of a node, shared by every shard
//! replica on it (the multi-Raft layout of TiKV's raft-engine), on a single
//! raft-log WAL. Every append of every group goes into the same file and is
//! covered by the same fdatasync, so 64 groups taking writes at once cost one
//! sync per flush, not 64.
//!
//! Layout on disk (a raft-log WAL in `<data dir>/wal`):
//! - each raft-log entry is one *record* at a node-wide sequence number: a
//!   shard entry (shard, incarnation, Raft log id, payload) or a shard's
//!   truncation point;
//! - raft-log's user data holds the node's [`NodeMeta`]: per shard its vote,
//!   its purge point and its incarnation. It is written into the same stream,
//!   so a record is never durable without the meta that came before it.
//!
//! In memory each shard keeps an index from its Raft indexes to sequence
//! numbers; opening replays the records to rebuild it. A shard's purge only
//! moves its meta: the node's log is purged below the oldest record any shard
//! still needs. A shard that takes no writes would pin that point for ever,
//! so once the log holds far more records than shards need, the shard that
//! pins it has its live entries appended again ([`NodeWal::compact`]; TiKV
//! calls this a rewrite) and the head is released.
//!
//! A removed shard's records stay until purged, but its incarnation is gone
//! from the meta, so replay skips them; the shard opened again later gets a
//! new incarnation and starts empty.

use super::ShardId;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::log_store::Flushed;
use raft_log::api::raft_log_writer::RaftLogWriter;

/// Closed chunks are removed once the log is purged past them.
const CHUNK_MAX_BYTES: usize = 64 * 1024 * 1024;
/// Replication and lagging followers read recent entries back; the cache is
/// the node's, shared by all its groups.
const CACHE_MAX_ITEMS: usize = 16 * 1024;
const CACHE_MAX_BYTES: usize = 32 * 1024 * 1024;
/// How many more records than the shards' live entries the log may hold
/// before the shard pinning its head is rewritten.
const REWRITE_SLACK_RECORDS: u64 = 256 * 1024;
/// Records copied per read-then-append round of a rewrite (bounds the
/// memory a rewrite holds at once).
const REWRITE_BATCH: usize = 1024;

/// A shard entry's id as stored: ((term, leader node), index).
pub type WalLogId = ((u64, u64), u64);
/// A shard's vote as stored: ((term, voted-for node), committed).
pub type WalVote = ((u64, u64), bool);

/// raft-log type parameters of the node log: entries are records at
/// sequence numbers; raft-log's own vote is unused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeWalTypes;

impl raft_log::Types for NodeWalTypes {
    type LogId = u64;
    /// A postcard-encoded [`Record`].
    type LogPayload = Vec<u8>;
    type Vote = u64;
    type Callback = Flushed;
    /// A postcard-encoded [`NodeMeta`].
    type UserData = Vec<u8>;

    fn log_index(log_id: &Self::LogId) -> u64 {
        *log_id
    }

    fn payload_size(payload: &Self::LogPayload) -> u64 {
        payload.len() as u64
    }
}

type Wal = raft_log::RaftLog<NodeWalTypes>;

/// One record of the node log.
#[derive(Debug, Serialize, Deserialize)]
enum Record<'a> {
    Entry {
        shard: ShardId,
        incarnation: u64,
        log_id: WalLogId,
        #[serde(borrow)]
        payload: &'a [u8],
    },
    /// The shard's entries from `from` on are gone.
    Truncate { shard: ShardId, incarnation: u64, from: u64 },
}

/// What the node keeps of each shard outside its entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct NodeMeta {
    next_incarnation: u64,
    shards: BTreeMap<ShardId, ShardMeta>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct ShardMeta {
    /// Which opening of the shard on this node records belong to.
    incarnation: u64,
    vote: Option<WalVote>,
    purged: Option<WalLogId>,
}

/// Where one shard entry lives in the node log.
#[derive(Debug, Clone, Copy)]
struct Slot {
    seq: u64,
    leader: (u64, u64),
}

/// A shard's entries: `slots[i]` holds Raft index `first + i`.
#[derive(Debug, Default)]
struct ShardIndex {
    first: u64,
    slots: VecDeque<Slot>,
}

impl ShardIndex {
    fn last(&self) -> Option<WalLogId> {
        let slot = self.slots.back()?;
        Some((slot.leader, self.first + self.slots.len() as u64 - 1))
    }

    /// Drops the entries from `from` on.
    fn truncate(&mut self, from: u64) {
        let keep = from.saturating_sub(self.first).min(self.slots.len() as u64);
        self.slots.truncate(keep as usize);
    }

    /// Drops the entries up to `upto`.
    fn purge(&mut self, upto: u64) {
        while !self.slots.is_empty() && self.first <= upto {
            self.slots.pop_front();
            self.first += 1;
        }
        if self.slots.is_empty() {
            self.first = self.first.max(upto + 1);
        }
    }

    /// Places entry `index` at `seq`: the next entry, or a rewritten copy of
    /// one it holds.
    fn place(&mut self, index: u64, slot: Slot) -> Result<(), u64> {
        if self.slots.is_empty() {
            self.first = index;
        }
        let end = self.first + self.slots.len() as u64;
        if index == end {
            self.slots.push_back(slot);
        } else if index >= self.first && index < end {
            self.slots[(index - self.first) as usize] = slot;
        } else {
            return Err(end);
        }
        Ok(())
    }
}

/// Knobs a test shrinks to make rewrites and chunk rotation happen.
#[derive(Debug, Clone, Copy)]
pub struct NodeWalOptions {
    pub flush_wait: Duration,
    pub chunk_max_bytes: usize,
    pub rewrite_slack_records: u64,
}

impl NodeWalOptions {
    pub fn new(flush_wait: Duration) -> Self {
        Self { flush_wait, chunk_max_bytes: CHUNK_MAX_BYTES, rewrite_slack_records: REWRITE_SLACK_RECORDS }
    }
}

struct Inner {
    wal: Wal,
    meta: NodeMeta,
    shards: HashMap<ShardId, ShardIndex>,
    /// The sequence number of the next record.
    next_seq: u64,
    rewrite_slack_records: u64,
}

/// The node's WAL; clones share it.
#[derive(Clone)]
pub struct NodeWal {
    inner: Arc<Mutex<Inner>>,
}

impl std::fmt::Debug for NodeWal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeWal").finish_non_exhaustive()
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

fn not_open(shard: ShardId) -> io::Error {
    io::Error::other(format!("shard {shard} is not open in the WAL"))
}

fn encode<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    postcard::to_allocvec(value).map_err(|e| io::Error::other(format!("encoding a WAL record: {e}")))
}

impl NodeWal {
    /// Opens (creating if needed) the node's WAL in `dir` and replays it.
    /// raft-log locks the directory, so a second opener fails.
    pub fn open(dir: &Path, options: NodeWalOptions) -> io::Result<Self> {
        // raft-log syncs the directory's own entries (chunk files); the
        // directories above it must be durable before anything is appended.
        crate::storage::durable_file::create_dir_all_durably(dir)?;
        let dir_str = dir
            .to_str()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{dir:?} is not valid UTF-8")))?;
        let config = raft_log::Config {
            wal: raft_log::chunked_wal::Config {
                dir: dir_str.to_owned(),
                chunk_max_size: Some(options.chunk_max_bytes),
                flush_batch_wait: Some(options.flush_wait),
                ..Default::default()
            },
            log_cache_max_items: Some(CACHE_MAX_ITEMS),
            log_cache_capacity: Some(CACHE_MAX_BYTES),
        };
        let wal = Wal::open(Arc::new(config))?;
        let state = wal.log_state();
        let meta: NodeMeta = match &state.user_data {
            Some(bytes) => postcard::from_bytes(bytes).map_err(|e| invalid(format!("node WAL meta: {e}")))?,
            None => NodeMeta::default(),
        };
        let first_seq = state.purged().map_or(0, |p| p + 1);
        let next_seq = state.last().map_or(first_seq, |l| l + 1).max(first_seq);
        // Replayed into maps, not straight into indexes: after a rewrite
        // and a purge of the log's head, a shard's surviving originals are
        // a suffix of its entries and its rewritten copies follow them, so
        // the entries show up out of order. A truncation still removes
        // everything the records before it placed (the log is purged by
        // prefix, so a truncation record outlives every entry it removed).
        let mut replayed: HashMap<ShardId, BTreeMap<u64, Slot>> = HashMap::new();
        for item in wal.read(first_seq, next_seq) {
            let (seq, bytes) = item?;
            let record: Record = postcard::from_bytes(&bytes).map_err(|e| invalid(format!("WAL record {seq}: {e}")))?;
            match record {
                Record::Entry { shard, incarnation, log_id, .. } => {
                    if meta.shards.get(&shard).is_some_and(|m| m.incarnation == incarnation) {
                        replayed.entry(shard).or_default().insert(log_id.1, Slot { seq, leader: log_id.0 });
                    }
                }
                Record::Truncate { shard, incarnation, from } => {
                    if meta.shards.get(&shard).is_some_and(|m| m.incarnation == incarnation)
                        && let Some(entries) = replayed.get_mut(&shard)
                    {
                        entries.split_off(&from);
                    }
                }
            }
        }
        let mut shards = HashMap::new();
        for (shard, m) in &meta.shards {
            let first = m.purged.map_or(0, |p| p.1 + 1);
            let mut index = ShardIndex { first, slots: VecDeque::new() };
            let mut entries = replayed.remove(shard).unwrap_or_default();
            let live = entries.split_off(&first);
            if m.purged.is_some()
                && let Some(i) = live.keys().next().filter(|i| **i != first)
            {
                return Err(invalid(format!("shard {shard}: the WAL holds entry {i} but not entry {first}")));
            }
            for (i, slot) in live {
                index.place(i, slot).map_err(|expected| {
                    invalid(format!("shard {shard}: the WAL holds entry {i} but not entry {expected}"))
                })?;
            }
            shards.insert(*shard, index);
        }
        let rewrite_slack_records = options.rewrite_slack_records;
        Ok(Self { inner: Arc::new(Mutex::new(Inner { wal, meta, shards, next_seq, rewrite_slack_records })) })
    }

    fn lock(&self) -> io::Result<std::sync::MutexGuard<'_, Inner>> {
        self.inner.lock().map_err(|_| io::Error::other("node WAL lock poisoned"))
    }

    /// Makes `shard` known to the log (a new incarnation if it was not).
    pub fn open_shard(&self, shard: ShardId) -> io::Result<()> {
        let mut inner = self.lock()?;
        if inner.meta.shards.contains_key(&shard) {
            return Ok(());
        }
        let incarnation = inner.meta.next_incarnation;
        inner.meta.next_incarnation += 1;
        inner.meta.shards.insert(shard, ShardMeta { incarnation, vote: None, purged: None });
        inner.shards.insert(shard, ShardIndex::default());
        // No sync: the meta precedes every record of the shard in the
        // stream, so whatever of the shard becomes durable brings it along.
        inner.save_meta()
    }

    /// Forgets `shard` and everything it wrote; call [`Self::flush`] to make
    /// that durable.
    pub fn remove_shard(&self, shard: ShardId) -> io::Result<()> {
        let mut inner = self.lock()?;
        if inner.meta.shards.remove(&shard).is_none() {
            return Ok(());
        }
        inner.shards.remove(&shard);
        inner.save_meta()?;
        inner.compact()
    }

    /// Forgets every shard not in `keep`: a replica whose directory was
    /// deleted but whose removal from the log did not reach the disk.
    pub fn retain_shards(&self, keep: &[ShardId]) -> io::Result<Vec<ShardId>> {
        let stale: Vec<ShardId> = self.lock()?.meta.shards.keys().copied().filter(|s| !keep.contains(s)).collect();
        for shard in &stale {
            self.remove_shard(*shard)?;
        }
        Ok(stale)
    }

    /// The shard's (purged, last) log ids.
    pub fn log_state(&self, shard: ShardId) -> io::Result<(Option<WalLogId>, Option<WalLogId>)> {
        let inner = self.lock()?;
        let purged = inner.shard_meta(shard)?.purged;
        let last = inner.shards.get(&shard).and_then(ShardIndex::last).or(purged);
        Ok((purged, last))
    }

    pub fn vote(&self, shard: ShardId) -> io::Result<Option<WalVote>> {
        Ok(self.lock()?.shard_meta(shard)?.vote)
    }

    /// Records the shard's vote; call [`Self::flush`] to make it durable.
    pub fn save_vote(&self, shard: ShardId, vote: WalVote) -> io::Result<()> {
        let mut inner = self.lock()?;
        inner.shard_meta_mut(shard)?.vote = Some(vote);
        inner.save_meta()
    }

    /// Appends the shard's next entries and asks for a flush that calls
    /// `flushed` back (after the fdatasync when `sync`).
    pub fn append(
        &self,
        shard: ShardId,
        entries: Vec<(WalLogId, Vec<u8>)>,
        sync: bool,
        flushed: Option<Flushed>,
    ) -> io::Result<()> {
        let mut inner = self.lock()?;
        let incarnation = inner.shard_meta(shard)?.incarnation;
        let mut ids = Vec::with_capacity(entries.len());
        let mut records = Vec::with_capacity(entries.len());
        for (log_id, payload) in &entries {
            ids.push(*log_id);
            records.push(encode(&Record::Entry { shard, incarnation, log_id: *log_id, payload })?);
        }
        // Checked before anything is written, so a refused append leaves
        // the log as it was.
        let (purged, last) = {
            let index = inner.shards.get(&shard);
            (inner.shard_meta(shard)?.purged, index.and_then(ShardIndex::last))
        };
        if let Some(first) = ids.first() {
            let expected = last.or(purged).map(|l| l.1 + 1);
            if expected.is_some_and(|e| e != first.1) {
                return Err(invalid(format!(
                    "shard {shard}: entry {} is not consecutive with the log (its next is {})",
                    first.1,
                    expected.unwrap_or_default()
                )));
            }
        }
        let start = inner.next_seq;
        let n = records.len() as u64;
        inner.wal.append(records.into_iter().enumerate().map(|(i, bytes)| (start + i as u64, bytes)))?;
        inner.next_seq += n;
        let index = inner.shards.entry(shard).or_default();
        for (i, log_id) in ids.iter().enumerate() {
            index.place(log_id.1, Slot { seq: start + i as u64, leader: log_id.0 }).map_err(|expected| {
                invalid(format!("shard {shard}: entry {} does not follow its log (next is {expected})", log_id.1))
            })?;
        }
        inner.wal.flush(sync, flushed)
    }

    /// Drops the shard's entries from `from` on; call [`Self::flush`] to
    /// make that durable.
    pub fn truncate(&self, shard: ShardId, from: u64) -> io::Result<()> {
        let mut inner = self.lock()?;
        let incarnation = inner.shard_meta(shard)?.incarnation;
        let bytes = encode(&Record::Truncate { shard, incarnation, from })?;
        let seq = inner.next_seq;
        inner.wal.append([(seq, bytes)])?;
        inner.next_seq += 1;
        if let Some(index) = inner.shards.get_mut(&shard) {
            index.truncate(from);
        }
        Ok(())
    }

    /// Drops the shard's entries up to `upto` and releases what no shard
    /// needs any more. Need not be durable at once: a lost purge only keeps
    /// entries longer.
    pub fn purge(&self, shard: ShardId, upto: WalLogId) -> io::Result<()> {
        let mut inner = self.lock()?;
        let meta = inner.shard_meta_mut(shard)?;
        if meta.purged.is_some_and(|p| p.1 >= upto.1) {
            return Ok(());
        }
        meta.purged = Some(upto);
        if let Some(index) = inner.shards.get_mut(&shard) {
            index.purge(upto.1);
        }
        inner.save_meta()?;
        inner.compact()?;
        // A synced flush is what removes the freed chunk files.
        inner.wal.flush(true, None)
    }

    /// The shard's entries in `[from, to)`, up to `max_bytes` of payload
    /// (at least one entry, whatever its size).
    pub fn read(&self, shard: ShardId, from: u64, to: u64, max_bytes: usize) -> io::Result<Vec<(WalLogId, Vec<u8>)>> {
        let inner = self.lock()?;
        let Some(index) = inner.shards.get(&shard) else { return Ok(Vec::new()) };
        let end = index.first + index.slots.len() as u64;
        let (from, to) = (from.max(index.first), to.min(end));
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for i in from..to {
            let slot = index.slots[(i - index.first) as usize];
            let record = inner.read_record(slot.seq)?;
            let decoded: Record =
                postcard::from_bytes(&record).map_err(|e| invalid(format!("WAL record {}: {e}", slot.seq)))?;
            let Record::Entry { log_id, payload, .. } = decoded else {
                return Err(invalid(format!("WAL record {} is not shard {shard}'s entry {i}", slot.seq)));
            };
            bytes += payload.len();
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            out.push((log_id, payload.to_vec()));
        }
        Ok(out)
    }

    /// Asks for a flush of everything written so far; `flushed` is called
    /// back once it is done (after the fdatasync when `sync`).
    pub fn flush(&self, sync: bool, flushed: Option<Flushed>) -> io::Result<()> {
        self.lock()?.wal.flush(sync, flushed)
    }

    /// Writes what is buffered and blocks this thread until the flush worker
    /// has (`sync`: fdatasynced it too). Only a simulation does this: its
    /// crashes drop a node's process state but not the machine's page cache,
    /// so a write need not be synced to survive one, but it must be done
    /// before the simulation moves on, whatever the real disk's speed.
    pub fn write_through(&self, sync: bool) -> io::Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.flush(sync, Some(Flushed::Block(tx)))?;
        rx.recv().map_err(|_| io::Error::other("WAL flush worker stopped"))?
    }

    /// Syncs everything written so far and waits for it.
    pub async fn sync(&self) -> io::Result<()> {
        if crate::determinism::simulated() {
            return self.write_through(true);
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.flush(true, Some(Flushed::Wait(tx)))?;
        rx.await.map_err(|_| io::Error::other("WAL flush worker stopped"))?
    }

    /// How many fdatasyncs the flush worker has made.
    pub fn fdatasyncs(&self) -> u64 {
        self.lock().map_or(0, |inner| inner.wal.stat().flush_metrics.sync_batch_count)
    }

    /// (first sequence number held, next sequence number): how many records
    /// the log holds, for tests and stats.
    pub fn span(&self) -> io::Result<(u64, u64)> {
        let inner = self.lock()?;
        Ok((inner.wal.log_state().purged().map_or(0, |p| p + 1), inner.next_seq))
    }
}

impl Inner {
    fn shard_meta(&self, shard: ShardId) -> io::Result<&ShardMeta> {
        self.meta.shards.get(&shard).ok_or_else(|| not_open(shard))
    }

    fn shard_meta_mut(&mut self, shard: ShardId) -> io::Result<&mut ShardMeta> {
        self.meta.shards.get_mut(&shard).ok_or_else(|| not_open(shard))
    }

    fn save_meta(&mut self) -> io::Result<()> {
        let bytes = encode(&self.meta)?;
        self.wal.save_user_data(Some(bytes))?;
        Ok(())
    }

    fn read_record(&self, seq: u64) -> io::Result<Vec<u8>> {
        match self.wal.read(seq, seq + 1).next() {
            Some(item) => Ok(item?.1),
            None => Err(invalid(format!("WAL record {seq} is missing"))),
        }
    }

    /// The oldest record a shard still needs, and which shard needs it.
    fn head(&self) -> Option<(u64, ShardId)> {
        self.shards.iter().filter_map(|(shard, index)| index.slots.front().map(|s| (s.seq, *shard))).min()
    }

    /// Purges the node log below the oldest record any shard needs. If the
    /// log holds far more records than the shards' live entries, the shards
    /// pinning its head are rewritten first.
    fn compact(&mut self) -> io::Result<()> {
        let live: u64 = self.shards.values().map(|i| i.slots.len() as u64).sum();
        for _ in 0..self.shards.len() {
            let Some((head, shard)) = self.head() else { break };
            if self.next_seq - head <= 2 * live + self.rewrite_slack_records {
                break;
            }
            self.rewrite(shard)?;
        }
        let head = self.head().map_or(self.next_seq, |(seq, _)| seq);
        let purged_to = self.wal.log_state().purged().copied();
        if head > 0 && purged_to.is_none_or(|p| head - 1 > p) {
            self.wal.purge(head - 1)?;
        }
        Ok(())
    }

    /// Appends every live entry of `shard` again, so older records of it
    /// can be purged. The copies are byte-identical; replay lets the later
    /// one win.
    fn rewrite(&mut self, shard: ShardId) -> io::Result<()> {
        let Some(index) = self.shards.get(&shard) else { return Ok(()) };
        let seqs: Vec<u64> = index.slots.iter().map(|s| s.seq).collect();
        let mut moved = Vec::with_capacity(seqs.len());
        for chunk in seqs.chunks(REWRITE_BATCH) {
            let records = chunk.iter().map(|seq| self.read_record(*seq)).collect::<io::Result<Vec<_>>>()?;
            let start = self.next_seq;
            let n = records.len() as u64;
            self.wal.append(records.into_iter().enumerate().map(|(i, bytes)| (start + i as u64, bytes)))?;
            self.next_seq += n;
            moved.extend(start..start + n);
        }
        let index = self.shards.get_mut(&shard).expect("checked above");
        for (slot, seq) in index.slots.iter_mut().zip(moved) {
            slot.seq = seq;
        }
        tracing::debug!(shard, entries = seqs.len(), "rewrote a shard's entries to release the WAL's head");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn options(chunk_max_bytes: usize, rewrite_slack_records: u64) -> NodeWalOptions {
        NodeWalOptions { flush_wait: Duration::from_micros(100), chunk_max_bytes, rewrite_slack_records }
    }

    /// What a shard's log must read back as.
    #[derive(Debug, Clone, Default, PartialEq)]
    struct Model {
        vote: Option<WalVote>,
        purged: Option<WalLogId>,
        entries: BTreeMap<u64, (WalLogId, Vec<u8>)>,
    }

    impl Model {
        fn last(&self) -> Option<WalLogId> {
            self.entries.values().next_back().map(|(id, _)| *id).or(self.purged)
        }
        fn next(&self) -> u64 {
            self.last().map_or(0, |l| l.1 + 1)
        }
    }

    fn check(wal: &NodeWal, models: &BTreeMap<ShardId, Model>) {
        for (shard, model) in models {
            let (purged, last) = wal.log_state(*shard).unwrap();
            assert_eq!(purged, model.purged, "shard {shard} purge point");
            assert_eq!(last, model.last(), "shard {shard} last entry");
            assert_eq!(wal.vote(*shard).unwrap(), model.vote, "shard {shard} vote");
            let read = wal.read(*shard, 0, u64::MAX, usize::MAX).unwrap();
            let want: Vec<_> = model.entries.values().cloned().collect();
            assert_eq!(read, want, "shard {shard} entries");
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append { shard: ShardId, count: u8, term: u64 },
        Truncate { shard: ShardId, back: u8 },
        Purge { shard: ShardId, keep: u8 },
        Vote { shard: ShardId, term: u64 },
        Remove { shard: ShardId },
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        let shard = 0..4u32;
        prop_oneof![
            6 => (shard.clone(), 1..20u8, 1..4u64).prop_map(|(shard, count, term)| Op::Append { shard, count, term }),
            1 => (shard.clone(), 0..6u8).prop_map(|(shard, back)| Op::Truncate { shard, back }),
            2 => (shard.clone(), 0..6u8).prop_map(|(shard, keep)| Op::Purge { shard, keep }),
            1 => (shard.clone(), 1..9u64).prop_map(|(shard, term)| Op::Vote { shard, term }),
            1 => shard.prop_map(|shard| Op::Remove { shard }),
            1 => Just(Op::Reopen),
        ]
    }

    /// Interleaved groups read back exactly what each wrote, through
    /// truncations, purges, removals, rewrites, chunk rotations and reopens.
    #[test]
    fn every_shard_reads_back_its_own_log_whatever_the_others_do() {
        let config = ProptestConfig { cases: 64, ..ProptestConfig::default() };
        proptest!(config, |(ops in proptest::collection::vec(op(), 1..120))| {
            let dir = tempfile::tempdir().unwrap();
            // Small chunks and a small slack: rotation, head purges and
            // rewrites all happen within a case.
            let open = || NodeWal::open(dir.path(), options(2048, 16)).unwrap();
            let mut wal = open();
            let mut models: BTreeMap<ShardId, Model> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Append { shard, count, term } => {
                        wal.open_shard(shard).unwrap();
                        let model = models.entry(shard).or_default();
                        let term = term.max(model.last().map_or(0, |l| l.0.0));
                        let records: Vec<_> = (0..count as u64)
                            .map(|i| {
                                let index = model.next() + i;
                                (((term, 1), index), format!("{shard}/{index}/{term}").into_bytes())
                            })
                            .collect();
                        for (id, payload) in &records {
                            model.entries.insert(id.1, (*id, payload.clone()));
                        }
                        wal.append(shard, records, false, None).unwrap();
                    }
                    Op::Truncate { shard, back } => {
                        let Some(model) = models.get_mut(&shard) else { continue };
                        let first = model.purged.map_or(0, |p| p.1 + 1);
                        let from = model.next().saturating_sub(back as u64).max(first);
                        model.entries.retain(|i, _| *i < from);
                        wal.truncate(shard, from).unwrap();
                    }
                    Op::Purge { shard, keep } => {
                        let Some(model) = models.get_mut(&shard) else { continue };
                        let Some(last) = model.last() else { continue };
                        let upto = last.1.saturating_sub(keep as u64);
                        let Some(id) = model.entries.get(&upto).map(|(id, _)| *id) else { continue };
                        model.entries.retain(|i, _| *i > upto);
                        model.purged = Some(id);
                        wal.purge(shard, id).unwrap();
                    }
                    Op::Vote { shard, term } => {
                        wal.open_shard(shard).unwrap();
                        let model = models.entry(shard).or_default();
                        model.vote = Some(((term, 2), term % 2 == 0));
                        wal.save_vote(shard, ((term, 2), term % 2 == 0)).unwrap();
                    }
                    Op::Remove { shard } => {
                        models.remove(&shard);
                        wal.remove_shard(shard).unwrap();
                    }
                    Op::Reopen => {
                        wal.write_through(true).unwrap();
                        drop(wal);
                        wal = open();
                    }
                }
                check(&wal, &models);
            }
            wal.write_through(true).unwrap();
            drop(wal);
            let wal = open();
            check(&wal, &models);
        });
    }

    fn chunk_files(dir: &Path) -> usize {
        std::fs::read_dir(dir).unwrap().count()
    }

    /// A shard that stops writing does not keep the node's log from being
    /// purged: once the log holds far more than the shards need, the idle
    /// shard's entries are written again and the old chunks go.
    #[test]
    fn an_idle_shard_does_not_pin_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let open = || NodeWal::open(dir.path(), options(4096, 64)).unwrap();
        let wal = open();
        wal.open_shard(7).unwrap();
        wal.save_vote(7, ((2, 1), true)).unwrap();
        let idle: Vec<_> = (0..3).map(|i| (((2, 1), i), vec![7; 100])).collect();
        wal.append(7, idle.clone(), false, None).unwrap();
        wal.open_shard(1).unwrap();
        for i in 0..2000u64 {
            wal.append(1, vec![(((1, 1), i), vec![1; 100])], false, None).unwrap();
            if i % 50 == 49 {
                wal.purge(1, ((1, 1), i - 10)).unwrap();
            }
        }
        wal.write_through(true).unwrap();
        let (first, next) = wal.span().unwrap();
        // Live: 3 idle entries and at most 60 of shard 1, slack 64.
        assert!(next - first <= 2 * 63 + 64 + 50, "the log still holds {} records", next - first);
        // 2000 records of ~130 bytes in 4 KiB chunks were ~65 chunks.
        assert!(chunk_files(dir.path()) < 20, "{} chunk files left", chunk_files(dir.path()));
        drop(wal);
        let wal = open();
        assert_eq!(wal.read(7, 0, 10, usize::MAX).unwrap(), idle);
        assert_eq!(wal.vote(7).unwrap(), Some(((2, 1), true)));
        assert_eq!(wal.log_state(1).unwrap().1, Some(((1, 1), 1999)));
    }

    /// A shard removed and opened again (a replica moved away and back) is
    /// empty, even though its old records are still in the log.
    #[test]
    fn a_shard_opened_again_after_removal_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let open = || NodeWal::open(dir.path(), options(1 << 20, 1 << 20)).unwrap();
        let wal = open();
        wal.open_shard(3).unwrap();
        wal.open_shard(4).unwrap();
        wal.append(3, vec![(((1, 1), 0), b"old".to_vec()), (((1, 1), 1), b"old".to_vec())], false, None).unwrap();
        wal.append(4, vec![(((1, 1), 0), b"keep".to_vec())], false, None).unwrap();
        wal.save_vote(3, ((1, 1), true)).unwrap();
        wal.remove_shard(3).unwrap();
        wal.open_shard(3).unwrap();
        assert_eq!(wal.log_state(3).unwrap(), (None, None));
        wal.append(3, vec![(((5, 2), 9), b"new".to_vec())], false, None).unwrap();
        wal.write_through(true).unwrap();
        drop(wal);
        let wal = open();
        assert_eq!(wal.vote(3).unwrap(), None);
        assert_eq!(wal.read(3, 0, 100, usize::MAX).unwrap(), vec![(((5, 2), 9), b"new".to_vec())]);
        assert_eq!(wal.read(4, 0, 100, usize::MAX).unwrap(), vec![(((1, 1), 0), b"keep".to_vec())]);
        // Shards this node no longer has (a removal a crash interrupted).
        assert_eq!(wal.retain_shards(&[3]).unwrap(), vec![4]);
        assert!(wal.log_state(4).is_err());
    }

    /// One flush covers the appends of every shard waiting on it: many
    /// groups appending at once share fdatasyncs.
    #[test]
    fn appends_of_many_shards_share_a_sync() {
        let dir = tempfile::tempdir().unwrap();
        // A long group-commit wait, so the count below does not hang on
        // how fast this machine appends.
        let options = NodeWalOptions { flush_wait: Duration::from_millis(200), ..options(1 << 20, 1 << 20) };
        let wal = NodeWal::open(dir.path(), options).unwrap();
        let before = wal.fdatasyncs();
        let mut waits = Vec::new();
        for shard in 0..64 {
            wal.open_shard(shard).unwrap();
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            wal.append(shard, vec![(((1, 1), 0), vec![0; 64])], true, Some(Flushed::Block(tx))).unwrap();
            waits.push(rx);
        }
        for rx in waits {
            rx.recv().unwrap().unwrap();
        }
        // One per shard was what a WAL per replica made.
        let syncs = wal.fdatasyncs() - before;
        assert!((1..=4).contains(&syncs), "64 shards' appends took {syncs} fdatasyncs");
    }
}
