//! Conformance suite for `StateStore`: every implementation must pass the same
//! tests. Each check is a function generic over a factory; the macro at the
//! bottom instantiates it for `MemStore` and for `SledStore` three ways: with
//! the default apply buffer, writing every apply through to sled, and
//! buffering everything (nothing reaches sled unless something asks: reads
//! see only the buffer over what `persist` wrote). Sled-only properties
//! (reopen, locking) are in `sled_only`.

use super::{ApplyBuffer, ApplyStore, MemStore, SledStore, StateStore, StorageError};
use crate::model::{Keyspace, LogIndex, Op, WriteSet};

/// A store under test plus whatever must outlive it (a temp dir).
pub(crate) struct Fixture {
    pub store: Box<dyn ApplyStore>,
    pub _guard: Option<tempfile::TempDir>,
}

pub(crate) fn mem_fixture() -> Fixture {
    Fixture { store: Box::new(MemStore::new()), _guard: None }
}

pub(crate) fn sled_fixture() -> Fixture {
    sled_fixture_with(ApplyBuffer::default())
}

fn sled_fixture_with(limits: ApplyBuffer) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap().with_apply_buffer(limits);
    Fixture { store: Box::new(store), _guard: Some(dir) }
}

/// An apply buffer no apply fills: only `persist` (or a view, or drop)
/// writes to sled.
pub(crate) const UNBOUNDED: ApplyBuffer =
    ApplyBuffer { max_keys: usize::MAX, max_bytes: usize::MAX, max_age_ms: u64::MAX };

fn sled_write_through_fixture() -> Fixture {
    sled_fixture_with(ApplyBuffer::WRITE_THROUGH)
}

fn sled_buffered_fixture() -> Fixture {
    sled_fixture_with(UNBOUNDED)
}

pub(crate) fn put(ks: Keyspace, k: &[u8], v: &[u8]) -> Op {
    Op::Put { keyspace: ks, key: k.to_vec(), value: v.to_vec() }
}

pub(crate) fn del(ks: Keyspace, k: &[u8]) -> Op {
    Op::Delete { keyspace: ks, key: k.to_vec() }
}

pub(crate) fn ws(ops: Vec<Op>) -> WriteSet {
    WriteSet { ops }
}

fn apply1(s: &dyn ApplyStore, index: LogIndex, w: &WriteSet) {
    s.apply(&[(index, w)]).unwrap();
}

fn get(s: &dyn ApplyStore, ks: Keyspace, k: &[u8]) -> Option<Vec<u8>> {
    s.get(ks, k).unwrap()
}

pub(crate) fn get_put_delete(f: impl Fn() -> Fixture) {
    let fx = f();
    let s = fx.store.as_ref();
    assert_eq!(get(s, Keyspace::State, b"a"), None);
    apply1(s, 1, &ws(vec![put(Keyspace::State, b"a", b"1")]));
    assert_eq!(get(s, Keyspace::State, b"a"), Some(b"1".to_vec()));
    apply1(s, 2, &ws(vec![put(Keyspace::State, b"a", b"2")]));
    assert_eq!(get(s, Keyspace::State, b"a"), Some(b"2".to_vec()));
    apply1(s, 3, &ws(vec![del(Keyspace::State, b"a")]));
    assert_eq!(get(s, Keyspace::State, b"a"), None);
    // Deleting a missing key is fine; empty keys and values are valid.
    apply1(s, 4, &ws(vec![del(Keyspace::State, b"nope"), put(Keyspace::State, b"", b"")]));
    assert_eq!(get(s, Keyspace::State, b""), Some(vec![]));
    assert_eq!(s.applied_index().unwrap(), 4);
}

