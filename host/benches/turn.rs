//! Criterion benchmarks of the runtime, in process, with no commit log:
//! a warm counter `add` turn (one get + one set) in wasm versus the same entity
//! code called natively through the SDK's harness, and a cold activation
//! (instantiate from the pooling allocator + first turn).
//!
//! Run: `cargo bench -p conflux-host --bench turn`

use conflux_host::config::RuntimeConfig;
use conflux_host::model::{EntityRef, Keyspace, Op, WriteSet, state_key};
use conflux_host::runtime::{Runtime, TurnInput};
use conflux_host::storage::{MemStore, StateStore};
use criterion::{Criterion, criterion_group, criterion_main};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

fn counter_wasm() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned();
    let target = root.join("target/guests");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&root)
        .env("CARGO_TARGET_DIR", &target)
        .args(["build", "--release", "--target", "wasm32-wasip2", "-p", "counter"])
        .status()
        .unwrap();
    assert!(status.success());
    target.join("wasm32-wasip2/release/counter.wasm")
}

fn input() -> TurnInput {
    TurnInput {
        operation: "add".into(),
        payload: b"1".to_vec(),
        invocation_id: "bench".into(),
        caller: None,
        now_ms: 0,
    }
}

fn turns(c: &mut Criterion) {
    let mut cfg = RuntimeConfig::default();
    cfg.max_instances = 1000;
    let runtime = Runtime::new(&cfg).unwrap();
    let bytes = std::fs::read(counter_wasm()).unwrap();
    let component = wasmtime::component::Component::new(runtime.engine(), &bytes).unwrap();
    let prepared = runtime.prepare(&component).unwrap();
    let entity = EntityRef::new("counter", "bench").unwrap();
    let store = Arc::new(MemStore::new());
    let seed = WriteSet {
        ops: vec![Op::Put {
            keyspace: Keyspace::State,
            key: state_key(&entity, "$self"),
            value: br#"{"total":41}"#.to_vec(),
        }],
    };
    store.apply(&[(1, &seed)]).unwrap();
    let store: Arc<dyn StateStore> = store;

    let mut warm = runtime.instantiate(&prepared, &entity).unwrap();
    c.bench_function("warm turn: counter add (wasm, get+set)", |b| {
        b.iter(|| {
            let out = warm.run_turn(input(), store.clone()).unwrap();
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
            let mut i = runtime.instantiate(&prepared, &entity).unwrap();
            let out = i.run_turn(input(), store.clone()).unwrap();
            assert_eq!(out.reply, b"42");
        })
    });
}

criterion_group!(benches, turns);
criterion_main!(benches);
