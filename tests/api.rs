//! End to end with the real binary: status codes, guest errors and traps
//! leaving state unchanged, bad uploads, bad input (oversized messages
//! included), pages bounded by bytes, the CLI's behaviour (a closed pipe too).

mod support;

use conflux_client::pb;
use support::*;
use tonic::Code;

#[test]
fn guest_errors_and_traps_after_writes_commit_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    deploy(&d, "faulty", &guest_wasm("faulty"));
    rt().block_on(async {
        let mut c = d.client().await;
        call(&mut c, "faulty", "f1", "put", "\"original\"").await.unwrap();

        let e = call(&mut c, "faulty", "f1", "set_then_fail", "").await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert_eq!(kind(&e), "failed");
        assert!(e.message().contains("refusing after a write"), "{}", e.message());
        assert_eq!(call(&mut c, "faulty", "f1", "get", "").await.unwrap(), "original");

        let e = call(&mut c, "faulty", "f1", "set_then_panic", "").await.unwrap_err();
        assert_eq!(e.code(), Code::Aborted, "{e:?}");
        assert_eq!(kind(&e), "trap");
        assert!(e.message().contains("deliberate panic"), "panic message is reported: {}", e.message());
        // The trapped instance was discarded; a fresh one serves the next call.
        assert_eq!(call(&mut c, "faulty", "f1", "get", "").await.unwrap(), "original");
        call(&mut c, "faulty", "f1", "put", "\"later\"").await.unwrap();
        assert_eq!(call(&mut c, "faulty", "f1", "get", "").await.unwrap(), "later");
    });
}

#[test]
fn reads_inside_a_turn_see_its_own_writes() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    deploy(&d, "faulty", &guest_wasm("faulty"));
    rt().block_on(async {
        let mut c = d.client().await;
        call(&mut c, "faulty", "r", "seed", "").await.unwrap();
        let seen = call(&mut c, "faulty", "r", "read_your_writes", "").await.unwrap();
        assert_eq!(seen, serde_json::json!(["a=Some(1)", "a=None", "list=p/0,p/1,p/3", "after=p/1"]));
    });
}

#[test]
fn invalid_requests_get_precise_status_codes() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    deploy(&d, "counter", &guest_wasm("counter"));
    rt().block_on(async {
        let mut c = d.client().await;
        let bystander = Bystander::start(&d).await;
        let before = bystander.calls();
        let cases: Vec<(pb::InvokeRequest, Code, &str)> = vec![
            (invoke_req("nosuchtype", "a", "add", "1"), Code::NotFound, "unknown entity type"),
            (invoke_req("counter", "a", "nosuchop", "1"), Code::NotFound, "nosuchop"),
            (invoke_req("counter", "a", "add", "\"x\""), Code::InvalidArgument, "add"),
            (invoke_req("counter", "", "add", "1"), Code::InvalidArgument, "entity id must not be empty"),
            (invoke_req("counter", "a\u{7}b", "add", "1"), Code::InvalidArgument, "control character"),
            (invoke_req("counter", &"x".repeat(300), "add", "1"), Code::InvalidArgument, "limit is 256"),
            (invoke_req("Counter!", "a", "add", "1"), Code::InvalidArgument, "entity type"),
            (invoke_req("counter", "a", "", "1"), Code::InvalidArgument, "operation"),
            (
                pb::InvokeRequest { entity: None, operation: "add".into(), ..Default::default() },
                Code::InvalidArgument,
                "`entity`",
            ),
        ];
        for (req, code, needle) in cases {
            let e = c.invoke(req.clone()).await.unwrap_err();
            assert_eq!(e.code(), code, "{req:?} -> {e:?}");
            assert!(e.message().contains(needle), "{req:?}: {:?} lacks {needle:?}", e.message());
        }
        // Over the limit by a little, or by more than tonic decodes: the same refusal.
        for size in [(1 << 20) + 1, 2 << 20, 5_000_000] {
            let big = "1".repeat(size);
            let e = c.invoke(invoke_req("counter", "a", "add", &big)).await.unwrap_err();
            assert_eq!((e.code(), kind(&e).as_str()), (Code::InvalidArgument, "payload-too-large"), "{size}: {e:?}");
            assert!(e.message().contains("payload"), "{}", e.message());
        }
        // None of that changed anything, and nobody else noticed.
        assert_eq!(call(&mut c, "counter", "a", "get", "").await.unwrap(), 0);
        bystander.finish(before).await;
    });
}