pub(crate) fn later_ops_win(f: impl Fn() -> Fixture) {
    let fx = f();
    let s = fx.store.as_ref();
    // Within one write set.
    apply1(
        s,
        1,
        &ws(vec![
            put(Keyspace::State, b"k", b"1"),
            put(Keyspace::State, b"k", b"2"),
            put(Keyspace::State, b"d", b"x"),
            del(Keyspace::State, b"d"),
            del(Keyspace::State, b"p"),
            put(Keyspace::State, b"p", b"back"),
        ]),
    );
    assert_eq!(get(s, Keyspace::State, b"k"), Some(b"2".to_vec()));
    assert_eq!(get(s, Keyspace::State, b"d"), None);
    assert_eq!(get(s, Keyspace::State, b"p"), Some(b"back".to_vec()));
    // Across entries of one apply call.
    let a = ws(vec![put(Keyspace::State, b"x", b"a"), put(Keyspace::State, b"y", b"a")]);
    let b = ws(vec![put(Keyspace::State, b"x", b"b"), del(Keyspace::State, b"y")]);
    let c = ws(vec![put(Keyspace::State, b"y", b"c")]);
    s.apply(&[(2, &a), (3, &b), (4, &c)]).unwrap();
    assert_eq!(get(s, Keyspace::State, b"x"), Some(b"b".to_vec()));
    assert_eq!(get(s, Keyspace::State, b"y"), Some(b"c".to_vec()));
    assert_eq!(s.applied_index().unwrap(), 4);
}

pub(crate) fn scan_semantics(f: impl Fn() -> Fixture) {
    let fx = f();
    let s = fx.store.as_ref();
    let keys: &[&[u8]] = &[b"a", b"a\0", b"a\0x", b"a\0y", b"a\x01", b"ab", b"a\xff", b"b", b"\xff\xff"];
    // Insert in scrambled order; the registry gets the same keys with other values.
    let mut ops = Vec::new();
    for k in keys.iter().rev() {
        ops.push(put(Keyspace::State, k, b"s"));
        ops.push(put(Keyspace::Registry, k, b"r"));
    }
    apply1(s, 1, &ws(ops));
    let scan = |prefix: &[u8], after: Option<&[u8]>, limit| -> Vec<Vec<u8>> {
        s.scan(Keyspace::State, prefix, after, limit)
            .unwrap()
            .into_iter()
            .map(|(k, v)| {
                assert_eq!(v, b"s", "keyspace isolation");
                k
            })
            .collect()
    };
    let all: Vec<Vec<u8>> = keys.iter().map(|k| k.to_vec()).collect();
    assert_eq!(scan(b"", None, 100), all, "ascending byte order");
    assert_eq!(scan(b"", None, 3), all[..3].to_vec(), "limit");
    assert_eq!(scan(b"", None, 0), Vec::<Vec<u8>>::new());
    assert_eq!(scan(b"a", None, 100), all[..7].to_vec(), "prefix");
    assert_eq!(scan(b"a\0", None, 100), all[1..4].to_vec());
    assert_eq!(scan(b"a\0", Some(b"a\0"), 100), all[2..4].to_vec(), "start_after is exclusive");
    assert_eq!(scan(b"a\0", Some(b"a\0x"), 100), all[3..4].to_vec());
    assert_eq!(scan(b"a\0", Some(b"a\0y"), 100), Vec::<Vec<u8>>::new());
    assert_eq!(scan(b"a", Some(b"a\0x"), 2), all[3..5].to_vec(), "start_after + limit");
    // start_after below the prefix excludes nothing; above it, everything.
    assert_eq!(scan(b"b", Some(b"a"), 100), vec![b"b".to_vec()]);
    assert_eq!(scan(b"a", Some(b"zz"), 100), Vec::<Vec<u8>>::new());
    assert_eq!(scan(b"\xff", None, 100), vec![b"\xff\xff".to_vec()], "high bytes");
    assert_eq!(scan(b"c", None, 100), Vec::<Vec<u8>>::new());
    // Paging through with start_after visits every key exactly once.
    let mut paged = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = scan(b"", after.as_deref(), 2);
        if page.is_empty() {
            break;
        }
        after = page.last().cloned();
        paged.extend(page);
    }
    assert_eq!(paged, all);
    // The other keyspace is scanned independently; deletes disappear from scans.
    apply1(s, 2, &ws(vec![del(Keyspace::Registry, b"a\0x")]));
    let reg: Vec<_> = s.scan(Keyspace::Registry, b"a\0", None, 100).unwrap();
    assert_eq!(reg, vec![(b"a\0".to_vec(), b"r".to_vec()), (b"a\0y".to_vec(), b"r".to_vec())]);
    assert_eq!(scan(b"a\0", None, 100), all[1..4].to_vec());
}

