//! The load generator's WebSocket client: a minimal RFC 6455 client over a raw `TcpStream`.
//!
//! Why not tokio-tungstenite: a benchmark client must (a) timestamp every frame at the socket
//! read that completed it, not when a task happens to be polled, and (b) cost as little as
//! possible per frame so that it is not the bottleneck at thousands of sessions on a 2-core
//! machine shared with the server. Here one read syscall fills a per-connection buffer, the
//! instant is taken right after it returns, and every frame completed by that read is parsed in
//! place (no allocation per audio frame, no base64 decoding: a 1920-byte frame is exactly 2560
//! base64 characters, which is all we need to verify).
//!
//! Every wait takes a deadline, so no scenario can hang on a silent server.

use std::borrow::Cow;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant as Deadline;

/// Base64 length of one 1920-byte PCM frame (standard alphabet, padded).
pub const PCM_B64_LEN: usize = 2560;
/// Size of a binary-format audio header (version, flags, reserved, sequence).
pub const BINARY_HEADER_LEN: usize = 8;
/// Largest message we accept from a server; anything bigger is a protocol error, not audio.
const MAX_MESSAGE: usize = 16 << 20;
/// Initial read buffer per connection: one JSON audio frame is ~2.7 KiB.
const READ_CHUNK: usize = 8 << 10;

/// A parsed `ws://host:port/path?query` address.
///
/// Why our own parser: the generator needs only host, port and path for a plain loopback
/// connection, and `wss://` is deliberately out of scope (TLS would measure the TLS library).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WsUrl {
    /// Host name or IP literal as written (used for the `Host` header and to connect).
    pub host: String,
    /// TCP port (default 80).
    pub port: u16,
    /// Path plus query, always starting with `/`.
    pub path: String,
}

impl WsUrl {
    /// Parses a `ws://` URL.
    pub fn parse(url: &str) -> Result<Self> {
        let rest = if let Some(r) = url.strip_prefix("ws://") {
            r
        } else if url.starts_with("wss://") {
            bail!("{url}: wss:// is not supported by the benchmark client (use ws:// on loopback)");
        } else {
            bail!("{url}: expected a ws:// URL");
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'?' => (&rest[..i], format!("/{}", &rest[i..])),
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, "/".to_string()),
        };
        if authority.is_empty() {
            bail!("{url}: missing host");
        }
        let (host, port) = if let Some(h) = authority.strip_prefix('[') {
            // [v6]:port
            let end = h
                .find(']')
                .ok_or_else(|| anyhow!("{url}: unclosed IPv6 bracket"))?;
            let port = match &h[end + 1..] {
                "" => 80,
                p => p
                    .strip_prefix(':')
                    .and_then(|p| p.parse().ok())
                    .ok_or_else(|| anyhow!("{url}: bad port"))?,
            };
            (h[..end].to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_string(),
                    p.parse().map_err(|_| anyhow!("{url}: bad port {p:?}"))?,
                ),
                None => (authority.to_string(), 80),
            }
        };
        Ok(Self { host, port, path })
    }

    /// The same URL with `key=value` query parameters appended (the caller's own query is kept).
    pub fn with_query(&self, params: &[(&str, &str)]) -> Self {
        let mut path = self.path.clone();
        for (k, v) in params {
            path.push(if path.contains('?') { '&' } else { '?' });
            path.push_str(k);
            path.push('=');
            path.push_str(v);
        }
        Self {
            path,
            ..self.clone()
        }
    }

    /// `host:port` for connecting (brackets kept for IPv6).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// What the server told us, one WebSocket message at a time.
