//! The TTS worker (placeholder until the worker branch lands; keeps `main` compiling).
use std::net::SocketAddr;

/// Flags of `duplex worker`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct WorkerArgs {
    /// Address to listen on for gRPC.
    #[arg(long, default_value = "0.0.0.0:7001")]
    pub listen: String,
    /// Delay before the first mock frame, in ms.
    #[arg(long, default_value_t = 0)]
    pub mock_first_frame_ms: u64,
    /// Delay between mock frames, in ms.
    #[arg(long, default_value_t = 5)]
    pub mock_frame_interval_ms: u64,
}

/// Runs the worker.
pub fn run(_args: WorkerArgs) -> anyhow::Result<()> {
    anyhow::bail!("worker: not built yet")
}

/// A worker running on its own thread.
pub struct WorkerHandle;

impl WorkerHandle {
    /// Bound address.
    pub fn local_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }
    /// Stops the worker.
    pub fn shutdown(self) {}
}

/// Starts the worker on its own thread.
pub fn spawn(_args: WorkerArgs) -> anyhow::Result<WorkerHandle> {
    anyhow::bail!("worker: not built yet")
}
