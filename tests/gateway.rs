//! End to end with the real binary: the HTTP/JSON gateway on the gRPC port —
//! invocation, every error status, the Idempotency-Key header, bearer auth,
//! the OpenAPI document — and entity listing with pagination.

mod support;

use conflux_host::api::pb;
use serde_json::Value;
use std::time::{Duration, Instant};
use support::*;

/// A plain HTTP/1.1 client that reports 4xx/5xx as responses, not errors.
fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

struct Reply {
    status: u16,
    kind: Option<String>,
    body: String,
    content_type: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The `error.kind` of a JSON error body, checked against the header.
    fn error_kind(&self) -> String {
        let kind = self.json()["error"]["kind"].as_str().expect("error.kind").to_owned();
        assert_eq!(self.kind.as_deref(), Some(kind.as_str()), "header and body name the same kind");
        kind
    }
}

fn read(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Reply {
    let mut r = r.expect("HTTP request");
    let status = r.status().as_u16();
    let header = |name: &str| r.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let kind = header("conflux-error-kind");
    let content_type = header("content-type").unwrap_or_default();
    let body = r.body_mut().read_to_string().expect("body");
    Reply { status, kind, body, content_type }
}

fn post(d: &Daemon, path: &str, body: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = http().post(format!("{}{path}", d.url()));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    read(req.content_type("application/json").send(body))
}

fn get(d: &Daemon, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = http().get(format!("{}{path}", d.url()));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    read(req.call())
}

#[test]
fn http_invocations_return_json_and_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    deploy(&d, "counter", &guest_wasm("counter"));
    deploy(&d, "faulty", &guest_wasm("faulty"));

    let r = post(&d, "/v1/entities/counter/c1/add", "5", &[]);
    assert_eq!((r.status, r.body.as_str()), (200, "5"), "{}", r.body);
    assert_eq!(r.content_type, "application/json");
    // An empty body is `null`: operations without an argument need none.
    let r = post(&d, "/v1/entities/counter/c1/get", "", &[]);
    assert_eq!((r.status, r.body.as_str()), (200, "5"));
    // A percent-encoded id is one path segment.
    let r = post(&d, "/v1/entities/counter/a%2Fb/add", "2", &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(rt().block_on(async { call(&mut d.client().await, "counter", "a/b", "get", "").await.unwrap() }), 2);

    // 400: not JSON; JSON of the wrong shape for the operation.
    let r = post(&d, "/v1/entities/counter/c1/add", "{", &[]);
    assert_eq!((r.status, r.error_kind().as_str()), (400, "bad-json"), "{}", r.body);
    let r = post(&d, "/v1/entities/counter/c1/add", "\"five\"", &[]);
    assert_eq!((r.status, r.error_kind().as_str()), (400, "bad-request"), "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "INVALID_ARGUMENT");
    // 404: unknown type, unknown operation, unknown route.
    let r = post(&d, "/v1/entities/nope/c1/add", "1", &[]);
    assert_eq!((r.status, r.error_kind().as_str()), (404, "unknown-type"));
    let r = post(&d, "/v1/entities/counter/c1/nope", "1", &[]);
    assert_eq!((r.status, r.error_kind().as_str()), (404, "unknown-operation"));
    let r = get(&d, "/v2/whatever", &[]);
    assert_eq!((r.status, r.error_kind().as_str()), (404, "not-found"));
    // 409: the entity refused (a guest error), and nothing was committed.
    post(&d, "/v1/entities/faulty/f1/put", "\"kept\"", &[]);
    let r = post(&d, "/v1/entities/faulty/f1/set_then_fail", "", &[]);
    assert_eq!((r.status, r.error_kind().as_str()), (409, "failed"), "{}", r.body);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("refusing after a write"));
    assert_eq!(post(&d, "/v1/entities/faulty/f1/get", "", &[]).body, "\"kept\"");
    // 500: the entity's code trapped.
    let r = post(&d, "/v1/entities/faulty/f1/set_then_panic", "", &[]);
    assert_eq!((r.status, r.error_kind().as_str()), (500, "trap"), "{}", r.body);

    // gRPC still works on the same port.
    let v = rt().block_on(async { call(&mut d.client().await, "counter", "c1", "add", "1").await.unwrap() });
    assert_eq!(v, 6);

    let r = get(&d, "/v1/openapi.json", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["openapi"], "3.0.3");
    assert!(r.json()["paths"]["/v1/entities/{entity_type}/{id}/{operation}"]["post"].is_object());
}

#[test]
fn idempotency_key_header_runs_an_operation_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    deploy(&d, "counter", &guest_wasm("counter"));
    let key = [("Idempotency-Key", "order-17")];
    let first = post(&d, "/v1/entities/counter/c/add", "10", &key);
    let retry = post(&d, "/v1/entities/counter/c/add", "10", &key);
    assert_eq!((first.status, first.body.as_str()), (200, "10"));
    assert_eq!((retry.status, retry.body.as_str()), (200, "10"), "the retry gets the first reply");
    assert_eq!(post(&d, "/v1/entities/counter/c/get", "", &[]).body, "10", "added once");
    // The key is the gRPC field: a gRPC retry with it is answered the same way.
    let again = rt().block_on(async {
        let mut req = invoke_req("counter", "c", "add", "10");
        req.idempotency_key = "order-17".into();
        d.client().await.invoke(req).await.unwrap().into_inner().reply
    });
    assert_eq!(again, b"10");
    let long = "k".repeat(300);
    let r = post(&d, "/v1/entities/counter/c/add", "1", &[("Idempotency-Key", &long)]);
    assert_eq!((r.status, r.error_kind().as_str()), (400, "bad-idempotency-key"), "{}", r.body);
    assert_eq!(post(&d, "/v1/entities/counter/c/get", "", &[]).body, "10");
}

