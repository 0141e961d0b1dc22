//! The scheduler's background loops for messages, timers and idempotency keys.
//!
//! - The **deliverer** drains the outbox: each message becomes an invocation of
//!   its target with the sender as caller and the message's sequence as its
//!   guard, so a redelivered message is dropped by the receiver (whose turn
//!   records the sequence in the same write set). Messages of one (sender,
//!   receiver) pair are delivered one after another in sequence order, by one
//!   task at a time; pairs are independent tasks (at most
//!   `delivery_concurrency`), so a slow receiver holds up only its own pairs.
//!   A pair's task deletes what it delivered from the outbox after the
//!   receiver committed — a crash in between only causes a redelivery. What
//!   happens to a message whose delivery failed depends on whose fault it was
//!   ([`Disposition`]): a message that cannot be processed (unknown type, the
//!   receiver's refusal) becomes a dead letter at once, atomically with leaving
//!   the outbox; one whose receiver's code keeps failing (a trap, a failed
//!   migration) after `delivery_max_attempts`; one the infrastructure could not
//!   deliver (no leader, an unreachable node, a commit not confirmed, a full
//!   mailbox, an overloaded node) is retried with capped, jittered backoff for
//!   as long as it is in the (bounded) outbox, and never dead-lettered for it.
//! - The **timer loop** fires due timers under the *sender's* mailbox lock, so a
//!   cancel (a sender turn) and a firing never race: firing moves the timer into
//!   the sender's outbox under a fresh sequence, after which it is an ordinary
//!   message. An undecodable timer is deleted, and a sender whose timers cannot
//!   fire backs off while the loop reads past its timers, so neither holds up
//!   the timers behind it.
//! - The **sweeper** deletes expired idempotent replies, and the oldest ones
//!   beyond `max_idempotency_keys`.

use super::{Inner, Invocation, InvokeError, MetaCache, Scheduler, SlotState, wall_ms};
use crate::model::{
    DeadLetter, EntityMeta, EntityRef, IDEMPOTENCY_EXPIRY_PREFIX, IdempotentReply, Keyspace, Message, Op, Record,
    TIMER_DUE_PREFIX, WriteSet, dead_letter_key, due_of_timer_key, entity_prefix, outbox_key,
    split_idempotency_expiry_key, timer_id_key,
};
use crate::storage::{StateStore, StorageError};
use futures::FutureExt;
use std::collections::{BTreeMap, BTreeSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// Messages of one sender taken per outbox read, so one busy sender cannot
/// crowd out the others.
const PER_SENDER_BATCH: usize = 64;
/// Outbox entries of one sender a read looks at, past the pairs it skips
/// (being delivered or backing off), to find the sender's other pairs.
const PER_SENDER_SCAN: usize = 1024;
/// Senders one outbox read visits at most; the next read goes on from there.
const SENDERS_PER_READ: usize = 4096;
/// Due timers fired per round of the timer loop.
const TIMER_BATCH: usize = 256;
/// Timer entries one read of the timer loop looks at (skipped and undecodable
/// ones included); the next read goes on from there.
const TIMER_SCAN: usize = 4096;
/// Longest idle wait of a loop before it looks again without being woken.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// Idempotency index entries handled per sweep.
const SWEEP_BATCH: usize = 1000;
/// Bound of the in-memory retry bookkeeping (pairs, senders); beyond it, it
/// starts afresh.
const MAX_TRACKED_FAILURES: usize = 100_000;

/// What to do with a message whose delivery failed: whose fault it was.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Disposition {
    /// Retrying cannot help (an unknown type, the receiver refused it):
    /// dead-letter it now.
    Permanent(String),
    /// The receiver's own code failed (a trap, a failed migration): retried
    /// with backoff, each failure counting toward `delivery_max_attempts`.
    ReceiverFault(String),
    /// The infrastructure could not deliver it (no leader, an unreachable
    /// node, a commit not confirmed, shutdown, a full mailbox, an overloaded
    /// node): nothing the receiver did. Retried with capped backoff for as
    /// long as the message is in the outbox, never dead-lettered for it.
    Unavailable(String),
}

/// Error kinds that are the receiving entity's own code failing. Classified
/// by kind (the closed set [`super::ERROR_KINDS`]) rather than by variant, so
/// a failure reported by another node (`InvokeError::Remote`) counts like the
/// same failure here.
const RECEIVER_FAULT_KINDS: &[&str] = &[
    "migration-failed",
    "out-of-fuel",
    "timeout",
    "out-of-memory",
    "stack-overflow",
    "limit-exceeded",
    "trap",
    "instantiate",
];

fn disposition(e: &InvokeError) -> Disposition {
    let reason = e.to_string();
    if e.is_permanent() {
        Disposition::Permanent(reason)
    } else if RECEIVER_FAULT_KINDS.contains(&e.kind()) {
        Disposition::ReceiverFault(reason)
    } else {
        Disposition::Unavailable(reason)
    }
}

