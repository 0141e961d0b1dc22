//! End to end with the real binary: entities written in TypeScript
//! (componentize-js) and Python (componentize-py) next to Rust ones — exact
//! totals under concurrency, `kill -9`, the Team Joiner race across languages,
//! asks answered and refused across languages, hot swaps between languages,
//! and the sandbox seen from an interpreter.
//!
//! The components are built by `scripts/build-ts.sh` and
//! `scripts/build-python.sh` (which `scripts/test.sh` runs first) into
//! `target/polyglot/`. Every daemon here shares one compiled-code cache
//! (`runtime.compile_cache_dir`), so each 12–18 MB component is compiled once
//! per machine rather than once per test.

mod support;

use serde_json::{Value, json};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use support::*;
use tonic::Code;

fn daemon(dir: &Path, extra: &[&str]) -> Daemon {
    let cache = compile_cache_setting();
    let mut args = vec!["--set", cache.as_str()];
    args.extend_from_slice(extra);
    Daemon::start_with(dir, &args)
}

/// 32 callers adding to one entity: the total is exact. Then, on a fresh node,
/// 16 callers over 40 entities until a `kill -9`: after the restart every
/// entity holds at least its acknowledged adds and at most its attempted ones.
fn counter_is_exact_and_survives_kill_dash_nine(wasm: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path(), &[]);
    deploy(&d, "counter", wasm);
    let runtime = rt();
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let mut c = d.client().await;
            tasks.push(tokio::spawn(async move {
                for _ in 0..50 {
                    call(&mut c, "counter", "hot", "add", "1").await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let mut c = d.client().await;
        assert_eq!(call(&mut c, "counter", "hot", "get", "").await.unwrap(), json!(32 * 50));
        let e = call(&mut c, "counter", "hot", "add", "\"five\"").await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        let e = call(&mut c, "counter", "hot", "reset", "").await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        assert!(e.message().contains("offered: add, get"), "{e:?}");
    });

    drop(d);
    let cache = compile_cache_setting();
    kill_dash_nine_during_adds_loses_no_acknowledged_add(wasm, &["--set", &cache]);
}

#[test]
fn a_typescript_counter_is_exact_and_survives_kill_dash_nine() {
    counter_is_exact_and_survives_kill_dash_nine(&polyglot_wasm("counter-ts"));
}

#[test]
fn a_python_counter_is_exact_and_survives_kill_dash_nine() {
    counter_is_exact_and_survives_kill_dash_nine(&polyglot_wasm("counter-py"));
}

/// The seeds' race, across languages: 24 concurrent joins of one user to 24
/// teams, where `user` and `team` are written in different languages. Exactly
/// one join wins — it asks its team, and the others are refused while that
/// ask is pending — and only the winning team, in the other language, lists
/// the user: the ask crossed languages with its caller, and the team's answer
/// came back to the user's continuation, which put the user on the team.
#[test]
fn the_team_joiner_race_is_fixed_across_languages() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path(), &[]);
    let pairs = [
        ("ts-user+rust-team", polyglot_wasm("user-ts"), guest_wasm("team")),
        ("py-user+ts-team", polyglot_wasm("user-py"), polyglot_wasm("team-ts")),
        ("rust-user+py-team", guest_wasm("team-joiner"), polyglot_wasm("team-py")),
    ];
    let runtime = rt();
    for (round, (pair, user_wasm, team_wasm)) in pairs.iter().enumerate() {
        // Each round deploys new versions over the last: a hot swap between languages too.
        deploy(&d, "user", user_wasm);
        deploy(&d, "team", team_wasm);
        runtime.block_on(async {
            let user = format!("sue{round}");
            let mut tasks = Vec::new();
            for t in 0..24 {
                let mut c = d.client().await;
                let (user, team) = (user.clone(), format!("r{round}-team-{t}"));
                tasks.push(tokio::spawn(async move {
                    call(&mut c, "user", &user, "join", &json!(team).to_string()).await.map(|_| team)
                }));
            }
            let mut winners = Vec::new();
            for task in tasks {
                match task.await.unwrap() {
                    Ok(team) => winners.push(team),
                    Err(s) => {
                        assert_eq!(s.code(), Code::FailedPrecondition, "{pair}: {s:?}");
                        assert!(s.message().contains("already on team"), "{pair}: {}", s.message());
                    }
                }
            }
            assert_eq!(winners.len(), 1, "{pair}: exactly one join must win: {winners:?}");
            // The user is on its team once the team accepted its ask, in every language.
            let mut c = d.client().await;
            eventually(30, "the user on its team", async || {
                (call(&mut c, "user", &user, "team", "").await.unwrap() == json!(winners[0])).then_some(())
            })
            .await;
            let winner = winners[0].clone();
            let members = eventually(30, "the add_member ask", async || {
                let m = call(&mut c, "team", &winner, "members", "").await.unwrap();
                (m != json!([])).then_some(m)
            })
            .await;
            assert_eq!(members, json!([user]), "{pair}");
            for t in 0..24 {
                let team = format!("r{round}-team-{t}");
                if team != winner {
                    let m = call(&mut c, "team", &team, "members", "").await.unwrap();
                    assert_eq!(m, json!([]), "{pair}: {team} lists a user who is not on it");
                }
            }
            // Only the user itself may add itself: the check on `context.caller` holds in every language.
            let e = call(&mut c, "team", &winner, "add_member", "\"mallory\"").await.unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{pair}: {e:?}");
        });
    }
    let dead = stdout(&d.cli(&["dead-letters"]));
    assert!(
        !dead.contains("add_member") && !dead.contains("on_added"),
        "no ask or answer became a dead letter: {dead}"
    );
}

