//! The scheduler: per-entity mailboxes so turns of one entity never overlap
//! while different entities run in parallel, a bounded cache of warm instances
//! (LRU + idle eviction), and the turn pipeline: run the guest on a blocking
//! thread, commit its write set through the log, then reply.
//!
//! Each entity has a [`Slot`] whose async mutex is its mailbox: waiters are
//! served in arrival order (tokio's mutex is fair), the number of waiters is
//! capped, and the lock is held from the start of a turn until its write set is
//! applied, so the next turn always reads committed state. Every invocation
//! runs in its own task, so a caller that goes away cannot cut a turn between
//! its execution and its commit.
//!
//! Hot swap: the version a turn runs is read from the registry when the turn
//! starts, so a turn in flight finishes on its version and a warm instance of an
//! older version is replaced between turns. The slot remembers which version last
//! committed the entity's state (keyspace `EntityMeta`); when that differs from the
//! version about to run, the guest's migration runs first, in the same turn, and
//! the new version number is committed with the turn's writes — so each entity
//! migrates lazily and exactly once per version change.

mod messaging;

use crate::config::SchedulerConfig;
use crate::log::{CommitLog, LogError};
use crate::model::{
    EntityMeta, EntityRef, IdempotentReply, Keyspace, Message, Op, Record, WriteSet, entity_prefix,
    idempotency_expiry_key, idempotency_key, inbox_key, outbox_key, state_key, timer_due_key, timer_id_key,
};
use crate::registry::{LoadedVersion, Registry, RegistryError};
use crate::runtime::{Instance, Runtime, RuntimeError, TurnError, TurnInput};
use crate::storage::StateStore;
use lru::LruCache;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tracing::Instrument;

/// One call of one operation on one entity.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub entity: EntityRef,
    pub operation: String,
    pub payload: Vec<u8>,
    pub caller: Option<EntityRef>,
    /// A client's retry key: the first successful reply under it is stored and
    /// returned to every retry instead of running the turn again.
    pub idempotency_key: Option<String>,
    /// Set when this invocation delivers a message from an outbox: the sender's
    /// sequence, by which the receiver drops duplicates.
    pub message_seq: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    #[error(transparent)]
    UnknownType(RegistryError),
    #[error("operation name must be 1..=128 printable characters")]
    BadOperation,
    #[error("entity {entity} has {depth} invocations waiting; try again later")]
    MailboxFull { entity: String, depth: usize },
    #[error("the node is handling {0} invocations; try again later")]
    Overloaded(usize),
    #[error("the node is shutting down")]
    ShuttingDown,
    #[error("the node's outbox holds {0} undelivered messages; try again later")]
    OutboxFull(u64),
    #[error(transparent)]
    BadIdempotencyKey(crate::model::ModelError),
    /// A retry under an idempotency key whose first call had another
    /// operation or payload: it would get that call's reply.
    #[error(
        "idempotency key {key:?} was first used for another call (a different operation or payload) \
         on {entity}; use a new key for a new call"
    )]
    IdempotencyKeyReused { entity: String, key: String },
    #[error(
        "entity {entity} could not migrate from version {from_version} to version {to_version}: {cause}; \
         it keeps its version-{from_version} state (deploy a fix or roll back)"
    )]
    MigrationFailed { entity: String, from_version: u32, to_version: u32, cause: TurnError },
    #[error(transparent)]
    Turn(#[from] TurnError),
    #[error(transparent)]
    Instantiate(#[from] RuntimeError),
    #[error("commit failed: {0}")]
    Commit(#[from] LogError),
    #[error("internal error: {0}")]
    Internal(String),
    /// This node does not lead the entity's shard (or has not caught up as its
    /// leader yet); nothing ran. The router retries on `leader`.
    #[error("this node does not lead the entity's shard (leader: {})", leader.map_or("unknown".to_string(), |l| format!("node {l}")))]
    NotHere { leader: Option<u64> },
    /// The shard has no reachable leader within the forwarding deadline.
    #[error("no leader of the entity's shard could be reached: {0}")]
    NoLeader(String),
    /// A forwarded invocation could not reach `node`; nothing ran there.
    #[error("node {node} is unreachable: {message}")]
    Unreachable { node: u64, message: String },
    /// The connection to `node` failed after the invocation was sent: it may
    /// or may not have run.
    #[error("lost the connection to node {node} during the call (the outcome is unknown): {message}")]
    Lost { node: u64, message: String },
    /// The shard's leader ran the invocation and it failed there; `kind` and
    /// `code` are the leader's.
    #[error("{message}")]
    Remote { kind: &'static str, code: i32, message: String },
}

/// Every [`InvokeError::kind`], so a kind received from another node maps back
/// to its static name.
pub const ERROR_KINDS: &[&str] = &[
    "unknown-type",
    "component-loading",
    "bad-operation",
    "mailbox-full",
    "overloaded",
    "shutting-down",
    "migration-failed",
    "outbox-full",
    "bad-idempotency-key",
    "idempotency-key-reused",
    "bad-request",
    "unknown-operation",
    "failed",
    "out-of-fuel",
    "timeout",
    "out-of-memory",
    "stack-overflow",
    "limit-exceeded",
    "trap",
    "instantiate",
    "commit",
    "internal",
    "not-leader",
    "unavailable",
];

/// Kinds of failure that retrying cannot fix.
const PERMANENT_KINDS: &[&str] = &[
    "unknown-type",
    "bad-operation",
    "bad-idempotency-key",
    "idempotency-key-reused",
    "bad-request",
    "unknown-operation",
    "failed",
];

impl InvokeError {
    /// A stable, machine-readable name of the failure: the API's
    /// `conflux-error-kind`, the label of the error metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            InvokeError::UnknownType(RegistryError::Loading { .. }) => "component-loading",
            InvokeError::UnknownType(_) => "unknown-type",
            InvokeError::BadOperation => "bad-operation",
            InvokeError::MailboxFull { .. } => "mailbox-full",
            InvokeError::Overloaded(_) => "overloaded",
            InvokeError::ShuttingDown => "shutting-down",
            InvokeError::MigrationFailed { .. } => "migration-failed",
            InvokeError::OutboxFull(_) => "outbox-full",
            InvokeError::BadIdempotencyKey(_) => "bad-idempotency-key",
            InvokeError::IdempotencyKeyReused { .. } => "idempotency-key-reused",
            InvokeError::Turn(t) => match t {
                TurnError::BadRequest(_) => "bad-request",
                TurnError::UnknownOperation(_) => "unknown-operation",
                TurnError::Failed(_) => "failed",
                TurnError::Trapped { kind, .. } => kind.as_str(),
                TurnError::MigrationFailed { .. } => "migration-failed",
            },
            InvokeError::Instantiate(RuntimeError::Exhausted { .. }) => "overloaded",
            InvokeError::Instantiate(_) => "instantiate",
            InvokeError::Commit(_) => "commit",
            InvokeError::Internal(_) => "internal",
            InvokeError::NotHere { .. } => "not-leader",
            InvokeError::NoLeader(_) | InvokeError::Unreachable { .. } | InvokeError::Lost { .. } => "unavailable",
            InvokeError::Remote { kind, .. } => kind,
        }
    }

    /// Retrying the invocation cannot succeed (a bad request, an entity's own
    /// refusal, an unknown type).
    pub fn is_permanent(&self) -> bool {
        PERMANENT_KINDS.contains(&self.kind())
    }

    /// Whether running the invocation again is safe and may succeed: nothing
    /// ran, or whatever ran is deduplicated (`guarded`: the invocation carries
    /// an idempotency key or a message sequence).
    fn is_retryable(&self, guarded: bool) -> bool {
        match self {
            InvokeError::NotHere { .. } | InvokeError::NoLeader(_) | InvokeError::Unreachable { .. } => true,
            // A leader that is shutting down refuses before running anything.
            InvokeError::Remote { kind: "shutting-down", .. } => true,
            // A commit that failed as leadership moved may still be applied by
            // the next leader.
            InvokeError::Commit(_) | InvokeError::Lost { .. } => guarded,
            InvokeError::Remote { kind: "commit", .. } => guarded,
            _ => false,
        }
    }
}

/// Where the turns of an entity run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// On this node, which leads the entity's shard and has applied its log.
    /// `epoch` is the leadership term: what a slot cached under another term
    /// may be stale.
    Here { epoch: u64 },
    /// On another node, the shard's leader as far as this node knows.
    There { node: u64 },
    /// No leader is known (an election is under way).
    Unknown,
}

