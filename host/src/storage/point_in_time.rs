//! `PointInTime`: a `SledStore`'s keyspace data exactly as it was at one
//! applied index, read while applies go on (a snapshot is built from one).
//!
//! sled's iterators are not point-in-time: they see writes made after they
//! were created. So while a view is open, every apply first saves the value
//! each written key had at the view's point (first write wins), unless the
//! view's scan has already passed that key. The scan uses a saved value in
//! place of what it reads, and at its end emits the saved values of keys that
//! were deleted before it reached them. Why that is exact: a key's value is
//! saved before it is overwritten, under the same lock the scan takes to look
//! the key up after reading it, so a scan that finds nothing saved read the
//! key before any write to it.
//!
//! The saved values live in a side tree of the same database, so a long scan
//! under heavy writes costs disk and sled's bounded cache, not memory that
//! grows with the writes; the side tree is dropped with the view (and, after a
//! crash, when the store is next opened).
//!
//! Only `apply` is recorded. A bulk replacement (installing a snapshot)
//! supersedes every open view instead: its scan then fails with
//! [`StorageError::Superseded`] rather than mix two states.

use super::StorageError;
use crate::model::LogIndex;
use std::sync::{Arc, Mutex, MutexGuard};

/// A side tree's name is its store's tree name, this infix and a number.
pub(super) const SIDE_TREE_INFIX: &str = ".point-in-time.";

/// Preimage of a key that did not exist at the view's point.
const ABSENT: u8 = 0;
/// Preimage tag of a key that had a value (the value follows).
const PRESENT: u8 = 1;

/// The views open on one store.
pub(super) type Views = Arc<Mutex<Vec<Arc<Preimages>>>>;

/// What a view's scan has reached, shared with the applies that save values.
#[derive(Debug, Default)]
struct ScanState {
    /// The last key the scan looked up (empty: none yet). A write to a key at
    /// or below it needs nothing saved: the scan already emitted its value.
    passed: Vec<u8>,
    /// The scan is over: nothing more needs saving.
    finished: bool,
    /// A bulk replacement changed the store under the view.
    superseded: bool,
    /// Saved values the scan has not consumed; while 0 it need not look.
    pending: u64,
}

/// The saved values of one view.
#[derive(Debug)]
pub(super) struct Preimages {
    db: sled::Db,
    name: String,
    side: sled::Tree,
    state: Mutex<ScanState>,
}

impl Preimages {
    fn lock(&self) -> Result<MutexGuard<'_, ScanState>, StorageError> {
        self.state.lock().map_err(|_| StorageError::Poisoned)
    }

    /// Saves the current value in `tree` of each of `keys` the scan has not
    /// passed and that has none saved yet. Called under the store's apply
    /// lock, before the write that changes them.
    pub(super) fn record(&self, tree: &sled::Tree, keys: &[Vec<u8>]) -> Result<(), StorageError> {
        let mut st = self.lock()?;
        if st.finished || st.superseded {
            return Ok(());
        }
        for key in keys {
            if key.as_slice() <= st.passed.as_slice() || self.side.contains_key(key)? {
                continue;
            }
            let saved = match tree.get(key)? {
                Some(v) => [&[PRESENT][..], &v].concat(),
                None => vec![ABSENT],
            };
            self.side.insert(key.as_slice(), saved)?;
            st.pending += 1;
        }
        Ok(())
    }

    /// Marks the view stale: its store is being replaced wholesale.
    pub(super) fn supersede(&self) -> Result<(), StorageError> {
        self.lock()?.superseded = true;
        Ok(())
    }
}

fn decode(saved: &[u8]) -> Result<Option<&[u8]>, StorageError> {
    match saved.split_first() {
        Some((&PRESENT, value)) => Ok(Some(value)),
        Some((&ABSENT, [])) => Ok(None),
        _ => Err(StorageError::Corrupt(format!("a saved point-in-time value has tag {:?}", saved.first()))),
    }
}

