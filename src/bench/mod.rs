//! `duplex bench`: the load generator and performance report.
//!
//! One command measures the seed's ten performance tests, barge-in, a scale sweep to thousands
//! of streaming sessions and the physical floor, on our system (default: it starts its own
//! worker and orchestrator from this binary) or on any server speaking the JSON protocol
//! (`--url`, e.g. the Python system, for comparison runs).
//!
//! Layout: [`client`] is the timestamping WebSocket client, [`utterance`] the per-utterance
//! measurement (the definitions), [`stats`] the histograms, [`procfs`] resource figures,
//! [`stack`]/[`sut`] the system under test, [`floor`] the echo server for the floor, `scenarios`
//! the fifteen scenarios, and [`report`] the tables and JSON.
//!
//! Exit status: non-zero only when correctness fails (frames lost, sequences wrong, end markers
//! missing, a scenario could not run) — never because a speed target was missed.

pub mod client;
pub mod floor;
pub mod floor_writer;
pub mod procfs;
pub mod report;
mod scenarios;
pub mod server_metrics;
pub mod stack;
pub mod stats;
pub mod sut;
pub mod utterance;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use report::{ScenarioReport, Status};
use stats::Summary;
use sut::Sut;

/// Scenario names in the order they run. Stable: `--only`, the JSON report and CI use them.
pub const SCENARIOS: &[&str] = &[
    "floor",
    "fal_single",
    "fal_concurrent_3",
    "fal_concurrent_10",
    "frame_jitter",
    "throughput",
    "latency_percentiles",
    "cold_start",
    "frame_consistency",
    "rapid_messages",
    "long_session",
    "barge_in",
    "floor_writer",
    "scale",
    "tls",
    "soak",
    "chaos",
];

/// Scenarios that run only when named in `--only`: chaos takes about two minutes and kills
/// and restarts processes, which a default performance run should not do.
pub const ON_REQUEST: &[&str] = &["chaos"];

/// Audio format for the scale sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WireFormat {
    /// JSON text frames with base64 PCM.
    Json,
    /// Binary frames: 8-byte header + PCM.
    Binary,
}

/// Flags of `duplex bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Run a short CI-sized pass (< 60 s) that checks correctness only.
    #[arg(long)]
    pub quick: bool,
    /// Run the `tls` scenario (TLS against plain TCP, FAL and CPU per frame in one run) besides
    /// those `--only` names; alone, the same as `--only tls`.
    #[arg(long)]
    pub tls: bool,
    /// Run only these scenarios (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "NAME,...",
        value_parser = clap::builder::PossibleValuesParser::new(SCENARIOS)
    )]
    pub only: Vec<String>,
    /// Benchmark an already running server instead of starting our own.
    #[arg(long, value_name = "ws://HOST:PORT/PATH")]
    pub url: Option<String>,
    /// With --url: the server's pid, for RSS/CPU figures from /proc.
    #[arg(long, requires = "url")]
    pub pid: Option<u32>,
    /// Write the full report (every number, machine, definitions) as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Extend the scale sweep beyond 2000 sessions up to N (doubling, then N).
    #[arg(long, default_value_t = 2000, value_name = "N")]
    pub max_sessions: u32,
    /// Seconds each scale step is measured for (default 10, 1.5 with --quick).
    #[arg(long, value_name = "SECS")]
    pub scale_secs: Option<f64>,
    /// After the scale sweep, bisect between the last step with jitter p99 < 2 ms and the
    /// first without (to within 1/8 of the lower bound) and report that capacity figure: the
    /// sweep's doubling steps alone can only say 100 when the answer is 600.
    #[arg(long)]
    pub capacity_search: bool,
    /// Audio format of the scale sweep.
    #[arg(long, value_enum, default_value_t = WireFormat::Binary)]
    pub scale_format: WireFormat,
    /// The duplex binary to start as worker and orchestrator (default: this one).
    #[arg(long, value_name = "PATH")]
    pub server_bin: Option<PathBuf>,
    /// Extra argument for the orchestrator we start (repeatable), e.g. --serve-arg=--cores=1.
    #[arg(long = "serve-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub serve_args: Vec<String>,
    /// Extra argument for the worker we start (repeatable), e.g. --worker-arg=--name=bench.
    #[arg(long = "worker-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub worker_args: Vec<String>,
    /// Run the selected scenarios twice, first against this binary ("before"), then against
    /// --server-bin ("after"), and end with a before/after table of every shared figure.
    #[arg(long, value_name = "PATH", conflicts_with = "url")]
    pub baseline_bin: Option<PathBuf>,
    /// Orchestrator argument for the "before" run only (repeatable). Without --baseline-bin it
    /// compares two configurations of the same binary, e.g. --baseline-serve-arg=--coalesce-us=0.
    #[arg(
        long = "baseline-serve-arg",
        value_name = "ARG",
        allow_hyphen_values = true,
        conflicts_with = "url"
    )]
    pub baseline_serve_args: Vec<String>,
    /// Pin the orchestrator (and the floor writer) to one CPU and the worker and this load
    /// generator to the others, so the orchestrator's per-frame cost and one-core capacity are
    /// measured without its neighbours (the header reports what the kernel granted).
    #[arg(long, conflicts_with = "url")]
    pub isolate: bool,
    /// Directory for the spawned processes' logs (default: a temp directory).
    #[arg(long, value_name = "DIR")]
    pub log_dir: Option<PathBuf>,
}

