//! `duplex say` against a real `duplex demo`: the WAV it writes is read back by an independent
//! reader (hound), raw PCM goes to stdout, interactive mode obeys its commands, and failures
//! are clear one-line errors. Needs espeak-ng (the demo's default voice); fails saying so.
//! Every child is killed on drop and every wait is bounded.

use std::io::{Read, Write};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);

fn require_espeak() {
    let ok = Command::new("espeak-ng")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "espeak-ng is not installed: these tests need it (apt-get install espeak-ng; \
         scripts/test-all.sh installs it)"
    );
}

/// `duplex demo` on a free port, killed on drop.
struct Demo {
    child: Child,
    addr: String,
}

impl Demo {
    fn start(extra: &[&str]) -> Demo {
        require_espeak();
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let addr = format!("127.0.0.1:{port}");
            let mut child = Command::new(env!("CARGO_BIN_EXE_duplex"))
                .args(["demo", "--listen", &addr])
                .args(extra)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn duplex demo");
            let t0 = Instant::now();
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if std::net::TcpStream::connect(&addr).is_ok() {
                    return Demo { child, addr };
                }
                assert!(t0.elapsed() < WAIT, "demo did not start");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        panic!("could not start duplex demo");
    }

    fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `duplex say ARGS` with `stdin` fed in (in pieces, `pause` between them), bounded by
/// [`WAIT`]; returns its output.
fn say(args: &[&str], stdin: &[(&str, Duration)]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_duplex"))
        .arg("say")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn duplex say");
    let mut input = child.stdin.take().unwrap();
    let pieces: Vec<(String, Duration)> =
        stdin.iter().map(|(s, d)| ((*s).to_owned(), *d)).collect();
    let feeder = std::thread::spawn(move || {
        for (text, pause) in pieces {
            std::thread::sleep(pause);
            if input.write_all(text.as_bytes()).is_err() {
                return;
            }
        }
        // Dropping `input` closes stdin.
    });
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > WAIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("duplex say {args:?} did not finish within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = feeder.join();
    Output {
        status,
        stdout: out_reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
    }
}

fn text(v: &[u8]) -> String {
    String::from_utf8_lossy(v).into_owned()
}

fn rms(s: &[i16]) -> f64 {
    (s.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / s.len().max(1) as f64).sqrt()
}

/// Seconds of audio in 20 ms windows whose RMS is above a speech floor.
fn non_silent_secs(s: &[i16]) -> f64 {
    s.chunks(960).filter(|w| rms(w) > 300.0).count() as f64 * 0.02
}

fn tmp_path(name: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    dir.join(format!("{}-{name}", std::process::id()))
}

#[test]
fn say_writes_a_wav_that_a_wav_reader_parses() {
    let demo = Demo::start(&[]);
    let path = tmp_path("hello.wav");
    let out = say(
        &[
            "Hello world",
            "--url",
            &demo.url(),
            "--out",
            path.to_str().unwrap(),
        ],
        &[],
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    // It reports FAL, frames and duration.
    assert!(stdout.contains("FAL "), "{stdout}");
    assert!(stdout.contains(" frames"), "{stdout}");
    assert!(stdout.contains(" s of audio"), "{stdout}");
    assert!(
        stderr.contains("espeak-en-us"),
        "the session's model is named: {stderr}"
    );

    let mut r = hound::WavReader::open(&path).expect("a valid WAV");
    let spec = r.spec();
    assert_eq!(spec.sample_rate, 48_000);
    assert_eq!(spec.channels, 1);
    assert_eq!(spec.bits_per_sample, 16);
    assert_eq!(spec.sample_format, hound::SampleFormat::Int);
    let samples: Vec<i16> = r.samples::<i16>().map(Result::unwrap).collect();
    assert_eq!(samples.len() % 960, 0, "whole 20 ms frames");
    let speech = non_silent_secs(&samples);
    assert!(speech > 0.5, "{speech:.2} s of non-silent audio");
    // The report's frame count is the file's.
    let frames = samples.len() / 960;
    assert!(
        stdout.contains(&format!("{frames} frames")),
        "{stdout} vs {frames}"
    );
    let _ = std::fs::remove_file(&path);
}

#[test]
fn out_dash_writes_raw_pcm_to_stdout_and_the_report_to_stderr() {
    let demo = Demo::start(&[]);
    let out = say(
        &[
            "Raw audio for a pipe.",
            "--url",
            &demo.url(),
            "--out",
            "-",
            "--pacing",
            "asap",
            "--model",
            "espeak-en-gb",
        ],
        &[],
    );
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(out.stdout.len() % 1920, 0, "whole frames of s16le");
    assert!(!out.stdout.starts_with(b"RIFF"), "raw PCM, no WAV header");
    let samples: Vec<i16> = out
        .stdout
        .chunks_exact(2)
        .map(|c| i16::from_le_bytes([c[0], c[1]]))
        .collect();
    assert!(non_silent_secs(&samples) > 0.5);
    assert!(stderr.contains("FAL "), "report on stderr: {stderr}");
    assert!(
        stderr.contains("espeak-en-gb"),
        "--model chose the voice: {stderr}"
    );
}

#[test]
fn interactive_mode_speaks_each_line_and_obeys_commands() {
    let demo = Demo::start(&[]);
    let path = tmp_path("interactive.wav");
    let out = say(
        &["--url", &demo.url(), "--out", path.to_str().unwrap()],
        &[
            (
                "First line, spoken as soon as it is typed.\n",
                Duration::ZERO,
            ),
            ("/pause\n", Duration::from_millis(600)),
            ("/resume\n", Duration::from_millis(600)),
            ("/bogus\n", Duration::ZERO),
            ("Second line.\n", Duration::ZERO),
            (
                "Third line, after which the session ends.\n",
                Duration::ZERO,
            ),
        ],
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    for n in 1..=3 {
        assert!(stdout.contains(&format!("utterance {n}: FAL")), "{stdout}");
    }
    assert!(stderr.contains("unknown command /bogus"), "{stderr}");
    let r = hound::WavReader::open(&path).unwrap();
    let secs = r.duration() as f64 / 48_000.0;
    assert!(secs > 3.0, "three lines of speech in one file: {secs:.2} s");
    let _ = std::fs::remove_file(&path);

    // /stop cuts the current utterance; /quit leaves at once.
    let out = say(
        &["--url", &demo.url()],
        &[
            (
                "A long sentence that will not be heard to its end, because the user stops \
                 it right after it starts playing.\n",
                Duration::ZERO,
            ),
            ("/stop\n", Duration::from_millis(500)),
            ("/quit\n", Duration::from_millis(300)),
            ("never spoken\n", Duration::ZERO),
        ],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        stdout.contains("utterance 1:") && stdout.contains("(stopped)"),
        "{stdout}"
    );
    assert!(!stdout.contains("utterance 2:"), "{stdout}");
}

#[test]
fn failures_are_clear_and_exit_non_zero() {
    // Nothing listens on this port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("ws://127.0.0.1:{port}/");
    let out = say(&["hi", "--url", &url], &[]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("cannot connect to") && err.contains(&url),
        "{err}"
    );

    let out = say(&["hi", "--url", "http://127.0.0.1:1/"], &[]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("ws://"), "{}", text(&out.stderr));

    // A voice the worker does not have: the server's error is reported, exit non-zero.
    let demo = Demo::start(&[]);
    let out = say(
        &["hi", "--url", &demo.url(), "--model", "espeak-nowhere"],
        &[],
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("espeak-nowhere"), "{err}");
}