#[test]
fn bad_uploads_are_refused_and_leave_the_active_version() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let counter = guest_wasm("counter");
    deploy(&d, "counter", &counter);
    let bytes = std::fs::read(&counter).unwrap();
    let work = tempfile::tempdir().unwrap();
    let write = |name: &str, data: &[u8]| {
        let p = work.path().join(name);
        std::fs::write(&p, data).unwrap();
        p
    };
    // A core module: the smallest valid one.
    let core = write("core.wasm", b"\0asm\x01\0\0\0");
    let text = write("text.wasm", b"this is not wasm at all");
    let truncated = write("trunc.wasm", &bytes[..bytes.len() / 2]);
    let empty = write("empty.wasm", b"");
    let runtime = rt();
    let bystander = runtime.block_on(Bystander::start(&d));
    let before = bystander.calls();
    for (file, needle) in [
        (&core, "core WebAssembly module, not a component"),
        (&text, "not a WebAssembly binary"),
        (&truncated, "not a valid component"),
        (&empty, "empty"),
    ] {
        let out = d.cli(&["deploy", "counter", file.to_str().unwrap()]);
        assert!(!out.status.success(), "{} was accepted", file.display());
        let err = stderr(&out);
        assert!(err.contains("InvalidArgument") && err.contains(needle), "{}: {err}", file.display());
        assert_eq!(err.trim().lines().count(), 1, "one-line reason: {err}");
    }
    let out = d.cli(&["deploy", "Bad Name", counter.to_str().unwrap()]);
    assert!(stderr(&out).contains("entity type"), "{}", stderr(&out));
    // Re-deploying identical bytes changes nothing and says so.
    let out = d.cli(&["deploy", "counter", counter.to_str().unwrap()]);
    assert!(stdout(&out).contains("version 1 unchanged"), "{}", stdout(&out));
    let out = d.cli(&["invoke", "counter/a", "add", "2"]);
    assert_eq!(stdout(&out).trim(), "2");
    runtime.block_on(bystander.finish(before));
}

#[test]
fn cli_commands_print_results_and_fail_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let out = d.cli(&["types"]);
    assert!(stdout(&out).contains("no entity types"), "{}", stdout(&out));
    deploy(&d, "counter", &guest_wasm("counter"));
    let out = d.cli(&["invoke", "counter/c1", "add", "5"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "5");
    let out = d.cli(&["state", "counter/c1"]);
    assert!(stdout(&out).contains("$self\t{\"total\":5}"), "{}", stdout(&out));
    let out = d.cli(&["status"]);
    assert!(stdout(&out).contains("entity types     1"), "{}", stdout(&out));
    let out = d.cli(&["invoke", "counter/c1", "add", "{not json"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not valid JSON"), "{}", stderr(&out));
    let out = d.cli(&["invoke", "nosuch/c1", "add", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).starts_with("error: NotFound (unknown-type)"), "{}", stderr(&out));
    assert_eq!(stderr(&out).trim().lines().count(), 1);
    let out = d.cli(&["invoke", "counter/c1", "add"]);
    assert!(stderr(&out).contains("InvalidArgument"), "null payload is a bad request for add: {}", stderr(&out));
    let out = d.cli(&["drain", "1"]);
    // A node started alone is a cluster of one: there is nowhere to drain it to.
    assert!(stderr(&out).starts_with("error: FailedPrecondition (last-node)"), "{}", stderr(&out));
}

#[test]
fn a_full_mailbox_is_refused_with_resource_exhausted() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("conflux.toml");
    std::fs::write(&cfg, "[scheduler]\nmailbox_depth = 2\n").unwrap();
    let d = Daemon::start_with(&dir.path().join("data"), &["--config", cfg.to_str().unwrap()]);
    deploy(&d, "faulty", &guest_wasm("faulty"));
    rt().block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..12 {
            let mut c = d.client().await;
            tasks.push(tokio::spawn(async move { call(&mut c, "faulty", "busy", "spin", "100000000").await }));
        }
        let mut exhausted = 0;
        let mut ok = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => ok += 1,
                Err(e) => {
                    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                    assert_eq!(kind(&e), "mailbox-full");
                    exhausted += 1;
                }
            }
        }
        assert!(exhausted > 0 && ok > 0, "ok={ok} exhausted={exhausted}");
        // Another entity of the same type is unaffected.
        let mut c = d.client().await;
        call(&mut c, "faulty", "other", "spin", "10").await.unwrap();
    });
}

