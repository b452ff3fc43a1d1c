//! The system under test when the bench runs its own: a `duplex worker` and a `duplex serve` on
//! free loopback ports, started from this very binary and killed when dropped.
//!
//! Why child processes rather than in-process servers: the orchestrator's resource figures (RSS,
//! CPU) must be its own, and start → accepting must include process start-up. Children are
//! killed on drop (so on every error path and on Ctrl-C, which unwinds the run) and, should this
//! process die without unwinding, by the kernel through `PR_SET_PDEATHSIG`.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::client::WsUrl;

/// How long a child may take to start accepting connections.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A port that was free a moment ago (bind :0, read, release).
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// One child process of the stack.
pub struct Proc {
    child: Child,
    /// What it is (`worker`, `serve`), for messages.
    pub name: &'static str,
    /// Its process id, for `/proc` readings.
    pub pid: u32,
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Where its stdout/stderr go.
    pub log: PathBuf,
    /// Process spawn → first accepted TCP connection.
    pub start_to_accepting: Duration,
}

impl Proc {
    /// Spawns `bin args...`, sending output to `log`, and waits until `addr` accepts TCP.
    pub fn spawn(
        name: &'static str,
        bin: &Path,
        args: &[String],
        addr: SocketAddr,
        log: PathBuf,
    ) -> Result<Proc> {
        Self::spawn_pinned(name, bin, args, addr, log, None)
    }

    /// [`Proc::spawn`], the child confined to `cpus` (from its first instruction, so every
    /// thread it starts inherits the mask).
    pub fn spawn_pinned(
        name: &'static str,
        bin: &Path,
        args: &[String],
        addr: SocketAddr,
        log: PathBuf,
        cpus: Option<&[usize]>,
    ) -> Result<Proc> {
        let out = std::fs::File::create(&log)
            .with_context(|| format!("create log file {}", log.display()))?;
        let err = out.try_clone().context("dup log file")?;
        let mut cmd = Command::new(bin);
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
        if std::env::var_os("RUST_LOG").is_none() {
            // Per-session info logs would cost the server CPU at thousands of sessions.
            cmd.env("RUST_LOG", "warn");
        }
        let mask = cpus.map(cpu_set);
        // SAFETY: prctl and sched_setaffinity are async-signal-safe; the closure allocates
        // nothing (the mask is built before the fork and copied in).
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if let Some(mask) = &mask {
                    if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), mask) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {} {name}", bin.display()))?;
        let pid = child.id();
        let mut p = Proc {
            child,
            name,
            pid,
            addr,
            log,
            start_to_accepting: Duration::ZERO,
        };
        p.start_to_accepting = p.wait_accepting(started)?;
        Ok(p)
    }

    /// Polls TCP connect (every 250 µs) until it succeeds; fails early if the child exits.
    fn wait_accepting(&mut self, started: Instant) -> Result<Duration> {
        loop {
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(100)).is_ok() {
                return Ok(started.elapsed());
            }
            if let Some(status) = self.child.try_wait().context("wait child")? {
                bail!(
                    "{} exited with {status} before accepting on {}; log:\n{}",
                    self.name,
                    self.addr,
                    self.log_tail()
                );
            }
            if started.elapsed() > START_TIMEOUT {
                bail!(
                    "{} did not accept on {} within {START_TIMEOUT:?}; log:\n{}",
                    self.name,
                    self.addr,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_micros(250));
        }
    }

    /// The last lines of the child's log (for error messages).
    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Whether the child is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM first so the server can shut down cleanly, SIGKILL if it lingers.
        // SAFETY: kill(2) on our own child's pid; at worst it fails with ESRCH.
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
        }
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CPU mask of `cpus`.
fn cpu_set(cpus: &[usize]) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        // SAFETY: CPU_SET bounds-checks against the set's size.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    set
}

/// The CPUs `pid`'s main thread may run on (what the kernel granted).
pub fn cpus_of(pid: u32) -> Vec<usize> {
    // SAFETY: as in `cpu_set`.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer and size describe `set`.
    let rc = unsafe {
        libc::sched_getaffinity(
            pid as libc::pid_t,
            std::mem::size_of::<libc::cpu_set_t>(),
            &mut set,
        )
    };
    if rc != 0 {
        return Vec::new();
    }
    // SAFETY: CPU_ISSET bounds-checks against the set's size.
    (0..libc::CPU_SETSIZE as usize)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

/// Confines every thread of this process to `cpus` (the generator's side of `--isolate`).
pub fn pin_self(cpus: &[usize]) -> Result<()> {
    let mask = cpu_set(cpus);
    for entry in std::fs::read_dir("/proc/self/task").context("/proc/self/task")? {
        let tid: libc::pid_t = entry?
            .file_name()
            .to_string_lossy()
            .parse()
            .context("task id")?;
        // SAFETY: the pointer and size describe `mask`.
        let rc =
            unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mask) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("sched_setaffinity");
        }
    }
    Ok(())
}

