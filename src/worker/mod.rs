//! The TTS worker (`duplex worker`): the gRPC `tts.TTSService`, speaking with espeak-ng voices
//! (when espeak-ng is installed) and the mock 440 Hz model.
//!
//! [`run`] is the CLI entry (serves until SIGINT/SIGTERM, then drains); [`spawn`] runs a
//! worker on its own OS thread for `duplex demo` (orchestrator and worker in one process) and
//! for tests. The gRPC server is tonic ([`server`]), with `grpc.health.v1` and reflection
//! beside `tts.TTSService`.
//!
//! Runtime choice: a multi-thread tokio runtime with 2 worker threads. The gRPC stack is
//! `Send` throughout, the target machines have few cores, and two threads let a long burst of
//! frame generation on one connection not delay the liveness probe or Control on another;
//! more threads would only fight the orchestrator for the same cores in `duplex demo`.

pub mod clauses;
pub mod espeak;
pub mod metrics;
pub mod mock;
pub mod models;
pub mod resample;
pub mod server;
pub mod service;
pub mod session;
pub mod speech;
pub mod stamp;
pub mod stream;
pub mod synthesis;
pub mod wav;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tracing::info;

use espeak::Espeak;
use mock::MockTiming;
use models::ManagerConfig;
use server::{ServeOptions, WorkerToken};
use service::{ServiceConfig, TtsService};

/// Default gRPC listen address (docs/PROTOCOL.md §2: port 7001).
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7001";
/// Default session limit.
pub const DEFAULT_MAX_SESSIONS: usize = 1000;
/// Default delay before the first mock frame, in ms.
pub const DEFAULT_FIRST_FRAME_MS: u64 = 0;
/// Default delay between mock frames, in ms.
pub const DEFAULT_FRAME_INTERVAL_MS: u64 = 5;
/// Default idle time before an unpinned model is evicted, in seconds.
pub const DEFAULT_MODEL_TTL_SECS: f64 = 600.0;
/// Default time a session may go without a Synthesize call before it expires, in seconds.
pub const DEFAULT_SESSION_IDLE_SECS: f64 = 60.0;
/// Default longest wait for open syntheses after SIGTERM, in seconds.
pub const DEFAULT_DRAIN_SECS: f64 = 30.0;

