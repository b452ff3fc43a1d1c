//! WebSocket on top of io_uring sockets.
//!
//! tokio-uring sockets take owned buffers and do not implement `Read`/`Write`, so tungstenite
//! runs here as a pure state machine over in-memory buffers ([`codec::Inbound`]): io_uring
//! fills the inbound buffer, tungstenite parses client frames out of it. Everything the server
//! sends (JSON events, audio frames, close frames) is framed by [`frame`] directly into
//! `Bytes`, so a binary audio frame is `header + the PCM Bytes from h2`, never copied.

pub mod codec;
pub mod frame;
pub mod handshake;
