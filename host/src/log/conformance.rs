//! Conformance suite for `CommitLog`: each check is an async function generic
//! over a `LogFactory`, so a future openraft-backed log can run the same suite.
//! The macro at the bottom instantiates it for `LocalLog`.

use super::{CommitLog, LocalLog, LogConfig, LogError};
use crate::model::{Keyspace, LogIndex, Op, WriteSet};
use crate::storage::{MemStore, SledStore, StateStore};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// Opens a log of the implementation under test.
pub(crate) trait LogFactory: Send + Sync + 'static {
    type Log: CommitLog;
    fn open(&self, dir: &Path, store: Arc<dyn StateStore>, config: LogConfig) -> Result<Self::Log, LogError>;
}

pub(crate) struct LocalFactory;

impl LogFactory for LocalFactory {
    type Log = LocalLog;
    fn open(&self, dir: &Path, store: Arc<dyn StateStore>, config: LogConfig) -> Result<LocalLog, LogError> {
        LocalLog::open(dir, store, config)
    }
}

fn key(i: u64) -> Vec<u8> {
    format!("k{i:08}").into_bytes()
}

fn put_ws(i: u64) -> WriteSet {
    WriteSet { ops: vec![Op::Put { keyspace: Keyspace::State, key: key(i), value: i.to_be_bytes().to_vec() }] }
}

fn assert_has_keys(store: &dyn StateStore, range: std::ops::RangeInclusive<u64>) {
    let n = range.clone().count();
    let all = store.scan(Keyspace::State, b"k", None, n + 10).unwrap();
    assert_eq!(all.len(), n, "store holds exactly the proposed keys");
    for (i, (k, v)) in range.zip(all) {
        assert_eq!(k, key(i));
        assert_eq!(v, i.to_be_bytes().to_vec());
    }
}