/// How a clustered node finds the leader of an entity's shard and hands it an
/// invocation. A single node has none: everything runs here.
pub trait Router: Send + Sync + 'static {
    fn route(&self, entity: &EntityRef) -> Route;
    /// Runs `inv` on `node` (which runs it only if it leads the shard).
    fn forward(&self, node: u64, inv: Invocation) -> futures::future::BoxFuture<'static, Result<Vec<u8>, InvokeError>>;
    /// Learns who leads the entity's shard from a node that refused it.
    fn hint(&self, entity: &EntityRef, leader: Option<u64>);
    /// How long one invocation may look for its leader.
    fn forward_timeout(&self) -> Duration;
}

/// First and largest pause between attempts to find a shard's leader. An
/// attempt is cheap (a metrics read, or a call refused at once), and the
/// largest pause adds directly to the failover gap callers see.
const ROUTE_RETRY_MIN: Duration = Duration::from_millis(20);
const ROUTE_RETRY_MAX: Duration = Duration::from_millis(100);

/// Failed invocations the node remembers for its dashboard.
const RECENT_ERRORS: usize = 64;

/// Slots one eviction pass looks at, least recently used first: the pass
/// runs under the slot map's lock.
const EVICT_SCAN: usize = 4096;
/// Idle instances an instantiation that found no room evicts at least.
const EVICT_BATCH: usize = 16;
/// Guest memory an instantiation that found no room frees at least.
const EVICT_HEADROOM_BYTES: usize = 64 << 20;

/// A turn's permit as the runtime's [`TurnSlot`](crate::runtime::TurnSlot):
/// given back while the guest waits in a host call, taken again after.
struct PermitSlot {
    permits: Arc<tokio::sync::Semaphore>,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl crate::runtime::TurnSlot for PermitSlot {
    fn release(&mut self) {
        self.permit = None;
    }

    fn reacquire(&mut self) {
        if self.permit.is_none() {
            // Runs on the turn's blocking thread; tokio's semaphore needs no runtime.
            self.permit = futures::executor::block_on(self.permits.clone().acquire_owned()).ok();
        }
    }
}

/// One failed invocation.
#[derive(Debug, Clone)]
pub struct RecentError {
    /// Unix milliseconds.
    pub at_ms: u64,
    pub entity: String,
    pub operation: String,
    pub invocation_id: String,
    pub kind: &'static str,
    pub message: String,
}

struct Slot {
    /// The mailbox: held for a whole turn, execution to commit.
    state: tokio::sync::Mutex<SlotState>,
    waiting: AtomicUsize,
    last_used_ms: AtomicU64,
}

impl Slot {
    /// Idle (no turn holds it) and not in doubt: a slot in doubt must be
    /// kept until a turn resolves the doubt.
    fn evictable(&self) -> bool {
        self.state.try_lock().is_ok_and(|s| !s.in_doubt)
    }
}

#[derive(Default)]
struct SlotState {
    /// The leadership term the cached instance and meta were read under.
    epoch: u64,
    resident: Option<Resident>,
    /// The entity's meta record; `None` until read from the store.
    meta: Option<MetaCache>,
    /// A turn's write set failed to commit with an unknown outcome (a commit
    /// timeout): it may still commit. Until a later proposal commits behind
    /// it, the store may lack it, and a turn reading the store would write
    /// over it — a lost update (found by the cluster simulation).
    in_doubt: bool,
}

/// What the slot remembers of the entity's [`EntityMeta`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MetaCache {
    stored: StoredVersion,
    next_seq: u64,
}

impl MetaCache {
    /// Reads it from the store (the meta record, else whether the entity has state).
    fn load(store: &dyn StateStore, entity: &EntityRef) -> Result<Self, InvokeError> {
        let internal = |e: &dyn std::fmt::Display| InvokeError::Internal(format!("reading meta of {entity}: {e}"));
        let prefix = entity_prefix(entity);
        let meta = match store.get(Keyspace::EntityMeta, &prefix).map_err(|e| internal(&e))? {
            Some(bytes) => EntityMeta::decode(&bytes).map_err(|e| internal(&e))?,
            None => EntityMeta::default(),
        };
        let stored = match meta.version {
            Some(v) => StoredVersion::At(v),
            None => {
                let any = store.scan(Keyspace::State, &prefix, None, 1).map_err(|e| internal(&e))?;
                if any.is_empty() { StoredVersion::Fresh } else { StoredVersion::Unrecorded }
            }
        };
        Ok(MetaCache { stored, next_seq: meta.next_seq })
    }
}

/// The version that last committed an entity's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StoredVersion {
    /// No state and no record: nothing to migrate.
    Fresh,
    /// State written before versions were recorded; migrates as from version 0.
    Unrecorded,
    At(u32),
}

