//! End to end in a real browser: a node serves its dashboard at `/`; headless
//! Chromium (driven over WebDriver by chromedriver) renders it under its
//! Content-Security-Policy; the numbers on the page must equal the API's,
//! and a screenshot is saved to `target/dashboard.png`. Against a node with
//! a token, the page keeps it for the tab only and signs out. Needs Debian's
//! `chromium` and `chromium-driver` (scripts/setup.sh installs them; override
//! with CHROMIUM / CHROMEDRIVER).

mod support;

use conflux_client::pb;
use fantoccini::ClientBuilder;
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

fn tool(var: &str, default: &str) -> String {
    let path = std::env::var(var).unwrap_or_else(|_| default.to_owned());
    assert!(
        std::path::Path::new(&path).exists(),
        "{path} not found: run scripts/setup.sh (installs chromium and chromium-driver) or set {var}"
    );
    path
}

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The admin token of the guarded node.
const TOKEN: &str = "dash-tok-8f2e61";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn dashboard_shows_the_apis_numbers_in_chromium() {
    let chromium = tool("CHROMIUM", "/usr/bin/chromium");
    let chromedriver = tool("CHROMEDRIVER", "/usr/bin/chromedriver");
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    deploy(&d, "counter", &guest_wasm("counter"));
    deploy(&d, "faulty", &guest_wasm("faulty"));
    deploy(&d, "counter", &guest_wasm("counter-v2"));
    rt().block_on(async {
        let mut c = d.client().await;
        for i in 0..7 {
            call(&mut c, "counter", &format!("d{}", i % 3), "add", "2").await.unwrap();
        }
        call(&mut c, "faulty", "f", "set_then_fail", "").await.unwrap_err();
    });

    let port = free_port();
    let driver = Driver(
        Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let profile = tempfile::tempdir().unwrap();
    let caps = serde_json::json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-quic",
                format!("--user-data-dir={}", profile.path().display()),
            ],
        },
    });
    let caps = caps.as_object().unwrap().clone().into_iter().collect();
    rt().block_on(async {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let browser = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("WebDriver session");
        browser.goto(&format!("{}/?refresh_ms=250", d.url())).await.unwrap();
        // Two polls: the second one has throughput (it needs a delta).
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let polls = browser.execute("return Number(document.body.dataset.polls || 0)", vec![]).await.unwrap();
            if polls.as_u64().unwrap_or(0) >= 2 {
                break;
            }
            assert!(Instant::now() < deadline, "the dashboard never finished two polls");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Read in one script call: the page re-renders every poll, so an
        // element found by one WebDriver call may be stale by the next.
        let css = |selector: String| {
            let browser = browser.clone();
            async move {
                let script = "const e = document.querySelector(arguments[0]); return e ? e.innerText : null;";
                let v = browser.execute(script, vec![selector.clone().into()]).await.unwrap();
                v.as_str().unwrap_or_else(|| panic!("no element {selector}")).to_owned()
            }
        };
        let text = |id: &'static str| css(format!("#{id}"));
        let s = d.client().await.status(pb::StatusRequest {}).await.unwrap().into_inner();
        assert_eq!(s.turns_ok, 7);
        for (id, want) in [
            ("turns-ok", s.turns_ok),
            ("turns-failed", s.turns_failed),
            ("active-entities", s.active_entities),
            ("resident-instances", s.resident_instances),
            ("entity-types", u64::from(s.entity_types)),
            ("dead-letters", s.dead_letters),
        ] {
            assert_eq!(text(id).await, want.to_string(), "#{id}");
        }
        let active = css(r#"tr[data-type="counter"] .active-version"#.to_owned()).await;
        assert_eq!(active, "2", "counter is on version 2");
        let script = "return document.querySelectorAll('#nodes-table tbody tr').length";
        let nodes = browser.execute(script, vec![]).await.unwrap();
        assert_eq!(nodes.as_u64(), Some(s.nodes.len() as u64));
        let errors = text("errors-list").await;
        assert!(errors.contains("faulty/f") && errors.contains("refusing after a write"), "{errors}");
        // Under load the live charts show throughput and latency.
        let load = {
            let mut c = d.client().await;
            tokio::spawn(async move {
                let until = Instant::now() + Duration::from_secs(3);
                let mut n = 0u64;
                while Instant::now() < until {
                    call(&mut c, "counter", &format!("load{}", n % 8), "add", "1").await.unwrap();
                    n += 1;
                }
                n
            })
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let (throughput, p99) = loop {
            let t = text("throughput").await.parse::<f64>().unwrap_or(0.0);
            let p99 = text("latency-p99").await.parse::<f64>();
            if t > 0.0
                && let Ok(p99) = p99
            {
                break (t, p99);
            }
            assert!(Instant::now() < deadline, "the charts never showed the load");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(p99 > 0.0, "throughput {throughput}/s, p99 {p99} ms");
        let calls = load.await.unwrap();
        // Once the load stops, the next poll shows the API's final count.
        let want = s.turns_ok + calls;
        let deadline = Instant::now() + Duration::from_secs(20);
        while text("turns-ok").await != want.to_string() {
            assert!(Instant::now() < deadline, "turns-ok never reached {want}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let s = d.client().await.status(pb::StatusRequest {}).await.unwrap().into_inner();
        assert_eq!(s.turns_ok, want);
        assert_eq!(text("active-entities").await, s.active_entities.to_string());

        let png = browser.screenshot().await.unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
        let shot = workspace_root().join("target").join("dashboard.png");
        std::fs::write(&shot, png).unwrap();

        // A node with an admin token: the page asks for it, keeps it for this
        // tab only (a reload keeps it, localStorage never has it), signs out.
        let guarded_dir = tempfile::tempdir().unwrap();
        let guarded = Daemon::start_with(guarded_dir.path(), &["--admin-token", TOKEN]);
        let until = async |script: &str, what: &str| {
            let deadline = Instant::now() + Duration::from_secs(20);
            while browser.execute(script, vec![]).await.ok().and_then(|v| v.as_bool()) != Some(true) {
                assert!(Instant::now() < deadline, "the dashboard never got to: {what}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        browser.goto(&format!("{}/?refresh_ms=250", guarded.url())).await.unwrap();
        // A token an earlier dashboard stored for good is forgotten.
        browser.execute("localStorage.setItem('conflux-token', 'stale'); location.reload();", vec![]).await.unwrap();
        until("return !document.getElementById('token-form').hidden && localStorage.getItem('conflux-token') === null", "asking").await;
        let submit = "document.getElementById('token-input').value = arguments[0]; document.getElementById('token-form').requestSubmit();";
        browser.execute(submit, vec![TOKEN.into()]).await.unwrap();
        let loaded = "return document.getElementById('token-form').hidden && document.getElementById('turns-ok').innerText === '0' && !document.getElementById('sign-out').hidden";
        until(loaded, "showing the node's numbers").await;
        let stored = "return [sessionStorage.getItem('conflux-token'), localStorage.getItem('conflux-token')]";
        let v = browser.execute(stored, vec![]).await.unwrap();
        assert_eq!(v, serde_json::json!([TOKEN, null]), "kept in sessionStorage only");
        browser.refresh().await.unwrap();
        until(loaded, "showing the numbers again after a reload").await;
        browser.execute("document.getElementById('sign-out').click()", vec![]).await.unwrap();
        until(
            "return sessionStorage.getItem('conflux-token') === null && !document.getElementById('token-form').hidden \
             && document.getElementById('sign-out').hidden && document.getElementById('turns-ok').innerText === '—'",
            "signed out",
        )
        .await;
        browser.close().await.unwrap();
    });
    drop(driver);
}
