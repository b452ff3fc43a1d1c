//! The generator measures what happens: `duplex bench --url` against fake servers in this test
//! process that send frames on a known schedule.
//!
//! - exactly every 20 ms after a known 30 ms first-frame delay: FAL ≥ 30 ms and close to it,
//!   jitter near zero, every frame counted;
//! - the same with one frame 7 ms late: the 7 ms shows up in the jitter (max), the median
//!   stays near zero;
//! - a Python-like server (no pacing, no end marker, PAUSE ignored): scenarios that need what it
//!   lacks report "unsupported" and the run still succeeds.
//!
//! Tolerances are one-sided where noise can only add delay (FAL ≥ the scheduled delay, hiccup
//! ≥ 6 ms) and generous where it can't be (medians within a few ms), so a loaded machine can't
//! break them.

use std::io::ErrorKind;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tungstenite::{Message, WebSocket};

/// How a fake server behaves.
#[derive(Clone, Copy)]
struct Schedule {
    first_frame: Duration,
    /// Frame index (0-based) that is sent late, and by how much (the others stay on schedule).
    hiccup: Option<(u32, Duration)>,
    /// false: send every frame at once (no pacing).
    paced: bool,
    end_marker: bool,
}

const PERIOD: Duration = Duration::from_millis(20);
const FRAMES_PER_CHUNK: u32 = 25;

/// Sleeps until `t` precisely: coarse sleep, then spin the last millisecond.
fn sleep_until(t: Instant) {
    loop {
        let now = Instant::now();
        if now >= t {
            return;
        }
        let left = t - now;
        if left > Duration::from_micros(1500) {
            std::thread::sleep(left - Duration::from_millis(1));
        } else {
            std::hint::spin_loop();
        }
    }
}

fn audio_json(seq: u32) -> String {
    use base64::Engine as _;
    let pcm = base64::engine::general_purpose::STANDARD.encode([0u8; 1920]);
    format!(
        r#"{{"type":"audio","pcm":"{pcm}","sample_rate":48000,"frame_ms":20,"sequence":{seq}}}"#
    )
}

/// Serves one connection: session_start, then for each utterance (chunks until is_final) its
/// frames on the schedule, recording the instants frames were handed to the kernel.
fn serve_conn(stream: TcpStream, s: Schedule, sent: Arc<Mutex<Vec<Vec<Instant>>>>) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let Ok(mut ws): Result<WebSocket<TcpStream>, _> = tungstenite::accept(stream) else {
        return;
    };
    let hello = r#"{"type":"session_start","session_id":"ws-000000000000"}"#;
    if ws.send(Message::text(hello)).is_err() {
        return;
    }
    let mut chunks = 0u32;
    loop {
        let msg = match ws.read() {
            Ok(m) => m,
            Err(_) => return,
        };
        let Message::Text(t) = msg else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<Value>(t.as_str()) else {
            continue;
        };
        if v["type"] != "text" {
            continue; // control messages are ignored: this server has no PAUSE
        }
        chunks += 1;
        if v["is_final"] == Value::Bool(false) {
            continue;
        }
        let received = Instant::now();
        let n = chunks * FRAMES_PER_CHUNK;
        chunks = 0;
        let first = received + s.first_frame;
        let mut times = Vec::with_capacity(n as usize);
        for k in 0..n {
            if s.paced {
                let mut due = first + PERIOD * k;
                if let Some((i, d)) = s.hiccup {
                    if i == k {
                        due += d;
                    }
                }
                sleep_until(due);
            } else if k == 0 {
                sleep_until(first);
            }
            times.push(Instant::now());
            if ws.send(Message::text(audio_json(k + 1))).is_err() {
                return;
            }
        }
        sent.lock().unwrap().push(times);
        if s.end_marker {
            let end = format!(
                r#"{{"type":"audio","pcm":"","sample_rate":48000,"frame_ms":20,"sequence":{},"is_final":true}}"#,
                n + 1
            );
            if ws.send(Message::text(end)).is_err() {
                return;
            }
        }
    }
}

/// A fake server on a free loopback port; connections are served on their own threads.
struct Fake {
    url: String,
    sent: Arc<Mutex<Vec<Vec<Instant>>>>,
}

