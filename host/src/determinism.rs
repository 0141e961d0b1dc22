//! The three things a node's behaviour depends on besides its inputs — the
//! wall clock, work handed to other threads, and the randomness of Raft
//! election timeouts — and the switch that pins all three for a simulation.
//!
//! A daemon never flips the switch: it reads the system clock, runs blocking
//! work (store scans, compiles) on tokio's blocking pool, lets the Raft
//! log's flush worker call back when a write is on disk, and draws election
//! timeouts from an entropy-seeded generator.
//!
//! A simulation (turmoil: one thread steps every node through simulated
//! time) calls [`simulate`] on that thread first. From then on, on that
//! thread only: the clock is the simulation's; blocking work runs inline, so
//! it ends in the simulated instant it began in however fast the real
//! machine is; guest code does not yield its thread at the real epoch
//! ticks; the Raft log waits for its own writes; and election timeouts
//! come from a generator seeded by the simulation's seed. With turmoil's
//! seeded network and seeded tokio runtimes (the workspace builds with
//! `--cfg tokio_unstable` for that), a seed then replays exactly. Node code
//! keeps its part of the bargain by iterating ordered maps (`BTreeMap`),
//! never a `HashMap`, whose order changes with every process.

use std::cell::{Cell, RefCell};

thread_local! {
    /// The simulation's clock (Unix milliseconds), if this thread runs one.
    static SIMULATED_CLOCK: Cell<Option<fn() -> u64>> = const { Cell::new(None) };
    /// This thread's generator for Raft's election timeouts; seeded from
    /// entropy on first use unless a simulation seeded it.
    static RAFT_RNG: RefCell<Option<rand08::rngs::StdRng>> = const { RefCell::new(None) };
}

/// Pins this thread's clock, blocking work and Raft randomness for a
/// simulation with `seed`, whose clock `unix_ms` reads. Call it on the thread
/// that steps the simulation, before any node starts; [`end_simulation`]
/// undoes it.
pub fn simulate(seed: u64, unix_ms: fn() -> u64) {
    use rand08::SeedableRng;
    SIMULATED_CLOCK.with(|c| c.set(Some(unix_ms)));
    RAFT_RNG.with(|r| *r.borrow_mut() = Some(rand08::rngs::StdRng::seed_from_u64(seed)));
}

/// Returns this thread to the daemon's behaviour.
pub fn end_simulation() {
    SIMULATED_CLOCK.with(|c| c.set(None));
    RAFT_RNG.with(|r| *r.borrow_mut() = None);
}

/// Whether this thread runs a simulation.
pub fn simulated() -> bool {
    SIMULATED_CLOCK.with(Cell::get).is_some()
}

/// Wall-clock time in Unix milliseconds (0 if the clock is before 1970): the
/// simulation's on a simulating thread.
pub fn unix_ms() -> u64 {
    if let Some(clock) = SIMULATED_CLOCK.with(Cell::get) {
        return clock();
    }
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Runs blocking work off the async threads (tokio's blocking pool), or
/// inline on a simulating thread.
pub async fn blocking<F, R>(f: F) -> Result<R, tokio::task::JoinError>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    if simulated() { Ok(f()) } else { tokio::task::spawn_blocking(f).await }
}

/// openraft's source of randomness (election timeouts): this thread's
/// generator. It holds no state itself, so openraft may make one per draw.
#[derive(Debug, Default, Clone, Copy)]
pub struct RaftRng;

impl RaftRng {
    fn with<T>(f: impl FnOnce(&mut rand08::rngs::StdRng) -> T) -> T {
        use rand08::SeedableRng;
        RAFT_RNG.with(|r| f(r.borrow_mut().get_or_insert_with(rand08::rngs::StdRng::from_entropy)))
    }
}

impl rand08::RngCore for RaftRng {
    fn next_u32(&mut self) -> u32 {
        Self::with(|r| r.next_u32())
    }

    fn next_u64(&mut self) -> u64 {
        Self::with(|r| r.next_u64())
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        Self::with(|r| r.fill_bytes(dest))
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand08::Error> {
        Self::with(|r| r.try_fill_bytes(dest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand08::Rng;

    fn fixed_clock() -> u64 {
        1_234
    }

    #[test]
    fn a_simulation_pins_the_clock_and_the_raft_draws_to_its_seed() {
        let draws = |seed| {
            simulate(seed, fixed_clock);
            let d: Vec<u64> = (0..4).map(|_| RaftRng.gen_range(200..400)).collect();
            assert_eq!(unix_ms(), 1_234);
            end_simulation();
            d
        };
        assert_eq!(draws(7), draws(7), "one seed, one sequence");
        assert_ne!(draws(7), draws(8));
        assert!(!simulated());
        assert!(unix_ms() > 1_600_000_000_000, "the daemon reads the system clock");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn simulated_blocking_work_runs_inline() {
        let here = std::thread::current().id();
        simulate(1, fixed_clock);
        let inline = blocking(move || std::thread::current().id()).await.unwrap();
        end_simulation();
        let pooled = blocking(move || std::thread::current().id()).await.unwrap();
        assert_eq!(inline, here);
        assert_ne!(pooled, here);
    }
}
