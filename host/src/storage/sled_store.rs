//! `SledStore`: the on-disk `StateStore`, one sled tree. Physical key =
//! keyspace byte ++ key; the applied log index lives under a meta key whose
//! first byte (0) is below every keyspace byte, so scans never see it.
//!
//! sled 0.34's `flush()` only issues `sync_file_range`, which does not make
//! data or metadata durable; `persist` therefore follows it with an fsync of
//! every sled file and directory. Durability between persists comes from the
//! commit log, which replays whatever sled lost.
//!
//! Applied entries are buffered: an apply lays its writes, the host meta keys
//! and its applied index into an in-memory layer (the apply buffer) that every
//! read sees first, and the buffer goes to sled as one `apply_batch` when it
//! reaches a bound (keys, bytes, or age, checked at apply) or when sled itself
//! must be current: a point-in-time view opens (snapshot build), `persist`,
//! `replace_from` (snapshot install), drop. Why: every sled batch seals sled's
//! IO buffer twice and hands two writes to its IO threads (`pin_log`), which
//! per applied Raft entry cost more CPU than the entry's work.
//!
//! Why losing the buffer in a crash is safe: sled was never synced per apply
//! either, so a crash already lost unsynced applies, and the commit log
//! re-applies whatever the store lacks. The invariant that makes the replay
//! exact holds: the applied index in sled is only ever written in the same
//! batch as the data and meta keys of the entries up to it, so sled holds a
//! consistent (possibly older) state: the data, the host meta keys (Raft's
//! last applied log id and membership) and the applied index of one moment.

use super::overlay::{Pending, merged_scan, merged_scan_page, pending_in};
use super::point_in_time::{PointInTime, Views, drop_stale_side_trees};
use super::{StateStore, StorageError, op_write, physical_key, scan_lower_bound, unapplied};
use crate::model::{Keyspace, LogIndex, WriteSet};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions, TryLockError};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Meta key of the applied index. Byte 0 is no keyspace (they start at 1).
const APPLIED_INDEX_KEY: &[u8] = b"\0applied_index";
const TREE_NAME: &str = "conflux-state";
const LOCK_FILE: &str = "conflux-store.lock";
const SLED_SUBDIR: &str = "sled";

/// Bounds of a store's apply buffer (see the module docs); reaching any one
/// at an apply writes the buffer to sled. All 0: every apply goes to sled at
/// once, as one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyBuffer {
    /// Distinct keys buffered (data and host meta keys).
    pub max_keys: usize,
    /// Keys and values buffered, in bytes.
    pub max_bytes: usize,
    /// Age of the oldest buffered apply, checked at the next apply: how far
    /// sled may lag behind a busy store (an idle one is written at the next
    /// snapshot, `persist` or drop).
    pub max_age_ms: u64,
}

impl Default for ApplyBuffer {
    /// Measured with `conflux serve` under 64 callers of the counter over
    /// 10,000 keys (≈ 10,000 adds/s): one sled batch per ≤ 100 ms of
    /// applies instead of one per Raft entry (≈ 1,300 a second), sled's IO
    /// threads go idle and the server spends ≈ 22 % less CPU per add. The key and
    /// byte bounds only cap memory under heavier writes; the age bounds how
    /// far sled lags, i.e. what a restart re-applies from the log.
    fn default() -> Self {
        Self { max_keys: 4096, max_bytes: 4 << 20, max_age_ms: 100 }
    }
}

impl ApplyBuffer {
    /// Every apply goes to sled at once.
    pub const WRITE_THROUGH: ApplyBuffer = ApplyBuffer { max_keys: 0, max_bytes: 0, max_age_ms: 0 };
}

/// Applied entries not in sled yet, and the applied index.
#[derive(Debug, Default)]
struct Buffer {
    /// Physical keys (keyspace data and host meta keys) → value written
    /// (`None`: deleted), later applies win.
    pending: Pending,
    /// Keys and values in `pending`, in bytes.
    bytes: usize,
    /// The applied index, buffered applies included.
    applied: LogIndex,
    /// The applied index in sled.
    written: LogIndex,
    /// When (Unix ms, the node's clock) the oldest buffered apply was made.
    since_ms: Option<u64>,
    /// Closed by [`SledStore::close_discarding`]: nothing reaches sled any more.
    closed: bool,
}

impl Buffer {
    fn put(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) {
        let key_len = key.len();
        self.bytes += key_len + value.as_ref().map_or(0, Vec::len);
        if let Some(old) = self.pending.insert(key, value) {
            self.bytes -= key_len + old.map_or(0, |v| v.len());
        }
    }

    /// Whether sled lacks anything applied.
    fn dirty(&self) -> bool {
        self.applied != self.written || !self.pending.is_empty()
    }

    fn due(&self, limits: &ApplyBuffer, now_ms: u64) -> bool {
        self.pending.len() >= limits.max_keys
            || self.bytes >= limits.max_bytes
            || self.since_ms.is_some_and(|t| now_ms.saturating_sub(t) >= limits.max_age_ms)
    }
}

