//! The gRPC length-prefixed message decoder the worker client reads with
//! (`duplex::grpc::codec::Decoder`), and the prost messages decoded from its payloads
//! (`AudioFrame`, the orchestrator's `duplex::grpc::tts::AudioPayload` and the other
//! `duplex::proto` messages a worker answers with).
//!
//! Promises checked:
//! - no panic, no endless loop;
//! - the messages (and the error, if any) are those of a straightforward reference reading of
//!   the same bytes, however they were cut into chunks and whether or not the caller drained
//!   between pushes; `finish()` fails exactly when the stream stops inside a message;
//! - a message wholly inside one chunk is a zero-copy slice of it, and so is
//!   `AudioPayload.audio_data`;
//! - whenever `AudioFrame` decodes, `AudioPayload` decodes to the same audio, sequence and
//!   final flag; every decoded message re-encodes to bytes that decode to the same message
//!   (the same length only, for messages with maps or floats).
#![no_main]

use bytes::Bytes;
use duplex::grpc::codec::{self, Decoder, DEFAULT_MAX_MESSAGE, HEADER_LEN};
use duplex::grpc::tts::AudioPayload;
use duplex::proto;
use libfuzzer_sys::fuzz_target;
use prost::Message;

#[derive(Debug, PartialEq)]
enum End {
    /// Stream ended on a message boundary.
    Clean,
    /// Stream ended inside a message.
    Truncated,
    /// The decoder refused a header.
    Error,
}

/// The obvious reading of a length-prefixed stream.
fn reference(data: &[u8], max: usize) -> (Vec<&[u8]>, End) {
    let mut msgs = Vec::new();
    let mut rest = data;
    loop {
        if rest.is_empty() {
            return (msgs, End::Clean);
        }
        if rest.len() < HEADER_LEN {
            return (msgs, End::Truncated);
        }
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        if rest[0] != 0 || len > max {
            return (msgs, End::Error);
        }
        if rest.len() < HEADER_LEN + len {
            return (msgs, End::Truncated);
        }
        msgs.push(&rest[HEADER_LEN..HEADER_LEN + len]);
        rest = &rest[HEADER_LEN + len..];
    }
}

fn decode_all(pieces: &[Bytes], max: usize, drain_every: bool) -> (Vec<Bytes>, End) {
    let mut dec = Decoder::new(max);
    let mut out = Vec::new();
    let total: usize = pieces.iter().map(Bytes::len).sum();
    for (i, p) in pieces.iter().enumerate() {
        dec.push(p.clone());
        if !drain_every && i % 3 != 2 && i + 1 != pieces.len() {
            continue;
        }
        let mut steps = 0;
        loop {
            steps += 1;
            assert!(steps <= total + 2, "next_message() loops");
            match dec.next_message() {
                Ok(Some(m)) => out.push(m),
                Ok(None) => break,
                Err(_) => return (out, End::Error),
            }
        }
    }
    let end = if dec.finish().is_ok() {
        End::Clean
    } else {
        End::Truncated
    };
    (out, end)
}

/// Decoded messages re-encode to something that decodes to the same message. `exact`: the
/// message has no floats (NaN != NaN) and no maps (prost's maps are `HashMap`s, so their
/// encoding order is not stable); otherwise only the encoded length is compared.
fn canonical<M: Message + Default + PartialEq + std::fmt::Debug>(payload: &Bytes, exact: bool) {
    if let Ok(m) = M::decode(payload.clone()) {
        let once = m.encode_to_vec();
        assert_eq!(once.len(), m.encoded_len());
        let again = M::decode(&once[..]).expect("re-encoded message decodes");
        assert_eq!(
            again.encoded_len(),
            once.len(),
            "re-encoding changes the length"
        );
        if exact {
            assert_eq!(again, m, "re-encoding changes the message");
            assert_eq!(again.encode_to_vec(), once, "re-encoding is not stable");
        }
    }
}

fn check_payload(payload: &Bytes) {
    let frame: Result<proto::AudioFrame, _> = codec::decode(payload.clone());
    let lean: Result<AudioPayload, _> = codec::decode(payload.clone());
    if let Ok(p) = &lean {
        if !p.audio_data.is_empty() {
            let range = payload.as_ptr_range();
            assert!(
                range.contains(&p.audio_data.as_ptr()),
                "audio_data must be a slice of the received payload"
            );
        }
    }
    if let Ok(f) = &frame {
        let p = lean.expect("AudioPayload decodes whenever AudioFrame does");
        assert_eq!(p.audio_data, f.audio_data);
        assert_eq!(p.sequence_number, f.sequence_number);
        assert_eq!(p.is_final, f.is_final);
        // What the worker sends goes through the same framing and back.
        let wire = codec::encode(f).expect("encodes");
        let mut dec = Decoder::default();
        dec.push(wire);
        let m = dec.next_message().unwrap().expect("one message");
        assert_eq!(&codec::decode::<proto::AudioFrame>(m).unwrap(), f);
        dec.finish().unwrap();
    }
    canonical::<proto::AudioFrame>(payload, true);
    canonical::<AudioPayload>(payload, true);
    canonical::<proto::TextChunk>(payload, true);
    canonical::<proto::GetCapabilitiesResponse>(payload, false);
    canonical::<proto::ListModelsResponse>(payload, false);
    canonical::<proto::StartSessionRequest>(payload, false);
    canonical::<proto::ControlRequest>(payload, true);
    canonical::<proto::LoadModelResponse>(payload, true);
}

fuzz_target!(|data: &[u8]| {
    let whole = Bytes::copy_from_slice(data);
    for max in [DEFAULT_MAX_MESSAGE, 64] {
        let (want, want_end) = reference(data, max);

        // One chunk: every message is a zero-copy slice of it.
        let (got, end) = decode_all(std::slice::from_ref(&whole), max, true);
        assert_eq!(end, want_end);
        assert_eq!(got.len(), want.len());
        let range = whole.as_ptr_range();
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(&g[..], *w);
            if !g.is_empty() {
                assert!(range.contains(&g.as_ptr()), "whole message was copied");
            }
        }

        for variant in 0..3 {
            let pieces: Vec<Bytes> = duplex_fuzz::split(data, variant)
                .into_iter()
                .map(Bytes::copy_from_slice)
                .collect();
            let (got, end) = decode_all(&pieces, max, variant != 2);
            assert_eq!(end, want_end, "cut {variant}");
            let got: Vec<&[u8]> = got.iter().map(|b| &b[..]).collect();
            assert_eq!(got, want, "cut {variant}");
        }

        if max == DEFAULT_MAX_MESSAGE {
            for m in &got {
                check_payload(m);
            }
        }
    }
    // The input itself as one payload, too (a fuzzer rarely gets a length prefix right).
    check_payload(&whole);
});
