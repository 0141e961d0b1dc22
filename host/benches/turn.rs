//! Criterion benchmarks of the runtime, in process, with no commit log:
//! a warm counter `add` turn (one get + one set) in wasm versus the same entity
//! code called natively through the SDK's harness, and a cold activation
//! (instantiate from the pooling allocator + first turn); then the cost of the
//! CPU limits (fuel, epoch deadline) on a warm turn and how long a runaway
//! turn runs before it is stopped; and the same counter written in Rust,
//! TypeScript and Python side by side (warm turn, cold activation, and, printed
//! once, component size, first compile and linear memory per warm instance).
//!
//! Run: `cargo bench -p conflux-host --bench turn` (the TypeScript and Python
//! rows need `scripts/build-ts.sh` and `scripts/build-python.sh` first; without
//! their components they are skipped with a note).

use conflux_host::config::{RuntimeConfig, SchedulerConfig};
use conflux_host::model::{EntityRef, Keyspace, Op, WriteSet, state_key};
use conflux_host::runtime::{NoSlot, Runtime, TurnInput};
use conflux_host::storage::{ApplyStore, MemStore, StateStore};
use criterion::{Criterion, criterion_group, criterion_main};
use futures::executor::block_on;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

fn guest_wasm(package: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned();
    let target = root.join("target/guests");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&root)
        .env("CARGO_TARGET_DIR", &target)
        .args(["build", "--release", "--target", "wasm32-wasip2", "-p", package])
        .status()
        .unwrap();
    assert!(status.success());
    target.join("wasm32-wasip2/release").join(format!("{package}.wasm"))
}

/// A store where the counter `entity` holds 41.
fn seeded_store(entity: &EntityRef) -> Arc<dyn StateStore> {
    let store = Arc::new(MemStore::new());
    let seed = WriteSet {
        ops: vec![Op::Put {
            keyspace: Keyspace::State,
            key: state_key(entity, "$self"),
            value: br#"{"total":41}"#.to_vec(),
        }],
    };
    store.apply(&[(1, &seed)]).unwrap();
    store
}

fn input() -> TurnInput {
    TurnInput {
        operation: "add".into(),
        payload: b"1".to_vec(),
        invocation_id: "bench".into(),
        caller: None,
        now_ms: 0,
        next_seq: 0,
        reply: None,
    }
}

fn turns(c: &mut Criterion) {
    let cfg = RuntimeConfig { max_instances: 1000, ..Default::default() };
    let runtime = Runtime::new(&cfg).unwrap();
    let bytes = std::fs::read(guest_wasm("counter")).unwrap();
    let component = wasmtime::component::Component::new(runtime.engine(), &bytes).unwrap();
    let prepared = runtime.prepare(&component).unwrap();
    let entity = EntityRef::new("counter", "bench").unwrap();
    let store = seeded_store(&entity);

    let mut warm = block_on(runtime.instantiate(&prepared, &entity)).unwrap();
    c.bench_function("warm turn: counter add (wasm, get+set)", |b| {
        b.iter(|| {
            let out = block_on(warm.run_turn(input(), store.clone(), None, Box::new(NoSlot))).unwrap();
            assert_eq!(out.reply, b"42");
        })
    });

    let mut h = conflux_sdk::testing::TestHarness::new("counter", "bench");
    h.invoke::<counter::Counter>("add", b"41").unwrap();
    c.bench_function("native call: counter add (same entity code, SDK harness)", |b| {
        b.iter(|| {
            let reply = h.invoke::<counter::Counter>("add", b"1").unwrap();
            std::hint::black_box(reply);
        })
    });

    c.bench_function("cold activation: instantiate + first turn", |b| {
        b.iter(|| {
            let mut i = block_on(runtime.instantiate(&prepared, &entity)).unwrap();
            let out = block_on(i.run_turn(input(), store.clone(), None, Box::new(NoSlot))).unwrap();
            assert_eq!(out.reply, b"42");
        })
    });
}

fn counter_setup(cfg: &RuntimeConfig) -> (Runtime, conflux_host::runtime::Prepared) {
    let runtime = Runtime::new(cfg).unwrap();
    let bytes = std::fs::read(guest_wasm("counter")).unwrap();
    let component = wasmtime::component::Component::new(runtime.engine(), &bytes).unwrap();
    let prepared = runtime.prepare(&component).unwrap();
    (runtime, prepared)
}

