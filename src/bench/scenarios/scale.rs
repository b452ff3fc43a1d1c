//! The scale sweep: N concurrent sessions, each streaming continuously (a new text as soon as
//! the previous utterance ends), for N = 1, 10, 100, 1000, 2000 and up to `--max-sessions`.
//!
//! Per step: connect all N (bounded handshake concurrency), measure the orchestrator idle with
//! N sessions, start streaming with the starts spread over 1 s, let it settle for 1 s, then
//! record every utterance whose text is sent inside the measurement window, sampling the
//! orchestrator's, the worker's and our own CPU and RSS at the window's edges.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::sync::Semaphore;

use super::{open, waits, Ctx, ZERO_INTERVAL_MS};
use crate::bench::client::{Conn, WsUrl};
use crate::bench::procfs::{cpu_percent, CpuTicks, SelfCpu};
use crate::bench::report::{Row, ScenarioReport, Target, Unit};
use crate::bench::server_metrics::{self, Bound, Scrape};
use crate::bench::stats::Hist;
use crate::bench::utterance::{self, Agg, End, Waits, FRAMES_PER_CHUNK};
use crate::bench::WireFormat;

/// Longest wait for the orchestrator's `/metrics`.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// Handshakes in flight at once while connecting a step's sessions.
const CONNECT_PARALLEL: usize = 128;
/// Start spread and settling time before the window (halved with `--quick`).
const STAGGER: Duration = Duration::from_secs(1);
const SETTLE: Duration = Duration::from_secs(1);

/// The sweep's session counts.
pub fn steps(max_sessions: u32, quick: bool) -> Vec<u32> {
    if quick {
        return [1, 10, 100]
            .into_iter()
            .filter(|&n| n <= max_sessions.max(1))
            .collect();
    }
    let mut v: Vec<u32> = [1, 10, 100, 1000, 2000]
        .into_iter()
        .filter(|&n| n <= max_sessions)
        .collect();
    let mut n = 4000;
    while n < max_sessions {
        v.push(n);
        n = n.saturating_mul(2);
    }
    if max_sessions > 0 && v.last() != Some(&max_sessions) {
        v.push(max_sessions);
    }
    v
}

/// Our FAL p99 target at N sessions (ms).
fn ours_fal_p99(n: u32) -> Option<f64> {
    match n {
        1 => Some(1.0),
        2..=10 => Some(2.0),
        11..=100 => Some(3.0),
        101..=1000 => Some(10.0),
        _ => None,
    }
}

/// The seed's FAL p95 target at N sessions (it defines 1, 3 and 10).
fn seed_fal_p95(n: u32) -> Option<f64> {
    match n {
        1 => Some(300.0),
        2..=3 => Some(400.0),
        4..=10 => Some(600.0),
        _ => None,
    }
}

/// Our jitter p99 target: < 0.5 ms alone, < 2 ms with company (1000, 2000+ sessions).
fn ours_jitter_p99(n: u32) -> f64 {
    if n == 1 {
        0.5
    } else {
        2.0
    }
}

/// What one step measured.
#[derive(Default)]
pub(super) struct Step {
    pub(super) n: u32,
    pub(super) connected: u32,
    pub(super) connect_errors: u64,
    pub(super) connect: Hist,
    pub(super) agg: Agg,
    pub(super) task_errors: Vec<String>,
    pub(super) window_s: f64,
    /// Host steal during the window (% of the CPU time the VM wanted).
    pub(super) steal: Option<f64>,
    pub(super) orch_cpu: Option<f64>,
    pub(super) worker_cpu: Option<f64>,
    pub(super) gen_cpu: f64,
    pub(super) rss_idle: Option<u64>,
    pub(super) rss_stream: Option<u64>,
    /// The orchestrator's own `/metrics` at the window's start and end, if it serves them.
    pub(super) server: Option<(Scrape, Scrape)>,
}

