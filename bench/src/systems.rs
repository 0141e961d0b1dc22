//! Starting each system under test in its own temporary directory on 127.0.0.1:
//! a Conflux node, PostgreSQL (+ the stateless service), and Restate (+ the
//! TypeScript service). Each returns its guarded processes, the address to
//! drive, and what the report says about its version and durability.

use crate::conflux::ConfluxTarget;
use crate::http::HttpTarget;
use crate::procs::{Proc, free_port, is_root, output, spawn_announcing};
use anyhow::{Context, bail};
use rustix::process::Signal;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// A started system: its processes (stopped on drop, before the directory is
/// removed), the roots of its memory accounting, version and durability.
pub struct Running {
    pub procs: Vec<Proc>,
    pub pids: Vec<u32>,
    pub version: String,
    pub durability: String,
    /// Prometheus metrics to read WAL fdatasyncs from (Conflux only).
    pub metrics_url: Option<String>,
    /// Last field: dropped after the processes.
    pub dir: TempDir,
}

fn log_path(dir: &TempDir, name: &str) -> PathBuf {
    dir.path().join(format!("{name}.log"))
}

/// `conflux serve` on 127.0.0.1 with a fresh temporary data directory: the
/// process (stopped on drop), its address, and the directory (drop it after the process).
pub fn spawn_conflux(bin: &Path) -> anyhow::Result<(Proc, String, TempDir)> {
    let dir = tempfile::Builder::new().prefix("bench-conflux-").tempdir()?;
    let mut cmd = Command::new(bin);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"]).arg(dir.path().join("data")).env("RUST_LOG", "warn");
    let (proc, addr) = spawn_announcing(
        "conflux",
        cmd,
        &log_path(&dir, "conflux"),
        "conflux listening on ",
        Duration::from_secs(60),
        Signal::TERM,
        Duration::from_secs(10),
    )?;
    Ok((proc, addr, dir))
}

/// `conflux serve` on a fresh data directory, with the counter (type `counter`)
/// and team-joiner (types `user`, and `team`, which a join asks) components deployed.
pub async fn start_conflux(
    bin: &Path,
    counter: &Path,
    team: &Path,
    team_side: &Path,
) -> anyhow::Result<(Running, ConfluxTarget)> {
    let (proc, addr, dir) = spawn_conflux(bin)?;
    let version = output(Command::new(bin).arg("--version")).unwrap_or_else(|e| format!("unknown ({e})"));
    let target = ConfluxTarget::connect(&addr, 8).await?;
    target.deploy("counter", counter).await.context("deploying the counter")?;
    target.deploy("user", team).await.context("deploying team-joiner")?;
    target.deploy("team", team_side).await.context("deploying team-joiner's team")?;
    let durability = "single node, default config: each acknowledged turn's write set is in the WAL (raft-log) and \
                      fdatasync'd before the reply, group commit (up to 1024 write sets per fdatasync, 100 µs \
                      flush wait); sled holds the materialized state"
        .to_owned();
    let pids = vec![proc.pid()];
    let base = if addr.starts_with("http") { addr.clone() } else { format!("http://{addr}") };
    let metrics_url = Some(format!("{base}/metrics"));
    Ok((Running { procs: vec![proc], pids, version, durability, metrics_url, dir }, target))
}

/// A PostgreSQL server started from `bin_dir` (initdb + postgres) in a fresh
/// directory, listening on 127.0.0.1 only. As root it runs as user `postgres`.
pub struct Postgres {
    pub running: Running,
    pub port: u16,
}

fn pg_command(bin_dir: &Path, program: &str) -> Command {
    let exe = bin_dir.join(program);
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--init-groups", "--"]).arg(exe);
        c
    } else {
        Command::new(exe)
    }
}

pub async fn start_postgres(bin_dir: &Path) -> anyhow::Result<Postgres> {
    let dir = tempfile::Builder::new().prefix("bench-postgres-").tempdir()?;
    if is_root() {
        output(Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir.path()))?;
    }
    let data = dir.path().join("data");
    let log = log_path(&dir, "postgres");
    // initdb --no-sync only skips syncing the fresh catalog; the server below
    // runs with Debian's defaults (fsync on, synchronous_commit on).
    output(pg_command(bin_dir, "initdb").args(["-D"]).arg(&data).args([
        "-U",
        "bench",
        "--auth=trust",
        "-E",
        "UTF8",
        "--no-locale",
        "--no-sync",
    ]))
    .context("initdb")?;
    let port = free_port()?;
    let mut cmd = pg_command(bin_dir, "postgres");
    cmd.arg("-D").arg(&data).args([
        "-c",
        "listen_addresses=127.0.0.1",
        "-c",
        &format!("port={port}"),
        "-c",
        &format!("unix_socket_directories={}", dir.path().display()),
        "-c",
        "max_connections=200",
    ]);
    // SIGINT is PostgreSQL's "fast" shutdown.
    let mut proc = Proc::spawn("postgres", cmd, Some(&log), Signal::INT, Duration::from_secs(15))?;
    let conn = format!("host=127.0.0.1 port={port} user=bench dbname=postgres");
    let deadline = Instant::now() + Duration::from_secs(60);
    let client = loop {
        match tokio_postgres::connect(&conn, tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                break client;
            }
            Err(_) if Instant::now() < deadline => {
                proc.check_running()?;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => bail!("PostgreSQL did not accept connections: {e}{}", proc.log_tail()),
        }
    };
    let mut settings = Vec::new();
    for name in ["fsync", "synchronous_commit", "wal_sync_method", "full_page_writes", "shared_buffers"] {
        let v: String = client.query_one(&format!("SHOW {name}"), &[]).await?.get(0);
        settings.push(format!("{name}={v}"));
    }
    let version: String = client.query_one("SHOW server_version", &[]).await?.get(0);
    let durability = format!(
        "PostgreSQL defaults (initdb; only addresses and max_connections=200 set): {}; every commit waits for \
         its WAL flush (PostgreSQL's own group commit applies); isolation READ COMMITTED",
        settings.join(", ")
    );
    let pids = vec![proc.pid()];
    Ok(Postgres {
        running: Running {
            procs: vec![proc],
            pids,
            version: format!("PostgreSQL {version}"),
            durability,
            metrics_url: None,
            dir,
        },
        port,
    })
}

