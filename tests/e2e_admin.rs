//! End to end: the operator's side of the orchestrator: the admin endpoints on their own
//! listener and the bare `/health` on the public port (docs/PROTOCOL.md 4), and the command
//! line (bad flags, busy ports, `duplex demo`).

mod common;

use common::*;
use std::net::TcpListener;
use std::time::{Duration, Instant};

#[tokio::test]
async fn health_liveness_readiness_are_json_200_with_a_worker() {
    let stack = Stack::default().await;
    for path in ["/health", "/liveness", "/readiness"] {
        // The worker check runs in the background, so right after start the orchestrator may
        // not have seen the worker yet: poll (bounded) until it reports healthy.
        let r = poll_status(stack.server.admin, path, 200).await;
        assert_eq!(r.status, 200, "{path} with a running worker: {r:?}");
        let ct = r.header("content-type").unwrap_or_default();
        assert!(
            ct.contains("application/json"),
            "{path} content-type {ct:?}"
        );
        assert!(
            r.json().is_object(),
            "{path} must be a JSON object: {}",
            r.body
        );
    }
}

/// GETs `path` and reads until the server closes the connection, so the server closes first.
async fn http_get_to_eof(addr: std::net::SocketAddr, path: &str) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    tokio::time::timeout(WAIT, async {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut body = Vec::new();
        s.read_to_end(&mut body).await.expect("read to EOF");
        assert!(
            body.starts_with(b"HTTP/1.1 200"),
            "{path}: {}",
            String::from_utf8_lossy(&body)
        );
    })
    .await
    .expect("the server must close a `Connection: close` response");
}