fn start_fake(s: Schedule) -> Fake {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ws://{}/", l.local_addr().unwrap());
    let sent = Arc::new(Mutex::new(Vec::new()));
    let sent2 = sent.clone();
    std::thread::spawn(move || {
        for stream in l.incoming() {
            match stream {
                Ok(st) => {
                    let sent = sent2.clone();
                    std::thread::spawn(move || serve_conn(st, s, sent));
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
        }
    });
    Fake { url, sent }
}

/// The bench child, killed if the test ends early.
struct Bench(Child);

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `duplex bench --url URL --quick --only ONLY --json FILE`; returns (success, stdout, json).
fn run_bench(url: &str, only: &str, json: &Path) -> (bool, String, Value) {
    let out_path = json.with_extension("out");
    let out = std::fs::File::create(&out_path).unwrap();
    let mut b = Bench(
        Command::new(env!("CARGO_BIN_EXE_duplex"))
            .args(["bench", "--quick", "--url", url, "--only", only, "--json"])
            .arg(json)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap(),
    );
    let until = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = b.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < until,
            "duplex bench did not finish within 120 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let v = std::fs::read_to_string(json)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(Value::Null);
    (status.success(), stdout, v)
}

fn scenario<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["scenarios"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("no scenario {name} in report: {report}"))
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "duplex-bench-test-{}-{name}.json",
        std::process::id()
    ))
}

