//! gRPC status: the 17 codes, the `grpc-status` / `grpc-message` trailers and the mapping of
//! transport failures (HTTP status, h2 errors) onto codes.
//!
//! Every failure the gRPC layer reports is a [`Status`] value, so callers (the orchestrator,
//! the worker) decide what to do from one code instead of from a zoo of error types.

use std::fmt;

use http::{HeaderMap, HeaderValue};

/// Header carrying the numeric status code (trailer, or header of a trailers-only response).
pub const GRPC_STATUS: &str = "grpc-status";
/// Header carrying the human readable, percent-encoded status message.
pub const GRPC_MESSAGE: &str = "grpc-message";

/// The 17 canonical gRPC status codes (numbering is part of the wire protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum Code {
    /// Not an error; the call succeeded.
    Ok = 0,
    /// The call was cancelled, usually by the caller.
    Cancelled = 1,
    /// Unknown error (e.g. a status from a peer we cannot interpret).
    Unknown = 2,
    /// The client sent an invalid argument (e.g. a TextChunk without session id).
    InvalidArgument = 3,
    /// The deadline expired before the call completed.
    DeadlineExceeded = 4,
    /// A requested entity (e.g. a session) was not found.
    NotFound = 5,
    /// The entity the client tried to create already exists.
    AlreadyExists = 6,
    /// The caller lacks permission.
    PermissionDenied = 7,
    /// A resource (quota, message size, sessions) is exhausted.
    ResourceExhausted = 8,
    /// The system is not in the state the operation requires.
    FailedPrecondition = 9,
    /// The operation was aborted (concurrency conflict).
    Aborted = 10,
    /// The operation went past the valid range.
    OutOfRange = 11,
    /// The method is not implemented by the server.
    Unimplemented = 12,
    /// An invariant of the protocol or the implementation was broken.
    Internal = 13,
    /// The service is unavailable (connection refused or lost); usually worth retrying elsewhere.
    Unavailable = 14,
    /// Unrecoverable data loss.
    DataLoss = 15,
    /// The request has no valid authentication credentials.
    Unauthenticated = 16,
}

impl Code {
    /// All codes, in numeric order (used by tests and by [`Code::from_i32`]).
    pub const ALL: [Code; 17] = [
        Code::Ok,
        Code::Cancelled,
        Code::Unknown,
        Code::InvalidArgument,
        Code::DeadlineExceeded,
        Code::NotFound,
        Code::AlreadyExists,
        Code::PermissionDenied,
        Code::ResourceExhausted,
        Code::FailedPrecondition,
        Code::Aborted,
        Code::OutOfRange,
        Code::Unimplemented,
        Code::Internal,
        Code::Unavailable,
        Code::DataLoss,
        Code::Unauthenticated,
    ];

    /// Maps a wire number to a code; numbers outside 0..=16 become `Unknown`, as the gRPC spec
    /// asks of clients that meet a code they do not know.
    pub fn from_i32(n: i32) -> Code {
        usize::try_from(n)
            .ok()
            .and_then(|i| Code::ALL.get(i).copied())
            .unwrap_or(Code::Unknown)
    }

    /// The wire number of the code.
    pub fn as_i32(self) -> i32 {
        self as i32
    }

