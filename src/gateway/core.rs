//! What a core owns and what all cores share.
//!
//! [`Shared`] is the read-mostly state every core reads (config, metrics, worker health,
//! the registry snapshot, the connection count). [`Core`] is one core's own context: its
//! pacer, its worker connections and its encode buffers, used only by that core's thread
//! (`Rc`, no locks). The sessions themselves live in the listener's slab; a session holds an
//! `Rc<Core>` to reach its pacer and workers, and nothing here knows about sessions, so the
//! dependency points one way (session → core).

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::BytesMut;
use tokio::sync::watch;

use super::auth::Auth;
use super::config::Config;
use super::limits::PerIp;
use super::metrics::Metrics;
use super::pacer::Pacer;
use super::upstream::{HealthBook, Upstream};
use crate::registry::{start_discovery_with, Discovery, DiscoveryConfig};

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
    /// When the process started (for `/health`'s `uptime_seconds`).
    pub started: Instant,
    /// Client credentials and the Origin policy.
    pub auth: Auth,
    /// The certificate of the public port (`--tls-cert`), if it speaks TLS.
    pub tls: super::tls::Tls,
    /// Sessions per client IP.
    pub per_ip: Arc<PerIp>,
    /// Model ids the workers list (ListModels, refreshed by the probe), for the web page's
    /// voice picker. Written once a second, read by `GET /voices`; never on the frame path.
    pub voices: std::sync::Mutex<Vec<String>>,
    /// The process's phase; cores watch it.
    phase: watch::Sender<Phase>,
    draining: AtomicBool,
}

/// Where the process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Running,
    /// Not accepting; sessions finish their utterances until `deadline`, then are cut.
    Draining {
        deadline: Instant,
    },
}

impl Shared {
    /// Shared state for a new orchestrator.
    pub fn new(config: Config) -> anyhow::Result<Arc<Self>> {
        let auth = Auth::new(config.auth.clone())?;
        let tls = super::tls::Tls::new(config.tls.clone())?;
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
            started: Instant::now(),
            auth,
            tls,
            per_ip: Arc::new(PerIp::default()),
            voices: std::sync::Mutex::new(Vec::new()),
            phase: watch::Sender::new(Phase::Running),
            draining: AtomicBool::new(false),
            config,
        });
        Ok(shared)
    }

    /// Starts the drain (idempotent): readiness turns 503 at once, cores close their
    /// listeners and let sessions finish for `--drain-secs`.
    pub fn drain(&self) {
        if self.draining.swap(true, Ordering::AcqRel) {
            return;
        }
        self.metrics.draining.set(1);
        let deadline = Instant::now() + self.config.drain;
        tracing::info!(secs = self.config.drain.as_secs_f64(), "draining");
        self.phase.send_replace(Phase::Draining { deadline });
    }

    /// True once [`Self::drain`] ran.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// A receiver of the process's phase.
    pub fn phase(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }
}

/// Least time between two [`Core::trim`] calls that do work.
const TRIM_INTERVAL: Duration = Duration::from_secs(5);

/// One core's owned state.
pub struct Core {
    pub index: usize,
    pub shared: Arc<Shared>,
    pub pacer: Pacer,
    pub upstream: Upstream,
    /// Buffer audio frames are carved from: JSON frames are encoded into it and binary
    /// headers copied into it, so forwarding a frame allocates nothing per frame and every
    /// chunk the writer hands to io_uring is a plain `Bytes` (see [`crate::protocol::audio`]).
    pub json_arena: RefCell<BytesMut>,
    /// Bytes queued for this core's clients against its share of `--max-queued-output-bytes`.
    pub output_budget: std::rc::Rc<super::session::output::Budget>,
    /// When this core last handed freed memory back to the OS (see [`Core::trim`]).
    last_trim: Cell<Option<Instant>>,
}

impl Core {
    /// A core's state; call on the core's own thread (the pacer's timer slack is per thread).
    pub fn new(index: usize, shared: Arc<Shared>) -> std::io::Result<Self> {
        Ok(Core {
            index,
            upstream: Upstream::new(
                &shared.config.workers,
                shared.discovery.clone(),
                shared.book.clone(),
                shared.config.worker_token.clone(),
                shared.config.worker_tls.clone(),
                shared.config.worker_ping_timeout,
            ),
            pacer: Pacer::new(shared.config.coalesce)?,
            json_arena: RefCell::new(BytesMut::new()),
            output_budget: std::rc::Rc::new(super::session::output::Budget::new(
                shared.config.limits.max_queued_output_bytes / shared.config.cores.max(1),
            )),
            last_trim: Cell::new(None),
            shared,
        })
    }

    /// Returns the allocator's free pages to the OS (at most once per `TRIM_INTERVAL`);
    /// the listener calls it when the core's last session has closed.
    ///
    /// Why: glibc keeps memory freed by small allocations in its arenas, so after a peak of
    /// thousands of sessions RSS stayed at the peak for the life of the process (the soak
    /// measured 21 MiB after every session had closed, against 7 MiB before). With nothing
    /// left to pace on this core, the trim's few milliseconds delay no frame here.
    pub fn trim(&self) {
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
}
