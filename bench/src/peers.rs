//! The side-by-side run: every system in turn, the same cells against each,
//! the correctness check after every cell, everything stopped afterwards, and
//! a JSON report (rendered into docs/BENCHMARKS.md by `cargo xtask bench-peers`).

use crate::http::HttpTarget;
use crate::load::{LoadSpec, Measured};
use crate::native::{NativeLog, NativeTarget};
use crate::procs::MemSampler;
use crate::procs::tree_cpu_us;
use crate::systems::{Echo, start_conflux, start_echo, start_pg_service, start_postgres, start_restate};
use crate::target::Target;
use crate::workload::{Check, CounterOp, counter_cell, team_cell};
use serde::Serialize;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Every system, in the order they run: the RPC ceilings first, so every
/// other row can be read as a fraction of what any RPC service does here.
pub const SYSTEMS: [&str; 9] = [
    "grpc-echo",
    "http-echo",
    "conflux",
    "restate",
    "postgres-naive",
    "postgres-locked",
    "native-memory",
    "native-fsync",
    "native-group-commit",
];

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
    pub team_side_wasm: PathBuf,
    pub pg_service_bin: PathBuf,
    pub echo_bin: PathBuf,
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
    /// CPU (user + system) of the system's processes per answered call, µs;
    /// none for the in-process native systems (their CPU is the load generator's).
    pub cpu_us_per_call: Option<f64>,
    /// WAL fdatasyncs per second during the cell (Conflux only).
    pub fsyncs_per_sec: Option<f64>,
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

/// What is read off a system's processes around each cell, beside memory.
struct Probe {
    /// Processes whose CPU is the system's (none: in-process).
    pids: Option<Vec<u32>>,
    /// Conflux's Prometheus endpoint, for `conflux_wal_fdatasyncs`.
    metrics: Option<(HttpTarget, String)>,
}

/// Counters read at the start and at the end of a cell.
#[derive(Clone, Copy)]
struct Reading {
    cpu_us: Option<u64>,
    fsyncs: Option<f64>,
}

impl Probe {
    async fn read(&self) -> Reading {
        let fsyncs = match &self.metrics {
            Some((client, url)) => client.get_text(url).await.ok().and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("conflux_wal_fdatasyncs "))
                    .and_then(|v| v.trim().parse::<f64>().ok())
            }),
            None => None,
        };
        Reading { cpu_us: self.pids.as_deref().map(tree_cpu_us), fsyncs }
    }
}

/// What the counters say about a cell measured between `before` and `after`.
fn rates(before: Reading, after: Reading, m: &Measured) -> (Option<f64>, Option<f64>) {
    let answered = (m.ok + m.refused).max(1) as f64;
    let cpu = before.cpu_us.zip(after.cpu_us).map(|(b, a)| a.saturating_sub(b) as f64 / answered);
    let fsyncs = before.fsyncs.zip(after.fsyncs).map(|(b, a)| (a - b).max(0.0) / m.secs.max(1e-9));
    (cpu, fsyncs)
}

#[expect(clippy::too_many_arguments, reason = "one row's worth of measurements, named at the call site")]
fn row(
    system: &str,
    workload: &str,
    keys: u64,
    callers: usize,
    m: &Measured,
    rss_mb: f64,
    (cpu_us_per_call, fsyncs_per_sec): (Option<f64>, Option<f64>),
    check: Check,
) -> Row {
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
        cpu_us_per_call,
        fsyncs_per_sec,
        check,
    }
}

