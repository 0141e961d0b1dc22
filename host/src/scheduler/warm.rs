//! The mailboxes and the warm-instance cache: one [`Slot`] per active
//! entity (its bounded queue of waiting invocations, its lock, what it caches under that lock — a warm
//! [`Resident`] instance and the entity's meta — and whether a commit of it is
//! in doubt), kept in an LRU bounded by count; warm instances are also bounded
//! by the guest memory they hold and evicted when idle. An instantiation that
//! finds the node full evicts idle instances first.
//!
//! A full warm set admits a newcomer in place of its least recently used
//! entity only if the newcomer was called more often lately
//! ([`FrequencySketch`], TinyLFU). One that is not admitted still gets a
//! slot for its turns, among the passing ones, which go once idle: a cycle
//! of calls over more entities than the warm set holds keeps the warm set
//! warm instead of flushing it; a shift of the whole working set (most calls
//! refused) admits newcomers as LRU would for a while.

use super::admission::FrequencySketch;
use super::meta::MetaCache;
use super::turn::{InFlight, Queued};
use super::{Inner, Scheduler};
use crate::model::EntityRef;
use crate::registry::LoadedVersion;
use crate::runtime::{Instance, RuntimeError};
use crate::storage::Overlay;
use lru::LruCache;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Slots one eviction pass looks at, least recently used first: the pass
/// runs under the slot map's lock.
const EVICT_SCAN: usize = 4096;
/// Idle instances an instantiation that found no room evicts at least.
const EVICT_BATCH: usize = 16;
/// Guest memory an instantiation that found no room frees at least.
const EVICT_HEADROOM_BYTES: usize = 64 << 20;

/// Every active entity's slot: the warm ones, and the passing ones the
/// admission policy gave no warm place.
pub(super) struct Slots {
    /// Least recently used last; at most `scheduler.max_resident_instances`
    /// (more only while every slot near the end is busy).
    warm: LruCache<EntityRef, Arc<Slot>>,
    /// Slots of entities running turns without a warm place. Each goes at
    /// the next placement or eviction pass after it became idle, so this
    /// holds about as many as there are turns running (and in-doubt ones).
    passing: HashMap<EntityRef, Arc<Slot>>,
    calls: FrequencySketch,
}

impl Slots {
    pub(super) fn new(warm_capacity: usize) -> Self {
        Self { warm: LruCache::unbounded(), passing: HashMap::new(), calls: FrequencySketch::new(warm_capacity) }
    }

    /// Slots of active entities, warm and passing.
    pub(super) fn len(&self) -> usize {
        self.warm.len() + self.passing.len()
    }

    #[cfg(test)]
    pub(super) fn peek(&self, entity: &EntityRef) -> Option<&Arc<Slot>> {
        self.warm.peek(entity).or_else(|| self.passing.get(entity))
    }

    /// Takes the idle passing slots out, to be dropped outside the lock.
    fn sweep_passing(&mut self, gone: &mut Vec<Arc<Slot>>) {
        let idle: Vec<EntityRef> = self.passing.iter().filter(|(_, s)| idle(s)).map(|(k, _)| k.clone()).collect();
        gone.extend(idle.iter().filter_map(|k| self.passing.remove(k)));
    }

    /// The least recently used idle warm entity among the last
    /// [`VICTIM_SCAN`] (the one a newcomer would replace).
    fn victim(&self) -> Option<EntityRef> {
        self.warm.iter().rev().take(VICTIM_SCAN).find(|(_, s)| idle(s)).map(|(k, _)| k.clone())
    }
}

/// No one holds the slot (no turn, no waiter) and it is not in doubt: it
/// may leave the slot maps.
fn idle(slot: &Arc<Slot>) -> bool {
    Arc::strong_count(slot) == 1 && slot.evictable()
}

/// An idle slot that still keeps a warm instance.
fn holds_instance(slot: &Slot) -> bool {
    slot.state.try_lock().is_ok_and(|s| s.resident.is_some())
}

/// Warm slots from the least recently used end a placement looks at for
/// one it may replace: the look runs under the slot map's lock.
const VICTIM_SCAN: usize = 64;

