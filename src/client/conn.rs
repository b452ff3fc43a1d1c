//! The WebSocket session: connect, send, receive typed items with the instant of the read
//! that completed them.
//!
//! Why tokio-tungstenite under a timestamping stream: the framing, masking, ping/pong and
//! close handshake are tungstenite's (one implementation for the CLI, the bench and the
//! tests), while [`Stamped`] records the instant every socket read returns. A message's
//! [`Received::at`] is therefore the instant of the read that completed it, however late the
//! task got to parse it: what the bench measures.
//!
//! Why two levels of receive: [`Client::recv_wire`] parses a message in place (JSON audio is
//! deserialised with borrowed fields, its base64 is *not* decoded, binary audio is a slice of
//! the message): no allocation per audio frame, for the bench's hot loop. [`Client::recv`]
//! decodes on top of it into the owned [`Incoming`] the CLI and the tests want.
//!
//! Nothing here panics on server input: a misbehaving server yields an [`Error`].

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant as Deadline;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use crate::audio::{FRAME_MS, SAMPLE_RATE};
use crate::protocol::audio::parse_binary;
use crate::protocol::{Command, Format, Pacing, ServerEvent};

/// Largest message accepted from a server; anything bigger is a protocol error, not audio.
const MAX_MESSAGE: usize = 16 << 20;
/// Read buffer per connection. One JSON audio frame is ~2.7 KiB; tungstenite's default
/// (128 KiB) would cost hundreds of MB at the bench's thousands of sessions.
const READ_BUFFER: usize = 8 << 10;

/// What can go wrong with a session. Every variant is something the server or the network
/// did (or a bad option), never a panic.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The URL or an option is unusable.
    #[error("{0}")]
    Usage(String),
    /// TCP connect or the WebSocket handshake failed.
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    /// The server answered the upgrade with an HTTP error.
    #[error("{url}: upgrade refused: HTTP {status}{}", if body.is_empty() { String::new() } else { format!(": {body}") })]
    Refused {
        url: String,
        status: u16,
        body: String,
    },
    /// A bounded wait ran out.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The server sent something the protocol does not allow.
    #[error("protocol violation by the server: {0}")]
    Protocol(String),
    /// The connection ended (close handshake done, or the socket closed).
    #[error("the connection is closed{}", .0.as_ref().map_or(String::new(), |r| format!(": {r}")))]
    Closed(Option<String>),
    /// A transport error (I/O, broken framing). Boxed: tungstenite's error is large and
    /// every `Result` of this module would carry its size.
    #[error("connection failed: {0}")]
    Transport(Box<tungstenite::Error>),
}

impl From<tungstenite::Error> for Error {
    fn from(e: tungstenite::Error) -> Self {
        Error::Transport(Box::new(e))
    }
}

/// Session options: the query parameters of docs/PROTOCOL.md §1.1, extra upgrade headers, and the
/// bound on connecting.
#[derive(Debug, Clone)]
pub struct Options {
    /// `?format=` (server default when `None`).
    pub format: Option<Format>,
    /// `?pacing=`.
    pub pacing: Option<Pacing>,
    /// `?model=`: a model id (letters, digits, `-`, `_`, `.`).
    pub model: Option<String>,
    /// `?token=` (percent-encoded).
    pub token: Option<String>,
    /// `?input_rate=`: sample rate of the microphone audio the client will send.
    pub input_rate: Option<u32>,
    /// Extra headers of the upgrade request, e.g. `Authorization`, `Origin`.
    pub headers: Vec<(String, String)>,
    /// Bound on TCP connect + handshake + `session_start`, together.
    pub connect_timeout: Duration,
    /// Whom to trust for `wss://` (see [`tls_config`]); `None` refuses `wss://` URLs.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            format: None,
            pacing: None,
            model: None,
            token: None,
            input_rate: None,
            headers: Vec::new(),
            connect_timeout: Duration::from_secs(10),
            tls: None,
        }
    }
}

/// A TLS client configuration trusting the PEM certificates in `ca` (a private CA, or the
/// server's self-signed certificate): what `duplex say --ca` uses for `wss://`.
pub fn tls_config(ca: &std::path::Path) -> Result<std::sync::Arc<rustls::ClientConfig>, Error> {
    crate::trust::client_config(ca, b"http/1.1")
        .map_err(|e| Error::Usage(format!("--ca {}: {e:#}", ca.display())))
}

