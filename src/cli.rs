//! Command line: one binary, `duplex`, with a subcommand per role. The subcommand names are a
//! public interface (scripts, compose files and docs use them).

use clap::{Parser, Subcommand, ValueEnum};

use crate::gateway::config::{Config, OrchestratorArgs};

/// Real-time full-duplex voice gateway.
#[derive(Debug, Parser)]
#[command(name = "duplex", version, about)]
pub struct Cli {
    /// Log format: human-readable text, or one JSON object per line for production.
    #[arg(
        long,
        value_enum,
        default_value = "text",
        global = true,
        env = "DUPLEX_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// Log output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the orchestrator: WebSocket clients in, gRPC TTS workers out.
    Serve(ServeArgs),
    /// Orchestrator and a TTS worker in one process, no Redis: hear audio with one command.
    Demo(DemoArgs),
    /// Run a TTS worker (gRPC server).
    Worker(crate::worker::WorkerArgs),
    /// Run the load generator and print the performance report.
    Bench(crate::bench::BenchArgs),
    // [speech] CLI client of the WebSocket protocol.
    /// Speak a text (or each stdin line) through an orchestrator; save a WAV or pipe raw PCM.
    Say(crate::client::SayArgs),
    /// Mint an HS256 token for a gateway started with `--jwt-secret-file` (for trying it out).
    Token(crate::gateway::auth::TokenArgs),
    /// Write a self-signed certificate and key (cert.pem, key.pem) for trying `--tls-cert`.
    Cert(crate::gateway::tls::CertArgs),
    /// The bench's paced-writer floor (spawned by `duplex bench`; see src/bench/floor_writer.rs).
    #[command(hide = true)]
    FloorWriter(crate::bench::floor_writer::FloorWriterArgs),
}

/// Flags of `duplex serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address for WebSocket clients and the HTTP admin endpoints.
    #[arg(long, default_value = "0.0.0.0:8080", env = "DUPLEX_LISTEN")]
    pub listen: String,
    /// TTS worker address (grpc://HOST:PORT); repeat for several workers. Needed unless
    /// `--redis` discovers them.
    #[arg(long = "worker", env = "DUPLEX_WORKERS", value_delimiter = ',',
        required_unless_present_any = ["redis", "redis_url_file"])]
    pub workers: Vec<String>,
    #[command(flatten)]
    pub discovery: crate::gateway::config::DiscoveryArgs,
    #[command(flatten)]
    pub orchestrator: OrchestratorArgs,
}

/// Flags of `duplex demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Address for WebSocket clients, the web page and the admin endpoints.
    #[arg(long, default_value = "127.0.0.1:8080", env = "DUPLEX_LISTEN")]
    pub listen: String,
    /// Delay before the mock voice's first frame, in milliseconds.
    #[arg(long, default_value_t = 0, env = "DUPLEX_MOCK_FIRST_FRAME_MS")]
    pub mock_first_frame_ms: u64,
    /// Interval between the mock voice's frames, in milliseconds.
    #[arg(long, default_value_t = 5, env = "DUPLEX_MOCK_FRAME_INTERVAL_MS")]
    pub mock_frame_interval_ms: u64,
    #[command(flatten)]
    pub orchestrator: OrchestratorArgs,
}

