//! `duplex say`: a command-line client of the orchestrator's WebSocket protocol (docs/PROTOCOL.md
//! §1), for scripts and for trying the gateway without writing code.
//!
//! - `duplex say "Hello world" --out hello.wav` speaks one text, writes a 48 kHz mono 16-bit
//!   WAV and prints the first-audio latency (FAL), frame count and duration.
//! - `--out -` writes raw s16le PCM to stdout instead, for `| aplay -f S16_LE -r 48000 -c 1`
//!   or `| sox -t raw -r 48000 -e signed -b 16 -c 1 - out.flac` (the report goes to stderr).
//! - Without TEXT it is interactive: every stdin line is spoken (utterances queue up on the
//!   server), and `/pause`, `/resume`, `/stop`, `/quit` control playback. All audio of the
//!   session goes to the one output.
//!
//! It speaks the canonical JSON format (not the binary extension), so it works against any
//! server of the protocol, including the Python system we replace.

pub mod wav;

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::time::Duration;

use anyhow::{bail, Context as _};
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::audio::{FRAME_BYTES, FRAME_MS};
use crate::gateway::config::Pacing;
use wav::WavWriter;

/// Longest wait for the TCP connection, the WebSocket handshake and `session_start`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Flags of `duplex say`.
#[derive(Debug, Clone, clap::Args)]
pub struct SayArgs {
    /// Text to speak. Without it, each line typed on stdin is spoken; `/pause`, `/resume`,
    /// `/stop` control playback and `/quit` (or end of input) ends the session.
    pub text: Option<String>,
    /// The orchestrator's WebSocket URL.
    #[arg(long, default_value = "ws://127.0.0.1:8080/")]
    pub url: String,
    /// Write the audio to this WAV file, or `-` for raw s16le 48 kHz mono PCM on stdout.
    #[arg(long)]
    pub out: Option<String>,
    /// Voice (model id) for this session, e.g. `espeak-en-gb`; default: the server's.
    #[arg(long)]
    pub model: Option<String>,
    /// Ask the server for this pacing (`asap` renders a file faster than real time).
    #[arg(long, value_enum)]
    pub pacing: Option<Pacing>,
    /// Give up when the server sends nothing for this many seconds while audio is due.
    #[arg(long, default_value_t = 30.0)]
    pub timeout_secs: f64,
}

/// Runs `duplex say` to completion.
pub fn run(args: SayArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the client runtime")?;
    let result = rt.block_on(say(args));
    // A blocking stdin read may still be pending: don't wait for it.
    rt.shutdown_background();
    result
}

/// The URL with the session's query options appended.
fn session_url(url: &str, model: Option<&str>, pacing: Option<Pacing>) -> anyhow::Result<String> {
    if !(url.starts_with("ws://") || url.starts_with("wss://")) {
        bail!("--url must start with ws:// or wss://, got '{url}'");
    }
    let mut params = Vec::new();
    if let Some(m) = model {
        if m.is_empty()
            || !m
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            bail!(
                "--model must be a model id like espeak-en-us (letters, digits, - _ .), got '{m}'"
            );
        }
        params.push(format!("model={m}"));
    }
    if let Some(p) = pacing {
        params.push(format!("pacing={}", p.as_str()));
    }
    if params.is_empty() {
        return Ok(url.to_owned());
    }
    let sep = if url.contains('?') { '&' } else { '?' };
    // ws://host:port needs a path before the query.
    let base = match url.split_once("://") {
        Some((_, rest)) if !rest.contains('/') && !url.contains('?') => format!("{url}/"),
        _ => url.to_owned(),
    };
    Ok(format!("{base}{sep}{}", params.join("&")))
}

/// Where the audio goes.
enum Sink {
    Nowhere,
    Wav {
        path: String,
        writer: WavWriter<BufWriter<File>>,
    },
    Stdout(std::io::Stdout),
}

impl Sink {
    fn open(out: Option<&str>) -> anyhow::Result<Sink> {
        Ok(match out {
            None => Sink::Nowhere,
            Some("-") => Sink::Stdout(std::io::stdout()),
            Some(path) => {
                let file = File::create(path).with_context(|| format!("cannot create {path}"))?;
                Sink::Wav {
                    path: path.to_owned(),
                    writer: WavWriter::new(BufWriter::new(file))
                        .with_context(|| format!("cannot write {path}"))?,
                }
            }
        })
    }

