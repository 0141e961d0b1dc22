//! The runtime on its own, with a real guest: what instances hold between
//! turns.

use super::*;
use crate::scheduler::test_support::guest;
use crate::storage::MemStore;

fn add() -> TurnInput {
    TurnInput {
        operation: "add".into(),
        payload: b"1".to_vec(),
        invocation_id: "runtime-test".into(),
        caller: None,
        now_ms: 0,
        next_seq: 0,
        reply: None,
    }
}

/// A store keeps the stack of its last async call for its next one, so
/// every warm instance holds one of the pool's stacks: with wasmtime's
/// default pool (1,000 stacks) the 1,001st warm instance could not be made.
#[tokio::test]
async fn more_warm_instances_than_wasmtimes_default_stack_pool_all_take_turns() {
    let runtime = Runtime::new(&RuntimeConfig { max_instances: 1_100, ..Default::default() }).unwrap();
    let component = Component::new(runtime.engine(), guest("counter")).unwrap();
    let prepared = runtime.prepare(&component).unwrap();
    let store: Arc<dyn StateStore> = Arc::new(MemStore::new());
    let mut warm = Vec::new();
    for i in 0..1_050 {
        let entity = EntityRef::new("counter", format!("c{i}")).unwrap();
        let mut instance =
            runtime.instantiate(&prepared, &entity).await.unwrap_or_else(|e| panic!("instance {i}: {e}"));
        instance
            .run_turn(add(), store.clone(), None, Box::new(NoSlot))
            .await
            .unwrap_or_else(|e| panic!("turn {i}: {e}"));
        warm.push(instance);
    }
}

/// A pool larger than the kernel lets one process map is refused when the
/// node starts, naming the setting to change; the default fits Linux's
/// default limit (65,530). 10,500 instances, the old default, ran into
/// `ENOMEM` once a node had cycled through its slots.
#[test]
fn a_pool_the_kernel_cannot_map_is_refused_at_start() {
    let default = RuntimeConfig::default().max_instances;
    assert!(check_map_count(default, Some(65_530)).is_ok());
    assert!(check_map_count(10_500, Some(65_530)).is_err());
    let err = check_map_count(20_000, Some(65_530)).unwrap_err().to_string();
    assert!(err.contains("vm.max_map_count") && err.contains("runtime.max_instances"), "{err}");
    assert!(check_map_count(20_000, None).is_ok(), "an unknown limit is not guessed");
}

/// Files under `dir`, recursively, by path.
fn files_under(dir: &std::path::Path) -> std::collections::BTreeSet<std::path::PathBuf> {
    let mut out = std::collections::BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.insert(e.path());
            }
        }
    }
    out
}

/// A node whose whole-component cache misses (other bytes, or another
/// machine's cache) still reuses compiled functions: a second node, with
/// only the first one's `functions/`, compiles the same component mostly from
/// them (few functions added), and its instances run.
#[tokio::test]
async fn a_compile_reuses_the_function_cache_when_the_component_cache_misses() {
    let (first, second) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cfg =
        |dir: &std::path::Path| RuntimeConfig { compile_cache_dir: Some(dir.to_path_buf()), ..Default::default() };
    let runtime = Runtime::new(&cfg(first.path())).unwrap();
    Component::new(runtime.engine(), guest("counter")).unwrap();
    let kept = files_under(&first.path().join("functions"));
    assert!(kept.len() > 100, "the compile kept its functions: {}", kept.len());

    std::fs::rename(first.path().join("functions"), second.path().join("functions")).unwrap();
    let moved = files_under(&second.path().join("functions"));
    let runtime = Runtime::new(&cfg(second.path())).unwrap();
    let component = Component::new(runtime.engine(), guest("counter")).unwrap();
    let after = files_under(&second.path().join("functions"));
    let added = after.difference(&moved).count();
    // A few (trampolines and the like) are keyed per compile; the rest hit.
    assert!(added * 4 < moved.len(), "{added} of {} functions compiled afresh", moved.len());

    let prepared = runtime.prepare(&component).unwrap();
    let entity = EntityRef::new("counter", "c").unwrap();
    let mut instance = runtime.instantiate(&prepared, &entity).await.unwrap();
    let store: Arc<dyn StateStore> = Arc::new(MemStore::new());
    instance.run_turn(add(), store, None, Box::new(NoSlot)).await.unwrap();
}