    /// The canonical upper-case name (`NOT_FOUND`), as used in logs and error messages.
    pub fn name(self) -> &'static str {
        match self {
            Code::Ok => "OK",
            Code::Cancelled => "CANCELLED",
            Code::Unknown => "UNKNOWN",
            Code::InvalidArgument => "INVALID_ARGUMENT",
            Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Code::NotFound => "NOT_FOUND",
            Code::AlreadyExists => "ALREADY_EXISTS",
            Code::PermissionDenied => "PERMISSION_DENIED",
            Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Code::FailedPrecondition => "FAILED_PRECONDITION",
            Code::Aborted => "ABORTED",
            Code::OutOfRange => "OUT_OF_RANGE",
            Code::Unimplemented => "UNIMPLEMENTED",
            Code::Internal => "INTERNAL",
            Code::Unavailable => "UNAVAILABLE",
            Code::DataLoss => "DATA_LOSS",
            Code::Unauthenticated => "UNAUTHENTICATED",
        }
    }

    /// The code for a non-200 HTTP status, per the gRPC "HTTP to gRPC status code mapping"
    /// document: a proxy or a non-gRPC server answered, so the call did not reach a gRPC handler.
    pub fn from_http_status(status: http::StatusCode) -> Code {
        match status.as_u16() {
            400 => Code::Internal,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::Unimplemented,
            429 | 502 | 503 | 504 => Code::Unavailable,
            _ => Code::Unknown,
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Outcome of a gRPC call that did not succeed (or, with [`Code::Ok`], the OK trailer itself).
///
/// Kept deliberately small (a code and a message) because that is all the wire carries that
/// our components act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// What kind of failure this is; callers branch on it.
    pub code: Code,
    /// Human readable detail for logs and error messages.
    pub message: String,
}

impl Status {
    /// Builds a status from a code and a message.
    pub fn new(code: Code, message: impl Into<String>) -> Status {
        Status {
            code,
            message: message.into(),
        }
    }

    /// The OK status sent in the trailers of a successful call.
    pub fn ok() -> Status {
        Status::new(Code::Ok, "")
    }

    /// `CANCELLED`: the peer or the caller gave up on the call.
    pub fn cancelled(message: impl Into<String>) -> Status {
        Status::new(Code::Cancelled, message)
    }

    /// `INVALID_ARGUMENT`: the request is malformed.
    pub fn invalid_argument(message: impl Into<String>) -> Status {
        Status::new(Code::InvalidArgument, message)
    }

    /// `DEADLINE_EXCEEDED`: the call's time budget ran out.
    pub fn deadline_exceeded(message: impl Into<String>) -> Status {
        Status::new(Code::DeadlineExceeded, message)
    }

    /// `NOT_FOUND`: the named entity does not exist.
    pub fn not_found(message: impl Into<String>) -> Status {
        Status::new(Code::NotFound, message)
    }

    /// `RESOURCE_EXHAUSTED`: a limit (message size, capacity) was hit.
    pub fn resource_exhausted(message: impl Into<String>) -> Status {
        Status::new(Code::ResourceExhausted, message)
    }

    /// `UNIMPLEMENTED`: the server has no such method.
    pub fn unimplemented(message: impl Into<String>) -> Status {
        Status::new(Code::Unimplemented, message)
    }

    /// `INTERNAL`: a protocol invariant was broken.
    pub fn internal(message: impl Into<String>) -> Status {
        Status::new(Code::Internal, message)
    }

    /// `UNAVAILABLE`: the peer cannot be reached or the connection died; retry elsewhere.
    pub fn unavailable(message: impl Into<String>) -> Status {
        Status::new(Code::Unavailable, message)
    }

    /// `UNKNOWN`: a failure we cannot classify.
    pub fn unknown(message: impl Into<String>) -> Status {
        Status::new(Code::Unknown, message)
    }

    /// True for the OK status.
    pub fn is_ok(&self) -> bool {
        self.code == Code::Ok
    }

    /// Reads `grpc-status` / `grpc-message` from trailers (or from the headers of a
    /// trailers-only response). `None` when `grpc-status` is absent; an unparsable value is an
    /// `UNKNOWN` status rather than an error, so a confused peer never crashes us.
    pub fn from_header_map(headers: &HeaderMap) -> Option<Status> {
        let raw = headers.get(GRPC_STATUS)?;
        let code = match raw.to_str().ok().and_then(|s| s.trim().parse::<i32>().ok()) {
            Some(n) => Code::from_i32(n),
            None => {
                return Some(Status::unknown(format!(
                    "invalid grpc-status header: {:?}",
                    String::from_utf8_lossy(raw.as_bytes())
                )))
            }
        };
        let message = headers
            .get(GRPC_MESSAGE)
            .map(|v| percent_decode(v.as_bytes()))
            .unwrap_or_default();
        Some(Status { code, message })
    }

    /// Writes `grpc-status` and (if non-empty) the percent-encoded `grpc-message` into `headers`.
    pub fn add_to_headers(&self, headers: &mut HeaderMap) {
        headers.insert(GRPC_STATUS, HeaderValue::from(self.code.as_i32()));
        if !self.message.is_empty() {
            // percent_encode only emits visible ASCII, which is always a valid header value.
            if let Ok(v) = HeaderValue::from_str(&percent_encode(&self.message)) {
                headers.insert(GRPC_MESSAGE, v);
            }
        }
    }

    /// A trailer map carrying this status.
    pub fn to_header_map(&self) -> HeaderMap {
        let mut headers = HeaderMap::with_capacity(2);
        self.add_to_headers(&mut headers);
        headers
    }

    /// Maps an h2 error to a status: a stream reset by the peer becomes the code its reason
    /// implies (CANCEL → CANCELLED, REFUSED_STREAM → UNAVAILABLE, ...), anything that kills the
    /// connection (I/O error, GOAWAY, EOF) becomes UNAVAILABLE so callers fail over.
    pub fn from_h2(err: &h2::Error) -> Status {
        if err.is_io() || err.is_go_away() {
            return Status::unavailable(format!("connection lost: {err}"));
        }
        match err.reason() {
            Some(h2::Reason::CANCEL) => Status::cancelled(format!("stream cancelled: {err}")),
            Some(h2::Reason::REFUSED_STREAM) => {
                Status::unavailable(format!("stream refused: {err}"))
            }
            Some(h2::Reason::ENHANCE_YOUR_CALM) => {
                Status::resource_exhausted(format!("peer says enhance your calm: {err}"))
            }
            Some(h2::Reason::INADEQUATE_SECURITY) => Status::new(
                Code::PermissionDenied,
                format!("inadequate security: {err}"),
            ),
            Some(h2::Reason::NO_ERROR) if err.is_reset() => {
                Status::internal(format!("stream reset without error: {err}"))
            }
            Some(_) if err.is_reset() => Status::internal(format!("stream reset: {err}")),
            // Library-detected protocol errors and connection-level reasons: the connection
            // is unusable either way.
            _ => Status::unavailable(format!("connection error: {err}")),
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.message.is_empty() {
            write!(f, "gRPC status {}", self.code)
        } else {
            write!(f, "gRPC status {}: {}", self.code, self.message)
        }
    }
}

impl std::error::Error for Status {}

impl From<h2::Error> for Status {
    fn from(err: h2::Error) -> Status {
        Status::from_h2(&err)
    }
}

/// Percent-encodes a status message per the gRPC spec: bytes outside visible ASCII
/// (0x20..=0x7E) and `%` itself become `%XX` (upper-case hex) of their UTF-8 encoding.
pub fn percent_encode(message: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(message.len());
    for &b in message.as_bytes() {
        if (0x20..=0x7E).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0F)]));
        }
    }
    out
}

