//! Command line: one binary, `duplex`, with a subcommand per role. The subcommand names are a
//! public interface (scripts, compose files and docs use them).

use clap::{Parser, Subcommand};

/// Real-time full-duplex voice gateway.
#[derive(Debug, Parser)]
#[command(name = "duplex", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a TTS worker (gRPC server, default 0.0.0.0:7001).
    Worker(crate::worker::WorkerArgs),
    /// Run the load generator and print the performance report.
    Bench(crate::bench::BenchArgs),
}

/// Runs the chosen subcommand to completion.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Worker(args) => crate::worker::run(args),
        Command::Bench(args) => crate::bench::run(args),
    }
}
