//! `conflux-bench`: bounded load harness.
//!
//! Without a subcommand it drives the counter on Conflux alone (it starts its
//! own `conflux serve`, or uses `--addr`), runs every (keys × concurrency) cell
//! for a fixed time and request budget, checks that the counters add up to the
//! acknowledged calls, and prints a Markdown table.
//!
//! `conflux-bench peers` runs the same workloads side by side against Conflux,
//! Restate, a stateless service over PostgreSQL and native Rust (see
//! `conflux_bench::peers`); `cargo xtask bench-peers` installs the peers,
//! builds everything, runs it and writes the table into docs/BENCHMARKS.md.

use anyhow::{Context, ensure};
use clap::{Args, Parser, Subcommand};
use conflux_bench::conflux::ConfluxTarget;
use conflux_bench::load::LoadSpec;
use conflux_bench::peers::{self, PeersOpts, SYSTEMS};
use conflux_bench::workload::{CounterOp, counter_cell};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(about = "Load harness for Conflux and its peers", args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    counter: CounterArgs,
}

#[derive(Debug, Subcommand)]
#[expect(clippy::large_enum_variant, reason = "parsed once per run; boxing the peers' flags buys nothing")]
enum Cmd {
    /// Run the workloads side by side against Conflux, Restate, PostgreSQL and native Rust.
    Peers(PeersArgs),
    /// Deploy and roll back the counter under load: swap latency and p99 vs steady state.
    Swap(NodeArgs),
    /// The counter against one node, then against three founders (RF 3) per shard count.
    Cluster(ClusterArgs),
    /// Messages per second between entities, and bank transfer latency.
    Messaging(NodeArgs),
    /// Other entities' p99 while guests sleep in their turns (steady and hostile phases alternate).
    Sleepers(SleepersArgs),
}

#[derive(Debug, Args)]
struct SleepersArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// Guests sleeping in their turns at once during the hostile phases.
    #[arg(long, default_value_t = 8)]
    sleepers: usize,
    /// Seconds per phase.
    #[arg(long, default_value_t = 5)]
    secs: u64,
}

/// A fresh Conflux node for a scenario.
#[derive(Debug, Args)]
struct NodeArgs {
    /// The conflux binary to start [default: next to this executable].
    #[arg(long)]
    conflux_bin: Option<PathBuf>,
    /// Repetitions (swap: deploy + rollback rounds; messaging: sequential transfers ÷ 100).
    #[arg(long, default_value_t = 2)]
    rounds: u32,
}