/// `$self` of `ty/id` as stored, or "" if it has none.
async fn self_json(
    c: &mut conflux_client::pb::conflux_client::ConfluxClient<tonic::transport::Channel>,
    ty: &str,
    id: &str,
) -> String {
    let req = conflux_client::pb::GetStateRequest {
        entity: Some(conflux_client::pb::EntityRef { entity_type: ty.into(), id: id.into() }),
        start_after: String::new(),
        limit: 0,
    };
    let page = c.get_state(req).await.unwrap().into_inner();
    page.entries
        .iter()
        .find(|e| e.key == "$self")
        .map(|e| String::from_utf8(e.value.clone()).unwrap())
        .unwrap_or_default()
}

/// Asks refused across languages: a team limited to one member accepts the
/// first user and refuses the second, whose continuation — written in another
/// language than the team — gets the team's `failed` with its message and
/// leaves the user on no team, free to join another. Users and teams of each
/// language write the Rust examples' state JSON, and no ask or answer becomes
/// a dead letter. It reuses the race's components: TypeScript ↔ Python both
/// ways, and Rust on either side.
#[test]
fn a_full_team_refuses_a_user_of_another_language_through_its_answer() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path(), &[]);
    let pairs = [
        ("ts-user+py-team", polyglot_wasm("user-ts"), polyglot_wasm("team-py")),
        ("py-user+ts-team", polyglot_wasm("user-py"), polyglot_wasm("team-ts")),
        ("rust-user+ts-team", guest_wasm("team-joiner"), polyglot_wasm("team-ts")),
        ("py-user+rust-team", polyglot_wasm("user-py"), guest_wasm("team")),
    ];
    let runtime = rt();
    for (round, (pair, user_wasm, team_wasm)) in pairs.iter().enumerate() {
        deploy(&d, "user", user_wasm);
        deploy(&d, "team", team_wasm);
        let (team, open) = (format!("r{round}-full"), format!("r{round}-open"));
        let (amy, bob) = (format!("r{round}-amy"), format!("r{round}-bob"));
        runtime.block_on(async {
            let mut c = d.client().await;
            call(&mut c, "team", &team, "limit", "1").await.unwrap();
            let join = json!(team).to_string();
            assert_eq!(call(&mut c, "user", &amy, "join", &join).await.unwrap(), json!(team), "{pair}");
            eventually(30, "the first user on the team", async || {
                (call(&mut c, "user", &amy, "team", "").await.unwrap() == json!(team)).then_some(())
            })
            .await;
            // The second join asks and returns at once; the full team's answer frees the user.
            assert_eq!(call(&mut c, "user", &bob, "join", &join).await.unwrap(), json!(team), "{pair}");
            eventually(30, "the refusal", async || {
                (self_json(&mut c, "user", &bob).await == r#"{"team":null}"#).then_some(())
            })
            .await;
            assert_eq!(call(&mut c, "user", &bob, "team", "").await.unwrap(), Value::Null, "{pair}");
            assert_eq!(call(&mut c, "team", &team, "members", "").await.unwrap(), json!([amy]), "{pair}");
            assert_eq!(self_json(&mut c, "user", &amy).await, format!(r#"{{"team":"{team}"}}"#), "{pair}");
            assert_eq!(
                self_json(&mut c, "team", &team).await,
                format!(r#"{{"members":["{amy}"],"capacity":1}}"#),
                "{pair}"
            );
            // Free again: another team takes the refused user.
            let join_open = json!(open).to_string();
            assert_eq!(call(&mut c, "user", &bob, "join", &join_open).await.unwrap(), json!(open), "{pair}");
            eventually(30, "the refused user on another team", async || {
                (call(&mut c, "user", &bob, "team", "").await.unwrap() == json!(open)).then_some(())
            })
            .await;
        });
        let logs = stdout(&d.cli(&["logs", &format!("user/{bob}")]));
        let refusal = format!("user {bob} did not join team {team}: the callee refused: failed: team {team} is full");
        assert!(logs.contains(&refusal), "{pair}: the continuation got the team's refusal, kind and message: {logs}");
    }
    runtime.block_on(async {
        let mut c = d.client().await;
        let s = c.status(conflux_client::pb::StatusRequest::default()).await.unwrap().into_inner();
        assert_eq!(s.dead_letters, 0, "no ask or answer became a dead letter");
    });
}

/// 16 clients add to 32 counters while the type moves Rust → TypeScript →
/// Python, then rolls back to Rust: no call fails, every acknowledged add is
/// counted once, and each language reads the state the other wrote.
#[test]
fn a_hot_swap_between_languages_fails_no_call_and_keeps_state() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path(), &[]);
    deploy(&d, "counter", &guest_wasm("counter"));
    let runtime = rt();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    runtime.block_on(async {
        for client in 0..16usize {
            let mut c = d.client().await;
            let (stop, acked) = (stop.clone(), acked.clone());
            tasks.push(tokio::spawn(async move {
                let mut errors = Vec::new();
                for j in 0..200_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    match call(&mut c, "counter", &format!("k{}", (client * 7 + j) % 32), "add", "1").await {
                        Ok(_) => {
                            acked.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => errors.push(e),
                    }
                }
                errors
            }));
        }
    });
    let cli = |args: &[&str]| {
        let out = d.cli(args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    };
    // Each SDK words a bad payload its own way: which code answers shows in the message.
    let refusal = || {
        runtime.block_on(async {
            let mut c = d.client().await;
            let e = call(&mut c, "counter", "k0", "add", "\"x\"").await.unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
            e.message().to_owned()
        })
    };
    let settle = || std::thread::sleep(Duration::from_millis(1200));
    settle();
    let before_ts = acked.load(Ordering::SeqCst);
    let rust_says = refusal();
    cli(&["deploy", "counter", polyglot_wasm("counter-ts").to_str().unwrap()]);
    let ts_says = refusal();
    settle();
    let before_py = acked.load(Ordering::SeqCst);
    cli(&["deploy", "counter", polyglot_wasm("counter-py").to_str().unwrap()]);
    let py_says = refusal();
    settle();
    let before_rollback = acked.load(Ordering::SeqCst);
    cli(&["rollback", "counter", "1"]);
    assert_eq!(refusal(), rust_says, "Rust answers again after the rollback");
    assert!(rust_says != ts_says && ts_says != py_says && py_says != rust_says, "{rust_says} / {ts_says} / {py_says}");
    settle();
    stop.store(true, Ordering::Relaxed);
    runtime.block_on(async {
        for t in tasks {
            let errors = t.await.unwrap();
            assert!(errors.is_empty(), "{} calls failed across the swaps, e.g. {:?}", errors.len(), errors[0]);
        }
        let total = acked.load(Ordering::SeqCst);
        assert!(before_ts > 100, "the load did not get going: {before_ts}");
        assert!(
            before_py > before_ts && before_rollback > before_py && total > before_rollback,
            "every version served: {before_ts} / {before_py} / {before_rollback} / {total}"
        );
        let mut c = d.client().await;
        let mut sum = 0;
        for k in 0..32 {
            sum += call(&mut c, "counter", &format!("k{k}"), "get", "").await.unwrap().as_u64().unwrap();
        }
        assert_eq!(sum, total, "every acknowledged add is counted once");
    });
    let versions = stdout(&d.cli(&["versions", "counter"]));
    assert!(versions.lines().any(|l| l.contains("active") && l.trim_start().starts_with('1')), "{versions}");
}

/// An interpreter guest has no way out either: the Python one sees no file,
/// no environment and no socket; the JavaScript runtime has no file or socket
/// API, and its `fetch` has nothing behind it (the call traps). A build that
/// imports `wasi:http` is refused at upload. An unexpected exception traps
/// the turn like a Rust panic, and the next call gets a fresh instance.
#[test]
fn interpreter_guests_get_errors_not_access() {
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), "secret").unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path(), &[]);
    deploy(&d, "escape_py", &polyglot_wasm("escape-py"));
    deploy(&d, "escape_ts", &polyglot_wasm("escape-ts"));
    for ok in ["counter-ts", "counter-py", "user-ts", "user-py", "escape-ts", "escape-py", "timer-ts", "timer-py"] {
        let bytes = std::fs::read(polyglot_wasm(ok)).unwrap();
        conflux_host::registry::check_declared_imports(&bytes).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    let out = d.cli(&["deploy", "http_ts", polyglot_wasm("http-ts").to_str().unwrap()]);
    assert!(!out.status.success(), "a component importing wasi:http was accepted");
    let err = stderr(&out);
    assert!(err.contains("imports interfaces the host does not allow") && err.contains("wasi:http/"), "{err}");
    assert!(!err.contains("wasi:filesystem") && !err.contains("wasi:sockets"), "inert imports are not blamed: {err}");

    rt().block_on(async {
        let mut c = d.client().await;
        let refused = |v: Value, what: &str| {
            assert_eq!(v["ok"], json!(false), "{what} must fail: {v}");
        };
        let path = json!(secret.path().to_str().unwrap()).to_string();
        for ty in ["escape_py", "escape_ts"] {
            refused(call(&mut c, ty, "e", "read_file", &path).await.unwrap(), "{ty} read_file");
            refused(call(&mut c, ty, "e", "read_file", "\"/etc/passwd\"").await.unwrap(), "{ty} read_file");
            assert_eq!(call(&mut c, ty, "e", "env", "").await.unwrap(), json!({}), "{ty} sees an environment");
            refused(call(&mut c, ty, "e", "connect", &json!(addr).to_string()).await.unwrap(), "{ty} connect");
            refused(call(&mut c, ty, "e", "preopens", "").await.unwrap(), "{ty} preopens");
        }
        let listed = call(&mut c, "escape_py", "e", "listdir", "\".\"").await.unwrap();
        refused(listed, "listdir .");
        let e = call(&mut c, "escape_ts", "e", "fetch", &json!(addr).to_string()).await.unwrap_err();
        assert_eq!(kind(&e), "trap", "fetch without wasi:http: {e:?}");
        // An unexpected exception is a trap, and the entity is served again by a fresh instance.
        for op in ["boom", "throw_value"] {
            let e = call(&mut c, "escape_ts", "e", op, "").await.unwrap_err();
            assert_eq!(kind(&e), "trap", "{op}: {e:?}");
            assert_eq!(call(&mut c, "escape_ts", "e", "env", "").await.unwrap(), json!({}));
        }
    });
    assert!(listener.accept().is_err(), "a guest reached a listening socket");
    let logs = stdout(&d.cli(&["logs", "escape_ts/e"]));
    assert!(logs.contains("boom: an unexpected exception"), "the exception reached the guest's log: {logs}");
}

