//! End to end with the real binary: hot-swapping entity code under load
//! (deploy, rollback), lazy exactly-once state migration, dry runs, canaries,
//! refused deploys, and the registry surviving `kill -9`.

mod support;

use conflux_client::pb;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use support::*;
use tonic::Code;

fn versions(d: &Daemon, entity_type: &str) -> String {
    let out = d.cli(&["versions", entity_type]);
    assert!(out.status.success(), "versions failed: {}", stderr(&out));
    stdout(&out)
}

/// The version and active marker of each line of `conflux versions`.
fn version_marks(listing: &str) -> Vec<(u32, String)> {
    listing
        .lines()
        .skip(1)
        .map(|l| {
            let mut cols = l.split('\t');
            (cols.next().unwrap().parse().unwrap(), cols.next().unwrap().to_owned())
        })
        .collect()
}

fn cli_ok(d: &Daemon, args: &[&str]) -> String {
    let out = d.cli(args);
    assert!(out.status.success(), "conflux {args:?} failed: {}", stderr(&out));
    stdout(&out)
}

const LOAD_CLIENTS: usize = 16;
const LOAD_KEYS: usize = 32;

/// One acknowledged `add 1` under load.
struct Ack {
    started: Instant,
    reply: Value,
}

/// 16 clients calling `counter add 1` over 32 keys until stopped (or a call budget
/// runs out). Every result is kept, success or failure.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<(Vec<Ack>, Vec<tonic::Status>)>>,
}

impl Load {
    async fn start(d: &Daemon) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for client in 0..LOAD_CLIENTS {
            let mut c = d.client().await;
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let (mut acks, mut errors) = (Vec::new(), Vec::new());
                for j in 0..200_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let id = format!("k{}", (client * 7 + j) % LOAD_KEYS);
                    let started = Instant::now();
                    match call(&mut c, "counter", &id, "add", "1").await {
                        Ok(reply) => acks.push(Ack { started, reply }),
                        Err(e) => errors.push(e),
                    }
                }
                (acks, errors)
            }));
        }
        Load { stop, tasks }
    }

    async fn finish(self) -> Vec<Ack> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in self.tasks {
            let (acks, errors) = t.await.unwrap();
            assert!(errors.is_empty(), "{} calls failed during the swap, e.g. {:?}", errors.len(), errors[0]);
            all.extend(acks);
        }
        all
    }
}

/// Whether an `add` reply came from counter-v2 (`{"total", "version": 2}`) rather than v1 (a number).
fn from_v2(reply: &Value) -> bool {
    match reply {
        Value::Number(_) => false,
        Value::Object(o) if o.get("version") == Some(&json!(2)) => true,
        other => panic!("unexpected add reply {other}"),
    }
}

async fn total_of_all_keys(d: &Daemon) -> i64 {
    let mut c = d.client().await;
    let mut sum = 0;
    for k in 0..LOAD_KEYS {
        sum += call(&mut c, "counter", &format!("k{k}"), "get", "").await.unwrap().as_i64().unwrap();
    }
    sum
}

/// Runs the load, performs `swap` (a CLI command) in the middle, and checks: no
/// failed call, every acknowledged add counted, and every call that started after
/// the command returned was answered by the expected version.
fn swap_under_load(d: &Daemon, swap: &[&str], expect_v2_after: bool) {
    let runtime = rt();
    runtime.block_on(async {
        let load = Load::start(d).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let args: Vec<String> = swap.iter().map(|s| s.to_string()).collect();
        let addr = d.url();
        let swapped_at = tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new(conflux_bin()).arg("--addr").arg(addr).args(&args).output().unwrap();
            assert!(out.status.success(), "{args:?} failed: {}", stderr(&out));
            Instant::now()
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let acks = load.finish().await;
        let after: Vec<&Ack> = acks.iter().filter(|a| a.started > swapped_at).collect();
        let before = acks.len() - after.len();
        assert!(before > 100 && after.len() > 100, "load too thin: {before} before, {} after", after.len());
        let wrong = after.iter().filter(|a| from_v2(&a.reply) != expect_v2_after).count();
        assert_eq!(wrong, 0, "{wrong} of {} calls after the swap ran the old code", after.len());
        assert_eq!(total_of_all_keys(d).await, acks.len() as i64, "every acknowledged add is counted once");
    });
}

#[test]
fn deploy_under_load_fails_nothing_and_switches_every_entity() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    deploy(&d, "counter", &guest_wasm("counter"));
    let v2 = guest_wasm("counter-v2");
    swap_under_load(&d, &["deploy", "counter", v2.to_str().unwrap()], true);
    assert_eq!(version_marks(&versions(&d, "counter")), [(1, "-".into()), (2, "active".into())]);
}