/// Jitter (ms) of the frames' actual send instants, as the server saw them.
fn server_jitter_ms(times: &[Instant]) -> Vec<f64> {
    times
        .windows(2)
        .map(|w| ((w[1] - w[0]).as_secs_f64() * 1e3 - 20.0).abs())
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[test]
fn exact_schedule_gives_its_fal_and_near_zero_jitter() {
    let fake = start_fake(Schedule {
        first_frame: Duration::from_millis(30),
        hiccup: None,
        paced: true,
        end_marker: true,
    });
    let json = tmp("exact");
    let (ok, out, r) = run_bench(&fake.url, "fal_single,frame_jitter", &json);
    assert!(ok, "bench failed:\n{out}");
    assert!(out.contains("== fal_single =="), "{out}");

    let fal = &scenario(&r, "fal_single")["data"]["fal"];
    assert_eq!(fal["count"], 5, "{fal}");
    // The server waits 30 ms after reading the text: FAL can't be less, and measuring to the
    // first frame (not the last, 510 ms later) keeps the median close to it.
    assert!(num(&fal["min_ms"]) >= 29.9, "{fal}");
    assert!(num(&fal["p50_ms"]) < 45.0, "{fal}");

    let fj = scenario(&r, "frame_jitter");
    assert_eq!(fj["data"]["frames"], 50, "{fj}");
    assert_eq!(fj["data"]["frames_missing"], 0);
    let j = &fj["data"]["jitter"];
    assert_eq!(j["count"], 49, "one sample per frame after the first: {j}");
    // What the server actually did, seen from its side, agrees with what was reported.
    let sent = fake.sent.lock().unwrap();
    let last = sent.last().unwrap();
    assert_eq!(last.len(), 50);
    let truth = median(server_jitter_ms(last));
    assert!(
        (num(&j["p50_ms"]) - truth).abs() < 1.5,
        "server median {truth}, {j}"
    );
    assert!(
        r["correctness_problems"].as_array().unwrap().is_empty(),
        "{out}"
    );
}

#[test]
fn a_seven_ms_hiccup_shows_in_the_jitter() {
    // The fake server sleeps 7 ms extra before frame 21. What is under test is that the bench
    // reports what the server did, so the report is compared with the server's own send
    // instants. On this shared VM either side can be descheduled for milliseconds (the bench's
    // host-steal figures show it), which shrinks the hiccup the server produced or shifts
    // the instant the client read it; such an attempt is repeated, at most three times, and
    // the last one's verdict stands (a broken measurement fails all three).
    let mut last = String::new();
    for attempt in 1..=3 {
        match hiccup_attempt(attempt) {
            Ok(()) => return,
            Err(why) => {
                eprintln!("attempt {attempt}: {why}");
                last = why;
            }
        }
    }
    panic!("three attempts failed; the last: {last}");
}

/// One run of the hiccup check; `Err` says what did not match.
fn hiccup_attempt(attempt: u32) -> Result<(), String> {
    let fake = start_fake(Schedule {
        first_frame: Duration::from_millis(10),
        hiccup: Some((20, Duration::from_millis(7))),
        paced: true,
        end_marker: true,
    });
    let json = tmp(&format!("hiccup-{attempt}"));
    let (ok, out, r) = run_bench(&fake.url, "frame_jitter", &json);
    // A failed run is not a timing accident: no retry.
    assert!(ok, "bench failed:\n{out}");
    let truth = server_jitter_ms(fake.sent.lock().unwrap().last().unwrap());
    if truth[19].max(truth[20]) < 6.5 {
        return Err(format!("the server's hiccup was absorbed: {truth:?}"));
    }
    let d = &scenario(&r, "frame_jitter")["data"];
    let j = &d["jitter"];
    assert_eq!(j["count"], 49, "{j}");
    // Frame 21 arrives ≈ 27 ms after frame 20 and frame 22 ≈ 13 ms after it: two ≈ 7 ms
    // samples, at exactly those places (sample k is frame k+1 → k+2).
    let samples: Vec<f64> = d["jitter_samples_ms"]
        .as_array()
        .unwrap()
        .iter()
        .map(num)
        .collect();
    assert_eq!(samples.len(), 49);
    for k in [19, 20] {
        if (samples[k] - truth[k]).abs() >= 3.0 {
            return Err(format!(
                "sample {k}: reported {}, sent {}",
                samples[k], truth[k]
            ));
        }
    }
    let max = num(&j["max_ms"]);
    if max < 6.5 - 3.0 {
        return Err(format!("the hiccup must show in the maximum: {j}"));
    }
    // One hiccup must not move the median: the reported median is the server's own (on a
    // busy machine the fake server's pacing itself wobbles by milliseconds, so the reference
    // is what it did, not an ideal 0).
    let truth_median = median(truth.clone());
    if (num(&j["p50_ms"]) - truth_median).abs() >= 1.5 {
        return Err(format!(
            "the median moved: reported {j}, server's median {truth_median}"
        ));
    }
    // 7 ms late is within a frame period: not a late frame (unless the server itself fell a
    // period behind, which a descheduled fake can do: retried like the rest).
    if d["late_frames"] != 0 {
        return Err(format!("late frames reported: {d}"));
    }
    Ok(())
}

#[test]
fn missing_features_are_unsupported_not_failures() {
    // Like the Python system: frames in one burst, no end marker, PAUSE ignored.
    let fake = start_fake(Schedule {
        first_frame: Duration::from_millis(1),
        hiccup: None,
        paced: false,
        end_marker: false,
    });
    let json = tmp("compat");
    let (ok, out, r) = run_bench(&fake.url, "fal_single,barge_in,rapid_messages", &json);
    assert!(ok, "a foreign target must not fail the run:\n{out}");
    assert_eq!(scenario(&r, "barge_in")["status"], "unsupported", "{out}");
    assert_eq!(
        scenario(&r, "rapid_messages")["status"],
        "unsupported",
        "{out}"
    );
    let fal = scenario(&r, "fal_single");
    assert_eq!(fal["status"], "ok");
    assert_eq!(fal["data"]["end_markers"], 0);
    assert!(out.contains("end marker: unsupported"), "{out}");
    // A burst: every frame after the first is 20 ms off its slot.
    assert!(num(&fal["data"]["fal"]["min_ms"]) >= 0.9);
}

#[test]
fn a_paced_server_that_ignores_pause_is_reported_unsupported() {
    let fake = start_fake(Schedule {
        first_frame: Duration::from_millis(1),
        hiccup: None,
        paced: true,
        end_marker: true,
    });
    let json = tmp("nopause");
    let (ok, out, r) = run_bench(&fake.url, "barge_in", &json);
    assert!(ok, "{out}");
    let b = scenario(&r, "barge_in");
    assert_eq!(b["status"], "unsupported", "{out}");
    assert!(
        b["detail"]
            .as_str()
            .unwrap()
            .contains("PAUSE had no effect"),
        "{b}"
    );
    // Frames kept coming every 20 ms: about 15 in the 300 ms window.
    assert!(
        b["data"]["frames_after_pause"].as_u64().unwrap() >= 4,
        "{b}"
    );
}
