//! Clock offset and RTT to the rendezvous server, from ping/pong samples.
//!
//! A punch order says "fire at server time T". Each daemon turns T into its
//! own clock with the offset measured here, so both SYNs leave together even
//! when the daemons' clocks disagree. The sample with the smallest RTT has
//! the least queueing in it, so its offset is the most trustworthy (the NTP
//! rule of thumb).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How many recent samples are kept.
const WINDOW: usize = 8;
/// The furthest ahead a punch may be scheduled. The server picks `at` a
/// few hundred milliseconds out (its RTT to both daemons); a time further
/// ahead is a broken or hostile server, and the punch is brought forward
/// to this bound rather than parked for hours.
pub(crate) const MAX_AHEAD: Duration = Duration::from_secs(10);

/// One ping/pong exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sample {
    rtt_us: u64,
    /// server clock minus local clock, microseconds.
    offset_us: i64,
}

/// Recent samples and what they imply.
#[derive(Debug, Default, Clone)]
pub(crate) struct ClockSync {
    samples: VecDeque<Sample>,
}

impl ClockSync {
    /// Records a ping sent at local `sent_us`, answered with `server_us`,
    /// received at local `received_us` (all Unix microseconds).
    pub(crate) fn add(&mut self, sent_us: u64, server_us: u64, received_us: u64) {
        // The server's clock value is untrusted: compute wide, then clamp,
        // so no input can overflow (a panic in debug, a wrap in release).
        let rtt_us = received_us.saturating_sub(sent_us);
        let midpoint = i128::from(sent_us) + i128::from(rtt_us / 2);
        let offset = i128::from(server_us) - midpoint;
        let offset_us = offset.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
        if self.samples.len() == WINDOW {
            self.samples.pop_front();
        }
        self.samples.push_back(Sample { rtt_us, offset_us });
    }

    fn best(&self) -> Option<Sample> {
        self.samples.iter().min_by_key(|s| s.rtt_us).copied()
    }

    /// Whether any sample exists yet.
    pub(crate) fn is_synced(&self) -> bool {
        !self.samples.is_empty()
    }

    /// The lowest recent RTT, reported to the server for punch timing.
    pub(crate) fn rtt_us(&self) -> Option<u64> {
        self.best().map(|s| s.rtt_us)
    }

    /// How long ago server time `at_us` was, at local Unix time `now_us`
    /// (`None`: not yet). An order that arrives after its firing time
    /// fires at once, so the two sides' SYNs do not leave together.
    pub(crate) fn late_by(&self, at_us: u64, now_us: u64) -> Option<Duration> {
        let late = -self.until_us(at_us, now_us);
        (late > 0).then(|| Duration::from_micros(u64::try_from(late).unwrap_or(u64::MAX)))
    }

    /// Microseconds from local Unix time `now_us` to server time `at_us`
    /// on our clock (negative: already past). Computed wide, so no input
    /// overflows.
    fn until_us(&self, at_us: u64, now_us: u64) -> i128 {
        let offset = self.best().map_or(0, |s| s.offset_us);
        i128::from(at_us) - i128::from(offset) - i128::from(now_us)
    }

    /// Converts server time `at_us` to a local instant, given the local
    /// Unix time `now_us` that corresponds to `now`: never before `now`,
    /// never more than [`MAX_AHEAD`] after it. The flag says whether it
    /// had to be brought forward.
    pub(crate) fn local_instant(&self, at_us: u64, now: Instant, now_us: u64) -> (Instant, bool) {
        let delta = self.until_us(at_us, now_us);
        let max = MAX_AHEAD.as_micros() as i128;
        if delta <= 0 {
            (now, false)
        } else if delta > max {
            (now + MAX_AHEAD, true)
        } else {
            (now + Duration::from_micros(delta as u64), false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_from_the_least_queued_sample() {
        let mut c = ClockSync::default();
        assert!(!c.is_synced());
        // Server is 1 s ahead. A 10 ms exchange centred exactly...
        c.add(1_000_000, 2_005_000, 1_010_000);
        // ...and a noisy 100 ms one whose reply sat in a queue.
        c.add(2_000_000, 3_010_000, 2_100_000);
        assert_eq!(c.rtt_us(), Some(10_000));
        let now = Instant::now();
        // Server time 3_000_000 is local 2_000_000: 500 ms after local 1_500_000.
        let (t, _) = c.local_instant(3_000_000, now, 1_500_000);
        assert_eq!(t - now, Duration::from_millis(500));
    }

    #[test]
    fn past_times_fire_now_and_window_slides() {
        let mut c = ClockSync::default();
        let now = Instant::now();
        assert_eq!(c.local_instant(5, now, 1_000), (now, false));
        assert_eq!(c.late_by(5, 1_000), Some(Duration::from_micros(995)));
        assert_eq!(c.late_by(1_000, 1_000), None);
        assert_eq!(c.late_by(u64::MAX, 0), None);
        assert_eq!(
            c.late_by(0, u64::MAX),
            Some(Duration::from_micros(u64::MAX))
        );
        c.add(0, 0, 1);
        for i in 0..WINDOW as u64 {
            c.add(10, 10, 1_000 + i);
        }
        // The 1 µs sample has been pushed out of the window.
        assert_eq!(c.rtt_us(), Some(990));
    }

    #[test]
    fn a_far_future_at_is_brought_forward_to_the_bound() {
        let c = ClockSync::default();
        let now = Instant::now();
        assert_eq!(c.local_instant(u64::MAX, now, 0), (now + MAX_AHEAD, true));
    }

    proptest::proptest! {
        /// Whatever the server answers and whenever, the clock never panics
        /// (no overflow) and a punch fires within [now, now + MAX_AHEAD].
        #[test]
        fn any_samples_keep_fire_at_within_its_window(
            samples in proptest::collection::vec(
                (proptest::prelude::any::<u64>(), proptest::prelude::any::<u64>(), proptest::prelude::any::<u64>()),
                0..20,
            ),
            at_us in proptest::prelude::any::<u64>(),
            now_us in proptest::prelude::any::<u64>(),
        ) {
            let mut c = ClockSync::default();
            for (sent, server, received) in samples {
                c.add(sent, server, received);
            }
            let now = Instant::now();
            let (t, clamped) = c.local_instant(at_us, now, now_us);
            proptest::prop_assert!(t >= now && t <= now + MAX_AHEAD);
            proptest::prop_assert!(!clamped || t == now + MAX_AHEAD);
        }
    }
}
