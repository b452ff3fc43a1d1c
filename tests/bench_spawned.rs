//! `duplex bench` in its default mode: it starts its own worker and orchestrator from this
//! binary, runs scenarios against them, stops them, and reports correctness in its exit code
//! and JSON. A short subset keeps this test quick; the full `--quick` pass is the CI smoke run.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

struct Bench(Child);

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "duplex-bench-spawned-{}-{name}",
        std::process::id()
    ))
}

/// Pids of processes whose command line mentions `needle`.
fn pids_mentioning(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains(needle) {
            out.push(pid);
        }
    }
    out
}

/// Runs `duplex bench ARGS --json J --log-dir L` (bounded to 180 s); returns its stdout, the
/// JSON report and the log directory. Panics, with the output, if the run fails.
fn run_bench(name: &str, args: &[&str]) -> (String, Value, PathBuf) {
    let json = tmp(&format!("{name}.json"));
    let logs = tmp(&format!("{name}-logs"));
    let out_path = tmp(&format!("{name}-stdout.txt"));
    let out = std::fs::File::create(&out_path).unwrap();
    let mut b = Bench(
        Command::new(env!("CARGO_BIN_EXE_duplex"))
            .arg("bench")
            .args(args)
            .arg("--json")
            .arg(&json)
            .arg("--log-dir")
            .arg(&logs)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap(),
    );
    let until = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(s) = b.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < until,
            "duplex bench did not finish within 180 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    assert!(status.success(), "bench failed:\n{stdout}");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    (stdout, r, logs)
}

#[test]
fn runs_against_its_own_stack_and_cleans_up() {
    let (_, r, logs) = run_bench(
        "report",
        &[
            "--quick",
            "--only",
            "frame_consistency,barge_in,cold_start,scale",
            "--max-sessions",
            "10",
            "--scale-secs",
            "0.5",
        ],
    );
    assert_eq!(r["quick"], true);
    assert!(r["machine"]["cores"].as_u64().unwrap() >= 1);
    assert!(["debug", "release"].contains(&r["machine"]["profile"].as_str().unwrap()));
    let names: Vec<&str> = r["scenarios"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["cold_start", "frame_consistency", "barge_in", "scale"]
    );
    for s in r["scenarios"].as_array().unwrap() {
        assert_eq!(s["status"], "ok", "{}: {s}", s["name"]);
        assert!(s["problems"].as_array().unwrap().is_empty(), "{s}");
    }
    let fc = r["scenarios"][1]["data"].clone();
    assert_eq!(fc["frame_counts"], serde_json::json!([25]), "{fc}");
    assert_eq!(fc["end_markers"], 3);
    let barge = &r["scenarios"][2]["data"];
    assert_eq!(barge["trials"], 3);
    assert_eq!(barge["interrupted_events"], 3, "{barge}");
    let steps = r["scenarios"][3]["data"]["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2, "quick sweep capped at --max-sessions 10");
    for s in steps {
        assert_eq!(s["errors"], 0, "{s}");
        assert!(s["frames"].as_u64().unwrap() > 0, "{s}");
        assert!(s["orchestrator_rss_kib_idle"].as_u64().unwrap() > 0, "{s}");
    }
    let cold = &r["scenarios"][0]["data"];
    assert_eq!(cold["start_to_accepting"]["count"], 2, "{cold}");
    // Every child it started is gone: their logs name the ports they listened on.
    for entry in std::fs::read_dir(&logs).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let port = name
            .trim_end_matches(".log")
            .rsplit('-')
            .next()
            .unwrap()
            .to_string();
        let listen = format!("127.0.0.1:{port}");
        assert!(
            pids_mentioning(&listen).is_empty(),
            "a process started by the bench still runs ({listen})"
        );
    }
}

/// One command, two configurations: the soak runs first against a baseline orchestrator (here
/// the same binary with the pacer's coalescing window off), then against ours, and the report
/// ends with the before/after table; both runs' figures are in the JSON.
#[test]
fn before_after_runs_both_and_compares() {
    let (stdout, r, logs) = run_bench(
        "compare",
        &[
            "--quick",
            "--only",
            "soak",
            "--baseline-serve-arg=--coalesce-us=0",
        ],
    );
    assert!(stdout.contains("######## BEFORE"), "{stdout}");
    assert!(stdout.contains("== before / after =="), "{stdout}");
    assert!(stdout.contains("soak · utterances completed"), "{stdout}");
    assert!(
        r["mode"].as_str().unwrap().contains("--coalesce-us=0"),
        "{}",
        r["mode"]
    );
    for side in [&r["scenarios"][0], &r["baseline"]["scenarios"][0]] {
        assert_eq!(side["name"], "soak", "{side}");
        assert_eq!(side["status"], "ok", "{side}");
        assert_eq!(side["data"]["utterances"], 400, "{side}");
        // [utterances completed, RSS KiB] pairs; the last one is taken with all 400 done.
        let checkpoints = side["data"]["rss_checkpoints"].as_array().unwrap();
        let last = checkpoints.last().expect("at least one RSS checkpoint");
        assert_eq!(last[0], 400, "{side}");
        assert!(last[1].as_u64().unwrap() > 0, "{side}");
    }
    assert!(
        logs.join("before").is_dir(),
        "baseline logs go to their own directory"
    );
}