impl Step {
    /// CPU µs per received frame of a process that used `cpu` % of a core in the window.
    pub(super) fn cpu_us_per_frame(&self, cpu: Option<f64>) -> Option<f64> {
        let frames = self.agg.frames as f64;
        (frames > 0.0).then_some(cpu? / 100.0 * self.window_s * 1e6 / frames)
    }

    pub(super) fn errors(&self) -> u64 {
        self.connect_errors + self.task_errors.len() as u64 + self.agg.problems(true).len() as u64
    }
}

async fn connect_all(url: &WsUrl, n: u32, s: &mut Step) -> Vec<Conn> {
    let sem = Arc::new(Semaphore::new(CONNECT_PARALLEL));
    let mut tasks = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let sem = sem.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await;
            let t0 = Instant::now();
            open(&url).await.map(|c| (c, t0.elapsed()))
        }));
    }
    let mut conns = Vec::with_capacity(n as usize);
    for t in tasks {
        match t.await {
            Ok(Ok((c, d))) => {
                s.connect.record(d);
                conns.push(c);
            }
            Ok(Err(e)) => {
                s.connect_errors += 1;
                s.agg.note(format!("connect: {e:#}"));
            }
            Err(e) => {
                s.connect_errors += 1;
                s.agg.note(format!("connect task: {e}"));
            }
        }
    }
    s.connected = conns.len() as u32;
    conns
}

/// One session's life in a step: stream utterances back to back, record those sent in the
/// window, stop sending at its end.
async fn stream_session(
    mut conn: Conn,
    start_at: Instant,
    window: (Instant, Instant),
    w: Waits,
    agg: Arc<Mutex<Agg>>,
) -> Result<()> {
    tokio::time::sleep_until(tokio::time::Instant::from_std(start_at)).await;
    let text = utterance::chunks(1);
    while Instant::now() < window.1 {
        let t = utterance::play(&mut conn, &text, w).await?;
        if t.sent_at >= window.0 && t.sent_at < window.1 {
            if let Ok(mut a) = agg.lock() {
                a.add(&t, Some(FRAMES_PER_CHUNK));
            }
        }
        if matches!(t.end, Some(End::Closed | End::Timeout)) {
            anyhow::bail!("session ended: {:?} after {} frames", t.end, t.frames);
        }
    }
    conn.close().await;
    Ok(())
}

/// The orchestrator a step measures: the bench's own (`scale`) or another one the scenario
/// started (`tls`).
pub(super) struct Measured {
    /// Its pid, for `/proc` CPU and RSS.
    pub pid: Option<u32>,
    /// Where it serves `/metrics`.
    pub metrics: Option<String>,
}

async fn step(ctx: &Ctx, url: &WsUrl, n: u32, secs: f64) -> Step {
    let target = Measured {
        pid: ctx.sut.pid(),
        metrics: ctx.sut.metrics_authority(),
    };
    step_on(ctx, url, n, secs, &target).await
}

