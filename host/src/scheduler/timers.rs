//! The timer loop: fires due timers under the *sender's* mailbox lock, so a
//! cancel (a sender turn) and a firing never race: firing moves the timer
//! into the sender's outbox under a fresh sequence, after which it is an
//! ordinary message. An undecodable timer is deleted, and a sender whose
//! timers cannot fire backs off while the loop reads past its timers, so
//! neither holds up the timers behind it.

use super::delivery::{IDLE_POLL, MAX_TRACKED_FAILURES, backoff};
use super::meta::MetaCache;
use super::warm::SlotState;
use super::{Inner, InvokeError, Scheduler, wall_ms};
use crate::model::{
    EntityMeta, EntityRef, Keyspace, Message, Op, Record, TIMER_DUE_PREFIX, WriteSet, due_of_timer_key, entity_prefix,
    outbox_key, timer_id_key,
};
use crate::storage::{StateStore, StorageError};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;

/// Due timers fired per round of the timer loop.
const TIMER_BATCH: usize = 256;
/// Timer entries one read of the timer loop looks at (skipped and undecodable
/// ones included); the next read goes on from there.
const TIMER_SCAN: usize = 4096;

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

impl Scheduler {
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
        // What follows reads the store: the sender's batches in flight
        // (which may cancel these timers) settle first.
        self.settle_all(&mut st).await;
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::timer_due_key;
    use crate::scheduler::test_support::{entity, message};
    use crate::storage::{ApplyStore, MemStore};

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