/// A store that implements only what `StateStore` requires, so its pages
/// come from the trait's default `scan_page`.
struct DefaultPages(std::sync::Arc<dyn ApplyStore>);

impl ApplyStore for DefaultPages {
    fn apply(&self, entries: &[(LogIndex, &WriteSet)]) -> Result<(), StorageError> {
        self.0.apply(entries)
    }
}

impl StateStore for DefaultPages {
    fn get(&self, keyspace: Keyspace, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.0.get(keyspace, key)
    }
    fn scan(
        &self,
        keyspace: Keyspace,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<super::KvPairs, StorageError> {
        self.0.scan(keyspace, prefix, start_after, limit)
    }
    fn applied_index(&self) -> Result<LogIndex, StorageError> {
        self.0.applied_index()
    }
    fn persist(&self) -> Result<(), StorageError> {
        self.0.persist()
    }
}

pub(crate) fn scan_pages_are_bounded_by_bytes(f: impl Fn() -> Fixture) {
    let fx = f();
    let store: std::sync::Arc<dyn ApplyStore> = std::sync::Arc::from(fx.store);
    // k0..k9 with values of 10, 20, … 100 bytes (keys 2 bytes), and a neighbour prefix.
    let mut ops: Vec<Op> = (0..10u8)
        .map(|i| put(Keyspace::State, format!("k{i}").as_bytes(), &vec![b'v'; 10 * (i as usize + 1)]))
        .collect();
    ops.push(put(Keyspace::State, b"l0", &[b'x'; 5]));
    apply1(store.as_ref(), 1, &ws(ops));
    let default_pages = DefaultPages(store.clone());
    for s in [store.as_ref(), &default_pages as &dyn ApplyStore] {
        let keys = |p: &super::ScanPage| -> Vec<String> {
            p.entries.iter().map(|(k, _)| String::from_utf8(k.clone()).unwrap()).collect()
        };
        let page =
            |after: Option<&[u8]>, limit, bytes| s.scan_page(Keyspace::State, b"k", after, limit, bytes).unwrap();
        // 12 + 22 + 32 = 66 fits 70; the next (42) would not.
        let p = page(None, 100, 70);
        assert_eq!((keys(&p), p.more), (vec!["k0".into(), "k1".into(), "k2".into()], true));
        // Exactly at the budget still fits.
        assert_eq!(keys(&page(None, 100, 66)).len(), 3);
        // The first entry always fits, whatever its size.
        let p = page(Some(b"k8"), 100, 1);
        assert_eq!((keys(&p), p.more), (vec!["k9".into()], false));
        let p = page(Some(b"k7"), 100, 1);
        assert_eq!((keys(&p), p.more), (vec!["k8".into()], true));
        // The count bound still applies; an exhausted prefix has no more.
        let p = page(None, 2, 1 << 20);
        assert_eq!((keys(&p), p.more), (vec!["k0".into(), "k1".into()], true));
        let p = page(None, 10, 1 << 20);
        assert_eq!((p.entries.len(), p.more), (10, false));
        assert!(!page(Some(b"k9"), 10, 100).more);
        // Paging by bytes visits every entry once, in order, values intact.
        let mut seen = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let p = page(after.as_deref(), 100, 150);
            let bytes: usize = p.entries.iter().map(|(k, v)| k.len() + v.len()).sum();
            assert!(bytes <= 150 || p.entries.len() == 1, "{bytes}");
            after = p.entries.last().map(|(k, _)| k.clone());
            seen.extend(p.entries);
            if !p.more {
                break;
            }
        }
        assert_eq!(seen, s.scan(Keyspace::State, b"k", None, 100).unwrap());
    }
}

