//! The daemon-wide budget of punch SYNs: every peer's punches together.
//!
//! Each punch is bounded on its own ([`super::plan::MAX_ATTEMPTS`] per
//! candidate, [`super::plan::REFUSED_GIVE_UP`] of unbroken refusals), and
//! each peer's punch orders are rate-limited (`control/order.rs`). What
//! neither bounds is the sum: a rendezvous that orders punches for every
//! configured peer at once, each against a host that answers every SYN with
//! a RST, would multiply the per-punch rate by the number of peers. This
//! token bucket caps the daemon's connect attempts at [`SYN_RATE`] a
//! second after a burst of [`SYN_BURST`], far above what punches that work
//! use (1 to a few hundred attempts each), so it only ever slows a flood.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Connect attempts per second, all punches together, once the burst is
/// spent.
pub(crate) const SYN_RATE: u32 = 2_000;
/// Connect attempts that may go out at once: one punch that keeps being
/// refused for its whole [`super::plan::REFUSED_GIVE_UP`] at the lab's
/// pace (~2,300), with room for a second.
pub(crate) const SYN_BURST: u32 = 6_000;

/// A token bucket, sans-IO: the caller passes the time.
#[derive(Debug)]
pub(crate) struct SynBudget {
    tokens: f64,
    last: Option<Instant>,
}

impl Default for SynBudget {
    fn default() -> Self {
        Self {
            tokens: f64::from(SYN_BURST),
            last: None,
        }
    }
}

impl SynBudget {
    /// Spends one attempt's token at `now`, or says when the next token
    /// is due.
    pub(crate) fn take(&mut self, now: Instant) -> Result<(), Instant> {
        let rate = f64::from(SYN_RATE);
        if let Some(last) = self.last {
            let refill = now.saturating_duration_since(last).as_secs_f64() * rate;
            self.tokens = (self.tokens + refill).min(f64::from(SYN_BURST));
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(now + Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }
}

/// Waits until `budget` allows one more connect attempt, and spends it.
pub(crate) async fn spend(budget: &Mutex<SynBudget>) {
    loop {
        let next = budget
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take(Instant::now());
        match next {
            Ok(()) => return,
            Err(at) => tokio::time::sleep_until(at.into()).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_burst_goes_at_once_then_the_rate_holds() {
        let t0 = Instant::now();
        let mut b = SynBudget::default();
        for _ in 0..SYN_BURST {
            assert_eq!(b.take(t0), Ok(()));
        }
        let Err(next) = b.take(t0) else {
            panic!("the burst is spent");
        };
        // One token every 1/SYN_RATE s.
        let gap = next - t0;
        assert!(
            gap > Duration::from_micros(400) && gap <= Duration::from_micros(500),
            "{gap:?}"
        );
        assert_eq!(b.take(next), Ok(()));
    }

    #[test]
    fn no_run_of_attempts_beats_the_burst_plus_the_rate() {
        // Attempts as fast as the budget allows for 10 simulated seconds
        // (the punch timeout): never more than the burst plus 10 s of rate.
        let t0 = Instant::now();
        let mut b = SynBudget::default();
        let mut now = t0;
        let mut sent = 0u64;
        while now < t0 + Duration::from_secs(10) {
            match b.take(now) {
                Ok(()) => sent += 1,
                Err(at) => now = at,
            }
        }
        let most = u64::from(SYN_BURST) + 10 * u64::from(SYN_RATE);
        assert!(sent <= most + 1, "{sent} > {most}");
        assert!(
            sent >= most - 2,
            "the budget should not under-spend: {sent} < {most}"
        );
    }

    #[test]
    fn an_idle_budget_refills_only_to_the_burst() {
        let t0 = Instant::now();
        let mut b = SynBudget::default();
        assert_eq!(b.take(t0), Ok(()));
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..SYN_BURST {
            assert_eq!(b.take(later), Ok(()));
        }
        assert!(b.take(later).is_err());
    }
}
