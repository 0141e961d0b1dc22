//! End to end with the real binary: guest logs (host log, `conflux logs`,
//! `--follow`), Prometheus `/metrics` read by a Prometheus text parser,
//! spans exported over OTLP to a collector, and `--json` output.

mod support;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::*;

fn say(d: &Daemon, id: &str, line: &str) {
    let payload = serde_json::to_string(line).unwrap();
    rt().block_on(async { call(&mut d.client().await, "faulty", id, "say", &payload).await.unwrap() });
}

#[test]
fn guest_output_is_tagged_and_streamed_by_conflux_logs() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    deploy(&d, "faulty", &guest_wasm("faulty"));
    say(&d, "f1", "hello from f1");
    say(&d, "f2", "hello from f2");

    // The host log carries each line with its entity and invocation.
    let log = d.log();
    let line = log.lines().find(|l| l.contains("hello from f1") && !l.contains("err:")).expect("line in host log");
    assert!(line.contains("entity=faulty/f1") && line.contains("invocation="), "{line}");

    // `conflux logs TYPE/ID`: that entity only, both streams, with the invocation id.
    let out = d.cli(&["logs", "faulty/f1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("faulty/f1") && text.contains("stdout: hello from f1"), "{text}");
    assert!(text.contains("stderr: err: hello from f1"), "{text}");
    assert!(text.contains("warn: logged: hello from f1"), "{text}");
    // Not a bare "f2": invocation ids are hex and may contain it.
    assert!(!text.contains("faulty/f2") && !text.contains("from f2"), "{text}");
    // `conflux logs TYPE`: every entity of the type; `--json`: one object per line.
    let out = d.cli(&["--json", "logs", "faulty", "--tail", "10"]);
    let lines: Vec<Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 6, "{lines:?}");
    assert_eq!(lines[0]["entity"]["id"], "f1");
    assert_eq!(lines[0]["stream"], "stdout");
    assert_eq!(lines[2]["stream"], "warn");
    assert_eq!(lines[4]["line"], "err: hello from f2");
    let inv = lines[0]["invocation_id"].as_str().unwrap();
    assert!(!inv.is_empty(), "{lines:?}");
    assert!(lines[..3].iter().all(|l| l["invocation_id"] == inv), "the lines of one turn share its id");
    assert_ne!(lines[0]["invocation_id"], lines[3]["invocation_id"]);
    assert!(log.contains(&format!("invocation={inv}")), "the host log names the same invocation");

    // `--follow` streams lines written after it started, filtered.
    let mut follower = Command::new(conflux_bin())
        .args(["--addr", &d.url(), "logs", "faulty/live", "--follow", "--tail", "1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = follower.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Until the follower is subscribed its lines may be missed: keep writing.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    let got = loop {
        assert!(Instant::now() < deadline, "--follow showed nothing");
        n += 1;
        say(&d, "other", &format!("not for the follower {n}"));
        say(&d, "live", &format!("live line {n}"));
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(300)) {
            break line;
        }
    };
    assert!(got.contains("faulty/live") && got.contains("live line"), "{got}");
    say(&d, "live", "one more");
    let mut rest = Vec::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(5)) {
        let done = line.contains("logged: one more");
        rest.push(line);
        if done {
            break;
        }
    }
    assert!(rest.iter().any(|l| l.contains("stdout: one more")), "{rest:?}");
    assert!(rest.iter().all(|l| !l.contains("not for the follower")), "{rest:?}");
    let _ = follower.kill();
    let _ = follower.wait();
}

#[test]
fn metrics_are_prometheus_text_with_the_expected_series() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    deploy(&d, "faulty", &guest_wasm("faulty"));
    deploy(&d, "counter", &guest_wasm("counter"));
    rt().block_on(async {
        let mut c = d.client().await;
        for i in 0..20 {
            call(&mut c, "counter", &format!("m{}", i % 4), "add", "1").await.unwrap();
        }
        call(&mut c, "faulty", "f", "set_then_panic", "").await.unwrap_err();
        call(&mut c, "faulty", "f", "set_then_fail", "").await.unwrap_err();
    });
    let body = ureq::get(format!("{}/metrics", d.url())).call().unwrap().body_mut().read_to_string().unwrap();
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).expect("valid exposition");
    let value = |name: &str, label: Option<(&str, &str)>| -> f64 {
        let s = scrape
            .samples
            .iter()
            .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .unwrap_or_else(|| panic!("no series {name} {label:?} in:\n{body}"));
        match &s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => *v,
            prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
            prometheus_parse::Value::Summary(_) => panic!("{name} is a summary"),
        }
    };
    assert_eq!(value("conflux_turns_total", Some(("outcome", "ok"))), 20.0);
    assert_eq!(value("conflux_turns_total", Some(("outcome", "failed"))), 2.0);
    assert_eq!(value("conflux_traps_total", Some(("kind", "trap"))), 1.0);
    assert_eq!(value("conflux_invocation_errors_total", Some(("kind", "failed"))), 1.0);
    assert_eq!(value("conflux_invocation_duration_seconds", None), 22.0, "one observation per call");
    assert_eq!(value("conflux_turn_duration_seconds", None), 22.0);
    assert!(value("conflux_commit_batch_writes", None) >= 1.0);
    assert!(value("conflux_fsync_duration_seconds", None) >= 1.0);
    assert_eq!(value("conflux_mailbox_depth", None), 22.0);
    // 4 counters, faulty/f, and faulty/f again after its trap.
    assert_eq!(value("conflux_activations_total", None), 6.0);
    assert_eq!(value("conflux_evictions_total", None), 0.0);
    // Only the counters stay warm: a failed turn's instance (trapped or
    // answering with a guest error) may remember what was not committed, so
    // it is dropped.
    assert_eq!(value("conflux_resident_instances", None), 4.0);
    assert_eq!(value("conflux_entity_types", None), 2.0);
    assert_eq!(value("conflux_outbox_messages", None), 0.0);
    assert!(value("conflux_log_applied_index", None) >= 20.0);
    let histogram = scrape.docs.get("conflux_invocation_duration_seconds");
    assert!(histogram.is_some(), "HELP text present");
}

