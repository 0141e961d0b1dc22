//! Conformance suite for `CommitLog`: each check is an async function generic
//! over a `LogFactory`, so every provider runs the same suite; a provider's
//! module instantiates it with `commit_log_conformance!` (the log production
//! commits through, a shard's `ShardLog` on disk, does so in
//! `cluster::raft::conformance`).
//!
//! What a replicated log promises, and so what is checked: a proposal
//! resolves once its entry is durable and applied to the log's store; one
//! caller's proposals get increasing indexes (not contiguous: leader and
//! membership changes add entries, and a batch shares one index); a write
//! set applies whole; the log reopens with everything acknowledged; a log
//! shut down refuses proposals cleanly and releases its directory.

use super::{CommitLog, LogConfig, LogError};
use crate::model::{Keyspace, LogIndex, Op, WriteSet};
use crate::storage::StateStore;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// Opens a log of the implementation under test.
pub(crate) trait LogFactory: Send + Sync + 'static {
    type Log: CommitLog;
    /// Opens the log kept in `dir`, with the store it applies to.
    async fn open(&self, dir: &Path, config: LogConfig) -> Result<(Arc<Self::Log>, Arc<dyn StateStore>), String>;
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

/// Proposes `put_ws(first..=last)` from `tasks` concurrent tasks, each
/// checking that its own proposals' indexes increase; returns them all.
async fn propose_concurrently<L: CommitLog>(log: &Arc<L>, first: u64, last: u64, tasks: u64) -> Vec<LogIndex> {
    let mut handles = Vec::new();
    for t in 0..tasks {
        let log = log.clone();
        handles.push(tokio::spawn(async move {
            let mut got: Vec<LogIndex> = Vec::new();
            let mut i = first + t;
            while i <= last {
                let index = log.propose(put_ws(i)).await.unwrap();
                assert!(got.last().is_none_or(|prev| index > *prev), "one caller's indexes increase");
                got.push(index);
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

pub(crate) async fn indexes_increase_and_resolve_durable_and_applied<F: LogFactory>(f: F) {
    let dir = tempfile::tempdir().unwrap();
    let (log, store) = f.open(dir.path(), LogConfig::default()).await.unwrap();
    let mut last = 0;
    for i in 1..=200 {
        let index = log.propose(put_ws(i)).await.unwrap();
        assert!(index > last, "index {index} after {last}");
        last = index;
        // Resolved means durable and applied.
        assert!(log.last_durable_index() >= index);
        assert!(log.applied_index() >= index);
        assert_eq!(store.get(Keyspace::State, &key(i)).unwrap(), Some(i.to_be_bytes().to_vec()));
    }
    // An empty write set is still an entry.
    assert!(log.propose(WriteSet::default()).await.unwrap() > last);
    log.shutdown().await.unwrap();
}

pub(crate) async fn concurrent_proposals_all_resolve_and_batch<F: LogFactory>(f: F) {
    const N: u64 = 2000;
    let dir = tempfile::tempdir().unwrap();
    let (log, store) = f.open(dir.path(), LogConfig::default()).await.unwrap();
    let indexes = propose_concurrently(&log, 1, N, 100).await;
    assert_eq!(indexes.len() as u64, N, "every proposal resolved");
    assert!(log.applied_index() >= *indexes.last().unwrap());
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
    let config = LogConfig { max_batch_entries: 4, queue_depth: 16, ..LogConfig::default() };
    let (log, store) = f.open(dir.path(), config).await.unwrap();
    // 64 tasks against a queue of 16: propose must wait for room, not fail.
    let indexes = propose_concurrently(&log, 1, 500, 64).await;
    assert_eq!(indexes.len(), 500);
    let stats = log.stats();
    assert!(stats.largest_batch <= 4, "{stats:?}");
    assert!(stats.sync_batches >= 125, "{stats:?}");
    assert_has_keys(store.as_ref(), 1..=500);
    log.shutdown().await.unwrap();
}

pub(crate) async fn batches_respect_max_batch_bytes<F: LogFactory>(f: F) {
    let dir = tempfile::tempdir().unwrap();
    // Room for about four of the write sets below per batch.
    let config = LogConfig { max_batch_bytes: 4 * 1100, ..LogConfig::default() };
    let (log, _store) = f.open(dir.path(), config).await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..32u64 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..10u64 {
                let value = vec![7u8; 1000];
                let ws = WriteSet { ops: vec![Op::Put { keyspace: Keyspace::State, key: key(t * 100 + i), value }] };
                log.propose(ws).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stats = log.stats();
    assert!(stats.largest_batch_bytes <= 4 * 1100, "{stats:?}");
    log.shutdown().await.unwrap();
}

pub(crate) async fn reopen_keeps_everything_acknowledged<F: LogFactory>(f: F) {
    const N: u64 = 300;
    let dir = tempfile::tempdir().unwrap();
    let last = {
        let (log, _) = f.open(dir.path(), LogConfig::default()).await.unwrap();
        let last = *propose_concurrently(&log, 1, N, 16).await.last().unwrap();
        log.shutdown().await.unwrap();
        last
    };
    let (log, store) = f.open(dir.path(), LogConfig::default()).await.unwrap();
    assert_has_keys(store.as_ref(), 1..=N);
    assert!(log.applied_index() >= last);
    assert!(log.propose(put_ws(N + 1)).await.unwrap() > last, "numbering continues");
    log.shutdown().await.unwrap();
    drop((log, store));
    // And once more.
    let (log, store) = f.open(dir.path(), LogConfig::default()).await.unwrap();
    assert_has_keys(store.as_ref(), 1..=N + 1);
    log.shutdown().await.unwrap();
}

pub(crate) async fn state_survives_compactions_and_reopen<F: LogFactory>(f: F) {
    const N: u64 = 1000;
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig { compact_every_entries: 100, ..LogConfig::default() };
    {
        let (log, _) = f.open(dir.path(), config.clone()).await.unwrap();
        // In rounds, so compactions happen along the way.
        for round in 0..10 {
            propose_concurrently(&log, round * 100 + 1, round * 100 + 100, 10).await;
        }
        log.shutdown().await.unwrap();
    }
    let (log, store) = f.open(dir.path(), config).await.unwrap();
    assert_has_keys(store.as_ref(), 1..=N);
    log.propose(put_ws(N + 1)).await.unwrap();
    log.shutdown().await.unwrap();
}

pub(crate) async fn propose_after_shutdown_fails_cleanly<F: LogFactory>(f: F) {
    let dir = tempfile::tempdir().unwrap();
    let (log, store) = f.open(dir.path(), LogConfig::default()).await.unwrap();
    let first = log.propose(put_ws(1)).await.unwrap();
    log.shutdown().await.unwrap();
    assert!(matches!(log.propose(put_ws(3)).await, Err(LogError::ShutDown)));
    log.shutdown().await.unwrap();
    drop((log, store));
    // The directory is released: it can be opened again right away.
    let (log, _) = f.open(dir.path(), LogConfig::default()).await.unwrap();
    assert!(log.applied_index() >= first);
    log.shutdown().await.unwrap();
}

pub(crate) async fn second_open_of_same_dir_fails<F: LogFactory>(f: F) {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = f.open(dir.path(), LogConfig::default()).await.unwrap();
    assert!(f.open(dir.path(), LogConfig::default()).await.is_err());
    log.shutdown().await.unwrap();
}

pub(crate) async fn write_set_is_applied_atomically<F: LogFactory>(f: F) {
    const OPS: u64 = 500;
    let dir = tempfile::tempdir().unwrap();
    let (log, store) = f.open(dir.path(), LogConfig::default()).await.unwrap();
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
    let dir = tempfile::tempdir().unwrap();
    let (log, store) = f.open(dir.path(), LogConfig::default()).await.unwrap();
    let start = Instant::now();
    let indexes = propose_concurrently(&log, 1, N, 64).await;
    let elapsed = start.elapsed();
    assert_eq!(indexes.len() as u64, N);
    assert_has_keys(store.as_ref(), 1..=N);
    let stats = log.stats();
    println!(
        "{N} proposals at concurrency 64 in {elapsed:?} = {:.0}/s; {} sync batches, largest {}, {} bytes",
        N as f64 / elapsed.as_secs_f64(),
        stats.sync_batches,
        stats.largest_batch,
        stats.bytes_written
    );
    let start = Instant::now();
    for i in N + 1..=N + 200 {
        log.propose(put_ws(i)).await.unwrap();
    }
    println!("sequential latency {:?}/proposal", start.elapsed() / 200);
    log.shutdown().await.unwrap();
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

pub(crate) use commit_log_conformance;
