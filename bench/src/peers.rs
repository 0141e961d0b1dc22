//! The side-by-side run: every system in turn, the same cells against each,
//! the correctness check after every cell, everything stopped afterwards, and
//! a JSON report (rendered into docs/BENCHMARKS.md by `cargo xtask bench-peers`).

use crate::load::{LoadSpec, Measured};
use crate::native::{NativeLog, NativeTarget};
use crate::procs::MemSampler;
use crate::systems::{start_conflux, start_pg_service, start_postgres, start_restate};
use crate::target::Target;
use crate::workload::{Check, CounterOp, counter_cell, team_cell};
use serde::Serialize;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Every system, in the order they run.
pub const SYSTEMS: [&str; 7] =
    ["conflux", "restate", "postgres-naive", "postgres-locked", "native-memory", "native-fsync", "native-group-commit"];

/// What to run and where the pieces are.
#[derive(Debug, Clone)]
pub struct PeersOpts {
    pub systems: Vec<String>,
    pub keys: Vec<u64>,
    pub callers: Vec<usize>,
    pub duration: Duration,
    pub max_requests: u64,
    pub team_users: u64,
    pub team_teams: u64,
    pub team_callers: usize,
    pub team_max_duration: Duration,
    pub conflux_bin: PathBuf,
    pub counter_wasm: PathBuf,
    pub team_wasm: PathBuf,
    pub pg_service_bin: PathBuf,
    pub pg_bin_dir: PathBuf,
    pub pg_pool: usize,
    pub restate_dir: PathBuf,
}

/// One measured cell.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub system: String,
    /// `counter` or `team-joiner`.
    pub workload: String,
    /// Counter keys, or team-joiner users.
    pub keys: u64,
    pub callers: usize,
    pub ok: u64,
    /// Refused joins (a second team): correct answers, counted in `rate`.
    pub refused: u64,
    pub errors: u64,
    pub secs: f64,
    /// Answered calls per second.
    pub rate: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    /// Peak PSS of the system's processes during the cell (MB).
    pub rss_mb: f64,
    pub check: Check,
}

/// One system of the run.
#[derive(Debug, Clone, Serialize)]
pub struct SystemReport {
    pub name: String,
    pub version: String,
    pub durability: String,
    /// Peak PSS over all its cells (MB).
    pub peak_rss_mb: f64,
    /// Set when the system could not be started or a cell failed to run.
    pub error: Option<String>,
    pub secs: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub duration_secs: f64,
    pub max_requests: u64,
    pub keys: Vec<u64>,
    pub callers: Vec<usize>,
    pub team_users: u64,
    pub team_teams: u64,
    pub team_callers: usize,
    pub pg_pool: usize,
    pub systems: Vec<SystemReport>,
    pub rows: Vec<Row>,
}

fn row(system: &str, workload: &str, keys: u64, callers: usize, m: &Measured, rss_mb: f64, check: Check) -> Row {
    Row {
        system: system.into(),
        workload: workload.into(),
        keys,
        callers,
        ok: m.ok,
        refused: m.refused,
        errors: m.errors,
        secs: m.secs,
        rate: m.rate(),
        p50_us: m.quantile_us(0.5),
        p99_us: m.quantile_us(0.99),
        p999_us: m.quantile_us(0.999),
        rss_mb,
        check,
    }
}