/// GETs `path` until it answers `want` or [`WAIT`] passes; returns the last response.
async fn poll_status(addr: std::net::SocketAddr, path: &str, want: u16) -> HttpResponse {
    let deadline = Instant::now() + WAIT;
    loop {
        let r = http_get(addr, path).await;
        if r.status == want || Instant::now() >= deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn health_is_503_when_the_worker_is_down() {
    let dead = format!("grpc://{}", free_addr());
    let server = Server::serve(&dead, &[]).await;
    // The worker check may run in the background; give it a bounded moment to notice.
    let r = poll_status(server.admin, "/health", 503).await;
    assert_eq!(r.status, 503, "/health without a worker: {r:?}");
    assert!(r.json().is_object(), "503 body is JSON too: {}", r.body);
    let public = http_get(server.addr, "/health").await;
    assert_eq!(public.status, 503, "the public /health agrees: {public:?}");
    // Liveness is about the process itself, which is fine.
    let live = http_get(server.admin, "/liveness").await;
    assert_eq!(live.status, 200, "/liveness: {live:?}");
}

#[tokio::test]
async fn metrics_count_sessions_and_frames() {
    let stack = Stack::default().await;
    let addr = stack.server.admin;

    let before = http_get(addr, "/metrics").await;
    assert_eq!(before.status, 200, "{before:?}");
    let ct = before.header("content-type").unwrap_or_default();
    assert!(
        ct.starts_with("text/plain") || ct.starts_with("application/openmetrics-text"),
        "Prometheus text content-type, got {ct:?}"
    );
    let sessions = |text: &str| metric_sum(text, |n| n == "sessions_active");
    let frames_sent = |text: &str| metric_sum(text, |n| n.contains("frames_sent"));
    assert_eq!(
        sessions(&before.body),
        Some(0.0),
        "sessions_active (the Python system's name) must exist and be 0:\n{}",
        before.body
    );
    let f0 = frames_sent(&before.body)
        .unwrap_or_else(|| panic!("no frames-sent counter in /metrics:\n{}", before.body));

    let mut c = stack.server.client("pacing=asap").await;
    c.say("Count me.").await;
    c.collect_utterance(WAIT).await.assert_complete(MOCK_FRAMES);

    let during = http_get(addr, "/metrics").await;
    assert_eq!(sessions(&during.body), Some(1.0), "one open session");
    let f1 = frames_sent(&during.body).expect("frames-sent counter");
    assert!(
        f1 >= f0 + MOCK_FRAMES as f64,
        "frames sent must grow by at least {MOCK_FRAMES}: {f0} -> {f1}"
    );

    // Closing the session brings the gauge back down (the server may need a moment).
    c.close().await;
    let deadline = Instant::now() + WAIT;
    loop {
        let r = http_get(addr, "/metrics").await;
        if sessions(&r.body) == Some(0.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sessions_active never went back to 0:\n{}",
            r.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn unknown_path_is_404() {
    let stack = Stack::default().await;
    let r = http_get(stack.server.addr, "/no/such/thing").await;
    assert_eq!(r.status, 404, "{r:?}");
}

/// The first line of stderr that says something.
fn reason(stderr: &str) -> &str {
    stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or("")
}

#[test]
fn bad_flag_exits_non_zero_with_a_reason() {
    for args in [
        &["serve", "--no-such-flag"][..],
        &[
            "serve",
            "--worker",
            "grpc://127.0.0.1:1",
            "--pacing",
            "sometimes",
        ],
        &[
            "serve",
            "--worker",
            "grpc://127.0.0.1:1",
            "--max-connections",
            "many",
        ],
        &["serve", "--worker", "bogus://x"],
        &[
            "serve",
            "--worker",
            "grpc://127.0.0.1:1",
            "--listen",
            "not-an-address",
        ],
        &["worker", "--no-such-flag"],
        &["no-such-subcommand"],
    ] {
        let (status, _out, err) = run_cli(args, WAIT);
        assert!(!status.success(), "`duplex {}` must fail", args.join(" "));
        let line = reason(&err);
        assert!(
            !line.is_empty(),
            "`duplex {}` must say why on stderr",
            args.join(" ")
        );
        // The one line names what was wrong.
        let culprit = args.last().expect("args");
        let culprit = culprit.trim_start_matches('-');
        assert!(
            line.contains(culprit),
            "`duplex {}`: the first stderr line should name {culprit:?}, got {line:?}\nfull stderr:\n{err}",
            args.join(" ")
        );
    }
}

#[test]
fn serve_on_a_busy_port_exits_non_zero_naming_the_address() {
    let busy = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = busy.local_addr().expect("addr").to_string();
    let (status, _out, err) = run_cli(
        &["serve", "--listen", &addr, "--worker", "grpc://127.0.0.1:1"],
        WAIT,
    );
    assert!(!status.success(), "serve on a busy port must fail");
    assert!(
        err.contains(&addr),
        "the error must mention {addr}, stderr:\n{err}"
    );
}

#[tokio::test]
async fn serve_on_a_port_another_orchestrator_holds_exits_non_zero() {
    // The orchestrator's per-core listeners use SO_REUSEPORT, with which a second duplex
    // process could silently share the port; it must refuse instead.
    let first = Server::serve("grpc://127.0.0.1:1", &[]).await;
    let addr = first.addr.to_string();
    let (status, _out, err) = run_cli(
        &["serve", "--listen", &addr, "--worker", "grpc://127.0.0.1:1"],
        WAIT,
    );
    assert!(
        !status.success(),
        "a second orchestrator on {addr} must fail, stderr:\n{err}"
    );
    assert!(err.contains(&addr), "the error must mention {addr}:\n{err}");
}

#[tokio::test]
async fn serve_restarts_on_the_same_port_right_after_a_shutdown() {
    let worker = Worker::start(&[]).await;
    let mut first = Server::serve(&worker.url(), &[]).await;
    let addr = first.addr;
    let mut c = first.client("pacing=asap").await;
    c.say("Before the restart.").await;
    c.collect_utterance(WAIT).await.assert_complete(MOCK_FRAMES);
    // Connections the server closes first (RFC 6455: the server closes TCP first; HTTP with
    // `Connection: close`) leave TIME_WAIT sockets on the server's port for a minute after it
    // exits; a restart must still be able to listen there.
    http_get_to_eof(addr, "/").await;
    first.proc.signal(libc::SIGTERM);
    let _ = c.recv_until(WAIT, |v| v["type"] == "session_end").await;
    loop {
        // Close frame (answered by the client library), then the server's TCP close.
        if let Incoming::Ended(_) = c.recv(WAIT).await {
            break;
        }
    }
    c.wait_tcp_eof(WAIT).await;
    drop(c);
    first.proc.wait_exit(WAIT);

    let second = Server::serve_on(addr, &worker.url(), &[]).await;
    let mut c = second.client("pacing=asap").await;
    c.say("After the restart.").await;
    c.collect_utterance(WAIT).await.assert_complete(MOCK_FRAMES);
}

#[test]
fn worker_on_a_busy_port_exits_non_zero_naming_the_address() {
    let busy = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = busy.local_addr().expect("addr").to_string();
    let (status, _out, err) = run_cli(&["worker", "--listen", &addr], WAIT);
    assert!(!status.success(), "worker on a busy port must fail");
    assert!(
        err.contains(&addr),
        "the error must mention {addr}, stderr:\n{err}"
    );
}

#[tokio::test]
async fn demo_alone_serves_an_utterance_end_to_end() {
    let demo = Server::demo(&["--model", "mock-440hz"]).await;
    let mut c = demo.client("").await;
    c.say("Hello from the demo.").await;
    let u = c.collect_utterance(WAIT).await;
    u.assert_complete(MOCK_FRAMES);
    assert!(u.frames.iter().all(|f| is_audible(&f.pcm)));
    let r = poll_status(demo.admin, "/health", 200).await;
    assert_eq!(r.status, 200, "demo's embedded worker is healthy: {r:?}");
}

#[tokio::test]
async fn sigterm_ends_sessions_with_shutdown_then_exits() {
    let mut stack = Stack::default().await;
    let mut c = stack.server.client("").await;
    let id = c.session_id();
    // A session that has been talking, and is talking when the signal comes.
    c.say("Before the shutdown.").await;
    c.collect_utterance(WAIT).await.assert_complete(MOCK_FRAMES);
    c.say("During the shutdown.").await;
    c.read_frames(3, WAIT).await;
    stack.server.proc.signal(libc::SIGTERM);

    // Audio already on its way may still arrive, then session_end, then the close frame.
    let (end, before) = c.recv_until(WAIT, |v| v["type"] == "session_end").await;
    assert!(
        before.iter().all(|v| v["type"] == "audio"),
        "only audio may precede session_end: {before:?}"
    );
    assert_eq!(end["reason"], "shutdown", "{end}");
    assert_eq!(end["session_id"], id.as_str(), "{end}");
    match c.recv(WAIT).await {
        Incoming::Close(_) => {}
        other => panic!("expected a close frame after session_end, got {other:?}"),
    }
    let status = stack.server.proc.wait_exit(WAIT);
    assert!(status.success(), "clean exit on SIGTERM, got {status}");
}

/// The contract says a process is ready once it logs `listening on ADDR`; supervisors (systemd,
/// Kubernetes) may stop it at any moment after that. A SIGTERM that lands before the signal
/// handler is installed kills the process outright (no session_end, exit by signal), so each
/// role is signalled the instant the line comes through a pipe, several times since it is a
/// race (while the window is open, about half the attempts hit it).
fn sigterm_right_after_listening(role: &str, extra: &[&str]) {
    use std::io::BufRead as _;
    for attempt in 1..=8 {
        let addr = free_addr().to_string();
        let child = std::process::Command::new(duplex_bin())
            .args([role, "--listen", &addr])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn duplex");
        let mut child = ChildGuard(child);
        let stderr = child.0.stderr.take().expect("stderr pipe");
        let (tx, rx) = std::sync::mpsc::channel();
        let needle = format!("listening on {addr}");
        // A reader thread, so the wait for the line is bounded (recv_timeout below).
        let reader = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains(&needle) {
                    let _ = tx.send(());
                }
                seen.push(line);
            }
            seen.join("\n")
        });
        if rx.recv_timeout(WAIT).is_err() {
            let _ = child.0.kill();
            let logs = reader.join().unwrap_or_default();
            panic!("`duplex {role}` never logged that it listens on {addr}; logs:\n{logs}");
        }
        // SAFETY: plain syscall on our own child, not yet reaped.
        unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(status) = child.0.try_wait().expect("try_wait") {
                break status;
            }
            assert!(Instant::now() < deadline, "`duplex {role}` ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(5));
        };
        let logs = reader.join().unwrap_or_default();
        assert!(
            status.success(),
            "attempt {attempt}: `duplex {role}` got SIGTERM right after logging that it listens \
             and ended with {status} instead of a clean exit (signal handler installed too \
             late?); logs:\n{logs}"
        );
    }
}

/// Kills (SIGKILL) and reaps a child on drop, so a failing assertion cannot leak it. (std's
/// `kill` sends nothing once the child has been reaped.)
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn serve_handles_sigterm_as_soon_as_it_says_it_listens() {
    // No admin listener: its default (port + 1) is not reserved by `free_addr`, and another
    // test's process holding it made this start fail now and then.
    sigterm_right_after_listening(
        "serve",
        &["--worker", "grpc://127.0.0.1:1", "--admin-listen", "none"],
    );
}

#[test]
fn worker_handles_sigterm_as_soon_as_it_says_it_listens() {
    sigterm_right_after_listening("worker", &[]);
}

#[test]
fn demo_handles_sigterm_as_soon_as_it_says_it_listens() {
    sigterm_right_after_listening("demo", &["--admin-listen", "none"]);
}

#[tokio::test]
async fn log_format_json_writes_one_json_object_per_line() {
    // The flag is global: accepted before and after the subcommand.
    for before in [true, false] {
        let addr = free_addr();
        let addr_s = addr.to_string();
        let mut args: Vec<String> = vec!["worker".into(), "--listen".into(), addr_s.clone()];
        if before {
            args.splice(0..0, ["--log-format".to_string(), "json".to_string()]);
        } else {
            args.extend(["--log-format".to_string(), "json".to_string()]);
        }
        let mut w = Proc::spawn("worker-json-logs", &args);
        w.wait_accepting(addr, WAIT).await;
        let logs = w.wait_log(&format!("listening on {addr_s}"), WAIT);
        let lines: Vec<&str> = logs.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(!lines.is_empty(), "no logs at all ({args:?})");
        for line in &lines {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}) with {args:?}: {line:?}"));
            assert!(v.is_object(), "{line}");
        }
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&format!("listening on {addr_s}"))),
            "the ready line is logged as JSON too: {logs}"
        );
    }
}

#[tokio::test]
async fn the_page_s_voice_picker_lists_what_the_workers_offer() {
    let stack = Stack::default().await;
    let deadline = Instant::now() + WAIT;
    loop {
        let r = http_get(stack.server.addr, "/voices").await;
        assert_eq!(r.status, 200, "{r:?}");
        let v = r.json();
        let voices: Vec<String> = v["voices"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        // The probe fills the list within a second or two of start.
        if voices.iter().any(|m| m.starts_with("mock")) {
            assert_eq!(v["default"], "mock-440hz", "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "no mock voice listed: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
