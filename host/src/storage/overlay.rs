//! `Overlay`: a store seen through writes that are not committed yet — the
//! write sets of the earlier turns of an entity's batch (turns that share one
//! commit), laid over the committed store. Every read a guest can make (`get`,
//! `scan`, `scan_page`) sees the pending writes first, so a later turn of the
//! batch reads what the earlier ones wrote, exactly as if they had committed.
//! Nothing is ever applied through it: the batch's write set goes to the log.
//! With pipelined commits it also holds the write sets of the entity's
//! earlier batches still on their way through the log, each retired once
//! applied.
//!
//! The merging itself (pending writes over a store's rows, for `scan` and
//! `scan_page`) is shared with `SledStore`, whose apply buffer is laid over
//! sled the same way.

use super::{KvPairs, ScanPage, StateStore, StorageError, fill_page, op_write, physical_key};
use crate::model::{Keyspace, LogIndex, Op};
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

/// Base rows read per step when a scan must skip pending deletes it cannot
/// count in advance (a byte-bounded page).
const SCAN_CHUNK: usize = 64;

/// Pending writes (by physical key; `None` = deleted) over a store, each
/// tagged with the write set (a caller's number) that wrote it last.
pub struct Overlay {
    base: Arc<dyn StateStore>,
    pending: RwLock<Pending>,
    /// Each pending key's last writer, for [`Overlay::retire`].
    writers: std::sync::Mutex<std::collections::HashMap<Vec<u8>, u64>>,
}

impl Overlay {
    pub fn new(base: Arc<dyn StateStore>) -> Self {
        Self { base, pending: RwLock::new(BTreeMap::new()), writers: Default::default() }
    }

    /// Lays the ops of write set `tag` over what is pending (later ops on a
    /// key win, as when applied); preconditions change nothing. Tags grow.
    pub fn push(&self, ops: &[Op], tag: u64) {
        let mut pending = self.pending.write().unwrap_or_else(|p| p.into_inner());
        let mut writers = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        for op in ops {
            if let Some((key, value)) = op_write(op) {
                writers.insert(key.clone(), tag);
                pending.insert(key, value.map(<[u8]>::to_vec));
            }
        }
    }

    /// Forgets the writes of write sets up to `tag` that no later one
    /// overwrote: the store has applied them, and reads go to it again
    /// (a key the store changed since, such as a delivered message's outbox
    /// entry, reads as it is now).
    pub fn retire(&self, tag: u64) {
        let mut pending = self.pending.write().unwrap_or_else(|p| p.into_inner());
        let mut writers = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        writers.retain(|key, &mut by| {
            let keep = by > tag;
            if !keep {
                pending.remove(key);
            }
            keep
        });
    }

    /// Whether nothing is pending: reads go straight to the store.
    pub fn is_empty(&self) -> bool {
        self.pending.read().unwrap_or_else(|p| p.into_inner()).is_empty()
    }
}

/// Pending writes by physical key; `None` = deleted. Laid over a store by
/// an [`Overlay`] (a batch's uncommitted turns) and by a `SledStore`'s apply
/// buffer (applied entries not yet written to sled).
pub(crate) type Pending = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// The pending writes of `keyspace` under `prefix` and after `start_after`
/// (keys without the keyspace byte), ascending.
pub(crate) fn pending_in(
    pending: &Pending,
    keyspace: Keyspace,
    prefix: &[u8],
    start_after: Option<&[u8]>,
) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    let from = physical_key(keyspace, prefix);
    pending
        .range(from.clone()..)
        .take_while(|(k, _)| k.starts_with(&from))
        .map(|(k, v)| (k[1..].to_vec(), v.clone()))
        .filter(|(k, _)| start_after.is_none_or(|a| k.as_slice() > a))
        .collect()
}

