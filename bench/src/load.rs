//! The load generator: a fixed number of concurrent callers, each issuing one
//! call at a time, until the deadline passes or the request budget is spent.
//! Calls are numbered 0, 1, 2, … from one shared counter, so the workload maps
//! a call number to its key (or user and team).

use hdrhistogram::Histogram;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How one call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged.
    Ok,
    /// Answered with a refusal the workload expects (a second team).
    Refused,
    /// Failed: transport error, timeout, server error.
    Error,
}

/// Bounds of one run.
#[derive(Debug, Clone, Copy)]
pub struct LoadSpec {
    pub concurrency: usize,
    pub duration: Duration,
    pub max_requests: u64,
}

/// What one run measured. Latencies (µs) cover acknowledged and refused calls.
#[derive(Debug)]
pub struct Measured {
    pub ok: u64,
    pub refused: u64,
    pub errors: u64,
    /// Call numbers handed out (including the failed ones).
    pub issued: u64,
    pub secs: f64,
    pub hist: Histogram<u64>,
}

impl Measured {
    /// Answered calls (acknowledged + refused) per second.
    pub fn rate(&self) -> f64 {
        (self.ok + self.refused) as f64 / self.secs.max(1e-9)
    }

    pub fn quantile_us(&self, q: f64) -> u64 {
        if self.hist.is_empty() { 0 } else { self.hist.value_at_quantile(q) }
    }
}

/// Latencies are recorded in µs between 1 µs and 10 minutes.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

/// Runs `call(n)` from `spec.concurrency` tasks until the deadline or the budget.
pub async fn drive<F, Fut>(spec: LoadSpec, call: F) -> Measured
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send,
{
    let call = Arc::new(call);
    let issued = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + spec.duration;
    let mut tasks = Vec::with_capacity(spec.concurrency);
    for _ in 0..spec.concurrency.max(1) {
        let (call, issued) = (call.clone(), issued.clone());
        let budget = spec.max_requests;
        tasks.push(tokio::spawn(async move {
            let mut hist = new_histogram();
            let (mut ok, mut refused, mut errors) = (0u64, 0u64, 0u64);
            while Instant::now() < deadline {
                let n = issued.fetch_add(1, Ordering::Relaxed);
                if n >= budget {
                    break;
                }
                let t = Instant::now();
                let outcome = call(n).await;
                let us = (t.elapsed().as_micros() as u64).clamp(1, 600_000_000);
                match outcome {
                    Outcome::Ok => {
                        ok += 1;
                        hist.record(us).ok();
                    }
                    Outcome::Refused => {
                        refused += 1;
                        hist.record(us).ok();
                    }
                    Outcome::Error => errors += 1,
                }
            }
            (ok, refused, errors, hist)
        }));
    }
    let mut m = Measured { ok: 0, refused: 0, errors: 0, issued: 0, secs: 0.0, hist: new_histogram() };
    for t in tasks {
        match t.await {
            Ok((ok, refused, errors, hist)) => {
                m.ok += ok;
                m.refused += refused;
                m.errors += errors;
                m.hist.add(hist).ok();
            }
            Err(_) => m.errors += 1,
        }
    }
    m.secs = start.elapsed().as_secs_f64();
    m.issued = issued.load(Ordering::Relaxed).min(spec.max_requests);
    m
}

/// Runs `f(i)` for every `i` in `0..n` from `concurrency` tasks and collects the
/// results in order (used for warm-up and read-back, not measured).
pub async fn for_each<T, F, Fut>(n: u64, concurrency: usize, f: F) -> anyhow::Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<T>> + Send,
{
    let f = Arc::new(f);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1).min(n.max(1) as usize) {
        let (f, next) = (f.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                out.push((i, f(i).await?));
            }
            Ok::<_, anyhow::Error>(out)
        }));
    }
    let mut all = Vec::with_capacity(n as usize);
    for t in tasks {
        all.extend(t.await??);
    }
    all.sort_by_key(|(i, _)| *i);
    Ok(all.into_iter().map(|(_, v)| v).collect())
}
