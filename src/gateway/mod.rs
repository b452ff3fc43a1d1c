//! The orchestrator: WebSocket clients in, gRPC TTS workers out, frames paced in between.
//!
//! Thread-per-core: one pinned OS thread per core, each running its own single-threaded
//! `tokio_uring` runtime with its own `SO_REUSEPORT` listener ([`listener`]). The kernel
//! spreads connections over the cores and a session stays on the core that accepted it, so
//! sessions, worker connections and the pacer are owned by one thread (`Rc`/`RefCell`/`slab`)
//! with no locks or cross-core wake-ups on the frame path. Only read-mostly state
//! ([`core::Shared`]: config, metrics, health) crosses cores.
//!
//! Dependencies point one way: `listener` → `conn` → `session` → `core` → `pacer`,
//! `upstream`, `metrics`, `config`; `admin` reads `core::Shared`. Below the gateway sit
//! [`crate::protocol`], [`crate::ws`], [`crate::grpc`] and [`crate::registry`], none of
//! which knows about it. docs/ARCHITECTURE.md follows one frame and one PAUSE through them.

pub mod admin;
pub mod auth;
pub mod config;
pub mod conn;
pub mod core;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod pacer;
pub mod session;
pub mod tls;
pub mod upstream;
pub mod vad;
pub mod wire;

use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::Arc;

use anyhow::Context;

pub use self::core::{Core, Shared};
use config::Config;

/// A running orchestrator; dropping it does not stop it, call [`Orchestrator::shutdown`].
pub struct Orchestrator {
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
    admin: Option<admin::AdminServer>,
}

impl Orchestrator {
    /// Binds the listeners (errors such as a busy port surface here) and starts the cores.
    pub fn start(config: Config) -> anyhow::Result<Self> {
        limits::raise_fd_limit(config.max_connections);
        let listeners = bind(config.listen, config.cores, config.takeover)?;
        let addr = listeners[0].local_addr()?;
        let admin_listener = match config.admin_listen {
            Some(a) => Some(
                std::net::TcpListener::bind(a)
                    .map_err(|e| anyhow::anyhow!("cannot listen on --admin-listen {a}: {e}"))?,
            ),
            None => None,
        };
        let shared = Shared::new(config)?;
        let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());
        let admin = admin_listener
            .map(|l| admin::AdminServer::start(l, shared.clone()))
            .transpose()?;
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
                    tokio_uring::start(listener::run(index, listener, shared));
                })
                .context("cannot start core thread")?;
            threads.push(thread);
        }
        match admin_addr {
            Some(admin) => tracing::info!(%addr, %admin, cores = threads.len(),
                "orchestrator listening on {addr}, admin on {admin}"),
            None => {
                tracing::info!(%addr, cores = threads.len(), "orchestrator listening on {addr}")
            }
        }
        Ok(Self {
            addr,
            admin_addr,
            shared,
            threads,
            admin,
        })
    }

    /// The bound address (the real port when `--listen` used port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin listener's address, unless `--admin-listen none`.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Re-reads the credential files and the TLS certificate (SIGHUP); open sessions are not
    /// touched.
    pub fn reload(&self) {
        match self.shared.auth.reload() {
            Ok(()) => tracing::info!("credentials reloaded"),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "reload failed; the previous credentials stay in force")
            }
        }
        if self.shared.tls.enabled() {
            match self.shared.tls.reload() {
                Ok(()) => tracing::info!("TLS certificate reloaded"),
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "TLS reload failed; the previous certificate stays in force")
                }
            }
        }
    }

    /// Starts the drain (SIGTERM, `POST /drain`): readiness 503, listeners closed, sessions
    /// finish their utterances for up to `--drain-secs`.
    pub fn drain(&self) {
        self.shared.drain();
    }

    /// Blocks until the cores have ended (after a drain).
    pub fn wait(mut self) {
        for t in std::mem::take(&mut self.threads) {
            let _ = t.join();
        }
        if let Some(admin) = self.admin.take() {
            admin.stop();
        }
    }

    /// Drains, then stops: every session ends with `session_end` (reason `shutdown`).
    pub fn shutdown(self) {
        self.drain();
        self.wait();
    }
}

/// One `SO_REUSEPORT` listener per core. Unless `takeover`, a bind without `SO_REUSEPORT`
/// first detects a port that another program already listens on (with `SO_REUSEPORT` alone,
/// two duplex processes would silently share a port); `--takeover` skips that check on
/// purpose, for a rolling restart on one host (the new process shares the port until the old
/// one drains and closes its listeners).
fn bind(addr: SocketAddr, cores: usize, takeover: bool) -> anyhow::Result<Vec<StdListener>> {
    use socket2::{Domain, Socket, Type};
    let fail = |e: std::io::Error| anyhow::anyhow!("cannot listen on {addr}: {e}");
    if !takeover {
        let probe = Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(fail)?;
        // SO_REUSEADDR (not REUSEPORT): TIME_WAIT leftovers of a previous run are fine, a
        // live listener is not.
        probe.set_reuse_address(true).map_err(fail)?;
        probe.bind(&addr.into()).map_err(fail)?;
        drop(probe);
    }
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

/// Pins the calling thread to the `index`-th CPU this process may run on.
///
/// The CPUs come from the thread's affinity mask, not `0..available_parallelism`: in a cpuset
/// or a container limited to CPUs 4–7, pinning core 0 to CPU 0 would fail or, worse, stack
/// every core thread on the CPUs that happen to be allowed.
fn pin_to_cpu(index: usize) {
    use rustix::thread::{sched_getaffinity, sched_setaffinity, CpuSet};
    let allowed = match sched_getaffinity(None) {
        Ok(set) => set,
        Err(e) => {
            tracing::debug!("cannot read the affinity mask, core {index} not pinned: {e}");
            return;
        }
    };
    let cpus: Vec<usize> = (0..CpuSet::MAX_CPU)
        .filter(|&c| allowed.is_set(c))
        .collect();
    if cpus.is_empty() {
        return;
    }
    let mut set = CpuSet::new();
    set.set(cpus[index % cpus.len()]);
    if let Err(e) = sched_setaffinity(None, &set) {
        tracing::debug!("could not pin core {index}: {e}");
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
