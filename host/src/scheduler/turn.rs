//! One invocation, top to bottom. [`Scheduler::invoke_here_as`] numbers it
//! and records how it ended; [`Scheduler::invoke_as`] admits it to the node
//! (shutdown, validation, the type loaded, the in-flight bound) and gives it
//! its own task; [`Inner::run`] is the turn itself, in the order a reader
//! follows it:
//!
//! 1. [`admit`](Inner::admit): a place in the entity's mailbox, then its lock;
//! 2. [`route`](Inner::route): still this node's turn, in the term it was
//!    routed in, with any doubt about an earlier commit settled;
//! 3. [`turn`](Inner::turn): the version to run, the guards (a retried key, a
//!    redelivered message), then the guest on a blocking thread;
//! 4. [`write_set`](Inner::write_set): its writes, meta, messages, timers and
//!    guard records as one write set;
//! 5. [`commit`](Inner::commit): the write set through the log, fenced by the
//!    term (or, for a read, the lead confirmed);
//! 6. [`reply`](Inner::reply): wake the loops that have work, count, answer.

use super::guard::{GuardKeys, TurnGuard};
use super::meta::{MetaCache, StoredVersion};
use super::warm::{Resident, ResidentCount, Slot, SlotState};
use super::{
    CountGuard, ErrorKind, InflightGuard, Inner, Invocation, InvokeError, RECENT_ERRORS, RecentError, Route, Scheduler,
    valid_operation, wall_ms,
};
use crate::log::LogError;
use crate::model::{
    EntityMeta, EntityRef, Keyspace, Message, Op, Record, WriteSet, entity_prefix, idempotency_key, outbox_key,
    state_key, timer_due_key, timer_id_key,
};
use crate::runtime::{TurnError, TurnInput, TurnOutput};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::time::Instant;
use tracing::Instrument;

