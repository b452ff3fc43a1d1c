//! The orchestrator's own view of a measurement window, from its Prometheus `/metrics`
//! (`first_audio_latency_seconds`, `frame_lateness_seconds` histograms, counters).
//!
//! Why: the client sees the server's delay plus its own (a generator sharing two cores with the
//! server is delayed too). Set beside the client's figures, the server's histograms say which
//! side a slow percentile comes from. Bucket resolution only: a percentile is reported as the
//! upper bound of the bucket it falls in.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One scrape: histogram buckets and plain samples, summed over any labels other than `le`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scrape {
    /// `name` → (upper bound `le`, cumulative count), sorted by bound; `+Inf` is `f64::INFINITY`.
    buckets: BTreeMap<String, Vec<(f64, f64)>>,
    /// Unlabelled samples (counters, gauges, `_sum`, `_count`).
    values: BTreeMap<String, f64>,
}

/// Fetches `/metrics` from `authority` (`host:port`) over HTTP/1.0 (never chunked).
pub async fn scrape(authority: &str, timeout: Duration) -> Result<Scrape> {
    let fetch = async {
        let mut s = TcpStream::connect(authority)
            .await
            .with_context(|| format!("connect {authority}"))?;
        s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {authority}\r\n\r\n").as_bytes())
            .await?;
        let mut body = Vec::new();
        s.read_to_end(&mut body).await?;
        Ok::<_, anyhow::Error>(body)
    };
    let raw = tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| anyhow!("GET /metrics from {authority}: timed out"))??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("GET /metrics: no HTTP header end"))?;
    let status = head.split_whitespace().nth(1);
    if !head.starts_with("HTTP/1.") || status != Some("200") {
        bail!(
            "GET /metrics: {}",
            head.lines().next().unwrap_or("no status line")
        );
    }
    Ok(parse(body))
}

/// Parses the Prometheus text format (the subset we need).
pub fn parse(text: &str) -> Scrape {
    let mut s = Scrape::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.parse::<f64>() else {
            continue;
        };
        match series.split_once('{') {
            None => {
                *s.values.entry(series.to_string()).or_default() += v;
            }
            Some((name, labels)) => {
                let Some(base) = name.strip_suffix("_bucket") else {
                    continue;
                };
                let Some(le) = labels
                    .trim_end_matches('}')
                    .split(',')
                    .find_map(|kv| kv.trim().strip_prefix("le="))
                    .map(|q| q.trim_matches('"'))
                else {
                    continue;
                };
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    match le.parse::<f64>() {
                        Ok(b) => b,
                        Err(_) => continue,
                    }
                };
                let b = s.buckets.entry(base.to_string()).or_default();
                match b.iter_mut().find(|(x, _)| *x == bound) {
                    Some((_, c)) => *c += v,
                    None => b.push((bound, v)),
                }
            }
        }
    }
    for b in s.buckets.values_mut() {
        b.sort_by(|x, y| x.0.total_cmp(&y.0));
    }
    s
}

/// A percentile from bucket counts: the upper bound of the bucket it falls in.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Bound {
    /// At most this many seconds.
    AtMost(f64),
    /// Above the largest finite bucket (this many seconds).
    Above(f64),
}

impl Scrape {
    /// Samples recorded in histogram `name` between `earlier` and `self`.
    pub fn delta_count(&self, earlier: &Scrape, name: &str) -> Option<f64> {
        let now = self.buckets.get(name)?.last()?.1;
        let then = earlier
            .buckets
            .get(name)
            .and_then(|b| b.last())
            .map_or(0.0, |b| b.1);
        Some(now - then)
    }

    /// Quantile `q` of histogram `name` over the samples recorded between `earlier` and `self`.
    pub fn delta_quantile(&self, earlier: &Scrape, name: &str, q: f64) -> Option<Bound> {
        let now = self.buckets.get(name)?;
        let then = earlier.buckets.get(name);
        let delta: Vec<(f64, f64)> = now
            .iter()
            .map(|&(le, c)| {
                let before = then
                    .and_then(|t| t.iter().find(|(x, _)| *x == le))
                    .map_or(0.0, |x| x.1);
                (le, c - before)
            })
            .collect();
        let total = delta.last()?.1;
        if total <= 0.0 {
            return None;
        }
        let want = q * total;
        let mut last_finite = 0.0;
        for &(le, c) in &delta {
            if c >= want {
                return Some(if le.is_finite() {
                    Bound::AtMost(le)
                } else {
                    Bound::Above(last_finite)
                });
            }
            if le.is_finite() {
                last_finite = le;
            }
        }
        Some(Bound::Above(last_finite))
    }

