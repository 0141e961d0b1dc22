//! The composition root: opens storage, the commit log, the runtime, the
//! registry and the scheduler from one validated [`Config`], and runs the API
//! until a shutdown signal, then drains in-flight turns and persists. It holds
//! an exclusive lock on the data directory for the node's lifetime, so a second
//! daemon on the same directory refuses to start.
//!
//! A single node is the one-replica case of the cluster's code path: its data
//! is shard 0, an openraft group whose only voter is this node, with the
//! shard's WAL in `shards/0/wal` and its sled tree in `state/`. Turns commit
//! through `ShardLog` exactly as they do on a leader with followers.
//!
//! A clustered node (`[cluster]` lists the members) opens its replicas of the
//! data shards under the initial placement and its replica of the metadata
//! group, which holds the registry. Its scheduler sees the replicas as one
//! store and log (`LocalShards`) and routes each invocation to the leader of
//! the entity's shard; the `Cluster` service shares the API port.
//!
//! [`data_dir`] holds what the data directory says at start-up (its lock,
//! `cluster.json`, a generated secret, the replicas on disk, a single node's
//! older data adopted); [`follow`] keeps a member in step with its metadata
//! group once it runs.

use crate::api::auth::Authenticator;
use crate::api::cluster::{ClusterSecret, ClusterService, GrpcTransport, PeerTls};
use crate::api::net::SharedNetwork;
use crate::api::{self, Api};
use crate::cluster::driver::{DriverConfig, PlacementDriver};
use crate::cluster::member::Member;
use crate::cluster::meta::{META_SHARD, MetaLog};
use crate::cluster::placement::Placement;
use crate::cluster::propagation::OtherMembers;
use crate::cluster::raft::{ReplicaHost, ReplicaTable, ShardLog};
use crate::cluster::service::ClusterNode;
use crate::cluster::shape::{ClusterShape, Layout};
use crate::cluster::sharded::{ClusterRouter, LocalShard, LocalShards};
use crate::cluster::shards::ShardSet;
use crate::cluster::view::ClusterView;
use crate::cluster::wire::Wire;
use crate::config::Config;
use crate::log::CommitLog;
use crate::registry::Registry;
use crate::runtime::Runtime;
use crate::scheduler::Scheduler;
use crate::storage::StateStore;
use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::sync::Arc;

mod data_dir;
mod follow;

use data_dir::{
    ClusterIdentity, LOCK_FILE, adopt_single_node_registry, check_cluster_identity, lock_data_dir, own_secret,
    replica_open_error, set_opened, shards_on_disk,
};
use follow::{follow_meta, read_shape};

/// If this node is the only voter of `raft`'s group, waits until it leads
/// and has applied its log.
async fn settle_if_solo(raft: &crate::cluster::raft::Raft, me: u64) -> Result<(), String> {
    if !is_solo(raft, me).await? {
        return Ok(());
    }
    crate::cluster::raft::led_and_applied(raft, me, CATCH_UP_TIMEOUT).await
}

/// Whether this node is the group's only voter. Asked of the Raft core:
/// its metrics are published a step after it starts, and read before that
/// they name no voter, so a node started alone under load went on
/// without waiting for its groups (seen as an empty outbox at start-up).
async fn is_solo(raft: &crate::cluster::raft::Raft, me: u64) -> Result<bool, String> {
    raft.with_raft_state(move |st| st.membership_state.effective().membership().voter_ids().eq([me]))
        .await
        .map_err(|e| e.to_string())
}

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
    #[error("cluster: {0}")]
    Cluster(String),
}

/// One running Conflux node.
pub struct Node {
    pub scheduler: Scheduler,
    pub registry: Arc<Registry>,
    pub store: Arc<dyn StateStore>,
    pub log: Arc<dyn CommitLog>,
    /// Holds no secret: tokens live on as `auth`'s digests, the cluster
    /// secret in `ClusterParts`.
    cfg: Config,
    auth: Authenticator,
    cluster: ClusterParts,
    /// Where the API listens and peers are dialled; `None`: the OS's TCP.
    network: Option<SharedNetwork>,
    /// The data directory's lock; released when the node is dropped.
    _lock: File,
}

