//! What a warm instance costs the node in memory, measured as the process's
//! proportional set size: this binary holds a single test so nothing else
//! moves the number. Counts pages, not time.

mod support;

use conflux_host::config::RuntimeConfig;
use conflux_host::model::EntityRef;
use conflux_host::runtime::{NoSlot, Runtime, TurnInput};
use conflux_host::storage::{MemStore, StateStore};
use futures::executor::block_on;
use std::sync::Arc;
use support::guest_wasm;

fn pss_kib() -> u64 {
    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").expect("reading smaps_rollup");
    let line = rollup.lines().find(|l| l.starts_with("Pss:")).expect("a Pss line");
    line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("a Pss value")
}

/// PAGEMAP_SCAN, which lets wasmtime find the pages a guest dirtied, came
/// with Linux 6.7; before it a reset slot keeps `linear_memory_keep_resident`
/// of every memory resident, used or not.
fn kernel_has_pagemap_scan() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (6, 7)
}

#[test]
fn an_evicted_instance_leaves_its_slot_holding_only_the_pages_its_guest_touched() {
    if !kernel_has_pagemap_scan() {
        eprintln!("skipped: the kernel has no PAGEMAP_SCAN (Linux < 6.7)");
        return;
    }
    const N: u64 = 400;
    let runtime = Runtime::new(&RuntimeConfig { max_instances: 500, ..Default::default() }).unwrap();
    let bytes = std::fs::read(guest_wasm("counter")).unwrap();
    let component = wasmtime::component::Component::new(runtime.engine(), &bytes).unwrap();
    let prepared = runtime.prepare(&component).unwrap();
    let store: Arc<dyn StateStore> = Arc::new(MemStore::new());
    let turn = || TurnInput {
        operation: "add".into(),
        payload: b"1".to_vec(),
        invocation_id: "memory".into(),
        caller: None,
        now_ms: 0,
        next_seq: 0,
        reply: None,
    };
    // All alive at once, so each holds a slot of its own.
    let mut warm: Vec<_> = (0..N)
        .map(|i| {
            block_on(runtime.instantiate(&prepared, &EntityRef::new("counter", format!("c{i}")).unwrap())).unwrap()
        })
        .collect();
    for instance in &mut warm {
        block_on(instance.run_turn(turn(), store.clone(), None, Box::new(NoSlot))).unwrap();
    }
    let before = pss_kib();
    drop(warm);
    let after = pss_kib();
    let grown_per_slot = after.saturating_sub(before) / N;
    // A slot reset by writing its whole keep-resident prefix (256 KiB) would
    // grow by about that much; the counter's turn dirties a few pages.
    assert!(
        grown_per_slot < 64,
        "evicting {N} warm counters grew the process by {grown_per_slot} KiB per slot ({before} → {after} KiB)"
    );
}