/// A turn's permit as the runtime's [`TurnSlot`](crate::runtime::TurnSlot):
/// given back while the guest waits in a host call, taken again after.
pub(super) struct PermitSlot {
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

/// How [`Inner::turn`] ended when it did not fail.
enum Turn {
    /// Answered without running: a stored idempotent reply, or an already
    /// processed message (empty reply).
    Early(Vec<u8>),
    Ran(Ran),
}

/// A turn that ran and is to be committed.
struct Ran {
    output: TurnOutput,
    /// Its migration ran first.
    migrated: bool,
    /// The entity's meta as the turn started.
    meta: MetaCache,
    /// The version it ran.
    version: u32,
    guard_keys: GuardKeys,
    now_ms: u64,
}

/// What follows a turn's commit: the slot's new meta, the reply, and the
/// loops to wake.
struct AfterCommit {
    meta: MetaCache,
    reply: Vec<u8>,
    /// Messages to deliver now, and timers set.
    immediate: u64,
    timers: u64,
    stores_reply: bool,
}

impl Scheduler {
    /// Runs `inv` here in the term `epoch`: numbers it, runs it in its span,
    /// and records how it ended (metrics, the recent failures).
    pub(super) async fn invoke_here_as(&self, inv: Invocation, epoch: u64) -> Result<Vec<u8>, InvokeError> {
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
        let result = match result {
            Err(InvokeError::Internal(m)) if self.inner.router.route(&entity_ref) != (Route::Here { epoch }) => {
                tracing::debug!(entity = %entity_ref, "the shard moved during the turn: {m}");
                Err(InvokeError::NotHere { leader: None })
            }
            result => result,
        };
        let m = crate::telemetry::metrics();
        m.invocation_seconds.observe(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            let kind = e.kind();
            m.errors.with_label_values(&[kind.as_str()]).inc();
            if let InvokeError::Turn(TurnError::Trapped { kind, .. }) = e {
                m.traps.with_label_values(&[ErrorKind::from(*kind).as_str()]).inc();
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

    /// Admits `inv` to the node (not shutting down, a valid operation and
    /// key, its type loaded, under `max_inflight_invocations`) and runs its
    /// turn in a task of its own.
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
}

impl Inner {
    /// A turn permit, as the slot a turn holds while it runs.
    pub(super) async fn turn_slot(&self) -> Result<PermitSlot, InvokeError> {
        let permit =
            self.turn_permits.clone().acquire_owned().await.map_err(|e| InvokeError::Internal(e.to_string()))?;
        Ok(PermitSlot { permits: self.turn_permits.clone(), permit: Some(permit) })
    }

    /// Settles a slot in doubt before anything reads the store for it.
    /// The log is ordered: once an empty proposal made after the doubtful one
    /// has committed and applied, the doubtful one has either applied before
    /// it or will never commit. The barrier deletes a key no turn writes (an
    /// idempotency record under the empty key, which no caller may use) in
    /// the entity's shard.
    pub(super) async fn resolve_doubt(
        &self,
        entity: &EntityRef,
        slot_state: &mut SlotState,
    ) -> Result<(), InvokeError> {
        if slot_state.in_doubt {
            let barrier = Op::Delete { keyspace: Keyspace::Idempotency, key: idempotency_key(entity, "") };
            self.log.propose(WriteSet { ops: vec![barrier] }).await.map_err(InvokeError::Commit)?;
            slot_state.in_doubt = false;
        }
        Ok(())
    }

    /// The turn of one invocation on this node, in the term `epoch` it was
    /// routed in: the steps below, in order.
    pub(super) async fn run(
        self: Arc<Self>,
        inv: Invocation,
        invocation_id: String,
        epoch: u64,
    ) -> Result<Vec<u8>, InvokeError> {
        let entity = inv.entity.clone();
        let slot = self.slot(&entity);
        let mut slot_state = self.admit(&slot, &entity).await?;
        self.route(&entity, epoch, &mut slot_state).await?;
        let ran = match self.turn(inv, invocation_id, epoch, &mut slot_state).await? {
            Turn::Early(reply) => return Ok(reply),
            Turn::Ran(ran) => ran,
        };
        let (ops, after) = self.write_set(&entity, ran, &mut slot_state)?;
        self.commit(&entity, epoch, ops, after.meta, &mut slot_state).await?;
        drop(slot_state);
        Ok(self.reply(after))
    }

    /// Admits the invocation to the entity's mailbox (refused when
    /// `mailbox_depth` callers wait already) and waits for its lock, which
    /// the turn holds until its write set is applied.
    async fn admit<'a>(
        &self,
        slot: &'a Slot,
        entity: &EntityRef,
    ) -> Result<tokio::sync::MutexGuard<'a, SlotState>, InvokeError> {
        let depth = slot.waiting.fetch_add(1, Ordering::AcqRel);
        crate::telemetry::metrics().mailbox_depth.observe(depth as f64);
        let waiting = CountGuard(&slot.waiting);
        if depth >= self.cfg.mailbox_depth {
            return Err(InvokeError::MailboxFull { entity: entity.to_string(), depth });
        }
        let slot_state = slot.state.lock().await;
        drop(waiting);
        Ok(slot_state)
    }

    /// Checks the turn still runs here in `epoch` and readies the slot for it.
    async fn route(&self, entity: &EntityRef, epoch: u64, slot_state: &mut SlotState) -> Result<(), InvokeError> {
        // The turn may have waited in the mailbox while leadership moved
        // away (and maybe back): it runs only in the term it was routed in.
        if self.epoch_of(entity) != Some(epoch) {
            return Err(InvokeError::NotHere { leader: None });
        }
        // Another leader may have run turns of this entity since the slot was
        // filled: under a new term, start from the store.
        if slot_state.epoch != epoch {
            *slot_state = SlotState { epoch, in_doubt: slot_state.in_doubt, ..SlotState::default() };
        }
        self.resolve_doubt(entity, slot_state).await
    }

    /// Runs the guest, unless a guard answers first. The slot gets back the
    /// instance (if it may stay warm) and the meta it read. A failed turn is
    /// counted here; an entity's refusal is answered only once the lead is
    /// confirmed.
    async fn turn(
        self: &Arc<Self>,
        inv: Invocation,
        invocation_id: String,
        epoch: u64,
        slot_state: &mut SlotState,
    ) -> Result<Turn, InvokeError> {
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
            match guard_keys.check(this.store.as_ref(), now_ms) {
                Ok(Some(early)) => return (warm, Some(meta), Ok(Turn::Early(early))),
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
            let ran = |output| {
                Turn::Ran(Ran {
                    output,
                    migrated: migrate_from.is_some(),
                    meta,
                    version: to_version,
                    guard_keys,
                    now_ms,
                })
            };
            (back, Some(meta), out.map(ran))
        })
        .await
        .map_err(|e| InvokeError::Internal(format!("turn thread failed: {e}")))?;
        slot_state.resident = back;
        slot_state.meta = meta;
        match result {
            Ok(Turn::Early(reply)) => {
                self.count_turn(true);
                Ok(Turn::Early(reply))
            }
            Ok(ran) => Ok(ran),
            Err(e) => {
                self.count_turn(false);
                // An entity's refusal is an answer read from its state, like
                // a read's: a deposed leader's stale store could refuse what
                // the entity would accept (a message refused this way is
                // dead-lettered for good), so it too is given only once the
                // lead is confirmed.
                if matches!(e, InvokeError::Turn(_) | InvokeError::MigrationFailed { .. }) {
                    self.confirm_or_refuse(&inv.entity, epoch, slot_state).await?;
                }
                Err(e)
            }
        }
    }

