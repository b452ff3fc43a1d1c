//! The HTTP/1.1 request that opens every connection: either a WebSocket upgrade (RFC 6455
//! §4.2) or a plain GET for the admin endpoints on the same port.

use std::collections::HashMap;

/// Longest request head we accept; real clients send well under 2 KiB.
pub const MAX_HEAD: usize = 16 * 1024;

/// A parsed request head.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub method: String,
    /// Path without the query string.
    pub path: String,
    /// Query parameters, percent-decoded; the last value of a repeated key wins.
    pub query: HashMap<String, String>,
    /// `Sec-WebSocket-Key` when this is a valid upgrade request.
    pub ws_key: Option<String>,
    /// `Authorization` header value, if any.
    pub authorization: Option<String>,
    /// `Origin` header (sent by browsers), if any.
    pub origin: Option<String>,
    /// `Host` header, if any.
    pub host: Option<String>,
}

impl Request {
    /// True when the client asked for a WebSocket.
    pub fn is_upgrade(&self) -> bool {
        self.ws_key.is_some()
    }
}

/// Result of looking for a request head in the bytes read so far.
#[derive(Debug)]
pub enum Parsed {
    /// A complete head; `usize` is its length (bytes after it belong to the WebSocket).
    Complete(Request, usize),
    /// Need more bytes.
    Partial,
    /// Not HTTP we can serve: answer 400 with this reason.
    Invalid(String),
}

/// Parses a request head.
pub fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; 48];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            return Parsed::Invalid("request head too large".into())
        }
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(e) => return Parsed::Invalid(format!("bad HTTP request: {e}")),
    };
    let method = req.method.unwrap_or("").to_string();
    let target = req.path.unwrap_or("/");
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), parse_query(q)),
        None => (target.to_string(), HashMap::new()),
    };
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    };
    let has_token = |name: &str, token: &str| {
        header(name).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    let upgrade = method == "GET"
        && has_token("upgrade", "websocket")
        && has_token("connection", "upgrade")
        && header("sec-websocket-version") == Some("13");
    let ws_key = if upgrade {
        header("sec-websocket-key").map(str::to_string)
    } else {
        None
    };
    let authorization = header("authorization").map(str::to_string);
    let origin = header("origin").map(str::to_string);
    let host = header("host").map(str::to_string);
    Parsed::Complete(
        Request {
            method,
            path,
            query,
            ws_key,
            authorization,
            origin,
            host,
        },
        len,
    )
}

/// Query parameters, decoded as browsers encode them (`application/x-www-form-urlencoded`:
/// `+` is a space, `%XX` a byte, invalid UTF-8 replaced); malformed escapes stay as written.
fn parse_query(q: &str) -> HashMap<String, String> {
    form_urlencoded::parse(q.as_bytes()).into_owned().collect()
}

/// The `101 Switching Protocols` response for an accepted upgrade.
pub fn accept_response(key: &str) -> Vec<u8> {
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    )
    .into_bytes()
}

/// A complete HTTP/1.1 response that closes the connection afterwards.
pub fn response(status: u16, content_type: &str, body: &[u8]) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        429 => "Too Many Requests",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPGRADE: &str = "GET /?format=binary&pacing=asap&model=mock%2D1 HTTP/1.1\r\nHost: x\r\n\
        Upgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\nrest";

    #[test]
    fn parses_upgrade_with_query_and_leftover() {
        match parse(UPGRADE.as_bytes()) {
            Parsed::Complete(r, len) => {
                assert!(r.is_upgrade());
                assert_eq!(r.path, "/");
                assert_eq!(r.query["format"], "binary");
                assert_eq!(r.query["pacing"], "asap");
                assert_eq!(r.query["model"], "mock-1");
                assert_eq!(&UPGRADE.as_bytes()[len..], b"rest");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rfc_example_accept_key() {
        let r = String::from_utf8(accept_response("dGhlIHNhbXBsZSBub25jZQ==")).unwrap();
        assert!(r.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
    }

    #[test]
    fn plain_get_is_not_upgrade_and_partial_waits() {
        match parse(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n") {
            Parsed::Complete(r, _) => {
                assert!(!r.is_upgrade());
                assert_eq!(r.path, "/health");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(b"GET /health HTTP/1.1\r\n"),
            Parsed::Partial
        ));
        assert!(matches!(
            parse(b"\x16\x03\x01garbage\r\n\r\n"),
            Parsed::Invalid(_)
        ));
    }

    #[test]
    fn query_decoding_is_total() {
        let q = parse_query("a=a%2&b=%zz&c=a+b%20c&d=%&e=%20&f");
        assert_eq!(q["a"], "a%2");
        assert_eq!(q["b"], "%zz");
        assert_eq!(q["c"], "a b c");
        assert_eq!(q["d"], "%");
        assert_eq!(q["e"], " ", "an escape at the very end decodes too");
        assert_eq!(q["f"], "");
    }
}