/// The state every scenario gets.
pub(crate) struct Ctx {
    /// The flags.
    pub args: BenchArgs,
    /// Where traffic goes.
    pub sut: Sut,
    /// The floor's round trip, once measured (FAL ratios are reported against it).
    pub floor: Option<Summary>,
    /// The paced-writer floors, once measured (scale's CPU per frame is reported against them).
    pub floor_cpu: Vec<scenarios::FloorCpu>,
}

impl Ctx {
    /// Picks the full or the quick figure.
    pub fn n<T>(&self, full: T, quick: T) -> T {
        if self.args.quick {
            quick
        } else {
            full
        }
    }
}

/// Runs the benchmark: prints the tables, writes the JSON, fails only on correctness.
pub fn run(args: BenchArgs) -> Result<()> {
    let mut only = args.only.clone();
    if args.tls && !only.iter().any(|o| o == "tls") {
        only.push("tls".into());
    }
    let selected = select(&only)?;
    let nofile = procfs::raise_nofile_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bench")
        .build()
        .context("tokio runtime")?;
    let result = rt.block_on(async {
        tokio::select! {
            r = run_all(args, selected, nofile) => r,
            _ = tokio::signal::ctrl_c() => bail!("interrupted; servers stopped"),
        }
    });
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    result
}

/// Whether this run starts its own servers (no `--url`).
fn ctx_spawns(args: &BenchArgs) -> bool {
    args.url.is_none()
}

/// Validates `--only` and returns the scenarios to run, in order.
fn select(only: &[String]) -> Result<Vec<&'static str>> {
    for name in only {
        if !SCENARIOS.contains(&name.as_str()) {
            bail!("unknown scenario {name:?}; known: {}", SCENARIOS.join(", "));
        }
    }
    Ok(SCENARIOS
        .iter()
        .copied()
        .filter(|s| {
            if only.is_empty() {
                !ON_REQUEST.contains(s)
            } else {
                only.iter().any(|o| o == s)
            }
        })
        .collect())
}