    /// The largest bucket of histogram `name` that gained a sample between `earlier` and
    /// `self`: the worst case of the window at bucket resolution (chaos sets it beside the
    /// worst gap a client saw).
    pub fn delta_max_bucket(&self, earlier: &Scrape, name: &str) -> Option<Bound> {
        let now = self.buckets.get(name)?;
        let then = earlier.buckets.get(name);
        let cumulative = |le: f64, c: f64| {
            c - then
                .and_then(|t| t.iter().find(|(x, _)| *x == le))
                .map_or(0.0, |x| x.1)
        };
        let mut below = 0.0;
        let mut last_finite = 0.0;
        let mut max = None;
        for &(le, c) in now {
            let cum = cumulative(le, c);
            if cum > below {
                max = Some(if le.is_finite() {
                    Bound::AtMost(le)
                } else {
                    Bound::Above(last_finite)
                });
            }
            below = below.max(cum);
            if le.is_finite() {
                last_finite = le;
            }
        }
        max
    }

    /// An unlabelled sample (summed over labels), e.g. a gauge.
    pub fn value(&self, name: &str) -> Option<f64> {
        self.values.get(name).copied()
    }

    /// How much a counter grew between `earlier` and `self`.
    pub fn delta_value(&self, earlier: &Scrape, name: &str) -> Option<f64> {
        Some(self.values.get(name)? - earlier.values.get(name).copied().unwrap_or(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: &str = "# HELP x y\n# TYPE frame_lateness_seconds histogram\n\
        frame_lateness_seconds_bucket{le=\"0.001\"} 10\n\
        frame_lateness_seconds_bucket{le=\"0.01\"} 10\n\
        frame_lateness_seconds_bucket{le=\"+Inf\"} 10\n\
        frame_lateness_seconds_count 10\nframes_sent_total 100\n";
    const T1: &str = "frame_lateness_seconds_bucket{le=\"0.001\"} 100\n\
        frame_lateness_seconds_bucket{le=\"0.01\"} 108\n\
        frame_lateness_seconds_bucket{le=\"+Inf\"} 110\n\
        frame_lateness_seconds_count 110\nframes_sent_total 250\n\
        core_sessions_active{core=\"0\"} 3\n";

    #[test]
    fn window_quantiles_come_from_bucket_deltas() {
        let (a, b) = (parse(T0), parse(T1));
        assert_eq!(b.delta_count(&a, "frame_lateness_seconds"), Some(100.0));
        // 90 of the window's 100 samples are ≤ 1 ms, 98 ≤ 10 ms, 2 above.
        assert_eq!(
            b.delta_quantile(&a, "frame_lateness_seconds", 0.5),
            Some(Bound::AtMost(0.001))
        );
        assert_eq!(
            b.delta_quantile(&a, "frame_lateness_seconds", 0.95),
            Some(Bound::AtMost(0.01))
        );
        assert_eq!(
            b.delta_quantile(&a, "frame_lateness_seconds", 0.99),
            Some(Bound::Above(0.01))
        );
        assert_eq!(b.delta_value(&a, "frames_sent_total"), Some(150.0));
        assert_eq!(b.delta_quantile(&a, "nope", 0.5), None);
        assert_eq!(
            b.delta_max_bucket(&a, "frame_lateness_seconds"),
            Some(Bound::Above(0.01))
        );
        assert_eq!(a.delta_max_bucket(&a, "frame_lateness_seconds"), None);
        assert_eq!(
            a.delta_max_bucket(&Scrape::default(), "frame_lateness_seconds"),
            Some(Bound::AtMost(0.001))
        );
        assert_eq!(a.delta_quantile(&a, "frame_lateness_seconds", 0.5), None);
    }

    #[test]
    fn labels_other_than_le_are_summed() {
        let s = parse(
            "h_bucket{core=\"0\",le=\"1\"} 2\nh_bucket{core=\"1\",le=\"1\"} 3\n\
             h_bucket{core=\"0\",le=\"+Inf\"} 2\nh_bucket{core=\"1\",le=\"+Inf\"} 3\n",
        );
        assert_eq!(s.delta_count(&Scrape::default(), "h"), Some(5.0));
    }

    #[tokio::test]
    async fn scrape_errors_are_values() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        assert!(scrape(&addr, Duration::from_secs(2)).await.is_err());
    }
}