#[test]
fn components_outside_the_entity_world_are_refused_naming_why() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let out = d.cli(&["deploy", "evil", guest_wasm("unknown-imports").to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("imports interfaces the host does not allow"), "{err}");
    assert!(err.contains("acme:evil/thing"), "names the unknown package's import: {err}");
    assert!(err.contains("wasi:http/outgoing-handler@1.0.0"), "names the http import: {err}");

    let out = d.cli(&["deploy", "cmd", guest_wasm("no-handler").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("does not export `conflux:entity/handler@0.1.0`"), "{}", stderr(&out));
    let out = d.cli(&["types"]);
    assert!(stdout(&out).contains("no entity types"), "nothing was registered: {}", stdout(&out));
}

#[test]
fn warm_instances_are_bounded_and_evicted_when_idle() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("conflux.toml");
    std::fs::write(
        &cfg,
        "[scheduler]\nmax_resident_instances = 8\nidle_timeout_ms = 300\n[runtime]\nmax_instances = 100\n",
    )
    .unwrap();
    let d = Daemon::start_with(&dir.path().join("data"), &["--config", cfg.to_str().unwrap()]);
    deploy(&d, "counter", &guest_wasm("counter"));
    rt().block_on(async {
        let mut c = d.client().await;
        for i in 0..40 {
            call(&mut c, "counter", &format!("lru{i}"), "add", "1").await.unwrap();
        }
        let s = c.status(pb::StatusRequest {}).await.unwrap().into_inner();
        assert!(s.resident_instances <= 8, "LRU bound exceeded: {s:?}");
        assert!(s.resident_instances >= 1, "{s:?}");
        // Idle eviction empties the cache; poll, bounded.
        let mut resident = s.resident_instances;
        for _ in 0..100 {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            resident = c.status(pb::StatusRequest {}).await.unwrap().into_inner().resident_instances;
            if resident == 0 {
                break;
            }
        }
        assert_eq!(resident, 0, "idle instances were not evicted");
        // Evicted entities come back with their state.
        for i in 0..40 {
            assert_eq!(call(&mut c, "counter", &format!("lru{i}"), "add", "1").await.unwrap(), 2);
        }
    });
}

#[test]
fn server_reflection_lists_the_service() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    rt().block_on(async {
        let channel = tonic::transport::Channel::from_shared(d.url()).unwrap().connect().await.unwrap();
        let mut client = ServerReflectionClient::new(channel);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = client.server_reflection_info(futures::stream::iter([req])).await.unwrap().into_inner();
        let resp = stream.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else { panic!("{resp:?}") };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        assert!(names.contains(&"conflux.v1.Conflux".to_owned()), "{names:?}");
    });
}

