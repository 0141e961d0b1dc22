//! `cargo xtask bench-peers`: the one command behind the side-by-side table in
//! docs/BENCHMARKS.md.
//!
//! 1. installs the peers if missing: PostgreSQL (`apt-get install postgresql`,
//!    through sudo unless root) and the Restate peer's npm project
//!    (`npm ci` in bench/peers/restate: restate-server and the TypeScript SDK);
//! 2. builds `conflux`, `conflux-bench`, `conflux-bench-pg-service` (release)
//!    and the counter and team-joiner components (wasm32-wasip2);
//! 3. runs `conflux-bench peers`, which starts each system in a temporary
//!    directory on 127.0.0.1, runs the workloads, checks correctness after
//!    every cell and stops everything it started (also on error or Ctrl-C);
//! 4. rewrites the section between `<!-- bench-peers:begin -->` and
//!    `<!-- bench-peers:end -->` in docs/BENCHMARKS.md: machine, versions,
//!    durability, the exact command, the results and the §7 comparison.

use anyhow::{Context, bail, ensure};
use clap::{Parser, Subcommand};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

#[derive(Debug, Parser)]
#[command(about = "Conflux project automation")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Benchmark Conflux side by side with Restate, PostgreSQL and native Rust,
    /// and write the table into docs/BENCHMARKS.md.
    BenchPeers(BenchPeers),
}

#[derive(Debug, clap::Args)]
struct BenchPeers {
    /// Seconds per counter cell [default: 5; 1 with --quick].
    #[arg(long)]
    duration_secs: Option<f64>,
    /// Short run with fewer cells, to validate the setup; prints the section
    /// instead of writing docs/BENCHMARKS.md.
    #[arg(long)]
    quick: bool,
    /// Comma-separated subset of systems (see `conflux-bench peers --help`).
    #[arg(long)]
    systems: Option<String>,
    /// Do not install anything; fail if a peer is missing.
    #[arg(long)]
    no_install: bool,
    /// Leave docs/BENCHMARKS.md alone (print the section instead).
    #[arg(long)]
    no_doc: bool,
    /// A sentence about the conditions of this run, printed in the section
    /// (e.g. that something else was running).
    #[arg(long)]
    note: Option<String>,
    /// Skip the replication part (one node against three, shard counts, the
    /// commit log's sequential latency at 1 and 3 replicas).
    #[arg(long)]
    no_cluster: bool,
}

/// The replication part of a run: `conflux-bench cluster` rows and
/// `conflux-raft-sim`'s commit-log rows, as they wrote them.
#[derive(Default)]
struct Replication {
    cluster: Option<Value>,
    commit_log: Option<Value>,
}

const BEGIN: &str = "<!-- bench-peers:begin -->";
const END: &str = "<!-- bench-peers:end -->";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask/ has a parent").to_owned()
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} failed ({status})");
    Ok(())
}

/// Trimmed stdout of a command, or None if it cannot run or fails.
fn capture(cmd: &mut Command) -> Option<String> {
    let o = cmd.output().ok()?;
    o.status.success().then(|| String::from_utf8_lossy(&o.stdout).trim().to_owned())
}

fn is_root() -> bool {
    capture(Command::new("id").arg("-u")).as_deref() == Some("0")
}

/// The newest `/usr/lib/postgresql/<version>/bin` with `pg_ctl`.
fn pg_bin_dir() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_ctl").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b)
}

