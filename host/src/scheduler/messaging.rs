//! The scheduler's background loops for messages, timers and idempotency keys.
//!
//! - The **deliverer** drains the outbox: each message becomes an invocation of
//!   its target with the sender as caller and the message's sequence as its
//!   guard, so a redelivered message is dropped by the receiver (whose turn
//!   records the sequence in the same write set). Messages of one (sender,
//!   receiver) pair are delivered one after another in sequence order; pairs
//!   run concurrently. A delivered message is deleted from the outbox after the
//!   receiver committed — a crash in between only causes a redelivery. A message
//!   that cannot be processed becomes a dead letter, atomically with leaving the
//!   outbox: at once for an unknown type or a guest error, after
//!   `delivery_max_attempts` for repeated transient failures (with backoff).
//! - The **timer loop** fires due timers under the *sender's* mailbox lock, so a
//!   cancel (a sender turn) and a firing never race: firing moves the timer into
//!   the sender's outbox under a fresh sequence, after which it is an ordinary
//!   message.
//! - The **sweeper** deletes expired idempotent replies, and the oldest ones
//!   beyond `max_idempotency_keys`.

use super::{Inner, Invocation, InvokeError, MetaCache, Scheduler, SlotState, wall_ms};
use crate::model::{
    DeadLetter, EntityMeta, EntityRef, IDEMPOTENCY_EXPIRY_PREFIX, IdempotentReply, Keyspace, Message, Op, Record,
    TIMER_DUE_PREFIX, WriteSet, dead_letter_key, due_of_timer_key, entity_prefix, outbox_key,
    split_idempotency_expiry_key, timer_id_key,
};
use crate::storage::StorageError;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;

/// Messages of one sender taken per deliverer round, so one busy sender cannot
/// crowd out the others.
const PER_SENDER_BATCH: usize = 64;
/// Due timers fired per round of the timer loop.
const TIMER_BATCH: usize = 256;
/// Longest idle wait of a loop before it looks again without being woken.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// Idempotency index entries handled per sweep.
const SWEEP_BATCH: usize = 1000;
/// Bound of the in-memory retry bookkeeping; beyond it, it starts afresh.
const MAX_TRACKED_FAILURES: usize = 100_000;

/// What to do with a message whose delivery failed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Disposition {
    /// Retrying cannot help: dead-letter it now.
    Permanent(String),
    /// Retry later (with backoff), up to the attempt limit.
    Transient(String),
}

fn disposition(e: &InvokeError) -> Disposition {
    // A trap may be load (a timeout) and a failed migration may be fixed by a
    // deploy or rollback: both get the retries.
    if e.is_permanent() { Disposition::Permanent(e.to_string()) } else { Disposition::Transient(e.to_string()) }
}

/// One outbox entry.
struct Outgoing {
    key: Vec<u8>,
    message: Message,
}

/// Outbox entries in delivery order, at most `PER_SENDER_BATCH` per sender and
/// `limit` in all. Undecodable entries are returned separately for removal.
fn read_outbox(
    store: &dyn crate::storage::StateStore,
    limit: usize,
) -> Result<(Vec<Outgoing>, Vec<Vec<u8>>), StorageError> {
    let mut out = Vec::new();
    let mut corrupt = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    while out.len() < limit {
        let page = store.scan(Keyspace::Outbox, b"", after.as_deref(), PER_SENDER_BATCH)?;
        let Some((first, _)) = page.first() else { break };
        // Outbox keys are `sender-prefix seq(8)`; the prefix ends with the separator.
        let prefix = first[..first.len().saturating_sub(8)].to_vec();
        for (key, value) in page.into_iter().take_while(|(k, _)| k.starts_with(&prefix) && k.len() == prefix.len() + 8)
        {
            match Message::decode(&value) {
                Ok(message) => out.push(Outgoing { key, message }),
                Err(e) => {
                    tracing::error!(key = ?key, "dropping an undecodable outbox entry: {e}");
                    corrupt.push(key);
                }
            }
        }
        // Skip to the next sender: replace the prefix's last separator by 0x01.
        let mut next = prefix;
        match next.last_mut() {
            Some(b) => *b = 1,
            None => break,
        }
        after = Some(next);
    }
    Ok((out, corrupt))
}

