//! `chaos`: faults in turn against a real deployment on loopback (a `redis-server`, two workers
//! registered in it, one orchestrator discovering them there), while a canary session speaks
//! back to back and a background of sessions keeps talking.
//!
//! Why its own processes instead of the bench's stack: the faults kill, stop and restart them,
//! and discovery through Redis is part of what is tested. Faults, in order: worker `kill -9`
//! (then restarted), worker SIGSTOP (then SIGCONT), Redis stop + start with its data, Redis
//! restarted empty, an orchestrator rolling restart (`--takeover` + SIGTERM; clients whose
//! session ends reconnect), a mass connect and a mass disconnect (every extra session closing
//! at once while the canary streams).
//!
//! Per fault: utterances started / completed / failed (expected: `SYNTHESIS_FAILED` + end
//! marker on the faulted worker; anything else is unexpected) / lost (no end marker and no
//! error), recovery time (fault → first audio of the first utterance sent after it that
//! completes), the canary's worst inter-frame gap and, beside it, the largest bucket the
//! orchestrator's `frame_lateness_seconds` histogram filled during the fault. Not part of the
//! default run (about two minutes); `duplex bench --only chaos`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant as Deadline;

use super::super::client::{Conn, EventKind, WsUrl};
use super::super::report::{Row, ScenarioReport, Status, Target, Unit};
use super::super::server_metrics::{self, Bound, Scrape};
use super::super::stack::{free_port, Proc};
use super::super::utterance;
use super::super::Ctx;
use super::{deadline, CONNECT_TIMEOUT};

/// Silence after which an utterance counts as lost: past the orchestrator's first-frame
/// (10 s) and stall (3 s) deadlines, which end a failing utterance with an error first.
const SILENCE: Duration = Duration::from_secs(15);
/// Mock chunks per utterance (25 frames, 0.5 s of audio each).
const CHUNKS: u32 = 2;
/// The orchestrator's drain time at the rolling restart.
const DRAIN_SECS: u64 = 10;
/// Longest wait for a process, a registration or a worker to come (back).
const COME_BACK: Duration = Duration::from_secs(40);
/// Mock worker frame interval: four times faster than real time, like a real TTS model,
/// so pacing (not worker production) sets the canary's frame gaps.
const MOCK_INTERVAL_MS: &str = "5";

/// How one utterance ended, as the client saw it.
#[derive(Clone, Debug, PartialEq)]
enum Outcome {
    /// The end marker and no error.
    Completed,
    /// An `error` (code) or an `interrupted` (as `interrupted:<reason>`); `marker`: whether
    /// the end marker followed.
    Failed { code: String, marker: bool },
    /// The server ended the session (`session_end`, a drain) before any audio of it: the
    /// client sends the text again on a new connection.
    CutByDrain,
    /// No end marker and no error: what must never happen.
    Lost(String),
}

/// One utterance.
#[derive(Clone, Debug)]
struct Record {
    sent_at: Instant,
    first_at: Option<Instant>,
    /// When the outcome was known (end marker, close, give-up): utterances count in the
    /// phase they ended in, so one in flight when a fault hits counts with that fault.
    end_at: Instant,
    outcome: Outcome,
}

/// What the sessions saw, shared by their tasks.
#[derive(Default)]
struct Log {
    utterances: Mutex<Vec<Record>>,
    /// The canary's inter-frame gaps within an utterance: (arrival of the later frame, gap).
    gaps: Mutex<Vec<(Instant, Duration)>>,
    connect_failures: AtomicU64,
}

impl Log {
    fn push(&self, r: Record) {
        self.utterances
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(r);
    }
}