impl StoredVersion {
    fn version(self) -> Option<u32> {
        match self {
            StoredVersion::At(v) => Some(v),
            _ => None,
        }
    }

    /// The version to migrate from before running `version`, if any.
    fn migrate_from(self, version: u32) -> Option<u32> {
        match self {
            StoredVersion::Fresh => None,
            StoredVersion::Unrecorded => Some(0),
            StoredVersion::At(v) => (v != version).then_some(v),
        }
    }
}

/// What a dry run of a candidate version's migration found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DryRunReport {
    pub sampled: u64,
    pub migrated: u64,
    pub failed: u64,
    /// Entities already on the candidate's version (nothing to run).
    pub up_to_date: u64,
    /// The first failures: entity id, version it would migrate from, error.
    pub failures: Vec<(String, u32, String)>,
    pub has_migration: bool,
}

/// Failures a dry-run report lists in full; the rest are only counted.
const DRY_RUN_FAILURES_SHOWN: usize = 10;
/// Upper bound of a dry run's sample, so one request cannot run for hours.
pub const DRY_RUN_MAX_SAMPLE: usize = 10_000;

/// A warm instance and the version it was made from.
struct Resident {
    version: Arc<LoadedVersion>,
    instance: Instance,
    _count: ResidentCount,
}

/// Keeps the resident-instance gauge exact whichever way an instance goes.
struct ResidentCount(Arc<AtomicUsize>);

impl ResidentCount {
    fn new(c: &Arc<AtomicUsize>) -> Self {
        c.fetch_add(1, Ordering::Relaxed);
        Self(c.clone())
    }
}

impl Drop for ResidentCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Decrements a counter when dropped (a waiter that leaves, a finished call).
struct CountGuard<'a>(&'a AtomicUsize);

