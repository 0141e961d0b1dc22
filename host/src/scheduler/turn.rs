//! One invocation, top to bottom. [`Scheduler::invoke_here_as`] numbers it
//! and records how it ended; [`Scheduler::invoke_as`] admits it to the node
//! (shutdown, validation, the type loaded, the in-flight bound) and gives it
//! its own task; [`Inner::run`] is the turn itself, in the order a reader
//! follows it:
//!
//! 1. [`admit`](Inner::admit): a place in the entity's mailbox, then either
//!    the answer (another invocation's task ran it) or the entity's lock;
//! 2. [`route`](Inner::route): still this node's turn, in the term it was
//!    routed in, with any doubt about an earlier commit settled;
//! 3. [`turn`](Inner::turn): the version to run, the guards (a retried key, a
//!    redelivered message), then the guest, in this task;
//! 4. [`write_set`](Inner::write_set): its writes, meta, messages, timers and
//!    guard records as one write set;
//! 5. [`commit`](Inner::commit): the write set through the log, fenced by the
//!    term (or, for a read, the lead confirmed);
//! 6. [`reply`](Inner::reply): wake the loops that have work, count, answer.
//!
//! Group commit per entity: the lock's holder runs every invocation waiting
//! in the mailbox (up to `scheduler.max_turns_per_commit`, and while the write
//! set still fits one log entry) as one *batch*: steps 3–4 repeat per turn, on
//! the same warm instance, each turn reading the earlier ones' writes through
//! an [`Overlay`] of the batch's pending write set; step 5 commits them all as
//! one write set; step 6 answers each. A failed turn adds nothing (and its
//! instance is dropped); nobody is answered before the commit, and if it
//! fails every turn of the batch gets the error its own commit would have.
//!
//! Pipelined commits: step 5 only places the write set in the log's order
//! ([`CommitLog::propose_in_order`](crate::log::CommitLog::propose_in_order))
//! and leaves the batch in flight in the slot; the next batch runs at once,
//! reading the writes in flight through the slot's `uncommitted` overlay (up
//! to `scheduler.pipelined_commits` in flight). [`settled`](Inner::settled)
//! answers the batches oldest first as their commits end; a failure there
//! ends the pipeline (see there).
//!
//! Above the ~700-line guide (its tests are in `turn_tests.rs`) because
//! it is the one path a call takes from mailbox to answer, batch included:
//! split, a reader would chase the steps above across files.

use super::guard::{GuardKeys, TurnGuard};
use super::meta::{MetaCache, StoredVersion};
use super::warm::{Resident, ResidentCount, Slot, SlotState};
use super::{
    ErrorKind, InflightGuard, Inner, Invocation, InvokeError, RECENT_ERRORS, RecentError, Route, Scheduler, wall_ms,
};
use crate::log::LogError;
use crate::model::{
    AskFailure, EntityMeta, EntityRef, Keyspace, Message, MessageKind, Op, PendingAsk, Record, RefusalKind, WriteSet,
    ask_key, entity_prefix, idempotency_key, outbox_key, state_key, timer_due_key, timer_id_key,
};
use crate::runtime::{OutgoingMessage, ReplyIn, TurnError, TurnInput, TurnOutput};
use crate::storage::{Overlay, StateStore};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::sync::oneshot;
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

    fn reacquire(&mut self) -> futures::future::BoxFuture<'_, ()> {
        Box::pin(async move {
            if self.permit.is_none() {
                self.permit = self.permits.clone().acquire_owned().await.ok();
            }
        })
    }
}

/// The permit of a batch's turns, shared by them in turn: each turn's
/// runtime gets it as its [`TurnSlot`](crate::runtime::TurnSlot).
#[derive(Clone)]
struct SharedSlot(Arc<std::sync::Mutex<PermitSlot>>);

impl crate::runtime::TurnSlot for SharedSlot {
    fn release(&mut self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).release();
    }

    fn reacquire(&mut self) -> futures::future::BoxFuture<'_, ()> {
        Box::pin(async move {
            // The lock is not held across the wait for a permit.
            let permits = {
                let slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
                if slot.permit.is_some() {
                    return;
                }
                slot.permits.clone()
            };
            let permit = permits.acquire_owned().await.ok();
            self.0.lock().unwrap_or_else(|p| p.into_inner()).permit = permit;
        })
    }
}

/// Where an invocation's answer goes.
type Answer = oneshot::Sender<Result<Vec<u8>, InvokeError>>;

/// An invocation waiting in its entity's mailbox, and where its answer goes.
pub(super) struct Queued {
    inv: Invocation,
    invocation_id: String,
    /// The term it was routed in.
    epoch: u64,
    /// Its `invoke` span: its turn runs in it, whichever task runs the batch.
    span: tracing::Span,
    answer: Answer,
}