/// The counter on Conflux alone.
#[derive(Debug, Args)]
struct CounterArgs {
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
    keys: Vec<u64>,
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

#[derive(Debug, Args)]
struct ClusterArgs {
    /// The conflux binary [default: next to this executable].
    #[arg(long)]
    conflux_bin: Option<PathBuf>,
    /// The counter component [default: built from examples/counter].
    #[arg(long)]
    counter_wasm: Option<PathBuf>,
    /// Comma-separated shard counts of the 3-node setups.
    #[arg(long, default_value = "64,8", value_delimiter = ',')]
    shards: Vec<u32>,
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    #[arg(long, default_value_t = 64)]
    callers: usize,
    /// Seconds per setup.
    #[arg(long, default_value_t = 5.0)]
    duration_secs: f64,
    /// Request budget per setup.
    #[arg(long, default_value_t = 2_000_000)]
    max_requests: u64,
    /// Also write the rows as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct PeersArgs {
    /// Comma-separated systems to run [default: all, in this order:
    /// grpc-echo, http-echo, conflux, restate, postgres-naive, postgres-locked, native-memory, native-fsync,
    /// native-group-commit].
    #[arg(long, value_delimiter = ',')]
    systems: Vec<String>,
    /// Short cells for validating the setup: keys 1,1000; callers 1,64; 1 s per
    /// cell (unless --duration-secs); 200 team-joiner users.
    #[arg(long)]
    quick: bool,
    /// Comma-separated counter key counts.
    #[arg(long, value_delimiter = ',')]
    keys: Vec<u64>,
    /// Comma-separated caller counts (fixed concurrency) for the counter cells.
    #[arg(long, value_delimiter = ',')]
    callers: Vec<usize>,
    /// Seconds per counter cell [default: 5; 1 with --quick].
    #[arg(long)]
    duration_secs: Option<f64>,
    /// Request budget per cell.
    #[arg(long, default_value_t = 2_000_000)]
    max_requests: u64,
    /// Team-joiner users [default: 1000; 200 with --quick].
    #[arg(long)]
    team_users: Option<u64>,
    /// Concurrent joins per user, each naming a different team.
    #[arg(long, default_value_t = 4)]
    team_teams: u64,
    /// Callers of the team-joiner cell.
    #[arg(long, default_value_t = 64)]
    team_callers: usize,
    /// Time bound of the team-joiner cell (seconds).
    #[arg(long, default_value_t = 60.0)]
    team_max_secs: f64,
    /// The conflux binary [default: next to this executable].
    #[arg(long)]
    conflux_bin: Option<PathBuf>,
    /// The counter component [default: built from examples/counter].
    #[arg(long)]
    counter_wasm: Option<PathBuf>,
    /// The team-joiner component, type `user` [default: built from examples/team-joiner].
    #[arg(long)]
    team_wasm: Option<PathBuf>,
    /// The team side, type `team`, which each join asks [default: built from
    /// examples/team-joiner/team, after team-joiner: that build leaves a
    /// client-only `team.wasm` in the same directory].
    #[arg(long)]
    team_side_wasm: Option<PathBuf>,
    /// The PostgreSQL service [default: conflux-bench-pg-service next to this executable].
    #[arg(long)]
    pg_service_bin: Option<PathBuf>,
    /// The RPC ceilings' server [default: conflux-bench-echo next to this executable].
    #[arg(long)]
    echo_bin: Option<PathBuf>,
    /// Directory with PostgreSQL's initdb and postgres [default: the newest /usr/lib/postgresql/*/bin].
    #[arg(long)]
    pg_bin_dir: Option<PathBuf>,
    /// Pooled PostgreSQL connections of the service.
    #[arg(long, default_value_t = 32)]
    pg_pool: usize,
    /// The Restate peer's npm project (after `npm ci`) [default: bench/peers/restate].
    #[arg(long)]
    restate_dir: Option<PathBuf>,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Builds guest components into `$CARGO_TARGET_DIR/guests` (or `target/guests`).
fn build_guest(package: &str, file: &str) -> anyhow::Result<PathBuf> {
    let root = conflux_bench::workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    let target = target.join("guests");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&root)
        .env("CARGO_TARGET_DIR", &target)
        .args(["build", "--release", "--target", "wasm32-wasip2", "-p", package])
        .status()?;
    ensure!(status.success(), "building the {package} guest failed");
    Ok(target.join("wasm32-wasip2/release").join(file))
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    Ok(std::env::current_exe()?.with_file_name(name))
}

/// The newest `/usr/lib/postgresql/<version>/bin` that has `pg_ctl`.
fn find_pg_bin_dir() -> anyhow::Result<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is not installed (/usr/lib/postgresql is missing): apt-get install postgresql")?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_ctl").exists().then_some((v, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, d)| d).context("no /usr/lib/postgresql/*/bin/pg_ctl: apt-get install postgresql")
}