#[derive(Clone, Debug, PartialEq)]
pub enum EventKind {
    /// `session_start` with its session id.
    SessionStart {
        /// The server-assigned id (`ws-<12 hex>` on our server).
        session_id: String,
    },
    /// An audio data frame.
    Audio {
        /// The frame's `sequence` (1.. per utterance).
        seq: i64,
        /// Whether the payload has the right size (1920 PCM bytes).
        size_ok: bool,
        /// Whether this data frame also closes the utterance (`is_final` with data).
        last: bool,
        /// Whether it arrived as a binary message (binary format) rather than JSON.
        binary: bool,
    },
    /// The end-of-utterance marker (empty audio with `is_final`).
    End {
        /// Its `sequence` (should be last + 1).
        seq: i64,
    },
    /// An `error` message.
    Error {
        /// The `code` field.
        code: String,
        /// The human-readable `message`.
        message: String,
    },
    /// The `interrupted` extension event.
    Interrupted {
        /// `stop` or `barge_in`.
        reason: String,
    },
    /// `session_end` (the server is about to close).
    SessionEnd {
        /// Why the server ends the session.
        reason: String,
    },
    /// A JSON message of a type we don't track (e.g. `vad`).
    Other {
        /// Its `type`.
        ty: String,
    },
    /// A message we could not make sense of (bad JSON, bad binary header).
    Invalid {
        /// What was wrong.
        reason: String,
    },
    /// The server closed the WebSocket (close frame) or the TCP connection.
    Closed,
}

/// One server message and the instant the read that completed it returned.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// When the socket read that completed this message returned.
    pub at: Instant,
    /// What it was.
    pub kind: EventKind,
}

/// The fields of every server JSON message we look at; unknown keys are ignored (extensions).
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(rename = "type", borrow)]
    ty: Cow<'a, str>,
    #[serde(default, borrow)]
    pcm: Option<Cow<'a, str>>,
    #[serde(default)]
    sequence: Option<i64>,
    #[serde(default)]
    is_final: Option<bool>,
    #[serde(default, borrow)]
    code: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    message: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    reason: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    session_id: Option<Cow<'a, str>>,
}

/// Interprets one text message of the protocol.
pub fn parse_text(payload: &[u8]) -> EventKind {
    let w: Wire<'_> = match serde_json::from_slice(payload) {
        Ok(w) => w,
        Err(e) => {
            return EventKind::Invalid {
                reason: format!("bad JSON from server: {e}"),
            }
        }
    };
    let text = |c: Option<Cow<'_, str>>| c.map(|c| c.into_owned()).unwrap_or_default();
    match &*w.ty {
        "audio" => {
            let seq = w.sequence.unwrap_or(-1);
            let pcm_len = w.pcm.as_deref().map_or(0, str::len);
            let is_final = w.is_final.unwrap_or(false);
            if pcm_len == 0 && is_final {
                EventKind::End { seq }
            } else {
                EventKind::Audio {
                    seq,
                    size_ok: pcm_len == PCM_B64_LEN,
                    last: is_final,
                    binary: false,
                }
            }
        }
        "session_start" => EventKind::SessionStart {
            session_id: text(w.session_id),
        },
        "error" => EventKind::Error {
            code: text(w.code),
            message: text(w.message),
        },
        "interrupted" => EventKind::Interrupted {
            reason: text(w.reason),
        },
        "session_end" => EventKind::SessionEnd {
            reason: text(w.reason),
        },
        other => EventKind::Other {
            ty: other.to_string(),
        },
    }
}

/// Interprets one binary message (binary format: 8-byte header + 1920 PCM bytes).
pub fn parse_binary(payload: &[u8]) -> EventKind {
    if payload.len() < BINARY_HEADER_LEN || payload[0] != 1 {
        return EventKind::Invalid {
            reason: format!(
                "binary message of {} bytes without a version-1 audio header",
                payload.len()
            ),
        };
    }
    let last = payload[1] & 1 == 1;
    let seq = i64::from(u32::from_le_bytes([
        payload[4], payload[5], payload[6], payload[7],
    ]));
    let pcm = payload.len() - BINARY_HEADER_LEN;
    if pcm == 0 && last {
        EventKind::End { seq }
    } else {
        EventKind::Audio {
            seq,
            size_ok: pcm == crate::audio::FRAME_BYTES,
            last,
            binary: true,
        }
    }
}