/// `--isolate`: the orchestrator (and the floor writer) on some CPUs, everything else on the
/// others.
#[derive(Clone, Debug)]
pub struct Isolation {
    /// CPUs for the orchestrator.
    pub orchestrator: Vec<usize>,
    /// CPUs for the worker and the load generator.
    pub others: Vec<usize>,
}

impl Isolation {
    /// Splits the CPUs this process may use: the first for the orchestrator, the rest for the
    /// others. Needs two.
    pub fn split() -> Result<Isolation> {
        let mine = cpus_of(0);
        match mine.split_first() {
            Some((&first, rest)) if !rest.is_empty() => Ok(Isolation {
                orchestrator: vec![first],
                others: rest.to_vec(),
            }),
            _ => anyhow::bail!("--isolate needs at least 2 CPUs; this process may use {mine:?}"),
        }
    }
}

/// How to start the stack.
#[derive(Clone, Debug)]
pub struct StackOpts {
    /// The `duplex` binary to run.
    pub bin: PathBuf,
    /// Where child logs go.
    pub log_dir: PathBuf,
    /// The mock's delay between frames (ms).
    pub mock_frame_interval_ms: u32,
    /// Extra arguments for `serve` (e.g. `--cores 1`).
    pub serve_args: Vec<String>,
    /// Extra arguments for `worker`.
    pub worker_args: Vec<String>,
    /// Sessions the worker must accept (passed as `--max-sessions` if the worker has it).
    pub worker_sessions: u32,
    /// `--isolate`: where each process runs.
    pub isolate: Option<Isolation>,
}

/// A running worker + orchestrator pair.
pub struct Stack {
    /// The orchestrator (dropped first: it holds connections to the worker).
    pub serve: Proc,
    /// The TTS worker.
    pub worker: Proc,
    /// The orchestrator's WebSocket URL.
    pub url: WsUrl,
    /// `host:port` of the orchestrator's `/metrics`.
    pub metrics: String,
    /// The options it was started with.
    pub opts: StackOpts,
}

impl Stack {
    /// Starts a worker, then an orchestrator pointing at it, on free ports.
    pub fn start(opts: &StackOpts) -> Result<Stack> {
        let worker = spawn_worker(opts)?;
        let (serve, metrics) = spawn_serve_with_metrics(opts, worker.addr)?;
        let url = WsUrl::parse(&format!("ws://{}/", serve.addr))?;
        Ok(Stack {
            serve,
            worker,
            url,
            metrics,
            opts: opts.clone(),
        })
    }

    /// Starts one more orchestrator against this stack's worker (for cold-start figures);
    /// the caller drops it when done.
    pub fn spawn_fresh_serve(&self) -> Result<Proc> {
        spawn_serve(&self.opts, self.worker.addr)
    }

    /// Starts one more orchestrator against this stack's worker with `extra` arguments;
    /// returns it and where it serves `/metrics`.
    pub fn spawn_serve_with(&self, extra: &[String]) -> Result<(Proc, String)> {
        let mut opts = self.opts.clone();
        opts.serve_args.extend(extra.iter().cloned());
        spawn_serve_with_metrics(&opts, self.worker.addr)
    }
}

