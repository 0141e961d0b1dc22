//! The Wasm runtime: wasmtime engine and linker, the host side of the `entity`
//! world's imports, resource limits, and running one turn on one instance.
//!
//! A turn is a future (the export is called with `call_async`): guest code
//! yields its thread at every epoch tick and waits suspend, so turns run on
//! the node's async threads with no hand-off. Its writes are buffered in
//! [`TurnState`] and returned as a [`TurnOutput`]; nothing here touches the
//! commit log. An instance whose turn
//! trapped is poisoned and must be dropped.

mod fn_cache;
mod host;
mod output;
mod wasi;

#[cfg(test)]
mod tests;

use crate::config::RuntimeConfig;
use crate::model::EntityRef;
use crate::storage::StateStore;
use std::sync::Arc;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};

pub use fn_cache::FunctionCache;
pub use host::{CancelledTimer, MemoryBudget, OutgoingMessage, ReplyIn, TurnEffects, TurnState};
pub use output::{GuestLogLine, GuestLogs};
pub use wasi::{NoSlot, TurnSlot};

wasmtime::component::bindgen!({
    world: "entity",
    path: "../wit",
    imports: { default: trappable },
    // A turn is a future on the node's async threads: the guest yields at
    // every epoch tick (see `arm_turn_limits`), so no thread hand-off is
    // needed to keep a long turn from holding an async thread.
    exports: { default: async },
});

use conflux::entity::types::CallError;

/// WASI interfaces the host provides locked down (DESIGN.md §5a), matched
/// without version: what a plain `cargo build --target wasm32-wasip2` guest
/// imports, and what interpreter-based guests (componentize-js, componentize-py)
/// import on top — `wasi:filesystem` with no preopened directory, so no path
/// can ever be opened, and `wasi:sockets` with every socket and name lookup
/// refused with `access-denied`. `wasi:http` and anything else stay unlinked:
/// a component importing them is refused at upload.
pub const INERT_WASI_INTERFACES: &[&str] = &[
    "wasi:io/error",
    "wasi:io/poll",
    "wasi:io/streams",
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
    "wasi:clocks/monotonic-clock",
    "wasi:clocks/wall-clock",
    "wasi:filesystem/types",
    "wasi:filesystem/preopens",
    "wasi:sockets/network",
    "wasi:sockets/instance-network",
    "wasi:sockets/tcp",
    "wasi:sockets/tcp-create-socket",
    "wasi:sockets/udp",
    "wasi:sockets/udp-create-socket",
    "wasi:sockets/ip-name-lookup",
];

/// The `conflux:entity` imports an entity may use.
pub const ENTITY_IMPORTS: &[&str] = &[
    "conflux:entity/types@0.1.0",
    "conflux:entity/state@0.1.0",
    "conflux:entity/context@0.1.0",
    "conflux:entity/messaging@0.1.0",
];

/// The export every entity must provide.
pub const HANDLER_EXPORT: &str = "conflux:entity/handler@0.1.0";

/// The optional export through which a new version migrates an entity's state.
pub const MIGRATION_EXPORT: &str = "conflux:entity/migration@0.1.0";

/// The guest's `migrate(from-version: u32) -> result<_, call-error>`.
type MigrateFunc = wasmtime::component::TypedFunc<(u32,), (Result<(), CallError>,)>;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot configure the wasm engine: {0}")]
    Engine(String),
    #[error("cannot instantiate entity {entity}: {message}")]
    Instantiate { entity: String, message: String },
    /// The node has no room for another instance right now: every pool slot
    /// is taken, or all guest memory is held (`runtime.max_instances`,
    /// `runtime.max_total_guest_memory_bytes`). Evicting idle instances may
    /// make room.
    #[error("no room for another instance of {entity}: {message}")]
    Exhausted { entity: String, message: String },
    #[error("component does not fit the entity world: {0}")]
    Link(String),
}

/// Why a trapped turn stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrapKind {
    /// The turn burned its fuel budget.
    OutOfFuel,
    /// The turn ran past its wall-clock budget.
    Timeout,
    /// The guest asked for more memory than its limit.
    OutOfMemory,
    /// The guest overflowed its wasm stack.
    StackOverflow,
    /// The guest broke a host limit (reply, key, value or write-set size).
    LimitExceeded,
    /// Any other trap: `unreachable` (Rust panics end here), bad memory access…
    Trap,
}

