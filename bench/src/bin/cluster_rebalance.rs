//! `conflux-cluster-rebalance`: what a member joining a real cluster costs.
//! Runs two phases, each on its own cluster of three founding `conflux serve`
//! processes on 127.0.0.1 (`--shards` shards, three replicas each, so every
//! founder holds every shard) into which a fourth member then joins:
//!
//! 1. **move**: `--mb` MiB of `blob` state (tests/guests/blob) in one shard,
//!    `--shard`, then the join with `cluster.max_concurrent_moves=1` on every
//!    member, no other traffic. The placement driver moves replicas onto the
//!    joiner one at a time; the metadata leader logs each attempt's start
//!    (`moving a replica shard=…`), end (`moved a replica shard=… ms=…`) or
//!    failure, which this tool reads back from every member's log. A move's
//!    time is from its first attempt's start to its success: a failed attempt
//!    (e.g. after `cluster.move_timeout_ms`) can leave a partly copied
//!    replica that the next attempt finishes quickly, so the last attempt's
//!    `ms` alone understates it.
//! 2. **rebalance**: the same data, the default `max_concurrent_moves`, and
//!    `--callers` callers adding to counters through the founders (with
//!    idempotency keys, retrying UNAVAILABLE as a client would). Latencies are
//!    recorded over `--steady-secs` before the join and from the join until
//!    `Status` shows the cluster rebalanced (four members up, no move running,
//!    every shard led and caught up, replica counts within one), polled every
//!    200 ms. "Caught up" is a lag of 0 entries in phase 1 and of at most
//!    `--max-lag` here, where callers keep every shard's log growing.
//!
//! Afterwards every blob must have its full length and the counters must add
//! up to the acknowledged calls. Prints each phase's results and a summary;
//! exits non-zero if a call failed for good or a phase did not rebalance
//! within `--timeout-secs`.

use anyhow::{Context, ensure};
use clap::Parser;
use conflux_bench::procs::{Proc, free_port, spawn_conflux_serve};
use conflux_client::pb;
use conflux_host::cluster::placement::shard_of;
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

type Client = pb::conflux_client::ConfluxClient<Channel>;

const SECRET: &str = "rebalance-bench-secret-0123456789";
const FOUNDERS: usize = 3;
/// How often `Status` is asked whether the cluster has rebalanced.
const POLL: Duration = Duration::from_millis(200);
/// Bound on one call of this tool's own (fill, checks, status); the cluster
/// gives up forwarding after 10 s by default.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Callers run this long before the steady window, so connections are warm.
const WARMUP: Duration = Duration::from_secs(2);

/// The callers' windows: each call is recorded in the one it started in.
const WARMING: usize = 0;
const STEADY: usize = 1;
const REBALANCING: usize = 2;

#[derive(Debug, Parser)]
#[command(about = "Replica move time, rebalance time and foreground latency when a member joins, on real processes")]
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
    /// MiB of entity state put into the one shard.
    #[arg(long, default_value_t = 16)]
    mb: u64,
    /// KiB per blob (each is one `put`, under the 1 MiB payload limit).
    #[arg(long, default_value_t = 256)]
    value_kib: usize,
    #[arg(long, default_value_t = 8)]
    shards: u32,
    /// The shard that holds the data. The driver balances by moving the
    /// lowest-numbered shards off the most loaded founders first, so shard 0
    /// is the first replica to move onto the joiner.
    #[arg(long, default_value_t = 0)]
    shard: u32,
    /// Callers adding through the founders during the rebalance phase.
    #[arg(long, default_value_t = 16)]
    callers: usize,
    /// Counter entities the callers spread over.
    #[arg(long, default_value_t = 1000)]
    keys: u64,
    /// Length of the steady-state window before the join.
    #[arg(long, default_value_t = 10)]
    steady_secs: u64,
    /// Replication lag (entries) a shard may show in the rebalance phase and
    /// still count as caught up: with callers writing, a healthy follower is
    /// usually a few entries behind at any instant, so a lag of 0 on every
    /// shard at once is rarely seen. A replica still being copied lags by
    /// the shard's whole log. The move phase (no callers) requires 0.
    #[arg(long, default_value_t = 16)]
    max_lag: u64,
    /// How long a phase may take from the join until rebalanced.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
    /// Keep the members' data directories and logs (the path is printed).
    #[arg(long)]
    keep: bool,
}

