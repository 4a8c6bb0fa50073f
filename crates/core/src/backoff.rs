//! Reconnect delays for the sources: exponential, capped, with jitter.
//!
//! The failure this exists for: when a database restarts, every gateway instance (and every
//! MongoDB feed inside one) loses its connection at the same instant; retrying on the same
//! schedule would hit the recovering server in synchronised waves. Each wait is therefore the
//! current step plus a random part of up to half of it.

use std::time::Duration;

/// The delay before each reconnect attempt: 100 ms, doubling up to 5 s, plus up to 50 % jitter;
/// [`Backoff::reset`] after a success.
///
/// ```
/// use changegate_core::backoff::Backoff;
/// let mut backoff = Backoff::default();
/// let first = backoff.next_wait();
/// assert!(first >= std::time::Duration::from_millis(100) && first <= std::time::Duration::from_millis(150));
/// ```
#[derive(Clone, Debug)]
pub struct Backoff {
    step: Duration,
    first: Duration,
    cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(5))
    }
}

impl Backoff {
    /// Steps from `first`, doubling up to `cap`.
    pub fn new(first: Duration, cap: Duration) -> Self {
        Self { step: first, first, cap: cap.max(first) }
    }

    /// How long to wait before the next attempt; the step after it doubles.
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.step + jitter(self.step / 2);
        self.step = (self.step * 2).min(self.cap);
        wait
    }

    /// After a success: the next failure starts from the first step again.
    pub fn reset(&mut self) {
        self.step = self.first;
    }
}

fn jitter(max: Duration) -> Duration {
    let mut bytes = [0u8; 2];
    // Without an OS random source the waits are merely unjittered, still correct.
    let _ = getrandom::fill(&mut bytes);
    max.mul_f64(f64::from(u16::from_le_bytes(bytes)) / f64::from(u16::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_cap_with_at_most_half_again_of_jitter_and_reset() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let steps = [100, 200, 400, 800, 800];
        for step in steps {
            let wait = backoff.next_wait();
            let step = Duration::from_millis(step);
            assert!(wait >= step && wait <= step + step / 2, "{wait:?} for step {step:?}");
        }
        backoff.reset();
        assert!(backoff.next_wait() <= Duration::from_millis(150));
    }
}
