//! The daemon's configuration: one serde tree with a sub-struct per module, loaded
//! from an optional TOML file, overridden by flags, and validated once at start-up.
//! Each module receives only its own slice.
//!
//! Why one file above the ~700-line guide: the tree *is* the configuration
//! reference (every key, its unit, its default and the cross-field checks
//! read top to bottom, as README's defaults block mirrors it); about 160 of
//! its lines are its tests. Split by section it would scatter the defaults
//! and the checks that relate keys of different sections.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// What a turn's write set carries besides its counted writes and its reply:
/// the entity's meta record, a message's inbox mark, the idempotency record's
/// key and expiry index.
pub const WRITE_SET_OVERHEAD_BYTES: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub storage: StorageConfig,
    pub log: crate::log::LogConfig,
    pub runtime: RuntimeConfig,
    pub scheduler: SchedulerConfig,
    pub registry: RegistryConfig,
    pub api: ApiConfig,
    pub telemetry: TelemetryConfig,
    pub cluster: ClusterConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Directory holding the state store, the write-ahead log and components.
    pub data_dir: PathBuf,
    /// A shard replica's store buffers applied entries in memory and writes
    /// them to sled in one batch when the buffer holds this many distinct
    /// keys (0 with the other two: every apply goes to sled at once).
    pub apply_buffer_max_keys: usize,
    /// … or this many bytes of keys and values (one apply may overshoot it
    /// by its own size). Per shard replica: a node's bound is this times
    /// the replicas it holds.
    pub apply_buffer_max_bytes: usize,
    /// … or when its oldest apply is this old, checked at each apply.
    pub apply_buffer_max_age_ms: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        let buffer = crate::storage::ApplyBuffer::default();
        Self {
            data_dir: PathBuf::from("./conflux-data"),
            apply_buffer_max_keys: buffer.max_keys,
            apply_buffer_max_bytes: buffer.max_bytes,
            apply_buffer_max_age_ms: buffer.max_age_ms,
        }
    }
}