/// Durable state store on sled.
pub struct SledStore {
    // Field order matters: sled is dropped (and closes its files) before the
    // directory lock below is released.
    tree: sled::Tree,
    db: sled::Db,
    sled_dir: PathBuf,
    /// The apply buffer. Its write lock is the apply lock: it serialises
    /// applies and writes to sled, so "read applied index, buffer, maybe
    /// write" is one step. Reads hold its read lock for the whole read, so
    /// no write to sled moves entries between the buffer and sled under them.
    buffer: RwLock<Buffer>,
    limits: ApplyBuffer,
    /// Open point-in-time views; a write to sled saves old values for each first.
    views: Views,
    /// Held for the store's lifetime: a second opener fails fast with
    /// `StorageError::Locked` instead of sled's opaque I/O error (sled also
    /// flocks its own db file, but reports it as a generic error). `None` for
    /// a tree in a database someone else opened and locked.
    _lock: Option<File>,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore").field("dir", &self.sled_dir).finish_non_exhaustive()
    }
}

fn io_err(context: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StorageError {
    let path = path.to_path_buf();
    move |source| StorageError::Io { context, path, source }
}

impl SledStore {
    /// Opens (creating if needed) the store in `dir`, with the default apply
    /// buffer. Fails with `StorageError::Locked` if another `SledStore` (in
    /// this or any process) has it open.
    pub fn open(dir: &Path) -> Result<SledStore, StorageError> {
        super::durable_file::create_dir_all_durably(dir).map_err(io_err("creating store directory", dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("opening lock file", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(StorageError::Locked { path: dir.to_path_buf() }),
            Err(TryLockError::Error(e)) => return Err(io_err("locking", &lock_path)(e)),
        }

        let sled_dir = dir.join(SLED_SUBDIR);
        let db = sled::Config::new().path(&sled_dir).open()?;
        let mut store = Self::in_db(&db, TREE_NAME, &sled_dir)?;
        store._lock = Some(lock);
        Ok(store)
    }

    /// A store on tree `tree_name` of an already open database in `sled_dir`
    /// (many shard replicas share one database: one sled flusher per node,
    /// not per shard), with the default apply buffer. The caller owns the
    /// directory's lock.
    pub fn in_db(db: &sled::Db, tree_name: &str, sled_dir: &Path) -> Result<SledStore, StorageError> {
        let tree = db.open_tree(tree_name)?;
        let applied = decode_index(tree.get(APPLIED_INDEX_KEY)?.as_deref())?;
        drop_stale_side_trees(db, tree_name)?;
        Ok(SledStore {
            tree,
            db: db.clone(),
            sled_dir: sled_dir.to_path_buf(),
            buffer: RwLock::new(Buffer { applied, written: applied, ..Buffer::default() }),
            limits: ApplyBuffer::default(),
            views: Views::default(),
            _lock: None,
        })
    }

    /// The store with `limits` on its apply buffer.
    pub fn with_apply_buffer(mut self, limits: ApplyBuffer) -> Self {
        self.limits = limits;
        self
    }

    fn read(&self) -> Result<RwLockReadGuard<'_, Buffer>, StorageError> {
        self.buffer.read().map_err(|_| StorageError::Poisoned)
    }

    fn write(&self) -> Result<RwLockWriteGuard<'_, Buffer>, StorageError> {
        self.buffer.write().map_err(|_| StorageError::Poisoned)
    }

    /// Like `apply`, and with the same atomicity sets the host meta keys
    /// `meta` (each must start with byte 0, below every keyspace). Raft keeps
    /// its last applied log id and membership here, so they can never
    /// disagree with the data.
    pub fn apply_with_meta(
        &self,
        entries: &[(LogIndex, &WriteSet)],
        meta: &[(&[u8], Vec<u8>)],
    ) -> Result<(), StorageError> {
        for (key, _) in meta {
            check_meta_key(key)?;
        }
        let mut buffer = self.write()?;
        let unapplied: Vec<_> = unapplied(entries, buffer.applied)?.collect();
        let Some((last, _)) = unapplied.last() else { return Ok(()) };
        let last = *last;
        // Later ops win, within and across entries, as the buffer keeps the
        // last write per key.
        for (_, ws) in unapplied {
            for op in &ws.ops {
                if let Some((k, v)) = op_write(op) {
                    buffer.put(k, v.map(<[u8]>::to_vec));
                }
            }
        }
        for (key, value) in meta {
            buffer.put(key.to_vec(), Some(value.clone()));
        }
        buffer.applied = last;
        let now_ms = crate::determinism::unix_ms();
        buffer.since_ms.get_or_insert(now_ms);
        if buffer.due(&self.limits, now_ms) {
            self.write_buffer(&mut buffer)?;
        }
        Ok(())
    }

    /// Writes the buffer to sled as one atomic batch with the applied index.
    /// Recording the index in the same batch is what makes replay exact:
    /// sled either has the entries and the index, or neither. Open views
    /// first save the values the batch overwrites. The caller holds the
    /// apply lock (`buffer`'s write lock).
    fn write_buffer(&self, buffer: &mut Buffer) -> Result<(), StorageError> {
        if buffer.closed || !buffer.dirty() {
            return Ok(());
        }
        {
            let views = self.views.lock().map_err(|_| StorageError::Poisoned)?;
            if !views.is_empty() {
                // Keyspace data only: a view's scan never reads meta keys.
                let written: Vec<Vec<u8>> = buffer.pending.keys().filter(|k| k.first() != Some(&0)).cloned().collect();
                for view in views.iter() {
                    view.record(&self.tree, &written)?;
                }
            }
        }
        let mut batch = sled::Batch::default();
        for (k, v) in &buffer.pending {
            match v {
                Some(v) => batch.insert(k.as_slice(), v.as_slice()),
                None => batch.remove(k.as_slice()),
            }
        }
        batch.insert(APPLIED_INDEX_KEY, &buffer.applied.to_be_bytes()[..]);
        self.tree.apply_batch(batch)?;
        buffer.pending.clear();
        buffer.bytes = 0;
        buffer.since_ms = None;
        buffer.written = buffer.applied;
        Ok(())
    }

    /// Writes whatever is buffered to sled now (it is not made durable:
    /// that is `persist`).
    pub fn write_out(&self) -> Result<(), StorageError> {
        let mut buffer = self.write()?;
        self.write_buffer(&mut buffer)
    }

    /// Drops what is buffered and writes nothing to sled any more, whatever
    /// is applied, persisted or dropped afterwards: for a store whose tree
    /// is about to be deleted (a replica moved away; a late write, say by
    /// the drop of a store a snapshot build still holds, must not reach a
    /// dropped tree), and, in tests, to simulate a crash of the process.
    pub fn close_discarding(&self) {
        let mut buffer = self.buffer.write().unwrap_or_else(|p| p.into_inner());
        buffer.closed = true;
    }

    /// A host meta key's value (see `apply_with_meta`).
    pub fn get_meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        check_meta_key(key)?;
        self.get_physical(key)
    }

    /// The value of a physical key (keyspace data or host meta): the
    /// buffer's if it holds the key, else sled's.
    fn get_physical(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        let buffer = self.read()?;
        if let Some(v) = buffer.pending.get(key) {
            return Ok(v.clone());
        }
        Ok(self.tree.get(key)?.map(|v| v.to_vec()))
    }

    /// A view of the keyspace data as it is now, with the values of
    /// `meta_keys`, that stays exact while later applies change the store
    /// (see [`PointInTime`]). Opening it writes the buffer to sled (the view
    /// reads sled) and takes the apply lock only for that.
    pub fn point_in_time(&self, meta_keys: &[&[u8]]) -> Result<PointInTime, StorageError> {
        let mut buffer = self.write()?;
        self.write_buffer(&mut buffer)?;
        let mut meta = Vec::with_capacity(meta_keys.len());
        for key in meta_keys {
            check_meta_key(key)?;
            meta.push(self.tree.get(key)?.map(|v| v.to_vec()));
        }
        PointInTime::open(&self.db, &self.tree, &self.views, buffer.applied, meta)
    }

    /// Replaces all keyspace data with `pairs` (physical keys, as a
    /// [`PointInTime`] scan yields them), then sets the applied index and
    /// `meta`. Streams: memory holds one bounded batch at a time, so it is
    /// not atomic. Until its last batch the store keeps its old applied
    /// index, so after a crash in between, the caller, which must hold the
    /// pairs durably first, finds its source ahead of the store and replaces
    /// again. Open point-in-time views are superseded. The apply buffer is
    /// written to sled first, so sled's data and applied index agree at
    /// every step (and host meta keys not in `meta` keep their latest value).
    pub fn replace_from(
        &self,
        pairs: impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), StorageError>>,
        applied_index: LogIndex,
        meta: &[(&[u8], Vec<u8>)],
    ) -> Result<(), StorageError> {
        for (key, _) in meta {
            check_meta_key(key)?;
        }
        let mut buffer = self.write()?;
        for view in self.views.lock().map_err(|_| StorageError::Poisoned)?.iter() {
            view.supersede()?;
        }
        self.write_buffer(&mut buffer)?;
        loop {
            let mut batch = sled::Batch::default();
            let mut n = 0;
            for item in self.tree.range::<&[u8], _>(&[1u8][..]..).take(REPLACE_BATCH_KEYS) {
                batch.remove(item?.0);
                n += 1;
            }
            if n == 0 {
                break;
            }
            self.tree.apply_batch(batch)?;
        }
        let (mut batch, mut bytes) = (sled::Batch::default(), 0);
        for pair in pairs {
            let (k, v) = pair?;
            if k.first().is_none_or(|b| *b == 0) {
                return Err(StorageError::Corrupt(format!("snapshot key {k:?} is not a keyspace key")));
            }
            bytes += k.len() + v.len();
            batch.insert(k, v);
            if bytes >= REPLACE_BATCH_BYTES {
                self.tree.apply_batch(std::mem::take(&mut batch))?;
                bytes = 0;
            }
        }
        batch.insert(APPLIED_INDEX_KEY, &applied_index.to_be_bytes()[..]);
        for (key, value) in meta {
            batch.insert(*key, value.as_slice());
        }
        self.tree.apply_batch(batch)?;
        buffer.applied = applied_index;
        buffer.written = applied_index;
        Ok(())
    }

    /// Up to `limit` rows of sled itself (without the buffer) in `keyspace`
    /// under `prefix`, after `start_after`.
    fn tree_scan(
        &self,
        keyspace: Keyspace,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<super::KvPairs, StorageError> {
        let full_prefix = physical_key(keyspace, prefix);
        let lower = scan_lower_bound(keyspace, prefix, start_after);
        let mut out = Vec::new();
        for item in self.tree.range::<Vec<u8>, _>((lower, Bound::Unbounded)) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item?;
            if !k.starts_with(&full_prefix) {
                break;
            }
            out.push((k[1..].to_vec(), v.to_vec()));
        }
        Ok(out)
    }
}

