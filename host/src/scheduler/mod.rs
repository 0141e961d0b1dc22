//! The scheduler: per-entity mailboxes so turns of one entity never overlap
//! while different entities run in parallel, a bounded cache of warm instances
//! (LRU + idle eviction), and the turn pipeline: run the guest on a blocking
//! thread, commit its write set through the log, then reply. This file owns
//! the [`Scheduler`] handle, its shared state ([`Inner`]), construction, the
//! counters and drain; each concern has its own file:
//!
//! - [`error`]: the error kinds and [`InvokeError`];
//! - [`route`]: the [`Router`] port, finding the shard's leader, fencing;
//! - [`turn`]: one invocation top to bottom — admit → route → turn → write set
//!   → commit → reply;
//! - [`guard`]: idempotency keys and message dedup, checked before a turn runs;
//! - [`meta`]: what a slot remembers of the entity's stored version and sequence;
//! - [`warm`]: the mailboxes ([`Slot`]s) and the warm-instance cache;
//! - [`dry_run`]: migration dry runs;
//! - [`outbox`], [`delivery`], [`timers`], [`sweeper`]: the background loops.
//!
//! Each entity has a [`Slot`]: a bounded mailbox (invocations in arrival
//! order, each with the channel its answer goes to; at most `mailbox_depth`)
//! and a lock. The task that holds the lock runs what waits in the mailbox as
//! one batch — the turns one after another, each reading the earlier ones'
//! uncommitted writes — commits their write sets as one, and answers each
//! (see [`turn`]); the next batch therefore reads committed state. Every
//! invocation runs in its own task, so a caller that goes away cannot cut a
//! batch between its execution and its commit.
//!
//! Hot swap: the version a turn runs is read from the registry when the turn
//! starts, so a turn in flight finishes on its version and a warm instance of an
//! older version is replaced between turns. The slot remembers which version last
//! committed the entity's state (keyspace `EntityMeta`); when that differs from the
//! version about to run, the guest's migration runs first, in the same turn, and
//! the new version number is committed with the turn's writes — so each entity
//! migrates lazily and exactly once per version change.

mod admission;
mod delivery;
mod dry_run;
mod error;
mod guard;
mod meta;
mod outbox;
mod route;
mod sweeper;
mod timers;
mod turn;
mod warm;

pub use dry_run::{DRY_RUN_MAX_SAMPLE, DryRunReport};
pub use error::{Disposition, ErrorKind, Invocation, InvokeError, Retry, UnknownKind, http_status_of_code};
pub use route::{Route, Router};

use crate::config::SchedulerConfig;
use crate::log::CommitLog;
use crate::registry::Registry;
use crate::runtime::Runtime;
use crate::storage::StateStore;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// Failed invocations the node remembers for its dashboard.
const RECENT_ERRORS: usize = 64;

/// One failed invocation.
#[derive(Debug, Clone)]
pub struct RecentError {
    /// Unix milliseconds.
    pub at_ms: u64,
    pub entity: String,
    pub operation: String,
    pub invocation_id: String,
    pub kind: ErrorKind,
    pub message: String,
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
    /// Replies that arrived after their ask was settled (see
    /// `conflux_ask_replies_dropped_total`).
    pub ask_replies_dropped: u64,
}

struct Inner {
    runtime: Arc<Runtime>,
    registry: Arc<Registry>,
    store: Arc<dyn StateStore>,
    log: Arc<dyn CommitLog>,
    router: Arc<dyn Router>,
    cfg: SchedulerConfig,
    /// Write-set bytes a batch of turns may hold and still take another turn
    /// ([`Config::commit_room_bytes`](crate::config::Config::commit_room_bytes)).
    commit_room_bytes: usize,
    slots: Mutex<warm::Slots>,
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
    ask_replies_dropped: AtomicU64,
    /// The last [`RECENT_ERRORS`] failed invocations, oldest first.
    recent_errors: Mutex<std::collections::VecDeque<RecentError>>,
}

#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

use crate::model::unix_ms as wall_ms;

impl Scheduler {
    /// `router` says which entities' turns run here (this node leads their
    /// shard) and forwards the others.
    /// `commit_room_bytes`: see [`Config::commit_room_bytes`](crate::config::Config::commit_room_bytes),
    /// the one number the scheduler needs from other modules' slices.
    pub fn new(
        cfg: &SchedulerConfig,
        commit_room_bytes: usize,
        runtime: Arc<Runtime>,
        registry: Arc<Registry>,
        store: Arc<dyn StateStore>,
        log: Arc<dyn CommitLog>,
        router: Arc<dyn Router>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                runtime,
                registry,
                store,
                log,
                router,
                cfg: cfg.clone(),
                commit_room_bytes,
                slots: Mutex::new(warm::Slots::new(cfg.max_resident_instances)),
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
                ask_replies_dropped: AtomicU64::new(0),
                recent_errors: Mutex::new(std::collections::VecDeque::with_capacity(RECENT_ERRORS)),
            }),
        }
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
            ask_replies_dropped: i.ask_replies_dropped.load(Ordering::Relaxed),
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
}

#[cfg(test)]
pub(crate) mod test_support;
