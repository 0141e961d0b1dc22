//! End to end with the real binary: entity messaging (transactional outbox,
//! in-order effectively-once delivery, dead letters), durable timers, idempotency
//! keys, and the examples built on them (bank saga, team-joiner, lease lock).

mod support;

use conflux_client::pb;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;
use support::*;
use tonic::Code;

type Client = pb::conflux_client::ConfluxClient<tonic::transport::Channel>;

async fn outbox_empty(c: &mut Client) -> bool {
    c.status(pb::StatusRequest {}).await.unwrap().into_inner().outbox_messages == 0
}

async fn stats(c: &mut Client, id: &str) -> Value {
    call(c, "relay", id, "stats", "").await.unwrap()
}

#[test]
fn ten_thousand_messages_between_two_entities_arrive_in_order_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    deploy(&d, "relay", &guest_wasm("relay"));
    rt().block_on(async {
        let mut c = d.client().await;
        for turn in 0..100u64 {
            let seq = json!({"target_id": "b", "from": turn * 100 + 1, "count": 100}).to_string();
            call(&mut c, "relay", "a", "sequence", &seq).await.unwrap();
        }
        let b = eventually(120, "10,000 messages", async || {
            let s = stats(&mut c, "b").await;
            (s["received"] == json!(10_000)).then_some(s)
        })
        .await;
        assert_eq!(b, json!({"last": 10_000, "violations": 0, "received": 10_000}));
        eventually(10, "an empty outbox", async || outbox_empty(&mut c).await.then_some(())).await;
    });
}

#[test]
fn forced_duplicate_deliveries_are_absorbed_by_deduplication() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(dir.path(), &["--set", "scheduler.debug_duplicate_delivery=true"]);
    deploy(&d, "relay", &guest_wasm("relay"));
    deploy(&d, "counter", &guest_wasm("counter"));
    rt().block_on(async {
        let mut c = d.client().await;
        for _ in 0..5 {
            let f = json!({"target_type": "counter", "target_id": "x", "operation": "add", "payload": 1, "count": 100});
            call(&mut c, "relay", "a", "fanout", &f.to_string()).await.unwrap();
        }
        let seq = json!({"target_id": "b", "from": 1, "count": 300}).to_string();
        call(&mut c, "relay", "a", "sequence", &seq).await.unwrap();
        eventually(60, "delivery", async || outbox_empty(&mut c).await.then_some(())).await;
        assert_eq!(call(&mut c, "counter", "x", "get", "").await.unwrap(), json!(500), "each add counted once");
        assert_eq!(stats(&mut c, "b").await, json!({"last": 300, "violations": 0, "received": 300}));
    });
}

#[test]
fn failed_turns_send_nothing_and_undeliverable_messages_become_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    deploy(&d, "relay", &guest_wasm("relay"));
    deploy(&d, "counter", &guest_wasm("counter"));
    rt().block_on(async {
        let mut c = d.client().await;
        let e = call(&mut c, "relay", "a", "send_then_fail", "\"b\"").await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        let to_ghost =
            json!({"target_type": "ghost", "target_id": "g", "operation": "boo", "payload": null, "count": 1});
        call(&mut c, "relay", "a", "fanout", &to_ghost.to_string()).await.unwrap();
        let bad_add =
            json!({"target_type": "counter", "target_id": "x", "operation": "add", "payload": "x", "count": 1});
        call(&mut c, "relay", "a", "fanout", &bad_add.to_string()).await.unwrap();
        let seq = json!({"target_id": "b", "from": 1, "count": 1}).to_string();
        call(&mut c, "relay", "a", "sequence", &seq).await.unwrap();
        eventually(30, "delivery", async || outbox_empty(&mut c).await.then_some(())).await;
        // Only the committed message arrived: the failed turn's `expect(1)` never left.
        assert_eq!(stats(&mut c, "b").await, json!({"last": 1, "violations": 0, "received": 1}));
        let dl = c.list_dead_letters(pb::ListDeadLettersRequest::default()).await.unwrap().into_inner();
        let reasons: Vec<(String, String)> = dl
            .dead_letters
            .iter()
            .map(|d| (d.target.as_ref().unwrap().entity_type.clone(), d.reason.clone()))
            .collect();
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        assert!(reasons[0].0 == "ghost" && reasons[0].1.contains("unknown entity type"), "{reasons:?}");
        assert!(reasons[1].0 == "counter" && reasons[1].1.contains("bad request"), "{reasons:?}");
        assert_eq!(c.status(pb::StatusRequest {}).await.unwrap().into_inner().dead_letters, 2);
    });
    let out = d.cli(&["dead-letters"]);
    let text = stdout(&out);
    assert!(
        text.contains("relay/a #") && text.contains("-> ghost/g boo") && text.contains("unknown entity type"),
        "{text}"
    );
    assert!(text.contains("-> counter/x add") && text.contains("payload \"x\""), "{text}");
}