fn install_postgres(allowed: bool) -> anyhow::Result<PathBuf> {
    if let Some(dir) = pg_bin_dir() {
        eprintln!("xtask: PostgreSQL found in {}", dir.display());
        return Ok(dir);
    }
    ensure!(allowed, "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/pg_ctl) and --no-install was given");
    let sudo = if is_root() { vec![] } else { vec!["sudo"] };
    for args in [vec!["apt-get", "update"], vec!["apt-get", "install", "-y", "--no-install-recommends", "postgresql"]] {
        let all: Vec<&str> = sudo.iter().copied().chain(args).collect();
        run(Command::new(all[0]).args(&all[1..]).env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    pg_bin_dir().context("apt-get installed postgresql but /usr/lib/postgresql/*/bin/pg_ctl is still missing")
}

/// `npm ci` in the Restate peer's project unless the installed tree matches
/// package-lock.json already.
fn install_restate(dir: &Path, allowed: bool) -> anyhow::Result<()> {
    let node =
        capture(Command::new("node").arg("--version")).context("Node.js (node) is required for Restate's SDK")?;
    let major: u32 = node.trim_start_matches('v').split('.').next().and_then(|m| m.parse().ok()).unwrap_or(0);
    ensure!(major >= 20, "Node.js >= 20 is required, found {node}");
    let lock = std::fs::read(dir.join("package-lock.json")).context("bench/peers/restate/package-lock.json")?;
    let stamp = dir.join("node_modules/.bench-peers-installed-lock.json");
    let arch = match std::env::consts::ARCH {
        "x86_64" => "x64",
        "aarch64" => "arm64",
        other => other,
    };
    let server =
        dir.join(format!("node_modules/@restatedev/restate-server-{}-{arch}/bin/restate-server", std::env::consts::OS));
    if server.exists() && std::fs::read(&stamp).ok().as_deref() == Some(&lock[..]) {
        eprintln!("xtask: Restate peer installed ({})", dir.display());
        return Ok(());
    }
    ensure!(allowed, "the Restate peer is not installed (npm ci in {}) and --no-install was given", dir.display());
    // --ignore-scripts: nothing pinned needs an install script (the server binary
    // ships in a platform package); @scarf/scarf's would only send analytics.
    run(Command::new("npm")
        .args(["ci", "--ignore-scripts", "--no-audit", "--no-fund"])
        .current_dir(dir)
        .env("SCARF_ANALYTICS", "false"))?;
    ensure!(server.exists(), "npm ci did not install {}", server.display());
    std::fs::write(&stamp, &lock)?;
    Ok(())
}

/// Cargo's target directory for this workspace (honours CARGO_TARGET_DIR and config).
fn target_dir() -> anyhow::Result<PathBuf> {
    let out = capture(cargo().current_dir(root()).args(["metadata", "--format-version", "1", "--no-deps"]))
        .context("cargo metadata")?;
    let v: Value = serde_json::from_str(&out)?;
    Ok(PathBuf::from(v["target_directory"].as_str().context("target_directory")?))
}

fn build(target: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    run(cargo().current_dir(root()).args(["build", "--release", "-p", "conflux-host", "-p", "conflux-bench"]))?;
    let guests = target.join("guests");
    let wasm = |packages: &[&str]| {
        let mut args = vec!["build", "--release", "--target", "wasm32-wasip2"];
        for p in packages {
            args.extend(["-p", *p]);
        }
        run(cargo().current_dir(root()).env("CARGO_TARGET_DIR", &guests).args(args))
    };
    wasm(&["counter", "team-joiner"])?;
    // After team-joiner, whose build leaves a client-only team.wasm here.
    wasm(&["team"])?;
    let out = guests.join("wasm32-wasip2/release");
    Ok((out.join("counter.wasm"), out.join("team_joiner.wasm")))
}

fn meminfo_gib() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemTotal:"))?.to_owned();
            let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(format!("{:.1} GiB", kb / 1024.0 / 1024.0))
        })
        .unwrap_or_else(|| "?".into())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| Some(c.lines().find(|l| l.starts_with("model name"))?.split_once(':')?.1.trim().to_owned()))
        .unwrap_or_else(|| "?".into())
}

/// Everything about the run that is not in the report.
struct RunInfo {
    command: String,
    note: Option<String>,
    date: String,
    machine: String,
    rustc: String,
    commit: String,
    install_secs: f64,
    build_secs: f64,
    run_secs: f64,
}

/// A latency in µs (the histogram's unit, 1 µs at least) as ms.
fn ms(us: &Value) -> String {
    let us = us.as_f64().unwrap_or(0.0);
    if us <= 1.0 {
        return "≤ 0.001".into();
    }
    let v = us / 1000.0;
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn num(v: &Value) -> String {
    let n = v.as_f64().unwrap_or(0.0);
    if n >= 100.0 { format!("{n:.0}") } else { format!("{n:.1}") }
}

fn cell<'a>(rows: &'a [Value], system: &str, workload: &str, keys: Option<u64>, callers: usize) -> Option<&'a Value> {
    rows.iter().find(|r| {
        r["system"] == system
            && r["workload"] == workload
            && keys.is_none_or(|k| r["keys"].as_u64() == Some(k))
            && r["callers"].as_u64() == Some(callers as u64)
    })
}