#[test]
fn http_uses_the_same_bearer_tokens_as_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(dir.path(), &["--admin-token", "adm-tok", "--invoke-token", "inv-tok"]);
    deploy_with_token(&d, "counter", &guest_wasm("counter"), "adm-tok");
    let r = post(&d, "/v1/entities/counter/c/add", "1", &[]);
    assert_eq!((r.status, r.error_kind().as_str()), (401, "unauthenticated"));
    assert!(!r.body.contains("inv-tok"), "tokens are never echoed");
    let r = post(&d, "/v1/entities/counter/c/add", "1", &[("Authorization", "Bearer wrong")]);
    assert_eq!(r.status, 401);
    let r = post(&d, "/v1/entities/counter/c/add", "1", &[("Authorization", "Bearer inv-tok")]);
    assert_eq!((r.status, r.body.as_str()), (200, "1"));
    // Admin routes need the admin token; the invoke token does not open them.
    for path in ["/v1/status", "/metrics", "/v1/entities/counter", "/v1/dead-letters", "/v1/stats", "/v1/errors"] {
        assert_eq!(get(&d, path, &[]).status, 401, "{path}");
        assert_eq!(get(&d, path, &[("Authorization", "Bearer inv-tok")]).status, 401, "{path}");
        assert_eq!(get(&d, path, &[("Authorization", "Bearer adm-tok")]).status, 200, "{path}");
    }
    // The dashboard page itself is public (it asks for the token); the OpenAPI document too.
    assert_eq!(get(&d, "/", &[]).status, 200);
    assert_eq!(get(&d, "/v1/openapi.json", &[]).status, 200);
}