    fn write(&mut self, pcm: &[u8]) -> anyhow::Result<()> {
        match self {
            Sink::Nowhere => Ok(()),
            Sink::Wav { path, writer } => writer
                .write(pcm)
                .with_context(|| format!("cannot write {path}")),
            Sink::Stdout(out) => {
                let mut out = out.lock();
                // Flushed per frame so a player downstream hears it in real time.
                out.write_all(pcm)
                    .and_then(|()| out.flush())
                    .context("cannot write audio to stdout")
            }
        }
    }

    /// Finishes the file; returns a line for the report.
    fn finish(self) -> anyhow::Result<Option<String>> {
        match self {
            Sink::Wav { path, writer } => {
                let bytes = writer.data_bytes();
                writer
                    .finish()
                    .with_context(|| format!("cannot finish {path}"))?;
                Ok(Some(format!(
                    "wrote {path}: {:.2} s of 48 kHz mono 16-bit audio",
                    bytes as f64 / 96_000.0
                )))
            }
            Sink::Stdout(_) | Sink::Nowhere => Ok(None),
        }
    }
}

/// Report lines go to stdout, or to stderr when stdout carries the audio.
struct Report {
    to_stderr: bool,
}

impl Report {
    fn line(&self, s: &str) {
        if self.to_stderr {
            eprintln!("{s}");
        } else {
            println!("{s}");
        }
    }
}

/// An utterance sent and not finished yet.
struct Pending {
    number: u32,
    sent_at: Instant,
    first_audio: Option<Duration>,
    frames: u64,
    interrupted: bool,
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One WebSocket session and its bookkeeping.
struct Session {
    ws: Ws,
    sink: Sink,
    report: Report,
    pending: VecDeque<Pending>,
    sent: u32,
    errors: Vec<String>,
    /// Set by `session_end` or a close from the server.
    ended: Option<String>,
}

impl Session {
    async fn send(&mut self, v: Value) -> anyhow::Result<()> {
        self.ws
            .send(Message::text(v.to_string()))
            .await
            .context("the server closed the connection")
    }

    async fn speak(&mut self, text: &str) -> anyhow::Result<()> {
        self.send(json!({"type": "text", "text": text, "is_final": true}))
            .await?;
        self.sent += 1;
        self.pending.push_back(Pending {
            number: self.sent,
            sent_at: Instant::now(),
            first_audio: None,
            frames: 0,
            interrupted: false,
        });
        Ok(())
    }

    async fn control(&mut self, command: &str) -> anyhow::Result<()> {
        self.send(json!({"type": "control", "command": command}))
            .await
    }

    /// The next text message from the server (`None` once the socket is closed).
    async fn recv(&mut self) -> anyhow::Result<Option<Value>> {
        loop {
            match self.ws.next().await {
                None | Some(Ok(Message::Close(_))) => return Ok(None),
                Some(Ok(Message::Text(t))) => {
                    return serde_json::from_str(&t)
                        .map(Some)
                        .with_context(|| format!("the server sent invalid JSON: {t}"))
                }
                Some(Ok(_)) => continue, // pings, binary: not used in the JSON format
                Some(Err(e)) => return Err(e).context("connection to the server failed"),
            }
        }
    }

    /// Acts on one server message.
    fn handle(&mut self, m: &Value) -> anyhow::Result<()> {
        match m["type"].as_str().unwrap_or("") {
            "audio" => {
                let pcm = m["pcm"].as_str().unwrap_or("");
                if !pcm.is_empty() {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(pcm)
                        .context("the server sent invalid base64 audio")?;
                    if bytes.len() != FRAME_BYTES {
                        tracing::warn!(
                            "audio frame of {} bytes (expected {FRAME_BYTES})",
                            bytes.len()
                        );
                    }
                    self.sink.write(&bytes)?;
                    if let Some(p) = self.pending.front_mut() {
                        p.first_audio.get_or_insert_with(|| p.sent_at.elapsed());
                        p.frames += 1;
                    }
                }
                if m["is_final"].as_bool() == Some(true) {
                    if let Some(p) = self.pending.pop_front() {
                        self.report_utterance(&p);
                    }
                }
            }
            "interrupted" => {
                if let Some(p) = self.pending.front_mut() {
                    p.interrupted = true;
                }
            }
            "error" => {
                let e = format!(
                    "server error {}: {}",
                    m["code"].as_str().unwrap_or("?"),
                    m["message"].as_str().unwrap_or("")
                );
                eprintln!("{e}");
                self.errors.push(e);
            }
            "session_end" => {
                self.ended = Some(m["reason"].as_str().unwrap_or("unknown").to_owned());
            }
            _ => {} // extension events we don't use
        }
        Ok(())
    }