/// The generated section of docs/BENCHMARKS.md.
fn render(report: &Value, replication: &Replication, cx: &RunInfo) -> String {
    let rows = report["rows"].as_array().cloned().unwrap_or_default();
    let systems = report["systems"].as_array().cloned().unwrap_or_default();
    let mut s = String::new();
    let mut line = |t: &str| {
        s.push_str(t);
        s.push('\n');
    };
    line(BEGIN);
    line("## Side by side with peers (`cargo xtask bench-peers`)");
    line("");
    line(&format!(
        "Generated by `{}` on {} at commit `{}`; the command rewrites everything between the `bench-peers` \
         markers. Machine: {}. Every system ran on this machine in this one run, on 127.0.0.1, one system at a \
         time, with the load generator (`conflux-bench`, {}) on the same cores. Install {:.0} s, build {:.0} s, \
         run {:.0} s.",
        cx.command, cx.date, cx.commit, cx.machine, cx.rustc, cx.install_secs, cx.build_secs, cx.run_secs
    ));
    line("");
    if let Some(note) = &cx.note {
        line(&format!("**Conditions of this run:** {note}"));
        line("");
    }
    let keys: Vec<String> = report["keys"].as_array().into_iter().flatten().map(|k| k.to_string()).collect();
    let callers: Vec<String> = report["callers"].as_array().into_iter().flatten().map(|k| k.to_string()).collect();
    line(&format!(
        "Workloads: **counter** — `add 1` on key `n mod keys` for call `n`, {} s per cell or {} calls, keys {{{}}} × \
         callers {{{}}}, after every key of the cell was read once (warm-up); afterwards every addressed key is read \
         back and the totals must equal the acknowledged adds. **team-joiner** — {} users, each sent {} concurrent \
         `join` calls naming different teams, {} callers; afterwards every user's teams are read back. A violation \
         is a user on two teams, or told \"joined\" for two different teams. Latencies are per call at the client, \
         in ms; RSS is the peak proportional set size of the system's processes during the cell (for Restate: the \
         server and its Node.js service; for PostgreSQL: the postmaster, its backends and the service).",
        report["duration_secs"],
        report["max_requests"],
        keys.join(", "),
        callers.join(", "),
        report["team_users"],
        report["team_teams"],
        report["team_callers"],
    ));
    line("");
    line("| system | version | durability | peak RSS MB (PSS) |");
    line("|---|---|---|---:|");
    for sys in &systems {
        let error = sys["error"].as_str().map(|e| format!(" **did not complete: {e}**")).unwrap_or_default();
        line(&format!(
            "| {} | {} | {}{} | {} |",
            sys["name"].as_str().unwrap_or("?"),
            sys["version"].as_str().unwrap_or(""),
            sys["durability"].as_str().unwrap_or(""),
            error,
            num(&sys["peak_rss_mb"]),
        ));
    }
    line("");
    line(
        "| system | workload | keys | callers | ok | refused | errors | calls/s | ÷ grpc-echo | p50 ms | p99 ms | \
         p99.9 ms | RSS MB (PSS) | server CPU µs/call | WAL fdatasyncs/s | correctness |",
    );
    line("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in &rows {
        let check = &r["check"];
        let verdict = if check["correct"].as_bool() == Some(true) { "ok" } else { "**VIOLATED**" };
        // Every row beside the RPC ceiling measured in the same cell of this run.
        let callers = r["callers"].as_u64().unwrap_or(0) as usize;
        let ceiling = cell(&rows, "grpc-echo", r["workload"].as_str().unwrap_or("?"), r["keys"].as_u64(), callers)
            .and_then(|e| e["rate"].as_f64())
            .filter(|e| *e > 0.0);
        let rate = r["rate"].as_f64().unwrap_or(0.0);
        let fraction = ceiling.map_or("–".to_owned(), |e| format!("{:.0} %", 100.0 * rate / e));
        let opt = |v: &Value| v.as_f64().map_or("–".to_owned(), |x| format!("{x:.0}"));
        line(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {rate:.0} | {fraction} | {} | {} | {} | {} | {} | {} | {verdict}: {} |",
            r["system"].as_str().unwrap_or("?"),
            r["workload"].as_str().unwrap_or("?"),
            r["keys"],
            r["callers"],
            r["ok"],
            r["refused"],
            r["errors"],
            ms(&r["p50_us"]),
            ms(&r["p99_us"]),
            ms(&r["p999_us"]),
            num(&r["rss_mb"]),
            opt(&r["cpu_us_per_call"]),
            opt(&r["fsyncs_per_sec"]),
            check["detail"].as_str().unwrap_or(""),
        ));
    }
    line("");
    // DESIGN.md §7, Conflux against Restate, measured in this run.
    let max_keys = report["keys"].as_array().into_iter().flatten().filter_map(Value::as_u64).max().unwrap_or(0);
    let top = report["callers"].as_array().into_iter().flatten().filter_map(Value::as_u64).max().unwrap_or(0) as usize;
    line(&format!("### Against DESIGN.md §7 (Conflux ÷ Restate, {top} callers, this run)"));
    line("");
    line("| measure | Restate | Conflux | Conflux ÷ Restate | aim | verdict |");
    line("|---|---:|---:|---:|---:|---|");
    let verdict = |ok: bool| if ok { "met" } else { "**missed**" };
    for (keys, aim) in [(max_keys, 50.0), (1, 20.0)] {
        let (r, c) =
            (cell(&rows, "restate", "counter", Some(keys), top), cell(&rows, "conflux", "counter", Some(keys), top));
        match (r, c) {
            (Some(r), Some(c)) => {
                let (rr, cr) = (r["rate"].as_f64().unwrap_or(0.0), c["rate"].as_f64().unwrap_or(0.0));
                let x = cr / rr.max(1e-9);
                line(&format!(
                    "| throughput, counter, {keys} key{} | {rr:.0}/s | {cr:.0}/s | {x:.1}× | ≥ {aim:.0}× | {} |",
                    if keys == 1 { "" } else { "s" },
                    verdict(x >= aim)
                ));
            }
            _ => line(&format!("| throughput, counter, {keys} keys | – | – | – | ≥ {aim:.0}× | not measured |")),
        }
    }
    for keys in [max_keys, 1] {
        let (r, c) =
            (cell(&rows, "restate", "counter", Some(keys), top), cell(&rows, "conflux", "counter", Some(keys), top));
        if let (Some(r), Some(c)) = (r, c) {
            let (rp, cp) = (r["p99_us"].as_f64().unwrap_or(0.0), c["p99_us"].as_f64().unwrap_or(0.0));
            let x = cp / rp.max(1.0);
            line(&format!(
                "| p99, counter, {keys} key{} | {} ms | {} ms | {x:.2}× | ≤ 0.05× (1/20) | {} |",
                if keys == 1 { "" } else { "s" },
                ms(&r["p99_us"]),
                ms(&c["p99_us"]),
                verdict(x <= 0.05)
            ));
        }
    }
    let peak = |name: &str| systems.iter().find(|s| s["name"] == name).and_then(|s| s["peak_rss_mb"].as_f64());
    if let (Some(r), Some(c)) = (peak("restate"), peak("conflux")) {
        let x = c / r.max(1e-9);
        line(&format!(
            "| peak memory (PSS, whole run) | {r:.0} MB | {c:.0} MB | {x:.2}× | ≤ 0.2× (1/5) | {} |",
            verdict(x <= 0.2)
        ));
    }
    let violations = |name: &str| -> Option<u64> {
        let mine: Vec<&Value> = rows.iter().filter(|r| r["system"] == name).collect();
        (!mine.is_empty()).then(|| mine.iter().map(|r| r["check"]["violations"].as_u64().unwrap_or(0)).sum())
    };
    if let (Some(r), Some(c)) = (violations("restate"), violations("conflux")) {
        line(&format!(
            "| invariant violations + lost updates (all cells) | {r} | {c} | | 0 for Conflux | {} |",
            verdict(c == 0)
        ));
    }
    line("");
    render_replication(&mut line, replication);
    render_targets(&mut line, &rows, &systems, replication);
    line(END);
    s
}

