//! The orchestrator's gRPC client over raw HTTP/2 (`h2`), without tonic: message framing
//! ([`codec`]), status and its trailers ([`status`]), deadlines ([`timeout`]), a multiplexing
//! client ([`client`]) and the typed `tts.TTSService` client ([`tts`]).
//!
//! Why not tonic on this side: the orchestrator runs inside single-threaded `tokio_uring`
//! runtimes and wants zero-copy audio (`AudioFrame.audio_data` as a slice of the HTTP/2
//! receive buffer), a synchronous request sink, and explicit control over keepalive and
//! cancellation. The layer needed for that is small enough to own; `tests/grpc_interop.rs`
//! proves it speaks the same wire protocol as tonic. The worker, which has none of these
//! constraints, serves with tonic (see `crate::worker::server`).

pub mod client;
pub mod codec;
pub mod status;
pub mod timeout;
pub mod tts;

pub use client::{Client, ClientOptions, RequestSink, ResponseStream};
pub use status::{Code, Status};
pub use tts::TtsClient;