pub(crate) fn applied_index_and_replay(f: impl Fn() -> Fixture) {
    let fx = f();
    let s = fx.store.as_ref();
    assert_eq!(s.applied_index().unwrap(), 0);
    s.apply(&[]).unwrap();
    assert_eq!(s.applied_index().unwrap(), 0);
    let w1 = ws(vec![put(Keyspace::State, b"k", b"1")]);
    let w2 = ws(vec![put(Keyspace::State, b"k", b"2")]);
    let w3 = ws(vec![put(Keyspace::State, b"k", b"3"), put(Keyspace::State, b"j", b"3")]);
    s.apply(&[(1, &w1), (2, &w2)]).unwrap();
    assert_eq!(s.applied_index().unwrap(), 2);
    // Replaying old entries changes nothing, even if they would overwrite.
    s.apply(&[(1, &w1)]).unwrap();
    assert_eq!(get(s, Keyspace::State, b"k"), Some(b"2".to_vec()));
    assert_eq!(s.applied_index().unwrap(), 2);
    // A chunk that straddles the applied index applies only the new part.
    s.apply(&[(1, &w1), (2, &w2), (3, &w3)]).unwrap();
    assert_eq!(get(s, Keyspace::State, b"k"), Some(b"3".to_vec()));
    assert_eq!(s.applied_index().unwrap(), 3);
    // Gaps are allowed (the log decides the indexes); out of order is refused
    // and changes nothing.
    let w4 = ws(vec![put(Keyspace::State, b"k", b"10")]);
    let err = s.apply(&[(11, &w4), (10, &w4)]).unwrap_err();
    assert!(matches!(err, StorageError::OutOfOrder { prev: 11, next: 10 }), "{err}");
    assert_eq!(get(s, Keyspace::State, b"k"), Some(b"3".to_vec()));
    s.apply(&[(10, &w4)]).unwrap();
    assert_eq!(s.applied_index().unwrap(), 10);
}

pub(crate) fn apply_is_atomic(f: impl Fn() -> Fixture) {
    let fx = f();
    let s: std::sync::Arc<dyn ApplyStore> = std::sync::Arc::from(fx.store);
    const N: usize = 2000;
    // One write set with many ops plus a second entry: a concurrent reader must
    // see either nothing or everything (marker key last, first key checked).
    let big = ws((0..N).map(|i| put(Keyspace::State, format!("k{i:05}").as_bytes(), b"v")).collect());
    let marker = ws(vec![put(Keyspace::Registry, b"done", b"1")]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let s = s.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut checks = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Applied index first: once it says 2, the scan must see everything.
                let applied = s.applied_index().unwrap();
                let n = s.scan(Keyspace::State, b"k", None, N + 1).unwrap().len();
                assert!(n == 0 || n == N, "saw a partial batch of {n} ops");
                if applied == 2 {
                    assert_eq!(n, N);
                }
                checks += 1;
            }
            checks
        })
    };
    assert_eq!(s.scan(Keyspace::State, b"", None, 10).unwrap().len(), 0, "nothing visible before apply");
    s.apply(&[(1, &big), (2, &marker)]).unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _checks = reader.join().unwrap();
    assert_eq!(s.scan(Keyspace::State, b"k", None, N + 1).unwrap().len(), N);
    assert_eq!(s.get(Keyspace::Registry, b"done").unwrap(), Some(b"1".to_vec()));
    assert_eq!(s.applied_index().unwrap(), 2);
    s.persist().unwrap();
}