/// Warm instances are bounded by bytes, not by count: a Python instance holds
/// about 12 MiB, so 24 Python counters under a 64 MiB warm budget keep only a
/// handful warm — and all of them keep their state.
#[test]
fn warm_python_instances_are_bounded_by_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let budget: u64 = 64 << 20;
    let d = daemon(dir.path(), &["--set", &format!("scheduler.max_warm_memory_bytes={budget}")]);
    deploy(&d, "counter", &polyglot_wasm("counter-py"));
    rt().block_on(async {
        let mut c = d.client().await;
        for round in 1..=2 {
            for i in 0..24 {
                assert_eq!(call(&mut c, "counter", &format!("p{i}"), "add", "1").await.unwrap(), json!(round));
            }
        }
        let s = c.status(conflux_client::pb::StatusRequest::default()).await.unwrap().into_inner();
        assert!(s.guest_memory_bytes <= budget, "warm instances hold {} bytes > {budget}", s.guest_memory_bytes);
        assert!(s.resident_instances >= 1 && s.resident_instances < 24, "{} of 24 kept warm", s.resident_instances);
        let per_instance = s.guest_memory_bytes / s.resident_instances.max(1);
        assert!(per_instance > 4 << 20, "a Python instance is bigger than this: {per_instance} bytes");
    });
}