    fn report_utterance(&self, p: &Pending) {
        let secs = p.frames as f64 * f64::from(FRAME_MS) / 1000.0;
        let fal = p.first_audio.map_or("-".to_owned(), |d| {
            format!("{:.0} ms", d.as_secs_f64() * 1000.0)
        });
        let stopped = if p.interrupted { " (stopped)" } else { "" };
        self.report.line(&format!(
            "utterance {}: FAL {fal}, {} frames, {secs:.2} s of audio{stopped}",
            p.number, p.frames
        ));
    }
}

async fn connect(url: &str) -> anyhow::Result<(Ws, Value)> {
    // TCP_NODELAY: control messages must leave at once (and FAL is measured from the send).
    let connecting = tokio_tungstenite::connect_async_with_config(url, None, true);
    let (mut ws, _) = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| anyhow::anyhow!("cannot connect to {url}: timed out"))?
        .with_context(|| format!("cannot connect to {url}"))?;
    let first = tokio::time::timeout(CONNECT_TIMEOUT, ws.next())
        .await
        .map_err(|_| anyhow::anyhow!("{url} sent no session_start"))?;
    let start: Value = match first {
        Some(Ok(Message::Text(t))) => {
            serde_json::from_str(&t).with_context(|| format!("{url} sent invalid JSON: {t}"))?
        }
        other => bail!("{url} did not start a session: {other:?}"),
    };
    if start["type"] != "session_start" {
        bail!("{url} sent {start} instead of session_start");
    }
    Ok((ws, start))
}

async fn say(args: SayArgs) -> anyhow::Result<()> {
    let t = args.timeout_secs;
    if !t.is_finite() || !(0.1..=86_400.0).contains(&t) {
        bail!("--timeout-secs must be between 0.1 and 86400, got {t}");
    }
    let idle_limit = Duration::from_secs_f64(t);
    let url = session_url(&args.url, args.model.as_deref(), args.pacing)?;
    let sink = Sink::open(args.out.as_deref())?;
    let report = Report {
        to_stderr: matches!(sink, Sink::Stdout(_)),
    };
    let (ws, start) = connect(&url).await?;
    eprintln!(
        "connected to {url}: session {} (model {})",
        start["session_id"].as_str().unwrap_or("?"),
        start["model"].as_str().unwrap_or("server default")
    );
    let mut s = Session {
        ws,
        sink,
        report,
        pending: VecDeque::new(),
        sent: 0,
        errors: Vec::new(),
        ended: None,
    };
    let outcome = match args.text.as_deref() {
        Some(text) => one_shot(&mut s, text, idle_limit).await,
        None => interactive(&mut s, idle_limit).await,
    };
    let _ = s.ws.close(None).await;
    let Session {
        sink,
        report,
        errors,
        ..
    } = s;
    // The file is finished even after an error: what arrived stays playable.
    if let Some(line) = sink.finish()? {
        report.line(&line);
    }
    outcome?;
    if let Some(e) = errors.first() {
        bail!("{e}");
    }
    Ok(())
}

async fn one_shot(s: &mut Session, text: &str, idle_limit: Duration) -> anyhow::Result<()> {
    if text.trim().is_empty() {
        bail!("nothing to say: TEXT is empty");
    }
    s.speak(text).await?;
    drain(s, idle_limit).await
}

/// Reads until every sent utterance has ended.
async fn drain(s: &mut Session, idle_limit: Duration) -> anyhow::Result<()> {
    while !s.pending.is_empty() {
        let m = tokio::time::timeout(idle_limit, s.recv())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "no answer from the server for {:.1} s",
                    idle_limit.as_secs_f64()
                )
            })??;
        match m {
            Some(m) => s.handle(&m)?,
            None => bail!("the server closed the connection before the audio ended"),
        }
        // A failed utterance gets an error and then its end marker, which pops it.
        if let Some(reason) = &s.ended {
            bail!("the server ended the session ({reason})");
        }
    }
    Ok(())
}

