//! What the node tells operators about itself: the Prometheus metrics (one
//! process-wide registry, as in TiKV: every layer records into it, `/metrics`
//! renders it) and the `tracing` subscriber, with an optional OTLP exporter
//! that ships one span per invocation to a collector.

use crate::config::TelemetryConfig;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use std::sync::LazyLock;

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTLP exporter for {endpoint}: {message}")]
    Otlp { endpoint: String, message: String },
    #[error("a tracing subscriber is already installed: {0}")]
    Subscriber(String),
}

/// Latency buckets in seconds: 50 µs to 10 s, roughly ×2.5 apart.
const LATENCY_BUCKETS: &[f64] =
    &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];
/// Write sets per log sync and mailbox depths.
const COUNT_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

/// Every series the node exports. Counters and histograms are recorded where
/// things happen; gauges of current state are set from the layers' own
/// counters when `/metrics` is rendered ([`NodeGauges`]).
pub struct Metrics {
    registry: Registry,
    /// Turns by outcome: `conflux_turns_total{outcome="ok"|"failed"}`
    /// (resolved once: the hot path does no label lookup).
    pub turns_ok: IntCounter,
    pub turns_failed: IntCounter,
    /// Time an invocation spends in the node: queueing, the turn, the commit.
    pub invocation_seconds: Histogram,
    /// Time the guest code of one turn runs.
    pub turn_seconds: Histogram,
    /// Write sets made durable by one log sync.
    pub commit_batch_writes: Histogram,
    /// Turns of one entity that shared one commit (a batch of its mailbox).
    pub turns_per_commit: Histogram,
    /// Raft messages to one peer that shared one call (all shard groups').
    pub raft_messages_per_call: Histogram,
    /// Append-to-durable time of one log batch (its fdatasync included).
    pub fsync_seconds: Histogram,
    /// Invocations already waiting for the entity when one arrives.
    pub mailbox_depth: Histogram,
    /// Batches placed in the log behind another of their entity's commits
    /// still in flight (pipelined).
    pub pipelined_batches: IntCounter,
    /// Instances created (activations of an entity that was not resident).
    pub activations: IntCounter,
    /// Resident instances dropped to make room or because they were idle.
    pub evictions: IntCounter,
    /// Instances dropped after a successful turn because they grew past
    /// `scheduler.max_warm_instance_bytes`: a guest whose runtime leaks a
    /// little per call (componentize-js does) is re-instantiated, not failed.
    pub instances_outgrown: IntCounter,
    /// Traps by kind (`trap`, `out-of-fuel`, `timeout`, …).
    pub traps: IntCounterVec,
    /// Failed invocations by error kind (the API's `conflux-error-kind`).
    pub errors: IntCounterVec,
    /// Messages delivered from outboxes, and dead-lettered.
    pub messages_delivered: IntCounter,
    pub dead_letters: IntCounter,
    /// Replies that found their ask already settled (a reply after the ask's
    /// timeout fired, or the timeout after the reply): dropped, not run.
    pub ask_replies_dropped: IntCounter,
    gauges: Gauges,
}

struct Gauges {
    resident_instances: IntGauge,
    guest_memory_bytes: IntGauge,
    active_entities: IntGauge,
    inflight_invocations: IntGauge,
    outbox_messages: IntGauge,
    entity_types: IntGauge,
    log_applied_index: IntGauge,
    log_durable_index: IntGauge,
    wal_fdatasyncs: IntGauge,
    uptime_seconds: IntGauge,
}

/// Current-state values the layers keep themselves, copied into gauges at scrape.
#[derive(Debug, Clone, Copy, Default)]
pub struct NodeGauges {
    pub resident_instances: u64,
    pub guest_memory_bytes: u64,
    pub active_entities: u64,
    pub inflight_invocations: u64,
    pub outbox_messages: u64,
    pub entity_types: u64,
    pub log_applied_index: u64,
    pub log_durable_index: u64,
    pub wal_fdatasyncs: u64,
    pub uptime_seconds: u64,
}

/// One cumulative histogram: `(upper bound in seconds, count)` per bucket,
/// `+Inf` last, plus the sum and count.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistogramSnapshot {
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    registry.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn counter_vec(registry: &Registry, name: &str, help: &str, label: &str) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
    registry.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec())).expect("valid metric");
    registry.register(Box::new(h.clone())).expect("unique metric");
    h
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    registry.register(Box::new(g.clone())).expect("unique metric");
    g
}

