//! Hostile guests, with the real binary: each failure aborts only its own turn
//! with a distinct error kind, persists nothing, discards the instance, and
//! neither the daemon nor a concurrently served entity notices.

mod support;

use conflux_client::pb;
use serde_json::json;
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

/// Invokes `raw/<id> op payload` (the raw-waits guest speaks plain text).
async fn raw(
    c: &mut conflux_client::pb::conflux_client::ConfluxClient<tonic::transport::Channel>,
    id: &str,
    op: &str,
    payload: &str,
) -> Result<String, tonic::Status> {
    let r = c.invoke(invoke_req("raw", id, op, payload)).await?.into_inner();
    Ok(String::from_utf8(r.reply).expect("raw-waits replies in text"))
}

async fn status(
    c: &mut conflux_client::pb::conflux_client::ConfluxClient<tonic::transport::Channel>,
) -> pb::StatusResponse {
    c.status(pb::StatusRequest {}).await.unwrap().into_inner()
}

/// A daemon with the raw-waits guest as `raw` and the counter.
fn raw_daemon(dir: &std::path::Path, settings: &[&str]) -> Daemon {
    let mut args = Vec::new();
    for s in settings {
        args.extend(["--set", s]);
    }
    let d = Daemon::start_with(dir, &args);
    deploy(&d, "raw", &guest_wasm("raw-waits"));
    deploy(&d, "counter", &guest_wasm("counter"));
    d
}

/// Every way a guest can wait — std's sleep, `pollable.block`, `poll` of a
/// `subscribe-instant` — is held to the turn's deadline: a wait that would
/// outlast it ends the turn at once with `timeout`, and nothing of the turn
/// persists. A wait that fits runs, and a poll with a ready pollable returns.
#[test]
fn a_guest_cannot_wait_past_its_turn_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let d = raw_daemon(dir.path(), &["runtime.turn_timeout_ms=1000"]);
    rt().block_on(async {
        let mut c = d.client().await;
        raw(&mut c, "w", "set", "before").await.unwrap();
        for op in ["sleep", "block", "poll-instant"] {
            let started = std::time::Instant::now();
            let e = raw(&mut c, "w", op, "15000").await.unwrap_err();
            let took = started.elapsed();
            assert_eq!(kind(&e), "timeout", "{op}: {e:?}");
            assert!(e.message().contains("past its turn's deadline of 1000 ms"), "{op}: {e:?}");
            // 15 s on the old code; at once here (the bound leaves room for a loaded CI machine).
            assert!(took < std::time::Duration::from_secs(5), "{op} took {took:?}");
            assert_eq!(raw(&mut c, "w", "get", "").await.unwrap(), "before", "{op} persisted nothing");
        }
        assert_eq!(raw(&mut c, "w", "sleep", "50").await.unwrap(), "slept");
        assert_eq!(raw(&mut c, "w", "block", "50").await.unwrap(), "blocked");
        assert_eq!(raw(&mut c, "w", "poll-ready", "15000").await.unwrap(), "ready [1]");
    });
}

/// Sleeping guests give their turn slot back while they sleep: with eight
/// sleepers (four per core) in their turns, another entity's call is answered
/// at once, not after the sleepers (the old code held every turn slot).
#[test]
fn sleeping_guests_hold_no_turn_slot() {
    let dir = tempfile::tempdir().unwrap();
    let d = raw_daemon(dir.path(), &["runtime.turn_timeout_ms=5000", "scheduler.turn_threads=2"]);
    rt().block_on(async {
        let mut c = d.client().await;
        call(&mut c, "counter", "other", "add", "1").await.unwrap();
        let mut sleepers = Vec::new();
        for i in 0..8 {
            let mut c = d.client().await;
            sleepers.push(tokio::spawn(async move { raw(&mut c, &format!("s{i}"), "sleep", "3000").await }));
        }
        // Let every sleeper reach its sleep.
        tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
        let started = std::time::Instant::now();
        assert_eq!(call(&mut c, "counter", "other", "add", "1").await.unwrap(), 2);
        let took = started.elapsed();
        let still_sleeping = sleepers.iter().filter(|s| !s.is_finished()).count();
        assert_eq!(still_sleeping, 8, "the call must be answered while the sleepers sleep (took {took:?})");
        for s in sleepers {
            assert_eq!(s.await.unwrap().unwrap(), "slept");
        }
    });
}