/// How an invocation left the mailbox.
enum Admitted<'a> {
    /// The lock's holder ran it in a batch and answered.
    Answered(Result<Vec<u8>, InvokeError>),
    /// It holds the entity's lock, and waits for its answer like the others.
    Holding(tokio::sync::MutexGuard<'a, SlotState>, oneshot::Receiver<Result<Vec<u8>, InvokeError>>),
}

/// How one turn of a batch ended, which decides when and how it is answered.
enum Outcome {
    /// Answered whatever the batch's commit does: a refusal before the guest
    /// ran, or the answer of a guard record already committed.
    Settled(Result<Vec<u8>, InvokeError>),
    /// It wrote: answered (and counted) only once the batch's write set commits.
    Wrote(AfterCommit),
    /// Answered once the batch's commit (or, if nothing wrote, a lead
    /// confirmation) shows this node still led when it read: a read, the
    /// entity's refusal, an answer from a guard record of this batch.
    /// `counted`: it failed and was counted as it did.
    Held { result: Result<Vec<u8>, InvokeError>, counted: bool },
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
    /// The exchange the turn took part in.
    exchange: Exchange,
}

/// A turn's part in an ask: what its write set owes besides the guest's writes.
#[derive(Default)]
struct Exchange {
    /// It answers an ask: the asker, the ask's sequence and operation. Its
    /// reply (or refusal) goes back as a message committed with the turn.
    answers: Option<(EntityRef, u64, String)>,
    /// It runs a continuation: the records that settle the ask (the pending
    /// ask, its timeout's timer) are removed with the turn.
    settles: Vec<Op>,
    /// The guest refused (a [`refusal`]): nothing it wrote is kept, but the
    /// exchange still commits — the refusal goes back to the asker, or the
    /// ask is settled.
    refused: Option<TurnError>,
}

/// The `call-error` a guest returned, as an ask's answer carries it; `None`
/// for a failure that is not the guest's answer (a trap, a limit).
fn refusal(e: &TurnError) -> Option<(RefusalKind, &str)> {
    match e {
        TurnError::BadRequest(m) => Some((RefusalKind::BadRequest, m)),
        TurnError::UnknownOperation(m) => Some((RefusalKind::UnknownOperation, m)),
        TurnError::Failed(m) => Some((RefusalKind::Failed, m)),
        _ => None,
    }
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
    /// The guest's refusal, answered after the commit that recorded it.
    refused: Option<InvokeError>,
}

/// The turns of one batch as they run: their write set so far, the
/// entity's meta and warm instance after the last of them, and each turn's
/// outcome with its caller's answer.
struct Batch {
    /// What its turns read through: the writes of the slot's batches in
    /// flight, then its own earlier turns'.
    overlay: Arc<Overlay>,
    /// The tag of its writes in `overlay`.
    tag: u64,
    ops: Vec<Op>,
    /// How many of `ops` the overlay holds: a turn's writes are laid over
    /// the store only when another turn follows it.
    in_overlay: usize,
    /// Bytes of `ops` as the log counts them.
    bytes: usize,
    meta: Option<MetaCache>,
    resident: Option<Resident>,
    /// Messages for the outbox the batch's turns send at once.
    immediate: u64,
    outcomes: Vec<(Answer, Outcome)>,
    /// Invocations taken that did not fit: they go back to the mailbox.
    left: Vec<Queued>,
}

/// How a batch's commit (or lead confirmation) ended, for its answers.
enum Committed {
    Yes,
    /// Nothing of the batch applied, and (unless in doubt) never will.
    No {
        /// For the turns that wrote: their own commit's error.
        writer: InvokeError,
        /// For reads and refusals: nothing of theirs was written (safe to retry).
        reader: InvokeError,
    },
}

/// A batch whose write set holds its place in the log: its outcome, and
/// its turns' answers, given once that is known.
pub(super) struct InFlight {
    outcome: futures::future::BoxFuture<'static, Result<crate::model::LogIndex, LogError>>,
    outcomes: Vec<(Answer, Outcome)>,
    /// The tag of its writes in the slot's `uncommitted` overlay.
    tag: u64,
}

/// How a commit that failed leaves the slot: whether it may still land
/// (the store cannot be read for the entity until that is settled), and
/// whether it was fenced (the slot's term is over).
#[derive(Clone, Copy, Default)]
struct Failed {
    in_doubt: bool,
    fenced: bool,
}