#[test]
fn rollback_under_load_fails_nothing_and_switches_every_entity() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    deploy(&d, "counter", &guest_wasm("counter"));
    deploy(&d, "counter", &guest_wasm("counter-v2"));
    swap_under_load(&d, &["rollback", "counter", "1"], false);
    assert_eq!(version_marks(&versions(&d, "counter")), [(1, "active".into()), (2, "-".into())]);
    // Version 2's extra operation is gone again.
    rt().block_on(async {
        let mut c = d.client().await;
        let e = call(&mut c, "counter", "k1", "version", "").await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
    });
    let out = d.cli(&["rollback", "counter", "9"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no version 9"), "{}", stderr(&out));
}

/// Seeds tally-v1 entities: `id → n`.
const TALLIES: [(&str, i64); 10] = [
    ("t1", 1),
    ("t2", 2),
    ("t3", 3),
    ("t4", 4),
    ("t5", 5),
    ("t6", 6),
    ("t7", 7),
    ("neg1", -1),
    ("neg2", -2),
    ("unlucky", 13),
];

fn seed_tallies(d: &Daemon) {
    deploy(d, "tally", &guest_wasm("tally-v1"));
    rt().block_on(async {
        let mut c = d.client().await;
        for (id, n) in TALLIES {
            assert_eq!(call(&mut c, "tally", id, "add", &n.to_string()).await.unwrap(), json!(n));
        }
    });
}

/// Every state key of every seeded tally, as `conflux state` prints it.
fn tally_states(d: &Daemon) -> Vec<String> {
    TALLIES.iter().map(|(id, _)| cli_ok(d, &["state", &format!("tally/{id}")])).collect()
}

#[test]
fn dry_run_reports_counts_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    seed_tallies(&d);
    let states = tally_states(&d);
    let listing = versions(&d, "tally");
    let v2 = guest_wasm("tally-v2");

    let out = cli_ok(&d, &["deploy", "tally", v2.to_str().unwrap(), "--dry-run", "--sample", "100"]);
    assert!(out.contains("dry run of tally as version 2"), "{out}");
    assert!(out.contains("sampled 10 entities: 7 migrated, 3 failed, 0 already on this version"), "{out}");
    assert!(out.contains("tally/neg1 (from version 1): entity refused: cannot migrate a negative tally (-1)"), "{out}");
    assert!(out.contains("tally/neg2 (from version 1)"), "{out}");
    assert!(out.contains("tally/unlucky (from version 1): trap") && out.contains("thirteen is unlucky"), "{out}");

    // The sample takes ids in byte order: neg1, neg2, t1, t2.
    let out = cli_ok(&d, &["deploy", "tally", v2.to_str().unwrap(), "--dry-run", "--sample", "4"]);
    assert!(out.contains("sampled 4 entities: 2 migrated, 2 failed"), "{out}");

    // Nothing changed: no version, no state, and the entities still run version 1.
    assert_eq!(versions(&d, "tally"), listing);
    assert_eq!(tally_states(&d), states);
    rt().block_on(async {
        let mut c = d.client().await;
        assert_eq!(call(&mut c, "tally", "t3", "get", "").await.unwrap(), json!(3));
    });
    // A dry run of a broken upload fails like a deploy would.
    let bad = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(bad.path(), b"\0asm\x01\0\0\0").unwrap();
    let out = d.cli(&["deploy", "tally", bad.path().to_str().unwrap(), "--dry-run"]);
    assert!(stderr(&out).contains("core WebAssembly module"), "{}", stderr(&out));
}

