//! The mailboxes and the warm-instance cache: one [`Slot`] per active
//! entity (its bounded queue of waiting invocations, its lock, what it caches under that lock — a warm
//! [`Resident`] instance and the entity's meta — and whether a commit of it is
//! in doubt), kept in an LRU bounded by count; warm instances are also bounded
//! by the guest memory they hold and evicted when idle. An instantiation that
//! finds the node full evicts idle instances first.

use super::meta::MetaCache;
use super::turn::Queued;
use super::{Inner, Scheduler};
use crate::model::EntityRef;
use crate::registry::LoadedVersion;
use crate::runtime::{Instance, RuntimeError};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Slots one eviction pass looks at, least recently used first: the pass
/// runs under the slot map's lock.
const EVICT_SCAN: usize = 4096;
/// Idle instances an instantiation that found no room evicts at least.
const EVICT_BATCH: usize = 16;
/// Guest memory an instantiation that found no room frees at least.
const EVICT_HEADROOM_BYTES: usize = 64 << 20;

pub(super) struct Slot {
    /// The entity's lock: held for a whole batch of turns, execution to
    /// commit and answers. Only its holder takes invocations out of `mailbox`.
    pub(super) state: tokio::sync::Mutex<SlotState>,
    /// Invocations waiting for a turn, in arrival order (at most
    /// `scheduler.mailbox_depth`): the lock's holder runs them in batches.
    pub(super) mailbox: std::sync::Mutex<VecDeque<Queued>>,
    pub(super) last_used_ms: AtomicU64,
}

impl Slot {
    /// Takes up to `max` waiting invocations, oldest first (by the lock's holder).
    pub(super) fn take_batch(&self, max: usize) -> Vec<Queued> {
        let mut mailbox = self.mailbox.lock().unwrap_or_else(|p| p.into_inner());
        let n = max.min(mailbox.len());
        mailbox.drain(..n).collect()
    }

    /// Puts invocations a batch had no room for back at the front, in order.
    pub(super) fn put_back(&self, left: Vec<Queued>) {
        let mut mailbox = self.mailbox.lock().unwrap_or_else(|p| p.into_inner());
        for q in left.into_iter().rev() {
            mailbox.push_front(q);
        }
    }

    /// Idle (no turn holds it) and not in doubt: a slot in doubt must be
    /// kept until a turn resolves the doubt.
    pub(super) fn evictable(&self) -> bool {
        self.state.try_lock().is_ok_and(|s| !s.in_doubt)
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
    /// The entity's slot, created if needed; evicts least recently used idle
    /// slots beyond the resident bound.
    pub(super) fn slot(&self, entity: &EntityRef) -> Arc<Slot> {
        let now = self.now_ms();
        let mut slots = self.slots.lock().expect("slots lock");
        if let Some(s) = slots.get(entity) {
            s.last_used_ms.store(now, Ordering::Relaxed);
            return s.clone();
        }
        let s = Arc::new(Slot {
            state: tokio::sync::Mutex::new(SlotState::default()),
            mailbox: std::sync::Mutex::new(VecDeque::new()),
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

    pub(super) fn evict_idle(&self, idle_ms: u64) -> usize {
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
}