fn limits(c: &mut Criterion) {
    let entity = EntityRef::new("counter", "bench").unwrap();
    let store: Arc<dyn StateStore> = Arc::new(MemStore::new());
    let mut group = c.benchmark_group("warm turn by CPU limit");
    for (name, fuel, timeout) in [
        ("fuel + epoch (default)", 2_000_000_000, 1000),
        ("fuel only", 2_000_000_000, 0),
        ("epoch only", 0, 1000),
        ("no CPU limit", 0, 0),
    ] {
        let cfg =
            RuntimeConfig { max_instances: 100, fuel_per_turn: fuel, turn_timeout_ms: timeout, ..Default::default() };
        let (runtime, prepared) = counter_setup(&cfg);
        let mut warm = block_on(runtime.instantiate(&prepared, &entity)).unwrap();
        group.bench_function(name, |b| {
            b.iter(|| block_on(warm.run_turn(input(), store.clone(), None, Box::new(NoSlot))).unwrap())
        });
    }
    group.finish();

    let mut group = c.benchmark_group("runaway turn stopped");
    group.sample_size(10);
    let bytes = std::fs::read(guest_wasm("faulty")).unwrap();
    let faulty = EntityRef::new("faulty", "loop").unwrap();
    for (name, fuel, timeout) in
        [("default limits (fuel 2e9, timeout 1000 ms)", 2_000_000_000, 1000), ("timeout 100 ms", 0, 100)]
    {
        let cfg =
            RuntimeConfig { max_instances: 100, fuel_per_turn: fuel, turn_timeout_ms: timeout, ..Default::default() };
        let runtime = Runtime::new(&cfg).unwrap();
        let component = wasmtime::component::Component::new(runtime.engine(), &bytes).unwrap();
        let prepared = runtime.prepare(&component).unwrap();
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut i = block_on(runtime.instantiate(&prepared, &faulty)).unwrap();
                let inp = TurnInput { operation: "infinite_loop".into(), payload: vec![], ..input() };
                assert!(block_on(i.run_turn(inp, store.clone(), None, Box::new(NoSlot))).is_err());
            })
        });
    }
    group.finish();
}

/// The counter in each SDK's language: same operations, same `$self` JSON.
fn languages(c: &mut Criterion) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned();
    let polyglot = |name: &str| root.join("target/polyglot").join(format!("{name}.wasm"));
    let components =
        [("rust", guest_wasm("counter")), ("typescript", polyglot("counter-ts")), ("python", polyglot("counter-py"))];
    let mut group = c.benchmark_group("counter by language");
    group.sample_size(20);
    for (language, path) in components {
        let Ok(bytes) = std::fs::read(&path) else {
            eprintln!(
                "{language}: {} missing (scripts/build-ts.sh, build-python.sh build it): skipped",
                path.display()
            );
            continue;
        };
        let cfg = RuntimeConfig { max_instances: 1000, ..Default::default() };
        let runtime = Runtime::new(&cfg).unwrap();
        let compiling = std::time::Instant::now();
        let component = wasmtime::component::Component::new(runtime.engine(), &bytes).unwrap();
        let compile = compiling.elapsed();
        let prepared = runtime.prepare(&component).unwrap();
        let entity = EntityRef::new("counter", "bench").unwrap();
        let store = seeded_store(&entity);
        let mut warm = block_on(runtime.instantiate(&prepared, &entity)).unwrap();
        block_on(warm.run_turn(input(), store.clone(), None, Box::new(NoSlot))).unwrap();
        eprintln!(
            "{language}: component {:.1} MiB, first compile {:.1} s (one thread), warm instance {:.1} MiB of linear memory",
            bytes.len() as f64 / (1 << 20) as f64,
            compile.as_secs_f64(),
            warm.memory_bytes() as f64 / (1 << 20) as f64
        );
        // As the scheduler does, an instance that outgrew the warm bound is
        // replaced (componentize-js grows ~1 KB per call): its amortised
        // re-instantiation is part of what a warm turn costs.
        let warm_bound = SchedulerConfig::default().max_warm_instance_bytes as usize;
        group.bench_function(format!("{language}: warm turn (add: get+set)"), |b| {
            b.iter(|| {
                let out = block_on(warm.run_turn(input(), store.clone(), None, Box::new(NoSlot))).unwrap();
                assert_eq!(out.reply, b"42");
                if warm.memory_bytes() > warm_bound {
                    warm = block_on(runtime.instantiate(&prepared, &entity)).unwrap();
                }
            })
        });
        group.bench_function(format!("{language}: cold activation (instantiate + first turn)"), |b| {
            b.iter(|| {
                let mut i = block_on(runtime.instantiate(&prepared, &entity)).unwrap();
                let out = block_on(i.run_turn(input(), store.clone(), None, Box::new(NoSlot))).unwrap();
                assert_eq!(out.reply, b"42");
            })
        });
    }
    group.finish();
}

criterion_group!(benches, turns, limits, languages);
criterion_main!(benches);