#[test]
fn migration_runs_lazily_exactly_once_and_a_failed_one_commits_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path());
    seed_tallies(&d);
    let unlucky_before = cli_ok(&d, &["state", "tally/unlucky"]);
    deploy(&d, "tally", &guest_wasm("tally-v2"));
    let runtime = rt();
    runtime.block_on(async {
        let mut c = d.client().await;
        // Lazily: the first turn migrates, in the same write set as the turn.
        assert_eq!(call(&mut c, "tally", "t1", "add", "10").await.unwrap(), json!(11));
        for _ in 0..3 {
            call(&mut c, "tally", "t1", "add", "1").await.unwrap();
        }
        let t1 = call(&mut c, "tally", "t1", "get", "").await.unwrap();
        assert_eq!(t1, json!({"count": 14, "migrated_from": 1, "migrations": 1}));
        // A read-only first turn migrates too.
        let t2 = call(&mut c, "tally", "t2", "get", "").await.unwrap();
        assert_eq!(t2, json!({"count": 2, "migrated_from": 1, "migrations": 1}));
        // An entity that did not exist before version 2 has nothing to migrate.
        call(&mut c, "tally", "fresh", "add", "5").await.unwrap();
        assert_eq!(call(&mut c, "tally", "fresh", "get", "").await.unwrap()["migrations"], json!(0));

        // A migration that traps: typed error, old state kept, retried next time.
        for _ in 0..2 {
            let e = call(&mut c, "tally", "unlucky", "add", "1").await.unwrap_err();
            assert_eq!((e.code(), kind(&e).as_str()), (Code::FailedPrecondition, "migration-failed"), "{e:?}");
            assert!(e.message().contains("from version 1 to version 2"), "{}", e.message());
            assert!(e.message().contains("thirteen is unlucky"), "{}", e.message());
        }
        // A migration that returns an error: the same.
        let e = call(&mut c, "tally", "neg1", "get", "").await.unwrap_err();
        assert_eq!(kind(&e), "migration-failed", "{e:?}");
        assert!(e.message().contains("negative tally"), "{}", e.message());
    });
    assert_eq!(cli_ok(&d, &["state", "tally/unlucky"]), unlucky_before, "the failed migration committed nothing");

    // Exactly once survives a crash: the version record is committed with the state.
    d.kill9();
    let d = Daemon::start(dir.path());
    runtime.block_on(async {
        let mut c = d.client().await;
        let t1 = call(&mut c, "tally", "t1", "get", "").await.unwrap();
        assert_eq!(t1, json!({"count": 14, "migrated_from": 1, "migrations": 1}));
    });
    // After a rollback the entity that could not migrate works again.
    cli_ok(&d, &["rollback", "tally", "1"]);
    runtime.block_on(async {
        let mut c = d.client().await;
        assert_eq!(call(&mut c, "tally", "unlucky", "get", "").await.unwrap(), json!(13));
        assert_eq!(call(&mut c, "tally", "unlucky", "add", "1").await.unwrap(), json!(14));
        assert_eq!(call(&mut c, "tally", "t5", "get", "").await.unwrap(), json!(5));
    });
}

#[test]
fn a_canary_serves_only_its_ids_until_promoted() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    deploy(&d, "counter", &guest_wasm("counter"));
    let v2 = guest_wasm("counter-v2");
    let out = cli_ok(&d, &["deploy", "counter", v2.to_str().unwrap(), "--canary", "a,b"]);
    assert!(out.contains("version 2") && out.contains("canary for a,b") && out.contains("conflux promote counter 2"));
    assert_eq!(version_marks(&versions(&d, "counter")), [(1, "active".into()), (2, "canary(a,b)".into())]);
    let runtime = rt();
    runtime.block_on(async {
        let mut c = d.client().await;
        for id in ["a", "b"] {
            assert_eq!(call(&mut c, "counter", id, "version", "").await.unwrap(), json!(2));
            assert!(from_v2(&call(&mut c, "counter", id, "add", "1").await.unwrap()));
        }
        for id in ["c", "ab", "A"] {
            let e = call(&mut c, "counter", id, "version", "").await.unwrap_err();
            assert_eq!(e.code(), Code::NotFound, "{id} must still run version 1: {e:?}");
            assert!(!from_v2(&call(&mut c, "counter", id, "add", "1").await.unwrap()));
        }
    });
    let out = cli_ok(&d, &["promote", "counter", "2"]);
    assert!(out.contains("counter version 2 is active (was 1)") && out.contains("ended canary"), "{out}");
    assert_eq!(version_marks(&versions(&d, "counter")), [(1, "-".into()), (2, "active".into())]);
    runtime.block_on(async {
        let mut c = d.client().await;
        for id in ["a", "c", "A"] {
            assert_eq!(call(&mut c, "counter", id, "version", "").await.unwrap(), json!(2));
        }
        // The counts carried over: a had 1 add, c had 1 add.
        assert_eq!(call(&mut c, "counter", "c", "get", "").await.unwrap(), json!(1));
    });
    let out = d.cli(&["deploy", "counter", v2.to_str().unwrap(), "--canary", "bad\u{7}id"]);
    assert!(stderr(&out).contains("bad-canary"), "{}", stderr(&out));
}