/// Runs the chosen subcommand to completion.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    init_logging(cli.log_format);
    match cli.command {
        Command::Serve(args) => {
            let mut config = Config::new(&args.listen, &args.workers, &args.orchestrator)?;
            config.discovery = args.discovery.resolved()?;
            // Handlers first: a SIGTERM right after "listening" must be a clean shutdown.
            let signals = Signals::install()?;
            let orchestrator = crate::gateway::Orchestrator::start(config)?;
            signals.wait(|| orchestrator.reload());
            tracing::info!("draining, then shutting down");
            orchestrator.shutdown();
            Ok(())
        }
        Command::Demo(mut args) => {
            let signals = Signals::install()?;
            // [speech] Real speech by default: the espeak voice when espeak-ng is installed and
            // --model was not given; the chosen voice is preloaded so the first text is warm.
            let voice = demo_voice(&mut args);
            let preload = match &voice {
                DemoVoice::Espeak { .. } => vec![args.orchestrator.model.clone()],
                DemoVoice::Chosen | DemoVoice::MockOnly { .. } => Vec::new(),
            };
            let worker = crate::worker::spawn(crate::worker::WorkerArgs {
                listen: "127.0.0.1:0".into(),
                mock_first_frame_ms: args.mock_first_frame_ms,
                mock_frame_interval_ms: args.mock_frame_interval_ms,
                preload,
                ..crate::worker::WorkerArgs::default()
            })?;
            let worker_url = format!("grpc://{}", worker.local_addr());
            let config = Config::new(&args.listen, &[worker_url], &args.orchestrator)?;
            let model = config.model.clone();
            let (ws, http) = if config.tls.tls_cert.is_some() {
                ("wss", "https")
            } else {
                ("ws", "http")
            };
            let orchestrator = crate::gateway::Orchestrator::start(config)?;
            let addr = orchestrator.local_addr();
            println!("duplex demo: {ws}://{addr}/   web page: {http}://{addr}/");
            match voice {
                DemoVoice::Espeak { version } => println!(
                    "  voice: {model} (espeak-ng {version}); switch with --model ID or ?model=ID \
                     (e.g. espeak-en-gb, espeak-de, mock-440hz)"
                ),
                DemoVoice::MockOnly { reason } => println!(
                    "  voice: {model} (a 440 Hz test tone: {reason}); switch with --model ID or ?model=ID"
                ),
                DemoVoice::Chosen => println!(
                    "  voice: {model} (from --model); switch with --model ID or ?model=ID \
                     (e.g. espeak-en-us, mock-440hz)"
                ),
            }
            println!("  try: duplex say \"Hello world\" --url ws://{addr}/ --out hello.wav");
            if let Some(admin) = orchestrator.admin_addr() {
                println!("  health: http://{admin}/health   metrics: http://{admin}/metrics");
            }
            signals.wait(|| orchestrator.reload());
            orchestrator.shutdown();
            worker.shutdown();
            Ok(())
        }
        Command::Worker(args) => crate::worker::run(args),
        Command::Bench(args) => crate::bench::run(args),
        Command::Say(args) => crate::client::run(args),
        Command::Token(args) => {
            println!("{}", crate::gateway::auth::mint(&args)?);
            Ok(())
        }
        Command::Cert(args) => crate::gateway::tls::write_self_signed(&args),
        Command::FloorWriter(args) => crate::bench::floor_writer::run(args),
    }
}

// [speech] How `duplex demo` chose its voice.
enum DemoVoice {
    /// No --model: the espeak voice.
    Espeak { version: String },
    /// No --model and no espeak-ng: the mock, and why.
    MockOnly { reason: String },
    /// --model was given.
    Chosen,
}

/// The voice `duplex demo` uses when `--model` is not given.
pub const DEMO_VOICE: &str = "espeak-en-us";

/// [speech] Sets the demo's model to [`DEMO_VOICE`] unless `--model` was on the command line.
fn demo_voice(args: &mut DemoArgs) -> DemoVoice {
    if model_flag_given() {
        return DemoVoice::Chosen;
    }
    match crate::worker::espeak::Espeak::detect(crate::worker::espeak::DEFAULT_BINARY) {
        Ok(e) if e.voice(DEMO_VOICE).is_some() => {
            args.orchestrator.model = DEMO_VOICE.to_owned();
            DemoVoice::Espeak {
                version: e.version().to_owned(),
            }
        }
        Ok(_) => DemoVoice::MockOnly {
            reason: format!("espeak-ng has no {DEMO_VOICE} voice"),
        },
        Err(e) => DemoVoice::MockOnly {
            reason: e.to_string(),
        },
    }
}

/// [speech] True when `duplex demo` got `--model` on its command line (its default value is a
/// real id, so only clap's value source can tell "asked for the mock" from "said nothing").
fn model_flag_given() -> bool {
    use clap::{parser::ValueSource, CommandFactory};
    Cli::command()
        .try_get_matches_from(std::env::args_os())
        .ok()
        .and_then(|m| {
            m.subcommand_matches("demo")
                .and_then(|d| d.value_source("model"))
        })
        == Some(ValueSource::CommandLine)
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    // A second init (tests calling `run` twice) is harmless, so its error is ignored.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// SIGINT/SIGTERM/SIGHUP handlers, installed before anything starts listening so that a
/// signal arriving right after start-up is a clean shutdown rather than the default kill.
struct Signals {
    rt: tokio::runtime::Runtime,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (term, int, hup) = rt.block_on(async {
            anyhow::Ok((
                signal(SignalKind::terminate())?,
                signal(SignalKind::interrupt())?,
                signal(SignalKind::hangup())?,
            ))
        })?;
        Ok(Self { rt, term, int, hup })
    }

    /// Blocks until SIGINT or SIGTERM; runs `reload` on each SIGHUP meanwhile.
    fn wait(mut self, reload: impl Fn()) {
        self.rt.block_on(async {
            loop {
                tokio::select! {
                    _ = self.term.recv() => return,
                    _ = self.int.recv() => return,
                    _ = self.hup.recv() => reload(),
                }
            }
        });
    }
}