pub(super) struct Slot {
    /// The entity's lock: held for a whole batch of turns, execution to
    /// placing its write set in the log, and while answering batches whose
    /// commits ended. Only its holder takes invocations out of `mailbox`.
    pub(super) state: tokio::sync::Mutex<SlotState>,
    /// Invocations waiting for a turn, in arrival order (at most
    /// `scheduler.mailbox_depth`): the lock's holder runs them in batches.
    pub(super) mailbox: std::sync::Mutex<VecDeque<Queued>>,
    pub(super) last_used_ms: AtomicU64,
    /// Among the passing slots: the lock's last holder drops its instance
    /// (the warm set's bound counts only warm slots' instances).
    pub(super) passing: AtomicBool,
    /// Signalled when the mailbox fills a batch
    /// (`scheduler.max_turns_per_commit`): a holder waiting for a commit in
    /// flight runs it meanwhile.
    pub(super) full: tokio::sync::Notify,
}

impl Slot {
    /// Takes up to `max` waiting invocations, oldest first (by the lock's holder).
    pub(super) fn take_batch(&self, max: usize) -> Vec<Queued> {
        let mut mailbox = self.mailbox.lock().unwrap_or_else(|p| p.into_inner());
        let n = max.min(mailbox.len());
        mailbox.drain(..n).collect()
    }

    /// Invocations waiting in the mailbox.
    pub(super) fn waiting(&self) -> usize {
        self.mailbox.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Puts invocations a batch had no room for back at the front, in order.
    pub(super) fn put_back(&self, left: Vec<Queued>) {
        let mut mailbox = self.mailbox.lock().unwrap_or_else(|p| p.into_inner());
        for q in left.into_iter().rev() {
            mailbox.push_front(q);
        }
    }

    /// Called by the lock's holder before it lets go: a passing slot's
    /// instance goes unless more invocations wait for it.
    pub(super) fn release_instance_if_passing(&self, state: &mut SlotState) {
        if self.passing.load(Ordering::Relaxed) && self.mailbox.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
            state.resident = None;
        }
    }

    /// Idle (no turn holds it) and not in doubt: a slot in doubt must be
    /// kept until a turn resolves the doubt.
    pub(super) fn evictable(&self) -> bool {
        self.state.try_lock().is_ok_and(|s| !s.in_doubt && s.in_flight.is_empty())
    }
}

#[derive(Default)]
pub(super) struct SlotState {
    /// The leadership term the cached instance and meta were read under.
    pub(super) epoch: u64,
    pub(super) resident: Option<Resident>,
    /// The entity's meta record; `None` until read from the store.
    pub(super) meta: Option<MetaCache>,
    /// A turn's write set failed to commit with an unknown outcome (a commit
    /// timeout): it may still commit. Until a later proposal commits behind
    /// it, the store may lack it, and a turn reading the store would write
    /// over it — a lost update (found by the cluster simulation).
    pub(super) in_doubt: bool,
    /// Batches whose write sets hold their place in the log and have not
    /// been answered, oldest first (`scheduler.pipelined_commits` at most).
    pub(super) in_flight: VecDeque<InFlight>,
    /// Their writes, which the next batch reads through (each retired once
    /// applied); `None` when none is in flight.
    pub(super) uncommitted: Option<Arc<Overlay>>,
    /// Batches of this slot that wrote: the tag of the next one's writes.
    pub(super) batches: u64,
}

/// A warm instance and the version it was made from.
pub(super) struct Resident {
    pub(super) version: Arc<LoadedVersion>,
    pub(super) instance: Instance,
    pub(super) _count: ResidentCount,
}

/// Keeps the resident-instance gauge exact whichever way an instance goes.
pub(super) struct ResidentCount(Arc<AtomicUsize>);

impl ResidentCount {
    pub(super) fn new(c: &Arc<AtomicUsize>) -> Self {
        c.fetch_add(1, Ordering::Relaxed);
        Self(c.clone())
    }
}