pub(crate) fn entity_ids_skip_entities(f: impl Fn() -> Fixture) {
    use crate::model::{EntityRef, state_key};
    let fx = f();
    let s = fx.store.as_ref();
    let mut ops = Vec::new();
    for id in ["a", "a1", "b", "ünï"] {
        let e = EntityRef::new("t", id).unwrap();
        for k in ["$self", "x", "zz"] {
            ops.push(put(Keyspace::State, &state_key(&e, k), b"v"));
        }
    }
    // Neighbouring types must not leak in.
    ops.push(put(Keyspace::State, &state_key(&EntityRef::new("s", "q").unwrap(), "k"), b"v"));
    ops.push(put(Keyspace::State, &state_key(&EntityRef::new("tt", "q").unwrap(), "k"), b"v"));
    apply1(s, 1, &ws(ops));
    assert_eq!(super::entity_ids(s, "t", "", None, 100).unwrap(), ["a", "a1", "b", "ünï"]);
    assert_eq!(super::entity_ids(s, "t", "", None, 2).unwrap(), ["a", "a1"]);
    assert_eq!(super::entity_ids(s, "t", "", Some("a1"), 100).unwrap(), ["b", "ünï"]);
    assert_eq!(super::entity_ids(s, "t", "", Some("c"), 100).unwrap(), ["ünï"]);
    assert!(super::entity_ids(s, "nope", "", None, 10).unwrap().is_empty());
    // A prefix selects ids, not keys: "a" matches "a" and "a1", never "b".
    assert_eq!(super::entity_ids(s, "t", "a", None, 100).unwrap(), ["a", "a1"]);
    assert_eq!(super::entity_ids(s, "t", "a", Some("a"), 100).unwrap(), ["a1"]);
    assert_eq!(super::entity_ids(s, "t", "a1", None, 100).unwrap(), ["a1"]);
    assert!(super::entity_ids(s, "t", "ab", None, 100).unwrap().is_empty());
    // A cursor before the prefix excludes nothing in it.
    assert_eq!(super::entity_ids(s, "t", "b", Some("a"), 100).unwrap(), ["b"]);
}

/// Reads merge what is in the store's lower layer (written by `persist`)
/// with later applies that overwrite, delete and add keys on both sides of
/// it: get, scans (with deletes hiding persisted rows) and byte-bounded pages.
pub(crate) fn reads_merge_persisted_and_later_applies(f: impl Fn() -> Fixture) {
    let fx = f();
    let s = fx.store.as_ref();
    let ks = Keyspace::State;
    let persisted: Vec<Op> = (0..20u8).map(|i| put(ks, format!("k{i:02}").as_bytes(), b"old")).collect();
    apply1(s, 1, &ws(persisted));
    s.persist().unwrap();
    let mut later = vec![put(ks, b"k00", b"new"), del(ks, b"k01"), del(ks, b"k02"), put(ks, b"k05a", b"added")];
    later.extend((10..19u8).map(|i| del(ks, format!("k{i:02}").as_bytes())));
    later.extend([put(ks, b"k19", b"new"), put(ks, b"k20", b"added"), del(ks, b"never-there")]);
    apply1(s, 2, &ws(later));
    let mut expected: Vec<(Vec<u8>, Vec<u8>)> = vec![(b"k00".to_vec(), b"new".to_vec())];
    expected.extend((3..10u8).map(|i| (format!("k{i:02}").into_bytes(), b"old".to_vec())));
    expected.insert(4, (b"k05a".to_vec(), b"added".to_vec()));
    expected.extend([(b"k19".to_vec(), b"new".to_vec()), (b"k20".to_vec(), b"added".to_vec())]);
    assert_eq!(s.applied_index().unwrap(), 2);
    assert_eq!(get(s, ks, b"k00"), Some(b"new".to_vec()));
    assert_eq!(get(s, ks, b"k01"), None, "a delete hides the persisted value");
    assert_eq!(get(s, ks, b"k03"), Some(b"old".to_vec()));
    assert_eq!(s.scan(ks, b"k", None, 100).unwrap(), expected);
    assert_eq!(s.scan(ks, b"k", None, 3).unwrap(), expected[..3].to_vec(), "deletes do not eat the limit");
    assert_eq!(s.scan(ks, b"k", Some(b"k09"), 1).unwrap(), expected[9..10].to_vec(), "past nine deleted keys");
    assert_eq!(s.scan(ks, b"k1", None, 100).unwrap(), expected[9..10].to_vec());
    let mut paged = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = s.scan_page(ks, b"k", after.as_deref(), 2, 12).unwrap();
        assert!(page.entries.len() <= 2);
        after = page.entries.last().map(|(k, _)| k.clone());
        paged.extend(page.entries);
        if !page.more {
            break;
        }
    }
    assert_eq!(paged, expected);
    // And once written down again, the same.
    s.persist().unwrap();
    assert_eq!(s.scan(ks, b"k", None, 100).unwrap(), expected);
}

