//! Reconnect delays for the registry's Redis clients.
//!
//! Both the worker's registration and the orchestrator's discovery must survive Redis going away
//! and come back by themselves. Retrying in a tight loop would burn the shared cores and hammer a
//! Redis that is restarting; waiting too long would leave a worker unregistered after Redis is
//! back. Exponential backoff from 100 ms capped at 2 s bounds both, and ±20 % jitter keeps a fleet
//! of workers from reconnecting in lock step.

use std::time::Duration;

/// First delay after a failure.
pub const INITIAL: Duration = Duration::from_millis(100);
/// Longest delay between attempts: how late, at worst, a returning Redis is noticed.
pub const CAP: Duration = Duration::from_secs(2);

/// Exponential backoff state: call [`Backoff::next_delay`] after each failure, [`Backoff::reset`]
/// after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Backoff {
    /// A fresh backoff whose first delay is [`INITIAL`].
    pub fn new() -> Self {
        Backoff { next: INITIAL }
    }

    /// The delay before the next attempt (jittered), doubling the base up to [`CAP`].
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(CAP);
        let jitter: f64 = rand::random_range(0.8..1.2);
        base.mul_f64(jitter).min(CAP)
    }

    /// Back to [`INITIAL`] after a success, so the next outage is retried quickly.
    pub fn reset(&mut self) {
        self.next = INITIAL;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_and_resets() {
        let mut b = Backoff::new();
        let first = b.next_delay();
        assert!(first >= INITIAL.mul_f64(0.8) && first <= INITIAL.mul_f64(1.2));
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        assert!(delays.iter().all(|d| *d <= CAP));
        assert!(delays[9] >= CAP.mul_f64(0.8), "{delays:?}");
        b.reset();
        assert!(b.next_delay() <= INITIAL.mul_f64(1.2));
    }
}
