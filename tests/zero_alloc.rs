//! The binary forwarding path allocates nothing per frame, and sends the very PCM buffer that
//! came from the worker (no copy). Measured with a counting global allocator around the
//! session's own code: frame delivered by the worker stream -> pacing -> output queue -> the
//! batch handed to `writev`.

use std::rc::Rc;

use bytes::Bytes;
use duplex::gateway::config::{Config, OrchestratorArgs, Pacing};
use duplex::gateway::session::{Options, Session};
use duplex::gateway::{Core, Shared};
use duplex::protocol::Format;

#[path = "common/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::allocs;

fn args() -> OrchestratorArgs {
    OrchestratorArgs::parse_from([
        "--cores",
        "1",
        "--pacing",
        "asap",
        "--idle-timeout-secs",
        "0",
        "--model",
        "mock-440hz",
        // Generous enough that 10,000 frames never trip the rate limits.
        "--max-messages-per-sec",
        "1000000",
    ])
    .unwrap()
}

/// Drives `frames` frames through a session and returns (allocations, last batch).
fn forward(format: Format, frames: usize) -> (usize, Vec<Bytes>, Bytes) {
    let config = Config::new("127.0.0.1:0", &[], &args()).unwrap();
    let shared = Shared::new(config).unwrap();
    tokio_uring::start(async move {
        let core = Rc::new(Core::new(0, shared).unwrap());
        let opts = Options {
            format,
            pacing: Pacing::Asap,
            model: "mock-440hz".into(),
            input_rate: 16_000,
            max_session: None,
        };
        let session = Rc::new(Session::new(
            0,
            "ws-000000000000".into(),
            opts,
            core.clone(),
        ));
        // Opens utterance 0; its synthesis task is spawned but never polled (no await here).
        session.on_client_text(r#"{"type":"text","text":"hello"}"#);
        let pcm = Bytes::from(vec![7u8; 1920]);
        let mut batch: Vec<Bytes> = Vec::with_capacity(64);
        // Warm up: queues and vectors reach their steady capacity, first-frame metrics run.
        for _ in 0..200 {
            session.deliver_frame(0, pcm.clone());
            session.output.take(&mut batch, 512);
            batch.clear();
        }
        let before = allocs();
        for _ in 0..frames {
            batch.clear();
            session.deliver_frame(0, pcm.clone());
            session.output.take(&mut batch, 512);
        }
        (allocs() - before, batch, pcm)
    })
}

#[test]
fn binary_frames_forward_without_allocating_or_copying() {
    let frames = 10_000;
    let (allocs, batch, pcm) = forward(Format::Binary, frames);
    assert_eq!(batch.len(), 2, "header + PCM");
    assert_eq!(batch[1].as_ptr(), pcm.as_ptr(), "PCM was copied");
    // Headers are carved from the core's 64 KiB arena: a new block (its buffer and the
    // shared count `bytes` adds on the first split) once per ~5,000 12-byte headers, nothing
    // per frame.
    let header = batch[0].len();
    assert_eq!(header, 4 + duplex::protocol::audio::BINARY_HEADER_LEN);
    let blocks = frames * header / duplex::protocol::audio::ARENA + 1;
    assert!(
        allocs <= 2 * blocks,
        "{allocs} allocations while forwarding {frames} binary frames (arena blocks: {blocks})"
    );
}

#[test]
fn json_frames_allocate_at_most_once_per_frame() {
    let (allocs, batch, _) = forward(Format::Json, 10_000);
    assert!(
        allocs <= 10_000,
        "{allocs} allocations for 10,000 JSON frames"
    );
    assert_eq!(batch.len(), 1);
}

/// The other half of the path: the worker's `AudioFrame` as it comes out of the gRPC decoder.
/// The full message would allocate its `session_id` on every frame; the orchestrator's
/// `AudioPayload` view must not allocate at all, and its PCM must be a slice of the input.
#[test]
fn decoding_a_worker_frame_allocates_nothing() {
    use duplex::grpc::codec::{decode, encode};
    use duplex::grpc::tts::AudioPayload;
    use duplex::proto::AudioFrame;

    let frame = AudioFrame {
        session_id: "ws-0123456789ab".into(),
        audio_data: Bytes::from(vec![7u8; 1920]),
        sample_rate: 48_000,
        frame_duration_ms: 20,
        sequence_number: 1,
        is_final: false,
    };
    // encode() adds the 5-byte gRPC prefix; the decoder hands out what follows it.
    let payload = encode(&frame).unwrap().slice(5..);
    let full_before = allocs();
    let _: AudioFrame = decode(payload.clone()).unwrap();
    assert!(
        allocs() > full_before,
        "the full AudioFrame is expected to allocate (session_id); the test would prove nothing"
    );
    let before = allocs();
    let mut bytes = 0;
    for _ in 0..10_000 {
        let p: AudioPayload = decode(payload.clone()).unwrap();
        assert!(payload.as_ptr_range().contains(&p.audio_data.as_ptr()));
        bytes += p.audio_data.len();
    }
    assert_eq!(
        allocs() - before,
        0,
        "allocations while decoding 10,000 frames"
    );
    assert_eq!(bytes, 1920 * 10_000);
}
