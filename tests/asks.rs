//! End to end with the real binary: asks and their replies. A reply (or the
//! callee's refusal, a failure to deliver, a timeout) runs the asker's
//! continuation exactly once per ask; a late reply is dropped and counted;
//! an asker serves calls while it waits (A → B → A completes).

mod support;

use serde_json::{Value, json};
use support::*;

type Client = conflux_client::pb::conflux_client::ConfluxClient<tonic::transport::Channel>;

/// The asker `a/<id>`'s recorded replies once it has `n` of them.
async fn replies(c: &mut Client, ty: &str, id: &str, n: usize) -> Vec<Value> {
    eventually(60, &format!("{n} replies at {ty}/{id}"), async || {
        let got = call(c, ty, id, "replies", "").await.unwrap();
        let got = got.as_array().unwrap().clone();
        assert!(got.len() <= n, "more continuations than asks: {got:?}");
        (got.len() == n).then_some(got)
    })
    .await
}

async fn ask(c: &mut Client, from: (&str, &str), request: Value) -> Vec<String> {
    let ids = call(c, from.0, from.1, "ask_for", &request.to_string()).await.unwrap();
    serde_json::from_value(ids).unwrap()
}

/// A node serving the asker as types `a` and `b`: one component under two
/// type names, so the asks cross types.
fn askers(dir: &std::path::Path, extra: &[&str]) -> Daemon {
    let d = Daemon::start_with(dir, extra);
    deploy(&d, "a", &guest_wasm("asker"));
    deploy(&d, "b", &guest_wasm("asker"));
    d
}

fn metric(d: &Daemon, name: &str) -> f64 {
    let body = ureq::get(format!("{}/metrics", d.url())).call().unwrap().body_mut().read_to_string().unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

#[test]
fn replies_and_refusals_reach_the_continuation_once_with_the_callees_error_kind() {
    let dir = tempfile::tempdir().unwrap();
    let d = askers(
        dir.path(),
        &["--set", "scheduler.delivery_max_attempts=2", "--set", "scheduler.delivery_retry_base_ms=20"],
    );
    rt().block_on(async {
        let mut c = d.client().await;
        let asks = [
            json!({"target": "b/1", "operation": "echo", "payload": {"x": 1}, "context": "first"}),
            json!({"target": "b/1", "operation": "refuse", "payload": "full", "context": 2}),
            json!({"target": "b/1", "operation": "picky"}),
            json!({"target": "b/1", "operation": "no_such_op"}),
            json!({"target": "ghost/1", "operation": "echo", "payload": 1}),
            json!({"target": "b/2", "operation": "crash"}),
        ];
        let mut ids = Vec::new();
        for a in asks {
            ids.extend(ask(&mut c, ("a", "1"), a).await);
        }
        let got = replies(&mut c, "a", "1", ids.len()).await;
        let by_id = |id: &str| got.iter().find(|g| g["ask_id"] == json!(id)).unwrap().clone();
        let echo = by_id(&ids[0]);
        assert_eq!((echo["value"].clone(), echo["callee"].clone()), (json!({"x": 1}), json!("b/1")));
        assert_eq!(echo["context"], json!("first"), "the context comes back unchanged");
        assert_eq!(by_id(&ids[1])["error"], json!(["failed", "full"]));
        assert_eq!(by_id(&ids[1])["context"], json!(2));
        assert_eq!(by_id(&ids[2])["error"], json!(["bad-request", "never good enough"]));
        assert_eq!(by_id(&ids[3])["error"][0], json!("unknown-operation"));
        let ghost = by_id(&ids[4])["error"].clone();
        assert_eq!(ghost[0], json!("undeliverable"));
        assert!(ghost[1].as_str().unwrap().contains("ghost"), "{ghost}");
        let crash = by_id(&ids[5])["error"].clone();
        assert_eq!(crash[0], json!("undeliverable"));
        assert!(crash[1].as_str().unwrap().contains("gave up after 2 attempts"), "{crash}");
        // The refusal committed nothing of the callee's turn but was answered.
        assert_eq!(call(&mut c, "b", "1", "answered", "").await.unwrap(), json!(1), "echo only");
        // Nothing was dead-lettered: every failure reached its asker.
        let out = d.cli(&["dead-letters"]);
        assert!(!stdout(&out).contains("b/1") && !stdout(&out).contains("ghost"), "{}", stdout(&out));
        // And nothing arrives twice later.
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        assert_eq!(replies(&mut c, "a", "1", ids.len()).await.len(), ids.len());
    });
}

#[test]
fn a_timeout_fires_once_and_the_late_reply_is_dropped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let d = askers(dir.path(), &[]);
    rt().block_on(async {
        let mut c = d.client().await;
        let before = metric(&d, "conflux_ask_replies_dropped_total");
        // The callee naps past the timeout; a second ask is answered in time
        // and its timer never fires.
        let slow =
            ask(&mut c, ("a", "1"), json!({"target": "b/1", "operation": "nap", "payload": 700, "timeout_ms": 100}))
                .await;
        let quick =
            ask(&mut c, ("a", "1"), json!({"target": "b/2", "operation": "echo", "payload": 7, "timeout_ms": 5000}))
                .await;
        let got = replies(&mut c, "a", "1", 2).await;
        let by_id = |id: &str| got.iter().find(|g| g["ask_id"] == json!(id)).unwrap().clone();
        assert_eq!(by_id(&slow[0])["error"], json!(["timed-out", ""]));
        assert_eq!(by_id(&quick[0])["value"], json!(7));
        // The nap ends, its reply arrives after the timeout: dropped.
        eventually(30, "the late reply", async || {
            (call(&mut c, "b", "1", "answered", "").await.unwrap() == json!(1)).then_some(())
        })
        .await;
        eventually(30, "the late reply dropped", async || {
            (metric(&d, "conflux_ask_replies_dropped_total") == before + 1.0).then_some(())
        })
        .await;
        // Past the quick ask's 5 s timeout: it was cancelled by its reply.
        tokio::time::sleep(std::time::Duration::from_millis(5500)).await;
        assert_eq!(replies(&mut c, "a", "1", 2).await.len(), 2, "one continuation per ask");
        assert_eq!(metric(&d, "conflux_ask_replies_dropped_total"), before + 1.0);
    });
}

