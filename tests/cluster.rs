//! End-to-end tests of a cluster of real `conflux` processes on 127.0.0.1:
//! deploy through one node, invoke through every node, hot swap under load,
//! `kill -9` of a member (a shard leader) under load with bank transfers,
//! asks through `kill -9` of the caller's and the callee's leaders, a
//! partition, and the cluster changing shape under load: growing by joins,
//! draining a member, and re-replicating a member that stays down.

mod support;

use conflux_client::pb;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::*;
use tonic::Code;

const SECRET: &str = "cluster-test-secret-0123456789";

/// One cluster at a time: each runs three to five members and their load on
/// the machine's cores, and two at once starve each other's elections.
static ONE_CLUSTER_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_cluster_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_CLUSTER_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}
/// Fewer shards than the default keeps start-up quick; the code path is the same.
const SHARDS: &str = "cluster.shard_count=8";

/// Members with fixed ports, each on its own data directory.
struct Cluster {
    dirs: Vec<PathBuf>,
    addrs: Vec<String>,
    /// Each member's `serve` flags beyond its address and directory.
    args: Vec<Vec<String>>,
    nodes: Vec<Option<Daemon>>,
}

/// `size` free 127.0.0.1 addresses; the members bind them a moment later.
fn free_addrs(size: usize) -> Vec<String> {
    (0..size).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string()).collect()
}

fn peer_list(addrs: &[String]) -> String {
    addrs.iter().enumerate().map(|(k, a)| format!("{}={a}", k + 1)).collect::<Vec<_>>().join(",")
}

impl Cluster {
    fn start(root: &Path, size: usize) -> Cluster {
        Self::start_extra(root, size, &[])
    }

    fn start_extra(root: &Path, size: usize, extra: &[&str]) -> Cluster {
        let addrs = free_addrs(size);
        let views = vec![peer_list(&addrs); size];
        Self::start_with(root, addrs, views, extra)
    }

    /// Founding members; member `i` reaches the others through `views[i]`.
    fn start_with(root: &Path, addrs: Vec<String>, views: Vec<String>, extra: &[&str]) -> Cluster {
        let size = addrs.len();
        let mut c = Cluster { dirs: Vec::new(), addrs: Vec::new(), args: Vec::new(), nodes: Vec::new() };
        for (i, (addr, view)) in addrs.into_iter().zip(views).enumerate() {
            let id = (i + 1).to_string();
            let mut args = vec!["--node-id", &id, "--peer", &view, "--cluster-secret", SECRET, "--set", SHARDS];
            args.extend_from_slice(extra);
            c.add(root, addr, &args);
        }
        for i in 0..size {
            c.restart(i);
        }
        c
    }

    fn add(&mut self, root: &Path, addr: String, args: &[&str]) {
        self.dirs.push(root.join(format!("n{}", self.dirs.len() + 1)));
        self.addrs.push(addr);
        self.args.push(args.iter().map(|s| s.to_string()).collect());
        self.nodes.push(None);
    }

    /// Starts a new member that joins through member `via`; returns its index.
    fn join(&mut self, root: &Path, via: usize, extra: &[&str]) -> usize {
        let i = self.dirs.len();
        let id = (i + 1).to_string();
        let mut args = vec!["--node-id", &id, "--join", &self.addrs[via], "--cluster-secret", SECRET];
        args.extend_from_slice(extra);
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        self.add(root, free_addrs(1).remove(0), &args.iter().map(String::as_str).collect::<Vec<_>>());
        self.restart(i);
        i
    }

    fn restart(&mut self, i: usize) {
        let args: Vec<&str> = self.args[i].iter().map(String::as_str).collect();
        self.nodes[i] = Some(Daemon::start_at(&self.dirs[i], &self.addrs[i], &args));
    }

    fn node(&self, i: usize) -> &Daemon {
        self.nodes[i].as_ref().expect("running")
    }

    fn kill9(&mut self, i: usize) {
        self.nodes[i].take().expect("running").kill9();
    }
}

impl Drop for Cluster {
    /// A failed test shows what the members logged.
    fn drop(&mut self) {
        if std::thread::panicking() {
            for dir in &self.dirs {
                let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
                let lines: Vec<&str> = log.lines().filter(|l| !l.contains("openraft")).collect();
                eprintln!("--- {} (last 60 lines) ---", dir.display());
                for l in &lines[lines.len().saturating_sub(60)..] {
                    eprintln!("{l}");
                }
            }
        }
    }
}

const COUNTERS: usize = 20;

#[test]
fn three_processes_serve_every_entity_from_every_node_through_a_hot_swap() {
    let _one = one_cluster_at_a_time();
    let root = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(root.path(), 3);
    deploy(cluster.node(0), "counter", &guest_wasm("counter"));
    let v2 = guest_wasm("counter-v2");
    rt().block_on(async {
        // A deploy returns once every member serves it: any node runs it now.
        for i in 0..3 {
            let mut c = cluster.node(i).client().await;
            call(&mut c, "counter", &format!("probe{i}"), "get", "").await.unwrap();
        }
        // Three callers per node, each adding 1 to every counter in turn.
        let mut tasks = Vec::new();
        for i in 0..3 {
            for caller in 0..3 {
                let mut c = cluster.node(i).client().await;
                tasks.push(tokio::spawn(async move {
                    let mut failures = Vec::new();
                    for k in 0..COUNTERS * 4 {
                        let id = format!("c{}", (k + caller) % COUNTERS);
                        if let Err(e) = call(&mut c, "counter", &id, "add", "1").await {
                            failures.push(format!(
                                "node {} {:?} {id}: {:?} {}",
                                i + 1,
                                std::time::SystemTime::now(),
                                e.code(),
                                e.message()
                            ));
                        }
                    }
                    failures
                }));
            }
        }
        // Hot swap through another node while the calls run.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let out = cluster.node(1).cli(&["deploy", "counter", v2.to_str().unwrap()]);
        assert!(out.status.success(), "deploy of v2 failed: {}", stderr(&out));
        let mut failures = Vec::new();
        for t in tasks {
            failures.extend(t.await.unwrap());
        }
        assert!(failures.is_empty(), "{} calls failed, e.g. {:?}", failures.len(), &failures[..failures.len().min(5)]);
        // 9 callers × 4 adds per counter, read through every node.
        for i in 0..3 {
            let mut c = cluster.node(i).client().await;
            for k in 0..COUNTERS {
                let total = call(&mut c, "counter", &format!("c{k}"), "get", "").await.unwrap();
                assert_eq!(total, json!(36), "counter c{k} read through node {}", i + 1);
            }
            // The swap returned, so v2 answers through every node.
            for k in 0..COUNTERS {
                let v = call(&mut c, "counter", &format!("c{k}"), "version", "").await.unwrap();
                assert_eq!(v, json!(2), "c{k} through node {}", i + 1);
            }
        }
    });
}

