//! Everything the server says to a client outside the audio frames (docs/PROTOCOL.md §1.3):
//! one enum, [`ServerEvent`], serialised by the server and parsed by the client, the bench
//! and the tests, so the two sides cannot drift apart. Closes the server starts pair a
//! `session_end` reason with a WebSocket close code; [`CloseReason`] keeps the pair together.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::audio::{Format, Pacing};
use crate::ws::frame;

/// Error codes of the `error` event (a fixed set clients switch on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// Not JSON, wrong shape, unknown type, empty text, unknown command.
    InvalidMessage,
    /// No worker could take the session (none configured, all down, unknown model).
    WorkerUnavailable,
    /// The worker failed or stalled mid-utterance; the utterance ends with its end marker.
    SynthesisFailed,
    /// An abuse limit refused the message; nothing of it was queued.
    RateLimited,
    /// The credential was refused (sent before a close; the upgrade itself answers 401).
    Unauthorized,
    /// A fault of ours.
    InternalError,
}

impl ErrorCode {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidMessage => "INVALID_MESSAGE",
            ErrorCode::WorkerUnavailable => "WORKER_UNAVAILABLE",
            ErrorCode::SynthesisFailed => "SYNTHESIS_FAILED",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::InternalError => "INTERNAL_ERROR",
        }
    }
}

/// Why playback was cut short (the `interrupted` event's `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InterruptReason {
    /// The client sent STOP.
    Stop,
    /// Speech in the client's microphone audio.
    BargeIn,
    /// The server is shutting down and the drain deadline passed.
    Shutdown,
}

/// Why the server ended a session, with the WebSocket close code it uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// The client closed; the server echoes its close (1000).
    Closed,
    /// No client message and no audio for `--idle-timeout-secs` (1000).
    IdleTimeout,
    /// The session reached `--max-session-secs` (1000).
    MaxDuration,
    /// The server is shutting down (1001, "going away").
    Shutdown,
    /// The client broke the WebSocket protocol (1002).
    ProtocolError,
    /// A text message was not UTF-8 (1007).
    InvalidUtf8,
    /// The client kept exceeding its message rate (1008, policy violation).
    RateLimited,
    /// A message exceeded `--max-message-bytes` (1009).
    MessageTooBig,
    /// The client stopped reading its audio (1008).
    SlowConsumer,
}

impl CloseReason {
    /// The `session_end` reason.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Closed => "closed",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::MaxDuration => "max_duration",
            CloseReason::Shutdown => "shutdown",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::InvalidUtf8 => "invalid_utf8",
            CloseReason::RateLimited => "rate_limited",
            CloseReason::MessageTooBig => "message_too_big",
            CloseReason::SlowConsumer => "slow_consumer",
        }
    }

    /// The WebSocket close code (RFC 6455 §7.4.1).
    pub fn code(self) -> u16 {
        match self {
            CloseReason::Closed | CloseReason::IdleTimeout | CloseReason::MaxDuration => 1000,
            CloseReason::Shutdown => 1001,
            CloseReason::ProtocolError => 1002,
            CloseReason::InvalidUtf8 => 1007,
            CloseReason::RateLimited | CloseReason::SlowConsumer => 1008,
            CloseReason::MessageTooBig => 1009,
        }
    }

    /// The reason for a WebSocket-level violation with close code `code`.
    pub fn from_violation(code: u16) -> Self {
        match code {
            1007 => CloseReason::InvalidUtf8,
            1009 => CloseReason::MessageTooBig,
            1008 => CloseReason::RateLimited,
            _ => CloseReason::ProtocolError,
        }
    }

    /// The close frame the server sends for this reason.
    pub fn close_frame(self) -> Bytes {
        frame::close(self.code(), self.as_str())
    }
}