/// What makes the node a member of its cluster.
struct ClusterParts {
    secret: ClusterSecret,
    /// Mutual TLS between members, if configured.
    peer_tls: Option<PeerTls>,
    table: ReplicaTable,
    member: Member,
    /// Where the layout falls back to before the metadata group records one.
    initial: Layout,
    /// The `--peer` addresses (founders'); every other member's comes from
    /// the metadata group.
    peers: BTreeMap<u64, String>,
    driver: DriverConfig,
}

impl Node {
    /// Opens every layer; the log replays into the store before anything runs.
    pub async fn open(cfg: Config) -> Result<Self, NodeError> {
        Self::open_on(cfg, None).await
    }

    /// [`Node::open`] on a network other than the OS's TCP (the simulation's).
    pub async fn open_on(mut cfg: Config, network: Option<SharedNetwork>) -> Result<Self, NodeError> {
        cfg.validate()?;
        // From here on the node checks tokens against their digests only.
        let auth = Authenticator::new(&cfg.api);
        cfg.api.admin_token = None;
        cfg.api.invoke_token = None;
        let dir = &cfg.storage.data_dir;
        // Durably: every file below it is lost with it otherwise.
        crate::storage::durable_file::create_dir_all_durably(dir)
            .map_err(|source| NodeError::DataDir { path: dir.display().to_string(), source })?;
        let lock = lock_data_dir(dir)?;
        let identity = check_cluster_identity(dir, &cfg.cluster)?;
        let path = || dir.display().to_string();
        let sled_dir = dir.join("state");
        // sled would create it, but not durably.
        // A failure here is the store's: its directory is unusable.
        crate::storage::durable_file::create_dir_all_durably(&sled_dir).map_err(|source| NodeError::StoreOpen {
            path: path(),
            source: crate::storage::StorageError::Io { context: "creating", path: sled_dir.clone(), source },
        })?;
        // sled recovers its files on open: blocking work, kept off the runtime.
        let db = {
            let sled_dir = sled_dir.clone();
            crate::determinism::blocking(move || sled::Config::new().path(&sled_dir).open())
                .await
                .map_err(|e| NodeError::Background(e.to_string()))?
                .map_err(|e| NodeError::StoreOpen { path: path(), source: crate::storage::StorageError::Sled(e) })?
        };
        Self::open_member(cfg, auth, network, lock, db, sled_dir, identity).await
    }