/// Visits the merged entries of the range in ascending key order until
/// `emit` returns false: `pending` (the range's pending writes, from
/// [`pending_in`]) replace (or, deleted, hide) the entries of the same key
/// that `base` yields. `base(after, n)` scans the store's range after `after`
/// for at most `n` rows; it is read `chunk` rows at a time, so a range
/// hiding many deleted keys still ends.
fn walk(
    pending: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    mut base: impl FnMut(Option<&[u8]>, usize) -> Result<KvPairs, StorageError>,
    start_after: Option<&[u8]>,
    chunk: usize,
    mut emit: impl FnMut(Vec<u8>, Vec<u8>) -> bool,
) -> Result<(), StorageError> {
    let mut pending = pending.into_iter().peekable();
    let mut after = start_after.map(<[u8]>::to_vec);
    loop {
        let rows = base(after.as_deref(), chunk)?;
        let exhausted = rows.len() < chunk;
        if let Some((k, _)) = rows.last() {
            after = Some(k.clone());
        }
        for (k, v) in rows {
            // Pending keys the store does not have, up to this one.
            while let Some((pk, pv)) = pending.next_if(|(pk, _)| *pk < k) {
                if let Some(pv) = pv
                    && !emit(pk, pv)
                {
                    return Ok(());
                }
            }
            let row = match pending.next_if(|(pk, _)| *pk == k) {
                Some((_, None)) => continue,
                Some((pk, Some(pv))) => (pk, pv),
                None => (k, v),
            };
            if !emit(row.0, row.1) {
                return Ok(());
            }
        }
        if exhausted {
            for (pk, pv) in pending {
                if let Some(pv) = pv
                    && !emit(pk, pv)
                {
                    return Ok(());
                }
            }
            return Ok(());
        }
    }
}

/// [`StateStore::scan`] of `pending` (from [`pending_in`], same range) laid
/// over the rows `base` yields (see [`walk`]).
pub(crate) fn merged_scan(
    pending: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    base: impl FnMut(Option<&[u8]>, usize) -> Result<KvPairs, StorageError>,
    start_after: Option<&[u8]>,
    limit: usize,
) -> Result<KvPairs, StorageError> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    // Pending deletes hide at most this many stored rows: one read of
    // the store usually covers the whole page.
    let hidden = pending.iter().filter(|(_, v)| v.is_none()).count();
    let mut out = Vec::new();
    walk(pending, base, start_after, limit.saturating_add(hidden), |k, v| {
        out.push((k, v));
        out.len() < limit
    })?;
    Ok(out)
}

/// [`StateStore::scan_page`] of `pending` laid over `base` (see
/// [`merged_scan`]).
pub(crate) fn merged_scan_page(
    pending: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    base: impl FnMut(Option<&[u8]>, usize) -> Result<KvPairs, StorageError>,
    start_after: Option<&[u8]>,
    limit: usize,
    max_bytes: usize,
) -> Result<ScanPage, StorageError> {
    // Collects up to the entry that ends the page (one past the count,
    // or past the bytes — the first entry always fits), which is what
    // `fill_page` needs to say `more`.
    let mut rows = Vec::new();
    let mut bytes = 0usize;
    walk(pending, base, start_after, SCAN_CHUNK, |k, v| {
        bytes = bytes.saturating_add(k.len() + v.len());
        rows.push((k, v));
        !(rows.len() > limit || (rows.len() > 1 && bytes > max_bytes))
    })?;
    fill_page(rows.into_iter().map(Ok::<_, StorageError>), limit, max_bytes)
}

impl StateStore for Overlay {
    fn get(&self, keyspace: Keyspace, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        let pending = self.pending.read().unwrap_or_else(|p| p.into_inner());
        match pending.get(&physical_key(keyspace, key)) {
            Some(v) => Ok(v.clone()),
            None => {
                drop(pending);
                self.base.get(keyspace, key)
            }
        }
    }

