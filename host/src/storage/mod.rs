//! Materialized state: the `StateStore` trait and its two implementations
//! (`SledStore` on disk, `MemStore` in memory). A store holds the result of
//! applying committed log entries plus the index of the last one applied; it is
//! not the durability boundary (the commit log is), so it only needs to be made
//! durable on request (`persist`) before the log is purged.

pub mod durable_file;
mod mem_store;
mod point_in_time;
mod sled_store;

#[cfg(test)]
pub(crate) mod conformance;

pub use mem_store::MemStore;
pub use point_in_time::PointInTime;
pub use sled_store::SledStore;

use crate::model::{Keyspace, LogIndex, Op, WriteSet};
use std::path::PathBuf;

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("{context} {path:?}: {source}")]
    Io { context: &'static str, path: PathBuf, source: std::io::Error },
    #[error("store directory {path:?} is already open (locked by another store instance or process)")]
    Locked { path: PathBuf },
    #[error("corrupt store data: {0}")]
    Corrupt(String),
    #[error("apply called with log indexes out of order: {next} after {prev}")]
    OutOfOrder { prev: LogIndex, next: LogIndex },
    #[error("{0:?} is not a host meta key (meta keys start with byte 0)")]
    NotMetaKey(Vec<u8>),
    #[error("store lock poisoned by a panic in another thread")]
    Poisoned,
    #[error("shard {shard} has no replica on this node; ask a node that holds it")]
    NotLocal { shard: u32 },
    #[error("{0}")]
    Unsupported(&'static str),
    /// A point-in-time view's store was replaced wholesale while it was read.
    #[error("the store was replaced while a point-in-time view of it was read")]
    Superseded,
}

/// Key/value pairs returned by `scan`, in ascending key order.
pub type KvPairs = Vec<(Vec<u8>, Vec<u8>)>;

/// Materialized key/value state built from committed log entries.
pub trait StateStore: Send + Sync + 'static {
    fn get(&self, keyspace: Keyspace, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;
    /// Entries of `keyspace` whose key starts with `prefix` and is strictly greater than `start_after` (a full key) when given, ascending byte order, at most `limit`.
    fn scan(
        &self,
        keyspace: Keyspace,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<KvPairs, StorageError>;
    /// Applies committed log entries in order as ONE atomic batch and records the last index as the applied index. Entries with index <= applied_index() are skipped (replay is idempotent). Within and across entries, later ops on a key win.
    fn apply(&self, entries: &[(LogIndex, &WriteSet)]) -> Result<(), StorageError>;
    fn applied_index(&self) -> Result<LogIndex, StorageError>;
    /// Makes everything applied so far durable on disk (sled: flush, then fsync its files and directory); a no-op for memory. Called before the log is purged and at shutdown.
    fn persist(&self) -> Result<(), StorageError>;
}

/// Ids of the entities of `entity_type` that have state and start with
/// `id_prefix`, in byte order, strictly after `start_after`, at most `limit`.
/// One bounded scan per id: each skips past the previous entity's keys, so an
/// entity with many keys costs no more than one with a single key.
pub fn entity_ids(
    store: &dyn StateStore,
    entity_type: &str,
    id_prefix: &str,
    start_after: Option<&str>,
    limit: usize,
) -> Result<Vec<String>, StorageError> {
    let type_len = crate::model::type_prefix(entity_type).len();
    // Ids hold no separator byte, so the keys of the ids starting with
    // `id_prefix` are exactly the keys starting with `type \0 id_prefix`.
    let mut prefix = crate::model::type_prefix(entity_type);
    prefix.extend_from_slice(id_prefix.as_bytes());
    let mut after = start_after.map(|id| crate::model::after_entity(entity_type, id));
    let mut ids = Vec::new();
    while ids.len() < limit {
        let Some((key, _)) = store.scan(Keyspace::State, &prefix, after.as_deref(), 1)?.into_iter().next() else {
            break;
        };
        let id = crate::model::id_of_state_key(&key, type_len)
            .ok_or_else(|| StorageError::Corrupt(format!("state key {key:?} has no entity id")))?
            .to_owned();
        after = Some(crate::model::after_entity(entity_type, &id));
        ids.push(id);
    }
    Ok(ids)
}

/// Physical key of `key` in `keyspace`: the keyspace byte first, so every
/// keyspace is one contiguous, ordered range and keyspaces cannot collide.
pub(crate) fn physical_key(keyspace: Keyspace, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(keyspace.as_byte());
    k.extend_from_slice(key);
    k
}

/// The first physical key a scan may return: the prefix itself, or just past
/// `start_after` when that lies at or beyond the prefix. Returned with whether
/// the bound is exclusive.
pub(crate) fn scan_lower_bound(
    keyspace: Keyspace,
    prefix: &[u8],
    start_after: Option<&[u8]>,
) -> std::ops::Bound<Vec<u8>> {
    match start_after {
        // A `start_after` below the prefix excludes nothing inside the prefix.
        Some(after) if after >= prefix => std::ops::Bound::Excluded(physical_key(keyspace, after)),
        _ => std::ops::Bound::Included(physical_key(keyspace, prefix)),
    }
}

/// Checks that `entries` have strictly increasing indexes and returns the ones
/// not yet applied. Shared by both stores so their replay semantics match.
pub(crate) fn unapplied<'a, 'w>(
    entries: &'a [(LogIndex, &'w WriteSet)],
    applied: LogIndex,
) -> Result<impl Iterator<Item = &'a (LogIndex, &'w WriteSet)>, StorageError> {
    for pair in entries.windows(2) {
        if pair[1].0 <= pair[0].0 {
            return Err(StorageError::OutOfOrder { prev: pair[0].0, next: pair[1].0 });
        }
    }
    Ok(entries.iter().filter(move |(index, _)| *index > applied))
}

/// The physical key and new value (None = delete) of one op.
pub(crate) fn op_write(op: &Op) -> (Vec<u8>, Option<&[u8]>) {
    match op {
        Op::Put { keyspace, key, value } => (physical_key(*keyspace, key), Some(value.as_slice())),
        Op::Delete { keyspace, key } => (physical_key(*keyspace, key), None),
    }
}