async fn run_all(args: BenchArgs, selected: Vec<&'static str>, nofile: u64) -> Result<()> {
    let machine = procfs::Machine::detect(nofile);
    let log_dir = match &args.log_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("duplex-bench-{}", std::process::id())),
    };
    std::fs::create_dir_all(&log_dir)
        .with_context(|| format!("create log dir {}", log_dir.display()))?;
    let isolate = if args.isolate {
        let i = stack::Isolation::split()?;
        stack::pin_self(&i.others)?;
        Some(i)
    } else {
        None
    };
    let spawned = |bin: Option<&std::path::Path>, serve_args: &[String], dir: PathBuf| {
        Ok::<_, anyhow::Error>(Sut::Spawned {
            opts: stack::StackOpts {
                bin: stack::server_bin(bin)?,
                log_dir: dir,
                mock_frame_interval_ms: 0,
                serve_args: serve_args.to_vec(),
                worker_args: args.worker_args.clone(),
                worker_sessions: args.max_sessions.saturating_mul(2).max(10_000),
                isolate: isolate.clone(),
            },
            stack: None,
        })
    };
    let sut = match &args.url {
        Some(u) => Sut::External {
            url: client::WsUrl::parse(u)?,
            pid: args.pid,
        },
        None => spawned(
            args.server_bin.as_deref(),
            &args.serve_args,
            log_dir.clone(),
        )?,
    };
    let baseline = if args.baseline_bin.is_some() || !args.baseline_serve_args.is_empty() {
        let dir = log_dir.join("before");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("create log dir {}", dir.display()))?;
        let bin = args.baseline_bin.as_deref().or(args.server_bin.as_deref());
        Some(spawned(bin, &args.baseline_serve_args, dir)?)
    } else {
        None
    };
    let mut mode = format!(
        "{} run; {}; child logs in {}",
        if args.quick { "quick" } else { "full" },
        sut.describe(),
        log_dir.display()
    );
    if let Some(b) = &baseline {
        mode = format!("{mode}; before/after against {}", b.describe());
    }
    println!("{}", report::render_header(&machine, &mode));
    if machine.profile == "debug" && ctx_spawns(&args) {
        println!(
            "note: this is a debug build, and so are the servers it starts; timing figures are \
             not representative (build with --release, e.g. `just bench`)\n"
        );
    }
    let started = Instant::now();
    let gen_cpu = procfs::SelfCpu::start();
    let before = match baseline {
        Some(b) => {
            println!("\n######## BEFORE: {}", b.describe());
            let pass = run_pass(&args, b, &selected).await;
            println!("\n######## AFTER: {}", sut.describe());
            Some(pass)
        }
        None => None,
    };
    let (reports, floor) = run_pass(&args, sut, &selected).await;
    if let Some((b, _)) = &before {
        print!("{}", report::render_comparison(b, &reports));
    }
    let total_s = started.elapsed().as_secs_f64();
    let problems = problems_of(&reports);
    // A baseline is expected to fall short; its problems are reported, never fatal.
    let baseline_problems = before.as_ref().map(|(b, _)| problems_of(b));
    println!(
        "\ntotal {:.1} s, generator CPU {:.0} % of a core on average",
        total_s,
        gen_cpu.percent()
    );
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "tool": "duplex bench",
            "version": env!("CARGO_PKG_VERSION"),
            "quick": args.quick,
            "mode": mode,
            "command": std::env::args().collect::<Vec<_>>(),
            "started_unix_s": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64() - total_s),
            "machine": machine,
            "definitions": report::DEFINITIONS
                .iter()
                .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
                .collect::<serde_json::Map<_, _>>(),
            "floor_rtt": floor,
            "scenarios": reports,
            "baseline": before.as_ref().map(|(b, f)| serde_json::json!({
                "floor_rtt": f,
                "scenarios": b,
                "correctness_problems": baseline_problems,
            })),
            "total_s": total_s,
            "generator_cpu_percent": gen_cpu.percent(),
            "correctness_problems": problems,
        });
        let text = serde_json::to_string_pretty(&doc)?;
        std::fs::write(path, text).with_context(|| format!("write {}", path.display()))?;
        println!("JSON report written to {}", path.display());
    }
    if let Some(bp) = baseline_problems.filter(|p| !p.is_empty()) {
        println!("baseline (before) correctness problems, not counted:");
        for p in &bp {
            println!("  - {p}");
        }
    }
    if problems.is_empty() {
        println!("correctness: ok (speed figures never fail the run)");
        Ok(())
    } else {
        println!("correctness: FAILED");
        for p in &problems {
            println!("  - {p}");
        }
        bail!(
            "{} correctness problem(s); see the tables above",
            problems.len()
        )
    }
}