/// The stateless service over `pg` in `mode` (`naive` or `locked`).
pub async fn start_pg_service(
    bin: &Path,
    pg: &Postgres,
    mode: &str,
    pool: usize,
) -> anyhow::Result<(Proc, HttpTarget)> {
    let mut cmd = Command::new(bin);
    cmd.args(["--mode", mode, "--pool", &pool.to_string(), "--postgres"])
        .arg(format!("host=127.0.0.1 port={} user=bench dbname=postgres", pg.port));
    let (proc, addr) = spawn_announcing(
        &format!("pg-service ({mode})"),
        cmd,
        &log_path(&pg.running.dir, &format!("pg-service-{mode}")),
        "pg-service listening on ",
        Duration::from_secs(30),
        Signal::TERM,
        Duration::from_secs(5),
    )?;
    Ok((proc, HttpTarget::new(&format!("http://{addr}"))))
}

/// The restate-server binary inside the npm project's platform package.
pub fn restate_server_bin(peer_dir: &Path) -> PathBuf {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "x64",
        "aarch64" => "arm64",
        other => other,
    };
    peer_dir
        .join("node_modules/@restatedev")
        .join(format!("restate-server-{}-{arch}", std::env::consts::OS))
        .join("bin/restate-server")
}

/// Restate (its server binary from npm, default configuration except the
/// addresses, on 127.0.0.1) and the TypeScript service (`node service.mjs`),
/// registered through the admin API.
pub async fn start_restate(peer_dir: &Path) -> anyhow::Result<(Running, HttpTarget)> {
    let server_bin = restate_server_bin(peer_dir);
    if !server_bin.exists() {
        bail!("{} is missing: run `npm ci` in {}", server_bin.display(), peer_dir.display());
    }
    let dir = tempfile::Builder::new().prefix("bench-restate-").tempdir()?;
    let (ingress, admin, fabric, svc) = (free_port()?, free_port()?, free_port()?, free_port()?);
    let env = [
        ("RESTATE_INGRESS__BIND_ADDRESS", format!("127.0.0.1:{ingress}")),
        ("RESTATE_ADMIN__BIND_ADDRESS", format!("127.0.0.1:{admin}")),
        ("RESTATE_BIND_ADDRESS", format!("127.0.0.1:{fabric}")),
        ("RESTATE_ADVERTISED_ADDRESS", format!("http://127.0.0.1:{fabric}/")),
        ("RESTATE_LISTEN_MODE", "tcp".into()),
        ("RESTATE_DISABLE_TELEMETRY", "true".into()),
        ("RESTATE_LOG_FILTER", "warn".into()),
    ];
    let mut cmd = Command::new(&server_bin);
    cmd.arg("--base-dir").arg(dir.path().join("data")).args(["--no-logo", "--log-disable-ansi-codes", "true"]);
    cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    let config = output(Command::new(&server_bin).arg("--dump-config").envs(env.iter().map(|(k, v)| (*k, v.as_str()))))
        .unwrap_or_default();
    let mut server =
        Proc::spawn("restate-server", cmd, Some(&log_path(&dir, "restate")), Signal::TERM, Duration::from_secs(5))?;

    let mut node = Command::new("node");
    node.arg("service.mjs").current_dir(peer_dir).env("PORT", svc.to_string());
    let (service, _) = spawn_announcing(
        "restate service (node)",
        node,
        &log_path(&dir, "restate-service"),
        "restate service listening on ",
        Duration::from_secs(30),
        Signal::TERM,
        Duration::from_secs(5),
    )?;

    let admin_api = HttpTarget::new(&format!("http://127.0.0.1:{admin}"));
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        server.check_running()?;
        let body = serde_json::to_vec(&serde_json::json!({ "uri": format!("http://127.0.0.1:{svc}") }))?;
        match admin_api.post("/deployments", Some(body)).await {
            Ok((200 | 201, _)) => break,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(250)).await,
            other => bail!("registering the service with Restate failed: {other:?}{}", server.log_tail()),
        }
    }
    let target = HttpTarget::new(&format!("http://127.0.0.1:{ingress}"));
    loop {
        match target.post("/counter/ready/get", None).await {
            Ok((200, _)) => break,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(250)).await,
            other => bail!("Restate's ingress did not serve the counter: {other:?}{}", server.log_tail()),
        }
    }
    let server_version = output(Command::new(&server_bin).arg("--version")).unwrap_or_else(|e| format!("? ({e})"));
    let sdk = std::fs::read_to_string(peer_dir.join("node_modules/@restatedev/restate-sdk/package.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["version"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "?".into());
    let node_version = output(Command::new("node").arg("--version")).unwrap_or_default();
    let version = format!("{server_version}, @restatedev/restate-sdk {sdk} on Node {node_version}");
    let durability = restate_durability(&config);
    let pids = vec![server.pid(), service.pid()];
    Ok((Running { procs: vec![service, server], pids, version, durability, metrics_url: None, dir }, target))
}

/// Summarises the durability settings of Restate's effective configuration.
fn restate_durability(config: &str) -> String {
    let Ok(c) = config.parse::<toml::Table>() else { return "defaults (configuration not readable)".into() };
    let get = |path: &[&str]| {
        let mut v = toml::Value::Table(c.clone());
        for p in path {
            v = v.get(p).cloned().unwrap_or(toml::Value::String("?".into()));
        }
        match v {
            toml::Value::String(s) => s,
            other => other.to_string(),
        }
    };
    format!(
        "defaults (single node, all roles): every invocation step and state change is appended to Bifrost, \
         its durable log (provider {}, replication {}), which the log-server keeps in RocksDB with WAL fsync on \
         (log-server.rocksdb-disable-wal-fsync = {}); partition state in RocksDB ({} partitions); telemetry off",
        get(&["bifrost", "default-provider"]),
        get(&["default-replication"]),
        get(&["log-server", "rocksdb-disable-wal-fsync"]),
        get(&["default-num-partitions"]),
    )
}

/// Which RPC ceiling `conflux-bench-echo` serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Echo {
    /// Conflux's gRPC `Invoke` on tonic, driven like Conflux.
    Grpc,
    /// The JSON paths on hyper HTTP/1.1, driven like Restate and the PostgreSQL service.
    Http,
}

