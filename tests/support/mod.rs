//! Shared support for the end-to-end tests: building guest components, running
//! the real `conflux` binary on a free 127.0.0.1 port, and talking to it.
#![allow(dead_code)]

use conflux_client::pb::{self, conflux_client::ConfluxClient};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::Code;
use tonic::transport::Channel;

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("host/ has a parent").to_owned()
}

pub fn conflux_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_conflux"))
}

static GUEST_BUILD: Mutex<()> = Mutex::new(());

/// Where `package` is built (under `target/`). A crate that uses another entity
/// crate's typed client builds it as a dependency with feature `client`, whose
/// component has the same file name as the callee's own: it builds apart, so
/// the callee's component is never overwritten (`scripts/test.sh` does the same).
pub fn guest_target_dir(package: &str) -> &'static str {
    if package == "team-joiner" { "guests-clients" } else { "guests" }
}

/// Builds the guest crate `package` for wasm32-wasip2 (once; later calls are
/// no-ops for cargo) and returns the component's path. A separate target dir
/// keeps this from waiting on the lock of the `cargo test` that runs us.
pub fn guest_wasm(package: &str) -> PathBuf {
    let _g = GUEST_BUILD.lock().unwrap_or_else(|p| p.into_inner());
    let root = workspace_root();
    let target = root.join("target").join(guest_target_dir(package));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let out = Command::new(cargo)
        .current_dir(&root)
        .env("CARGO_TARGET_DIR", &target)
        .args(["build", "--release", "--target", "wasm32-wasip2", "-p", package])
        .output()
        .expect("run cargo");
    assert!(out.status.success(), "building guest {package} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    // Libraries (cdylib) get underscores, binaries keep the package's name.
    let dir = target.join("wasm32-wasip2/release");
    let lib = dir.join(format!("{}.wasm", package.replace('-', "_")));
    let bin = dir.join(format!("{package}.wasm"));
    let path = if lib.exists() { lib } else { bin };
    assert!(path.exists(), "{} missing after build", path.display());
    path
}

/// A TypeScript or Python component built by `scripts/build-ts.sh` or
/// `scripts/build-python.sh` (`scripts/test.sh` runs both first).
pub fn polyglot_wasm(name: &str) -> PathBuf {
    let path = workspace_root().join("target/polyglot").join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "{} missing: run scripts/build-ts.sh and scripts/build-python.sh (scripts/test.sh does)",
        path.display()
    );
    path
}

/// `--set` value pointing nodes at one compiled-code cache for the whole test
/// run, so a 12–18 MB interpreter component compiles once, not once per node.
pub fn compile_cache_setting() -> String {
    format!("runtime.compile_cache_dir={}", workspace_root().join("target/compile-cache").display())
}

/// `conflux serve` on a free 127.0.0.1 port with `data_dir` and `extra` flags.
fn serve_command(data_dir: &Path, extra: &[&str]) -> Command {
    serve_command_at(data_dir, "127.0.0.1:0", extra)
}

fn serve_command_at(data_dir: &Path, listen: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(conflux_bin());
    c.args(["serve", "--listen", listen, "--data-dir"])
        .arg(data_dir)
        .args(extra)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
    c
}

/// A `conflux serve` child process. Killed when dropped.
pub struct Daemon {
    child: Option<Child>,
    pub addr: String,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
}

impl Daemon {
    /// Starts a daemon on `data_dir` and waits until it listens.
    pub fn start(data_dir: &Path) -> Daemon {
        Self::start_with(data_dir, &[])
    }

    pub fn start_with(data_dir: &Path, extra: &[&str]) -> Daemon {
        Self::start_at(data_dir, "127.0.0.1:0", extra)
    }

    /// Starts a daemon listening on `listen` (a cluster member's fixed address).
    pub fn start_at(data_dir: &Path, listen: &str, extra: &[&str]) -> Daemon {
        std::fs::create_dir_all(data_dir).unwrap();
        Self::start_logging_to(data_dir, &data_dir.join("daemon.log"), listen, extra)
    }

