//! Abuse limits: what one client may cost the process (docs/PROTOCOL.md §1.2 `RATE_LIMITED`).
//!
//! Each limit has a flag, a default a real deployment can live with, a metric and a clear
//! answer to the client; none drops anything silently. Per-session state (the token buckets)
//! is owned by the session; the per-IP count is the one piece shared across cores, touched
//! only at connect and disconnect.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Abuse-limit flags of `duplex serve` / `duplex demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct LimitArgs {
    /// Most utterances waiting behind the playing one; more text is refused with RATE_LIMITED.
    #[arg(long, default_value_t = 16, env = "DUPLEX_MAX_QUEUED_UTTERANCES")]
    pub max_queued_utterances: usize,
    /// Most bytes of text waiting behind the playing utterance (64 KiB ≈ an hour of speech).
    #[arg(long, default_value_t = 64 << 10, env = "DUPLEX_MAX_QUEUED_TEXT_BYTES")]
    pub max_queued_text_bytes: usize,
    /// Sustained client text messages per second per session (bursts of twice that pass);
    /// microphone audio is limited separately to twice real time.
    #[arg(long, default_value_t = 50.0, env = "DUPLEX_MAX_MESSAGES_PER_SEC")]
    pub max_messages_per_sec: f64,
    /// Sessions one client IP may hold at once (0 = no limit); more get HTTP 429. Behind a
    /// load balancer every client has the balancer's address: raise it or set 0 there.
    #[arg(long, default_value_t = 1000, env = "DUPLEX_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: usize,
    /// A connection must complete its HTTP request head within this many seconds of being
    /// accepted, whether it sends bytes or not.
    #[arg(long, default_value_t = 5.0, env = "DUPLEX_HEAD_TIMEOUT_SECS")]
    pub head_timeout_secs: f64,
    /// Most bytes queued for all clients of the process together; past it the client with the
    /// most unread audio is dropped first (close 1008 `slow_consumer`).
    #[arg(long, default_value_t = 512 << 20, env = "DUPLEX_MAX_QUEUED_OUTPUT_BYTES")]
    pub max_queued_output_bytes: usize,
}

impl Default for LimitArgs {
    fn default() -> Self {
        Self {
            max_queued_utterances: 16,
            max_queued_text_bytes: 64 << 10,
            max_messages_per_sec: 50.0,
            max_connections_per_ip: 1000,
            head_timeout_secs: 5.0,
            max_queued_output_bytes: 512 << 20,
        }
    }
}

/// Refused messages in a row after which the session is closed (1008): a client that keeps
/// sending at full speed after being told is not going to stop.
pub const REFUSALS_BEFORE_CLOSE: u32 = 100;

/// A token bucket: `rate` per second sustained, `burst` at once.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes `n` tokens if there are that many.
    pub fn take(&mut self, n: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

/// What a session's rate limiter says about one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    /// Refuse it with RATE_LIMITED.
    Refuse,
    /// Refuse it and close the session (1008).
    Close,
}

/// A session's message-rate limiter: text messages by count, microphone audio by bytes.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    messages: TokenBucket,
    audio: TokenBucket,
    refused: u32,
}

impl RateLimiter {
    /// `per_sec` text messages per second (bursts of 2×); audio at twice real time for
    /// 16-bit mono at `input_rate` (bursts of one second of it).
    pub fn new(per_sec: f64, input_rate: u32, now: Instant) -> Self {
        let per_sec = if per_sec.is_finite() && per_sec > 0.0 {
            per_sec
        } else {
            f64::MAX
        };
        let audio_rate = 2.0 * 2.0 * f64::from(input_rate);
        Self {
            messages: TokenBucket::new(per_sec, (2.0 * per_sec).max(1.0), now),
            audio: TokenBucket::new(audio_rate, audio_rate, now),
            refused: 0,
        }
    }

    /// A text message.
    pub fn text(&mut self, now: Instant) -> Verdict {
        let ok = self.messages.take(1.0, now);
        self.verdict(ok)
    }

