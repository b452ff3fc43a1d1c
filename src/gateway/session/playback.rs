//! Playback of one session as a plain state machine: which utterance plays, which text waits,
//! the frames received and not yet sent, the 20 ms schedule, pause, stop and the end marker.
//!
//! No I/O, no runtime, no clock of its own: the session feeds it events (text, frames from
//! the worker, pacer wake-ups, commands, each with the instant it happened) and it answers
//! with what to do ([`Emit`]). That is what lets every transition be unit-tested without
//! sockets (see the tests below), and what keeps PAUSE/STOP immediate: frames wait here until
//! their slot, so a command read in this loop turn means nothing more leaves.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::audio::FRAME_MS;
use crate::protocol::Pacing;

/// Most frames buffered ahead of playback before the synthesis task stops reading the
/// worker's stream (10 s of audio). HTTP/2 flow control then holds the worker back, so a
/// worker far faster than real time, or one that ignores PAUSE, can't grow a session's memory
/// without bound.
pub const MAX_AHEAD_FRAMES: usize = 500;

/// Length of one frame's slot.
const FRAME: Duration = Duration::from_millis(FRAME_MS as u64);

/// How frames are scheduled (fixed for the session's life).
#[derive(Debug, Clone, Copy)]
pub struct PlaybackConfig {
    pub pacing: Pacing,
    /// Frames may leave this much before their slot (`--lead-ms`).
    pub lead: Duration,
    /// A wake-up also sends frames due within this much of now (the pacer's coalescing).
    pub coalesce: Duration,
    /// Most utterances waiting behind the current one.
    pub max_queued_utterances: usize,
    /// Most text bytes waiting behind the current one.
    pub max_queued_text_bytes: usize,
}

impl PlaybackConfig {
    /// Realtime or asap pacing with no lead, no coalescing and generous queue limits.
    pub fn with_pacing(pacing: Pacing) -> Self {
        Self {
            pacing,
            lead: Duration::ZERO,
            coalesce: Duration::ZERO,
            max_queued_utterances: 16,
            max_queued_text_bytes: 64 << 10,
        }
    }
}

/// Text waiting for the current utterance to finish (utterances of a session play in order).
#[derive(Debug, PartialEq, Eq)]
pub struct Pending {
    pub chunks: Vec<String>,
    /// The client closed the utterance (`is_final:true`).
    pub closed: bool,
    pub received: Instant,
}

/// The utterance being synthesized and played.
#[derive(Debug)]
struct Current {
    generation: u64,
    /// Frames received from the worker and not yet sent.
    frames: VecDeque<Bytes>,
    /// The worker ended the stream (`is_final` seen).
    worker_done: bool,
    /// The client has not sent `is_final:true` yet: more text chunks may come.
    text_open: bool,
    /// Frames sent to the client (the last sequence number used).
    sent: u32,
    /// Slot of frame `k` (0-based) is `anchor + k × 20 ms`.
    anchor: Option<Instant>,
    /// Pacer entry already waiting for this utterance.
    scheduled: Option<Instant>,
    /// How late the next frame to leave already is against the slot it had before the
    /// schedule re-anchored on it (an underrun). Re-anchoring makes that frame due "now", so
    /// without this its lateness would be measured as zero, and a gap the client heard (a
    /// stalled worker stream, a core busy with other work while frames waited in the socket)
    /// would never reach the lateness histogram.
    late_before_reanchor: Option<Duration>,
    received: Instant,
}

impl Current {
    fn due(&self, lead: Duration) -> Option<Instant> {
        self.anchor
            .map(|a| (a + FRAME * self.sent).checked_sub(lead).unwrap_or(a))
    }
}

/// What the session must do, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Emit {
    /// Send audio frame `sequence`.
    Frame { sequence: u32, pcm: Bytes },
    /// Send the end marker of the utterance (`sequence` = last frame + 1).
    EndMarker { sequence: u32 },
    /// Ask the pacer for a wake-up at `due` for utterance `generation`.
    Schedule { due: Instant, generation: u64 },
    /// The next frame leaves this long after its slot (measured against its slot before any
    /// re-anchoring); the session adds the wait for the writer and records it in the
    /// lateness histogram.
    Late(Duration),
    /// The first frame of an utterance left, this long after its text arrived.
    FirstAudio(Duration),
    /// The queue fell below [`MAX_AHEAD_FRAMES`]: the synthesis task may read again.
    Drained,
}

