//! End to end with the real binary: the HTTP/JSON gateway on the gRPC port —
//! invocation, every error status, the Idempotency-Key header, bearer auth,
//! the OpenAPI document — entity listing with pagination, the browser checks
//! (cross-origin requests, DNS rebinding, CORS for allowed origins, the
//! dashboard's headers) and bodies over the limit.

mod support;

use conflux_client::pb;
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

/// One HTTP/1.1 exchange over a raw socket (for headers a client library
/// sets itself, like Host): the status, the headers (lower-case names) and the body.
fn raw(d: &Daemon, request: &str) -> (u16, Vec<(String, String)>, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(&d.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut text = Vec::new();
    let _ = s.read_to_end(&mut text);
    let text = String::from_utf8_lossy(&text).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP answer: {text:?}"));
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// The `error.kind` of a JSON error body.
fn body_kind(body: &str) -> String {
    // A chunked body: the JSON object is the line that starts with '{'.
    let json = body.lines().find(|l| l.starts_with('{')).unwrap_or_else(|| panic!("no JSON in {body:?}"));
    let v: Value = serde_json::from_str(json).unwrap();
    v["error"]["kind"].as_str().unwrap().to_owned()
}

#[test]
fn browser_requests_from_other_origins_and_rebound_hosts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    deploy(&d, "counter", &guest_wasm("counter"));
    let port = d.addr.rsplit_once(':').unwrap().1.to_owned();
    let add = "/v1/entities/counter/c/add";
    // Another page's text/plain POST (no preflight), and a browser's cross-site JSON.
    let r = post(&d, add, "5", &[("Origin", "https://evil.example"), ("Content-Type", "text/plain")]);
    assert_eq!((r.status, r.error_kind().as_str()), (403, "cross-origin"), "{}", r.body);
    let r = post(&d, add, "5", &[("Sec-Fetch-Site", "cross-site"), ("Origin", "https://evil.example")]);
    assert_eq!((r.status, r.error_kind().as_str()), (403, "cross-origin"), "{}", r.body);
    let r = post(&d, add, "5", &[("Origin", &format!("http://localhost:{}", port.parse::<u16>().unwrap() + 1))]);
    assert_eq!(r.status, 403, "another port of the same machine is another origin");
    // gRPC's routes are behind the same check (tonic serves them over HTTP/1 too).
    let (status, headers, _) = raw(
        &d,
        &format!(
            "POST /conflux.v1.Conflux/Invoke HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: https://evil.example\r\n\
             Content-Type: text/plain\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
        ),
    );
    assert_eq!((status, header(&headers, "conflux-error-kind")), (403, Some("cross-origin")));
    // A body must say it is JSON (a form or text body is what a page can send unasked).
    let mut req = http().post(format!("{}{add}", d.url()));
    req = req.header("Content-Type", "text/plain");
    let r = read(req.send("5"));
    assert_eq!((r.status, r.error_kind().as_str()), (415, "unsupported-media-type"), "{}", r.body);
    let r = read(
        http().post(format!("{}{add}", d.url())).header("Content-Type", "application/x-www-form-urlencoded").send("5"),
    );
    assert_eq!(r.status, 415);
    assert_eq!(get(&d, "/v1/entities/counter/c", &[]).json()["entries"], serde_json::json!([]), "nothing ran");
    // The node's own pages, and clients that are not browsers, go through.
    let r = post(&d, add, "5", &[("Origin", &format!("http://127.0.0.1:{port}")), ("Sec-Fetch-Site", "same-origin")]);
    assert_eq!((r.status, r.body.as_str()), (200, "5"));
    assert_eq!(post(&d, add, "1", &[]).body, "6");
    assert_eq!(post(&d, add, "", &[]).status, 400, "an empty body is `null`, whatever its type");

    // DNS rebinding: a name this node is not known by.
    let get_host =
        |host: &str| raw(&d, &format!("GET /v1/status HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"));
    let (status, headers, body) = get_host(&format!("rebind.evil.example:{port}"));
    assert_eq!((status, header(&headers, "conflux-error-kind")), (403, Some("host-not-allowed")), "{body}");
    for host in [format!("127.0.0.1:{port}"), format!("localhost:{port}"), format!("[::1]:{port}"), "localhost".into()]
    {
        assert_eq!(get_host(&host).0, 200, "{host}");
    }

    // The dashboard may not be framed and runs only its own script.
    let (status, headers, _) =
        raw(&d, &format!("GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"));
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-frame-options"), Some("DENY"));
    let csp = header(&headers, "content-security-policy").expect("a CSP");
    for directive in ["default-src 'none'", "frame-ancestors 'none'", "script-src 'sha256-", "connect-src 'self'"] {
        assert!(csp.contains(directive), "{csp}");
    }
    assert!(!csp.contains("unsafe-inline"), "{csp}");
}

#[test]
fn configured_origins_and_hosts_are_let_in() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(
        dir.path(),
        &["--set", r#"api.allowed_origins=["https://app.example"]"#, "--set", r#"api.allowed_hosts=["conflux.test"]"#],
    );
    deploy(&d, "counter", &guest_wasm("counter"));
    let port = d.addr.rsplit_once(':').unwrap().1.to_owned();
    // The app's preflight, then its call; the answer names it for the browser.
    let (status, headers, _) = raw(
        &d,
        &format!(
            "OPTIONS /v1/entities/counter/c/add HTTP/1.1\r\nHost: conflux.test:{port}\r\nOrigin: https://app.example\r\n\
             Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: content-type, authorization\r\n\
             Connection: close\r\n\r\n"
        ),
    );
    assert!(status < 300, "{status} {headers:?}");
    assert_eq!(header(&headers, "access-control-allow-origin"), Some("https://app.example"));
    let (status, headers, body) = raw(
        &d,
        &format!(
            "POST /v1/entities/counter/c/add HTTP/1.1\r\nHost: conflux.test:{port}\r\nOrigin: https://app.example\r\n\
             Sec-Fetch-Site: cross-site\r\nContent-Type: application/json\r\nContent-Length: 1\r\nConnection: close\r\n\r\n7"
        ),
    );
    assert_eq!((status, body.as_str()), (200, "7"), "{headers:?}");
    assert_eq!(header(&headers, "access-control-allow-origin"), Some("https://app.example"));
    // Other origins and hosts still are not.
    let r = post(&d, "/v1/entities/counter/c/add", "1", &[("Origin", "https://other.example")]);
    assert_eq!(r.status, 403);
    let (status, _, _) =
        raw(&d, &format!("GET /v1/status HTTP/1.1\r\nHost: other.test:{port}\r\nConnection: close\r\n\r\n"));
    assert_eq!(status, 403);
    // A bad entry is refused at start-up, naming the field.
    let err = serve_expecting_failure(&dir.path().join("bad"), &["--set", r#"api.allowed_origins=["app.example"]"#]);
    assert!(err.contains("api.allowed_origins"), "{err}");
}

#[test]
fn bodies_over_the_payload_limit_get_the_json_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    deploy(&d, "counter", &guest_wasm("counter"));
    let add = "/v1/entities/counter/c/add";
    // Just over api.max_payload_bytes (1 MiB), and far over it, sent whole.
    for size in [(1 << 20) + 1, 5_000_000] {
        let body = format!("\"{}\"", "x".repeat(size - 2));
        let r = post(&d, add, &body, &[]);
        assert_eq!((r.status, r.error_kind().as_str()), (413, "payload-too-large"), "{size}: {}", r.body);
        assert_eq!(r.json()["error"]["code"], "INVALID_ARGUMENT");
    }
    // A client that waits for `100 Continue` is answered before it sends the body.
    let port = d.addr.rsplit_once(':').unwrap().1;
    let (status, headers, body) = raw(
        &d,
        &format!(
            "POST {add} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
             Content-Length: 5000000\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
        ),
    );
    assert_eq!((status, header(&headers, "conflux-error-kind")), (413, Some("payload-too-large")), "{body}");
    assert_eq!(body_kind(&body), "payload-too-large");
    assert_eq!(post(&d, add, "2", &[]).body, "2", "the node still serves");
}
