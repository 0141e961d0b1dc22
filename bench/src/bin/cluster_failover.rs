//! `conflux-cluster-failover`: the failover gap of a real cluster. Starts
//! `--nodes` `conflux serve` processes on 127.0.0.1, deploys the counter and
//! keeps `--callers` callers adding (with idempotency keys, retrying as a
//! client would) through the members that survive. Each trial `kill -9`s
//! (or, with `--sigterm`, stops gracefully) the member leading the most shards and measures, per shard it led, the time
//! until a call of an entity of that shard succeeds again; then restarts it
//! and waits until every replica has caught up. Prints one line per trial and
//! a summary; all counters must add up to the acknowledged calls.

use anyhow::{Context, ensure};
use clap::Parser;
use conflux_bench::procs::{Founders, Proc, spawn_conflux_serve};
use conflux_client::pb;
use conflux_host::cluster::placement::shard_of;
use rustix::process::Signal;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const SECRET: &str = "failover-bench-secret-0123456789";

#[derive(Debug, Parser)]
#[command(about = "Failover gap after kill -9 of a shard leader, on real processes")]
struct Args {
    /// The conflux binary [default: next to this executable].
    #[arg(long)]
    conflux_bin: Option<PathBuf>,
    /// The counter component [default: target/guests/…/counter.wasm].
    #[arg(long)]
    wasm: Option<PathBuf>,
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    #[arg(long, default_value_t = 64)]
    shards: u32,
    #[arg(long, default_value_t = 5)]
    trials: usize,
    /// Callers adding through the surviving members during each trial.
    #[arg(long, default_value_t = 16)]
    callers: usize,
    /// Counter entities the callers spread over.
    #[arg(long, default_value_t = 1000)]
    keys: u64,
    /// Stop the leader with SIGTERM (a graceful stop: it hands its
    /// leaderships off first) instead of kill -9.
    #[arg(long)]
    sigterm: bool,
}

struct Member {
    addr: String,
    dir: PathBuf,
    args: Vec<String>,
    proc: Option<Proc>,
}

impl Member {
    fn start(&mut self, bin: &std::path::Path) -> anyhow::Result<()> {
        let cmd = std::process::Command::new(bin);
        self.proc = Some(spawn_conflux_serve(cmd, &self.addr, &self.dir, &self.args)?.0);
        Ok(())
    }

    /// Sends SIGTERM and lets the member stop in the background; the handle
    /// ends once it has exited.
    fn terminate(&mut self) -> std::thread::JoinHandle<()> {
        let p = self.proc.take();
        std::thread::spawn(move || drop(p))
    }

    fn kill9(&mut self) {
        if let Some(p) = self.proc.take() {
            let pid = rustix::process::Pid::from_raw(p.pid() as i32).expect("a child's pid");
            let _ = rustix::process::kill_process(pid, Signal::KILL);
            drop(p);
        }
    }
}

