//! One utterance as the client sees it: FAL, per-frame jitter, lateness, sequence integrity and
//! the end marker; plus [`Agg`], the sum of many utterances that a scenario reports.
//!
//! Why separate from the socket: the definitions in the report header live here, as plain
//! functions of (event, instant) that unit tests drive with synthetic timestamps.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;
use tokio::time::Instant as Deadline;

use super::client::{Conn, Event, EventKind};
use super::stats::{jitter_ns, Hist};

/// The frame period of the protocol (20 ms).
pub const PERIOD: Duration = Duration::from_millis(crate::audio::FRAME_MS as u64);

/// Frames the mock worker makes per text chunk (500 ms of audio).
pub const FRAMES_PER_CHUNK: u32 = 25;

/// How an utterance ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum End {
    /// The end marker arrived (its sequence was right or not).
    Marker {
        /// Whether the marker's sequence was last + 1.
        seq_ok: bool,
    },
    /// A data frame with `is_final` ended it (allowed for servers that do so).
    FinalFrame,
    /// Frames stopped for the end-gap time and no marker came (servers without end markers).
    Gap,
    /// Not a single frame arrived before the first-frame timeout.
    Timeout,
    /// The connection closed or the server ended the session.
    Closed,
}

/// Everything measured about one utterance.
#[derive(Clone, Debug)]
pub struct Tracker {
    /// When the (first) text chunk was handed to the kernel.
    pub sent_at: Instant,
    /// When the first audio frame's read returned.
    pub first_at: Option<Instant>,
    /// When the latest audio frame's read returned.
    pub last_at: Option<Instant>,
    /// Data frames received.
    pub frames: u32,
    /// Frames whose payload was not 1920 bytes.
    pub bad_size: u32,
    /// Frames skipped in the sequence (sum of gap sizes).
    pub missing: u32,
    /// Frames that repeated or went back in sequence.
    pub duplicates: u32,
    /// The sequence the next frame should carry.
    next_seq: i64,
    /// Jitter samples (ns), one per frame after the first.
    pub jitter_ns: Vec<u64>,
    /// Frames that arrived more than one period after their slot on the absolute schedule.
    pub late: u32,
    anchor: Option<(Instant, i64)>,
    /// `error` messages received (code: message).
    pub errors: Vec<String>,
    /// An `interrupted` event arrived.
    pub interrupted: bool,
    /// Messages that could not be parsed.
    pub invalid: Vec<String>,
    /// How it ended, once it has.
    pub end: Option<End>,
    /// When the event that ended it arrived (marker, final frame, close).
    pub end_at: Option<Instant>,
}

impl Tracker {
    /// Starts tracking an utterance whose text was sent at `sent_at`.
    pub fn new(sent_at: Instant) -> Self {
        Self {
            sent_at,
            first_at: None,
            last_at: None,
            frames: 0,
            bad_size: 0,
            missing: 0,
            duplicates: 0,
            next_seq: 1,
            jitter_ns: Vec::with_capacity(FRAMES_PER_CHUNK as usize),
            late: 0,
            anchor: None,
            errors: Vec::new(),
            interrupted: false,
            invalid: Vec::new(),
            end: None,
            end_at: None,
        }
    }

    /// First-audio latency: text sent → first frame received.
    pub fn fal(&self) -> Option<Duration> {
        self.first_at
            .map(|t| t.saturating_duration_since(self.sent_at))
    }

    /// Feeds one event; returns `true` once the utterance has ended.
    pub fn on_event(&mut self, ev: &Event) -> bool {
        match &ev.kind {
            EventKind::Audio {
                seq, size_ok, last, ..
            } => {
                self.on_frame(ev.at, *seq, *size_ok);
                if *last {
                    self.end = Some(End::FinalFrame);
                }
            }
            EventKind::End { seq } => {
                self.end = Some(End::Marker {
                    seq_ok: *seq == self.next_seq,
                });
            }
            EventKind::Error { code, message } => self.errors.push(format!("{code}: {message}")),
            EventKind::Interrupted { .. } => self.interrupted = true,
            EventKind::Invalid { reason } => self.invalid.push(reason.clone()),
            EventKind::SessionEnd { .. } | EventKind::Closed => self.end = Some(End::Closed),
            EventKind::SessionStart { .. } | EventKind::Other { .. } => {}
        }
        if self.end.is_some() && self.end_at.is_none() {
            self.end_at = Some(ev.at);
        }
        self.end.is_some()
    }