/// The byte stream under the WebSocket: plain TCP or TLS over it.
#[allow(clippy::large_enum_variant)] // one per connection; boxing would add a pointer hop per read
pub enum Stream {
    Plain(TcpStream),
    Tls(tokio_rustls::client::TlsStream<TcpStream>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}

impl Options {
    /// `url` with the session's query options appended (the caller's own query is kept).
    pub fn session_url(&self, url: &str) -> Result<String, Error> {
        if !(url.starts_with("ws://") || url.starts_with("wss://")) {
            return Err(Error::Usage(format!(
                "the URL must start with ws:// or wss://, got '{url}'"
            )));
        }
        let mut params: Vec<String> = Vec::new();
        if let Some(m) = &self.model {
            if m.is_empty()
                || !m
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                return Err(Error::Usage(format!(
                    "the model must be an id like espeak-en-us (letters, digits, - _ .), got '{m}'"
                )));
            }
            params.push(format!("model={m}"));
        }
        if let Some(f) = self.format {
            params.push(format!("format={}", f.as_str()));
        }
        if let Some(p) = self.pacing {
            params.push(format!("pacing={}", p.as_str()));
        }
        if let Some(t) = &self.token {
            let enc: String = form_urlencoded::byte_serialize(t.as_bytes()).collect();
            params.push(format!("token={enc}"));
        }
        if let Some(r) = self.input_rate {
            params.push(format!("input_rate={r}"));
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
}

/// A stream that records when each read returned (see the module docs).
#[derive(Debug)]
pub struct Stamped<S> {
    inner: S,
    last_read: Instant,
}

impl<S> Stamped<S> {
    fn new(inner: S) -> Self {
        Stamped {
            inner,
            last_read: Instant::now(),
        }
    }

    /// The instant the latest completed read returned.
    pub fn last_read(&self) -> Instant {
        self.last_read
    }

    /// The wrapped stream (e.g. the `TcpStream`, to watch for the server's TCP close).
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Stamped<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            self.last_read = Instant::now();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Stamped<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The WebSocket stream under a [`Client`].
pub type Ws = WebSocketStream<Stamped<Stream>>;

/// One audio message as it arrived, not decoded: JSON base64 stays base64.
#[derive(Debug, Clone)]
pub struct WireAudio {
    /// Sequence number (1 for the first frame of each utterance).
    pub sequence: u32,
    /// The end marker (or a final data frame).
    pub is_final: bool,
    /// Arrived as a binary message (binary format) rather than JSON.
    pub binary: bool,
    /// `sample_rate` of a JSON frame (0 if absent); 48000 for binary frames.
    pub sample_rate: u32,
    /// `frame_ms` of a JSON frame (0 if absent); 20 for binary frames.
    pub frame_ms: u32,
    /// Raw PCM (binary) or the base64 text (JSON): a slice of the message, not a copy.
    payload: Bytes,
}

impl WireAudio {
    /// Bytes of PCM the frame carries, without decoding (`None`: base64 of impossible length).
    pub fn pcm_len(&self) -> Option<usize> {
        if self.binary {
            return Some(self.payload.len());
        }
        let b = &self.payload[..];
        if !b.len().is_multiple_of(4) {
            return None;
        }
        let pad = b.iter().rev().take(2).filter(|&&c| c == b'=').count();
        Some(b.len() / 4 * 3 - pad)
    }

    /// The PCM: the slice itself for binary frames, decoded base64 for JSON ones.
    pub fn pcm(&self) -> Result<Bytes, Error> {
        if self.binary || self.payload.is_empty() {
            return Ok(self.payload.clone());
        }
        base64::engine::general_purpose::STANDARD
            .decode(&self.payload)
            .map(Bytes::from)
            .map_err(|e| Error::Protocol(format!("audio pcm is not standard base64: {e}")))
    }

