//! Prometheus metrics of the orchestrator. Counters and gauges are atomics shared by all
//! cores; histograms are observed once per utterance or interruption, never per frame. Names
//! of the Python system (`synthesis_total`, `synthesis_errors_total`, `sessions_active`,
//! `barge_in_latency_seconds`) are kept so existing dashboards keep working.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

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
    pub first_audio_latency: Histogram,
    pub barge_in_latency: Histogram,
}

/// Buckets from 50 µs to ~3 s: the gateway's own latency is sub-millisecond, a slow model's
/// is seconds; both must be visible.
fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.000_05, 2.0, 17)
}

impl Default for Metrics {
    fn default() -> Self {
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
            first_audio_latency: Histogram::new(latency_buckets()),
            barge_in_latency: Histogram::new(latency_buckets()),
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
            "first_audio_latency_seconds",
            "Text received to first audio frame written, per utterance",
            m.first_audio_latency.clone(),
        );
        registry.register(
            "barge_in_latency_seconds",
            "PAUSE/STOP read to playback halted",
            m.barge_in_latency.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// The per-core session gauge of `core`.
    pub fn core_sessions(&self, core: usize) -> Gauge {
        self.sessions_per_core
            .get_or_create(&vec![("core".to_string(), core.to_string())])
            .clone()
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
        let text = m.render();
        for name in [
            "synthesis_total 1",
            "synthesis_errors_total",
            "sessions_active",
            "barge_in_latency_seconds_bucket",
            "first_audio_latency_seconds_count 1",
            "frames_sent_total",
            "core_sessions_active{core=\"1\"} 1",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
