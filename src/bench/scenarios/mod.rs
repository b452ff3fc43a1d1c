//! The scenarios: the seed's ten performance tests, barge-in, the scale sweep, the floor, and
//! (on request only) chaos.
//! Each returns a [`ScenarioReport`]; an error becomes a report with status `error`.
//!
//! Which mock settings: the worker's first-frame delay is always 0 (so FAL is orchestrator
//! overhead). The seed's ten tests run with the seed-like 5 ms frame interval; barge-in and
//! scale with 0 ms (the orchestrator's own cost, nothing hidden behind worker pacing).

mod barge_in;
mod chaos;
mod cold_start;
mod fal;
mod floor_rtt;
mod floor_writer;
mod integrity;
mod long_session;
mod scale;
mod soak;
mod stream;
mod tls;

use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::time::Instant as Deadline;

use super::client::{Conn, WsUrl};
use super::procfs::{CpuTicks, SelfCpu};
use super::report::{Row, ScenarioReport, Status, Target, Unit};
use super::stats::{Hist, Summary};
use super::utterance::{self, Agg, Waits};
use super::Ctx;
pub use floor_writer::FloorCpu;

/// The mock's frame interval for the seed's scenarios (like the seed's mock worker).
pub const SEED_INTERVAL_MS: u32 = 5;
/// The mock's frame interval where we measure the orchestrator alone.
pub const ZERO_INTERVAL_MS: u32 = 0;
/// Longest wait for a connection and its `session_start`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs scenario `name`; never fails (errors become the report's status).
pub async fn run_one(name: &'static str, ctx: &mut Ctx) -> ScenarioReport {
    let t0 = Instant::now();
    let cpu = SelfCpu::start();
    let ticks = CpuTicks::now();
    let res = match name {
        "floor" => floor_rtt::run(ctx).await,
        "fal_single" => fal::fal_single(ctx).await,
        "fal_concurrent_3" => fal::fal_concurrent(ctx, "fal_concurrent_3", 3, 10, 2).await,
        "fal_concurrent_10" => fal::fal_concurrent(ctx, "fal_concurrent_10", 10, 5, 2).await,
        "frame_jitter" => stream::frame_jitter(ctx).await,
        "throughput" => stream::throughput(ctx).await,
        "latency_percentiles" => fal::latency_percentiles(ctx).await,
        "cold_start" => cold_start::run(ctx).await,
        "frame_consistency" => integrity::frame_consistency(ctx).await,
        "rapid_messages" => integrity::rapid_messages(ctx).await,
        "long_session" => long_session::run(ctx).await,
        "barge_in" => barge_in::run(ctx).await,
        "floor_writer" => floor_writer::run(ctx).await,
        "scale" => scale::run(ctx).await,
        "soak" => soak::run(ctx).await,
        "tls" => tls::run(ctx).await,
        "chaos" => chaos::run(ctx).await,
        other => Err(anyhow::anyhow!("no scenario named {other}")),
    };
    let mut r = res.unwrap_or_else(|e| {
        let mut r = ScenarioReport::new(name, "");
        r.status = Status::Error(format!("{e:#}"));
        r
    });
    r.wall_s = t0.elapsed().as_secs_f64();
    r.generator_cpu_percent = cpu.percent();
    r.host_steal_percent = CpuTicks::now()
        .zip(ticks)
        .and_then(|(b, a)| b.steal_percent_since(&a));
    r
}

/// A deadline `d` from now.
pub fn deadline(d: Duration) -> Deadline {
    Deadline::now() + d
}

/// Opens a session (connect + handshake + `session_start`) within [`CONNECT_TIMEOUT`].
pub async fn open(url: &WsUrl) -> Result<Conn> {
    Ok(Conn::open(url, deadline(CONNECT_TIMEOUT)).await?.0)
}

/// The waits used by scenarios: first frame 10 s; silence ends an utterance without a marker
/// after 1 s on a foreign target, while our own server always sends markers, so there silence
/// is a stall to wait out (10 s).
pub fn waits(ctx: &Ctx) -> Waits {
    Waits {
        first_frame: Duration::from_secs(10),
        end_gap: if ctx.sut.spawned() {
            Duration::from_secs(10)
        } else {
            Duration::from_secs(1)
        },
        max_total: Duration::from_secs(120),
    }
}

/// Plays `n` utterances of `chunks` one after another on `conn`, adding each to `agg`.
pub async fn sequential(
    conn: &mut Conn,
    n: u32,
    chunks: u32,
    waits: Waits,
    agg: &mut Agg,
) -> Result<()> {
    let text = utterance::chunks(chunks);
    for _ in 0..n {
        let t = utterance::play(conn, &text, waits).await?;
        agg.add(&t, Some(chunks * utterance::FRAMES_PER_CHUNK));
    }
    Ok(())
}