    /// Records one data frame arriving at `at`.
    pub fn on_frame(&mut self, at: Instant, seq: i64, size_ok: bool) {
        self.frames += 1;
        if !size_ok {
            self.bad_size += 1;
        }
        if seq < self.next_seq {
            // A repeat or a step back: not played twice, not part of the timing.
            self.duplicates += 1;
            return;
        }
        let consecutive = seq == self.next_seq;
        if !consecutive {
            self.missing += u32::try_from(seq - self.next_seq).unwrap_or(u32::MAX);
        }
        self.next_seq = seq + 1;
        match self.last_at {
            None => self.first_at = Some(at),
            Some(prev) if consecutive => {
                self.jitter_ns
                    .push(jitter_ns(at.saturating_duration_since(prev), PERIOD));
            }
            Some(_) => {}
        }
        self.last_at = Some(at);
        // Lateness against the utterance's absolute schedule, re-anchored after a late frame
        // (as the server does after an underrun).
        match self.anchor {
            None => self.anchor = Some((at, seq)),
            Some((t0, s0)) => {
                let slot = t0 + PERIOD * u32::try_from(seq - s0).unwrap_or(u32::MAX);
                if at > slot + PERIOD {
                    self.late += 1;
                    self.anchor = Some((at, seq));
                }
            }
        }
    }

    /// Marks the end for a server that sends no end marker (or never answered).
    pub fn finish_without_marker(&mut self) {
        if self.end.is_none() {
            self.end = Some(if self.frames > 0 {
                End::Gap
            } else {
                End::Timeout
            });
        }
    }
}

/// Waits of one utterance.
#[derive(Clone, Copy, Debug)]
pub struct Waits {
    /// Longest wait for the first frame.
    pub first_frame: Duration,
    /// Silence after a frame that ends an utterance without an end marker.
    pub end_gap: Duration,
    /// Longest an utterance may take in all (a server trickling frames forever can't hang us).
    pub max_total: Duration,
}

impl Waits {
    /// How long silence after a frame may last before the utterance counts as over: short for
    /// a server that has never sent an end marker here, long once it has (then it is a stall).
    pub fn silence(&self, conn: &Conn) -> Duration {
        if conn.seen_end_marker() {
            self.first_frame.max(self.end_gap)
        } else {
            self.end_gap
        }
    }
}

impl Default for Waits {
    fn default() -> Self {
        Self {
            first_frame: Duration::from_secs(10),
            end_gap: Duration::from_secs(2),
            max_total: Duration::from_secs(120),
        }
    }
}

/// Reads events into `t` until the utterance ends (marker, final frame, close, silence).
pub async fn receive(conn: &mut Conn, t: &mut Tracker, waits: Waits) -> Result<()> {
    while t.end.is_none() {
        let base = t.last_at.map_or((t.sent_at, waits.first_frame), |last| {
            (last, waits.silence(conn))
        });
        let deadline = Deadline::from_std((base.0 + base.1).min(t.sent_at + waits.max_total));
        match conn.next_event(deadline).await? {
            Some(ev) => {
                t.on_event(&ev);
            }
            None => t.finish_without_marker(),
        }
    }
    Ok(())
}

/// Sends `chunks` (all but the last with `is_final:false`) as one utterance and receives it.
pub async fn play(conn: &mut Conn, chunks: &[String], waits: Waits) -> Result<Tracker> {
    let mut sent_at = None;
    for (i, c) in chunks.iter().enumerate() {
        let t = conn.send_text(c, i + 1 == chunks.len()).await?;
        sent_at.get_or_insert(t);
    }
    let mut t = Tracker::new(sent_at.unwrap_or_else(Instant::now));
    receive(conn, &mut t, waits).await?;
    Ok(t)
}

/// The text chunks of an utterance of `n` mock chunks (25 frames each).
pub fn chunks(n: u32) -> Vec<String> {
    (0..n.max(1))
        .map(|i| format!("Benchmark sentence number {i}, spoken by the duplex load generator. "))
        .collect()
}

/// Many utterances summed: what a scenario reports and checks.
#[derive(Clone, Debug, Default)]
pub struct Agg {
    /// First-audio latency of every utterance that got a frame.
    pub fal: Hist,
    /// Jitter of every frame after an utterance's first.
    pub jitter: Hist,
    /// Utterances recorded.
    pub utterances: u64,
    /// Data frames received.
    pub frames: u64,
    /// Frames more than a period behind their slot.
    pub late: u64,
    /// Frames missing from sequences.
    pub missing: u64,
    /// Repeated / out-of-order frames.
    pub duplicates: u64,
    /// Frames of the wrong size.
    pub bad_size: u64,
    /// Utterances ended by an end marker.
    pub markers: u64,
    /// End markers whose sequence was not last + 1.
    pub marker_seq_wrong: u64,
    /// Utterances that ended by silence (no end marker).
    pub no_marker: u64,
    /// Utterances that never got a frame.
    pub timeouts: u64,
    /// Utterances cut by a closed connection.
    pub closed: u64,
    /// Utterances whose frame count differed from the expected one.
    pub wrong_count: u64,
    /// Frame counts seen (distinct values, for the consistency scenario).
    pub counts: Vec<u32>,
    /// `error` messages received.
    pub errors: u64,
    /// Unparseable messages received.
    pub invalid: u64,
    /// The first few problems, verbatim, for the report.
    pub samples: Vec<String>,
}

