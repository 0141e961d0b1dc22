//! Conflux-only scenarios behind `conflux-bench swap` and `conflux-bench messaging`:
//! the cost of a hot swap under load (issue: hot-swap) and message throughput
//! and transfer latency between entities (issue: messaging). Each runs against a
//! fresh node, is bounded in time and count, and prints a Markdown table.

use crate::conflux::ConfluxTarget;
use crate::load::new_histogram;
use crate::target::CallError;
use anyhow::{Context, bail, ensure};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Callers and keys of the background load during a swap.
const SWAP_CALLERS: usize = 16;
const SWAP_KEYS: u64 = 32;
/// Calls kept per caller (bounds memory of the per-call record).
const MAX_CALLS_PER_CALLER: usize = 500_000;

/// One call of the background load: when it started and how long it took.
#[derive(Clone, Copy)]
struct Call {
    start: Instant,
    micros: u64,
}

/// `counter add 1` from 16 callers over 32 keys until `stop` is set; every call recorded.
async fn background_load(target: &ConfluxTarget, stop: Arc<AtomicBool>) -> anyhow::Result<Vec<Call>> {
    let mut tasks = Vec::new();
    for caller in 0..SWAP_CALLERS {
        let (t, stop) = (target.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut calls = Vec::new();
            let mut errors = 0u64;
            let mut n = caller as u64;
            while !stop.load(Ordering::Relaxed) && calls.len() < MAX_CALLS_PER_CALLER {
                let start = Instant::now();
                match t.invoke("counter", &format!("s{}", n % SWAP_KEYS), "add", b"1".to_vec()).await {
                    Ok(_) => calls.push(Call { start, micros: start.elapsed().as_micros() as u64 }),
                    Err(_) => errors += 1,
                }
                n += SWAP_CALLERS as u64;
            }
            (calls, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (calls, e) = t.await?;
        all.extend(calls);
        errors += e;
    }
    ensure!(errors == 0, "{errors} calls failed under the swap");
    Ok(all)
}

fn p99(calls: impl Iterator<Item = u64>) -> (u64, u64) {
    let mut h = new_histogram();
    let mut n = 0;
    for us in calls {
        let _ = h.record(us.max(1));
        n += 1;
    }
    (n, if n == 0 { 0 } else { h.value_at_quantile(0.99) })
}

/// Deploys counter v2 and rolls back to v1 while the load runs; prints the table.
pub async fn swap(target: &ConfluxTarget, v1: &Path, v2: &Path, rounds: u32) -> anyhow::Result<()> {
    target.deploy("counter", v1).await.context("deploying counter v1")?;
    println!(
        "| change | deploy/rollback call ms | first call on new code after it returns, ms | calls | p99 steady µs | p99 in swap window µs | ratio |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for round in 0..rounds {
        for (label, to_v2) in [("deploy v2", true), ("rollback to v1", false)] {
            let stop = Arc::new(AtomicBool::new(false));
            let load = tokio::spawn({
                let (t, s) = (target.clone(), stop.clone());
                async move { background_load(&t, s).await }
            });
            tokio::time::sleep(Duration::from_secs(2)).await;
            let began = Instant::now();
            if to_v2 {
                target.deploy("counter", v2).await.context("deploying counter v2")?;
            } else {
                target.rollback("counter", 1).await.context("rolling back")?;
            }
            let returned = Instant::now();
            // The first call after the change returns must already run the new code.
            let reply = target.invoke("counter", "probe", "version", Vec::new()).await;
            let visible = returned.elapsed();
            match (&reply, to_v2) {
                (Ok(r), true) if r.as_slice() == b"2" => {}
                (Err(CallError::Failed(m)), false) if m.contains("NotFound") => {}
                other => bail!("round {round}: the first call after {label} did not see the new code: {other:?}"),
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            stop.store(true, Ordering::Relaxed);
            let calls = load.await??;
            let window_end = returned + Duration::from_millis(500);
            let (n_steady, steady) =
                p99(calls.iter().filter(|c| c.start + Duration::from_micros(c.micros) < began).map(|c| c.micros));
            let (n_window, window) = p99(calls
                .iter()
                .filter(|c| c.start < window_end && c.start + Duration::from_micros(c.micros) > began)
                .map(|c| c.micros));
            println!(
                "| {label} | {:.1} | {:.2} | {} ({} in window) | {steady} | {window} | {:.2}× |",
                (returned - began).as_secs_f64() * 1e3,
                visible.as_secs_f64() * 1e3,
                n_steady + n_window,
                n_window,
                window as f64 / steady.max(1) as f64
            );
        }
    }
    Ok(())
}

async fn relay_stats(target: &ConfluxTarget, id: &str) -> anyhow::Result<serde_json::Value> {
    let r = target.invoke("relay", id, "stats", Vec::new()).await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(serde_json::from_slice(&r)?)
}

/// Waits (bounded) until every receiver got `per_receiver` messages.
async fn await_received(target: &ConfluxTarget, receivers: &[String], per_receiver: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    for r in receivers {
        loop {
            let s = relay_stats(target, r).await?;
            if s["received"].as_u64() == Some(per_receiver) {
                ensure!(s["violations"] == 0, "{r} saw messages out of order: {s}");
                break;
            }
            ensure!(Instant::now() < deadline, "{r} got {s} after 300 s");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    Ok(())
}

/// Message throughput (one pair, many pairs), and asks: bank transfer latency
/// (sequential) and throughput (64 senders at once).
pub async fn messaging(target: &ConfluxTarget, relay: &Path, bank: &Path, transfers: u32) -> anyhow::Result<()> {
    target.deploy("relay", relay).await.context("deploying relay")?;
    target.deploy("account", bank).await.context("deploying bank")?;
    println!("| scenario | messages | seconds | messages/s |");
    println!("|---|---:|---:|---:|");
    for (label, pairs, per_pair) in [("one sender → one receiver", 1u64, 10_000u64), ("64 pairs", 64, 200)] {
        let tag = format!("p{pairs}");
        let start = Instant::now();
        let mut sends = Vec::new();
        for p in 0..pairs {
            let t = target.clone();
            let (from, to) = (format!("{tag}-s{p}"), format!("{tag}-r{p}"));
            sends.push(tokio::spawn(async move {
                for chunk in 0..per_pair.div_ceil(100) {
                    let count = 100.min(per_pair - chunk * 100);
                    let body = serde_json::json!({"target_id": to, "from": chunk * 100 + 1, "count": count});
                    t.invoke("relay", &from, "sequence", body.to_string().into_bytes())
                        .await
                        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                }
                anyhow::Ok(())
            }));
        }
        for s in sends {
            s.await??;
        }
        let receivers: Vec<String> = (0..pairs).map(|p| format!("{tag}-r{p}")).collect();
        await_received(target, &receivers, per_pair).await?;
        let secs = start.elapsed().as_secs_f64();
        let n = pairs * per_pair;
        println!("| {label} | {n} | {secs:.2} | {:.0} |", n as f64 / secs);
    }
    // A transfer is an ask and its answer: one turn on a1 (debit + ask), one
    // on a2 (credit + answer), one on a1 (the continuation marks it completed).
    let owned = target.clone();
    let call = move |id: String, op: &'static str, body: String| {
        let t = owned.clone();
        async move { t.invoke("account", &id, op, body.into_bytes()).await.map_err(|e| anyhow::anyhow!("{e:?}")) }
    };
    let call_for_status = call.clone();
    let status = move |id: String, transfer: String| {
        let call = call_for_status.clone();
        async move {
            let s = call(id, "transfer_status", serde_json::to_string(&transfer)?).await?;
            anyhow::Ok(serde_json::from_slice::<Option<String>>(&s)?)
        }
    };
    call("a1".into(), "deposit", (transfers as i64 * 10).to_string()).await?;
    let (mut credited, mut settled) = (new_histogram(), new_histogram());
    for i in 1..=transfers {
        let start = Instant::now();
        let reply = call("a1".into(), "transfer", r#"{"to": "a2", "amount": 1}"#.to_owned()).await?;
        let transfer: String = serde_json::from_slice(&reply)?;
        let mut seen_credit = false;
        loop {
            if !seen_credit {
                let b: i64 = serde_json::from_slice(&call("a2".into(), "balance", String::new()).await?)?;
                if b == i as i64 {
                    seen_credit = true;
                    let _ = credited.record(start.elapsed().as_micros() as u64);
                }
            }
            if seen_credit && status("a1".into(), transfer.clone()).await?.as_deref() == Some("completed") {
                let _ = settled.record(start.elapsed().as_micros() as u64);
                break;
            }
            ensure!(start.elapsed() < Duration::from_secs(30), "transfer {transfer} not completed after 30 s");
        }
    }
    // Many at once: 64 senders each ask a receiver of their own, 50 transfers
    // each; the clock stops when every sender's continuations have run.
    const SENDERS: usize = 64;
    const PER_SENDER: usize = 50;
    let start = Instant::now();
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let (call, status) = (call.clone(), status.clone());
        senders.push(tokio::spawn(async move {
            let (from, to) = (format!("m{s}"), format!("n{s}"));
            call(from.clone(), "deposit", (PER_SENDER * 10).to_string()).await?;
            let body = serde_json::json!({"to": to, "amount": 1}).to_string();
            let mut last = String::new();
            for _ in 0..PER_SENDER {
                last = serde_json::from_slice(&call(from.clone(), "transfer", body.clone()).await?)?;
            }
            // Replies come back in order per pair: the last one settles the rest.
            let deadline = Instant::now() + Duration::from_secs(300);
            while status(from.clone(), last.clone()).await?.as_deref() != Some("completed") {
                ensure!(Instant::now() < deadline, "{from}'s transfer {last} not completed after 300 s");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            anyhow::Ok(())
        }));
    }
    for s in senders {
        s.await??;
    }
    let secs = start.elapsed().as_secs_f64();
    let n = SENDERS * PER_SENDER;
    println!();
    println!("| bank transfer a1 → a2 (an ask and its answer) | transfers | p50 µs | p99 µs | max µs |");
    println!("|---|---:|---:|---:|---:|");
    for (label, h) in
        [("call → credited (a2's balance shows it)", &credited), ("call → continuation ran (completed)", &settled)]
    {
        println!(
            "| {label} | {transfers} | {} | {} | {} |",
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.max()
        );
    }
    println!();
    println!("| asks, many at once | transfers | seconds | transfers/s | turns/s |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| {SENDERS} senders × {PER_SENDER} transfers (3 turns each) | {n} | {secs:.2} | {:.0} | {:.0} |",
        n as f64 / secs,
        3.0 * n as f64 / secs
    );
    Ok(())
}

/// Keys of the foreground counter load in the sleepers scenario.
const SLEEPERS_KEYS: u64 = 10_000;
/// Foreground callers in the sleepers scenario.
const SLEEPERS_CALLERS: usize = 16;

/// Foreground `counter add 1` over 10,000 keys for `secs`, with `sleepers`
/// hostile guests calling `sleep` in a loop meanwhile (half sleep just under
/// the 1 s turn budget, half ask for 15 s). Returns the foreground run and how
/// many sleeper turns ended.
async fn sleepers_phase(
    target: &ConfluxTarget,
    run: u32,
    sleepers: usize,
    secs: u64,
) -> anyhow::Result<(crate::load::Measured, u64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut hostile = Vec::new();
    for s in 0..sleepers {
        let (t, stop) = (target.clone(), stop.clone());
        let ms = if s % 2 == 0 { "900" } else { "15000" };
        hostile.push(tokio::spawn(async move {
            let mut turns = 0u64;
            // Bounded by the stop flag and a turn budget.
            while !stop.load(Ordering::Relaxed) && turns < 100_000 {
                let _ = t.invoke("raw", &format!("sleeper{s}"), "sleep", ms.as_bytes().to_vec()).await;
                turns += 1;
            }
            turns
        }));
    }
    let t = target.clone();
    let spec = crate::load::LoadSpec {
        concurrency: SLEEPERS_CALLERS,
        duration: Duration::from_secs(secs),
        max_requests: 10_000_000,
    };
    let m = crate::load::drive(spec, move |n| {
        let t = t.clone();
        async move {
            match t.invoke("counter", &format!("z{run}-{}", n % SLEEPERS_KEYS), "add", b"1".to_vec()).await {
                Ok(_) => crate::load::Outcome::Ok,
                Err(_) => crate::load::Outcome::Error,
            }
        }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut turns = 0;
    for h in hostile {
        turns += h.await?;
    }
    Ok((m, turns))
}

/// Other entities' latency with and without `sleepers` guests sleeping in
/// their turns, alternating steady and hostile phases `rounds` times; prints
/// each phase and the median p99 ratio.
pub async fn sleepers(
    target: &ConfluxTarget,
    counter: &Path,
    raw: &Path,
    sleepers: usize,
    secs: u64,
    rounds: u32,
) -> anyhow::Result<()> {
    target.deploy("counter", counter).await.context("deploying the counter")?;
    target.deploy("raw", raw).await.context("deploying raw-waits")?;
    println!("| phase | sleepers | calls/s | errors | p50 µs | p99 µs | sleeper turns |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut ratios = Vec::new();
    for round in 0..rounds {
        let mut p99s = [0u64; 2];
        for (i, n) in [0, sleepers].into_iter().enumerate() {
            let (m, turns) = sleepers_phase(target, round * 2 + i as u32, n, secs).await?;
            ensure!(m.errors == 0, "{} foreground calls failed with {n} sleepers", m.errors);
            p99s[i] = m.quantile_us(0.99);
            println!(
                "| {} | {n} | {:.0} | {} | {} | {} | {turns} |",
                if n == 0 { "steady" } else { "sleepers" },
                m.rate(),
                m.errors,
                m.quantile_us(0.5),
                p99s[i],
            );
        }
        ratios.push(p99s[1] as f64 / p99s[0].max(1) as f64);
    }
    ratios.sort_by(f64::total_cmp);
    println!("\nmedian p99 ratio (sleepers / steady): {:.2}×", ratios[ratios.len() / 2]);
    Ok(())
}
