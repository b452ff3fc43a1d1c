//! duplex: a real-time, full-duplex voice gateway.
//!
//! Clients speak WebSocket to the orchestrator ([`gateway`], over [`ws`] and [`protocol`]);
//! TTS workers ([`worker`]) speak gRPC, which the orchestrator drives over raw HTTP/2
//! ([`grpc`]); workers are found through Redis ([`registry`]). docs/ARCHITECTURE.md draws the
//! picture and docs/PROTOCOL.md is the wire contract.

#![warn(clippy::undocumented_unsafe_blocks)]

pub mod bench;
pub mod cli;
pub mod client;
pub mod gateway;
pub mod grpc;
pub mod protocol;
pub mod registry;
pub mod trust;
pub mod web;
pub mod worker;
pub mod ws;

/// Generated protobuf types of `proto/tts.proto` (package `tts`).
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/tts.rs"));
}

/// Audio constants shared by every component (docs/PROTOCOL.md: s16le mono 48 kHz, 20 ms frames).
pub mod audio {
    /// Samples per second of every PCM stream the gateway carries.
    pub const SAMPLE_RATE: u32 = 48_000;
    /// Duration of one frame in milliseconds.
    pub const FRAME_MS: u32 = 20;
    /// Samples per 20 ms frame.
    pub const FRAME_SAMPLES: usize = 960;
    /// Bytes per 20 ms frame of s16le mono.
    pub const FRAME_BYTES: usize = 1920;
}
