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

use crate::config::SchedulerConfig;
use crate::log::{CommitLog, LogError};
use crate::model::{
    EntityRef, Keyspace, Op, WriteSet, decode_entity_version, encode_entity_version, entity_prefix, state_key,
};
use crate::registry::{LoadedVersion, Registry, RegistryError};
use crate::runtime::{Instance, Runtime, RuntimeError, TurnError, TurnInput};
use crate::storage::StateStore;
use lru::LruCache;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
}

struct Slot {
    /// The mailbox: held for a whole turn, execution to commit.
    state: tokio::sync::Mutex<SlotState>,
    waiting: AtomicUsize,
    last_used_ms: AtomicU64,
}

#[derive(Default)]
struct SlotState {
    resident: Option<Resident>,
    /// Which version last committed the entity's state; `None` until read from the store.
    stored: Option<StoredVersion>,
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
    /// Reads it from the store (the entity's meta record, else whether it has state).
    fn load(store: &dyn StateStore, entity: &EntityRef) -> Result<Self, crate::storage::StorageError> {
        let prefix = entity_prefix(entity);
        if let Some(v) = store.get(Keyspace::EntityMeta, &prefix)?.as_deref().and_then(decode_entity_version) {
            return Ok(StoredVersion::At(v));
        }
        let any = store.scan(Keyspace::State, &prefix, None, 1)?;
        Ok(if any.is_empty() { StoredVersion::Fresh } else { StoredVersion::Unrecorded })
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
    pub inflight_invocations: usize,
    pub turns_ok: u64,
    pub turns_failed: u64,
    pub instantiations: u64,
}

struct Inner {
    runtime: Arc<Runtime>,
    registry: Arc<Registry>,
    store: Arc<dyn StateStore>,
    log: Arc<dyn CommitLog>,
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
    /// (page faults and allocator locks of many instantiations at once).
    turn_permits: tokio::sync::Semaphore,
}

#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

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
        Self {
            inner: Arc::new(Inner {
                runtime,
                registry,
                store,
                log,
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
                turn_permits: tokio::sync::Semaphore::new(cfg.turn_threads()),
            }),
        }
    }

    /// Runs one invocation as a turn and returns its reply once the turn's
    /// writes are durable.
    pub async fn invoke(&self, inv: Invocation) -> Result<Vec<u8>, InvokeError> {
        let inner = &self.inner;
        if inner.shutting_down.load(Ordering::Acquire) {
            return Err(InvokeError::ShuttingDown);
        }
        if !valid_operation(&inv.operation) {
            return Err(InvokeError::BadOperation);
        }
        if !inner.registry.exists(&inv.entity.entity_type) {
            return Err(InvokeError::UnknownType(RegistryError::UnknownType(inv.entity.entity_type)));
        }
        let n = inner.inflight.fetch_add(1, Ordering::AcqRel);
        let inflight = InflightGuard(inner.clone());
        if n >= inner.cfg.max_inflight_invocations {
            return Err(InvokeError::Overloaded(n));
        }
        // The guard moves into the task: a turn whose caller went away still
        // counts as in flight until it has committed, so drain waits for it.
        let task_inner = inner.clone();
        tokio::spawn(async move {
            let _inflight = inflight;
            task_inner.run(inv).await
        })
        .await
        .map_err(|e| InvokeError::Internal(format!("turn task failed: {e}")))?
    }

    pub fn stats(&self) -> SchedulerStats {
        let i = &self.inner;
        SchedulerStats {
            active_entities: i.slots.lock().expect("slots lock").len(),
            resident_instances: i.resident.load(Ordering::Relaxed),
            inflight_invocations: i.inflight.load(Ordering::Relaxed),
            turns_ok: i.turns_ok.load(Ordering::Relaxed),
            turns_failed: i.turns_failed.load(Ordering::Relaxed),
            instantiations: i.instantiations.load(Ordering::Relaxed),
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
        let ids = tokio::task::spawn_blocking(move || crate::storage::entity_ids(store.as_ref(), &ty, None, sample))
            .await
            .map_err(|e| InvokeError::Internal(e.to_string()))?
            .map_err(|e| InvokeError::Internal(format!("listing entities: {e}")))?;
        let mut report = DryRunReport { has_migration: candidate.prepared.has_migration(), ..Default::default() };
        for id in ids {
            let entity = EntityRef { entity_type: candidate.type_name.clone(), id };
            let permit = inner.turn_permits.acquire().await.map_err(|e| InvokeError::Internal(e.to_string()))?;
            let (inner2, candidate2, entity2) = (inner.clone(), candidate.clone(), entity.clone());
            let outcome = tokio::task::spawn_blocking(move || inner2.dry_run_one(&candidate2, &entity2))
                .await
                .map_err(|e| InvokeError::Internal(format!("dry-run thread failed: {e}")))?;
            drop(permit);
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
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
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
            if Arc::strong_count(&v) > 1 {
                slots.put(k, v);
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
            .filter(|(_, s)| Arc::strong_count(s) == 1)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &victims {
            slots.pop(k);
        }
        victims.len()
    }

    /// One entity of a dry run: `Ok(None)` if nothing to migrate, `Ok(Some(from))`
    /// if the migration succeeded, `Err((from, why))` if it failed.
    fn dry_run_one(&self, candidate: &LoadedVersion, entity: &EntityRef) -> Result<Option<u32>, (u32, String)> {
        let stored = StoredVersion::load(self.store.as_ref(), entity).map_err(|e| (0, format!("reading meta: {e}")))?;
        let Some(from) = stored.migrate_from(candidate.version) else { return Ok(None) };
        let mut instance = self.runtime.instantiate(&candidate.prepared, entity).map_err(|e| (from, e.to_string()))?;
        let seq = self.next_invocation.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{seq:x}-dry-run", self.invocation_prefix);
        instance
            .run_migration(from, id, wall_ms(), self.store.clone())
            .map(|_| Some(from))
            .map_err(|e| (from, e.to_string()))
    }

    async fn run(self: Arc<Self>, inv: Invocation) -> Result<Vec<u8>, InvokeError> {
        let slot = self.slot(&inv.entity);
        let depth = slot.waiting.fetch_add(1, Ordering::AcqRel);
        let waiting = CountGuard(&slot.waiting);
        if depth >= self.cfg.mailbox_depth {
            return Err(InvokeError::MailboxFull { entity: inv.entity.to_string(), depth });
        }
        let mut slot_state = slot.state.lock().await;
        drop(waiting);
        // The version is read at the start of each turn: a deploy takes effect
        // between turns, and a turn in flight finishes on its version.
        let version = self.registry.version_for(&inv.entity).map_err(InvokeError::UnknownType)?;
        let warm = slot_state.resident.take().filter(|r| Arc::ptr_eq(&r.version, &version));
        let stored = slot_state.stored;
        let seq = self.next_invocation.fetch_add(1, Ordering::Relaxed);
        let input = TurnInput {
            operation: inv.operation,
            payload: inv.payload,
            invocation_id: format!("{}-{seq:x}", self.invocation_prefix),
            caller: inv.caller,
            now_ms: wall_ms(),
        };
        let this = self.clone();
        let entity = inv.entity.clone();
        let to_version = version.version;
        let permit = self.turn_permits.acquire().await.map_err(|e| InvokeError::Internal(e.to_string()))?;
        let (back, stored, result) = tokio::task::spawn_blocking(move || {
            let stored = match stored {
                Some(s) => s,
                None => match StoredVersion::load(this.store.as_ref(), &entity) {
                    Ok(s) => s,
                    Err(e) => return (warm, None, Err(InvokeError::Internal(format!("reading entity meta: {e}")))),
                },
            };
            let mut r = match warm {
                Some(r) => r,
                None => {
                    this.instantiations.fetch_add(1, Ordering::Relaxed);
                    match this.runtime.instantiate(&version.prepared, &entity) {
                        Ok(instance) => Resident { version, instance, _count: ResidentCount::new(&this.resident) },
                        Err(e) => return (None, Some(stored), Err(InvokeError::Instantiate(e))),
                    }
                }
            };
            let migrate_from = stored.migrate_from(to_version);
            let out = r.instance.run_turn(input, this.store.clone(), migrate_from).map_err(|e| match e {
                TurnError::MigrationFailed { from_version, cause } => {
                    InvokeError::MigrationFailed { entity: entity.to_string(), from_version, to_version, cause: *cause }
                }
                e => InvokeError::Turn(e),
            });
            let back = if r.instance.is_poisoned() { None } else { Some(r) };
            (back, Some(stored), out.map(|o| (o, migrate_from.is_some())))
        })
        .await
        .map_err(|e| InvokeError::Internal(format!("turn thread failed: {e}")))?;
        drop(permit);
        slot_state.resident = back;
        slot_state.stored = stored;
        let (output, migrated) = match result {
            Ok(o) => o,
            Err(e) => {
                self.turns_failed.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        // The version is recorded with the first state this version commits (or
        // with its migration), never for an entity that has no state.
        let record_version = migrated || (!output.writes.is_empty() && stored != Some(StoredVersion::At(to_version)));
        if !output.writes.is_empty() || record_version {
            let mut ops: Vec<Op> = output
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
            if record_version {
                ops.push(Op::Put {
                    keyspace: Keyspace::EntityMeta,
                    key: entity_prefix(&inv.entity),
                    value: encode_entity_version(to_version),
                });
            }
            if let Err(e) = self.log.propose(WriteSet { ops }).await {
                self.turns_failed.fetch_add(1, Ordering::Relaxed);
                // The warm instance may hold state the store does not have, and
                // whether the version record landed is unknown: reload both.
                *slot_state = SlotState::default();
                return Err(InvokeError::Commit(e));
            }
            if record_version {
                slot_state.stored = Some(StoredVersion::At(to_version));
            }
        }
        self.turns_ok.fetch_add(1, Ordering::Relaxed);
        Ok(output.reply)
    }
}
