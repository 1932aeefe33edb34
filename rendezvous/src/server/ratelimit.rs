//! A token bucket: `rate` tokens per second, holding at most `burst`.
//! One per connection bounds how fast a single daemon can make the server
//! work, whatever it sends.

use std::time::Instant;

/// Token bucket state. Time is passed in so tests need no clock.
#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub(crate) fn new(rate: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate: f64::from(rate),
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Whether the bucket would be full at `now`: it remembers nothing a
    /// fresh bucket would not, so it may be forgotten.
    pub(crate) fn is_full(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * self.rate >= self.burst
    }

    /// Takes one token if there is one.
    pub(crate) fn allow(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_sustained_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 5, t0);
        assert_eq!((0..10).filter(|_| b.allow(t0)).count(), 5);
        // 10/s refills one token per 100 ms.
        assert!(!b.allow(t0 + Duration::from_millis(50)));
        assert!(b.allow(t0 + Duration::from_millis(160)));
        assert!(!b.allow(t0 + Duration::from_millis(170)));
        // A long pause refills only up to the burst.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| b.allow(later)).count(), 5);
    }

    proptest::proptest! {
        /// Over any arrival pattern, any rate and any burst, a bucket
        /// admits no more than `burst + rate × span` in any stretch of
        /// calls (every window, not only from the start): the guarantee
        /// the server's limits are stated in.
        #[test]
        fn a_bucket_never_exceeds_burst_plus_rate(
            rate in 0u32..5_000,
            burst in 0u32..200,
            gaps_us in proptest::collection::vec(0u64..50_000, 1..150),
        ) {
            let t0 = Instant::now();
            let mut b = TokenBucket::new(rate, burst, t0);
            let mut now = t0;
            let mut calls = Vec::with_capacity(gaps_us.len());
            for gap in gaps_us {
                now += Duration::from_micros(gap);
                calls.push((now, b.allow(now)));
            }
            let burst = f64::from(burst.max(1));
            for i in 0..calls.len() {
                let mut admitted = 0.0;
                for (t, ok) in &calls[i..] {
                    admitted += f64::from(u8::from(*ok));
                    let span = t.duration_since(calls[i].0).as_secs_f64();
                    proptest::prop_assert!(
                        admitted <= burst + f64::from(rate) * span + 1e-6,
                        "{admitted} admitted in {span} s at {rate}/s, burst {burst}"
                    );
                }
            }
        }
    }
}