impl Drop for CountGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts one invocation as in flight until dropped.
struct InflightGuard(Arc<Inner>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counters for `Status` and tests.
#[derive(Debug, Clone, Default)]
pub struct SchedulerStats {
    pub active_entities: usize,
    pub resident_instances: usize,
    /// Linear memory all instances hold, and its bound.
    pub guest_memory_bytes: usize,
    pub guest_memory_limit_bytes: usize,
    pub inflight_invocations: usize,
    pub turns_ok: u64,
    pub turns_failed: u64,
    pub instantiations: u64,
    /// Messages committed and not yet delivered or dead-lettered.
    pub outbox_messages: u64,
    pub messages_delivered: u64,
    pub dead_letters: u64,
    pub idempotency_keys: u64,
}

struct Inner {
    runtime: Arc<Runtime>,
    registry: Arc<Registry>,
    store: Arc<dyn StateStore>,
    log: Arc<dyn CommitLog>,
    router: Option<Arc<dyn Router>>,
    cfg: SchedulerConfig,
    slots: Mutex<LruCache<EntityRef, Arc<Slot>>>,
    inflight: AtomicUsize,
    resident: Arc<AtomicUsize>,
    shutting_down: AtomicBool,
    invocation_prefix: String,
    next_invocation: AtomicU64,
    turns_ok: AtomicU64,
    turns_failed: AtomicU64,
    instantiations: AtomicU64,
    epoch: Instant,
    /// Turns executing at once. More threads than cores only adds contention
    /// (page faults and allocator locks of many instantiations at once). A
    /// turn gives its permit back while its guest waits in a host call.
    turn_permits: Arc<tokio::sync::Semaphore>,
    /// Messages in the outbox (committed, not yet delivered or dead-lettered).
    outbox_len: AtomicU64,
    /// Signalled when a turn commits messages, to wake the deliverer.
    outbox_ready: tokio::sync::Notify,
    /// Signalled when a turn sets a timer, to wake the timer loop.
    timers_changed: tokio::sync::Notify,
    /// Stored idempotent replies.
    idempotency_len: AtomicU64,
    messages_delivered: AtomicU64,
    dead_letters: AtomicU64,
    /// The last [`RECENT_ERRORS`] failed invocations, oldest first.
    recent_errors: Mutex<std::collections::VecDeque<RecentError>>,
}

#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

use crate::model::unix_ms as wall_ms;

fn valid_operation(op: &str) -> bool {
    !op.is_empty() && op.len() <= 128 && !op.chars().any(char::is_control)
}

impl Scheduler {
    pub fn new(
        cfg: &SchedulerConfig,
        runtime: Arc<Runtime>,
        registry: Arc<Registry>,
        store: Arc<dyn StateStore>,
        log: Arc<dyn CommitLog>,
    ) -> Self {
        Self::with_router(cfg, runtime, registry, store, log, None)
    }

    /// A scheduler of a clustered node: `router` says which entities run here
    /// and forwards the others.
    pub fn with_router(
        cfg: &SchedulerConfig,
        runtime: Arc<Runtime>,
        registry: Arc<Registry>,
        store: Arc<dyn StateStore>,
        log: Arc<dyn CommitLog>,
        router: Option<Arc<dyn Router>>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                runtime,
                registry,
                store,
                log,
                router,
                cfg: cfg.clone(),
                slots: Mutex::new(LruCache::unbounded()),
                inflight: AtomicUsize::new(0),
                resident: Arc::new(AtomicUsize::new(0)),
                shutting_down: AtomicBool::new(false),
                invocation_prefix: format!("{:x}", wall_ms()),
                next_invocation: AtomicU64::new(1),
                turns_ok: AtomicU64::new(0),
                turns_failed: AtomicU64::new(0),
                instantiations: AtomicU64::new(0),
                epoch: Instant::now(),
                turn_permits: Arc::new(tokio::sync::Semaphore::new(cfg.turn_threads())),
                outbox_len: AtomicU64::new(0),
                outbox_ready: tokio::sync::Notify::new(),
                timers_changed: tokio::sync::Notify::new(),
                idempotency_len: AtomicU64::new(0),
                messages_delivered: AtomicU64::new(0),
                dead_letters: AtomicU64::new(0),
                recent_errors: Mutex::new(std::collections::VecDeque::with_capacity(RECENT_ERRORS)),
            }),
        }
    }

    /// Runs one invocation as a turn and returns its reply once the turn's
    /// writes are durable. On a cluster the turn runs on the leader of the
    /// entity's shard: this node, or the one it is forwarded to.
    pub async fn invoke(&self, inv: Invocation) -> Result<Vec<u8>, InvokeError> {
        let Some(router) = self.inner.router.clone() else { return self.invoke_here_as(inv, 0).await };
        let deadline = Instant::now() + router.forward_timeout();
        let guarded = inv.idempotency_key.is_some() || inv.message_seq.is_some();
        let mut pause = ROUTE_RETRY_MIN;
        loop {
            let result = match router.route(&inv.entity) {
                Route::Here { epoch } => self.invoke_here_as(inv.clone(), epoch).await,
                Route::There { node } => router.forward(node, inv.clone()).await,
                Route::Unknown => Err(InvokeError::NoLeader("an election is under way".into())),
            };
            // What a failed forward says about the leader is noted even when
            // the call is not retried here: the caller's own retry (an
            // unguarded call that lost its connection) must not take the same
            // dead route again.
            match &result {
                Err(InvokeError::NotHere { leader }) => router.hint(&inv.entity, *leader),
                Err(InvokeError::Unreachable { .. } | InvokeError::Lost { .. }) => router.hint(&inv.entity, None),
                _ => {}
            }
            match result {
                Err(e) if e.is_retryable(guarded) && Instant::now() + pause < deadline => {
                    tracing::debug!(entity = %inv.entity, "looking for the shard's leader: {e}");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(ROUTE_RETRY_MAX);
                }
                Err(InvokeError::NotHere { leader }) => {
                    return Err(InvokeError::NoLeader(format!(
                        "gave up after {:?}; last known leader: {leader:?}",
                        router.forward_timeout()
                    )));
                }
                other => return other,
            }
        }
    }

    /// Runs an invocation forwarded by another node, only if this node leads
    /// the entity's shard: it is never forwarded again.
    pub async fn invoke_here(&self, inv: Invocation) -> Result<Vec<u8>, InvokeError> {
        let route = self.inner.router.as_ref().map_or(Route::Here { epoch: 0 }, |r| r.route(&inv.entity));
        match route {
            Route::Here { epoch } => self.invoke_here_as(inv, epoch).await,
            Route::There { node } => Err(InvokeError::NotHere { leader: Some(node) }),
            Route::Unknown => Err(InvokeError::NotHere { leader: None }),
        }
    }

    async fn invoke_here_as(&self, inv: Invocation, epoch: u64) -> Result<Vec<u8>, InvokeError> {
        let seq = self.inner.next_invocation.fetch_add(1, Ordering::Relaxed);
        let invocation_id = format!("{}-{seq:x}", self.inner.invocation_prefix);
        let span = tracing::info_span!(
            "invoke",
            entity = %inv.entity,
            operation = %inv.operation,
            invocation_id = %invocation_id,
        );
        let started = Instant::now();
        let (entity, operation) = (inv.entity.to_string(), inv.operation.clone());
        let entity_ref = inv.entity.clone();
        let result = self.invoke_as(inv, invocation_id.clone(), epoch).instrument(span).await;
        // A turn whose shard replica moved away while it ran fails reading
        // the store, before its commit: nothing ran, so it is a refusal the
        // caller's node retries on the shard's new leader.
        let result = match (result, &self.inner.router) {
            (Err(InvokeError::Internal(m)), Some(router)) if router.route(&entity_ref) != (Route::Here { epoch }) => {
                tracing::debug!(entity = %entity_ref, "the shard moved during the turn: {m}");
                Err(InvokeError::NotHere { leader: None })
            }
            (result, _) => result,
        };
        let m = crate::telemetry::metrics();
        m.invocation_seconds.observe(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            let kind = e.kind();
            m.errors.with_label_values(&[kind]).inc();
            if let InvokeError::Turn(TurnError::Trapped { kind, .. }) = e {
                m.traps.with_label_values(&[kind.as_str()]).inc();
            }
            let mut recent = self.inner.recent_errors.lock().expect("recent errors lock");
            if recent.len() == RECENT_ERRORS {
                recent.pop_front();
            }
            recent.push_back(RecentError {
                at_ms: wall_ms(),
                entity,
                operation,
                invocation_id,
                kind,
                message: e.to_string(),
            });
        }
        result
    }

    async fn invoke_as(&self, inv: Invocation, invocation_id: String, epoch: u64) -> Result<Vec<u8>, InvokeError> {
        let inner = &self.inner;
        if inner.shutting_down.load(Ordering::Acquire) {
            return Err(InvokeError::ShuttingDown);
        }
        if !valid_operation(&inv.operation) {
            return Err(InvokeError::BadOperation);
        }
        if let Some(k) = &inv.idempotency_key {
            crate::model::validate_idempotency_key(k).map_err(InvokeError::BadIdempotencyKey)?;
        }
        if !inner.registry.exists(&inv.entity.entity_type) {
            // Recorded but not loaded here yet (a member that joined or
            // restarted, a deploy still reaching it): wait a little for it.
            inner
                .registry
                .await_loaded(&inv.entity.entity_type, crate::registry::LOADING_WAIT)
                .await
                .map_err(InvokeError::UnknownType)?;
        }
        let n = inner.inflight.fetch_add(1, Ordering::AcqRel);
        let inflight = InflightGuard(inner.clone());
        if n >= inner.cfg.max_inflight_invocations {
            return Err(InvokeError::Overloaded(n));
        }
        // The guard moves into the task: a turn whose caller went away still
        // counts as in flight until it has committed, so drain waits for it.
        let task_inner = inner.clone();
        tokio::spawn(
            async move {
                let _inflight = inflight;
                task_inner.run(inv, invocation_id, epoch).await
            }
            .in_current_span(),
        )
        .await
        .map_err(|e| InvokeError::Internal(format!("turn task failed: {e}")))?
    }

    /// What the guests of this node printed.
    pub fn guest_logs(&self) -> &Arc<crate::runtime::GuestLogs> {
        self.inner.runtime.guest_logs()
    }

    /// The last failed invocations, newest first.
    pub fn recent_errors(&self) -> Vec<RecentError> {
        self.inner.recent_errors.lock().expect("recent errors lock").iter().rev().cloned().collect()
    }

    pub fn stats(&self) -> SchedulerStats {
        let i = &self.inner;
        SchedulerStats {
            active_entities: i.slots.lock().expect("slots lock").len(),
            resident_instances: i.resident.load(Ordering::Relaxed),
            guest_memory_bytes: i.runtime.guest_memory().used(),
            guest_memory_limit_bytes: i.runtime.guest_memory().limit(),
            inflight_invocations: i.inflight.load(Ordering::Relaxed),
            turns_ok: i.turns_ok.load(Ordering::Relaxed),
            turns_failed: i.turns_failed.load(Ordering::Relaxed),
            instantiations: i.instantiations.load(Ordering::Relaxed),
            outbox_messages: i.outbox_len.load(Ordering::Relaxed),
            messages_delivered: i.messages_delivered.load(Ordering::Relaxed),
            dead_letters: i.dead_letters.load(Ordering::Relaxed),
            idempotency_keys: i.idempotency_len.load(Ordering::Relaxed),
        }
    }

    /// Stops accepting invocations and waits (up to the configured grace) for
    /// the ones in flight to finish.
    pub async fn drain(&self) {
        let inner = &self.inner;
        inner.shutting_down.store(true, Ordering::Release);
        let deadline = Instant::now() + Duration::from_millis(inner.cfg.shutdown_grace_ms);
        while inner.inflight.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let left = inner.inflight.load(Ordering::Acquire);
        if left > 0 {
            tracing::warn!(left, "shutdown grace expired with invocations still in flight");
        }
    }

    /// Runs `candidate`'s migration against up to `sample` existing entities of its
    /// type, each in a fresh instance, reading committed state and committing
    /// nothing: no other caller can observe a dry run. Entities are visited in id
    /// order; each takes a turn permit, so foreground turns keep their share.
    pub async fn dry_run_migration(
        &self,
        candidate: Arc<LoadedVersion>,
        sample: usize,
    ) -> Result<DryRunReport, InvokeError> {
        let inner = self.inner.clone();
        let sample = sample.min(DRY_RUN_MAX_SAMPLE);
        let store = inner.store.clone();
        let ty = candidate.type_name.clone();
        let ids =
            crate::determinism::blocking(move || crate::storage::entity_ids(store.as_ref(), &ty, "", None, sample))
                .await
                .map_err(|e| InvokeError::Internal(e.to_string()))?
                .map_err(|e| InvokeError::Internal(format!("listing entities: {e}")))?;
        let mut report = DryRunReport { has_migration: candidate.prepared.has_migration(), ..Default::default() };
        for id in ids {
            let entity = EntityRef { entity_type: candidate.type_name.clone(), id };
            let slot = inner.turn_slot().await?;
            let (inner2, candidate2, entity2) = (inner.clone(), candidate.clone(), entity.clone());
            let outcome = crate::determinism::blocking(move || inner2.dry_run_one(&candidate2, &entity2, slot))
                .await
                .map_err(|e| InvokeError::Internal(format!("dry-run thread failed: {e}")))?;
            report.sampled += 1;
            match outcome {
                Ok(None) => report.up_to_date += 1,
                Ok(Some(_)) => report.migrated += 1,
                Err((from, message)) => {
                    report.failed += 1;
                    if report.failures.len() < DRY_RUN_FAILURES_SHOWN {
                        report.failures.push((entity.id, from, message));
                    }
                }
            }
        }
        Ok(report)
    }

    /// Evicts instances idle longer than the configured timeout, forever.
    pub async fn run_idle_eviction(self) {
        let timeout = self.inner.cfg.idle_timeout_ms;
        let period = Duration::from_millis((timeout / 4).clamp(100, 10_000));
        loop {
            tokio::time::sleep(period).await;
            let evicted = self.inner.evict_idle(timeout);
            if evicted > 0 {
                tracing::debug!(evicted, "evicted idle instances");
            }
        }
    }
}