/// The outcome of delivering one pair's messages in order.
#[derive(Default)]
struct PairOutcome {
    delivered: Vec<Vec<u8>>,
    dead: Vec<(Vec<u8>, Message, String, u32)>,
    /// The message the pair is stuck on: its key and the attempts so far.
    blocked: Option<(Vec<u8>, u32)>,
}

impl Scheduler {
    /// Counts what is waiting in the outbox and the idempotency store, for the
    /// bounds; call once at start-up, before serving.
    pub fn recover_counts(&self) -> Result<(), StorageError> {
        let count = |ks: Keyspace, prefix: &[u8]| -> Result<u64, StorageError> {
            let mut n = 0u64;
            let mut after: Option<Vec<u8>> = None;
            loop {
                let page = self.inner.store.scan(ks, prefix, after.as_deref(), 10_000)?;
                let Some((last, _)) = page.last() else { break };
                after = Some(last.clone());
                n += page.len() as u64;
            }
            Ok(n)
        };
        self.inner.outbox_len.store(count(Keyspace::Outbox, b"")?, Ordering::Relaxed);
        self.inner.idempotency_len.store(count(Keyspace::Idempotency, IDEMPOTENCY_EXPIRY_PREFIX)?, Ordering::Relaxed);
        Ok(())
    }