/// What both phases start from.
struct Env {
    bin: PathBuf,
    counter: PathBuf,
    blob: PathBuf,
    root: PathBuf,
}

/// A running member; stopped (SIGTERM, then SIGKILL) when dropped.
struct Member {
    log: PathBuf,
    proc: Proc,
}

impl Member {
    fn start(bin: &Path, addr: &str, dir: &Path, args: &[String]) -> anyhow::Result<Self> {
        let mut cmd = std::process::Command::new(bin);
        // The move durations are read from the default `info` log lines.
        cmd.env_remove("RUST_LOG");
        let (proc, log) = spawn_conflux_serve(cmd, addr, dir, args)?;
        Ok(Self { log, proc })
    }
}

/// Latencies (µs) of the calls that started in one window, and its length.
struct Window {
    hist: Histogram<u64>,
    secs: f64,
}

impl Window {
    fn line(&self) -> String {
        let ms = |v: u64| v as f64 / 1000.0;
        format!(
            "{} calls in {:.1} s, {:.0} calls/s, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            self.hist.len(),
            self.secs,
            self.hist.len() as f64 / self.secs,
            ms(self.hist.value_at_quantile(0.5)),
            ms(self.hist.value_at_quantile(0.99)),
            ms(self.hist.max())
        )
    }
}

/// What the members' logs say about the moves of one shard.
#[derive(Default)]
struct ShardMoves {
    /// When the first attempt started (seconds into the UTC day).
    first_start: Option<f64>,
    /// When an attempt succeeded, and the `ms` it logged.
    done: Option<(f64, u64)>,
    /// The log lines of failed and timed-out attempts.
    failures: Vec<String>,
}

impl ShardMoves {
    /// From the first attempt's start to the success, in ms.
    fn wall_ms(&self) -> Option<u64> {
        let (start, (end, _)) = (self.first_start?, self.done?);
        Some((between(start, end) * 1000.0).round() as u64)
    }

    fn describe(&self) -> String {
        let failed = self.failures.len();
        // The whole move timing out, or its catch-up step doing so.
        let timeouts = self.failures.iter().filter(|f| f.contains("timed out") || f.contains("timeout after")).count();
        match (self.wall_ms(), self.done) {
            (Some(wall), _) if failed == 0 => format!("{wall} ms"),
            (Some(wall), Some((_, last))) => format!(
                "{wall} ms over {} attempts ({failed} failed, {timeouts} of them timeouts; the last took {last} ms)",
                failed + 1
            ),
            _ => format!("not moved ({failed} failed attempts, {timeouts} of them timeouts)"),
        }
    }
}

/// What one phase measured.
struct Outcome {
    /// From starting the joiner until `Status` showed the cluster rebalanced.
    rebalanced: Option<Duration>,
    /// When the joiner was started (seconds into the UTC day).
    joined_at: f64,
    /// Every shard a move was attempted for.
    moves: BTreeMap<u64, ShardMoves>,
    steady: Option<Window>,
    during: Option<Window>,
    failed_calls: u64,
}

impl Outcome {
    fn moves_line(&self) -> String {
        let done = self.moves.values().filter(|m| m.done.is_some()).count();
        let all: Vec<String> = self.moves.iter().map(|(s, m)| format!("shard {s}: {}", m.describe())).collect();
        format!("{done} moves ({})", all.join("; "))
    }

    /// When, after the join, the first move started and the last one ended:
    /// the rest of the rebalance time is the joiner starting and catching up
    /// with the metadata group, and `Status` seeing the result.
    fn moves_span(&self) -> Option<String> {
        let first = self.moves.values().filter_map(|m| m.first_start).min_by(f64::total_cmp)?;
        let last = self.moves.values().filter_map(|m| m.done.map(|(end, _)| end)).max_by(f64::total_cmp);
        let since = |t: f64| between(self.joined_at, t);
        let unfinished = if self.moves.values().any(|m| m.done.is_none()) { " (some never ended)" } else { "" };
        Some(match last {
            Some(last) => {
                format!("moves ran from +{:.1} s to +{:.1} s after the join{unfinished}", since(first), since(last))
            }
            None => format!("moves started +{:.1} s after the join; none ended", since(first)),
        })
    }

