//! The composition root: opens storage, the commit log, the runtime, the
//! registry and the scheduler from one validated [`Config`], and runs the API
//! until a shutdown signal, then drains in-flight turns and persists. It holds
//! an exclusive lock on the data directory for the node's lifetime, so a second
//! daemon on the same directory refuses to start.
//!
//! A single node is the one-replica case of the cluster's code path: its data
//! is shard 0, an openraft group whose only voter is this node, with the
//! shard's WAL in `shards/0/wal` and its sled tree in `state/`. Turns commit
//! through `ShardLog` exactly as they will on a leader with followers.

use crate::api::Api;
use crate::cluster::raft::{NoPeers, ReplicaHost, ShardLog};
use crate::config::Config;
use crate::log::CommitLog;
use crate::registry::Registry;
use crate::runtime::Runtime;
use crate::scheduler::Scheduler;
use crate::storage::StateStore;
use std::fs::{File, OpenOptions, TryLockError};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

/// Lock file in the data directory, held (flock) while a node has it open.
const LOCK_FILE: &str = "conflux.lock";
/// The node id of a single node (the only voter of its shard group).
const SINGLE_NODE_ID: u64 = 1;
/// How long start-up may take to elect itself and apply its log.
const CATCH_UP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot create data directory {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
    #[error("data directory {path} is in use by another conflux process (it holds {path}/{LOCK_FILE})")]
    InUse { path: String },
    #[error("cannot lock data directory {path}: {source}")]
    Lock { path: String, source: std::io::Error },
    #[error("data directory {path}: cannot open the state store (corrupt or unreadable?): {source}")]
    StoreOpen { path: String, source: crate::storage::StorageError },
    #[error("data directory {path}: cannot open the commit log (corrupt or unreadable?): {source}")]
    LogOpen { path: String, source: Box<crate::cluster::raft::ReplicaError> },
    #[error("data directory {path}: the commit log did not come up: {message}")]
    CatchUp { path: String, message: String },
    #[error("data directory {path}: cannot open the registry (corrupt or unreadable?): {source}")]
    RegistryOpen { path: String, source: crate::registry::RegistryError },
    #[error("state store: {0}")]
    Storage(#[from] crate::storage::StorageError),
    #[error("commit log: {0}")]
    Log(#[from] crate::log::LogError),
    #[error("runtime: {0}")]
    Runtime(#[from] crate::runtime::RuntimeError),
    #[error("registry: {0}")]
    Registry(#[from] crate::registry::RegistryError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("starting background work: {0}")]
    Background(String),
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
}

/// One running single-node Conflux.
pub struct Node {
    pub scheduler: Scheduler,
    pub registry: Arc<Registry>,
    pub store: Arc<dyn StateStore>,
    pub log: Arc<dyn CommitLog>,
    cfg: Config,
    /// The data directory's lock; released when the node is dropped.
    _lock: File,
}

/// Takes the data directory's exclusive lock, or says who holds it.
fn lock_data_dir(dir: &Path) -> Result<File, NodeError> {
    let path = dir.display().to_string();
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK_FILE))
        .map_err(|source| NodeError::Lock { path: path.clone(), source })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(NodeError::InUse { path }),
        Err(TryLockError::Error(source)) => Err(NodeError::Lock { path, source }),
    }
}

impl Node {
    /// Opens every layer; the log replays into the store before anything runs.
    pub async fn open(cfg: Config) -> Result<Self, NodeError> {
        cfg.validate()?;
        let dir = &cfg.storage.data_dir;
        std::fs::create_dir_all(dir)
            .map_err(|source| NodeError::DataDir { path: dir.display().to_string(), source })?;
        let lock = lock_data_dir(dir)?;
        let path = || dir.display().to_string();
        let sled_dir = dir.join("state");
        // sled recovers its files on open: blocking work, kept off the runtime.
        let db = {
            let sled_dir = sled_dir.clone();
            tokio::task::spawn_blocking(move || sled::Config::new().path(&sled_dir).open())
                .await
                .map_err(|e| NodeError::Background(e.to_string()))?
                .map_err(|e| NodeError::StoreOpen { path: path(), source: crate::storage::StorageError::Sled(e) })?
        };
        let raft_config = crate::cluster::raft::raft_config("conflux", cfg.log.compact_every_entries)
            .map_err(|e| NodeError::CatchUp { path: path(), message: e.to_string() })?;
        let host = ReplicaHost {
            node: SINGLE_NODE_ID,
            data_dir: dir.clone(),
            db,
            sled_dir,
            config: raft_config,
            transport: Arc::new(NoPeers),
            wal_flush_wait: std::time::Duration::from_micros(cfg.log.wal_flush_wait_micros),
        };
        let replica = host.open(0).await.map_err(|source| match source {
            crate::cluster::raft::ReplicaError::Store(source) => NodeError::StoreOpen { path: path(), source },
            source => NodeError::LogOpen { path: path(), source: Box::new(source) },
        })?;
        let catch_up = |e: &dyn std::fmt::Display| NodeError::CatchUp { path: path(), message: e.to_string() };
        if !replica.raft.is_initialized().await.map_err(|e| catch_up(&e))? {
            let me = openraft::BasicNode::new(cfg.api.listen.to_string());
            replica
                .raft
                .initialize(std::collections::BTreeMap::from([(SINGLE_NODE_ID, me)]))
                .await
                .map_err(|e| catch_up(&e))?;
        }
        // The only voter elects itself at once; nothing may read the store
        // before it has applied every entry the log holds.
        replica
            .raft
            .wait(Some(CATCH_UP_TIMEOUT))
            .metrics(
                |m| m.current_leader == Some(SINGLE_NODE_ID) && m.last_applied.map(|id| id.index) >= m.last_log_index,
                "single node leads and has applied its log",
            )
            .await
            .map_err(|e| catch_up(&e))?;
        let store: Arc<dyn StateStore> = replica.state.store().clone();
        let log: Arc<dyn CommitLog> = Arc::new(ShardLog::new(replica, &cfg.log));
        // Building the engine and loading (maybe compiling) every active
        // component is blocking work, kept off the runtime.
        let (runtime, registry) = {
            let (cfg, dir, store, log) = (cfg.clone(), dir.clone(), store.clone(), log.clone());
            tokio::task::spawn_blocking(move || {
                let runtime = Arc::new(Runtime::new(&cfg.runtime)?);
                let registry = Registry::open(&cfg.registry, &dir, runtime.clone(), store, log)
                    .map_err(|source| NodeError::RegistryOpen { path: dir.display().to_string(), source })?;
                Ok::<_, NodeError>((runtime, Arc::new(registry)))
            })
            .await
            .map_err(|e| NodeError::Background(e.to_string()))??
        };
        let scheduler = Scheduler::new(&cfg.scheduler, runtime, registry.clone(), store.clone(), log.clone());
        Ok(Self { scheduler, registry, store, log, cfg, _lock: lock })
    }

    /// Serves until `shutdown` resolves, then drains and persists. `on_bound`
    /// receives the bound address (useful with port 0).
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
        on_bound: impl FnOnce(SocketAddr),
    ) -> Result<(), NodeError> {
        // Built first: it reads the TLS files, which must fail start-up, not the first call.
        let api = Api::new(
            &self.cfg.api,
            self.cfg.registry.max_component_bytes,
            self.cfg.storage.data_dir.display().to_string(),
            self.scheduler.clone(),
            self.registry.clone(),
            self.store.clone(),
            self.log.clone(),
        )?;
        let addr = self.cfg.api.listen;
        let listener =
            tokio::net::TcpListener::bind(addr).await.map_err(|source| NodeError::Listen { addr, source })?;
        let bound = listener.local_addr().map_err(|source| NodeError::Listen { addr, source })?;
        on_bound(bound);
        let sched = self.scheduler.clone();
        tokio::task::spawn_blocking(move || sched.recover_counts())
            .await
            .map_err(|e| NodeError::Background(e.to_string()))?
            .map_err(|e| NodeError::Background(format!("counting the outbox: {e}")))?;
        let background = [
            tokio::spawn(self.scheduler.clone().run_idle_eviction()),
            tokio::spawn(self.scheduler.clone().run_deliverer()),
            tokio::spawn(self.scheduler.clone().run_timers()),
            tokio::spawn(self.scheduler.clone().run_idempotency_sweeper()),
        ];
        let scheduler = self.scheduler.clone();
        // On the signal: refuse new invocations and let running turns commit,
        // then stop the listener.
        let stop = async move {
            shutdown.await;
            tracing::info!("shutting down: draining in-flight turns");
            scheduler.drain().await;
        };
        let served = api.serve(listener, stop).await;
        for task in background {
            task.abort();
        }
        self.log.shutdown().await?;
        tracing::info!("shut down cleanly");
        served.map_err(NodeError::from)
    }
}
