//! The WASI a guest sees: exactly the inert interfaces of
//! [`INERT_WASI_INTERFACES`](super::INERT_WASI_INTERFACES) and nothing else,
//! so a component importing anything more cannot even link; and the only
//! interfaces through which a guest can wait — `wasi:clocks/monotonic-clock`'s
//! subscriptions and `wasi:io/poll` — implemented here so that waiting obeys
//! the turn's wall-clock deadline.
//!
//! What a wait means in a turn (README "Limits"): a guest may sleep or poll
//! while its turn has time left; the wait counts against the turn's deadline
//! (`runtime.turn_timeout_ms`), and the turn gives its turn slot (one of the
//! node's `scheduler.turn_threads`) back while it waits, so sleeping guests
//! never keep other entities from running. A wait that cannot end before the
//! deadline — a sleep past it, or a poll of nothing that will become ready —
//! traps at once with `timeout`; any other wait is cut off at the deadline
//! with `timeout`. With no wall-clock budget (`turn_timeout_ms = 0`) nothing
//! bounds a wait, so every wait that would block traps at once.
//!
//! Turns are futures on the node's async threads, so every wait is async:
//! a waiting guest suspends, its thread runs other tasks.
//!
//! The other inert interfaces come from `wasmtime-wasi` unchanged: they never
//! block here (stdin is closed, stdout/stderr accept every write at once) and
//! their allocations are bounded (random bytes by `MAX_RANDOM_BYTES`, stream
//! writes by `check-write`, resources by the instance's table capacity).
//! `wasi:filesystem` and `wasi:sockets` are among them because Rust's std and
//! the TypeScript and Python interpreters import them, but nothing stands
//! behind them: the context preopens no directory (so no descriptor can be
//! had) and allows no TCP, UDP or name lookup (so every socket is refused
//! with `access-denied` before one exists); neither can block or do I/O.

use super::{HostState, TrapKind};
use futures::future::BoxFuture;
use std::collections::HashMap;
use std::future::Future;
use std::pin::pin;
use std::task::Poll;
use std::time::{Duration, Instant};
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};
use wasmtime_wasi::filesystem::{WasiFilesystem, WasiFilesystemView as _};
use wasmtime_wasi::p2::bindings::io::poll::{Host as AsyncPoll, HostPollable as AsyncPollable};
use wasmtime_wasi::p2::bindings::{cli, clocks, filesystem, io, random, sockets};
use wasmtime_wasi::p2::{DynPollable, Pollable};
use wasmtime_wasi::sockets::{WasiSockets, WasiSocketsView as _};
use wasmtime_wasi::{HostMonotonicClock, WasiView};

/// Largest `get-random-bytes` / `get-insecure-random-bytes` request: the host
/// allocates what the guest asks for before the guest receives it.
pub(super) const MAX_RANDOM_BYTES: u64 = 1 << 20;

/// Resources (streams, pollables, errors) one instance may hold at once; a
/// guest that leaks them traps instead of growing host memory.
pub(super) const MAX_RESOURCES: usize = 4096;

/// A turn's hold on one of the node's turn slots. The runtime gives it back
/// while the guest waits in a host call and takes it again before guest code
/// runs on.
pub trait TurnSlot: Send {
    /// The guest is about to wait: let another turn run meanwhile.
    fn release(&mut self);
    /// The wait is over: hold a slot again (resolves once one is free).
    fn reacquire(&mut self) -> BoxFuture<'_, ()>;
}

/// A slot that is not shared with anything (dry runs, tests, benches).
#[derive(Debug, Default)]
pub struct NoSlot;

impl TurnSlot for NoSlot {
    fn release(&mut self) {}
    fn reacquire(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }
}

/// The instance's monotonic clock: nanoseconds since the instance was made.
/// Owning it lets the host turn a guest's `subscribe-instant` into a real
/// instant to compare with the turn's deadline.
#[derive(Clone, Copy)]
pub(super) struct GuestClock {
    origin: Instant,
}

impl GuestClock {
    pub(super) fn new() -> Self {
        Self { origin: Instant::now() }
    }

    fn instant_of(&self, nanos: u64) -> Instant {
        // Beyond what `Instant` can hold is "never", which any deadline precedes.
        self.origin.checked_add(Duration::from_nanos(nanos)).unwrap_or_else(far_future)
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600)
}

