//! The soak: 10,000 utterances through 200 concurrent sessions, the orchestrator's RSS sampled
//! every tenth of the way.
//!
//! Why: a leak of a few hundred bytes per utterance (a stream or timer entry never dropped, a
//! per-session metric label, a buffer that only grows) hides in the short scenarios; 10,000
//! utterances turn it into growth beyond the ±5 % the issue allows. The first tenth is the
//! warm-up (allocator arenas, slab and queue capacities settle there); flatness is measured
//! from its end.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::sync::Semaphore;

use super::{check, open, waits, Ctx, ZERO_INTERVAL_MS};
use crate::bench::report::{Row, ScenarioReport, Target, Unit};
use crate::bench::utterance::{self, Agg, End, FRAMES_PER_CHUNK};
use crate::bench::WireFormat;

/// Handshakes in flight at once while connecting.
const CONNECT_PARALLEL: usize = 64;
/// RSS checkpoints: one every `total / CHECKPOINTS` completed utterances.
const CHECKPOINTS: u64 = 10;
/// Allowed drift of RSS after warm-up (the "flat (±5 %)").
const FLAT_PERCENT: f64 = 5.0;

/// Runs the scenario.
pub async fn run(ctx: &mut Ctx) -> Result<ScenarioReport> {
    ctx.sut.prepare(ZERO_INTERVAL_MS)?;
    let sessions = ctx.n(200u32, 20);
    let fmt = match ctx.args.scale_format {
        WireFormat::Binary => "binary",
        WireFormat::Json => "json",
    };
    let total = ctx.n(10_000u64, 400);
    let mut r = ScenarioReport::new(
        "soak",
        super::setup(
            ctx,
            &format!(
                "{total} utterances of {FRAMES_PER_CHUNK} frames through {sessions} \
                 concurrent sessions (each sends its next text when an utterance ends); \
                 orchestrator RSS every {} utterances",
                total / CHECKPOINTS
            ),
            fmt,
        ),
    );
    let url = ctx.sut.url()?.with_query(&[("format", fmt)]);
    let rss_idle = ctx.sut.sample().map(|s| s.rss_kib);

    let sem = Arc::new(Semaphore::new(CONNECT_PARALLEL));
    let mut opening = Vec::new();
    for _ in 0..sessions {
        let (sem, url) = (sem.clone(), url.clone());
        opening.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await;
            open(&url).await
        }));
    }
    let mut conns = Vec::new();
    for t in opening {
        match t.await {
            Ok(Ok(c)) => conns.push(c),
            Ok(Err(e)) => r.problems.push(format!("connect: {e:#}")),
            Err(e) => r.problems.push(format!("connect task: {e}")),
        }
    }

    // Sessions claim utterance numbers from one counter so exactly `total` are played however
    // the load spreads over them.
    let claimed = Arc::new(AtomicU64::new(0));
    let completed = Arc::new(AtomicU64::new(0));
    let agg = Arc::new(Mutex::new(Agg::default()));
    // Sessions stay open until the last checkpoint is read, so every checkpoint sees the same
    // 200 sessions and only utterances differ between them.
    let (release, held) = tokio::sync::watch::channel(false);
    let w = waits(ctx);
    let started = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut conn| {
            let (claimed, completed, agg) = (claimed.clone(), completed.clone(), agg.clone());
            let mut held = held.clone();
            tokio::spawn(async move {
                let text = utterance::chunks(1);
                while claimed.fetch_add(1, Ordering::Relaxed) < total {
                    let t = utterance::play(&mut conn, &text, w).await?;
                    if let Ok(mut a) = agg.lock() {
                        a.add(&t, Some(FRAMES_PER_CHUNK));
                    }
                    completed.fetch_add(1, Ordering::Relaxed);
                    if matches!(t.end, Some(End::Closed | End::Timeout)) {
                        anyhow::bail!("session ended: {:?} after {} frames", t.end, t.frames);
                    }
                }
                let _ = held.wait_for(|r| *r).await;
                conn.close().await;
                anyhow::Ok(())
            })
        })
        .collect();

    // (utterances completed, RSS KiB) at each checkpoint.
    let mut samples: Vec<(u64, u64)> = Vec::new();
    let step = (total / CHECKPOINTS).max(1);
    let mut next = step;
    let limit = started + Duration::from_secs(total / 10 + 120);
    while next <= total && Instant::now() < limit && !tasks.iter().all(|t| t.is_finished()) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let done = completed.load(Ordering::Relaxed);
        if done >= next {
            if let Some(s) = ctx.sut.sample() {
                samples.push((done, s.rss_kib));
            }
            while next <= done {
                next += step;
            }
        }
    }
    let _ = release.send(true);
    for t in tasks {
        match tokio::time::timeout(Duration::from_secs(30), t).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => r.problems.push(format!("{e:#}")),
            Ok(Err(e)) => r.problems.push(format!("session task: {e}")),
            Err(_) => r.problems.push("session did not finish within 30 s".into()),
        }
    }
    let wall = started.elapsed().as_secs_f64();
    // Let the orchestrator tear the sessions down, then see what stays.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = ctx.sut.sample().map(|s| s.rss_kib);

    let agg = agg.lock().map(|a| a.clone()).unwrap_or_default();
    r.row(Row::new(
        "utterances completed",
        Some(agg.utterances as f64),
        Unit::Count,
        None,
        Target::ge(total as f64),
    ));
    r.row(Row::new(
        "utterances/s",
        Some(agg.utterances as f64 / wall.max(1e-9)),
        Unit::PerSec,
        None,
        None,
    ));
    let fal = agg.fal.summary();
    r.row(Row::new("FAL p50", fal.p50_ms, Unit::Ms, None, None));
    r.row(Row::new("FAL p99", fal.p99_ms, Unit::Ms, None, None));
    r.row(Row::new("FAL max", fal.max_ms, Unit::Ms, None, None));
    r.put("fal", &fal);
    soak_rows(&mut r, rss_idle, &samples, rss_after);
    r.put("utterances", agg.utterances);
    r.put("frames", agg.frames);
    r.put("rss_idle_kib", rss_idle);
    r.put("rss_checkpoints", &samples);
    r.put("rss_after_close_kib", rss_after);
    check(&mut r, ctx, &agg);
    Ok(r)
}

