//! Resource figures from `/proc` (RSS, CPU time of a process), the generator's own CPU use, the
//! machine description, and the file-descriptor limit.
//!
//! Why `/proc` and not a metrics endpoint: it works for any target process (ours or the Python
//! system, given `--pid`), costs the target nothing, and is what the kernel itself accounts.

use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use serde::Serialize;

/// One reading of a process's memory and CPU time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProcSample {
    /// Resident set size in KiB (`VmRSS`).
    pub rss_kib: u64,
    /// User + system CPU time in seconds.
    pub cpu_s: f64,
    /// When the reading was taken.
    pub at: Instant,
}

/// Reads `/proc/<pid>/status` and `/proc/<pid>/stat`.
pub fn sample(pid: u32) -> Result<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    Ok(ProcSample {
        rss_kib: parse_vmrss_kib(&status)
            .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))?,
        cpu_s: parse_stat_cpu_ticks(&stat)
            .ok_or_else(|| anyhow!("unexpected /proc/{pid}/stat format"))? as f64
            / clock_ticks(),
        at: Instant::now(),
    })
}

/// CPU use between two samples as a percentage of one core.
pub fn cpu_percent(a: &ProcSample, b: &ProcSample) -> f64 {
    let wall = b.at.saturating_duration_since(a.at).as_secs_f64();
    if wall <= 0.0 {
        return 0.0;
    }
    (b.cpu_s - a.cpu_s).max(0.0) / wall * 100.0
}

/// `VmRSS:   1234 kB` → 1234.
fn parse_vmrss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// utime + stime (fields 14 and 15) in clock ticks. The command name (field 2) may contain
/// spaces and parentheses, so fields are counted after the last `)`.
fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    // After ')': field 3 (state) is index 0, so utime (14) is index 11 and stime (15) index 12.
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions; it returns -1 for unknown names.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// CPU time (user + system, seconds) of this process, all threads: the generator's own cost.
pub fn self_cpu_s() -> f64 {
    // SAFETY: rusage is plain data; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we own; RUSAGE_SELF is always valid.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    if rc != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// The generator's CPU use over an interval, as a percentage of one core.
#[derive(Clone, Copy, Debug)]
pub struct SelfCpu {
    cpu_s: f64,
    at: Instant,
}

impl SelfCpu {
    /// Starts measuring.
    pub fn start() -> Self {
        Self {
            cpu_s: self_cpu_s(),
            at: Instant::now(),
        }
    }

    /// Percent of one core used since `start`.
    pub fn percent(&self) -> f64 {
        let wall = self.at.elapsed().as_secs_f64();
        if wall <= 0.0 {
            return 0.0;
        }
        (self_cpu_s() - self.cpu_s).max(0.0) / wall * 100.0
    }
}

/// Machine-wide CPU ticks from the first line of `/proc/stat`.
///
/// Why: on a virtual machine the host can take a vCPU away for milliseconds ("steal"); our
/// processes then stall however well they are written. Reporting the stolen share beside every
/// scenario tells a tail caused by the host from one caused by us.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTicks {
    /// user + nice + system + irq + softirq.
    pub busy: u64,
    /// Time the hypervisor ran something else while this VM wanted a CPU.
    pub steal: u64,
}

impl CpuTicks {
    /// Reads `/proc/stat` now.
    pub fn now() -> Option<CpuTicks> {
        let text = std::fs::read_to_string("/proc/stat").ok()?;
        CpuTicks::parse(text.lines().next()?)
    }

    /// Parses the aggregate `cpu ...` line.
    pub fn parse(line: &str) -> Option<CpuTicks> {
        let mut f = line.split_whitespace();
        if f.next()? != "cpu" {
            return None;
        }
        let v: Vec<u64> = f.map(|x| x.parse().ok()).collect::<Option<_>>()?;
        let at = |i: usize| v.get(i).copied().unwrap_or(0);
        Some(CpuTicks {
            busy: at(0) + at(1) + at(2) + at(5) + at(6),
            steal: at(7),
        })
    }