impl StorageConfig {
    /// The bounds of each store's apply buffer.
    pub fn apply_buffer(&self) -> crate::storage::ApplyBuffer {
        crate::storage::ApplyBuffer {
            max_keys: self.apply_buffer_max_keys,
            max_bytes: self.apply_buffer_max_bytes,
            max_age_ms: self.apply_buffer_max_age_ms,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.apply_buffer_max_keys > 1 << 20 {
            return Err(ConfigError::Invalid("storage.apply_buffer_max_keys must be at most 1048576".into()));
        }
        if self.apply_buffer_max_bytes > 256 << 20 {
            return Err(ConfigError::Invalid("storage.apply_buffer_max_bytes must be at most 256 MiB".into()));
        }
        if self.apply_buffer_max_age_ms > 60_000 {
            return Err(ConfigError::Invalid("storage.apply_buffer_max_age_ms must be at most 60000".into()));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Wasm fuel (≈ instructions) one turn may burn before it is stopped
    /// (0 = no fuel metering; then `turn_timeout_ms` must be set).
    pub fuel_per_turn: u64,
    /// Wall-clock budget of one turn, enforced by epoch interruption in 10 ms
    /// ticks (0 = off; then `fuel_per_turn` must be set).
    pub turn_timeout_ms: u64,
    /// Linear memory one instance may hold, all its memories together.
    pub max_memory_bytes: u64,
    /// Linear memory all instances of the node may hold together: warm ones
    /// and those running turns. A turn that would grow past it traps
    /// (`out-of-memory`); an instantiation first evicts idle instances.
    pub max_total_guest_memory_bytes: u64,
    /// Table elements one instance may grow to.
    pub max_table_elements: u32,
    /// Upper bound of concurrently existing instances (pool size). Must exceed
    /// `scheduler.max_resident_instances` by the number of turns that may run at once.
    /// Each costs the process about six memory mappings: a node refuses to
    /// start with more than the kernel's `vm.max_map_count` allows.
    pub max_instances: u32,
    /// Largest reply a turn may return.
    pub max_reply_bytes: usize,
    /// Largest state key a guest may write.
    pub max_state_key_bytes: usize,
    /// Largest state value a guest may write.
    pub max_state_value_bytes: usize,
    /// Most keys one `list` call returns, whatever the guest asks for.
    pub max_list_keys: u32,
    /// Total bytes one turn may write (keys + values + messages it sends).
    pub max_write_set_bytes: usize,
    /// Messages and timers one turn may send.
    pub max_messages_per_turn: usize,
    /// Longest delay `send-after` accepts (longer ones are clamped to it).
    pub max_timer_delay_ms: u64,
    /// Lines of guest output the node keeps for `conflux logs` (newer ones
    /// push out older ones; `--follow` sees every new line).
    pub guest_log_lines: usize,
    /// Directory of a compiled-code cache that nodes on one machine may share,
    /// keyed by the component's bytes and the engine's settings. Without it a
    /// node still compiles each component once (the registry keeps the result
    /// in its data directory), but a fresh node compiles everything again —
    /// about 20 s for a 12–18 MB TypeScript or Python component on one core.
    /// Bounded by wasmtime's cache cleanup (512 MiB, 65,536 files: oldest go).
    /// Its `functions/` holds the function cache (below), `wasmtime/` the rest.
    pub compile_cache_dir: Option<std::path::PathBuf>,
    /// Bound of the cache of compiled functions (Cranelift's incremental
    /// cache) in `compile_cache_dir`; 0 turns it off. An interpreter's
    /// functions are the same in every TypeScript (or Python) component, so
    /// with it a new version, or another entity type in the same language,
    /// compiles in about a third of the first one's time. Once full, new
    /// functions are compiled but not kept. Both languages' interpreters take
    /// about 180 MB.
    pub max_function_cache_bytes: u64,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            fuel_per_turn: 2_000_000_000,
            turn_timeout_ms: 1000,
            max_memory_bytes: 64 << 20,
            max_total_guest_memory_bytes: 8 << 30,
            max_table_elements: 20_000,
            max_instances: 8_192,
            max_reply_bytes: 1 << 20,
            max_state_key_bytes: 1024,
            max_state_value_bytes: 1 << 20,
            max_list_keys: 1000,
            max_write_set_bytes: 4 << 20,
            max_messages_per_turn: 1000,
            max_timer_delay_ms: 365 * 24 * 3_600_000,
            guest_log_lines: 1000,
            compile_cache_dir: None,
            max_function_cache_bytes: 512 << 20,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// Warm instances kept between turns. When they are this many, a new
    /// entity takes the place of the least recently used idle one only if
    /// it was called more often lately (TinyLFU admission); otherwise its
    /// instance is dropped after its turns.
    pub max_resident_instances: usize,
    /// Linear memory warm instances may hold between turns, all together; the
    /// least recently used idle ones are evicted beyond it (re-instantiating
    /// costs ≈ 10 µs, holding memory costs the node).
    pub max_warm_memory_bytes: u64,
    /// An instance holding more linear memory than this after its turn is
    /// dropped instead of kept warm, so one large turn does not pin its
    /// memory until idle eviction.
    pub max_warm_instance_bytes: u64,
    /// An instance idle this long is evicted.
    pub idle_timeout_ms: u64,
    /// Invocations that may wait for one entity; more are refused with
    /// RESOURCE_EXHAUSTED.
    pub mailbox_depth: usize,
    /// Most turns of one entity that share one commit (1 = every turn
    /// commits alone). A turn that finds others of its entity waiting runs
    /// them too, one after another on the same instance, each reading what
    /// the earlier ones wrote, and commits all their write sets as one; each
    /// caller is answered once that commit is durable.
    pub max_turns_per_commit: usize,
    /// Batches of one entity's turns whose commits may be in flight at once
    /// (1 = none overlaps). The next batch — only a full one
    /// (`max_turns_per_commit` waiting): fewer wait and share the next
    /// commit — runs against the earlier ones' writes before they are durable; every reply is held until its own
    /// write set and every one before it have committed, in order, and if
    /// one fails, no later batch's turn is acknowledged: those that read its
    /// effects fail with it (the log never commits a later write set
    /// without it).
    pub pipelined_commits: usize,
    /// Invocations accepted by the node at once (running or waiting).
    pub max_inflight_invocations: usize,
    /// How long a graceful shutdown waits for in-flight turns.
    pub shutdown_grace_ms: u64,
    /// Guest turns executing at once (0 = one per CPU core).
    pub turn_threads: usize,
    /// Outbox messages the deliverer reads per round.
    pub delivery_batch: usize,
    /// (sender, receiver) pairs delivered concurrently; one pair is always
    /// sequential, and a slow pair holds only its own place.
    pub delivery_concurrency: usize,
    /// Attempts at a message whose receiver's own code keeps failing (trap,
    /// failed migration…) before it becomes a dead letter. Outages and overload
    /// (no leader, unreachable node, commit timeout, full mailbox…) never count:
    /// they are retried for as long as the message is in the outbox.
    pub delivery_max_attempts: u32,
    /// First retry delay of a failing pair (and of a sender whose timers cannot
    /// fire); doubles per failure up to `delivery_retry_max_ms`, with jitter.
    pub delivery_retry_base_ms: u64,
    pub delivery_retry_max_ms: u64,
    /// Messages (and fired timers) waiting in the node's outbox at most; a turn
    /// that would exceed it fails with RESOURCE_EXHAUSTED and sends nothing.
    pub max_outbox_messages: u64,
    /// How long the reply of an invocation with an idempotency key is kept.
    pub idempotency_retention_ms: u64,
    /// Stored idempotent replies at most; beyond it the oldest are dropped early.
    pub max_idempotency_keys: u64,
    /// Fault injection for tests: the deliverer delivers every message twice
    /// (the receiver's deduplication must absorb it). Never enable in production.
    pub debug_duplicate_delivery: bool,
}

impl SchedulerConfig {
    /// The effective number of concurrently executing turns.
    pub fn turn_threads(&self) -> usize {
        match self.turn_threads {
            0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
            n => n,
        }
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_resident_instances: 8_000,
            max_warm_memory_bytes: 4 << 30,
            max_warm_instance_bytes: 16 << 20,
            idle_timeout_ms: 300_000,
            mailbox_depth: 1024,
            max_turns_per_commit: 64,
            pipelined_commits: 4,
            max_inflight_invocations: 8192,
            shutdown_grace_ms: 10_000,
            turn_threads: 0,
            delivery_batch: 1024,
            delivery_concurrency: 64,
            delivery_max_attempts: 10,
            delivery_retry_base_ms: 100,
            delivery_retry_max_ms: 30_000,
            max_outbox_messages: 1_000_000,
            idempotency_retention_ms: 24 * 3_600_000,
            max_idempotency_keys: 1_000_000,
            debug_duplicate_delivery: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// Largest component accepted by Deploy.
    pub max_component_bytes: usize,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self { max_component_bytes: 64 << 20 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Address the gRPC listener binds.
    pub listen: SocketAddr,
    /// Largest invocation payload accepted.
    pub max_payload_bytes: usize,
    /// Bearer token required by the admin RPCs (Deploy, GetState, Status).
    /// Unset: they are open (unless `invoke_token` is set; see the api module).
    pub admin_token: Option<Secret>,
    /// Bearer token required by ListTypes and Invoke (the admin token is also
    /// accepted). Unset: they are open.
    pub invoke_token: Option<Secret>,
    /// PEM certificate chain of the listener; with `tls_key_path` turns on TLS.
    pub tls_cert_path: Option<PathBuf>,
    /// PEM private key of the listener.
    pub tls_key_path: Option<PathBuf>,
    /// Web origins (`https://app.example.com`, scheme and host, port if not
    /// the scheme's) whose pages may call the HTTP gateway from a browser
    /// (CORS). Any other page's cross-origin POST is refused with 403.
    pub allowed_origins: Vec<String>,
    /// Host names (`conflux.internal`, or `conflux.internal:7070` for one
    /// port) a plaintext listener answers HTTP/1 requests for, beyond IP
    /// addresses and `localhost`: a request naming another host is refused
    /// with 403, which defeats DNS rebinding. Unused under TLS.
    pub allowed_hosts: Vec<String>,
    /// A GetState or ListDeadLetters page stops before its keys and values
    /// exceed this (a page always holds at least one entry).
    pub max_page_bytes: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7070".parse().expect("valid literal"),
            max_payload_bytes: 1 << 20,
            admin_token: None,
            invoke_token: None,
            tls_cert_path: None,
            tls_key_path: None,
            allowed_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            max_page_bytes: 1 << 20,
        }
    }
}

/// Membership of a cluster. Every node is a member: with neither `nodes` nor
/// `join` it is started alone, the only founder of a cluster of one, which
/// grows when other nodes start with `join` pointing at it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's id: one of `nodes`, or a new id when joining. A node
    /// started alone is node 1 unless this says otherwise.
    pub node_id: u64,
    /// The founding members of the cluster, the same list on each of them.
    /// Empty on a node that joins an existing cluster.
    pub nodes: Vec<ClusterMember>,
    /// `host:port` of any member of an existing cluster: this node joins it
    /// (on first start; later starts find it joined). Other members reach
    /// this node at its `api.listen` address.
    pub join: Option<String>,
    /// Shared by all members; every node-to-node call carries it. At least
    /// 16 visible ASCII characters. Required of founders listing `nodes` and
    /// of joiners; a node started alone without one generates it on first
    /// start and keeps it in `<data_dir>/cluster.secret` (mode 0600), the
    /// secret nodes joining it then give.
    pub secret: Option<Secret>,
    /// PEM certificate(s) of the CA that signs every member's certificate.
    /// Set, members talk TLS to each other: each presents its listener's
    /// certificate (`api.tls_cert_path`, which this requires) as a client
    /// certificate, trusts only this CA, and refuses node-to-node calls
    /// without a certificate it signed. API clients need no certificate.
    pub tls_ca_path: Option<PathBuf>,
    /// Shards the keyspace is split into; fixed when the cluster is created.
    /// Unset: 64 for a cluster founded with `nodes`, 1 for a node started
    /// alone (every shard is a Raft group with its own WAL on each replica,
    /// so one node pays for each; set it when a node started alone is meant
    /// to grow to many members).
    pub shard_count: Option<u32>,
    /// Replicas per shard (fewer when the cluster has fewer nodes).
    pub replication_factor: usize,
    /// How long an invocation may keep looking for its shard's leader (through
    /// elections and unreachable nodes) before it fails.
    pub forward_timeout_ms: u64,
    /// Replica moves (grow, drain, repair) running at once, cluster-wide: the
    /// bound on how much catch-up traffic competes with foreground calls.
    pub max_concurrent_moves: usize,
    /// How often the metadata leader checks members and plans moves.
    pub placement_interval_ms: u64,
    /// A member that has not answered for this long is suspect: it keeps its
    /// replicas but receives no new ones.
    pub suspect_after_ms: u64,
    /// A member that has not answered for this long (the grace period) is
    /// down: its replicas are re-created on other members.
    pub down_after_ms: u64,
    /// The longest one replica move may take, catching up included; a move
    /// that takes longer fails and is planned again.
    pub move_timeout_ms: u64,
}

/// One member: its id and the address (`host:port`) its API port is reached
/// at by the other nodes; node-to-node traffic shares that port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterMember {
    pub id: u64,
    pub addr: String,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            node_id: 0,
            nodes: Vec::new(),
            join: None,
            secret: None,
            tls_ca_path: None,
            shard_count: None,
            replication_factor: 3,
            forward_timeout_ms: 10_000,
            max_concurrent_moves: 2,
            placement_interval_ms: 1_000,
            suspect_after_ms: 3_000,
            down_after_ms: 60_000,
            move_timeout_ms: 60_000,
        }
    }
}

