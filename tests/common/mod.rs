//! Shared helpers for the end-to-end tests: they spawn the real `duplex` binary on loopback and
//! talk to it over real sockets, so a test exercises exactly what a user runs.
//!
//! Every wait in here is bounded (a test may fail, never hang), every child process is killed
//! when its guard drops (also when the test panics), and a failing test prints the captured
//! logs of the processes it started so the failure can be diagnosed from the test output alone.

// Each `tests/e2e_*.rs` binary uses a different subset of these helpers.
#![allow(dead_code)]

pub mod redis;
pub mod spawn;

use std::fs::File;
use std::io::Read as _;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use duplex::client;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data as OpData, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

/// Bytes of one 20 ms frame of 48 kHz s16le mono PCM.
pub const FRAME_BYTES: usize = duplex::audio::FRAME_BYTES;
/// Frames the mock model produces per text chunk (500 ms of audio).
pub const MOCK_FRAMES: usize = 25;
/// Upper bound for anything that should happen "soon" (process start, a reply, an utterance).
/// Generous because the test machine is small and shared.
pub const WAIT: Duration = Duration::from_secs(10);
/// Bytes of the binary-format frame header (docs/PROTOCOL.md 1.3, README).
pub const BINARY_HEADER_BYTES: usize = 8;

/// The path of the binary under test, built by cargo for this test run.
pub fn duplex_bin() -> &'static str {
    env!("CARGO_BIN_EXE_duplex")
}

/// Returns a loopback port that was free a moment ago: bind port 0, read it, release it.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

/// Returns a free loopback address (see [`free_port`]).
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A `duplex` child process that is killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

static PROC_COUNTER: AtomicUsize = AtomicUsize::new(0);

impl Proc {
    /// Spawns `duplex ARGS...` with stdout and stderr captured into one log file.
    pub fn spawn(name: &str, args: &[String]) -> Proc {
        let n = PROC_COUNTER.fetch_add(1, Ordering::Relaxed);
        let log = std::env::temp_dir().join(format!(
            "duplex-e2e-{}-{}-{}.log",
            std::process::id(),
            n,
            name
        ));
        let out = File::create(&log).expect("create child log file");
        let err = out.try_clone().expect("clone child log file");
        let child = Command::new(duplex_bin())
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Proc {
            name: name.to_string(),
            child,
            log,
        }
    }