impl Metrics {
    fn new() -> Self {
        let r = Registry::new();
        let gauges = Gauges {
            resident_instances: gauge(&r, "conflux_resident_instances", "Warm entity instances in memory."),
            guest_memory_bytes: gauge(
                &r,
                "conflux_guest_memory_bytes",
                "Linear memory all entity instances hold (warm and running).",
            ),
            active_entities: gauge(&r, "conflux_active_entities", "Entities with a scheduler slot."),
            inflight_invocations: gauge(&r, "conflux_inflight_invocations", "Invocations accepted, not answered."),
            outbox_messages: gauge(&r, "conflux_outbox_messages", "Messages committed, not yet delivered."),
            entity_types: gauge(&r, "conflux_entity_types", "Deployed entity types."),
            log_applied_index: gauge(
                &r,
                "conflux_log_applied_index",
                "Log entries applied, summed over this node's shard replicas.",
            ),
            log_durable_index: gauge(
                &r,
                "conflux_log_durable_index",
                "Log entries made durable, summed over this node's shard replicas.",
            ),
            wal_fdatasyncs: gauge(
                &r,
                "conflux_wal_fdatasyncs",
                "fdatasyncs of the node's WAL since it started; one covers every shard group's appends waiting on it.",
            ),
            uptime_seconds: gauge(&r, "conflux_uptime_seconds", "Seconds since the node started."),
        };
        let turns = counter_vec(&r, "conflux_turns_total", "Turns run, by outcome.", "outcome");
        Self {
            turns_ok: turns.with_label_values(&["ok"]),
            turns_failed: turns.with_label_values(&["failed"]),
            invocation_seconds: histogram(
                &r,
                "conflux_invocation_duration_seconds",
                "Time an invocation spends in the node (queue, turn, commit).",
                LATENCY_BUCKETS,
            ),
            turn_seconds: histogram(
                &r,
                "conflux_turn_duration_seconds",
                "Time the guest code of a turn runs.",
                LATENCY_BUCKETS,
            ),
            commit_batch_writes: histogram(
                &r,
                "conflux_commit_batch_writes",
                "Write sets made durable by one log sync.",
                COUNT_BUCKETS,
            ),
            raft_messages_per_call: histogram(
                &r,
                "conflux_raft_messages_per_call",
                "Raft messages of this node's shard groups to one peer that shared one call.",
                COUNT_BUCKETS,
            ),
            turns_per_commit: histogram(
                &r,
                "conflux_turns_per_commit",
                "Turns of one entity run back to back and committed as one write set (or one lead confirmation).",
                COUNT_BUCKETS,
            ),
            fsync_seconds: histogram(
                &r,
                "conflux_fsync_duration_seconds",
                "Time from appending a batch to the write-ahead log to its fdatasync completing.",
                LATENCY_BUCKETS,
            ),
            mailbox_depth: histogram(
                &r,
                "conflux_mailbox_depth",
                "Invocations already waiting for the entity when one arrives.",
                COUNT_BUCKETS,
            ),
            pipelined_batches: counter(
                &r,
                "conflux_pipelined_batches_total",
                "Batches of turns placed in the log while an earlier commit of their entity was in flight.",
            ),
            activations: counter(&r, "conflux_activations_total", "Entity instances created."),
            evictions: counter(&r, "conflux_evictions_total", "Resident instances evicted."),
            instances_outgrown: counter(
                &r,
                "conflux_instances_outgrown_total",
                "Instances dropped after their turn for holding more than scheduler.max_warm_instance_bytes.",
            ),
            traps: counter_vec(&r, "conflux_traps_total", "Turns that trapped, by kind.", "kind"),
            errors: counter_vec(&r, "conflux_invocation_errors_total", "Failed invocations, by error kind.", "kind"),
            messages_delivered: counter(
                &r,
                "conflux_messages_delivered_total",
                "Outbox messages delivered (or answered as duplicates).",
            ),
            dead_letters: counter(&r, "conflux_dead_letters_total", "Outbox messages dead-lettered."),
            ask_replies_dropped: counter(
                &r,
                "conflux_ask_replies_dropped_total",
                "Replies (or timeouts) that arrived after their ask was settled, dropped.",
            ),
            gauges,
            registry: r,
        }
    }