impl HostMonotonicClock for GuestClock {
    fn resolution(&self) -> u64 {
        1
    }

    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// What a turn's waits are measured against: set when the turn starts.
#[derive(Default)]
pub(super) struct Waits {
    /// When the turn's wall-clock budget ends; `None` with no budget.
    pub(super) deadline: Option<Instant>,
    /// The turn's slot while it runs; `None` between turns.
    pub(super) slot: Option<Box<dyn TurnSlot>>,
    /// When each clock pollable the guest holds becomes ready, by resource
    /// rep. Pollables not listed (streams) may become ready at any time.
    wakes: HashMap<u32, Instant>,
}

/// A clock subscription: ready at `at`.
struct Sleep {
    at: Instant,
}

#[wasmtime_wasi::async_trait]
impl Pollable for Sleep {
    async fn ready(&mut self) {
        if Instant::now() < self.at {
            tokio::time::sleep_until(self.at.into()).await;
        }
    }
}

/// The data the clock and poll implementations work on: the instance's
/// resource table, its clock and the turn's waits, borrowed from the store.
pub(super) struct TurnWaitsView<'a> {
    table: &'a mut ResourceTable,
    clock: GuestClock,
    waits: &'a mut Waits,
    breach: &'a mut Option<(TrapKind, String)>,
    turn_timeout_ms: u64,
}

struct TurnWaits;

impl HasData for TurnWaits {
    type Data<'a> = TurnWaitsView<'a>;
}

fn view(s: &mut HostState) -> TurnWaitsView<'_> {
    TurnWaitsView {
        table: &mut s.table,
        clock: s.clock,
        waits: &mut s.waits,
        breach: &mut s.breach,
        turn_timeout_ms: s.cfg.turn_timeout_ms,
    }
}

/// Links the inert WASI interfaces, and only those.
pub(super) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    use wasmtime_wasi::cli::WasiCli;
    use wasmtime_wasi::clocks::WasiClocks;
    use wasmtime_wasi::random::WasiRandom;
    let l = linker;
    wasmtime_wasi::p2::bindings::io::error::add_to_linker::<HostState, Table>(l, |s| &mut s.table)?;
    io::streams::add_to_linker::<HostState, Table>(l, |s| &mut s.table)?;
    io::poll::add_to_linker::<HostState, TurnWaits>(l, view)?;
    clocks::monotonic_clock::add_to_linker::<HostState, TurnWaits>(l, view)?;
    clocks::wall_clock::add_to_linker::<HostState, WasiClocks>(l, |s| {
        wasmtime_wasi::clocks::WasiClocksView::clocks(s)
    })?;
    random::random::add_to_linker::<HostState, WasiRandom>(l, |s| s.ctx().ctx.random())?;
    random::insecure::add_to_linker::<HostState, WasiRandom>(l, |s| s.ctx().ctx.random())?;
    random::insecure_seed::add_to_linker::<HostState, WasiRandom>(l, |s| s.ctx().ctx.random())?;
    cli::environment::add_to_linker::<HostState, WasiCli>(l, cli_view)?;
    cli::exit::add_to_linker::<HostState, WasiCli>(l, cli_view)?;
    cli::stdin::add_to_linker::<HostState, WasiCli>(l, cli_view)?;
    cli::stdout::add_to_linker::<HostState, WasiCli>(l, cli_view)?;
    cli::stderr::add_to_linker::<HostState, WasiCli>(l, cli_view)?;
    cli::terminal_input::add_to_linker::<HostState, WasiCli>(l, cli_view)?;
    cli::terminal_output::add_to_linker::<HostState, WasiCli>(l, cli_view)?;
    cli::terminal_stdin::add_to_linker::<HostState, WasiCli>(l, cli_view)?;
    cli::terminal_stdout::add_to_linker::<HostState, WasiCli>(l, cli_view)?;
    cli::terminal_stderr::add_to_linker::<HostState, WasiCli>(l, cli_view)?;
    // The context has no preopened directory: without one, no descriptor can
    // ever be obtained, so every filesystem call has nothing to act on.
    filesystem::types::add_to_linker::<HostState, WasiFilesystem>(l, |s| s.filesystem())?;
    filesystem::preopens::add_to_linker::<HostState, WasiFilesystem>(l, |s| s.filesystem())?;
    // The context allows no TCP, no UDP and no name lookup (see
    // `Runtime::instantiate`): creating a socket or resolving a name fails
    // with `access-denied` before any OS socket exists.
    sockets::tcp::add_to_linker::<HostState, WasiSockets>(l, |s| s.sockets())?;
    sockets::udp::add_to_linker::<HostState, WasiSockets>(l, |s| s.sockets())?;
    sockets::tcp_create_socket::add_to_linker::<HostState, WasiSockets>(l, |s| s.sockets())?;
    sockets::udp_create_socket::add_to_linker::<HostState, WasiSockets>(l, |s| s.sockets())?;
    sockets::instance_network::add_to_linker::<HostState, WasiSockets>(l, |s| s.sockets())?;
    sockets::network::add_to_linker::<HostState, WasiSockets>(l, &Default::default(), |s| s.sockets())?;
    sockets::ip_name_lookup::add_to_linker::<HostState, WasiSockets>(l, |s| s.sockets())?;
    Ok(())
}

fn cli_view(s: &mut HostState) -> wasmtime_wasi::cli::WasiCliCtxView<'_> {
    wasmtime_wasi::cli::WasiCliView::cli(s)
}

struct Table;

impl HasData for Table {
    type Data<'a> = &'a mut ResourceTable;
}