impl TrapKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TrapKind::OutOfFuel => "out-of-fuel",
            TrapKind::Timeout => "timeout",
            TrapKind::OutOfMemory => "out-of-memory",
            TrapKind::StackOverflow => "stack-overflow",
            TrapKind::LimitExceeded => "limit-exceeded",
            TrapKind::Trap => "trap",
        }
    }
}

/// A turn that did not succeed. Nothing of it may be committed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TurnError {
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("unknown operation: {0}")]
    UnknownOperation(String),
    #[error("entity refused: {0}")]
    Failed(String),
    /// The instance trapped and has been poisoned.
    #[error("{}: {message}", kind.as_str())]
    Trapped { kind: TrapKind, message: String },
    /// The guest's migration from `from_version` failed (any of the above); the
    /// turn it preceded did not run.
    #[error("migration from version {from_version} failed: {cause}")]
    MigrationFailed { from_version: u32, cause: Box<TurnError> },
}

/// What a turn needs to know about its invocation.
#[derive(Debug, Clone)]
pub struct TurnInput {
    pub operation: String,
    pub payload: Vec<u8>,
    pub invocation_id: String,
    pub caller: Option<EntityRef>,
    pub now_ms: u64,
    /// The entity's next outbox sequence (from its meta record).
    pub next_seq: u64,
    /// For a continuation turn: the reply it runs for.
    pub reply: Option<ReplyIn>,
}

/// The result of a successful turn: its reply and everything it left to commit.
#[derive(Debug, Clone, Default)]
pub struct TurnOutput {
    pub reply: Vec<u8>,
    pub effects: TurnEffects,
}

/// Per-store data: WASI context, resource table, limits and the current turn.
pub struct HostState {
    entity: EntityRef,
    wasi: wasmtime_wasi::WasiCtx,
    table: ResourceTable,
    clock: wasi::GuestClock,
    waits: wasi::Waits,
    limits: host::Limiter,
    turn: Option<TurnState>,
    /// Set by a host function that ended the turn by trapping (a host limit
    /// breached, a wait past the deadline), so the trap can be classified.
    breach: Option<(TrapKind, String)>,
    cfg: Arc<RuntimeConfig>,
    stdout: output::GuestOutput,
    stderr: output::GuestOutput,
}

impl wasmtime_wasi::WasiView for HostState {
    fn ctx(&mut self) -> wasmtime_wasi::WasiCtxView<'_> {
        wasmtime_wasi::WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// The engine, linker and limits shared by all instances of a node.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    cfg: Arc<RuntimeConfig>,
    guest_logs: Arc<GuestLogs>,
    memory: Arc<MemoryBudget>,
}

/// A component checked against the world and ready to instantiate quickly.
#[derive(Clone)]
pub struct Prepared {
    pre: EntityPre<HostState>,
    /// Where the component's `migrate` function is, if it exports one.
    migrate: Option<wasmtime::component::ComponentExportIndex>,
}

impl Prepared {
    /// Whether the component exports a state migration.
    pub fn has_migration(&self) -> bool {
        self.migrate.is_some()
    }
}