/// Flags of `duplex worker`.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// Address to listen on for gRPC (`127.0.0.1:0` picks a free port).
    #[arg(long, default_value = DEFAULT_LISTEN, env = "DUPLEX_WORKER_LISTEN")]
    pub listen: String,
    /// Mock model: delay before the first frame of each Synthesize call, in milliseconds.
    #[arg(long, default_value_t = DEFAULT_FIRST_FRAME_MS, env = "DUPLEX_WORKER_MOCK_FIRST_FRAME_MS")]
    pub mock_first_frame_ms: u64,
    /// Mock model: delay between frames in milliseconds (0 = as fast as possible).
    #[arg(long, default_value_t = DEFAULT_FRAME_INTERVAL_MS, env = "DUPLEX_WORKER_MOCK_FRAME_INTERVAL_MS")]
    pub mock_frame_interval_ms: u64,
    /// Sessions beyond this many are refused by StartSession (success: false).
    #[arg(long, default_value_t = DEFAULT_MAX_SESSIONS, env = "DUPLEX_WORKER_MAX_SESSIONS")]
    pub max_sessions: usize,
    /// Name of this worker (its registry key, later `worker:<name>` in Redis).
    #[arg(long, default_value_t = default_name(), env = "DUPLEX_WORKER_NAME")]
    pub name: String,
    /// Model of sessions that name none; loaded at start and kept resident.
    #[arg(long, default_value = models::DEFAULT_MODEL, env = "DUPLEX_WORKER_DEFAULT_MODEL")]
    pub default_model: String,
    /// Models to load at start and keep resident (repeat or comma-separate), e.g.
    /// `--preload espeak-en-us,espeak-de`.
    #[arg(long, value_delimiter = ',', env = "DUPLEX_WORKER_PRELOAD")]
    pub preload: Vec<String>,
    /// Evict a model no session has used for this many seconds (0 = never). The default
    /// model and `--preload` models are never evicted.
    #[arg(long, default_value_t = DEFAULT_MODEL_TTL_SECS, env = "DUPLEX_WORKER_MODEL_TTL_SECS")]
    pub model_ttl_secs: f64,
    /// Most models resident at once; loading one more evicts the least recently used idle one.
    #[arg(long, default_value_t = models::DEFAULT_MAX_RESIDENT, env = "DUPLEX_WORKER_MAX_RESIDENT_MODELS")]
    pub max_resident_models: usize,
    /// The espeak-ng executable (voices `espeak-*`).
    #[arg(long, default_value = espeak::DEFAULT_BINARY, env = "DUPLEX_WORKER_ESPEAK_BINARY")]
    pub espeak_binary: String,
    /// Speak with the mock only, even if espeak-ng is installed.
    #[arg(long, env = "DUPLEX_WORKER_NO_ESPEAK")]
    pub no_espeak: bool,
    /// Register in this Redis (`redis://host:port`) so orchestrators discover the worker.
    #[arg(long, env = "DUPLEX_WORKER_REDIS", hide_env_values = true)]
    pub redis: Option<String>,
    /// Address orchestrators dial (`grpc://host:port`); default: the bound address, with a
    /// wildcard host replaced by this host's name.
    #[arg(long, env = "DUPLEX_WORKER_ADVERTISE")]
    pub advertise: Option<String>,
    /// Registry record TTL in seconds; the record is rewritten every third of it.
    #[arg(long, default_value_t = 30, env = "DUPLEX_WORKER_REGISTRY_TTL")]
    pub registry_ttl: u64,
    /// Registry key prefix (the key is prefix + name).
    #[arg(long, default_value = "worker:", env = "DUPLEX_WORKER_REGISTRY_PREFIX")]
    pub registry_prefix: String,
    /// File holding a shared secret: every `tts.TTSService` and reflection call must then
    /// carry `authorization: Bearer <secret>` (health stays open for probes).
    #[arg(long, env = "DUPLEX_WORKER_TOKEN_FILE")]
    pub worker_token_file: Option<std::path::PathBuf>,
    /// Serve LoadModel / UnloadModel (refused with PERMISSION_DENIED otherwise): they evict
    /// models other sessions rely on, so only trusted operators should have them.
    #[arg(long, env = "DUPLEX_WORKER_ALLOW_MODEL_MANAGEMENT")]
    pub allow_model_management: bool,
    /// Speak any model id outside the catalogue with the mock (the Python worker's "mock
    /// mode"); by default such ids are refused as unknown models.
    #[arg(long, env = "DUPLEX_WORKER_MOCK_ANY_MODEL")]
    pub mock_any_model: bool,
    /// A session with no Synthesize call open for this many seconds expires.
    #[arg(long, default_value_t = DEFAULT_SESSION_IDLE_SECS, env = "DUPLEX_WORKER_SESSION_IDLE_SECS")]
    pub session_idle_secs: f64,
    /// On SIGTERM, wait this many seconds at most for open syntheses to finish.
    #[arg(long, default_value_t = DEFAULT_DRAIN_SECS, env = "DUPLEX_WORKER_DRAIN_SECS")]
    pub drain_secs: f64,
    /// PEM certificate chain: serve gRPC over TLS (`grpcs://`; orchestrators need
    /// `--worker-ca`). Read at start.
    #[arg(long, env = "DUPLEX_WORKER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key for `--tls-cert`.
    #[arg(long, env = "DUPLEX_WORKER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
}

