//! Integrity: identical utterances give identical, gap-free sequences (seed test 8), and 50
//! texts sent 10 ms apart are all answered, in order (seed test 9).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::time::Instant as Deadline;

use super::{
    check, loss_rows, open, sequential, setup, unsupported_without_markers, waits, Ctx,
    SEED_INTERVAL_MS,
};
use crate::bench::report::{Row, ScenarioReport, Target, Unit};
use crate::bench::utterance::{Agg, End, Tracker, FRAMES_PER_CHUNK};

/// Seed test 8: 10 identical utterances; sequences 1..n, no gaps or duplicates, equal counts.
pub async fn frame_consistency(ctx: &mut Ctx) -> Result<ScenarioReport> {
    ctx.sut.prepare(SEED_INTERVAL_MS)?;
    let n = ctx.n(10, 3);
    let mut r = ScenarioReport::new(
        "frame_consistency",
        setup(
            ctx,
            &format!("1 session × {n} identical utterances"),
            "json",
        ),
    );
    let mut conn = open(&ctx.sut.url()?).await?;
    let mut agg = Agg::default();
    sequential(&mut conn, n, 1, waits(ctx), &mut agg).await?;
    conn.close().await;
    let mut counts = agg.counts.clone();
    counts.sort_unstable();
    let identical = counts.len() == 1;
    r.row(Row {
        text: Some(if identical {
            "identical".into()
        } else {
            format!("differ: {counts:?}")
        }),
        ..Row::new(
            "frames per utterance",
            counts.first().map(|&c| f64::from(c)),
            Unit::Count,
            None,
            None,
        )
    });
    r.row(Row::new(
        "distinct frame counts",
        Some(counts.len() as f64),
        Unit::Count,
        Target::le(1.0),
        Target::le(1.0),
    ));
    loss_rows(&mut r, &agg);
    if ctx.sut.spawned() || agg.target_has_markers() {
        r.row(Row::new(
            "end markers (sequence last+1)",
            Some((agg.markers - agg.marker_seq_wrong) as f64),
            Unit::Count,
            None,
            Target::ge(f64::from(n)),
        ));
    } else {
        r.row(Row::text("end markers", "unsupported by the target"));
    }
    if !identical {
        r.problems.push(format!(
            "frame counts differ between identical utterances: {counts:?}"
        ));
    }
    r.put("frame_counts", &counts);
    check(&mut r, ctx, &agg);
    Ok(r)
}

/// Seed test 9: `n` texts 10 ms apart on one session; every one answered, in order.
pub async fn rapid_messages(ctx: &mut Ctx) -> Result<ScenarioReport> {
    ctx.sut.prepare(SEED_INTERVAL_MS)?;
    let n = ctx.n(50u32, 6);
    let gap = Duration::from_millis(10);
    let mut r = ScenarioReport::new(
        "rapid_messages",
        setup(
            ctx,
            &format!("1 session, {n} texts sent 10 ms apart, answers queue in order"),
            "json",
        ),
    );
    let mut conn = open(&ctx.sut.url()?).await?;
    let w = waits(ctx);
    let mut agg = Agg::default();
    let mut sends: VecDeque<Instant> = VecDeque::new();
    let mut cur: Option<Tracker> = None;
    let (mut sent, mut done) = (0u32, 0u32);
    let first_send = Instant::now();
    let mut next_send = first_send;
    let mut last_activity = first_send;
    let mut last_end = None;
    while done < n {
        if sent < n && Instant::now() >= next_send {
            let t = conn
                .send_text(&format!("Rapid message number {sent}."), true)
                .await?;
            sends.push_back(t);
            if cur.is_none() {
                cur = Some(Tracker::new(t));
            }
            sent += 1;
            next_send += gap;
            continue;
        }
        // While sending, wake for the next send; after, allow a generous silence.
        let until = if sent < n {
            next_send
        } else if agg.frames > 0 || cur.as_ref().is_some_and(|t| t.frames > 0) {
            // Answers follow each other without a pause; a silence this long means no more.
            last_activity + w.silence(&conn)
        } else {
            last_activity + w.first_frame
        };
        let Some(ev) = conn.next_event(Deadline::from_std(until)).await? else {
            if sent < n {
                continue;
            }
            // Silence: whatever is open ends here, the rest never came.
            if let Some(mut t) = cur.take() {
                t.finish_without_marker();
                agg.add(&t, Some(FRAMES_PER_CHUNK));
            }
            agg.note(format!("{} of {n} texts never answered", n - done - 1));
            break;
        };
        last_activity = ev.at;
        let Some(t) = cur.as_mut() else {
            agg.note(format!("message with no text outstanding: {:?}", ev.kind));
            continue;
        };
        if t.on_event(&ev) {
            let closed = matches!(t.end, Some(End::Closed));
            agg.add(t, Some(FRAMES_PER_CHUNK));
            last_end = Some(ev.at);
            done += 1;
            sends.pop_front();
            cur = sends.front().map(|&s| Tracker::new(s));
            if closed {
                break;
            }
        }
    }
    conn.close().await;
    if unsupported_without_markers(&mut r, ctx, &agg) {
        return Ok(r);
    }
    let answered = agg.markers;
    r.row(Row::new(
        "texts answered (end marker)",
        Some(answered as f64),
        Unit::Count,
        Target::ge(f64::from(n)),
        Target::ge(f64::from(n)),
    ));
    r.row(Row::new(
        "frames received",
        Some(agg.frames as f64),
        Unit::Count,
        None,
        Target::ge(f64::from(n * FRAMES_PER_CHUNK)),
    ));
    loss_rows(&mut r, &agg);
    r.row(Row::new(
        "first send → last end marker",
        last_end.map(|e| e.saturating_duration_since(first_send).as_secs_f64() * 1e3),
        Unit::Ms,
        None,
        None,
    ));
    r.notes.push(format!(
        "realtime pacing plays the {n} answers one after another: ≈ {:.1} s of audio",
        f64::from(n) * 0.5
    ));
    if answered < u64::from(n) {
        r.problems.push(format!(
            "only {answered} of {n} texts were answered with an end marker"
        ));
    }
    check(&mut r, ctx, &agg);
    r.put("fal", serde_json::Value::Null);
    Ok(r)
}
