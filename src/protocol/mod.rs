//! The wire contract with clients as types (docs/PROTOCOL.md §1): what clients send
//! ([`ClientMessage`]), every event and close the server sends ([`ServerEvent`],
//! [`CloseReason`]), and the audio frame encoders ([`audio`]). The server, the client, the
//! bench and the tests all use these types, so a change to the protocol is a change here.

pub mod audio;
pub mod client;
pub mod event;

pub use audio::{AudioChunks, Format, Pacing};
pub use client::{parse, ClientMessage, Command};
pub use event::{CloseReason, ErrorCode, ServerEvent};