/// Sends one utterance on `conn` and reads it to its end. Returns what happened and whether
/// the connection is over (the caller reconnects). With `gaps`, every inter-frame gap is
/// recorded there (the canary).
async fn speak(
    conn: &mut Conn,
    chunks: &[String],
    gaps: Option<&Mutex<Vec<(Instant, Duration)>>>,
) -> (Record, bool) {
    let mut sent_at = None;
    for (i, c) in chunks.iter().enumerate() {
        match conn.send_text(c, i + 1 == chunks.len()).await {
            Ok(t) => {
                sent_at.get_or_insert(t);
            }
            Err(_) => {
                // The server closed the connection (a drain) before the text went out.
                let now = Instant::now();
                let r = Record {
                    sent_at: sent_at.unwrap_or(now),
                    first_at: None,
                    end_at: now,
                    outcome: Outcome::CutByDrain,
                };
                return (r, true);
            }
        }
    }
    let sent_at = sent_at.unwrap_or_else(Instant::now);
    let mut last_event = sent_at;
    let mut first_at = None;
    let mut prev_frame: Option<Instant> = None;
    let mut frames = 0u32;
    let mut errors: Vec<String> = Vec::new();
    let mut interrupted: Option<String> = None;
    let mut marker = false;
    let mut session_end = false;
    let mut over = false;
    let mut lost_why = String::new();
    loop {
        match conn
            .next_event(Deadline::from_std(last_event + SILENCE))
            .await
        {
            Err(e) => {
                over = true;
                last_event = Instant::now();
                lost_why = format!("read failed: {e:#}");
                break;
            }
            Ok(None) => {
                over = true;
                last_event = Instant::now();
                lost_why = format!("nothing for {SILENCE:?}");
                break;
            }
            Ok(Some(ev)) => {
                last_event = ev.at;
                match ev.kind {
                    EventKind::Audio { .. } => {
                        frames += 1;
                        first_at.get_or_insert(ev.at);
                        if let (Some(p), Some(g)) = (prev_frame, gaps) {
                            g.lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push((ev.at, ev.at.saturating_duration_since(p)));
                        }
                        prev_frame = Some(ev.at);
                    }
                    EventKind::End { .. } => {
                        marker = true;
                        break;
                    }
                    EventKind::Error { code, .. } => errors.push(code),
                    EventKind::Interrupted { reason } => interrupted = Some(reason),
                    EventKind::SessionEnd { .. } => session_end = true,
                    EventKind::Closed => {
                        over = true;
                        lost_why = format!("connection closed after {frames} frames");
                        break;
                    }
                    EventKind::Invalid { reason } => errors.push(format!("invalid: {reason}")),
                    EventKind::SessionStart { .. } | EventKind::Other { .. } => {}
                }
            }
        }
    }
    let outcome = if let Some(code) = errors.first() {
        Outcome::Failed {
            code: code.clone(),
            marker,
        }
    } else if let Some(reason) = interrupted {
        Outcome::Failed {
            code: format!("interrupted:{reason}"),
            marker,
        }
    } else if marker {
        Outcome::Completed
    } else if session_end && frames == 0 {
        Outcome::CutByDrain
    } else {
        Outcome::Lost(lost_why)
    };
    (
        Record {
            sent_at,
            first_at,
            end_at: last_event,
            outcome,
        },
        over || session_end,
    )
}

/// One talking session: utterance after utterance until `stop`, reconnecting whenever the
/// server ends the session. The canary talks back to back; the others pause 0.1–0.6 s.
async fn talker(url: WsUrl, log: Arc<Log>, stop: Arc<AtomicBool>, canary: bool) {
    let chunks = utterance::chunks(CHUNKS);
    let mut conn: Option<Conn> = None;
    while !stop.load(Ordering::Relaxed) {
        if conn.is_none() {
            match Conn::open(&url, deadline(CONNECT_TIMEOUT)).await {
                Ok((c, _, _)) => conn = Some(c),
                Err(_) => {
                    log.connect_failures.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else {
            continue;
        };
        let (record, over) = speak(c, &chunks, canary.then_some(&log.gaps)).await;
        log.push(record);
        if over {
            conn = None;
        }
        if !canary {
            let think = 100 + rand::random::<u64>() % 500;
            tokio::time::sleep(Duration::from_millis(think)).await;
        }
    }
    if let Some(c) = conn {
        c.close().await;
    }
}

/// Sends one command to Redis (RESP) and returns the first line of the answer (empty when
/// the server closed the connection, as SHUTDOWN does).
async fn redis_cmd(port: u16, args: &[&str]) -> Result<String> {
    let io = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).await?;
        let mut buf = vec![0u8; 512];
        let n = s.read(&mut buf).await.unwrap_or(0);
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf[..n]).trim().to_string())
    };
    tokio::time::timeout(Duration::from_secs(3), io)
        .await
        .map_err(|_| anyhow!("redis {args:?}: timed out"))?
        .with_context(|| format!("redis {args:?}"))
}

