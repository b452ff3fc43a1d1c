//! Thread-per-core orchestrator runtime.
//!
//! One pinned OS thread per core, each running its own single-threaded `tokio_uring` runtime
//! with its own `SO_REUSEPORT` listener: the kernel spreads connections over the cores and a
//! session stays on the core that accepted it, so sessions, worker connections and the pacer
//! are owned by one thread (`Rc`/`RefCell`/`slab`) with no locks or cross-core wake-ups on the
//! frame path. Only read-mostly state ([`Shared`]: config, metrics, health) crosses cores.

use std::cell::RefCell;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use slab::Slab;
use tokio::sync::watch;
use tokio_uring::net::TcpStream;

use crate::config::{Config, Pacing};
use crate::metrics::Metrics;
use crate::pacer::Pacer;
use crate::protocol::Format;
use crate::registry::{start_discovery_with, Discovery, DiscoveryConfig};
use crate::session::{Options, Session};
use crate::upstream::{HealthBook, Upstream};
use crate::ws::chunk::Chunk;
use crate::ws::codec::{Decoder, Inbound};
use crate::ws::handshake::{self, Parsed};

/// State every core reads.
pub struct Shared {
    pub config: Config,
    pub metrics: Metrics,
    /// Reachability of every known worker.
    pub book: Arc<HealthBook>,
    /// The registry reader, when `--redis` is set.
    pub discovery: Option<Arc<Discovery>>,
    /// Open WebSocket sessions across all cores (for `--max-connections`).
    pub connections: AtomicUsize,
    shutdown: watch::Receiver<bool>,
}

/// Least time between two [`Core::trim_when_idle`] trims of one core.
const TRIM_INTERVAL: Duration = Duration::from_secs(5);

/// One core's owned state.
pub struct Core {
    pub index: usize,
    pub shared: Arc<Shared>,
    pub sessions: RefCell<Slab<Rc<Session>>>,
    pub pacer: Pacer,
    pub upstream: Upstream,
    /// Buffer JSON audio frames are encoded into (see [`crate::protocol::audio`]).
    pub json_arena: RefCell<bytes::BytesMut>,
    /// When this core last handed freed memory back to the OS (see [`Core::trim_when_idle`]).
    last_trim: std::cell::Cell<Option<Instant>>,
}

impl Shared {
    /// Shared state for a new orchestrator, and the sender that triggers its shutdown.
    pub fn new(config: Config) -> anyhow::Result<(Arc<Self>, watch::Sender<bool>)> {
        let (tx, rx) = watch::channel(false);
        let discovery = match &config.discovery.redis {
            Some(url) => {
                let d = &config.discovery;
                let cfg = DiscoveryConfig {
                    prefix: d.registry_prefix.clone(),
                    interval: Duration::from_millis(d.discovery_interval_ms.max(10)),
                    max_age: Duration::from_secs(d.registry_ttl.max(1)),
                    ..DiscoveryConfig::new(url.clone())
                };
                Some(start_discovery_with(cfg).context("cannot start worker discovery")?)
            }
            None => None,
        };
        let book = Arc::new(HealthBook::default());
        for w in &config.workers {
            book.get(w);
        }
        let shared = Arc::new(Shared {
            book,
            discovery,
            metrics: Metrics::new(config.cores),
            connections: AtomicUsize::new(0),
            shutdown: rx,
            config,
        });
        Ok((shared, tx))
    }
}

impl Core {
    /// A core's state; call on the core's own thread (the pacer's timer slack is per thread).
    pub fn new(index: usize, shared: Arc<Shared>) -> std::io::Result<Rc<Self>> {
        Ok(Rc::new(Core {
            index,
            upstream: Upstream::new(
                &shared.config.workers,
                shared.discovery.clone(),
                shared.book.clone(),
            ),
            pacer: Pacer::new(shared.config.coalesce)?,
            sessions: RefCell::new(Slab::new()),
            json_arena: RefCell::new(bytes::BytesMut::new()),
            last_trim: std::cell::Cell::new(None),
            shared,
        }))
    }

