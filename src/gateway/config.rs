//! Orchestrator configuration: the flags of `duplex serve` / `duplex demo`, validated once at
//! start into a [`Config`] that every core reads (it never changes while running).

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use anyhow::{bail, Context};

pub use crate::protocol::{Format, Pacing};

/// What speech in the client's microphone audio does to the audio playing (barge-in).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BargeIn {
    /// Like a STOP: the utterance ends, queued ones are dropped (what an LLM agent wants:
    /// `interrupted` says how much was heard).
    Stop,
    /// Like a PAUSE: audio holds until the client sends RESUME (or STOP).
    Pause,
    /// Only report speech (`vad` events); playback carries on.
    Off,
}

/// Orchestrator flags shared by `serve` and `demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct OrchestratorArgs {
    /// Cores (pinned threads, each with its own io_uring loop and listener). Default: all.
    #[arg(long, env = "DUPLEX_CORES")]
    pub cores: Option<usize>,
    /// Default pacing for sessions that don't ask (`?pacing=`).
    #[arg(long, value_enum, default_value = "realtime", env = "DUPLEX_PACING")]
    pub pacing: Pacing,
    /// Let realtime frames leave up to this many milliseconds early (client-side buffer).
    #[arg(long, default_value_t = 0, env = "DUPLEX_LEAD_MS")]
    pub lead_ms: u64,
    /// Most concurrent WebSocket sessions per process; beyond it upgrades get HTTP 503.
    #[arg(long, default_value_t = 10_000, env = "DUPLEX_MAX_CONNECTIONS")]
    pub max_connections: usize,
    /// Largest inbound WebSocket message; larger ones close the socket with 1009.
    #[arg(long, default_value_t = 1 << 20, env = "DUPLEX_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: usize,
    /// Close a session after this many seconds without client messages or audio (0 = never).
    #[arg(long, default_value_t = 300.0, env = "DUPLEX_IDLE_TIMEOUT_SECS")]
    pub idle_timeout_secs: f64,
    /// Close any session after this many seconds (0 = never).
    #[arg(long, default_value_t = 0.0, env = "DUPLEX_MAX_SESSION_SECS")]
    pub max_session_secs: f64,
    /// Model for sessions that don't ask for one (`?model=`).
    #[arg(long, default_value = "mock-440hz", env = "DUPLEX_MODEL")]
    pub model: String,
    /// Pacer coalescing window in microseconds: one wake-up also sends frames due this soon,
    /// trading that much early delivery for fewer wake-ups at many sessions (0 = exact).
    #[arg(long, default_value_t = 500, env = "DUPLEX_COALESCE_US")]
    pub coalesce_us: u64,
    /// Run the core threads under SCHED_FIFO with this priority (1-99) so a busy host can't
    /// delay frame wake-ups by a scheduler time slice. Needs CAP_SYS_NICE; off by default
    /// because FIFO threads at full load starve everything else on their cores (a worker in
    /// the same process or host included).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=99), env = "DUPLEX_REALTIME_PRIORITY")]
    pub realtime_priority: Option<i32>,
    /// What speech detected in the client's microphone audio (binary messages) does to the
    /// audio playing.
    #[arg(long, value_enum, default_value = "stop", env = "DUPLEX_BARGE_IN")]
    pub barge_in: BargeIn,
    /// Voice-activity threshold: 20 ms windows louder than this RMS level (dB full scale)
    /// count as speech.
    #[arg(long, default_value_t = -35.0, allow_negative_numbers = true, env = "DUPLEX_VAD_THRESHOLD_DBFS")]
    pub vad_threshold_dbfs: f64,
    /// Address of the admin HTTP listener (`/health`, `/readiness`, `/liveness`, `/metrics`,
    /// `/metrics/summary`, `POST /drain`). Default: the WebSocket port + 1 on the same host,
    /// as the earlier Python system did; `none` turns it off.
    #[arg(long, env = "DUPLEX_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// On SIGTERM or `POST /drain`, let open sessions finish their utterances for up to this
    /// many seconds before they are cut.
    #[arg(long, default_value_t = 30.0, env = "DUPLEX_DRAIN_SECS")]
    pub drain_secs: f64,
    /// File holding the shared secret sent to workers as `authorization: Bearer` gRPC metadata
    /// (workers started with the same `--worker-token-file` refuse calls without it).
    #[arg(long, env = "DUPLEX_WORKER_TOKEN_FILE")]
    pub worker_token_file: Option<std::path::PathBuf>,
    /// PEM certificate(s) of the CA workers' certificates chain to: every worker connection
    /// then speaks TLS (`grpcs://`; workers started with `--tls-cert`).
    #[arg(long, env = "DUPLEX_WORKER_CA")]
    pub worker_ca: Option<std::path::PathBuf>,
    /// A synthesis whose first frame takes longer than this fails (SYNTHESIS_FAILED + end
    /// marker) and the worker is marked unhealthy. Real TTS models answer within a second or
    /// two on a loaded GPU; 10 s is far past any healthy one.
    #[arg(long, default_value_t = 10.0, env = "DUPLEX_FIRST_FRAME_TIMEOUT_SECS")]
    pub first_frame_timeout_secs: f64,
    /// A synthesis whose next frame takes longer than this (while the client is not paused)
    /// fails the same way: a stalled worker is noticed as fast as a dead one.
    #[arg(long, default_value_t = 3.0, env = "DUPLEX_STALL_TIMEOUT_SECS")]
    pub stall_timeout_secs: f64,
    /// A worker connection with a call open is PINGed every 250 ms; one that does not answer
    /// a PING within this is closed and its calls fail (or move, before their first frame).
    /// This is what notices a frozen worker (SIGSTOP, a hung host) that keeps its socket
    /// open; a slow model still answers PINGs, so it is not mistaken for one.
    #[arg(long, default_value_t = 1.0, env = "DUPLEX_WORKER_PING_TIMEOUT_SECS")]
    pub worker_ping_timeout_secs: f64,
    /// End the worker session of a client session idle for this long (the next utterance
    /// opens a new one), so idle clients don't hold worker capacity (0 = never).
    #[arg(long, default_value_t = 30.0, env = "DUPLEX_WORKER_IDLE_SECS")]
    pub worker_idle_secs: f64,
    /// Share the listening port with a duplex already on it (rolling restart on one host:
    /// start the new process with `--takeover`, then SIGTERM the old one, which closes its
    /// listeners at once and drains).
    #[arg(long, env = "DUPLEX_TAKEOVER")]
    pub takeover: bool,
    #[command(flatten)]
    pub auth: super::auth::AuthArgs,
    #[command(flatten)]
    pub tls: super::tls::TlsArgs,
    #[command(flatten)]
    pub limits: super::limits::LimitArgs,
}