/// One step against `target`: `n` sessions streaming for `secs` seconds.
pub(super) async fn step_on(ctx: &Ctx, url: &WsUrl, n: u32, secs: f64, target: &Measured) -> Step {
    let sample = || {
        target
            .pid
            .and_then(|p| crate::bench::procfs::sample(p).ok())
    };
    let mut s = Step {
        n,
        ..Step::default()
    };
    let conns = connect_all(url, n, &mut s).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.rss_idle = sample().map(|p| p.rss_kib);

    let (stagger, settle) = ctx.n((STAGGER, SETTLE), (STAGGER / 2, SETTLE / 2));
    let t0 = Instant::now();
    let win = (
        t0 + stagger + settle,
        t0 + stagger + settle + Duration::from_secs_f64(secs),
    );
    let agg = Arc::new(Mutex::new(Agg::default()));
    let count = conns.len().max(1) as u32;
    let w = waits(ctx);
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let start = t0 + stagger * (i as u32) / count;
            tokio::spawn(stream_session(c, start, win, w, agg.clone()))
        })
        .collect();
    tokio::time::sleep_until(tokio::time::Instant::from_std(win.0)).await;
    let (o0, w0, g0) = (sample(), ctx.sut.sample_worker(), SelfCpu::start());
    let ticks0 = CpuTicks::now();
    let metrics = target.metrics.clone().unwrap_or_else(|| url.authority());
    let m0 = server_metrics::scrape(&metrics, SCRAPE_TIMEOUT).await.ok();
    tokio::time::sleep_until(tokio::time::Instant::from_std(win.1)).await;
    let (o1, w1) = (sample(), ctx.sut.sample_worker());
    s.steal = CpuTicks::now()
        .zip(ticks0)
        .and_then(|(b, a)| b.steal_percent_since(&a));
    let m1 = server_metrics::scrape(&metrics, SCRAPE_TIMEOUT).await.ok();
    s.server = m0.zip(m1);
    s.gen_cpu = g0.percent();
    s.window_s = win.1.saturating_duration_since(win.0).as_secs_f64();
    if let (Some(a), Some(b)) = (o0, o1) {
        s.orch_cpu = Some(cpu_percent(&a, &b));
        s.rss_stream = Some(b.rss_kib.max(a.rss_kib));
    }
    if let (Some(a), Some(b)) = (w0, w1) {
        s.worker_cpu = Some(cpu_percent(&a, &b));
    }
    for t in tasks {
        match tokio::time::timeout(Duration::from_secs(20), t).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => s.task_errors.push(format!("{e:#}")),
            Ok(Err(e)) => s.task_errors.push(format!("session task: {e}")),
            Err(_) => s
                .task_errors
                .push("session did not finish within 20 s".into()),
        }
    }
    if let Ok(a) = agg.lock() {
        let mut merged = std::mem::take(&mut s.agg);
        merged.merge(&a);
        s.agg = merged;
    }
    // Let the server tear the sessions down before the next step measures.
    tokio::time::sleep(Duration::from_millis(300)).await;
    s
}