/// An 18 MB Python component (the largest of the interpreter guests) deployed
/// through one member travels to the others outside the Raft log, compiles
/// there off the hot path, and serves from every node; the Rust counter keeps
/// serving through all three while they compile.
#[test]
fn interpreter_components_replicate_and_serve_from_every_member() {
    let _one = one_cluster_at_a_time();
    let root = tempfile::tempdir().unwrap();
    let cache = compile_cache_setting();
    let cluster = Cluster::start_extra(root.path(), 3, &["--set", &cache]);
    deploy(cluster.node(0), "counter", &guest_wasm("counter"));
    let runtime = rt();
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    runtime.block_on(async {
        for i in 0..3 {
            let mut c = cluster.node(i).client().await;
            let stop = stop.clone();
            load.push(tokio::spawn(async move {
                let (mut ok, mut failed) = (0u64, Vec::new());
                for k in 0..100_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    match call(&mut c, "counter", &format!("c{}", k % 10), "add", "1").await {
                        Ok(_) => ok += 1,
                        Err(e) => failed.push(e),
                    }
                }
                (ok, failed)
            }));
        }
    });
    deploy(cluster.node(1), "counter_py", &polyglot_wasm("counter-py"));
    stop.store(true, Ordering::Relaxed);
    runtime.block_on(async {
        let mut acked = 0;
        for t in load {
            let (ok, failed) = t.await.unwrap();
            assert!(failed.is_empty(), "{} calls failed while members compiled, e.g. {:?}", failed.len(), failed[0]);
            acked += ok;
        }
        assert!(acked > 0, "the Rust load ran");
        for i in 0..3 {
            let mut c = cluster.node(i).client().await;
            assert_eq!(
                call(&mut c, "counter_py", "p", "add", "1").await.unwrap(),
                json!(i + 1),
                "through node {}",
                i + 1
            );
        }
    });
}

async fn cluster_status(d: &Daemon) -> pb::StatusResponse {
    d.client().await.status(pb::StatusRequest {}).await.unwrap().into_inner()
}

/// Every member answers, every shard has a leader, and no replica lags.
fn caught_up(s: &pb::StatusResponse) -> bool {
    s.nodes.iter().all(|n| n.state == "up")
        && s.shards.iter().all(|sh| !sh.leader.is_empty() && sh.replication_lag == 0)
}

const ACCOUNTS: u64 = 12;
const OPENING_BALANCE: i64 = 1000;

/// Calls with an idempotency key, retrying (same key) until an answer that is
/// not "unavailable", for at most 20 s. Returns the answer and whether it
/// took a retry.
async fn call_keyed(
    c: &mut conflux_client::pb::conflux_client::ConfluxClient<tonic::transport::Channel>,
    entity_type: &str,
    id: &str,
    op: &str,
    payload: &str,
    key: &str,
) -> (Result<Value, tonic::Status>, bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut retried = false;
    loop {
        let mut req = invoke_req(entity_type, id, op, payload);
        req.idempotency_key = key.to_owned();
        let r = c.invoke(req).await.map(|r| serde_json::from_slice(&r.into_inner().reply).expect("JSON reply"));
        match r {
            Err(e) if e.code() == Code::Unavailable && Instant::now() < deadline => {
                retried = true;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            r => return (r, retried),
        }
    }
}

#[test]
fn killing_a_member_under_load_loses_and_duplicates_nothing_and_it_catches_up() {
    let _one = one_cluster_at_a_time();
    let root = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(root.path(), 3);
    deploy(cluster.node(0), "account", &guest_wasm("bank"));
    let runtime = rt();
    runtime.block_on(async {
        let mut c = cluster.node(2).client().await;
        for a in 0..ACCOUNTS {
            let (r, _) = call_keyed(
                &mut c,
                "account",
                &format!("a{a}"),
                "deposit",
                &OPENING_BALANCE.to_string(),
                &format!("open-{a}"),
            )
            .await;
            r.unwrap();
        }
        // A closed account: transfers to it are refunded (the compensation).
        call_keyed(&mut c, "account", "a11", "close", "", "close").await.0.unwrap();
    });
    // The member leading the most shards is killed while transfers run
    // through the other two.
    let victim = runtime.block_on(async {
        let status = cluster_status(cluster.node(0)).await;
        let leads = |n: &pb::NodeInfo| n.shards_led;
        let top = status.nodes.iter().max_by_key(|n| leads(n)).unwrap();
        assert!(top.shards_led >= 1, "nobody leads a shard: {status:?}");
        top.node_id.parse::<usize>().unwrap() - 1
    });
    let survivors: Vec<usize> = (0..3).filter(|i| *i != victim).collect();
    let acknowledged = runtime.block_on(async {
        let stop_at = Instant::now() + Duration::from_secs(4);
        let mut tasks = Vec::new();
        for client in 0..6u64 {
            let mut c = cluster.node(survivors[client as usize % 2]).client().await;
            tasks.push(tokio::spawn(async move {
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (client + 1));
                let mut acks = Vec::new();
                let mut n = 0;
                while Instant::now() < stop_at {
                    n += 1;
                    let from = format!("a{}", rng.below(ACCOUNTS - 1));
                    let to = format!("a{}", rng.below(ACCOUNTS));
                    let t = json!({"to": to, "amount": 1 + rng.below(50)}).to_string();
                    match call_keyed(&mut c, "account", &from, "transfer", &t, &format!("t-{client}-{n}")).await.0 {
                        Ok(id) => acks.push((from, to, id.as_str().unwrap().to_owned())),
                        Err(e) if e.code() == Code::FailedPrecondition || e.code() == Code::InvalidArgument => {}
                        Err(e) => panic!("transfer failed for good: {e:?}"),
                    }
                }
                acks
            }));
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        cluster.kill9(victim);
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    });
    assert!(acknowledged.len() > 50, "only {} transfers acknowledged", acknowledged.len());
    cluster.restart(victim);
    runtime.block_on(async {
        // The restarted member catches up: every shard has a leader again and
        // no replica lags.
        eventually(60, "every replica to catch up", async || {
            caught_up(&cluster_status(cluster.node(victim)).await).then_some(())
        })
        .await;
        // Read through the restarted node: it forwards to the leaders or,
        // where it leads again, serves from its caught-up replicas.
        let mut c = cluster.node(victim).client().await;
        let statements = settled_statements(&mut c, ACCOUNTS as usize, 60).await;
        assert_bank_settled(&statements, &acknowledged, ACCOUNTS as i64 * OPENING_BALANCE, "a11");
    });
}

/// A TCP proxy in front of one member, for the traffic of some of its peers:
/// blocking it cuts every connection through it and refuses new ones.
struct FaultProxy {
    addr: String,
    blocked: Arc<AtomicBool>,
    /// The connections through it, aborted when it blocks. Bounded by the
    /// few channels a member keeps to a peer.
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl FaultProxy {
    async fn start(upstream: String) -> FaultProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let blocked = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (b, c) = (blocked.clone(), conns.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if b.load(Ordering::SeqCst) {
                    continue; // dropped: the connection closes at once
                }
                let upstream = upstream.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
                let mut conns = c.lock().unwrap();
                conns.retain(|t| !t.is_finished());
                conns.push(task);
            }
        });
        FaultProxy { addr, blocked, conns }
    }

    fn block(&self) {
        self.blocked.store(true, Ordering::SeqCst);
        for t in self.conns.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    fn heal(&self) {
        self.blocked.store(false, Ordering::SeqCst);
    }
}