/// Sends `sig` to `pid` (a child we started).
fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on our own child's pid; at worst it fails with ESRCH.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Polls `check` every 50 ms until it holds or `within` passes; returns how long it took.
async fn wait_for<F, Fut>(what: &str, within: Duration, mut check: F) -> Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t0 = Instant::now();
    while !check().await {
        if t0.elapsed() > within {
            bail!("{what}: not within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(t0.elapsed())
}

/// The processes of the deployment.
struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
    redis_port: u16,
    redis: Option<Proc>,
    worker_addrs: Vec<SocketAddr>,
    workers: Vec<Option<Proc>>,
    worker_args: Vec<String>,
    ws: SocketAddr,
    admin: SocketAddr,
    serve: Option<Proc>,
    serve_args: Vec<String>,
    generation: u32,
}

impl Cluster {
    fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.redis_port)
    }

    fn start_redis(&mut self) -> Result<()> {
        let addr: SocketAddr = ([127, 0, 0, 1], self.redis_port).into();
        let args: Vec<String> = [
            "--port",
            &self.redis_port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &self.dir.to_string_lossy(),
            "--dbfilename",
            "chaos.rdb",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let log = self.dir.join(format!("redis-{}.log", self.redis_port));
        self.redis = Some(
            Proc::spawn("redis", Path::new("redis-server"), &args, addr, log)
                .context("start redis-server (apt-get install redis-server)")?,
        );
        Ok(())
    }

    /// Stops Redis with SHUTDOWN SAVE (keeps its data) or NOSAVE (and removes the dump).
    async fn stop_redis(&mut self, keep_data: bool) -> Result<()> {
        let how = if keep_data { "SAVE" } else { "NOSAVE" };
        let _ = redis_cmd(self.redis_port, &["SHUTDOWN", how]).await;
        if let Some(mut p) = self.redis.take() {
            let gone = wait_for("redis exits", COME_BACK, || {
                let alive = p.alive();
                async move { !alive }
            })
            .await;
            drop(p);
            gone?;
        }
        if !keep_data {
            let _ = std::fs::remove_file(self.dir.join("chaos.rdb"));
        }
        Ok(())
    }

    fn worker_name(i: usize) -> String {
        format!("chaos-w{i}")
    }

    fn start_worker(&mut self, i: usize) -> Result<()> {
        let addr = self.worker_addrs[i];
        let mut args: Vec<String> = [
            "worker",
            "--listen",
            &addr.to_string(),
            "--name",
            &Self::worker_name(i),
            "--redis",
            &self.redis_url(),
            "--advertise",
            &format!("grpc://{addr}"),
            "--mock-first-frame-ms",
            "0",
            "--mock-frame-interval-ms",
            MOCK_INTERVAL_MS,
            "--no-espeak",
            "--max-sessions",
            "50000",
            "--drain-secs",
            "5",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(self.worker_args.iter().cloned());
        let log = self.dir.join(format!("worker-{}.log", addr.port()));
        self.workers[i] = Some(Proc::spawn("worker", &self.bin, &args, addr, log)?);
        Ok(())
    }

    fn worker_pid(&self, i: usize) -> Option<u32> {
        self.workers.get(i).and_then(|w| w.as_ref()).map(|w| w.pid)
    }

    /// Both workers' records are in Redis.
    async fn registered(&self) -> bool {
        let keys: Vec<String> = (0..self.worker_addrs.len())
            .map(|i| format!("worker:{}", Self::worker_name(i)))
            .collect();
        let mut args = vec!["EXISTS"];
        args.extend(keys.iter().map(String::as_str));
        redis_cmd(self.redis_port, &args)
            .await
            .is_ok_and(|a| a == format!(":{}", keys.len()))
    }

    /// Starts an orchestrator on the WebSocket port (`takeover`: beside the running one) with
    /// a fresh admin port; returns it and its admin address.
    fn spawn_serve(&mut self, takeover: bool) -> Result<(Proc, SocketAddr)> {
        let admin: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        let mut args: Vec<String> = [
            "serve",
            "--listen",
            &self.ws.to_string(),
            "--admin-listen",
            &admin.to_string(),
            "--redis",
            &self.redis_url(),
            "--max-connections-per-ip",
            "0",
            "--max-connections",
            "100000",
            "--drain-secs",
            &DRAIN_SECS.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if takeover {
            args.push("--takeover".into());
        }
        args.extend(self.serve_args.iter().cloned());
        self.generation += 1;
        let log = self.dir.join(format!(
            "serve-{}-gen{}.log",
            self.ws.port(),
            self.generation
        ));
        Ok((Proc::spawn("serve", &self.bin, &args, self.ws, log)?, admin))
    }
}

/// The orchestrator at `admin` sees `n` workers that answer.
async fn sees_workers(admin: SocketAddr, n: f64) -> bool {
    server_metrics::scrape(&admin.to_string(), Duration::from_secs(2))
        .await
        .ok()
        .and_then(|s| s.value("worker_available"))
        .is_some_and(|v| v >= n)
}

/// One fault and its window (until the next fault starts).
struct Phase {
    name: &'static str,
    at: Instant,
    /// The orchestrator's `/metrics` when the phase began (`None`: a new process, count from
    /// zero), and where to scrape at its end.
    metrics_before: Option<Scrape>,
    /// `/metrics` at the phase's end.
    metrics_after: Option<Scrape>,
    /// Whether a `SYNTHESIS_FAILED` with end marker is the fault's expected effect.
    failures_expected: bool,
    notes: Vec<String>,
}

async fn scrape(admin: SocketAddr) -> Option<Scrape> {
    server_metrics::scrape(&admin.to_string(), Duration::from_secs(3))
        .await
        .ok()
}

pub async fn run(ctx: &mut Ctx) -> Result<ScenarioReport> {
    let Some(opts) = ctx.sut.opts().cloned() else {
        let mut r = ScenarioReport::new("chaos", "faults against processes this bench starts");
        r.status = Status::Unsupported(
            "chaos starts, kills and restarts its own processes; not with --url".into(),
        );
        return Ok(r);
    };
    // The bench's own stack would only take CPU from this one.
    ctx.sut.stop();
    let background = ctx.n(30usize, 10);
    let mass = ctx.n(ctx.args.max_sessions as usize, 300);
    let dir = opts.log_dir.join("chaos");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let mut cl = Cluster {
        bin: opts.bin.clone(),
        dir,
        redis_port: free_port()?,
        redis: None,
        worker_addrs: vec![
            ([127, 0, 0, 1], free_port()?).into(),
            ([127, 0, 0, 1], free_port()?).into(),
        ],
        workers: vec![None, None],
        worker_args: opts.worker_args.clone(),
        ws: ([127, 0, 0, 1], free_port()?).into(),
        admin: ([127, 0, 0, 1], 0).into(),
        serve: None,
        serve_args: opts.serve_args.clone(),
        generation: 0,
    };
    cl.start_redis()?;
    cl.start_worker(0)?;
    cl.start_worker(1)?;
    let c: &Cluster = &cl;
    wait_for("both workers registered in Redis", COME_BACK, move || {
        c.registered()
    })
    .await?;
    let (serve, admin) = cl.spawn_serve(false)?;
    cl.serve = Some(serve);
    cl.admin = admin;
    wait_for("the orchestrator sees both workers", COME_BACK, move || {
        sees_workers(admin, 2.0)
    })
    .await?;

    let mut r = ScenarioReport::new(
        "chaos",
        format!(
            "redis-server + 2 workers (Redis registration, mock first frame 0 ms, frame interval \
             {MOCK_INTERVAL_MS} ms) + 1 orchestrator (Redis discovery, --drain-secs {DRAIN_SECS}) \
             on loopback · 1 canary speaking back to back + {background} sessions speaking \
             {CHUNKS}-chunk utterances (1 s) with 0.1–0.6 s pauses · binary, realtime · mass \
             connect/disconnect of {mass} sessions"
        ),
    );
    let url = WsUrl::parse(&format!("ws://{}/", cl.ws))?.with_query(&[("format", "binary")]);
    let log = Arc::new(Log::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut talkers = vec![tokio::spawn(talker(
        url.clone(),
        log.clone(),
        stop.clone(),
        true,
    ))];
    for _ in 0..background {
        talkers.push(tokio::spawn(talker(
            url.clone(),
            log.clone(),
            stop.clone(),
            false,
        )));
    }
    let result = faults(&mut cl, &url, mass).await;
    stop.store(true, Ordering::Relaxed);
    for t in talkers {
        // Each talker ends after its utterance in flight (bounded by SILENCE).
        if tokio::time::timeout(SILENCE + Duration::from_secs(5), t)
            .await
            .is_err()
        {
            r.notes.push("a talker did not stop in time".into());
        }
    }
    let phases = result?;
    report(&mut r, &log, &phases);
    Ok(r)
}

/// Applies the faults in turn; returns the phases (baseline first).
async fn faults(cl: &mut Cluster, url: &WsUrl, mass: usize) -> Result<Vec<Phase>> {
    let mut phases: Vec<Phase> = Vec::new();
    let begin =
        |phases: &mut Vec<Phase>, name: &'static str, before: Option<Scrape>, expected: bool| {
            phases.push(Phase {
                name,
                at: Instant::now(),
                metrics_before: before,
                metrics_after: None,
                failures_expected: expected,
                notes: Vec::new(),
            });
        };
    let sleep = |s: f64| tokio::time::sleep(Duration::from_secs_f64(s));

    // Baseline: everyone talking, nothing wrong.
    begin(&mut phases, "baseline", scrape(cl.admin).await, false);
    sleep(6.0).await;

    // 1. A worker dies (kill -9), and comes back on the same port a few seconds later.
    end_phase(&mut phases, cl.admin).await;
    begin(&mut phases, "worker kill -9", scrape(cl.admin).await, true);
    if let Some(pid) = cl.worker_pid(0) {
        signal(pid, libc::SIGKILL);
    }
    cl.workers[0] = None; // reaps it
    sleep(4.0).await;
    cl.start_worker(0)?;
    let admin = cl.admin;
    let back = wait_for("the killed worker is back", COME_BACK, move || {
        sees_workers(admin, 2.0)
    })
    .await?;
    if let Some(p) = phases.last_mut() {
        p.notes.push(format!(
            "restarted after 4 s; the orchestrator saw it again {:.1} s later",
            back.as_secs_f64()
        ));
    }
    sleep(3.0).await;

    // 2. A worker stalls (SIGSTOP) for 5 s, then goes on (SIGCONT).
    end_phase(&mut phases, cl.admin).await;
    begin(
        &mut phases,
        "worker SIGSTOP 5 s",
        scrape(cl.admin).await,
        true,
    );
    if let Some(pid) = cl.worker_pid(1) {
        signal(pid, libc::SIGSTOP);
        sleep(5.0).await;
        signal(pid, libc::SIGCONT);
    }
    sleep(5.0).await;

    // 3. Redis goes down for 3 s and comes back with its data.
    end_phase(&mut phases, cl.admin).await;
    begin(
        &mut phases,
        "redis stop 3 s + start",
        scrape(cl.admin).await,
        false,
    );
    cl.stop_redis(true).await?;
    sleep(3.0).await;
    cl.start_redis()?;
    sleep(5.0).await;

    // 4. Redis restarts empty: the workers re-register at their next heartbeat.
    end_phase(&mut phases, cl.admin).await;
    begin(
        &mut phases,
        "redis restart empty",
        scrape(cl.admin).await,
        false,
    );
    cl.stop_redis(false).await?;
    cl.start_redis()?;
    let c: &Cluster = cl;
    let t = wait_for("the workers re-register", COME_BACK, move || c.registered()).await?;
    if let Some(p) = phases.last_mut() {
        p.notes.push(format!(
            "both workers were back in Redis {:.1} s after the restart",
            t.as_secs_f64()
        ));
    }
    sleep(3.0).await;

    // 5. Rolling restart of the orchestrator: the replacement shares the port, the old one
    //    drains; clients whose session ends reconnect (to the replacement).
    end_phase(&mut phases, cl.admin).await;
    begin(&mut phases, "orchestrator restart", None, false);
    let (new, new_admin) = cl.spawn_serve(true)?;
    wait_for("the replacement sees both workers", COME_BACK, move || {
        sees_workers(new_admin, 2.0)
    })
    .await?;
    if let Some(old) = cl.serve.replace(new) {
        let mut old = old;
        signal(old.pid, libc::SIGTERM);
        let drained = wait_for(
            "the old orchestrator drains and exits",
            Duration::from_secs(DRAIN_SECS + 10),
            || {
                let alive = old.alive();
                async move { !alive }
            },
        )
        .await;
        if let (Ok(d), Some(p)) = (&drained, phases.last_mut()) {
            p.notes.push(format!(
                "the old process drained and exited {:.1} s after SIGTERM",
                d.as_secs_f64()
            ));
        }
        drop(old);
        drained?;
    }
    cl.admin = new_admin;
    sleep(3.0).await;

    // 6, 7. Mass connect and mass disconnect: `mass` more sessions open, then all close at
    //    once while the canary streams. Twice: sessions that never spoke (closing costs the
    //    gateway only its own work) and sessions that spoke once (each also holds a worker
    //    session, which closing ends).
    for (speaks, connect, disconnect) in [
        (
            false,
            "mass connect (silent)",
            "mass disconnect (silent sessions)",
        ),
        (
            true,
            "mass connect (each speaks once)",
            "mass disconnect (sessions that spoke)",
        ),
    ] {
        end_phase(&mut phases, cl.admin).await;
        begin(&mut phases, connect, scrape(cl.admin).await, false);
        let crowd = Crowd::open(url, mass, speaks).await?;
        if let Some(p) = phases.last_mut() {
            p.notes.push(format!(
                "{} of {mass} sessions opened{} in {:.1} s",
                crowd.opened,
                if speaks { " and spoke once" } else { "" },
                p.at.elapsed().as_secs_f64()
            ));
        }
        sleep(3.0).await;
        end_phase(&mut phases, cl.admin).await;
        begin(&mut phases, disconnect, scrape(cl.admin).await, false);
        let n = crowd.opened;
        crowd.close().await;
        if let Some(p) = phases.last_mut() {
            p.notes
                .push(format!("{n} sessions closed (TCP FIN) at once"));
        }
        sleep(5.0).await;
    }
    end_phase(&mut phases, cl.admin).await;
    Ok(phases)
}

/// Records the orchestrator's metrics at the end of the current phase.
async fn end_phase(phases: &mut [Phase], admin: SocketAddr) {
    let m = scrape(admin).await;
    if let Some(p) = phases.last_mut() {
        p.metrics_after = m;
    }
}

/// Extra sessions held open on a thread and runtime of their own, so that opening and
/// dropping thousands of sockets does not delay the canary's reads in the bench's runtime
/// (its gap would then be the generator's, not the server's).
struct Crowd {
    opened: usize,
    close: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Crowd {
    /// Opens `n` sessions (100 at a time); with `speaks`, each speaks one short utterance
    /// with asap pacing first.
    async fn open(url: &WsUrl, n: usize, speaks: bool) -> Result<Crowd> {
        let url = url.with_query(&[("pacing", "asap")]);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (close, close_rx) = tokio::sync::oneshot::channel::<()>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("crowd runtime")?;
        let thread = std::thread::Builder::new()
            .name("chaos-crowd".into())
            .spawn(move || {
                rt.block_on(async move {
                    let conns = open_crowd(&url, n, speaks).await;
                    let _ = ready_tx.send(conns.len());
                    let _ = close_rx.await;
                    // All at once: the sockets close in this one loop turn.
                    drop(conns);
                });
            })
            .context("crowd thread")?;
        let opened = ready_rx
            .await
            .map_err(|_| anyhow!("the crowd thread ended early"))?;
        Ok(Crowd {
            opened,
            close,
            thread,
        })
    }

    /// Closes every session at once and waits for the thread.
    async fn close(self) {
        let _ = self.close.send(());
        let thread = self.thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
}

/// Opens `n` sessions (100 at a time), each speaking one short utterance first when
/// `speaks`; returns the open connections.
async fn open_crowd(url: &WsUrl, n: usize, speaks: bool) -> Vec<Conn> {
    let sem = Arc::new(tokio::sync::Semaphore::new(100));
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let url = url.clone();
            let sem = sem.clone();
            tokio::spawn(async move {
                let _permit = sem.acquire_owned().await.ok()?;
                let (mut c, _, _) = Conn::open(&url, deadline(CONNECT_TIMEOUT)).await.ok()?;
                if speaks {
                    let (rec, over) = speak(&mut c, &utterance::chunks(1), None).await;
                    if over || rec.outcome != Outcome::Completed {
                        return None;
                    }
                }
                Some(c)
            })
        })
        .collect();
    let mut open = Vec::with_capacity(n);
    for t in tasks {
        if let Ok(Some(c)) = t.await {
            open.push(c);
        }
    }
    open
}

/// Counts of one phase.
#[derive(Default, serde::Serialize)]
struct Counts {
    /// Utterances that ended in the phase.
    started: u64,
    completed: u64,
    failed_expected: u64,
    failed_unexpected: u64,
    cut_by_drain: u64,
    lost: u64,
    recovery_ms: Option<f64>,
    worst_fal_ms: Option<f64>,
    canary_worst_gap_ms: Option<f64>,
    server_lateness_max_bucket: Option<String>,
}

fn bound_text(b: Bound) -> String {
    match b {
        Bound::AtMost(s) => format!("<= {:.0} ms", s * 1000.0),
        Bound::Above(s) => format!("> {:.0} ms", s * 1000.0),
    }
}

fn report(r: &mut ScenarioReport, log: &Log, phases: &[Phase]) {
    let utts = log
        .utterances
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let gaps = log.gaps.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut all = serde_json::Map::new();
    let mut lost_total = 0;
    let mut unexpected_total = 0;
    for (i, p) in phases.iter().enumerate() {
        let until = phases.get(i + 1).map(|n| n.at);
        let inside = |t: Instant| t >= p.at && until.is_none_or(|u| t < u);
        let mut c = Counts::default();
        for u in utts.iter().filter(|u| inside(u.end_at)) {
            c.started += 1;
            if let Some(f) = u.first_at {
                let fal = f.saturating_duration_since(u.sent_at).as_secs_f64() * 1000.0;
                c.worst_fal_ms = Some(c.worst_fal_ms.map_or(fal, |w: f64| w.max(fal)));
            }
            match &u.outcome {
                Outcome::Completed => c.completed += 1,
                Outcome::Failed { code, marker } => {
                    if p.failures_expected && code == "SYNTHESIS_FAILED" && *marker {
                        c.failed_expected += 1;
                    } else {
                        c.failed_unexpected += 1;
                        r.problems.push(format!(
                            "{}: an utterance failed with {code} (end marker: {marker})",
                            p.name
                        ));
                    }
                }
                Outcome::CutByDrain => c.cut_by_drain += 1,
                Outcome::Lost(why) => {
                    c.lost += 1;
                    r.problems
                        .push(format!("{}: an utterance was lost ({why})", p.name));
                }
            }
        }
        if i > 0 {
            c.recovery_ms = utts
                .iter()
                .filter(|u| u.sent_at >= p.at && u.outcome == Outcome::Completed)
                .filter_map(|u| u.first_at)
                .min()
                .map(|t| t.saturating_duration_since(p.at).as_secs_f64() * 1000.0);
        }
        c.canary_worst_gap_ms = gaps
            .iter()
            .filter(|(t, _)| inside(*t))
            .map(|(_, g)| g.as_secs_f64() * 1000.0)
            .reduce(f64::max);
        let empty = Scrape::default();
        c.server_lateness_max_bucket = p.metrics_after.as_ref().and_then(|after| {
            after
                .delta_max_bucket(
                    p.metrics_before.as_ref().unwrap_or(&empty),
                    "frame_lateness_seconds",
                )
                .map(bound_text)
        });
        lost_total += c.lost;
        unexpected_total += c.failed_unexpected;
        let n = p.name;
        r.row(Row::text(
            format!("{n}: utterances ended / completed / failed expected / cut by drain"),
            format!(
                "{} / {} / {} / {}",
                c.started, c.completed, c.failed_expected, c.cut_by_drain
            ),
        ));
        r.row(Row::new(
            format!("{n}: failed, unexpected"),
            Some(c.failed_unexpected as f64),
            Unit::Count,
            None,
            Target::le(0.0),
        ));
        r.row(Row::new(
            format!("{n}: lost (no end marker, no error)"),
            Some(c.lost as f64),
            Unit::Count,
            Target::le(0.0),
            Target::le(0.0),
        ));
        if i > 0 {
            r.row(Row::new(
                format!("{n}: recovery (fault → first audio of a new utterance that completes)"),
                c.recovery_ms,
                Unit::Ms,
                None,
                None,
            ));
        }
        r.row(Row::new(
            format!("{n}: worst first-audio latency"),
            c.worst_fal_ms,
            Unit::Ms,
            None,
            None,
        ));
        let mut gap_row = Row::new(
            format!("{n}: canary worst inter-frame gap (server lateness max bucket)"),
            c.canary_worst_gap_ms,
            Unit::Ms,
            None,
            None,
        );
        gap_row.text = Some(
            c.server_lateness_max_bucket
                .clone()
                .unwrap_or_else(|| "no scrape".into()),
        );
        r.row(gap_row);
        for note in &p.notes {
            r.notes.push(format!("{n}: {note}"));
        }
        all.insert(
            n.to_string(),
            serde_json::to_value(&c).unwrap_or(serde_json::Value::Null),
        );
    }
    r.put("phases", all);
    r.put("lost", lost_total);
    r.put("failed_unexpected", unexpected_total);
    r.put(
        "connect_failures",
        log.connect_failures.load(Ordering::Relaxed),
    );
    r.row(Row::new(
        "client connects that failed (then retried)",
        Some(log.connect_failures.load(Ordering::Relaxed) as f64),
        Unit::Count,
        None,
        None,
    ));
    r.notes.push(
        "expected failures: SYNTHESIS_FAILED + end marker for utterances in flight on the \
         killed or stopped worker; cut by drain: the rolling restart ended the session before \
         any audio of the text (session_end), the client sent it again on a new connection; \
         the server's lateness bucket of the orchestrator restart counts the new process only"
            .into(),
    );
}