/// Runs the sweep.
pub async fn run(ctx: &mut Ctx) -> Result<ScenarioReport> {
    ctx.sut.prepare(ZERO_INTERVAL_MS)?;
    let steps = steps(ctx.args.max_sessions, ctx.args.quick);
    let secs = ctx.args.scale_secs.unwrap_or(ctx.n(10.0, 1.5)).max(0.5);
    let (fmt, mut url) = match ctx.args.scale_format {
        WireFormat::Binary => ("binary", ctx.sut.url()?),
        WireFormat::Json => ("json", ctx.sut.url()?),
    };
    url = url.with_query(&[("format", fmt)]);
    let mut r = ScenarioReport::new(
        "scale",
        super::setup(
            ctx,
            &format!(
                "N streaming sessions for N in {steps:?}; each sends a new text when its \
                 utterance ends; {secs} s window per step"
            ),
            fmt,
        ),
    );
    if let (Some(asked), Some(pid), Some(wpid)) = (
        ctx.sut.orchestrator_cpus(),
        ctx.sut.pid(),
        ctx.sut.worker_pid(),
    ) {
        use crate::bench::stack::cpus_of;
        r.row(Row::text(
            "--isolate: CPUs granted",
            format!(
                "orchestrator {:?} (asked {asked:?}), worker {:?}, generator {:?}",
                cpus_of(pid),
                cpus_of(wpid),
                cpus_of(0)
            ),
        ));
    }
    // The orchestrator at rest.
    let a = ctx.sut.sample();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let b = ctx.sut.sample();
    let rss_base = b.map(|p| p.rss_kib);
    match (a, b) {
        (Some(a), Some(b)) => {
            r.row(Row::new(
                "orchestrator RSS, 0 sessions",
                Some(b.rss_kib as f64),
                Unit::Kib,
                None,
                Target::lt(16.0 * 1024.0),
            ));
            r.row(Row::new(
                "orchestrator CPU, 0 sessions",
                Some(cpu_percent(&a, &b)),
                Unit::Percent,
                None,
                None,
            ));
        }
        _ => r.row(Row::text("orchestrator resources", "n/a (no pid)")),
    }
    let mut json_steps = Vec::new();
    // Every step's verdict: within capacity (jitter p99 < 2 ms, no errors) or not.
    let mut verdicts: Vec<(u32, bool)> = Vec::new();
    for &n in &steps {
        let s = step(ctx, &url, n, secs).await;
        rows(&mut r, &s, rss_base);
        floor_rows(&mut r, &s, ctx);
        verdicts.push((n, within_capacity(&s)));
        for p in s.agg.problems(ctx.sut.spawned()) {
            r.problems.push(format!("N={n}: {p}"));
        }
        if s.connect_errors > 0 {
            r.problems.push(format!(
                "N={n}: {} of {n} sessions failed to connect",
                s.connect_errors
            ));
        }
        for e in s.task_errors.iter().take(3) {
            r.problems.push(format!("N={n}: {e}"));
        }
        if s.task_errors.len() > 3 {
            r.problems.push(format!(
                "N={n}: … {} session errors in all",
                s.task_errors.len()
            ));
        }
        for e in s.agg.samples.iter().take(3) {
            r.notes.push(format!("N={n} example: {e}"));
        }
        json_steps.push(step_json(&s, rss_base));
        let broken = s.connected < n / 2;
        if broken {
            r.notes.push(format!(
                "sweep stopped at N={n}: only {} sessions connected",
                s.connected
            ));
            break;
        }
    }
    // The largest step within capacity.
    let best_ok = verdicts.iter().filter(|v| v.1).map(|v| v.0).max();
    if ctx.args.capacity_search {
        // The first step beyond capacity above the best one within (a noisy small step that
        // failed below it doesn't bound the search).
        let lo = best_ok.unwrap_or(0);
        let hi = verdicts
            .iter()
            .find(|&&(n, ok)| n > lo && !ok)
            .map(|&(n, _)| n);
        let (found, probes) = capacity_search(ctx, &url, secs, lo, hi).await;
        for (n, ok, jitter) in &probes {
            r.row(Row::text(
                format!("capacity search N={n}"),
                format!(
                    "jitter p99 {} -> {}",
                    jitter.map_or("n/a".to_string(), |j| format!("{j:.3} ms")),
                    if *ok { "within" } else { "beyond" }
                ),
            ));
        }
        r.row(Row::new(
            "capacity (bisected): most realtime sessions with jitter p99 < 2 ms, no errors",
            Some(f64::from(found)),
            Unit::Count,
            None,
            Target::ge(2000.0),
        ));
        r.put(
            "capacity_search",
            serde_json::json!({
                "capacity": found,
                "probes": probes
                    .iter()
                    .map(|(n, ok, j)| serde_json::json!({"sessions": n, "within": ok, "jitter_p99_ms": j}))
                    .collect::<Vec<_>>(),
            }),
        );
    }
    if steps.iter().any(|&n| n >= 2000) {
        r.row(Row::new(
            "most realtime sessions with jitter p99 < 2 ms, no errors",
            Some(f64::from(best_ok.unwrap_or(0))),
            Unit::Count,
            None,
            Target::ge(2000.0),
        ));
    }
    r.put("steps", json_steps);
    r.put("format", fmt);
    r.put("window_s", secs);
    Ok(r)
}

/// A step within capacity: jitter p99 < 2 ms and no errors (the sweep's capacity criterion).
fn within_capacity(s: &Step) -> bool {
    s.agg.jitter.quantile_ms(0.99).is_some_and(|j| j < 2.0) && s.errors() == 0
}

/// The next probe between `lo` (within capacity) and `hi` (beyond), or `None` once they are
/// within 1/8 of `lo` (or 10 sessions) of each other.
fn next_probe(lo: u32, hi: u32) -> Option<u32> {
    let resolution = (lo / 8).max(10);
    (hi > lo && hi - lo > resolution).then(|| lo + (hi - lo) / 2)
}