impl Drop for ResidentCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Scheduler {
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
    /// The entity's slot, created if needed. A full warm set gives a new
    /// entity a warm place only if it was called more often lately than the
    /// least recently used idle warm entity, which then goes; otherwise the
    /// new slot is a passing one. Slots that go are dropped after the lock is
    /// released (a warm instance's drop is most of an eviction's cost).
    pub(super) fn slot(&self, entity: &EntityRef) -> Arc<Slot> {
        let now = self.now_ms();
        let mut gone = Vec::new();
        let s = {
            let mut slots = self.slots.lock().expect("slots lock");
            slots.calls.record(entity);
            if let Some(s) = slots.warm.get(entity) {
                s.last_used_ms.store(now, Ordering::Relaxed);
                return s.clone();
            }
            // Its own passing slot is taken first: its instance may still be warm.
            let own = slots.passing.remove(entity);
            slots.sweep_passing(&mut gone);
            let s = match own {
                Some(s) => {
                    s.last_used_ms.store(now, Ordering::Relaxed);
                    s
                }
                None => Arc::new(Slot {
                    state: tokio::sync::Mutex::new(SlotState::default()),
                    mailbox: std::sync::Mutex::new(VecDeque::new()),
                    last_used_ms: AtomicU64::new(now),
                    passing: AtomicBool::new(false),
                    full: tokio::sync::Notify::new(),
                }),
            };
            self.place(&mut slots, entity, s.clone(), &mut gone);
            s
        };
        // Passing slots usually gave their instance back when their turn ended.
        let evicted = gone.iter().filter(|g| holds_instance(g)).count();
        crate::telemetry::metrics().evictions.inc_by(evicted as u64);
        drop(gone);
        s
    }

    /// Gives `slot` (of `entity`, in neither map) a warm place, or a passing one.
    fn place(&self, slots: &mut Slots, entity: &EntityRef, slot: Arc<Slot>, gone: &mut Vec<Arc<Slot>>) {
        let max = self.cfg.max_resident_instances;
        // Over the bound only while every slot near the end was busy.
        while slots.warm.len() >= max {
            let Some(victim) = slots.victim() else { break };
            if !slots.calls.shifted() && slots.calls.frequency(entity) <= slots.calls.frequency(&victim) {
                slots.calls.refused();
                slot.passing.store(true, Ordering::Relaxed);
                slots.passing.insert(entity.clone(), slot);
                return;
            }
            gone.extend(slots.warm.pop(&victim));
        }
        slot.passing.store(false, Ordering::Relaxed);
        slots.warm.put(entity.clone(), slot);
    }

    pub(super) fn evict_idle(&self, idle_ms: u64) -> usize {
        let now = self.now_ms();
        let mut gone = Vec::new();
        let mut slots = self.slots.lock().expect("slots lock");
        slots.sweep_passing(&mut gone);
        let victims: Vec<EntityRef> = slots
            .warm
            .iter()
            .rev()
            .take(4096)
            .take_while(|(_, s)| now.saturating_sub(s.last_used_ms.load(Ordering::Relaxed)) >= idle_ms)
            .filter(|(_, s)| idle(s))
            .map(|(k, _)| k.clone())
            .collect();
        let evicted = gone.iter().filter(|g| holds_instance(g)).count() + victims.len();
        gone.extend(victims.iter().filter_map(|k| slots.warm.pop(k)));
        drop(slots);
        crate::telemetry::metrics().evictions.inc_by(evicted as u64);
        evicted
    }

    /// Instantiates `prepared` for `entity`; when the node has no room (pool
    /// slots or guest memory), evicts idle warm instances and tries again.
    pub(super) async fn instantiate_with_room(
        &self,
        prepared: &crate::runtime::Prepared,
        entity: &EntityRef,
    ) -> Result<Instance, RuntimeError> {
        let mut tries = 0;
        loop {
            match self.runtime.instantiate(prepared, entity).await {
                Err(RuntimeError::Exhausted { .. }) if tries < 3 => {
                    tries += 1;
                    let room = self.runtime.guest_memory().limit().saturating_sub(EVICT_HEADROOM_BYTES);
                    if self.evict_warm(room, EVICT_BATCH) == 0 {
                        return self.runtime.instantiate(prepared, entity).await;
                    }
                }
                other => return other,
            }
        }
    }

    /// Keeps the memory of warm instances under `scheduler.max_warm_memory_bytes`.
    pub(super) fn bound_warm_memory(&self) {
        let limit = self.cfg.max_warm_memory_bytes as usize;
        if self.runtime.guest_memory().used() > limit {
            self.evict_warm(limit, 0);
        }
    }