    /// Opens this node as a member of its cluster, the one code path for
    /// every start: a node started alone founds a cluster of one, founders
    /// list each other, and a new node with `join` first asks the cluster to
    /// let it in. A founder's first start forms the groups of the initial
    /// placement it is first replica of (the lowest id also the metadata
    /// group). Later starts reopen the replicas the data directory holds.
    async fn open_member(
        mut cfg: Config,
        auth: Authenticator,
        network: Option<SharedNetwork>,
        lock: File,
        db: sled::Db,
        sled_dir: std::path::PathBuf,
        stored: Option<ClusterIdentity>,
    ) -> Result<Self, NodeError> {
        let dir = cfg.storage.data_dir.clone();
        // The node sends the secret to its peers, so `ClusterSecret` keeps it
        // (with its digest, to check theirs); the configuration does not.
        // Validation left it unset only on a node started alone.
        let raw_secret = match cfg.cluster.secret.take() {
            Some(s) => s,
            None => own_secret(&dir)?,
        };
        let c = &cfg.cluster;
        let me = c.node_id();
        let err = |e: &dyn std::fmt::Display| NodeError::Cluster(e.to_string());
        let peer_tls = match (&c.tls_ca_path, &cfg.api.tls_cert_path, &cfg.api.tls_key_path) {
            (Some(ca), Some(cert), Some(key)) => Some(PeerTls::load(ca, cert, key).map_err(|e| err(&e))?),
            // Validation pairs the CA with the listener's certificate and key.
            _ => None,
        };
        let secret = ClusterSecret::new(raw_secret.expose())
            .map_err(|e| err(&e))?
            .requiring_client_certificate(peer_tls.is_some());
        drop(raw_secret);
        let fresh = stored.is_none();
        // A single node's data from before every node was a member: shard 0
        // (all its entities, and its registry) without a metadata group.
        let single_node_data = fresh && dir.join("shards/0").exists() && !dir.join("shards/meta").exists();
        if single_node_data && (!c.started_alone() || c.shard_count() != 1) {
            return Err(NodeError::Cluster(format!(
                "data directory {}: it holds a single node's data (one shard); start it alone with one shard, or \
                 give a new cluster member an empty data directory",
                dir.display()
            )));
        }
        let transport =
            Arc::new(GrpcTransport::new(secret.clone()).with_network(network.clone()).with_tls(peer_tls.as_ref()));
        let identity = match (stored, &c.join) {
            (Some(s), _) => s,
            (None, Some(join)) => {
                if cfg.api.listen.ip().is_unspecified() || cfg.api.listen.port() == 0 {
                    return Err(NodeError::Cluster(format!(
                        "a joining node is reached at its api.listen address, and {} names no host or port",
                        cfg.api.listen
                    )));
                }
                let grant = crate::cluster::join::join(&*transport, join, me, &cfg.api.listen.to_string())
                    .await
                    .map_err(NodeError::Cluster)?;
                let (shard_count, replication_factor) = (grant.shard_count, grant.replication_factor);
                ClusterIdentity { node_id: me, members: Vec::new(), shard_count, replication_factor }
            }
            (None, None) => ClusterIdentity::of(c),
        };
        // A node started alone under another id than the default keeps it
        // on restarts that do not name it.
        let me = identity.node_id;
        let founder = !identity.members.is_empty();
        let mut addrs = BTreeMap::new();
        for m in &c.nodes {
            transport.set_peer(m.id, &m.addr).map_err(|e| err(&e))?;
            addrs.insert(m.id, m.addr.clone());
        }
        if c.started_alone() {
            // Recorded in the groups' memberships: where members that join
            // later reach this node.
            addrs.insert(me, cfg.api.listen.to_string());
        }
        let initial = if founder {
            crate::cluster::placement::initial_placement(
                &identity.members,
                identity.shard_count,
                identity.replication_factor,
            )
            .map_err(|e| err(&e))?
        } else {
            Placement::default()
        };
        let raft_config =
            crate::cluster::raft::raft_config("conflux", cfg.log.compact_every_entries).map_err(|e| err(&e))?;
        let host = ReplicaHost {
            node: me,
            data_dir: dir.clone(),
            db,
            sled_dir,
            config: raft_config,
            transport: transport.clone(),
            wal: crate::cluster::raft::open_node_wal(
                &dir,
                std::time::Duration::from_micros(cfg.log.wal_flush_wait_micros),
            )
            .map_err(|e| replica_open_error(&dir, e))?,
            apply_buffer: cfg.storage.apply_buffer(),
        };
        let table = ReplicaTable::default();
        let path = || dir.display().to_string();
        let meta_replica = host.open(META_SHARD).await.map_err(|e| replica_open_error(&dir, e))?;
        table.insert(META_SHARD, meta_replica.raft.clone());
        // The lowest founding id forms the metadata group with every founder as a voter.
        let forms_meta = founder && identity.members.first() == Some(&me);
        if forms_meta && !meta_replica.raft.is_initialized().await.map_err(|e| err(&e))? {
            let voters = addrs.iter().map(|(id, a)| (*id, openraft::BasicNode::new(a))).collect::<BTreeMap<_, _>>();
            meta_replica.raft.initialize(voters).await.map_err(|e| err(&e))?;
        }
        // Only a founder's first start forms data groups: later, replicas
        // may have moved, and forming one again would fork the shard.
        let forming = if fresh && founder { initial.clone() } else { Placement::default() };
        let shards = Arc::new(ShardSet::open(host, &forming, table.clone()).await.map_err(set_opened(&dir))?);
        for shard in shards_on_disk(&dir)? {
            shards.open_replica(shard).await.map_err(set_opened(&dir))?;
        }
        shards.forget_other_logs(&[META_SHARD]).map_err(set_opened(&dir))?;
        if fresh {
            shards.bootstrap(&forming, &addrs).await.map_err(|e| err(&e))?;
            identity.write(&dir)?;
        }
        // Nothing may read a store before its group has applied every entry
        // the log holds. A group whose only voter is this node (every group
        // of a node started alone) gets there by itself: wait for it, so the
        // registry below and the first calls find what was committed.
        let mut solo = vec![meta_replica.raft.clone()];
        solo.extend(shards.shards().into_iter().filter_map(|s| shards.replica(s)).map(|r| r.raft));
        for raft in solo {
            settle_if_solo(&raft, me).await.map_err(|message| NodeError::CatchUp { path: path(), message })?;
        }
        let mut local = BTreeMap::new();
        for shard in shards.shards() {
            let replica = shards.replica(shard).expect("listed by the set");
            let (raft, store) = (replica.raft.clone(), replica.state.store().clone());
            let log = Arc::new(ShardLog::new(replica, &cfg.log));
            local.insert(shard, LocalShard::new(raft, store, log));
        }
        let meta = LocalShard::new(
            meta_replica.raft.clone(),
            meta_replica.state.store().clone(),
            Arc::new(ShardLog::new(meta_replica, &cfg.log)),
        );
        // A leadership restored on restart is served only once confirmed
        // (`LocalShard::ready_term`); until then every read across shards
        // (the outbox, the timers) passes the shard by. A group of one
        // confirms within a commit: wait for it, or start-up would count
        // the outbox empty and the loops would find nothing to do.
        for shard in local.values().chain([&meta]) {
            let catch_up = |message| NodeError::CatchUp { path: path(), message };
            if is_solo(&shard.raft, me).await.map_err(catch_up)? {
                shard.restored_lead_confirmed(CATCH_UP_TIMEOUT).await.map_err(catch_up)?;
            }
        }
        if single_node_data {
            adopt_single_node_registry(&meta, &local).await.map_err(|e| err(&e))?;
        }
        let initial = Layout { placement: initial.shards, ..Layout::default() };
        let shape = Arc::new(ClusterShape::new(read_shape(&meta, &addrs, &initial)));
        let timeout = std::time::Duration::from_millis(c.forward_timeout_ms);
        let meta_log: Arc<dyn CommitLog> =
            Arc::new(MetaLog::new(me, meta.clone(), shape.clone(), transport.clone(), timeout));
        let local = Arc::new(
            LocalShards::new(me, identity.shard_count, shape.clone(), local).with_set(shards.clone(), cfg.log.clone()),
        );
        let store: Arc<dyn StateStore> = local.clone();
        let log: Arc<dyn CommitLog> = local.clone();
        let (runtime, registry) = open_runtime_and_registry(&cfg, meta.store.clone(), meta_log.clone()).await?;
        let wire: Arc<dyn Wire> = transport.clone();
        let others = Arc::new(OtherMembers::new(me, wire.clone(), shape.clone()));
        registry.set_propagation(others.clone());
        registry.set_component_peers(others);
        let router = Arc::new(ClusterRouter::new(local.clone(), transport.clone(), timeout));
        let scheduler = Scheduler::new(
            &cfg.scheduler,
            cfg.commit_room_bytes(),
            runtime,
            registry.clone(),
            store.clone(),
            log.clone(),
            router,
        );
        let move_timeout = std::time::Duration::from_millis(c.move_timeout_ms);
        let member = Member {
            node: me,
            wire,
            shape,
            shards,
            local,
            meta,
            meta_log,
            shard_count: identity.shard_count,
            replication_factor: identity.replication_factor,
            catch_up: move_timeout,
            ready: Arc::default(),
        };
        let driver = DriverConfig {
            shard_count: identity.shard_count,
            replication_factor: identity.replication_factor,
            max_concurrent_moves: c.max_concurrent_moves,
            interval: std::time::Duration::from_millis(c.placement_interval_ms),
            suspect_after: std::time::Duration::from_millis(c.suspect_after_ms),
            down_after: std::time::Duration::from_millis(c.down_after_ms),
            move_timeout,
        };
        tracing::info!(node = me, shards = member.shards.shards().len(), "cluster member opened");
        let cluster = ClusterParts { secret, peer_tls, table, member, initial, peers: addrs, driver };
        Ok(Self { scheduler, registry, store, log, cfg, auth, cluster, network, _lock: lock })
    }