/// Bisects between `lo`, the sweep's largest step within capacity, and `hi`, its first step
/// beyond it above `lo` (see `--capacity-search`); returns the largest count found within,
/// and every probe made `(sessions, within, jitter p99 ms)`.
async fn capacity_search(
    ctx: &Ctx,
    url: &WsUrl,
    secs: f64,
    mut lo: u32,
    hi: Option<u32>,
) -> (u32, Vec<(u32, bool, Option<f64>)>) {
    let mut probes = Vec::new();
    let Some(mut hi) = hi else {
        // No step above the best one failed: nothing to bisect.
        return (lo, probes);
    };
    while let Some(n) = next_probe(lo, hi) {
        let s = step(ctx, url, n, secs).await;
        let ok = within_capacity(&s);
        probes.push((n, ok, s.agg.jitter.quantile_ms(0.99)));
        if ok {
            lo = n;
        } else {
            hi = n;
        }
    }
    (lo, probes)
}

fn per_session(total: Option<u64>, base: Option<u64>, n: u32) -> Option<f64> {
    let (t, b) = (total?, base?);
    Some((t as f64 - b as f64).max(0.0) / f64::from(n.max(1)))
}

fn rows(r: &mut ScenarioReport, s: &Step, rss_base: Option<u64>) {
    let n = s.n;
    let p = |m: &str| format!("N={n} {m}");
    let f = s.agg.fal.summary();
    let j = s.agg.jitter.summary();
    r.row(Row::new(p("FAL p50"), f.p50_ms, Unit::Ms, None, None));
    r.row(Row::new(
        p("FAL p95"),
        f.p95_ms,
        Unit::Ms,
        seed_fal_p95(n).and_then(Target::lt),
        None,
    ));
    r.row(Row::new(
        p("FAL p99"),
        f.p99_ms,
        Unit::Ms,
        None,
        ours_fal_p99(n).and_then(Target::lt),
    ));
    r.row(Row::new(p("FAL max"), f.max_ms, Unit::Ms, None, None));
    r.row(Row::new(p("jitter p50"), j.p50_ms, Unit::Ms, None, None));
    r.row(Row::new(
        p("jitter p95"),
        j.p95_ms,
        Unit::Ms,
        Target::lt(5.0),
        None,
    ));
    r.row(Row::new(
        p("jitter p99"),
        j.p99_ms,
        Unit::Ms,
        None,
        Target::lt(ours_jitter_p99(n)),
    ));
    r.row(Row::new(p("jitter max"), j.max_ms, Unit::Ms, None, None));
    r.row(Row::new(
        p("late frames"),
        Some(s.agg.late as f64),
        Unit::Count,
        None,
        None,
    ));
    if let Some((a, b)) = &s.server {
        for (label, name, q) in [
            ("server-side FAL p99", "first_audio_latency_seconds", 0.99),
            (
                "server-side frame lateness p50",
                "frame_lateness_seconds",
                0.5,
            ),
            (
                "server-side frame lateness p99",
                "frame_lateness_seconds",
                0.99,
            ),
        ] {
            r.row(bound_row(p(label), b.delta_quantile(a, name, q)));
        }
    }
    r.row(Row::new(
        p("errors"),
        Some(s.errors() as f64),
        Unit::Count,
        None,
        Target::le(0.0),
    ));
    r.row(Row::new(
        p("orchestrator CPU"),
        s.orch_cpu,
        Unit::Percent,
        None,
        None,
    ));
    r.row(Row::new(
        p("RSS per idle session"),
        per_session(s.rss_idle, rss_base, n),
        Unit::Kib,
        None,
        Target::le(64.0),
    ));
    r.row(Row::new(
        p("RSS per streaming session"),
        per_session(s.rss_stream, rss_base, n),
        Unit::Kib,
        None,
        Target::le(256.0),
    ));
    r.row(Row::new(
        p("generator CPU"),
        Some(s.gen_cpu),
        Unit::Percent,
        None,
        None,
    ));
    r.row(Row::new(
        p("worker CPU"),
        s.worker_cpu,
        Unit::Percent,
        None,
        None,
    ));
    // CPU per frame of each process: what says whether a session count fits the machine at
    // all (two cores = 2,000,000 µs of CPU per second, and N sessions are 50 N frames/s).
    let per_frame = |cpu: Option<f64>| s.cpu_us_per_frame(cpu);
    let (o, w, g) = (
        per_frame(s.orch_cpu),
        per_frame(s.worker_cpu),
        per_frame(Some(s.gen_cpu)),
    );
    for (label, v) in [
        ("orchestrator CPU per frame", o),
        ("worker CPU per frame", w),
        ("generator CPU per frame", g),
    ] {
        r.row(Row::new(p(label), v, Unit::Us, None, None));
    }
    let cores_per_1000 = match (o, w, g) {
        (Some(o), Some(w), Some(g)) => Some((o + w + g) * 50_000.0 / 1e6),
        _ => None,
    };
    r.row(Row::new(
        p("host steal, % of the CPU time the VM wanted"),
        s.steal,
        Unit::Percent,
        None,
        None,
    ));
    r.row(Row::new(
        p("cores all three need per 1000 sessions at this cost"),
        cores_per_1000,
        Unit::Count,
        None,
        None,
    ));
}