/// WebSocket opcodes we handle.
mod op {
    pub const CONT: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

/// One decoded frame header: where the payload is inside the buffer.
#[derive(Debug, PartialEq, Eq)]
struct FrameHead {
    fin: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    header_len: usize,
    payload_len: usize,
}

/// Decodes a frame header from the start of `buf`; `Ok(None)` if more bytes are needed.
fn parse_head(buf: &[u8]) -> Result<Option<FrameHead>> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let fin = buf[0] & 0x80 != 0;
    if buf[0] & 0x70 != 0 {
        bail!("server frame has reserved bits set (no extension was negotiated)");
    }
    let opcode = buf[0] & 0x0F;
    let masked = buf[1] & 0x80 != 0;
    let (len, mut at) = match buf[1] & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        n => (u64::from(n), 2),
    };
    let payload_len = usize::try_from(len)
        .ok()
        .filter(|&l| l <= MAX_MESSAGE)
        .ok_or_else(|| anyhow!("server frame of {len} bytes exceeds {MAX_MESSAGE}"))?;
    let mask = if masked {
        if buf.len() < at + 4 {
            return Ok(None);
        }
        let m = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        at += 4;
        Some(m)
    } else {
        None
    };
    Ok(Some(FrameHead {
        fin,
        opcode,
        mask,
        header_len: at,
        payload_len,
    }))
}

/// Encodes one masked client frame (clients must mask, RFC 6455 §5.3).
pub fn encode_frame(opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// A client WebSocket connection speaking the duplex protocol.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    last_read: Instant,
    /// Opcode and payload of a fragmented message being reassembled.
    frag: Option<(u8, Vec<u8>)>,
    closed: bool,
    seen_end_marker: bool,
}

/// Scratch type for messages the client sends.
#[derive(serde::Serialize)]
struct TextMsg<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    text: &'a str,
    is_final: bool,
}

#[derive(serde::Serialize)]
struct ControlMsg<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    command: &'a str,
}

