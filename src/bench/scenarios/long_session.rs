//! Seed test 10: 50+ utterances on one socket; early versus late latency and the
//! orchestrator's RSS along the way (a leak or a slowdown shows up here).

use anyhow::Result;

use super::{check, open, sequential, setup, waits, Ctx, SEED_INTERVAL_MS};
use crate::bench::report::{Row, ScenarioReport, Target, Unit};
use crate::bench::utterance::Agg;

/// Utterances per segment (early = first segment, late = last).
const SEGMENT: u32 = 10;

/// Runs the scenario.
pub async fn run(ctx: &mut Ctx) -> Result<ScenarioReport> {
    ctx.sut.prepare(SEED_INTERVAL_MS)?;
    let segments = ctx.n(6u32, 2);
    let per = ctx.n(SEGMENT, 3);
    let n = segments * per;
    let mut r = ScenarioReport::new(
        "long_session",
        setup(
            ctx,
            &format!("1 session × {n} utterances on one socket"),
            "json",
        ),
    );
    let mut conn = open(&ctx.sut.url()?).await?;
    let mut rss = vec![ctx.sut.sample().map(|s| s.rss_kib)];
    let mut segs: Vec<Agg> = Vec::new();
    for _ in 0..segments {
        let mut a = Agg::default();
        sequential(&mut conn, per, 1, waits(ctx), &mut a).await?;
        segs.push(a);
        rss.push(ctx.sut.sample().map(|s| s.rss_kib));
    }
    conn.close().await;
    let mut all = Agg::default();
    for s in &segs {
        all.merge(s);
    }
    let (early, late) = (&segs[0], &segs[segs.len() - 1]);
    let e = early.fal.summary();
    let l = late.fal.summary();
    r.row(Row::new(
        format!("early FAL p50 (first {per})"),
        e.p50_ms,
        Unit::Ms,
        None,
        None,
    ));
    r.row(Row::new(
        format!("early FAL p95 (first {per})"),
        e.p95_ms,
        Unit::Ms,
        Target::lt(300.0),
        None,
    ));
    r.row(Row::new(
        format!("late FAL p50 (last {per})"),
        l.p50_ms,
        Unit::Ms,
        None,
        None,
    ));
    r.row(Row::new(
        format!("late FAL p95 (last {per})"),
        l.p95_ms,
        Unit::Ms,
        Target::lt(300.0),
        None,
    ));
    r.row(Row::new(
        format!("late FAL max (last {per})"),
        l.max_ms,
        Unit::Ms,
        None,
        Target::lt(1.0),
    ));
    let drift = match (e.p50_ms, l.p50_ms) {
        (Some(a), Some(b)) if a > 0.0 => Some(b / a),
        _ => None,
    };
    r.row(Row::new(
        "late / early FAL (medians)",
        drift,
        Unit::Ratio,
        None,
        None,
    ));
    let first = rss.first().copied().flatten();
    let last = rss.last().copied().flatten();
    match (first, last) {
        (Some(a), Some(b)) => {
            r.row(Row::new(
                "orchestrator RSS at start",
                Some(a as f64),
                Unit::Kib,
                None,
                None,
            ));
            r.row(Row::new(
                "orchestrator RSS at end",
                Some(b as f64),
                Unit::Kib,
                None,
                None,
            ));
            r.row(Row::new(
                "orchestrator RSS growth",
                Some(b as f64 - a as f64),
                Unit::Kib,
                None,
                Target::le(256.0),
            ));
        }
        _ => r.row(Row::text("orchestrator RSS", "n/a (no pid)")),
    }
    r.put("fal", all.fal.summary());
    r.put("early_fal", &e);
    r.put("late_fal", &l);
    r.put("rss_kib_per_segment", &rss);
    check(&mut r, ctx, &all);
    Ok(r)
}