#[test]
fn timers_survive_a_crash_fire_once_and_cancelled_ones_never_fire() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path());
    deploy(&d, "relay", &guest_wasm("relay"));
    deploy(&d, "counter", &guest_wasm("counter"));
    let runtime = rt();
    runtime.block_on(async {
        let mut c = d.client().await;
        let later = |n: i64| {
            json!({"delay_ms": 1500, "target_type": "counter", "target_id": "t", "operation": "add", "payload": n})
                .to_string()
        };
        for _ in 0..5 {
            call(&mut c, "relay", "a", "later", &later(1)).await.unwrap();
        }
        let doomed = call(&mut c, "relay", "a", "later", &later(100)).await.unwrap();
        assert_eq!(call(&mut c, "relay", "a", "cancel", &doomed.to_string()).await.unwrap(), json!(true));
        assert_eq!(call(&mut c, "relay", "a", "cancel", &doomed.to_string()).await.unwrap(), json!(false));
        assert_eq!(call(&mut c, "relay", "a", "cancel", "\"no-such-timer\"").await.unwrap(), json!(false));
    });
    // Down while the timers fall due: they fire at start-up.
    d.kill9();
    std::thread::sleep(Duration::from_millis(2000));
    let d = Daemon::start(dir.path());
    runtime.block_on(async {
        let mut c = d.client().await;
        eventually(20, "the timers", async || {
            (call(&mut c, "counter", "t", "get", "").await.unwrap() == json!(5)).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(call(&mut c, "counter", "t", "get", "").await.unwrap(), json!(5), "fired once, cancelled never");
    });
}

#[test]
fn an_idempotency_key_retried_100_times_concurrently_runs_the_turn_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path());
    deploy(&d, "counter", &guest_wasm("counter"));
    let runtime = rt();
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let mut c = d.client().await;
            tasks.push(tokio::spawn(async move {
                let mut req = invoke_req("counter", "i", "add", "1");
                req.idempotency_key = "order-17".into();
                c.invoke(req).await.map(|r| r.into_inner().reply)
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), b"1", "every retry gets the first reply");
        }
        let mut c = d.client().await;
        assert_eq!(call(&mut c, "counter", "i", "get", "").await.unwrap(), json!(1));
        let mut bad = invoke_req("counter", "i", "add", "1");
        bad.idempotency_key = "bad\nkey".into();
        let e = c.invoke(bad).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    });
    // Through the CLI, and across a crash.
    let add = |d: &Daemon, key: &str| stdout(&d.cli(&["invoke", "counter/i", "add", "5", "--idempotency-key", key]));
    assert_eq!(add(&d, "k2").trim(), "6");
    assert_eq!(add(&d, "k2").trim(), "6");
    d.kill9();
    let d = Daemon::start(dir.path());
    assert_eq!(add(&d, "k2").trim(), "6");
    assert_eq!(stdout(&d.cli(&["invoke", "counter/i", "get"])).trim(), "6");
}

const ACCOUNTS: u64 = 10;
const OPENING_BALANCE: i64 = 1000;