    /// Serves until `shutdown` resolves, then drains and persists. `on_bound`
    /// receives the bound address (useful with port 0).
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
        on_bound: impl FnOnce(SocketAddr),
    ) -> Result<(), NodeError> {
        let c = &self.cluster;
        let m = &c.member;
        let node = ClusterNode::new(m.node, c.table.clone())
            .serving(self.scheduler.clone(), self.registry.clone(), m.clone())
            .members_in_clear(c.peer_tls.is_none());
        let service = ClusterService::new(c.secret.clone(), node);
        let member = api::MemberApi {
            service,
            view: ClusterView::new(m.clone()),
            peer_tls: c.peer_tls.as_ref(),
            has_peers: !self.cfg.cluster.started_alone(),
        };
        // Built before anything runs: it reads the TLS files, which must fail
        // start-up, not the first call.
        let api = Api::new(
            &self.cfg.api,
            self.auth.clone(),
            self.cfg.registry.max_component_bytes,
            self.cfg.storage.data_dir.display().to_string(),
            self.scheduler.clone(),
            self.registry.clone(),
            self.store.clone(),
            self.log.clone(),
            member,
        )?;
        let driver = PlacementDriver::new(
            m.node,
            m.meta.clone(),
            m.meta_log.clone(),
            m.shape.clone(),
            Arc::new(m.clone()),
            c.driver.clone(),
        );
        // Until the metadata replica has caught up, a type this node does
        // not know may exist: `follow_meta` says when it has.
        self.registry.set_synced(false);
        let watchers = [
            tokio::spawn(follow_meta(m.clone(), c.initial.clone(), c.peers.clone(), self.registry.clone())),
            tokio::spawn(driver.run()),
        ];
        let addr = self.cfg.api.listen;
        let listen_err = |source| NodeError::Listen { addr, source };
        let listener = match &self.network {
            None => {
                let listener = tokio::net::TcpListener::bind(addr).await.map_err(listen_err)?;
                let bound = listener.local_addr().map_err(listen_err)?;
                on_bound(bound);
                api::Listener::Tcp(listener)
            }
            Some(network) => {
                let (bound, incoming) = network.listen(addr).await.map_err(listen_err)?;
                on_bound(bound);
                api::Listener::Custom(bound, incoming)
            }
        };
        let sched = self.scheduler.clone();
        crate::determinism::blocking(move || sched.recover_counts())
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
        let member = self.cluster.member.clone();
        // On the signal: refuse new invocations and let running turns commit,
        // hand off the shards this node leads (while it still answers Raft
        // messages), then stop the listener.
        let stop = async move {
            shutdown.await;
            tracing::info!("shutting down: draining in-flight turns");
            scheduler.drain().await;
            member.hand_off_all().await;
        };
        let served = api.serve(listener, stop).await;
        for task in background.into_iter().chain(watchers) {
            task.abort();
        }
        self.log.shutdown().await?;
        // The data shards stopped with `self.log`; the metadata group last.
        self.cluster.member.meta.log.shutdown().await?;
        tracing::info!("shut down cleanly");
        served.map_err(NodeError::from)
    }
}

