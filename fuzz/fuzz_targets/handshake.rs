//! The HTTP/1.1 request head every connection starts with (`duplex::ws::handshake::parse`),
//! including the query decoding and the `101` answer built from `Sec-WebSocket-Key`.
//!
//! Promises checked:
//! - no panic, whatever the bytes;
//! - `Complete(req, len)`: `0 < len <= input`, the head alone (`input[..len]`) parses to the
//!   same request, `path` has no `?`, an upgrade is a `GET`, and its `101` answer is
//!   well-formed with a 28-character accept key;
//! - `Partial` only below `MAX_HEAD`;
//! - read incrementally the way `gateway::conn` reads it (re-parse the growing buffer until
//!   the answer is not `Partial`), the outcome is the one-shot outcome.
#![no_main]

use duplex::ws::handshake::{accept_response, parse, Parsed, Request, MAX_HEAD};
use libfuzzer_sys::fuzz_target;

fn same(a: &Request, b: &Request) -> bool {
    a.method == b.method
        && a.path == b.path
        && a.query == b.query
        && a.ws_key == b.ws_key
        && a.authorization == b.authorization
}

fn check_request(req: &Request, len: usize, input: &[u8]) {
    assert!(
        len > 0 && len <= input.len(),
        "len {len} of {}",
        input.len()
    );
    assert!(!req.path.contains('?'), "query left in path {:?}", req.path);
    if req.is_upgrade() {
        assert_eq!(req.method, "GET");
        let key = req.ws_key.as_deref().unwrap();
        let resp = accept_response(key);
        let text = std::str::from_utf8(&resp).expect("101 answer is ASCII");
        assert!(text.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(text.ends_with("\r\n\r\n"));
        let accept = text
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Accept: "))
            .expect("accept header");
        assert_eq!(accept.len(), 28, "{accept:?}");
    }
    // What conn.rs reads from the query must not panic either.
    if let Some(r) = req.query.get("input_rate") {
        let _ = r.parse::<u32>();
    }
}

fuzz_target!(|data: &[u8]| {
    let whole = parse(data);
    match &whole {
        Parsed::Complete(req, len) => {
            check_request(req, *len, data);
            match parse(&data[..*len]) {
                Parsed::Complete(again, len2) => {
                    assert_eq!(len2, *len, "head alone parses to another length");
                    assert!(same(req, &again), "head alone parses differently");
                }
                other => panic!("head alone does not parse: {other:?}"),
            }
        }
        Parsed::Partial => assert!(data.len() < MAX_HEAD),
        Parsed::Invalid(reason) => assert!(!reason.is_empty()),
    }

    // Incremental reading, as gateway::conn does it (only below MAX_HEAD, where the server
    // would otherwise already have refused a still-partial head).
    for variant in 0..2 {
        let mut outcome = None;
        for end in duplex_fuzz::cut_points(data, variant) {
            if end == 0 {
                continue;
            }
            match parse(&data[..end]) {
                Parsed::Partial => continue,
                other => {
                    outcome = Some((end, other));
                    break;
                }
            }
        }
        match (&whole, outcome) {
            (Parsed::Complete(req, len), Some((end, Parsed::Complete(r2, l2)))) => {
                assert!(end >= *len);
                assert_eq!(l2, *len, "incremental read found another head length");
                assert!(same(req, &r2), "incremental read parsed differently");
            }
            (Parsed::Complete(_, len), Some((end, other))) if *len < MAX_HEAD => {
                panic!("prefix of {end} bytes of a complete {len}-byte head gave {other:?}")
            }
            (Parsed::Invalid(_), Some((_, Parsed::Invalid(_)))) => {}
            (Parsed::Partial, None) => {}
            (Parsed::Invalid(_), None) if data.is_empty() => {}
            (w, o) if data.len() < MAX_HEAD => {
                panic!("one-shot {w:?} but incremental {o:?}")
            }
            _ => {}
        }
    }
});
