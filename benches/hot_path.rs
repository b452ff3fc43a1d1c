//! Micro-benchmarks of the per-frame hot path, in nanoseconds per frame: decoding the
//! worker's gRPC `AudioFrame` in full and as the `AudioPayload` view the orchestrator uses
//! (zero-copy `Bytes`, no `session_id` string), and encoding the client frame in binary
//! (inline header, shared PCM) and JSON (base64 into the per-core buffer). Run with
//! `cargo bench --bench hot_path` (or `just bench-micro`); it prints a report, asserts nothing.
//! The end-to-end suite is `duplex bench` (`just bench`).

use std::hint::black_box;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use duplex::grpc::tts::AudioPayload;
use duplex::proto::AudioFrame;
use duplex::protocol::audio::audio;
use duplex::protocol::Format;

fn per_frame(name: &str, iters: u32, mut f: impl FnMut(u32)) {
    for i in 0..iters / 10 {
        f(i); // warm-up
    }
    let t = Instant::now();
    for i in 0..iters {
        f(i);
    }
    let ns = t.elapsed().as_nanos() as f64 / f64::from(iters);
    println!("{name:<44} {ns:>9.1} ns/frame");
}

fn main() {
    let pcm = Bytes::from(vec![0x55u8; duplex::audio::FRAME_BYTES]);
    let frame = AudioFrame {
        session_id: "ws-0123456789ab".into(),
        audio_data: pcm.clone(),
        sample_rate: 48_000,
        frame_duration_ms: 20,
        sequence_number: 7,
        is_final: false,
    };
    let wire = duplex::grpc::codec::encode(&frame).expect("encode");
    let payload = wire.slice(5..);
    let n = 200_000;
    println!("duplex hot path, {n} iterations each (release build: cargo bench --bench hot_path)");
    per_frame("gRPC AudioFrame decode, full message", n, |_| {
        let f: AudioFrame =
            duplex::grpc::codec::decode(black_box(payload.clone())).expect("decode");
        black_box(f);
    });
    per_frame("gRPC AudioPayload decode (what we forward)", n, |_| {
        let f: AudioPayload =
            duplex::grpc::codec::decode(black_box(payload.clone())).expect("decode");
        black_box(f);
    });
    per_frame("client frame encode, binary", n, |i| {
        let mut arena = BytesMut::new();
        black_box(audio(Format::Binary, i, Some(&pcm), false, &mut arena));
    });
    let mut arena = BytesMut::new();
    per_frame("client frame encode, JSON (base64, arena)", n, |i| {
        black_box(audio(Format::Json, i, Some(&pcm), false, &mut arena));
    });
}