/// RSS rows: after warm-up, at the end, the spread in between, and the drift with its target.
fn soak_rows(
    r: &mut ScenarioReport,
    idle: Option<u64>,
    samples: &[(u64, u64)],
    after: Option<u64>,
) {
    let (Some(&(_, warm)), Some(&(n_end, end))) = (samples.first(), samples.last()) else {
        r.row(Row::text(
            "orchestrator RSS",
            "n/a (no pid or no checkpoint)",
        ));
        return;
    };
    let kib = |v: u64| Some(v as f64);
    if let Some(i) = idle {
        r.row(Row::new("RSS idle, before", kib(i), Unit::Kib, None, None));
    }
    r.row(Row::new(
        format!("RSS after warm-up ({} utterances)", samples[0].0),
        kib(warm),
        Unit::Kib,
        None,
        None,
    ));
    r.row(Row::new(
        format!("RSS at the end ({n_end} utterances)"),
        kib(end),
        Unit::Kib,
        None,
        None,
    ));
    let max = samples.iter().map(|s| s.1).max().unwrap_or(end);
    r.row(Row::new(
        "RSS max after warm-up",
        kib(max),
        Unit::Kib,
        None,
        None,
    ));
    r.row(Row::new(
        "RSS drift after warm-up, |end - warm| / warm",
        drift_percent(warm, end),
        Unit::Percent,
        None,
        Target::le(FLAT_PERCENT),
    ));
    if let Some(a) = after {
        r.row(Row::new(
            "RSS after all sessions closed",
            kib(a),
            Unit::Kib,
            None,
            None,
        ));
    }
    r.notes.push(
        "drift uses % for its unit (not % of a core); checkpoints are in the JSON".to_string(),
    );
}

/// `|end - warm| / warm` in percent.
fn drift_percent(warm: u64, end: u64) -> Option<f64> {
    (warm > 0).then(|| (end as f64 - warm as f64).abs() / warm as f64 * 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drift_is_symmetric_and_relative_to_warm() {
        assert_eq!(drift_percent(1000, 1050), Some(5.0));
        assert_eq!(drift_percent(1000, 950), Some(5.0));
        assert_eq!(drift_percent(0, 10), None);
    }

    #[test]
    fn rows_flag_growth_beyond_five_percent() {
        let mut r = ScenarioReport::new("soak", "");
        soak_rows(&mut r, Some(900), &[(1000, 10_000), (10_000, 10_600)], None);
        let drift = r.rows.iter().find(|x| x.metric.starts_with("RSS drift"));
        let drift = drift.expect("drift row");
        assert_eq!(drift.verdict(&drift.ours), Some(false));

        let mut r = ScenarioReport::new("soak", "");
        soak_rows(&mut r, None, &[(1000, 10_000), (10_000, 10_100)], None);
        let drift = r.rows.iter().find(|x| x.metric.starts_with("RSS drift"));
        assert_eq!(drift.and_then(|d| d.verdict(&d.ours)), Some(true));
    }
}