/// How many problem descriptions an [`Agg`] keeps.
const MAX_SAMPLES: usize = 5;

impl Agg {
    /// Adds one finished utterance; `expected` is its frame count if known.
    pub fn add(&mut self, t: &Tracker, expected: Option<u32>) {
        self.utterances += 1;
        if let Some(f) = t.fal() {
            self.fal.record(f);
        }
        for &j in &t.jitter_ns {
            self.jitter.record_ns(j);
        }
        self.frames += u64::from(t.frames);
        self.late += u64::from(t.late);
        self.missing += u64::from(t.missing);
        self.duplicates += u64::from(t.duplicates);
        self.bad_size += u64::from(t.bad_size);
        self.errors += t.errors.len() as u64;
        self.invalid += t.invalid.len() as u64;
        if !self.counts.contains(&t.frames) {
            self.counts.push(t.frames);
        }
        match t.end {
            Some(End::Marker { seq_ok }) => {
                self.markers += 1;
                if !seq_ok {
                    self.marker_seq_wrong += 1;
                    self.note(format!(
                        "end marker sequence is not last+1 after {} frames",
                        t.frames
                    ));
                }
            }
            Some(End::FinalFrame) => self.markers += 1,
            Some(End::Gap) => self.no_marker += 1,
            Some(End::Timeout) | None => {
                self.timeouts += 1;
                self.note("no audio frame before the timeout".to_string());
            }
            Some(End::Closed) => {
                self.closed += 1;
                self.note(format!("connection closed after {} frames", t.frames));
            }
        }
        if let Some(want) = expected {
            if t.frames != want && t.end != Some(End::Closed) {
                self.wrong_count += 1;
                self.note(format!(
                    "utterance had {} frames, expected {want}",
                    t.frames
                ));
            }
        }
        if t.missing > 0 || t.duplicates > 0 {
            self.note(format!(
                "sequence broken: {} missing, {} repeated",
                t.missing, t.duplicates
            ));
        }
        for e in t.errors.iter().chain(&t.invalid) {
            self.note(e.clone());
        }
    }

    /// Records a problem description (the first few are kept).
    pub fn note(&mut self, s: String) {
        if self.samples.len() < MAX_SAMPLES && !self.samples.contains(&s) {
            self.samples.push(s);
        }
    }

    /// Adds another aggregate (per-session results into the scenario's).
    pub fn merge(&mut self, o: &Agg) {
        self.fal.merge(&o.fal);
        self.jitter.merge(&o.jitter);
        self.utterances += o.utterances;
        self.frames += o.frames;
        self.late += o.late;
        self.missing += o.missing;
        self.duplicates += o.duplicates;
        self.bad_size += o.bad_size;
        self.markers += o.markers;
        self.marker_seq_wrong += o.marker_seq_wrong;
        self.no_marker += o.no_marker;
        self.timeouts += o.timeouts;
        self.closed += o.closed;
        self.wrong_count += o.wrong_count;
        for c in &o.counts {
            if !self.counts.contains(c) {
                self.counts.push(*c);
            }
        }
        self.errors += o.errors;
        self.invalid += o.invalid;
        for s in &o.samples {
            self.note(s.clone());
        }
    }

    /// Whether the target sends end markers at all (false only if none came and some
    /// utterances ended by silence instead).
    pub fn target_has_markers(&self) -> bool {
        !(self.markers == 0 && self.no_marker > 0)
    }