    fn failed_attempts(&self) -> usize {
        self.moves.values().map(|m| m.failures.len()).sum()
    }
}

/// The cluster as `addr` sees it; connecting included, bounded in time.
async fn status(addr: &str) -> anyhow::Result<pb::StatusResponse> {
    let ask = async {
        let mut c = conflux_client::connect(addr).await?;
        Ok(c.status(pb::StatusRequest {}).await?.into_inner())
    };
    tokio::time::timeout(CALL_TIMEOUT, ask).await.context("status timed out")?
}

/// Four members up, no move running, every shard led with at most `max_lag`
/// entries of lag, and replica counts within one of each other.
fn rebalanced(s: &pb::StatusResponse, shards: u32, max_lag: u64) -> bool {
    let replicas = s.nodes.iter().map(|n| n.replicas);
    let spread = replicas.clone().max().unwrap_or(0) - replicas.min().unwrap_or(0);
    s.nodes.len() == FOUNDERS + 1
        && s.nodes.iter().all(|n| n.state == "up")
        && s.moves.is_empty()
        && s.shards.len() == shards as usize
        && s.shards.iter().all(|sh| !sh.leader.is_empty() && sh.replication_lag <= max_lag)
        && spread <= 1
}

/// One line per node and the running moves, for a phase that timed out.
fn describe(s: &pb::StatusResponse) -> String {
    let nodes: Vec<String> =
        s.nodes.iter().map(|n| format!("node {} {} ({} replicas)", n.node_id, n.state, n.replicas)).collect();
    let lagging: Vec<String> = s
        .shards
        .iter()
        .filter(|sh| sh.leader.is_empty() || sh.replication_lag > 0)
        .map(|sh| format!("shard {} leader '{}' lag {}", sh.shard_id, sh.leader, sh.replication_lag))
        .collect();
    format!("{}; moves [{}]; {}", nodes.join(", "), s.moves.join(", "), lagging.join(", "))
}

/// A latency histogram (µs, up to an hour). Explicit bounds: a clone of an
/// auto-resizing histogram does not resize and would saturate at 2 ms.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

/// One call of this tool's own, bounded in time.
async fn call(c: &mut Client, ty: &str, id: &str, op: &str, payload: Vec<u8>) -> anyhow::Result<Vec<u8>> {
    let req = pb::InvokeRequest {
        entity: Some(pb::EntityRef { entity_type: ty.into(), id: id.into() }),
        operation: op.into(),
        payload,
        ..Default::default()
    };
    let reply = tokio::time::timeout(CALL_TIMEOUT, c.invoke(req))
        .await
        .with_context(|| format!("{op} {ty}/{id} timed out"))?
        .with_context(|| format!("{op} {ty}/{id}"))?;
    Ok(reply.into_inner().reply)
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

/// Blob ids that hash to `shard`, enough to hold `mb` MiB at `value_kib` each.
fn blob_ids(a: &Args) -> Vec<String> {
    let count = (a.mb * 1024).div_ceil(a.value_kib as u64) as usize;
    (0..).map(|k| format!("blob-{k}")).filter(|id| shard_of("blob", id, a.shards) == a.shard).take(count).collect()
}

/// The callers of the rebalance phase.
struct Load {
    window: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Histogram<u64>>>>,
}

impl Load {
    async fn start(a: &Args, addrs: &[String]) -> anyhow::Result<Self> {
        let window = Arc::new(AtomicUsize::new(WARMING));
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for caller in 0..a.callers {
            let mut c = conflux_client::connect(&addrs[caller % addrs.len()]).await?;
            let (window, stop, failed, keys) = (window.clone(), stop.clone(), failed.clone(), a.keys);
            tasks.push(tokio::spawn(async move {
                let mut hists: Vec<Histogram<u64>> = (0..=REBALANCING).map(|_| histogram()).collect();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let id = format!("c{}", (n * 7919 + caller as u64) % keys);
                    let w = window.load(Ordering::Relaxed);
                    let started = Instant::now();
                    if conflux_bench::conflux::add_keyed(&mut c, &id, format!("{caller}-{n}"), &stop).await {
                        hists[w].saturating_record(started.elapsed().as_micros() as u64);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                hists
            }));
        }
        Ok(Self { window, stop, failed, tasks })
    }

    /// Stops the callers; returns each window's merged latencies and the
    /// calls that failed for good.
    async fn finish(self) -> anyhow::Result<(Vec<Histogram<u64>>, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        let mut merged: Vec<Histogram<u64>> = (0..=REBALANCING).map(|_| histogram()).collect();
        for t in self.tasks {
            for (m, h) in merged.iter_mut().zip(t.await?) {
                m.add(&h)?;
            }
        }
        Ok((merged, self.failed.load(Ordering::Relaxed)))
    }
}

/// Seconds into the UTC day now, on the clock of the members' log timestamps.
fn now_in_utc_day() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64() % 86_400.0)
}