impl Default for WorkerArgs {
    /// The same defaults as the command line, for `duplex demo` and tests.
    fn default() -> Self {
        WorkerArgs {
            listen: DEFAULT_LISTEN.to_owned(),
            mock_first_frame_ms: DEFAULT_FIRST_FRAME_MS,
            mock_frame_interval_ms: DEFAULT_FRAME_INTERVAL_MS,
            max_sessions: DEFAULT_MAX_SESSIONS,
            name: default_name(),
            default_model: models::DEFAULT_MODEL.to_owned(),
            preload: Vec::new(),
            model_ttl_secs: DEFAULT_MODEL_TTL_SECS,
            max_resident_models: models::DEFAULT_MAX_RESIDENT,
            espeak_binary: espeak::DEFAULT_BINARY.to_owned(),
            no_espeak: false,
            redis: None,
            advertise: None,
            registry_ttl: 30,
            registry_prefix: "worker:".to_owned(),
            worker_token_file: None,
            allow_model_management: false,
            mock_any_model: false,
            session_idle_secs: DEFAULT_SESSION_IDLE_SECS,
            drain_secs: DEFAULT_DRAIN_SECS,
            tls_cert: None,
            tls_key: None,
        }
    }
}

/// Seconds from a flag: finite, positive (or zero when `zero_ok`), at most ~31 years.
fn seconds(flag: &str, value: f64, zero_ok: bool) -> anyhow::Result<Duration> {
    let ok = value.is_finite() && value <= 1e9 && (value > 0.0 || (zero_ok && value == 0.0));
    if !ok {
        let what = if zero_ok { "non-negative" } else { "positive" };
        anyhow::bail!("{flag} must be a {what} number of seconds, got {value}");
    }
    Ok(Duration::from_secs_f64(value))
}

impl WorkerArgs {
    /// Validates the flags and looks for espeak-ng (a missing one is not an error: the
    /// worker then speaks with the mock only, and says so).
    fn service_config(&self) -> anyhow::Result<ServiceConfig> {
        let ttl = seconds("--model-ttl-secs", self.model_ttl_secs, true)?;
        let session_idle = seconds("--session-idle-secs", self.session_idle_secs, false)?;
        if self.max_sessions == 0 {
            anyhow::bail!("--max-sessions must be at least 1");
        }
        if self.max_resident_models == 0 {
            anyhow::bail!("--max-resident-models must be at least 1");
        }
        let pinned = 1 + self.preload.len();
        if pinned > self.max_resident_models {
            anyhow::bail!(
                "--max-resident-models {} is too small for the default model and {} --preload model(s)",
                self.max_resident_models,
                self.preload.len()
            );
        }
        let espeak = if self.no_espeak {
            info!("espeak-ng disabled (--no-espeak): speaking with the mock model only");
            None
        } else {
            match Espeak::detect(&self.espeak_binary) {
                Ok(e) => {
                    info!(
                        "espeak-ng {} with {} voices (models espeak-*, e.g. espeak-en-us)",
                        e.version(),
                        e.voices().len()
                    );
                    Some(Arc::new(e))
                }
                Err(e) => {
                    tracing::warn!("{e}: speaking with the mock model only");
                    None
                }
            }
        };
        Ok(ServiceConfig {
            timing: MockTiming {
                first_frame: Duration::from_millis(self.mock_first_frame_ms),
                frame_interval: Duration::from_millis(self.mock_frame_interval_ms),
            },
            max_sessions: self.max_sessions,
            models: ManagerConfig {
                default_model: self.default_model.clone(),
                preload: self.preload.clone(),
                ttl: (!ttl.is_zero()).then_some(ttl),
                max_resident: self.max_resident_models,
                mock_any_model: self.mock_any_model,
            },
            espeak,
            session_idle,
            allow_model_management: self.allow_model_management,
        })
    }

    /// The serving options: the token file read now, so a bad one stops the start-up.
    fn serve_options(&self) -> anyhow::Result<ServeOptions> {
        let token = match &self.worker_token_file {
            Some(path) => Some(WorkerToken::from_file(path)?),
            None => None,
        };
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                let read = |p: &std::path::Path| {
                    std::fs::read(p).with_context(|| format!("reading {}", p.display()))
                };
                Some(tonic::transport::Identity::from_pem(
                    read(cert)?,
                    read(key)?,
                ))
            }
            _ => None,
        };
        Ok(ServeOptions {
            token,
            tls,
            drain: seconds("--drain-secs", self.drain_secs, true)?,
            max_concurrent_streams: ServeOptions::streams_for(self.max_sessions),
        })
    }
}