/// Timers, idempotency keys and messages behave the same in every language:
/// a TypeScript `timer` and a Python `timer_peer` (the same entity, one per
/// SDK) arm timers that fire once, across a `kill -9` too; a cancelled timer
/// never fires; an `arm` retried with one idempotency key arms one timer; and
/// a TypeScript turn's message reaches the Python entity.
#[test]
fn timers_idempotency_keys_and_messages_behave_the_same_in_every_language() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = daemon(dir.path(), &[]);
    deploy(&d, "timer", &polyglot_wasm("timer-ts"));
    deploy(&d, "timer_peer", &polyglot_wasm("timer-py"));
    let types = ["timer", "timer_peer"];
    let runtime = rt();
    runtime.block_on(async {
        let mut c = d.client().await;
        for ty in types {
            call(&mut c, ty, "a", "arm", "300").await.unwrap();
            call(&mut c, ty, "b", "arm", "600").await.unwrap();
            assert_eq!(call(&mut c, ty, "b", "disarm", "").await.unwrap(), json!(true), "{ty}");
            let e = call(&mut c, ty, "a", "fire", "").await.unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{ty}: only its own timer fires it: {e:?}");
            // One idempotency key, three attempts: one turn, one timer, the same reply.
            let mut replies = Vec::new();
            for _ in 0..3 {
                let mut req = invoke_req(ty, "c", "arm", "300");
                req.idempotency_key = format!("{ty}-arm-c");
                replies.push(c.invoke(req).await.unwrap().into_inner().reply);
            }
            assert!(replies.iter().all(|r| *r == replies[0]), "{ty}: {replies:?}");
        }
        assert_eq!(call(&mut c, "timer", "a", "ping", "3").await.unwrap(), json!(3));
        for ty in types {
            for id in ["a", "c"] {
                let s = eventually(10, "the timer", async || {
                    let s = call(&mut c, ty, id, "status", "").await.unwrap();
                    (s["fired"] != json!(0)).then_some(s)
                })
                .await;
                assert_eq!(s["armed"], Value::Null, "{ty}/{id}: {s}");
            }
        }
        let pongs = eventually(10, "the pong", async || {
            let s = call(&mut c, "timer_peer", "a", "status", "").await.unwrap();
            (s["pongs"] != json!(0)).then_some(s["pongs"].clone())
        })
        .await;
        assert_eq!(pongs, json!(3), "the TypeScript entity's message reached the Python one once");
        tokio::time::sleep(Duration::from_millis(800)).await;
        for ty in types {
            for (id, fired) in [("a", 1), ("b", 0), ("c", 1)] {
                let s = call(&mut c, ty, id, "status", "").await.unwrap();
                assert_eq!(s["fired"], json!(fired), "{ty}/{id} fired {s}");
            }
            call(&mut c, ty, "d", "arm", "1500").await.unwrap();
        }
    });
    // Timers armed before a crash fire after it, once.
    d.kill9();
    let d = daemon(dir.path(), &[]);
    runtime.block_on(async {
        let mut c = d.client().await;
        for ty in types {
            eventually(15, "a timer armed before the crash", async || {
                let s = call(&mut c, ty, "d", "status", "").await.unwrap();
                (s["fired"] != json!(0)).then_some(())
            })
            .await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        for ty in types {
            assert_eq!(call(&mut c, ty, "d", "status", "").await.unwrap()["fired"], json!(1), "{ty}");
        }
    });
}