/// Seconds from `start` to `end`, both seconds into a UTC day; a run that
/// crosses midnight has its `end` on the next day.
fn between(start: f64, end: f64) -> f64 {
    (end - start).rem_euclid(86_400.0)
}

/// Seconds into the UTC day of a log line's leading RFC 3339 timestamp
/// (`2026-11-28T10:49:26.738369Z  INFO …`).
fn logged_at(line: &str) -> Option<f64> {
    let (_, time) = line.split_whitespace().next()?.split_once('T')?;
    let mut hms = time.strip_suffix('Z')?.split(':').map(str::parse::<f64>);
    Some(hms.next()?.ok()? * 3600.0 + hms.next()?.ok()? * 60.0 + hms.next()?.ok()?)
}

/// The replica moves the members logged, per shard. The metadata leader
/// logs them; leadership may have changed, so every log is read.
fn logged_moves(members: &[Member]) -> BTreeMap<u64, ShardMoves> {
    let mut moves = BTreeMap::<u64, ShardMoves>::new();
    for m in members {
        let text = std::fs::read_to_string(&m.log).unwrap_or_default();
        for line in text.lines() {
            let field = |name: &str| line.split_whitespace().find_map(|w| w.strip_prefix(name)?.parse::<u64>().ok());
            let (Some(shard), Some(at)) = (field("shard="), logged_at(line)) else { continue };
            if line.contains("moving a replica") {
                let first = &mut moves.entry(shard).or_default().first_start;
                *first = Some(first.map_or(at, |f| f.min(at)));
            } else if line.contains("moved a replica")
                && let Some(ms) = field("ms=")
            {
                moves.entry(shard).or_default().done = Some((at, ms));
            } else if line.contains("replica move failed") || line.contains("replica move timed out") {
                moves.entry(shard).or_default().failures.push(line.to_owned());
            }
        }
    }
    moves
}