async fn status(addr: &str) -> anyhow::Result<pb::StatusResponse> {
    let mut c = conflux_client::connect(addr).await?;
    Ok(c.status(pb::StatusRequest {}).await?.into_inner())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let bin = match a.conflux_bin {
        Some(b) => b,
        None => std::env::current_exe()?.with_file_name("conflux"),
    };
    let wasm = a
        .wasm
        .unwrap_or_else(|| conflux_bench::workspace_root().join("target/guests/wasm32-wasip2/release/counter.wasm"));
    ensure!(wasm.exists(), "{} is missing: build examples/counter for wasm32-wasip2 or pass --wasm", wasm.display());
    let root = tempfile::tempdir()?;
    let founders = Founders::new(a.nodes, SECRET, a.shards)?;
    let addrs = founders.addrs.clone();
    let mut members: Vec<Member> = addrs
        .iter()
        .enumerate()
        .map(|(i, addr)| Member {
            addr: addr.clone(),
            dir: root.path().join(format!("n{}", i + 1)),
            args: founders.args(i),
            proc: None,
        })
        .collect();
    for m in &mut members {
        m.start(&bin)?;
    }
    let out = std::process::Command::new(&bin)
        .args(["--addr", &format!("http://{}", addrs[0]), "deploy", "counter"])
        .arg(&wasm)
        .output()?;
    ensure!(out.status.success(), "deploy failed: {}", String::from_utf8_lossy(&out.stderr));
    let acked = Arc::new(AtomicU64::new(0));
    let mut gaps_ms = Vec::new();
    println!("trial\tvictim\tshards it led\tmax gap ms\tmedian gap ms");
    for trial in 0..a.trials {
        let s = status(&addrs[0]).await?;
        let victim_node = s.nodes.iter().max_by_key(|n| n.shards_led).context("no nodes")?;
        let victim: usize = victim_node.node_id.parse::<usize>()? - 1;
        let led: Vec<u32> =
            s.shards.iter().filter(|sh| sh.leader == victim_node.node_id).map(|sh| sh.shard_id).collect();
        let survivors: Vec<String> = (0..a.nodes).filter(|i| *i != victim).map(|i| addrs[i].clone()).collect();
        // One entity per shard the victim leads, to probe.
        let probes: Vec<String> = led
            .iter()
            .map(|shard| (0..).map(|k| format!("probe-{k}")).find(|id| shard_of("counter", id, a.shards) == *shard))
            .map(|id| id.expect("some id hashes to every shard"))
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let mut load = Vec::new();
        for caller in 0..a.callers {
            let mut c = conflux_client::connect(&survivors[caller % survivors.len()]).await?;
            let (stop, acked) = (stop.clone(), acked.clone());
            let keys = a.keys;
            load.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let id = format!("c{}", (n * 7919 + caller as u64) % keys);
                    if conflux_bench::conflux::add_keyed(&mut c, &id, format!("t{trial}-{caller}-{n}"), &stop).await {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let killed = Instant::now();
        let exiting = if a.sigterm {
            Some(members[victim].terminate())
        } else {
            members[victim].kill9();
            None
        };
        let mut gaps = Vec::new();
        let mut tasks = Vec::new();
        for id in probes {
            let addr = survivors[0].clone();
            tasks.push(tokio::spawn(async move {
                let mut c = conflux_client::connect(&addr).await.expect("connect");
                loop {
                    let req = pb::InvokeRequest {
                        entity: Some(pb::EntityRef { entity_type: "counter".into(), id: id.clone() }),
                        operation: "get".into(),
                        payload: Vec::new(),
                        ..Default::default()
                    };
                    if c.invoke(req).await.is_ok() {
                        return killed.elapsed();
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }));
        }
        for t in tasks {
            gaps.push(t.await?.as_secs_f64() * 1000.0);
        }
        stop.store(true, Ordering::Relaxed);
        for t in load {
            t.await?;
        }
        gaps.sort_by(f64::total_cmp);
        let max = gaps.last().copied().unwrap_or(0.0);
        let median = gaps.get(gaps.len() / 2).copied().unwrap_or(0.0);
        println!("{trial}\t{}\t{}\t{max:.0}\t{median:.0}", victim + 1, led.len());
        gaps_ms.push(max);
        if let Some(exiting) = exiting {
            exiting.join().expect("the stopping member's waiter");
        }
        members[victim].start(&bin)?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let s = status(&addrs[victim]).await?;
            let caught_up = s.nodes.iter().all(|n| n.state == "up")
                && s.shards.iter().all(|sh| !sh.leader.is_empty() && sh.replication_lag == 0);
            if caught_up {
                break;
            }
            ensure!(Instant::now() < deadline, "node {} did not catch up within 120 s", victim + 1);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Every acknowledged add is there, once.
    let mut c = conflux_client::connect(&addrs[0]).await?;
    let mut total = 0i64;
    for k in 0..a.keys {
        let req = pb::InvokeRequest {
            entity: Some(pb::EntityRef { entity_type: "counter".into(), id: format!("c{k}") }),
            operation: "get".into(),
            ..Default::default()
        };
        total += serde_json::from_slice::<i64>(&c.invoke(req).await?.into_inner().reply)?;
    }
    let acked = acked.load(Ordering::Relaxed);
    ensure!(total == acked as i64, "counters hold {total} but {acked} adds were acknowledged");
    gaps_ms.sort_by(f64::total_cmp);
    println!(
        "\n{} trials: failover gap min {:.0} ms, median {:.0} ms, max {:.0} ms; {acked} acknowledged adds, all present once",
        gaps_ms.len(),
        gaps_ms[0],
        gaps_ms[gaps_ms.len() / 2],
        gaps_ms[gaps_ms.len() - 1]
    );
    for m in &mut members {
        m.proc.take();
    }
    Ok(())
}
