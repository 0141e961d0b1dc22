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

use crate::api::auth::Authenticator;
use crate::api::cluster::{
    ClusterSecret, ClusterService, ClusterView, GrpcTransport, Member, MemberComponents, MemberRegistries, PeerTls,
};
use crate::api::net::SharedNetwork;
use crate::api::{self, Api};
use crate::cluster::driver::{DriverConfig, PlacementDriver};
use crate::cluster::meta::{META_SHARD, MetaLog};
use crate::cluster::placement::Placement;
use crate::cluster::raft::{ReplicaHost, ReplicaTable, ShardId, ShardLog};
use crate::cluster::shape::{ClusterShape, DRAINING_KEY_PREFIX, LAYOUT_KEY, Layout, Shape, draining_node};
use crate::cluster::sharded::{ClusterRouter, LocalShard, LocalShards};
use crate::cluster::shards::ShardSet;
use crate::config::Config;
use crate::log::CommitLog;
use crate::model::Keyspace;
use crate::registry::Registry;
use crate::runtime::Runtime;
use crate::scheduler::Scheduler;
use crate::storage::StateStore;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

/// Lock file in the data directory, held (flock) while a node has it open.
const LOCK_FILE: &str = "conflux.lock";
/// Where a node started alone without a configured secret keeps the one it
/// generated.
const SECRET_FILE: &str = "cluster.secret";
/// Written when a cluster member first opens its data directory: what must
/// not change for the life of the cluster.
const CLUSTER_FILE: &str = "cluster.json";

/// The settings a member's data is laid out by (ids, not addresses: a member
/// may move). Written once the member's replicas exist.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct ClusterIdentity {
    node_id: u64,
    /// The founding members; empty on a member that joined later.
    members: Vec<u64>,
    shard_count: u32,
    replication_factor: usize,
}

impl ClusterIdentity {
    /// What `c` founds (a node started alone is its cluster's only founder).
    fn of(c: &crate::config::ClusterConfig) -> Self {
        let mut members: Vec<u64> = c.nodes.iter().map(|m| m.id).collect();
        if c.started_alone() {
            members.push(c.node_id());
        }
        members.sort_unstable();
        Self { node_id: c.node_id(), members, shard_count: c.shard_count(), replication_factor: c.replication_factor }
    }

    /// Founded by this node alone (it may have grown since).
    fn alone(&self) -> bool {
        self.members == [self.node_id]
    }

    /// Durably (temp file, fsync, rename, fsync directory): a node whose
    /// power is cut after this returns restarts as the same member, and one
    /// cut before finds no identity rather than an empty file.
    fn write(&self, dir: &Path) -> Result<(), NodeError> {
        let file = dir.join(CLUSTER_FILE);
        let json = serde_json::to_vec_pretty(self).expect("serialisable");
        crate::storage::durable_file::write_durably(&file, &json)
            .map_err(|source| NodeError::DataDir { path: file.display().to_string(), source })
    }
}