    /// The write set of a turn that ran: its state writes, the entity's meta
    /// if it changed, its messages (outbox) and timers, and the guard records
    /// that make a retry answer early. Refuses (and drops the instance) when
    /// the node's outbox has no room for its messages.
    fn write_set(
        &self,
        entity: &EntityRef,
        ran: Ran,
        slot_state: &mut SlotState,
    ) -> Result<(Vec<Op>, AfterCommit), InvokeError> {
        let Ran { output, migrated, meta, version: to_version, guard_keys, now_ms } = ran;
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
                let key = state_key(entity, &k);
                match v {
                    Some(value) => Op::Put { keyspace: Keyspace::State, key, value },
                    None => Op::Delete { keyspace: Keyspace::State, key },
                }
            })
            .collect();
        if new_meta != meta {
            let record = EntityMeta { version: new_meta.stored.version(), next_seq: new_meta.next_seq };
            ops.push(Op::Put { keyspace: Keyspace::EntityMeta, key: entity_prefix(entity), value: record.encode() });
        }
        for m in effects.sent {
            let message = Message {
                sender: entity.clone(),
                seq: m.seq,
                target: m.target,
                operation: m.operation,
                payload: m.payload,
            };
            match m.due_at_ms {
                None => ops.push(Op::Put {
                    keyspace: Keyspace::Outbox,
                    key: outbox_key(entity, m.seq),
                    value: message.encode(),
                }),
                Some(due) => {
                    ops.push(Op::Put {
                        keyspace: Keyspace::Timers,
                        key: timer_due_key(due, entity, m.seq),
                        value: message.encode(),
                    });
                    ops.push(Op::Put {
                        keyspace: Keyspace::Timers,
                        key: timer_id_key(entity, m.seq),
                        value: due.to_be_bytes().to_vec(),
                    });
                }
            }
        }
        for c in effects.cancelled {
            ops.push(Op::Delete { keyspace: Keyspace::Timers, key: timer_due_key(c.due_at_ms, entity, c.seq) });
            ops.push(Op::Delete { keyspace: Keyspace::Timers, key: timer_id_key(entity, c.seq) });
        }
        let stores_reply = guard_keys.record(&mut ops, &output.reply, now_ms, self.cfg.idempotency_retention_ms);
        Ok((ops, AfterCommit { meta: new_meta, reply: output.reply, immediate, timers, stores_reply }))
    }

    /// Commits the write set, fenced by `epoch`; a turn that wrote nothing
    /// (a read) instead confirms this node still leads. On success the slot
    /// caches `new_meta`; on failure it is reset (and marked in doubt when the
    /// write set may still commit).
    async fn commit(
        &self,
        entity: &EntityRef,
        epoch: u64,
        ops: Vec<Op>,
        new_meta: MetaCache,
        slot_state: &mut SlotState,
    ) -> Result<(), InvokeError> {
        if ops.is_empty() {
            // A read: answered only once this node is known to have led in
            // `epoch` after it read (a deposed leader cut off from the rest
            // would answer from a stale store).
            if let Err(e) = self.confirm_or_refuse(entity, epoch, slot_state).await {
                self.count_turn(false);
                return Err(e);
            }
            return Ok(());
        }
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
        Ok(())
    }

    /// After the commit (and the mailbox lock released): wakes the deliverer
    /// and the timer loop if the turn gave them work, counts, and answers.
    fn reply(&self, after: AfterCommit) -> Vec<u8> {
        if after.immediate > 0 {
            self.outbox_len.fetch_add(after.immediate, Ordering::Relaxed);
            self.outbox_ready.notify_one();
        }
        if after.timers > 0 {
            self.timers_changed.notify_one();
        }
        if after.stores_reply {
            self.idempotency_len.fetch_add(1, Ordering::Relaxed);
        }
        self.count_turn(true);
        after.reply
    }
}
