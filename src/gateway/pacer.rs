//! The per-core pacing clock.
//!
//! One `timerfd` per core, armed for the earliest due frame among all of the core's sessions.
//! tokio's timer wheel has 1 ms granularity and fires up to ~1 ms late, which alone would
//! break a sub-millisecond jitter budget; a timerfd with the thread's timer slack lowered to
//! 1 ns wakes within tens of microseconds. One timer per core (instead of one per session)
//! means a single wake-up serves every session whose frame is due, so the cost of pacing
//! stays flat as sessions grow.

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use rustix::time::{
    timerfd_create, timerfd_settime, Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags,
    Timespec,
};
use tokio::io::unix::AsyncFd;

/// A scheduled wake-up for one session: `(due, session key, utterance generation)`.
pub type Entry = (Instant, usize, u64);

/// Default coalescing window: a wake-up also sends frames due within this much of now, so
/// sessions whose slots are close share one wake-up (fewer context switches per frame at
/// hundreds of sessions) at the price of sending those frames at most this early. A lone
/// session is unaffected: its own wake-ups are armed for its exact slots.
pub const DEFAULT_COALESCE: Duration = Duration::from_micros(500);

/// Per-core timer driving every session's frame schedule.
pub struct Pacer {
    fd: AsyncFd<OwnedFd>,
    coalesce: Duration,
    heap: RefCell<BinaryHeap<Reverse<Entry>>>,
    armed: Cell<Option<Instant>>,
}

impl Pacer {
    /// Creates the timer and lowers this thread's timer slack (call on the core's thread).
    /// `coalesce`: see [`DEFAULT_COALESCE`].
    pub fn new(coalesce: Duration) -> io::Result<Self> {
        // Timer slack 1 ns: the kernel may otherwise defer the wake-up by 50 µs to group it
        // with others. Failing to lower it costs precision, not correctness.
        let _ = rustix::thread::set_current_timer_slack(std::num::NonZeroU64::new(1));
        let owned = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )?;
        // SAFETY: `OwnedFd` keeps the timerfd open and unchanged for the AsyncFd's lifetime.
        let fd = unsafe { AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Self {
            fd,
            coalesce,
            heap: RefCell::new(BinaryHeap::new()),
            armed: Cell::new(None),
        })
    }

    /// Asks for `on_due(key, generation)` to run at `at`.
    pub fn schedule(&self, at: Instant, key: usize, generation: u64) {
        self.heap.borrow_mut().push(Reverse((at, key, generation)));
        if self.armed.get().is_none_or(|armed| at < armed) {
            self.arm(at);
        }
    }

    fn arm(&self, at: Instant) {
        // A zero it_value disarms a timerfd, so "already due" becomes 1 ns.
        let delay = at
            .saturating_duration_since(Instant::now())
            .max(Duration::from_nanos(1));
        let spec = Itimerspec {
            it_interval: Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: Timespec {
                tv_sec: delay.as_secs() as _,
                tv_nsec: delay.subsec_nanos() as _,
            },
        };
        match timerfd_settime(self.fd.get_ref(), TimerfdTimerFlags::empty(), &spec) {
            Ok(_) => self.armed.set(Some(at)),
            Err(e) => tracing::error!(error = %e, "timerfd_settime failed"),
        }
    }

    /// The coalescing window: frames due within it count as due now.
    pub fn coalesce(&self) -> Duration {
        self.coalesce
    }

    /// Waits for the timer, then returns every entry due by now (plus the coalescing window) and
    /// re-arms for the next one. Entries are returned in due order.
    pub async fn next_due(&self, out: &mut Vec<Entry>) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut buf = [0u8; 8];
            match rustix::io::read(self.fd.get_ref(), &mut buf) {
                Ok(_) => {}
                Err(rustix::io::Errno::AGAIN) => {
                    guard.clear_ready();
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            self.armed.set(None);
            let horizon = Instant::now() + self.coalesce;
            let mut heap = self.heap.borrow_mut();
            while let Some(Reverse(entry)) = heap.peek() {
                if entry.0 > horizon {
                    break;
                }
                out.push(*entry);
                heap.pop();
            }
            let next = heap.peek().map(|Reverse(e)| e.0);
            drop(heap);
            if let Some(next) = next {
                self.arm(next);
            }
            if !out.is_empty() {
                return Ok(());
            }
        }
    }

    /// Entries waiting (for metrics and tests).
    pub fn pending(&self) -> usize {
        self.heap.borrow().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_in_due_order_and_not_early() {
        tokio_uring::start(async {
            let pacer = Pacer::new(DEFAULT_COALESCE).unwrap();
            let t0 = Instant::now();
            pacer.schedule(t0 + Duration::from_millis(30), 2, 0);
            pacer.schedule(t0 + Duration::from_millis(10), 1, 0);
            pacer.schedule(t0 + Duration::from_millis(10), 3, 7);
            let mut out = Vec::new();
            pacer.next_due(&mut out).await.unwrap();
            assert_eq!(out.iter().map(|e| e.1).collect::<Vec<_>>(), vec![1, 3]);
            assert!(Instant::now() + DEFAULT_COALESCE >= t0 + Duration::from_millis(10));
            out.clear();
            pacer.next_due(&mut out).await.unwrap();
            assert_eq!(out[0].1, 2);
            assert!(Instant::now() + DEFAULT_COALESCE >= t0 + Duration::from_millis(30));
            assert_eq!(pacer.pending(), 0);
        });
    }

    #[test]
    fn an_earlier_entry_rearms_the_timer() {
        tokio_uring::start(async {
            let pacer = Pacer::new(DEFAULT_COALESCE).unwrap();
            let t0 = Instant::now();
            pacer.schedule(t0 + Duration::from_secs(5), 1, 0);
            pacer.schedule(t0 + Duration::from_millis(5), 2, 0);
            let mut out = Vec::new();
            let r = tokio::time::timeout(Duration::from_secs(2), pacer.next_due(&mut out)).await;
            assert!(r.is_ok(), "the 5 ms entry must not wait for the 5 s one");
            assert_eq!(out[0].1, 2);
        });
    }
}
