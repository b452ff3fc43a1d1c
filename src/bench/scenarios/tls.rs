//! TLS against plain TCP, in one run (`duplex bench --tls`, or `--only tls`): two fresh
//! orchestrators with the same flags against the same worker, one with `--tls-cert`, measured
//! side by side so the difference is TLS and nothing else.
//!
//! - **FAL:** one session on each, utterances alternating between them (drift and noise hit
//!   both alike); the figure is the p50 difference (goal < 0.2 ms).
//! - **CPU per frame:** N sessions streaming back to back on each in turn, the orchestrator's
//!   CPU over the window divided by the frames its clients received (goal TLS ≤ 1.5× plain).

use anyhow::{anyhow, Context as _, Result};

use super::scale::{step_on, Measured};
use super::{open, waits, Ctx, ZERO_INTERVAL_MS};
use crate::bench::client::{TlsTrust, WsUrl};
use crate::bench::report::{Row, ScenarioReport, Target, Unit};
use crate::bench::utterance::{self, Agg, FRAMES_PER_CHUNK};

/// Runs the comparison (spawned mode only: it starts its own orchestrators).
pub async fn run(ctx: &mut Ctx) -> Result<ScenarioReport> {
    ctx.sut.prepare(ZERO_INTERVAL_MS)?;
    let utterances = ctx.n(100, 10);
    let sessions = ctx.n(200, 20);
    let secs = ctx.n(5.0, 1.0);
    let mut r = ScenarioReport::new(
        "tls",
        super::setup(
            ctx,
            &format!(
                "plain vs TLS orchestrator on one worker: 1 session × {utterances} alternating \
                 utterances each; then {sessions} streaming sessions for {secs} s on each"
            ),
            "json (FAL), binary (CPU)",
        ),
    );
    let dir = ctx
        .sut
        .log_dir()
        .ok_or_else(|| anyhow!("the tls scenario starts its own orchestrators (no --url)"))?
        .to_path_buf();
    let (cert, key) =
        crate::gateway::tls::self_signed(&["127.0.0.1".to_string(), "localhost".to_string()])?;
    let cert_path = dir.join("tls-cert.pem");
    let key_path = dir.join("tls-key.pem");
    std::fs::write(&cert_path, cert).context("writing the bench certificate")?;
    std::fs::write(&key_path, key).context("writing the bench key")?;
    let trust = TlsTrust(crate::client::tls_config(&cert_path)?);

    let spawn = |extra: Vec<String>| {
        ctx.sut
            .spawn_serve_with(&extra)
            .ok_or_else(|| anyhow!("no running stack"))?
    };
    let (plain, plain_metrics) = spawn(Vec::new())?;
    let (tls, tls_metrics) = spawn(vec![
        "--tls-cert".into(),
        cert_path.display().to_string(),
        "--tls-key".into(),
        key_path.display().to_string(),
    ])?;
    let plain_url = WsUrl::parse(&format!("ws://{}/", plain.addr))?;
    let tls_url = WsUrl::parse(&format!("ws://{}/", tls.addr))?.with_tls(trust);

    // FAL, alternating.
    let w = waits(ctx);
    let text = utterance::chunks(1);
    let (mut a, mut b) = (Agg::default(), Agg::default());
    let mut pc = open(&plain_url).await?;
    let mut tc = open(&tls_url).await?;
    for _ in 0..utterances {
        let t = utterance::play(&mut pc, &text, w).await?;
        a.add(&t, Some(FRAMES_PER_CHUNK));
        let t = utterance::play(&mut tc, &text, w).await?;
        b.add(&t, Some(FRAMES_PER_CHUNK));
    }
    pc.close().await;
    tc.close().await;
    let (pa, pb) = (a.fal.summary(), b.fal.summary());
    r.row(Row::new("FAL p50, plain", pa.p50_ms, Unit::Ms, None, None));
    r.row(Row::new("FAL p50, TLS", pb.p50_ms, Unit::Ms, None, None));
    let delta = pa.p50_ms.zip(pb.p50_ms).map(|(x, y)| y - x);
    r.row(Row::new(
        "FAL p50, TLS − plain",
        delta,
        Unit::Ms,
        None,
        Target::lt(0.2),
    ));
    r.row(Row::new("FAL p99, plain", pa.p99_ms, Unit::Ms, None, None));
    r.row(Row::new("FAL p99, TLS", pb.p99_ms, Unit::Ms, None, None));

    // CPU per frame, one after the other (each measured alone).
    let binary = [("format", "binary")];
    let sp = step_on(
        ctx,
        &plain_url.with_query(&binary),
        sessions,
        secs,
        &Measured {
            pid: Some(plain.pid),
            metrics: Some(plain_metrics),
        },
    )
    .await;
    let st = step_on(
        ctx,
        &tls_url.with_query(&binary),
        sessions,
        secs,
        &Measured {
            pid: Some(tls.pid),
            metrics: Some(tls_metrics),
        },
    )
    .await;
    let (cp, ct) = (
        sp.cpu_us_per_frame(sp.orch_cpu),
        st.cpu_us_per_frame(st.orch_cpu),
    );
    r.row(Row::new(
        format!("orchestrator CPU per frame, plain, {sessions} sessions"),
        cp,
        Unit::Us,
        None,
        None,
    ));
    r.row(Row::new(
        format!("orchestrator CPU per frame, TLS, {sessions} sessions"),
        ct,
        Unit::Us,
        None,
        None,
    ));
    let ratio = cp.zip(ct).and_then(|(p, t)| (p > 0.0).then(|| t / p));
    r.row(Row::new(
        "CPU per frame, TLS / plain",
        ratio,
        Unit::Ratio,
        None,
        Target::le(1.5),
    ));
    r.row(Row::new(
        "connect + handshake p50, plain",
        sp.connect.quantile_ms(0.5),
        Unit::Ms,
        None,
        None,
    ));
    r.row(Row::new(
        "connect + handshake p50, TLS",
        st.connect.quantile_ms(0.5),
        Unit::Ms,
        None,
        None,
    ));
    r.row(Row::new(
        "jitter p99, plain streaming",
        sp.agg.jitter.quantile_ms(0.99),
        Unit::Ms,
        None,
        None,
    ));
    r.row(Row::new(
        "jitter p99, TLS streaming",
        st.agg.jitter.quantile_ms(0.99),
        Unit::Ms,
        None,
        None,
    ));
    let errors =
        sp.errors() + st.errors() + a.problems(true).len() as u64 + b.problems(true).len() as u64;
    r.row(Row::new(
        "errors",
        Some(errors as f64),
        Unit::Count,
        None,
        Target::le(0.0),
    ));
    super::check(&mut r, ctx, &b);
    r.put("fal_plain", &pa);
    r.put("fal_tls", &pb);
    r.put("cpu_us_per_frame_plain", cp);
    r.put("cpu_us_per_frame_tls", ct);
    r.put("cpu_ratio", ratio);
    drop((plain, tls));
    Ok(r)
}