/// The wait before retry number `failures` (1, 2, …): `base_ms` doubling up
/// to `max_ms`, then jittered down to between half of that and all of it by a
/// hash of `seed`, so the pairs (or senders) stuck on one outage do not retry
/// in lockstep; a hash, not a random draw, so a simulation replays exactly.
fn backoff(base_ms: u64, max_ms: u64, failures: u32, seed: &[u8]) -> Duration {
    let full = base_ms.saturating_mul(1u64 << failures.saturating_sub(1).min(30)).min(max_ms);
    let half = full / 2;
    // FNV-1a over the seed and the failure count, then a splitmix64 finaliser.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.iter().chain(&failures.to_be_bytes()) {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    Duration::from_millis(half + h % (full - half + 1))
}

/// Subtracts without wrapping below zero (the running counts are approximate
/// on a cluster, where leaderships move).
fn saturating_sub(counter: &AtomicU64, n: u64) {
    let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(n)));
}

/// A page of dead letters with their keys, and whether more follow.
pub type DeadLetterPage = (Vec<(Vec<u8>, DeadLetter)>, bool);

/// One outbox entry.
struct Outgoing {
    key: Vec<u8>,
    message: Message,
}

/// A (sender, receiver) pair: the unit of in-order delivery.
type Pair = (EntityRef, EntityRef);

/// Pairs an outbox read passes over: receivers by the sender's
/// [`entity_prefix`] (what its outbox keys start with).
type Skip = BTreeMap<Vec<u8>, BTreeSet<EntityRef>>;

fn skip_of<'a>(pairs: impl Iterator<Item = &'a Pair>) -> Skip {
    let mut skip = Skip::new();
    for (sender, target) in pairs {
        skip.entry(entity_prefix(sender)).or_default().insert(target.clone());
    }
    skip
}

/// What one read of the outbox found.
struct OutboxRead {
    /// Messages in delivery order: of each pair, a run from the front of its
    /// queue.
    batch: Vec<Outgoing>,
    /// Undecodable entries, for removal.
    corrupt: Vec<Vec<u8>>,
    /// Where the next read goes on (strictly after this key), or `None`: this
    /// read reached the end of the outbox.
    resume: Option<Vec<u8>>,
}

/// Outbox entries in delivery order from strictly after `start_after`: at most
/// `PER_SENDER_BATCH` per sender, `limit` in all (a sender's share is taken
/// whole once started), and of at most `max_pairs` pairs. The pairs in `skip`
/// are passed over whole (their front is being delivered, or waits for a
/// retry), and so are their later messages: a pair's messages are only ever
/// taken from its front.
fn read_outbox(
    store: &dyn StateStore,
    start_after: Option<&[u8]>,
    limit: usize,
    max_pairs: usize,
    skip: &Skip,
) -> Result<OutboxRead, StorageError> {
    let mut read = OutboxRead { batch: Vec::new(), corrupt: Vec::new(), resume: None };
    let mut after: Option<Vec<u8>> = start_after.map(<[u8]>::to_vec);
    let mut pairs = 0usize;
    for _ in 0..SENDERS_PER_READ {
        if read.batch.len() >= limit || pairs >= max_pairs {
            read.resume = after;
            return Ok(read);
        }
        let Some((first, _)) = store.scan(Keyspace::Outbox, b"", after.as_deref(), 1)?.into_iter().next() else {
            return Ok(read);
        };
        // Outbox keys are `sender-prefix seq(8)`; the prefix ends with the separator.
        let prefix = first[..first.len().saturating_sub(8)].to_vec();
        let empty = BTreeSet::new();
        let skipped = skip.get(&prefix).unwrap_or(&empty);
        let mut targets: BTreeSet<EntityRef> = BTreeSet::new();
        let (mut taken, mut seen) = (0usize, 0usize);
        let mut within: Option<Vec<u8>> = None;
        'sender: while taken < PER_SENDER_BATCH && seen < PER_SENDER_SCAN {
            let page = store.scan(Keyspace::Outbox, &prefix, within.as_deref(), PER_SENDER_BATCH)?;
            let last_page = page.len() < PER_SENDER_BATCH;
            for (key, value) in page {
                seen += 1;
                within = Some(key.clone());
                if key.len() != prefix.len() + 8 {
                    continue;
                }
                match Message::decode(&value) {
                    Ok(message) if skipped.contains(&message.target) => {}
                    Ok(message) => {
                        if !targets.contains(&message.target) {
                            if pairs >= max_pairs {
                                // Come back to this sender: its pairs taken so
                                // far are skipped then, the others are found.
                                read.resume = after;
                                return Ok(read);
                            }
                            pairs += 1;
                            targets.insert(message.target.clone());
                        }
                        read.batch.push(Outgoing { key, message });
                        taken += 1;
                        if taken >= PER_SENDER_BATCH {
                            break 'sender;
                        }
                    }
                    Err(e) => {
                        tracing::error!(key = ?key, "dropping an undecodable outbox entry: {e}");
                        read.corrupt.push(key);
                    }
                }
            }
            if last_page {
                break;
            }
        }
        // Skip to the next sender: replace the prefix's last separator by 0x01.
        let mut next = prefix;
        match next.last_mut() {
            Some(b) => *b = 1,
            None => return Ok(read),
        }
        after = Some(next);
    }
    read.resume = after;
    Ok(read)
}

