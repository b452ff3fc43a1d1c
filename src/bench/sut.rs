//! The system under test: either a stack this bench starts (default) or a server someone else
//! runs (`--url`, optionally `--pid` for resource figures).
//!
//! Why one type: scenarios ask "where do I connect", "which process do I measure" and "may I
//! restart it" without caring which mode they run in, and the report states the mode once.

use anyhow::{anyhow, Result};

use super::client::WsUrl;
use super::procfs::{self, ProcSample};
use super::stack::{Proc, Stack, StackOpts};

/// Where the bench sends its traffic.
pub enum Sut {
    /// Our own worker + orchestrator, (re)started as scenarios need.
    Spawned {
        /// How to start it.
        opts: StackOpts,
        /// The running stack, if any.
        stack: Option<Box<Stack>>,
    },
    /// A server we did not start.
    External {
        /// Its WebSocket URL.
        url: WsUrl,
        /// Its process id, if given (for `/proc` figures).
        pid: Option<u32>,
    },
}

impl Sut {
    /// Makes sure the stack runs with the mock producing a frame every `interval_ms`; restarts
    /// it if it runs with another interval or has died. No-op for external targets.
    pub fn prepare(&mut self, interval_ms: u32) -> Result<()> {
        if let Sut::Spawned { opts, stack } = self {
            let healthy = match stack {
                Some(s) => {
                    s.opts.mock_frame_interval_ms == interval_ms
                        && s.serve.alive()
                        && s.worker.alive()
                }
                None => false,
            };
            if !healthy {
                // Stop the old one first: its ports and CPU are not to be shared.
                *stack = None;
                let mut o = opts.clone();
                o.mock_frame_interval_ms = interval_ms;
                *stack = Some(Box::new(Stack::start(&o)?));
            }
        }
        Ok(())
    }

    /// How a spawned stack is started (`None` for an external target): scenarios that run
    /// their own processes (chaos) take the binary, log directory and extra flags from it.
    pub fn opts(&self) -> Option<&StackOpts> {
        match self {
            Sut::Spawned { opts, .. } => Some(opts),
            Sut::External { .. } => None,
        }
    }

    /// Stops the running stack, if any (the next [`Sut::prepare`] starts a new one), so a
    /// scenario with processes of its own has the CPU to itself.
    pub fn stop(&mut self) {
        if let Sut::Spawned { stack, .. } = self {
            *stack = None;
        }
    }

    /// The orchestrator's WebSocket URL.
    pub fn url(&self) -> Result<WsUrl> {
        match self {
            Sut::Spawned { stack: Some(s), .. } => Ok(s.url.clone()),
            Sut::Spawned { stack: None, .. } => Err(anyhow!("the stack is not running")),
            Sut::External { url, .. } => Ok(url.clone()),
        }
    }

    /// Where the orchestrator serves `/metrics`: its admin listener when we started it with
    /// one, else the WebSocket port (older builds and external targets).
    pub fn metrics_authority(&self) -> Option<String> {
        match self {
            Sut::Spawned { stack: Some(s), .. } => Some(s.metrics.clone()),
            Sut::Spawned { stack: None, .. } => None,
            Sut::External { url, .. } => Some(url.authority()),
        }
    }

    /// The orchestrator's pid, if known.
    pub fn pid(&self) -> Option<u32> {
        match self {
            Sut::Spawned { stack, .. } => stack.as_ref().map(|s| s.serve.pid),
            Sut::External { pid, .. } => *pid,
        }
    }

    /// The worker's pid (spawned mode only).
    pub fn worker_pid(&self) -> Option<u32> {
        match self {
            Sut::Spawned { stack, .. } => stack.as_ref().map(|s| s.worker.pid),
            Sut::External { .. } => None,
        }
    }

    /// A `/proc` reading of the orchestrator, if we know its pid and it is readable.
    pub fn sample(&self) -> Option<ProcSample> {
        self.pid().and_then(|p| procfs::sample(p).ok())
    }

    /// A `/proc` reading of the worker (spawned mode).
    pub fn sample_worker(&self) -> Option<ProcSample> {
        self.worker_pid().and_then(|p| procfs::sample(p).ok())
    }

    /// Whether this bench started the target (so it must meet our protocol to the letter).
    pub fn spawned(&self) -> bool {
        matches!(self, Sut::Spawned { .. })
    }

    /// Starts a fresh orchestrator against the running worker (cold start); spawned mode only.
    pub fn fresh_serve(&self) -> Option<Result<Proc>> {
        match self {
            Sut::Spawned { stack: Some(s), .. } => Some(s.spawn_fresh_serve()),
            _ => None,
        }
    }

    /// Starts one more orchestrator with `extra` arguments against the running worker;
    /// spawned mode only. Returns it and where it serves `/metrics`.
    pub fn spawn_serve_with(&self, extra: &[String]) -> Option<Result<(Proc, String)>> {
        match self {
            Sut::Spawned { stack: Some(s), .. } => Some(s.spawn_serve_with(extra)),
            _ => None,
        }
    }

    /// The duplex binary the bench starts (spawned mode).
    pub fn bin(&self) -> Option<&std::path::Path> {
        match self {
            Sut::Spawned { opts, .. } => Some(&opts.bin),
            Sut::External { .. } => None,
        }
    }

    /// `--isolate`: the CPUs the orchestrator (and the floor writer) run on.
    pub fn orchestrator_cpus(&self) -> Option<Vec<usize>> {
        match self {
            Sut::Spawned { opts, .. } => opts.isolate.as_ref().map(|i| i.orchestrator.clone()),
            Sut::External { .. } => None,
        }
    }

    /// Where spawned processes write their logs (and scenarios their scratch files).
    pub fn log_dir(&self) -> Option<&std::path::Path> {
        match self {
            Sut::Spawned { opts, .. } => Some(&opts.log_dir),
            Sut::External { .. } => None,
        }
    }

    /// How the audio is produced, for the scenario's setup line.
    pub fn mock_desc(&self) -> String {
        match self {
            Sut::Spawned { stack: Some(s), .. } => format!(
                "mock first frame 0 ms, frame interval {} ms",
                s.opts.mock_frame_interval_ms
            ),
            Sut::Spawned { stack: None, .. } => "not running".to_string(),
            Sut::External { .. } => "target's own TTS".to_string(),
        }
    }

    /// A one-line description of the mode for the report header.
    pub fn describe(&self) -> String {
        match self {
            Sut::Spawned { opts, stack } => format!(
                "spawned: {} worker + serve on loopback (serve args: {:?}, worker args: {:?}, \
                 worker --max-sessions {} where supported){}",
                opts.bin.display(),
                opts.serve_args,
                opts.worker_args,
                opts.worker_sessions,
                match (&opts.isolate, stack) {
                    (Some(i), Some(s)) => format!(
                        "; --isolate asked orchestrator {:?}, worker + generator {:?}; \
                         granted orchestrator {:?}, worker {:?}, generator {:?}",
                        i.orchestrator,
                        i.others,
                        super::stack::cpus_of(s.serve.pid),
                        super::stack::cpus_of(s.worker.pid),
                        super::stack::cpus_of(0)
                    ),
                    (Some(i), None) => format!(
                        "; --isolate: orchestrator on {:?}, worker + generator on {:?}",
                        i.orchestrator, i.others
                    ),
                    _ => String::new(),
                }
            ),
            Sut::External { url, pid } => format!(
                "external target ws://{}{} (resource figures: {})",
                url.authority(),
                url.path,
                pid.map_or_else(|| "n/a, no --pid".to_string(), |p| format!("pid {p}"))
            ),
        }
    }
}