impl Runtime {
    pub fn new(cfg: &RuntimeConfig) -> Result<Self, RuntimeError> {
        check_map_count(cfg.max_instances, kernel_max_map_count())?;
        let mut pool = PoolingAllocationConfig::default();
        let n = cfg.max_instances;
        // A wit-bindgen Rust component is about three core instances.
        pool.total_component_instances(n)
            .total_core_instances(n.saturating_mul(4))
            .total_memories(n.saturating_mul(2))
            .total_tables(n.saturating_mul(2))
            .max_memory_size(cfg.max_memory_bytes as usize)
            .table_elements(cfg.max_table_elements as usize)
            .linear_memory_keep_resident(256 << 10)
            .table_keep_resident(16 << 10)
            // A slot given back is reset page by page where the guest wrote
            // (Linux ≥ 6.7): without it, every slot ever used keeps its whole
            // keep-resident prefix, and a node that evicts and re-instantiates
            // grew to 1.6 GB on 10,000 counters (≈ 550 MB with it).
            .pagemap_scan(wasmtime::Enabled::Auto)
            .max_memories_per_component(4)
            // A store keeps the stack of its last async call for the next one:
            // every live instance may hold one.
            .total_stacks(n)
            .max_tables_per_component(8);
        let mut c = Config::new();
        c.wasm_component_model(true)
            .consume_fuel(cfg.fuel_per_turn > 0)
            // Also without a wall-clock budget: the ticks are where a running
            // guest yields its thread to other tasks.
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            // Guard pages stay, but reservations are sized to the memory limit so
            // ten thousand resident instances fit in the address space.
            .memory_reservation(cfg.max_memory_bytes.next_power_of_two().max(1 << 30))
            .memory_guard_size(32 << 20)
            .max_wasm_stack(512 << 10)
            // Beyond the guest's share, what host calls may use on the turn's stack.
            .async_stack_size((512 << 10) + (512 << 10))
            // A deploy compiles on one thread, so running turns keep the other
            // cores: a hot swap must not spike foreground latency.
            .parallel_compilation(false);
        if let Some(dir) = &cfg.compile_cache_dir {
            let dir = std::path::absolute(dir).map_err(|e| RuntimeError::Engine(format!("{}: {e}", dir.display())))?;
            // Apart: wasmtime's cleanup removes whatever it does not recognise in its directory.
            let mut cache = wasmtime::CacheConfig::new();
            cache.with_directory(dir.join("wasmtime"));
            let cache = wasmtime::Cache::new(cache).map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
            c.cache(Some(cache));
            if cfg.max_function_cache_bytes > 0 {
                let fns = dir.join("functions");
                let functions = FunctionCache::in_dir(&fns, cfg.max_function_cache_bytes)
                    .map_err(|e| RuntimeError::Engine(format!("{}: {e}", fns.display())))?;
                c.enable_incremental_compilation(Arc::new(functions))
                    .map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
            }
        }
        let engine = Engine::new(&c).map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        let mut linker = Linker::new(&engine);
        // Only the inert WASI interfaces are linked: a component importing
        // anything else cannot be prepared, whichever path loaded it.
        wasi::add_to_linker(&mut linker).map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        Entity::add_to_linker::<HostState, wasmtime::component::HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        spawn_epoch_ticker(&engine);
        let guest_logs = Arc::new(GuestLogs::new(cfg.guest_log_lines));
        let memory = Arc::new(MemoryBudget::new(cfg.max_total_guest_memory_bytes as usize));
        Ok(Self { engine, linker, cfg: Arc::new(cfg.clone()), guest_logs, memory })
    }

