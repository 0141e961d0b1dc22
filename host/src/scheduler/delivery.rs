//! The deliverer: drains the outbox. Each message becomes an invocation of
//! its target with the sender as caller and the message's sequence as its
//! guard, so a redelivered message is dropped by the receiver (whose turn
//! records the sequence in the same write set). Messages of one (sender,
//! receiver) pair are delivered one after another in sequence order, by one
//! task at a time; pairs are independent tasks (at most
//! `delivery_concurrency`), so a slow receiver holds up only its own pairs.
//! A pair's task deletes what it delivered from the outbox after the
//! receiver committed — a crash in between only causes a redelivery. What
//! happens to a message whose delivery failed depends on whose fault it was
//! (its kind's [`Disposition`]): a message that cannot be processed (unknown
//! type, the receiver's refusal) becomes a dead letter at once, atomically
//! with leaving the outbox; one whose receiver's code keeps failing (a trap,
//! a failed migration) after `delivery_max_attempts`; one the infrastructure
//! could not deliver (no leader, an unreachable node, a commit not confirmed,
//! a full mailbox, an overloaded node) is retried with capped, jittered
//! backoff for as long as it is in the (bounded) outbox, and never
//! dead-lettered for it. Also the dead-letter listing.

use super::outbox::{Outgoing, Pair, read_outbox, skip_of};
use super::{Disposition, Invocation, InvokeError, Scheduler, wall_ms};
use crate::model::{AskFailure, DeadLetter, Keyspace, Message, MessageKind, Op, WriteSet, dead_letter_key};
use futures::FutureExt;
use std::collections::{BTreeMap, BTreeSet};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// Longest idle wait of a loop before it looks again without being woken.
pub(super) const IDLE_POLL: Duration = Duration::from_secs(1);
/// Bound of the in-memory retry bookkeeping (pairs, senders); beyond it, it
/// starts afresh.
pub(super) const MAX_TRACKED_FAILURES: usize = 100_000;

/// The wait before retry number `failures` (1, 2, …): `base_ms` doubling up
/// to `max_ms`, then jittered down to between half of that and all of it by a
/// hash of `seed`, so the pairs (or senders) stuck on one outage do not retry
/// in lockstep; a hash, not a random draw, so a simulation replays exactly.
pub(super) fn backoff(base_ms: u64, max_ms: u64, failures: u32, seed: &[u8]) -> Duration {
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
            let reason = e.to_string();
            let (reason, attempts) = match e.disposition() {
                Disposition::Permanent => (reason, faults + 1),
                Disposition::ReceiverFault if faults + 1 >= max_attempts => {
                    (format!("gave up after {} attempts: {reason}", faults + 1), faults + 1)
                }
                Disposition::ReceiverFault => {
                    tracing::debug!(sender = %o.message.sender, seq = o.message.seq, %reason, faults = faults + 1,
                        "the receiver failed; delivery will be retried");
                    stuck = Some(Stuck { key: o.key, faults: faults + 1, failures: failures + 1 });
                    break;
                }
                Disposition::Unavailable => {
                    tracing::debug!(sender = %o.message.sender, seq = o.message.seq, %reason, failures = failures + 1,
                        "the receiver is unavailable; delivery will be retried");
                    stuck = Some(Stuck { key: o.key, faults, failures: failures + 1 });
                    break;
                }
            };
            // An ask that cannot be processed is answered with why: the
            // asker's continuation hears it instead of an operator.
            let reason = if o.message.kind == MessageKind::Ask {
                match self.tell_asker(&o.message, &reason).await {
                    Ok(()) => {
                        tracing::info!(sender = %o.message.sender, seq = o.message.seq, target = %o.message.target,
                            %reason, "an ask was undeliverable; its asker was told");
                        ops.push(Op::Delete { keyspace: Keyspace::Outbox, key: o.key });
                        delivered += 1;
                        continue;
                    }
                    Err(e) if e.disposition() == Disposition::Unavailable => {
                        stuck = Some(Stuck { key: o.key, faults: attempts, failures: failures + 1 });
                        break;
                    }
                    Err(e) => format!("{reason}; then the asker's continuation failed: {e}"),
                }
            } else {
                reason
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
            kind: m.kind.clone(),
        };
        self.invoke(inv).await.map(|_| ())
    }

    /// Runs the continuation of the ask `m` with why it could not be
    /// processed. Its pending record makes this once, like any reply.
    async fn tell_asker(&self, m: &Message, why: &str) -> Result<(), InvokeError> {
        let inv = Invocation {
            entity: m.sender.clone(),
            operation: m.operation.clone(),
            payload: Vec::new(),
            caller: Some(m.target.clone()),
            idempotency_key: None,
            message_seq: None,
            kind: MessageKind::Reply { ask_seq: m.seq, outcome: Err(AskFailure::Undeliverable(why.to_owned())) },
        };
        self.invoke(inv).await.map(|_| ())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{TrapKind, TurnError};
    use crate::scheduler::ErrorKind;

    #[test]
    fn only_the_receivers_own_failures_count_as_attempts() {
        let permanent = [
            InvokeError::Turn(TurnError::Failed("closed".into())),
            InvokeError::Turn(TurnError::BadRequest("x".into())),
            InvokeError::Turn(TurnError::UnknownOperation("x".into())),
            InvokeError::BadOperation,
        ];
        for e in permanent {
            assert_eq!(e.disposition(), Disposition::Permanent, "{e}");
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
            assert_eq!(e.disposition(), Disposition::ReceiverFault, "{e}");
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
            assert_eq!(e.disposition(), Disposition::Unavailable, "{e}");
        }
        // Every kind, as another node reports it, is classified like the
        // same failure here; a new kind must be placed deliberately.
        let invocation_kinds = [
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
        let remote = |kind| InvokeError::Remote { kind, code: 0, message: String::new() };
        let (invocation, other): (Vec<ErrorKind>, Vec<ErrorKind>) =
            ErrorKind::ALL.iter().partition(|k| invocation_kinds.contains(&k.as_str()));
        assert_eq!(invocation.len(), invocation_kinds.len());
        let unavailable: Vec<&str> = invocation
            .into_iter()
            .filter(|&kind| remote(kind).disposition() == Disposition::Unavailable)
            .map(ErrorKind::as_str)
            .collect();
        // Kinds no invocation fails with are never held against a receiver.
        for kind in other {
            assert_eq!(remote(kind).disposition(), Disposition::Unavailable, "{kind}");
        }
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
}
