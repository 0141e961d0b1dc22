//! `conflux-bench-pg-service`: the architecture Conflux argues against — a
//! stateless HTTP service doing read-modify-write against PostgreSQL — serving
//! the counter and team-joiner over the same JSON paths as Restate's ingress
//! (`POST /counter/<key>/add|get`, `POST /user/<key>/join|team`).
//!
//! `--mode naive`: each step is its own autocommit statement and nothing is
//! locked: `add` reads the value, then writes value + n (lost updates under
//! concurrency); `join` reads the user's memberships, then inserts one if there
//! was none (two concurrent joins can both see "no team" and both insert —
//! `memberships` has no unique constraint on the user, as in a schema where a
//! user may belong to several groups and "one team" is an application rule).
//!
//! `--mode locked`: the same steps in one READ COMMITTED transaction that first
//! locks the row (`SELECT … FOR UPDATE` on the counter / on the user's row in
//! `users`, inserted with `ON CONFLICT DO NOTHING` if new). One row lock per
//! transaction cannot deadlock and READ COMMITTED raises no serialisation
//! failures, so no retry loop is needed.
//!
//! Statements are prepared once per pooled connection.

use anyhow::Context;
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::{Client, NoTls, Statement};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Naive,
    Locked,
}

#[derive(Debug, Parser)]
#[command(about = "Stateless counter/team-joiner HTTP service over PostgreSQL (benchmark peer)")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// libpq-style connection string.
    #[arg(long)]
    postgres: String,
    #[arg(long, value_enum)]
    mode: Mode,
    /// Pooled PostgreSQL connections.
    #[arg(long, default_value_t = 32)]
    pool: usize,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS counters (key text PRIMARY KEY, value bigint NOT NULL);
CREATE TABLE IF NOT EXISTS users (user_id text PRIMARY KEY);
CREATE TABLE IF NOT EXISTS memberships (user_id text NOT NULL, team text NOT NULL);
CREATE INDEX IF NOT EXISTS memberships_user ON memberships (user_id);
";

struct Stmts {
    get: Statement,
    set: Statement,
    ensure_counter: Statement,
    lock_counter: Statement,
    update_counter: Statement,
    teams: Statement,
    insert_member: Statement,
    ensure_user: Statement,
    lock_user: Statement,
}

struct Conn {
    client: Client,
    st: Stmts,
}

/// Opens a connection (creating the schema first if `schema`) and prepares the statements.
async fn connect(cfg: &str, schema: bool) -> anyhow::Result<Conn> {
    let (client, connection) = tokio_postgres::connect(cfg, NoTls).await.context("connecting to PostgreSQL")?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("pg-service: connection error: {e}");
        }
    });
    if schema {
        client.batch_execute(SCHEMA).await.context("creating the schema")?;
    }
    let st = Stmts {
        get: client.prepare("SELECT value FROM counters WHERE key = $1").await?,
        set: client
            .prepare(
                "INSERT INTO counters (key, value) VALUES ($1, $2) \
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            )
            .await?,
        ensure_counter: client
            .prepare("INSERT INTO counters (key, value) VALUES ($1, 0) ON CONFLICT (key) DO NOTHING")
            .await?,
        lock_counter: client.prepare("SELECT value FROM counters WHERE key = $1 FOR UPDATE").await?,
        update_counter: client.prepare("UPDATE counters SET value = $2 WHERE key = $1").await?,
        teams: client.prepare("SELECT team FROM memberships WHERE user_id = $1 ORDER BY team").await?,
        insert_member: client.prepare("INSERT INTO memberships (user_id, team) VALUES ($1, $2)").await?,
        ensure_user: client.prepare("INSERT INTO users (user_id) VALUES ($1) ON CONFLICT DO NOTHING").await?,
        lock_user: client.prepare("SELECT user_id FROM users WHERE user_id = $1 FOR UPDATE").await?,
    };
    Ok(Conn { client, st })
}

/// A fixed set of connections; a request holds one for its whole duration.
struct Pool {
    conns: Mutex<Vec<Conn>>,
    permits: Arc<Semaphore>,
}

struct Pooled {
    conn: Option<Conn>,
    pool: Arc<Pool>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            self.pool.conns.lock().expect("pool lock").push(c);
        }
    }
}

impl Pool {
    async fn get(self: &Arc<Self>) -> Pooled {
        let permit = self.permits.clone().acquire_owned().await.expect("pool semaphore is never closed");
        let conn = self.conns.lock().expect("pool lock").pop();
        Pooled { conn, pool: self.clone(), _permit: permit }
    }
}

type Reply = (StatusCode, String);

