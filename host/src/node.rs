//! The composition root: opens storage, the commit log, the runtime, the
//! registry and the scheduler from one validated [`Config`], and runs the API
//! until a shutdown signal, then drains in-flight turns and persists.

use crate::api::Api;
use crate::config::Config;
use crate::log::{CommitLog, LocalLog};
use crate::registry::Registry;
use crate::runtime::Runtime;
use crate::scheduler::Scheduler;
use crate::storage::{SledStore, StateStore};
use std::net::SocketAddr;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot create data directory {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
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
}

impl Node {
    /// Opens every layer; the log replays into the store before anything runs.
    pub fn open(cfg: Config) -> Result<Self, NodeError> {
        cfg.validate()?;
        let dir = &cfg.storage.data_dir;
        std::fs::create_dir_all(dir)
            .map_err(|source| NodeError::DataDir { path: dir.display().to_string(), source })?;
        let store: Arc<dyn StateStore> = Arc::new(SledStore::open(&dir.join("state"))?);
        let log: Arc<dyn CommitLog> = Arc::new(LocalLog::open(&dir.join("wal"), store.clone(), cfg.log.clone())?);
        let runtime = Arc::new(Runtime::new(&cfg.runtime)?);
        let registry = Arc::new(Registry::open(&cfg.registry, dir, runtime.clone(), store.clone(), log.clone())?);
        let scheduler = Scheduler::new(&cfg.scheduler, runtime, registry.clone(), store.clone(), log.clone());
        Ok(Self { scheduler, registry, store, log, cfg })
    }

    /// Serves until `shutdown` resolves, then drains and persists. `on_bound`
    /// receives the bound address (useful with port 0).
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
        on_bound: impl FnOnce(SocketAddr),
    ) -> Result<(), NodeError> {
        let addr = self.cfg.api.listen;
        let listener =
            tokio::net::TcpListener::bind(addr).await.map_err(|source| NodeError::Listen { addr, source })?;
        let bound = listener.local_addr().map_err(|source| NodeError::Listen { addr, source })?;
        on_bound(bound);
        let eviction = tokio::spawn(self.scheduler.clone().run_idle_eviction());
        let api = Api::new(
            &self.cfg.api,
            self.cfg.registry.max_component_bytes,
            self.cfg.storage.data_dir.display().to_string(),
            self.scheduler.clone(),
            self.registry.clone(),
            self.store.clone(),
            self.log.clone(),
        );
        let scheduler = self.scheduler.clone();
        // On the signal: refuse new invocations and let running turns commit,
        // then stop the listener.
        let stop = async move {
            shutdown.await;
            tracing::info!("shutting down: draining in-flight turns");
            scheduler.drain().await;
        };
        let served = api.serve(listener, stop).await;
        eviction.abort();
        self.log.shutdown().await?;
        tracing::info!("shut down cleanly");
        served.map_err(NodeError::from)
    }
}
