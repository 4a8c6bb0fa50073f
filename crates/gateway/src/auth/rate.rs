//! Per-key request budgets (token buckets), for routes a single caller could otherwise flood.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// A token bucket per key: `rate` evaluations per second on average, `burst` at once. OFREP's
/// server-side providers do not cache — every flag read is a request — so the defaults
/// (`--ofrep-rate-limit 5000`, `--ofrep-burst 10000`) let one application evaluate thousands of
/// flags a second; abuse still gets `429` with `Retry-After`.
///
/// The table cannot grow without bound: a bucket idle long enough to have refilled is the same
/// as no bucket, so such entries are evicted whenever the table has doubled since the last sweep.
#[derive(Clone, Debug, Default)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Arc<Mutex<Buckets>>,
}

#[derive(Debug, Default)]
struct Buckets {
    by_key: HashMap<String, (f64, Instant)>,
    /// Table size after the last sweep: the next one comes when it has doubled.
    swept_at: usize,
}

/// Fewest entries before the table is swept at all.
const SWEEP_FLOOR: usize = 1024;

impl RateLimiter {
    /// A limiter allowing `rate` requests per second per key with bursts of `burst` (`rate` 0:
    /// unlimited; `burst` is at least 1).
    pub fn new(rate: u32, burst: u32) -> Self {
        Self { rate: f64::from(rate), burst: f64::from(burst.max(1)), buckets: Arc::default() }
    }

    /// `Ok` if `who` may make a request now; otherwise how long until it may.
    pub fn check(&self, who: &str) -> Result<(), Duration> {
        self.check_at(who, Instant::now())
    }

    fn check_at(&self, who: &str, now: Instant) -> Result<(), Duration> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.by_key.len() >= (buckets.swept_at * 2).max(SWEEP_FLOOR) {
            let refill = Duration::from_secs_f64(self.burst / self.rate);
            buckets.by_key.retain(|_, (_, at)| now.saturating_duration_since(*at) < refill);
            buckets.swept_at = buckets.by_key.len();
        }
        let (tokens, at) = buckets.by_key.entry(who.to_owned()).or_insert((self.burst, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.rate))
        }
    }

    /// How many keys have a bucket (a gauge for operators; bounded by eviction).
    pub fn tracked(&self) -> usize {
        self.buckets.lock().unwrap_or_else(PoisonError::into_inner).by_key.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_gets_its_burst_then_its_rate_then_429_with_the_wait() {
        let limiter = RateLimiter::new(10, 50);
        let start = Instant::now();
        assert!((0..50).all(|_| limiter.check_at("k", start).is_ok()));
        let wait = limiter.check_at("k", start).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100), "{wait:?}");
        // A second later: ten more, not fifty.
        let later = start + Duration::from_secs(1);
        assert_eq!((0..50).filter(|_| limiter.check_at("k", later).is_ok()).count(), 10);
        // Another key has its own bucket.
        assert!(limiter.check_at("other", later).is_ok());
    }

    #[test]
    fn idle_keys_are_evicted_so_the_table_stays_bounded() {
        let limiter = RateLimiter::new(100, 100);
        let mut now = Instant::now();
        for i in 0..100_000 {
            // One new key every 10 ms: a bucket refills in one second, so at most ~100 are live.
            now += Duration::from_millis(10);
            limiter.check_at(&format!("key-{i}"), now).unwrap();
        }
        assert!(limiter.tracked() <= 2 * SWEEP_FLOOR, "{} buckets kept", limiter.tracked());
    }
}