impl Inner {
    /// Counts a turn that ran (or was answered early) for Status and `/metrics`.
    fn count_turn(&self, ok: bool) {
        let m = crate::telemetry::metrics();
        let (counter, metric) = if ok { (&self.turns_ok, &m.turns_ok) } else { (&self.turns_failed, &m.turns_failed) };
        counter.fetch_add(1, Ordering::Relaxed);
        metric.inc();
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The leadership term in which this node runs `entity`'s turns now, or
    /// `None` if it does not (a single node always does, in epoch 0).
    fn epoch_of(&self, entity: &EntityRef) -> Option<u64> {
        match self.router.as_ref().map(|r| r.route(entity)) {
            None => Some(0),
            Some(Route::Here { epoch }) => Some(epoch),
            Some(_) => None,
        }
    }

    /// The entity's slot, created if needed; evicts least recently used idle
    /// slots beyond the resident bound.
    fn slot(&self, entity: &EntityRef) -> Arc<Slot> {
        let now = self.now_ms();
        let mut slots = self.slots.lock().expect("slots lock");
        if let Some(s) = slots.get(entity) {
            s.last_used_ms.store(now, Ordering::Relaxed);
            return s.clone();
        }
        let s = Arc::new(Slot {
            state: tokio::sync::Mutex::new(SlotState::default()),
            waiting: AtomicUsize::new(0),
            last_used_ms: AtomicU64::new(now),
        });
        slots.put(entity.clone(), s.clone());
        // Busy slots (someone else holds a clone) are skipped; the number of
        // attempts is bounded so a node full of busy entities stays cheap.
        let mut attempts = 0;
        while slots.len() > self.cfg.max_resident_instances && attempts < 16 {
            attempts += 1;
            let Some((k, v)) = slots.pop_lru() else { break };
            if Arc::strong_count(&v) > 1 || !v.evictable() {
                slots.put(k, v);
            } else {
                crate::telemetry::metrics().evictions.inc();
            }
        }
        s
    }

    fn evict_idle(&self, idle_ms: u64) -> usize {
        let now = self.now_ms();
        let mut slots = self.slots.lock().expect("slots lock");
        let victims: Vec<EntityRef> = slots
            .iter()
            .rev()
            .take(4096)
            .take_while(|(_, s)| now.saturating_sub(s.last_used_ms.load(Ordering::Relaxed)) >= idle_ms)
            .filter(|(_, s)| Arc::strong_count(s) == 1 && s.evictable())
            .map(|(k, _)| k.clone())
            .collect();
        for k in &victims {
            slots.pop(k);
        }
        crate::telemetry::metrics().evictions.inc_by(victims.len() as u64);
        victims.len()
    }

    /// A turn permit, as the slot a turn holds while it runs.
    async fn turn_slot(&self) -> Result<PermitSlot, InvokeError> {
        let permit =
            self.turn_permits.clone().acquire_owned().await.map_err(|e| InvokeError::Internal(e.to_string()))?;
        Ok(PermitSlot { permits: self.turn_permits.clone(), permit: Some(permit) })
    }

    /// Instantiates `prepared` for `entity`; when the node has no room (pool
    /// slots or guest memory), evicts idle warm instances and tries again.
    fn instantiate_with_room(
        &self,
        prepared: &crate::runtime::Prepared,
        entity: &EntityRef,
    ) -> Result<Instance, RuntimeError> {
        let mut tries = 0;
        loop {
            match self.runtime.instantiate(prepared, entity) {
                Err(RuntimeError::Exhausted { .. }) if tries < 3 => {
                    tries += 1;
                    let room = self.runtime.guest_memory().limit().saturating_sub(EVICT_HEADROOM_BYTES);
                    if self.evict_warm(room, EVICT_BATCH) == 0 {
                        return self.runtime.instantiate(prepared, entity);
                    }
                }
                other => return other,
            }
        }
    }

    /// Keeps the memory of warm instances under `scheduler.max_warm_memory_bytes`.
    fn bound_warm_memory(&self) {
        let limit = self.cfg.max_warm_memory_bytes as usize;
        if self.runtime.guest_memory().used() > limit {
            self.evict_warm(limit, 0);
        }
    }

    /// Evicts idle entities (their slots and warm instances), least recently
    /// used first, until the node's guest memory is at most `target_bytes` and
    /// at least `min_count` instances went (or no idle entity is left among
    /// the slots looked at). Returns how many instances went.
    fn evict_warm(&self, target_bytes: usize, min_count: usize) -> usize {
        let memory = self.runtime.guest_memory();
        let mut slots = self.slots.lock().expect("slots lock");
        let mut victims = Vec::new();
        let mut dropped = 0;
        for (entity, slot) in slots.iter().rev().take(EVICT_SCAN) {
            if memory.used() <= target_bytes && dropped >= min_count {
                break;
            }
            // Busy (a turn or a waiter holds it) or in doubt: it stays.
            if Arc::strong_count(slot) > 1 {
                continue;
            }
            let Ok(mut state) = slot.state.try_lock() else { continue };
            if state.in_doubt {
                continue;
            }
            // Dropped here, under the slot's lock, so the memory counts at once.
            if state.resident.take().is_some() {
                dropped += 1;
            }
            victims.push(entity.clone());
        }
        for entity in &victims {
            slots.pop(entity);
        }
        crate::telemetry::metrics().evictions.inc_by(dropped as u64);
        dropped
    }

    /// One entity of a dry run: `Ok(None)` if nothing to migrate, `Ok(Some(from))`
    /// if the migration succeeded, `Err((from, why))` if it failed.
    fn dry_run_one(
        &self,
        candidate: &LoadedVersion,
        entity: &EntityRef,
        slot: PermitSlot,
    ) -> Result<Option<u32>, (u32, String)> {
        let meta = MetaCache::load(self.store.as_ref(), entity).map_err(|e| (0, e.to_string()))?;
        let Some(from) = meta.stored.migrate_from(candidate.version) else { return Ok(None) };
        let mut instance =
            self.instantiate_with_room(&candidate.prepared, entity).map_err(|e| (from, e.to_string()))?;
        let seq = self.next_invocation.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{seq:x}-dry-run", self.invocation_prefix);
        instance
            .run_migration(from, id, wall_ms(), self.store.clone(), Box::new(slot))
            .map(|_| Some(from))
            .map_err(|e| (from, e.to_string()))
    }

    /// Commits a write set computed under `epoch`: fenced by it on a cluster;
    /// a single node's leadership never changes, so there is nothing to fence
    /// (its epoch 0 is no Raft term).
    fn commit_in(
        &self,
        ws: WriteSet,
        epoch: u64,
    ) -> futures::future::BoxFuture<'static, Result<crate::model::LogIndex, LogError>> {
        match self.router {
            Some(_) => self.log.propose_fenced(ws, epoch),
            None => self.log.propose(ws),
        }
    }