impl Drop for SledStore {
    /// Writes the buffer to sled, as a graceful shutdown's `persist` does
    /// (not needed for correctness: the commit log re-applies what sled
    /// lacks; it spares the next start that replay). Not made durable: sled
    /// flushes its own buffers when the database closes.
    fn drop(&mut self) {
        let buffer = self.buffer.get_mut().unwrap_or_else(|p| p.into_inner());
        let mut buffer = std::mem::take(buffer);
        if let Err(e) = self.write_buffer(&mut buffer) {
            tracing::warn!(dir = %self.sled_dir.display(), error = %e, "writing the apply buffer to sled at drop failed");
        }
    }
}

/// Bounds on one batch of `replace_from`: what it holds in memory at once.
const REPLACE_BATCH_KEYS: usize = 16 * 1024;
const REPLACE_BATCH_BYTES: usize = 4 * 1024 * 1024;

fn check_meta_key(key: &[u8]) -> Result<(), StorageError> {
    if key.first() != Some(&0) || key == APPLIED_INDEX_KEY {
        return Err(StorageError::NotMetaKey(key.to_vec()));
    }
    Ok(())
}

fn decode_index(raw: Option<&[u8]>) -> Result<LogIndex, StorageError> {
    match raw {
        None => Ok(0),
        Some(bytes) => {
            let arr: [u8; 8] = bytes
                .try_into()
                .map_err(|_| StorageError::Corrupt(format!("applied index has {} bytes, expected 8", bytes.len())))?;
            Ok(u64::from_be_bytes(arr))
        }
    }
}