/// Prints the table header the rows below follow.
pub fn print_header() {
    println!(
        "| system | workload | keys | callers | ok | refused | errors | calls/s | p50 µs | p99 µs | p99.9 µs | RSS MB | \
         CPU µs/call | fdatasyncs/s | check |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
}

fn print_row(r: &Row) {
    println!(
        "| {} | {} | {} | {} | {} | {} | {} | {:.0} | {} | {} | {} | {:.0} | {} | {} | {}{} |",
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
        r.cpu_us_per_call.map_or("–".to_owned(), |c| format!("{c:.0}")),
        r.fsyncs_per_sec.map_or("–".to_owned(), |f| format!("{f:.0}")),
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
    probe: &Probe,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let mut cell = 0;
    let mut counter = async |keys: u64, callers: usize, op: CounterOp| -> anyhow::Result<()> {
        cell += 1;
        let spec = LoadSpec { concurrency: callers, duration: opts.duration, max_requests: opts.max_requests };
        mem.take_peak_mb();
        let before = probe.read().await;
        let (m, check) = counter_cell(t, &format!("{system}-c{cell}"), keys, op, spec).await?;
        let rates = rates(before, probe.read().await, &m);
        let workload = if op == CounterOp::Get { "counter-get" } else { "counter" };
        let r = row(system, workload, keys, callers, &m, mem.take_peak_mb(), rates, check);
        print_row(&r);
        rows.push(r);
        Ok(())
    };
    for &keys in &opts.keys {
        for &callers in &opts.callers {
            counter(keys, callers, CounterOp::Add).await?;
        }
    }
    // The read path alone: a read-only call, nothing to commit, at the
    // largest cell.
    if let (Some(&keys), Some(&callers)) = (opts.keys.iter().max(), opts.callers.iter().max()) {
        counter(keys, callers, CounterOp::Get).await?;
    }
    let spec = LoadSpec {
        concurrency: opts.team_callers,
        duration: opts.team_max_duration,
        max_requests: opts.team_users * opts.team_teams,
    };
    mem.take_peak_mb();
    let before = probe.read().await;
    let (m, check) = team_cell(t, &format!("{system}-u"), opts.team_users, opts.team_teams, spec).await?;
    let rates = rates(before, probe.read().await, &m);
    let r = row(system, "team-joiner", opts.team_users, opts.team_callers, &m, mem.take_peak_mb(), rates, check);
    print_row(&r);
    rows.push(r);
    Ok(())
}

/// Starts one system, runs its cells, stops it.
async fn run_system(name: &str, opts: &PeersOpts, rows: &mut Vec<Row>) -> anyhow::Result<(String, String, f64)> {
    let first = rows.len();
    let peak = |rows: &[Row]| rows[first..].iter().map(|r| r.rss_mb).fold(0.0, f64::max);
    let probe_of = |running: &crate::systems::Running| Probe {
        pids: Some(running.pids.clone()),
        metrics: running.metrics_url.clone().map(|url| (HttpTarget::new(&url), url)),
    };
    match name {
        "grpc-echo" | "http-echo" => {
            let echo = if name == "grpc-echo" { Echo::Grpc } else { Echo::Http };
            let (running, t) = start_echo(&opts.echo_bin, echo).await?;
            let mem = MemSampler::start(running.pids.clone());
            run_cells(&t, name, opts, &mem, &probe_of(&running), rows).await?;
            Ok((running.version.clone(), running.durability.clone(), peak(rows)))
        }
        "conflux" => {
            let (running, t) =
                start_conflux(&opts.conflux_bin, &opts.counter_wasm, &opts.team_wasm, &opts.team_side_wasm).await?;
            let mem = MemSampler::start(running.pids.clone());
            run_cells(&t, name, opts, &mem, &probe_of(&running), rows).await?;
            Ok((running.version.clone(), running.durability.clone(), peak(rows)))
        }
        "restate" => {
            let (running, t) = start_restate(&opts.restate_dir).await?;
            let mem = MemSampler::start(running.pids.clone());
            run_cells(&t, name, opts, &mem, &probe_of(&running), rows).await?;
            Ok((running.version.clone(), running.durability.clone(), peak(rows)))
        }
        "postgres-naive" | "postgres-locked" => {
            let mode = name.trim_start_matches("postgres-");
            let pg = start_postgres(&opts.pg_bin_dir).await?;
            let (service, t) = start_pg_service(&opts.pg_service_bin, &pg, mode, opts.pg_pool).await?;
            let mut pids = pg.running.pids.clone();
            pids.push(service.pid());
            let mem = MemSampler::start(pids.clone());
            run_cells(&t, name, opts, &mem, &Probe { pids: Some(pids), metrics: None }, rows).await?;
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
            run_cells(&t, name, opts, &mem, &Probe { pids: None, metrics: None }, rows).await?;
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
