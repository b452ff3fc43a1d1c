//! gRPC over raw HTTP/2 (`h2`), without tonic: message framing ([`codec`]), status and its
//! trailers ([`status`]), deadlines ([`timeout`]), a multiplexing client ([`client`]), a
//! generic server ([`server`]) and the typed `tts.TTSService` client ([`tts`]).
//!
//! Why not tonic: the orchestrator runs inside single-threaded `tokio_uring` runtimes and
//! wants zero-copy audio (`AudioFrame.audio_data` as a slice of the HTTP/2 receive buffer), a
//! synchronous request sink, and explicit control over keepalive and cancellation. The layer
//! needed for that is small enough to own; `tests/grpc_interop.rs` proves it speaks the same
//! wire protocol as tonic.

pub mod client;
pub mod codec;
pub mod server;
pub mod status;
pub mod timeout;
pub mod tts;

pub use client::{Client, ClientOptions, RequestSink, ResponseStream};
pub use server::{serve, MethodKind, RequestStream, ResponseSender, ServerConfig, Service};
pub use status::{Code, Status};
pub use tts::TtsClient;