    /// The OS process id, e.g. to send it a signal.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `Some(status)` when the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait on child")
    }

    /// Kills the process with SIGKILL (no clean shutdown) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the process.
    pub fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.pid()).expect("pid fits i32");
        // SAFETY: plain syscall on a pid we own (the child is not reaped until drop).
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
    }

    /// Waits (bounded) for the process to exit on its own; panics with its logs if it doesn't.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} did not exit within {timeout:?}; logs:\n{}",
                    self.name,
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls the captured logs (bounded) until they contain `needle`. Accepting TCP comes
    /// before the ready line is written, so a test that reads logs waits for the line first.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let logs = self.logs();
            if logs.contains(needle) {
                return logs;
            }
            if let Some(status) = self.try_wait() {
                panic!(
                    "{} exited ({status}) before logging {needle:?}; logs:\n{logs}",
                    self.name
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not log {needle:?} within {timeout:?}; logs:\n{logs}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Polls TCP connect to `addr` until it succeeds; panics (with the logs) if the process
    /// exits first or `timeout` passes.
    pub async fn wait_accepting(&mut self, addr: SocketAddr, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                panic!(
                    "{} exited ({status}) before accepting on {addr}; logs:\n{}",
                    self.name,
                    self.logs()
                );
            }
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await
            {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} not accepting on {addr} after {timeout:?}; logs:\n{}",
                    self.name,
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "----- logs of {} ({}) -----\n{}\n----- end of {} logs -----",
                self.name,
                self.log.display(),
                self.logs(),
                self.name
            );
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// A running `duplex worker` (the mock TTS worker).
pub struct Worker {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl Worker {
    /// Starts a worker on a free port with extra flags and waits until it accepts.
    pub async fn start(extra: &[&str]) -> Worker {
        Worker::start_on(free_addr(), extra).await
    }

    /// Starts a worker on `addr` (e.g. to restart one on the same port).
    pub async fn start_on(addr: SocketAddr, extra: &[&str]) -> Worker {
        let mut args = strings(&["worker", "--listen", &addr.to_string()]);
        args.extend(strings(extra));
        let mut proc = Proc::spawn("worker", &args);
        proc.wait_accepting(addr, WAIT).await;
        Worker { proc, addr }
    }

    /// The `--worker` value that points an orchestrator at this worker.
    pub fn url(&self) -> String {
        format!("grpc://{}", self.addr)
    }
}

/// A running orchestrator (`duplex serve` or `duplex demo`).
pub struct Server {
    pub proc: Proc,
    pub addr: SocketAddr,
    /// Its admin listener (`/health`, `/metrics`, ...), on a free port of its own.
    pub admin: SocketAddr,
}

impl Server {
    /// Starts `duplex serve --worker WORKER_URL` on a free port and waits until it accepts.
    pub async fn serve(worker_url: &str, extra: &[&str]) -> Server {
        Server::serve_on(free_addr(), worker_url, extra).await
    }

    /// Starts `duplex serve` on `addr` (e.g. to restart one on the same port).
    pub async fn serve_on(addr: SocketAddr, worker_url: &str, extra: &[&str]) -> Server {
        let admin = free_addr();
        let mut args = strings(&[
            "serve",
            "--listen",
            &addr.to_string(),
            "--admin-listen",
            &admin.to_string(),
            "--worker",
            worker_url,
        ]);
        args.extend(strings(extra));
        let mut proc = Proc::spawn("serve", &args);
        proc.wait_accepting(addr, WAIT).await;
        Server { proc, addr, admin }
    }

    /// Starts `duplex demo` (orchestrator + worker in one process) on a free port.
    pub async fn demo(extra: &[&str]) -> Server {
        let addr = free_addr();
        let admin = free_addr();
        let mut args = strings(&[
            "demo",
            "--listen",
            &addr.to_string(),
            "--admin-listen",
            &admin.to_string(),
        ]);
        args.extend(strings(extra));
        let mut proc = Proc::spawn("demo", &args);
        proc.wait_accepting(addr, WAIT).await;
        Server { proc, addr, admin }
    }

    /// `ws://ADDR/?QUERY` (or `ws://ADDR/` for an empty query).
    pub fn ws_url(&self, query: &str) -> String {
        if query.is_empty() {
            format!("ws://{}/", self.addr)
        } else {
            format!("ws://{}/?{}", self.addr, query)
        }
    }

    /// Opens a WebSocket session and checks the `session_start` greeting.
    pub async fn client(&self, query: &str) -> Client {
        Client::connect(&self.ws_url(query)).await
    }
}

/// A worker plus an orchestrator pointed at it: the usual setup of a test.
pub struct Stack {
    pub server: Server,
    pub worker: Worker,
}

impl Stack {
    /// Starts a worker (with `worker_extra` flags) and `duplex serve` (with `serve_extra`).
    pub async fn start(worker_extra: &[&str], serve_extra: &[&str]) -> Stack {
        let worker = Worker::start(worker_extra).await;
        let server = Server::serve(&worker.url(), serve_extra).await;
        Stack { server, worker }
    }

    /// Default worker, default orchestrator.
    pub async fn default() -> Stack {
        Stack::start(&[], &[]).await
    }
}

/// One audio frame as the client received it.
#[derive(Debug, Clone)]
pub struct AudioFrame {
    pub sequence: u64,
    pub pcm: Vec<u8>,
    /// When the client read it (for pacing measurements).
    pub at: Instant,
}

/// Everything a client received for one utterance, up to and including its end marker.
#[derive(Debug)]
pub struct Utterance {
    pub frames: Vec<AudioFrame>,
    /// The end marker's sequence number.
    pub end_sequence: u64,
    /// Non-audio messages (errors, events) that arrived in between, in order.
    pub others: Vec<Value>,
}

impl Utterance {
    /// Sequence numbers of the data frames, in arrival order.
    pub fn sequences(&self) -> Vec<u64> {
        self.frames.iter().map(|f| f.sequence).collect()
    }

    /// Asserts the complete-utterance contract: `n` frames of 1920 bytes numbered 1..=n in
    /// order, then the end marker numbered n+1, and no errors or events in between.
    pub fn assert_complete(&self, n: usize) {
        let expected: Vec<u64> = (1..=n as u64).collect();
        assert_eq!(
            self.sequences(),
            expected,
            "frames must be numbered 1..={n} in order"
        );
        for f in &self.frames {
            assert_eq!(f.pcm.len(), FRAME_BYTES, "frame {} size", f.sequence);
        }
        assert_eq!(
            self.end_sequence,
            n as u64 + 1,
            "end marker sequence = last + 1"
        );
        assert!(
            self.others.is_empty(),
            "no other messages expected during the utterance, got {:?}",
            self.others
        );
    }

    /// Time from the first to the last data frame.
    pub fn span(&self) -> Duration {
        match (self.frames.first(), self.frames.last()) {
            (Some(a), Some(b)) => b.at.duration_since(a.at),
            _ => Duration::ZERO,
        }
    }
}

/// What [`Client::recv`] returns: the interesting shapes of a server message, as the tests
/// assert on them (JSON as sent, binary messages whole, header included).
#[derive(Debug)]
pub enum Incoming {
    /// A text message that parsed as JSON.
    Json(Value),
    /// A binary message (audio in `format=binary`).
    Binary(Vec<u8>),
    /// A close frame: `(code, reason)`, `None` when the frame had no code.
    Close(Option<(u16, String)>),
    /// The connection ended without a close frame (or with a transport error).
    Ended(String),
}

/// A WebSocket client session: [`duplex::client::Client`] with the tests' conventions (every
/// wait bounded, every failure a panic with context, messages as JSON values).
pub struct Client {
    pub inner: client::Client,
    /// The `session_start` message the server greeted us with.
    pub start: Value,
}

/// The raw JSON of a received text message; panics (with it) if it isn't JSON.
fn json_of(r: &client::Received) -> Value {
    serde_json::from_slice(r.raw()).unwrap_or_else(|e| {
        panic!(
            "server sent non-JSON text {:?}: {e}",
            String::from_utf8_lossy(r.raw())
        )
    })
}

impl Client {
    /// Connects (bounded) and reads the `session_start` greeting, which must come first.
    pub async fn connect(url: &str) -> Client {
        Client::connect_with(url, client::Options::default()).await
    }

    /// [`Client::connect`] with options (e.g. `tls` for a `wss://` URL); the connect bound is
    /// the tests' own.
    pub async fn connect_with(url: &str, opts: client::Options) -> Client {
        match Client::try_connect_with(url, opts).await {
            Ok(c) => c,
            Err(e) => panic!("WebSocket session with {url} failed to start: {e}"),
        }
    }

    /// [`Client::connect_with`] that returns a failed connect or handshake instead of
    /// panicking, for tests where a refused connection is part of the story (a drain).
    pub async fn try_connect_with(url: &str, opts: client::Options) -> anyhow::Result<Client> {
        let opts = client::Options {
            // The bound used to be WAIT for the connection plus WAIT for the greeting.
            connect_timeout: 2 * WAIT,
            ..opts
        };
        let inner = client::Client::connect(url, &opts).await?;
        let start: Value = serde_json::from_slice(&inner.session().raw)
            .unwrap_or_else(|e| panic!("session_start is not JSON: {e}"));
        assert_eq!(
            start["type"], "session_start",
            "first message must be session_start, got {start}"
        );
        Ok(Client { inner, start })
    }

    /// The session id from `session_start`.
    pub fn session_id(&self) -> String {
        self.start["session_id"]
            .as_str()
            .expect("session_id is a string")
            .to_string()
    }

    /// The underlying WebSocket, for tests of the protocol itself (pings, close frames).
    pub fn ws(&mut self) -> &mut client::Ws {
        self.inner.ws_mut()
    }

    /// Next message, or `None` if nothing arrives within `timeout`. Pings/pongs are skipped.
    pub async fn try_recv(&mut self, timeout: Duration) -> Option<Incoming> {
        let deadline = tokio::time::Instant::now() + timeout;
        match self.inner.recv_wire(deadline).await {
            Ok(None) => None,
            Ok(Some(r)) => Some(match &r.kind {
                client::Kind::Audio(a) if a.binary => Incoming::Binary(r.raw().to_vec()),
                client::Kind::Audio(_) | client::Kind::Event(_) => Incoming::Json(json_of(&r)),
                client::Kind::Close(c) => Incoming::Close(c.clone()),
            }),
            Err(client::Error::Closed(why)) => Some(Incoming::Ended(
                why.unwrap_or_else(|| "stream ended".into()),
            )),
            Err(client::Error::Transport(e)) => {
                Some(Incoming::Ended(format!("transport error: {e}")))
            }
            Err(e) => panic!("server sent a message the protocol does not allow: {e}"),
        }
    }

    /// Next message; panics if nothing arrives within `timeout`.
    pub async fn recv(&mut self, timeout: Duration) -> Incoming {
        match self.try_recv(timeout).await {
            Some(m) => m,
            None => panic!("no message from the server within {timeout:?}"),
        }
    }

    /// Next message, which must be a JSON text message, within `timeout`.
    pub async fn recv_json(&mut self, timeout: Duration) -> Value {
        match self.recv(timeout).await {
            Incoming::Json(v) => v,
            other => panic!("expected a JSON text message, got {other:?}"),
        }
    }

    /// Next JSON message within `timeout`, or `None` on timeout; panics on other kinds.
    pub async fn try_recv_json(&mut self, timeout: Duration) -> Option<Value> {
        match self.try_recv(timeout).await {
            None => None,
            Some(Incoming::Json(v)) => Some(v),
            Some(other) => panic!("expected a JSON text message, got {other:?}"),
        }
    }

    /// Sends a text frame.
    pub async fn send_text(&mut self, text: &str) {
        tokio::time::timeout(WAIT, self.inner.send_raw_text(text))
            .await
            .expect("send timed out")
            .expect("send text");
    }

    /// Sends a JSON value as a text frame.
    pub async fn send_json(&mut self, v: &Value) {
        self.send_text(&v.to_string()).await;
    }

    /// Sends a binary frame (microphone audio).
    pub async fn send_binary(&mut self, data: Vec<u8>) {
        tokio::time::timeout(WAIT, self.inner.send_audio(data))
            .await
            .expect("send timed out")
            .expect("send binary");
    }

    /// Sends a raw, final WebSocket frame with the *text* opcode and arbitrary payload bytes
    /// (tungstenite's `Message::Text` only takes valid UTF-8; a raw frame bypasses that so we
    /// can send invalid UTF-8). The client role masks it as RFC 6455 requires.
    pub async fn send_raw_text_frame(&mut self, payload: Vec<u8>) {
        let frame = Frame::message(payload, OpCode::Data(OpData::Text), true);
        tokio::time::timeout(WAIT, self.inner.send_message(Message::Frame(frame)))
            .await
            .expect("send timed out")
            .expect("send raw frame");
    }

    /// Sends `{"type":"text","text":TEXT}` (`is_final` left to its default, true).
    pub async fn say(&mut self, text: &str) {
        self.send_json(&json!({"type": "text", "text": text})).await;
    }

    /// Sends `{"type":"control","command":COMMAND}`.
    pub async fn control(&mut self, command: &str) {
        self.send_json(&json!({"type": "control", "command": command}))
            .await;
    }

    /// Next JSON-format audio item (bounded): a data frame, the end marker, or some other
    /// JSON message (error, event). Checks the fields of every audio message.
    pub async fn next_audio(&mut self, timeout: Duration) -> Step {
        match self.recv(timeout).await {
            Incoming::Json(v) => match parse_audio(&v) {
                Some(Audio::Frame(f)) => Step::Frame(f),
                Some(Audio::End(seq)) => Step::End(seq),
                None => Step::Other(v),
            },
            other => panic!("expected a JSON message during an utterance, got {other:?}"),
        }
    }

    /// Reads until `n` data frames have arrived (bounded overall); the end marker arriving
    /// first is a failure. Other JSON messages are returned alongside.
    pub async fn read_frames(
        &mut self,
        n: usize,
        timeout: Duration,
    ) -> (Vec<AudioFrame>, Vec<Value>) {
        let deadline = Instant::now() + timeout;
        let mut frames = Vec::new();
        let mut others = Vec::new();
        while frames.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_audio(left).await {
                Step::Frame(f) => frames.push(f),
                Step::End(seq) => panic!(
                    "end marker (sequence {seq}) after only {} of {n} frames; others {others:?}",
                    frames.len()
                ),
                Step::Other(v) => others.push(v),
            }
        }
        (frames, others)
    }

    /// [`client::Client::collect_utterance`] (bounded by `timeout` overall) with every
    /// message checked against the protocol by `check`; non-audio messages are returned in
    /// `others` as sent.
    async fn collect_checked(
        &mut self,
        timeout: Duration,
        mut check: impl FnMut(&client::Received, &mut Vec<Value>),
    ) -> Utterance {
        let mut others = Vec::new();
        let u = self
            .inner
            .collect_utterance_with(client::Wait::Total(timeout), |r| {
                check(r, &mut others);
                Ok(())
            })
            .await;
        match u {
            Ok(u) => Utterance {
                frames: u
                    .frames
                    .into_iter()
                    .map(|f| AudioFrame {
                        sequence: u64::from(f.sequence),
                        pcm: f.pcm.to_vec(),
                        at: f.at,
                    })
                    .collect(),
                end_sequence: u64::from(u.end_sequence),
                others,
            },
            Err(e) => panic!("utterance incomplete: {e}; others {others:?}"),
        }
    }

    /// Reads one JSON-format utterance up to and including its end marker (bounded by
    /// `timeout` overall), checking the fields of every audio message.
    pub async fn collect_utterance(&mut self, timeout: Duration) -> Utterance {
        self.collect_checked(timeout, |r, others| match &r.kind {
            client::Kind::Audio(a) if a.binary => {
                panic!("unexpected binary message during a JSON utterance: {a:?}")
            }
            client::Kind::Audio(_) => {
                // Asserts every field (docs/PROTOCOL.md 1.3).
                let _ = parse_audio(&json_of(r));
            }
            client::Kind::Event(_) => others.push(json_of(r)),
            client::Kind::Close(c) => panic!("unexpected close {c:?} during a JSON utterance"),
        })
        .await
    }

    /// Reads binary-format audio up to and including the end marker (bounded), checking every
    /// header and size; JSON messages go to `others`.
    pub async fn collect_binary_utterance(&mut self, timeout: Duration) -> Utterance {
        self.collect_checked(timeout, |r, others| match &r.kind {
            client::Kind::Audio(a) if a.binary => {
                let b = r.raw();
                let h = parse_binary_header(b);
                if h.is_final {
                    assert_eq!(
                        b.len(),
                        BINARY_HEADER_BYTES,
                        "the binary end marker is the header alone"
                    );
                } else {
                    assert_eq!(
                        b.len(),
                        BINARY_HEADER_BYTES + FRAME_BYTES,
                        "binary frame = 8-byte header + 1920 PCM bytes"
                    );
                }
            }
            client::Kind::Audio(_) => {
                let v = json_of(r);
                panic!("format=binary must not send JSON audio: {v}");
            }
            client::Kind::Event(_) => others.push(json_of(r)),
            client::Kind::Close(c) => panic!("unexpected close {c:?} during a binary utterance"),
        })
        .await
    }

    /// Reads messages until one satisfies `pred` (bounded); returns it and everything before.
    pub async fn recv_until(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> (Value, Vec<Value>) {
        let deadline = Instant::now() + timeout;
        let mut before = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.try_recv(left).await {
                None => panic!("no matching message within {timeout:?}; got {before:?}"),
                Some(Incoming::Json(v)) => {
                    if pred(&v) {
                        return (v, before);
                    }
                    before.push(v);
                }
                Some(other) => panic!("unexpected {other:?} while waiting; got {before:?}"),
            }
        }
    }

    /// Asserts that nothing at all arrives for `quiet`.
    pub async fn assert_silent(&mut self, quiet: Duration) {
        if let Some(m) = self.try_recv(quiet).await {
            panic!("expected no message for {quiet:?}, got {m:?}");
        }
    }

    /// After the WebSocket close handshake: waits (bounded) until the server closes the TCP
    /// connection, so the server is the side that closes first.
    pub async fn wait_tcp_eof(&mut self, timeout: Duration) {
        let tcp = self.inner.ws_mut().get_mut().get_mut();
        let mut buf = [0u8; 1024];
        tokio::time::timeout(timeout, async {
            while let Ok(n) = tcp.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("server did not close the TCP connection within {timeout:?}"));
    }

    /// Sends a close frame and waits (bounded) for the server's side of the close handshake.
    pub async fn close(self) {
        self.inner.close_and_wait(WAIT).await;
    }
}

/// One item of a JSON-format utterance, see [`Client::next_audio`].
#[derive(Debug)]
pub enum Step {
    Frame(AudioFrame),
    /// The end marker, with its sequence number.
    End(u64),
    /// Any other JSON message (error, event).
    Other(Value),
}

/// A parsed JSON `audio` message.
pub enum Audio {
    Frame(AudioFrame),
    /// The end marker, with its sequence number.
    End(u64),
}

/// Parses and validates a JSON `audio` message (fields per docs/PROTOCOL.md 1.3); `None` if `v` is
/// some other message type.
pub fn parse_audio(v: &Value) -> Option<Audio> {
    if v["type"] != "audio" {
        return None;
    }
    assert_eq!(v["sample_rate"], 48_000, "audio sample_rate in {v}");
    assert_eq!(v["frame_ms"], 20, "audio frame_ms in {v}");
    let sequence = v["sequence"]
        .as_u64()
        .unwrap_or_else(|| panic!("audio sequence must be a non-negative integer: {v}"));
    let pcm = v["pcm"]
        .as_str()
        .unwrap_or_else(|| panic!("audio pcm must be a string: {v}"));
    let is_final = match &v["is_final"] {
        Value::Null => false,
        Value::Bool(b) => *b,
        other => panic!("is_final must be a bool, got {other}"),
    };
    if is_final {
        assert_eq!(pcm, "", "the end marker has an empty pcm: {v}");
        return Some(Audio::End(sequence));
    }
    assert!(!pcm.is_empty(), "a data frame must carry audio: {v}");
    Some(Audio::Frame(AudioFrame {
        sequence,
        pcm: b64(pcm),
        at: Instant::now(),
    }))
}

/// Decodes standard base64 (with padding), as the protocol's `pcm` field uses.
pub fn b64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .unwrap_or_else(|e| panic!("pcm is not standard base64 ({e}): {s:.40}..."))
}

/// The 8-byte binary-format header.
#[derive(Debug, PartialEq, Eq)]
pub struct BinaryHeader {
    pub is_final: bool,
    pub sequence: u32,
}

/// Parses and validates the binary-format header: version 1, flags bit 0 = final (no other
/// bits), reserved bytes zero, sequence u32 little-endian.
pub fn parse_binary_header(b: &[u8]) -> BinaryHeader {
    assert!(
        b.len() >= BINARY_HEADER_BYTES,
        "binary message shorter than the header: {} bytes",
        b.len()
    );
    assert_eq!(b[0], 1, "header version");
    assert_eq!(
        b[1] & !1,
        0,
        "only flag bit 0 is defined, got {:#04x}",
        b[1]
    );
    assert_eq!(&b[2..4], &[0, 0], "reserved header bytes");
    BinaryHeader {
        is_final: b[1] & 1 == 1,
        sequence: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
    }
}

/// True if some sample of the s16le PCM is not zero (the mock plays a 440 Hz sine).
pub fn is_audible(pcm: &[u8]) -> bool {
    pcm.chunks_exact(2)
        .any(|s| i16::from_le_bytes([s[0], s[1]]).unsigned_abs() > 100)
}

/// A plain HTTP response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON; panics with the body if it isn't.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }
}