/// The replication rows: one node against three founders per shard count.
fn render_replication(line: &mut impl FnMut(&str), r: &Replication) {
    let Some(rows) = r.cluster.as_ref().and_then(Value::as_array) else { return };
    line("### Replication on this machine (`conflux-bench cluster`, this run)");
    line("");
    line(
        "The counter, `add 1` over the keys below from 64 callers, against one node, then against node 1 of three \
         founders (replication factor 3) per shard count, each setup fresh; a call whose shard node 1 does not \
         lead is forwarded. All three nodes share this machine's cores with the load generator.",
    );
    line("");
    line("| setup | keys | callers | ok | errors | calls/s | ÷ 1 node | p50 ms | p99 ms | correctness |");
    line("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    let solo = rows.first().and_then(|r| r["rate"].as_f64()).unwrap_or(0.0);
    for row in rows {
        let setup = match row["shards"].as_u64() {
            None => "1 node".to_owned(),
            Some(s) => format!("{} nodes, {s} shards", row["nodes"]),
        };
        let rate = row["rate"].as_f64().unwrap_or(0.0);
        let verdict = if row["correct"].as_bool() == Some(true) { "ok" } else { "**VIOLATED**" };
        line(&format!(
            "| {setup} | {} | {} | {} | {} | {rate:.0} | {:.2}× | {} | {} | {verdict}: {} |",
            row["keys"],
            row["callers"],
            row["ok"],
            row["errors"],
            rate / solo.max(1e-9),
            ms(&row["p50_us"]),
            ms(&row["p99_us"]),
            row["detail"].as_str().unwrap_or(""),
        ));
    }
    line("");
    if let Some(rows) = r.commit_log.as_ref().and_then(|c| c["commit_log"].as_array()) {
        line(
            "`conflux-raft-sim --nodes 3 --writes 300 --commit-log-proposals 5000 --failover-trials 0`: one shard's \
             `ShardLog` on real WALs and the in-process network, proposals one after another (sequential) and from \
             64 proposers.",
        );
        line("");
        line("| replicas | sequential commit ms | proposals/s (64 proposers) | largest batch |");
        line("|---:|---:|---:|---:|");
        for row in rows {
            line(&format!(
                "| {} | {:.2} | {:.0} | {} |",
                row["replicas"],
                row["sequential_ms"].as_f64().unwrap_or(0.0),
                row["proposals_per_sec"].as_f64().unwrap_or(0.0),
                row["largest_batch"]
            ));
        }
        line("");
    }
}

/// Issue 23's targets, each from this run.
fn render_targets(line: &mut impl FnMut(&str), rows: &[Value], systems: &[Value], r: &Replication) {
    let top = rows.iter().filter_map(|r| r["callers"].as_u64()).max().unwrap_or(0) as usize;
    let keys = rows.iter().filter_map(|r| r["keys"].as_u64()).filter(|k| *k > 1).max().unwrap_or(0);
    let rate = |sys: &str, w: &str, k: u64| cell(rows, sys, w, Some(k), top).and_then(|c| c["rate"].as_f64());
    let field = |sys: &str, w: &str, k: u64, f: &str| cell(rows, sys, w, Some(k), top).and_then(|c| c[f].as_f64());
    let verdict = |ok: bool| if ok { "met" } else { "**missed**" };
    let mut out: Vec<String> = Vec::new();
    let mut row = |measure: String, value: Option<(f64, String)>, aim: &str, ok: &dyn Fn(f64) -> bool| {
        out.push(match value {
            Some((x, shown)) => format!("| {measure} | {shown} | {aim} | {} |", verdict(ok(x))),
            None => format!("| {measure} | not measured | {aim} | – |"),
        });
    };
    for (k, echo_aim, restate_aim) in [(keys, 0.5, 25.0), (1, 0.3, 50.0)] {
        let what = if k == 1 { "one hot key".to_owned() } else { format!("{k} keys") };
        let c = rate("conflux", "counter", k);
        let ratio = |other: Option<f64>| c.zip(other).map(|(c, o)| c / o.max(1e-9));
        row(
            format!("durable counter, {what}, {top} callers ÷ grpc-echo"),
            ratio(rate("grpc-echo", "counter", k)).map(|x| (x, format!("{:.0} %", x * 100.0))),
            &format!("≥ {:.0} %", echo_aim * 100.0),
            &|x| x >= echo_aim,
        );
        row(
            format!("durable counter, {what}, {top} callers ÷ Restate"),
            ratio(rate("restate", "counter", k)).map(|x| (x, format!("{x:.1}×"))),
            &format!("≥ {restate_aim:.0}×"),
            &|x| x >= restate_aim,
        );
    }
    let p99 = |sys: &str| field(sys, "counter", keys, "p99_us");
    row(
        format!("p99, {keys} keys, {top} callers ÷ grpc-echo's"),
        p99("conflux").zip(p99("grpc-echo")).map(|(c, e)| {
            let x = c / e.max(1.0);
            (x, format!("{x:.1}× ({:.1} ms)", c / 1000.0))
        }),
        "≤ 2×",
        &|x| x <= 2.0,
    );
    let get = |sys: &str| rate(sys, "counter-get", keys);
    row(
        format!("read-only get, {top} callers ÷ grpc-echo"),
        get("conflux").zip(get("grpc-echo")).map(|(c, e)| {
            let x = c / e.max(1e-9);
            (x, format!("{:.0} %", x * 100.0))
        }),
        "≥ 70 %",
        &|x| x >= 0.7,
    );
    row(
        format!("server CPU per durable add ({keys} keys)"),
        field("conflux", "counter", keys, "cpu_us_per_call").map(|x| (x, format!("{x:.0} µs"))),
        "≤ 40 µs",
        &|x| x <= 40.0,
    );
    let peak = |name: &str| systems.iter().find(|s| s["name"] == name).and_then(|s| s["peak_rss_mb"].as_f64());
    row(
        "peak memory (PSS, whole run) ÷ Restate's".to_owned(),
        peak("conflux").zip(peak("restate")).map(|(c, r)| {
            let x = c / r.max(1e-9);
            (x, format!("{x:.2}× ({c:.0} MB)"))
        }),
        "≤ 0.2×",
        &|x| x <= 0.2,
    );
    let cluster = r.cluster.as_ref().and_then(Value::as_array).cloned().unwrap_or_default();
    let setup =
        |shards: u64| cluster.iter().find(|c| c["shards"].as_u64() == Some(shards)).and_then(|c| c["rate"].as_f64());
    let solo = cluster.iter().find(|c| c["shards"].is_null()).and_then(|c| c["rate"].as_f64());
    row(
        "3 nodes (RF 3, 64 shards) ÷ 1 node, same machine".to_owned(),
        setup(64).zip(solo).map(|(c, s)| {
            let x = c / s.max(1e-9);
            (x, format!("{x:.2}×"))
        }),
        "≥ 0.5×",
        &|x| x >= 0.5,
    );
    row(
        "3 nodes: 64 shards ÷ 8 shards".to_owned(),
        setup(64).zip(setup(8)).map(|(a, b)| {
            let x = a / b.max(1e-9);
            (x, format!("{x:.2}×"))
        }),
        "≥ 0.9×",
        &|x| x >= 0.9,
    );
    let sequential = |replicas: u64| {
        r.commit_log.as_ref().and_then(|c| c["commit_log"].as_array()).and_then(|rows| {
            rows.iter().find(|x| x["replicas"].as_u64() == Some(replicas)).and_then(|x| x["sequential_ms"].as_f64())
        })
    };
    row(
        "sequential commit, 3 replicas ÷ 1".to_owned(),
        sequential(3).zip(sequential(1)).map(|(t, o)| {
            let x = t / o.max(1e-9);
            (x, format!("{x:.1}× ({t:.2} ms ÷ {o:.2} ms)"))
        }),
        "≤ 2×",
        &|x| x <= 2.0,
    );
    line("### Against issue 23's targets (this run)");
    line("");
    line("| measure | this run | target | verdict |");
    line("|---|---:|---:|---|");
    for l in &out {
        line(l);
    }
    line("");
}

/// Replaces the marked section of `doc` (or appends it).
fn splice(doc: &str, section: &str) -> String {
    let section = section.trim_end_matches('\n');
    match (doc.find(BEGIN), doc.find(END)) {
        (Some(b), Some(e)) if e > b => format!("{}{section}{}", &doc[..b], &doc[e + END.len()..]),
        _ => format!("{}\n\n{section}\n", doc.trim_end_matches('\n')),
    }
}

fn bench_peers(a: BenchPeers) -> anyhow::Result<()> {
    let root = root();
    let mut command = String::from("cargo xtask bench-peers");
    if let Some(d) = a.duration_secs {
        command.push_str(&format!(" --duration-secs {d}"));
    }
    if a.quick {
        command.push_str(" --quick");
    }
    if let Some(s) = &a.systems {
        command.push_str(&format!(" --systems {s}"));
    }
    if let Some(n) = &a.note {
        command.push_str(&format!(" --note {n:?}"));
    }

    let t = Instant::now();
    let pg_bin = install_postgres(!a.no_install)?;
    let restate_dir = root.join("bench/peers/restate");
    install_restate(&restate_dir, !a.no_install)?;
    let install_secs = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let target = target_dir()?;
    let (counter, team) = build(&target)?;
    // Run copies, so a concurrent rebuild cannot swap a binary mid-run.
    let work = target.join("bench-peers-run");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let _cleanup = RemoveOnDrop(work.clone());
    for bin in ["conflux", "conflux-bench", "conflux-bench-pg-service", "conflux-bench-echo", "conflux-raft-sim"] {
        std::fs::copy(target.join("release").join(bin), work.join(bin))
            .with_context(|| format!("copying {bin} from {}", target.display()))?;
    }
    let team_side = team.with_file_name("team.wasm");
    for (wasm, name) in [(&counter, "counter.wasm"), (&team, "team_joiner.wasm"), (&team_side, "team.wasm")] {
        std::fs::copy(wasm, work.join(name)).with_context(|| format!("copying {}", wasm.display()))?;
    }
    let build_secs = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let json = work.join("report.json");
    let mut bench = Command::new(work.join("conflux-bench"));
    bench
        .arg("peers")
        .arg("--conflux-bin")
        .arg(work.join("conflux"))
        .arg("--pg-service-bin")
        .arg(work.join("conflux-bench-pg-service"))
        .arg("--echo-bin")
        .arg(work.join("conflux-bench-echo"))
        .arg("--counter-wasm")
        .arg(work.join("counter.wasm"))
        .arg("--team-wasm")
        .arg(work.join("team_joiner.wasm"))
        .arg("--team-side-wasm")
        .arg(work.join("team.wasm"))
        .arg("--pg-bin-dir")
        .arg(&pg_bin)
        .arg("--restate-dir")
        .arg(&restate_dir)
        .arg("--json")
        .arg(&json);
    if let Some(d) = a.duration_secs {
        bench.arg("--duration-secs").arg(d.to_string());
    }
    if a.quick {
        bench.arg("--quick");
    }
    if let Some(s) = &a.systems {
        bench.arg("--systems").arg(s);
    }
    eprintln!("xtask: running {bench:?}");
    let status = bench.status().context("running conflux-bench")?;
    let report: Value = match std::fs::read(&json) {
        Ok(bytes) => serde_json::from_slice(&bytes)?,
        Err(_) => bail!("conflux-bench peers failed ({status}) before writing its report"),
    };
    let mut replication = Replication::default();
    let mut replication_ok = true;
    if !(a.quick || a.no_cluster || a.systems.is_some()) {
        let cluster_json = work.join("cluster.json");
        let mut cluster = Command::new(work.join("conflux-bench"));
        cluster
            .arg("cluster")
            .arg("--conflux-bin")
            .arg(work.join("conflux"))
            .arg("--counter-wasm")
            .arg(work.join("counter.wasm"))
            .arg("--json")
            .arg(&cluster_json);
        if let Some(d) = a.duration_secs {
            cluster.arg("--duration-secs").arg(d.to_string());
        }
        eprintln!("xtask: running {cluster:?}");
        replication_ok &= cluster.status().context("running conflux-bench cluster")?.success();
        let commit_json = work.join("commit_log.json");
        let mut sim = Command::new(work.join("conflux-raft-sim"));
        sim.args(["--nodes", "3", "--writes", "300", "--idle-secs", "1", "--failover-trials", "0"])
            .args(["--commit-log-proposals", "5000", "--json"])
            .arg(&commit_json);
        eprintln!("xtask: running {sim:?}");
        replication_ok &= sim.status().context("running conflux-raft-sim")?.success();
        let read = |p: &Path| std::fs::read(p).ok().and_then(|b| serde_json::from_slice(&b).ok());
        replication = Replication { cluster: read(&cluster_json), commit_log: read(&commit_json) };
    }
    let run_secs = t.elapsed().as_secs_f64();

    let commit = capture(Command::new("git").current_dir(&root).args(["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "?".into());
    let dirty =
        capture(Command::new("git").current_dir(&root).args(["status", "--porcelain"])).is_some_and(|s| !s.is_empty());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = capture(Command::new("uname").args(["-sr"])).unwrap_or_default();
    let cx = RunInfo {
        command,
        note: a.note.clone(),
        date: capture(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"])).unwrap_or_default(),
        machine: format!("{cores} cores ({}), {} RAM, {kernel}", cpu_model(), meminfo_gib()),
        rustc: capture(Command::new("rustc").arg("--version")).unwrap_or_default(),
        commit: format!("{commit}{}", if dirty { " + uncommitted changes" } else { "" }),
        install_secs,
        build_secs,
        run_secs,
    };
    let section = render(&report, &replication, &cx);
    if a.no_doc || a.quick {
        println!("{section}");
    } else {
        let path = root.join("docs/BENCHMARKS.md");
        let doc = std::fs::read_to_string(&path).context("reading docs/BENCHMARKS.md")?;
        std::fs::write(&path, splice(&doc, &section)).context("writing docs/BENCHMARKS.md")?;
        eprintln!("xtask: wrote the results into {}", path.display());
    }
    eprintln!("xtask: install {install_secs:.0} s, build {build_secs:.0} s, run {run_secs:.0} s");
    ensure!(status.success(), "conflux-bench peers reported a failure ({status}); see the table");
    ensure!(replication_ok, "the replication part (conflux-bench cluster or conflux-raft-sim) failed; see above");
    Ok(())
}

/// Removes a directory when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::BenchPeers(a) => bench_peers(a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_replaces_or_appends() {
        let section = format!("{BEGIN}\nnew\n{END}\n");
        let doc = format!("# B\n\nintro\n\n{BEGIN}\nold\n{END}\n\nafter\n");
        let once = splice(&doc, &section);
        assert_eq!(once, format!("# B\n\nintro\n\n{BEGIN}\nnew\n{END}\n\nafter\n"));
        assert_eq!(splice(&once, &section), once);
        assert_eq!(splice("# B\n", &section), format!("# B\n\n{section}"));
    }

    /// Each target is scored from the run's own rows: ratios against
    /// grpc-echo, Restate, one node and one replica, with the verdict the
    /// aim gives, and "not measured" where the run has no such row.
    #[test]
    fn targets_are_scored_from_the_runs_rows() {
        let cell = |system: &str, workload: &str, keys: u64, rate: f64, p99: f64| {
            serde_json::json!({ "system": system, "workload": workload, "keys": keys, "callers": 64,
                                "rate": rate, "p99_us": p99, "cpu_us_per_call": 30.0 })
        };
        let rows = vec![
            cell("grpc-echo", "counter", 10_000, 60_000.0, 4_000.0),
            cell("grpc-echo", "counter", 1, 60_000.0, 3_000.0),
            cell("grpc-echo", "counter-get", 10_000, 60_000.0, 4_000.0),
            cell("conflux", "counter", 10_000, 6_000.0, 20_000.0),
            cell("conflux", "counter", 1, 24_000.0, 6_000.0),
            cell("restate", "counter", 1, 400.0, 200_000.0),
        ];
        let systems = vec![serde_json::json!({ "name": "conflux", "peak_rss_mb": 100.0 })];
        let replication = Replication {
            cluster: Some(serde_json::json!([
                { "nodes": 1, "shards": null, "rate": 8_000.0 },
                { "nodes": 3, "shards": 64, "rate": 4_400.0 },
                { "nodes": 3, "shards": 8, "rate": 4_000.0 },
            ])),
            commit_log: Some(serde_json::json!({ "commit_log": [
                { "replicas": 1, "sequential_ms": 1.0 }, { "replicas": 3, "sequential_ms": 2.5 },
            ] })),
        };
        let mut out = String::new();
        render_targets(&mut |l: &str| out.push_str(&format!("{l}\n")), &rows, &systems, &replication);
        let row = |measure: &str| {
            out.lines().find(|l| l.starts_with(&format!("| {measure}"))).unwrap_or_else(|| panic!("{measure}: {out}"))
        };
        assert!(row("durable counter, 10000 keys, 64 callers ÷ grpc-echo").contains("| 10 % | ≥ 50 % | **missed** |"));
        assert!(row("durable counter, 10000 keys, 64 callers ÷ Restate").contains("| not measured |"));
        assert!(row("durable counter, one hot key, 64 callers ÷ grpc-echo").contains("| 40 % | ≥ 30 % | met |"));
        assert!(row("durable counter, one hot key, 64 callers ÷ Restate").contains("| 60.0× | ≥ 50× | met |"));
        assert!(row("p99, 10000 keys").contains("| 5.0× (20.0 ms) | ≤ 2× | **missed** |"));
        assert!(row("read-only get").contains("| not measured |"));
        assert!(row("server CPU per durable add").contains("| 30 µs | ≤ 40 µs | met |"));
        assert!(row("peak memory").contains("| not measured |"));
        assert!(row("3 nodes (RF 3, 64 shards) ÷ 1 node").contains("| 0.55× | ≥ 0.5× | met |"));
        assert!(row("3 nodes: 64 shards ÷ 8 shards").contains("| 1.10× | ≥ 0.9× | met |"));
        assert!(row("sequential commit").contains("| 2.5× (2.50 ms ÷ 1.00 ms) | ≤ 2× | **missed** |"));
    }
}
