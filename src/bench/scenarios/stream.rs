//! Streaming: frame jitter over one long utterance (seed test 4) and throughput of 3 sessions
//! streaming back to back (seed test 5).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};

use super::{
    check, deadline, jitter_rows, loss_rows, open, setup, unsupported_without_markers, waits, Ctx,
    SEED_INTERVAL_MS,
};
use crate::bench::client::{Conn, EventKind};
use crate::bench::report::{Row, ScenarioReport, Target, Unit};
use crate::bench::utterance::{self, Agg, End, Tracker, Waits, FRAMES_PER_CHUNK};

/// Seed test 4: one long utterance (k streamed chunks of 25 frames), realtime pacing.
pub async fn frame_jitter(ctx: &mut Ctx) -> Result<ScenarioReport> {
    ctx.sut.prepare(SEED_INTERVAL_MS)?;
    let chunks = ctx.n(10, 2);
    let expected = chunks * FRAMES_PER_CHUNK;
    let mut r = ScenarioReport::new(
        "frame_jitter",
        setup(
            ctx,
            &format!(
                "1 session, one utterance of {chunks} streamed chunks ({} × is_final:false + 1 \
                 final) = {expected} frames",
                chunks - 1
            ),
            "json",
        ),
    );
    let mut conn = open(&ctx.sut.url()?).await?;
    let t = utterance::play(&mut conn, &utterance::chunks(chunks), waits(ctx)).await?;
    conn.close().await;
    let mut agg = Agg::default();
    agg.add(&t, Some(expected));
    r.row(Row::new(
        "frames received",
        Some(f64::from(t.frames)),
        Unit::Count,
        None,
        Target::ge(f64::from(expected)),
    ));
    jitter_rows(&mut r, &agg, Some(0.5));
    r.row(Row::new(
        "FAL",
        t.fal().map(|d| d.as_secs_f64() * 1e3),
        Unit::Ms,
        None,
        None,
    ));
    // Every sample in frame order (k = frame k+1 → k+2): the distribution hides *where* a
    // hiccup was, and the measurement test checks exactly that.
    let samples: Vec<f64> = t.jitter_ns.iter().map(|&j| j as f64 / 1e6).collect();
    r.put("jitter_samples_ms", samples);
    check(&mut r, ctx, &agg);
    Ok(r)
}

/// What one throughput session saw.
struct Pumped {
    agg: Agg,
    frames_in_window: u64,
    utterances_in_window: u64,
}

/// Streams utterances back to back on one session (two in flight) until `until`.
async fn pump(mut conn: Conn, until: Instant, w: Waits) -> Result<Pumped> {
    let text = "Throughput sentence for the duplex benchmark.";
    let mut in_flight: VecDeque<Instant> = VecDeque::new();
    for _ in 0..2 {
        in_flight.push_back(conn.send_text(text, true).await?);
    }
    let mut p = Pumped {
        agg: Agg::default(),
        frames_in_window: 0,
        utterances_in_window: 0,
    };
    let mut t = Tracker::new(in_flight[0]);
    loop {
        let limit = t.last_at.map_or(w.first_frame, |_| w.silence(&conn));
        let ev = conn.next_event(deadline(limit)).await?;
        let ended = match &ev {
            None => {
                t.finish_without_marker();
                true
            }
            Some(ev) => {
                if matches!(ev.kind, EventKind::Audio { .. }) && ev.at <= until {
                    p.frames_in_window += 1;
                }
                t.on_event(ev)
            }
        };
        if !ended {
            continue;
        }
        let at = t.last_at.unwrap_or_else(Instant::now);
        p.agg.add(&t, Some(FRAMES_PER_CHUNK));
        if at <= until && matches!(t.end, Some(End::Marker { .. } | End::FinalFrame)) {
            p.utterances_in_window += 1;
        }
        if matches!(t.end, Some(End::Closed | End::Timeout | End::Gap)) {
            break;
        }
        in_flight.pop_front();
        if Instant::now() < until {
            in_flight.push_back(conn.send_text(text, true).await?);
        }
        let Some(&next) = in_flight.front() else {
            break;
        };
        t = Tracker::new(next);
    }
    conn.close().await;
    Ok(p)
}

/// Seed test 5: 3 sessions stream for 10 s; audio messages and utterances per second.
pub async fn throughput(ctx: &mut Ctx) -> Result<ScenarioReport> {
    ctx.sut.prepare(SEED_INTERVAL_MS)?;
    let sessions = 3u32;
    let secs = ctx.n(10.0, 2.0);
    let mut r = ScenarioReport::new(
        "throughput",
        setup(
            ctx,
            &format!(
                "{sessions} sessions × {secs:.0} s, each with 2 utterances queued so audio never \
                 pauses"
            ),
            "json",
        ),
    );
    let url = ctx.sut.url()?;
    let mut conns = Vec::new();
    for _ in 0..sessions {
        conns.push(open(&url).await?);
    }
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(secs);
    let w = waits(ctx);
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|c| tokio::spawn(pump(c, until, w)))
        .collect();
    let mut agg = Agg::default();
    let (mut frames, mut utts) = (0u64, 0u64);
    for t in tasks {
        let p = t.await.map_err(|e| anyhow!("session task: {e}"))??;
        agg.merge(&p.agg);
        frames += p.frames_in_window;
        utts += p.utterances_in_window;
    }
    if unsupported_without_markers(&mut r, ctx, &agg) {
        return Ok(r);
    }
    let msgs_per_s = frames as f64 / secs;
    r.row(Row::new(
        "audio messages received/s (all sessions)",
        Some(msgs_per_s),
        Unit::PerSec,
        Target::gt(20.0),
        None,
    ));
    r.row(Row::new(
        "audio frames/s per session",
        Some(msgs_per_s / f64::from(sessions)),
        Unit::PerSec,
        None,
        Target::ge(49.0),
    ));
    r.row(Row::new(
        "utterances completed/s",
        Some(utts as f64 / secs),
        Unit::PerSec,
        None,
        None,
    ));
    loss_rows(&mut r, &agg);
    r.notes.push(
        "the seed's \"messages/second\" is read as audio messages received per second; \
         realtime pacing caps a session at 50/s, which is what our target asks it to hold"
            .into(),
    );
    r.put("audio_messages_per_s", msgs_per_s);
    r.put("utterances_per_s", utts as f64 / secs);
    r.put("window_s", secs);
    check(&mut r, ctx, &agg);
    // Queued utterances' "FAL" is queueing time, not latency: keep it out of the JSON.
    r.put("fal", serde_json::Value::Null);
    Ok(r)
}