/// `conflux-bench-echo` on 127.0.0.1: a server answering every call at once
/// from memory.
pub async fn start_echo(bin: &Path, echo: Echo) -> anyhow::Result<(Running, EchoTarget)> {
    let dir = tempfile::Builder::new().prefix("bench-echo-").tempdir()?;
    let mut cmd = Command::new(bin);
    cmd.arg(if echo == Echo::Grpc { "--grpc" } else { "--http" });
    let (proc, addr) = spawn_announcing(
        "echo",
        cmd,
        &log_path(&dir, "echo"),
        "echo listening on ",
        Duration::from_secs(30),
        Signal::TERM,
        Duration::from_secs(5),
    )?;
    let target = match echo {
        // The same client and connections as Conflux (`start_conflux`).
        Echo::Grpc => EchoTarget::Grpc(Box::new(ConfluxTarget::connect(&format!("http://{addr}"), 8).await?)),
        Echo::Http => EchoTarget::Http(Box::new(HttpTarget::new(&format!("http://{addr}")))),
    };
    let (version, durability) = match echo {
        Echo::Grpc => ("tonic gRPC server, Conflux's Invoke protobuf; state in a HashMap behind a mutex", "none"),
        Echo::Http => ("hyper HTTP/1.1 server, the JSON paths; state in a HashMap behind a mutex", "none"),
    };
    let pids = vec![proc.pid()];
    Ok((
        Running {
            procs: vec![proc],
            pids,
            version: version.into(),
            durability: durability.into(),
            metrics_url: None,
            dir,
        },
        target,
    ))
}

/// The client of an echo server: Conflux's or the HTTP systems'.
#[derive(Clone)]
pub enum EchoTarget {
    Grpc(Box<ConfluxTarget>),
    Http(Box<HttpTarget>),
}

impl crate::target::Target for EchoTarget {
    async fn add(&self, key: &str, n: i64) -> Result<i64, crate::target::CallError> {
        match self {
            EchoTarget::Grpc(t) => t.add(key, n).await,
            EchoTarget::Http(t) => t.add(key, n).await,
        }
    }

    async fn get(&self, key: &str) -> Result<i64, crate::target::CallError> {
        match self {
            EchoTarget::Grpc(t) => t.get(key).await,
            EchoTarget::Http(t) => t.get(key).await,
        }
    }

    async fn join(&self, user: &str, team: &str) -> Result<(), crate::target::CallError> {
        match self {
            EchoTarget::Grpc(t) => t.join(user, team).await,
            EchoTarget::Http(t) => t.join(user, team).await,
        }
    }

    async fn teams(&self, user: &str) -> Result<Vec<String>, crate::target::CallError> {
        match self {
            EchoTarget::Grpc(t) => t.teams(user).await,
            EchoTarget::Http(t) => t.teams(user).await,
        }
    }
}