#[test]
fn a_partitioned_member_refuses_writes_while_the_majority_serves_and_healing_converges() {
    let _one = one_cluster_at_a_time();
    let root = tempfile::tempdir().unwrap();
    let runtime = rt();
    let addrs = free_addrs(3);
    // Node 3 reaches 1 and 2 through proxies, and they reach it through one.
    let (to1, to2, to3) = runtime.block_on(async {
        (
            FaultProxy::start(addrs[0].clone()).await,
            FaultProxy::start(addrs[1].clone()).await,
            FaultProxy::start(addrs[2].clone()).await,
        )
    });
    let majority_view = peer_list(&[addrs[0].clone(), addrs[1].clone(), to3.addr.clone()]);
    let minority_view = peer_list(&[to1.addr.clone(), to2.addr.clone(), addrs[2].clone()]);
    let views = vec![majority_view.clone(), majority_view, minority_view];
    // Short bounds so a refused call comes back quickly.
    let extra = ["--set", "cluster.forward_timeout_ms=2000", "--set", "log.commit_timeout_ms=2000"];
    let cluster = Cluster::start_with(root.path(), addrs, views, &extra);
    deploy(cluster.node(0), "counter", &guest_wasm("counter"));
    runtime.block_on(async {
        let mut c1 = cluster.node(0).client().await;
        for k in 0..COUNTERS {
            call_keyed(&mut c1, "counter", &format!("c{k}"), "add", "1", &format!("before-{k}")).await.0.unwrap();
        }
        for p in [&to1, &to2, &to3] {
            p.block();
        }
        // The majority elects new leaders for node 3's shards and serves
        // every counter.
        for k in 0..COUNTERS {
            let (r, _) = call_keyed(&mut c1, "counter", &format!("c{k}"), "add", "1", &format!("during-{k}")).await;
            assert_eq!(r.unwrap(), json!(2), "c{k} through the majority");
        }
        // The minority acknowledges nothing.
        let mut c3 = cluster.node(2).client().await;
        let attempts = (0..5).map(|k| {
            let mut c = c3.clone();
            async move { call(&mut c, "counter", &format!("c{k}"), "add", "100").await }
        });
        for (k, r) in futures::future::join_all(attempts).await.into_iter().enumerate() {
            let e = r.expect_err("the minority acknowledged a write");
            assert_eq!(e.code(), Code::Unavailable, "c{k}: {e:?}");
        }
        for p in [&to1, &to2, &to3] {
            p.heal();
        }
        // Healed: the minority's replicas converge, and nothing it refused
        // appears anywhere.
        eventually(60, "the cluster to converge", async || {
            caught_up(&cluster_status(cluster.node(2)).await).then_some(())
        })
        .await;
        for k in 0..COUNTERS {
            let total = eventually(30, "a read through the healed node", async || {
                call(&mut c3, "counter", &format!("c{k}"), "get", "").await.ok()
            })
            .await;
            assert_eq!(total, json!(2), "c{k} read through the healed node");
        }
    });
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn a_data_directory_refuses_settings_it_was_not_created_with() {
    let _one = one_cluster_at_a_time();
    let root = tempfile::tempdir().unwrap();
    let single = root.path().join("single");
    let member = root.path().join("member");
    let peers = peer_list(&free_addrs(3));
    let as_member = |extra: &[&str]| {
        let mut args = vec!["--node-id", "1", "--peer", &peers, "--cluster-secret", SECRET];
        args.extend_from_slice(extra);
        args.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };

    Daemon::start(&single).terminate();
    let err = serve_expecting_failure(&single, &args(&as_member(&[])));
    assert!(error_line(&err).contains("a single node's data"), "{err}");

    // A member starts alone (its groups wait for a majority), then stops.
    let ok = as_member(&[]);
    Daemon::start_with(&member, &args(&ok)).terminate();
    let err = serve_expecting_failure(&member, &args(&as_member(&["--set", "cluster.shard_count=16"])));
    assert!(error_line(&err).contains("not supported"), "{err}");
    let err = serve_expecting_failure(&member, &[]);
    assert!(error_line(&err).contains("cluster member 1"), "{err}");
    // Under its own settings it starts again.
    Daemon::start_with(&member, &args(&ok)).terminate();
}

/// Faster placement rounds than the default, so reshaping tests finish sooner.
const QUICK_PLACEMENT: [&str; 2] = ["--set", "cluster.placement_interval_ms=200"];

/// What one caller of a [`Load`] saw.
#[derive(Default)]
struct Seen {
    /// Acknowledged adds per counter.
    adds: BTreeMap<String, i64>,
    /// Acknowledged transfers: (from, to, transfer id).
    transfers: Vec<(String, String, String)>,
    /// Calls that took a retry (leader changes), and calls that failed.
    retried: u64,
    failed: Vec<String>,
}

/// Callers adding to counters and moving money between accounts, every call
/// with an idempotency key (retried with it through leader changes), until
/// stopped.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Seen>>,
}

impl Load {
    /// Two callers through each of `nodes`: one on counters, one on the bank.
    async fn start(cluster: &Cluster, nodes: &[usize]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for (k, i) in nodes.iter().enumerate() {
            for bank in [false, true] {
                let mut c = cluster.node(*i).client().await;
                let stop = stop.clone();
                let caller = k as u64 * 2 + u64::from(bank);
                tasks.push(tokio::spawn(async move {
                    let mut rng = Rng(0x2545_F491_4F6C_DD1D ^ (caller + 1));
                    let mut seen = Seen::default();
                    let mut n = 0;
                    while !stop.load(Ordering::SeqCst) {
                        n += 1;
                        let key = format!("load-{caller}-{n}");
                        if bank {
                            let from = format!("a{}", rng.below(ACCOUNTS - 1));
                            let to = format!("a{}", rng.below(ACCOUNTS));
                            let t = json!({"to": to, "amount": 1 + rng.below(50)}).to_string();
                            let (r, retried) = call_keyed(&mut c, "account", &from, "transfer", &t, &key).await;
                            seen.retried += u64::from(retried);
                            match r {
                                Ok(id) => seen.transfers.push((from, to, id.as_str().unwrap().to_owned())),
                                // Not enough money, or a transfer to itself: the entity said no.
                                Err(e) if e.code() == Code::FailedPrecondition || e.code() == Code::InvalidArgument => {
                                }
                                Err(e) => seen.failed.push(format!("transfer {key}: {e:?}")),
                            }
                        } else {
                            let id = format!("c{}", rng.below(COUNTERS as u64));
                            let (r, retried) = call_keyed(&mut c, "counter", &id, "add", "1", &key).await;
                            seen.retried += u64::from(retried);
                            match r {
                                Ok(_) => *seen.adds.entry(id).or_default() += 1,
                                Err(e) => seen.failed.push(format!("add {key}: {e:?}")),
                            }
                        }
                    }
                    seen
                }));
            }
        }
        Load { stop, tasks }
    }