    /// Stolen share of the time the VM wanted to run since `earlier`, in percent.
    pub fn steal_percent_since(&self, earlier: &CpuTicks) -> Option<f64> {
        let busy = self.busy.saturating_sub(earlier.busy);
        let steal = self.steal.saturating_sub(earlier.steal);
        (busy + steal > 0).then(|| steal as f64 / (busy + steal) as f64 * 100.0)
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (thousands of sessions need thousands of
/// sockets); returns the resulting soft limit.
pub fn raise_nofile_limit() -> u64 {
    // SAFETY: get/setrlimit only read/write the struct we pass.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_cur;
            }
        }
        lim.rlim_cur
    }
}

/// The machine a report was taken on.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// Logical CPUs available to this process.
    pub cores: usize,
    /// CPU model name from `/proc/cpuinfo`.
    pub cpu_model: String,
    /// Kernel release (`/proc/sys/kernel/osrelease`).
    pub kernel: String,
    /// Total memory in MiB.
    pub mem_total_mib: u64,
    /// Build profile of this binary (and of the server it spawns): `debug` or `release`.
    pub profile: &'static str,
    /// Soft limit on open files after raising it.
    pub nofile_limit: u64,
    /// 1-minute load average when the run started (others using the machine show up here).
    pub loadavg_at_start: String,
}

impl Machine {
    /// Describes this machine.
    pub fn detect(nofile_limit: u64) -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let meminfo = read("/proc/meminfo");
        Self {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map_or_else(|| "unknown".to_string(), |(_, v)| v.trim().to_string()),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            mem_total_mib: meminfo
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
                .map_or(0, |k| k / 1024),
            profile: profile(),
            nofile_limit,
            loadavg_at_start: read("/proc/loadavg")
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        }
    }
}

/// `debug` or `release`, as this binary was built.
pub fn profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steal_is_a_share_of_wanted_time() {
        let a = CpuTicks::parse("cpu  100 0 50 1000 5 0 10 0 0 0").unwrap();
        assert_eq!(
            a,
            CpuTicks {
                busy: 160,
                steal: 0
            }
        );
        let b = CpuTicks::parse("cpu  160 0 90 2000 5 0 10 25 0 0").unwrap();
        // 100 busy ticks and 25 stolen: the VM wanted 125, the host took 20 % of them.
        assert_eq!(b.steal_percent_since(&a), Some(20.0));
        assert_eq!(a.steal_percent_since(&a), None);
        assert!(CpuTicks::parse("cpu0 1 2 3").is_none());
        assert!(CpuTicks::now().is_some());
    }

    #[test]
    fn parses_status_and_stat() {
        let status = "Name:\tduplex\nVmPeak:\t  9000 kB\nVmRSS:\t   4321 kB\nThreads:\t3\n";
        assert_eq!(parse_vmrss_kib(status), Some(4321));
        assert_eq!(parse_vmrss_kib("Name: x\n"), None);
        // pid (comm with ') (' inside) state ppid ... utime=7 stime=5
        let stat = "42 (a) (b) S 1 42 42 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 1 0 1 2 3";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(12));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn samples_this_process() {
        let s = sample(std::process::id()).unwrap();
        assert!(s.rss_kib > 0);
        assert!(s.cpu_s >= 0.0);
        assert!(sample(u32::MAX).is_err());
    }

    #[test]
    fn self_cpu_grows_with_work() {
        let c = SelfCpu::start();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        std::hint::black_box(x);
        assert!(c.percent() >= 0.0);
        assert!(self_cpu_s() > 0.0);
    }

    #[test]
    fn machine_is_described() {
        let m = Machine::detect(raise_nofile_limit());
        assert!(m.cores >= 1);
        assert!(!m.kernel.is_empty());
        assert!(["debug", "release"].contains(&m.profile));
    }
}