    /// The end marker: final and without PCM.
    pub fn is_end_marker(&self) -> bool {
        self.is_final && self.payload.is_empty()
    }
}

/// What a received message is, parsed but not decoded.
#[derive(Debug, Clone)]
pub enum Kind {
    /// An audio frame or end marker, either format.
    Audio(WireAudio),
    /// Any other server event (typed; `ServerEvent::Unknown` for types this build lacks).
    Event(ServerEvent),
    /// The server's close frame: `(code, reason)`, `None` when it had no code.
    Close(Option<(u16, String)>),
}

/// One server message and the instant the socket read that completed it returned.
#[derive(Debug, Clone)]
pub struct Received {
    /// When the read that completed this message returned.
    pub at: Instant,
    /// What it is.
    pub kind: Kind,
    /// The message's payload as sent (JSON text or binary); empty for a close.
    raw: Bytes,
}

impl Received {
    /// The message exactly as the server sent it (for protocol-conformance checks).
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// Decodes into the owned form (base64 PCM decoded).
    pub fn into_incoming(self) -> Result<Incoming, Error> {
        Ok(match self.kind {
            Kind::Audio(a) => Incoming::Audio {
                sequence: a.sequence,
                is_final: a.is_final,
                pcm: a.pcm()?,
            },
            Kind::Event(e) => Incoming::Event(e),
            Kind::Close(c) => Incoming::Close(c),
        })
    }
}

/// A server message, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// Every JSON event except audio.
    Event(ServerEvent),
    /// An audio frame (binary or JSON; PCM decoded) or, with empty `pcm` and `is_final`, the
    /// end marker.
    Audio {
        sequence: u32,
        is_final: bool,
        pcm: Bytes,
    },
    /// The server's close frame.
    Close(Option<(u16, String)>),
}

/// The `audio` fields, borrowed from the message (no allocation per frame).
#[derive(Deserialize)]
struct AudioWire<'a> {
    #[serde(rename = "type", borrow)]
    ty: &'a str,
    /// `&str`, not `Cow`: serde borrows an `Option<Cow>` only as an owned copy. A `pcm` with
    /// JSON escapes fails here and takes the typed (copying) path instead.
    #[serde(default, borrow)]
    pcm: Option<&'a str>,
    #[serde(default)]
    sequence: Option<u32>,
    #[serde(default)]
    is_final: Option<bool>,
    #[serde(default)]
    sample_rate: Option<u32>,
    #[serde(default)]
    frame_ms: Option<u32>,
}

/// Parses one text message. One borrowed parse recognises audio (the hot path); everything
/// else goes through the protocol's [`ServerEvent`].
pub fn parse_text(raw: Bytes) -> Result<(Kind, Bytes), Error> {
    let text = std::str::from_utf8(&raw)
        .map_err(|_| Error::Protocol("a text message is not UTF-8".into()))?;
    let w = match serde_json::from_str::<AudioWire<'_>>(text) {
        Ok(w) if w.ty == "audio" => w,
        // Not audio (or fields of a shape audio never has): the typed event decides.
        _ => {
            let event = ServerEvent::parse(text)
                .map_err(|e| Error::Protocol(format!("bad server message ({e}): {text:.200}")))?;
            if let ServerEvent::Audio {
                pcm,
                sequence,
                sample_rate,
                frame_ms,
                is_final,
            } = event
            {
                let audio = WireAudio {
                    sequence,
                    is_final,
                    binary: false,
                    sample_rate,
                    frame_ms,
                    payload: Bytes::from(pcm),
                };
                return Ok((Kind::Audio(audio), raw));
            }
            return Ok((Kind::Event(event), raw));
        }
    };
    let sequence = w
        .sequence
        .ok_or_else(|| Error::Protocol("audio message without a sequence".into()))?;
    // A slice of the message itself: no copy.
    let payload = w
        .pcm
        .map_or_else(Bytes::new, |s| raw.slice_ref(s.as_bytes()));
    let audio = WireAudio {
        sequence,
        is_final: w.is_final.unwrap_or(false),
        binary: false,
        sample_rate: w.sample_rate.unwrap_or(0),
        frame_ms: w.frame_ms.unwrap_or(0),
        payload,
    };
    Ok((Kind::Audio(audio), raw))
}

/// Parses one binary message (binary-format audio).
pub fn parse_binary_message(raw: Bytes) -> Result<(Kind, Bytes), Error> {
    let f = parse_binary(&raw).map_err(Error::Protocol)?;
    let audio = WireAudio {
        sequence: f.sequence,
        is_final: f.is_final,
        binary: true,
        sample_rate: SAMPLE_RATE,
        frame_ms: FRAME_MS,
        payload: raw.slice_ref(f.pcm),
    };
    Ok((Kind::Audio(audio), raw))
}