/// What the data directory says this node is (`None`: a new directory), after
/// refusing settings it was not created with: a member's data under another
/// id; a node started alone restarted with founders (it grows by others
/// joining it); a founder's under another member list, shard count or
/// replication factor, or without its cluster settings; a joined member's as
/// a founder.
fn check_cluster_identity(
    dir: &Path,
    cluster: &crate::config::ClusterConfig,
) -> Result<Option<ClusterIdentity>, NodeError> {
    let file = dir.join(CLUSTER_FILE);
    let bad = |m: String| Err(NodeError::Cluster(format!("data directory {}: {m}", dir.display())));
    let stored = match std::fs::read(&file) {
        Ok(bytes) => Some(
            serde_json::from_slice::<ClusterIdentity>(&bytes)
                .map_err(|e| NodeError::Cluster(format!("{} is corrupt: {e}", file.display())))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => return Err(NodeError::DataDir { path: file.display().to_string(), source }),
    };
    let Some(s) = stored else { return Ok(None) };
    let wanted = ClusterIdentity::of(cluster);
    match () {
        _ if s.node_id != wanted.node_id && !(cluster.started_alone() && cluster.node_id == 0) => {
            bad(format!("it holds the data of member {}, not {}", s.node_id, wanted.node_id))
        }
        _ if s.alone() && !cluster.nodes.is_empty() => bad(format!(
            "it holds a single node's data (node {}, started alone; see {CLUSTER_FILE}); it grows when other \
             nodes start with --join pointing at it, not by restarting it with founders (--peer)",
            s.node_id
        )),
        _ if !s.alone() && cluster.started_alone() => bad(format!(
            "it holds the data of cluster member {} (see {CLUSTER_FILE}); start it with that member's [cluster] \
             settings",
            s.node_id
        )),
        _ if cluster.join.is_none() && s.members.is_empty() => {
            bad(format!("member {} joined an existing cluster; restart it with --join, not --peer", s.node_id))
        }
        _ if !cluster.nodes.is_empty() && s != wanted => bad(format!(
            "it was created as {s:?}, but the configuration says {wanted:?}; changing a cluster's founding members, \
             shard count or replication factor is not supported"
        )),
        _ if s.alone() && cluster.shard_count.is_some_and(|n| n != s.shard_count) => bad(format!(
            "it was created with {} shards, but the configuration says {}; a cluster's shard count is fixed when \
             it is created",
            s.shard_count,
            cluster.shard_count()
        )),
        _ => Ok(Some(s)),
    }
}

/// The data shards this node has a replica of on disk (`shards/<n>`).
fn shards_on_disk(dir: &Path) -> Result<Vec<ShardId>, NodeError> {
    let shards = dir.join("shards");
    let entries = match std::fs::read_dir(&shards) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(NodeError::DataDir { path: shards.display().to_string(), source }),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| NodeError::DataDir { path: shards.display().to_string(), source })?;
        if let Some(shard) = entry.file_name().to_str().and_then(|n| n.parse::<ShardId>().ok()) {
            found.push(shard);
        }
    }
    found.sort_unstable();
    Ok(found)
}

/// What is wrong with the directory a replica failed to open in.
fn replica_open_error(dir: &Path, source: crate::cluster::raft::ReplicaError) -> NodeError {
    let path = dir.display().to_string();
    match source {
        crate::cluster::raft::ReplicaError::Store(source) => NodeError::StoreOpen { path, source },
        source => NodeError::LogOpen { path, source: Box::new(source) },
    }
}

/// [`replica_open_error`] for a replica the shard set opened.
fn set_opened(dir: &Path) -> impl Fn(crate::cluster::shards::ShardSetError) -> NodeError + '_ {
    move |e| match e {
        crate::cluster::shards::ShardSetError::Replica { source, .. } => replica_open_error(dir, *source),
        e => NodeError::Cluster(format!("data directory {}: cannot open a shard replica: {e}", dir.display())),
    }
}

/// Moves the registry of a single node's data from before every node was a
/// member (kept in shard 0) into the metadata group, where every member's
/// registry lives. Idempotent: a start interrupted before it wrote the
/// cluster identity copies the same records again.
async fn adopt_single_node_registry(meta: &LocalShard, data: &BTreeMap<ShardId, LocalShard>) -> Result<(), String> {
    let Some(shard0) = data.get(&0) else { return Ok(()) };
    // Bounded: the registry holds records, not components; a page at a time.
    const PAGE: usize = 256;
    let mut after: Option<Vec<u8>> = None;
    let mut copied = 0usize;
    loop {
        let rows = shard0
            .store
            .scan(Keyspace::Registry, b"", after.as_deref(), PAGE)
            .map_err(|e| format!("reading the single node's registry: {e}"))?;
        let Some((last, _)) = rows.last() else { break };
        after = Some(last.clone());
        copied += rows.len();
        let ws = crate::model::WriteSet {
            ops: rows
                .into_iter()
                .map(|(key, value)| crate::model::Op::Put { keyspace: Keyspace::Registry, key, value })
                .collect(),
        };
        meta.log.propose(ws).await.map_err(|e| format!("moving the registry into the metadata group: {e}"))?;
    }
    if copied > 0 {
        tracing::info!(records = copied, "moved a single node's registry into its metadata group");
    }
    Ok(())
}

