//! Prometheus metrics of the orchestrator. Counters and gauges are atomics shared by all
//! cores; histograms are observed once per utterance or interruption, never per frame. Names
//! of the Python system (`synthesis_total`, `synthesis_errors_total`, `sessions_active`,
//! `barge_in_latency_seconds`) are kept so existing dashboards keep working.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// Upper bounds (seconds) of the frame-lateness histogram: 10 µs .. 1 s. The top buckets
/// reach past 100 ms so a gap a client hears (a stalled worker, a core busy with a mass
/// disconnect) shows as its size, not as "more than 20 ms".
const LATENESS_BOUNDS: [f64; 17] = [
    0.000_01,
    0.000_025,
    0.000_05,
    0.000_1,
    0.000_25,
    0.000_5,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    f64::MAX,
];

/// How late paced frames left relative to their absolute 20 ms slot (the server's own
/// contribution to jitter): measured when the connection's writer takes them for `writev`,
/// against the slot they had before any re-anchoring, one observation per write (its oldest
/// paced frame). Observed at that rate, so each core writes its own atomics (no lock, no
/// sharing of cache lines between cores); the scrape sums them.
#[derive(Debug, Default)]
pub struct FrameLateness {
    cores: Vec<CoreLateness>,
}

#[derive(Debug, Default)]
struct CoreLateness {
    counts: [AtomicU64; LATENESS_BOUNDS.len()],
    sum_ns: AtomicU64,
}

impl FrameLateness {
    fn new(cores: usize) -> Self {
        Self {
            cores: (0..cores.max(1)).map(|_| CoreLateness::default()).collect(),
        }
    }

    /// Records one frame on `core`.
    pub fn observe(&self, core: usize, late: std::time::Duration) {
        let Some(c) = self.cores.get(core) else {
            return;
        };
        let secs = late.as_secs_f64();
        let i = LATENESS_BOUNDS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENESS_BOUNDS.len() - 1);
        c.counts[i].fetch_add(1, Ordering::Relaxed);
        c.sum_ns.fetch_add(
            late.as_nanos().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }
}

impl EncodeMetric for FrameLateness {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let mut buckets: Vec<(f64, u64)> = LATENESS_BOUNDS.iter().map(|b| (*b, 0)).collect();
        let mut sum_ns = 0u64;
        for c in &self.cores {
            for (b, n) in buckets.iter_mut().zip(&c.counts) {
                b.1 += n.load(Ordering::Relaxed);
            }
            sum_ns = sum_ns.saturating_add(c.sum_ns.load(Ordering::Relaxed));
        }
        let count = buckets.iter().map(|b| b.1).sum();
        encoder.encode_histogram::<NoLabelSet>(sum_ns as f64 / 1e9, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// `build_info{version="..."} 1`.
#[derive(Debug)]
struct BuildInfo;

impl EncodeMetric for BuildInfo {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let labels = [("version", env!("CARGO_PKG_VERSION"))];
        encoder.encode_family(&labels)?.encode_gauge(&1i64)
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }
}

/// Label set of per-core series.
pub type CoreLabels = Vec<(String, String)>;

/// All orchestrator metrics.
pub struct Metrics {
    registry: Registry,
    pub sessions_active: Gauge,
    pub sessions_per_core: Family<CoreLabels, Gauge>,
    pub sessions_total: Counter,
    pub synthesis: Counter,
    pub synthesis_errors: Counter,
    pub frames_sent: Counter,
    pub underruns: Counter,
    pub client_errors: Counter,
    pub rejected_connections: Counter,
    /// TLS handshakes (or records) that failed before a request head was read.
    pub tls_failures: Counter,
    /// Utterances retried on another worker after one refused them before any audio.
    pub utterance_retries: Counter,
    /// Upgrades refused before the session, by reason (`missing`, `invalid`, `expired`,
    /// `origin`, `model`).
    pub auth_failures: Family<Vec<(String, String)>, Counter>,
    /// Messages or connections refused by an abuse limit, by limit.
    pub rate_limited: Family<Vec<(String, String)>, Counter>,
    /// 1 while the process drains (SIGTERM or `POST /drain`).
    pub draining: Gauge,
    /// Session lengths (the Python system's `session_duration_seconds`).
    pub session_duration: Histogram,
    /// Workers that answered their last probe (set at scrape).
    pub workers_available: Gauge,
    /// Workers known (static and discovered; set at scrape).
    pub workers_known: Gauge,
    /// 1 when the registry was read at the last attempt, 0 when Redis is down, absent without
    /// `--redis` (set at scrape).
    pub redis_up: Gauge,
    /// `--max-connections` (so alerts can say "near the cap" without a copy of the flag).
    pub max_connections: Gauge,
    pub first_audio_latency: Histogram,
    pub barge_in_latency: Histogram,
    pub frame_lateness: Arc<FrameLateness>,
}

/// Buckets from 50 µs to ~3 s: the gateway's own latency is sub-millisecond, a slow model's
/// is seconds; both must be visible.
fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.000_05, 2.0, 17)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(1)
    }
}

