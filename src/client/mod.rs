//! The one client of the orchestrator's WebSocket protocol (docs/PROTOCOL.md §1), used by
//! `duplex say`, the load generator (`duplex bench`) and the end-to-end tests.
//!
//! ```no_run
//! # async fn demo() -> Result<(), duplex::client::Error> {
//! use duplex::client::{Client, Options, Wait};
//! use std::time::Duration;
//! let mut c = Client::connect("ws://127.0.0.1:8080/", &Options::default()).await?;
//! c.send_text("Hello world", true).await?;
//! let u = c.collect_utterance(Wait::Total(Duration::from_secs(10))).await?;
//! println!("{} frames, first at {:?}", u.frames.len(), u.frames.first().map(|f| f.at));
//! # Ok(()) }
//! ```
//!
//! - [`Client`]: connect (query options, extra headers, a bound), send text / chunks /
//!   control / microphone audio, receive.
//! - Receiving: [`Client::recv`] gives decoded [`Incoming`] items; [`Client::recv_wire`] gives
//!   [`Received`] items parsed in place (no allocation per audio frame) with the instant of
//!   the socket read that completed them, for measurements.
//! - [`Client::collect_utterance`]: frames until the end marker, plus the events in between.
//! - [`wav`]: the WAV writer of `duplex say --out`.

mod conn;
mod say;
mod utterance;
pub mod wav;

pub use conn::{
    parse_binary_message, parse_text, tls_config, Client, Error, Incoming, Kind, Options, Received,
    SessionStart, Stamped, Stream, WireAudio, Ws,
};
pub use say::{run, SayArgs};
pub use utterance::{Frame, Utterance, Wait};