/// `worker-<hostname>`, or `worker` if the hostname cannot be read: unique per machine, which
/// is what a registry key needs by default.
pub fn default_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the pointer and length describe `buf`, which outlives the call; gethostname
    // writes at most `len` bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc == 0 {
        let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        if let Ok(host) = std::str::from_utf8(&buf[..len]) {
            if !host.is_empty() {
                return format!("worker-{host}");
            }
        }
    }
    "worker".to_owned()
}

/// Binds the listen socket synchronously so errors (busy port, bad address) surface to the
/// caller as `cannot listen on ADDR: <os error>`.
fn bind(addr: &str) -> anyhow::Result<std::net::TcpListener> {
    let listener =
        std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
    listener
        .set_nonblocking(true)
        .with_context(|| format!("cannot listen on {addr}: set_nonblocking"))?;
    Ok(listener)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("duplex-worker")
        .enable_all()
        .build()
        .context("cannot start the worker runtime")
}

/// Runs the worker until SIGINT or SIGTERM, then drains (health NOT_SERVING, registry record
/// deleted, new sessions refused, open syntheses finish within `--drain-secs`) and returns
/// `Ok(())`.
pub fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let config = args.service_config()?;
    let options = args.serve_options()?;
    let rt = runtime()?;
    rt.block_on(async move {
        // Order matters: signal handlers first, so a SIGTERM that arrives as soon as the port
        // accepts is a clean shutdown; models loaded before binding, so a worker that accepts
        // connections answers at once.
        let shutdown = shutdown_signal()?;
        let service = Arc::new(TtsService::start(config).await?);
        let listener = TcpListener::from_std(bind(&args.listen)?)
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let addr = listener.local_addr()?;
        service.spawn_maintenance();
        info!(
            name = %args.name,
            default_model = %service.models().default_model(),
            token = options.token.is_some(),
            "worker listening on {addr}"
        );
        let registration = register(&args, addr, &service)?;
        let deregister = async move {
            if let Some(r) = registration {
                // Deleting the record tells orchestrators at once instead of after the TTL.
                if let Err(e) = r.shutdown().await {
                    tracing::warn!(error = %e, "could not delete the registry record");
                }
            }
        };
        server::serve(listener, service, options, shutdown, deregister).await?;
        info!("worker stopped");
        anyhow::Ok(())
    })?;
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// Starts the Redis heartbeat when `--redis` is given. Each beat publishes the worker's own
/// `GetCapabilities` answer, so the registry and the gRPC probe always agree.
fn register(
    args: &WorkerArgs,
    bound: SocketAddr,
    service: &Arc<TtsService>,
) -> anyhow::Result<Option<crate::registry::Registration>> {
    use crate::registry::{spawn_registration, RegistrationConfig, WorkerRecord};
    let Some(url) = &args.redis else {
        return Ok(None);
    };
    // A TLS worker advertises grpcs:// so readers know to dial it with TLS.
    let scheme = if args.tls_cert.is_some() {
        "grpcs"
    } else {
        "grpc"
    };
    let advertise = match &args.advertise {
        Some(a) if a.starts_with("grpc://") || a.starts_with("grpcs://") => a.clone(),
        Some(a) => anyhow::bail!("--advertise must look like grpc://HOST:PORT, got '{a}'"),
        None if bound.ip().is_unspecified() => {
            let host = default_name();
            let host = host.strip_prefix("worker-").unwrap_or("localhost");
            format!("{scheme}://{host}:{}", bound.port())
        }
        None => format!("{scheme}://{bound}"),
    };
    let mut cfg = RegistrationConfig::new(url.clone(), args.name.clone());
    cfg.prefix = args.registry_prefix.clone();
    cfg.ttl = Duration::from_secs(args.registry_ttl);
    let service = service.clone();
    let registration = spawn_registration(cfg, move || {
        WorkerRecord::from_capabilities(advertise.clone(), &service.capabilities())
    })
    .context("cannot start the registry heartbeat")?;
    info!(key = registration.key(), "registering in Redis");
    Ok(Some(registration))
}