/// Proposes `put_ws(first..=last)` from `tasks` concurrent tasks; returns the indexes.
async fn propose_concurrently<L: CommitLog>(log: &Arc<L>, first: u64, last: u64, tasks: u64) -> Vec<LogIndex> {
    let mut handles = Vec::new();
    for t in 0..tasks {
        let log = log.clone();
        handles.push(tokio::spawn(async move {
            let mut got = Vec::new();
            let mut i = first + t;
            while i <= last {
                got.push(log.propose(put_ws(i)).await.unwrap());
                i += tasks;
            }
            got
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    all.sort_unstable();
    all
}

pub(crate) async fn indexes_strictly_increase_and_are_contiguous<F: LogFactory>(f: F) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn StateStore> = Arc::new(MemStore::new());
    let log = f.open(dir.path(), store.clone(), LogConfig::default()).unwrap();
    assert_eq!((log.last_durable_index(), log.applied_index()), (0, 0));
    for i in 1..=200 {
        let index = log.propose(put_ws(i)).await.unwrap();
        assert_eq!(index, i, "first index is 1, then contiguous");
        // Resolved means durable and applied.
        assert!(log.last_durable_index() >= index);
        assert!(log.applied_index() >= index);
        assert_eq!(store.get(Keyspace::State, &key(i)).unwrap(), Some(i.to_be_bytes().to_vec()));
    }
    // An empty write set is still an entry.
    assert_eq!(log.propose(WriteSet::default()).await.unwrap(), 201);
    log.shutdown().await.unwrap();
}

pub(crate) async fn concurrent_proposals_all_resolve_and_batch<F: LogFactory>(f: F) {
    const N: u64 = 2000;
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn StateStore> = Arc::new(MemStore::new());
    let log = Arc::new(f.open(dir.path(), store.clone(), LogConfig::default()).unwrap());
    let indexes = propose_concurrently(&log, 1, N, 100).await;
    assert_eq!(indexes, (1..=N).collect::<Vec<_>>(), "every proposal got a distinct, contiguous index");
    assert_eq!(log.applied_index(), N);
    assert_eq!(store.applied_index().unwrap(), N);
    assert_has_keys(store.as_ref(), 1..=N);
    let stats = log.stats();
    assert_eq!(stats.proposals, N);
    assert!(stats.sync_batches < N, "group commit batches under concurrency: {stats:?}");
    assert!(stats.largest_batch > 1, "{stats:?}");
    assert!(stats.bytes_written > 0);
    log.shutdown().await.unwrap();
}

pub(crate) async fn batches_respect_max_batch_entries<F: LogFactory>(f: F) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn StateStore> = Arc::new(MemStore::new());
    let config = LogConfig { max_batch_entries: 4, queue_depth: 16, ..LogConfig::default() };
    let log = Arc::new(f.open(dir.path(), store.clone(), config).unwrap());
    // 64 tasks against a queue of 16: propose must wait for room, not fail.
    let indexes = propose_concurrently(&log, 1, 500, 64).await;
    assert_eq!(indexes.len(), 500);
    let stats = log.stats();
    assert!(stats.largest_batch <= 4, "{stats:?}");
    assert!(stats.sync_batches >= 125, "{stats:?}");
    assert_has_keys(store.as_ref(), 1..=500);
    log.shutdown().await.unwrap();
}

pub(crate) async fn reopen_with_fresh_memstore_replays_everything<F: LogFactory>(f: F) {
    const N: u64 = 300;
    let dir = tempfile::tempdir().unwrap();
    {
        let log = Arc::new(f.open(dir.path(), Arc::new(MemStore::new()), LogConfig::default()).unwrap());
        propose_concurrently(&log, 1, N, 16).await;
        // Plain drop, no shutdown: acknowledged entries are already in the WAL.
        drop(log);
    }
    let store: Arc<dyn StateStore> = Arc::new(MemStore::new());
    let log = f.open(dir.path(), store.clone(), LogConfig::default()).unwrap();
    assert_eq!(store.applied_index().unwrap(), N);
    assert_eq!((log.last_durable_index(), log.applied_index()), (N, N));
    assert_eq!(log.stats().replayed_entries, N);
    assert_has_keys(store.as_ref(), 1..=N);
    assert_eq!(log.propose(put_ws(N + 1)).await.unwrap(), N + 1, "numbering continues");
    log.shutdown().await.unwrap();

    // And once more after a clean shutdown.
    let store: Arc<dyn StateStore> = Arc::new(MemStore::new());
    let log = f.open(dir.path(), store.clone(), LogConfig::default()).unwrap();
    assert_has_keys(store.as_ref(), 1..=N + 1);
    log.shutdown().await.unwrap();
}

pub(crate) async fn lagging_sled_store_catches_up_without_double_apply<F: LogFactory>(f: F) {
    let log_dir = tempfile::tempdir().unwrap();
    let sled_dir = tempfile::tempdir().unwrap();
    // 1..=50 go through the log into sled.
    {
        let sled: Arc<dyn StateStore> = Arc::new(SledStore::open(sled_dir.path()).unwrap());
        let log = Arc::new(f.open(log_dir.path(), sled, LogConfig::default()).unwrap());
        propose_concurrently(&log, 1, 50, 8).await;
        log.shutdown().await.unwrap();
    }
    // 51..=120 reach the log while sled is not attached (its applied index lags).
    {
        let log = Arc::new(f.open(log_dir.path(), Arc::new(MemStore::new()), LogConfig::default()).unwrap());
        assert_eq!(log.stats().replayed_entries, 50);
        propose_concurrently(&log, 51, 120, 8).await;
        log.shutdown().await.unwrap();
    }
    let sled: Arc<dyn StateStore> = Arc::new(SledStore::open(sled_dir.path()).unwrap());
    assert_eq!(sled.applied_index().unwrap(), 50);
    let log = f.open(log_dir.path(), sled.clone(), LogConfig::default()).unwrap();
    assert_eq!(log.stats().replayed_entries, 70, "only the entries sled lacks are replayed");
    assert_eq!(sled.applied_index().unwrap(), 120);
    assert_has_keys(sled.as_ref(), 1..=120);
    assert_eq!(log.propose(put_ws(121)).await.unwrap(), 121);
    log.shutdown().await.unwrap();
}

pub(crate) async fn compaction_purges_and_state_survives_reopen<F: LogFactory>(f: F) {
    const N: u64 = 1000;
    let log_dir = tempfile::tempdir().unwrap();
    let sled_dir = tempfile::tempdir().unwrap();
    let config = LogConfig { compact_every_entries: 100, ..LogConfig::default() };
    let wal_files = |p: &Path| -> usize {
        std::fs::read_dir(p)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".wal"))
            .count()
    };
    {
        let sled: Arc<dyn StateStore> = Arc::new(SledStore::open(sled_dir.path()).unwrap());
        let log = Arc::new(f.open(log_dir.path(), sled, config.clone()).unwrap());
        // In rounds, so compactions happen along the way.
        for round in 0..10 {
            propose_concurrently(&log, round * 100 + 1, round * 100 + 100, 10).await;
        }
        let stats = log.stats();
        assert!(stats.compactions >= 5, "{stats:?}");
        assert!(stats.purged_index >= 500, "{stats:?}");
        // About one chunk file per 100 entries is written; purged ones are removed.
        let files = wal_files(log_dir.path());
        assert!(files <= 6, "purged chunks were removed: {files} chunk files left, {stats:?}");
        log.shutdown().await.unwrap();
    }
    // A fresh memory store cannot be rebuilt from a purged log: refused, not silently partial.
    let err = f.open(log_dir.path(), Arc::new(MemStore::new()), config.clone()).map(|_| ()).unwrap_err();
    assert!(matches!(err, LogError::StoreBehindLog { applied: 0, .. }), "{err}");
    let sled: Arc<dyn StateStore> = Arc::new(SledStore::open(sled_dir.path()).unwrap());
    let log = f.open(log_dir.path(), sled.clone(), config).unwrap();
    assert_has_keys(sled.as_ref(), 1..=N);
    assert_eq!(log.propose(put_ws(N + 1)).await.unwrap(), N + 1);
    log.shutdown().await.unwrap();
}