/// Runs `selected` against `sut`, printing each table as it completes; stops the servers it
/// started before returning the reports and the floor.
async fn run_pass(
    args: &BenchArgs,
    sut: Sut,
    selected: &[&'static str],
) -> (Vec<ScenarioReport>, Option<Summary>) {
    let mut ctx = Ctx {
        args: args.clone(),
        sut,
        floor: None,
        floor_cpu: Vec::new(),
    };
    let mut reports: Vec<ScenarioReport> = Vec::new();
    // FAL ratios need the floor even when it is not selected; measure it quietly then.
    let needs_floor = selected.iter().any(|s| {
        !matches!(
            *s,
            "floor" | "floor_writer" | "scale" | "soak" | "tls" | "chaos"
        )
    });
    if needs_floor && !selected.contains(&"floor") {
        let r = scenarios::run_one("floor", &mut ctx).await;
        ctx.floor = r
            .data
            .get("rtt")
            .and_then(|v| serde_json::from_value(v.clone()).ok());
    }
    for name in selected {
        let r = scenarios::run_one(name, &mut ctx).await;
        if *name == "floor" {
            ctx.floor = r
                .data
                .get("rtt")
                .and_then(|v| serde_json::from_value(v.clone()).ok());
        }
        print!("{}", r.render());
        reports.push(r);
    }
    (reports, ctx.floor)
}

/// Every correctness problem of `reports`, prefixed with its scenario.
fn problems_of(reports: &[ScenarioReport]) -> Vec<String> {
    reports
        .iter()
        .flat_map(|r| {
            let mut p: Vec<String> = r
                .problems
                .iter()
                .map(|p| format!("{}: {p}", r.name))
                .collect();
            if let Status::Error(e) = &r.status {
                p.push(format!("{}: could not run: {e}", r.name));
            }
            p
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selects_in_canonical_order_and_rejects_unknown_names() {
        assert_eq!(
            select(&[]).unwrap().len(),
            SCENARIOS.len() - ON_REQUEST.len()
        );
        assert!(
            !select(&[]).unwrap().contains(&"chaos"),
            "chaos on request only"
        );
        assert_eq!(select(&["chaos".into()]).unwrap(), vec!["chaos"]);
        let s = select(&["scale".into(), "fal_single".into()]).unwrap();
        assert_eq!(s, vec!["fal_single", "scale"]);
        let e = select(&["nope".into()]).unwrap_err().to_string();
        assert!(e.contains("unknown scenario"), "{e}");
    }

    #[test]
    fn scenario_names_are_stable_identifiers() {
        // Names are an interface (`--only`, the JSON report, CI): the ones published stay.
        for old in [
            "floor",
            "fal_single",
            "fal_concurrent_3",
            "fal_concurrent_10",
            "frame_jitter",
            "throughput",
            "latency_percentiles",
            "cold_start",
            "frame_consistency",
            "rapid_messages",
            "long_session",
            "barge_in",
            "scale",
            "soak",
        ] {
            assert!(SCENARIOS.contains(&old), "{old} disappeared");
        }
        let unique: std::collections::HashSet<_> = SCENARIOS.iter().collect();
        assert_eq!(unique.len(), SCENARIOS.len(), "duplicate names");
        for s in SCENARIOS {
            assert!(s
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit()));
        }
    }
}