/// fsyncs the file at `path` if it still exists; returns whether it did.
/// sled removes files (a blob whose value was overwritten) on its own
/// threads, so a file listed a moment ago may be gone: that is no error, a
/// removed file needs no fsync, and the directory's fsync that follows makes
/// its removal durable. (Failing here killed a shard replica's Raft core in
/// the simulation.)
fn fsync_if_present(path: &Path) -> Result<bool, StorageError> {
    // A read-only descriptor is enough: fsync acts on the inode.
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err("opening for fsync", path)(e)),
    };
    f.sync_all().map_err(io_err("fsync", path))?;
    Ok(true)
}

/// fsyncs every file under `dir` (recursively) and then each directory, so
/// both contents and names survive power loss.
fn fsync_tree(dir: &Path) -> Result<(), StorageError> {
    let entries = std::fs::read_dir(dir).map_err(io_err("listing", dir))?;
    for entry in entries {
        let entry = entry.map_err(io_err("listing", dir))?;
        let path = entry.path();
        let ty = entry.file_type().map_err(io_err("stat", &path))?;
        if ty.is_dir() {
            fsync_tree(&path)?;
        } else if ty.is_file() {
            fsync_if_present(&path)?;
        }
    }
    let d = File::open(dir).map_err(io_err("opening directory for fsync", dir))?;
    d.sync_all().map_err(io_err("fsync directory", dir))
}

impl StateStore for SledStore {
    fn get(&self, keyspace: Keyspace, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.get_physical(&physical_key(keyspace, key))
    }

    fn scan(
        &self,
        keyspace: Keyspace,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<super::KvPairs, StorageError> {
        let buffer = self.read()?;
        let pending = pending_in(&buffer.pending, keyspace, prefix, start_after);
        if pending.is_empty() {
            return self.tree_scan(keyspace, prefix, start_after, limit);
        }
        merged_scan(pending, |after, n| self.tree_scan(keyspace, prefix, after, n), start_after, limit)
    }

    fn scan_page(
        &self,
        keyspace: Keyspace,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<super::ScanPage, StorageError> {
        let buffer = self.read()?;
        let pending = pending_in(&buffer.pending, keyspace, prefix, start_after);
        if !pending.is_empty() {
            return merged_scan_page(
                pending,
                |after, n| self.tree_scan(keyspace, prefix, after, n),
                start_after,
                limit,
                max_bytes,
            );
        }
        let full_prefix = physical_key(keyspace, prefix);
        let lower = scan_lower_bound(keyspace, prefix, start_after);
        let items = self
            .tree
            .range::<Vec<u8>, _>((lower, Bound::Unbounded))
            .take_while(|item| item.as_ref().map_or(true, |(k, _)| k.starts_with(&full_prefix)))
            .map(|item| item.map(|(k, v)| (k[1..].to_vec(), v.to_vec())).map_err(StorageError::from));
        super::fill_page(items, limit, max_bytes)
    }

    fn applied_index(&self) -> Result<LogIndex, StorageError> {
        Ok(self.read()?.applied)
    }

    fn persist(&self) -> Result<(), StorageError> {
        self.write_out()?;
        self.db.flush()?;
        fsync_tree(&self.sled_dir)?;
        if let Some(parent) = self.sled_dir.parent() {
            File::open(parent).and_then(|d| d.sync_all()).map_err(io_err("fsync directory", parent))?;
        }
        Ok(())
    }
}

impl super::ApplyStore for SledStore {
    fn apply(&self, entries: &[(LogIndex, &WriteSet)]) -> Result<(), StorageError> {
        self.apply_with_meta(entries, &[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::ApplyStore;
    use std::collections::BTreeMap;
    use std::sync::Arc;

    #[test]
    fn a_file_removed_after_the_listing_is_skipped_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let present = dir.path().join("blob-1");
        std::fs::write(&present, b"v").unwrap();
        assert!(fsync_if_present(&present).unwrap());
        assert!(!fsync_if_present(&dir.path().join("blob-2")).unwrap(), "a vanished file is skipped");
        // Other failures still fail (a path through a file: not a directory).
        let not_a_dir = present.join("x");
        assert!(fsync_if_present(&not_a_dir).is_err());
    }

    #[test]
    fn corrupt_applied_index_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open(dir.path()).unwrap();
            s.tree.insert(APPLIED_INDEX_KEY, &b"xyz"[..]).unwrap();
            s.persist().unwrap();
        }
        let err = SledStore::open(dir.path()).unwrap_err();
        assert!(matches!(err, StorageError::Corrupt(_)), "{err}");
    }

    fn put(key: &[u8], value: &[u8]) -> WriteSet {
        WriteSet {
            ops: vec![crate::model::Op::Put { keyspace: Keyspace::State, key: key.to_vec(), value: value.to_vec() }],
        }
    }

    fn del(key: &[u8]) -> WriteSet {
        WriteSet { ops: vec![crate::model::Op::Delete { keyspace: Keyspace::State, key: key.to_vec() }] }
    }

    /// Every pair a view's scan yields, sorted (deleted keys come last).
    fn scan_all(view: &PointInTime) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut pairs = Vec::new();
        view.scan(|k, v| {
            pairs.push((k.to_vec(), v.to_vec()));
            Ok(())
        })
        .unwrap();
        pairs.sort();
        pairs
    }

    fn ok_pairs(pairs: Vec<(Vec<u8>, Vec<u8>)>) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), StorageError>> {
        pairs.into_iter().map(Ok)
    }