/// Where a text chunk went.
#[derive(Debug, PartialEq, Eq)]
pub enum TextRoute {
    /// Belongs to the playing utterance `generation`: forward the text to the worker.
    Current(u64, String),
    /// Queued behind the playing one.
    Queued,
    /// Nothing plays: start this utterance now (see [`Playback::start`]).
    Start(Pending),
    /// Queueing it would pass a queue limit: refused, nothing queued.
    Refused,
}

/// A cut-short utterance: how many frames of it left (its end marker is `sent + 1`).
#[derive(Debug, PartialEq, Eq)]
pub struct Cut {
    pub generation: u64,
    pub sent: u32,
}

/// One session's playback.
#[derive(Debug)]
pub struct Playback {
    config: PlaybackConfig,
    paused: bool,
    pending: VecDeque<Pending>,
    /// Text bytes in `pending`.
    pending_bytes: usize,
    current: Option<Current>,
    next_generation: u64,
    closed: bool,
}

impl Playback {
    pub fn new(config: PlaybackConfig) -> Self {
        Self {
            config,
            paused: false,
            pending: VecDeque::new(),
            pending_bytes: 0,
            current: None,
            next_generation: 0,
            closed: false,
        }
    }

    /// True while an utterance plays or waits (the idle timeout does not run then).
    pub fn busy(&self) -> bool {
        self.current.is_some() || !self.pending.is_empty()
    }

    /// True when an utterance is current and not paused (what a barge-in interrupts).
    pub fn playing(&self) -> bool {
        self.current.is_some() && !self.paused
    }

    /// True after PAUSE until RESUME or STOP.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Frames of the current utterance sent so far (0 when none plays).
    pub fn sent(&self) -> u32 {
        self.current.as_ref().map_or(0, |u| u.sent)
    }

    /// Utterances queued behind the current one, and their text bytes.
    pub fn queued(&self) -> (usize, usize) {
        (self.pending.len(), self.pending_bytes)
    }

    /// A text chunk from the client.
    pub fn on_text(&mut self, text: String, is_final: bool, now: Instant) -> TextRoute {
        if let Some(u) = self.current.as_mut().filter(|u| u.text_open) {
            u.text_open = !is_final;
            return TextRoute::Current(u.generation, text);
        }
        if self.busy() {
            let appends = self.pending.back().is_some_and(|p| !p.closed);
            let utterances = self.pending.len() + usize::from(!appends);
            if utterances > self.config.max_queued_utterances
                || self.pending_bytes + text.len() > self.config.max_queued_text_bytes
            {
                return TextRoute::Refused;
            }
            self.pending_bytes += text.len();
            match self.pending.back_mut() {
                Some(p) if !p.closed => {
                    p.chunks.push(text);
                    p.closed = is_final;
                }
                _ => self.pending.push_back(Pending {
                    chunks: vec![text],
                    closed: is_final,
                    received: now,
                }),
            }
            return TextRoute::Queued;
        }
        TextRoute::Start(Pending {
            chunks: vec![text],
            closed: is_final,
            received: now,
        })
    }