    /// Correctness problems (lost or repeated frames, bad sizes, missing markers, errors).
    ///
    /// `markers_required`: a missing end marker counts as a problem (our server; a foreign
    /// target that never sends markers reports "unsupported" instead).
    pub fn problems(&self, markers_required: bool) -> Vec<String> {
        let mut p = Vec::new();
        let mut push = |n: u64, what: &str| {
            if n > 0 {
                p.push(format!("{n} {what}"));
            }
        };
        push(self.missing, "frames missing from sequences");
        push(self.duplicates, "frames repeated or out of order");
        push(
            self.bad_size,
            "frames with a payload that is not 1920 bytes",
        );
        push(
            self.wrong_count,
            "utterances with the wrong number of frames",
        );
        push(self.timeouts, "utterances without any audio");
        push(self.closed, "utterances cut by a closed connection");
        push(self.marker_seq_wrong, "end markers with a wrong sequence");
        push(self.errors, "error messages from the server");
        push(self.invalid, "unparseable messages from the server");
        if markers_required || self.markers > 0 {
            push(self.no_marker, "utterances without an end marker");
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(at: Instant, seq: i64) -> Event {
        Event {
            at,
            kind: EventKind::Audio {
                seq,
                size_ok: true,
                last: false,
                binary: false,
            },
        }
    }

    #[test]
    fn perfect_schedule_has_zero_jitter_and_right_fal() {
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        for k in 0..25u32 {
            let at = t0 + Duration::from_millis(3) + PERIOD * k;
            assert!(!t.on_event(&frame(at, i64::from(k) + 1)));
        }
        assert!(t.on_event(&Event {
            at: t0 + Duration::from_millis(500),
            kind: EventKind::End { seq: 26 },
        }));
        assert_eq!(t.fal(), Some(Duration::from_millis(3)));
        assert_eq!(t.frames, 25);
        assert_eq!(t.jitter_ns.len(), 24);
        assert!(t.jitter_ns.iter().all(|&j| j == 0));
        assert_eq!(t.late, 0);
        assert_eq!(t.end, Some(End::Marker { seq_ok: true }));
        let mut a = Agg::default();
        a.add(&t, Some(25));
        assert!(a.problems(true).is_empty(), "{:?}", a.problems(true));
    }

    #[test]
    fn a_seven_ms_hiccup_gives_two_seven_ms_samples() {
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        for k in 0..10u32 {
            let mut at = t0 + PERIOD * k;
            if k == 5 {
                at += Duration::from_millis(7);
            }
            t.on_event(&frame(at, i64::from(k) + 1));
        }
        let big: Vec<u64> = t.jitter_ns.iter().copied().filter(|&j| j > 0).collect();
        assert_eq!(big, vec![7_000_000, 7_000_000]);
        assert_eq!(t.late, 0, "7 ms is within one period");
    }

    #[test]
    fn late_frames_reanchor() {
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        t.on_frame(t0, 1, true);
        t.on_frame(t0 + Duration::from_millis(65), 2, true); // slot 20, 45 ms late
        t.on_frame(t0 + Duration::from_millis(85), 3, true); // on the new schedule
        assert_eq!(t.late, 1);
    }

    #[test]
    fn gaps_and_duplicates_are_counted_and_skip_jitter() {
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        t.on_frame(t0, 1, true);
        t.on_frame(t0 + PERIOD, 2, true);
        t.on_frame(t0 + PERIOD * 3, 4, true); // 3 missing
        t.on_frame(t0 + PERIOD * 4, 4, true); // repeat
        t.on_frame(t0 + PERIOD * 5, 5, false);
        assert_eq!(
            (t.missing, t.duplicates, t.bad_size, t.frames),
            (1, 1, 1, 5)
        );
        assert_eq!(
            t.jitter_ns.len(),
            2,
            "1→2 and 4→5 count; the gap 2→4 and the repeat do not"
        );
        t.finish_without_marker();
        let mut a = Agg::default();
        a.add(&t, Some(5));
        let p = a.problems(true);
        assert!(p.iter().any(|s| s.contains("missing")), "{p:?}");
        assert!(p.iter().any(|s| s.contains("repeated")), "{p:?}");
        assert!(p.iter().any(|s| s.contains("1920")), "{p:?}");
        assert!(
            p.iter().any(|s| s.contains("without an end marker")),
            "{p:?}"
        );
    }

    #[test]
    fn burst_delivery_shows_as_full_period_jitter() {
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        for s in 1..=5 {
            t.on_frame(t0, s, true);
        }
        assert_eq!(t.jitter_ns, vec![20_000_000; 4]);
    }

    #[test]
    fn wrong_marker_sequence_and_missing_markers() {
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        t.on_frame(t0, 1, true);
        t.on_event(&Event {
            at: t0,
            kind: EventKind::End { seq: 5 },
        });
        let mut a = Agg::default();
        a.add(&t, Some(1));
        assert_eq!(a.marker_seq_wrong, 1);

        let mut t = Tracker::new(t0);
        t.on_frame(t0, 1, true);
        t.finish_without_marker();
        assert_eq!(t.end, Some(End::Gap));
        let mut b = Agg::default();
        b.add(&t, Some(1));
        assert!(!b.target_has_markers());
        assert!(b.problems(false).is_empty());
        assert!(!b.problems(true).is_empty());

        let mut t = Tracker::new(t0);
        t.finish_without_marker();
        assert_eq!(t.end, Some(End::Timeout));
    }
}
