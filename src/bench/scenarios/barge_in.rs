//! Barge-in: PAUSE in the middle of an utterance, then RESUME, then STOP.
//!
//! Per trial, on one session: a 100-frame utterance starts; after a few frames, PAUSE is sent
//! at a random phase of the 20 ms frame period, and in every other trial just before the next
//! frame is due (0–2 ms), so that PAUSE really races a frame. We
//! measure PAUSE sent → last frame received and count frames after PAUSE over a 300 ms window;
//! RESUME sent → next frame (which must continue the sequence); STOP sent → end marker.
//! A target on which PAUSE changes nothing (the Python system) is reported "unsupported".

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use rand::Rng;
use tokio::time::Instant as Deadline;

use super::{deadline, open, setup, Ctx, ZERO_INTERVAL_MS};
use crate::bench::client::{Conn, EventKind};
use crate::bench::report::{Row, ScenarioReport, Status, Target, Unit};
use crate::bench::stats::Hist;
use crate::bench::utterance::{self, Agg, End, Tracker};

/// How long we watch for stray frames after PAUSE.
const PAUSE_WINDOW: Duration = Duration::from_millis(300);
/// Longest wait for RESUME's frame or STOP's end marker.
const CONTROL_WAIT: Duration = Duration::from_secs(2);
/// Frames per trial utterance (4 chunks).
const CHUNKS: u32 = 4;

/// Figures of one trial.
#[derive(Default)]
struct Trial {
    barge_in: Option<Duration>,
    after_pause: u32,
    resume: Option<Duration>,
    stop: Option<Duration>,
    after_stop: u32,
    interrupted: bool,
    unsupported: Option<String>,
}

/// Feeds events to `t` until `until` or the utterance ends.
async fn drain_until(conn: &mut Conn, t: &mut Tracker, until: Instant) -> Result<()> {
    while t.end.is_none() {
        match conn.next_event(Deadline::from_std(until)).await? {
            Some(ev) => {
                t.on_event(&ev);
            }
            None => break,
        }
    }
    Ok(())
}

/// Feeds `t` whatever has already arrived, so that frames received before a control message
/// is sent are never counted as arriving after it (however late this task reads them).
async fn take_ready(conn: &mut Conn, t: &mut Tracker) -> Result<()> {
    for ev in conn.ready_events().await? {
        t.on_event(&ev);
    }
    Ok(())
}

/// Waits for the next frame (or the end), feeding `t`; returns whether a frame came.
async fn next_frame(conn: &mut Conn, t: &mut Tracker, limit: Duration) -> Result<bool> {
    let before = t.frames;
    let dl = deadline(limit);
    while t.frames == before && t.end.is_none() {
        match conn.next_event(dl).await? {
            Some(ev) => {
                t.on_event(&ev);
            }
            None => break,
        }
    }
    Ok(t.frames > before)
}

async fn trial(conn: &mut Conn, k: u32, phase: Duration, agg: &mut Agg) -> Result<Trial> {
    let mut out = Trial::default();
    let text = utterance::chunks(CHUNKS);
    let mut sent_at = None;
    for (i, c) in text.iter().enumerate() {
        let t = conn.send_text(c, i + 1 == text.len()).await?;
        sent_at.get_or_insert(t);
    }
    let mut t = Tracker::new(sent_at.unwrap_or_else(Instant::now));
    // 1. Let k frames play.
    while t.frames < k {
        if !next_frame(conn, &mut t, Duration::from_secs(10)).await? {
            bail!(
                "utterance ended or stalled after {} frames, before PAUSE",
                t.frames
            );
        }
    }
    // 2. PAUSE at a random phase of the frame period.
    let at = t.last_at.unwrap_or_else(Instant::now) + phase;
    drain_until(conn, &mut t, at).await?;
    take_ready(conn, &mut t).await?;
    let before = t.frames;
    let t_pause = conn.send_control("PAUSE").await?;
    drain_until(conn, &mut t, t_pause + PAUSE_WINDOW).await?;
    out.after_pause = t.frames - before;
    out.barge_in = Some(match t.last_at {
        Some(last) if out.after_pause > 0 => last.saturating_duration_since(t_pause),
        _ => Duration::ZERO,
    });
    if before >= CHUNKS * utterance::FRAMES_PER_CHUNK {
        out.unsupported = Some(format!(
            "no pacing: all {before} frames had arrived before PAUSE could be sent, so there \
             was nothing left to pause"
        ));
        drain_until(conn, &mut t, Instant::now() + Duration::from_secs(1)).await?;
        agg.add(&t, None);
        return Ok(out);
    }
    if t.end.is_some() || out.after_pause > 3 {
        out.unsupported = Some(format!(
            "PAUSE had no effect: {} frames arrived in the {} ms after it{}",
            out.after_pause,
            PAUSE_WINDOW.as_millis(),
            if t.end.is_some() {
                " and the utterance ran to its end"
            } else {
                ""
            }
        ));
        drain_until(conn, &mut t, Instant::now() + Duration::from_secs(1)).await?;
        agg.add(&t, None);
        return Ok(out);
    }
    // 3. RESUME → next frame, continuing the sequence.
    let t_resume = conn.send_control("RESUME").await?;
    if next_frame(conn, &mut t, CONTROL_WAIT).await? {
        out.resume = t.last_at.map(|a| a.saturating_duration_since(t_resume));
    } else {
        agg.note("no frame within 2 s of RESUME".into());
    }
    for _ in 0..3 {
        next_frame(conn, &mut t, CONTROL_WAIT).await?;
    }
    // 4. STOP → end marker.
    take_ready(conn, &mut t).await?;
    let before = t.frames;
    let t_stop = conn.send_control("STOP").await?;
    drain_until(conn, &mut t, t_stop + CONTROL_WAIT).await?;
    out.after_stop = t.frames - before;
    if let (Some(End::Marker { .. }), Some(at)) = (t.end, t.end_at) {
        out.stop = Some(at.saturating_duration_since(t_stop));
        catch_interrupted(conn, &mut t).await?;
    }
    out.interrupted = t.interrupted;
    agg.add(&t, None);
    Ok(out)
}

