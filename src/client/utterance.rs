//! Reading one utterance: frames until the end marker, plus the events seen in between.

use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::time::Instant as Deadline;

use super::conn::{Client, Error, Kind, Received};
use crate::protocol::ServerEvent;

/// How long collecting may wait.
#[derive(Debug, Clone, Copy)]
pub enum Wait {
    /// For the whole utterance.
    Total(Duration),
    /// For each message (silence between two messages), however long the utterance is.
    Silence(Duration),
}

/// One audio frame as the client received it.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Sequence number (1.. per utterance).
    pub sequence: u32,
    /// s16le mono 48 kHz PCM (decoded for JSON frames).
    pub pcm: Bytes,
    /// When the read that completed it returned.
    pub at: Instant,
}

/// Everything received for one utterance, up to and including its end marker.
#[derive(Debug, Clone)]
pub struct Utterance {
    /// The data frames, in arrival order.
    pub frames: Vec<Frame>,
    /// The end marker's sequence number (last + 1 for a complete utterance).
    pub end_sequence: u32,
    /// Other events that arrived in between (errors, `interrupted`, `vad`, …), in order.
    pub events: Vec<ServerEvent>,
}

impl Utterance {
    /// Sequence numbers of the data frames, in arrival order.
    pub fn sequences(&self) -> Vec<u32> {
        self.frames.iter().map(|f| f.sequence).collect()
    }

    /// Whether an `interrupted` event arrived during it.
    pub fn interrupted(&self) -> bool {
        self.events
            .iter()
            .any(|e| matches!(e, ServerEvent::Interrupted { .. }))
    }
}

/// What was collected when collecting failed (to say how far it got).
fn progress(frames: &[Frame], events: &[ServerEvent]) -> String {
    let seqs: Vec<u32> = frames.iter().map(|f| f.sequence).collect();
    format!(
        "{} frames (sequences {seqs:?}), events {events:?}",
        frames.len()
    )
}

impl Client {
    /// Reads one utterance up to and including its end marker (a final data frame also ends
    /// it). A close before the end is an error, as is waiting longer than `wait`; a
    /// `session_end` is an event like the others (the close that follows it ends collecting).
    pub async fn collect_utterance(&mut self, wait: Wait) -> Result<Utterance, Error> {
        self.collect_utterance_with(wait, |_| Ok(())).await
    }

    /// [`Client::collect_utterance`], showing every message to `inspect` as it arrives (to
    /// play audio as it comes, or to check each message's wire form); an error from
    /// `inspect` ends collecting with that error.
    pub async fn collect_utterance_with(
        &mut self,
        wait: Wait,
        mut inspect: impl FnMut(&Received) -> Result<(), Error>,
    ) -> Result<Utterance, Error> {
        let start = Deadline::now();
        let mut frames = Vec::new();
        let mut events = Vec::new();
        loop {
            let deadline = match wait {
                Wait::Total(d) => start + d,
                Wait::Silence(d) => Deadline::now() + d,
            };
            let r = match self.recv_wire(deadline).await {
                Ok(Some(r)) => r,
                Ok(None) => {
                    return Err(Error::Timeout(format!(
                        "utterance incomplete after {wait:?}: {}",
                        progress(&frames, &events)
                    )))
                }
                Err(Error::Closed(why)) => {
                    return Err(Error::Closed(Some(format!(
                        "{} during an utterance after {}",
                        why.as_deref().unwrap_or("closed"),
                        progress(&frames, &events)
                    ))))
                }
                Err(e) => return Err(e),
            };
            inspect(&r)?;
            match r.kind {
                Kind::Audio(a) => {
                    if a.is_end_marker() {
                        return Ok(Utterance {
                            frames,
                            end_sequence: a.sequence,
                            events,
                        });
                    }
                    frames.push(Frame {
                        sequence: a.sequence,
                        pcm: a.pcm()?,
                        at: r.at,
                    });
                    if a.is_final {
                        return Ok(Utterance {
                            frames,
                            end_sequence: a.sequence.wrapping_add(1),
                            events,
                        });
                    }
                }
                Kind::Event(e) => events.push(e),
                Kind::Close(c) => {
                    return Err(Error::Closed(Some(format!(
                        "close frame {c:?} during an utterance after {}",
                        progress(&frames, &events)
                    ))))
                }
            }
        }
    }
}