/// Redis discovery flags of `duplex serve`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DiscoveryArgs {
    /// Discover workers in this Redis (`redis://host:port`); `--worker` addresses still work.
    /// Prefer `DUPLEX_REDIS_URL` or `--redis-url-file` when the URL holds a password: a flag
    /// shows in `ps`.
    #[arg(long, env = "DUPLEX_REDIS_URL", hide_env_values = true)]
    pub redis: Option<String>,
    /// File holding the Redis URL (first line).
    #[arg(long, env = "DUPLEX_REDIS_URL_FILE", conflicts_with = "redis")]
    pub redis_url_file: Option<std::path::PathBuf>,
    /// Registry key prefix (workers write prefix + name).
    #[arg(long, default_value = "worker:", env = "DUPLEX_REGISTRY_PREFIX")]
    pub registry_prefix: String,
    /// Registry TTL the workers use, in seconds: older records count as dead.
    #[arg(long, default_value_t = 30, env = "DUPLEX_REGISTRY_TTL")]
    pub registry_ttl: u64,
    /// How often to re-read the registry, in milliseconds (changes also arrive at once when
    /// Redis has keyspace notifications enabled).
    #[arg(long, default_value_t = 1000, env = "DUPLEX_DISCOVERY_INTERVAL_MS")]
    pub discovery_interval_ms: u64,
}

impl OrchestratorArgs {
    /// The flags as parsed from `args` (e.g. `["--cores", "1"]`), defaults for the rest: how
    /// tests and embedders build a configuration without listing every field.
    pub fn parse_from<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: OrchestratorArgs,
        }
        let argv = std::iter::once(std::ffi::OsString::from("duplex"))
            .chain(args.into_iter().map(Into::into));
        <Wrapper as clap::Parser>::try_parse_from(argv).map(|w| w.args)
    }
}

impl DiscoveryArgs {
    /// The flags with `--redis-url-file` read into `redis`.
    pub fn resolved(mut self) -> anyhow::Result<Self> {
        if let Some(path) = self.redis_url_file.take() {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read --redis-url-file {}", path.display()))?;
            let url = text.lines().next().unwrap_or("").trim().to_string();
            if url.is_empty() {
                bail!("--redis-url-file {} is empty", path.display());
            }
            self.redis = Some(url);
        }
        Ok(self)
    }
}