impl ClusterConfig {
    /// Neither founders nor a member to join are named: this node founds a
    /// cluster of one.
    pub fn started_alone(&self) -> bool {
        self.nodes.is_empty() && self.join.is_none()
    }

    /// This node's id (a node started alone without one is node 1).
    pub fn node_id(&self) -> u64 {
        if self.node_id == 0 && self.started_alone() { 1 } else { self.node_id }
    }

    /// The shard count a cluster founded by this configuration gets.
    pub fn shard_count(&self) -> u32 {
        self.shard_count.unwrap_or(if self.started_alone() { 1 } else { 64 })
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let addr_ok =
            |a: &str| a.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if let Some(join) = &self.join {
            if !self.nodes.is_empty() {
                return bad(
                    "cluster.join and cluster.nodes exclude each other: founders list the members, a new node joins"
                        .into(),
                );
            }
            if self.node_id == 0 {
                return bad("cluster.join needs cluster.node_id (a new id, 1 or more)".into());
            }
            if !addr_ok(join) {
                return bad(format!("cluster.join is {join:?}; expected host:port of a member"));
            }
        }
        let mut ids = std::collections::BTreeSet::new();
        for m in &self.nodes {
            if m.id == 0 {
                return bad("cluster.nodes: node ids start at 1".into());
            }
            if !ids.insert(m.id) {
                return bad(format!("cluster.nodes: node id {} is listed twice", m.id));
            }
            if !addr_ok(&m.addr) {
                return bad(format!("cluster.nodes: node {} has address {:?}; expected host:port", m.id, m.addr));
            }
        }
        if !self.nodes.is_empty() && !ids.contains(&self.node_id) {
            return bad(format!("cluster.node_id {} is not among cluster.nodes {ids:?}", self.node_id));
        }
        match &self.secret {
            None if self.started_alone() => {}
            None => return bad("cluster.secret is required for a cluster (or set CONFLUX_CLUSTER_SECRET)".into()),
            Some(s) if s.expose().len() < 16 || !s.expose().bytes().all(|b| b.is_ascii_graphic()) => {
                return bad("cluster.secret must be at least 16 visible ASCII characters".into());
            }
            Some(_) => {}
        }
        if !(1..=4096).contains(&self.shard_count()) {
            return bad(format!("cluster.shard_count must be 1..=4096, not {}", self.shard_count()));
        }
        if !(1..=7).contains(&self.replication_factor) {
            return bad(format!("cluster.replication_factor must be 1..=7, not {}", self.replication_factor));
        }
        if self.forward_timeout_ms == 0 {
            return bad("cluster.forward_timeout_ms must be > 0".into());
        }
        if !(1..=64).contains(&self.max_concurrent_moves) {
            return bad(format!("cluster.max_concurrent_moves must be 1..=64, not {}", self.max_concurrent_moves));
        }
        if self.move_timeout_ms == 0 {
            return bad("cluster.move_timeout_ms must be > 0".into());
        }
        if self.placement_interval_ms == 0 {
            return bad("cluster.placement_interval_ms must be > 0".into());
        }
        if self.suspect_after_ms == 0 || self.down_after_ms <= self.suspect_after_ms {
            return bad(format!(
                "cluster.down_after_ms ({}) must exceed cluster.suspect_after_ms ({}), which must be > 0",
                self.down_after_ms, self.suspect_after_ms
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Which log lines reach stderr, in `tracing` filter syntax (e.g.
    /// `info,conflux::guest=warn`). The `RUST_LOG` variable overrides it.
    pub log_filter: String,
    /// Export one span per invocation (and its children) over OTLP/gRPC to
    /// this collector, e.g. `http://127.0.0.1:4317`. Unset: no export.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans.
    pub service_name: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_filter: "info,openraft=warn,raft_log=warn".to_owned(),
            otlp_endpoint: None,
            service_name: "conflux".to_owned(),
        }
    }
}

/// A secret string (an API token); it lives in conflux-client, which sends one.
pub use conflux_client::Secret;

impl Config {
    /// Write-set bytes a batch of turns (`scheduler.max_turns_per_commit`)
    /// may hold and still take another turn: whatever that turn writes, the
    /// batch's one write set then fits one log entry (`log.max_batch_bytes`),
    /// which validation keeps at least one turn's worth.
    pub fn commit_room_bytes(&self) -> usize {
        let one_turn = self
            .runtime
            .max_write_set_bytes
            .saturating_add(self.runtime.max_reply_bytes)
            .saturating_add(WRITE_SET_OVERHEAD_BYTES);
        self.log.max_batch_bytes.saturating_sub(one_turn)
    }

    /// Loads a TOML file; missing sections and fields take their defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string() })
    }

    /// Applies `section.field=value` overrides (values in TOML syntax; a bare
    /// word is taken as a string), e.g. `runtime.fuel_per_turn=1000000`.
    pub fn with_overrides(self, overrides: &[String]) -> Result<Self, ConfigError> {
        if overrides.is_empty() {
            return Ok(self);
        }
        let invalid = |m: String| ConfigError::Invalid(m);
        let mut root = toml::Value::try_from(&self).map_err(|e| invalid(e.to_string()))?;
        for o in overrides {
            let (path, raw) =
                o.split_once('=').ok_or_else(|| invalid(format!("--set {o:?}: expected section.field=value")))?;
            let (section, field) = path
                .trim()
                .split_once('.')
                .ok_or_else(|| invalid(format!("--set {o:?}: expected section.field=value")))?;
            let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(raw.to_owned()));
            let table = root
                .get_mut(section)
                .and_then(|s| s.as_table_mut())
                .ok_or_else(|| invalid(format!("--set {o:?}: unknown section {section:?}")))?;
            table.insert(field.to_owned(), value);
        }
        root.try_into().map_err(|e: toml::de::Error| invalid(format!("--set: {}", e.message())))
    }

    /// Checks cross-field rules once, so modules can trust their slice.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        self.storage.validate()?;
        let r = &self.runtime;
        let s = &self.scheduler;
        if r.fuel_per_turn == 0 && r.turn_timeout_ms == 0 {
            return bad("runtime.fuel_per_turn and runtime.turn_timeout_ms cannot both be 0: a turn needs a CPU limit");
        }
        if r.max_memory_bytes < (1 << 20) {
            return bad("runtime.max_memory_bytes must be at least 1 MiB");
        }
        if r.max_total_guest_memory_bytes < r.max_memory_bytes {
            return bad("runtime.max_total_guest_memory_bytes must be at least runtime.max_memory_bytes");
        }
        if s.max_warm_memory_bytes > r.max_total_guest_memory_bytes {
            return bad("scheduler.max_warm_memory_bytes must not exceed runtime.max_total_guest_memory_bytes");
        }
        if s.max_resident_instances == 0
            || s.mailbox_depth == 0
            || s.max_inflight_invocations == 0
            || s.max_turns_per_commit == 0
            || s.pipelined_commits == 0
        {
            return bad(
                "scheduler.max_resident_instances, mailbox_depth, max_turns_per_commit, pipelined_commits and \
                 max_inflight_invocations must be > 0",
            );
        }
        if s.delivery_batch == 0
            || s.delivery_concurrency == 0
            || s.delivery_max_attempts == 0
            || s.max_outbox_messages == 0
            || s.max_idempotency_keys == 0
            || s.idempotency_retention_ms == 0
        {
            return bad("scheduler.delivery_batch, delivery_concurrency, delivery_max_attempts, max_outbox_messages, \
                 max_idempotency_keys and idempotency_retention_ms must be > 0");
        }
        if s.delivery_retry_base_ms == 0 || s.delivery_retry_max_ms < s.delivery_retry_base_ms {
            return bad("scheduler.delivery_retry_base_ms must be > 0 and <= delivery_retry_max_ms");
        }
        if (r.max_instances as usize) < s.max_resident_instances + 64 {
            return bad("runtime.max_instances must exceed scheduler.max_resident_instances by at least 64");
        }
        if self.api.max_payload_bytes == 0 || r.max_reply_bytes == 0 {
            return bad("api.max_payload_bytes and runtime.max_reply_bytes must be > 0");
        }
        // A turn's write set (with its reply, stored under an idempotency
        // key, and bookkeeping) is one Raft entry, and an entry must reach
        // the followers within one AppendEntries (openraft's budget is one
        // heartbeat interval): it may not exceed what a commit batch holds.
        if r.max_write_set_bytes.saturating_add(r.max_reply_bytes).saturating_add(WRITE_SET_OVERHEAD_BYTES)
            > self.log.max_batch_bytes
        {
            return Err(ConfigError::Invalid(format!(
                "runtime.max_write_set_bytes ({}) + runtime.max_reply_bytes ({}) + {WRITE_SET_OVERHEAD_BYTES} must not \
                 exceed log.max_batch_bytes ({}): a turn's write set travels in one log entry",
                r.max_write_set_bytes, r.max_reply_bytes, self.log.max_batch_bytes
            )));
        }
        if self.registry.max_component_bytes < 1024 {
            return bad("registry.max_component_bytes must be at least 1 KiB");
        }
        let a = &self.api;
        for (name, token) in [("api.admin_token", &a.admin_token), ("api.invoke_token", &a.invoke_token)] {
            if token.as_ref().is_some_and(|t| t.expose().trim().is_empty()) {
                return Err(ConfigError::Invalid(format!("{name} must not be empty (leave it unset to turn it off)")));
            }
        }
        if a.tls_cert_path.is_some() != a.tls_key_path.is_some() {
            return bad("api.tls_cert_path and api.tls_key_path must be set together (both or neither)");
        }
        for origin in &a.allowed_origins {
            crate::api::browser::parse_origin(origin)
                .map_err(|e| ConfigError::Invalid(format!("api.allowed_origins: {e}")))?;
        }
        for host in &a.allowed_hosts {
            crate::api::browser::parse_host_entry(host)
                .map_err(|e| ConfigError::Invalid(format!("api.allowed_hosts: {e}")))?;
        }
        if a.max_page_bytes < 1024 {
            return bad("api.max_page_bytes must be at least 1 KiB");
        }
        self.log.validate().map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let t = &self.telemetry;
        if let Some(ep) = &t.otlp_endpoint
            && !(ep.starts_with("http://") || ep.starts_with("https://"))
        {
            return Err(ConfigError::Invalid(format!(
                "telemetry.otlp_endpoint must be an http:// or https:// URL, not {ep:?}"
            )));
        }
        if r.guest_log_lines == 0 || r.guest_log_lines > 100_000 {
            return bad("runtime.guest_log_lines must be between 1 and 100000");
        }
        if tracing_subscriber::EnvFilter::try_new(&t.log_filter).is_err() {
            return Err(ConfigError::Invalid(format!("telemetry.log_filter {:?} is not a valid filter", t.log_filter)));
        }
        // A node started alone may serve TLS without a CA: until one is
        // configured, members cannot join it over TLS (the join is refused).
        match (!self.cluster.started_alone(), a.tls_cert_path.is_some(), self.cluster.tls_ca_path.is_some()) {
            (true, true, false) => {
                return bad(
                    "api.tls_* on a cluster member needs cluster.tls_ca_path too: members reach each other on the \
                     API port, so they talk TLS to each other, and the CA that signs their certificates is how \
                     they trust one another",
                );
            }
            (_, false, true) => {
                return bad("cluster.tls_ca_path needs api.tls_cert_path and api.tls_key_path: the member's own \
                     certificate, which it serves and presents to its peers");
            }
            _ => {}
        }
        self.cluster.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    /// A turn's write set is one Raft entry: a limit that would let one
    /// outgrow a commit batch is refused, naming both settings.
    #[test]
    fn a_write_set_limit_beyond_one_log_entry_is_refused() {
        let mut c = Config::default();
        c.runtime.max_write_set_bytes = c.log.max_batch_bytes;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("runtime.max_write_set_bytes") && e.contains("log.max_batch_bytes"), "{e}");
        c.log.max_batch_bytes += c.runtime.max_reply_bytes + WRITE_SET_OVERHEAD_BYTES;
        c.validate().unwrap();
    }