#[test]
fn an_asker_serves_calls_while_it_waits_so_a_to_b_to_a_completes() {
    let dir = tempfile::tempdir().unwrap();
    let d = askers(dir.path(), &[]);
    rt().block_on(async {
        let mut c = d.client().await;
        // a/1 asks b/1 to bounce; b/1 answers and asks a/1 to echo "pong".
        let ids = ask(&mut c, ("a", "1"), json!({"target": "b/1", "operation": "bounce"})).await;
        let at_a = replies(&mut c, "a", "1", 1).await;
        assert_eq!((at_a[0]["ask_id"].clone(), at_a[0]["value"].clone()), (json!(ids[0]), json!("bounced")));
        let at_b = replies(&mut c, "b", "1", 1).await;
        assert_eq!((at_b[0]["callee"].clone(), at_b[0]["value"].clone()), (json!("a/1"), json!("pong")));
        assert_eq!(call(&mut c, "a", "1", "answered", "").await.unwrap(), json!(1));
    });
}

#[test]
fn many_concurrent_asks_get_exactly_one_continuation_each() {
    let dir = tempfile::tempdir().unwrap();
    let d = askers(dir.path(), &[]);
    rt().block_on(async {
        let mut tasks = Vec::new();
        for caller in 0..8 {
            let mut c = d.client().await;
            tasks.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                for n in 0..5 {
                    let req = json!({"target": format!("b/{}", n % 3), "operation": "echo", "payload": n, "count": 5});
                    ids.extend(ask(&mut c, ("a", &caller.to_string()), req).await);
                }
                ids
            }));
        }
        let mut c = d.client().await;
        for (caller, t) in tasks.into_iter().enumerate() {
            let ids = t.await.unwrap();
            assert_eq!(ids.len(), 25);
            let got = replies(&mut c, "a", &caller.to_string(), 25).await;
            let mut seen: Vec<&str> = got.iter().map(|g| g["ask_id"].as_str().unwrap()).collect();
            seen.sort();
            let mut want: Vec<&str> = ids.iter().map(String::as_str).collect();
            want.sort();
            assert_eq!(seen, want, "each ask answered once");
        }
        let answered: u64 = {
            let mut sum = 0;
            for b in 0..3 {
                sum += call(&mut c, "b", &b.to_string(), "answered", "").await.unwrap().as_u64().unwrap();
            }
            sum
        };
        assert_eq!(answered, 8 * 25);
    });
}
