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
    /// flocks its own db file, but reports it as a generic error).
    _lock: File,
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
        let tree = db.open_tree(TREE_NAME)?;
        let applied = decode_index(tree.get(APPLIED_INDEX_KEY)?.as_deref())?;
        Ok(SledStore { tree, db, sled_dir, applied: Mutex::new(applied), _lock: lock })
    }
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
            // A read-only descriptor is enough: fsync acts on the inode.
            let f = File::open(&path).map_err(io_err("opening for fsync", &path))?;
            f.sync_all().map_err(io_err("fsync", &path))?;
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

    fn apply(&self, entries: &[(LogIndex, &WriteSet)]) -> Result<(), StorageError> {
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
        // Recording the index in the same batch is what makes replay exact:
        // sled either has the entries and the index, or neither.
        batch.insert(APPLIED_INDEX_KEY, &last.to_be_bytes()[..]);
        self.tree.apply_batch(batch)?;
        *applied = last;
        Ok(())
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
}