#[test]
fn bad_deploys_never_change_the_active_version() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let counter = guest_wasm("counter");
    deploy(&d, "counter", &counter);
    let listing = versions(&d, "counter");
    let bytes = std::fs::read(&counter).unwrap();
    let work = tempfile::tempdir().unwrap();
    let write = |name: &str, data: &[u8]| {
        let p = work.path().join(name);
        std::fs::write(&p, data).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let cases = [
        (write("text.wasm", b"definitely not wasm"), "not a WebAssembly binary"),
        (write("core.wasm", b"\0asm\x01\0\0\0"), "core WebAssembly module, not a component"),
        (guest_wasm("no-handler").to_str().unwrap().to_owned(), "does not export `conflux:entity/handler@0.1.0`"),
        (guest_wasm("unknown-imports").to_str().unwrap().to_owned(), "imports interfaces the host does not allow"),
        (write("truncated.wasm", &bytes[..bytes.len() * 2 / 3]), "not a valid component"),
    ];
    let runtime = rt();
    for (file, why) in &cases {
        let out = d.cli(&["deploy", "counter", file]);
        assert!(!out.status.success(), "{file} was accepted");
        assert!(error_line(&stderr(&out)).contains(why), "{file}: {}", stderr(&out));
        assert_eq!(versions(&d, "counter"), listing, "{file} changed the versions");
    }
    // An upload cut short in transit (fewer bytes than its header announced).
    runtime.block_on(async {
        let mut c = d.client().await;
        let header = pb::DeployHeader { entity_type: "counter".into(), ..Default::default() };
        let mut messages = conflux_client::deploy_messages(header, &bytes);
        messages.pop();
        let e = c.deploy(futures::stream::iter(messages)).await.unwrap_err();
        assert_eq!((e.code(), kind(&e).as_str()), (Code::InvalidArgument, "truncated-upload"), "{e:?}");
        assert!(e.message().contains(&format!("of {} bytes", bytes.len())), "{}", e.message());
        assert_eq!(call(&mut c, "counter", "x", "add", "1").await.unwrap(), json!(1));
    });
    assert_eq!(versions(&d, "counter"), listing);
}

#[test]
fn versions_and_the_active_pointer_survive_kill_dash_nine() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path());
    let (v1, v2) = (guest_wasm("counter"), guest_wasm("counter-v2"));
    deploy(&d, "counter", &v1);
    deploy(&d, "counter", &v2);
    cli_ok(&d, &["rollback", "counter", "1"]);
    // Identical bytes reuse version 2's number, here as a canary.
    let out = cli_ok(&d, &["deploy", "counter", v2.to_str().unwrap(), "--canary", "x"]);
    assert!(out.contains("version 2"), "{out}");
    let listing = versions(&d, "counter");
    assert_eq!(version_marks(&listing), [(1, "active".into()), (2, "canary(x)".into())]);
    d.kill9();
    let d = Daemon::start(dir.path());
    assert_eq!(versions(&d, "counter"), listing);
    rt().block_on(async {
        let mut c = d.client().await;
        assert_eq!(call(&mut c, "counter", "x", "version", "").await.unwrap(), json!(2));
        assert_eq!(call(&mut c, "counter", "y", "add", "3").await.unwrap(), json!(3));
    });
    // Re-deploying the active bytes is a no-op that says so.
    let out = cli_ok(&d, &["deploy", "counter", v1.to_str().unwrap()]);
    assert!(out.contains("version 1 unchanged"), "{out}");
    assert_eq!(versions(&d, "counter"), listing);
}

/// One turn, one budget: a migration and the handler that runs after it in
/// the same turn share the turn's fuel (the old code refilled it in between,
/// so a turn could burn twice its limit). `r` rounds of spinning cost between
/// half the budget and all of it, so each alone fits and both together do not.
#[test]
fn a_migration_and_its_turn_share_one_fuel_budget() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(
        dir.path(),
        &["--set", "runtime.fuel_per_turn=20000000", "--set", "runtime.turn_timeout_ms=0"],
    );
    deploy(&d, "tally", &guest_wasm("tally-v1"));
    deploy(&d, "tally", &guest_wasm("tally-v2"));
    rt().block_on(async {
        let mut c = d.client().await;
        // The most rounds (by doubling) that one fresh turn can spin.
        let mut r: u64 = 1 << 16;
        loop {
            match call(&mut c, "tally", "calibrate", "spin", &(2 * r).to_string()).await {
                Ok(_) => r *= 2,
                Err(e) => {
                    assert_eq!(kind(&e), "out-of-fuel", "{e:?}");
                    break;
                }
            }
            assert!(r < 1 << 40, "spinning never ran out of fuel");
        }
        // Version 1 writes the slow migration's number; version 2 (already
        // numbered) becomes active again.
        cli_ok(&d, &["rollback", "tally", "1"]);
        let slow = 1_000_000_000 + r;
        assert_eq!(call(&mut c, "tally", "slow", "add", &slow.to_string()).await.unwrap(), json!(slow));
        cli_ok(&d, &["rollback", "tally", "2"]);
        let e = call(&mut c, "tally", "slow", "spin", &r.to_string()).await.unwrap_err();
        assert_eq!(kind(&e), "out-of-fuel", "{e:?}");
        // The migration did not commit: a turn that fits migrates once.
        let t = call(&mut c, "tally", "slow", "get", "").await.unwrap();
        assert_eq!(t["count"], json!(slow), "{t}");
        assert_eq!(t["migrations"], json!(1), "{t}");
    });
}