    /// Starts a daemon whose log goes to `log` (appended), not into its data
    /// directory, which it creates itself (so that directory's creation is
    /// part of what a test checks, as on a power-cut filesystem).
    pub fn start_logging_to(data_dir: &Path, log: &Path, listen: &str, extra: &[&str]) -> Daemon {
        let stderr = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let mut child = serve_command_at(data_dir, listen, extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("spawn conflux serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("conflux listening on ") {
                    let _ = tx.send(addr.trim().to_owned());
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let log = std::fs::read_to_string(log).unwrap_or_default();
                panic!("daemon did not start listening within 60 s; log:\n{log}");
            }
        };
        Daemon { child: Some(child), addr, data_dir: data_dir.to_owned(), log_path: log.to_owned() }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> ConfluxClient<Channel> {
        conflux_client::connect(&self.addr).await.expect("connect to daemon")
    }

    /// A client sending `token` (if any) as a bearer token.
    pub async fn client_with_token(&self, token: Option<&str>) -> conflux_client::AuthClient {
        let opts = conflux_client::ClientOptions { token: token.map(conflux_client::Secret::new), ca_cert: None };
        conflux_client::connect_with(&self.addr, &opts).await.expect("connect to daemon")
    }

    /// Runs a client command of the real CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(conflux_bin()).arg("--addr").arg(self.url()).args(args).output().expect("run conflux")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// `kill -9`: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits for a clean exit and returns its status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        let ok = Command::new("kill").args(["-TERM", &c.id().to_string()]).status().expect("run kill");
        assert!(ok.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("daemon did not exit within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs `conflux serve` on `data_dir` (plus `extra` flags) expecting it to
/// refuse to start: waits (bounded) for it to exit, asserts the exit status is
/// non-zero and returns its stderr.
pub fn serve_expecting_failure(data_dir: &Path, extra: &[&str]) -> String {
    let mut child = serve_command(data_dir, extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn conflux serve");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("conflux serve did not exit within 60 s; stderr:\n{}", stderr(&out));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    assert!(!status.success(), "conflux serve should have failed; stdout:\n{}", stdout(&out));
    assert!(!stdout(&out).contains("conflux listening"), "it listened: {}", stdout(&out));
    stderr(&out)
}

/// The `conflux-error-kind` of a failed call ("" if absent).
pub fn kind(s: &tonic::Status) -> String {
    conflux_client::error_kind(s).unwrap_or("").to_owned()
}

/// The one `error: …` line of a failed command's stderr (asserting there is exactly one).
pub fn error_line(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "expected one error line in:\n{stderr}");
    lines[0].to_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Deploys `wasm` as `entity_type` through the CLI and checks it worked.
pub fn deploy(d: &Daemon, entity_type: &str, wasm: &Path) {
    let out = d.cli(&["deploy", entity_type, wasm.to_str().unwrap()]);
    assert!(out.status.success(), "deploy failed: {}", stderr(&out));
}

pub fn invoke_req(entity_type: &str, id: &str, op: &str, payload: &str) -> pb::InvokeRequest {
    pb::InvokeRequest {
        entity: Some(pb::EntityRef { entity_type: entity_type.into(), id: id.into() }),
        operation: op.into(),
        payload: payload.as_bytes().to_vec(),
        ..Default::default()
    }
}

/// Invokes and parses the JSON reply.
pub async fn call(
    c: &mut ConfluxClient<Channel>,
    entity_type: &str,
    id: &str,
    op: &str,
    payload: &str,
) -> Result<serde_json::Value, tonic::Status> {
    let r = c.invoke(invoke_req(entity_type, id, op, payload)).await?.into_inner();
    Ok(serde_json::from_slice(&r.reply).expect("reply is JSON"))
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// A well-behaved client calling `counter/bystander add 1` in a loop, to show
/// that other entities keep being served while something fails.
pub struct Bystander {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ok: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<Vec<tonic::Status>>,
}

impl Bystander {
    /// Starts the loop (the `counter` type must be deployed) and waits for its
    /// first success.
    pub async fn start(d: &Daemon) -> Bystander {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ok = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut c = d.client().await;
        let task = {
            let (stop, ok) = (stop.clone(), ok.clone());
            tokio::spawn(async move {
                let mut errors = Vec::new();
                // Bounded by the stop flag and by a call budget.
                for _ in 0..1_000_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    match call(&mut c, "counter", "bystander", "add", "1").await {
                        Ok(_) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => errors.push(e),
                    }
                }
                errors
            })
        };
        while ok.load(Ordering::Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Bystander { stop, ok, task }
    }

    pub fn calls(&self) -> u64 {
        self.ok.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits (bounded) until the bystander made progress past `since`, stops it
    /// and asserts it never failed.
    pub async fn finish(self, since: u64) {
        for _ in 0..400 {
            if self.calls() > since + 5 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let progressed = self.calls() > since + 5;
        let errors = self.task.await.unwrap();
        assert!(errors.is_empty(), "bystander saw errors: {errors:?}");
        assert!(progressed, "bystander stalled");
    }
}

/// The bank's statements (`accounts` accounts `a0`, `a1`, …) once its sagas
/// settled: nothing pending, and the same as the round before. Accounts are
/// read one after another, so a message delivered between two reads can make
/// a single round inconsistent (a credit read before it landed, its sender
/// read after it settled).
pub async fn settled_statements(
    c: &mut ConfluxClient<Channel>,
    accounts: usize,
    secs: u64,
) -> std::collections::BTreeMap<String, serde_json::Value> {
    let mut previous = None;
    eventually(secs, "the sagas to settle", async || {
        let mut statements = std::collections::BTreeMap::new();
        for a in 0..accounts {
            let id = format!("a{a}");
            statements.insert(id.clone(), call(c, "account", &id, "statement", "").await.ok()?);
        }
        let pending = statements.values().any(|s| {
            s["outgoing"].as_object().unwrap().values().any(|o| o["status"] != "completed" && o["status"] != "refunded")
        });
        let settled = !pending && previous.as_ref() == Some(&statements);
        previous = Some(statements.clone());
        settled.then_some(statements)
    })
    .await
}

/// The bank's books after every saga settled (`statements`: account id →
/// its `statement`): money is conserved, no transfer is credited twice, and
/// every acknowledged `(from, to, transfer id)` either completed (credited to
/// `to`) or was refunded because `to` is the `closed` account.
pub fn assert_bank_settled(
    statements: &std::collections::BTreeMap<String, serde_json::Value>,
    acknowledged: &[(String, String, String)],
    expected_total: i64,
    closed: &str,
) {
    let total: i64 = statements.values().map(|s| s["balance"].as_i64().unwrap()).sum();
    assert_eq!(total, expected_total, "money is conserved");
    let mut credited_anywhere = std::collections::BTreeSet::new();
    for s in statements.values() {
        for id in s["credited"].as_array().unwrap() {
            assert!(credited_anywhere.insert(id.as_str().unwrap().to_owned()), "credited twice: {id}");
        }
    }
    for (from, to, id) in acknowledged {
        let out = &statements[from]["outgoing"][id];
        let credited = statements[to]["credited"].as_array().unwrap().contains(&serde_json::json!(id));
        match out["status"].as_str() {
            Some("completed") => assert!(credited, "{id} completed but {to} has no credit"),
            Some("refunded") => assert!(!credited && to == closed, "{id} refunded: {out}"),
            other => panic!("acknowledged transfer {id} is {other:?} after quiescence"),
        }
    }
}

/// Polls `probe` until it returns `Some` or `secs` pass (then panics with `what`).
pub async fn eventually<T>(secs: u64, what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {secs} s waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A small deterministic PRNG (xorshift), so the bank tests need no extra crate.
pub struct Rng(pub u64);

impl Rng {
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Counters `k0…k39` that the crash tests add to.
pub const TALLY_COUNTERS: usize = 40;
/// Callers adding to them at once.
pub const TALLY_CLIENTS: usize = 16;

/// Acknowledged and attempted adds per entity.
pub struct Tally {
    pub acked: Vec<AtomicU64>,
    pub attempted: Vec<AtomicU64>,
}

impl Tally {
    pub fn new() -> Arc<Tally> {
        Arc::new(Tally {
            acked: (0..TALLY_COUNTERS).map(|_| AtomicU64::new(0)).collect(),
            attempted: (0..TALLY_COUNTERS).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    pub fn total_acked(&self) -> u64 {
        self.acked.iter().map(|a| a.load(Ordering::SeqCst)).sum()
    }
}

/// `TALLY_CLIENTS` callers adding 1 to the `TALLY_COUNTERS` counters through `addrs`
/// (round robin) until `stop` or their first error (the cut).
pub fn start_adds(
    runtime: &tokio::runtime::Runtime,
    addrs: &[String],
    tally: &Arc<Tally>,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..TALLY_CLIENTS)
        .map(|client| {
            let addr = addrs[client % addrs.len()].clone();
            let (tally, stop) = (tally.clone(), stop.clone());
            runtime.spawn(async move {
                let mut c = conflux_client::connect(&addr).await.unwrap();
                let mut i = client;
                // Bounded: the flag, the first error, or 100k calls.
                for _ in 0..100_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let e = i % TALLY_COUNTERS;
                    tally.attempted[e].fetch_add(1, Ordering::SeqCst);
                    match call(&mut c, "counter", &format!("k{e}"), "add", "1").await {
                        Ok(_) => {
                            tally.acked[e].fetch_add(1, Ordering::SeqCst);
                        }
                        Err(_) => break,
                    }
                    i += 7;
                }
            })
        })
        .collect()
}

/// Reads every counter through `addr` (retrying while shards elect
/// leaders) and checks it against the tally.
pub async fn check_counters(addr: &str, tally: &Tally) {
    let mut c = conflux_client::connect(addr).await.unwrap();
    for e in 0..TALLY_COUNTERS {
        let deadline = Instant::now() + Duration::from_secs(30);
        let got = loop {
            match call(&mut c, "counter", &format!("k{e}"), "get", "").await {
                Ok(v) => break v.as_u64().unwrap(),
                Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(s) => panic!("reading k{e} after the power cut: {s:?}"),
            }
        };
        let a = tally.acked[e].load(Ordering::SeqCst);
        let t = tally.attempted[e].load(Ordering::SeqCst);
        assert!(got >= a, "entity k{e}: {got} < {a} acknowledged adds — an acknowledged write was lost");
        assert!(got <= t, "entity k{e}: {got} > {t} attempted adds — an add was applied twice");
    }
}

/// A counter component deployed on a fresh node gets `TALLY_CLIENTS` callers
/// adding until the node is killed with `kill -9`; after a restart on the same
/// directory, every counter holds at least its acknowledged adds and at most
/// its attempted ones. `extra` goes to both `serve`s.
pub fn kill_dash_nine_during_adds_loses_no_acknowledged_add(wasm: &Path, extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start_with(dir.path(), extra);
    deploy(&d, "counter", wasm);
    let (tally, stop) = (Tally::new(), Arc::new(AtomicBool::new(false)));
    let runtime = rt();
    let clients = start_adds(&runtime, std::slice::from_ref(&d.addr), &tally, &stop);
    std::thread::sleep(Duration::from_millis(1500));
    d.kill9();
    stop.store(true, Ordering::Relaxed);
    runtime.block_on(async {
        for c in clients {
            c.await.unwrap();
        }
    });
    assert!(tally.total_acked() > 100, "the load did not get going: {} acks", tally.total_acked());
    let d = Daemon::start_with(dir.path(), extra);
    runtime.block_on(check_counters(&d.addr, &tally));
}
