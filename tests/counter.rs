//! End to end with the real binary: the counter under concurrency, restart,
//! and `kill -9` during load; team-joiner's race made impossible.

mod support;

use std::collections::HashMap;
use support::*;
use tonic::Code;

const CLIENTS: usize = 32;
const ADDS_PER_CLIENT: usize = 200;

#[test]
fn concurrent_adds_are_exact_on_one_and_on_many_entities() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    deploy(&d, "counter", &guest_wasm("counter"));
    rt().block_on(async {
        // 32 clients × 200 `add 1` on one entity.
        let mut tasks = Vec::new();
        for _ in 0..CLIENTS {
            let mut c = d.client().await;
            tasks.push(tokio::spawn(async move {
                for _ in 0..ADDS_PER_CLIENT {
                    call(&mut c, "counter", "hot", "add", "1").await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let mut c = d.client().await;
        let total = call(&mut c, "counter", "hot", "get", "").await.unwrap();
        assert_eq!(total, serde_json::json!((CLIENTS * ADDS_PER_CLIENT) as i64));

        // The same over 1,000 entities, each client walking its own stride.
        let mut tasks = Vec::new();
        for client in 0..CLIENTS {
            let mut c = d.client().await;
            tasks.push(tokio::spawn(async move {
                for j in 0..ADDS_PER_CLIENT {
                    let id = format!("e{}", (client * ADDS_PER_CLIENT + j) % 1000);
                    call(&mut c, "counter", &id, "add", "1").await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let mut expected: HashMap<String, i64> = HashMap::new();
        for client in 0..CLIENTS {
            for j in 0..ADDS_PER_CLIENT {
                *expected.entry(format!("e{}", (client * ADDS_PER_CLIENT + j) % 1000)).or_default() += 1;
            }
        }
        let mut sum = 0;
        for i in 0..1000 {
            let id = format!("e{i}");
            let got = call(&mut c, "counter", &id, "get", "").await.unwrap().as_i64().unwrap();
            assert_eq!(got, expected[&id], "entity {id}");
            sum += got;
        }
        assert_eq!(sum, (CLIENTS * ADDS_PER_CLIENT) as i64);
    });
}

#[test]
fn state_and_registry_survive_a_clean_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path());
    deploy(&d, "counter", &guest_wasm("counter"));
    for _ in 0..5 {
        let out = d.cli(&["invoke", "counter/r1", "add", "7"]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let status = d.terminate();
    assert!(status.success(), "SIGTERM exit: {status:?}\n{}", d.log());
    assert!(d.log().contains("shut down cleanly"), "{}", d.log());

    let d = Daemon::start(dir.path());
    let out = d.cli(&["invoke", "counter/r1", "get"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "35");
    let types = d.cli(&["types"]);
    assert!(stdout(&types).contains("counter\tversion 1"), "{}", stdout(&types));
    // The compiled artifact was cached: the restart did not recompile.
    let artifacts: Vec<_> = std::fs::read_dir(dir.path().join("artifacts")).unwrap().collect();
    assert_eq!(artifacts.len(), 1);
}

#[test]
fn kill_dash_nine_during_load_loses_no_acknowledged_add() {
    kill_dash_nine_during_adds_loses_no_acknowledged_add(&guest_wasm("counter"), &[]);
}

#[test]
fn team_joiner_lets_exactly_one_concurrent_join_win() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    deploy(&d, "user", &guest_wasm("team-joiner"));
    deploy(&d, "team", &guest_wasm("team"));
    rt().block_on(async {
        for round in 0..5 {
            let user = format!("sue{round}");
            let mut tasks = Vec::new();
            for t in 0..24 {
                let mut c = d.client().await;
                let user = user.clone();
                tasks.push(tokio::spawn(async move {
                    let team = format!("\"team-{t}\"");
                    call(&mut c, "user", &user, "join", &team).await.map(|v| (t, v))
                }));
            }
            let mut winners = Vec::new();
            for task in tasks {
                match task.await.unwrap() {
                    Ok((t, v)) => winners.push((t, v)),
                    Err(s) => {
                        assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
                        assert!(s.message().contains("already on team"), "{}", s.message());
                    }
                }
            }
            assert_eq!(winners.len(), 1, "exactly one join must win: {winners:?}");
            // On the team once it accepted (the join asked it).
            let mut c = d.client().await;
            eventually(30, "the team's acceptance", async || {
                (call(&mut c, "user", &user, "team", "").await.unwrap() == winners[0].1).then_some(())
            })
            .await;
        }
    });
}

#[test]
fn sigterm_right_after_listening_still_shuts_down_cleanly() {
    // The signal handlers are installed before the "listening" line, so even
    // an immediate SIGTERM takes the drain-and-persist path.
    for _ in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Daemon::start(dir.path());
        let status = d.terminate();
        assert!(status.success(), "{status:?}\n{}", d.log());
        assert!(d.log().contains("shut down cleanly"), "{}", d.log());
    }
}

/// Bytes of every file under `dir`.
fn bytes_under(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => bytes_under(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// The hot-key regression of issue 23: component bytes kept in the state
/// store shared a sled leaf with a lone hot entity, so every consolidation of
/// that leaf rewrote the whole component (2.9 MB for the counter) — ≈ 1 MB
/// of disk and a multi-megabyte copy per commit, and the hot key's
/// throughput halved. Components live in `components/`, never in the store.
#[test]
fn a_hot_entity_never_rewrites_its_component() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let wasm = guest_wasm("counter");
    let component_bytes = std::fs::metadata(&wasm).unwrap().len();
    deploy(&d, "counter", &wasm);
    rt().block_on(async {
        let mut c = d.client().await;
        for _ in 0..400 {
            call(&mut c, "counter", "hot", "add", "1").await.unwrap();
        }
        assert_eq!(call(&mut c, "counter", "hot", "get", "").await.unwrap(), serde_json::json!(400));
    });
    let state = bytes_under(&d.data_dir.join("state"));
    assert!(
        state < component_bytes,
        "the state store holds {state} bytes after 400 adds on one entity: it keeps (and rewrites) the \
         {component_bytes}-byte component"
    );
}