/// Decodes a percent-encoded `grpc-message`. Per the spec, a malformed `%` sequence is kept
/// literally and invalid UTF-8 is replaced rather than rejected: the message is for humans.
pub fn percent_decode(raw: &[u8]) -> String {
    fn hex(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b == b'%' && i + 2 < raw.len() {
            if let (Some(hi), Some(lo)) = (hex(raw[i + 1]), hex(raw[i + 2])) {
                out.push(hi << 4 | lo);
                i += 3;
                continue;
            }
        }
        out.push(b);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_unknown_numbers_map_to_unknown() {
        for (i, code) in Code::ALL.iter().enumerate() {
            assert_eq!(code.as_i32(), i as i32);
            assert_eq!(Code::from_i32(i as i32), *code);
        }
        assert_eq!(Code::from_i32(17), Code::Unknown);
        assert_eq!(Code::from_i32(-1), Code::Unknown);
        assert_eq!(Code::Unavailable.as_i32(), 14);
        assert_eq!(Code::DeadlineExceeded.name(), "DEADLINE_EXCEEDED");
    }

    #[test]
    fn percent_encoding_follows_the_grpc_spec() {
        assert_eq!(percent_encode("plain text"), "plain text");
        assert_eq!(percent_encode("50%"), "50%25");
        assert_eq!(percent_encode("a\nb"), "a%0Ab");
        assert_eq!(percent_encode("café"), "caf%C3%A9");
        assert_eq!(percent_encode("日"), "%E6%97%A5");
        for s in ["", "x", "100% ok", "tab\tand\r\n", "ünïcødé ✓", "%%%"] {
            assert_eq!(percent_decode(percent_encode(s).as_bytes()), s);
        }
    }

    #[test]
    fn percent_decoding_keeps_malformed_sequences() {
        assert_eq!(percent_decode(b"%"), "%");
        assert_eq!(percent_decode(b"%4"), "%4");
        assert_eq!(percent_decode(b"%zz!"), "%zz!");
        assert_eq!(percent_decode(b"a%41"), "aA");
        assert_eq!(percent_decode(b"%C3%A9"), "é");
        // invalid UTF-8 is replaced, not rejected
        assert_eq!(percent_decode(b"%FF"), "\u{FFFD}");
    }

    #[test]
    fn status_round_trips_through_headers() {
        let s = Status::not_found("session 'x' not found: 100%\n");
        let h = s.to_header_map();
        assert_eq!(h.get(GRPC_STATUS).unwrap(), "5");
        assert_eq!(
            h.get(GRPC_MESSAGE).unwrap(),
            "session 'x' not found: 100%25%0A"
        );
        assert_eq!(Status::from_header_map(&h), Some(s));
        let ok = Status::ok().to_header_map();
        assert!(ok.get(GRPC_MESSAGE).is_none());
        assert_eq!(Status::from_header_map(&ok), Some(Status::ok()));
        assert_eq!(Status::from_header_map(&HeaderMap::new()), None);
    }

    #[test]
    fn garbage_grpc_status_is_unknown_not_a_crash() {
        let mut h = HeaderMap::new();
        h.insert(GRPC_STATUS, HeaderValue::from_static("abc"));
        assert_eq!(Status::from_header_map(&h).unwrap().code, Code::Unknown);
        h.insert(GRPC_STATUS, HeaderValue::from_static("99"));
        assert_eq!(Status::from_header_map(&h).unwrap().code, Code::Unknown);
    }

    #[test]
    fn http_status_mapping() {
        use http::StatusCode as S;
        assert_eq!(Code::from_http_status(S::BAD_REQUEST), Code::Internal);
        assert_eq!(
            Code::from_http_status(S::UNAUTHORIZED),
            Code::Unauthenticated
        );
        assert_eq!(Code::from_http_status(S::FORBIDDEN), Code::PermissionDenied);
        assert_eq!(Code::from_http_status(S::NOT_FOUND), Code::Unimplemented);
        assert_eq!(
            Code::from_http_status(S::TOO_MANY_REQUESTS),
            Code::Unavailable
        );
        assert_eq!(Code::from_http_status(S::BAD_GATEWAY), Code::Unavailable);
        assert_eq!(
            Code::from_http_status(S::SERVICE_UNAVAILABLE),
            Code::Unavailable
        );
        assert_eq!(
            Code::from_http_status(S::GATEWAY_TIMEOUT),
            Code::Unavailable
        );
        assert_eq!(Code::from_http_status(S::IM_A_TEAPOT), Code::Unknown);
        assert_eq!(
            Code::from_http_status(S::INTERNAL_SERVER_ERROR),
            Code::Unknown
        );
    }
}
