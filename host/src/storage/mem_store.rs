//! `MemStore`: an in-memory `StateStore` (a `BTreeMap` under a `RwLock`) with
//! the same key layout and semantics as `SledStore`. For tests and for nodes
//! that rebuild their state from the log on every start.

use super::{StateStore, StorageError, op_write, scan_lower_bound, unapplied};
use crate::model::{Keyspace, LogIndex, WriteSet};
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::RwLock;

#[derive(Debug, Default)]
struct Inner {
    /// Physical key (keyspace byte ++ key) → value, as in `SledStore`.
    map: BTreeMap<Vec<u8>, Vec<u8>>,
    applied: LogIndex,
}

/// In-memory state store. Its size is bounded only by the data applied to it,
/// like any store: it is the state, not a cache.
#[derive(Debug, Default)]
pub struct MemStore {
    inner: RwLock<Inner>,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }
}

impl StateStore for MemStore {
    fn get(&self, keyspace: Keyspace, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        let inner = self.inner.read().map_err(|_| StorageError::Poisoned)?;
        Ok(inner.map.get(&super::physical_key(keyspace, key)).cloned())
    }

    fn scan(
        &self,
        keyspace: Keyspace,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<super::KvPairs, StorageError> {
        let full_prefix = super::physical_key(keyspace, prefix);
        let lower = scan_lower_bound(keyspace, prefix, start_after);
        let inner = self.inner.read().map_err(|_| StorageError::Poisoned)?;
        Ok(inner
            .map
            .range((lower, Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(&full_prefix))
            .take(limit)
            .map(|(k, v)| (k[1..].to_vec(), v.clone()))
            .collect())
    }

    fn scan_page(
        &self,
        keyspace: Keyspace,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<super::ScanPage, StorageError> {
        let full_prefix = super::physical_key(keyspace, prefix);
        let lower = scan_lower_bound(keyspace, prefix, start_after);
        let inner = self.inner.read().map_err(|_| StorageError::Poisoned)?;
        let items = inner
            .map
            .range((lower, Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(&full_prefix))
            .map(|(k, v)| Ok::<_, StorageError>((k[1..].to_vec(), v.clone())));
        super::fill_page(items, limit, max_bytes)
    }

    fn applied_index(&self) -> Result<LogIndex, StorageError> {
        Ok(self.inner.read().map_err(|_| StorageError::Poisoned)?.applied)
    }

    fn persist(&self) -> Result<(), StorageError> {
        Ok(())
    }
}

impl super::ApplyStore for MemStore {
    fn apply(&self, entries: &[(LogIndex, &WriteSet)]) -> Result<(), StorageError> {
        // One write lock for the whole call: readers see all of it or none of it.
        let mut inner = self.inner.write().map_err(|_| StorageError::Poisoned)?;
        let mut last = None;
        // Collect first so an out-of-order error leaves the map untouched.
        let todo: Vec<_> = unapplied(entries, inner.applied)?.collect();
        for (index, ws) in todo {
            for op in &ws.ops {
                match op_write(op) {
                    Some((k, Some(v))) => {
                        inner.map.insert(k, v.to_vec());
                    }
                    Some((k, None)) => {
                        inner.map.remove(&k);
                    }
                    None => {}
                }
            }
            last = Some(*index);
        }
        if let Some(last) = last {
            inner.applied = last;
        }
        Ok(())
    }
}
