//! Exponential backoff with jitter, for reconnects and re-punches: fast
//! when a failure is a blip, slow when it persists, and never in lockstep
//! with every other daemon that lost the same server.

use std::time::Duration;

/// Backoff state: `base · 2^n`, capped, with ±25 % jitter.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub(crate) fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            failures: 0,
        }
    }

    /// The next delay.
    pub(crate) fn next(&mut self) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.failures.min(16));
        self.failures = self.failures.saturating_add(1);
        jitter(exp.min(self.max))
    }

    /// After a success.
    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }
}

fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    let r = if getrandom::fill(&mut b).is_ok() {
        u16::from_le_bytes(b)
    } else {
        32768
    };
    // factor in [0.75, 1.25)
    let factor = 0.75 + f64::from(r) / 65536.0 * 0.5;
    d.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let first = b.next();
        assert!(first >= Duration::from_millis(75) && first < Duration::from_millis(125));
        let second = b.next();
        assert!(second >= Duration::from_millis(150) && second < Duration::from_millis(250));
        for _ in 0..20 {
            assert!(b.next() < Duration::from_millis(2500));
        }
        b.reset();
        assert!(b.next() < Duration::from_millis(125));
    }
}