/// Builds the engine and opens the registry over `store` and `log`, loading
/// (maybe compiling) every active component: blocking work, kept off the
/// runtime.
async fn open_runtime_and_registry(
    cfg: &Config,
    store: Arc<dyn StateStore>,
    log: Arc<dyn CommitLog>,
) -> Result<(Arc<Runtime>, Arc<Registry>), NodeError> {
    let (runtime_cfg, registry_cfg, dir) = (cfg.runtime.clone(), cfg.registry.clone(), cfg.storage.data_dir.clone());
    crate::determinism::blocking(move || {
        let runtime = Arc::new(Runtime::new(&runtime_cfg)?);
        let registry = Registry::open(&registry_cfg, &dir, runtime.clone(), store, log)
            .map_err(|source| NodeError::RegistryOpen { path: dir.display().to_string(), source })?;
        Ok::<_, NodeError>((runtime, Arc::new(registry)))
    })
    .await
    .map_err(|e| NodeError::Background(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::data_dir::CLUSTER_FILE;
    use super::*;
    use crate::config::Secret;
    use crate::model::Keyspace;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_open_node_keeps_token_digests_not_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::default();
        cfg.storage.data_dir = dir.path().to_owned();
        cfg.api.admin_token = Some(Secret::new("admin-plaintext-1"));
        cfg.api.invoke_token = Some(Secret::new("invoke-plaintext-2"));
        let node = Node::open(cfg).await.unwrap();
        assert!(node.cfg.api.admin_token.is_none() && node.cfg.api.invoke_token.is_none(), "tokens kept in clear");
        // The digests still decide.
        let md = |t: &str| {
            let mut m = tonic::metadata::MetadataMap::new();
            m.insert("authorization", format!("Bearer {t}").parse().unwrap());
            m
        };
        use crate::api::auth::Rpc;
        node.auth.check(Rpc::Deploy, &md("admin-plaintext-1")).unwrap();
        node.auth.check(Rpc::Invoke, &md("invoke-plaintext-2")).unwrap();
        assert!(node.auth.check(Rpc::Deploy, &md("invoke-plaintext-2")).is_err());
        node.log.shutdown().await.unwrap();
    }

    /// A data directory a single node wrote before every node was a member
    /// (shard 0 holding entities and registry, no metadata group) opens as
    /// a node started alone: its entities stay where they are and its
    /// registry moves into the metadata group, where a member's registry is
    /// read from.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_single_nodes_older_data_opens_as_a_node_started_alone() {
        use crate::model::{Op, WriteSet};
        let dir = tempfile::tempdir().unwrap();
        let record = (Keyspace::Registry, b"conflux-adoption-probe".to_vec(), b"registry".to_vec());
        let state = (Keyspace::State, b"counter\0c1\0$self".to_vec(), b"{\"total\":5}".to_vec());
        {
            // What the single node of before laid out: shard 0 alone, its
            // WAL in `shards/0`, its store in `state/` (a group of one).
            let log = crate::cluster::raft::open_solo(dir.path(), &crate::log::LogConfig::default()).await.unwrap();
            let ops = [&record, &state]
                .iter()
                .map(|(keyspace, key, value)| Op::Put { keyspace: *keyspace, key: key.clone(), value: value.clone() })
                .collect();
            log.propose(WriteSet { ops }).await.unwrap();
            log.shutdown().await.unwrap();
        }
        let mut cfg = Config::default();
        cfg.storage.data_dir = dir.path().to_owned();
        let node = Node::open(cfg.clone()).await.unwrap();
        let meta = &node.cluster.member.meta;
        assert_eq!(meta.store.get(record.0, &record.1).unwrap(), Some(record.2.clone()), "registry not moved");
        assert_eq!(node.store.get(state.0, &state.1).unwrap(), Some(state.2.clone()), "entity state lost");
        assert!(dir.path().join(CLUSTER_FILE).exists());
        node.log.shutdown().await.unwrap();
        node.cluster.member.meta.log.shutdown().await.unwrap();
        drop(node);
        // With another shard count its entities would be looked for elsewhere.
        let other = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(other.path().join("shards/0")).unwrap();
        cfg.storage.data_dir = other.path().to_owned();
        cfg.cluster.shard_count = Some(8);
        let Err(e) = Node::open(cfg).await else { panic!("opened a single node's data with 8 shards") };
        assert!(e.to_string().contains("single node's data"), "{e}");
    }

    /// A node started alone under its own id keeps it when it restarts
    /// without naming it: the id is the data directory's, and every group
    /// recorded it as their voter.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_started_alone_keeps_its_id_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::default();
        cfg.storage.data_dir = dir.path().to_owned();
        cfg.cluster.node_id = 5;
        let node = Node::open(cfg.clone()).await.unwrap();
        assert_eq!(node.cluster.member.node, 5);
        node.log.shutdown().await.unwrap();
        node.cluster.member.meta.log.shutdown().await.unwrap();
        drop(node);
        cfg.cluster.node_id = 0;
        let node = Node::open(cfg).await.unwrap();
        assert_eq!(node.cluster.member.node, 5, "restarted under another id than its groups' voter");
        node.log.shutdown().await.unwrap();
        node.cluster.member.meta.log.shutdown().await.unwrap();
    }

    /// A restarted node started alone serves once its restored leaderships
    /// are confirmed: before, every merged read (the outbox, the timers, the
    /// idempotency records) saw none of its shards, so the outbox counted
    /// empty at start-up and Status said so while messages waited.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restarted_node_alone_sees_its_outbox_as_soon_as_it_opens() {
        use crate::model::{EntityRef, Message, Op, Record, WriteSet, outbox_key};
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::default();
        cfg.storage.data_dir = dir.path().to_owned();
        let sender = EntityRef::new("account", "a1").unwrap();
        let message = Message {
            sender: sender.clone(),
            seq: 7,
            target: EntityRef::new("account", "a2").unwrap(),
            operation: "credit".into(),
            payload: b"5".to_vec(),
            kind: crate::model::MessageKind::Send,
        };
        let node = Node::open(cfg.clone()).await.unwrap();
        let put = Op::Put { keyspace: Keyspace::Outbox, key: outbox_key(&sender, 7), value: message.encode() };
        node.log.propose(WriteSet { ops: vec![put] }).await.unwrap();
        node.log.shutdown().await.unwrap();
        node.cluster.member.meta.log.shutdown().await.unwrap();
        drop(node);
        let node = Node::open(cfg).await.unwrap();
        let waiting = node.store.scan(Keyspace::Outbox, b"", None, 10).unwrap();
        assert_eq!(waiting.len(), 1, "the outbox looked empty right after the restart");
        node.scheduler.recover_counts().unwrap();
        assert_eq!(node.scheduler.stats().outbox_messages, 1);
        node.log.shutdown().await.unwrap();
        node.cluster.member.meta.log.shutdown().await.unwrap();
    }

    /// Whether this node is a group's only voter is known as soon as the
    /// group opens: read from its metrics, it was "no" until the Raft core
    /// had published them, and start-up skipped waiting for the group.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_of_one_is_known_as_such_the_moment_it_reopens() {
        use crate::cluster::raft::{NoPeers, ReplicaHost, raft_config};
        let dir = tempfile::tempdir().unwrap();
        let sled_dir = dir.path().join("state");
        let db = sled::Config::new().path(&sled_dir).open().unwrap();
        let host = || ReplicaHost {
            node: 1,
            data_dir: dir.path().to_owned(),
            db: db.clone(),
            sled_dir: sled_dir.clone(),
            config: raft_config("test", 10_000).unwrap(),
            transport: Arc::new(NoPeers),
            wal: crate::cluster::raft::open_node_wal(dir.path(), std::time::Duration::from_micros(100)).unwrap(),
            apply_buffer: crate::storage::ApplyBuffer::default(),
        };
        {
            let replica = host().open(0).await.unwrap();
            let me = BTreeMap::from([(1, openraft::BasicNode::new("127.0.0.1:1"))]);
            replica.raft.initialize(me).await.unwrap();
            replica.raft.shutdown().await.unwrap();
        }
        for _ in 0..5 {
            let replica = host().open(0).await.unwrap();
            assert!(is_solo(&replica.raft, 1).await.unwrap(), "a reopened group of one not seen as one");
            assert!(!is_solo(&replica.raft, 2).await.unwrap());
            replica.raft.shutdown().await.unwrap();
        }
    }

    /// The identity is replaced whole: a reader (a restart after a crash)
    /// never finds it empty or cut short, however a write is interrupted.
    /// `std::fs::write` truncated the file first, and a reader racing it
    /// found an empty file.
    #[test]
    fn the_cluster_identity_is_never_seen_partly_written() {
        let dir = tempfile::tempdir().unwrap();
        let identity =
            |n: u64| ClusterIdentity { node_id: n, members: (1..=n).collect(), shard_count: 64, replication_factor: 3 };
        identity(1).write(dir.path()).unwrap();
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let mut reads = 0u64;
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    let bytes = std::fs::read(dir.path().join(CLUSTER_FILE)).unwrap();
                    let read: ClusterIdentity = serde_json::from_slice(&bytes)
                        .unwrap_or_else(|e| panic!("read {} bytes of a half-written identity: {e}", bytes.len()));
                    assert!(read.node_id == 1 || read.node_id == 2);
                    reads += 1;
                }
                reads
            });
            for i in 0..200 {
                identity(1 + i % 2).write(dir.path()).unwrap();
            }
            done.store(true, std::sync::atomic::Ordering::Release);
            assert!(reader.join().unwrap() > 0);
        });
    }
}
