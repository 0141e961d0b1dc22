//! How often entities were called lately, approximately and in bounded
//! memory: the frequency sketch of TinyLFU (Einziger, Friedman and Manes,
//! "TinyLFU: A Highly Efficient Cache Admission Policy"). The warm set
//! admits an entity in place of its least recently used one only if the
//! newcomer was called more often. Plain LRU keeps nothing of a cycle of
//! calls longer than itself; with admission the warm set keeps what fits.
//!
//! A shift of the whole working set is told apart from such a cycle by how
//! many calls the warm set refuses: when more than three in four of the
//! last warm set's worth of calls were refused, the warm entities are no
//! longer the ones called, and their old counts would keep the new ones out
//! for several periods; the next warm set's worth admits every newcomer
//! (plain LRU) instead.

use crate::model::EntityRef;
use std::hash::BuildHasher;

/// Counters a key is spread over; its estimate is the least of them.
const DEPTH: usize = 4;
/// A counter stops here (4 bits' worth, as in TinyLFU): enough to tell
/// hot from cold, and halving forgets old heat quickly.
const COUNTER_MAX: u8 = 15;

/// A count-min sketch of recent calls with periodic halving ("aging").
pub(super) struct FrequencySketch {
    counters: Vec<u8>,
    /// `counters.len() / DEPTH - 1`; each row's width is a power of two.
    mask: usize,
    hasher: std::collections::hash_map::RandomState,
    recorded: u64,
    /// Records between two halvings: ten per entity the warm set holds, so
    /// an estimate reflects about the last ten passes over the warm set.
    sample: u64,
    /// Records per look at the refusals: the warm set's size.
    window: u64,
    /// Records and refused admissions since the last look.
    in_window: u64,
    refused: u64,
    /// The last window refused most calls: the working set moved.
    shifted: bool,
}

impl FrequencySketch {
    /// A sketch for a warm set of `capacity` entities (about 8 bytes each,
    /// 4 KiB at least: a small warm set's estimates would collide often).
    pub(super) fn new(capacity: usize) -> Self {
        let width = capacity.max(512).next_power_of_two() * 2;
        Self {
            counters: vec![0; width * DEPTH],
            mask: width - 1,
            hasher: std::collections::hash_map::RandomState::new(),
            recorded: 0,
            sample: 10 * capacity.max(16) as u64,
            window: capacity.max(16) as u64,
            in_window: 0,
            refused: 0,
            shifted: false,
        }
    }

    /// Counts an entity the warm set did not admit.
    pub(super) fn refused(&mut self) {
        self.refused += 1;
    }

    /// Whether the working set moved: the last warm set's worth of calls
    /// was refused three in four times or more; newcomers are admitted
    /// regardless of their counts until a window refuses less.
    pub(super) fn shifted(&self) -> bool {
        self.shifted
    }

    fn slots(&self, entity: &EntityRef) -> [usize; DEPTH] {
        let h = self.hasher.hash_one(entity);
        // Kirsch–Mitzenmacher: DEPTH indices from two halves of one hash.
        let (a, b) = (h as usize, (h >> 32) as usize | 1);
        std::array::from_fn(|row| row * (self.mask + 1) + (a.wrapping_add(row.wrapping_mul(b)) & self.mask))
    }

    /// Counts one call of `entity`.
    pub(super) fn record(&mut self, entity: &EntityRef) {
        for i in self.slots(entity) {
            self.counters[i] = (self.counters[i] + 1).min(COUNTER_MAX);
        }
        self.recorded += 1;
        self.in_window += 1;
        if self.in_window >= self.window {
            // A cycle longer than the warm set is refused far less: one call
            // in five for 10,000 keys over 8,000 warm.
            self.shifted = self.refused * 4 > self.in_window * 3;
            (self.in_window, self.refused) = (0, 0);
        }
        if self.recorded >= self.sample {
            for c in &mut self.counters {
                *c /= 2;
            }
            self.recorded /= 2;
        }
    }

    /// About how often `entity` was called lately (never less than the truth
    /// since the last halving, up to [`COUNTER_MAX`]).
    pub(super) fn frequency(&self, entity: &EntityRef) -> u8 {
        self.slots(entity).into_iter().map(|i| self.counters[i]).min().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(i: usize) -> EntityRef {
        EntityRef::new("counter", format!("k{i}")).unwrap()
    }

    #[test]
    fn a_frequent_entity_estimates_above_a_rare_one_and_old_heat_fades() {
        let mut s = FrequencySketch::new(1000);
        for _ in 0..8 {
            s.record(&e(1));
        }
        s.record(&e(2));
        assert!(s.frequency(&e(1)) >= 8);
        assert!(s.frequency(&e(1)) > s.frequency(&e(2)));
        assert_eq!(s.frequency(&e(3)), 0, "a sketch this sparse has no collisions for three keys");
        // Ten thousand other calls halve the counters at least once.
        for i in 0..10_000 {
            s.record(&e(100 + i % 5000));
        }
        assert!(s.frequency(&e(1)) < 8, "old heat did not fade: {}", s.frequency(&e(1)));
    }

    /// A warm set's worth of calls refused more than three in four times
    /// marks the working set as moved, until a window refuses less; a
    /// cycle refused one call in three never does.
    #[test]
    fn most_calls_refused_for_a_window_mark_a_shift_until_one_is_not() {
        const CAP: usize = 100;
        let mut s = FrequencySketch::new(CAP);
        for n in 0..10 * CAP {
            s.record(&e(n % 150));
            if n % 3 == 0 {
                s.refused();
            }
            assert!(!s.shifted(), "a cycle refused one call in three marked a shift");
        }
        for n in 0..CAP {
            s.record(&e(1000 + n));
            s.refused();
        }
        assert!(s.shifted());
        for n in 0..CAP {
            s.record(&e(1000 + n));
        }
        assert!(!s.shifted(), "a window that refused nothing kept the shift");
    }
}