/// A store's keyspace data as of `applied_index`. Dropping it stops the
/// saving and frees the side tree.
#[derive(Debug)]
pub struct PointInTime {
    tree: sled::Tree,
    preimages: Arc<Preimages>,
    views: Views,
    /// The store's applied index at the view's point.
    pub applied_index: LogIndex,
    /// The values the requested host meta keys had at the view's point, in
    /// request order.
    pub meta: Vec<Option<Vec<u8>>>,
}

impl PointInTime {
    /// Opens a view of `tree` and registers it in `views`. The caller holds
    /// the store's apply lock, which fixes the point.
    pub(super) fn open(
        db: &sled::Db,
        tree: &sled::Tree,
        views: &Views,
        applied_index: LogIndex,
        meta: Vec<Option<Vec<u8>>>,
    ) -> Result<Self, StorageError> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{}{SIDE_TREE_INFIX}{n}", String::from_utf8_lossy(&tree.name()));
        let side = db.open_tree(&name)?;
        let preimages = Arc::new(Preimages { db: db.clone(), name, side, state: Mutex::new(ScanState::default()) });
        views.lock().map_err(|_| StorageError::Poisoned)?.push(preimages.clone());
        Ok(Self { tree: tree.clone(), preimages, views: views.clone(), applied_index, meta })
    }

    /// Calls `f` once with every keyspace pair (physical key, value) the
    /// store held at the view's point, and returns how many there were.
    /// Keys come in ascending order, except those deleted after the point,
    /// which come last. Applies go on meanwhile; the view holds no lock
    /// between two keys.
    pub fn scan(&self, mut f: impl FnMut(&[u8], &[u8]) -> Result<(), StorageError>) -> Result<u64, StorageError> {
        let mut count = 0;
        // Physical keys from byte 1 on are keyspace data; byte 0 is meta.
        for item in self.tree.range::<&[u8], _>(&[1u8][..]..) {
            let (key, value) = item?;
            let saved = {
                let mut st = self.preimages.lock()?;
                if st.superseded {
                    return Err(StorageError::Superseded);
                }
                let saved = if st.pending > 0 { self.preimages.side.remove(&key)? } else { None };
                if saved.is_some() {
                    st.pending -= 1;
                }
                st.passed.clear();
                st.passed.extend_from_slice(&key);
                saved
            };
            let value = match &saved {
                Some(saved) => decode(saved)?,
                None => Some(&value[..]),
            };
            if let Some(value) = value {
                f(&key, value)?;
                count += 1;
            }
        }
        // From here on no write needs saving; what is saved now are the
        // keys the scan never met: deleted after the point before it got
        // there (emitted), or created after the point (skipped).
        self.preimages.lock()?.finished = true;
        for item in self.preimages.side.iter() {
            let (key, saved) = item?;
            if let Some(value) = decode(&saved)? {
                f(&key, value)?;
                count += 1;
            }
        }
        if self.preimages.lock()?.superseded {
            return Err(StorageError::Superseded);
        }
        Ok(count)
    }
}

impl Drop for PointInTime {
    fn drop(&mut self) {
        // Unregistered under the views lock, which an apply holds while it
        // saves: no apply writes to the side tree once it is dropped.
        if let Ok(mut views) = self.views.lock() {
            views.retain(|v| !Arc::ptr_eq(v, &self.preimages));
        }
        if let Err(e) = self.preimages.db.drop_tree(&self.preimages.name) {
            tracing::warn!(tree = %self.preimages.name, error = %e, "dropping a point-in-time side tree failed");
        }
    }
}

/// Drops the side trees of `tree_name` that a crash left behind.
pub(super) fn drop_stale_side_trees(db: &sled::Db, tree_name: &str) -> Result<(), StorageError> {
    let prefix = format!("{tree_name}{SIDE_TREE_INFIX}");
    for name in db.tree_names() {
        if name.starts_with(prefix.as_bytes()) {
            db.drop_tree(&name)?;
        }
    }
    Ok(())
}