    #[test]
    fn meta_rides_in_the_apply_batch_and_a_view_and_replace_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let a = SledStore::in_db(&db, "a", dir.path()).unwrap();
        let b = SledStore::in_db(&db, "b", dir.path()).unwrap();
        a.apply_with_meta(&[(1, &put(b"x", b"1")), (2, &put(b"y", b"2"))], &[(b"\0m", b"meta".to_vec())]).unwrap();
        assert_eq!(a.get_meta(b"\0m").unwrap().as_deref(), Some(&b"meta"[..]));
        // Trees of one database are separate stores.
        assert_eq!(b.get(Keyspace::State, b"x").unwrap(), None);
        b.apply(&[(1, &put(b"stale", b"s"))]).unwrap();

        let view = a.point_in_time(&[b"\0m", b"\0missing"]).unwrap();
        assert_eq!(view.applied_index, 2);
        assert_eq!(view.meta, vec![Some(b"meta".to_vec()), None]);
        let pairs = scan_all(&view);
        assert_eq!(pairs.len(), 2, "meta keys are not data");

        b.replace_from(ok_pairs(pairs), 2, &[(b"\0m", b"copied".to_vec())]).unwrap();
        assert_eq!(b.get(Keyspace::State, b"stale").unwrap(), None);
        assert_eq!(b.get(Keyspace::State, b"y").unwrap().as_deref(), Some(&b"2"[..]));
        assert_eq!(b.applied_index().unwrap(), 2);
        assert_eq!(b.get_meta(b"\0m").unwrap().as_deref(), Some(&b"copied"[..]));

