//! `conflux-bench`: a bounded load harness for the counter workload. It starts
//! its own `conflux serve` (or uses `--addr`), deploys the counter, runs every
//! (keys × concurrency) cell for a fixed time and request budget, checks that
//! the counters add up to the acknowledged calls, and prints a Markdown table.

use anyhow::{Context, bail, ensure};
use clap::Parser;
use conflux_host::api::pb::{self, conflux_client::ConfluxClient};
use hdrhistogram::Histogram;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

#[derive(Debug, Parser)]
#[command(about = "Counter load harness for Conflux")]
struct Args {
    /// Use a running node instead of starting one.
    #[arg(long)]
    addr: Option<String>,
    /// The conflux binary to start [default: next to this executable].
    #[arg(long)]
    conflux_bin: Option<PathBuf>,
    /// The counter component [default: built from examples/counter].
    #[arg(long)]
    wasm: Option<PathBuf>,
    /// Comma-separated concurrency levels.
    #[arg(long, default_value = "1,16,64", value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Comma-separated key counts.
    #[arg(long, default_value = "1,10000", value_delimiter = ',')]
    keys: Vec<usize>,
    /// Seconds per cell.
    #[arg(long, default_value_t = 5)]
    duration_secs: u64,
    /// Request budget per cell.
    #[arg(long, default_value_t = 2_000_000)]
    max_requests: u64,
    /// Operation to drive: `add` (a durable write per call) or `get` (read-only,
    /// commits nothing: isolates the cost of the commit path).
    #[arg(long, default_value = "add")]
    op: String,
    /// gRPC connections shared by the callers.
    #[arg(long, default_value_t = 8)]
    connections: usize,
}

struct Cell {
    keys: usize,
    concurrency: usize,
    ok: u64,
    errors: u64,
    secs: f64,
    hist: Histogram<u64>,
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("bench/ has a parent").to_owned()
}

fn build_counter() -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    let target = root.join("target/guests");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&root)
        .env("CARGO_TARGET_DIR", &target)
        .args(["build", "--release", "--target", "wasm32-wasip2", "-p", "counter"])
        .status()?;
    ensure!(status.success(), "building the counter guest failed");
    Ok(target.join("wasm32-wasip2/release/counter.wasm"))
}

/// The child process and its data directory, removed when dropped.
struct Daemon(Child, #[allow(dead_code)] tempfile::TempDir);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_daemon(bin: &PathBuf) -> anyhow::Result<(Daemon, String)> {
    let dir = tempfile::tempdir()?;
    let mut child = Command::new(bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        match lines.next() {
            Some(Ok(l)) => {
                if let Some(a) = l.strip_prefix("conflux listening on ") {
                    break a.trim().to_owned();
                }
            }
            _ => bail!("conflux exited before listening"),
        }
    };
    Ok((Daemon(child, dir), addr))
}

fn req(id: &str, op: &str, payload: &[u8]) -> pb::InvokeRequest {
    pb::InvokeRequest {
        entity: Some(pb::EntityRef { entity_type: "counter".into(), id: id.into() }),
        operation: op.into(),
        payload: payload.to_vec(),
        ..Default::default()
    }
}

/// Reads every counter of a run (64 readers) and returns their sum. Before a
/// cell it doubles as the warm-up that activates every entity once, so cells
/// measure steady state rather than first activations.
async fn sum_counters(clients: &[ConfluxClient<Channel>], run: usize, keys: usize) -> anyhow::Result<i64> {
    let mut gets = Vec::new();
    for chunk in 0..64.min(keys) {
        let mut c = clients[chunk % clients.len()].clone();
        gets.push(tokio::spawn(async move {
            let mut sum = 0i64;
            let mut k = chunk;
            while k < keys {
                let r = c.invoke(req(&format!("r{run}-{k}"), "get", b"")).await?;
                sum += serde_json::from_slice::<i64>(&r.into_inner().reply).unwrap_or(0);
                k += 64;
            }
            Ok::<i64, tonic::Status>(sum)
        }));
    }
    let mut total = 0;
    for g in gets {
        total += g.await??;
    }
    Ok(total)
}