/// Validated orchestrator configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// Worker addresses as `host:port`.
    pub workers: Vec<String>,
    pub cores: usize,
    pub pacing: Pacing,
    pub format: Format,
    pub lead: Duration,
    pub max_connections: usize,
    pub max_message_bytes: usize,
    pub idle_timeout: Option<Duration>,
    pub max_session: Option<Duration>,
    pub model: String,
    pub coalesce: Duration,
    pub realtime_priority: Option<i32>,
    pub barge_in: BargeIn,
    pub vad: crate::gateway::vad::VadConfig,
    pub discovery: DiscoveryArgs,
    /// Where the admin endpoints listen (`None`: only the bare `/health` on the public port).
    pub admin_listen: Option<SocketAddr>,
    /// How long a drain lets sessions finish.
    pub drain: Duration,
    /// Secret sent to workers as gRPC `authorization` metadata.
    pub worker_token: Option<crate::grpc::tts::WorkerAuth>,
    /// TLS to workers (`--worker-ca`); `None`: plain TCP.
    pub worker_tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    pub auth: super::auth::AuthArgs,
    pub tls: super::tls::TlsArgs,
    pub limits: super::limits::LimitArgs,
    /// Skip the exclusive-port check (`--takeover`).
    pub takeover: bool,
    /// Deadline of a synthesis's first frame.
    pub first_frame_timeout: Duration,
    /// Deadline of each next frame.
    pub stall_timeout: Duration,
    /// Deadline of a PING's answer on a worker connection.
    pub worker_ping_timeout: Duration,
    /// Idle time after which a session's worker session is released.
    pub worker_idle: Option<Duration>,
}

impl Config {
    /// Checks the flags; every failure is a one-line reason for the user.
    pub fn new(listen: &str, workers: &[String], args: &OrchestratorArgs) -> anyhow::Result<Self> {
        let listen = listen
            .to_socket_addrs()
            .with_context(|| format!("invalid --listen address '{listen}'"))?
            .next()
            .with_context(|| format!("--listen '{listen}' resolves to no address"))?;
        let available = std::thread::available_parallelism().map_or(1, |n| n.get());
        let cores = args.cores.unwrap_or(available);
        if cores == 0 || cores > 1024 {
            bail!("--cores must be between 1 and 1024, got {cores}");
        }
        if let Some(w) = workers.iter().find(|w| w.starts_with("grpcs://")) {
            if args.worker_ca.is_none() {
                bail!("worker {w}: grpcs:// needs --worker-ca (the CA its certificate chains to)");
            }
        }
        let workers = workers
            .iter()
            .map(|w| worker_addr(w))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let worker_tls = match &args.worker_ca {
            Some(ca) => Some(crate::grpc::client::tls_config(ca).context("--worker-ca")?),
            None => None,
        };
        if args.max_message_bytes < 1024 {
            bail!("--max-message-bytes must be at least 1024");
        }
        if args.max_connections == 0 {
            bail!("--max-connections must be at least 1");
        }
        if !args.vad_threshold_dbfs.is_finite() || !(-96.0..=0.0).contains(&args.vad_threshold_dbfs)
        {
            bail!(
                "--vad-threshold-dbfs must be between -96 and 0, got {}",
                args.vad_threshold_dbfs
            );
        }
        let admin_listen = match args.admin_listen.as_deref() {
            Some("none") => None,
            Some(a) => Some(
                a.to_socket_addrs()
                    .with_context(|| format!("invalid --admin-listen address '{a}'"))?
                    .next()
                    .with_context(|| format!("--admin-listen '{a}' resolves to no address"))?,
            ),
            // Port 0 (tests) picks a free admin port too.
            None if listen.port() == 0 => Some(SocketAddr::new(listen.ip(), 0)),
            None => Some(SocketAddr::new(
                listen.ip(),
                listen.port().checked_add(1).with_context(|| {
                    "--listen uses port 65535, so the admin port can't be the next one: give --admin-listen"
                })?,
            )),
        };
        let worker_token = match &args.worker_token_file {
            Some(path) => Some(
                crate::grpc::tts::WorkerAuth::from_file(path)
                    .map_err(|e| anyhow::anyhow!("--worker-token-file: {e}"))?,
            ),
            None => None,
        };
        let limits = args.limits.clone();
        if limits.max_queued_utterances == 0 || limits.max_queued_text_bytes == 0 {
            bail!("--max-queued-utterances and --max-queued-text-bytes must be at least 1");
        }
        if !(limits.max_messages_per_sec.is_finite() && limits.max_messages_per_sec > 0.0) {
            bail!("--max-messages-per-sec must be a positive number");
        }
        if !(limits.head_timeout_secs.is_finite() && limits.head_timeout_secs > 0.0) {
            bail!("--head-timeout-secs must be a positive number of seconds");
        }
        Ok(Self {
            admin_listen,
            drain: secs("--drain-secs", args.drain_secs)?.unwrap_or(Duration::ZERO),
            worker_token,
            worker_tls,
            auth: args.auth.clone(),
            tls: args.tls.clone(),
            limits,
            takeover: args.takeover,
            first_frame_timeout: secs("--first-frame-timeout-secs", args.first_frame_timeout_secs)?
                .context("--first-frame-timeout-secs must be positive")?,
            stall_timeout: secs("--stall-timeout-secs", args.stall_timeout_secs)?
                .context("--stall-timeout-secs must be positive")?,
            worker_ping_timeout: secs("--worker-ping-timeout-secs", args.worker_ping_timeout_secs)?
                .context("--worker-ping-timeout-secs must be positive")?,
            worker_idle: secs("--worker-idle-secs", args.worker_idle_secs)?,
            listen,
            workers,
            cores,
            pacing: args.pacing,
            format: Format::Json,
            lead: Duration::from_millis(args.lead_ms),
            max_connections: args.max_connections,
            max_message_bytes: args.max_message_bytes,
            idle_timeout: secs("--idle-timeout-secs", args.idle_timeout_secs)?,
            max_session: secs("--max-session-secs", args.max_session_secs)?,
            model: args.model.clone(),
            coalesce: Duration::from_micros(args.coalesce_us.min(10_000)),
            realtime_priority: args.realtime_priority,
            barge_in: args.barge_in,
            vad: crate::gateway::vad::VadConfig {
                threshold_dbfs: args.vad_threshold_dbfs,
                ..crate::gateway::vad::VadConfig::default()
            },
            discovery: DiscoveryArgs::default(),
        })
    }
}