/// The `session_start` greeting's fields.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionStart {
    /// The whole event, as parsed.
    pub event: ServerEvent,
    /// Its raw JSON.
    pub raw: Bytes,
    /// When it arrived.
    pub at: Instant,
}

impl SessionStart {
    /// The server-assigned session id.
    pub fn session_id(&self) -> &str {
        match &self.event {
            ServerEvent::SessionStart { session_id, .. } => session_id,
            _ => "",
        }
    }

    /// The model the server chose, if it said.
    pub fn model(&self) -> Option<&str> {
        match &self.event {
            ServerEvent::SessionStart { model, .. } => model.as_deref(),
            _ => None,
        }
    }
}

/// One WebSocket session with a duplex server.
pub struct Client {
    ws: Ws,
    start: SessionStart,
    seen_end_marker: bool,
    closed: bool,
}

impl Client {
    /// Connects to `url` (with `opts`' query options and headers appended), performs the
    /// handshake and reads `session_start`, all within `opts.connect_timeout`.
    pub async fn connect(url: &str, opts: &Options) -> Result<Client, Error> {
        let deadline = Deadline::now() + opts.connect_timeout;
        Self::connect_until(url, opts, deadline).await
    }

    /// [`Client::connect`] bounded by an absolute deadline instead of `opts.connect_timeout`.
    pub async fn connect_until(
        url: &str,
        opts: &Options,
        deadline: Deadline,
    ) -> Result<Client, Error> {
        let url = opts.session_url(url)?;
        let mut ws = Self::handshake(&url, opts, deadline).await?;
        let (msg, at) = loop {
            let first = tokio::time::timeout_at(deadline, ws.next())
                .await
                .map_err(|_| Error::Timeout(format!("{url} sent no session_start")))?;
            match first {
                None => return Err(Error::Closed(Some("before session_start".into()))),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(m) => break (m?, ws.get_ref().last_read()),
            }
        };
        let raw = match msg {
            Message::Text(t) => Bytes::from(t),
            other => {
                return Err(Error::Protocol(format!(
                    "expected session_start first, got {other:?}"
                )))
            }
        };
        let event = match parse_text(raw.clone())? {
            (Kind::Event(e @ ServerEvent::SessionStart { .. }), _) => e,
            (k, _) => {
                return Err(Error::Protocol(format!(
                    "expected session_start first, got {k:?}"
                )))
            }
        };
        Ok(Client {
            ws,
            start: SessionStart { event, raw, at },
            seen_end_marker: false,
            closed: false,
        })
    }