impl Conn {
    /// Connects, performs the WebSocket handshake and returns the connection; the server's
    /// `session_start` is then the first event.
    pub async fn connect(url: &WsUrl, deadline: Deadline) -> Result<Conn> {
        let addr = url.authority();
        let stream = tokio::time::timeout_at(deadline, TcpStream::connect(&addr))
            .await
            .map_err(|_| anyhow!("connect to {addr}: timed out"))?
            .with_context(|| format!("connect to {addr}"))?;
        stream.set_nodelay(true).context("TCP_NODELAY")?;
        let key = tungstenite::handshake::client::generate_key();
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n",
            url.path, addr
        );
        let mut conn = Conn {
            stream,
            buf: vec![0; READ_CHUNK],
            start: 0,
            end: 0,
            last_read: Instant::now(),
            frag: None,
            closed: false,
            seen_end_marker: false,
        };
        tokio::time::timeout_at(deadline, conn.stream.write_all(req.as_bytes()))
            .await
            .map_err(|_| anyhow!("handshake to {addr}: timed out"))?
            .context("handshake write")?;
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            match resp
                .parse(&conn.buf[..conn.end])
                .context("bad HTTP response to the upgrade")?
            {
                httparse::Status::Complete(n) => {
                    let code = resp.code.unwrap_or(0);
                    if code != 101 {
                        bail!("upgrade refused: HTTP {code} {}", resp.reason.unwrap_or(""));
                    }
                    let want = tungstenite::handshake::derive_accept_key(key.as_bytes());
                    let ok = resp.headers.iter().any(|h| {
                        h.name.eq_ignore_ascii_case("sec-websocket-accept")
                            && h.value == want.as_bytes()
                    });
                    if !ok {
                        bail!("upgrade response lacks the right Sec-WebSocket-Accept");
                    }
                    conn.start = n;
                    return Ok(conn);
                }
                httparse::Status::Partial => {
                    if conn.end == conn.buf.len() {
                        bail!("upgrade response headers exceed {} bytes", conn.buf.len());
                    }
                    match conn.read_some(deadline).await? {
                        None => bail!("handshake to {addr}: timed out"),
                        Some(0) => bail!("server closed the connection during the handshake"),
                        Some(_) => {}
                    }
                }
            }
        }
    }

    /// Connects and reads the `session_start` message, returning the connection, the session id
    /// and the instant `session_start` arrived.
    pub async fn open(url: &WsUrl, deadline: Deadline) -> Result<(Conn, String, Instant)> {
        let mut conn = Conn::connect(url, deadline).await?;
        match conn.next_event(deadline).await? {
            Some(Event {
                at,
                kind: EventKind::SessionStart { session_id },
            }) => Ok((conn, session_id, at)),
            Some(ev) => bail!("expected session_start first, got {:?}", ev.kind),
            None => bail!("no session_start before the deadline"),
        }
    }

    /// Reads into the buffer once and records the read's instant. Returns the bytes read
    /// (`Some(0)` = EOF) or `None` if the deadline passed first.
    async fn read_some(&mut self, deadline: Deadline) -> Result<Option<usize>> {
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                let grow = self.buf.len().max(READ_CHUNK);
                self.buf.resize(self.buf.len() + grow, 0);
            }
        }
        let end = self.end;
        match tokio::time::timeout_at(deadline, self.stream.read(&mut self.buf[end..])).await {
            Err(_) => Ok(None),
            Ok(r) => {
                let n = r.context("socket read")?;
                self.last_read = Instant::now();
                self.end += n;
                Ok(Some(n))
            }
        }
    }

    /// The next server message, or `Ok(None)` if `deadline` passes first.
    ///
    /// Cancel-safe only through its deadline: callers bound every wait with it instead of
    /// racing this future. Pings are answered here and never surface.
    pub async fn next_event(&mut self, deadline: Deadline) -> Result<Option<Event>> {
        loop {
            if self.closed {
                return Ok(Some(Event {
                    at: self.last_read,
                    kind: EventKind::Closed,
                }));
            }
            if let Some(kind) = self.parse_one().await? {
                if matches!(kind, EventKind::End { .. }) {
                    self.seen_end_marker = true;
                }
                return Ok(Some(Event {
                    at: self.last_read,
                    kind,
                }));
            }
            match self.read_some(deadline).await? {
                None => return Ok(None),
                Some(0) => self.closed = true,
                Some(_) => {}
            }
        }
    }

    /// Parses one complete message from the buffer, if there is one.
    async fn parse_one(&mut self) -> Result<Option<EventKind>> {
        loop {
            let avail = &self.buf[self.start..self.end];
            let Some(h) = parse_head(avail)? else {
                return Ok(None);
            };
            let total = h.header_len + h.payload_len;
            if avail.len() < total {
                // Make room for the whole frame so the next read can complete it.
                let need = self.start + total;
                if need > self.buf.len() {
                    self.buf.copy_within(self.start..self.end, 0);
                    self.end -= self.start;
                    self.start = 0;
                    if total > self.buf.len() {
                        self.buf.resize(total.max(READ_CHUNK), 0);
                    }
                }
                return Ok(None);
            }
            let p0 = self.start + h.header_len;
            let p1 = p0 + h.payload_len;
            if let Some(m) = h.mask {
                for (i, b) in self.buf[p0..p1].iter_mut().enumerate() {
                    *b ^= m[i % 4];
                }
            }
            self.start += total;
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
                // Payload bytes are still intact in the buffer: resetting the indices does not
                // clear memory, and nothing is read before we are done with p0..p1.
            }
            let kind = match h.opcode {
                op::TEXT | op::BINARY if h.fin && self.frag.is_none() => {
                    let payload = &self.buf[p0..p1];
                    if h.opcode == op::TEXT {
                        parse_text(payload)
                    } else {
                        parse_binary(payload)
                    }
                }
                op::TEXT | op::BINARY | op::CONT => {
                    let payload = self.buf[p0..p1].to_vec();
                    match (&mut self.frag, h.opcode) {
                        (None, op::CONT) => bail!("continuation frame without a first fragment"),
                        (Some(_), op::TEXT | op::BINARY) => {
                            bail!("new message started inside a fragmented one")
                        }
                        (None, o) => self.frag = Some((o, payload)),
                        (Some((_, acc)), _) => {
                            acc.extend_from_slice(&payload);
                            if acc.len() > MAX_MESSAGE {
                                bail!("fragmented message exceeds {MAX_MESSAGE} bytes");
                            }
                        }
                    }
                    if !h.fin {
                        continue;
                    }
                    let Some((o, acc)) = self.frag.take() else {
                        continue;
                    };
                    if o == op::TEXT {
                        parse_text(&acc)
                    } else {
                        parse_binary(&acc)
                    }
                }
                op::PING => {
                    let payload = self.buf[p0..p1].to_vec();
                    self.write_frame(op::PONG, &payload).await?;
                    continue;
                }
                op::PONG => continue,
                op::CLOSE => {
                    // Echo the close (best effort) and report it.
                    let _ = self.write_frame(op::CLOSE, &[]).await;
                    self.closed = true;
                    EventKind::Closed
                }
                other => bail!("unknown WebSocket opcode {other:#x}"),
            };
            return Ok(Some(kind));
        }
    }

    async fn write_frame(&mut self, opcode: u8, payload: &[u8]) -> Result<()> {
        let frame = encode_frame(opcode, payload, rand::random());
        self.stream
            .write_all(&frame)
            .await
            .context("socket write")?;
        Ok(())
    }

    /// Whether this server has sent an end marker on this connection: from then on silence
    /// mid-utterance is a stall to wait out, not the end of a marker-less utterance.
    pub fn seen_end_marker(&self) -> bool {
        self.seen_end_marker
    }

    /// Every event that can be read without waiting (already received by the kernel).
    ///
    /// Why: before sending PAUSE or STOP, frames that arrived earlier must be counted as
    /// arriving before it, even if this task was slow to read them.
    pub async fn ready_events(&mut self) -> Result<Vec<Event>> {
        let mut v = Vec::new();
        // A deadline of "now" still polls the read once: tokio's timeout polls the inner
        // future before it looks at the clock.
        while let Some(ev) = self.next_event(Deadline::now()).await? {
            let closed = ev.kind == EventKind::Closed;
            v.push(ev);
            if closed {
                break;
            }
        }
        Ok(v)
    }

    /// Sends a `text` message; returns the instant taken just before the write (FAL's start).
    pub async fn send_text(&mut self, text: &str, is_final: bool) -> Result<Instant> {
        let body = serde_json::to_vec(&TextMsg {
            ty: "text",
            text,
            is_final,
        })?;
        self.send_raw_text(&body).await
    }

    /// Sends a `control` message (`PAUSE`, `RESUME`, `STOP`); returns the instant before the write.
    pub async fn send_control(&mut self, command: &str) -> Result<Instant> {
        let body = serde_json::to_vec(&ControlMsg {
            ty: "control",
            command,
        })?;
        self.send_raw_text(&body).await
    }

    /// Sends an arbitrary text message (already serialised); returns the instant before the write.
    pub async fn send_raw_text(&mut self, body: &[u8]) -> Result<Instant> {
        let frame = encode_frame(op::TEXT, body, rand::random());
        let t = Instant::now();
        self.stream
            .write_all(&frame)
            .await
            .context("socket write")?;
        Ok(t)
    }

    /// Sends a close frame (best effort) and drops the connection.
    pub async fn close(mut self) {
        let payload = 1000u16.to_be_bytes();
        let _ = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            self.write_frame(op::CLOSE, &payload),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let u = WsUrl::parse("ws://127.0.0.1:8080").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("127.0.0.1", 8080, "/")
        );
        let u = WsUrl::parse("ws://localhost/ws?model=x").unwrap();
        assert_eq!((u.port, u.path.as_str()), (80, "/ws?model=x"));
        let u = WsUrl::parse("ws://h:1?a=b").unwrap();
        assert_eq!(u.path, "/?a=b");
        let u = WsUrl::parse("ws://[::1]:9/x").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 9));
        assert_eq!(u.authority(), "[::1]:9");
        assert!(WsUrl::parse("wss://h").is_err());
        assert!(WsUrl::parse("http://h").is_err());
        assert!(WsUrl::parse("ws://h:notaport").is_err());
        assert!(WsUrl::parse("ws://").is_err());
        let q = WsUrl::parse("ws://h:1/p?model=m")
            .unwrap()
            .with_query(&[("format", "binary"), ("pacing", "asap")]);
        assert_eq!(q.path, "/p?model=m&format=binary&pacing=asap");
        let q = WsUrl::parse("ws://h:1").unwrap().with_query(&[("a", "1")]);
        assert_eq!(q.path, "/?a=1");
    }

    #[test]
    fn parses_json_audio_and_end_marker() {
        let pcm = "A".repeat(PCM_B64_LEN);
        let m = format!(
            r#"{{"type":"audio","pcm":"{pcm}","sample_rate":48000,"frame_ms":20,"sequence":7}}"#
        );
        assert_eq!(
            parse_text(m.as_bytes()),
            EventKind::Audio {
                seq: 7,
                size_ok: true,
                last: false,
                binary: false
            }
        );
        let m = r#"{"type":"audio","pcm":"","sample_rate":48000,"frame_ms":20,"sequence":26,"is_final":true}"#;
        assert_eq!(parse_text(m.as_bytes()), EventKind::End { seq: 26 });
        let m = r#"{"type":"audio","pcm":"AAAA","sequence":3}"#;
        assert!(matches!(
            parse_text(m.as_bytes()),
            EventKind::Audio { size_ok: false, .. }
        ));
    }

    #[test]
    fn parses_other_json_messages() {
        assert_eq!(
            parse_text(
                br#"{"type":"session_start","session_id":"ws-0123456789ab","format":"json"}"#
            ),
            EventKind::SessionStart {
                session_id: "ws-0123456789ab".into()
            }
        );
        assert_eq!(
            parse_text(br#"{"type":"error","message":"nope","code":"INVALID_MESSAGE"}"#),
            EventKind::Error {
                code: "INVALID_MESSAGE".into(),
                message: "nope".into()
            }
        );
        assert_eq!(
            parse_text(br#"{"type":"interrupted","reason":"stop","played_ms":40,"sequence":2}"#),
            EventKind::Interrupted {
                reason: "stop".into()
            }
        );
        assert_eq!(
            parse_text(br#"{"type":"vad","speaking":true}"#),
            EventKind::Other { ty: "vad".into() }
        );
        assert!(matches!(parse_text(b"not json"), EventKind::Invalid { .. }));
        assert!(matches!(
            parse_text(br#"{"type":"audio","sequence":"x"}"#),
            EventKind::Invalid { .. }
        ));
    }

    #[test]
    fn parses_binary_frames() {
        let mut f = vec![1u8, 0, 0, 0];
        f.extend_from_slice(&5u32.to_le_bytes());
        f.extend(std::iter::repeat_n(0u8, 1920));
        assert_eq!(
            parse_binary(&f),
            EventKind::Audio {
                seq: 5,
                size_ok: true,
                last: false,
                binary: true
            }
        );
        let mut end = vec![1u8, 1, 0, 0];
        end.extend_from_slice(&26u32.to_le_bytes());
        assert_eq!(parse_binary(&end), EventKind::End { seq: 26 });
        assert!(matches!(
            parse_binary(&[2, 0, 0]),
            EventKind::Invalid { .. }
        ));
    }

    #[test]
    fn frame_header_round_trip() {
        for len in [0usize, 5, 125, 126, 2700, 70_000] {
            let payload = vec![0x5a; len];
            let f = encode_frame(op::TEXT, &payload, [1, 2, 3, 4]);
            let h = parse_head(&f).unwrap().unwrap();
            assert!(h.fin);
            assert_eq!(h.opcode, op::TEXT);
            assert_eq!(h.payload_len, len);
            assert_eq!(h.mask, Some([1, 2, 3, 4]));
            assert_eq!(f.len(), h.header_len + len);
            let unmasked: Vec<u8> = f[h.header_len..]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ [1, 2, 3, 4][i % 4])
                .collect();
            assert_eq!(unmasked, payload);
            // Every strict prefix of the header is "need more".
            for cut in 0..h.header_len {
                assert_eq!(parse_head(&f[..cut]).unwrap(), None);
            }
        }
    }

    /// Raw server frames (unmasked) written after a real tungstenite handshake: a ping, a
    /// text message in two fragments, a binary audio frame and a close.
    #[tokio::test]
    async fn handles_ping_fragments_binary_and_close() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            use std::io::Write;
            let (s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            let mut ws = tungstenite::accept(s).unwrap();
            let msg = br#"{"type":"session_start","session_id":"ws-abcdefabcdef"}"#;
            let mut raw = vec![0x89, 2, b'h', b'i'];
            raw.extend_from_slice(&[0x01, 20]);
            raw.extend_from_slice(&msg[..20]);
            raw.extend_from_slice(&[0x80, (msg.len() - 20) as u8]);
            raw.extend_from_slice(&msg[20..]);
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
                    Ok(tungstenite::Message::Pong(p)) => return p.to_vec(),
                    Ok(_) => continue,
                    Err(e) => panic!("no pong: {e}"),
                }
            }
        });
        let url = WsUrl::parse(&format!("ws://{addr}/")).unwrap();
        let dl = Deadline::now() + std::time::Duration::from_secs(5);
        let (mut c, id, _) = Conn::open(&url, dl).await.unwrap();
        assert_eq!(id, "ws-abcdefabcdef");
        let ev = c.next_event(dl).await.unwrap().unwrap();
        assert_eq!(
            ev.kind,
            EventKind::Audio {
                seq: 9,
                size_ok: true,
                last: false,
                binary: true
            }
        );
        let ev = c.next_event(dl).await.unwrap().unwrap();
        assert_eq!(ev.kind, EventKind::Closed);
        assert_eq!(server.join().unwrap(), b"hi");
    }

    #[tokio::test]
    async fn ready_events_returns_what_arrived_without_waiting() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            use std::io::Write;
            let (s, _) = l.accept().unwrap();
            let mut ws = tungstenite::accept(s).unwrap();
            let mut raw = Vec::new();
            for seq in 1u32..=3 {
                raw.extend_from_slice(&[0x82, 8, 1, 0, 0, 0]);
                raw.extend_from_slice(&seq.to_le_bytes());
            }
            ws.get_mut().write_all(&raw).unwrap();
            // Keep the connection open (and silent) until the client is done.
            let _ = hold_rx.recv_timeout(std::time::Duration::from_secs(10));
        });
        let url = WsUrl::parse(&format!("ws://{addr}/")).unwrap();
        let dl = Deadline::now() + std::time::Duration::from_secs(5);
        let mut c = Conn::connect(&url, dl).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let evs = c.ready_events().await.unwrap();
        let seqs: Vec<i64> = evs
            .iter()
            .map(|e| match e.kind {
                EventKind::Audio { seq, .. } => seq,
                ref k => panic!("unexpected {k:?}"),
            })
            .collect();
        assert_eq!(seqs, vec![1, 2, 3]);
        let t = std::time::Instant::now();
        assert!(c.ready_events().await.unwrap().is_empty());
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
        hold_tx.send(()).unwrap();
        server.join().unwrap();
    }

    #[tokio::test]
    async fn a_silent_server_hits_the_deadline_and_a_refusal_is_an_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let url = WsUrl::parse(&format!("ws://{addr}/")).unwrap();
        let dl = Deadline::now() + std::time::Duration::from_millis(200);
        let e = Conn::connect(&url, dl).await.err().unwrap().to_string();
        assert!(e.contains("timed out"), "{e}");
        let t = std::thread::spawn(move || {
            use std::io::{Read, Write};
            let _timed_out_one = l.accept().unwrap();
            let (mut s, _) = l.accept().unwrap();
            let mut b = [0u8; 1024];
            let _ = s.read(&mut b).unwrap();
            s.write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
                .unwrap();
        });
        let dl = Deadline::now() + std::time::Duration::from_secs(5);
        let e = Conn::connect(&url, dl).await.err().unwrap().to_string();
        assert!(e.contains("503"), "{e}");
        t.join().unwrap();
    }

    #[test]
    fn rejects_reserved_bits_and_huge_frames() {
        assert!(parse_head(&[0xC1, 0x00]).is_err());
        let mut f = vec![0x82, 127];
        f.extend_from_slice(&(1u64 << 40).to_be_bytes());
        assert!(parse_head(&f).is_err());
    }
}
