//! The TTS worker: gRPC `tts.TTSService`. (placeholder: being written)

/// Flags of `duplex worker`.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// Address to listen on for gRPC.
    #[arg(long, default_value = "0.0.0.0:7001")]
    pub listen: String,
}

/// Runs the worker until SIGINT/SIGTERM.
pub fn run(_args: WorkerArgs) -> anyhow::Result<()> {
    anyhow::bail!("worker: not built yet")
}