    /// On a cluster, confirms this node still leads the entity's shard in
    /// `epoch` before it answers from what it read; if not, drops the slot's
    /// instance and refuses with `NotHere` (nothing was written: always safe
    /// to retry on the current leader).
    async fn confirm_or_refuse(
        &self,
        entity: &EntityRef,
        epoch: u64,
        slot_state: &mut SlotState,
    ) -> Result<(), InvokeError> {
        if self.router.is_none() {
            return Ok(());
        }
        let Err(e) = self.log.confirm_lead(entity, epoch).await else { return Ok(()) };
        slot_state.resident = None;
        Err(match e {
            LogError::NotLeader { leader } => InvokeError::NotHere { leader },
            LogError::ShutDown => InvokeError::ShuttingDown,
            _ => InvokeError::NotHere { leader: None },
        })
    }

    /// Settles a slot in doubt before anything reads the store for it.
    /// The log is ordered: once an empty proposal made after the doubtful one
    /// has committed and applied, the doubtful one has either applied before
    /// it or will never commit. The barrier deletes a key no turn writes (an
    /// idempotency record under the empty key, which no caller may use) in
    /// the entity's shard.
    async fn resolve_doubt(&self, entity: &EntityRef, slot_state: &mut SlotState) -> Result<(), InvokeError> {
        if slot_state.in_doubt {
            let barrier = Op::Delete { keyspace: Keyspace::Idempotency, key: idempotency_key(entity, "") };
            self.log.propose(WriteSet { ops: vec![barrier] }).await.map_err(InvokeError::Commit)?;
            slot_state.in_doubt = false;
        }
        Ok(())
    }