fn json<T: serde::Serialize>(v: &T) -> Reply {
    (StatusCode::OK, serde_json::to_string(v).expect("serialisable"))
}

async fn add(c: &mut Conn, mode: Mode, key: &str, n: i64) -> Result<Reply, tokio_postgres::Error> {
    let st = &c.st;
    match mode {
        Mode::Naive => {
            let current: i64 = c.client.query_opt(&st.get, &[&key]).await?.map(|r| r.get(0)).unwrap_or(0);
            let total = current + n;
            c.client.execute(&st.set, &[&key, &total]).await?;
            Ok(json(&total))
        }
        Mode::Locked => {
            let tx = c.client.transaction().await?;
            tx.execute(&st.ensure_counter, &[&key]).await?;
            let current: i64 = tx.query_one(&st.lock_counter, &[&key]).await?.get(0);
            let total = current + n;
            tx.execute(&st.update_counter, &[&key, &total]).await?;
            tx.commit().await?;
            Ok(json(&total))
        }
    }
}

async fn join(c: &mut Conn, mode: Mode, user: &str, team: &str) -> Result<Reply, tokio_postgres::Error> {
    let st = &c.st;
    let decide = |teams: &[String]| -> Option<Reply> {
        if teams.iter().any(|t| t == team) {
            return Some(json(&team));
        }
        teams.first().map(|current| (StatusCode::CONFLICT, format!("user {user} is already on team {current}")))
    };
    match mode {
        Mode::Naive => {
            let teams: Vec<String> = c.client.query(&st.teams, &[&user]).await?.iter().map(|r| r.get(0)).collect();
            if let Some(r) = decide(&teams) {
                return Ok(r);
            }
            c.client.execute(&st.insert_member, &[&user, &team]).await?;
            Ok(json(&team))
        }
        Mode::Locked => {
            let tx = c.client.transaction().await?;
            tx.execute(&st.ensure_user, &[&user]).await?;
            tx.query_one(&st.lock_user, &[&user]).await?;
            let teams: Vec<String> = tx.query(&st.teams, &[&user]).await?.iter().map(|r| r.get(0)).collect();
            if let Some(r) = decide(&teams) {
                tx.commit().await?;
                return Ok(r);
            }
            tx.execute(&st.insert_member, &[&user, &team]).await?;
            tx.commit().await?;
            Ok(json(&team))
        }
    }
}

async fn route(pool: &Arc<Pool>, mode: Mode, path: &str, body: &[u8]) -> Reply {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let [object, key, op] = parts[..] else {
        return (StatusCode::NOT_FOUND, format!("no route {path}"));
    };
    let mut pooled = pool.get().await;
    let Some(c) = pooled.conn.as_mut() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "no connection".into());
    };
    let result = match (object, op) {
        ("counter", "add") => match serde_json::from_slice::<i64>(body) {
            Ok(n) => add(c, mode, key, n).await,
            Err(e) => return (StatusCode::BAD_REQUEST, format!("add takes an integer: {e}")),
        },
        ("counter", "get") => {
            c.client.query_opt(&c.st.get, &[&key]).await.map(|r| json(&r.map(|r| r.get::<_, i64>(0)).unwrap_or(0)))
        }
        ("user", "join") => match serde_json::from_slice::<String>(body) {
            Ok(team) => join(c, mode, key, &team).await,
            Err(e) => return (StatusCode::BAD_REQUEST, format!("join takes a string: {e}")),
        },
        ("user", "team") => c
            .client
            .query(&c.st.teams, &[&key])
            .await
            .map(|rows| json(&rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>())),
        _ => return (StatusCode::NOT_FOUND, format!("no route {path}")),
    };
    result.unwrap_or_else(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("postgres: {e}")))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut conns = vec![connect(&args.postgres, true).await?];
    for _ in 1..args.pool.max(1) {
        conns.push(connect(&args.postgres, false).await?);
    }
    let pool = Arc::new(Pool { permits: Arc::new(Semaphore::new(conns.len())), conns: Mutex::new(conns) });
    let listener = TcpListener::bind(&args.listen).await?;
    println!("pg-service listening on {}", listener.local_addr()?);
    let mode = args.mode;
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let pool = pool.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let pool = pool.clone();
                async move {
                    let path = req.uri().path().to_owned();
                    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                    let (status, text) = route(&pool, mode, &path, &body).await;
                    let mut resp = Response::new(Full::new(Bytes::from(text)));
                    *resp.status_mut() = status;
                    resp.headers_mut().insert(hyper::header::CONTENT_TYPE, "application/json".parse().expect("valid"));
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
