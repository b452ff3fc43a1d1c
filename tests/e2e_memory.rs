//! End to end: memory a peak of sessions used goes back to the OS once they have closed.
//!
//! Without the orchestrator's idle trim, glibc kept the pages freed by thousands of small
//! allocations and RSS stayed at the peak for the life of the process. This test fails then:
//! after 300 sessions close, RSS must fall back most of the way to where it started.

mod common;

use common::*;
use std::time::{Duration, Instant};

const SESSIONS: usize = 300;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rss_returns_after_a_peak_of_sessions_closes() {
    let stack = Stack::start(&["--mock-frame-interval-ms", "0"], &[]).await;
    let pid = stack.server.proc.pid();
    let idle = rss_kib(pid);

    let mut clients = Vec::with_capacity(SESSIONS);
    for _ in 0..SESSIONS {
        clients.push(stack.server.client("format=binary").await);
    }
    for c in &mut clients {
        c.say("Memory test sentence.").await;
    }
    for c in &mut clients {
        c.collect_binary_utterance(Duration::from_secs(30))
            .await
            .assert_complete(25);
    }
    let peak = rss_kib(pid);
    assert!(
        peak > idle + 4 * 1024,
        "{SESSIONS} streaming sessions should cost MiBs (idle {idle} KiB, peak {peak} KiB); \
         the test would prove nothing"
    );
    drop(clients);

    // Half of what the peak added must be gone once every session has closed.
    let goal = idle + (peak - idle) / 2;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut now = rss_kib(pid);
    while now > goal && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        now = rss_kib(pid);
    }
    assert!(
        now <= goal,
        "RSS stayed at {now} KiB after all sessions closed (idle {idle} KiB, peak {peak} KiB)"
    );
}
