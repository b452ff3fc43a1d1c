//! Client-to-server WebSocket frames through tungstenite's state machine as the server drives
//! it (`duplex::ws::codec::Decoder`): feed the bytes in pieces, drain `next_message()` until
//! `NeedMore`, `Closed` or `Violation`, collect `take_replies()` like `gateway::conn` does.
//!
//! Promises checked:
//! - no panic and no endless `next_message()` loop;
//! - the decoded messages, the way the stream ends (close / violation code) and the replies
//!   do not depend on how the bytes were cut (one piece, bytes handed to `Decoder::new` as
//!   `already_read`, or many small pieces); after a violation, only the replies flushed
//!   before it may differ (more pieces, more flushes);
//! - text/binary messages respect `max_message`; ping/pong payloads are control-sized;
//! - replies are unmasked, final pong/close frames (the server never masks) with a valid
//!   close payload.
#![no_main]

use std::io::Cursor;

use duplex::ws::codec::{Decoder, Inbound};
use libfuzzer_sys::fuzz_target;
use tungstenite::protocol::frame::coding::{Control, OpCode};
use tungstenite::protocol::frame::FrameHeader;
use tungstenite::Message;

#[derive(Debug, PartialEq)]
enum Event {
    Msg(Message),
    Closed,
    Violation(u16),
}

struct Run {
    events: Vec<Event>,
    replies: Vec<u8>,
}

fn drain(d: &mut Decoder, max: usize, fed: usize, run: &mut Run) -> bool {
    // Every message consumes at least a 2-byte frame header.
    for _ in 0..=fed / 2 + 2 {
        match d.next_message() {
            Inbound::Message(m) => {
                match &m {
                    Message::Text(t) => assert!(t.len() <= max),
                    Message::Binary(b) => assert!(b.len() <= max),
                    Message::Ping(p) | Message::Pong(p) => assert!(p.len() <= 125),
                    Message::Close(_) => panic!("close must be reported as Inbound::Closed"),
                    Message::Frame(_) => panic!("raw frame from read()"),
                }
                run.events.push(Event::Msg(m));
            }
            Inbound::NeedMore => {
                if let Some(r) = d.take_replies() {
                    run.replies.extend_from_slice(&r);
                }
                return true;
            }
            Inbound::Closed => {
                if let Some(r) = d.take_replies() {
                    run.replies.extend_from_slice(&r);
                }
                run.events.push(Event::Closed);
                return false;
            }
            Inbound::Violation(code, reason) => {
                assert!(matches!(code, 1002 | 1007 | 1009), "{code} {reason}");
                run.events.push(Event::Violation(code));
                return false;
            }
        }
    }
    panic!("next_message() never asked for more bytes after {fed} bytes");
}

fn run(pieces: &[&[u8]], max: usize, already_read: bool) -> Run {
    let mut run = Run {
        events: Vec::new(),
        replies: Vec::new(),
    };
    let (first, rest) = match (already_read, pieces.split_first()) {
        (true, Some((first, rest))) => (first.to_vec(), rest),
        _ => (Vec::new(), pieces),
    };
    let mut fed = first.len();
    let mut d = Decoder::new(max, first);
    if !drain(&mut d, max, fed, &mut run) {
        return run;
    }
    for p in rest {
        d.feed(p);
        fed += p.len();
        if !drain(&mut d, max, fed, &mut run) {
            break;
        }
    }
    run
}

/// Replies are what the server writes: unmasked, final pong or close frames.
fn check_replies(bytes: &[u8]) {
    let mut cur = Cursor::new(bytes);
    while (cur.position() as usize) < bytes.len() {
        let (h, len) = FrameHeader::parse(&mut cur)
            .expect("reply header parses")
            .expect("reply header complete");
        assert!(h.mask.is_none(), "server frames are never masked");
        assert!(h.is_final && !h.rsv1 && !h.rsv2 && !h.rsv3);
        assert!(len <= 125, "control frame of {len} bytes");
        let start = cur.position() as usize;
        let end = start + len as usize;
        assert!(end <= bytes.len(), "reply frame cut short");
        let payload = &bytes[start..end];
        match h.opcode {
            OpCode::Control(Control::Pong) => {}
            OpCode::Control(Control::Close) => {
                assert!(payload.len() != 1, "close payload of 1 byte");
                if payload.len() >= 2 {
                    assert!(
                        std::str::from_utf8(&payload[2..]).is_ok(),
                        "close reason UTF-8"
                    );
                }
            }
            other => panic!("unexpected reply opcode {other:?}"),
        }
        cur.set_position(end as u64);
    }
}

fuzz_target!(|data: &[u8]| {
    // The server's default (1 MiB) and the smallest `--max-message-bytes` it accepts.
    for max in [1 << 20, 1024] {
        let one = run(&[data], max, false);
        check_replies(&one.replies);
        for (variant, already) in [(0, false), (1, true), (2, true)] {
            let pieces = duplex_fuzz::split(data, variant);
            let other = run(&pieces, max, already);
            assert_eq!(
                one.events, other.events,
                "events depend on the cut ({variant})"
            );
            if matches!(one.events.last(), Some(Event::Violation(_))) {
                // The server sends its own close on a violation and drops what tungstenite
                // still had queued: a pong flushed at an earlier NeedMore (more cuts, more
                // flushes) may or may not have gone out first.
                assert!(
                    other.replies.starts_with(&one.replies),
                    "replies depend on the cut ({variant})"
                );
            } else {
                assert_eq!(
                    one.replies, other.replies,
                    "replies depend on the cut ({variant})"
                );
            }
        }
    }
});
