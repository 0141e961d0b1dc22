//! `conflux-raft-sim`: network cost of replication as the cluster grows. For
//! each node count it builds the shard groups of a cluster of that size on the
//! in-process `LocalNet` (real openraft groups, real WALs and sled stores in a
//! temporary directory; replicas placed by `placement::initial_placement`),
//! writes `--writes` write sets spread over the shards through their leaders
//! with `--concurrency` writers, and reports the Raft messages and bytes per
//! write, plus the idle heartbeat rate. Per-write cost must not grow with the
//! node count: a write only ever involves its shard's replicas.

use anyhow::{Context, ensure};
use clap::Parser;
use conflux_host::cluster::harness::LocalNet;
use conflux_host::cluster::placement::{initial_placement, shard_of};
use conflux_host::cluster::raft::{self, NodeId, Raft, ReplicaHost, ReplicaTable, ShardId};
use conflux_host::cluster::shards::ShardSet;
use conflux_host::model::{Keyspace, Op, WriteSet};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
#[command(about = "Raft messages and bytes per write at several cluster sizes (in-process network)")]
struct Opts {
    /// Cluster sizes to simulate.
    #[arg(long, value_delimiter = ',', default_value = "3,9,27")]
    nodes: Vec<u64>,
    /// Shards in every cluster (fixed at creation, as in a real cluster).
    #[arg(long, default_value_t = 27)]
    shards: u32,
    #[arg(long, default_value_t = 3)]
    replication_factor: usize,
    /// Write sets per cluster size.
    #[arg(long, default_value_t = 3000)]
    writes: u64,
    /// Concurrent writers.
    #[arg(long, default_value_t = 32)]
    concurrency: u64,
    /// Idle time over which heartbeat traffic is measured.
    #[arg(long, default_value_t = 2)]
    idle_secs: u64,
    /// Proposals per commit-log row (`ShardLog` at 1 and 3 replicas).
    #[arg(long, default_value_t = 20_000)]
    commit_log_proposals: u64,
    /// Failover trials on a 3-node cluster: under write load, the node leading
    /// shard 0 drops off the network; the gap is the time from then to the next
    /// acknowledged write to that shard.
    #[arg(long, default_value_t = 10)]
    failover_trials: u32,
    /// Also write the commit-log rows as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

struct Cluster {
    /// Per shard, its replicas' Rafts.
    shards: Vec<Vec<Raft>>,
    sets: Vec<ShardSet>,
    net: LocalNet,
    _dir: tempfile::TempDir,
}

async fn build(nodes: u64, shard_count: u32, replication_factor: usize) -> anyhow::Result<Cluster> {
    let dir = tempfile::tempdir()?;
    let net = LocalNet::new(nodes);
    let ids: Vec<NodeId> = (1..=nodes).collect();
    let placement = initial_placement(&ids, shard_count, replication_factor)?;
    let addrs: BTreeMap<NodeId, String> = ids.iter().map(|id| (*id, id.to_string())).collect();
    let config = raft::raft_config("sim", 10_000)?;
    let mut sets = Vec::new();
    for &id in &ids {
        let data_dir = dir.path().join(format!("node-{id}"));
        let sled_dir = data_dir.join("sled");
        let db = sled::Config::new().path(&sled_dir).open()?;
        let wal = raft::open_node_wal(&data_dir, Duration::from_micros(100))?;
        let host = ReplicaHost {
            node: id,
            data_dir,
            db,
            sled_dir,
            config: config.clone(),
            transport: net.transport(id),
            wal,
            apply_buffer: conflux_host::storage::ApplyBuffer::default(),
        };
        let table = ReplicaTable::default();
        net.attach(id, table.clone());
        sets.push(ShardSet::open(host, &placement, table).await?);
    }
    for set in &sets {
        set.bootstrap(&placement, &addrs).await?;
    }
    let mut shards = Vec::new();
    for (shard, nodes) in placement.shards.iter().enumerate() {
        let rafts: Vec<Raft> =
            nodes.iter().filter_map(|n| sets[(*n - 1) as usize].replica(shard as ShardId)).map(|r| r.raft).collect();
        rafts[0].wait(Some(Duration::from_secs(30))).metrics(|m| m.current_leader.is_some(), "leader").await?;
        shards.push(rafts);
    }
    Ok(Cluster { shards, sets, net, _dir: dir })
}

/// Writes through the shard's leader, following leader changes.
async fn write(rafts: &[Raft], ws: WriteSet) -> anyhow::Result<()> {
    for _ in 0..50 {
        let leader = rafts[0].metrics().borrow().current_leader;
        let raft = rafts.iter().find(|r| Some(r.metrics().borrow().id) == leader).unwrap_or(&rafts[0]);
        if raft.client_write(ws.clone().into()).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!("write not acknowledged after 50 attempts")
}

/// Throughput of `ShardLog` (the `CommitLog` the scheduler will use) on one
/// shard with `replicas` replicas: 64 concurrent proposers, then 200
/// sequential proposals for latency.
async fn commit_log_row(replicas: u64, proposals: u64) -> anyhow::Result<(f64, Duration, u64)> {
    use conflux_host::log::{CommitLog, LogConfig};
    let cluster = build(replicas, 1, replicas as usize).await?;
    let leader = cluster.shards[0][0].metrics().borrow().current_leader.context("a leader")?;
    let set = &cluster.sets[(leader - 1) as usize];
    let log = Arc::new(raft::ShardLog::new(set.replica(0).context("leader's replica")?, &LogConfig::default()));
    let per_task = proposals / 64;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..64u64 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_task {
                let ws = WriteSet {
                    ops: vec![Op::Put {
                        keyspace: Keyspace::State,
                        key: format!("{t}-{i}").into_bytes(),
                        value: vec![0; 64],
                    }],
                };
                log.propose(ws).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let rate = (per_task * 64) as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    for i in 0..200 {
        let ws = WriteSet {
            ops: vec![Op::Put { keyspace: Keyspace::State, key: format!("seq-{i}").into_bytes(), value: vec![0; 64] }],
        };
        log.propose(ws).await?;
    }
    let latency = started.elapsed() / 200;
    let largest = log.stats().largest_batch;
    for set in &cluster.sets {
        set.shutdown().await;
    }
    Ok((rate, latency, largest))
}

/// One failover trial; returns the gap.
async fn failover_trial(opts: &Opts, trial: u32) -> anyhow::Result<Duration> {
    let cluster = Arc::new(build(3, opts.shards, opts.replication_factor).await?);
    let rafts = cluster.shards[0].clone();
    let old = rafts[0].metrics().borrow().current_leader.context("shard 0 has a leader")?;
    let killed_at = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let first_after = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let (rafts, killed_at, first_after, stop) =
            (rafts.clone(), killed_at.clone(), first_after.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let ws = WriteSet {
                    ops: vec![Op::Put {
                        keyspace: Keyspace::State,
                        key: format!("w{w}-{i}").into_bytes(),
                        value: vec![1],
                    }],
                };
                // Ask the replicas that are still up who leads.
                let leader = rafts.iter().filter_map(|r| r.metrics().borrow().current_leader).max();
                let Some(raft) = rafts.iter().find(|r| Some(r.metrics().borrow().id) == leader) else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                let sent = Instant::now();
                if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(300), raft.client_write(ws.into())).await
                {
                    let killed = *killed_at.lock().unwrap();
                    if killed.is_some_and(|k| sent >= k) {
                        first_after.lock().unwrap().get_or_insert(Instant::now());
                    }
                } else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    *killed_at.lock().unwrap() = Some(Instant::now());
    cluster.net.remove_node(old);
    let deadline = Instant::now() + Duration::from_secs(20);
    while first_after.lock().unwrap().is_none() {
        ensure!(Instant::now() < deadline, "trial {trial}: no write acknowledged within 20 s of losing the leader");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await?;
    }
    let gap = first_after.lock().unwrap().unwrap() - killed_at.lock().unwrap().unwrap();
    for set in &cluster.sets {
        set.shutdown().await;
    }
    Ok(gap)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let opts = Opts::parse();
    ensure!(opts.concurrency > 0 && opts.writes > 0, "--writes and --concurrency must be positive");
    println!(
        "| nodes | shards × RF | writes | writes/s | msgs/write | bytes/write | idle msgs/s |\n|---|---|---|---|---|---|---|"
    );
    for &n in &opts.nodes {
        let cluster = Arc::new(
            build(n, opts.shards, opts.replication_factor).await.with_context(|| format!("building {n} nodes"))?,
        );
        // Idle first: heartbeats only.
        let m0 = cluster.net.stats().messages();
        tokio::time::sleep(Duration::from_secs(opts.idle_secs)).await;
        let idle_rate = (cluster.net.stats().messages() - m0) as f64 / opts.idle_secs as f64;

        let (m0, b0) = (cluster.net.stats().messages(), cluster.net.stats().bytes());
        let started = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..opts.concurrency {
            let cluster = cluster.clone();
            let (writes, concurrency, shards) = (opts.writes, opts.concurrency, opts.shards);
            tasks.push(tokio::spawn(async move {
                let mut i = w;
                while i < writes {
                    let key = format!("key-{i}");
                    let shard = shard_of("bench", &key, shards) as usize;
                    let ws = WriteSet {
                        ops: vec![Op::Put { keyspace: Keyspace::State, key: key.into_bytes(), value: vec![0; 64] }],
                    };
                    write(&cluster.shards[shard], ws).await?;
                    i += concurrency;
                }
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        let elapsed = started.elapsed();
        let msgs = cluster.net.stats().messages() - m0;
        let bytes = cluster.net.stats().bytes() - b0;
        println!(
            "| {n} | {} × {} | {} | {:.0} | {:.2} | {:.0} | {:.0} |",
            opts.shards,
            opts.replication_factor.min(n as usize),
            opts.writes,
            opts.writes as f64 / elapsed.as_secs_f64(),
            msgs as f64 / opts.writes as f64,
            bytes as f64 / opts.writes as f64,
            idle_rate
        );
        for set in &cluster.sets {
            set.shutdown().await;
        }
    }
    if opts.commit_log_proposals > 0 {
        println!(
            "\n| ShardLog, 1 shard | proposals/s (64 proposers) | sequential latency | largest batch |\n|---|---|---|---|"
        );
        let mut rows = Vec::new();
        for replicas in [1, 3] {
            let (rate, latency, largest) = commit_log_row(replicas, opts.commit_log_proposals).await?;
            println!("| {replicas} replica(s) | {rate:.0} | {:.2} ms | {largest} |", latency.as_secs_f64() * 1000.0);
            rows.push(serde_json::json!({
                "replicas": replicas,
                "proposals_per_sec": rate,
                "sequential_ms": latency.as_secs_f64() * 1000.0,
                "largest_batch": largest,
            }));
        }
        if let Some(path) = &opts.json {
            std::fs::write(path, serde_json::to_vec_pretty(&serde_json::json!({ "commit_log": rows }))?)
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    if opts.failover_trials > 0 {
        let mut gaps = Vec::new();
        for trial in 0..opts.failover_trials {
            gaps.push(failover_trial(&opts, trial).await?);
        }
        gaps.sort_unstable();
        let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
        println!(
            "\nfailover gap over {} trials (3 nodes, leader of shard 0 lost under write load): min {:.0} ms, median {:.0} ms, max {:.0} ms",
            gaps.len(),
            ms(&gaps[0]),
            ms(&gaps[gaps.len() / 2]),
            ms(&gaps[gaps.len() - 1])
        );
    }
    Ok(())
}