impl TurnWaitsView<'_> {
    fn subscribe_at(&mut self, at: Instant) -> wasmtime::Result<Resource<DynPollable>> {
        let sleep = self.table.push(Sleep { at })?;
        let pollable = wasmtime_wasi::p2::subscribe(self.table, sleep)?;
        self.waits.wakes.insert(pollable.rep(), at);
        Ok(pollable)
    }

    fn timeout(&mut self, message: String) -> wasmtime::Error {
        *self.breach = Some((TrapKind::Timeout, message.clone()));
        wasmtime::format_err!(message)
    }

    /// Runs a wait on `pollables` (readiness future `wait`) within the turn's
    /// deadline, with the turn's slot released while it waits.
    async fn bounded_wait<T>(
        table: &mut ResourceTable,
        waits: &mut Waits,
        earliest_wake: Option<Instant>,
        wait: impl FnOnce(&mut ResourceTable) -> std::pin::Pin<Box<dyn Future<Output = wasmtime::Result<T>> + Send + '_>>,
    ) -> Result<wasmtime::Result<T>, WaitRefused> {
        let deadline = waits.deadline;
        let slot = &mut waits.slot;
        let mut fut = pin!(wait(table));
        if let Poll::Ready(r) = futures::poll!(fut.as_mut()) {
            return Ok(r);
        }
        let Some(deadline) = deadline else { return Err(WaitRefused::NoBudget) };
        if earliest_wake.is_some_and(|at| at > deadline) {
            return Err(WaitRefused::PastDeadline);
        }
        if let Some(s) = slot.as_mut() {
            s.release();
        }
        let r = tokio::time::timeout_at(deadline.into(), fut).await;
        if let Some(s) = slot.as_mut() {
            s.reacquire().await;
        }
        r.map_err(|_| WaitRefused::DeadlineReached)
    }

    /// When the earliest of `pollables` becomes ready, if all of them are
    /// clock subscriptions (anything else may become ready at any time).
    fn earliest_wake(&self, pollables: &[u32]) -> Option<Instant> {
        pollables.iter().map(|rep| self.waits.wakes.get(rep).copied()).collect::<Option<Vec<_>>>()?.into_iter().min()
    }

    fn refused(&mut self, why: WaitRefused) -> wasmtime::Error {
        let budget = self.turn_timeout_ms;
        self.timeout(match why {
            WaitRefused::NoBudget => {
                "the guest waited (sleep or poll) in a turn without a wall-clock budget (runtime.turn_timeout_ms = 0)"
                    .to_owned()
            }
            WaitRefused::PastDeadline => format!(
                "the guest would sleep past its turn's deadline of {budget} ms (runtime.turn_timeout_ms); \
                 a turn cannot outwait its deadline: use send-after to act later"
            ),
            WaitRefused::DeadlineReached => {
                format!("the guest was still waiting (sleep or poll) when its turn's {budget} ms ran out (runtime.turn_timeout_ms)")
            }
        })
    }
}

/// Why a wait ended the turn.
enum WaitRefused {
    NoBudget,
    PastDeadline,
    DeadlineReached,
}

impl clocks::monotonic_clock::Host for TurnWaitsView<'_> {
    fn now(&mut self) -> wasmtime::Result<u64> {
        Ok(self.clock.now())
    }

    fn resolution(&mut self) -> wasmtime::Result<u64> {
        Ok(self.clock.resolution())
    }

    fn subscribe_instant(&mut self, when: u64) -> wasmtime::Result<Resource<DynPollable>> {
        let at = self.clock.instant_of(when);
        self.subscribe_at(at)
    }

    fn subscribe_duration(&mut self, duration: u64) -> wasmtime::Result<Resource<DynPollable>> {
        let at = Instant::now().checked_add(Duration::from_nanos(duration)).unwrap_or_else(far_future);
        self.subscribe_at(at)
    }
}

impl io::poll::Host for TurnWaitsView<'_> {
    async fn poll(&mut self, pollables: Vec<Resource<DynPollable>>) -> wasmtime::Result<Vec<u32>> {
        let reps: Vec<u32> = pollables.iter().map(Resource::rep).collect();
        let earliest = self.earliest_wake(&reps);
        match Self::bounded_wait(self.table, self.waits, earliest, |t| Box::pin(AsyncPoll::poll(t, pollables))).await {
            Ok(r) => r,
            Err(why) => Err(self.refused(why)),
        }
    }
}

impl io::poll::HostPollable for TurnWaitsView<'_> {
    async fn ready(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<bool> {
        AsyncPollable::ready(self.table, pollable).await
    }

    async fn block(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        let earliest = self.earliest_wake(&[pollable.rep()]);
        let wait =
            Self::bounded_wait(self.table, self.waits, earliest, |t| Box::pin(AsyncPollable::block(t, pollable)));
        match wait.await {
            Ok(r) => r,
            Err(why) => Err(self.refused(why)),
        }
    }

    fn drop(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        self.waits.wakes.remove(&pollable.rep());
        AsyncPollable::drop(self.table, pollable)
    }
}