    /// Makes `pending` the current utterance. Returns its generation and its chunks with
    /// their `is_final` flags (to send to the worker), or `None` once closed.
    pub fn start(&mut self, pending: Pending) -> Option<(u64, Vec<(String, bool)>)> {
        if self.closed {
            return None;
        }
        let generation = self.next_generation;
        self.next_generation += 1;
        let n = pending.chunks.len();
        let chunks = pending
            .chunks
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, pending.closed && i + 1 == n))
            .collect();
        self.current = Some(Current {
            generation,
            frames: VecDeque::new(),
            worker_done: false,
            text_open: !pending.closed,
            sent: 0,
            anchor: None,
            scheduled: None,
            late_before_reanchor: None,
            received: pending.received,
        });
        Some((generation, chunks))
    }

    /// The next queued utterance, once the current one is over.
    pub fn next_pending(&mut self) -> Option<Pending> {
        if self.current.is_some() {
            return None;
        }
        let next = self.pending.pop_front()?;
        let bytes: usize = next.chunks.iter().map(String::len).sum();
        self.pending_bytes = self.pending_bytes.saturating_sub(bytes);
        Some(next)
    }

    /// Frames of utterance `generation` waiting to be played.
    pub fn frames_ahead(&self, generation: u64) -> usize {
        self.current
            .as_ref()
            .filter(|u| u.generation == generation)
            .map_or(0, |u| u.frames.len())
    }

    /// A frame from the worker. Returns `Some(underrun)` when it belongs to the current
    /// utterance; `underrun` is true when it arrived more than 1 ms after its slot (the
    /// schedule re-anchors so the lateness doesn't bunch the next frames together).
    pub fn on_frame(&mut self, generation: u64, pcm: Bytes, now: Instant) -> Option<bool> {
        let paused = self.paused;
        let realtime = self.config.pacing == Pacing::Realtime;
        let u = self
            .current
            .as_mut()
            .filter(|u| u.generation == generation)?;
        let was_empty = u.frames.is_empty();
        u.frames.push_back(pcm);
        let mut underrun = false;
        if realtime && was_empty && !paused {
            // Late means after the frame's own slot; `--lead-ms` only lets frames go early.
            if let Some(due) = u.due(Duration::ZERO) {
                if now > due {
                    u.anchor = Some(now.checked_sub(FRAME * u.sent).unwrap_or(now));
                    underrun = now - due > Duration::from_millis(1);
                    if u.sent > 0 {
                        u.late_before_reanchor = Some(now - due);
                    }
                }
            }
        }
        Some(underrun)
    }

    /// The worker ended utterance `generation`'s stream.
    pub fn on_worker_done(&mut self, generation: u64) -> bool {
        match self.current.as_mut().filter(|u| u.generation == generation) {
            Some(u) => {
                u.worker_done = true;
                true
            }
            None => false,
        }
    }

    /// A pacer wake-up: true when it is for the current utterance (then [`Self::pump`]).
    pub fn on_timer(&mut self, generation: u64) -> bool {
        match self.current.as_mut() {
            Some(u) if u.generation == generation => {
                u.scheduled = None;
                true
            }
            _ => false,
        }
    }

    /// PAUSE: nothing more leaves. Returns true when an utterance is current (tell the worker).
    pub fn pause(&mut self) -> bool {
        self.paused = true;
        self.current.is_some()
    }

    /// RESUME: the next frame's slot is `now`, nothing skipped or bunched. `None` when not
    /// paused; else whether an utterance is current.
    pub fn resume(&mut self, now: Instant) -> Option<bool> {
        if !self.paused {
            return None;
        }
        self.paused = false;
        Some(match self.current.as_mut() {
            Some(u) => {
                if u.anchor.is_some() {
                    u.anchor = Some(now.checked_sub(FRAME * u.sent).unwrap_or(now));
                }
                // Time spent paused is the client's choice, not lateness.
                u.late_before_reanchor = None;
                u.scheduled = None;
                true
            }
            None => false,
        })
    }

    /// STOP: the current utterance ends now, queued ones are dropped, pause is lifted.
    pub fn stop(&mut self) -> Option<Cut> {
        self.paused = false;
        self.pending.clear();
        self.pending_bytes = 0;
        self.current.take().map(|u| Cut {
            generation: u.generation,
            sent: u.sent,
        })
    }

    /// Utterance `generation` failed: it ends (queued ones still play).
    pub fn fail(&mut self, generation: u64) -> Option<Cut> {
        if self.current.as_ref().map(|u| u.generation) != Some(generation) {
            return None;
        }
        self.current.take().map(|u| Cut {
            generation: u.generation,
            sent: u.sent,
        })
    }

    /// The connection ended: drop everything. Returns the cut utterance, if any.
    pub fn close(&mut self) -> Option<Cut> {
        self.closed = true;
        self.pending.clear();
        self.pending_bytes = 0;
        self.current.take().map(|u| Cut {
            generation: u.generation,
            sent: u.sent,
        })
    }

    /// True once [`Self::close`] ran.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Sends every frame due at `now` through `emit`. Returns true when the utterance just
    /// finished (its end marker was emitted; start the next with [`Self::next_pending`]).
    pub fn pump(&mut self, now: Instant, emit: &mut impl FnMut(Emit)) -> bool {
        if self.paused || self.closed {
            return false;
        }
        let Some(u) = self.current.as_mut() else {
            return false;
        };
        let realtime = self.config.pacing == Pacing::Realtime;
        while !u.frames.is_empty() {
            if realtime {
                match u.due(self.config.lead) {
                    None => u.anchor = Some(now),
                    Some(due) if due > now + self.config.coalesce => {
                        if u.scheduled.is_none_or(|s| due < s) {
                            u.scheduled = Some(due);
                            emit(Emit::Schedule {
                                due,
                                generation: u.generation,
                            });
                        }
                        break;
                    }
                    Some(due) => {
                        if u.sent > 0 {
                            // Lateness against the slot the frame had before any re-anchor,
                            // plus any wait since (the pacer's own delay).
                            let reanchored = u.late_before_reanchor.take().unwrap_or_default();
                            emit(Emit::Late(reanchored + now.saturating_duration_since(due)));
                        }
                    }
                }
            }
            let Some(pcm) = u.frames.pop_front() else {
                break;
            };
            if u.frames.len() + 1 == MAX_AHEAD_FRAMES {
                emit(Emit::Drained);
            }
            u.sent += 1;
            emit(Emit::Frame {
                sequence: u.sent,
                pcm,
            });
            if u.sent == 1 {
                emit(Emit::FirstAudio(now.saturating_duration_since(u.received)));
            }
        }
        if u.frames.is_empty() && u.worker_done {
            // Everything the worker made has been sent. (If the client still had text open,
            // the worker ended first; the client's later chunks start a new utterance.)
            let sequence = u.sent + 1;
            self.current = None;
            emit(Emit::EndMarker { sequence });
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn realtime() -> Playback {
        Playback::new(PlaybackConfig {
            coalesce: Duration::from_micros(500),
            ..PlaybackConfig::with_pacing(Pacing::Realtime)
        })
    }

    fn pcm(i: u8) -> Bytes {
        Bytes::from(vec![i; 4])
    }

    /// Starts utterance "hi" at `t0`.
    fn started(p: &mut Playback, t0: Instant) -> u64 {
        let TextRoute::Start(pending) = p.on_text("hi".into(), true, t0) else {
            panic!("nothing was playing");
        };
        let (generation, chunks) = p.start(pending).unwrap();
        assert_eq!(chunks, vec![("hi".to_string(), true)]);
        generation
    }

    fn pump(p: &mut Playback, now: Instant) -> (Vec<Emit>, bool) {
        let mut out = Vec::new();
        let done = p.pump(now, &mut |e| out.push(e));
        (out, done)
    }

    fn frames(emits: &[Emit]) -> Vec<u32> {
        emits
            .iter()
            .filter_map(|e| match e {
                Emit::Frame { sequence, .. } => Some(*sequence),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn frames_follow_an_absolute_schedule_then_the_end_marker() {
        let t0 = Instant::now();
        let mut p = realtime();
        let g = started(&mut p, t0);
        for i in 0..3 {
            p.on_frame(g, pcm(i), t0 + MS).unwrap();
        }
        p.on_worker_done(g);
        // First frame leaves at once; the second is due 20 ms later.
        let (out, done) = pump(&mut p, t0 + MS);
        assert_eq!(frames(&out), vec![1]);
        assert!(out.contains(&Emit::FirstAudio(MS)));
        assert!(out.contains(&Emit::Schedule {
            due: t0 + 21 * MS,
            generation: g
        }));
        assert!(!done);
        // A wake-up 0.3 ms early still sends it (coalescing), not the third.
        assert!(p.on_timer(g));
        let (out, _) = pump(&mut p, t0 + 21 * MS - Duration::from_micros(300));
        assert_eq!(frames(&out), vec![2]);
        let (out, done) = pump(&mut p, t0 + 41 * MS);
        assert_eq!(frames(&out), vec![3]);
        assert!(out.contains(&Emit::EndMarker { sequence: 4 }));
        assert!(done);
        assert!(!p.busy());
    }

    #[test]
    fn pause_holds_everything_and_resume_reanchors_without_loss() {
        let t0 = Instant::now();
        let mut p = realtime();
        let g = started(&mut p, t0);
        for i in 0..3 {
            p.on_frame(g, pcm(i), t0).unwrap();
        }
        assert_eq!(frames(&pump(&mut p, t0).0), vec![1]);
        assert!(p.pause());
        assert!(!p.playing());
        // Long after every slot: still nothing while paused.
        assert!(pump(&mut p, t0 + 1000 * MS).0.is_empty());
        assert_eq!(p.resume(t0 + 1000 * MS), Some(true));
        assert_eq!(p.resume(t0 + 1000 * MS), None, "a second RESUME is a no-op");
        // The next frame's slot is the resume instant: one frame now, not a burst.
        assert_eq!(frames(&pump(&mut p, t0 + 1000 * MS).0), vec![2]);
        assert_eq!(frames(&pump(&mut p, t0 + 1020 * MS).0), vec![3]);
    }

    #[test]
    fn stop_cuts_the_utterance_and_drops_the_queue() {
        let t0 = Instant::now();
        let mut p = realtime();
        let g = started(&mut p, t0);
        assert_eq!(p.on_text("next".into(), true, t0), TextRoute::Queued);
        assert_eq!(p.queued(), (1, 4));
        p.on_frame(g, pcm(0), t0).unwrap();
        pump(&mut p, t0);
        p.pause();
        assert_eq!(
            p.stop(),
            Some(Cut {
                generation: g,
                sent: 1
            })
        );
        assert!(!p.busy());
        assert_eq!(p.next_pending().map(|x| x.chunks), None);
        // Frames of the stopped utterance that arrive late are ignored.
        assert_eq!(p.on_frame(g, pcm(1), t0), None);
        // Pause was lifted: new text starts and plays.
        let g2 = started(&mut p, t0);
        assert_ne!(g, g2);
        p.on_frame(g2, pcm(2), t0).unwrap();
        assert_eq!(frames(&pump(&mut p, t0).0), vec![1]);
    }

    #[test]
    fn streamed_text_appends_until_final_then_queues() {
        let t0 = Instant::now();
        let mut p = realtime();
        let TextRoute::Start(pending) = p.on_text("a".into(), false, t0) else {
            panic!()
        };
        let (g, chunks) = p.start(pending).unwrap();
        assert_eq!(chunks, vec![("a".to_string(), false)]);
        assert_eq!(
            p.on_text("b".into(), false, t0),
            TextRoute::Current(g, "b".into())
        );
        assert_eq!(
            p.on_text("c".into(), true, t0),
            TextRoute::Current(g, "c".into())
        );
        assert_eq!(p.on_text("d".into(), false, t0), TextRoute::Queued);
        assert_eq!(p.on_text("e".into(), true, t0), TextRoute::Queued);
        assert_eq!(p.queued(), (1, 2), "d and e are one utterance");
        p.on_worker_done(g);
        assert!(pump(&mut p, t0).1);
        let next = p.next_pending().unwrap();
        assert_eq!(next.chunks, vec!["d", "e"]);
        assert!(next.closed);
    }

    #[test]
    fn a_late_frame_is_sent_at_once_counted_and_reanchors() {
        let t0 = Instant::now();
        let mut p = realtime();
        let g = started(&mut p, t0);
        p.on_frame(g, pcm(0), t0).unwrap();
        pump(&mut p, t0);
        // Frame 2 was due at t0 + 20 ms; it arrives at t0 + 50 ms.
        assert_eq!(p.on_frame(g, pcm(1), t0 + 50 * MS), Some(true));
        let (out, _) = pump(&mut p, t0 + 50 * MS);
        assert_eq!(frames(&out), vec![2]);
        // Re-anchored: frame 3 is due 20 ms after frame 2 left, not at once.
        p.on_frame(g, pcm(2), t0 + 51 * MS).unwrap();
        let (out, _) = pump(&mut p, t0 + 51 * MS);
        assert!(frames(&out).is_empty());
        assert!(out.contains(&Emit::Schedule {
            due: t0 + 70 * MS,
            generation: g
        }));
    }

    #[test]
    fn a_reanchored_frame_still_reports_how_late_it_left() {
        // The gap a client hears when a frame comes 75 ms after its slot (a stalled worker
        // stream, or a core busy closing thousands of sessions while the frame waited in the
        // socket) must reach the lateness histogram, although the schedule re-anchors on it.
        let t0 = Instant::now();
        let mut p = realtime();
        let g = started(&mut p, t0);
        p.on_frame(g, pcm(0), t0).unwrap();
        pump(&mut p, t0);
        // Frame 2's slot was t0 + 20 ms; it arrives (and leaves) at t0 + 95 ms.
        assert_eq!(p.on_frame(g, pcm(1), t0 + 95 * MS), Some(true));
        let (out, _) = pump(&mut p, t0 + 95 * MS);
        assert_eq!(frames(&out), vec![2]);
        assert!(
            out.contains(&Emit::Late(75 * MS)),
            "lateness against the original slot: {out:?}"
        );
        // Frame 3 keeps the new schedule (due t0 + 115 ms) and is on time: no lateness left
        // over from the re-anchor.
        p.on_frame(g, pcm(2), t0 + 96 * MS).unwrap();
        let (out, _) = pump(&mut p, t0 + 115 * MS);
        assert_eq!(frames(&out), vec![3]);
        assert!(out.contains(&Emit::Late(Duration::ZERO)), "{out:?}");
        // A pause is not lateness: frames held by PAUSE report none after RESUME.
        p.pause();
        p.on_frame(g, pcm(3), t0 + 200 * MS).unwrap();
        p.resume(t0 + 900 * MS);
        let (out, _) = pump(&mut p, t0 + 900 * MS);
        assert_eq!(frames(&out), vec![4]);
        assert!(out.contains(&Emit::Late(Duration::ZERO)), "{out:?}");
    }

    #[test]
    fn asap_forwards_everything_and_failures_end_the_utterance() {
        let t0 = Instant::now();
        let mut p = Playback::new(PlaybackConfig::with_pacing(Pacing::Asap));
        let g = started(&mut p, t0);
        for i in 0..5 {
            p.on_frame(g, pcm(i), t0).unwrap();
        }
        assert_eq!(frames(&pump(&mut p, t0).0), vec![1, 2, 3, 4, 5]);
        assert_eq!(p.fail(g + 1), None, "a stale failure changes nothing");
        assert_eq!(
            p.fail(g),
            Some(Cut {
                generation: g,
                sent: 5
            })
        );
        assert!(!p.busy());
    }

    #[test]
    fn the_read_ahead_bound_signals_when_it_drains() {
        let t0 = Instant::now();
        let mut p = Playback::new(PlaybackConfig::with_pacing(Pacing::Asap));
        let g = started(&mut p, t0);
        p.pause();
        for _ in 0..MAX_AHEAD_FRAMES {
            p.on_frame(g, pcm(0), t0).unwrap();
        }
        assert_eq!(p.frames_ahead(g), MAX_AHEAD_FRAMES);
        p.resume(t0);
        let (out, _) = pump(&mut p, t0);
        assert_eq!(out.iter().filter(|e| **e == Emit::Drained).count(), 1);
    }

    #[test]
    fn queue_limits_refuse_without_queueing() {
        let t0 = Instant::now();
        let mut p = Playback::new(PlaybackConfig {
            max_queued_utterances: 2,
            max_queued_text_bytes: 10,
            ..PlaybackConfig::with_pacing(Pacing::Realtime)
        });
        started(&mut p, t0);
        assert_eq!(p.on_text("aaaa".into(), true, t0), TextRoute::Queued);
        assert_eq!(p.on_text("bbbb".into(), false, t0), TextRoute::Queued);
        // A third utterance is one too many; appending to the open one is not.
        assert_eq!(p.on_text("cc".into(), false, t0), TextRoute::Queued);
        assert_eq!(p.queued(), (2, 10));
        assert_eq!(p.on_text("d".into(), true, t0), TextRoute::Refused, "bytes");
        assert_eq!(p.queued(), (2, 10), "nothing of a refused text is queued");
        p.stop();
        assert_eq!(p.queued(), (0, 0));
        started(&mut p, t0);
        assert_eq!(p.on_text("x".into(), true, t0), TextRoute::Queued);
        assert_eq!(p.on_text("y".into(), true, t0), TextRoute::Queued);
        assert_eq!(
            p.on_text("z".into(), true, t0),
            TextRoute::Refused,
            "utterances"
        );
        p.fail(0);
        p.fail(1);
        assert_eq!(
            p.next_pending().map(|n| n.chunks),
            Some(vec!["x".to_string()])
        );
        assert_eq!(p.queued(), (1, 1));
    }

    #[test]
    fn nothing_starts_after_close() {
        let t0 = Instant::now();
        let mut p = realtime();
        started(&mut p, t0);
        assert!(p.close().is_some());
        assert!(p.is_closed());
        let TextRoute::Start(pending) = p.on_text("x".into(), true, t0) else {
            panic!()
        };
        assert!(p.start(pending).is_none());
    }
}
