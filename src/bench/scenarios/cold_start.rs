//! Seed test 7: the first utterance of a fresh orchestrator process versus warm ones, and
//! process start → accepting connections.
//!
//! A fresh `duplex serve` is started against the running worker for each cold sample (spawned
//! mode). Against an external target the process cannot be restarted, so "cold" is only the
//! first connection of this scenario and start-up figures are n/a.

use std::time::Duration;

use anyhow::Result;

use super::{check, setup, waits, Ctx, CONNECT_TIMEOUT, SEED_INTERVAL_MS};
use crate::bench::client::{Conn, WsUrl};
use crate::bench::procfs;
use crate::bench::report::{Row, ScenarioReport, Target, Unit};
use crate::bench::stats::Hist;
use crate::bench::utterance::{self, Agg, Waits, FRAMES_PER_CHUNK};

/// Connect → `session_start` time and the first utterance's tracker, on a new connection.
async fn first_utterance(
    url: &WsUrl,
    w: Waits,
    agg: &mut Agg,
) -> Result<(Duration, Option<Duration>)> {
    let t0 = std::time::Instant::now();
    let (mut conn, _, at) = Conn::open(url, super::deadline(CONNECT_TIMEOUT)).await?;
    let connect = at.saturating_duration_since(t0);
    let t = utterance::play(&mut conn, &utterance::chunks(1), w).await?;
    agg.add(&t, Some(FRAMES_PER_CHUNK));
    conn.close().await;
    Ok((connect, t.fal()))
}

/// Runs the scenario.
pub async fn run(ctx: &mut Ctx) -> Result<ScenarioReport> {
    ctx.sut.prepare(SEED_INTERVAL_MS)?;
    let procs = ctx.n(5u32, 2);
    let warm = ctx.n(10u32, 3);
    let spawned = ctx.sut.spawned();
    let what = if spawned {
        format!("{procs} fresh orchestrator processes: start → accepting, first connection and utterance; then {warm} warm connections")
    } else {
        format!("external target: first connection vs {warm} warm ones (process start n/a)")
    };
    let mut r = ScenarioReport::new("cold_start", setup(ctx, &what, "json"));
    let mut agg = Agg::default();
    let w = waits(ctx);
    let (mut start_h, mut cold_connect, mut cold_fal) = (Hist::new(), Hist::new(), Hist::new());
    let mut idle_rss = Vec::new();
    let mut warm_url = None;
    if spawned {
        let mut fresh = Vec::new();
        for _ in 0..procs {
            let Some(p) = ctx.sut.fresh_serve() else {
                break;
            };
            let p = p?;
            start_h.record(p.start_to_accepting);
            if let Ok(s) = procfs::sample(p.pid) {
                idle_rss.push(s.rss_kib);
            }
            let url = WsUrl::parse(&format!("ws://{}/", p.addr))?;
            let (c, f) = first_utterance(&url, w, &mut agg).await?;
            cold_connect.record(c);
            if let Some(f) = f {
                cold_fal.record(f);
            }
            warm_url = Some(url);
            fresh.push(p);
        }
        // Keep only the last process for the warm runs.
        let last = fresh.pop();
        drop(fresh);
        let (mut wc, mut wf) = (Hist::new(), Hist::new());
        if let Some(url) = &warm_url {
            for _ in 0..warm {
                let (c, f) = first_utterance(url, w, &mut agg).await?;
                wc.record(c);
                if let Some(f) = f {
                    wf.record(f);
                }
            }
        }
        drop(last);
        rows(
            &mut r,
            &start_h,
            &cold_connect,
            &cold_fal,
            &wc,
            &wf,
            &idle_rss,
        );
    } else {
        let url = ctx.sut.url()?;
        let (c, f) = first_utterance(&url, w, &mut agg).await?;
        cold_connect.record(c);
        if let Some(f) = f {
            cold_fal.record(f);
        }
        let (mut wc, mut wf) = (Hist::new(), Hist::new());
        for _ in 0..warm {
            let (c, f) = first_utterance(&url, w, &mut agg).await?;
            wc.record(c);
            if let Some(f) = f {
                wf.record(f);
            }
        }
        rows(
            &mut r,
            &start_h,
            &cold_connect,
            &cold_fal,
            &wc,
            &wf,
            &idle_rss,
        );
        r.notes
            .push("external target: the process was not restarted, so \"cold\" is only a first connection".into());
    }
    check(&mut r, ctx, &agg);
    Ok(r)
}

fn rows(
    r: &mut ScenarioReport,
    start: &Hist,
    cold_connect: &Hist,
    cold_fal: &Hist,
    warm_connect: &Hist,
    warm_fal: &Hist,
    idle_rss: &[u64],
) {
    if start.count() > 0 {
        r.row(Row::new(
            "process start → accepting (median)",
            start.quantile_ms(0.5),
            Unit::Ms,
            None,
            Target::lt(50.0),
        ));
        r.row(Row::new(
            "process start → accepting (max)",
            start.max_ms(),
            Unit::Ms,
            None,
            Target::lt(50.0),
        ));
    } else {
        r.row(Row::text(
            "process start → accepting",
            "n/a (external target)",
        ));
    }
    if let Some(max) = idle_rss.iter().max() {
        r.row(Row::new(
            "orchestrator RSS idle, fresh process",
            Some(*max as f64),
            Unit::Kib,
            None,
            Target::lt(16.0 * 1024.0),
        ));
    }
    r.row(Row::new(
        "cold: connect → session_start (median)",
        cold_connect.quantile_ms(0.5),
        Unit::Ms,
        None,
        None,
    ));
    r.row(Row::new(
        "cold: first FAL (median)",
        cold_fal.quantile_ms(0.5),
        Unit::Ms,
        Target::lt(300.0),
        None,
    ));
    r.row(Row::new(
        "cold: first FAL (max)",
        cold_fal.max_ms(),
        Unit::Ms,
        None,
        None,
    ));
    r.row(Row::new(
        "warm: connect → session_start (median)",
        warm_connect.quantile_ms(0.5),
        Unit::Ms,
        None,
        None,
    ));
    r.row(Row::new(
        "warm: FAL p50",
        warm_fal.quantile_ms(0.5),
        Unit::Ms,
        None,
        None,
    ));
    r.row(Row::new(
        "warm: FAL max",
        warm_fal.max_ms(),
        Unit::Ms,
        None,
        Target::lt(1.0),
    ));
    let ratio = match (cold_fal.quantile_ms(0.5), warm_fal.quantile_ms(0.5)) {
        (Some(c), Some(w)) if w > 0.0 => Some(c / w),
        _ => None,
    };
    r.row(Row::new(
        "cold FAL / warm FAL (medians)",
        ratio,
        Unit::Ratio,
        None,
        None,
    ));
    r.put("start_to_accepting", start.summary());
    r.put("cold_connect", cold_connect.summary());
    r.put("cold_fal", cold_fal.summary());
    r.put("warm_connect", warm_connect.summary());
    r.put("warm_fal", warm_fal.summary());
    r.put("idle_rss_kib", idle_rss);
}