    /// When the core's last session has closed, returns the allocator's free pages to the OS
    /// (at most once per [`TRIM_INTERVAL`]).
    ///
    /// Why: glibc keeps memory freed by small allocations in its arenas, so after a peak of
    /// thousands of sessions RSS stayed at the peak for the life of the process (the soak
    /// measured 21 MiB after every session had closed, against 7 MiB before). With nothing
    /// left to pace on this core, the trim's few milliseconds delay no frame here.
    fn trim_when_idle(&self) {
        if !self.sessions.borrow().is_empty() {
            return;
        }
        let now = Instant::now();
        if self
            .last_trim
            .get()
            .is_some_and(|t| now.duration_since(t) < TRIM_INTERVAL)
        {
            return;
        }
        self.last_trim.set(Some(now));
        #[cfg(target_env = "gnu")]
        // SAFETY: malloc_trim only walks the allocator's own free lists; no pointer of ours
        // is involved.
        unsafe {
            libc::malloc_trim(0);
        }
    }

    fn session(&self, key: usize) -> Option<Rc<Session>> {
        self.sessions.borrow().get(key).cloned()
    }
}

/// A running orchestrator; dropping it does not stop it, call [`Orchestrator::shutdown`].
pub struct Orchestrator {
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Orchestrator {
    /// Binds the listeners (errors such as a busy port surface here) and starts the cores.
    pub fn start(config: Config) -> anyhow::Result<Self> {
        let listeners = bind(config.listen, config.cores)?;
        let addr = listeners[0].local_addr()?;
        let (shared, tx) = Shared::new(config)?;
        let mut threads = Vec::new();
        for (index, listener) in listeners.into_iter().enumerate() {
            let shared = shared.clone();
            let priority = shared.config.realtime_priority;
            let thread = std::thread::Builder::new()
                .name(format!("core-{index}"))
                .spawn(move || {
                    pin_to_cpu(index);
                    if let Some(p) = priority {
                        set_fifo(index, p);
                    }
                    tokio_uring::start(core_main(index, listener, shared));
                })
                .context("cannot start core thread")?;
            threads.push(thread);
        }
        tracing::info!(%addr, cores = threads.len(), "orchestrator listening on {addr}");
        Ok(Self {
            addr,
            shutdown: tx,
            threads,
        })
    }

    /// The bound address (the real port when `--listen` used port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Ends every session with `session_end` (reason `shutdown`) and stops the cores.
    pub fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// One `SO_REUSEPORT` listener per core. A bind without `SO_REUSEPORT` first detects a port
/// that another program already listens on (with `SO_REUSEPORT` alone, two duplex processes
/// would silently share a port).
fn bind(addr: SocketAddr, cores: usize) -> anyhow::Result<Vec<StdListener>> {
    use socket2::{Domain, Socket, Type};
    let fail = |e: std::io::Error| anyhow::anyhow!("cannot listen on {addr}: {e}");
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(fail)?;
    // SO_REUSEADDR (not REUSEPORT): TIME_WAIT leftovers of a previous run are fine, a live
    // listener is not.
    probe.set_reuse_address(true).map_err(fail)?;
    probe.bind(&addr.into()).map_err(fail)?;
    drop(probe);
    let mut out = Vec::with_capacity(cores);
    let mut addr = addr;
    for _ in 0..cores {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(fail)?;
        s.set_reuse_address(true).map_err(fail)?;
        s.set_reuse_port(true).map_err(fail)?;
        s.set_nodelay(true).map_err(fail)?;
        s.bind(&addr.into()).map_err(fail)?;
        s.listen(4096).map_err(fail)?;
        s.set_nonblocking(true).map_err(fail)?;
        let l: StdListener = s.into();
        // Port 0: every core must listen on the port the first one got.
        addr = l.local_addr().map_err(fail)?;
        out.push(l);
    }
    Ok(out)
}

fn pin_to_cpu(index: usize) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: cpu_set_t is plain data; sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(index % cpus, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::debug!(
                "could not pin core {index}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Puts this thread under SCHED_FIFO (see `--realtime-priority`); a refusal is logged, not
/// fatal: the gateway works the same, only with scheduler-dependent tails.
fn set_fifo(index: usize, priority: i32) {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: plain syscall on the calling thread with an initialised sched_param.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if rc != 0 {
        tracing::warn!(core = index, error = %std::io::Error::last_os_error(),
            "cannot use SCHED_FIFO (needs CAP_SYS_NICE); running with normal priority");
    }
}

async fn core_main(index: usize, listener: StdListener, shared: Arc<Shared>) {
    let core = match Core::new(index, shared.clone()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(core = index, error = %e, "cannot create the pacing timer");
            return;
        }
    };
    tokio_uring::spawn(pacer_loop(core.clone()));
    if index == 0 {
        tokio_uring::spawn(probe_loop(core.clone()));
    }
    let listener = tokio_uring::net::TcpListener::from_std(listener);
    let mut shutdown = shared.shutdown.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    tokio_uring::spawn(connection(core.clone(), stream));
                }
                Err(e) => {
                    tracing::warn!(core = index, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            _ = shutdown.changed() => break,
        }
    }
    let sessions: Vec<_> = core
        .sessions
        .borrow()
        .iter()
        .map(|(_, s)| s.clone())
        .collect();
    for s in &sessions {
        s.close_with("shutdown", 1001);
    }
    // Give writers a moment to flush `session_end` and the close frame.
    let deadline = Instant::now() + Duration::from_millis(500);
    while !core.sessions.borrow().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The core's pacing loop: every wake-up serves all sessions with a frame due.
async fn pacer_loop(core: Rc<Core>) {
    let mut due = Vec::with_capacity(256);
    loop {
        due.clear();
        if let Err(e) = core.pacer.next_due(&mut due).await {
            tracing::error!(core = core.index, error = %e, "pacer failed");
            return;
        }
        let now = Instant::now();
        for &(_, key, generation) in &due {
            if let Some(s) = core.session(key) {
                s.on_timer(generation, now);
            }
        }
    }
}

/// Probes every worker once a second so `/health` and worker choice know who is up, and a
/// restarted worker is reconnected before a client needs it.
async fn probe_loop(core: Rc<Core>) {
    loop {
        core.upstream.sync();
        for i in (0..core.upstream.len()).filter(|&i| core.upstream.is_listed(i)) {
            let result = match core.upstream.client(i).await {
                Ok(c) => crate::upstream::probe(&c).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => core.upstream.mark_ok(i),
                Err(_) => core.upstream.mark_failed(i),
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Most iovecs per `writev` (the kernel limit is 1024).
const MAX_IOV: usize = 512;
/// Bytes read per `read` on a client socket.
const READ_BUF: usize = 4096;

async fn connection(core: Rc<Core>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let shared = core.shared.clone();
    // Read the request head (bounded in size and time so a slow client can't hold a slot).
    let mut head = Vec::with_capacity(1024);
    let mut buf = vec![0u8; READ_BUF];
    let parsed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let (res, b) = stream.read(buf).await;
            buf = b;
            match res {
                Ok(0) | Err(_) => return None,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
            match handshake::parse(&head) {
                Parsed::Partial => continue,
                other => return Some(other),
            }
        }
    })
    .await;
    let (req, consumed) = match parsed {
        Ok(Some(Parsed::Complete(req, len))) => (req, len),
        Ok(Some(Parsed::Invalid(reason))) => {
            let _ = stream
                .write_all(handshake::response(400, "text/plain", reason.as_bytes()))
                .await;
            return;
        }
        _ => return,
    };
    if !req.is_upgrade() {
        let _ = stream.write_all(crate::http::handle(&shared, &req)).await;
        let _ = stream.shutdown(std::net::Shutdown::Write);
        return;
    }
    let opts = match session_options(&shared.config, &req) {
        Ok(o) => o,
        Err(reason) => {
            let _ = stream
                .write_all(handshake::response(400, "text/plain", reason.as_bytes()))
                .await;
            return;
        }
    };
    // Reserve a connection slot before answering the upgrade.
    let prev = shared.connections.fetch_add(1, Ordering::AcqRel);
    if prev >= shared.config.max_connections {
        shared.connections.fetch_sub(1, Ordering::AcqRel);
        shared.metrics.rejected_connections.inc();
        let _ = stream
            .write_all(handshake::response(
                503,
                "text/plain",
                b"server at --max-connections\n",
            ))
            .await;
        return;
    }
    let key_str = req.ws_key.clone().unwrap_or_default();
    let (res, _) = stream.write_all(handshake::accept_response(&key_str)).await;
    if res.is_ok() {
        run_session(&core, stream, opts, head.split_off(consumed)).await;
    }
    shared.connections.fetch_sub(1, Ordering::AcqRel);
}

fn session_options(config: &Config, req: &handshake::Request) -> Result<Options, String> {
    let format = match req.query.get("format").map(String::as_str) {
        None => config.format,
        Some("json") => Format::Json,
        Some("binary") => Format::Binary,
        Some(other) => return Err(format!("unknown format '{other}' (json or binary)\n")),
    };
    let pacing = match req.query.get("pacing").map(String::as_str) {
        None => config.pacing,
        Some("realtime") => Pacing::Realtime,
        Some("asap") => Pacing::Asap,
        Some(other) => return Err(format!("unknown pacing '{other}' (realtime or asap)\n")),
    };
    let model = match req.query.get("model") {
        Some(m) if !m.is_empty() => m.clone(),
        _ => config.model.clone(),
    };
    let input_rate = match req.query.get("input_rate") {
        None => crate::vad::DEFAULT_INPUT_RATE,
        Some(r) => match r.parse::<u32>() {
            Ok(n) if crate::vad::INPUT_RATES.contains(&n) => n,
            _ => {
                return Err(format!(
                    "unsupported input_rate '{r}' (one of {:?})\n",
                    crate::vad::INPUT_RATES
                ))
            }
        },
    };
    Ok(Options {
        format,
        pacing,
        model,
        input_rate,
    })
}

fn new_session_id() -> String {
    let n: u64 = rand::random();
    format!("ws-{:012x}", n & 0xffff_ffff_ffff)
}

async fn run_session(core: &Rc<Core>, stream: TcpStream, opts: Options, leftover: Vec<u8>) {
    let shared = &core.shared;
    let stream = Rc::new(stream);
    let session = {
        let mut sessions = core.sessions.borrow_mut();
        let entry = sessions.vacant_entry();
        let s = Rc::new(Session::new(
            entry.key(),
            new_session_id(),
            opts,
            core.clone(),
        ));
        entry.insert(s.clone());
        s
    };
    shared.metrics.sessions_active.inc();
    shared.metrics.sessions_total.inc();
    let core_gauge = shared.metrics.core_sessions(core.index);
    core_gauge.inc();
    tracing::info!(parent: &session.span, format = session.opts.format.as_str(),
        pacing = session.opts.pacing.as_str(), model = %session.opts.model, "session open");

    session.send_event(&serde_json::json!({
        "type": "session_start",
        "session_id": session.id,
        "format": session.opts.format.as_str(),
        "pacing": session.opts.pacing.as_str(),
        "model": session.opts.model,
        "sample_rate": crate::audio::SAMPLE_RATE,
        "frame_ms": crate::audio::FRAME_MS,
        "protocol": 1,
    }));
    session.attach_socket(stream.clone());
    let writer = tokio_uring::spawn(writer(session.clone(), stream.clone()));
    if shared.config.idle_timeout.is_some() || shared.config.max_session.is_some() {
        session.own_task(tokio_uring::spawn(watchdog(session.clone())));
    }

    let mut decoder = Decoder::new(shared.config.max_message_bytes, leftover);
    let mut buf = vec![0u8; READ_BUF];
    'read: loop {
        loop {
            match decoder.next_message() {
                Inbound::Message(tungstenite::Message::Text(t)) => {
                    session.on_client_text(t.as_str())
                }
                Inbound::Message(tungstenite::Message::Binary(b)) => session.on_client_binary(&b),
                Inbound::Message(_) => {}
                Inbound::NeedMore => break,
                Inbound::Closed => {
                    if let Some(reply) = decoder.take_replies() {
                        session.send(Bytes::from(reply));
                    }
                    session.finish_output();
                    break 'read;
                }
                Inbound::Violation(code, reason) => {
                    tracing::info!(parent: &session.span, code, %reason, "protocol violation");
                    session.send(crate::ws::frame::close(code, &reason));
                    session.finish_output();
                    break 'read;
                }
            }
        }
        if let Some(reply) = decoder.take_replies() {
            session.send(Bytes::from(reply));
        }
        let (res, b) = stream.read(buf).await;
        buf = b;
        match res {
            Ok(0) | Err(_) => break,
            Ok(n) => decoder.feed(&buf[..n]),
        }
    }
    session.close();
    // Let the writer flush a close frame, bounded so a stuck peer can't pin the session.
    session.finish_output();
    if tokio::time::timeout(Duration::from_secs(2), writer)
        .await
        .is_err()
    {
        session.output_dead();
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
    core.sessions.borrow_mut().try_remove(session.key);
    shared.metrics.sessions_active.dec();
    core_gauge.dec();
    tracing::info!(parent: &session.span, "session closed");
    core.trim_when_idle();
}

/// Drains the session's output queue into the socket with vectored writes; closes the socket
/// once the session has finished its output.
async fn writer(session: Rc<Session>, stream: Rc<TcpStream>) {
    let mut batch: Vec<Chunk> = Vec::with_capacity(64);
    loop {
        let done = session.take_output(&mut batch, MAX_IOV);
        if batch.is_empty() {
            if done {
                break;
            }
            session.output_ready().await;
            continue;
        }
        if let Err(e) = write_all(&stream, &mut batch).await {
            tracing::debug!(parent: &session.span, error = %e, "write failed");
            session.output_dead();
            break;
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// Writes every chunk of `batch` (handling partial writes) and leaves it empty.
async fn write_all(stream: &TcpStream, batch: &mut Vec<Chunk>) -> std::io::Result<()> {
    while !batch.is_empty() {
        let (res, b) = stream.writev(std::mem::take(batch)).await;
        *batch = b;
        let mut n = res?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let mut done = 0;
        for chunk in batch.iter_mut() {
            if n >= chunk.len() {
                n -= chunk.len();
                done += 1;
            } else {
                chunk.advance(n);
                break;
            }
        }
        batch.drain(..done);
    }
    Ok(())
}

/// Ends sessions that are idle or too old.
async fn watchdog(session: Rc<Session>) {
    let config = session.config().clone();
    loop {
        let now = Instant::now();
        let mut wait = Duration::from_secs(3600);
        if let Some(idle) = config.idle_timeout {
            let idle_for = session.idle_for(now);
            if idle_for >= idle {
                session.close_with("idle_timeout", 1000);
                return;
            }
            wait = wait.min(idle - idle_for);
        }
        if let Some(max) = config.max_session {
            let age = session.age(now);
            if age >= max {
                session.close_with("max_duration", 1000);
                return;
            }
            wait = wait.min(max - age);
        }
        tokio::time::sleep(wait.max(Duration::from_millis(10))).await;
    }
}