    async fn run(self: Arc<Self>, inv: Invocation, invocation_id: String, epoch: u64) -> Result<Vec<u8>, InvokeError> {
        let slot = self.slot(&inv.entity);
        let depth = slot.waiting.fetch_add(1, Ordering::AcqRel);
        crate::telemetry::metrics().mailbox_depth.observe(depth as f64);
        let waiting = CountGuard(&slot.waiting);
        if depth >= self.cfg.mailbox_depth {
            return Err(InvokeError::MailboxFull { entity: inv.entity.to_string(), depth });
        }
        let mut slot_state = slot.state.lock().await;
        drop(waiting);
        // The turn may have waited in the mailbox while leadership moved
        // away (and maybe back): it runs only in the term it was routed in.
        if self.epoch_of(&inv.entity) != Some(epoch) {
            return Err(InvokeError::NotHere { leader: None });
        }
        // Another leader may have run turns of this entity since the slot was
        // filled: under a new term, start from the store.
        if slot_state.epoch != epoch {
            *slot_state = SlotState { epoch, in_doubt: slot_state.in_doubt, ..SlotState::default() };
        }
        self.resolve_doubt(&inv.entity, &mut slot_state).await?;
        // The version is read at the start of each turn: a deploy takes effect
        // between turns, and a turn in flight finishes on its version.
        let version = self.registry.version_for(&inv.entity).map_err(InvokeError::UnknownType)?;
        let warm = slot_state.resident.take().filter(|r| Arc::ptr_eq(&r.version, &version));
        let cached = slot_state.meta;
        let now_ms = wall_ms();
        // Hashed only when a key needs it: payloads may be a MiB.
        let idempotency =
            inv.idempotency_key.as_deref().map(|k| (k, crate::model::request_digest(&inv.operation, &inv.payload)));
        let input = TurnInput {
            operation: inv.operation,
            payload: inv.payload,
            invocation_id,
            caller: inv.caller.clone(),
            now_ms,
            next_seq: 0,
        };
        let guard = TurnGuard { idempotency, message_seq: inv.message_seq };
        let guard_keys = guard.keys(&inv.entity, inv.caller.as_ref());
        let guard_check = guard_keys.clone();
        let this = self.clone();
        let entity = inv.entity.clone();
        let to_version = version.version;
        let turn_slot = self.turn_slot().await?;
        let span = tracing::Span::current();
        let (back, meta, result) = crate::determinism::blocking(move || {
            let _span = span.enter();
            let meta = match cached {
                Some(m) => m,
                None => match MetaCache::load(this.store.as_ref(), &entity) {
                    Ok(m) => m,
                    Err(e) => return (warm, None, Err(e)),
                },
            };
            // Answered before any guest code runs: a retried key, a redelivered message.
            match guard_check.check(this.store.as_ref(), now_ms) {
                Ok(Some(early)) => return (warm, Some(meta), Ok(TurnResult::Early(early))),
                Ok(None) => {}
                Err(e) => return (warm, Some(meta), Err(e)),
            }
            let mut r = match warm {
                Some(r) => r,
                None => {
                    this.instantiations.fetch_add(1, Ordering::Relaxed);
                    crate::telemetry::metrics().activations.inc();
                    match this.instantiate_with_room(&version.prepared, &entity) {
                        Ok(instance) => Resident { version, instance, _count: ResidentCount::new(&this.resident) },
                        Err(e) => return (None, Some(meta), Err(InvokeError::Instantiate(e))),
                    }
                }
            };
            let migrate_from = meta.stored.migrate_from(to_version);
            let input = TurnInput { next_seq: meta.next_seq, ..input };
            let turn_started = Instant::now();
            let out = r.instance.run_turn(input, this.store.clone(), migrate_from, Box::new(turn_slot));
            crate::telemetry::metrics().turn_seconds.observe(turn_started.elapsed().as_secs_f64());
            let out = out.map_err(|e| match e {
                TurnError::MigrationFailed { from_version, cause } => {
                    InvokeError::MigrationFailed { entity: entity.to_string(), from_version, to_version, cause: *cause }
                }
                e => InvokeError::Turn(e),
            });
            // Only an instance whose turn is about to commit stays warm: a
            // failed turn's instance may remember what was not committed (and a
            // trapped one is unusable), and one that grew large gives its memory back.
            let keep = out.is_ok()
                && !r.instance.is_poisoned()
                && r.instance.memory_bytes() as u64 <= this.cfg.max_warm_instance_bytes;
            let back = keep.then_some(r);
            this.bound_warm_memory();
            (back, Some(meta), out.map(|o| TurnResult::Ran { output: o, migrated: migrate_from.is_some() }))
        })
        .await
        .map_err(|e| InvokeError::Internal(format!("turn thread failed: {e}")))?;
        slot_state.resident = back;
        slot_state.meta = meta;
        let (output, migrated) = match result {
            Ok(TurnResult::Early(reply)) => {
                self.count_turn(true);
                return Ok(reply);
            }
            Ok(TurnResult::Ran { output, migrated }) => (output, migrated),
            Err(e) => {
                self.count_turn(false);
                // An entity's refusal is an answer read from its state, like
                // a read's: a deposed leader's stale store could refuse what
                // the entity would accept (a message refused this way is
                // dead-lettered for good), so it too is given only once the
                // lead is confirmed.
                if matches!(e, InvokeError::Turn(_) | InvokeError::MigrationFailed { .. }) {
                    self.confirm_or_refuse(&inv.entity, epoch, &mut slot_state).await?;
                }
                return Err(e);
            }
        };
        let meta = meta.expect("meta is loaded whenever the turn ran");
        let effects = output.effects;
        let immediate = effects.sent.iter().filter(|m| m.due_at_ms.is_none()).count() as u64;
        let timers = effects.sent.len() as u64 - immediate;
        if immediate > 0 {
            let queued = self.outbox_len.load(Ordering::Relaxed);
            if queued + immediate > self.cfg.max_outbox_messages {
                self.count_turn(false);
                // Discarded after it ran: the instance may remember what was not committed.
                slot_state.resident = None;
                return Err(InvokeError::OutboxFull(queued));
            }
        }
        // The version is recorded with the first state this version commits (or
        // with its migration), never for an entity that has no state.
        let record_version = migrated || (!effects.writes.is_empty() && meta.stored != StoredVersion::At(to_version));
        let new_meta = MetaCache {
            stored: if record_version { StoredVersion::At(to_version) } else { meta.stored },
            next_seq: effects.next_seq,
        };
        let mut ops: Vec<Op> = effects
            .writes
            .into_iter()
            .map(|(k, v)| {
                let key = state_key(&inv.entity, &k);
                match v {
                    Some(value) => Op::Put { keyspace: Keyspace::State, key, value },
                    None => Op::Delete { keyspace: Keyspace::State, key },
                }
            })
            .collect();
        if new_meta != meta {
            let record = EntityMeta { version: new_meta.stored.version(), next_seq: new_meta.next_seq };
            ops.push(Op::Put {
                keyspace: Keyspace::EntityMeta,
                key: entity_prefix(&inv.entity),
                value: record.encode(),
            });
        }
        for m in effects.sent {
            let message = Message {
                sender: inv.entity.clone(),
                seq: m.seq,
                target: m.target,
                operation: m.operation,
                payload: m.payload,
            };
            match m.due_at_ms {
                None => ops.push(Op::Put {
                    keyspace: Keyspace::Outbox,
                    key: outbox_key(&inv.entity, m.seq),
                    value: message.encode(),
                }),
                Some(due) => {
                    ops.push(Op::Put {
                        keyspace: Keyspace::Timers,
                        key: timer_due_key(due, &inv.entity, m.seq),
                        value: message.encode(),
                    });
                    ops.push(Op::Put {
                        keyspace: Keyspace::Timers,
                        key: timer_id_key(&inv.entity, m.seq),
                        value: due.to_be_bytes().to_vec(),
                    });
                }
            }
        }
        for c in effects.cancelled {
            ops.push(Op::Delete { keyspace: Keyspace::Timers, key: timer_due_key(c.due_at_ms, &inv.entity, c.seq) });
            ops.push(Op::Delete { keyspace: Keyspace::Timers, key: timer_id_key(&inv.entity, c.seq) });
        }
        let stores_reply = guard_keys.record(&mut ops, &output.reply, now_ms, self.cfg.idempotency_retention_ms);
        if ops.is_empty() {
            // A read: answered only once this node is known to have led in
            // `epoch` after it read (a deposed leader cut off from the rest
            // would answer from a stale store).
            if let Err(e) = self.confirm_or_refuse(&inv.entity, epoch, &mut slot_state).await {
                self.count_turn(false);
                return Err(e);
            }
        }
        if !ops.is_empty() {
            // Fenced: if this node lost the lead while the turn ran and won
            // it again, the state it read may be stale and the write set is
            // skipped (the seeds' fencing token, with the term as token).
            if let Err(e) = self.commit_in(WriteSet { ops }, epoch).await {
                self.count_turn(false);
                if let LogError::Fenced { .. } = e {
                    // Nothing of the turn applied: a refusal the caller's
                    // node retries on the current leader.
                    *slot_state = SlotState::default();
                    return Err(InvokeError::NotHere { leader: None });
                }
                // The warm instance may hold state the store does not have, and
                // whether the write set lands is unknown (unless it was never
                // queued): reload both, after the outcome is known.
                let in_doubt = !e.never_written();
                *slot_state = SlotState { epoch, in_doubt, ..SlotState::default() };
                return Err(InvokeError::Commit(e));
            }
            slot_state.meta = Some(new_meta);
        }
        drop(slot_state);
        if immediate > 0 {
            self.outbox_len.fetch_add(immediate, Ordering::Relaxed);
            self.outbox_ready.notify_one();
        }
        if timers > 0 {
            self.timers_changed.notify_one();
        }
        if stores_reply {
            self.idempotency_len.fetch_add(1, Ordering::Relaxed);
        }
        self.count_turn(true);
        Ok(output.reply)
    }
}