/// If this node is the only voter of `raft`'s group, waits until it leads
/// and has applied its log.
async fn settle_if_solo(raft: &crate::cluster::raft::Raft, me: u64) -> Result<(), String> {
    if !is_solo(raft, me) {
        return Ok(());
    }
    crate::cluster::raft::led_and_applied(raft, me, CATCH_UP_TIMEOUT).await
}

/// Whether this node is the group's only voter.
fn is_solo(raft: &crate::cluster::raft::Raft, me: u64) -> bool {
    let m = raft.metrics();
    let m = m.borrow();
    m.membership_config.membership().voter_ids().eq([me])
}

/// The secret of a node started alone without one: generated on its first
/// start and kept in the data directory (readable by its owner only, as the
/// temporary file it is written through is), where the operator finds it to
/// give to nodes joining this one.
fn own_secret(dir: &Path) -> Result<crate::config::Secret, NodeError> {
    let file = dir.join(SECRET_FILE);
    let data_dir = |source| NodeError::DataDir { path: file.display().to_string(), source };
    match std::fs::read_to_string(&file) {
        Ok(s) => return Ok(crate::config::Secret::new(s.trim())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(data_dir(e)),
    }
    use rand::Rng as _;
    let secret: String = rand::rng().sample_iter(rand::distr::Alphanumeric).take(32).map(char::from).collect();
    crate::storage::durable_file::write_durably(&file, secret.as_bytes()).map_err(data_dir)?;
    tracing::info!(file = %file.display(), "generated this node's cluster secret: nodes join it with --cluster-secret set to the file's contents");
    Ok(crate::config::Secret::new(secret))
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
        let identity = match (stored, &c.join) {
            (Some(s), _) => s,
            (None, Some(join)) => {
                if cfg.api.listen.ip().is_unspecified() || cfg.api.listen.port() == 0 {
                    return Err(NodeError::Cluster(format!(
                        "a joining node is reached at its api.listen address, and {} names no host or port",
                        cfg.api.listen
                    )));
                }
                let (shard_count, replication_factor) = api::cluster::join(
                    join,
                    &secret,
                    peer_tls.as_ref(),
                    network.clone(),
                    me,
                    &cfg.api.listen.to_string(),
                )
                .await
                .map_err(NodeError::Cluster)?;
                ClusterIdentity { node_id: me, members: Vec::new(), shard_count, replication_factor }
            }
            (None, None) => ClusterIdentity::of(c),
        };
        // A node started alone under another id than the default keeps it
        // on restarts that do not name it.
        let me = identity.node_id;
        let founder = !identity.members.is_empty();
        let transport =
            Arc::new(GrpcTransport::new(secret.clone()).with_network(network.clone()).with_tls(peer_tls.as_ref()));
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
            wal_flush_wait: std::time::Duration::from_micros(cfg.log.wal_flush_wait_micros),
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
        for shard in local.values().chain([&meta]).filter(|s| is_solo(&s.raft, me)) {
            shard
                .restored_lead_confirmed(CATCH_UP_TIMEOUT)
                .await
                .map_err(|message| NodeError::CatchUp { path: path(), message })?;
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
        registry.set_propagation(Arc::new(MemberRegistries::new(me, transport.clone(), shape.clone())));
        registry.set_component_peers(Arc::new(MemberComponents::new(me, transport.clone(), shape.clone())));
        let router = Arc::new(ClusterRouter::new(local.clone(), transport.clone(), timeout));
        let scheduler = Scheduler::new(&cfg, runtime, registry.clone(), store.clone(), log.clone(), router);
        let move_timeout = std::time::Duration::from_millis(c.move_timeout_ms);
        let member = Member {
            node: me,
            transport,
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
        let service = ClusterService::new(m.node, c.secret.clone(), c.table.clone()).with_node(
            self.scheduler.clone(),
            self.registry.clone(),
            m.clone(),
        );
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

/// The cluster's shape as this node's metadata replica holds it: members
/// from the group's membership (`founders` until it has one), the layout
/// (`initial` until the driver records one) and the drains.
fn read_shape(meta: &LocalShard, founders: &BTreeMap<u64, String>, initial: &Layout) -> Shape {
    let m = meta.raft.metrics().borrow().clone();
    let mut members: BTreeMap<u64, String> =
        m.membership_config.membership().nodes().map(|(id, n)| (*id, n.addr.clone())).collect();
    if members.is_empty() {
        members = founders.clone();
    }
    let layout = match meta.store.get(Keyspace::Registry, LAYOUT_KEY.as_bytes()) {
        Ok(Some(bytes)) => Layout::decode(&bytes).unwrap_or_else(|e| {
            tracing::error!("the recorded cluster layout is unreadable: {e}");
            initial.clone()
        }),
        Ok(None) => initial.clone(),
        Err(e) => {
            tracing::error!("reading the cluster layout: {e}");
            initial.clone()
        }
    };
    // Bounded: one record per member being drained.
    let draining = match meta.store.scan(Keyspace::Registry, DRAINING_KEY_PREFIX.as_bytes(), None, 4096) {
        Ok(rows) => rows.iter().filter_map(|(k, _)| draining_node(k)).collect(),
        Err(e) => {
            tracing::error!("reading the drained members: {e}");
            Default::default()
        }
    };
    Shape { members, draining, layout }
}

/// Keeps this node in step with the metadata group: whenever its replica
/// applies something, the cluster's shape is re-read (and new members'
/// addresses handed to the transport), and the registry re-reads its records
/// and compiles what changed before switching to it.
async fn follow_meta(member: Member, initial: Layout, founders: BTreeMap<u64, String>, registry: Arc<Registry>) {
    let mut metrics = member.meta.raft.metrics();
    let mut seen = (None, None);
    // The addresses handed to the transport: replacing one drops its pooled
    // connection, so only a new or moved member's is set. The `--peer` list
    // says how this node reaches each founder (through a proxy, say), so it
    // wins over the address the metadata group recorded. Only that list: a
    // founder restarting after others joined must still dial them (the
    // simulation found a restarted founder that never could).
    let mut dialled = founders.clone();
    let mut registry_loaded = true;
    loop {
        let (applied, membership) = {
            let m = metrics.borrow_and_update();
            (m.last_applied.map(|id| id.index), m.membership_config.log_id().map(|id| id.index))
        };
        if (applied, membership) != seen {
            seen = (applied, membership);
            let shape = read_shape(&member.meta, &founders, &initial);
            for (node, addr) in &shape.members {
                if dialled.get(node) != Some(addr) && *node != member.node && !founders.contains_key(node) {
                    match member.transport.set_peer(*node, addr) {
                        Ok(()) => {
                            dialled.insert(*node, addr.clone());
                        }
                        Err(e) => tracing::error!(node, "a member's address is unusable: {e}"),
                    }
                }
            }
            member.shape.set(shape);
            let votes = member
                .meta
                .raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .voter_ids()
                .any(|v| v == member.node);
            let refreshed = match registry.refresh_in_background().await {
                Ok(Ok(0)) => true,
                Ok(Ok(n)) => {
                    tracing::info!(types = n, "registry caught up with the metadata group");
                    true
                }
                Ok(Err(e @ crate::registry::RegistryError::Loading { .. })) => {
                    tracing::warn!("registry refresh: {e}");
                    false
                }
                Ok(Err(e)) => {
                    tracing::error!("registry refresh failed: {e}");
                    false
                }
                Err(e) => {
                    tracing::error!("registry refresh panicked: {e}");
                    false
                }
            };
            registry_loaded = refreshed;
            if votes && refreshed && !member.ready.swap(true, std::sync::atomic::Ordering::SeqCst) {
                tracing::info!("caught up with the metadata group: ready for replicas");
            }
        }
        if registry_loaded {
            if metrics.changed().await.is_err() {
                return;
            }
        } else {
            // A component could not be fetched yet (its holders unreachable):
            // try again even if the metadata group stays quiet.
            match tokio::time::timeout(REFRESH_RETRY, metrics.changed()).await {
                Ok(Err(_)) => return,
                Ok(Ok(())) => {}
                Err(_) => seen = (None, None),
            }
        }
    }
}

/// How soon a member retries loading components it could not fetch.
const REFRESH_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

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
