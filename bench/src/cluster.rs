//! The cost of replication on one machine: the counter workload against one
//! node, then against node 1 of three founders (replication factor 3) for
//! each shard count, one setup after another in one run. The ratios are what
//! the cluster costs here: every node applies and logs every write, all on
//! the same cores, and two thirds of the calls are forwarded to their
//! shard's leader.

use crate::conflux::ConfluxTarget;
use crate::load::LoadSpec;
use crate::procs::{Founders, Proc, spawn_conflux_serve};
use crate::workload::{CounterOp, counter_cell, sum_counters};
use anyhow::Context;
use serde::Serialize;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const SECRET: &str = "cluster-bench-secret-0123456789ab";
/// How long a setup may take to deploy and to answer on every shard.
const READY_WITHIN: Duration = Duration::from_secs(60);
/// Keys read to find every shard led before the load starts.
const PROBE_KEYS: u64 = 1000;

/// What to run.
#[derive(Debug, Clone)]
pub struct ClusterOpts {
    pub conflux_bin: PathBuf,
    pub counter_wasm: PathBuf,
    /// Shard counts of the 3-node setups.
    pub shards: Vec<u32>,
    pub keys: u64,
    pub callers: usize,
    pub duration: Duration,
    pub max_requests: u64,
}

/// One setup's counter cell.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterRow {
    pub nodes: usize,
    /// `None` for the single node (its default shard count).
    pub shards: Option<u32>,
    pub keys: u64,
    pub callers: usize,
    pub ok: u64,
    pub errors: u64,
    pub rate: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub correct: bool,
    pub detail: String,
}

/// One node, then three founders per shard count.
pub async fn run(opts: &ClusterOpts) -> anyhow::Result<Vec<ClusterRow>> {
    let mut rows = vec![measure(opts, 1, None).await.context("one node")?];
    for &shards in &opts.shards {
        rows.push(measure(opts, 3, Some(shards)).await.with_context(|| format!("3 nodes, {shards} shards"))?);
    }
    Ok(rows)
}

async fn measure(opts: &ClusterOpts, nodes: usize, shards: Option<u32>) -> anyhow::Result<ClusterRow> {
    let root = tempfile::Builder::new().prefix("bench-cluster-").tempdir()?;
    let founders = Founders::new(nodes, SECRET, shards.unwrap_or_default())?;
    let mut procs: Vec<Proc> = Vec::new();
    for (i, addr) in founders.addrs.iter().enumerate() {
        // The single node runs alone: no cluster flags, the default shard count.
        let args = if shards.is_some() { founders.args(i) } else { Vec::new() };
        let mut cmd = Command::new(&opts.conflux_bin);
        cmd.env("RUST_LOG", "warn");
        procs.push(spawn_conflux_serve(cmd, addr, &root.path().join(format!("n{}", i + 1)), &args)?.0);
    }
    let target = ConfluxTarget::connect(&format!("http://{}", founders.addrs[0]), 8).await?;
    // Founders elect their shard groups' leaders after they start: deploy,
    // then read keys of every shard, until both go through.
    let deadline = Instant::now() + READY_WITHIN;
    while let Err(e) = target.deploy("counter", &opts.counter_wasm).await {
        anyhow::ensure!(Instant::now() < deadline, "deploying the counter: {e:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    while let Err(e) = sum_counters(&target, "probe", PROBE_KEYS).await {
        anyhow::ensure!(Instant::now() < deadline, "not every shard answers: {e:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let spec = LoadSpec { concurrency: opts.callers, duration: opts.duration, max_requests: opts.max_requests };
    let (m, check) = counter_cell(&target, "c", opts.keys, CounterOp::Add, spec).await?;
    // The processes stop before their directory goes.
    drop(procs);
    drop(root);
    Ok(ClusterRow {
        nodes,
        shards,
        keys: opts.keys,
        callers: opts.callers,
        ok: m.ok,
        errors: m.errors,
        rate: m.ok as f64 / m.secs,
        p50_us: m.quantile_us(0.5),
        p99_us: m.quantile_us(0.99),
        correct: check.correct,
        detail: check.detail,
    })
}
