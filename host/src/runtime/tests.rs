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
