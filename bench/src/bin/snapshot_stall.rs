//! `conflux-snapshot-stall`: what a compaction costs the invocations running
//! beside it. Starts one `conflux serve` (a single node: one shard, whose
//! Raft group snapshots every `log.compact_every_entries` applied entries),
//! fills it with `--state-mb` MiB of `blob` state (tests/guests/blob), then
//! keeps `--callers` callers adding to counters until the log reaches the
//! compaction point and the snapshot is written. A snapshot is being written
//! while a temporary `.snapshot-*` file exists in the shard's directory; the
//! harness watches for it. Calls that overlap that window are compared with
//! the calls completed before it (after a warm-up), and the node's memory
//! (PSS) is sampled in both periods.
//!
//! The goals (issue 21, item 4): p99 during the compaction of ≥ 1 GB of
//! state within 3 × the steady p99, and memory that does not grow by the
//! state's size. Run it on a quiet machine; `--state-mb 20` checks that it
//! works in seconds.

use anyhow::{Context, ensure};
use clap::Parser;
use conflux_bench::conflux::ConfluxTarget;
use conflux_bench::load::new_histogram;
use conflux_bench::procs::{MemSampler, free_port, spawn_conflux_serve};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
#[command(about = "Invocation latency and node memory while a single node snapshots its shard")]
struct Args {
    /// The conflux binary [default: next to this executable].
    #[arg(long)]
    conflux_bin: Option<PathBuf>,
    /// The counter component [default: target/guests/…/counter.wasm].
    #[arg(long)]
    counter_wasm: Option<PathBuf>,
    /// The blob component [default: target/guests/…/blob.wasm].
    #[arg(long)]
    blob_wasm: Option<PathBuf>,
    /// MiB of entity state in the shard before the compaction.
    #[arg(long, default_value_t = 1024)]
    state_mb: u64,
    /// KiB per blob (one `put` each, under the 1 MiB payload limit).
    #[arg(long, default_value_t = 900)]
    value_kib: usize,
    /// Concurrent `put`s while filling.
    #[arg(long, default_value_t = 4)]
    fillers: usize,
    /// Callers adding to counters during the steady period and the compaction.
    #[arg(long, default_value_t = 16)]
    callers: usize,
    /// Counter entities the callers spread over.
    #[arg(long, default_value_t = 1000)]
    keys: u64,
    /// Log entries after the fill before the compaction starts (the steady
    /// period; group commit puts several calls in one entry).
    #[arg(long, default_value_t = 3000)]
    steady_entries: u64,
    /// Calls in the first seconds of the steady period are not counted.
    #[arg(long, default_value_t = 1)]
    warmup_secs: u64,
    /// Give up if no compaction has ended within this many seconds of the fill.
    #[arg(long, default_value_t = 600)]
    max_secs: u64,
}

/// One call: when it started and ended, and whether it succeeded.
#[derive(Debug, Clone, Copy)]
struct Call {
    start: Instant,
    end: Instant,
    ok: bool,
}

/// `len` pseudo-random lowercase letters: a valid JSON string body that no
/// layer can compress much, so the shard really holds that many bytes.
fn filler(len: usize, seed: u64) -> String {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}

/// Bytes of the files under `dir`.
fn du(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => du(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

/// Whether a snapshot file is being written in `shard_dir`.
fn snapshot_in_progress(shard_dir: &Path) -> bool {
    std::fs::read_dir(shard_dir)
        .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with(".snapshot-")))
        .unwrap_or(false)
}

