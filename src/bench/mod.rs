//! `duplex bench`: the load generator and performance report. (placeholder: being written)

/// Flags of `duplex bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Run a short CI-sized pass.
    #[arg(long)]
    pub quick: bool,
}

/// Runs the benchmark.
pub fn run(_args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("bench: not built yet")
}