/// An `interrupted` event may follow the end marker; wait a moment for it so that it is not
/// left for the next trial.
async fn catch_interrupted(conn: &mut Conn, t: &mut Tracker) -> Result<()> {
    if t.interrupted {
        return Ok(());
    }
    let dl = deadline(Duration::from_millis(100));
    while let Some(ev) = conn.next_event(dl).await? {
        if matches!(ev.kind, EventKind::Interrupted { .. }) {
            t.interrupted = true;
            break;
        }
    }
    Ok(())
}

/// Runs the scenario.
pub async fn run(ctx: &mut Ctx) -> Result<ScenarioReport> {
    ctx.sut.prepare(ZERO_INTERVAL_MS)?;
    let trials = ctx.n(20u32, 3);
    let mut r = ScenarioReport::new(
        "barge_in",
        setup(
            ctx,
            &format!(
                "1 session × {trials} trials: {}-frame utterance, PAUSE after 5–14 frames (half at \
                 a random phase, half 0–2 ms before a frame is due), RESUME, STOP",
                CHUNKS * utterance::FRAMES_PER_CHUNK
            ),
            "json",
        ),
    );
    let mut conn = open(&ctx.sut.url()?).await?;
    let mut agg = Agg::default();
    let (mut barge, mut resume, mut stop) = (Hist::new(), Hist::new(), Hist::new());
    let (mut max_after_pause, mut max_after_stop, mut interrupted, mut stops) =
        (0u32, 0u32, 0u32, 0u32);
    let mut rng = rand::rng();
    for i in 0..trials {
        let k = 5 + i % 10;
        // Odd trials: a random phase of the period. Even trials: PAUSE races the next frame
        // (sent 0–2 ms before it is due), the case where a slow server lets a frame through.
        let phase = if i % 2 == 0 {
            Duration::from_micros(rng.random_range(18_000..20_000))
        } else {
            Duration::from_micros(rng.random_range(0..20_000))
        };
        let tr = trial(&mut conn, k, phase, &mut agg).await?;
        if let Some(why) = tr.unsupported {
            r.status = Status::Unsupported(why);
            r.put("frames_after_pause", tr.after_pause);
            conn.close().await;
            return Ok(r);
        }
        if let Some(b) = tr.barge_in {
            barge.record(b);
        }
        if let Some(x) = tr.resume {
            resume.record(x);
        }
        if let Some(x) = tr.stop {
            stop.record(x);
            stops += 1;
        }
        max_after_pause = max_after_pause.max(tr.after_pause);
        max_after_stop = max_after_stop.max(tr.after_stop);
        interrupted += u32::from(tr.interrupted);
    }
    conn.close().await;
    let b = barge.summary();
    r.row(Row::new(
        "barge-in (PAUSE → last frame) p50",
        b.p50_ms,
        Unit::Ms,
        None,
        None,
    ));
    r.row(Row::new(
        "barge-in p95",
        b.p95_ms,
        Unit::Ms,
        Target::lt(50.0),
        None,
    ));
    r.row(Row::new(
        "barge-in p99",
        b.p99_ms,
        Unit::Ms,
        None,
        Target::lt(2.0),
    ));
    r.row(Row::new("barge-in max", b.max_ms, Unit::Ms, None, None));
    r.row(Row::new(
        "frames after PAUSE (max per trial)",
        Some(f64::from(max_after_pause)),
        Unit::Count,
        None,
        Target::le(1.0),
    ));
    let rs = resume.summary();
    r.row(Row::new(
        "RESUME → next frame p50",
        rs.p50_ms,
        Unit::Ms,
        None,
        None,
    ));
    r.row(Row::new(
        "RESUME → next frame max",
        rs.max_ms,
        Unit::Ms,
        None,
        None,
    ));
    r.row(Row::new(
        "frames lost or repeated across PAUSE/RESUME",
        Some((agg.missing + agg.duplicates) as f64),
        Unit::Count,
        None,
        Target::le(0.0),
    ));
    if stops > 0 || ctx.sut.spawned() {
        let ss = stop.summary();
        r.row(Row::new(
            "STOP → end marker p50",
            ss.p50_ms,
            Unit::Ms,
            None,
            None,
        ));
        r.row(Row::new(
            "STOP → end marker max",
            ss.max_ms,
            Unit::Ms,
            None,
            None,
        ));
        r.row(Row::new(
            "frames after STOP (max per trial)",
            Some(f64::from(max_after_stop)),
            Unit::Count,
            None,
            Target::le(1.0),
        ));
        r.row(Row::new(
            "interrupted events",
            Some(f64::from(interrupted)),
            Unit::Count,
            None,
            Target::ge(f64::from(trials)),
        ));
        r.put("stop_to_end_marker", &ss);
    } else {
        r.row(Row::text(
            "STOP → end marker",
            "unsupported by the target (no end marker)",
        ));
    }
    if ctx.sut.spawned() && stops < trials {
        r.problems.push(format!(
            "{} of {trials} STOPs got no end marker within 2 s",
            trials - stops
        ));
    }
    r.problems.extend(agg.problems(false));
    r.put("barge_in", &b);
    r.put("resume_to_frame", &rs);
    r.put("max_frames_after_pause", max_after_pause);
    r.put("max_frames_after_stop", max_after_stop);
    r.put("interrupted_events", interrupted);
    r.put("trials", trials);
    Ok(r)
}