    /// The Prometheus text exposition (format 0.0.4) of every series.
    pub fn render(&self, now: NodeGauges) -> String {
        let g = &self.gauges;
        let set = |gauge: &IntGauge, v: u64| gauge.set(i64::try_from(v).unwrap_or(i64::MAX));
        set(&g.resident_instances, now.resident_instances);
        set(&g.guest_memory_bytes, now.guest_memory_bytes);
        set(&g.active_entities, now.active_entities);
        set(&g.inflight_invocations, now.inflight_invocations);
        set(&g.outbox_messages, now.outbox_messages);
        set(&g.entity_types, now.entity_types);
        set(&g.log_applied_index, now.log_applied_index);
        set(&g.log_durable_index, now.log_durable_index);
        set(&g.wal_fdatasyncs, now.wal_fdatasyncs);
        set(&g.uptime_seconds, now.uptime_seconds);
        prometheus::TextEncoder::new().encode_to_string(&self.registry.gather()).unwrap_or_else(|e| {
            // Only a non-UTF-8 label could fail; ours are fixed strings.
            format!("# encoding failed: {e}\n")
        })
    }
}

/// A histogram's cumulative buckets now.
pub fn snapshot(h: &Histogram) -> HistogramSnapshot {
    use prometheus::core::Collector;
    let mut out = HistogramSnapshot { sum: h.get_sample_sum(), count: h.get_sample_count(), buckets: Vec::new() };
    for family in h.collect() {
        for m in family.get_metric() {
            let hist = m.get_histogram();
            out.buckets.extend(hist.get_bucket().iter().map(|b| (b.upper_bound(), b.cumulative_count())));
        }
    }
    out.buckets.push((f64::INFINITY, out.count));
    out
}

/// The node's metrics (created on first use).
pub fn metrics() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

/// Keeps the OTLP exporter alive; dropping it flushes the spans not yet sent.
#[must_use = "dropping the guard stops span export"]
pub struct TracingGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TracingGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("warning: flushing spans to the OTLP collector failed: {e}");
        }
    }
}

/// Installs the global `tracing` subscriber: log lines to stderr filtered by
/// `log_filter` (or `RUST_LOG`), and spans to the OTLP collector when one is
/// configured. Must run inside the Tokio runtime (the exporter's gRPC channel
/// lives on it).
pub fn init_tracing(cfg: &TelemetryConfig) -> Result<TracingGuard, TelemetryError> {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log_filter));
    // Colours only for a terminal: a log file or journal gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    let provider = match &cfg.otlp_endpoint {
        None => None,
        Some(endpoint) => {
            use opentelemetry_otlp::WithExportConfig;
            let err =
                |e: &dyn std::fmt::Display| TelemetryError::Otlp { endpoint: endpoint.clone(), message: e.to_string() };
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
                .map_err(|e| err(&e))?;
            let resource = opentelemetry_sdk::Resource::builder().with_service_name(cfg.service_name.clone()).build();
            Some(
                opentelemetry_sdk::trace::SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource)
                    .build(),
            )
        }
    };
    let otel = provider.as_ref().map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("conflux")));
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| TelemetryError::Subscriber(e.to_string()))?;
    Ok(TracingGuard { provider })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_is_cumulative_and_ends_with_infinity() {
        let h = Histogram::with_opts(HistogramOpts::new("t", "t").buckets(vec![0.1, 1.0])).unwrap();
        h.observe(0.05);
        h.observe(0.5);
        h.observe(5.0);
        let s = snapshot(&h);
        assert_eq!(s.buckets, vec![(0.1, 1), (1.0, 2), (f64::INFINITY, 3)]);
        assert_eq!(s.count, 3);
        assert!((s.sum - 5.55).abs() < 1e-9);
    }

    #[test]
    fn render_carries_the_gauges() {
        let text = metrics().render(NodeGauges { resident_instances: 7, ..Default::default() });
        assert!(text.contains("conflux_resident_instances 7"), "{text}");
        assert!(text.contains("# TYPE conflux_invocation_duration_seconds histogram"), "{text}");
    }
}