#[test]
fn list_and_component_size_limits_apply() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(
        dir.path(),
        &["--set", "runtime.max_list_keys=10", "--set", "registry.max_component_bytes=100000"],
    );
    // The counter component is far larger than 100,000 bytes.
    let out = d.cli(&["deploy", "counter", guest_wasm("counter").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("the limit is 100000"), "{}", stderr(&out));
    // A bad --set is refused at start-up with a clear message.
    let err = serve_expecting_failure(&dir.path().join("other"), &["--set", "runtime.no_such_limit=1"]);
    assert!(err.contains("no_such_limit"), "{err}");
    drop(d);
    let d = Daemon::start_with(&dir.path().join("second"), &["--set", "runtime.max_list_keys=10"]);
    deploy(&d, "faulty", &guest_wasm("faulty"));
    let out = d.cli(&["invoke", "faulty/l", "seed_many", "50"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = d.cli(&["invoke", "faulty/l", "count_list", "1000"]);
    assert_eq!(stdout(&out).trim(), "10", "list is capped by runtime.max_list_keys");
    let out = d.cli(&["invoke", "faulty/l", "count_list", "3"]);
    assert_eq!(stdout(&out).trim(), "3");
}

#[test]
fn messages_over_the_transport_limit_are_refused_within_the_error_contract() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    rt().block_on(async {
        let mut c = d.client().await;
        // A deploy chunk over the decoding limit (api.max_payload_bytes + 64 KiB).
        let header = pb::DeployHeader { entity_type: "big".into(), size_bytes: 5_000_000, ..Default::default() };
        let parts = vec![
            pb::DeployRequest { part: Some(pb::deploy_request::Part::Header(header)) },
            pb::DeployRequest { part: Some(pb::deploy_request::Part::Chunk(vec![0; 5_000_000])) },
        ];
        let e = c.deploy(futures::stream::iter(parts)).await.unwrap_err();
        assert_eq!((e.code(), kind(&e).as_str()), (Code::InvalidArgument, "message-too-large"), "{e:?}");
        assert!(e.message().contains("api.max_payload_bytes"), "{}", e.message());
        // A method tonic does not know has a kind too.
        let channel = tonic::transport::Endpoint::from_shared(d.url()).unwrap().connect().await.unwrap();
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.unwrap();
        let path = tonic::codegen::http::uri::PathAndQuery::from_static("/conflux.v1.Conflux/NoSuchMethod");
        let codec = tonic_prost::ProstCodec::<pb::StatusRequest, pb::StatusResponse>::default();
        let e = grpc.unary(tonic::Request::new(pb::StatusRequest {}), path, codec).await.unwrap_err();
        assert_eq!((e.code(), kind(&e).as_str()), (Code::Unimplemented, "unimplemented"), "{e:?}");
        // The node still serves.
        assert_eq!(c.list_types(pb::ListTypesRequest {}).await.unwrap().into_inner().types.len(), 0);
    });
}

/// Keys plus values of a page, as the page bound counts them.
fn state_page_bytes(p: &pb::GetStateResponse) -> usize {
    p.entries.iter().map(|e| e.key.len() + e.value.len()).sum()
}

#[test]
fn state_pages_are_bounded_by_bytes_over_grpc_http_and_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(dir.path(), &["--set", "api.max_page_bytes=2048"]);
    deploy(&d, "faulty", &guest_wasm("faulty"));
    let keys = rt().block_on(async {
        let mut c = d.client().await;
        call(&mut c, "faulty", "s", "seed_many", "600").await.unwrap();
        let mut keys = Vec::new();
        let mut cursor = String::new();
        let mut pages = 0;
        loop {
            let req = pb::GetStateRequest {
                entity: Some(pb::EntityRef { entity_type: "faulty".into(), id: "s".into() }),
                start_after: cursor.clone(),
                limit: 0,
            };
            let page = c.get_state(req).await.unwrap().into_inner();
            pages += 1;
            assert!(state_page_bytes(&page) <= 2048, "page {pages} holds {} bytes", state_page_bytes(&page));
            keys.extend(page.entries.iter().map(|e| e.key.clone()));
            if page.next_start_after.is_empty() {
                break;
            }
            assert_eq!(Some(&page.next_start_after), keys.last(), "the cursor is the page's last key");
            cursor = page.next_start_after;
        }
        assert!(pages > 3, "{pages} pages");
        keys
    });
    let expected: Vec<String> = (0..600).map(|i| format!("many/{i:04}")).collect();
    assert_eq!(keys.iter().filter(|k| k.starts_with("many/")).cloned().collect::<Vec<_>>(), expected);
    assert!(keys.windows(2).all(|w| w[0] < w[1]), "in order, each once");
    // The HTTP route is the same RPC; the CLI follows the pages.
    let body =
        ureq::get(format!("{}/v1/entities/faulty/s", d.url())).call().unwrap().into_body().read_to_string().unwrap();
    let page: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(body.len() < 2048 * 3, "{} bytes of JSON", body.len());
    assert!(!page["next_start_after"].as_str().unwrap().is_empty(), "{body}");
    let out = d.cli(&["state", "faulty/s"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).lines().count(), keys.len());
}