/// Host calls that make the host allocate or keep what the guest asks for are
/// bounded: random bytes per call, resources an instance may hold.
#[test]
fn host_calls_cannot_make_the_host_allocate_without_bound() {
    let dir = tempfile::tempdir().unwrap();
    let d = raw_daemon(dir.path(), &[]);
    rt().block_on(async {
        let mut c = d.client().await;
        assert_eq!(raw(&mut c, "r", "random", "4096").await.unwrap(), "4096 random bytes");
        // 32 MiB: the guest could receive it (its memory limit is 64 MiB), but the
        // host would allocate it first, per call.
        let e = raw(&mut c, "r", "random", "33554432").await.unwrap_err();
        assert_eq!(kind(&e), "trap", "{e:?}");
        assert!(e.message().contains("exceeds limit"), "{e:?}");
        let e = raw(&mut c, "r", "leak-pollables", "100000").await.unwrap_err();
        assert_eq!(kind(&e), "trap", "{e:?}");
        // The node serves on.
        assert_eq!(raw(&mut c, "r", "random", "16").await.unwrap(), "16 random bytes");
    });
}

/// A turn that fails in any way drops its instance (it may remember what was
/// not committed, or hold the memory it grew to build an oversized reply), and
/// an instance that grew past `scheduler.max_warm_instance_bytes` in a
/// successful turn is not kept warm either.
#[test]
fn failed_and_swollen_instances_are_not_kept_warm() {
    let dir = tempfile::tempdir().unwrap();
    let d = raw_daemon(dir.path(), &[]);
    deploy(&d, "faulty", &guest_wasm("faulty"));
    rt().block_on(async {
        let mut c = d.client().await;
        call(&mut c, "faulty", "f", "put", "\"x\"").await.unwrap();
        assert_eq!(status(&mut c).await.resident_instances, 1);
        let e = call(&mut c, "faulty", "f", "huge_reply", "8000000").await.unwrap_err();
        assert_eq!(kind(&e), "limit-exceeded", "{e:?}");
        assert_eq!(status(&mut c).await.resident_instances, 0, "the over-limit reply's instance was dropped");
        call(&mut c, "faulty", "f", "put", "\"y\"").await.unwrap();
        let e = call(&mut c, "faulty", "f", "set_then_fail", "").await.unwrap_err();
        assert_eq!(kind(&e), "failed", "{e:?}");
        assert_eq!(status(&mut c).await.resident_instances, 0, "a refused turn's instance was dropped");

        assert_eq!(raw(&mut c, "g", "grow", "1").await.unwrap(), "holding 1 MiB more");
        assert_eq!(status(&mut c).await.resident_instances, 1);
        // Past the default scheduler.max_warm_instance_bytes (16 MiB).
        assert_eq!(raw(&mut c, "g", "grow", "20").await.unwrap(), "holding 20 MiB more");
        let s = status(&mut c).await;
        assert_eq!(s.resident_instances, 0, "{s:?}");
        assert!(s.guest_memory_bytes < 4 << 20, "the swollen instance's memory was given back: {s:?}");
    });
}