pub(crate) async fn propose_after_shutdown_fails_cleanly<F: LogFactory>(f: F) {
    let dir = tempfile::tempdir().unwrap();
    let log = f.open(dir.path(), Arc::new(MemStore::new()), LogConfig::default()).unwrap();
    assert_eq!(log.propose(put_ws(1)).await.unwrap(), 1);
    // A future created before shutdown but polled after it fails the same way.
    let early = log.propose(put_ws(2));
    log.shutdown().await.unwrap();
    assert!(matches!(log.propose(put_ws(3)).await, Err(LogError::ShutDown)));
    assert!(matches!(early.await, Err(LogError::ShutDown)));
    log.shutdown().await.unwrap();
    // The directory is released: it can be opened again right away.
    let log = f.open(dir.path(), Arc::new(MemStore::new()), LogConfig::default()).unwrap();
    assert_eq!(log.applied_index(), 1);
    log.shutdown().await.unwrap();
}

pub(crate) async fn second_open_of_same_dir_fails<F: LogFactory>(f: F) {
    let dir = tempfile::tempdir().unwrap();
    let log = f.open(dir.path(), Arc::new(MemStore::new()), LogConfig::default()).unwrap();
    assert!(f.open(dir.path(), Arc::new(MemStore::new()), LogConfig::default()).is_err());
    log.shutdown().await.unwrap();
}

pub(crate) async fn write_set_is_applied_atomically<F: LogFactory>(f: F) {
    const OPS: u64 = 500;
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn StateStore> = Arc::new(MemStore::new());
    let log = f.open(dir.path(), store.clone(), LogConfig::default()).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (store, stop) = (store.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let n = store.scan(Keyspace::State, b"k", None, OPS as usize + 1).unwrap().len() as u64;
                assert!(n == 0 || n == OPS, "partial write set visible: {n}");
            }
        })
    };
    let ws = WriteSet { ops: (1..=OPS).flat_map(|i| put_ws(i).ops).collect() };
    log.propose(ws).await.unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    reader.join().unwrap();
    assert_has_keys(store.as_ref(), 1..=OPS);
    log.shutdown().await.unwrap();
}

/// Informative throughput numbers (run with --nocapture); asserts only correctness.
pub(crate) async fn timing_10k_proposals_at_concurrency_64<F: LogFactory>(f: F) {
    const N: u64 = 10_000;
    let sled_dir = tempfile::tempdir().unwrap();
    for (name, store) in [
        ("memstore", Arc::new(MemStore::new()) as Arc<dyn StateStore>),
        ("sledstore", Arc::new(SledStore::open(sled_dir.path()).unwrap())),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(f.open(dir.path(), store.clone(), LogConfig::default()).unwrap());
        let start = Instant::now();
        let indexes = propose_concurrently(&log, 1, N, 64).await;
        let elapsed = start.elapsed();
        assert_eq!(indexes.len() as u64, N);
        let stats = log.stats();
        println!(
            "{name}: {N} proposals at concurrency 64 in {elapsed:?} = {:.0}/s; {} sync batches, largest {}, {} bytes",
            N as f64 / elapsed.as_secs_f64(),
            stats.sync_batches,
            stats.largest_batch,
            stats.bytes_written
        );
        let start = Instant::now();
        for i in N + 1..=N + 200 {
            log.propose(put_ws(i)).await.unwrap();
        }
        println!("{name}: sequential latency {:?}/proposal", start.elapsed() / 200);
        log.shutdown().await.unwrap();
    }
}

macro_rules! commit_log_conformance {
    ($name:ident, $factory:expr, [$($test:ident),* $(,)?]) => {
        mod $name {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test($factory).await
                }
            )*
        }
    };
}

commit_log_conformance!(
    local,
    LocalFactory,
    [
        indexes_strictly_increase_and_are_contiguous,
        concurrent_proposals_all_resolve_and_batch,
        batches_respect_max_batch_entries,
        reopen_with_fresh_memstore_replays_everything,
        lagging_sled_store_catches_up_without_double_apply,
        compaction_purges_and_state_survives_reopen,
        propose_after_shutdown_fails_cleanly,
        second_open_of_same_dir_fails,
        write_set_is_applied_atomically,
        timing_10k_proposals_at_concurrency_64,
    ]
);