        // Keys that are not meta keys are refused, including the applied index itself.
        for bad in [&b"m"[..], APPLIED_INDEX_KEY] {
            assert!(matches!(a.get_meta(bad), Err(StorageError::NotMetaKey(_))));
            assert!(a.apply_with_meta(&[(3, &put(b"z", b"3"))], &[(bad, vec![])]).is_err());
        }
        assert!(
            b.replace_from(ok_pairs(vec![(b"\0m".to_vec(), vec![])]), 3, &[]).is_err(),
            "snapshot data may not hold meta keys"
        );
    }

    /// The pairs of `store`'s state keyspace as a sorted map of logical keys.
    fn state_of(store: &SledStore) -> BTreeMap<Vec<u8>, Vec<u8>> {
        store.scan(Keyspace::State, b"", None, usize::MAX).unwrap().into_iter().collect()
    }

    fn logical(pairs: Vec<(Vec<u8>, Vec<u8>)>) -> BTreeMap<Vec<u8>, Vec<u8>> {
        pairs.into_iter().map(|(k, v)| (k[1..].to_vec(), v)).collect()
    }

    /// A snapshot is built from a view while the node keeps committing: an
    /// apply from another thread completes while the view's scan is in the
    /// middle of the store, and the scan still yields exactly the state at
    /// the view's point (keys it passed and keys ahead of it, overwritten,
    /// deleted or created after the point).
    #[test]
    fn applies_go_on_while_a_view_is_scanned_and_the_view_stays_exact() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open(dir.path()).unwrap());
        let keys: Vec<Vec<u8>> = (0..200u32).map(|i| format!("k{i:03}").into_bytes()).collect();
        let initial: Vec<(LogIndex, WriteSet)> =
            keys.iter().enumerate().map(|(i, k)| (i as LogIndex + 1, put(k, b"v0"))).collect();
        store.apply(&initial.iter().map(|(i, w)| (*i, w)).collect::<Vec<_>>()).unwrap();
        let at_point = state_of(&store);
        let view = store.point_in_time(&[]).unwrap();
        assert_eq!(view.applied_index, 200);

        let (reached, wait_reached) = std::sync::mpsc::channel::<()>();
        let (resume, wait_resume) = std::sync::mpsc::channel::<()>();
        let scanner = std::thread::spawn(move || {
            let mut pairs = Vec::new();
            view.scan(|k, v| {
                pairs.push((k.to_vec(), v.to_vec()));
                if pairs.len() == 100 {
                    reached.send(()).unwrap();
                    wait_resume.recv_timeout(std::time::Duration::from_secs(30)).expect("the apply never finished");
                }
                Ok(())
            })
            .unwrap();
            pairs
        });
        wait_reached.recv_timeout(std::time::Duration::from_secs(30)).expect("the scan never reached the middle");
        // Halfway through the scan: overwrite, delete and create keys on
        // both sides of it, some twice.
        let changes = WriteSet {
            ops: [put(b"k010", b"new"), put(b"k150", b"new"), del(b"k020"), del(b"k160"), put(b"k050a", b"created")]
                .into_iter()
                .chain([put(b"k190a", b"created"), put(b"k150", b"newer"), del(b"k170"), put(b"k170", b"again")])
                .flat_map(|w| w.ops)
                .collect(),
        };
        let applier = {
            let store = store.clone();
            // Written to sled at once, in the middle of the scan.
            std::thread::spawn(move || {
                store.apply(&[(201, &changes)]).unwrap();
                store.write_out().unwrap();
            })
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !applier.is_finished() {
            assert!(std::time::Instant::now() < deadline, "an apply waited for a snapshot's scan");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        applier.join().unwrap();
        assert_eq!(store.applied_index().unwrap(), 201, "the apply completed in the middle of the scan");
        resume.send(()).unwrap();
        let scanned = scanner.join().unwrap();
        assert_eq!(scanned.len(), 200, "no key twice, none missing");
        assert_eq!(logical(scanned), at_point, "the view is the state at its point");
        let now = state_of(&store);
        assert_eq!(now.get(&b"k150"[..]).map(Vec::as_slice), Some(&b"newer"[..]));
        assert!(!now.contains_key(&b"k160"[..]));
    }

    /// A bulk replacement under an open view supersedes it rather than let
    /// it yield a mix of two states.
    #[test]
    fn a_replacement_supersedes_an_open_view() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        store.apply(&[(1, &put(b"a", b"1")), (2, &put(b"b", b"2"))]).unwrap();
        let view = store.point_in_time(&[]).unwrap();
        store.replace_from(ok_pairs(vec![(physical_key(Keyspace::State, b"c"), b"3".to_vec())]), 9, &[]).unwrap();
        assert!(matches!(view.scan(|_, _| Ok(())), Err(StorageError::Superseded)));
        assert_eq!(state_of(&store).into_iter().collect::<Vec<_>>(), vec![(b"c".to_vec(), b"3".to_vec())]);
    }

    /// A view's side tree goes with it, and one a crash left is dropped
    /// when the store is opened again.
    #[test]
    fn side_trees_do_not_outlive_their_views() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let side_trees = |db: &sled::Db| db.tree_names().iter().filter(|n| n.starts_with(b"s.point-in-time.")).count();
        let store = SledStore::in_db(&db, "s", dir.path()).unwrap();
        store.apply(&[(1, &put(b"a", b"1"))]).unwrap();
        let view = store.point_in_time(&[]).unwrap();
        store.apply(&[(2, &put(b"a", b"2"))]).unwrap();
        assert_eq!(side_trees(&db), 1);
        drop(view);
        assert_eq!(side_trees(&db), 0);
        db.open_tree("s.point-in-time.99").unwrap().insert(b"\x01a", &b"\x00"[..]).unwrap();
        drop(store);
        let _store = SledStore::in_db(&db, "s", dir.path()).unwrap();
        assert_eq!(side_trees(&db), 0);
    }

    /// A crash loses the apply buffer, not consistency: what sled holds
    /// after a restart is the data, meta keys and applied index of one
    /// earlier moment (the last write to sled), which the commit log
    /// re-applies from.
    #[test]
    fn a_crash_loses_the_buffer_and_leaves_sled_consistent() {
        let dir = tempfile::tempdir().unwrap();
        let meta = |i: u8| [(&b"\0m"[..], vec![i])];
        let writes: Vec<WriteSet> = (1..=6u8)
            .map(|i| WriteSet {
                ops: [put(b"x", &[i]).ops, del(&[b'd', i - 1]).ops, put(&[b'd', i], b"v").ops].concat(),
            })
            .collect();
        {
            let store = SledStore::open(dir.path()).unwrap().with_apply_buffer(crate::storage::conformance::UNBOUNDED);
            for (i, w) in writes.iter().enumerate().take(3) {
                store.apply_with_meta(&[(i as LogIndex + 1, w)], &meta(i as u8 + 1)).unwrap();
            }
            store.write_out().unwrap();
            for (i, w) in writes.iter().enumerate().skip(3) {
                store.apply_with_meta(&[(i as LogIndex + 1, w)], &meta(i as u8 + 1)).unwrap();
            }
            assert_eq!(store.applied_index().unwrap(), 6);
            assert_eq!(store.get(Keyspace::State, b"x").unwrap(), Some(vec![6]), "reads see the buffer");
            store.close_discarding();
            store.persist().unwrap();
        }
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(store.applied_index().unwrap(), 3, "older");
        assert_eq!(store.get_meta(b"\0m").unwrap(), Some(vec![3]), "meta as of the same index");
        let expected: BTreeMap<Vec<u8>, Vec<u8>> =
            [(b"x".to_vec(), vec![3]), (b"d\x03".to_vec(), b"v".to_vec())].into();
        assert_eq!(state_of(&store), expected, "data as of the same index");
        // Replaying the log from there ends where the crashed store was.
        let entries: Vec<(LogIndex, &WriteSet)> =
            writes.iter().enumerate().map(|(i, w)| (i as LogIndex + 1, w)).collect();
        store.apply(&entries).unwrap();
        assert_eq!(store.applied_index().unwrap(), 6);
        assert_eq!(state_of(&store), [(b"x".to_vec(), vec![6]), (b"d\x06".to_vec(), b"v".to_vec())].into());
    }

    /// A store dropped (a graceful stop, or a replica closed) writes its
    /// buffer to sled: nothing is left to replay.
    #[test]
    fn a_dropped_store_writes_its_buffer() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path()).unwrap().with_apply_buffer(crate::storage::conformance::UNBOUNDED);
            store.apply_with_meta(&[(1, &put(b"a", b"1")), (2, &put(b"b", b"2"))], &[(b"\0m", b"2".to_vec())]).unwrap();
        }
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(store.applied_index().unwrap(), 2);
        assert_eq!(store.get_meta(b"\0m").unwrap().as_deref(), Some(&b"2"[..]));
        assert_eq!(state_of(&store).len(), 2);
    }

    /// The buffer reaches sled when a bound is reached, not before, and an
    /// age bound is checked at apply.
    #[test]
    fn the_buffer_is_written_at_its_bounds() {
        let in_sled = |s: &SledStore| decode_index(s.tree.get(APPLIED_INDEX_KEY).unwrap().as_deref()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let unbounded = crate::storage::conformance::UNBOUNDED;
        let by_keys =
            SledStore::in_db(&db, "k", dir.path()).unwrap().with_apply_buffer(ApplyBuffer { max_keys: 3, ..unbounded });
        by_keys.apply(&[(1, &put(b"a", b"1")), (2, &put(b"a", b"2"))]).unwrap();
        by_keys.apply(&[(3, &put(b"b", b"1"))]).unwrap();
        assert_eq!((in_sled(&by_keys), by_keys.applied_index().unwrap()), (0, 3), "two distinct keys stay buffered");
        by_keys.apply(&[(4, &put(b"c", b"1"))]).unwrap();
        assert_eq!(in_sled(&by_keys), 4);
        let by_bytes = SledStore::in_db(&db, "b", dir.path())
            .unwrap()
            .with_apply_buffer(ApplyBuffer { max_bytes: 100, ..unbounded });
        by_bytes.apply(&[(1, &put(b"a", &[0; 50]))]).unwrap();
        by_bytes.apply(&[(2, &put(b"a", &[0; 60]))]).unwrap();
        assert_eq!(in_sled(&by_bytes), 0, "an overwritten value counts once");
        by_bytes.apply(&[(3, &put(b"b", &[0; 60]))]).unwrap();
        assert_eq!(in_sled(&by_bytes), 3);
        let by_age = SledStore::in_db(&db, "t", dir.path())
            .unwrap()
            .with_apply_buffer(ApplyBuffer { max_age_ms: 0, ..unbounded });
        by_age.apply(&[(1, &put(b"a", b"1"))]).unwrap();
        assert_eq!(in_sled(&by_age), 1);
        let through = SledStore::in_db(&db, "w", dir.path()).unwrap().with_apply_buffer(ApplyBuffer::WRITE_THROUGH);
        through.apply(&[(1, &put(b"a", b"1"))]).unwrap();
        through.apply(&[]).unwrap();
        assert_eq!(in_sled(&through), 1);
    }

    /// A view opened over buffered applies sees them, and applies buffered
    /// after it opened and written to sled later (the view's saving happens
    /// then) do not change it.
    #[test]
    fn a_view_is_exact_with_buffered_applies_before_and_after_it_opens() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap().with_apply_buffer(crate::storage::conformance::UNBOUNDED);
        store.apply_with_meta(&[(1, &put(b"a", b"1")), (2, &put(b"b", b"1"))], &[(b"\0m", b"2".to_vec())]).unwrap();
        store.write_out().unwrap();
        store
            .apply_with_meta(
                &[(3, &put(b"a", b"3")), (4, &del(b"b")), (5, &put(b"c", b"5"))],
                &[(b"\0m", b"5".to_vec())],
            )
            .unwrap();
        let at_point = state_of(&store);
        // A view scans once: one to scan before the later applies reach
        // sled, one after.
        let (view, later_view) = (store.point_in_time(&[b"\0m"]).unwrap(), store.point_in_time(&[]).unwrap());
        assert_eq!((view.applied_index, view.meta.clone()), (5, vec![Some(b"5".to_vec())]));
        store
            .apply_with_meta(
                &[(6, &put(b"a", b"6")), (7, &put(b"b", b"7")), (8, &del(b"c")), (9, &put(b"d", b"9"))],
                &[(b"\0m", b"9".to_vec())],
            )
            .unwrap();
        assert_eq!(logical(scan_all(&view)), at_point, "buffered applies after the point");
        store.write_out().unwrap();
        assert_eq!(store.get_meta(b"\0m").unwrap().as_deref(), Some(&b"9"[..]));
        assert_eq!(later_view.applied_index, 5);
        assert_eq!(logical(scan_all(&later_view)), at_point, "written to sled after the point");
    }

    /// Reads through the buffer equal reads of a store every apply was
    /// written to, whatever was written to sled before and buffered after.
    #[test]
    fn reads_equal_a_write_through_store() {
        use proptest::prelude::*;
        let key = || prop::collection::vec(0u8..4, 1..4);
        let op = (key(), prop::option::of(prop::collection::vec(any::<u8>(), 0..6))).prop_map(|(k, v)| match v {
            Some(v) => put(&k, &v).ops,
            None => del(&k).ops,
        });
        let cases = (
            prop::collection::vec(op.clone(), 0..12),
            prop::collection::vec(op, 0..12),
            prop::collection::vec(0u8..4, 0..2),
            prop::option::of(key()),
            0usize..8,
            1usize..16,
        );
        let config = ProptestConfig { cases: 64, ..ProptestConfig::default() };
        proptest!(config, |((written, buffered, prefix, after, limit, max_bytes) in cases)| {
            let dir = tempfile::tempdir().unwrap();
            let db = sled::Config::new().path(dir.path()).open().unwrap();
            let store = SledStore::in_db(&db, "s", dir.path()).unwrap().with_apply_buffer(crate::storage::conformance::UNBOUNDED);
            let expected = SledStore::in_db(&db, "e", dir.path()).unwrap().with_apply_buffer(ApplyBuffer::WRITE_THROUGH);
            let (w1, w2) = (WriteSet { ops: written.concat() }, WriteSet { ops: buffered.concat() });
            store.apply(&[(1, &w1)]).unwrap();
            store.write_out().unwrap();
            store.apply(&[(2, &w2)]).unwrap();
            expected.apply(&[(1, &w1), (2, &w2)]).unwrap();
            let ks = Keyspace::State;
            for op in w1.ops.iter().chain(&w2.ops) {
                let (crate::model::Op::Put { key, .. } | crate::model::Op::Delete { key, .. } | crate::model::Op::Expect { key, .. }) = op;
                prop_assert_eq!(store.get(ks, key).unwrap(), expected.get(ks, key).unwrap());
            }
            let after = after.as_deref();
            prop_assert_eq!(store.scan(ks, &prefix, after, limit).unwrap(), expected.scan(ks, &prefix, after, limit).unwrap());
            prop_assert_eq!(
                store.scan_page(ks, &prefix, after, limit, max_bytes).unwrap(),
                expected.scan_page(ks, &prefix, after, limit, max_bytes).unwrap()
            );
        });
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..Default::default() })]
        /// Writes at any moment of a scan, of any key (passed, ahead, new,
        /// deleted, rewritten): the scan is the state at the view's point.
        /// Whatever the apply buffer's bound (0: write-through), and with
        /// writes buffered before the view opens.
        #[test]
        fn a_view_is_the_state_at_its_point_whatever_is_written_during_its_scan(
            initial in proptest::collection::btree_map(0u8..40, 0u8..4, 0..30),
            writes in proptest::collection::vec((0usize..32, proptest::collection::vec((0u8..40, proptest::option::of(0u8..4)), 1..6)), 0..12),
            max_keys in 0usize..6,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let limits = ApplyBuffer { max_keys, ..crate::storage::conformance::UNBOUNDED };
            let store = SledStore::open(dir.path()).unwrap().with_apply_buffer(limits);
            let key = |k: u8| format!("key{k:02}").into_bytes();
            let ws: Vec<WriteSet> = initial.iter().map(|(k, v)| put(&key(*k), &[*v])).collect();
            let entries: Vec<(LogIndex, &WriteSet)> = ws.iter().enumerate().map(|(i, w)| (i as LogIndex + 1, w)).collect();
            store.apply(&entries).unwrap();
            let at_point = state_of(&store);
            let view = store.point_in_time(&[]).unwrap();
            let mut next = store.applied_index().unwrap() + 1;
            let mut seen = 0usize;
            let mut pairs = Vec::new();
            let mut apply_due = |seen: usize| {
                for (at, ops) in &writes {
                    if *at == seen {
                        let ops = ops.iter().flat_map(|(k, v)| match v {
                            Some(v) => put(&key(*k), &[*v]).ops,
                            None => del(&key(*k)).ops,
                        }).collect();
                        store.apply(&[(next, &WriteSet { ops })]).unwrap();
                        next += 1;
                    }
                }
            };
            apply_due(0);
            view.scan(|k, v| {
                seen += 1;
                pairs.push((k.to_vec(), v.to_vec()));
                apply_due(seen);
                Ok(())
            }).unwrap();
            proptest::prop_assert_eq!(pairs.len(), at_point.len(), "no key twice, none missing");
            proptest::prop_assert_eq!(logical(pairs), at_point);
        }
    }
}