    /// A microphone message of `bytes` bytes.
    pub fn audio(&mut self, bytes: usize, now: Instant) -> Verdict {
        let ok = self.audio.take(bytes as f64, now);
        self.verdict(ok)
    }

    fn verdict(&mut self, ok: bool) -> Verdict {
        if ok {
            self.refused = 0;
            return Verdict::Accept;
        }
        self.refused += 1;
        if self.refused > REFUSALS_BEFORE_CLOSE {
            Verdict::Close
        } else {
            Verdict::Refuse
        }
    }
}

/// Sessions per client IP, across cores.
#[derive(Debug, Default)]
pub struct PerIp {
    counts: Mutex<HashMap<IpAddr, usize>>,
}

/// A session's place in the per-IP count; released on drop.
#[derive(Debug)]
pub struct IpSlot {
    table: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    /// Takes a slot for `ip` unless it already holds `max` (0 = no limit).
    pub fn acquire(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<IpSlot> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if max > 0 && *n >= max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            table: self.clone(),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut counts = self.table.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// Raises the soft open-file limit to what `connections` sessions need (each is one socket;
/// a few hundred more for worker connections, Redis and the admin port). Returns the limit in
/// force; says at start when the hard limit is lower than needed.
pub fn raise_fd_limit(connections: usize) -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let needed = connections as u64 + 512;
    let mut lim = getrlimit(Resource::Nofile);
    let soft = lim.current.unwrap_or(u64::MAX);
    if soft >= needed {
        return soft;
    }
    let hard = lim.maximum.unwrap_or(u64::MAX);
    lim.current = Some(needed.min(hard));
    let granted = match setrlimit(Resource::Nofile, lim) {
        Ok(()) => needed.min(hard),
        Err(_) => soft,
    };
    if granted < needed {
        tracing::warn!(granted, needed,
            "open-file limit is below what --max-connections needs; connections beyond it are refused by the kernel");
    }
    granted
}

/// Seconds as a duration, with 0 or less meaning "no limit" for the head timeout's callers.
pub fn secs(v: f64) -> Duration {
    if v.is_finite() && v > 0.0 {
        Duration::from_secs_f64(v)
    } else {
        Duration::from_secs(5)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 20.0, t0);
        assert!((0..20).all(|_| b.take(1.0, t0)));
        assert!(!b.take(1.0, t0));
        assert!(b.take(1.0, t0 + Duration::from_millis(100)));
        assert!(!b.take(1.0, t0 + Duration::from_millis(100)));
    }

    #[test]
    fn persistent_flood_closes_after_refusals() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(50.0, 16_000, t0);
        let verdicts: Vec<_> = (0..300).map(|_| r.text(t0)).collect();
        assert_eq!(
            verdicts.iter().filter(|v| **v == Verdict::Accept).count(),
            100
        );
        assert_eq!(verdicts[100], Verdict::Refuse);
        assert_eq!(verdicts[199], Verdict::Refuse, "the 100th refusal");
        assert_eq!(verdicts[200], Verdict::Close);
        // Microphone audio at real time (640 bytes per 20 ms at 16 kHz) always passes.
        let mut r = RateLimiter::new(50.0, 16_000, t0);
        for i in 0..1000u64 {
            let t = t0 + Duration::from_millis(20 * i);
            assert_eq!(r.audio(640, t), Verdict::Accept);
        }
    }

    #[test]
    fn per_ip_slots_release_on_drop() {
        let table = Arc::new(PerIp::default());
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let a = table.acquire(ip, 2).unwrap();
        let _b = table.acquire(ip, 2).unwrap();
        assert!(table.acquire(ip, 2).is_none());
        assert!(table.acquire("10.0.0.2".parse().unwrap(), 2).is_some());
        drop(a);
        assert!(table.acquire(ip, 2).is_some());
        assert!(table.acquire(ip, 0).is_some(), "0 = no limit");
    }
}