impl Metrics {
    /// Metrics for an orchestrator with `cores` cores.
    pub fn new(cores: usize) -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            sessions_active: Gauge::default(),
            sessions_per_core: Family::default(),
            sessions_total: Counter::default(),
            synthesis: Counter::default(),
            synthesis_errors: Counter::default(),
            frames_sent: Counter::default(),
            underruns: Counter::default(),
            client_errors: Counter::default(),
            rejected_connections: Counter::default(),
            tls_failures: Counter::default(),
            utterance_retries: Counter::default(),
            auth_failures: Family::default(),
            rate_limited: Family::default(),
            draining: Gauge::default(),
            session_duration: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(1.0, 2.0, 14),
            ),
            workers_available: Gauge::default(),
            workers_known: Gauge::default(),
            redis_up: Gauge::default(),
            max_connections: Gauge::default(),
            first_audio_latency: Histogram::new(latency_buckets()),
            barge_in_latency: Histogram::new(latency_buckets()),
            frame_lateness: Arc::new(FrameLateness::new(cores)),
            registry: Registry::default(),
        };
        registry.register(
            "sessions_active",
            "Open WebSocket sessions",
            m.sessions_active.clone(),
        );
        registry.register(
            "core_sessions_active",
            "Open WebSocket sessions per core",
            m.sessions_per_core.clone(),
        );
        registry.register(
            "sessions",
            "WebSocket sessions opened",
            m.sessions_total.clone(),
        );
        registry.register("synthesis", "Utterances started", m.synthesis.clone());
        registry.register(
            "synthesis_errors",
            "Utterances that failed (worker unavailable or stream error)",
            m.synthesis_errors.clone(),
        );
        registry.register(
            "frames_sent",
            "Audio frames sent to clients",
            m.frames_sent.clone(),
        );
        registry.register(
            "frame_underruns",
            "Frames that arrived after their realtime slot (schedule re-anchored)",
            m.underruns.clone(),
        );
        registry.register(
            "client_errors",
            "Error messages sent to clients for bad input",
            m.client_errors.clone(),
        );
        registry.register(
            "rejected_connections",
            "Upgrades refused with 503 because of --max-connections",
            m.rejected_connections.clone(),
        );
        registry.register(
            "utterance_retries",
            "Utterances retried on another worker after one refused them before any audio (draining, gone)",
            m.utterance_retries.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "TLS connections that failed before their request head (bad handshake, plaintext on a TLS port)",
            m.tls_failures.clone(),
        );
        registry.register(
            "auth_failures",
            "Upgrades refused for their credential or Origin, by reason",
            m.auth_failures.clone(),
        );
        registry.register(
            "rate_limited",
            "Messages and connections refused by an abuse limit, by limit",
            m.rate_limited.clone(),
        );
        registry.register(
            "draining",
            "1 while the orchestrator drains before shutdown",
            m.draining.clone(),
        );
        registry.register(
            "session_duration_seconds",
            "Length of closed WebSocket sessions",
            m.session_duration.clone(),
        );
        registry.register(
            "worker_available",
            "TTS workers that answered their last probe",
            m.workers_available.clone(),
        );
        registry.register(
            "worker_known",
            "TTS workers known (static and discovered)",
            m.workers_known.clone(),
        );
        registry.register(
            "redis_up",
            "1 when the worker registry was read at the last attempt, 0 when Redis is down",
            m.redis_up.clone(),
        );
        registry.register(
            "max_connections",
            "The --max-connections cap of this process",
            m.max_connections.clone(),
        );
        registry.register(
            "build_info",
            "The running build (value 1; version in the label)",
            BuildInfo,
        );
        // Names the earlier Python system's dashboards use, as aliases of ours (same series).
        registry.register(
            "synthesis_latency_seconds",
            "Alias of first_audio_latency_seconds (the Python system's name)",
            m.first_audio_latency.clone(),
        );
        registry.register(
            "worker_errors",
            "Alias of synthesis_errors_total: utterances failed by a worker (the Python system's name)",
            m.synthesis_errors.clone(),
        );
        registry.register(
            "first_audio_latency_seconds",
            "Text received to first audio frame written, per utterance",
            m.first_audio_latency.clone(),
        );
        registry.register(
            "barge_in_latency_seconds",
            "PAUSE/STOP read to playback halted",
            m.barge_in_latency.clone(),
        );
        registry.register(
            "frame_lateness_seconds",
            "Paced frame sent minus its absolute 20 ms slot",
            ArcMetric(m.frame_lateness.clone()),
        );
        Metrics { registry, ..m }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// `/metrics/summary`: the headline figures as one JSON object (the earlier Python
    /// system's summary endpoint, which its dashboards poll).
    pub fn summary(&self, shared: &super::core::Shared) -> serde_json::Value {
        serde_json::json!({
            "uptime_seconds": shared.started.elapsed().as_secs_f64(),
            "sessions_active": self.sessions_active.get(),
            "sessions_total": self.sessions_total.get(),
            "synthesis_total": self.synthesis.get(),
            "synthesis_errors_total": self.synthesis_errors.get(),
            "frames_sent_total": self.frames_sent.get(),
            "frame_underruns_total": self.underruns.get(),
            "client_errors_total": self.client_errors.get(),
            "rejected_connections_total": self.rejected_connections.get(),
            "draining": shared.is_draining(),
        })
    }

    /// Counts a TLS connection that failed before its request head.
    pub fn tls_failure(&self) {
        self.tls_failures.inc();
    }

    /// Counts an upgrade refused for `reason`.
    pub fn auth_failure(&self, reason: &str) {
        self.auth_failures
            .get_or_create(&vec![("reason".to_string(), reason.to_string())])
            .inc();
    }

    /// Counts a message or connection refused by `limit`.
    pub fn limited(&self, limit: &str) {
        self.rate_limited
            .get_or_create(&vec![("limit".to_string(), limit.to_string())])
            .inc();
    }

    /// The per-core session gauge of `core`.
    pub fn core_sessions(&self, core: usize) -> Gauge {
        self.sessions_per_core
            .get_or_create(&vec![("core".to_string(), core.to_string())])
            .clone()
    }
}

/// Registers an `Arc`-shared custom metric.
#[derive(Debug)]
struct ArcMetric<T>(Arc<T>);

impl<T: EncodeMetric> EncodeMetric for ArcMetric<T> {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }
    fn metric_type(&self) -> MetricType {
        self.0.metric_type()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_python_compatible_names() {
        let m = Metrics::default();
        m.synthesis.inc();
        m.core_sessions(1).inc();
        m.first_audio_latency.observe(0.001);
        m.frame_lateness
            .observe(0, std::time::Duration::from_micros(30));
        let text = m.render();
        for name in [
            "synthesis_total 1",
            "synthesis_errors_total",
            "sessions_active",
            "barge_in_latency_seconds_bucket",
            "first_audio_latency_seconds_count 1",
            "frames_sent_total",
            "core_sessions_active{core=\"1\"} 1",
            "frame_lateness_seconds_bucket{le=\"0.00005\"} 1",
            "frame_lateness_seconds_count 1",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
