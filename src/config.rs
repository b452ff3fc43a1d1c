//! Orchestrator configuration: the flags of `duplex serve` / `duplex demo`, validated once at
//! start into a [`Config`] that every core reads (it never changes while running).

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::protocol::Format;

/// Pacing of audio towards the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Pacing {
    /// Absolute 20 ms schedule from the first frame (what a listener needs).
    Realtime,
    /// Forward each frame the moment it arrives (offline rendering, clients that buffer).
    Asap,
}

impl Pacing {
    pub fn as_str(self) -> &'static str {
        match self {
            Pacing::Realtime => "realtime",
            Pacing::Asap => "asap",
        }
    }
}

/// Orchestrator flags shared by `serve` and `demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct OrchestratorArgs {
    /// Cores (pinned threads, each with its own io_uring loop and listener). Default: all.
    #[arg(long)]
    pub cores: Option<usize>,
    /// Default pacing for sessions that don't ask (`?pacing=`).
    #[arg(long, value_enum, default_value = "realtime")]
    pub pacing: Pacing,
    /// Let realtime frames leave up to this many milliseconds early (client-side buffer).
    #[arg(long, default_value_t = 0)]
    pub lead_ms: u64,
    /// Most concurrent WebSocket sessions per process; beyond it upgrades get HTTP 503.
    #[arg(long, default_value_t = 10_000)]
    pub max_connections: usize,
    /// Largest inbound WebSocket message; larger ones close the socket with 1009.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_message_bytes: usize,
    /// Close a session after this many seconds without client messages or audio (0 = never).
    #[arg(long, default_value_t = 300.0)]
    pub idle_timeout_secs: f64,
    /// Close any session after this many seconds (0 = never).
    #[arg(long, default_value_t = 0.0)]
    pub max_session_secs: f64,
    /// Model for sessions that don't ask for one (`?model=`).
    #[arg(long, default_value = "mock-440hz")]
    pub model: String,
}

/// Redis discovery flags of `duplex serve`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DiscoveryArgs {
    /// Discover workers in this Redis (`redis://host:port`); `--worker` addresses still work.
    #[arg(long)]
    pub redis: Option<String>,
    /// Registry key prefix (workers write prefix + name).
    #[arg(long, default_value = "worker:")]
    pub registry_prefix: String,
    /// Registry TTL the workers use, in seconds: older records count as dead.
    #[arg(long, default_value_t = 30)]
    pub registry_ttl: u64,
    /// How often to re-read the registry, in milliseconds (changes also arrive at once when
    /// Redis has keyspace notifications enabled).
    #[arg(long, default_value_t = 1000)]
    pub discovery_interval_ms: u64,
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
    pub discovery: DiscoveryArgs,
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
        let workers = workers
            .iter()
            .map(|w| worker_addr(w))
            .collect::<anyhow::Result<Vec<_>>>()?;
        if args.max_message_bytes < 1024 {
            bail!("--max-message-bytes must be at least 1024");
        }
        if args.max_connections == 0 {
            bail!("--max-connections must be at least 1");
        }
        Ok(Self {
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

/// Accepts `grpc://host:port` or `host:port`; returns `host:port`.
pub fn worker_addr(url: &str) -> anyhow::Result<String> {
    let rest = url.strip_prefix("grpc://").unwrap_or(url);
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
    fn seconds_flags() {
        assert_eq!(secs("x", 0.0).unwrap(), None);
        assert_eq!(secs("x", 0.5).unwrap(), Some(Duration::from_millis(500)));
        assert!(secs("x", -1.0).is_err());
        assert!(secs("x", f64::NAN).is_err());
    }
}