impl Failed {
    /// What a turn's commit that failed with `e` answers, and how the slot is left.
    fn of(e: LogError) -> (Committed, Failed) {
        match e {
            // Nothing of the batch applied: a refusal the caller's node
            // retries on the current leader.
            LogError::Fenced { .. } => (
                Committed::No {
                    writer: InvokeError::NotHere { leader: None },
                    reader: InvokeError::NotHere { leader: None },
                },
                Failed { in_doubt: false, fenced: true },
            ),
            // Whether the write set lands is unknown (unless it was never
            // queued). Its reads and refusals wrote nothing: retried, they
            // run after the doubt.
            e => {
                let in_doubt = !e.never_written();
                (
                    Committed::No { writer: InvokeError::Commit(e), reader: InvokeError::NotHere { leader: None } },
                    Failed { in_doubt, fenced: false },
                )
            }
        }
    }

    fn and(self, other: Failed) -> Failed {
        Failed { in_doubt: self.in_doubt || other.in_doubt, fenced: self.fenced || other.fenced }
    }

    /// The slot after the failure: the warm instance may hold state the
    /// store does not have, so it and the meta are reloaded; a fenced slot
    /// starts over in the next term.
    fn reset(self, slot_state: &mut SlotState) {
        let epoch = if self.fenced { 0 } else { slot_state.epoch };
        let in_doubt = self.in_doubt || slot_state.in_doubt;
        *slot_state = SlotState { epoch, in_doubt, ..SlotState::default() };
    }
}