    /// Evicts idle entities (their slots and warm instances), least recently
    /// used first, until the node's guest memory is at most `target_bytes` and
    /// at least `min_count` instances went (or no idle entity is left among
    /// the slots looked at). Returns how many instances went.
    pub(super) fn evict_warm(&self, target_bytes: usize, min_count: usize) -> usize {
        let memory = self.runtime.guest_memory();
        let mut slots = self.slots.lock().expect("slots lock");
        let mut passing = Vec::new();
        slots.sweep_passing(&mut passing);
        let mut dropped = 0;
        for slot in passing {
            if slot.state.try_lock().is_ok_and(|mut s| s.resident.take().is_some()) {
                dropped += 1;
            }
        }
        let mut victims = Vec::new();
        for (entity, slot) in slots.warm.iter().rev().take(EVICT_SCAN) {
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
            slots.warm.pop(entity);
        }
        crate::telemetry::metrics().evictions.inc_by(dropped as u64);
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::scheduler::test_support::{Harness, call};

    fn counter(i: usize) -> EntityRef {
        EntityRef::new("counter", format!("c{i}")).unwrap()
    }

    /// Calls in a cycle over more entities than the warm set holds keep the
    /// warm set warm (plain LRU made every call instantiate), and an entity
    /// called more often than the warm ones gets a warm place.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cycle_longer_than_the_warm_set_keeps_it_warm_and_a_hot_newcomer_gets_in() {
        const WARM: usize = 32;
        const CYCLE: usize = 48;
        const ROUNDS: usize = 10;
        let mut cfg = Config::default();
        cfg.scheduler.max_resident_instances = WARM;
        let h = Harness::new(cfg, &[("counter", "counter")]).await;
        for _ in 0..ROUNDS {
            for i in 0..CYCLE {
                h.scheduler.invoke_here(call(&counter(i), "get", "")).await.unwrap();
            }
        }
        let made = h.scheduler.stats().instantiations as usize;
        // The first round makes every instance; then about only the
        // entities without a warm place make theirs again (the sketch's
        // estimates are approximate: a few more may change places).
        assert!(
            made <= CYCLE + (ROUNDS - 1) * (CYCLE - WARM) + CYCLE,
            "{made} instantiations for {} calls (LRU makes one per call)",
            ROUNDS * CYCLE
        );
        let resident = h.scheduler.stats().resident_instances;
        assert!(resident <= WARM, "{resident} instances kept: a passing entity's was not dropped");
        let hot = counter(1000);
        for _ in 0..2 * ROUNDS {
            h.scheduler.invoke_here(call(&hot, "get", "")).await.unwrap();
        }
        let slots = h.scheduler.inner.slots.lock().unwrap();
        assert!(slots.warm.contains(&hot), "an entity called more than any warm one was not admitted");
        assert!(slots.warm.len() <= WARM, "{} warm slots", slots.warm.len());
        assert!(slots.passing.len() <= 1, "{} passing slots left", slots.passing.len());
    }

    /// When the whole working set moves (every call now goes to entities the
    /// warm set does not hold), the new entities are warm within a few passes
    /// instead of waiting until their counts outgrow the old ones'.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_working_set_is_warm_within_a_few_passes() {
        const WARM: usize = 32;
        let mut cfg = Config::default();
        cfg.scheduler.max_resident_instances = WARM;
        let h = Harness::new(cfg, &[("counter", "counter")]).await;
        let pass = |base: usize| {
            let h = &h;
            async move {
                for i in base..base + WARM {
                    h.scheduler.invoke_here(call(&counter(i), "get", "")).await.unwrap();
                }
            }
        };
        // The old set, called often enough to saturate its counts.
        for _ in 0..15 {
            pass(0).await;
        }
        for _ in 0..3 {
            pass(1000).await;
        }
        let before = h.scheduler.stats().instantiations;
        pass(1000).await;
        let made = h.scheduler.stats().instantiations - before;
        assert_eq!(made, 0, "the fourth pass over the new set still instantiated {made} of {WARM}");
    }
}