/// A row for a bucket-resolution percentile of the server's own histograms.
/// The orchestrator's CPU per frame as a multiple of the paced-writer floors measured in this
/// run (`floor_writer`), when they were: goal ≤ 1.5× the forwarder's floor from 1000 sessions.
fn floor_rows(r: &mut ScenarioReport, s: &Step, ctx: &Ctx) {
    let Some(f) = ctx.floor_cpu.iter().find(|f| f.sessions == s.n) else {
        return;
    };
    let ours = s.cpu_us_per_frame(s.orch_cpu);
    let ratio = |floor: Option<f64>| ours.zip(floor).and_then(|(o, f)| (f > 0.0).then(|| o / f));
    r.row(Row::new(
        format!("N={} orchestrator CPU per frame / writer floor", s.n),
        ratio(f.writer_us),
        Unit::Ratio,
        None,
        None,
    ));
    r.row(Row::new(
        format!("N={} orchestrator CPU per frame / forwarder floor", s.n),
        ratio(f.forwarder_us),
        Unit::Ratio,
        None,
        if s.n >= 1000 { Target::le(1.5) } else { None },
    ));
}

fn bound_row(metric: String, b: Option<Bound>) -> Row {
    match b {
        Some(Bound::AtMost(x)) => Row {
            text: Some("bucket bound".into()),
            ..Row::new(metric, Some(x * 1e3), Unit::Ms, None, None)
        },
        Some(Bound::Above(x)) => Row::text(metric, format!("> {} ms", x * 1e3)),
        None => Row::text(metric, "n/a"),
    }
}

fn bound_json(b: Option<Bound>) -> serde_json::Value {
    match b {
        Some(Bound::AtMost(x)) => serde_json::json!({ "le_ms": x * 1e3 }),
        Some(Bound::Above(x)) => serde_json::json!({ "above_ms": x * 1e3 }),
        None => serde_json::Value::Null,
    }
}

fn server_json(s: &Step) -> serde_json::Value {
    let Some((a, b)) = &s.server else {
        return serde_json::Value::Null;
    };
    serde_json::json!({
        "fal_p50": bound_json(b.delta_quantile(a, "first_audio_latency_seconds", 0.5)),
        "fal_p99": bound_json(b.delta_quantile(a, "first_audio_latency_seconds", 0.99)),
        "frame_lateness_p50": bound_json(b.delta_quantile(a, "frame_lateness_seconds", 0.5)),
        "frame_lateness_p99": bound_json(b.delta_quantile(a, "frame_lateness_seconds", 0.99)),
        "frames_sent": b.delta_value(a, "frames_sent_total"),
        "frame_underruns": b.delta_value(a, "frame_underruns_total"),
    })
}