    async fn finish(self) -> Seen {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = Seen::default();
        for t in self.tasks {
            let s = t.await.unwrap();
            for (id, n) in s.adds {
                *all.adds.entry(id).or_default() += n;
            }
            all.transfers.extend(s.transfers);
            all.retried += s.retried;
            all.failed.extend(s.failed);
        }
        all
    }
}

/// Deploys the counter and the bank and opens the accounts.
async fn prepare_load(cluster: &Cluster) {
    deploy(cluster.node(0), "counter", &guest_wasm("counter"));
    deploy(cluster.node(0), "account", &guest_wasm("bank"));
    let mut c = cluster.node(0).client().await;
    for a in 0..ACCOUNTS {
        let id = format!("a{a}");
        call_keyed(&mut c, "account", &id, "deposit", &OPENING_BALANCE.to_string(), &format!("open-{a}"))
            .await
            .0
            .unwrap();
    }
    call_keyed(&mut c, "account", "a11", "close", "", "close").await.0.unwrap();
}

/// After the load: nothing failed, every counter holds exactly the adds
/// acknowledged, and the bank's books settle with money conserved.
async fn assert_load_exact(d: &Daemon, seen: &Seen) {
    assert!(
        seen.failed.is_empty(),
        "{} calls failed, e.g. {:?}",
        seen.failed.len(),
        &seen.failed[..seen.failed.len().min(5)]
    );
    assert!(seen.transfers.len() > 20 && seen.adds.values().sum::<i64>() > 50, "too little load ran");
    let mut c = d.client().await;
    for k in 0..COUNTERS {
        let id = format!("c{k}");
        let total = call(&mut c, "counter", &id, "get", "").await.unwrap();
        assert_eq!(total, json!(seen.adds.get(&id).copied().unwrap_or(0)), "counter {id}");
    }
    let statements = settled_statements(&mut c, ACCOUNTS as usize, 60).await;
    assert_bank_settled(&statements, &seen.transfers, ACCOUNTS as i64 * OPENING_BALANCE, "a11");
}

/// Replicas and leaderships per member, once every member is up, no move
/// runs and every shard is led; `None` until then.
fn moved_replicas(s: &pb::StatusResponse) -> Option<BTreeMap<String, (u32, u32)>> {
    let led = s.nodes.iter().all(|n| n.state == "up") && s.shards.iter().all(|sh| !sh.leader.is_empty());
    (led && s.moves.is_empty())
        .then(|| s.nodes.iter().map(|n| (n.node_id.clone(), (n.replicas, n.shards_led))).collect())
}

#[test]
fn growing_from_three_to_five_members_under_load_spreads_replicas_and_loses_nothing() {
    let _one = one_cluster_at_a_time();
    let root = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start_extra(root.path(), 3, &QUICK_PLACEMENT);
    let runtime = rt();
    runtime.block_on(prepare_load(&cluster));
    let load = runtime.block_on(Load::start(&cluster, &[0, 1, 2]));
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let four = cluster.join(root.path(), 0, &QUICK_PLACEMENT);
    let five = cluster.join(root.path(), 2, &QUICK_PLACEMENT);
    runtime.block_on(async {
        // 8 shards × 3 replicas over 5 members: 4 or 5 each. Under load a
        // follower is always a few entries behind, so lag is checked after.
        let spread = eventually(120, "the replicas and leaderships to spread over five members", async || {
            let s = cluster_status(cluster.node(four)).await;
            let r = moved_replicas(&s).filter(|r| r.len() == 5)?;
            // Then leaderships spread too: 8 over 5 members, 1 or 2 each.
            r.values().all(|(replicas, led)| (4..=5).contains(replicas) && (1..=2).contains(led)).then_some(r)
        })
        .await;
        eprintln!("spread after {:?}: {spread:?}", started.elapsed());
        let seen = load.finish().await;
        eventually(60, "every replica to catch up", async || {
            caught_up(&cluster_status(cluster.node(four)).await).then_some(())
        })
        .await;
        eprintln!("{} calls retried through leader changes", seen.retried);
        // The new members serve calls too.
        let mut c5 = cluster.node(five).client().await;
        call(&mut c5, "counter", "c0", "get", "").await.unwrap();
        assert_load_exact(cluster.node(five), &seen).await;
    });
}

#[test]
fn draining_a_member_under_load_moves_everything_off_it_and_it_stops_without_a_failed_call() {
    let _one = one_cluster_at_a_time();
    let root = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start_extra(root.path(), 4, &QUICK_PLACEMENT);
    let runtime = rt();
    runtime.block_on(prepare_load(&cluster));
    // Node 1 formed the metadata group, so it likely leads it too: its
    // driver moves its own replicas away, then lets it leave.
    let load = runtime.block_on(Load::start(&cluster, &[1, 2, 3]));
    std::thread::sleep(Duration::from_millis(500));
    let unknown = cluster.node(1).cli(&["drain", "9"]);
    assert!(!unknown.status.success() && stderr(&unknown).contains("not a member"), "{}", stderr(&unknown));
    let out = cluster.node(1).cli(&["drain", "1"]);
    assert!(out.status.success(), "drain failed: {}", stderr(&out));
    assert!(stdout(&out).contains("safe to stop"), "{}", stdout(&out));
    cluster.nodes[0].take().expect("running").terminate();
    std::thread::sleep(Duration::from_millis(1000));
    runtime.block_on(async {
        let seen = load.finish().await;
        let s = eventually(60, "the drained member to leave", async || {
            let s = cluster_status(cluster.node(1)).await;
            (s.nodes.len() == 3 && caught_up(&s)).then_some(s)
        })
        .await;
        for sh in &s.shards {
            assert_eq!(sh.replicas.len(), 3, "shard {} replicas {:?}", sh.shard_id, sh.replicas);
            assert!(!sh.replicas.contains(&"1".to_owned()), "shard {} is still on node 1", sh.shard_id);
        }
        assert_load_exact(cluster.node(2), &seen).await;
    });
}

#[test]
fn a_member_stopped_with_sigterm_hands_its_leaderships_off_without_a_failed_call() {
    let _one = one_cluster_at_a_time();
    let root = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start_extra(root.path(), 3, &QUICK_PLACEMENT);
    let runtime = rt();
    runtime.block_on(prepare_load(&cluster));
    let load = runtime.block_on(Load::start(&cluster, &[1, 2]));
    // Leaderships spread over the three members, so node 1 leads some.
    let led = runtime.block_on(eventually(60, "node 1 to lead a shard", async || {
        let s = cluster_status(cluster.node(1)).await;
        let led: Vec<u32> = s.shards.iter().filter(|sh| sh.leader == "1").map(|sh| sh.shard_id).collect();
        (!led.is_empty()).then_some(led)
    }));
    std::thread::sleep(Duration::from_millis(500));
    let mut stopped = cluster.nodes[0].take().expect("running");
    assert!(stopped.terminate().success());
    let log = stopped.log();
    let handed = log.lines().filter(|l| l.contains("handed the lead off before stopping")).count();
    assert!(handed >= 1, "node 1 led shards {led:?} and handed none off:\n{log}");
    runtime.block_on(async {
        let s = eventually(30, "every shard to be led by a member still up", async || {
            let s = cluster_status(cluster.node(1)).await;
            s.shards.iter().all(|sh| !sh.leader.is_empty() && sh.leader != "1").then_some(s)
        })
        .await;
        eprintln!(
            "handed off {handed} leaderships; now {:?}",
            s.shards.iter().map(|sh| &sh.leader).collect::<Vec<_>>()
        );
        let seen = load.finish().await;
        assert_load_exact(cluster.node(2), &seen).await;
    });
}