/// What one read of the due timers found.
#[derive(Debug, Default)]
struct DueTimers {
    /// Due timers by sender, in due order; ordered, so timers fire in the
    /// same order on every replay of a simulation.
    due: BTreeMap<EntityRef, Vec<(Vec<u8>, Message)>>,
    /// Keys of undecodable timers (and their id entries), for removal.
    corrupt: Vec<Vec<u8>>,
    /// When the first timer not yet due is.
    next_due: Option<u64>,
    /// Where the next read goes on (strictly after this key), or `None`: this
    /// read reached the end or a timer not yet due.
    resume: Option<Vec<u8>>,
}

/// Timers due at `now` (Unix ms), earliest first, from strictly after
/// `start_after`: at most `limit`, looking at no more than `scan` entries.
/// Timers of the senders in `skip` (their entity prefixes) are passed over:
/// they back off. Undecodable ones are returned for removal, so a bad record
/// is never read again at the head of the queue.
fn read_due_timers(
    store: &dyn StateStore,
    now: u64,
    start_after: Option<&[u8]>,
    skip: &BTreeSet<Vec<u8>>,
    limit: usize,
    scan: usize,
) -> Result<DueTimers, StorageError> {
    let mut read = DueTimers::default();
    let (mut after, mut seen, mut taken) = (start_after.map(<[u8]>::to_vec), 0usize, 0usize);
    while seen < scan && taken < limit {
        let page = store.scan(Keyspace::Timers, TIMER_DUE_PREFIX, after.as_deref(), limit.min(scan - seen))?;
        let last_page = page.len() < limit.min(scan - seen);
        for (key, value) in page {
            seen += 1;
            after = Some(key.clone());
            let Some(at) = due_of_timer_key(&key) else {
                tracing::error!(key = ?key, "deleting a timer with an unreadable key");
                read.corrupt.push(key);
                continue;
            };
            if at > now {
                read.next_due = Some(at);
                return Ok(read);
            }
            // The key is `d due(8) sender-prefix seq(8)`: its sender is known
            // without decoding the record.
            let sender = key.get(9..key.len().saturating_sub(8)).unwrap_or_default();
            if skip.contains(sender) {
                continue;
            }
            match Message::decode(&value) {
                Ok(m) => {
                    read.due.entry(m.sender.clone()).or_default().push((key, m));
                    taken += 1;
                    if taken >= limit {
                        break;
                    }
                }
                Err(e) => {
                    tracing::error!(key = ?key, "deleting an undecodable timer: {e}");
                    // Its id entry is `i sender-prefix seq(8)`.
                    let mut id_key = vec![b'i'];
                    id_key.extend_from_slice(&key[9..]);
                    read.corrupt.push(id_key);
                    read.corrupt.push(key);
                }
            }
        }
        if last_page {
            return Ok(read);
        }
    }
    read.resume = after;
    Ok(read)
}

/// Where a pair is stuck: the message it must retry and its failures so far.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stuck {
    /// The outbox key of the message the pair is stuck on.
    key: Vec<u8>,
    /// Failures of the receiver's own code at it: they count toward
    /// `delivery_max_attempts`.
    faults: u32,
    /// Failures in a row of any kind: they set the backoff.
    failures: u32,
}