/// A future completing on the first SIGINT or SIGTERM. Installing the handlers happens now,
/// so a failure is reported before the worker starts serving.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received"),
            _ = int.recv() => info!("SIGINT received"),
        }
    })
}

/// A worker running on its own thread (see [`spawn`]). Dropping it shuts the worker down.
#[derive(Debug)]
pub struct WorkerHandle {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WorkerHandle {
    /// The address the worker listens on (the real port when `--listen` used port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the worker and waits for its thread (bounded by the drain time and the close
    /// grace).
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("worker thread panicked");
            }
        }
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Starts a worker on a new OS thread with its own runtime. The socket is bound before this
/// returns, so `--listen 127.0.0.1:0` works (see [`WorkerHandle::local_addr`]) and bind
/// errors are returned here.
pub fn spawn(args: WorkerArgs) -> anyhow::Result<WorkerHandle> {
    let config = args.service_config()?;
    let rt = runtime()?;
    // Models first, so the worker answers as soon as its port accepts.
    let service = Arc::new(rt.block_on(TtsService::start(config))?);
    let options = args.serve_options()?;
    let std_listener = bind(&args.listen)?;
    let addr = std_listener.local_addr()?;
    let listener = {
        let _enter = rt.enter();
        TcpListener::from_std(std_listener)
            .with_context(|| format!("cannot listen on {}", args.listen))?
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let name = args.name.clone();
    let thread = std::thread::Builder::new()
        .name("duplex-worker".into())
        .spawn(move || {
            rt.block_on(async move {
                service.spawn_maintenance();
                info!(name = %name, "worker listening on {addr}");
                let stop = async {
                    let _ = stop_rx.await;
                };
                if let Err(e) = server::serve(listener, service, options, stop, async {}).await {
                    tracing::error!("worker failed: {e:#}");
                }
            });
            rt.shutdown_timeout(Duration::from_secs(1));
        })
        .context("cannot start the worker thread")?;
    Ok(WorkerHandle {
        addr,
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_port_is_a_clear_error() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let err = spawn(WorkerArgs {
            listen: addr.clone(),
            ..WorkerArgs::default()
        })
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.starts_with(&format!("cannot listen on {addr}: ")),
            "{msg}"
        );
    }

    #[test]
    fn spawn_reports_the_real_port_and_shuts_down() {
        let h = spawn(WorkerArgs {
            listen: "127.0.0.1:0".into(),
            ..WorkerArgs::default()
        })
        .unwrap();
        let addr = h.local_addr();
        assert_ne!(addr.port(), 0);
        std::net::TcpStream::connect(addr).unwrap();
        h.shutdown();
        assert!(std::net::TcpStream::connect(addr).is_err());
    }

    #[test]
    fn bad_model_flags_are_clear_errors() {
        let bad = |args: WorkerArgs| format!("{:#}", spawn(args).unwrap_err());
        let base = || WorkerArgs {
            listen: "127.0.0.1:0".into(),
            no_espeak: true,
            ..WorkerArgs::default()
        };
        assert!(bad(WorkerArgs {
            model_ttl_secs: -1.0,
            ..base()
        })
        .contains("--model-ttl-secs"));
        assert!(bad(WorkerArgs {
            max_resident_models: 1,
            preload: vec!["mock-a".into()],
            ..base()
        })
        .contains("--max-resident-models"));
        let e = bad(WorkerArgs {
            default_model: "espeak-en-us".into(),
            ..base()
        });
        assert!(e.contains("needs espeak-ng"), "{e}");
    }

    #[test]
    fn default_name_is_not_empty() {
        assert!(default_name().starts_with("worker"));
    }
}