#[test]
fn a_member_down_past_the_grace_period_is_replaced_and_rejoins_without_divergence() {
    let _one = one_cluster_at_a_time();
    let root = tempfile::tempdir().unwrap();
    let extra = [
        QUICK_PLACEMENT[0],
        QUICK_PLACEMENT[1],
        "--set",
        "cluster.suspect_after_ms=1000",
        "--set",
        "cluster.down_after_ms=3000",
        "--set",
        "cluster.move_timeout_ms=5000",
    ];
    let mut cluster = Cluster::start_extra(root.path(), 4, &extra);
    let runtime = rt();
    runtime.block_on(prepare_load(&cluster));
    let load = runtime.block_on(Load::start(&cluster, &[0, 1, 2]));
    cluster.kill9(3);
    runtime.block_on(async {
        // 8 shards × 3 replicas on the 3 members left: every shard on each.
        let s = eventually(90, "the replication factor to be restored", async || {
            let s = cluster_status(cluster.node(0)).await;
            let four = s.nodes.iter().find(|n| n.node_id == "4")?;
            let full = s.shards.iter().all(|sh| sh.replicas.len() == 3 && !sh.replicas.contains(&"4".to_owned()));
            (four.state == "down" && full && s.moves.is_empty()).then_some(s)
        })
        .await;
        assert!(s.shards.iter().all(|sh| !sh.leader.is_empty()), "{s:?}");
    });
    cluster.restart(3);
    runtime.block_on(async {
        // Back: its stale replicas are dropped and replicas move back to it.
        eventually(90, "the member to be given replicas again", async || {
            let s = cluster_status(cluster.node(3)).await;
            let r = moved_replicas(&s).filter(|r| r.len() == 4)?;
            r.values().all(|(replicas, _)| *replicas == 6).then_some(())
        })
        .await;
        let seen = load.finish().await;
        eventually(60, "every replica to catch up", async || {
            caught_up(&cluster_status(cluster.node(3)).await).then_some(())
        })
        .await;
        assert_load_exact(cluster.node(3), &seen).await;
    });
}

/// A certificate authority for a test, and certificates it signs for 127.0.0.1.
struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
        let issuer = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
        TestCa { issuer }
    }

    /// Writes the CA's certificate into `dir`; returns its path.
    fn write(&self, dir: &Path, file: &str) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join(file);
        std::fs::write(&path, self.issuer.pem()).unwrap();
        path
    }

    /// A server-and-client certificate for 127.0.0.1 in `dir`: (cert, key).
    fn issue(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        std::fs::create_dir_all(dir).unwrap();
        let (cert_path, key_path) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }
}

/// A TLS channel to `addr` trusting `ca`, presenting `identity` (cert, key) if given.
async fn tls_channel(
    addr: &str,
    ca: &Path,
    identity: Option<&(PathBuf, PathBuf)>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(std::fs::read(cert).unwrap(), std::fs::read(key).unwrap()));
    }
    Endpoint::from_shared(format!("https://{addr}"))?.tls_config(tls)?.connect().await
}

/// Asks member `addr` for its shards over the cluster service, with the
/// cluster's secret, over TLS trusting `ca` and presenting `identity`.
async fn cluster_call(
    addr: &str,
    ca: &Path,
    identity: Option<&(PathBuf, PathBuf)>,
) -> Result<conflux_host::api::cluster::pb::ShardsReply, String> {
    use conflux_host::api::cluster::{SECRET_HEADER, pb as cpb};
    let channel = tls_channel(addr, ca, identity).await.map_err(|e| format!("handshake: {e:?}"))?;
    let mut req = tonic::Request::new(cpb::ShardsRequest::default());
    req.metadata_mut().insert(SECRET_HEADER, SECRET.parse().unwrap());
    cpb::cluster_client::ClusterClient::new(channel)
        .shards(req)
        .await
        .map(|r| r.into_inner())
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

/// Mutual TLS between members: three members that each serve TLS with a
/// certificate the cluster's CA signed form the cluster, elect and replicate
/// over TLS, and serve every entity from every member to API clients that
/// present no certificate; a fourth joins over TLS the same way. A process that knows the cluster secret but has
/// no certificate from the cluster's CA gets no answer from the cluster
/// service: refused without a client certificate, and at the handshake with
/// one from another CA.
#[test]
fn members_talk_mutual_tls_and_refuse_a_peer_without_a_certificate_from_the_cluster_ca() {
    let _one = one_cluster_at_a_time();
    let root = tempfile::tempdir().unwrap();
    let pki = root.path().join("pki");
    let ca = TestCa::new("conflux test cluster CA");
    let ca_pem = ca.write(&pki, "ca.pem");
    let member = ca.issue(&pki, "member");
    let stranger = TestCa::new("some other CA").issue(&pki.join("other"), "stranger");
    let (cert, key, ca_arg) =
        (member.0.to_str().unwrap(), member.1.to_str().unwrap(), ca_pem.to_str().unwrap().to_owned());
    let tls = ["--tls-cert", cert, "--tls-key", key, "--cluster-ca", &ca_arg];
    let mut cluster = Cluster::start_extra(root.path(), 3, &tls);

    // Deployed through one member with the real CLI over https.
    let https = format!("https://{}", cluster.node(0).addr);
    let wasm = guest_wasm("counter");
    let out = std::process::Command::new(conflux_bin())
        .args(["--addr", &https, "--ca-cert", &ca_arg, "deploy", "counter", wasm.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "deploy over TLS: {}", stderr(&out));
    rt().block_on(async {
        // Every member serves every counter: most calls are forwarded to
        // another member's shard leader, over mutual TLS.
        for round in 1..=3 {
            for i in 0..3 {
                let channel = tls_channel(&cluster.node(i).addr, &ca_pem, None).await.unwrap();
                let mut c = pb::conflux_client::ConfluxClient::new(channel);
                for k in 0..8 {
                    let total = call(&mut c, "counter", &format!("c{k}"), "add", "1").await.unwrap();
                    assert_eq!(total, json!((round - 1) * 3 + i as i64 + 1), "c{k} through member {}", i + 1);
                }
            }
        }
        let status = eventually(20, "every shard led and caught up", async || {
            let channel = tls_channel(&cluster.node(2).addr, &ca_pem, None).await.ok()?;
            let s = pb::conflux_client::ConfluxClient::new(channel).status(pb::StatusRequest {}).await.ok()?;
            Some(s.into_inner()).filter(caught_up)
        })
        .await;
        assert_eq!(status.nodes.len(), 3, "{status:?}");

        // A member's certificate and the secret: the cluster service answers.
        let addr = &cluster.node(1).addr;
        cluster_call(addr, &ca_pem, Some(&member)).await.unwrap();
        // The secret without a client certificate: refused.
        let refused = cluster_call(addr, &ca_pem, None).await.unwrap_err();
        assert!(refused.starts_with("Unauthenticated") && refused.contains("client certificate"), "{refused}");
        // The secret with another CA's certificate: the handshake fails.
        let refused = cluster_call(addr, &ca_pem, Some(&stranger)).await.unwrap_err();
        assert!(!refused.starts_with("Unauthenticated"), "not even the call should be read: {refused}");
        // A plaintext peer gets nowhere either.
        use conflux_host::api::cluster::pb as cpb;
        let plain = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
        assert!(cpb::cluster_client::ClusterClient::new(plain).shards(cpb::ShardsRequest::default()).await.is_err());
    });

    // Joining goes over mutual TLS too: a fourth member with a certificate
    // from the cluster's CA joins through member 1, every member reaches it
    // and it reaches every member, and it serves every counter.
    let four = cluster.join(root.path(), 0, &tls);
    rt().block_on(async {
        let status = |i: usize| {
            let addr = cluster.node(i).addr.clone();
            let ca = ca_pem.clone();
            async move {
                let channel = tls_channel(&addr, &ca, None).await.ok()?;
                Some(
                    pb::conflux_client::ConfluxClient::new(channel)
                        .status(pb::StatusRequest {})
                        .await
                        .ok()?
                        .into_inner(),
                )
            }
        };
        let all_up = |s: &pb::StatusResponse| s.nodes.len() == 4 && s.nodes.iter().all(|n| n.state == "up");
        eventually(60, "the joined member to be up as every member sees it", async || {
            for i in 0..4 {
                status(i).await.filter(all_up)?;
            }
            Some(())
        })
        .await;
        let channel = tls_channel(&cluster.node(four).addr, &ca_pem, None).await.unwrap();
        let mut c = pb::conflux_client::ConfluxClient::new(channel);
        for k in 0..8 {
            let total = call(&mut c, "counter", &format!("c{k}"), "add", "1").await.unwrap();
            assert_eq!(total, json!(10), "c{k} through the joined member");
        }
    });
}

/// `component` with a custom section `name` of `bytes` bytes appended: still
/// a valid component (custom sections may appear anywhere), with a digest of
/// its own. How the tests make large components without committing one.
fn with_custom_section(component: &[u8], name: &str, bytes: usize) -> Vec<u8> {
    fn leb128(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let low = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(low);
                return;
            }
            out.push(low | 0x80);
        }
    }
    let mut head = Vec::new();
    leb128(name.len(), &mut head);
    head.extend_from_slice(name.as_bytes());
    let mut out = Vec::with_capacity(component.len() + bytes + 16);
    out.extend_from_slice(component);
    out.push(0); // a custom section
    leb128(head.len() + bytes, &mut out);
    out.extend_from_slice(&head);
    out.extend((0..bytes).map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 24) as u8));
    out
}