fn secs(flag: &str, v: f64) -> anyhow::Result<Option<Duration>> {
    if !v.is_finite() || !(0.0..=1e9).contains(&v) {
        bail!("{flag} must be a non-negative number of seconds, got {v}");
    }
    Ok((v > 0.0).then(|| Duration::from_secs_f64(v)))
}

/// Accepts `grpc://host:port`, `grpcs://host:port` or `host:port`; returns `host:port`.
pub fn worker_addr(url: &str) -> anyhow::Result<String> {
    let rest = url
        .strip_prefix("grpc://")
        .or_else(|| url.strip_prefix("grpcs://"))
        .unwrap_or(url);
    let rest = rest.trim_end_matches('/');
    match rest.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
            Ok(rest.to_string())
        }
        _ => bail!("invalid worker address '{url}' (expected grpc://HOST:PORT)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_addresses() {
        assert_eq!(
            worker_addr("grpc://127.0.0.1:7001").unwrap(),
            "127.0.0.1:7001"
        );
        assert_eq!(worker_addr("worker:7001").unwrap(), "worker:7001");
        assert!(worker_addr("grpc://nohost").is_err());
        assert!(worker_addr("grpc://:7001").is_err());
        assert!(worker_addr("grpc://h:99999").is_err());
    }

    #[test]
    fn vad_threshold_is_checked_and_carried() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: OrchestratorArgs,
        }
        let parse = |extra: &[&str]| {
            let argv = std::iter::once("x").chain(extra.iter().copied());
            Config::new("127.0.0.1:0", &[], &Cli::try_parse_from(argv).unwrap().args)
        };
        let c = parse(&[]).unwrap();
        assert_eq!(c.vad.threshold_dbfs, -35.0);
        assert_eq!(c.barge_in, BargeIn::Stop);
        let c = parse(&["--vad-threshold-dbfs", "-50", "--barge-in", "pause"]).unwrap();
        assert_eq!(c.vad.threshold_dbfs, -50.0);
        assert_eq!(c.barge_in, BargeIn::Pause);
        for bad in ["5", "-120", "NaN"] {
            let e = parse(&["--vad-threshold-dbfs", bad])
                .unwrap_err()
                .to_string();
            assert!(e.contains("--vad-threshold-dbfs"), "{e}");
        }
    }

    #[test]
    fn seconds_flags() {
        assert_eq!(secs("x", 0.0).unwrap(), None);
        assert_eq!(secs("x", 0.5).unwrap(), Some(Duration::from_millis(500)));
        assert!(secs("x", -1.0).is_err());
        assert!(secs("x", f64::NAN).is_err());
    }
}