async fn peers_command(a: PeersArgs) -> anyhow::Result<()> {
    let systems = if a.systems.is_empty() { SYSTEMS.iter().map(|s| s.to_string()).collect() } else { a.systems };
    for s in &systems {
        ensure!(SYSTEMS.contains(&s.as_str()), "unknown system {s:?}; known: {}", SYSTEMS.join(", "));
    }
    let or = |v: Vec<u64>, d: &[u64]| if v.is_empty() { d.to_vec() } else { v };
    let (keys, callers, secs, users) = if a.quick {
        (or(a.keys, &[1, 1000]), if a.callers.is_empty() { vec![1, 64] } else { a.callers }, 1.0, 200)
    } else {
        (or(a.keys, &[1, 10_000]), if a.callers.is_empty() { vec![1, 16, 64] } else { a.callers }, 5.0, 1000)
    };
    let opts = PeersOpts {
        systems,
        keys,
        callers,
        duration: Duration::from_secs_f64(a.duration_secs.unwrap_or(secs)),
        max_requests: a.max_requests,
        team_users: a.team_users.unwrap_or(users),
        team_teams: a.team_teams.max(1),
        team_callers: a.team_callers,
        team_max_duration: Duration::from_secs_f64(a.team_max_secs),
        conflux_bin: match a.conflux_bin {
            Some(b) => b,
            None => sibling("conflux")?,
        },
        counter_wasm: match a.counter_wasm {
            Some(w) => w,
            None => build_guest("counter", "counter.wasm")?,
        },
        team_wasm: match a.team_wasm {
            Some(w) => w,
            None => build_guest("team-joiner", "team_joiner.wasm")?,
        },
        team_side_wasm: match a.team_side_wasm {
            Some(w) => w,
            None => build_guest("team", "team.wasm")?,
        },
        pg_service_bin: match a.pg_service_bin {
            Some(b) => b,
            None => sibling("conflux-bench-pg-service")?,
        },
        echo_bin: match a.echo_bin {
            Some(b) => b,
            None => sibling("conflux-bench-echo")?,
        },
        pg_bin_dir: match a.pg_bin_dir {
            Some(d) => d,
            None => find_pg_bin_dir()?,
        },
        pg_pool: a.pg_pool,
        restate_dir: a.restate_dir.unwrap_or_else(|| conflux_bench::workspace_root().join("bench/peers/restate")),
    };
    let report = peers::run(&opts).await;
    if let Some(path) = a.json {
        std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let failed: Vec<&str> = report.systems.iter().filter(|s| s.error.is_some()).map(|s| s.name.as_str()).collect();
    ensure!(failed.is_empty(), "these systems did not complete: {}", failed.join(", "));
    Ok(())
}

/// A `conflux serve` on a fresh temporary data directory; stopped when dropped.
fn start_node(bin: Option<&PathBuf>) -> anyhow::Result<((conflux_bench::procs::Proc, tempfile::TempDir), String)> {
    let bin = match bin {
        Some(b) => b.clone(),
        None => sibling("conflux")?,
    };
    let (proc, addr, dir) = conflux_bench::systems::spawn_conflux(&bin)?;
    Ok(((proc, dir), addr))
}

async fn cluster_command(a: ClusterArgs) -> anyhow::Result<()> {
    ensure!(a.callers > 0 && a.keys > 0 && a.duration_secs > 0.0, "--callers, --keys and --duration-secs must be > 0");
    let opts = conflux_bench::cluster::ClusterOpts {
        conflux_bin: match a.conflux_bin {
            Some(b) => b,
            None => sibling("conflux")?,
        },
        counter_wasm: match a.counter_wasm {
            Some(w) => w,
            None => build_guest("counter", "counter.wasm")?,
        },
        shards: a.shards,
        keys: a.keys,
        callers: a.callers,
        duration: Duration::from_secs_f64(a.duration_secs),
        max_requests: a.max_requests,
    };
    let rows = conflux_bench::cluster::run(&opts).await?;
    println!("| setup | keys | callers | ok calls | errors | calls/s | ÷ 1 node | p50 µs | p99 µs | correctness |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    let solo = rows.first().map_or(0.0, |r| r.rate);
    for r in &rows {
        let setup = match r.shards {
            None => "1 node".to_owned(),
            Some(s) => format!("{} nodes, {s} shards", r.nodes),
        };
        println!(
            "| {setup} | {} | {} | {} | {} | {:.0} | {:.2}× | {} | {} | {} |",
            r.keys,
            r.callers,
            r.ok,
            r.errors,
            r.rate,
            r.rate / solo.max(1e-9),
            r.p50_us,
            r.p99_us,
            r.detail
        );
    }
    if let Some(path) = a.json {
        std::fs::write(&path, serde_json::to_vec_pretty(&rows)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let wrong: Vec<&str> = rows.iter().filter(|r| !r.correct).map(|r| r.detail.as_str()).collect();
    ensure!(wrong.is_empty(), "lost updates: {}", wrong.join("; "));
    Ok(())
}

async fn swap_command(a: NodeArgs) -> anyhow::Result<()> {
    let (_node, addr) = start_node(a.conflux_bin.as_ref())?;
    let target = ConfluxTarget::connect(&addr, 8).await?;
    let v1 = build_guest("counter", "counter.wasm")?;
    let v2 = build_guest("counter-v2", "counter_v2.wasm")?;
    conflux_bench::scenarios::swap(&target, &v1, &v2, a.rounds).await
}

async fn messaging_command(a: NodeArgs) -> anyhow::Result<()> {
    let (_node, addr) = start_node(a.conflux_bin.as_ref())?;
    let target = ConfluxTarget::connect(&addr, 8).await?;
    let relay = build_guest("relay", "relay.wasm")?;
    let bank = build_guest("bank", "bank.wasm")?;
    conflux_bench::scenarios::messaging(&target, &relay, &bank, a.rounds * 100).await
}

async fn sleepers_command(a: SleepersArgs) -> anyhow::Result<()> {
    let (_node, addr) = start_node(a.node.conflux_bin.as_ref())?;
    let target = ConfluxTarget::connect(&addr, 8).await?;
    let counter = build_guest("counter", "counter.wasm")?;
    let raw = build_guest("raw-waits", "raw_waits.wasm")?;
    conflux_bench::scenarios::sleepers(&target, &counter, &raw, a.sleepers, a.secs, a.node.rounds).await
}

async fn counter_command(args: CounterArgs) -> anyhow::Result<()> {
    let mut _daemon = None;
    let addr = match &args.addr {
        Some(a) => a.clone(),
        None => {
            let (node, addr) = start_node(args.conflux_bin.as_ref())?;
            _daemon = Some(node);
            addr
        }
    };
    let wasm = match &args.wasm {
        Some(w) => w.clone(),
        None => build_guest("counter", "counter.wasm")?,
    };
    let target = ConfluxTarget::connect(&addr, args.connections).await?;
    target.deploy("counter", Path::new(&wasm)).await.context("deploying the counter")?;
    let op = match args.op.as_str() {
        "add" => CounterOp::Add,
        "get" => CounterOp::Get,
        other => anyhow::bail!("--op must be add or get, not {other:?}"),
    };
    println!("| keys | callers | ok calls | errors | calls/s | p50 µs | p99 µs | p99.9 µs |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut run = 0;
    for &keys in &args.keys {
        for &concurrency in &args.concurrency {
            run += 1;
            let spec = LoadSpec {
                concurrency,
                duration: Duration::from_secs(args.duration_secs),
                max_requests: args.max_requests,
            };
            let (m, check) = counter_cell(&target, &format!("r{run}"), keys, op, spec).await?;
            println!(
                "| {keys} | {concurrency} | {} | {} | {:.0} | {} | {} | {} |",
                m.ok,
                m.errors,
                m.ok as f64 / m.secs,
                m.quantile_us(0.5),
                m.quantile_us(0.99),
                m.quantile_us(0.999),
            );
            ensure!(check.correct, "{} (keys={keys}, concurrency={concurrency})", check.detail);
        }
    }
    Ok(())
}

/// Completes when the process is asked to stop (Ctrl-C or SIGTERM).
async fn stop_requested() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let work = async {
        match cli.command {
            Some(Cmd::Peers(a)) => peers_command(a).await,
            Some(Cmd::Swap(a)) => swap_command(a).await,
            Some(Cmd::Cluster(a)) => cluster_command(a).await,
            Some(Cmd::Messaging(a)) => messaging_command(a).await,
            Some(Cmd::Sleepers(a)) => sleepers_command(a).await,
            None => counter_command(cli.counter).await,
        }
    };
    // Dropping `work` on a stop request drops every started process's guard,
    // which stops the process, then removes its temporary directory.
    tokio::select! {
        r = work => r,
        _ = stop_requested() => anyhow::bail!("interrupted: stopped everything this run started"),
    }
}
