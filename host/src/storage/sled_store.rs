//! `SledStore`: the on-disk `StateStore`, one sled tree. Physical key =
//! keyspace byte ++ key; the applied log index lives under a meta key whose
//! first byte (0) is below every keyspace byte, so scans never see it.
//!
//! sled 0.34's `flush()` only issues `sync_file_range`, which does not make
//! data or metadata durable; `persist` therefore follows it with an fsync of
//! every sled file and directory. Durability between persists comes from the
//! commit log, which replays whatever sled lost.

use super::{StateStore, StorageError, op_write, physical_key, scan_lower_bound, unapplied};
use crate::model::{Keyspace, LogIndex, WriteSet};
use std::fs::{File, OpenOptions, TryLockError};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Meta key of the applied index. Byte 0 is no keyspace (they start at 1).
const APPLIED_INDEX_KEY: &[u8] = b"\0applied_index";
const TREE_NAME: &str = "conflux-state";
const LOCK_FILE: &str = "conflux-store.lock";
const SLED_SUBDIR: &str = "sled";

/// Durable state store on sled.
pub struct SledStore {
    // Field order matters: sled is dropped (and closes its files) before the
    // directory lock below is released.
    tree: sled::Tree,
    db: sled::Db,
    sled_dir: PathBuf,
    /// Serialises `apply` so "read applied index, write batch, update it" is
    /// one step even if two threads apply at once; caches the applied index.
    applied: Mutex<LogIndex>,
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
    /// Opens (creating if needed) the store in `dir`. Fails with
    /// `StorageError::Locked` if another `SledStore` (in this or any process)
    /// has it open.
    pub fn open(dir: &Path) -> Result<SledStore, StorageError> {
        std::fs::create_dir_all(dir).map_err(io_err("creating store directory", dir))?;
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
    /// not per shard). The caller owns the directory's lock.
    pub fn in_db(db: &sled::Db, tree_name: &str, sled_dir: &Path) -> Result<SledStore, StorageError> {
        let tree = db.open_tree(tree_name)?;
        let applied = decode_index(tree.get(APPLIED_INDEX_KEY)?.as_deref())?;
        Ok(SledStore {
            tree,
            db: db.clone(),
            sled_dir: sled_dir.to_path_buf(),
            applied: Mutex::new(applied),
            _lock: None,
        })
    }

    /// Like `apply`, and in the same atomic batch sets the host meta keys
    /// `meta` (each must start with byte 0, below every keyspace). Raft keeps
    /// its last applied log id and membership here, so they can never
    /// disagree with the data.
    pub fn apply_with_meta(
        &self,
        entries: &[(LogIndex, &WriteSet)],
        meta: &[(&[u8], Vec<u8>)],
    ) -> Result<(), StorageError> {
        let mut applied = self.applied.lock().map_err(|_| StorageError::Poisoned)?;
        let mut batch = sled::Batch::default();
        let mut last = None;
        for (index, ws) in unapplied(entries, *applied)? {
            // sled's Batch keeps the last write per key, which is exactly
            // "later ops win" within and across entries.
            for op in &ws.ops {
                match op_write(op) {
                    (k, Some(v)) => batch.insert(k, v),
                    (k, None) => batch.remove(k),
                }
            }
            last = Some(*index);
        }
        let Some(last) = last else { return Ok(()) };
        self.commit_batch(batch, &mut applied, last, meta)
    }

    /// Adds the applied index and `meta` to `batch` and applies it as one
    /// atomic write. Recording the index in the same batch is what makes
    /// replay exact: sled either has the entries and the index, or neither.
    fn commit_batch(
        &self,
        mut batch: sled::Batch,
        applied: &mut LogIndex,
        applied_index: LogIndex,
        meta: &[(&[u8], Vec<u8>)],
    ) -> Result<(), StorageError> {
        batch.insert(APPLIED_INDEX_KEY, &applied_index.to_be_bytes()[..]);
        for (key, value) in meta {
            check_meta_key(key)?;
            batch.insert(*key, value.as_slice());
        }
        self.tree.apply_batch(batch)?;
        *applied = applied_index;
        Ok(())
    }

    /// A host meta key's value (see `apply_with_meta`).
    pub fn get_meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        check_meta_key(key)?;
        Ok(self.tree.get(key)?.map(|v| v.to_vec()))
    }

    /// Every keyspace entry as (physical key, value), for a snapshot, with
    /// the values of `meta_keys`. Taken under the apply lock, so data and
    /// meta are the state at exactly the returned applied index.
    pub fn export(&self, meta_keys: &[&[u8]]) -> Result<Export, StorageError> {
        let applied = self.applied.lock().map_err(|_| StorageError::Poisoned)?;
        let mut meta = Vec::with_capacity(meta_keys.len());
        for key in meta_keys {
            meta.push(self.get_meta(key)?);
        }
        let mut pairs = Vec::new();
        // Physical keys from byte 1 on are keyspace data; byte 0 is meta.
        for item in self.tree.range::<&[u8], _>(&[1u8][..]..) {
            let (k, v) = item?;
            pairs.push((k.to_vec(), v.to_vec()));
        }
        Ok(Export { applied_index: *applied, meta, pairs })
    }