/// A pair waiting to retry its first message.
struct Retry {
    stuck: Stuck,
    /// Not before.
    until: Instant,
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
    ///
    /// Each pair found in the outbox gets a task that delivers its messages in
    /// order and commits what it did; the loop only reads the outbox for pairs
    /// that are neither being delivered nor waiting for a retry, and starts
    /// them while fewer than `delivery_concurrency` run. It never waits for a
    /// pair to finish before serving the others.
    pub async fn run_deliverer(self) {
        let inner = self.inner.clone();
        let concurrency = inner.cfg.delivery_concurrency;
        let mut retries: BTreeMap<Pair, Retry> = BTreeMap::new();
        let mut busy: BTreeSet<Pair> = BTreeSet::new();
        let mut tasks: tokio::task::JoinSet<(Pair, Option<Stuck>)> = tokio::task::JoinSet::new();
        // Where the next read goes on; `None`: from the start.
        let mut resume: Option<Vec<u8>> = None;
        loop {
            if inner.shutting_down.load(Ordering::Acquire) {
                return;
            }
            while let Some(joined) = tasks.try_join_next() {
                self.pair_finished(joined, &mut busy, &mut retries);
            }
            let free = concurrency.saturating_sub(tasks.len());
            // Whether the outbox may hold more to start now.
            let mut more = false;
            if free > 0 {
                let now = Instant::now();
                let skip = skip_of(busy.iter().chain(retries.iter().filter(|(_, r)| r.until > now).map(|(p, _)| p)));
                let whole = resume.is_none() && skip.is_empty();
                let (store, start, limit) = (inner.store.clone(), resume.take(), inner.cfg.delivery_batch);
                let read = crate::determinism::blocking(move || {
                    read_outbox(store.as_ref(), start.as_deref(), limit, free, &skip)
                })
                .await;
                let read = match read {
                    Ok(Ok(read)) => read,
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
                if whole && read.batch.is_empty() && read.corrupt.is_empty() && read.resume.is_none() {
                    // Nothing waits here. On a cluster the running count drifts as
                    // shard leaderships move between nodes; this resets it.
                    inner.outbox_len.store(0, Ordering::Relaxed);
                }
                more = read.resume.is_some();
                resume = read.resume;
                if !read.corrupt.is_empty() {
                    let n = read.corrupt.len() as u64;
                    let ops =
                        read.corrupt.into_iter().map(|key| Op::Delete { keyspace: Keyspace::Outbox, key }).collect();
                    match inner.log.propose(WriteSet { ops }).await {
                        Ok(_) => saturating_sub(&inner.outbox_len, n),
                        Err(e) => tracing::warn!("deliverer cannot remove undecodable outbox entries: {e}"),
                    }
                }
                // Group into (sender, receiver) pairs, keeping each pair's order.
                let mut pairs: BTreeMap<Pair, Vec<Outgoing>> = BTreeMap::new();
                for o in read.batch {
                    pairs.entry((o.message.sender.clone(), o.message.target.clone())).or_default().push(o);
                }
                for (pair, messages) in pairs {
                    // What the pair's first message has failed so far (the
                    // pair may have moved on since, by another node's hand).
                    let prior = retries
                        .get(&pair)
                        .map(|r| &r.stuck)
                        .filter(|s| messages.first().is_some_and(|m| m.key == s.key))
                        .cloned();
                    busy.insert(pair.clone());
                    let sched = self.clone();
                    tasks.spawn(async move {
                        // A panic is a bug: the pair is retried later like an outage.
                        let delivery = AssertUnwindSafe(sched.deliver_pair(messages, prior.clone())).catch_unwind();
                        let stuck = match delivery.await {
                            Ok(stuck) => stuck,
                            Err(_) => {
                                tracing::error!(sender = %pair.0, target = %pair.1, "delivering a pair panicked");
                                prior.map(|s| Stuck { failures: s.failures + 1, ..s })
                            }
                        };
                        (pair, stuck)
                    });
                }
            }
            if more && tasks.len() < concurrency {
                continue;
            }
            // Wait for a pair to finish, news, or the first retry to fall due.
            let now = Instant::now();
            let wait = retries
                .iter()
                .filter(|(p, r)| r.until > now && !busy.contains(*p))
                .map(|(_, r)| r.until - now)
                .min()
                .map_or(IDLE_POLL, |d| d.min(IDLE_POLL));
            tokio::select! {
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    self.pair_finished(joined, &mut busy, &mut retries);
                }
                _ = tokio::time::timeout(wait, inner.outbox_ready.notified()) => {}
            }
        }
    }

    /// Books a pair's task that ended: free for another read, and when it is
    /// stuck, not before its backoff.
    fn pair_finished(
        &self,
        joined: Result<(Pair, Option<Stuck>), tokio::task::JoinError>,
        busy: &mut BTreeSet<Pair>,
        retries: &mut BTreeMap<Pair, Retry>,
    ) {
        // Tasks are never aborted (only dropped with the loop) and catch their panics.
        let Ok((pair, stuck)) = joined else { return };
        busy.remove(&pair);
        match stuck {
            Some(stuck) => {
                let cfg = &self.inner.cfg;
                let wait = backoff(cfg.delivery_retry_base_ms, cfg.delivery_retry_max_ms, stuck.failures, &stuck.key);
                if retries.len() >= MAX_TRACKED_FAILURES {
                    retries.clear();
                }
                retries.insert(pair, Retry { stuck, until: Instant::now() + wait });
            }
            None => {
                retries.remove(&pair);
            }
        }
    }