    fn scan(
        &self,
        keyspace: Keyspace,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<KvPairs, StorageError> {
        let pending =
            pending_in(&self.pending.read().unwrap_or_else(|p| p.into_inner()), keyspace, prefix, start_after);
        merged_scan(pending, |after, n| self.base.scan(keyspace, prefix, after, n), start_after, limit)
    }

    fn scan_page(
        &self,
        keyspace: Keyspace,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<ScanPage, StorageError> {
        let pending =
            pending_in(&self.pending.read().unwrap_or_else(|p| p.into_inner()), keyspace, prefix, start_after);
        merged_scan_page(pending, |after, n| self.base.scan(keyspace, prefix, after, n), start_after, limit, max_bytes)
    }

    fn applied_index(&self) -> Result<LogIndex, StorageError> {
        self.base.applied_index()
    }

    fn persist(&self) -> Result<(), StorageError> {
        self.base.persist()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::WriteSet;
    use crate::storage::{ApplyStore, MemStore};
    use proptest::prelude::*;

    fn put(key: &[u8], value: &[u8]) -> Op {
        Op::Put { keyspace: Keyspace::State, key: key.to_vec(), value: value.to_vec() }
    }

    fn del(key: &[u8]) -> Op {
        Op::Delete { keyspace: Keyspace::State, key: key.to_vec() }
    }

    /// Reading through the overlay equals reading a store the pending ops
    /// were applied to: get, scan and byte-bounded pages, whatever the mix of
    /// committed, overwritten, deleted and new keys and the bounds.
    #[test]
    fn reads_equal_a_store_with_the_pending_ops_applied() {
        let key = || prop::collection::vec(0u8..4, 1..4);
        let op = (key(), prop::option::of(prop::collection::vec(any::<u8>(), 0..6))).prop_map(|(k, v)| match v {
            Some(v) => put(&k, &v),
            None => del(&k),
        });
        let cases = (
            prop::collection::vec((key(), prop::collection::vec(any::<u8>(), 0..6)), 0..12),
            prop::collection::vec(op, 0..12),
            prop::collection::vec(0u8..4, 0..2),
            prop::option::of(key()),
            0usize..8,
            1usize..16,
        );
        proptest!(|((committed, ops, prefix, after, limit, max_bytes) in cases)| {
            let base = Arc::new(MemStore::new());
            let seed = WriteSet { ops: committed.iter().map(|(k, v)| put(k, v)).collect() };
            base.apply(&[(1, &seed)]).unwrap();
            let expected = MemStore::new();
            expected.apply(&[(1, &seed), (2, &WriteSet { ops: ops.clone() })]).unwrap();
            let overlay = Overlay::new(base);
            overlay.push(&ops, 1);
            let ks = Keyspace::State;
            let keys = committed.iter().map(|(k, _)| k.clone()).chain(ops.iter().map(|o| match o {
                Op::Put { key, .. } | Op::Delete { key, .. } | Op::Expect { key, .. } => key.clone(),
            }));
            for k in keys.collect::<Vec<_>>() {
                prop_assert_eq!(overlay.get(ks, &k).unwrap(), expected.get(ks, &k).unwrap());
            }
            let after = after.as_deref();
            prop_assert_eq!(
                overlay.scan(ks, &prefix, after, limit).unwrap(),
                expected.scan(ks, &prefix, after, limit).unwrap()
            );
            prop_assert_eq!(
                overlay.scan_page(ks, &prefix, after, limit, max_bytes).unwrap(),
                expected.scan_page(ks, &prefix, after, limit, max_bytes).unwrap()
            );
        });
    }

    #[test]
    fn a_deleted_key_is_gone_and_other_keyspaces_are_untouched() {
        let base = Arc::new(MemStore::new());
        base.apply(&[(1, &WriteSet { ops: vec![put(b"a", b"1"), put(b"b", b"2")] })]).unwrap();
        let overlay = Overlay::new(base);
        assert!(overlay.is_empty());
        overlay.push(&[del(b"a"), Op::Put { keyspace: Keyspace::Inbox, key: b"a".to_vec(), value: b"9".to_vec() }], 1);
        assert_eq!(overlay.get(Keyspace::State, b"a").unwrap(), None);
        assert_eq!(overlay.get(Keyspace::Inbox, b"a").unwrap(), Some(b"9".to_vec()));
        assert_eq!(overlay.scan(Keyspace::State, b"", None, 10).unwrap(), vec![(b"b".to_vec(), b"2".to_vec())]);
    }

    /// Retiring a write set forgets exactly the keys no later write set
    /// overwrote: those read the store again, the others stay pending.
    #[test]
    fn retiring_a_write_set_forgets_only_what_no_later_one_overwrote() {
        let base = Arc::new(MemStore::new());
        let overlay = Overlay::new(base.clone());
        overlay.push(&[put(b"a", b"1"), put(b"b", b"1")], 1);
        overlay.push(&[put(b"b", b"2"), put(b"c", b"2")], 2);
        // The store applies write set 1, then something else changes `a`.
        base.apply(&[(1, &WriteSet { ops: vec![put(b"a", b"1"), put(b"b", b"1")] })]).unwrap();
        base.apply(&[(2, &WriteSet { ops: vec![del(b"a")] })]).unwrap();
        overlay.retire(1);
        assert_eq!(overlay.get(Keyspace::State, b"a").unwrap(), None, "retired: read from the store");
        assert_eq!(overlay.get(Keyspace::State, b"b").unwrap(), Some(b"2".to_vec()), "write set 2's value");
        assert_eq!(overlay.get(Keyspace::State, b"c").unwrap(), Some(b"2".to_vec()));
        overlay.retire(2);
        assert!(overlay.is_empty());
    }
}