fn step_json(s: &Step, rss_base: Option<u64>) -> serde_json::Value {
    let secs = s.window_s.max(1e-9);
    serde_json::json!({
        "sessions": s.n,
        "connected": s.connected,
        "connect_errors": s.connect_errors,
        "connect": s.connect.summary(),
        "fal": s.agg.fal.summary(),
        "jitter": s.agg.jitter.summary(),
        "late_frames": s.agg.late,
        "utterances": s.agg.utterances,
        "frames": s.agg.frames,
        "frames_per_s": s.agg.frames as f64 / secs,
        "errors": s.errors(),
        "error_examples": s.task_errors.iter().chain(&s.agg.samples).take(5).collect::<Vec<_>>(),
        "window_s": s.window_s,
        "orchestrator_cpu_percent": s.orch_cpu,
        "worker_cpu_percent": s.worker_cpu,
        "host_steal_percent": s.steal,
        "generator_cpu_percent": s.gen_cpu,
        // The generator's own cost per audio frame received (CPU µs): what bounds it at scale.
        "generator_cpu_us_per_frame": if s.agg.frames > 0 {
            Some(s.gen_cpu / 100.0 * secs * 1e6 / (s.agg.frames as f64))
        } else {
            None
        },
        "orchestrator_rss_kib_base": rss_base,
        "orchestrator_rss_kib_idle": s.rss_idle,
        "orchestrator_rss_kib_streaming": s.rss_stream,
        "rss_kib_per_idle_session": per_session(s.rss_idle, rss_base, s.n),
        "rss_kib_per_streaming_session": per_session(s.rss_stream, rss_base, s.n),
        "server_metrics": server_json(s),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_capacity_bisection_narrows_to_an_eighth_of_the_lower_bound() {
        // Capacity 640 between a sweep that passed 100 and failed 1000.
        let capacity = 640;
        let (mut lo, mut hi) = (100, 1000);
        let mut probes = 0;
        while let Some(n) = next_probe(lo, hi) {
            probes += 1;
            if n <= capacity {
                lo = n;
            } else {
                hi = n;
            }
        }
        assert!(lo <= capacity && capacity < hi, "{lo}..{hi}");
        assert!(hi - lo <= (lo / 8).max(10), "{lo}..{hi}");
        assert!(probes <= 6, "{probes} probes");
        assert_eq!(next_probe(100, 105), None, "close enough");
        assert_eq!(
            next_probe(500, 400),
            None,
            "an inverted range ends the search"
        );
    }

    #[test]
    fn sweep_steps() {
        assert_eq!(steps(2000, false), vec![1, 10, 100, 1000, 2000]);
        assert_eq!(steps(500, false), vec![1, 10, 100, 500]);
        assert_eq!(steps(5000, false), vec![1, 10, 100, 1000, 2000, 4000, 5000]);
        assert_eq!(steps(8000, false), vec![1, 10, 100, 1000, 2000, 4000, 8000]);
        assert_eq!(steps(2000, true), vec![1, 10, 100]);
        assert_eq!(steps(5, true), vec![1]);
    }

    #[test]
    fn targets_by_session_count() {
        assert_eq!(ours_fal_p99(1), Some(1.0));
        assert_eq!(ours_fal_p99(100), Some(3.0));
        assert_eq!(ours_fal_p99(1000), Some(10.0));
        assert_eq!(ours_fal_p99(2000), None);
        assert_eq!(seed_fal_p95(10), Some(600.0));
        assert_eq!(ours_jitter_p99(1), 0.5);
        assert_eq!(ours_jitter_p99(2000), 2.0);
    }

    #[test]
    fn per_session_memory() {
        assert_eq!(per_session(Some(2048), Some(1024), 16), Some(64.0));
        assert_eq!(per_session(Some(1000), Some(1024), 16), Some(0.0));
        assert_eq!(per_session(None, Some(1), 1), None);
    }
}