#[test]
fn bank_money_is_conserved_across_repeated_kill_dash_nine() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path());
    deploy(&d, "account", &guest_wasm("bank"));
    let runtime = rt();
    runtime.block_on(async {
        let mut c = d.client().await;
        for a in 0..ACCOUNTS {
            call(&mut c, "account", &format!("a{a}"), "deposit", &OPENING_BALANCE.to_string()).await.unwrap();
        }
        // A closed account: transfers to it are refunded (the compensation).
        call(&mut c, "account", "a9", "close", "").await.unwrap();
    });
    let mut acknowledged: Vec<(String, String, String)> = Vec::new(); // (from, to, transfer id)
    for round in 0..3u64 {
        let acks = runtime.block_on(async {
            let mut tasks = Vec::new();
            for client in 0..8u64 {
                let mut c = d.client().await;
                tasks.push(tokio::spawn(async move {
                    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (round * 131 + client + 1));
                    let mut acks = Vec::new();
                    for _ in 0..10_000 {
                        let from = format!("a{}", rng.below(ACCOUNTS - 1));
                        let to = format!("a{}", rng.below(ACCOUNTS));
                        let amount = 1 + rng.below(50);
                        let t = json!({"to": to, "amount": amount}).to_string();
                        match call(&mut c, "account", &from, "transfer", &t).await {
                            Ok(id) => acks.push((from, to, id.as_str().unwrap().to_owned())),
                            Err(e) if e.code() == Code::FailedPrecondition || e.code() == Code::InvalidArgument => {}
                            Err(_) => break, // the daemon died under us
                        }
                    }
                    acks
                }));
            }
            tokio::time::sleep(Duration::from_millis(1200)).await;
            d.kill9();
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await.unwrap());
            }
            all
        });
        assert!(!acks.is_empty(), "round {round} acknowledged no transfer");
        acknowledged.extend(acks);
        d = Daemon::start(dir.path());
    }
    runtime.block_on(async {
        let mut c = d.client().await;
        eventually(60, "the sagas to settle", async || outbox_empty(&mut c).await.then_some(())).await;
        let mut statements = BTreeMap::new();
        for a in 0..ACCOUNTS {
            let id = format!("a{a}");
            statements.insert(id.clone(), call(&mut c, "account", &id, "statement", "").await.unwrap());
        }
        assert_bank_settled(&statements, &acknowledged, ACCOUNTS as i64 * OPENING_BALANCE, "a9");
    });
}

#[test]
fn team_lists_converge_to_the_users_view() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    deploy(&d, "user", &guest_wasm("team-joiner"));
    deploy(&d, "team", &guest_wasm("team"));
    let teams = ["red", "blue", "green"];
    rt().block_on(async {
        let mut tasks = Vec::new();
        for team in teams {
            let mut c = d.client().await;
            tasks.push(tokio::spawn(async move {
                for u in 0..20 {
                    let _ = call(&mut c, "user", &format!("u{u}"), "join", &json!(team).to_string()).await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let mut c = d.client().await;
        eventually(30, "team messages", async || outbox_empty(&mut c).await.then_some(())).await;
        let mut expected: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for u in 0..20 {
            let team = call(&mut c, "user", &format!("u{u}"), "team", "").await.unwrap();
            expected
                .entry(team.as_str().expect("every user joined one team").to_owned())
                .or_default()
                .push(format!("u{u}"));
        }
        for team in teams {
            let mut want = expected.get(team).cloned().unwrap_or_default();
            want.sort();
            let got = call(&mut c, "team", team, "members", "").await.unwrap();
            assert_eq!(got, json!(want), "team {team}");
        }
    });
}

#[test]
fn a_lease_expires_by_timer_across_a_crash_and_release_cancels_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path());
    deploy(&d, "lock", &guest_wasm("lock"));
    let runtime = rt();
    let acquire = |owner: &str, ttl: u64| json!({"owner": owner, "ttl_ms": ttl}).to_string();
    runtime.block_on(async {
        let mut c = d.client().await;
        let lease = call(&mut c, "lock", "l", "acquire", &acquire("a", 1000)).await.unwrap();
        assert_eq!(lease["token"], json!(1));
        let e = call(&mut c, "lock", "l", "acquire", &acquire("b", 1000)).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        call(&mut c, "lock", "l", "release", &json!({"owner": "a", "token": 1}).to_string()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1800)).await;
        let h = call(&mut c, "lock", "l", "holder", "").await.unwrap();
        assert_eq!(h["expirations"], json!(0), "the released lease's timer was cancelled: {h}");
        let lease = call(&mut c, "lock", "l", "acquire", &acquire("b", 1000)).await.unwrap();
        assert_eq!(lease["token"], json!(2), "fencing tokens grow");
    });
    d.kill9();
    std::thread::sleep(Duration::from_millis(1500));
    let d = Daemon::start(dir.path());
    runtime.block_on(async {
        let mut c = d.client().await;
        let h = eventually(20, "the lease to expire", async || {
            let h = call(&mut c, "lock", "l", "holder", "").await.unwrap();
            h["owner"].is_null().then_some(h)
        })
        .await;
        assert_eq!(h["expirations"], json!(1), "{h}");
        assert_eq!(call(&mut c, "lock", "l", "check", "2").await.unwrap(), json!(false), "stale token fenced off");
        let lease = call(&mut c, "lock", "l", "acquire", &acquire("c", 60_000)).await.unwrap();
        assert_eq!(lease["token"], json!(3));
        assert_eq!(call(&mut c, "lock", "l", "check", "3").await.unwrap(), json!(true));
    });
}

#[test]
fn a_full_outbox_refuses_the_sending_turn_and_commits_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(dir.path(), &["--set", "scheduler.max_outbox_messages=5"]);
    deploy(&d, "relay", &guest_wasm("relay"));
    deploy(&d, "counter", &guest_wasm("counter"));
    rt().block_on(async {
        let mut c = d.client().await;
        let fanout = |n: u32| {
            json!({"target_type": "counter", "target_id": "o", "operation": "add", "payload": 1, "count": n})
                .to_string()
        };
        let e = call(&mut c, "relay", "a", "fanout", &fanout(6)).await.unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(e.message().contains("outbox"), "{}", e.message());
        call(&mut c, "relay", "a", "fanout", &fanout(5)).await.unwrap();
        eventually(30, "delivery", async || outbox_empty(&mut c).await.then_some(())).await;
        assert_eq!(call(&mut c, "counter", "o", "get", "").await.unwrap(), json!(5), "the refused turn sent nothing");
    });
}