/// The first window in which a snapshot was being written, watched every
/// 2 ms until `stop`.
fn watch_snapshot(shard_dir: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Option<(Instant, Instant)>> {
    std::thread::spawn(move || {
        let mut started = None;
        while !stop.load(Ordering::Relaxed) {
            match (started, snapshot_in_progress(&shard_dir)) {
                (None, true) => started = Some(Instant::now()),
                (Some(s), false) => return Some((s, Instant::now())),
                _ => {}
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        None
    })
}

fn percentiles(calls: &[Call]) -> (usize, f64, f64, f64) {
    let mut h = new_histogram();
    for c in calls {
        h.record((c.end - c.start).as_micros().max(1) as u64).expect("within the histogram's bounds");
    }
    let ms = |us: u64| us as f64 / 1000.0;
    (calls.len(), ms(h.value_at_quantile(0.5)), ms(h.value_at_quantile(0.99)), ms(h.max()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    ensure!((1..=1000).contains(&a.value_kib), "--value-kib must be 1..=1000 (the payload limit is 1 MiB)");
    let guests = conflux_bench::workspace_root().join("target/guests/wasm32-wasip2/release");
    let bin = match &a.conflux_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name("conflux"),
    };
    let counter = a.counter_wasm.clone().unwrap_or_else(|| guests.join("counter.wasm"));
    let blob = a.blob_wasm.clone().unwrap_or_else(|| guests.join("blob.wasm"));
    for w in [&counter, &blob] {
        ensure!(w.exists(), "{} is missing: build the guests (scripts/test.sh shows how) or pass it", w.display());
    }
    let blobs = (a.state_mb * 1024).div_ceil(a.value_kib as u64);
    // Deploys and the fill take about one entry each; the compaction comes
    // `steady_entries` later.
    let compact_every = blobs + 16 + a.steady_entries;

    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("node");
    let addr = format!("127.0.0.1:{}", free_port()?);
    let args = vec!["--set".to_owned(), format!("log.compact_every_entries={compact_every}")];
    let (mut node, log) = spawn_conflux_serve(std::process::Command::new(&bin), &addr, &dir, &args)?;
    let target = ConfluxTarget::connect(&addr, 4).await?;
    target.deploy("counter", &counter).await?;
    target.deploy("blob", &blob).await?;

    let filled_at = Instant::now();
    let value_len = a.value_kib * 1024 - 2;
    let fill = futures::future::try_join_all((0..a.fillers as u64).map(|f| {
        let target = target.clone();
        async move {
            for k in (f..blobs).step_by(a.fillers) {
                let payload = format!("\"{}\"", filler(value_len, k)).into_bytes();
                target
                    .invoke("blob", &format!("blob-{k}"), "put", payload)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            }
            anyhow::Ok(())
        }
    }));
    fill.await.context("filling the shard")?;
    node.check_running()?;
    let state_bytes = du(&dir.join("state"));
    println!(
        "filled {blobs} blobs of {} KiB in {:.1} s; sled holds {:.0} MiB; compaction after {compact_every} entries",
        a.value_kib,
        filled_at.elapsed().as_secs_f64(),
        state_bytes as f64 / (1 << 20) as f64
    );

    let shard_dir = dir.join("shards").join("0");
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_snapshot(shard_dir.clone(), stop.clone());
    let memory = MemSampler::start(vec![node.pid()]);
    let calls = Arc::new(Mutex::new(Vec::<Call>::new()));
    let callers: Vec<_> = (0..a.callers as u64)
        .map(|c| {
            let (target, stop, calls) = (target.clone(), stop.clone(), calls.clone());
            tokio::spawn(async move {
                let mut n = c;
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    let ok = target.invoke("counter", &format!("k{}", n % a.keys), "add", b"1".to_vec()).await.is_ok();
                    calls.lock().expect("calls").push(Call { start, end: Instant::now(), ok });
                    n += a.callers as u64;
                }
            })
        })
        .collect();
    let began = Instant::now();
    let deadline = began + Duration::from_secs(a.max_secs);
    let mut steady_peak_mb = None;
    while !watcher.is_finished() && Instant::now() < deadline {
        if steady_peak_mb.is_none() && snapshot_in_progress(&shard_dir) {
            steady_peak_mb = Some(memory.take_peak_mb());
        }
        node.check_running()?;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let during_peak_mb = memory.take_peak_mb();
    // Let the calls that overlap the window's end finish.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for c in callers {
        c.await?;
    }
    let window = watcher
        .join()
        .expect("watcher")
        .with_context(|| format!("no snapshot was written within {} s of the fill{}", a.max_secs, node.log_tail()))?;
    let calls = calls.lock().expect("calls").clone();
    let failed = calls.iter().filter(|c| !c.ok).count();
    let warm = began + Duration::from_secs(a.warmup_secs);
    let steady: Vec<Call> = calls.iter().copied().filter(|c| c.start >= warm && c.end < window.0).collect();
    let during: Vec<Call> = calls.iter().copied().filter(|c| c.end >= window.0 && c.start <= window.1).collect();
    ensure!(!steady.is_empty(), "no steady calls: raise --steady-entries or lower --warmup-secs");
    let (sn, s50, s99, smax) = percentiles(&steady);
    let (dn, d50, d99, dmax) = percentiles(&during);
    let steady_peak_mb = steady_peak_mb.unwrap_or(during_peak_mb);
    println!("snapshot written in {:.2} s", (window.1 - window.0).as_secs_f64());
    println!("| period | calls | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|");
    println!("| steady | {sn} | {s50:.2} | {s99:.2} | {smax:.2} |");
    println!("| during compaction | {dn} | {d50:.2} | {d99:.2} | {dmax:.2} |");
    println!("p99 during / steady = {:.2} (goal ≤ 3); {failed} calls failed", d99 / s99);
    println!(
        "node memory (PSS peak): {steady_peak_mb:.0} MiB steady, {during_peak_mb:.0} MiB during; growth {:.0} MiB \
         against {:.0} MiB of state (goal: far below it)",
        during_peak_mb - steady_peak_mb,
        state_bytes as f64 / (1 << 20) as f64
    );
    ensure!(failed == 0, "{failed} calls failed; see {}", log.display());
    Ok(())
}