/// Sends a raw request (bounded) and reads the whole response: headers, then
/// `Content-Length` bytes of body, or until EOF when there is no length.
pub async fn http_raw(addr: SocketAddr, request: &str) -> HttpResponse {
    tokio::time::timeout(WAIT, async {
        let mut s = TcpStream::connect(addr).await.expect("connect for HTTP");
        s.write_all(request.as_bytes())
            .await
            .expect("write request");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            let n = s.read(&mut chunk).await.expect("read response");
            assert!(
                n > 0,
                "connection closed before the response headers: {buf:?}"
            );
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let len = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.parse::<usize>().expect("numeric content-length"));
        let mut body = buf[head_end..].to_vec();
        match len {
            Some(len) => {
                while body.len() < len {
                    let n = s.read(&mut chunk).await.expect("read body");
                    assert!(n > 0, "connection closed inside the body");
                    body.extend_from_slice(&chunk[..n]);
                }
                body.truncate(len);
            }
            None => {
                s.read_to_end(&mut body).await.expect("read body to EOF");
            }
        }
        HttpResponse {
            status,
            headers,
            body: String::from_utf8(body).expect("UTF-8 body"),
        }
    })
    .await
    .unwrap_or_else(|_| panic!("HTTP request to {addr} timed out: {request:?}"))
}