/// A message from the server (every `type` of docs/PROTOCOL.md §1.3).
///
/// `Audio` is here so clients can parse JSON audio frames; the server never builds it per
/// frame (see [`super::audio`]). Unknown types from a newer server parse as `Unknown`, so a
/// client keeps working when the protocol grows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerEvent {
    /// The server's first message.
    SessionStart {
        session_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        format: Option<Format>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pacing: Option<Pacing>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        model: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sample_rate: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        frame_ms: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        protocol: Option<u32>,
    },
    /// One 20 ms frame (base64 PCM) or, with `pcm` empty and `is_final`, the end marker.
    Audio {
        pcm: String,
        sequence: u32,
        #[serde(default)]
        sample_rate: u32,
        #[serde(default)]
        frame_ms: u32,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        is_final: bool,
    },
    /// Bad input or a failure; the session carries on.
    Error { message: String, code: ErrorCode },
    /// Playback was cut: how much the user actually heard.
    Interrupted {
        reason: InterruptReason,
        played_ms: u32,
        sequence: u32,
    },
    /// Voice activity in the client's microphone audio.
    Vad { speaking: bool },
    /// Sent before any close the server starts.
    SessionEnd {
        session_id: String,
        reason: CloseReason,
    },
    /// A type this build does not know.
    #[serde(other)]
    Unknown,
}

impl ServerEvent {
    /// An `error` event.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        ServerEvent::Error {
            message: message.into(),
            code,
        }
    }

    /// An `interrupted` event after `sent` frames of the utterance left the server.
    pub fn interrupted(reason: InterruptReason, sent: u32) -> Self {
        ServerEvent::Interrupted {
            reason,
            played_ms: sent * crate::audio::FRAME_MS,
            sequence: sent,
        }
    }

    /// The event as JSON text.
    pub fn to_json(&self) -> String {
        // Serialising these plain structs cannot fail (no maps with non-string keys).
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The event as a complete WebSocket text frame.
    pub fn to_frame(&self) -> Bytes {
        frame::text(self.to_json().as_bytes())
    }

    /// Parses one server text message.
    pub fn parse(raw: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn v(e: &ServerEvent) -> Value {
        serde_json::from_str(&e.to_json()).unwrap()
    }

    #[test]
    fn wire_shapes_match_the_protocol() {
        assert_eq!(
            v(&ServerEvent::error(ErrorCode::RateLimited, "slow down")),
            json!({"type":"error","message":"slow down","code":"RATE_LIMITED"})
        );
        assert_eq!(
            v(&ServerEvent::interrupted(InterruptReason::BargeIn, 7)),
            json!({"type":"interrupted","reason":"barge_in","played_ms":140,"sequence":7})
        );
        assert_eq!(
            v(&ServerEvent::SessionEnd {
                session_id: "ws-1".into(),
                reason: CloseReason::IdleTimeout
            }),
            json!({"type":"session_end","session_id":"ws-1","reason":"idle_timeout"})
        );
        assert_eq!(
            v(&ServerEvent::Vad { speaking: true }),
            json!({"type":"vad","speaking":true})
        );
    }

    #[test]
    fn every_close_reason_round_trips_with_its_code() {
        for r in [
            CloseReason::Closed,
            CloseReason::IdleTimeout,
            CloseReason::MaxDuration,
            CloseReason::Shutdown,
            CloseReason::ProtocolError,
            CloseReason::InvalidUtf8,
            CloseReason::RateLimited,
            CloseReason::MessageTooBig,
            CloseReason::SlowConsumer,
        ] {
            let s = serde_json::to_string(&r).unwrap();
            assert_eq!(s, format!("\"{}\"", r.as_str()));
            assert!((1000..=1009).contains(&r.code()));
        }
        assert_eq!(
            CloseReason::from_violation(1009),
            CloseReason::MessageTooBig
        );
        assert_eq!(CloseReason::from_violation(1007), CloseReason::InvalidUtf8);
    }

    #[test]
    fn unknown_types_and_extra_keys_parse() {
        assert_eq!(
            ServerEvent::parse(r#"{"type":"from_the_future","x":1}"#).unwrap(),
            ServerEvent::Unknown
        );
        let e = ServerEvent::parse(r#"{"type":"session_start","session_id":"ws-a","extra":1}"#)
            .unwrap();
        assert!(matches!(e, ServerEvent::SessionStart { session_id, .. } if session_id == "ws-a"));
    }
}