    /// Delivers outbox messages until the node shuts down.
    pub async fn run_deliverer(self) {
        let inner = self.inner.clone();
        let mut attempts: BTreeMap<Vec<u8>, u32> = BTreeMap::new();
        let mut backoff: BTreeMap<(EntityRef, EntityRef), Instant> = BTreeMap::new();
        loop {
            if inner.shutting_down.load(Ordering::Acquire) {
                return;
            }
            let store = inner.store.clone();
            let limit = inner.cfg.delivery_batch;
            let read = crate::determinism::blocking(move || read_outbox(store.as_ref(), limit)).await;
            let (batch, corrupt) = match read {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => {
                    tracing::error!("deliverer cannot read the outbox: {e}");
                    tokio::time::sleep(IDLE_POLL).await;
                    continue;
                }
                Err(e) => {
                    tracing::error!("deliverer read failed: {e}");
                    tokio::time::sleep(IDLE_POLL).await;
                    continue;
                }
            };
            if batch.is_empty() && corrupt.is_empty() {
                // Nothing waits here. On a cluster the running count drifts as
                // shard leaderships move between nodes; this resets it.
                inner.outbox_len.store(0, Ordering::Relaxed);
                let _ = tokio::time::timeout(IDLE_POLL, inner.outbox_ready.notified()).await;
                continue;
            }
            // Group into (sender, receiver) pairs, keeping each pair's order.
            let now = Instant::now();
            let mut pairs: Vec<((EntityRef, EntityRef), Vec<Outgoing>)> = Vec::new();
            let mut index: BTreeMap<(EntityRef, EntityRef), usize> = BTreeMap::new();
            for o in batch {
                let pair = (o.message.sender.clone(), o.message.target.clone());
                if backoff.get(&pair).is_some_and(|until| *until > now) {
                    continue;
                }
                let i = *index.entry(pair.clone()).or_insert_with(|| {
                    pairs.push((pair, Vec::new()));
                    pairs.len() - 1
                });
                pairs[i].1.push(o);
            }
            let permits = Arc::new(tokio::sync::Semaphore::new(inner.cfg.delivery_concurrency));
            let mut tasks = tokio::task::JoinSet::new();
            for (pair, messages) in pairs {
                let permit = permits.clone().acquire_owned().await.expect("never closed");
                let first_attempts = messages.first().and_then(|m| attempts.get(&m.key)).copied().unwrap_or(0);
                let sched = self.clone();
                tasks.spawn(async move {
                    let outcome = sched.deliver_pair(messages, first_attempts).await;
                    drop(permit);
                    (pair, outcome)
                });
            }
            let mut ops: Vec<Op> =
                corrupt.into_iter().map(|key| Op::Delete { keyspace: Keyspace::Outbox, key }).collect();
            let (mut delivered, mut dead) = (0u64, 0u64);
            let mut earliest_retry: Option<Instant> = None;
            while let Some(joined) = tasks.join_next().await {
                let Ok((pair, outcome)) = joined else { continue };
                for key in outcome.delivered {
                    attempts.remove(&key);
                    ops.push(Op::Delete { keyspace: Keyspace::Outbox, key });
                    delivered += 1;
                }
                for (key, message, reason, tries) in outcome.dead {
                    attempts.remove(&key);
                    tracing::warn!(sender = %message.sender, seq = message.seq, target = %message.target,
                        operation = %message.operation, %reason, "message dead-lettered");
                    let at_ms = wall_ms();
                    let letter = DeadLetter { message: message.clone(), reason, attempts: tries, at_ms };
                    ops.push(Op::Put {
                        keyspace: Keyspace::DeadLetters,
                        key: dead_letter_key(at_ms, &message.sender, message.seq),
                        value: letter.encode(),
                    });
                    ops.push(Op::Delete { keyspace: Keyspace::Outbox, key });
                    dead += 1;
                }
                match outcome.blocked {
                    Some((key, tries)) => {
                        let base = inner.cfg.delivery_retry_base_ms;
                        let delay = base.saturating_mul(1 << tries.min(20)).min(inner.cfg.delivery_retry_max_ms);
                        let until = Instant::now() + Duration::from_millis(delay);
                        earliest_retry = Some(earliest_retry.map_or(until, |e| e.min(until)));
                        backoff.insert(pair, until);
                        if attempts.len() >= MAX_TRACKED_FAILURES {
                            attempts.clear();
                        }
                        attempts.insert(key, tries);
                    }
                    None => {
                        backoff.remove(&pair);
                    }
                }
            }
            let removed = ops.iter().filter(|op| op.keyspace() == Keyspace::Outbox).count() as u64;
            if !ops.is_empty() {
                // A failure here only means the same messages are seen again: their
                // receivers drop them as duplicates.
                if let Err(e) = inner.log.propose(WriteSet { ops }).await {
                    tracing::warn!("deliverer cannot commit its progress: {e}");
                    tokio::time::sleep(IDLE_POLL).await;
                    continue;
                }
                inner.outbox_len.fetch_sub(removed.min(inner.outbox_len.load(Ordering::Relaxed)), Ordering::Relaxed);
                inner.messages_delivered.fetch_add(delivered, Ordering::Relaxed);
                inner.dead_letters.fetch_add(dead, Ordering::Relaxed);
                let m = crate::telemetry::metrics();
                m.messages_delivered.inc_by(delivered);
                m.dead_letters.inc_by(dead);
            }
            backoff.retain(|_, until| *until > Instant::now());
            if delivered + dead == 0 {
                // Everything waits for a retry: sleep until the first is due or news arrives.
                let wait = earliest_retry
                    .or_else(|| backoff.values().min().copied())
                    .map_or(IDLE_POLL, |t| t.saturating_duration_since(Instant::now()).min(IDLE_POLL));
                let _ = tokio::time::timeout(wait, inner.outbox_ready.notified()).await;
            }
        }
    }

    /// Delivers one pair's messages in order; stops at the first that must be retried.
    async fn deliver_pair(&self, messages: Vec<Outgoing>, first_attempts: u32) -> PairOutcome {
        let mut outcome = PairOutcome::default();
        let max_attempts = self.inner.cfg.delivery_max_attempts;
        for (i, o) in messages.into_iter().enumerate() {
            let tries = if i == 0 { first_attempts } else { 0 } + 1;
            let result = match self.deliver(&o.message).await {
                Ok(()) if self.inner.cfg.debug_duplicate_delivery => self.deliver(&o.message).await,
                other => other,
            };
            match result {
                Ok(()) => outcome.delivered.push(o.key),
                Err(e) => match disposition(&e) {
                    Disposition::Permanent(reason) => outcome.dead.push((o.key, o.message, reason, tries)),
                    Disposition::Transient(reason) if tries >= max_attempts => {
                        let reason = format!("gave up after {tries} attempts: {reason}");
                        outcome.dead.push((o.key, o.message, reason, tries));
                    }
                    Disposition::Transient(reason) => {
                        tracing::debug!(sender = %o.message.sender, seq = o.message.seq, %reason, tries, "delivery will be retried");
                        outcome.blocked = Some((o.key, tries));
                        return outcome;
                    }
                },
            }
        }
        outcome
    }