    async fn handshake(url: &str, opts: &Options, deadline: Deadline) -> Result<Ws, Error> {
        let connect_err = |reason: String| Error::Connect {
            url: url.to_owned(),
            reason,
        };
        let mut req = url
            .into_client_request()
            .map_err(|e| Error::Usage(format!("bad URL {url}: {e}")))?;
        let secure = req.uri().scheme_str() == Some("wss");
        if secure && opts.tls.is_none() {
            return Err(Error::Usage(format!(
                "{url}: wss:// needs a certificate to trust (--ca FILE)"
            )));
        }
        for (k, v) in &opts.headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|e| Error::Usage(format!("bad header name {k:?}: {e}")))?;
            let value = HeaderValue::from_str(v)
                .map_err(|e| Error::Usage(format!("bad value for header {k}: {e}")))?;
            req.headers_mut().insert(name, value);
        }
        let host = req.uri().host().unwrap_or_default();
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = req
            .uri()
            .port_u16()
            .unwrap_or(if secure { 443 } else { 80 });
        let tcp = tokio::time::timeout_at(deadline, TcpStream::connect((host.as_str(), port)))
            .await
            .map_err(|_| connect_err("timed out".into()))?
            .map_err(|e| connect_err(e.to_string()))?;
        // Control messages must leave at once (and latency is measured from the send).
        tcp.set_nodelay(true)
            .map_err(|e| connect_err(format!("TCP_NODELAY: {e}")))?;
        let mut config = WebSocketConfig::default();
        config.read_buffer_size = READ_BUFFER;
        config.max_message_size = Some(MAX_MESSAGE);
        config.max_frame_size = Some(MAX_MESSAGE);
        let stream = match &opts.tls {
            Some(tls) if secure => {
                let name = rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| Error::Usage(format!("{url}: bad TLS server name: {e}")))?;
                let connector = tokio_rustls::TlsConnector::from(tls.clone());
                let tls = tokio::time::timeout_at(deadline, connector.connect(name, tcp))
                    .await
                    .map_err(|_| connect_err("TLS handshake timed out".into()))?
                    .map_err(|e| connect_err(format!("TLS: {e}")))?;
                Stream::Tls(tls)
            }
            _ => Stream::Plain(tcp),
        };
        let hs =
            tokio_tungstenite::client_async_with_config(req, Stamped::new(stream), Some(config));
        match tokio::time::timeout_at(deadline, hs).await {
            Err(_) => Err(connect_err("handshake timed out".into())),
            Ok(Ok((ws, _resp))) => Ok(ws),
            Ok(Err(tungstenite::Error::Http(resp))) => Err(Error::Refused {
                url: url.to_owned(),
                status: resp.status().as_u16(),
                body: resp
                    .body()
                    .as_deref()
                    .map(|b| String::from_utf8_lossy(b).trim().to_owned())
                    .unwrap_or_default(),
            }),
            Ok(Err(e)) => Err(connect_err(e.to_string())),
        }
    }

    /// The `session_start` greeting.
    pub fn session(&self) -> &SessionStart {
        &self.start
    }

    /// The session id from `session_start`.
    pub fn session_id(&self) -> &str {
        self.start.session_id()
    }

    /// Whether this server has sent an end marker on this connection: from then on silence
    /// mid-utterance is a stall to wait out, not the end of a marker-less utterance.
    pub fn seen_end_marker(&self) -> bool {
        self.seen_end_marker
    }

    /// The instant the latest socket read returned.
    pub fn last_read(&self) -> Instant {
        self.ws.get_ref().last_read()
    }

    /// The underlying WebSocket (escape hatch for tests of the protocol itself: pings, raw
    /// frames, the TCP close).
    pub fn ws_mut(&mut self) -> &mut Ws {
        &mut self.ws
    }

    /// Sends a message; returns the instant taken just before the socket write (the frame is
    /// encoded and masked first, so the instant is as close to the write as the bench's own
    /// client used to take it).
    pub async fn send_message(&mut self, m: Message) -> Result<Instant, Error> {
        self.ws.feed(m).await?;
        let t = Instant::now();
        self.ws.flush().await?;
        Ok(t)
    }

    /// Sends a `text` message (a whole utterance, or a chunk with `is_final: false`); returns
    /// the instant before the write (where first-audio latency starts).
    pub async fn send_text(&mut self, text: &str, is_final: bool) -> Result<Instant, Error> {
        let body = serde_json::json!({"type": "text", "text": text, "is_final": is_final});
        self.send_message(Message::text(body.to_string())).await
    }

    /// Sends a `control` message.
    pub async fn send_control(&mut self, command: Command) -> Result<Instant, Error> {
        let command = match command {
            Command::Pause => "PAUSE",
            Command::Resume => "RESUME",
            Command::Stop => "STOP",
        };
        self.send_raw_text(&format!(r#"{{"type":"control","command":"{command}"}}"#))
            .await
    }

    /// Sends any text message as it is (e.g. deliberately malformed JSON in tests).
    pub async fn send_raw_text(&mut self, text: &str) -> Result<Instant, Error> {
        self.send_message(Message::text(text)).await
    }

    /// Sends microphone audio (s16le mono at the session's `input_rate`) as a binary message.
    pub async fn send_audio(&mut self, pcm: impl Into<Bytes>) -> Result<Instant, Error> {
        self.send_message(Message::Binary(pcm.into())).await
    }

    /// The next server message, parsed in place, or `Ok(None)` if `deadline` passes first.
    /// After the server's close frame, the next call returns [`Error::Closed`].
    ///
    /// Cancel-safe (tungstenite keeps partial frames in its buffer), so a deadline of "now"
    /// returns what the kernel has already received without waiting. Pings are answered by
    /// tungstenite and never surface; pongs are skipped.
    pub async fn recv_wire(&mut self, deadline: Deadline) -> Result<Option<Received>, Error> {
        loop {
            if self.closed {
                return Err(Error::Closed(None));
            }
            let next = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Ok(None),
                Ok(n) => n,
            };
            let at = self.ws.get_ref().last_read();
            let msg = match next {
                None => {
                    self.closed = true;
                    return Err(Error::Closed(None));
                }
                Some(Err(
                    tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed,
                )) => {
                    self.closed = true;
                    return Err(Error::Closed(None));
                }
                Some(Err(tungstenite::Error::Protocol(
                    tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
                ))) => {
                    self.closed = true;
                    return Err(Error::Closed(Some("without a close frame".into())));
                }
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(m)) => m,
            };
            let (kind, raw) = match msg {
                Message::Text(t) => parse_text(Bytes::from(t))?,
                Message::Binary(b) => parse_binary_message(b)?,
                Message::Close(f) => (
                    Kind::Close(
                        f.map(|CloseFrame { code, reason }| (u16::from(code), reason.to_string())),
                    ),
                    Bytes::new(),
                ),
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            };
            if let Kind::Audio(a) = &kind {
                if a.is_end_marker() {
                    self.seen_end_marker = true;
                }
            }
            return Ok(Some(Received { at, kind, raw }));
        }
    }

    /// Every message that can be read without waiting (already received by the kernel), up to
    /// and including a close.
    ///
    /// Why: before sending PAUSE or STOP, frames that arrived earlier must be counted as
    /// arriving before it, even if this task was slow to read them.
    pub async fn ready(&mut self) -> Result<Vec<Received>, Error> {
        let mut v = Vec::new();
        // A deadline of "now" still polls the read once: tokio's timeout polls the inner
        // future before it looks at the clock.
        while let Some(r) = self.recv_wire(Deadline::now()).await? {
            let close = matches!(r.kind, Kind::Close(_));
            v.push(r);
            if close {
                break;
            }
        }
        Ok(v)
    }

    /// The next message decoded, or `Ok(None)` if nothing arrives within `timeout`.
    pub async fn recv(&mut self, timeout: Duration) -> Result<Option<Incoming>, Error> {
        match self.recv_wire(Deadline::now() + timeout).await? {
            None => Ok(None),
            Some(r) => r.into_incoming().map(Some),
        }
    }

    /// Sends a normal close (1000) and drops the connection without waiting for the reply
    /// (bounded to 200 ms: a server that does not read cannot hold us).
    pub async fn close(mut self) {
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        };
        let _ = tokio::time::timeout(Duration::from_millis(200), self.ws.close(Some(frame))).await;
    }

    /// Sends a normal close and waits (bounded) for the server's side of the close handshake.
    pub async fn close_and_wait(mut self, bound: Duration) {
        let _ = tokio::time::timeout(bound, self.ws.close(None)).await;
        let _ = tokio::time::timeout(bound, async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind_of(text: &str) -> Result<Kind, Error> {
        parse_text(Bytes::copy_from_slice(text.as_bytes())).map(|(k, _)| k)
    }

    #[test]
    fn json_audio_is_parsed_in_place() {
        let pcm = base64::engine::general_purpose::STANDARD.encode([7u8; 1920]);
        let m = format!(
            r#"{{"type":"audio","pcm":"{pcm}","sample_rate":48000,"frame_ms":20,"sequence":7}}"#
        );
        let raw = Bytes::from(m);
        let (kind, back) = parse_text(raw.clone()).unwrap();
        let Kind::Audio(a) = kind else {
            panic!("not audio: {kind:?}")
        };
        assert_eq!((a.sequence, a.is_final, a.binary), (7, false, false));
        assert_eq!((a.sample_rate, a.frame_ms), (48_000, 20));
        assert_eq!(a.pcm_len(), Some(1920));
        // The base64 is a slice of the message, not a copy.
        let start = raw.as_ptr() as usize;
        let p = a.payload.as_ptr() as usize;
        assert!(p > start && p < start + raw.len());
        assert_eq!(back, raw);
        assert_eq!(a.pcm().unwrap(), Bytes::from(vec![7u8; 1920]));

        let end = kind_of(r#"{"type":"audio","pcm":"","sequence":26,"is_final":true}"#).unwrap();
        assert!(matches!(end, Kind::Audio(ref a) if a.is_end_marker() && a.sequence == 26));
        let short = kind_of(r#"{"type":"audio","pcm":"AAAA","sequence":3}"#).unwrap();
        assert!(matches!(short, Kind::Audio(ref a) if a.pcm_len() == Some(3)));
        // An escaped '/' (legal JSON) takes the copying path and still decodes.
        let escaped = kind_of(r#"{"type":"audio","pcm":"AA\/A","sequence":4}"#).unwrap();
        assert!(matches!(escaped, Kind::Audio(ref a) if a.pcm().unwrap().len() == 3));
        let odd = kind_of(r#"{"type":"audio","pcm":"AAA","sequence":3}"#).unwrap();
        assert!(matches!(odd, Kind::Audio(ref a) if a.pcm_len().is_none() && a.pcm().is_err()));
    }

    #[test]
    fn events_are_typed_and_bad_messages_are_errors() {
        assert!(matches!(
            kind_of(r#"{"type":"error","message":"nope","code":"INVALID_MESSAGE"}"#),
            Ok(Kind::Event(ServerEvent::Error { .. }))
        ));
        assert!(matches!(
            kind_of(r#"{"type":"vad","speaking":true}"#),
            Ok(Kind::Event(ServerEvent::Vad { speaking: true }))
        ));
        // A type from a newer server, even with fields audio would reject.
        assert!(matches!(
            kind_of(r#"{"type":"future","pcm":5}"#),
            Ok(Kind::Event(ServerEvent::Unknown))
        ));
        for bad in [
            "not json",
            r#"{"type":"audio","sequence":"x"}"#,
            r#"{"type":"audio","pcm":""}"#,
            r#"{"type":"error","code":"NOT_A_CODE","message":""}"#,
            r#"{"no":"type"}"#,
        ] {
            assert!(matches!(kind_of(bad), Err(Error::Protocol(_))), "{bad}");
        }
        let mut f = vec![1u8, 1, 0, 0];
        f.extend_from_slice(&26u32.to_le_bytes());
        let (k, _) = parse_binary_message(Bytes::from(f)).unwrap();
        assert!(matches!(k, Kind::Audio(ref a) if a.is_end_marker() && a.binary));
        assert!(parse_binary_message(Bytes::from_static(&[2, 0, 0])).is_err());
    }

    #[test]
    fn session_urls_carry_the_options() {
        let o = Options {
            format: Some(Format::Binary),
            pacing: Some(Pacing::Asap),
            model: Some("espeak-de".into()),
            token: Some("a b&c".into()),
            input_rate: Some(16_000),
            ..Options::default()
        };
        assert_eq!(
            o.session_url("ws://h:1").unwrap(),
            "ws://h:1/?model=espeak-de&format=binary&pacing=asap&token=a+b%26c&input_rate=16000"
        );
        assert_eq!(
            Options::default().session_url("ws://h:1/x?q=1").unwrap(),
            "ws://h:1/x?q=1"
        );
        assert!(Options::default().session_url("http://h/").is_err());
    }

    const START: &[u8] = br#"{"type":"session_start","session_id":"ws-abcdefabcdef"}"#;

    fn url(addr: std::net::SocketAddr) -> String {
        format!("ws://{addr}/")
    }

    /// Raw server frames (unmasked) written after a real tungstenite handshake: a ping,
    /// session_start in two fragments, a binary audio frame and a close.
    #[tokio::test]
    async fn handles_ping_fragments_binary_and_close() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            use std::io::Write;
            let (s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut ws = tungstenite::accept(s).unwrap();
            let mut raw = vec![0x89, 2, b'h', b'i'];
            raw.extend_from_slice(&[0x01, 20]);
            raw.extend_from_slice(&START[..20]);
            raw.extend_from_slice(&[0x80, (START.len() - 20) as u8]);
            raw.extend_from_slice(&START[20..]);
            let mut audio = vec![0x82, 126];
            audio.extend_from_slice(&1928u16.to_be_bytes());
            audio.extend_from_slice(&[1, 0, 0, 0, 9, 0, 0, 0]);
            audio.extend(std::iter::repeat_n(0u8, 1920));
            raw.extend_from_slice(&audio);
            raw.extend_from_slice(&[0x88, 2, 0x03, 0xe8]);
            ws.get_mut().write_all(&raw).unwrap();
            // The client must answer the ping with a pong carrying the same payload.
            loop {
                match ws.read() {
                    Ok(Message::Pong(p)) => return p.to_vec(),
                    Ok(_) => continue,
                    Err(e) => return format!("no pong: {e}").into_bytes(),
                }
            }
        });
        let mut c = Client::connect(&url(addr), &Options::default())
            .await
            .unwrap();
        assert_eq!(c.session_id(), "ws-abcdefabcdef");
        let dl = Deadline::now() + Duration::from_secs(5);
        let r = c.recv_wire(dl).await.unwrap().unwrap();
        assert!(r.at >= c.session().at);
        assert_eq!(r.raw().len(), 1928);
        match r.into_incoming().unwrap() {
            Incoming::Audio {
                sequence,
                is_final,
                pcm,
            } => assert_eq!((sequence, is_final, pcm.len()), (9, false, 1920)),
            other => panic!("{other:?}"),
        }
        let r = c.recv_wire(dl).await.unwrap().unwrap();
        assert!(matches!(r.kind, Kind::Close(Some((1000, _)))));
        assert!(matches!(c.recv_wire(dl).await, Err(Error::Closed(_))));
        assert_eq!(server.join().unwrap(), b"hi");
    }

    #[tokio::test]
    async fn ready_returns_what_arrived_without_waiting() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            use std::io::Write;
            let (s, _) = l.accept().unwrap();
            let mut ws = tungstenite::accept(s).unwrap();
            let mut raw = vec![0x81, START.len() as u8];
            raw.extend_from_slice(START);
            for seq in 1u32..=3 {
                raw.extend_from_slice(&[0x82, 8, 1, 0, 0, 0]);
                raw.extend_from_slice(&seq.to_le_bytes());
            }
            ws.get_mut().write_all(&raw).unwrap();
            // Keep the connection open (and silent) until the client is done.
            let _ = hold_rx.recv_timeout(Duration::from_secs(10));
        });
        let mut c = Client::connect(&url(addr), &Options::default())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let seqs: Vec<u32> = c
            .ready()
            .await
            .unwrap()
            .into_iter()
            .map(|r| match r.kind {
                Kind::Audio(a) => a.sequence,
                k => panic!("unexpected {k:?}"),
            })
            .collect();
        assert_eq!(seqs, vec![1, 2, 3]);
        let t = Instant::now();
        assert!(c.ready().await.unwrap().is_empty());
        assert!(t.elapsed() < Duration::from_secs(1));
        hold_tx.send(()).unwrap();
        server.join().unwrap();
    }

    #[tokio::test]
    async fn a_silent_server_hits_the_bound_and_a_refusal_is_an_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let quick = Options {
            connect_timeout: Duration::from_millis(200),
            ..Options::default()
        };
        let e = Client::connect(&url(addr), &quick).await.err().unwrap();
        assert!(e.to_string().contains("timed out"), "{e}");
        let t = std::thread::spawn(move || {
            use std::io::{Read, Write};
            let _timed_out_one = l.accept().unwrap();
            let (mut s, _) = l.accept().unwrap();
            let mut b = [0u8; 1024];
            let _ = s.read(&mut b).unwrap();
            s.write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy")
                .unwrap();
        });
        let e = Client::connect(&url(addr), &Options::default())
            .await
            .err()
            .unwrap();
        assert!(matches!(e, Error::Refused { status: 503, .. }), "{e}");
        assert!(e.to_string().contains("503"), "{e}");
        t.join().unwrap();
    }

    #[tokio::test]
    async fn a_server_that_starts_with_something_else_is_refused() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut ws = tungstenite::accept(s).unwrap();
            let _ = ws.send(Message::text(r#"{"type":"vad","speaking":false}"#));
            let _ = ws.read();
        });
        let e = Client::connect(&url(addr), &Options::default())
            .await
            .err()
            .unwrap();
        assert!(matches!(e, Error::Protocol(_)), "{e}");
        t.join().unwrap();
    }
}