/// A copy of a batch-wide error for each of its turns (errors carry no
/// `Clone`: most are one caller's).
fn each(e: &InvokeError) -> InvokeError {
    match e {
        InvokeError::Commit(e) => InvokeError::Commit(e.clone()),
        InvokeError::NotHere { leader } => InvokeError::NotHere { leader: *leader },
        InvokeError::ShuttingDown => InvokeError::ShuttingDown,
        e => InvokeError::Internal(e.to_string()),
    }
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
        if !crate::model::valid_operation_name(&inv.operation) {
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
    /// routed in. It waits in the entity's mailbox until either the lock's
    /// holder has run it and answered, or it holds the lock itself: then it
    /// runs what waits, its own invocation among it, a batch at a time,
    /// until its own is answered (the next waiter then takes the lock).
    pub(super) async fn run(
        self: Arc<Self>,
        inv: Invocation,
        invocation_id: String,
        epoch: u64,
    ) -> Result<Vec<u8>, InvokeError> {
        let entity = inv.entity.clone();
        let slot = self.slot(&entity);
        let (mut slot_state, mut answer) = match self.admit(&slot, inv, invocation_id, epoch).await? {
            Admitted::Answered(result) => return result,
            Admitted::Holding(slot_state, answer) => (slot_state, answer),
        };
        loop {
            self.settle_committed(&mut slot_state).await;
            match answer.try_recv() {
                Ok(result) => {
                    slot.release_instance_if_passing(&mut slot_state);
                    return result;
                }
                Err(oneshot::error::TryRecvError::Empty) => {}
                Err(oneshot::error::TryRecvError::Closed) => {
                    return Err(InvokeError::Internal("the invocation's batch ended without an answer".into()));
                }
            }
            if slot_state.in_flight.len() >= self.cfg.pipelined_commits {
                self.settle_oldest(&mut slot_state).await;
                continue;
            }
            // Behind a commit in flight, only a full batch starts: a smaller
            // one gathers more while it waits, and shares its commit with
            // them (overlapping small commits costs more per turn than it
            // saves).
            let max = self.cfg.max_turns_per_commit;
            let batch = if slot_state.in_flight.is_empty() || slot.waiting() >= max {
                slot.take_batch(max)
            } else {
                Vec::new()
            };
            if batch.is_empty() {
                // Every invocation a batch takes is answered, put back or
                // in flight before the lock is released: the own one waits
                // in the mailbox or in flight.
                if slot_state.in_flight.is_empty() {
                    return Err(InvokeError::Internal("the invocation left its mailbox unanswered".into()));
                }
                // Wait for the oldest commit, or for a full batch to run meanwhile.
                let front = slot_state.in_flight.front_mut().expect("a batch in flight");
                let settled = tokio::select! {
                    biased;
                    result = &mut front.outcome => Some(result),
                    () = slot.full.notified() => None,
                };
                if let Some(result) = settled {
                    self.settled(result, &mut slot_state).await;
                }
                continue;
            }
            let left = self.run_batch(&entity, batch, &mut slot_state).await;
            slot.put_back(left);
        }
    }

    /// Answers the batches in flight whose commits are done, oldest first,
    /// without waiting for any.
    async fn settle_committed(&self, slot_state: &mut SlotState) {
        while let Some(front) = slot_state.in_flight.front_mut() {
            let Some(result) = futures::FutureExt::now_or_never(&mut front.outcome) else { break };
            self.settled(result, slot_state).await;
        }
    }

    /// Waits for the oldest batch in flight to commit (or fail), and answers it.
    async fn settle_oldest(&self, slot_state: &mut SlotState) {
        if let Some(front) = slot_state.in_flight.front_mut() {
            let result = (&mut front.outcome).await;
            self.settled(result, slot_state).await;
        }
    }

    /// Waits for every batch in flight and answers it: before anything
    /// reads the entity's committed state (or starts over from it). Whether
    /// all committed.
    pub(super) async fn settle_all(&self, slot_state: &mut SlotState) -> bool {
        let mut all = true;
        while let Some(front) = slot_state.in_flight.front_mut() {
            let result = (&mut front.outcome).await;
            all &= result.is_ok();
            self.settled(result, slot_state).await;
        }
        all
    }

    /// Answers the oldest batch in flight, whose commit ended with `result`.
    /// A failure ends the pipeline: every later batch read this one's
    /// writes, and the log commits none of them without it, so each is
    /// answered as its own outcome says (committed only if this one was in
    /// fact); then the slot starts over from the store.
    async fn settled(&self, result: Result<crate::model::LogIndex, LogError>, slot_state: &mut SlotState) {
        let done = slot_state.in_flight.pop_front().expect("the batch that settled");
        let e = match result {
            Ok(_) => {
                if slot_state.in_flight.is_empty() {
                    slot_state.uncommitted = None;
                } else if let Some(overlay) = &slot_state.uncommitted {
                    overlay.retire(done.tag);
                }
                self.answer(done.outcomes, Committed::Yes);
                return;
            }
            Err(e) => e,
        };
        let (committed, mut failed) = Failed::of(e);
        self.answer(done.outcomes, committed);
        while let Some(later) = slot_state.in_flight.pop_front() {
            let committed = match later.outcome.await {
                Ok(_) => Committed::Yes,
                Err(e) => {
                    let (committed, f) = Failed::of(e);
                    failed = failed.and(f);
                    committed
                }
            };
            self.answer(later.outcomes, committed);
        }
        failed.reset(slot_state);
    }

    /// One batch of the entity's mailbox, under its lock: the steps below,
    /// turn and write set repeated per invocation. Answers every invocation
    /// it ran; returns those that did not fit, for the mailbox.
    async fn run_batch(
        self: &Arc<Self>,
        entity: &EntityRef,
        batch: Vec<Queued>,
        slot_state: &mut SlotState,
    ) -> Vec<Queued> {
        let Some((epoch, batch)) = self.route(entity, batch, slot_state).await else { return Vec::new() };
        let Some(mut ran) = self.turns(entity, batch, slot_state).await else { return Vec::new() };
        let left = std::mem::take(&mut ran.left);
        self.commit(entity, epoch, ran, slot_state).await;
        left
    }

    /// Admits the invocation to the entity's mailbox (refused when
    /// `mailbox_depth` invocations wait already) and waits for its answer or
    /// the entity's lock, whichever comes first.
    async fn admit<'a>(
        &self,
        slot: &'a Slot,
        inv: Invocation,
        invocation_id: String,
        epoch: u64,
    ) -> Result<Admitted<'a>, InvokeError> {
        let (answer, mut answered) = oneshot::channel();
        {
            let mut mailbox = slot.mailbox.lock().unwrap_or_else(|p| p.into_inner());
            let depth = mailbox.len();
            crate::telemetry::metrics().mailbox_depth.observe(depth as f64);
            if depth >= self.cfg.mailbox_depth {
                return Err(InvokeError::MailboxFull { entity: inv.entity.to_string(), depth });
            }
            mailbox.push_back(Queued { inv, invocation_id, epoch, span: tracing::Span::current(), answer });
            if depth + 1 == self.cfg.max_turns_per_commit {
                slot.full.notify_one();
            }
        }
        // The answer first: once the holder answered this invocation, the
        // lock (which it released after answering) is of no use to it.
        tokio::select! {
            biased;
            result = &mut answered => Ok(Admitted::Answered(result.unwrap_or_else(|_| {
                Err(InvokeError::Internal("the invocation's batch ended without an answer".into()))
            }))),
            slot_state = slot.state.lock() => Ok(Admitted::Holding(slot_state, answered)),
        }
    }

    /// Keeps the invocations that still run here in the term they were routed
    /// in (refusing the others) and readies the slot for that term. `None`
    /// when none is left to run (all answered).
    async fn route(
        &self,
        entity: &EntityRef,
        batch: Vec<Queued>,
        slot_state: &mut SlotState,
    ) -> Option<(u64, Vec<Queued>)> {
        // An invocation may have waited in the mailbox while leadership moved
        // away (and maybe back): it runs only in the term it was routed in.
        let current = self.epoch_of(entity);
        let (batch, moved): (Vec<Queued>, Vec<Queued>) = batch.into_iter().partition(|q| current == Some(q.epoch));
        for q in moved {
            let _ = q.answer.send(Err(InvokeError::NotHere { leader: None }));
        }
        let epoch = current.filter(|_| !batch.is_empty())?;
        // Another leader may have run turns of this entity since the slot was
        // filled: under a new term, start from the store.
        if slot_state.epoch != epoch {
            self.settle_all(slot_state).await;
            *slot_state = SlotState { epoch, in_doubt: slot_state.in_doubt, ..SlotState::default() };
        }
        if let Err(e) = self.resolve_doubt(entity, slot_state).await {
            for q in batch {
                let _ = q.answer.send(Err(each(&e)));
            }
            return None;
        }
        Some((epoch, batch))
    }

    /// Runs the batch's turns one after another in this task (a guest yields
    /// its thread at every epoch tick, so no hand-off to another thread is
    /// needed) on one turn permit, each on the entity's warm instance (a fresh one after
    /// a failed turn) and reading through the batch's pending writes. The
    /// slot gets back the instance (if it may stay warm) and, if nothing was
    /// written, the meta read. `None` if no turn could run (all answered).
    async fn turns(
        self: &Arc<Self>,
        entity: &EntityRef,
        batch: Vec<Queued>,
        slot_state: &mut SlotState,
    ) -> Option<Batch> {
        let permit = match self.turn_slot().await {
            Ok(permit) => SharedSlot(Arc::new(std::sync::Mutex::new(permit))),
            Err(e) => {
                for q in batch {
                    let _ = q.answer.send(Err(each(&e)));
                }
                return None;
            }
        };
        slot_state.batches += 1;
        let mut ran = Batch {
            overlay: slot_state.uncommitted.clone().unwrap_or_else(|| Arc::new(Overlay::new(self.store.clone()))),
            tag: slot_state.batches,
            ops: Vec::new(),
            in_overlay: 0,
            bytes: 0,
            meta: slot_state.meta,
            resident: slot_state.resident.take(),
            immediate: 0,
            outcomes: Vec::with_capacity(batch.len()),
            left: Vec::new(),
        };
        let mut rest = batch.into_iter();
        while let Some(q) = rest.next() {
            // Whatever the next turn writes, the batch's write set must
            // still fit one log entry.
            if !ran.outcomes.is_empty() {
                if ran.bytes > self.commit_room_bytes {
                    ran.left.push(q);
                    ran.left.extend(rest);
                    break;
                }
                // Between turns, another entity waiting for a permit goes first.
                let mut slot = permit.clone();
                crate::runtime::TurnSlot::release(&mut slot);
                crate::runtime::TurnSlot::reacquire(&mut slot).await;
            }
            let Queued { inv, invocation_id, span, answer, .. } = q;
            let outcome = self.turn(entity, inv, invocation_id, &mut ran, &permit).instrument(span).await;
            ran.outcomes.push((answer, outcome));
        }
        // The meta read is committed state unless a turn wrote.
        if ran.ops.is_empty() {
            slot_state.meta = ran.meta;
        }
        Some(ran)
    }

    /// One turn of the batch, unless a guard answers first; its write set
    /// joins the batch's. A failed turn is counted here and adds nothing; its
    /// instance is dropped.
    async fn turn(
        self: &Arc<Self>,
        entity: &EntityRef,
        inv: Invocation,
        invocation_id: String,
        batch: &mut Batch,
        permit: &SharedSlot,
    ) -> Outcome {
        // The version is read at the start of each turn: a deploy takes effect
        // between turns, and a turn in flight finishes on its version.
        let version = match self.registry.version_for(&inv.entity) {
            Ok(v) => v,
            Err(e) => return Outcome::Settled(Err(InvokeError::UnknownType(e))),
        };
        let warm = batch.resident.take().filter(|r| Arc::ptr_eq(&r.version, &version));
        if batch.in_overlay < batch.ops.len() {
            batch.overlay.push(&batch.ops[batch.in_overlay..], batch.tag);
            batch.in_overlay = batch.ops.len();
        }
        let meta = match batch.meta {
            Some(m) => m,
            None => match MetaCache::load(batch.overlay.as_ref(), entity) {
                Ok(m) => m,
                Err(e) => {
                    batch.resident = warm;
                    self.count_turn(false);
                    return Outcome::Settled(Err(e));
                }
            },
        };
        batch.meta = Some(meta);
        let now_ms = wall_ms();
        // Hashed only when a key needs it: payloads may be a MiB.
        let idempotency =
            inv.idempotency_key.as_deref().map(|k| (k, crate::model::request_digest(&inv.operation, &inv.payload)));
        let guard = TurnGuard { idempotency, message_seq: inv.message_seq };
        let guard_keys = guard.keys(entity, inv.caller.as_ref());
        // Answered before any guest code runs: a retried key, a redelivered
        // message — from a committed record at once, from one an earlier turn
        // of this batch wrote only once that commits.
        match guard_keys.check(self.store.as_ref(), now_ms) {
            Ok(Some(early)) => {
                batch.resident = warm;
                self.count_turn(true);
                return Outcome::Settled(Ok(early));
            }
            Err(e) => {
                batch.resident = warm;
                self.count_turn(false);
                return Outcome::Settled(Err(e));
            }
            Ok(None) => {}
        }
        if !batch.overlay.is_empty() {
            match guard_keys.check(batch.overlay.as_ref(), now_ms) {
                Ok(Some(early)) => {
                    batch.resident = warm;
                    return Outcome::Held { result: Ok(early), counted: false };
                }
                Err(e) => {
                    batch.resident = warm;
                    self.count_turn(false);
                    return Outcome::Held { result: Err(e), counted: true };
                }
                Ok(None) => {}
            }
        }
        // A reply runs its ask's continuation only while the ask is pending.
        let mut exchange = Exchange::default();
        let mut operation = inv.operation;
        let mut reply = None;
        match inv.kind {
            MessageKind::Send => {}
            MessageKind::Ask => {
                if let (Some(asker), Some(seq)) = (&inv.caller, inv.message_seq) {
                    exchange.answers = Some((asker.clone(), seq, operation.clone()));
                }
            }
            MessageKind::Reply { ask_seq, outcome } => {
                let pending = match self.pending_ask(entity, ask_seq, batch) {
                    Ok(Some(p)) => p,
                    Ok(None) => {
                        batch.resident = warm;
                        self.count_turn(true);
                        self.ask_replies_dropped.fetch_add(1, Ordering::Relaxed);
                        crate::telemetry::metrics().ask_replies_dropped.inc();
                        tracing::debug!(%entity, ask_seq, "a reply to a settled ask was dropped");
                        return Outcome::Held { result: Ok(Vec::new()), counted: true };
                    }
                    Err(e) => {
                        batch.resident = warm;
                        self.count_turn(false);
                        return Outcome::Settled(Err(e));
                    }
                };
                exchange.settles.push(Op::Delete { keyspace: Keyspace::Asks, key: ask_key(entity, ask_seq) });
                if let Some((seq, due)) = pending.timer {
                    exchange
                        .settles
                        .push(Op::Delete { keyspace: Keyspace::Timers, key: timer_due_key(due, entity, seq) });
                    exchange.settles.push(Op::Delete { keyspace: Keyspace::Timers, key: timer_id_key(entity, seq) });
                }
                operation = pending.continuation;
                reply = Some(ReplyIn { ask_seq, callee: pending.callee, outcome, context: pending.context });
            }
        }
        let mut r = match warm {
            Some(r) => r,
            None => {
                self.instantiations.fetch_add(1, Ordering::Relaxed);
                crate::telemetry::metrics().activations.inc();
                match self.instantiate_with_room(&version.prepared, entity).await {
                    Ok(instance) => Resident { version, instance, _count: ResidentCount::new(&self.resident) },
                    Err(e) => {
                        self.count_turn(false);
                        return Outcome::Settled(Err(InvokeError::Instantiate(e)));
                    }
                }
            }
        };
        let to_version = r.version.version;
        let migrate_from = meta.stored.migrate_from(to_version);
        let input = TurnInput {
            operation,
            payload: inv.payload,
            invocation_id,
            caller: inv.caller,
            now_ms,
            next_seq: meta.next_seq,
            reply,
        };
        // The first turn of a batch (often the only one) reads committed state directly.
        let reader: Arc<dyn StateStore> =
            if batch.overlay.is_empty() { self.store.clone() } else { batch.overlay.clone() };
        let turn_started = Instant::now();
        let out = r.instance.run_turn(input, reader, migrate_from, Box::new(permit.clone())).await;
        crate::telemetry::metrics().turn_seconds.observe(turn_started.elapsed().as_secs_f64());
        // Only an instance whose turn is about to commit stays warm: a
        // failed turn's instance may remember what was not committed (and a
        // trapped one is unusable), and one that grew large gives its memory back.
        let outgrown = r.instance.memory_bytes() as u64 > self.cfg.max_warm_instance_bytes;
        if outgrown && out.is_ok() {
            crate::telemetry::metrics().instances_outgrown.inc();
        }
        let keep = out.is_ok() && !r.instance.is_poisoned() && !outgrown;
        if keep {
            batch.resident = Some(r);
        } else {
            drop(r);
        }
        self.bound_warm_memory();
        let output = match out {
            Ok(output) => output,
            // The guest refused its part in an exchange: its writes are
            // dropped, the exchange's own records still commit.
            Err(e) if refusal(&e).is_some() && (exchange.answers.is_some() || !exchange.settles.is_empty()) => {
                exchange.refused = Some(e);
                let effects = crate::runtime::TurnEffects { next_seq: meta.next_seq, ..Default::default() };
                TurnOutput { reply: Vec::new(), effects }
            }
            Err(e) => {
                self.count_turn(false);
                let e = match e {
                    TurnError::MigrationFailed { from_version, cause } => InvokeError::MigrationFailed {
                        entity: entity.to_string(),
                        from_version,
                        to_version,
                        cause: *cause,
                    },
                    e => InvokeError::Turn(e),
                };
                // An entity's refusal is an answer read from its state, like
                // a read's: a deposed leader's stale store could refuse what
                // the entity would accept (a message refused this way is
                // dead-lettered for good), so it too is given only once the
                // lead is confirmed.
                return Outcome::Held { result: Err(e), counted: true };
            }
        };
        // A refused turn's migration wrote nothing that commits: it runs again.
        let migrated = migrate_from.is_some() && exchange.refused.is_none();
        let ran = Ran { output, migrated, meta, version: to_version, guard_keys, now_ms, exchange };
        match self.write_set(entity, ran, batch.immediate) {
            Err(e) => {
                self.count_turn(false);
                // Discarded after it ran: the instance may remember what was not committed.
                batch.resident = None;
                Outcome::Settled(Err(e))
            }
            Ok((ops, after)) => {
                batch.meta = Some(after.meta);
                if ops.is_empty() {
                    return Outcome::Held { result: Ok(after.reply), counted: false };
                }
                let ws = WriteSet { ops };
                batch.bytes += ws.approx_bytes();
                batch.immediate += after.immediate;
                batch.ops.extend(ws.ops);
                Outcome::Wrote(after)
            }
        }
    }

    /// The write set of a turn that ran: its state writes, the entity's meta
    /// if it changed, its messages (outbox) and timers, and the guard records
    /// that make a retry answer early. Refuses when the node's outbox has no
    /// room for its messages, counting the `pending` ones the batch's earlier
    /// turns send.
    fn write_set(&self, entity: &EntityRef, ran: Ran, pending: u64) -> Result<(Vec<Op>, AfterCommit), InvokeError> {
        let Ran { output, migrated, meta, version: to_version, guard_keys, now_ms, exchange } = ran;
        let mut effects = output.effects;
        let Exchange { answers, settles, refused } = exchange;
        // The answer to an ask leaves as a message with the turn's others.
        if let Some((asker, ask_seq, operation)) = answers {
            let outcome = match refused.as_ref().and_then(refusal) {
                None => Ok(output.reply.clone()),
                Some((kind, message)) => Err(AskFailure::Refused { kind, message: message.to_owned() }),
            };
            let seq = effects.next_seq;
            effects.next_seq += 1;
            effects.sent.push(OutgoingMessage {
                seq,
                target: asker,
                operation,
                payload: Vec::new(),
                due_at_ms: None,
                kind: MessageKind::Reply { ask_seq, outcome },
            });
        }
        // A refused ask is answered (delivered); a refused continuation is
        // answered with its error once its ask is settled.
        let refused = refused.filter(|_| !settles.is_empty()).map(InvokeError::Turn);
        let immediate = effects.sent.iter().filter(|m| m.due_at_ms.is_none()).count() as u64;
        let timers = effects.sent.len() as u64 - immediate;
        if immediate > 0 {
            let queued = self.outbox_len.load(Ordering::Relaxed) + pending;
            if queued + immediate > self.cfg.max_outbox_messages {
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
                kind: m.kind,
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
        for (seq, pending) in effects.asks {
            ops.push(Op::Put { keyspace: Keyspace::Asks, key: ask_key(entity, seq), value: pending.encode() });
        }
        ops.extend(settles);
        let stores_reply = guard_keys.record(&mut ops, &output.reply, now_ms, self.cfg.idempotency_retention_ms);
        Ok((ops, AfterCommit { meta: new_meta, reply: output.reply, immediate, timers, stores_reply, refused }))
    }

    /// Puts the batch's write set in the log, fenced by `epoch`, and leaves
    /// it in flight: its answers wait for its commit (see
    /// [`settled`](Self::settled)), and the slot caches the instance, meta
    /// and writes after its last turn for the next batch. A batch that wrote
    /// nothing but holds answers read from state (reads, refusals) is
    /// answered once the batches in flight (whose writes it may have read)
    /// have committed and this node is confirmed to lead still.
    async fn commit(&self, entity: &EntityRef, epoch: u64, mut batch: Batch, slot_state: &mut SlotState) {
        let ops = std::mem::take(&mut batch.ops);
        if ops.is_empty() {
            slot_state.resident = batch.resident.take();
            if !batch.outcomes.iter().any(|(_, o)| matches!(o, Outcome::Held { .. })) {
                self.answer(batch.outcomes, Committed::Yes);
                return;
            }
            crate::telemetry::metrics().turns_per_commit.observe(batch.outcomes.len() as f64);
            if !self.settle_all(slot_state).await {
                let refused = InvokeError::NotHere { leader: None };
                self.answer(batch.outcomes, Committed::No { writer: each(&refused), reader: refused });
                return;
            }
            // Reads: answered only once this node is known to have led in
            // `epoch` after they read (a deposed leader cut off from the rest
            // would answer from a stale store).
            let committed = match self.confirm_or_refuse(entity, epoch, slot_state).await {
                Ok(()) => Committed::Yes,
                Err(e) => Committed::No { writer: each(&e), reader: e },
            };
            self.answer(batch.outcomes, committed);
            return;
        }
        crate::telemetry::metrics().turns_per_commit.observe(batch.outcomes.len() as f64);
        // The next batch reads through these writes until they are applied.
        batch.overlay.push(&ops[batch.in_overlay..], batch.tag);
        // Fenced: if this node lost the lead while the turns ran and won
        // it again, the state they read may be stale and the write set is
        // skipped (the seeds' fencing token, with the term as token).
        match self.log.propose_in_order(WriteSet { ops }, epoch).await {
            Ok(outcome) => {
                if !slot_state.in_flight.is_empty() {
                    crate::telemetry::metrics().pipelined_batches.inc();
                }
                slot_state.resident = batch.resident.take();
                slot_state.meta = batch.meta;
                slot_state.uncommitted = Some(batch.overlay);
                slot_state.in_flight.push_back(InFlight { outcome, outcomes: batch.outcomes, tag: batch.tag });
            }
            Err(e) => {
                // Never in the log, so the batches before it are unaffected;
                // but the slot caches what this one's turns did.
                self.settle_all(slot_state).await;
                let (committed, failed) = Failed::of(e);
                self.answer(batch.outcomes, committed);
                failed.reset(slot_state);
            }
        }
    }

    /// Answers each turn of a batch as its commit decides: a turn that wrote
    /// or read gets its reply only if the batch committed, else the batch's
    /// error; what was settled before is answered as it was.
    fn answer(&self, outcomes: Vec<(Answer, Outcome)>, committed: Committed) {
        for (answer, outcome) in outcomes {
            let result = match (outcome, &committed) {
                (Outcome::Settled(result), _) => result,
                (Outcome::Wrote(after), Committed::Yes) => self.reply(after),
                (Outcome::Wrote(_), Committed::No { writer, .. }) => {
                    self.count_turn(false);
                    Err(each(writer))
                }
                (Outcome::Held { result, counted }, Committed::Yes) => {
                    if !counted {
                        self.count_turn(result.is_ok());
                    }
                    result
                }
                (Outcome::Held { counted, .. }, Committed::No { reader, .. }) => {
                    if !counted {
                        self.count_turn(false);
                    }
                    Err(each(reader))
                }
            };
            // A caller whose task is gone (its runtime shutting down) hears nothing.
            let _ = answer.send(result);
        }
    }

    /// After the commit: wakes the deliverer and the timer loop if the turn
    /// gave them work, counts, and returns the reply (or the refusal the
    /// commit recorded).
    fn reply(&self, after: AfterCommit) -> Result<Vec<u8>, InvokeError> {
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
        if let Some(refused) = after.refused {
            self.count_turn(false);
            return Err(refused);
        }
        self.count_turn(true);
        Ok(after.reply)
    }

    /// The pending record of `entity`'s ask `ask_seq`, as this turn sees it
    /// (through the batch's earlier turns), or `None` once it is settled.
    fn pending_ask(&self, entity: &EntityRef, ask_seq: u64, batch: &Batch) -> Result<Option<PendingAsk>, InvokeError> {
        let internal = |e: &dyn std::fmt::Display| InvokeError::Internal(format!("reading a pending ask: {e}"));
        let reader: &dyn StateStore = batch.overlay.as_ref();
        match reader.get(Keyspace::Asks, &ask_key(entity, ask_seq)).map_err(|e| internal(&e))? {
            Some(bytes) => PendingAsk::decode(&bytes).map(Some).map_err(|e| internal(&e)),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
impl Scheduler {
    /// Invocations waiting in `entity`'s mailbox (not taken by a batch).
    pub(crate) fn mailbox_len(&self, entity: &EntityRef) -> usize {
        let slots = self.inner.slots.lock().expect("slots lock");
        slots.peek(entity).map_or(0, |s| s.mailbox.lock().expect("mailbox lock").len())
    }
}

#[cfg(test)]
#[path = "turn_tests.rs"]
mod tests;