fn spawn_worker(opts: &StackOpts) -> Result<Proc> {
    let port = free_port()?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let args: Vec<String> = [
        "worker",
        "--listen",
        &addr.to_string(),
        "--mock-first-frame-ms",
        "0",
        "--mock-frame-interval-ms",
        &opts.mock_frame_interval_ms.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut args = args;
    if help_mentions(&opts.bin, "worker", "--max-sessions") {
        // A worker caps its sessions (1000 by default); the sweep needs more.
        args.push("--max-sessions".into());
        args.push(opts.worker_sessions.to_string());
    }
    args.extend(opts.worker_args.iter().cloned());
    let log = opts.log_dir.join(format!("worker-{port}.log"));
    let cpus = opts.isolate.as_ref().map(|i| i.others.as_slice());
    Proc::spawn_pinned("worker", &opts.bin, &args, addr, log, cpus)
}

fn spawn_serve(opts: &StackOpts, worker: SocketAddr) -> Result<Proc> {
    spawn_serve_with_metrics(opts, worker).map(|(p, _)| p)
}

/// Starts `serve`; returns it and where it serves `/metrics` (a free admin port when the
/// binary has `--admin-listen`, else its WebSocket port, as builds before it did).
fn spawn_serve_with_metrics(opts: &StackOpts, worker: SocketAddr) -> Result<(Proc, String)> {
    let port = free_port()?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut args: Vec<String> = [
        "serve",
        "--listen",
        &addr.to_string(),
        "--worker",
        &format!("grpc://{worker}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if help_mentions(&opts.bin, "serve", "--max-connections-per-ip") {
        // Every generated session comes from 127.0.0.1.
        args.push("--max-connections-per-ip".into());
        args.push("0".into());
    }
    let mut metrics = addr.to_string();
    if help_mentions(&opts.bin, "serve", "--admin-listen") {
        let admin: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        args.push("--admin-listen".into());
        args.push(admin.to_string());
        metrics = admin.to_string();
    }
    args.extend(opts.serve_args.iter().cloned());
    let log = opts.log_dir.join(format!("serve-{port}.log"));
    let cpus = opts.isolate.as_ref().map(|i| i.orchestrator.as_slice());
    Ok((
        Proc::spawn_pinned("serve", &opts.bin, &args, addr, log, cpus)?,
        metrics,
    ))
}

/// Whether `bin sub --help` lists `flag` (so we pass it only to binaries that have it).
/// Bounded: a binary that does not answer within 5 s counts as "no".
pub fn help_mentions(bin: &Path, sub: &str, flag: &str) -> bool {
    let out = std::env::temp_dir().join(format!(
        "duplex-bench-help-{}-{sub}.txt",
        std::process::id()
    ));
    let Ok(file) = std::fs::File::create(&out) else {
        return false;
    };
    let Ok(mut child) = Command::new(bin)
        .args([sub, "--help"])
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(Stdio::null())
        .spawn()
    else {
        return false;
    };
    let until = Instant::now() + Duration::from_secs(5);
    let done = loop {
        match child.try_wait() {
            Ok(Some(_)) => break true,
            Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(5)),
            _ => break false,
        }
    };
    if !done {
        let _ = child.kill();
        let _ = child.wait();
    }
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let _ = std::fs::remove_file(&out);
    done && text
        .split(|c: char| c.is_whitespace() || c == ',' || c == '=')
        .any(|w| w == flag)
}

/// The binary to spawn: `--server-bin` or this executable.
pub fn server_bin(flag: Option<&Path>) -> Result<PathBuf> {
    match flag {
        Some(p) => Ok(p.to_path_buf()),
        None => std::env::current_exe().map_err(|e| anyhow!("cannot find own executable: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_probe_finds_flags_and_survives_missing_binaries() {
        // `sh -c` ignores "--help" here and prints its script: a stand-in for a help text.
        let dir =
            std::env::temp_dir().join(format!("duplex-bench-help-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("fake");
        std::fs::write(&script, "#!/bin/sh\necho \"  --max-sessions <N>  cap\"\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(help_mentions(&script, "worker", "--max-sessions"));
        assert!(!help_mentions(&script, "worker", "--nope"));
        assert!(!help_mentions(
            Path::new("/nonexistent/duplex"),
            "worker",
            "--max-sessions"
        ));
    }

    #[test]
    fn free_ports_are_bindable() {
        let p = free_port().unwrap();
        assert!(p > 0);
        TcpListener::bind(("127.0.0.1", p)).unwrap();
    }

    #[test]
    fn a_child_that_exits_is_reported_with_its_log() {
        let dir = std::env::temp_dir();
        let addr: SocketAddr = ([127, 0, 0, 1], free_port().unwrap()).into();
        let err = Proc::spawn(
            "sh",
            Path::new("/bin/sh"),
            &["-c".into(), "echo boom; exit 3".into()],
            addr,
            dir.join(format!("duplex-bench-test-{}.log", std::process::id())),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("exited"), "{err}");
        assert!(err.contains("boom"), "{err}");
    }

    #[test]
    fn a_running_child_is_timed_and_killed_on_drop() {
        // The test holds the listener; the child (`sleep`) only has to stay alive.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let p = Proc::spawn(
            "sleep",
            Path::new("/bin/sleep"),
            &["30".into()],
            addr,
            std::env::temp_dir().join(format!("duplex-bench-sleep-{}.log", addr.port())),
        )
        .unwrap();
        let pid = p.pid;
        assert!(p.start_to_accepting < START_TIMEOUT);
        assert!(Path::new(&format!("/proc/{pid}")).exists());
        drop(p);
        // Killed and reaped: the pid is gone (or, if reused, no longer our sleep).
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        assert_ne!(comm.trim(), "sleep");
    }
}