    #[test]
    fn the_apply_buffer_is_bounded() {
        let c: Config = toml::from_str("[storage]\napply_buffer_max_keys = 10\napply_buffer_max_age_ms = 5\n").unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.storage.apply_buffer(),
            crate::storage::ApplyBuffer { max_keys: 10, max_bytes: 4 << 20, max_age_ms: 5 }
        );
        let invalid = |edit: &dyn Fn(&mut Config)| {
            let mut c = Config::default();
            edit(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert!(invalid(&|c| c.storage.apply_buffer_max_keys = 2 << 20).contains("apply_buffer_max_keys"));
        assert!(invalid(&|c| c.storage.apply_buffer_max_bytes = 1 << 30).contains("apply_buffer_max_bytes"));
        assert!(invalid(&|c| c.storage.apply_buffer_max_age_ms = 600_000).contains("apply_buffer_max_age_ms"));
    }

    #[test]
    fn a_cluster_needs_its_members_a_known_id_and_a_strong_secret() {
        let base = "[cluster]\nnode_id = 2\nsecret = \"0123456789abcdef\"\n\
                    nodes = [{ id = 1, addr = \"127.0.0.1:7001\" }, { id = 2, addr = \"127.0.0.1:7002\" }]\n";
        let c: Config = toml::from_str(base).unwrap();
        c.validate().unwrap();
        assert!(!c.cluster.started_alone());
        assert_eq!((c.cluster.shard_count(), c.cluster.replication_factor), (64, 3));
        let invalid = |edit: &dyn Fn(&mut Config)| {
            let mut c: Config = toml::from_str(base).unwrap();
            edit(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert!(invalid(&|c| c.cluster.node_id = 3).contains("not among"));
        assert!(invalid(&|c| c.cluster.secret = Some(Secret::new("short"))).contains("16"));
        assert!(invalid(&|c| c.cluster.secret = None).contains("required"));
        assert!(invalid(&|c| c.cluster.nodes[1].id = 1).contains("twice"));
        assert!(invalid(&|c| c.cluster.nodes[0].addr = "nowhere".into()).contains("host:port"));
        assert!(invalid(&|c| c.cluster.shard_count = Some(0)).contains("shard_count"));
        // Without founders the node is started alone: its id and secret stand,
        // and its cluster has one shard unless told otherwise.
        let mut alone: Config = toml::from_str(base).unwrap();
        alone.cluster.nodes.clear();
        alone.validate().unwrap();
        assert!(alone.cluster.started_alone());
        assert_eq!((alone.cluster.node_id(), alone.cluster.shard_count()), (2, 1));
        assert_eq!(Config::default().cluster.node_id(), 1);
        alone.cluster.secret = Some(Secret::new("short"));
        assert!(alone.validate().unwrap_err().to_string().contains("16"));
        assert!(invalid(&|c| c.cluster.join = Some("127.0.0.1:7001".into())).contains("exclude each other"));
        assert!(invalid(&|c| c.cluster.down_after_ms = c.cluster.suspect_after_ms).contains("must exceed"));
        assert!(invalid(&|c| c.cluster.max_concurrent_moves = 0).contains("max_concurrent_moves"));
        let joining = |edit: &dyn Fn(&mut Config)| {
            let mut c: Config = toml::from_str(base).unwrap();
            c.cluster.nodes.clear();
            c.cluster.node_id = 9;
            c.cluster.join = Some("127.0.0.1:7001".into());
            edit(&mut c);
            c.validate().map_err(|e| e.to_string())
        };
        joining(&|_| {}).unwrap();
        assert!(joining(&|c| c.cluster.node_id = 0).unwrap_err().contains("needs cluster.node_id"));
        assert!(joining(&|c| c.cluster.join = Some("nowhere".into())).unwrap_err().contains("host:port"));
    }

    #[test]
    fn toml_sections_override_defaults() {
        let c: Config = toml::from_str("[scheduler]\nmailbox_depth = 7\n[api]\nlisten = \"127.0.0.1:9\"\n").unwrap();
        assert_eq!(c.scheduler.mailbox_depth, 7);
        assert_eq!(c.api.listen.port(), 9);
        assert_eq!(c.runtime.max_memory_bytes, 64 << 20);
    }

    #[test]
    fn overrides_set_fields_and_refuse_unknown_ones() {
        let c = Config::default()
            .with_overrides(&[
                "runtime.fuel_per_turn=5".into(),
                "api.listen=127.0.0.1:9".into(),
                "storage.data_dir=/tmp/x".into(),
            ])
            .unwrap();
        assert_eq!(c.runtime.fuel_per_turn, 5);
        assert_eq!(c.api.listen.port(), 9);
        assert_eq!(c.storage.data_dir, std::path::PathBuf::from("/tmp/x"));
        assert!(Config::default().with_overrides(&["runtime.no_such=1".into()]).is_err());
        assert!(Config::default().with_overrides(&["nosection.x=1".into()]).is_err());
        assert!(Config::default().with_overrides(&["runtime.fuel_per_turn=lots".into()]).is_err());
        assert!(Config::default().with_overrides(&["garbage".into()]).is_err());
    }

    #[test]
    fn a_turn_always_has_a_cpu_limit() {
        let mut c = Config::default();
        c.runtime.fuel_per_turn = 0;
        c.validate().unwrap();
        c.runtime.turn_timeout_ms = 0;
        assert!(c.validate().is_err());
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        assert!(toml::from_str::<Config>("[scheduler]\nmailbox_depht = 7\n").is_err());
        let mut c = Config::default();
        c.scheduler.mailbox_depth = 0;
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.runtime.max_instances = 10;
        assert!(c.validate().is_err());
    }

    #[test]
    fn empty_tokens_and_half_tls_are_refused() {
        let mut c = Config::default();
        c.api.admin_token = Some(Secret::new(""));
        assert!(c.validate().unwrap_err().to_string().contains("api.admin_token"));
        let mut c = Config::default();
        c.api.invoke_token = Some(Secret::new("  "));
        assert!(c.validate().unwrap_err().to_string().contains("api.invoke_token"));
        let mut c = Config::default();
        c.api.tls_cert_path = Some("cert.pem".into());
        assert!(c.validate().unwrap_err().to_string().contains("both or neither"));
        c.api.tls_key_path = Some("key.pem".into());
        c.validate().unwrap();
    }

    #[test]
    fn mutual_tls_between_members_pairs_the_ca_with_the_listeners_certificate() {
        let base =
            "[cluster]\nnode_id = 1\nsecret = \"0123456789abcdef\"\nnodes = [{ id = 1, addr = \"127.0.0.1:7001\" }]\n";
        let member: Config = toml::from_str(base).unwrap();
        let with = |f: &dyn Fn(&mut Config)| {
            let mut c = member.clone();
            f(&mut c);
            c.validate().map_err(|e| e.to_string())
        };
        let listener_tls = |c: &mut Config| {
            c.api.tls_cert_path = Some("node.pem".into());
            c.api.tls_key_path = Some("node.key".into());
        };
        // A member's TLS listener without the CA: its peers could not dial it.
        assert!(with(&listener_tls).unwrap_err().contains("cluster.tls_ca_path"));
        // The CA without a certificate to present.
        assert!(with(&|c| c.cluster.tls_ca_path = Some("ca.pem".into())).unwrap_err().contains("api.tls_cert_path"));
        with(&|c| {
            listener_tls(c);
            c.cluster.tls_ca_path = Some("ca.pem".into());
        })
        .unwrap();
        // A node started alone is a member too: the CA is what nodes joining
        // it are checked against, and without one it still serves TLS.
        let mut single = Config::default();
        listener_tls(&mut single);
        single.validate().unwrap();
        single.cluster.tls_ca_path = Some("ca.pem".into());
        single.validate().unwrap();
    }

    #[test]
    fn tokens_are_redacted_in_debug_and_settable() {
        let c = Config::default()
            .with_overrides(&["api.admin_token=hunter2-admin".into(), "api.invoke_token=hunter2-invoke".into()])
            .unwrap();
        assert_eq!(c.api.admin_token.as_ref().unwrap().expose(), "hunter2-admin");
        let dbg = format!("{c:?} {:#?}", c.api);
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert!(dbg.contains("redacted"), "{dbg}");
        let t: Config = toml::from_str("[api]\nadmin_token = \"abc\"\n").unwrap();
        assert_eq!(t.api.admin_token.unwrap().expose(), "abc");
    }
}