/// The setup line: what ran, in which format and pacing, on which audio source.
pub fn setup(ctx: &Ctx, what: &str, format: &str) -> String {
    format!(
        "{what} · {format} · realtime pacing · {}",
        ctx.sut.mock_desc()
    )
}

/// FAL rows: p50, p95 (seed target), p99 (our target), max, and p99 / floor p99 (≤ 5×).
pub fn fal_rows(
    r: &mut ScenarioReport,
    fal: &Hist,
    floor: Option<&Summary>,
    seed_p95_ms: Option<f64>,
    ours_p99_ms: Option<f64>,
) {
    let s = fal.summary();
    r.row(Row::new("FAL p50", s.p50_ms, Unit::Ms, None, None));
    r.row(Row::new(
        "FAL p95",
        s.p95_ms,
        Unit::Ms,
        seed_p95_ms.and_then(Target::lt),
        None,
    ));
    r.row(Row::new(
        "FAL p99",
        s.p99_ms,
        Unit::Ms,
        None,
        ours_p99_ms.and_then(Target::lt),
    ));
    r.row(Row::new("FAL max", s.max_ms, Unit::Ms, None, None));
    floor_ratio_row(r, "FAL p99 / floor p99", s.p99_ms, floor);
    r.put("fal", &s);
}

/// The `x / floor p99` row with our ≤ 5× target.
pub fn floor_ratio_row(
    r: &mut ScenarioReport,
    metric: &str,
    v: Option<f64>,
    floor: Option<&Summary>,
) {
    let ratio = match (v, floor.and_then(|f| f.p99_ms)) {
        (Some(v), Some(f)) if f > 0.0 => Some(v / f),
        _ => None,
    };
    r.row(Row::new(metric, ratio, Unit::Ratio, None, Target::le(5.0)));
    r.put("fal_p99_over_floor_p99", ratio);
}

/// Jitter rows: p50, p95 (seed < 5 ms), p99 (ours), max, late frames.
pub fn jitter_rows(r: &mut ScenarioReport, agg: &Agg, ours_p99_ms: Option<f64>) {
    let s = agg.jitter.summary();
    r.row(Row::new("jitter p50", s.p50_ms, Unit::Ms, None, None));
    r.row(Row::new(
        "jitter p95",
        s.p95_ms,
        Unit::Ms,
        Target::lt(5.0),
        None,
    ));
    r.row(Row::new(
        "jitter p99",
        s.p99_ms,
        Unit::Ms,
        None,
        ours_p99_ms.and_then(Target::lt),
    ));
    r.row(Row::new("jitter max", s.max_ms, Unit::Ms, None, None));
    r.row(Row::new(
        "late frames (> 20 ms behind slot)",
        Some(agg.late as f64),
        Unit::Count,
        None,
        None,
    ));
    r.put("jitter", &s);
    r.put("late_frames", agg.late);
}

/// Marks `r` unsupported when a foreign target sends no end markers, which scenarios with
/// queued utterances need to tell them apart; returns whether it did.
pub fn unsupported_without_markers(r: &mut ScenarioReport, ctx: &Ctx, agg: &Agg) -> bool {
    if ctx.sut.spawned() || agg.target_has_markers() {
        return false;
    }
    r.status = Status::Unsupported(
        "the target sends no end marker, which this scenario needs to tell queued utterances \
         apart"
            .into(),
    );
    true
}

/// Copies an aggregate's correctness problems into the report, and the end-marker verdict.
///
/// A server we started must send end markers; a foreign target that never does gets a note.
pub fn check(r: &mut ScenarioReport, ctx: &Ctx, agg: &Agg) {
    let required = ctx.sut.spawned();
    r.problems.extend(agg.problems(required));
    if !required && !agg.target_has_markers() {
        r.notes.push(
            "end marker: unsupported by the target (utterances ended after 1 s of silence)"
                .to_string(),
        );
    }
    if !agg.samples.is_empty() && !r.problems.is_empty() {
        r.notes
            .extend(agg.samples.iter().map(|s| format!("example: {s}")));
    }
    r.put("utterances", agg.utterances);
    r.put("frames", agg.frames);
    r.put("frames_missing", agg.missing);
    r.put("frames_repeated", agg.duplicates);
    r.put("end_markers", agg.markers);
    r.put("utterances_without_marker", agg.no_marker);
    r.put("errors", agg.errors);
}

/// Frames-lost rows with seed and our targets of zero.
pub fn loss_rows(r: &mut ScenarioReport, agg: &Agg) {
    r.row(Row::new(
        "frames missing or repeated",
        Some((agg.missing + agg.duplicates) as f64),
        Unit::Count,
        Target::le(0.0),
        Target::le(0.0),
    ));
}