/// How a turn ended when it did not fail.
enum TurnResult {
    /// Answered without running: a stored idempotent reply, or an already
    /// processed message (empty reply).
    Early(Vec<u8>),
    Ran {
        output: crate::runtime::TurnOutput,
        migrated: bool,
    },
}

/// What makes an invocation safe to retry: a client's idempotency key, or the
/// id of the message being delivered.
struct TurnGuard<'a> {
    /// The client's key and the call's [`request_digest`](crate::model::request_digest).
    idempotency: Option<(&'a str, [u8; 32])>,
    message_seq: Option<u64>,
}

/// [`TurnGuard`] resolved to store keys.
#[derive(Clone)]
struct GuardKeys {
    /// The idempotency record's key, the client's key and the call's digest.
    idempotency: Option<(Vec<u8>, String, [u8; 32])>,
    /// The inbox key of (receiver, sender) and the message's sequence.
    inbox: Option<(Vec<u8>, u64)>,
    entity: String,
}

impl TurnGuard<'_> {
    fn keys(&self, entity: &EntityRef, caller: Option<&EntityRef>) -> GuardKeys {
        GuardKeys {
            idempotency: self.idempotency.map(|(k, request)| (idempotency_key(entity, k), k.to_owned(), request)),
            inbox: match (self.message_seq, caller) {
                (Some(seq), Some(sender)) => Some((inbox_key(entity, sender), seq)),
                _ => None,
            },
            entity: entity.to_string(),
        }
    }
}

impl GuardKeys {
    /// The answer if this invocation already happened: the stored reply of its
    /// idempotency key (unless expired), or an empty reply for a message whose
    /// sequence the receiver has processed (one sender's messages arrive in order).
    /// A key first used for another call is refused, not answered.
    fn check(&self, store: &dyn StateStore, now_ms: u64) -> Result<Option<Vec<u8>>, InvokeError> {
        let internal = |e: &dyn std::fmt::Display| InvokeError::Internal(format!("reading turn guard: {e}"));
        if let Some((key, client_key, request)) = &self.idempotency
            && let Some(bytes) = store.get(Keyspace::Idempotency, key).map_err(|e| internal(&e))?
        {
            let stored = IdempotentReply::decode(&bytes).map_err(|e| internal(&e))?;
            if stored.expires_at_ms > now_ms {
                if stored.request.is_some_and(|r| r != *request) {
                    return Err(InvokeError::IdempotencyKeyReused {
                        entity: self.entity.clone(),
                        key: client_key.clone(),
                    });
                }
                return Ok(Some(stored.reply));
            }
        }
        if let Some((key, seq)) = &self.inbox
            && let Some(bytes) = store.get(Keyspace::Inbox, key).map_err(|e| internal(&e))?
        {
            let last = u64::from_le_bytes(bytes.as_slice().try_into().map_err(|_| internal(&"bad inbox record"))?);
            if *seq <= last {
                return Ok(Some(Vec::new()));
            }
        }
        Ok(None)
    }

    /// Adds the records that make a retry of this turn answer early; returns
    /// whether it stored an idempotent reply.
    fn record(&self, ops: &mut Vec<Op>, reply: &[u8], now_ms: u64, retention_ms: u64) -> bool {
        if let Some((key, seq)) = &self.inbox {
            ops.push(Op::Put { keyspace: Keyspace::Inbox, key: key.clone(), value: seq.to_le_bytes().to_vec() });
        }
        let Some((key, _, request)) = &self.idempotency else { return false };
        let expires_at_ms = now_ms.saturating_add(retention_ms);
        let value = IdempotentReply { expires_at_ms, reply: reply.to_vec(), request: Some(*request) }.encode();
        ops.push(Op::Put { keyspace: Keyspace::Idempotency, key: key.clone(), value });
        ops.push(Op::Put {
            keyspace: Keyspace::Idempotency,
            key: idempotency_expiry_key(expires_at_ms, key),
            value: Vec::new(),
        });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_calls_that_did_not_run_or_are_deduplicated_are_retried() {
        let remote = |kind| InvokeError::Remote { kind, code: 14, message: String::new() };
        let never_ran = [
            InvokeError::NotHere { leader: Some(2) },
            InvokeError::NoLeader("election".into()),
            InvokeError::Unreachable { node: 2, message: "refused".into() },
            remote("shutting-down"),
        ];
        for e in &never_ran {
            assert!(e.is_retryable(false) && e.is_retryable(true), "{e:?}");
        }
        let unknown_outcome = [
            InvokeError::Commit(LogError::NotLeader { leader: None }),
            InvokeError::Lost { node: 2, message: "reset".into() },
            remote("commit"),
        ];
        for e in &unknown_outcome {
            assert!(!e.is_retryable(false) && e.is_retryable(true), "{e:?}");
        }
        let answered = [remote("failed"), InvokeError::Turn(TurnError::Failed("no".into())), InvokeError::BadOperation];
        for e in &answered {
            assert!(!e.is_retryable(true), "{e:?}");
        }
        // A kind received from another node keeps its meaning.
        assert!(remote("failed").is_permanent() && !remote("timeout").is_permanent());
        assert!(ERROR_KINDS.contains(&InvokeError::NotHere { leader: None }.kind()));
    }
}