    async fn deliver(&self, m: &Message) -> Result<(), InvokeError> {
        let inv = Invocation {
            entity: m.target.clone(),
            operation: m.operation.clone(),
            payload: m.payload.clone(),
            caller: Some(m.sender.clone()),
            idempotency_key: None,
            message_seq: Some(m.seq),
        };
        self.invoke(inv).await.map(|_| ())
    }

    /// Fires due timers until the node shuts down.
    pub async fn run_timers(self) {
        let inner = self.inner.clone();
        loop {
            if inner.shutting_down.load(Ordering::Acquire) {
                return;
            }
            let store = inner.store.clone();
            let read =
                crate::determinism::blocking(move || store.scan(Keyspace::Timers, TIMER_DUE_PREFIX, None, TIMER_BATCH))
                    .await;
            let entries = match read {
                Ok(Ok(e)) => e,
                other => {
                    tracing::error!("timer loop cannot read timers: {other:?}");
                    tokio::time::sleep(IDLE_POLL).await;
                    continue;
                }
            };
            let now = wall_ms();
            // Ordered, so timers fire in the same order on every replay of a simulation.
            let mut due: BTreeMap<EntityRef, Vec<(Vec<u8>, Message)>> = BTreeMap::new();
            let mut next_due: Option<u64> = None;
            for (key, value) in entries {
                let Some(at) = due_of_timer_key(&key) else { continue };
                if at > now {
                    next_due = Some(at);
                    break;
                }
                match Message::decode(&value) {
                    Ok(m) => due.entry(m.sender.clone()).or_default().push((key, m)),
                    Err(e) => tracing::error!(key = ?key, "ignoring an undecodable timer: {e}"),
                }
            }
            if due.is_empty() {
                let wait =
                    next_due.map_or(IDLE_POLL, |at| Duration::from_millis(at.saturating_sub(now)).min(IDLE_POLL));
                let _ = tokio::time::timeout(wait, inner.timers_changed.notified()).await;
                continue;
            }
            for (sender, timers) in due {
                if let Err(e) = inner.clone().fire_timers(sender.clone(), timers).await {
                    tracing::warn!(%sender, "cannot fire timers yet: {e}");
                    tokio::time::sleep(Duration::from_millis(inner.cfg.delivery_retry_base_ms)).await;
                }
            }
            inner.outbox_ready.notify_one();
        }
    }

    /// Deletes expired idempotent replies (and the oldest beyond the bound) until
    /// the node shuts down.
    pub async fn run_idempotency_sweeper(self) {
        let inner = self.inner.clone();
        let period = Duration::from_millis((inner.cfg.idempotency_retention_ms / 100).clamp(1000, 60_000));
        loop {
            tokio::time::sleep(period).await;
            if inner.shutting_down.load(Ordering::Acquire) {
                return;
            }
            loop {
                match inner.sweep_idempotency().await {
                    Ok(n) if n >= SWEEP_BATCH => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!("idempotency sweep failed: {e}");
                        break;
                    }
                }
            }
        }
    }

    /// Dead letters, oldest first, strictly after the key `start_after` (as
    /// returned): at most `limit`, and no more stored bytes than `max_bytes`
    /// (one at least); with whether more follow.
    pub fn dead_letters(
        &self,
        start_after: Option<&[u8]>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<(Vec<(Vec<u8>, DeadLetter)>, bool), InvokeError> {
        let page = self
            .inner
            .store
            .scan_page(Keyspace::DeadLetters, b"", start_after, limit, max_bytes)
            .map_err(|e| InvokeError::Internal(format!("reading dead letters: {e}")))?;
        let rows = page
            .entries
            .into_iter()
            .map(|(k, v)| DeadLetter::decode(&v).map(|d| (k, d)).map_err(|e| InvokeError::Internal(e.to_string())))
            .collect::<Result<_, _>>()?;
        Ok((rows, page.more))
    }
}