/// Bytes of all files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Components travel outside the Raft log: a 40 MB component deployed
/// through one member is served by every member (each fetched it by digest
/// from another, in chunks), none of the metadata logs holds it, and a
/// member that joins later fetches it too. The same cluster replicates a
/// turn whose write set is exactly at `runtime.max_write_set_bytes`, keys'
/// entity prefixes counted (one byte more is refused).
#[test]
fn a_40_mb_component_reaches_every_member_outside_the_log_and_a_member_that_joins_later() {
    use sha2::Digest;
    let _one = one_cluster_at_a_time();
    let root = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start_extra(root.path(), 3, &QUICK_PLACEMENT);
    let big = with_custom_section(&std::fs::read(guest_wasm("counter")).unwrap(), "ballast", 40 << 20);
    let digest = hex::encode(sha2::Sha256::digest(&big));
    let file = root.path().join("big.wasm");
    std::fs::write(&file, &big).unwrap();
    let started = Instant::now();
    deploy(cluster.node(1), "big", &file);
    eprintln!("deployed {} bytes in {:?}", big.len(), started.elapsed());
    deploy(cluster.node(0), "faulty", &guest_wasm("faulty"));
    let stored =
        |dir: &Path| std::fs::metadata(dir.join("components").join(format!("{digest}.wasm"))).map_or(0, |m| m.len());
    rt().block_on(async {
        // The deploy returned once every member served it.
        for i in 0..3 {
            let mut c = cluster.node(i).client().await;
            assert_eq!(call(&mut c, "big", &format!("b{i}"), "add", "2").await.unwrap(), json!(2));
        }
        // A write set of exactly the limit, counting the 10 bytes of the
        // entity prefix `faulty\0ws\0` in front of each of the 4 keys `w/000N`.
        let limit = 4 << 20;
        let each = limit / 4 - "faulty\0ws\0w/0000".len();
        let mut c = cluster.node(2).client().await;
        call(&mut c, "faulty", "ws", "write_many", &format!("[4,{each}]")).await.unwrap();
        // One byte more per value is over only because the prefixes count.
        let over = call(&mut c, "faulty", "ws2", "write_many", &format!("[4,{}]", each + 1)).await.unwrap_err();
        assert_eq!(kind(&over), "limit-exceeded", "{over:?}");
        eventually(60, "every replica to catch up", async || {
            caught_up(&cluster_status(cluster.node(0)).await).then_some(())
        })
        .await;
    });
    for i in 0..3 {
        assert_eq!(stored(&cluster.dirs[i]), big.len() as u64, "member {} does not hold the component", i + 1);
        let meta = dir_bytes(&cluster.dirs[i].join("shards").join("meta"));
        assert!(meta < 8 << 20, "member {}'s metadata log holds {meta} bytes: the component went through it", i + 1);
    }
    let four = cluster.join(root.path(), 0, &QUICK_PLACEMENT);
    rt().block_on(async {
        // A call through it is forwarded to a shard leader at once; what
        // shows that it got the component is its own registry serving it.
        eventually(120, "the joined member to fetch and load the big component", async || {
            let out = cluster.node(four).cli(&["versions", "big"]);
            (out.status.success() && stored(&cluster.dirs[four]) == big.len() as u64).then_some(())
        })
        .await;
        let mut c = cluster.node(four).client().await;
        assert_eq!(call(&mut c, "big", "b0", "get", "").await.unwrap(), json!(2));
    });
}