/// One slow receiver holds up only its own pairs: while `relay/slow` spends
/// 5 s in each of its turns, messages between other entities keep flowing.
/// (The deliverer once waited for every pair of a round before it started the
/// next round, so they waited for the naps.) Asserted by order, not by time:
/// every other message is processed before the first nap ends.
#[test]
fn a_slow_receiver_does_not_hold_up_messages_between_other_entities() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(dir.path(), &["--set", "runtime.turn_timeout_ms=30000"]);
    deploy(&d, "relay", &guest_wasm("relay"));
    deploy(&d, "counter", &guest_wasm("counter"));
    let naps_begun = |d: &Daemon| d.log().matches("nap begins").count();
    let naps_ended = |d: &Daemon| d.log().matches("nap ends").count();
    rt().block_on(async {
        let mut c = d.client().await;
        let naps =
            json!({"target_type": "relay", "target_id": "slow", "operation": "nap", "payload": 5000, "count": 2});
        call(&mut c, "relay", "s", "fanout", &naps.to_string()).await.unwrap();
        eventually(30, "the first nap to begin", async || (naps_begun(&d) >= 1).then_some(())).await;
        for round in 1..=5u64 {
            let adds =
                json!({"target_type": "counter", "target_id": "x", "operation": "add", "payload": 1, "count": 10});
            call(&mut c, "relay", "a", "fanout", &adds.to_string()).await.unwrap();
            let seq = json!({"target_id": "b", "from": (round - 1) * 10 + 1, "count": 10}).to_string();
            call(&mut c, "relay", "a", "sequence", &seq).await.unwrap();
            eventually(30, "the other messages", async || {
                let x = call(&mut c, "counter", "x", "get", "").await.unwrap();
                let b = stats(&mut c, "b").await;
                (x == json!(round * 10) && b["received"] == json!(round * 10)).then_some(())
            })
            .await;
        }
        assert_eq!(naps_ended(&d), 0, "the other messages waited for the slow receiver");
        eventually(60, "the naps", async || outbox_empty(&mut c).await.then_some(())).await;
        assert_eq!(naps_ended(&d), 2);
        assert_eq!(stats(&mut c, "b").await, json!({"last": 50, "violations": 0, "received": 50}));
        assert_eq!(stats(&mut c, "slow").await["received"], json!(2));
        assert_eq!(c.status(pb::StatusRequest {}).await.unwrap().into_inner().dead_letters, 0);
    });
}