#[test]
fn overload_is_429_and_shutdown_is_503() {
    let dir = tempfile::tempdir().unwrap();
    // One invocation at a time, and a turn that loops until its 1 s timeout.
    let mut d = Daemon::start_with(dir.path(), &["--set", "scheduler.max_inflight_invocations=1"]);
    deploy(&d, "faulty", &guest_wasm("faulty"));
    let url = d.url();
    let busy = std::thread::spawn(move || {
        read(http().post(format!("{url}/v1/entities/faulty/loop/infinite_loop")).send("")).status
    });
    wait_for_inflight(&d, 1);
    let r = post(&d, "/v1/entities/faulty/other/get", "", &[]);
    assert_eq!((r.status, r.error_kind().as_str()), (429, "overloaded"), "{}", r.body);
    assert_eq!(busy.join().unwrap(), 500, "the looping turn is stopped by its timeout");

    // While a SIGTERM drains the running turn, new calls are refused with 503.
    let url = d.url();
    let busy = std::thread::spawn(move || {
        read(http().post(format!("{url}/v1/entities/faulty/loop/infinite_loop")).send("")).status
    });
    wait_for_inflight(&d, 1);
    let pid = d.pid().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = Vec::new();
    loop {
        let r = http().post(format!("{}/v1/entities/faulty/other/get", d.url())).send("");
        let Ok(r) = r else { break }; // the listener closed
        let r = read(Ok(r));
        if r.status == 503 {
            assert_eq!(r.error_kind(), "shutting-down");
            seen.push(503);
            break;
        }
        seen.push(r.status);
        assert!(Instant::now() < deadline, "no 503 while draining; saw {seen:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(seen.last(), Some(&503), "saw {seen:?}");
    busy.join().unwrap();
    assert!(d.terminate().success());
}

#[test]
fn listing_pages_through_thousands_of_entities_without_activating_them() {
    const N: usize = 2500;
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    deploy(&d, "counter", &guest_wasm("counter"));
    let mut expected: Vec<String> = (0..N).map(|i| format!("user-{i:05}")).collect();
    expected.extend((0..50).map(|i| format!("admin-{i:02}")));
    expected.sort();
    rt().block_on(async {
        let c = d.client().await;
        futures::future::join_all(expected.chunks(64).map(|chunk| {
            let mut c = c.clone();
            async move {
                for id in chunk {
                    call(&mut c, "counter", id, "add", "1").await.unwrap();
                }
            }
        }))
        .await;
    });
    // An entity that was called but never wrote state does not exist.
    rt().block_on(async { call(&mut d.client().await, "counter", "zz-reader", "get", "").await.unwrap() });
    let active_before = status(&d).active_entities;

    // RPC pages of 1000 cover every id exactly once, in order.
    let mut seen = Vec::new();
    let mut cursor = String::new();
    let mut pages = 0;
    rt().block_on(async {
        let mut c = d.client().await;
        loop {
            let req = pb::ListEntitiesRequest {
                entity_type: "counter".into(),
                prefix: String::new(),
                start_after: cursor.clone(),
                limit: 1000,
            };
            let r = c.list_entities(req).await.unwrap().into_inner();
            pages += 1;
            seen.extend(r.ids);
            if r.next_start_after.is_empty() {
                break;
            }
            cursor = r.next_start_after;
        }
    });
    assert_eq!(pages, 3);
    assert_eq!(seen, expected);

    // The CLI follows the pages; --prefix narrows; --limit stops and says where to go on.
    let out = d.cli(&["entities", "counter", "--prefix", "admin-"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let admins: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
    assert_eq!(admins, expected[..50]);
    let out = d.cli(&["entities", "counter", "--limit", "10", "--start-after", "user-00100"]);
    let ids: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
    assert_eq!(ids, (101..111).map(|i| format!("user-{i:05}")).collect::<Vec<_>>());
    assert!(stderr(&out).contains("--start-after user-00110"), "{}", stderr(&out));
    let out = d.cli(&["--json", "entities", "counter", "--limit", "5000"]);
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["ids"].as_array().unwrap().len(), expected.len());
    assert_eq!(v["next_start_after"], "");

    // HTTP: the same listing, paginated.
    let r = get(&d, "/v1/entities/counter?prefix=user-&limit=2", &[]);
    assert_eq!(r.json()["ids"], serde_json::json!(["user-00000", "user-00001"]));
    assert_eq!(r.json()["next_start_after"], "user-00001");
    let r = get(&d, "/v1/entities/counter?prefix=user-&limit=2&start_after=user-00001", &[]);
    assert_eq!(r.json()["ids"], serde_json::json!(["user-00002", "user-00003"]));
    let r = get(&d, "/v1/entities/nope", &[]);
    assert_eq!((r.status, r.error_kind().as_str()), (404, "unknown-type"));

    assert_eq!(status(&d).active_entities, active_before, "listing activated nothing");
}

fn status(d: &Daemon) -> pb::StatusResponse {
    rt().block_on(async { d.client().await.status(pb::StatusRequest {}).await.unwrap().into_inner() })
}

fn wait_for_inflight(d: &Daemon, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(d).inflight_invocations < n {
        assert!(Instant::now() < deadline, "never saw {n} invocation(s) in flight");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn deploy_with_token(d: &Daemon, entity_type: &str, wasm: &std::path::Path, token: &str) {
    let out = d.cli(&["--token", token, "deploy", entity_type, wasm.to_str().unwrap()]);
    assert!(out.status.success(), "deploy failed: {}", stderr(&out));
}