    /// Linear memory all live instances hold, and its bound.
    pub fn guest_memory(&self) -> &MemoryBudget {
        &self.memory
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// What guests printed: the recent lines and a feed of new ones.
    pub fn guest_logs(&self) -> &Arc<GuestLogs> {
        &self.guest_logs
    }

    /// Type-checks a compiled component against the linker, including the signature
    /// of an exported `migrate` (by instantiating it once: wasmtime checks a typed
    /// function's signature against a live instance).
    pub fn prepare(&self, component: &Component) -> Result<Prepared, RuntimeError> {
        let pre = self.linker.instantiate_pre(component).map_err(|e| RuntimeError::Link(format!("{e:#}")))?;
        let pre = EntityPre::new(pre).map_err(|e| RuntimeError::Link(format!("{e:#}")))?;
        let migrate = component
            .get_export_index(None, MIGRATION_EXPORT)
            .map(|iface| {
                component.get_export_index(Some(&iface), "migrate").ok_or_else(|| {
                    RuntimeError::Link(format!("`{MIGRATION_EXPORT}` does not export a `migrate` function"))
                })
            })
            .transpose()?;
        let prepared = Prepared { pre, migrate };
        if prepared.migrate.is_some() {
            let probe = EntityRef::new("conflux-check", "migrate-signature").expect("valid ref");
            // Instantiation runs no guest code that waits: nothing here needs a runtime.
            futures::executor::block_on(self.instantiate(&prepared, &probe)).map_err(|e| match e {
                RuntimeError::Instantiate { message, .. } => RuntimeError::Link(message),
                other => other,
            })?;
        }
        Ok(prepared)
    }

    /// Creates a fresh instance for one entity.
    pub async fn instantiate(&self, prepared: &Prepared, entity: &EntityRef) -> Result<Instance, RuntimeError> {
        let tag: Arc<str> = entity.to_string().into();
        let stdout = output::GuestOutput::new(tag.clone(), "stdout", self.guest_logs.clone());
        let stderr = output::GuestOutput::new(tag, "stderr", self.guest_logs.clone());
        let clock = wasi::GuestClock::new();
        let wasi = wasmtime_wasi::WasiCtxBuilder::new()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .monotonic_clock(clock)
            .max_random_size(wasi::MAX_RANDOM_BYTES)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let mut table = ResourceTable::new();
        table.set_max_capacity(wasi::MAX_RESOURCES);
        let state = HostState {
            entity: entity.clone(),
            wasi,
            table,
            clock,
            waits: wasi::Waits::default(),
            limits: host::Limiter::new(&self.cfg, self.memory.clone()),
            turn: None,
            breach: None,
            cfg: self.cfg.clone(),
            stdout,
            stderr,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        // Instantiation runs no turn: its deadline is far, and it never
        // yields; its start code gets a turn's fuel.
        if self.cfg.fuel_per_turn > 0 {
            store.set_fuel(self.cfg.fuel_per_turn).map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        }
        store.set_epoch_deadline(INSTANTIATION_EPOCH_TICKS);
        store.epoch_deadline_callback(|store| {
            let past = store.data().waits.deadline.is_some_and(|d| std::time::Instant::now() >= d);
            Ok(if past {
                wasmtime::UpdateDeadline::Interrupt
            } else if crate::determinism::simulated() {
                // A yield at a real clock's tick would order a simulation's
                // tasks differently on every replay.
                wasmtime::UpdateDeadline::Continue(1)
            } else {
                wasmtime::UpdateDeadline::Yield(1)
            })
        });
        let failed =
            |e: wasmtime::Error| RuntimeError::Instantiate { entity: entity.to_string(), message: format!("{e:#}") };
        let instance = prepared.pre.instance_pre().instantiate_async(&mut store).await.map_err(|e| {
            let exhausted = e.downcast_ref::<wasmtime::PoolConcurrencyLimitError>().is_some()
                || store.data().limits.breached() == Some(host::MemoryBreach::Node);
            match exhausted {
                true => RuntimeError::Exhausted { entity: entity.to_string(), message: format!("{e:#}") },
                false => failed(e),
            }
        })?;
        let bindings = Entity::new(&mut store, &instance).map_err(failed)?;
        let migrate = match &prepared.migrate {
            Some(index) => Some(
                instance
                    .get_typed_func::<(u32,), (Result<(), CallError>,)>(&mut store, index)
                    .map_err(|e| failed(e.context(format!("`{MIGRATION_EXPORT}#migrate` has the wrong signature"))))?,
            ),
            None => None,
        };
        Ok(Instance { store, bindings, migrate, poisoned: false })
    }
}

/// A live instance of one entity's component. Reused across that entity's
/// turns until evicted, replaced by a new version, or poisoned by a trap.
pub struct Instance {
    store: Store<HostState>,
    bindings: Entity,
    migrate: Option<MigrateFunc>,
    poisoned: bool,
}

fn call_error(e: CallError) -> TurnError {
    match e {
        CallError::BadRequest(m) => TurnError::BadRequest(m),
        CallError::UnknownOperation(m) => TurnError::UnknownOperation(m),
        CallError::Failed(m) => TurnError::Failed(m),
    }
}

impl Instance {
    /// Whether a trap made this instance unusable.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Runs one turn. Reads go to the turn's own writes first, then `reader`. With
    /// `migrate_from`, the guest's migration (if it exports one) runs first, in the
    /// same turn: its writes and the handler's form one write set, and both
    /// share the turn's one fuel and time budget. `slot` is the turn's hold on one
    /// of the node's turn slots, given back while the guest waits in a host call.
    pub async fn run_turn(
        &mut self,
        input: TurnInput,
        reader: Arc<dyn StateStore>,
        migrate_from: Option<u32>,
        slot: Box<dyn TurnSlot>,
    ) -> Result<TurnOutput, TurnError> {
        let cfg = self.begin_turn(input.invocation_id, input.caller, input.now_ms, input.next_seq, reader, slot)?;
        if let Some(turn) = self.store.data_mut().turn.as_mut() {
            turn.reply = input.reply;
        }
        if let Some(from_version) = migrate_from
            && let Err(cause) = self.migrate(from_version).await
        {
            self.end_turn();
            return Err(TurnError::MigrationFailed { from_version, cause: Box::new(cause) });
        }
        let result =
            self.bindings.conflux_entity_handler().call_handle(&mut self.store, &input.operation, &input.payload).await;
        let turn = self.end_turn().expect("turn state set by begin_turn");
        match result {
            Ok(Ok(reply)) => {
                if reply.len() > cfg.max_reply_bytes {
                    // The instance grew its memory to build the reply: it
                    // is not kept at that size.
                    self.poisoned = true;
                    return Err(TurnError::Trapped {
                        kind: TrapKind::LimitExceeded,
                        message: format!("reply is {} bytes; the limit is {}", reply.len(), cfg.max_reply_bytes),
                    });
                }
                Ok(TurnOutput { reply, effects: turn.into_effects() })
            }
            Ok(Err(e)) => Err(call_error(e)),
            Err(err) => {
                self.poisoned = true;
                Err(self.classify_trap(err))
            }
        }
    }

    /// Runs only the migration from `from_version`, as a turn whose writes are
    /// returned and never committed (a dry run). Without a migration export the
    /// result is an empty write set.
    pub async fn run_migration(
        &mut self,
        from_version: u32,
        invocation_id: String,
        now_ms: u64,
        reader: Arc<dyn StateStore>,
        slot: Box<dyn TurnSlot>,
    ) -> Result<TurnOutput, TurnError> {
        self.begin_turn(invocation_id, None, now_ms, 0, reader, slot)?;
        let result = self.migrate(from_version).await;
        let turn = self.end_turn().expect("turn state set by begin_turn");
        result.map(|()| TurnOutput { reply: Vec::new(), effects: turn.into_effects() })
    }

    /// Whether this instance's component exports a migration.
    pub fn has_migration(&self) -> bool {
        self.migrate.is_some()
    }

    /// Bytes of linear memory this instance holds (all its memories).
    pub fn memory_bytes(&self) -> usize {
        self.store.data().limits.memory_bytes()
    }

    fn begin_turn(
        &mut self,
        invocation_id: String,
        caller: Option<EntityRef>,
        now_ms: u64,
        next_seq: u64,
        reader: Arc<dyn StateStore>,
        slot: Box<dyn TurnSlot>,
    ) -> Result<Arc<RuntimeConfig>, TurnError> {
        assert!(!self.poisoned, "a poisoned instance must be dropped, not reused");
        let cfg = self.store.data().cfg.clone();
        let data = self.store.data_mut();
        data.breach = None;
        data.limits.reset_breach();
        data.stdout.start_turn(&invocation_id);
        data.stderr.start_turn(&invocation_id);
        data.waits.slot = Some(slot);
        data.turn = Some(TurnState::new(data.entity.clone(), invocation_id, caller, now_ms, next_seq, reader));
        if let Err(e) = arm_turn_limits(&mut self.store, &cfg) {
            return Err(self.fail_setup(e));
        }
        Ok(cfg)
    }

    /// Ends the turn: gives its slot back and returns what it did.
    fn end_turn(&mut self) -> Option<TurnState> {
        let data = self.store.data_mut();
        data.waits.slot = None;
        data.waits.deadline = None;
        data.turn.take()
    }

    fn fail_setup(&mut self, e: wasmtime::Error) -> TurnError {
        self.poisoned = true;
        self.end_turn();
        TurnError::Trapped { kind: TrapKind::Trap, message: format!("{e:#}") }
    }

    /// Calls the guest's `migrate` inside the current turn; a no-op without one.
    async fn migrate(&mut self, from_version: u32) -> Result<(), TurnError> {
        let Some(func) = self.migrate else { return Ok(()) };
        match func.call_async(&mut self.store, (from_version,)).await {
            Ok((Ok(()),)) => Ok(()),
            Ok((Err(e),)) => Err(call_error(e)),
            Err(err) => {
                self.poisoned = true;
                Err(self.classify_trap(err))
            }
        }
    }

    fn classify_trap(&mut self, err: wasmtime::Error) -> TurnError {
        let data = self.store.data_mut();
        if let Some((kind, message)) = data.breach.take() {
            return TurnError::Trapped { kind, message };
        }
        let last_stderr = data.stderr.recent();
        let trap = err.downcast_ref::<wasmtime::Trap>();
        let kind = match trap {
            Some(wasmtime::Trap::OutOfFuel) => TrapKind::OutOfFuel,
            Some(wasmtime::Trap::Interrupt) => TrapKind::Timeout,
            Some(wasmtime::Trap::StackOverflow) => TrapKind::StackOverflow,
            _ if data.limits.breached().is_some() => TrapKind::OutOfMemory,
            _ => TrapKind::Trap,
        };
        let mut message = match kind {
            TrapKind::OutOfFuel => {
                format!("the turn used up its fuel budget of {} (runtime.fuel_per_turn)", data.cfg.fuel_per_turn)
            }
            TrapKind::Timeout => {
                format!("the turn ran longer than {} ms (runtime.turn_timeout_ms)", data.cfg.turn_timeout_ms)
            }
            TrapKind::OutOfMemory => match data.limits.breached() {
                Some(host::MemoryBreach::Node) => format!(
                    "the node's guest memory is exhausted ({} bytes, runtime.max_total_guest_memory_bytes)",
                    data.cfg.max_total_guest_memory_bytes
                ),
                Some(host::MemoryBreach::Table) => format!(
                    "the instance hit its table limit of {} elements (runtime.max_table_elements)",
                    data.cfg.max_table_elements
                ),
                _ => format!(
                    "the instance hit its memory limit of {} bytes, all its memories together (runtime.max_memory_bytes)",
                    data.cfg.max_memory_bytes
                ),
            },
            // Rust guests keep their stack at the bottom of linear memory, so
            // running off its end is an out-of-bounds access, not a wasm stack
            // overflow.
            _ if trap == Some(&wasmtime::Trap::MemoryOutOfBounds) => {
                format!("{} (a guest stack overflow ends this way)", err.root_cause())
            }
            _ => format!("{}", err.root_cause()),
        };
        if let Some(line) = last_stderr {
            message.push_str(&format!(" (guest stderr: {line})"));
        }
        TurnError::Trapped { kind, message }
    }
}

/// Memory mappings one pool slot costs the process at most: its stack and
/// the stack's guard page (made when the pool is), its linear memory split
/// into image, rest and guard, and its tables. Measured: 61,149 mappings with
/// 10,000 warm counters and 10,500 stacks.
const MAPPINGS_PER_INSTANCE: u64 = 6;

/// Mappings the rest of the process needs besides the pool (threads, heap,
/// sled, the WAL), with room to spare.
const MAPPINGS_BESIDES_THE_POOL: u64 = 8_192;

/// The kernel's bound on one process's memory mappings, if it says.
fn kernel_max_map_count() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/vm/max_map_count").ok()?.trim().parse().ok()
}

/// A pool the kernel cannot map is refused at start, not met as `ENOMEM`
/// when the last slots are first used.
fn check_map_count(max_instances: u32, kernel_limit: Option<u64>) -> Result<(), RuntimeError> {
    let Some(limit) = kernel_limit else { return Ok(()) };
    let needed = u64::from(max_instances) * MAPPINGS_PER_INSTANCE + MAPPINGS_BESIDES_THE_POOL;
    if needed > limit {
        return Err(RuntimeError::Engine(format!(
            "runtime.max_instances = {max_instances} needs about {needed} memory mappings, and this kernel allows \
             {limit} (vm.max_map_count): lower runtime.max_instances (and scheduler.max_resident_instances) to at \
             most {} or raise vm.max_map_count",
            (limit.saturating_sub(MAPPINGS_BESIDES_THE_POOL)) / MAPPINGS_PER_INSTANCE
        )));
    }
    Ok(())
}

/// Granularity of the wall-clock turn budget, and how long guest code runs
/// at most before it yields its async thread.
const EPOCH_TICK_MS: u64 = 10;

/// Epoch deadline while an instance is made (a year of ticks: never).
const INSTANTIATION_EPOCH_TICKS: u64 = 365 * 24 * 3600 * 1000 / EPOCH_TICK_MS;

/// Advances the engine's epoch every tick for as long as the engine lives.
fn spawn_epoch_ticker(engine: &Engine) {
    let weak = engine.weak();
    let spawned = std::thread::Builder::new().name("conflux-epoch".into()).spawn(move || {
        // Ends when the last engine handle is dropped.
        while let Some(engine) = weak.upgrade() {
            engine.increment_epoch();
            drop(engine);
            std::thread::sleep(std::time::Duration::from_millis(EPOCH_TICK_MS));
        }
    });
    if let Err(e) = spawned {
        tracing::error!("cannot start the epoch ticker; turn timeouts will not fire: {e}");
    }
}

/// Refills the fuel and re-arms the wall-clock deadline (for guest code and
/// for its waits in host calls) for the next turn. Guest code meets the epoch
/// deadline at the next tick; the instance's callback then yields (the turn
/// gives its async thread to other tasks for a moment) or, once the turn's
/// wall-clock budget is spent, interrupts it.
fn arm_turn_limits(store: &mut Store<HostState>, cfg: &RuntimeConfig) -> wasmtime::Result<()> {
    if cfg.fuel_per_turn > 0 {
        store.set_fuel(cfg.fuel_per_turn)?;
    }
    store.set_epoch_deadline(1);
    if cfg.turn_timeout_ms > 0 {
        store.data_mut().waits.deadline =
            Some(std::time::Instant::now() + std::time::Duration::from_millis(cfg.turn_timeout_ms));
    }
    Ok(())
}