impl Inner {
    /// Moves `timers` of `sender` that are still pending into its outbox, each
    /// under a fresh sequence, holding the sender's mailbox lock so no turn of
    /// the sender (which might cancel them) runs meanwhile.
    async fn fire_timers(
        self: Arc<Self>,
        sender: EntityRef,
        timers: Vec<(Vec<u8>, Message)>,
    ) -> Result<(), InvokeError> {
        let slot = self.slot(&sender);
        let mut st = slot.state.lock().await;
        // As for a turn: only where the sender's turns run, and from the
        // store under a new term.
        let Some(epoch) = self.epoch_of(&sender) else {
            return Err(InvokeError::NotHere { leader: None });
        };
        if st.epoch != epoch {
            *st = SlotState { epoch, in_doubt: st.in_doubt, ..SlotState::default() };
        }
        self.resolve_doubt(&sender, &mut st).await?;
        let (this, cached, s2) = (self.clone(), st.meta, sender.clone());
        let (meta, pending) = crate::determinism::blocking(move || {
            let meta = match cached {
                Some(m) => m,
                None => MetaCache::load(this.store.as_ref(), &s2)?,
            };
            let mut pending = Vec::new();
            for (key, m) in timers {
                let present =
                    this.store.get(Keyspace::Timers, &key).map_err(|e| InvokeError::Internal(e.to_string()))?;
                if present.is_some() {
                    pending.push((key, m));
                }
            }
            Ok::<_, InvokeError>((meta, pending))
        })
        .await
        .map_err(|e| InvokeError::Internal(e.to_string()))??;
        st.meta = Some(meta);
        if pending.is_empty() {
            return Ok(());
        }
        let mut next_seq = meta.next_seq;
        let mut ops = Vec::with_capacity(pending.len() * 3 + 1);
        for (due_key, m) in &pending {
            ops.push(Op::Delete { keyspace: Keyspace::Timers, key: due_key.clone() });
            ops.push(Op::Delete { keyspace: Keyspace::Timers, key: timer_id_key(&sender, m.seq) });
            let fired = Message { seq: next_seq, ..m.clone() };
            ops.push(Op::Put { keyspace: Keyspace::Outbox, key: outbox_key(&sender, next_seq), value: fired.encode() });
            next_seq += 1;
        }
        let record = EntityMeta { version: meta.stored.version(), next_seq };
        ops.push(Op::Put { keyspace: Keyspace::EntityMeta, key: entity_prefix(&sender), value: record.encode() });
        if let Err(e) = self.commit_in(WriteSet { ops }, epoch).await {
            // As for a turn: the write may still commit, unless it was fenced
            // or never queued.
            let in_doubt = !e.never_written();
            *st = SlotState { in_doubt, ..SlotState::default() };
            return Err(InvokeError::Commit(e));
        }
        st.meta = Some(MetaCache { next_seq, ..meta });
        self.outbox_len.fetch_add(pending.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// One sweep of the idempotency expiry index; returns how many entries it handled.
    async fn sweep_idempotency(self: &Arc<Self>) -> Result<usize, InvokeError> {
        let this = self.clone();
        let now = wall_ms();
        let over = self.idempotency_len.load(Ordering::Relaxed).saturating_sub(self.cfg.max_idempotency_keys);
        let (ops, seen) = crate::determinism::blocking(move || {
            let internal = |e: &dyn std::fmt::Display| InvokeError::Internal(e.to_string());
            let page = this
                .store
                .scan(Keyspace::Idempotency, IDEMPOTENCY_EXPIRY_PREFIX, None, SWEEP_BATCH)
                .map_err(|e| internal(&e))?;
            let seen = page.len();
            let mut ops = Vec::new();
            let mut over = over;
            for (index_key, _) in page {
                let Some((expires, record_key)) = split_idempotency_expiry_key(&index_key) else { continue };
                if expires > now && over == 0 {
                    break;
                }
                over = over.saturating_sub(1);
                // The record may have been replaced (a later call after expiry):
                // then only this stale index entry goes.
                let record = this.store.get(Keyspace::Idempotency, record_key).map_err(|e| internal(&e))?;
                if let Some(bytes) = record
                    && IdempotentReply::decode(&bytes).is_ok_and(|r| r.expires_at_ms == expires)
                {
                    ops.push(Op::Delete { keyspace: Keyspace::Idempotency, key: record_key.to_vec() });
                }
                ops.push(Op::Delete { keyspace: Keyspace::Idempotency, key: index_key });
            }
            Ok::<_, InvokeError>((ops, seen))
        })
        .await
        .map_err(|e| InvokeError::Internal(e.to_string()))??;
        let handled = ops.iter().filter(|op| op.key().first() == Some(&b'e')).count();
        if handled > 0 {
            self.log.propose(WriteSet { ops }).await?;
            let len = self.idempotency_len.load(Ordering::Relaxed);
            self.idempotency_len.store(len.saturating_sub(handled as u64), Ordering::Relaxed);
        }
        // A short page is the whole index: the exact count. On a cluster the
        // running count drifts as shard leaderships move between nodes.
        if seen < SWEEP_BATCH {
            self.idempotency_len.store((seen - handled) as u64, Ordering::Relaxed);
        }
        Ok(handled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::TurnError;

    #[test]
    fn guest_errors_are_permanent_and_load_is_transient() {
        let permanent = [
            InvokeError::Turn(TurnError::Failed("closed".into())),
            InvokeError::Turn(TurnError::BadRequest("x".into())),
            InvokeError::Turn(TurnError::UnknownOperation("x".into())),
            InvokeError::BadOperation,
        ];
        for e in permanent {
            assert!(matches!(disposition(&e), Disposition::Permanent(_)), "{e}");
        }
        let transient = [
            InvokeError::MailboxFull { entity: "a/b".into(), depth: 3 },
            InvokeError::Overloaded(9),
            InvokeError::ShuttingDown,
            InvokeError::OutboxFull(1),
            InvokeError::Turn(TurnError::Trapped { kind: crate::runtime::TrapKind::Timeout, message: "t".into() }),
        ];
        for e in transient {
            assert!(matches!(disposition(&e), Disposition::Transient(_)), "{e}");
        }
    }

    #[test]
    fn the_outbox_is_read_per_sender_in_sequence_order() {
        use crate::storage::{MemStore, StateStore};
        let store = MemStore::new();
        let a = EntityRef::new("t", "a").unwrap();
        let b = EntityRef::new("t", "b").unwrap();
        let msg = |s: &EntityRef, seq| Message {
            sender: s.clone(),
            seq,
            target: b.clone(),
            operation: "op".into(),
            payload: vec![],
        };
        let mut ops = Vec::new();
        for seq in [3u64, 1, 300, 2] {
            ops.push(Op::Put { keyspace: Keyspace::Outbox, key: outbox_key(&a, seq), value: msg(&a, seq).encode() });
        }
        for seq in 0..(PER_SENDER_BATCH as u64 + 5) {
            ops.push(Op::Put { keyspace: Keyspace::Outbox, key: outbox_key(&b, seq), value: msg(&b, seq).encode() });
        }
        ops.push(Op::Put { keyspace: Keyspace::Outbox, key: outbox_key(&b, 999_999), value: b"junk".to_vec() });
        store.apply(&[(1, &WriteSet { ops })]).unwrap();
        let (batch, corrupt) = read_outbox(&store, 10_000).unwrap();
        let seqs_of =
            |s: &EntityRef| batch.iter().filter(|o| &o.message.sender == s).map(|o| o.message.seq).collect::<Vec<_>>();
        assert_eq!(seqs_of(&a), [1, 2, 3, 300]);
        // One sender's share per round is bounded.
        assert_eq!(seqs_of(&b).len(), PER_SENDER_BATCH);
        assert!(corrupt.is_empty(), "the junk entry is beyond b's share this round");
        let (batch, _) = read_outbox(&store, 2).unwrap();
        assert_eq!(batch.len(), 4, "a whole sender's share is taken once started");
    }
}