/// Prints the table header the rows below follow.
pub fn print_header() {
    println!(
        "| system | workload | keys | callers | ok | refused | errors | calls/s | p50 µs | p99 µs | p99.9 µs | RSS MB | check |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
}

fn print_row(r: &Row) {
    println!(
        "| {} | {} | {} | {} | {} | {} | {} | {:.0} | {} | {} | {} | {:.0} | {}{} |",
        r.system,
        r.workload,
        r.keys,
        r.callers,
        r.ok,
        r.refused,
        r.errors,
        r.rate,
        r.p50_us,
        r.p99_us,
        r.p999_us,
        r.rss_mb,
        if r.check.correct { "" } else { "**VIOLATED** " },
        r.check.detail
    );
}

/// Runs every cell of `opts` against one system; rows are appended as they finish.
async fn run_cells<T: Target>(
    t: &T,
    system: &str,
    opts: &PeersOpts,
    mem: &MemSampler,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let mut cell = 0;
    for &keys in &opts.keys {
        for &callers in &opts.callers {
            cell += 1;
            let spec = LoadSpec { concurrency: callers, duration: opts.duration, max_requests: opts.max_requests };
            mem.take_peak_mb();
            let (m, check) = counter_cell(t, &format!("{system}-c{cell}"), keys, CounterOp::Add, spec).await?;
            let r = row(system, "counter", keys, callers, &m, mem.take_peak_mb(), check);
            print_row(&r);
            rows.push(r);
        }
    }
    let spec = LoadSpec {
        concurrency: opts.team_callers,
        duration: opts.team_max_duration,
        max_requests: opts.team_users * opts.team_teams,
    };
    mem.take_peak_mb();
    let (m, check) = team_cell(t, &format!("{system}-u"), opts.team_users, opts.team_teams, spec).await?;
    let r = row(system, "team-joiner", opts.team_users, opts.team_callers, &m, mem.take_peak_mb(), check);
    print_row(&r);
    rows.push(r);
    Ok(())
}

/// Starts one system, runs its cells, stops it.
async fn run_system(name: &str, opts: &PeersOpts, rows: &mut Vec<Row>) -> anyhow::Result<(String, String, f64)> {
    let first = rows.len();
    let peak = |rows: &[Row]| rows[first..].iter().map(|r| r.rss_mb).fold(0.0, f64::max);
    match name {
        "conflux" => {
            let (running, t) = start_conflux(&opts.conflux_bin, &opts.counter_wasm, &opts.team_wasm).await?;
            let mem = MemSampler::start(running.pids.clone());
            run_cells(&t, name, opts, &mem, rows).await?;
            Ok((running.version.clone(), running.durability.clone(), peak(rows)))
        }
        "restate" => {
            let (running, t) = start_restate(&opts.restate_dir).await?;
            let mem = MemSampler::start(running.pids.clone());
            run_cells(&t, name, opts, &mem, rows).await?;
            Ok((running.version.clone(), running.durability.clone(), peak(rows)))
        }
        "postgres-naive" | "postgres-locked" => {
            let mode = name.trim_start_matches("postgres-");
            let pg = start_postgres(&opts.pg_bin_dir).await?;
            let (service, t) = start_pg_service(&opts.pg_service_bin, &pg, mode, opts.pg_pool).await?;
            let mut pids = pg.running.pids.clone();
            pids.push(service.pid());
            let mem = MemSampler::start(pids);
            run_cells(&t, name, opts, &mem, rows).await?;
            let how = if mode == "naive" {
                "naive read-modify-write: SELECT, then INSERT … ON CONFLICT DO UPDATE / INSERT, separate autocommit \
                 statements, no lock"
            } else {
                "locked: one READ COMMITTED transaction per call that locks the row (SELECT … FOR UPDATE) before \
                 reading and writing"
            };
            let version = format!(
                "{}; service: Rust (hyper 1 + tokio-postgres), {} pooled connections",
                pg.running.version, opts.pg_pool
            );
            drop(service);
            Ok((version, format!("{}. Service: {how}", pg.running.durability), peak(rows)))
        }
        "native-memory" | "native-fsync" | "native-group-commit" => {
            let (log, durability) = match name {
                "native-memory" => (NativeLog::None, "none: memory only"),
                "native-fsync" => (
                    NativeLog::FsyncEach,
                    "each change appended to a file and fdatasync'd under the mutex before the reply; no group commit",
                ),
                _ => (
                    NativeLog::GroupCommit,
                    "changes appended to a buffer under the mutex; one flusher thread writes and fdatasyncs what has \
                     accumulated (group commit); replies wait for the sync covering them",
                ),
            };
            let dir = tempfile::Builder::new().prefix("bench-native-").tempdir()?;
            let t = NativeTarget::new(log, dir.path())?;
            let mem = MemSampler::start(vec![std::process::id()]);
            run_cells(&t, name, opts, &mem, rows).await?;
            let version = "HashMap behind a std Mutex, called in process by the load generator's tokio tasks (RSS \
                           includes the load generator)";
            Ok((version.into(), durability.into(), peak(rows)))
        }
        other => anyhow::bail!("unknown system {other:?}; known: {}", SYSTEMS.join(", ")),
    }
}

/// Runs every system of `opts` in turn. A system that fails to start or run
/// is reported with its error; the others still run.
pub async fn run(opts: &PeersOpts) -> Report {
    let mut report = Report {
        duration_secs: opts.duration.as_secs_f64(),
        max_requests: opts.max_requests,
        keys: opts.keys.clone(),
        callers: opts.callers.clone(),
        team_users: opts.team_users,
        team_teams: opts.team_teams,
        team_callers: opts.team_callers,
        pg_pool: opts.pg_pool,
        systems: Vec::new(),
        rows: Vec::new(),
    };
    print_header();
    for name in &opts.systems {
        let start = Instant::now();
        let (version, durability, peak_rss_mb, error) = match run_system(name, opts, &mut report.rows).await {
            Ok((v, d, p)) => (v, d, p, None),
            Err(e) => {
                eprintln!("error: {name}: {e:#}");
                (String::new(), String::new(), 0.0, Some(format!("{e:#}")))
            }
        };
        eprintln!("conflux-bench: {name} took {:.0} s", start.elapsed().as_secs_f64());
        report.systems.push(SystemReport {
            name: name.clone(),
            version,
            durability,
            peak_rss_mb,
            error,
            secs: start.elapsed().as_secs_f64(),
        });
    }
    report
}
