//! The load generator's view of a session: a thin layer over [`crate::client`] that turns each
//! received message into the small [`EventKind`] the measurements need.
//!
//! Why the library client serves a benchmark: it timestamps every message with the instant
//! the socket read that completed it returned (not when a task happened to be polled), and its
//! wire-level receive parses in place: no allocation per audio frame and no base64 decoding
//! (a frame's decoded length is computed from the base64 length, which is all we verify).
//!
//! Every wait takes a deadline, so no scenario can hang on a silent server.

use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use tokio::time::Instant as Deadline;

use crate::client::{self, Client, Kind, Options, Received};
use crate::protocol::event::InterruptReason;
use crate::protocol::{Command, ServerEvent};

/// Base64 length of one 1920-byte PCM frame (standard alphabet, padded).
pub const PCM_B64_LEN: usize = 2560;

/// A parsed `ws://host:port/path?query` address.
///
/// Why our own parser: the generator needs only host, port and path for a loopback
/// connection. `--url` takes `ws://` only; `wss://` is what the `tls` scenario builds itself
/// (with [`WsUrl::with_tls`]) to compare TLS against plain TCP on the same machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WsUrl {
    /// Host name or IP literal as written (used for the `Host` header and to connect).
    pub host: String,
    /// TCP port (default 80).
    pub port: u16,
    /// Path plus query, always starting with `/`.
    pub path: String,
    /// Speak `wss://`, trusting this configuration.
    pub tls: Option<TlsTrust>,
}

/// A client TLS configuration, compared by identity (for [`WsUrl`]'s equality).
#[derive(Clone)]
pub struct TlsTrust(pub std::sync::Arc<rustls::ClientConfig>);

impl PartialEq for TlsTrust {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for TlsTrust {}

impl std::fmt::Debug for TlsTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsTrust")
    }
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
        Ok(Self {
            host,
            port,
            path,
            tls: None,
        })
    }

    /// The same address over `wss://`, trusting `trust`.
    pub fn with_tls(&self, trust: TlsTrust) -> Self {
        Self {
            tls: Some(trust),
            ..self.clone()
        }
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

/// The name of an `interrupted` reason on the wire.
fn interrupt_reason(r: InterruptReason) -> &'static str {
    match r {
        InterruptReason::Stop => "stop",
        InterruptReason::BargeIn => "barge_in",
        InterruptReason::Shutdown => "shutdown",
    }
}

/// What one received message means to the measurements.
pub fn event_kind(kind: Kind) -> EventKind {
    match kind {
        Kind::Audio(a) if a.is_end_marker() => EventKind::End {
            seq: i64::from(a.sequence),
        },
        Kind::Audio(a) => EventKind::Audio {
            seq: i64::from(a.sequence),
            size_ok: a.pcm_len() == Some(crate::audio::FRAME_BYTES),
            last: a.is_final,
            binary: a.binary,
        },
        Kind::Event(e) => match e {
            ServerEvent::SessionStart { session_id, .. } => EventKind::SessionStart { session_id },
            ServerEvent::Error { message, code } => EventKind::Error {
                code: code.as_str().to_owned(),
                message,
            },
            ServerEvent::Interrupted { reason, .. } => EventKind::Interrupted {
                reason: interrupt_reason(reason).to_owned(),
            },
            ServerEvent::SessionEnd { reason, .. } => EventKind::SessionEnd {
                reason: reason.as_str().to_owned(),
            },
            ServerEvent::Vad { .. } => EventKind::Other { ty: "vad".into() },
            ServerEvent::Audio { .. } | ServerEvent::Unknown => EventKind::Other {
                ty: "unknown".into(),
            },
        },
        Kind::Close(_) => EventKind::Closed,
    }
}

/// A client WebSocket connection speaking the duplex protocol, as the bench uses it.
pub struct Conn {
    client: Client,
}

impl Conn {
    /// Connects, performs the WebSocket handshake and reads `session_start`, all before
    /// `deadline`; returns the connection, the session id and the instant `session_start`
    /// arrived.
    pub async fn open(url: &WsUrl, deadline: Deadline) -> Result<(Conn, String, Instant)> {
        let scheme = if url.tls.is_some() { "wss" } else { "ws" };
        let opts = Options {
            tls: url.tls.as_ref().map(|t| t.0.clone()),
            ..Options::default()
        };
        let url = format!("{scheme}://{}{}", url.authority(), url.path);
        let client = Client::connect_until(&url, &opts, deadline).await?;
        let id = client.session_id().to_owned();
        let at = client.session().at;
        Ok((Conn { client }, id, at))
    }

    /// The next server message, or `Ok(None)` if `deadline` passes first.
    ///
    /// A message the protocol does not allow is an [`EventKind::Invalid`] event (the session
    /// goes on); once the connection is closed, every call returns [`EventKind::Closed`].
    /// Cancel-safe. Pings are answered by the client and never surface.
    pub async fn next_event(&mut self, deadline: Deadline) -> Result<Option<Event>> {
        match self.client.recv_wire(deadline).await {
            Ok(None) => Ok(None),
            Ok(Some(Received { at, kind, .. })) => Ok(Some(Event {
                at,
                kind: event_kind(kind),
            })),
            Err(client::Error::Protocol(reason)) => Ok(Some(Event {
                at: self.client.last_read(),
                kind: EventKind::Invalid { reason },
            })),
            Err(client::Error::Closed(_)) => Ok(Some(Event {
                at: self.client.last_read(),
                kind: EventKind::Closed,
            })),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether this server has sent an end marker on this connection: from then on silence
    /// mid-utterance is a stall to wait out, not the end of a marker-less utterance.
    pub fn seen_end_marker(&self) -> bool {
        self.client.seen_end_marker()
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
        Ok(self.client.send_text(text, is_final).await?)
    }

    /// Sends a `control` message (`PAUSE`, `RESUME`, `STOP`); returns the instant before the write.
    pub async fn send_control(&mut self, command: &str) -> Result<Instant> {
        let command = match command {
            "PAUSE" => Command::Pause,
            "RESUME" => Command::Resume,
            "STOP" => Command::Stop,
            other => bail!("unknown command {other}"),
        };
        Ok(self.client.send_control(command).await?)
    }

    /// Sends an arbitrary text message (already serialised); returns the instant before the write.
    pub async fn send_raw_text(&mut self, body: &str) -> Result<Instant> {
        Ok(self.client.send_raw_text(body).await?)
    }

    /// Sends a close frame (best effort) and drops the connection.
    pub async fn close(self) {
        self.client.close().await;
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
}