fn deploy(bin: &Path, addr: &str, ty: &str, wasm: &Path) -> anyhow::Result<()> {
    let out =
        std::process::Command::new(bin).args(["--addr", &format!("http://{addr}"), "deploy", ty]).arg(wasm).output()?;
    ensure!(out.status.success(), "deploy {ty} failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// One phase: found a cluster, fill the shard, (with `load`, run callers
/// through a steady window), join a fourth member and wait until rebalanced.
async fn phase(a: &Args, env: &Env, name: &str, moves_at_once: Option<usize>, load: bool) -> anyhow::Result<Outcome> {
    let dir = env.root.join(name);
    std::fs::create_dir_all(&dir)?;
    let addrs: Vec<String> =
        (0..=FOUNDERS).map(|_| free_port().map(|p| format!("127.0.0.1:{p}"))).collect::<anyhow::Result<_>>()?;
    let founders = &addrs[..FOUNDERS];
    let peers = founders.iter().enumerate().map(|(i, x)| format!("{}={x}", i + 1)).collect::<Vec<_>>().join(",");
    let mut common = vec!["--cluster-secret".to_owned(), SECRET.to_owned()];
    if let Some(k) = moves_at_once {
        common.extend(["--set".to_owned(), format!("cluster.max_concurrent_moves={k}")]);
    }
    let mut members = Vec::new();
    for (i, addr) in founders.iter().enumerate() {
        let mut args = vec!["--node-id".to_owned(), (i + 1).to_string(), "--peer".to_owned(), peers.clone()];
        args.extend(["--set".to_owned(), format!("cluster.shard_count={}", a.shards)]);
        args.extend(common.iter().cloned());
        members.push(Member::start(&env.bin, addr, &dir.join(format!("n{}", i + 1)), &args)?);
    }
    deploy(&env.bin, &founders[0], "counter", &env.counter)?;
    deploy(&env.bin, &founders[0], "blob", &env.blob)?;

    let ids = blob_ids(a);
    let value_bytes = a.value_kib * 1024;
    let filled = Instant::now();
    let mut c = conflux_client::connect(&founders[0]).await?;
    for (k, id) in ids.iter().enumerate() {
        let payload = serde_json::to_vec(&filler(value_bytes, k as u64))?;
        call(&mut c, "blob", id, "put", payload).await?;
    }
    let total_bytes = (ids.len() * value_bytes) as u64;
    println!(
        "[{name}] put {} blobs of {} KiB ({:.1} MiB) into shard {} in {:.1} s",
        ids.len(),
        a.value_kib,
        total_bytes as f64 / f64::from(1 << 20),
        a.shard,
        filled.elapsed().as_secs_f64()
    );

    let callers = if load { Some(Load::start(a, founders).await?) } else { None };
    let mut steady_secs = 0.0;
    if let Some(l) = &callers {
        tokio::time::sleep(WARMUP).await;
        l.window.store(STEADY, Ordering::Relaxed);
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs(a.steady_secs)).await;
        steady_secs = started.elapsed().as_secs_f64();
        l.window.store(REBALANCING, Ordering::Relaxed);
    }

    // Joiners take no peer list: they learn the cluster from the member they join through.
    let (joined, joined_at) = (Instant::now(), now_in_utc_day());
    let mut args = vec!["--node-id".to_owned(), (FOUNDERS + 1).to_string(), "--join".to_owned(), founders[0].clone()];
    args.extend(common);
    members.push(Member::start(&env.bin, &addrs[FOUNDERS], &dir.join(format!("n{}", FOUNDERS + 1)), &args)?);
    println!("[{name}] node 4 up and joining after {:.1} s", joined.elapsed().as_secs_f64());
    let deadline = joined + Duration::from_secs(a.timeout_secs);
    let max_lag = if load { a.max_lag } else { 0 };
    let rebalanced_after = loop {
        let last = match status(&founders[0]).await {
            Ok(s) if rebalanced(&s, a.shards, max_lag) => break Some(joined.elapsed()),
            Ok(s) => describe(&s),
            Err(e) => format!("status: {e:#}"),
        };
        if Instant::now() >= deadline {
            println!("[{name}] NOT rebalanced after {} s: {last}", a.timeout_secs);
            break None;
        }
        for m in &mut members {
            m.proc.check_running()?;
        }
        tokio::time::sleep(POLL).await;
    };
    let during_secs = joined.elapsed().as_secs_f64();
    let (steady, during, failed_calls, acked) = match callers {
        Some(l) => {
            let (mut hists, failed) = l.finish().await?;
            let acked = hists.iter().map(Histogram::len).sum::<u64>();
            let during = Window { hist: hists.pop().expect("three windows"), secs: during_secs };
            let steady = Window { hist: hists.pop().expect("three windows"), secs: steady_secs };
            (Some(steady), Some(during), failed, acked)
        }
        None => (None, None, 0, 0),
    };
    let moves = logged_moves(&members);
    let out = Outcome { rebalanced: rebalanced_after, joined_at, moves, steady, during, failed_calls };
    if let Some(d) = out.rebalanced {
        println!("[{name}] rebalanced {:.1} s after the join started", d.as_secs_f64());
    }
    if let Some(span) = out.moves_span() {
        println!("[{name}] {span}");
    }
    println!("[{name}] {}", out.moves_line());
    for f in out.moves.values().flat_map(|m| &m.failures).take(5) {
        println!("[{name}] move failure: {f}");
    }
    if let (Some(s), Some(d)) = (&out.steady, &out.during) {
        println!("[{name}] steady:      {}", s.line());
        println!("[{name}] rebalancing: {}", d.line());
        println!("[{name}] calls failed for good: {}", out.failed_calls);
    }

    // Nothing was lost on the way: every blob has its length (asked through
    // the joiner), every acknowledged add is counted once.
    let mut c = conflux_client::connect(&addrs[FOUNDERS]).await?;
    let mut stored = 0u64;
    for id in &ids {
        stored += serde_json::from_slice::<u64>(&call(&mut c, "blob", id, "size", Vec::new()).await?)?;
    }
    ensure!(stored == total_bytes, "[{name}] the blobs hold {stored} bytes, not {total_bytes}");
    if load {
        let mut total = 0u64;
        for k in 0..a.keys {
            total +=
                serde_json::from_slice::<u64>(&call(&mut c, "counter", &format!("c{k}"), "get", Vec::new()).await?)?;
        }
        ensure!(total == acked, "[{name}] counters hold {total} but {acked} adds were acknowledged");
        println!("[{name}] checked: all blob bytes present; counters hold the {acked} acknowledged adds");
    } else {
        println!("[{name}] checked: all blob bytes present");
    }
    Ok(out)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    ensure!(a.shard < a.shards, "--shard must be below --shards");
    ensure!((1..=1000).contains(&a.value_kib), "--value-kib must be 1..=1000 (the payload limit is 1 MiB)");
    let guests = conflux_bench::workspace_root().join("target/guests/wasm32-wasip2/release");
    let tmp = tempfile::tempdir()?;
    let env = Env {
        bin: match &a.conflux_bin {
            Some(b) => b.clone(),
            None => std::env::current_exe()?.with_file_name("conflux"),
        },
        counter: a.counter_wasm.clone().unwrap_or_else(|| guests.join("counter.wasm")),
        blob: a.blob_wasm.clone().unwrap_or_else(|| guests.join("blob.wasm")),
        root: tmp.path().to_owned(),
    };
    for w in [&env.counter, &env.blob] {
        ensure!(w.exists(), "{} is missing: build the guests (scripts/test.sh shows how) or pass it", w.display());
    }
    if a.keep {
        println!("data directories and logs under {}", tmp.keep().display());
    }

    let moving = phase(&a, &env, "move", Some(1), false).await?;
    let rebalancing = phase(&a, &env, "rebalance", None, true).await?;

    let secs =
        |d: Option<Duration>| d.map_or("NOT within the bound".to_owned(), |d| format!("{:.1} s", d.as_secs_f64()));
    println!(
        "\n== {} MiB in shard {} of {}, 3 founders (3 replicas per shard) + 1 joiner, {} KiB per blob",
        a.mb, a.shard, a.shards, a.value_kib
    );
    match moving.moves.get(&u64::from(a.shard)).filter(|m| m.done.is_some()) {
        Some(m) => println!("move of shard {} ({} MiB), one move at a time: {}", a.shard, a.mb, m.describe()),
        None => match moving.moves.iter().filter(|(_, m)| m.done.is_some()).max_by_key(|(_, m)| m.wall_ms()) {
            Some((s, m)) => {
                println!("move of shard {}: NOT moved; the longest move was shard {s}: {}", a.shard, m.describe())
            }
            None => println!("move of shard {}: no move was logged", a.shard),
        },
    }
    println!("  all moves, one at a time: {}", moving.moves_line());
    if let Some(span) = moving.moves_span() {
        println!("  {span}");
    }
    println!("  rebalanced (one move at a time, no load): {}", secs(moving.rebalanced));
    println!(
        "rebalance after the join (default concurrency, under load, lag <= {}): {}",
        a.max_lag,
        secs(rebalancing.rebalanced)
    );
    println!("  all moves: {}", rebalancing.moves_line());
    if let Some(span) = rebalancing.moves_span() {
        println!("  {span}");
    }
    if let (Some(s), Some(d)) = (&rebalancing.steady, &rebalancing.during) {
        println!("foreground steady state: {}", s.line());
        println!("foreground during rebalance: {}", d.line());
    }
    println!("calls failed for good: {}", rebalancing.failed_calls);
    let failed_moves = moving.failed_attempts() + rebalancing.failed_attempts();
    if failed_moves > 0 {
        println!("move attempts that failed or timed out (retried by the driver): {failed_moves}");
    }
    ensure!(rebalancing.failed_calls == 0, "{} calls failed for good", rebalancing.failed_calls);
    ensure!(
        moving.rebalanced.is_some() && rebalancing.rebalanced.is_some(),
        "the cluster did not rebalance within {} s",
        a.timeout_secs
    );
    Ok(())
}