async fn run_cell(
    clients: &[ConfluxClient<Channel>],
    run: usize,
    keys: usize,
    concurrency: usize,
    args: &Args,
) -> anyhow::Result<Cell> {
    sum_counters(clients, run, keys).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let issued = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(args.duration_secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let mut c = clients[w % clients.len()].clone();
        let (stop, issued) = (stop.clone(), issued.clone());
        let budget = args.max_requests;
        let (op, payload): (String, &'static [u8]) =
            if args.op == "get" { ("get".into(), b"") } else { ("add".into(), b"1") };
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
            let (mut ok, mut errors) = (0u64, 0u64);
            let mut i = w;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                if issued.fetch_add(1, Ordering::Relaxed) >= budget {
                    break;
                }
                let id = format!("r{run}-{}", i % keys);
                i = i.wrapping_add(concurrency);
                let t = Instant::now();
                match c.invoke(req(&id, &op, payload)).await {
                    Ok(_) => {
                        ok += 1;
                        hist.record(t.elapsed().as_micros().max(1) as u64).ok();
                    }
                    Err(_) => errors += 1,
                }
            }
            (ok, errors, hist)
        }));
    }
    let mut cell =
        Cell { keys, concurrency, ok: 0, errors: 0, secs: 0.0, hist: Histogram::new_with_bounds(1, 60_000_000, 3)? };
    for t in tasks {
        let (ok, errors, hist) = t.await?;
        cell.ok += ok;
        cell.errors += errors;
        cell.hist.add(hist)?;
    }
    cell.secs = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    // Correctness: the counters add up to the acknowledged adds.
    let total = sum_counters(clients, run, keys).await?;
    let expected = if args.op == "get" { 0 } else { cell.ok as i64 };
    ensure!(
        total == expected,
        "counters add up to {total} but {} adds were acknowledged (keys={keys}, concurrency={concurrency})",
        cell.ok
    );
    Ok(cell)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut _daemon = None;
    let addr = match &args.addr {
        Some(a) => a.clone(),
        None => {
            let bin = match &args.conflux_bin {
                Some(b) => b.clone(),
                None => std::env::current_exe()?.with_file_name("conflux"),
            };
            let (d, addr) = start_daemon(&bin)?;
            _daemon = Some(d);
            addr
        }
    };
    let wasm = match &args.wasm {
        Some(w) => w.clone(),
        None => build_counter()?,
    };
    let deploy = Command::new(std::env::current_exe()?.with_file_name("conflux"))
        .args(["--addr", &addr, "deploy", "counter"])
        .arg(&wasm)
        .output();
    let mut clients = Vec::new();
    for _ in 0..args.connections.max(1) {
        clients.push(conflux_host::cli::connect(&addr).await?);
    }
    match deploy {
        Ok(o) if o.status.success() => {}
        _ => {
            // Fall back to deploying through the API directly.
            let bytes = std::fs::read(&wasm)?;
            let header = pb::DeployHeader { entity_type: "counter".into(), ..Default::default() };
            let messages = conflux_host::api::deploy_messages(header, &bytes);
            clients[0].clone().deploy(futures::stream::iter(messages)).await?;
        }
    }
    println!("| keys | callers | ok calls | errors | calls/s | p50 µs | p99 µs | p99.9 µs |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut run = 0;
    for &keys in &args.keys {
        for &concurrency in &args.concurrency {
            run += 1;
            let c = run_cell(&clients, run, keys, concurrency, &args).await?;
            println!(
                "| {} | {} | {} | {} | {:.0} | {} | {} | {} |",
                c.keys,
                c.concurrency,
                c.ok,
                c.errors,
                c.ok as f64 / c.secs,
                c.hist.value_at_quantile(0.5),
                c.hist.value_at_quantile(0.99),
                c.hist.value_at_quantile(0.999),
            );
        }
    }
    Ok(())
}