/// What a line typed in interactive mode means.
#[derive(Debug, PartialEq, Eq)]
enum Line<'a> {
    Speak(&'a str),
    Control(&'static str),
    Quit,
    Nothing,
    Unknown(&'a str),
}

fn parse_line(line: &str) -> Line<'_> {
    let t = line.trim();
    match t {
        "" => Line::Nothing,
        "/pause" => Line::Control("PAUSE"),
        "/resume" => Line::Control("RESUME"),
        "/stop" => Line::Control("STOP"),
        "/quit" | "/exit" => Line::Quit,
        _ if t.starts_with('/') => Line::Unknown(t),
        _ => Line::Speak(t),
    }
}

async fn interactive(s: &mut Session, idle_limit: Duration) -> anyhow::Result<()> {
    eprintln!("type a sentence and press Enter to hear it; /pause /resume /stop /quit");
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    let mut last_heard = Instant::now();
    let mut paused = false;
    loop {
        if !stdin_open {
            // End of input: let queued speech finish, then leave (at once if paused: nothing
            // could resume it any more).
            return if paused {
                Ok(())
            } else {
                drain(s, idle_limit).await
            };
        }
        let deadline = last_heard + idle_limit;
        // While paused, silence from the server is expected, not a timeout.
        let waiting = !s.pending.is_empty() && !paused;
        tokio::select! {
            line = lines.next_line() => match line.context("cannot read stdin")? {
                None => stdin_open = false,
                Some(line) => match parse_line(&line) {
                    Line::Speak(text) => {
                        s.speak(text).await?;
                        last_heard = Instant::now();
                    }
                    Line::Control(cmd) => {
                        s.control(cmd).await?;
                        last_heard = Instant::now();
                        paused = cmd == "PAUSE";
                        if cmd == "STOP" {
                            // The server cancels queued utterances too; only the current
                            // one gets its end marker.
                            s.pending.truncate(1);
                        }
                    }
                    Line::Quit => return Ok(()),
                    Line::Nothing => {}
                    Line::Unknown(cmd) => {
                        eprintln!("unknown command {cmd}: use /pause /resume /stop /quit");
                    }
                },
            },
            m = s.recv() => {
                last_heard = Instant::now();
                match m? {
                    Some(m) => s.handle(&m)?,
                    None => bail!("the server closed the connection"),
                }
                if let Some(reason) = &s.ended {
                    bail!("the server ended the session ({reason})");
                }
                // Interactive sessions carry on after a server error (it was printed).
                s.errors.clear();
            }
            () = tokio::time::sleep_until(deadline), if waiting => {
                bail!("no answer from the server for {:.1} s", idle_limit.as_secs_f64());
            }
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        if s.pending.is_empty() {
            last_heard = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_get_the_session_options() {
        assert_eq!(
            session_url("ws://127.0.0.1:8080/", None, None).unwrap(),
            "ws://127.0.0.1:8080/"
        );
        assert_eq!(
            session_url("ws://h:1", Some("espeak-de"), Some(Pacing::Asap)).unwrap(),
            "ws://h:1/?model=espeak-de&pacing=asap"
        );
        assert_eq!(
            session_url("ws://h:1/x?format=json", Some("m"), None).unwrap(),
            "ws://h:1/x?format=json&model=m"
        );
        assert!(session_url("http://h:1/", None, None).is_err());
        assert!(session_url("ws://h:1/", Some("a b&c"), None).is_err());
        assert!(session_url("ws://h:1/", Some(""), None).is_err());
    }

    #[test]
    fn interactive_lines() {
        assert_eq!(parse_line("  hello there "), Line::Speak("hello there"));
        assert_eq!(parse_line("/pause"), Line::Control("PAUSE"));
        assert_eq!(parse_line("/resume "), Line::Control("RESUME"));
        assert_eq!(parse_line("/stop"), Line::Control("STOP"));
        assert_eq!(parse_line("/quit"), Line::Quit);
        assert_eq!(parse_line("   "), Line::Nothing);
        assert_eq!(parse_line("/frobnicate"), Line::Unknown("/frobnicate"));
    }
}