    /// Delivers one pair's messages in order and commits what became of them
    /// (delivered ones leave the outbox, dead letters are recorded); stops at
    /// the first that must be retried and says where it is stuck. `prior` is
    /// what the first message has failed before.
    async fn deliver_pair(&self, messages: Vec<Outgoing>, prior: Option<Stuck>) -> Option<Stuck> {
        let inner = &self.inner;
        let max_attempts = inner.cfg.delivery_max_attempts;
        let mut ops = Vec::new();
        let (mut delivered, mut dead) = (0u64, 0u64);
        let mut stuck = None;
        for (i, o) in messages.into_iter().enumerate() {
            let (faults, failures) = match (&prior, i) {
                (Some(s), 0) => (s.faults, s.failures),
                _ => (0, 0),
            };
            let result = match self.deliver(&o.message).await {
                Ok(()) if inner.cfg.debug_duplicate_delivery => self.deliver(&o.message).await,
                other => other,
            };
            let e = match result {
                Ok(()) => {
                    ops.push(Op::Delete { keyspace: Keyspace::Outbox, key: o.key });
                    delivered += 1;
                    continue;
                }
                Err(e) => e,
            };
            let (reason, attempts) = match disposition(&e) {
                Disposition::Permanent(reason) => (reason, faults + 1),
                Disposition::ReceiverFault(reason) if faults + 1 >= max_attempts => {
                    (format!("gave up after {} attempts: {reason}", faults + 1), faults + 1)
                }
                Disposition::ReceiverFault(reason) => {
                    tracing::debug!(sender = %o.message.sender, seq = o.message.seq, %reason, faults = faults + 1,
                        "the receiver failed; delivery will be retried");
                    stuck = Some(Stuck { key: o.key, faults: faults + 1, failures: failures + 1 });
                    break;
                }
                Disposition::Unavailable(reason) => {
                    tracing::debug!(sender = %o.message.sender, seq = o.message.seq, %reason, failures = failures + 1,
                        "the receiver is unavailable; delivery will be retried");
                    stuck = Some(Stuck { key: o.key, faults, failures: failures + 1 });
                    break;
                }
            };
            let message = o.message;
            tracing::warn!(sender = %message.sender, seq = message.seq, target = %message.target,
                operation = %message.operation, %reason, "message dead-lettered");
            let at_ms = wall_ms();
            let key = dead_letter_key(at_ms, &message.sender, message.seq);
            let letter = DeadLetter { message, reason, attempts, at_ms };
            ops.push(Op::Put { keyspace: Keyspace::DeadLetters, key, value: letter.encode() });
            ops.push(Op::Delete { keyspace: Keyspace::Outbox, key: o.key });
            dead += 1;
        }
        if !ops.is_empty() {
            // A failure here only means the same messages are seen again: their
            // receivers drop them as duplicates.
            if let Err(e) = inner.log.propose(WriteSet { ops }).await {
                tracing::warn!("deliverer cannot commit its progress: {e}");
                return stuck;
            }
            saturating_sub(&inner.outbox_len, delivered + dead);
            inner.messages_delivered.fetch_add(delivered, Ordering::Relaxed);
            inner.dead_letters.fetch_add(dead, Ordering::Relaxed);
            let m = crate::telemetry::metrics();
            m.messages_delivered.inc_by(delivered);
            m.dead_letters.inc_by(dead);
        }
        stuck
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
    ///
    /// A sender whose timers cannot fire (its shard is led elsewhere, a commit
    /// failed) backs off like a stuck pair, and the loop reads past its
    /// timers meanwhile; undecodable timers are deleted. Neither holds up the
    /// timers behind them.
    pub async fn run_timers(self) {
        let inner = self.inner.clone();
        // Senders whose timers failed to fire: failures in a row, and not before.
        let mut backoffs: BTreeMap<EntityRef, (u32, Instant)> = BTreeMap::new();
        // Where the next read goes on; `None`: from the earliest timer.
        let mut resume: Option<Vec<u8>> = None;
        loop {
            if inner.shutting_down.load(Ordering::Acquire) {
                return;
            }
            let now_at = Instant::now();
            let skip: BTreeSet<Vec<u8>> =
                backoffs.iter().filter(|(_, (_, until))| *until > now_at).map(|(s, _)| entity_prefix(s)).collect();
            let (store, start) = (inner.store.clone(), resume.take());
            let now = wall_ms();
            let read = crate::determinism::blocking(move || {
                read_due_timers(store.as_ref(), now, start.as_deref(), &skip, TIMER_BATCH, TIMER_SCAN)
            })
            .await;
            let read = match read {
                Ok(Ok(read)) => read,
                other => {
                    tracing::error!("timer loop cannot read timers: {:?}", other.map(|r| r.map(|_| ())));
                    tokio::time::sleep(IDLE_POLL).await;
                    continue;
                }
            };
            resume = read.resume;
            if !read.corrupt.is_empty() {
                let ops = read.corrupt.into_iter().map(|key| Op::Delete { keyspace: Keyspace::Timers, key }).collect();
                if let Err(e) = inner.log.propose(WriteSet { ops }).await {
                    tracing::warn!("timer loop cannot remove undecodable timers: {e}");
                }
            }
            if read.due.is_empty() {
                if resume.is_some() {
                    // This read only passed over timers of senders backing off.
                    continue;
                }
                let now_at = Instant::now();
                let retry =
                    backoffs.values().filter(|(_, until)| *until > now_at).map(|(_, until)| *until - now_at).min();
                let due = read.next_due.map(|at| Duration::from_millis(at.saturating_sub(now)));
                let wait = [retry, due].into_iter().flatten().min().map_or(IDLE_POLL, |d| d.min(IDLE_POLL));
                let _ = tokio::time::timeout(wait, inner.timers_changed.notified()).await;
                continue;
            }
            for (sender, timers) in read.due {
                match inner.clone().fire_timers(sender.clone(), timers).await {
                    Ok(()) => {
                        backoffs.remove(&sender);
                    }
                    Err(e) => {
                        let failures = backoffs.get(&sender).map_or(0, |(f, _)| *f) + 1;
                        let cfg = &inner.cfg;
                        let wait = backoff(
                            cfg.delivery_retry_base_ms,
                            cfg.delivery_retry_max_ms,
                            failures,
                            &entity_prefix(&sender),
                        );
                        tracing::warn!(%sender, failures, "cannot fire timers yet (retry in {wait:?}): {e}");
                        if backoffs.len() >= MAX_TRACKED_FAILURES {
                            backoffs.clear();
                        }
                        backoffs.insert(sender, (failures, Instant::now() + wait));
                    }
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
    ) -> Result<DeadLetterPage, InvokeError> {
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
    use crate::model::timer_due_key;
    use crate::runtime::{TrapKind, TurnError};
    use crate::storage::MemStore;

    fn entity(id: &str) -> EntityRef {
        EntityRef::new("t", id).unwrap()
    }

    fn message(sender: &EntityRef, seq: u64, target: &EntityRef) -> Message {
        Message { sender: sender.clone(), seq, target: target.clone(), operation: "op".into(), payload: vec![] }
    }

    #[test]
    fn only_the_receivers_own_failures_count_as_attempts() {
        let permanent = [
            InvokeError::Turn(TurnError::Failed("closed".into())),
            InvokeError::Turn(TurnError::BadRequest("x".into())),
            InvokeError::Turn(TurnError::UnknownOperation("x".into())),
            InvokeError::BadOperation,
        ];
        for e in permanent {
            assert!(matches!(disposition(&e), Disposition::Permanent(_)), "{e}");
        }
        let receiver = [
            InvokeError::Turn(TurnError::Trapped { kind: TrapKind::Timeout, message: "t".into() }),
            InvokeError::Turn(TurnError::Trapped { kind: TrapKind::Trap, message: "panic".into() }),
            InvokeError::MigrationFailed {
                entity: "a/b".into(),
                from_version: 1,
                to_version: 2,
                cause: TurnError::Failed("x".into()),
            },
            InvokeError::Instantiate(crate::runtime::RuntimeError::Link("x".into())),
        ];
        for e in receiver {
            assert!(matches!(disposition(&e), Disposition::ReceiverFault(_)), "{e}");
        }
        let infrastructure = [
            InvokeError::MailboxFull { entity: "a/b".into(), depth: 3 },
            InvokeError::Overloaded(9),
            InvokeError::Instantiate(crate::runtime::RuntimeError::Exhausted {
                entity: "a/b".into(),
                message: "".into(),
            }),
            InvokeError::ShuttingDown,
            InvokeError::OutboxFull(1),
            InvokeError::Commit(crate::log::LogError::NotLeader { leader: None }),
            InvokeError::NotHere { leader: Some(2) },
            InvokeError::NoLeader("election".into()),
            InvokeError::Unreachable { node: 2, message: "refused".into() },
            InvokeError::Lost { node: 2, message: "reset".into() },
            InvokeError::Internal("disk".into()),
        ];
        for e in infrastructure {
            assert!(matches!(disposition(&e), Disposition::Unavailable(_)), "{e}");
        }
        // Every kind, as another node reports it, is classified like the
        // same failure here; a new kind must be placed deliberately.
        let unavailable: Vec<&str> = super::super::ERROR_KINDS
            .iter()
            .copied()
            .filter(|&kind| {
                let e = InvokeError::Remote { kind, code: 0, message: String::new() };
                matches!(disposition(&e), Disposition::Unavailable(_))
            })
            .collect();
        assert_eq!(
            unavailable,
            [
                // A member still fetching the receiver's component.
                "component-loading",
                "mailbox-full",
                "overloaded",
                "shutting-down",
                "outbox-full",
                "commit",
                "internal",
                "not-leader",
                "unavailable"
            ]
        );
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_with_jitter() {
        for failures in 1..40u32 {
            let full = 100u64.saturating_mul(1 << (failures - 1).min(30)).min(30_000);
            for seed in [&b"a"[..], b"b", b"pair"] {
                let d = backoff(100, 30_000, failures, seed).as_millis() as u64;
                assert!(d >= full / 2 && d <= full, "{failures}: {d} of {full}");
                assert_eq!(backoff(100, 30_000, failures, seed), backoff(100, 30_000, failures, seed));
            }
        }
        let spread: BTreeSet<Duration> = (0..32u8).map(|s| backoff(100, 30_000, 20, &[s])).collect();
        assert!(spread.len() > 16, "pairs stuck on one outage retry at different times: {spread:?}");
    }

    #[test]
    fn the_outbox_is_read_per_sender_in_sequence_order() {
        let store = MemStore::new();
        let (a, b) = (entity("a"), entity("b"));
        let mut ops = Vec::new();
        for seq in [3u64, 1, 300, 2] {
            ops.push(Op::Put {
                keyspace: Keyspace::Outbox,
                key: outbox_key(&a, seq),
                value: message(&a, seq, &b).encode(),
            });
        }
        for seq in 0..(PER_SENDER_BATCH as u64 + 5) {
            ops.push(Op::Put {
                keyspace: Keyspace::Outbox,
                key: outbox_key(&b, seq),
                value: message(&b, seq, &b).encode(),
            });
        }
        ops.push(Op::Put { keyspace: Keyspace::Outbox, key: outbox_key(&b, 999_999), value: b"junk".to_vec() });
        store.apply(&[(1, &WriteSet { ops })]).unwrap();
        let read = read_outbox(&store, None, 10_000, 100, &Skip::new()).unwrap();
        let seqs_of = |batch: &[Outgoing], s: &EntityRef| {
            batch.iter().filter(|o| &o.message.sender == s).map(|o| o.message.seq).collect::<Vec<_>>()
        };
        assert_eq!(seqs_of(&read.batch, &a), [1, 2, 3, 300]);
        // One sender's share per read is bounded.
        assert_eq!(seqs_of(&read.batch, &b).len(), PER_SENDER_BATCH);
        assert!(read.corrupt.is_empty(), "the junk entry is beyond b's share this read");
        assert!(read.resume.is_none(), "the read reached the end");
        let read = read_outbox(&store, None, 2, 100, &Skip::new()).unwrap();
        assert_eq!(read.batch.len(), 4, "a whole sender's share is taken once started");
        // The next read goes on with the next sender.
        let next = read_outbox(&store, read.resume.as_deref(), 2, 100, &Skip::new()).unwrap();
        assert_eq!(seqs_of(&next.batch, &b).len(), PER_SENDER_BATCH);
        assert!(seqs_of(&next.batch, &a).is_empty());
    }

    /// A pair being delivered, or backing off, is passed over whole: the
    /// sender's other pairs behind it are read, and none of its own later
    /// messages (a pair is only ever delivered from its front).
    #[test]
    fn a_stuck_pair_does_not_hide_the_senders_other_pairs() {
        let store = MemStore::new();
        let (a, slow, fast, other) = (entity("a"), entity("slow"), entity("fast"), entity("other"));
        let mut ops = Vec::new();
        let mut seq = 0;
        for target in [&slow, &fast, &slow, &other] {
            for _ in 0..PER_SENDER_BATCH {
                seq += 1;
                ops.push(Op::Put {
                    keyspace: Keyspace::Outbox,
                    key: outbox_key(&a, seq),
                    value: message(&a, seq, target).encode(),
                });
            }
        }
        store.apply(&[(1, &WriteSet { ops })]).unwrap();
        let targets =
            |read: &OutboxRead| read.batch.iter().map(|o| o.message.target.id.clone()).collect::<BTreeSet<_>>();
        // Without a skip, the first pair fills the sender's share.
        let read = read_outbox(&store, None, 1000, 100, &Skip::new()).unwrap();
        assert_eq!(targets(&read), BTreeSet::from(["slow".to_string()]));
        let skip = skip_of([(a.clone(), slow.clone())].iter());
        let read = read_outbox(&store, None, 1000, 100, &skip).unwrap();
        assert_eq!(targets(&read), BTreeSet::from(["fast".to_string()]));
        let seqs: Vec<u64> = read.batch.iter().map(|o| o.message.seq).collect();
        assert_eq!(seqs, (PER_SENDER_BATCH as u64 + 1..=2 * PER_SENDER_BATCH as u64).collect::<Vec<_>>());
        let skip = skip_of([(a.clone(), slow.clone()), (a.clone(), fast.clone())].iter());
        let read = read_outbox(&store, None, 1000, 100, &skip).unwrap();
        assert_eq!(targets(&read), BTreeSet::from(["other".to_string()]), "found past 192 skipped entries");
        // At most `max_pairs` pairs; the next read comes back to the sender.
        let two = {
            let store = MemStore::new();
            let ops = [&slow, &fast, &other]
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let seq = i as u64 + 1;
                    Op::Put {
                        keyspace: Keyspace::Outbox,
                        key: outbox_key(&a, seq),
                        value: message(&a, seq, t).encode(),
                    }
                })
                .collect();
            store.apply(&[(1, &WriteSet { ops })]).unwrap();
            store
        };
        let read = read_outbox(&two, None, 1000, 2, &Skip::new()).unwrap();
        assert_eq!(targets(&read), BTreeSet::from(["slow".to_string(), "fast".to_string()]));
        let skip = skip_of([(a.clone(), slow.clone()), (a.clone(), fast.clone())].iter());
        let next = read_outbox(&two, read.resume.as_deref(), 1000, 2, &skip).unwrap();
        assert_eq!(targets(&next), BTreeSet::from(["other".to_string()]));
    }

    /// The timer loop's read: undecodable timers and timers of a sender that
    /// backs off, due before the good ones, do not keep the good ones from
    /// firing. The old loop read the first `TIMER_BATCH` due entries every
    /// round and skipped (without removing) undecodable ones, so with as many
    /// bad ones at the head nothing behind them ever fired.
    #[test]
    fn bad_and_failing_timers_do_not_starve_the_ones_behind_them() {
        let store = MemStore::new();
        let (bad, failing, good, target) = (entity("bad"), entity("failing"), entity("good"), entity("x"));
        let mut ops = Vec::new();
        for seq in 0..TIMER_BATCH as u64 + 10 {
            ops.push(Op::Put {
                keyspace: Keyspace::Timers,
                key: timer_due_key(10, &bad, seq),
                value: b"junk".to_vec(),
            });
            ops.push(Op::Put {
                keyspace: Keyspace::Timers,
                key: timer_id_key(&bad, seq),
                value: 10u64.to_be_bytes().to_vec(),
            });
        }
        for seq in 0..TIMER_BATCH as u64 * 20 {
            let m = message(&failing, seq, &target);
            ops.push(Op::Put { keyspace: Keyspace::Timers, key: timer_due_key(20, &failing, seq), value: m.encode() });
        }
        for seq in 0..3 {
            let m = message(&good, seq, &target);
            ops.push(Op::Put {
                keyspace: Keyspace::Timers,
                key: timer_due_key(30 + seq, &good, seq),
                value: m.encode(),
            });
        }
        let later = message(&good, 9, &target);
        ops.push(Op::Put { keyspace: Keyspace::Timers, key: timer_due_key(1_000, &good, 9), value: later.encode() });
        store.apply(&[(1, &WriteSet { ops })]).unwrap();
        // What the old loop read, every round: nothing but undecodable timers.
        let head = store.scan(Keyspace::Timers, TIMER_DUE_PREFIX, None, TIMER_BATCH).unwrap();
        assert!(head.iter().all(|(_, v)| Message::decode(v).is_err()));

        // Round one: the undecodable timers are returned for removal (with
        // their id entries) and the failing sender's due timers come next.
        let skip = BTreeSet::new();
        let read = read_due_timers(&store, 100, None, &skip, TIMER_BATCH, TIMER_SCAN).unwrap();
        assert_eq!(read.corrupt.len(), 2 * (TIMER_BATCH + 10));
        assert!(read.corrupt.iter().any(|k| k == &timer_id_key(&bad, 0)));
        let ops = read.corrupt.iter().map(|k| Op::Delete { keyspace: Keyspace::Timers, key: k.clone() }).collect();
        store.apply(&[(2, &WriteSet { ops })]).unwrap();
        // The failing sender cannot fire: it backs off, and the loop reads
        // past its timers (in bounded steps) to the good ones.
        let skip = BTreeSet::from([entity_prefix(&failing)]);
        let mut fired = Vec::new();
        let mut start: Option<Vec<u8>> = None;
        let mut reads = 0;
        let next_due = loop {
            reads += 1;
            assert!(reads < 20, "the read never got past the failing sender");
            let read = read_due_timers(&store, 100, start.as_deref(), &skip, TIMER_BATCH, TIMER_SCAN).unwrap();
            assert!(read.corrupt.is_empty() && !read.due.contains_key(&failing));
            fired.extend(read.due.get(&good).into_iter().flatten().map(|(_, m)| m.seq));
            match read.resume {
                Some(r) => start = Some(r),
                None => break read.next_due,
            }
        };
        assert_eq!(fired, [0, 1, 2]);
        assert_eq!(next_due, Some(1_000));
        assert!(reads > 1, "one read's scan is bounded");
    }
}