/// `GET PATH` over plain HTTP/1.1 (bounded).
pub async fn http_get(addr: SocketAddr, path: &str) -> HttpResponse {
    http_raw(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
    .await
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Sum of every sample of the Prometheus/OpenMetrics text whose metric name satisfies `pred`
/// (labels ignored), or `None` if there is no such sample.
pub fn metric_sum(text: &str, pred: impl Fn(&str) -> bool) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        if !pred(name) {
            continue;
        }
        // The value follows the (optional) label set; a timestamp may follow it.
        let rest = match line[name_end..].rfind('}') {
            Some(i) if line[name_end..].starts_with('{') => &line[name_end + i + 1..],
            _ => &line[name_end..],
        };
        let value: f64 = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("unparsable sample line {line:?}"));
        *found.get_or_insert(0.0) += value;
    }
    found
}

/// Runs `duplex ARGS` to completion (bounded) and returns (status, stdout, stderr).
pub fn run_cli(args: &[&str], timeout: Duration) -> (ExitStatus, String, String) {
    let mut child = Command::new(duplex_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn duplex");
    let mut out_pipe = child.stdout.take().expect("stdout pipe");
    let mut err_pipe = child.stderr.take().expect("stderr pipe");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out_pipe.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`duplex {}` did not exit within {timeout:?}",
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = out_reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    (status, out, err)
}

/// A session id as the protocol defines it: `ws-` and 12 lowercase hex digits.
pub fn is_session_id(s: &str) -> bool {
    s.strip_prefix("ws-").is_some_and(|hex| {
        hex.len() == 12
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Estimates the frequency of a tone in s16le 48 kHz PCM from its upward zero crossings.
pub fn estimate_hz(pcm: &[u8]) -> f64 {
    let samples: Vec<i16> = pcm
        .chunks_exact(2)
        .map(|s| i16::from_le_bytes([s[0], s[1]]))
        .collect();
    let ups = samples.windows(2).filter(|w| w[0] < 0 && w[1] >= 0).count();
    let secs = samples.len() as f64 / f64::from(duplex::audio::SAMPLE_RATE);
    ups as f64 / secs
}

impl Worker {
    /// Sessions open on this worker (`queue_depth` of GetCapabilities).
    pub async fn sessions(&self) -> f64 {
        let c = duplex::grpc::TtsClient::connect(
            &self.addr.to_string(),
            &duplex::grpc::ClientOptions::default(),
        )
        .await
        .expect("connect to the worker");
        let caps = c
            .get_capabilities(Some(WAIT))
            .await
            .expect("GetCapabilities");
        caps.metrics.get("queue_depth").copied().unwrap_or(-1.0)
    }
}
