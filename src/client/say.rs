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

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tokio::io::AsyncBufReadExt;
use tokio::time::Instant as Deadline;

use super::wav::WavWriter;
use super::{Client, Error, Incoming, Options};
use crate::audio::{FRAME_BYTES, FRAME_MS};
use crate::protocol::{Command, Pacing, ServerEvent};

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
    /// PEM certificate(s) to trust for a `wss://` URL: a private CA or the server's
    /// self-signed certificate.
    #[arg(long)]
    pub ca: Option<std::path::PathBuf>,
    /// Credential sent as `Authorization: Bearer` (a static token or a JWT, e.g. from
    /// `duplex token`); read from the environment so it stays out of `ps`.
    #[arg(long, env = "DUPLEX_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
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

/// The session options of the flags (the model id is checked before connecting).
fn options(model: Option<&str>, pacing: Option<Pacing>) -> Options {
    Options {
        model: model.map(str::to_owned),
        pacing,
        connect_timeout: CONNECT_TIMEOUT,
        ..Options::default()
    }
}

/// The URL with the session's query options appended.
fn session_url(url: &str, model: Option<&str>, pacing: Option<Pacing>) -> anyhow::Result<String> {
    options(model, pacing)
        .session_url(url)
        .map_err(|e| match e {
            Error::Usage(m) if m.starts_with("the URL") => anyhow::anyhow!("--url: {m}"),
            Error::Usage(m) => anyhow::anyhow!("--model: {m}"),
            other => other.into(),
        })
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

/// What [`Session::recv`] found.
enum Next {
    /// A message and the instant its read returned.
    Message(Instant, Incoming),
    /// The connection is closed.
    Closed,
    /// Nothing before the deadline.
    Silent,
}

/// One WebSocket session and its bookkeeping.
struct Session {
    client: Client,
    sink: Sink,
    report: Report,
    pending: VecDeque<Pending>,
    sent: u32,
    errors: Vec<String>,
    /// Set by `session_end`.
    ended: Option<String>,
}

impl Session {
    async fn speak(&mut self, text: &str) -> anyhow::Result<()> {
        let sent_at = self
            .client
            .send_text(text, true)
            .await
            .context("the server closed the connection")?;
        self.sent += 1;
        self.pending.push_back(Pending {
            number: self.sent,
            sent_at,
            first_audio: None,
            frames: 0,
            interrupted: false,
        });
        Ok(())
    }

    async fn control(&mut self, command: Command) -> anyhow::Result<()> {
        self.client
            .send_control(command)
            .await
            .context("the server closed the connection")?;
        Ok(())
    }

    /// The next message from the server, waiting at most until `deadline`.
    async fn recv(&mut self, deadline: Deadline) -> anyhow::Result<Next> {
        match self.client.recv_wire(deadline).await {
            Ok(Some(r)) => {
                let at = r.at;
                match r.into_incoming()? {
                    Incoming::Close(_) => Ok(Next::Closed),
                    m => Ok(Next::Message(at, m)),
                }
            }
            Ok(None) => Ok(Next::Silent),
            Err(Error::Closed(_)) => Ok(Next::Closed),
            Err(e) => Err(e).context("connection to the server failed"),
        }
    }

    /// Acts on one server message.
    fn handle(&mut self, at: Instant, m: Incoming) -> anyhow::Result<()> {
        match m {
            Incoming::Audio { is_final, pcm, .. } => {
                if !pcm.is_empty() {
                    if pcm.len() != FRAME_BYTES {
                        tracing::warn!(
                            "audio frame of {} bytes (expected {FRAME_BYTES})",
                            pcm.len()
                        );
                    }
                    self.sink.write(&pcm)?;
                    if let Some(p) = self.pending.front_mut() {
                        p.first_audio
                            .get_or_insert_with(|| at.saturating_duration_since(p.sent_at));
                        p.frames += 1;
                    }
                }
                if is_final {
                    if let Some(p) = self.pending.pop_front() {
                        self.report_utterance(&p);
                    }
                }
            }
            Incoming::Event(ServerEvent::Interrupted { .. }) => {
                if let Some(p) = self.pending.front_mut() {
                    p.interrupted = true;
                }
            }
            Incoming::Event(ServerEvent::Error { message, code }) => {
                let e = format!("server error {}: {message}", code.as_str());
                eprintln!("{e}");
                self.errors.push(e);
            }
            Incoming::Event(ServerEvent::SessionEnd { reason, .. }) => {
                self.ended = Some(reason.as_str().to_owned());
            }
            // Extension events we don't use; a close is seen by `recv`.
            Incoming::Event(_) | Incoming::Close(_) => {}
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
    // `url` already carries the options.
    let mut opts = options(None, None);
    if let Some(ca) = &args.ca {
        opts.tls = Some(crate::client::tls_config(ca)?);
    }
    if let Some(token) = &args.token {
        opts.headers
            .push(("Authorization".into(), format!("Bearer {token}")));
    }
    let client = Client::connect(&url, &opts).await?;
    eprintln!(
        "connected to {url}: session {} (model {})",
        client.session_id(),
        client.session().model().unwrap_or("server default")
    );
    let mut s = Session {
        client,
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
    let Session {
        client,
        sink,
        report,
        errors,
        ..
    } = s;
    client.close().await;
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
        match s.recv(Deadline::now() + idle_limit).await? {
            Next::Message(at, m) => s.handle(at, m)?,
            Next::Closed => bail!("the server closed the connection before the audio ended"),
            Next::Silent => bail!(
                "no answer from the server for {:.1} s",
                idle_limit.as_secs_f64()
            ),
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
    Control(Command),
    Quit,
    Nothing,
    Unknown(&'a str),
}

fn parse_line(line: &str) -> Line<'_> {
    let t = line.trim();
    match t {
        "" => Line::Nothing,
        "/pause" => Line::Control(Command::Pause),
        "/resume" => Line::Control(Command::Resume),
        "/stop" => Line::Control(Command::Stop),
        "/quit" | "/exit" => Line::Quit,
        _ if t.starts_with('/') => Line::Unknown(t),
        _ => Line::Speak(t),
    }
}

async fn interactive(s: &mut Session, idle_limit: Duration) -> anyhow::Result<()> {
    eprintln!("type a sentence and press Enter to hear it; /pause /resume /stop /quit");
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    let mut last_heard = Deadline::now();
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
                        last_heard = Deadline::now();
                    }
                    Line::Control(cmd) => {
                        s.control(cmd).await?;
                        last_heard = Deadline::now();
                        paused = cmd == Command::Pause;
                        if cmd == Command::Stop {
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
            // No bound of its own: the idle deadline is the arm below.
            m = s.recv(Deadline::now() + Duration::from_secs(86_400)) => {
                last_heard = Deadline::now();
                match m? {
                    Next::Message(at, m) => s.handle(at, m)?,
                    Next::Closed => bail!("the server closed the connection"),
                    Next::Silent => continue,
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
            last_heard = Deadline::now();
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
        assert_eq!(parse_line("/pause"), Line::Control(Command::Pause));
        assert_eq!(parse_line("/resume "), Line::Control(Command::Resume));
        assert_eq!(parse_line("/stop"), Line::Control(Command::Stop));
        assert_eq!(parse_line("/quit"), Line::Quit);
        assert_eq!(parse_line("   "), Line::Nothing);
        assert_eq!(parse_line("/frobnicate"), Line::Unknown("/frobnicate"));
    }
}