/// A received span: its name and its attributes as text.
type ReceivedSpan = (String, Vec<(String, String)>);

/// A collector that keeps the name and attributes of every span it receives.
#[derive(Default, Clone)]
struct Collector {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            for ss in rs.scope_spans {
                for s in ss.spans {
                    let attrs = s
                        .attributes
                        .iter()
                        .map(|kv| {
                            let v = kv.value.as_ref().and_then(|v| v.value.as_ref());
                            let text = match v {
                                Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s)) => {
                                    s.clone()
                                }
                                other => format!("{other:?}"),
                            };
                            (kv.key.clone(), text)
                        })
                        .collect();
                    spans.push((s.name, attrs));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[test]
fn invocation_spans_reach_an_otlp_collector() {
    let collector = Collector::default();
    let rt = rt();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = collector.clone();
    rt.spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(svc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("telemetry.otlp_endpoint=\"http://{addr}\"");
    let mut d = Daemon::start_with(dir.path(), &["--set", &endpoint]);
    deploy(&d, "counter", &guest_wasm("counter"));
    rt.block_on(async {
        let mut c = d.client().await;
        for _ in 0..3 {
            call(&mut c, "counter", "traced", "add", "2").await.unwrap();
        }
    });
    // Shutting down flushes the spans still batched.
    assert!(d.terminate().success(), "{}", d.log());
    let spans = collector.spans.lock().unwrap().clone();
    let invokes: Vec<_> = spans.iter().filter(|(name, _)| name == "invoke").collect();
    assert_eq!(invokes.len(), 3, "one span per invocation: {spans:?}");
    for (_, attrs) in invokes {
        let attr = |k: &str| attrs.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        assert_eq!(attr("entity"), Some("counter/traced"), "{attrs:?}");
        assert_eq!(attr("operation"), Some("add"));
        assert!(attr("invocation_id").is_some_and(|v| !v.is_empty()));
    }
}

#[test]
fn every_client_command_speaks_json() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let wasm = guest_wasm("counter");
    let json = |args: &[&str]| -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = d.cli(&all);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        serde_json::from_str(&stdout(&out)).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {}", stdout(&out)))
    };
    let v = json(&["deploy", "counter", wasm.to_str().unwrap()]);
    assert_eq!((v["entity_type"].as_str(), v["version"].as_u64()), (Some("counter"), Some(1)));
    let v = json(&["deploy", "counter", wasm.to_str().unwrap(), "--dry-run"]);
    assert!(v["dry_run"].is_object(), "{v}");
    assert_eq!(json(&["invoke", "counter/j", "add", "4"])["reply"], 4);
    assert_eq!(json(&["types"])["types"][0]["name"], "counter");
    assert_eq!(json(&["versions", "counter"])["active_version"], 1);
    let s = json(&["status"]);
    assert_eq!(s["turns_ok"], 1);
    assert_eq!(s["shards"][0]["leader"], s["node_id"]);
    assert_eq!(json(&["state", "counter/j"])["entries"][0]["value"], serde_json::json!({ "total": 4 }));
    assert_eq!(json(&["entities", "counter"])["ids"], serde_json::json!(["j"]));
    assert_eq!(json(&["dead-letters"])["dead_letters"], serde_json::json!([]));
    assert_eq!(json(&["rollback", "counter", "1"])["unchanged"], true);
    assert_eq!(json(&["promote", "counter", "1"])["active_version"], 1);
    let target = dir.path().join("scaffolded");
    let v = json(&["new", "json-check", "--dir", target.to_str().unwrap()]);
    assert_eq!(v["files"].as_array().unwrap().len(), 5, "{v}");
    assert!(target.join("Cargo.toml").is_file());
    // Errors stay one line on stderr, whatever the format.
    let out = d.cli(&["--json", "invoke", "nope/x", "get"]);
    assert!(!out.status.success());
    assert!(error_line(&stderr(&out)).contains("unknown-type"), "{}", stderr(&out));
}
