//! Materialized state: the `StateStore` trait and its two implementations
//! (`SledStore` on disk, `MemStore` in memory), and `Overlay`, a store seen
//! through writes not committed yet. A store holds the result of
//! applying committed log entries plus the index of the last one applied; it is
//! not the durability boundary (the commit log is), so it only needs to be made
//! durable on request (`persist`) before the log is purged.

pub mod durable_file;
mod mem_store;
mod overlay;
mod point_in_time;
mod sled_store;

#[cfg(test)]
pub(crate) mod conformance;

pub use mem_store::MemStore;
pub use overlay::Overlay;
pub use point_in_time::PointInTime;
pub use sled_store::{ApplyBuffer, SledStore};

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

/// One page of a [`StateStore::scan_page`]: entries in ascending key order,
/// and whether more follow the last of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanPage {
    pub entries: KvPairs,
    pub more: bool,
}

/// The page of the union of disjoint stores (shards), from each store's own
/// page under the same bounds. Unlike a count, a byte bound can end one
/// store's page early while another's goes on past keys the first has not
/// returned: the union is only known up to the lowest last key of a store
/// with more, so entries beyond it wait for the next page.
pub(crate) fn merge_pages(pages: Vec<ScanPage>, limit: usize, max_bytes: usize) -> ScanPage {
    let known_up_to = pages.iter().filter(|p| p.more).filter_map(|p| p.entries.last().map(|(k, _)| k.clone())).min();
    let more = pages.iter().any(|p| p.more);
    let mut all: KvPairs = pages.into_iter().flat_map(|p| p.entries).collect();
    all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    if let Some(bound) = &known_up_to {
        all.retain(|(k, _)| k <= bound);
    }
    let mut page = match fill_page(all.into_iter().map(Ok::<_, std::convert::Infallible>), limit, max_bytes) {
        Ok(page) => page,
        Err(never) => match never {},
    };
    page.more |= more;
    page
}

/// The page `items` (ascending, already within the scanned range) make under
/// a count and a byte bound: it stops before the entry that would be the
/// `limit + 1`th or take the keys and values past `max_bytes`, except that
/// the first entry always fits, so paging makes progress whatever its size.
/// Reads one entry past the page, to know whether more follow.
pub(crate) fn fill_page<E>(
    items: impl IntoIterator<Item = Result<(Vec<u8>, Vec<u8>), E>>,
    limit: usize,
    max_bytes: usize,
) -> Result<ScanPage, E> {
    let mut page = ScanPage::default();
    let mut bytes = 0usize;
    for item in items {
        let (k, v) = item?;
        let size = k.len() + v.len();
        if page.entries.len() >= limit || (!page.entries.is_empty() && bytes.saturating_add(size) > max_bytes) {
            page.more = true;
            break;
        }
        bytes += size;
        page.entries.push((k, v));
    }
    Ok(page)
}

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
    /// One page of [`StateStore::scan`] bounded by bytes as well as by count
    /// (see [`fill_page`]): what an API page may hold, whatever the size of
    /// the values. Stores override it with a single pass; this default asks
    /// for one entry at a time, so it never holds more than the page.
    fn scan_page(
        &self,
        keyspace: Keyspace,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<ScanPage, StorageError> {
        let mut after = start_after.map(<[u8]>::to_vec);
        let items = std::iter::from_fn(|| match self.scan(keyspace, prefix, after.as_deref(), 1) {
            Ok(mut rows) => {
                let row = rows.pop()?;
                after = Some(row.0.clone());
                Some(Ok(row))
            }
            Err(e) => Some(Err(e)),
        });
        fill_page(items, limit, max_bytes)
    }
    fn applied_index(&self) -> Result<LogIndex, StorageError>;
    /// Makes everything applied so far durable on disk (sled: flush, then fsync its files and directory); a no-op for memory. Called before the log is purged and at shutdown.
    fn persist(&self) -> Result<(), StorageError>;
}

/// A store committed entries are applied to: a replica's own store (sled on
/// disk, or memory in tests). Views that read through to such stores (a
/// node's shards as one, a point-in-time view) are `StateStore`s only:
/// what applies to them is their groups' business, not their readers'.
pub trait ApplyStore: StateStore {
    /// Applies committed log entries in order as ONE atomic batch and records the last index as the applied index. Entries with index <= applied_index() are skipped (replay is idempotent). Within and across entries, later ops on a key win.
    fn apply(&self, entries: &[(LogIndex, &WriteSet)]) -> Result<(), StorageError>;
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

/// The physical key and new value (None = delete) of one op; `None` for a
/// precondition ([`Op::Expect`]), which changes nothing: the state machine
/// that applies the log checks it before the write set reaches a store.
pub(crate) fn op_write(op: &Op) -> Option<(Vec<u8>, Option<&[u8]>)> {
    match op {
        Op::Put { keyspace, key, value } => Some((physical_key(*keyspace, key), Some(value.as_slice()))),
        Op::Delete { keyspace, key } => Some((physical_key(*keyspace, key), None)),
        Op::Expect { .. } => None,
    }
}

#[cfg(test)]
mod page_tests {
    use super::*;
    use proptest::prelude::*;

    /// Pages `entries` split over `stores` disjoint sorted stores the way
    /// `LocalShards` does: each store's page, then `merge_pages`.
    fn merged_pages(stores: &[KvPairs], limit: usize, max_bytes: usize) -> Vec<KvPairs> {
        let mut out = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let pages = stores
                .iter()
                .map(|s| {
                    let rest = s.iter().filter(|(k, _)| after.as_ref().is_none_or(|a| k > a)).cloned();
                    fill_page(rest.map(Ok::<_, std::convert::Infallible>), limit, max_bytes).unwrap()
                })
                .collect();
            let page = merge_pages(pages, limit, max_bytes);
            assert!(!page.entries.is_empty() || !page.more, "a page with more must make progress");
            after = page.entries.last().map(|(k, _)| k.clone()).or(after);
            out.push(page.entries);
            if !page.more {
                return out;
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        /// Merged pages visit every entry once and in order, each page within
        /// its bounds (one oversized entry alone excepted).
        #[test]
        fn merged_pages_cover_every_shard_in_order(
            entries in proptest::collection::btree_map(any::<u16>(), (0usize..4, 0usize..60), 0..40),
            limit in 1usize..8,
            max_bytes in 1usize..120,
        ) {
            let mut stores = vec![KvPairs::new(); 4];
            for (k, (store, size)) in &entries {
                stores[*store].push((k.to_be_bytes().to_vec(), vec![0; *size]));
            }
            let pages = merged_pages(&stores, limit, max_bytes);
            for p in &pages {
                let bytes: usize = p.iter().map(|(k, v)| k.len() + v.len()).sum();
                prop_assert!(p.len() <= limit);
                prop_assert!(bytes <= max_bytes || p.len() == 1, "{bytes} > {max_bytes}");
            }
            let seen: Vec<Vec<u8>> = pages.into_iter().flatten().map(|(k, _)| k).collect();
            let all: Vec<Vec<u8>> = entries.keys().map(|k| k.to_be_bytes().to_vec()).collect();
            prop_assert_eq!(seen, all);
        }
    }
}