/// Registry changes are compare-and-set on the metadata group: a deploy
/// through one member and a rollback through another, started together,
/// both planned from the same record, cannot both apply; the loser is
/// refused with `conflict` (retryable) and nothing of it applies, and every
/// member ends with the same record, holding exactly the winners' changes.
#[test]
fn concurrent_deploys_and_rollbacks_through_different_members_apply_exactly_the_winners() {
    let _one = one_cluster_at_a_time();
    let root = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(root.path(), 3);
    deploy(cluster.node(0), "counter", &guest_wasm("counter"));
    deploy(cluster.node(0), "counter", &guest_wasm("counter-v2"));
    let base = std::fs::read(guest_wasm("counter")).unwrap();
    let (mut deploys_won, mut conflicts) = (0, 0);
    let mut active = 2;
    // Whether two changes race depends on timing (a deploy uploads and
    // compiles first): go on until one has, within a bound.
    for round in 0..30 {
        if round >= 5 && conflicts > 0 {
            break;
        }
        // New bytes every round: a version of their own if the deploy wins.
        let file = root.path().join(format!("counter-{round}.wasm"));
        std::fs::write(&file, with_custom_section(&base, &format!("round-{round}"), 64)).unwrap();
        let back_to = if active == 1 { "2" } else { "1" };
        let (d, r) = std::thread::scope(|s| {
            let d = s.spawn(|| cluster.node(1).cli(&["deploy", "counter", file.to_str().unwrap()]));
            let r = s.spawn(|| cluster.node(2).cli(&["rollback", "counter", back_to]));
            (d.join().unwrap(), r.join().unwrap())
        });
        for out in [&d, &r] {
            if !out.status.success() {
                let line = error_line(&stderr(out));
                assert!(line.contains("Aborted (conflict)"), "a change failed other than by a conflict: {line}");
                conflicts += 1;
            }
        }
        assert!(d.status.success() || r.status.success(), "round {round}: neither change applied");
        if d.status.success() {
            deploys_won += 1;
        }
        // Two rollbacks at once, to different versions, through different
        // members: quick and alike, so they usually plan from the same record.
        if d.status.success() {
            let (a, b) = std::thread::scope(|s| {
                let a = s.spawn(|| cluster.node(1).cli(&["rollback", "counter", "1"]));
                let b = s.spawn(|| cluster.node(2).cli(&["rollback", "counter", "2"]));
                (a.join().unwrap(), b.join().unwrap())
            });
            for out in [&a, &b] {
                if !out.status.success() {
                    let line = error_line(&stderr(out));
                    assert!(line.contains("Aborted (conflict)"), "a rollback failed other than by a conflict: {line}");
                    conflicts += 1;
                }
            }
            assert!(a.status.success() || b.status.success(), "round {round}: neither rollback applied");
        }
        let versions = stdout(&cluster.node(0).cli(&["versions", "counter"]));
        active = versions
            .lines()
            .skip(1)
            .find(|l| l.split('\t').nth(1) == Some("active"))
            .and_then(|l| l.split('\t').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no active version in {versions}"));
    }
    eprintln!("{deploys_won} deploys won, {conflicts} conflicts");
    assert!(conflicts > 0, "no round raced: the test did not exercise the compare-and-set");
    // Every winning deploy minted exactly one version; no lost or doubled one.
    let listing = |i: usize| stdout(&cluster.node(i).cli(&["versions", "counter"]));
    let first = listing(0);
    assert_eq!(first.lines().count() - 1, 2 + deploys_won, "{first}");
    for i in 1..3 {
        assert_eq!(listing(i), first, "member {} serves another record", i + 1);
    }
}

/// A node started alone is a cluster of one: two nodes join it, its data
/// moves out to three replicas intact, and a hot swap and a failover of the
/// node it started as work afterwards. The joiners give the secret the lone
/// node generated on its first start.
#[test]
fn a_node_started_alone_grows_to_three_members_with_its_data_intact() {
    const ENTITIES: usize = 1000;
    let _one = one_cluster_at_a_time();
    let root = tempfile::tempdir().unwrap();
    let mut cluster = Cluster { dirs: Vec::new(), addrs: Vec::new(), args: Vec::new(), nodes: Vec::new() };
    cluster.add(root.path(), free_addrs(1).remove(0), &QUICK_PLACEMENT);
    cluster.restart(0);
    deploy(cluster.node(0), "counter", &guest_wasm("counter"));
    let runtime = rt();
    // Counter k holds k % 7 + 1, written through eight callers.
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for caller in 0..8 {
            let mut c = cluster.node(0).client().await;
            tasks.push(tokio::spawn(async move {
                for k in (caller..ENTITIES).step_by(8) {
                    let add = (k % 7 + 1).to_string();
                    call(&mut c, "counter", &format!("e{k}"), "add", &add).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let secret = std::fs::read_to_string(cluster.dirs[0].join("cluster.secret")).expect("the generated secret");
    let lone = cluster_status_blocking(&runtime, cluster.node(0));
    assert_eq!((lone.nodes.len(), lone.shards.len()), (1, 1), "{lone:?}");
    for id in ["2", "3"] {
        let first = cluster.addrs[0].clone();
        let mut args = vec!["--node-id", id, "--join", &first, "--cluster-secret", secret.trim()];
        args.extend_from_slice(&QUICK_PLACEMENT);
        cluster.add(root.path(), free_addrs(1).remove(0), &args);
        cluster.restart(cluster.dirs.len() - 1);
    }
    runtime.block_on(async {
        let s = eventually(120, "every shard to have three caught-up replicas", async || {
            let s = cluster_status(cluster.node(2)).await;
            (s.nodes.len() == 3 && s.shards.iter().all(|sh| sh.replicas.len() == 3) && caught_up(&s)).then_some(s)
        })
        .await;
        eprintln!("grown: {:?}", s.shards);
        // Every entity's state, read through a member that joined.
        let mut c = cluster.node(2).client().await;
        for k in 0..ENTITIES {
            let v = call(&mut c, "counter", &format!("e{k}"), "get", "").await.unwrap();
            assert_eq!(v, json!(k % 7 + 1), "e{k} after the grow");
        }
        // A hot swap through a joined member reaches every member.
        let out = cluster.node(1).cli(&["deploy", "counter", guest_wasm("counter-v2").to_str().unwrap()]);
        assert!(out.status.success(), "deploy of v2 failed: {}", stderr(&out));
        for i in 0..3 {
            let mut c = cluster.node(i).client().await;
            assert_eq!(call(&mut c, "counter", "e0", "version", "").await.unwrap(), json!(2), "node {}", i + 1);
        }
    });
    // The node it started as dies; the two that joined carry on.
    cluster.kill9(0);
    runtime.block_on(async {
        let mut c = cluster.node(1).client().await;
        for k in 0..20 {
            let (v, _) = call_keyed(&mut c, "counter", &format!("e{k}"), "add", "100", &format!("after-{k}")).await;
            assert_eq!(total_of(v.unwrap()), json!(k % 7 + 101), "e{k} after the failover");
        }
        let mut c = cluster.node(2).client().await;
        for k in 0..ENTITIES {
            let want = k % 7 + 1 + if k < 20 { 100 } else { 0 };
            let (v, _) = call_keyed(&mut c, "counter", &format!("e{k}"), "get", "", &format!("read-{k}")).await;
            assert_eq!(total_of(v.unwrap()), json!(want), "e{k} after the failover");
        }
    });
}

/// A counter's total: v1 answers the number, v2 an object holding it.
fn total_of(v: Value) -> Value {
    v.get("total").cloned().unwrap_or(v)
}

fn cluster_status_blocking(runtime: &tokio::runtime::Runtime, d: &Daemon) -> pb::StatusResponse {
    runtime.block_on(cluster_status(d))
}

/// The member (index) leading the shard of `entity_type/id`, as member `via` sees it.
async fn leader_of(cluster: &Cluster, via: usize, entity_type: &str, id: &str) -> Option<usize> {
    let shard = conflux_host::cluster::placement::shard_of(entity_type, id, 8);
    let status = cluster_status(cluster.node(via)).await;
    let sh = status.shards.iter().find(|s| s.shard_id == shard)?;
    sh.leader.parse::<usize>().ok().map(|n| n - 1)
}

/// Askers `a/0…a/5` keep asking callees `b/…` (three asks per call) through
/// the surviving members while `kill -9` takes down, first, the member leading
/// asker `a/0`'s shard and, once it is back, the member leading the shard of
/// the callees asked then. Counted by state: every acknowledged ask's
/// continuation ran exactly once, no continuation ran twice, and there are as
/// many continuations as answers.
#[test]
fn asks_get_exactly_one_continuation_each_through_kill_dash_nine_of_the_callers_and_the_callees_leaders() {
    let _one = one_cluster_at_a_time();
    let root = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(root.path(), 3);
    deploy(cluster.node(0), "a", &guest_wasm("asker"));
    deploy(cluster.node(0), "b", &guest_wasm("asker"));
    const ASKERS: usize = 6;
    const CALLEES: usize = 12;
    let runtime = rt();
    // Per acknowledged call: the asker and the ids of its asks.
    type Acked = Vec<(usize, Vec<String>)>;
    let acked: Arc<Mutex<Acked>> = Arc::default();
    // Asks through `via` to `targets` until `stop`; returns how many calls were acknowledged.
    let ask_load = |cluster: &Cluster, via: Vec<usize>, targets: Vec<String>, phase: usize| {
        let urls: Vec<String> = via.iter().map(|i| cluster.node(*i).url()).collect();
        let (acked, stop) = (acked.clone(), Arc::new(AtomicBool::new(false)));
        let s = stop.clone();
        let task = runtime.spawn(async move {
            let mut calls = 0usize;
            let mut n = 0usize;
            while !s.load(Ordering::SeqCst) {
                let mut c = conflux_client::connect(&urls[n % urls.len()]).await.unwrap();
                let a = n % ASKERS;
                let req = json!({"target": format!("b/{}", targets[n % targets.len()]), "operation": "echo",
                                 "payload": n, "count": 3});
                let key = format!("p{phase}-{n}");
                match call_keyed(&mut c, "a", &a.to_string(), "ask_for", &req.to_string(), &key).await.0 {
                    Ok(ids) => {
                        acked.lock().unwrap().push((a, serde_json::from_value::<Vec<String>>(ids).unwrap()));
                        calls += 1;
                    }
                    Err(e) => eprintln!("ask {key} failed (it may or may not have committed): {e}"),
                }
                n += 1;
            }
            calls
        });
        (stop, task)
    };
    let callee_ids: Vec<String> = (0..CALLEES).map(|b| b.to_string()).collect();

    // The caller's leader: a/0's shard. Its callees are led elsewhere, so the
    // replies coming back are what the kill interrupts.
    let (caller_leader, away) = runtime.block_on(async {
        eventually(30, "a/0's shard to have a leader", async || {
            let l = leader_of(&cluster, 0, "a", "0").await?;
            let mut away = Vec::new();
            for b in &callee_ids {
                if leader_of(&cluster, 0, "b", b).await.is_some_and(|m| m != l) {
                    away.push(b.clone());
                }
            }
            (!away.is_empty()).then_some((l, away))
        })
        .await
    });
    // Asks to `targets` through the other members while `victim` is killed
    // with -9, restarted and caught up.
    let kill_under_asks = |cluster: &mut Cluster, victim: usize, targets: Vec<String>, phase: usize| {
        let survivors: Vec<usize> = (0..3).filter(|i| *i != victim).collect();
        let (stop, task) = ask_load(cluster, survivors, targets, phase);
        std::thread::sleep(Duration::from_millis(1000));
        cluster.kill9(victim);
        std::thread::sleep(Duration::from_millis(1500));
        cluster.restart(victim);
        runtime.block_on(eventually(60, "the killed member to catch up", async || {
            caught_up(&cluster_status(cluster.node(victim)).await).then_some(())
        }));
        stop.store(true, Ordering::SeqCst);
        let calls = runtime.block_on(task).unwrap();
        assert!(calls > 5, "phase {phase}: only {calls} ask calls acknowledged around member {}'s kill", victim + 1);
    };
    kill_under_asks(&mut cluster, caller_leader, away, 1);

    // The callee's leader: the member leading most of the callees' shards now.
    let callee_leader = runtime.block_on(async {
        let mut led = [0usize; 3];
        for b in &callee_ids {
            if let Some(m) = leader_of(&cluster, 0, "b", b).await {
                led[m] += 1;
            }
        }
        (0..3).max_by_key(|m| led[*m]).unwrap()
    });
    let mine: Vec<String> = runtime.block_on(async {
        let mut mine = Vec::new();
        for b in &callee_ids {
            if leader_of(&cluster, 0, "b", b).await == Some(callee_leader) {
                mine.push(b.clone());
            }
        }
        mine
    });
    kill_under_asks(&mut cluster, callee_leader, mine, 2);

    let acked = acked.lock().unwrap().clone();
    runtime.block_on(async {
        let mut c = cluster.node(0).client().await;
        let mut want: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        for (a, ids) in &acked {
            want.entry(*a).or_default().extend(ids.iter().cloned());
        }
        // Settled: no outbox anywhere holds an ask or a reply.
        eventually(120, "every reply delivered", async || {
            let mut done = true;
            for i in 0..3 {
                let s = cluster_status(cluster.node(i)).await;
                done &= s.outbox_messages == 0;
            }
            done.then_some(())
        })
        .await;
        let mut continuations = 0u64;
        for a in 0..ASKERS {
            let got = call(&mut c, "a", &a.to_string(), "replies", "").await.unwrap();
            let mut seen: Vec<String> =
                got.as_array().unwrap().iter().map(|g| g["ask_id"].as_str().unwrap().to_owned()).collect();
            seen.sort();
            let unique: std::collections::BTreeSet<&String> = seen.iter().collect();
            assert_eq!(unique.len(), seen.len(), "a/{a}: a continuation ran twice: {seen:?}");
            for id in want.get(&a).into_iter().flatten() {
                assert!(unique.contains(id), "a/{a}: acknowledged ask {id} got no continuation");
            }
            assert!(got.as_array().unwrap().iter().all(|g| g["error"].is_null()), "a/{a}: {got}");
            continuations += seen.len() as u64;
        }
        let mut answered = 0u64;
        for b in 0..CALLEES {
            answered += call(&mut c, "b", &b.to_string(), "answered", "").await.unwrap().as_u64().unwrap();
        }
        assert_eq!(continuations, answered, "one continuation per answered ask");
        let acked_asks: usize = want.values().map(Vec::len).sum();
        assert!(continuations as usize >= acked_asks && acked_asks > 0);
        eprintln!("{acked_asks} acknowledged asks, {continuations} continuations, {answered} answers");
    });
}
