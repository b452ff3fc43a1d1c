//! Latency statistics: an HDR histogram of nanoseconds and the percentile summary every table
//! and the JSON report are built from.
//!
//! Why HDR: percentiles of a few million samples (2000 sessions × 50 frames/s) in constant
//! memory, with a bounded relative error (0.1 %) that is far below what we report (µs).

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Highest value a histogram records exactly (100 s); larger samples saturate to it. Nothing we
/// measure is legitimately that slow: a wait that long has already timed out.
const HIGHEST_NS: u64 = 100_000_000_000;

/// A histogram of durations in nanoseconds.
///
/// Why a wrapper: one place decides the resolution and the saturation policy, and callers pass
/// `Duration`s instead of raw integers of an unstated unit.
#[derive(Clone, Debug)]
pub struct Hist {
    inner: Histogram<u64>,
}

impl Default for Hist {
    fn default() -> Self {
        Self::new()
    }
}

impl Hist {
    /// An empty histogram (1 ns … 100 s, 3 significant digits).
    pub fn new() -> Self {
        // Constant, valid bounds (low ≥ 1, high ≥ 2·low, sigfig ≤ 5): this cannot fail, and no
        // input of any kind reaches it.
        #[allow(clippy::expect_used)]
        let inner = Histogram::new_with_bounds(1, HIGHEST_NS, 3).expect("constant bounds");
        Self { inner }
    }

    /// Records one sample.
    pub fn record(&mut self, d: Duration) {
        self.record_ns(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Records one sample given in nanoseconds (saturating at 100 s).
    pub fn record_ns(&mut self, ns: u64) {
        self.inner.saturating_record(ns.min(HIGHEST_NS));
    }

    /// Adds every sample of `other` (used to merge per-session results).
    pub fn merge(&mut self, other: &Hist) {
        // Both histograms have identical bounds, so addition cannot fail; if it ever did we
        // would rather lose the merge than abort a long run.
        if self.inner.add(&other.inner).is_err() {
            tracing::warn!("bench: histogram merge failed (bounds differ)");
        }
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.inner.len()
    }

    /// Value at quantile `q` (0.0–1.0) in milliseconds, `None` when empty.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        (self.count() > 0).then(|| ns_to_ms(self.inner.value_at_quantile(q)))
    }

    /// The largest sample in milliseconds, `None` when empty.
    pub fn max_ms(&self) -> Option<f64> {
        (self.count() > 0).then(|| ns_to_ms(self.inner.max()))
    }

    /// How many samples are strictly greater than `ns`.
    pub fn count_above_ns(&self, ns: u64) -> u64 {
        let below_or_eq = self.inner.count_between(0, ns);
        self.count().saturating_sub(below_or_eq)
    }

    /// The percentile summary of this histogram.
    pub fn summary(&self) -> Summary {
        if self.count() == 0 {
            return Summary::default();
        }
        let h = &self.inner;
        let q = |x: f64| Some(ns_to_ms(h.value_at_quantile(x)));
        Summary {
            count: h.len(),
            min_ms: Some(ns_to_ms(h.min())),
            mean_ms: Some(h.mean() / 1e6),
            p10_ms: q(0.10),
            p25_ms: q(0.25),
            p50_ms: q(0.50),
            p75_ms: q(0.75),
            p90_ms: q(0.90),
            p95_ms: q(0.95),
            p99_ms: q(0.99),
            p999_ms: q(0.999),
            max_ms: Some(ns_to_ms(h.max())),
        }
    }
}

/// Converts nanoseconds to fractional milliseconds.
pub fn ns_to_ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// Percentiles of one metric in milliseconds, as written to the JSON report.
///
/// Why all of p10…p99.9: the seed asks for the distribution (p10–p99), our targets are p99, and
/// the max shows the single worst event that a percentile hides.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    /// Number of samples.
    pub count: u64,
    /// Smallest sample.
    pub min_ms: Option<f64>,
    /// Arithmetic mean.
    pub mean_ms: Option<f64>,
    /// 10th percentile.
    pub p10_ms: Option<f64>,
    /// 25th percentile.
    pub p25_ms: Option<f64>,
    /// Median.
    pub p50_ms: Option<f64>,
    /// 75th percentile.
    pub p75_ms: Option<f64>,
    /// 90th percentile.
    pub p90_ms: Option<f64>,
    /// 95th percentile.
    pub p95_ms: Option<f64>,
    /// 99th percentile.
    pub p99_ms: Option<f64>,
    /// 99.9th percentile.
    pub p999_ms: Option<f64>,
    /// Largest sample.
    pub max_ms: Option<f64>,
}

/// Jitter of one frame: |inter-arrival − 20 ms|, in nanoseconds.
///
/// Why a function: it is *the* definition in the report header, and the measurement test checks
/// it against a known schedule.
pub fn jitter_ns(inter_arrival: Duration, period: Duration) -> u64 {
    let a = inter_arrival.as_nanos();
    let p = period.as_nanos();
    u64::try_from(a.abs_diff(p)).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_histogram_has_no_percentiles() {
        let h = Hist::new();
        assert_eq!(h.count(), 0);
        assert_eq!(h.summary(), Summary::default());
        assert_eq!(h.quantile_ms(0.99), None);
    }

    #[test]
    fn percentiles_of_uniform_samples() {
        let mut h = Hist::new();
        for ms in 1..=100u64 {
            h.record(Duration::from_millis(ms));
        }
        let s = h.summary();
        assert_eq!(s.count, 100);
        let close = |v: Option<f64>, want: f64| (v.unwrap() - want).abs() < want * 0.002;
        assert!(close(s.p50_ms, 50.0), "{s:?}");
        assert!(close(s.p99_ms, 99.0), "{s:?}");
        assert!(close(s.max_ms, 100.0), "{s:?}");
        assert!(close(s.min_ms, 1.0), "{s:?}");
        assert!((s.mean_ms.unwrap() - 50.5).abs() < 0.1);
    }

    #[test]
    fn merge_adds_samples() {
        let mut a = Hist::new();
        let mut b = Hist::new();
        a.record(Duration::from_micros(100));
        b.record(Duration::from_micros(300));
        a.merge(&b);
        assert_eq!(a.count(), 2);
        assert!((a.max_ms().unwrap() - 0.3).abs() < 0.001);
    }

    #[test]
    fn huge_samples_saturate_instead_of_failing() {
        let mut h = Hist::new();
        h.record(Duration::from_secs(10_000));
        assert_eq!(h.count(), 1);
        assert!(h.max_ms().unwrap() >= 99_000.0);
    }

    #[test]
    fn count_above_threshold() {
        let mut h = Hist::new();
        for us in [100u64, 200, 5_000, 7_000] {
            h.record(Duration::from_micros(us));
        }
        assert_eq!(h.count_above_ns(1_000_000), 2);
        assert_eq!(h.count_above_ns(10_000_000), 0);
    }

    #[test]
    fn jitter_is_distance_from_period() {
        let p = Duration::from_millis(20);
        assert_eq!(jitter_ns(Duration::from_millis(20), p), 0);
        assert_eq!(jitter_ns(Duration::from_millis(27), p), 7_000_000);
        assert_eq!(jitter_ns(Duration::from_millis(13), p), 7_000_000);
        assert_eq!(jitter_ns(Duration::ZERO, p), 20_000_000);
    }
}