/// Warm instances are bounded by the memory they hold, not only by their
/// number: ten thousand entities leave at most what
/// `scheduler.max_warm_memory_bytes` allows resident, and every call is served.
#[test]
fn ten_thousand_entities_keep_warm_memory_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let d = raw_daemon(
        dir.path(),
        &["scheduler.max_warm_memory_bytes=67108864", "runtime.max_total_guest_memory_bytes=268435456"],
    );
    rt().block_on(async {
        let mut tasks = Vec::new();
        for w in 0..16 {
            let mut c = d.client().await;
            tasks.push(tokio::spawn(async move {
                for i in (w..10_000).step_by(16) {
                    call(&mut c, "counter", &format!("c{i}"), "add", "1").await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let mut c = d.client().await;
        let s = status(&mut c).await;
        assert!(s.guest_memory_bytes <= 64 << 20, "warm memory bounded: {s:?}");
        assert!(s.resident_instances < 10_000, "{s:?}");
        assert_eq!(call(&mut c, "counter", "c9999", "get", "").await.unwrap(), 1);
    });
}

/// A reused idempotency key with another operation or payload is refused
/// instead of answered with the first call's reply; the same call still gets
/// its stored reply.
#[test]
fn a_reused_idempotency_key_with_another_call_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = raw_daemon(dir.path(), &[]);
    rt().block_on(async {
        let mut c = d.client().await;
        let keyed = |payload: &str| {
            let mut r = invoke_req("counter", "k", "add", payload);
            r.idempotency_key = "order-17".into();
            r
        };
        let first = c.invoke(keyed("5")).await.unwrap().into_inner().reply;
        assert_eq!(first, b"5");
        assert_eq!(c.invoke(keyed("5")).await.unwrap().into_inner().reply, b"5", "a retry gets the stored reply");
        let e = c.invoke(keyed("7")).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert_eq!(kind(&e), "idempotency-key-reused", "{e:?}");
        let mut other_op = keyed("5");
        other_op.operation = "get".into();
        assert_eq!(kind(&c.invoke(other_op).await.unwrap_err()), "idempotency-key-reused");
        assert_eq!(call(&mut c, "counter", "k", "get", "").await.unwrap(), 5, "nothing ran twice");
    });
}

/// A component written in the component text format, straight against the
/// WIT: four core instances, each with its own linear memory, and a handler
/// that grows every memory by 256 pages (16 MiB) and traps if any growth is
/// refused. Per memory that is far below the limit; together it is not.
const FOUR_MEMORIES_WAT: &str = r#"
(component
  (import "conflux:entity/types@0.1.0" (instance $types
    (type $ce (variant (case "bad-request" string) (case "unknown-operation" string) (case "failed" string)))
    (export "call-error" (type (eq $ce)))))
  (alias export $types "call-error" (type $call-error))
  (core module $extra
    (memory (export "memory") 1)
    (func (export "grow") (param i32) (result i32) (memory.grow (local.get 0))))
  (core instance $x1 (instantiate $extra))
  (core instance $x2 (instantiate $extra))
  (core instance $x3 (instantiate $extra))
  (core module $main
    (import "x1" "grow" (func $g1 (param i32) (result i32)))
    (import "x2" "grow" (func $g2 (param i32) (result i32)))
    (import "x3" "grow" (func $g3 (param i32) (result i32)))
    (memory (export "memory") 1)
    (global $bump (mut i32) (i32.const 1024))
    (func (export "realloc") (param i32 i32 i32 i32) (result i32)
      (local $p i32)
      (local.set $p (i32.and (i32.add (global.get $bump) (i32.sub (local.get 2) (i32.const 1)))
                             (i32.sub (i32.const 0) (local.get 2))))
      (global.set $bump (i32.add (local.get $p) (local.get 3)))
      (local.get $p))
    (func $check (param i32) (if (i32.eq (local.get 0) (i32.const -1)) (then unreachable)))
    (func (export "handle") (param i32 i32 i32 i32) (result i32)
      (call $check (memory.grow (i32.const 256)))
      (call $check (call $g1 (i32.const 256)))
      (call $check (call $g2 (i32.const 256)))
      (call $check (call $g3 (i32.const 256)))
      ;; result::ok of an empty list, in the zeroed bytes at 16..32
      (i32.const 16)))
  (core instance $m (instantiate $main
    (with "x1" (instance $x1)) (with "x2" (instance $x2)) (with "x3" (instance $x3))))
  (func $handle
    (param "operation" string) (param "payload" (list u8)) (result (result (list u8) (error $call-error)))
    (canon lift (core func $m "handle") (memory (core memory $m "memory")) (realloc (core func $m "realloc"))))
  (instance $handler (export "handle" (func $handle)))
  (export "conflux:entity/handler@0.1.0" (instance $handler)))
"#;

/// `runtime.max_memory_bytes` bounds all of an instance's memories together:
/// four memories of 17 MiB each are refused under a 40 MiB limit (the old
/// code applied the limit to each memory, so the instance held 68 MiB).
#[test]
fn an_instance_with_four_memories_is_held_to_one_memory_limit() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = wat::parse_str(FOUR_MEMORIES_WAT).expect("the test component parses");
    let path = dir.path().join("four-memories.wasm");
    std::fs::write(&path, wasm).unwrap();
    let data = dir.path().join("data");
    let d = Daemon::start_with(&data, &["--set", "runtime.max_memory_bytes=41943040"]);
    deploy(&d, "mems", &path);
    rt().block_on(async {
        let mut c = d.client().await;
        let e = c.invoke(invoke_req("mems", "m", "grow", "")).await.unwrap_err();
        assert_eq!(kind(&e), "out-of-memory", "{e:?}");
        assert!(e.message().contains("all its memories together"), "{e:?}");
        let s = status(&mut c).await;
        assert_eq!(s.guest_memory_bytes, 0, "the trapped instance gave its memory back: {s:?}");
    });
}

/// The allow-list of imports holds wherever a component is linked, not only
/// at upload: the runtime links nothing but the inert WASI interfaces, so a
/// component importing `wasi:http` (or any unknown package) cannot be
/// prepared even when the registry's upload check is bypassed.
#[test]
fn the_runtime_cannot_link_a_forbidden_import() {
    let cfg = conflux_host::config::RuntimeConfig::default();
    let runtime = conflux_host::runtime::Runtime::new(&cfg).unwrap();
    let bytes = std::fs::read(guest_wasm("unknown-imports")).unwrap();
    let component = wasmtime::component::Component::new(runtime.engine(), &bytes).unwrap();
    let e = runtime.prepare(&component).err().expect("a forbidden import must not link");
    assert!(e.to_string().contains("acme:evil/thing") || e.to_string().contains("wasi:http"), "{e}");
}

/// The allow-list is also read from the bytes before anything is compiled,
/// so a refused upload costs no compile; a nested core module's imports (from
/// its parent component) are not the host's business.
#[test]
fn imports_are_checked_before_compiling() {
    use conflux_host::registry::{ValidationError, check_declared_imports};
    let bytes = std::fs::read(guest_wasm("unknown-imports")).unwrap();
    match check_declared_imports(&bytes) {
        Err(ValidationError::ForbiddenImports(names)) => {
            assert_eq!(names, ["acme:evil/thing", "wasi:http/outgoing-handler@1.0.0"], "exactly the refused ones")
        }
        other => panic!("expected the forbidden imports, got {other:?}"),
    }
    for ok in ["counter", "escape", "relay"] {
        check_declared_imports(&std::fs::read(guest_wasm(ok)).unwrap()).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    let counter = std::fs::read(guest_wasm("counter")).unwrap();
    let e = check_declared_imports(&counter[..counter.len() / 2]).unwrap_err();
    assert!(e.to_string().contains("not a valid component"), "{e}");
}

/// A guest may import `wasi:filesystem`, `wasi:cli/environment` and
/// `wasi:sockets` (Rust's std does, and so do the TypeScript and Python
/// interpreters), but nothing stands behind them: no directory is preopened,
/// the environment is empty, and every socket or name lookup is refused. Each
/// attempt is an error the guest sees, never access — here against a file
/// that exists and a port that listens on this machine.
#[test]
fn files_environment_and_sockets_are_errors_not_access() {
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), "secret").unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    deploy(&d, "escape", &guest_wasm("escape"));
    let outside = dir.path().join("escaped.txt");
    rt().block_on(async {
        let mut c = d.client().await;
        let path = secret.path().to_str().unwrap();
        for (op, arg) in [
            ("read_file", json!(path)),
            ("read_file", json!("/etc/passwd")),
            ("read_file", json!("secret")),
            ("write_file", json!(outside.to_str().unwrap())),
            ("list_dir", json!("/")),
            ("list_dir", json!(".")),
            ("connect", json!(format!("127.0.0.1:{port}"))),
            ("resolve", json!("localhost")),
            ("bind", json!("127.0.0.1:0")),
        ] {
            let e = call(&mut c, "escape", "e", op, &arg.to_string()).await.expect_err(op);
            assert_eq!(kind(&e), "failed", "{op}({arg}) must be the guest's own error: {e:?}");
        }
        assert_eq!(call(&mut c, "escape", "e", "env", "").await.unwrap(), json!([]));
    });
    assert!(!outside.exists(), "the guest wrote a file");
    assert!(listener.accept().is_err(), "the guest reached a listening socket");
}

/// Component bytes loaded at start-up are checked like an upload: bytes that
/// do not hash to the recorded digest (here: a refused component put in
/// place of a deployed one) stop the node instead of being served.
#[test]
fn a_swapped_component_file_is_refused_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path());
    deploy(&d, "counter", &guest_wasm("counter"));
    d.terminate();
    let components = dir.path().join("components");
    let forbidden = std::fs::read(guest_wasm("unknown-imports")).unwrap();
    for entry in std::fs::read_dir(&components).unwrap() {
        std::fs::write(entry.unwrap().path(), &forbidden).unwrap();
    }
    std::fs::remove_dir_all(dir.path().join("artifacts")).unwrap();
    let out = serve_expecting_failure(dir.path(), &[]);
    assert!(out.contains("hash to"), "{out}");
}

/// SIGTERM while guests sleep in their turns: their turns end by their
/// deadline, so the node drains and exits cleanly instead of waiting out its
/// grace with turns blocked in the host (the old code then panicked in tokio).
#[test]
fn sigterm_with_sleeping_guests_drains_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = raw_daemon(dir.path(), &["runtime.turn_timeout_ms=1000", "scheduler.shutdown_grace_ms=10000"]);
    let runtime = rt();
    let sleepers: Vec<_> = runtime.block_on(async {
        let mut handles = Vec::new();
        for i in 0..3 {
            let mut c = d.client().await;
            handles.push(tokio::spawn(async move { raw(&mut c, &format!("t{i}"), "sleep", "30000").await }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        handles
    });
    let started = std::time::Instant::now();
    let exit = d.terminate();
    let took = started.elapsed();
    assert!(exit.success(), "{exit:?}: {}", d.log());
    assert!(took < std::time::Duration::from_secs(8), "drained in {took:?} (the grace is 10 s)");
    assert!(!d.log().contains("panicked"), "{}", d.log());
    runtime.block_on(async {
        for s in sleepers {
            let _ = s.await.unwrap();
        }
    });
}