#[test]
fn dead_letter_pages_are_bounded_by_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    deploy(&d, "relay", &guest_wasm("relay"));
    deploy(&d, "counter", &guest_wasm("counter"));
    // Ten messages of 300 kB that `add` refuses: ten dead letters, 3 MB in all,
    // where a page may hold 1 MiB (api.max_page_bytes).
    let payload = "x".repeat(300_000);
    rt().block_on(async {
        let mut c = d.client().await;
        let bad_add = serde_json::json!({
            "target_type": "counter", "target_id": "x", "operation": "add", "payload": payload, "count": 10,
        });
        call(&mut c, "relay", "a", "fanout", &bad_add.to_string()).await.unwrap();
        eventually(30, "ten dead letters", async || {
            let s = c.status(pb::StatusRequest {}).await.ok()?.into_inner();
            (s.dead_letters == 10).then_some(())
        })
        .await;
        let mut seqs = Vec::new();
        let mut cursor = String::new();
        let mut pages = 0;
        loop {
            let req = pb::ListDeadLettersRequest { start_after: cursor.clone(), limit: 0 };
            let page = c.list_dead_letters(req).await.unwrap().into_inner();
            pages += 1;
            let bytes: usize = page.dead_letters.iter().map(|d| d.payload.len()).sum();
            assert!(bytes <= 1 << 20, "page {pages} holds {bytes} bytes of payload");
            seqs.extend(page.dead_letters.iter().map(|d| d.seq));
            if page.next_start_after.is_empty() {
                break;
            }
            cursor = page.next_start_after;
        }
        assert_eq!(seqs, (0..10).collect::<Vec<u64>>(), "every dead letter once, oldest first");
        assert!(pages >= 4, "{pages} pages");
    });
    // The CLI follows the pages.
    let out = d.cli(&["dead-letters"]);
    assert_eq!(stdout(&out).lines().count(), 10, "{}", stderr(&out));
}

#[test]
fn cli_output_into_a_closed_pipe_exits_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    deploy(&d, "counter", &guest_wasm("counter"));
    for args in [
        &["status"][..],
        &["--json", "status"],
        &["types"],
        &["versions", "counter"],
        &["invoke", "counter/c", "add", "1"],
        &["state", "counter/c"],
        &["dead-letters"],
    ] {
        // `conflux status | head -0`: the reader is gone before anything is written.
        let mut child = std::process::Command::new(conflux_bin())
            .arg("--addr")
            .arg(d.url())
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        assert_eq!(stderr(&out), "", "{args:?} said something");
        assert_eq!(out.status.code(), Some(141), "{args:?}: exits as a tool killed by SIGPIPE would");
    }
}