/// A componentize-js instance grows about 1 KB per call however little the
/// entity allocates (upstream: bytecodealliance/ComponentizeJS#279), and would
/// trap `out-of-memory` after some 40,000 calls. The scheduler drops an
/// instance that outgrew `scheduler.max_warm_instance_bytes` after its turn,
/// so a hot TypeScript entity is re-instantiated now and then and no call
/// ever fails.
#[test]
fn a_hot_typescript_entity_outgrowing_its_instance_never_fails_a_call() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path(), &[]);
    deploy(&d, "counter", &polyglot_wasm("counter-ts"));
    const CALLERS: usize = 16;
    const ADDS: usize = 750;
    rt().block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..CALLERS {
            let mut c = d.client().await;
            tasks.push(tokio::spawn(async move {
                for _ in 0..ADDS {
                    call(&mut c, "counter", "hot", "add", "1").await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let mut c = d.client().await;
        assert_eq!(call(&mut c, "counter", "hot", "get", "").await.unwrap(), json!(CALLERS * ADDS));
    });
    let metrics = ureq::get(format!("{}/metrics", d.url())).call().unwrap().body_mut().read_to_string().unwrap();
    let outgrown: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("conflux_instances_outgrown_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("conflux_instances_outgrown_total");
    assert!(outgrown >= 1, "{} calls should outgrow 16 MiB at least once: {outgrown}", CALLERS * ADDS);
}
