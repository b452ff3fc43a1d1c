//! The CPU floor of a paced writer and of a paced forwarder, at the scale sweep's session
//! counts, measured in the same run as `scale` (which then prints its orchestrator CPU per
//! frame as a ratio to them). See [`crate::bench::floor_writer`] for what the floor process
//! does and doesn't do.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::Ctx;
use crate::bench::floor_writer::{FRAME, PERIOD};
use crate::bench::procfs::{cpu_percent, sample};
use crate::bench::report::{Row, ScenarioReport, Unit};
use crate::bench::stack::{free_port, Proc};

/// One floor figure: `sessions` connections, CPU µs per frame of the writer and the forwarder.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct FloorCpu {
    pub sessions: u32,
    pub writer_us: Option<f64>,
    pub forwarder_us: Option<f64>,
}

/// Runs both floors at every step of the sweep.
pub async fn run(ctx: &mut Ctx) -> Result<ScenarioReport> {
    let steps: Vec<u32> = super::scale::steps(ctx.args.max_sessions, ctx.args.quick)
        .into_iter()
        .filter(|&n| n >= 10)
        .collect();
    let secs = ctx.args.scale_secs.unwrap_or(ctx.n(10.0, 1.5)).max(0.5);
    let mut r = ScenarioReport::new(
        "floor_writer",
        format!(
            "our paced writer alone (io_uring, timerfd pacer, one write per 1,932-byte frame \
             every 20 ms per TCP connection) and the forwarder (the same, each frame read from \
             one upstream TCP stream first), N in {steps:?}, {secs} s window"
        ),
    );
    let mut out: Vec<FloorCpu> = Vec::new();
    for &n in &steps {
        let writer = measure(ctx, n, secs, false).await?;
        let forwarder = measure(ctx, n, secs, true).await?;
        r.row(Row::new(
            format!("N={n} writer floor CPU per frame"),
            writer,
            Unit::Us,
            None,
            None,
        ));
        r.row(Row::new(
            format!("N={n} forwarder floor CPU per frame"),
            forwarder,
            Unit::Us,
            None,
            None,
        ));
        out.push(FloorCpu {
            sessions: n,
            writer_us: writer,
            forwarder_us: forwarder,
        });
    }
    r.put("floors", &out);
    ctx.floor_cpu = out;
    Ok(r)
}

/// One floor process with `n` readers: its CPU µs per frame the readers received.
async fn measure(ctx: &Ctx, n: u32, secs: f64, forward: bool) -> Result<Option<f64>> {
    let bin = ctx
        .sut
        .bin()
        .ok_or_else(|| anyhow!("the floor needs the duplex binary (not with --url)"))?
        .to_path_buf();
    let log_dir = ctx
        .sut
        .log_dir()
        .map(|d| d.to_path_buf())
        .unwrap_or_default();
    let port = free_port()?;
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let mut args = vec![
        "floor-writer".to_string(),
        "--listen".into(),
        addr.to_string(),
    ];
    // The forwarder's upstream: we listen, it connects, we feed n frames per period.
    let mut feeder = None;
    if forward {
        let up = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("upstream listener")?;
        args.push("--upstream".into());
        args.push(up.local_addr()?.to_string());
        feeder = Some(tokio::spawn(feed(up, n)));
    }
    let log = log_dir.join(format!("floor-writer-{port}.log"));
    let pin = ctx.sut.orchestrator_cpus();
    let proc = tokio::task::block_in_place(|| {
        Proc::spawn_pinned("floor-writer", &bin, &args, addr, log, pin.as_deref())
    })?;
    let bytes = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .context("connect to the floor writer")?;
        let bytes = bytes.clone();
        readers.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(k) = s.read(&mut buf).await {
                if k == 0 {
                    break;
                }
                bytes.fetch_add(k as u64, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (a, b0) = (sample(proc.pid).ok(), bytes.load(Ordering::Relaxed));
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let (b, b1) = (sample(proc.pid).ok(), bytes.load(Ordering::Relaxed));
    for t in readers {
        t.abort();
    }
    if let Some(f) = feeder {
        f.abort();
    }
    drop(proc);
    let frames = (b1 - b0) as f64 / FRAME as f64;
    Ok(match (a, b) {
        (Some(a), Some(b)) if frames > 0.0 => {
            Some(cpu_percent(&a, &b) / 100.0 * secs * 1e6 / frames)
        }
        _ => None,
    })
}

/// Accepts the floor writer's upstream connection and writes `n` frames per period, paced in
/// 10 ms steps.
async fn feed(listener: tokio::net::TcpListener, n: u32) {
    let Ok((mut s, _)) = listener.accept().await else {
        return;
    };
    let _ = s.set_nodelay(true);
    let per_tick = (n as usize).div_ceil(2); // 10 ms = half a period
    let chunk = vec![0u8; FRAME * per_tick];
    let mut tick = tokio::time::interval(PERIOD / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    loop {
        tick.tick().await;
        if s.write_all(&chunk).await.is_err() {
            return;
        }
    }
}
