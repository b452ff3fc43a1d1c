//! The floor: the same client's round trip to a trivial WebSocket server on this machine, in
//! this run. Every FAL figure is also reported as a multiple of it.

use anyhow::{bail, Result};

use super::{deadline, open, Ctx, CONNECT_TIMEOUT};
use crate::bench::client::{EventKind, WsUrl};
use crate::bench::floor::EchoServer;
use crate::bench::report::{Row, ScenarioReport, Unit};
use crate::bench::stats::Hist;

/// Measures text sent → audio frame received against [`EchoServer`].
pub async fn run(ctx: &mut Ctx) -> Result<ScenarioReport> {
    let n = ctx.n(500, 50);
    let srv = EchoServer::start()?;
    let mut r = ScenarioReport::new(
        "floor",
        format!(
            "1 session × {n} round trips to an in-process WebSocket server that answers each \
             text with one pre-built JSON audio frame"
        ),
    );
    let url = WsUrl::parse(&format!("ws://{}/", srv.addr))?;
    let mut conn = open(&url).await?;
    let mut h = Hist::new();
    for _ in 0..n {
        let sent = conn.send_text("floor", true).await?;
        match conn.next_event(deadline(CONNECT_TIMEOUT)).await? {
            Some(ev) if matches!(ev.kind, EventKind::Audio { .. }) => {
                h.record(ev.at.saturating_duration_since(sent));
            }
            other => bail!("floor server answered {other:?}"),
        }
    }
    conn.close().await;
    let s = h.summary();
    for (label, v) in [
        ("round trip p50", s.p50_ms),
        ("round trip p95", s.p95_ms),
        ("round trip p99", s.p99_ms),
        ("round trip max", s.max_ms),
    ] {
        r.row(Row::new(label, v, Unit::Ms, None, None));
    }
    r.put("rtt", &s);
    Ok(r)
}