macro_rules! state_store_conformance {
    ($name:ident, $factory:expr) => {
        mod $name {
            use super::*;
            #[test]
            fn get_put_delete() {
                super::get_put_delete($factory)
            }
            #[test]
            fn later_ops_win() {
                super::later_ops_win($factory)
            }
            #[test]
            fn scan_semantics() {
                super::scan_semantics($factory)
            }
            #[test]
            fn scan_pages_are_bounded_by_bytes() {
                super::scan_pages_are_bounded_by_bytes($factory)
            }
            #[test]
            fn applied_index_and_replay() {
                super::applied_index_and_replay($factory)
            }
            #[test]
            fn apply_is_atomic() {
                super::apply_is_atomic($factory)
            }
            #[test]
            fn entity_ids_skip_entities() {
                super::entity_ids_skip_entities($factory)
            }
            #[test]
            fn reads_merge_persisted_and_later_applies() {
                super::reads_merge_persisted_and_later_applies($factory)
            }
        }
    };
}

state_store_conformance!(mem, mem_fixture);
state_store_conformance!(sled, sled_fixture);
state_store_conformance!(sled_write_through, sled_write_through_fixture);
state_store_conformance!(sled_buffered, sled_buffered_fixture);

mod sled_only {
    use super::*;

    #[test]
    fn reopen_keeps_data_and_applied_index() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open(dir.path()).unwrap();
            let ops = Keyspace::ALL.iter().map(|ks| put(*ks, &[b'k', ks.as_byte()], b"v")).collect();
            apply1(&s, 6, &ws(ops));
            apply1(&s, 7, &ws(vec![put(Keyspace::State, b"a", b"1"), put(Keyspace::Registry, b"r", b"2")]));
            s.persist().unwrap();
        }
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(s.applied_index().unwrap(), 7);
        assert_eq!(get(&s, Keyspace::State, b"a"), Some(b"1".to_vec()));
        assert_eq!(get(&s, Keyspace::Registry, b"r"), Some(b"2".to_vec()));
        // The meta key never shows up in scans of any keyspace.
        for ks in Keyspace::ALL {
            let extra = usize::from(matches!(ks, Keyspace::State | Keyspace::Registry));
            assert_eq!(s.scan(ks, b"", None, 10).unwrap().len(), 1 + extra, "{ks:?}");
        }
    }

    #[test]
    fn second_open_fails_with_locked() {
        let dir = tempfile::tempdir().unwrap();
        let first = SledStore::open(dir.path()).unwrap();
        let err = SledStore::open(dir.path()).unwrap_err();
        assert!(matches!(err, StorageError::Locked { .. }), "{err}");
        assert!(err.to_string().contains("already open"), "{err}");
        drop(first);
        SledStore::open(dir.path()).unwrap();
    }
}