    /// Replaces all keyspace data with `pairs` (physical keys, as `export`
    /// returns them) and sets the applied index and `meta`, atomically: a
    /// crash leaves either the old state or the new one.
    pub fn replace_all(
        &self,
        pairs: &[(Vec<u8>, Vec<u8>)],
        applied_index: LogIndex,
        meta: &[(&[u8], Vec<u8>)],
    ) -> Result<(), StorageError> {
        let mut applied = self.applied.lock().map_err(|_| StorageError::Poisoned)?;
        let mut batch = sled::Batch::default();
        for item in self.tree.range::<&[u8], _>(&[1u8][..]..) {
            batch.remove(item?.0);
        }
        for (k, v) in pairs {
            if k.first().is_none_or(|b| *b == 0) {
                return Err(StorageError::Corrupt(format!("snapshot key {k:?} is not a keyspace key")));
            }
            batch.insert(k.as_slice(), v.as_slice());
        }
        self.commit_batch(batch, &mut applied, applied_index, meta)
    }
}

/// A consistent copy of a store (see `SledStore::export`).
#[derive(Debug)]
pub struct Export {
    pub applied_index: LogIndex,
    /// Values of the requested meta keys, in request order.
    pub meta: Vec<Option<Vec<u8>>>,
    /// Keyspace data as (physical key, value), ascending.
    pub pairs: super::KvPairs,
}

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
        Ok(self.tree.get(physical_key(keyspace, key))?.map(|v| v.to_vec()))
    }

    fn scan(
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

    fn scan_page(
        &self,
        keyspace: Keyspace,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<super::ScanPage, StorageError> {
        let full_prefix = physical_key(keyspace, prefix);
        let lower = scan_lower_bound(keyspace, prefix, start_after);
        let items = self
            .tree
            .range::<Vec<u8>, _>((lower, Bound::Unbounded))
            .take_while(|item| item.as_ref().map_or(true, |(k, _)| k.starts_with(&full_prefix)))
            .map(|item| item.map(|(k, v)| (k[1..].to_vec(), v.to_vec())).map_err(StorageError::from));
        super::fill_page(items, limit, max_bytes)
    }

    fn apply(&self, entries: &[(LogIndex, &WriteSet)]) -> Result<(), StorageError> {
        self.apply_with_meta(entries, &[])
    }

    fn applied_index(&self) -> Result<LogIndex, StorageError> {
        Ok(*self.applied.lock().map_err(|_| StorageError::Poisoned)?)
    }

    fn persist(&self) -> Result<(), StorageError> {
        self.db.flush()?;
        fsync_tree(&self.sled_dir)?;
        if let Some(parent) = self.sled_dir.parent() {
            File::open(parent).and_then(|d| d.sync_all()).map_err(io_err("fsync directory", parent))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn meta_rides_in_the_apply_batch_and_export_and_replace_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let a = SledStore::in_db(&db, "a", dir.path()).unwrap();
        let b = SledStore::in_db(&db, "b", dir.path()).unwrap();
        a.apply_with_meta(&[(1, &put(b"x", b"1")), (2, &put(b"y", b"2"))], &[(b"\0m", b"meta".to_vec())]).unwrap();
        assert_eq!(a.get_meta(b"\0m").unwrap().as_deref(), Some(&b"meta"[..]));
        // Trees of one database are separate stores.
        assert_eq!(b.get(Keyspace::State, b"x").unwrap(), None);
        b.apply(&[(1, &put(b"stale", b"s"))]).unwrap();

        let export = a.export(&[b"\0m", b"\0missing"]).unwrap();
        assert_eq!(export.applied_index, 2);
        assert_eq!(export.meta, vec![Some(b"meta".to_vec()), None]);
        assert_eq!(export.pairs.len(), 2, "meta keys are not data");

        b.replace_all(&export.pairs, 2, &[(b"\0m", b"copied".to_vec())]).unwrap();
        assert_eq!(b.get(Keyspace::State, b"stale").unwrap(), None);
        assert_eq!(b.get(Keyspace::State, b"y").unwrap().as_deref(), Some(&b"2"[..]));
        assert_eq!(b.applied_index().unwrap(), 2);
        assert_eq!(b.get_meta(b"\0m").unwrap().as_deref(), Some(&b"copied"[..]));

        // Keys that are not meta keys are refused, including the applied index itself.
        for bad in [&b"m"[..], APPLIED_INDEX_KEY] {
            assert!(matches!(a.get_meta(bad), Err(StorageError::NotMetaKey(_))));
            assert!(a.apply_with_meta(&[(3, &put(b"z", b"3"))], &[(bad, vec![])]).is_err());
        }
        assert!(b.replace_all(&[(b"\0m".to_vec(), vec![])], 3, &[]).is_err(), "snapshot data may not hold meta keys");
    }
}
