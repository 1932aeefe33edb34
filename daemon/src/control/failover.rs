//! Which rendezvous instance to dial next, and after how long, when
//! `[rendezvous] urls` lists several instances of one cluster.
//!
//! The instances share their registry (Redis), so any of them serves us as
//! well as another: the daemon stays on the one that works and, when it
//! dies, moves to the next in the list — no fail-back, which would only
//! add a second interruption. Two things shape the timing:
//!
//! - a dead instance drops all of its daemons at the same moment; if they
//!   all re-registered at once on the survivors, the first registration
//!   burst would land on instances that are already carrying their own
//!   load. So after losing an established registration the first attempt
//!   waits a uniformly random delay in `[0, LOST_SPREAD)` ("full jitter"),
//!   which spreads the herd evenly over that window and still keeps the
//!   whole failover within 5 s;
//! - one refused instance says nothing about the next one, so within a
//!   round the next URL is tried after a short jittered pause; only when
//!   every URL failed in a row does the exponential [`Backoff`] apply.
//!
//! With a single URL this is the plain reconnect backoff it always was.
//! Pure: the caller passes the randomness and does the sleeping.

use std::time::Duration;

use crate::backoff::Backoff;

/// Window over which a dead instance's daemons spread their first
/// re-registration (full jitter).
pub(crate) const LOST_SPREAD: Duration = Duration::from_millis(2000);
/// Pause before trying the next URL of the round after a failure.
pub(crate) const NEXT_URL_PAUSE: Duration = Duration::from_millis(200);

/// How a connection attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// It had registered, then the connection was lost.
    Lost,
    /// It never registered (refused, unreachable, no welcome).
    Failed,
}

/// The failover state over `count` URLs.
#[derive(Debug)]
pub(crate) struct Failover {
    count: usize,
    current: usize,
    /// Consecutive failed attempts since the last registration.
    failed_in_a_row: usize,
    backoff: Backoff,
}

impl Failover {
    pub(crate) fn new(count: usize) -> Self {
        Self {
            count: count.max(1),
            current: 0,
            failed_in_a_row: 0,
            backoff: Backoff::new(Duration::from_millis(250), Duration::from_secs(10)),
        }
    }

    /// The index of the URL to dial now.
    pub(crate) fn current(&self) -> usize {
        self.current
    }

    /// A registration succeeded on the current URL.
    pub(crate) fn registered(&mut self) {
        self.failed_in_a_row = 0;
        self.backoff.reset();
    }

    /// After an attempt ended: the URL index to dial next and how long to
    /// wait first. `unit` is a random number in `[0, 1)`.
    pub(crate) fn next(&mut self, ended: Ended, unit: f64) -> (usize, Duration) {
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.5
        };
        if self.count == 1 {
            if ended == Ended::Lost {
                self.backoff.reset();
            }
            return (0, self.backoff.next());
        }
        self.current = (self.current + 1) % self.count;
        let delay = match ended {
            Ended::Lost => {
                self.failed_in_a_row = 0;
                self.backoff.reset();
                LOST_SPREAD.mul_f64(unit)
            }
            Ended::Failed => {
                self.failed_in_a_row += 1;
                if self.failed_in_a_row % self.count == 0 {
                    // A whole round failed: back off before the next one.
                    self.backoff.next()
                } else {
                    NEXT_URL_PAUSE.mul_f64(0.5 + unit)
                }
            }
        };
        (self.current, delay)
    }
}

/// A random number in `[0, 1)` for [`Failover::next`].
pub(crate) fn random_unit() -> f64 {
    let mut b = [0u8; 4];
    if getrandom::fill(&mut b).is_err() {
        return 0.5;
    }
    f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_instance_moves_to_the_next_within_the_spread() {
        let mut f = Failover::new(3);
        f.registered();
        assert_eq!(f.next(Ended::Lost, 0.0), (1, Duration::ZERO));
        f.registered();
        let (i, d) = f.next(Ended::Lost, 0.999);
        assert_eq!(i, 2);
        assert!(d < LOST_SPREAD && d > LOST_SPREAD.mul_f64(0.99), "{d:?}");
        f.registered();
        assert_eq!(f.next(Ended::Lost, 0.5).0, 0, "wraps around");
    }

    #[test]
    fn the_herd_spreads_evenly() {
        // 1000 daemons of a dead instance, random draws spread uniformly:
        // no 100 ms slice of the window gets more than a small share.
        let mut slices = [0u32; 20];
        for k in 0..1000u32 {
            let mut f = Failover::new(3);
            f.registered();
            let (_, d) = f.next(Ended::Lost, f64::from(k) / 1000.0);
            slices[(d.as_millis() / 100) as usize] += 1;
        }
        assert!(slices.iter().all(|&n| (45..=55).contains(&n)), "{slices:?}");
    }

    #[test]
    fn failures_walk_the_list_then_back_off() {
        let mut f = Failover::new(3);
        let (i, d) = f.next(Ended::Failed, 0.5);
        assert_eq!((i, d), (1, NEXT_URL_PAUSE));
        let (i, d) = f.next(Ended::Failed, 0.5);
        assert_eq!((i, d), (2, NEXT_URL_PAUSE));
        // The whole round failed: exponential backoff, growing.
        let (i, first) = f.next(Ended::Failed, 0.5);
        assert_eq!(i, 0);
        assert!(first >= Duration::from_millis(187), "{first:?}");
        f.next(Ended::Failed, 0.5);
        f.next(Ended::Failed, 0.5);
        let (_, second) = f.next(Ended::Failed, 0.5);
        assert!(second >= Duration::from_millis(375), "{second:?}");
        for _ in 0..100 {
            assert!(f.next(Ended::Failed, 0.5).1 <= Duration::from_millis(12_500));
        }
    }

    #[test]
    fn a_registration_resets_the_round() {
        let mut f = Failover::new(2);
        f.next(Ended::Failed, 0.5);
        f.next(Ended::Failed, 0.5);
        f.next(Ended::Failed, 0.5);
        f.registered();
        assert_eq!(f.next(Ended::Failed, 0.5).1, NEXT_URL_PAUSE);
    }

    #[test]
    fn one_url_keeps_the_plain_backoff() {
        let mut f = Failover::new(1);
        let (i, d) = f.next(Ended::Lost, 0.9);
        assert_eq!(i, 0);
        assert!(d < Duration::from_millis(313), "{d:?}");
        let (_, d2) = f.next(Ended::Failed, 0.9);
        assert!(d2 >= Duration::from_millis(375), "{d2:?}");
        assert_eq!(f.current(), 0);
    }

    #[test]
    fn odd_randomness_is_tamed() {
        let mut f = Failover::new(2);
        assert!(f.next(Ended::Lost, f64::NAN).1 <= LOST_SPREAD);
        assert!(f.next(Ended::Lost, 7.0).1 <= LOST_SPREAD);
        assert!(random_unit() < 1.0);
    }
}
