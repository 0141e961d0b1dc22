//! Hostile guests, with the real binary: each failure aborts only its own turn
//! with a distinct error kind, persists nothing, discards the instance, and
//! neither the daemon nor a concurrently served entity notices.

mod support;

use conflux_host::api::pb;
use support::*;
use tonic::Code;

struct Expect {
    op: &'static str,
    payload: &'static str,
    kind: &'static str,
    needle: &'static str,
}

/// Runs `expect.op` on `faulty/victim` while `counter/bystander` is called in a
/// loop, and checks everything the sandbox promises.
fn contained(expect: Expect, settings: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let mut args = Vec::new();
    for s in settings {
        args.extend(["--set", s]);
    }
    let d = Daemon::start_with(dir.path(), &args);
    deploy(&d, "faulty", &guest_wasm("faulty"));
    deploy(&d, "counter", &guest_wasm("counter"));
    rt().block_on(async {
        let mut c = d.client().await;
        call(&mut c, "faulty", "victim", "put", "\"original\"").await.unwrap();

        let bystander = Bystander::start(&d).await;
        let before = bystander.calls();

        let e = call(&mut c, "faulty", "victim", expect.op, expect.payload).await.unwrap_err();
        assert_eq!(e.code(), Code::Aborted, "{}: {e:?}", expect.op);
        let kind = e.metadata().get("conflux-error-kind").and_then(|v| v.to_str().ok()).unwrap_or("");
        assert_eq!(kind, expect.kind, "{}: {e:?}", expect.op);
        assert!(e.message().contains(expect.needle), "{}: {:?} lacks {:?}", expect.op, e.message(), expect.needle);

        // The bystander keeps being served.
        bystander.finish(before).await;

        // Nothing of the failed turn persisted; the entity serves its next call.
        assert_eq!(call(&mut c, "faulty", "victim", "get", "").await.unwrap(), "original");
        call(&mut c, "faulty", "victim", "put", "\"after\"").await.unwrap();
        assert_eq!(call(&mut c, "faulty", "victim", "get", "").await.unwrap(), "after");
        // The daemon is up and counted the failure.
        let s = c.status(pb::StatusRequest {}).await.unwrap().into_inner();
        assert!(s.turns_failed >= 1, "{s:?}");
    });
}

#[test]
fn infinite_loop_is_stopped_by_the_turn_timeout() {
    contained(
        Expect { op: "infinite_loop", payload: "", kind: "timeout", needle: "longer than 300 ms" },
        &["runtime.fuel_per_turn=0", "runtime.turn_timeout_ms=300"],
    );
}

#[test]
fn infinite_loop_is_stopped_by_fuel() {
    contained(
        Expect { op: "infinite_loop", payload: "", kind: "out-of-fuel", needle: "fuel budget of 50000000" },
        &["runtime.fuel_per_turn=50000000", "runtime.turn_timeout_ms=0"],
    );
}

#[test]
fn memory_bomb_hits_the_memory_limit() {
    contained(
        Expect { op: "memory_bomb", payload: "", kind: "out-of-memory", needle: "memory limit of 16777216" },
        &["runtime.max_memory_bytes=16777216"],
    );
}

#[test]
fn stack_overflow_traps() {
    // The guest's shadow stack (64 KiB, at the bottom of linear memory) runs
    // out before wasmtime's native stack does.
    contained(Expect { op: "stack_overflow", payload: "0", kind: "trap", needle: "out of bounds memory access" }, &[]);
}

#[test]
fn unreachable_after_a_write_traps() {
    contained(Expect { op: "unreachable", payload: "", kind: "trap", needle: "unreachable" }, &[]);
}

#[test]
fn panic_after_a_write_traps_with_its_message() {
    contained(
        Expect { op: "set_then_panic", payload: "", kind: "trap", needle: "deliberate panic after a write" },
        &[],
    );
}

#[test]
fn oversized_reply_is_refused() {
    contained(Expect { op: "huge_reply", payload: "2097152", kind: "limit-exceeded", needle: "limit is 1048576" }, &[]);
}

#[test]
fn oversized_state_write_is_refused() {
    contained(Expect { op: "huge_write", payload: "2097152", kind: "limit-exceeded", needle: "limit is 1048576" }, &[]);
}

#[test]
fn oversized_state_key_is_refused() {
    contained(
        Expect { op: "huge_key", payload: "5000", kind: "limit-exceeded", needle: "state key is 5000 bytes" },
        &[],
    );
}
