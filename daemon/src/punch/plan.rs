//! When to fire which connect: the punch schedule, with no sockets in it.
//!
//! Both daemons start every candidate at the same instant (`fire_at`, from
//! the rendezvous `at`). What happens to an early SYN decides the rest:
//!
//! - NATs that drop it: our attempt simply stays open (SYN_SENT) and the
//!   peer's SYN, arriving later through the mapping our SYN opened, turns it
//!   into a simultaneous open. Nothing to do but wait.
//! - NATs (or a bare host) that answer it with RST: the attempt fails with
//!   ECONNREFUSED about one RTT later, and the RST also erased the mapping.
//!   The fix is to retry *at once*: each side's socket is then in SYN_SENT
//!   nearly all the time, so whichever moment the other SYN arrives it finds
//!   one (see DESIGN.md, "What the lab has shown so far").
//!
//! Fast retries are capped per candidate so a peer behind a NAT that can
//! never be punched (port-randomizing) costs a bounded number of syscalls
//! before the deadline; after the cap, attempts are spaced out.
//!
//! A candidate refused without a break for [`REFUSED_GIVE_UP`] is given up
//! early ([`PunchPlan::refused_throughout`]). Between two punching peers
//! the refusals of a working punch stop within a second or so (a lost SYN
//! is resent after 1 s); refusals that go on are a NAT answering for the
//! peer from stale state, typically an entry its conntrack adopted from a
//! lost tunnel's last segments. Linux keeps such an entry in CLOSE for
//! 10 s, and every SYN + RST pair restarts those 10 s, so hammering on
//! keeps the tuple blocked for as long as the punch lasts; stopping, and
//! staying quiet for [`STALE_QUIET`], lets it expire.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Immediate retries per candidate before spacing them out.
pub(crate) const FAST_RETRIES: u32 = 2_000;
/// Spacing after the fast retries, and after local errors.
pub(crate) const SLOW_GAP: Duration = Duration::from_millis(10);
/// Connect attempts per candidate in one punch, whatever its timeout and
/// whatever mix of refusals and errors it meets (an unbroken run of
/// refusals ends sooner, at [`REFUSED_GIVE_UP`]). Punches that
/// connect use 1 to a few hundred; the most seen in a whole 10 s punch is
/// 5,728 (two hosts on one LAN, DESIGN.md), so the default timeout never
/// reaches this.
pub(crate) const MAX_ATTEMPTS: u32 = 6_000;
/// How often a candidate whose connection failed its TLS handshake is
/// punched again within one session (a wrong key fails every time; a
/// connection a NAT broke after the handshake of SYNs gets another go).
pub(crate) const MAX_REPUNCHES: u32 = 3;
/// A candidate refused without a break for this long is given up: see the
/// module doc. Punches that connect after RST-driven retries take ~50 ms,
/// their tail ~1.1 s (one lost SYN), 3.8 s at most under CPU load
/// (BENCHMARKS.md, punch timing).
pub(crate) const REFUSED_GIVE_UP: Duration = Duration::from_secs(4);
/// How long the punch ports stay quiet after a punch gave up on refusals:
/// Linux conntrack's CLOSE timeout (`nf_conntrack_tcp_timeout_close`,
/// 10 s) and a margin.
pub(crate) const STALE_QUIET: Duration = Duration::from_secs(11);

/// What the driver should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Open a socket and connect to candidate `i`.
    Start(usize),
    /// Nothing to start before this instant (or before an outcome).
    WaitUntil(Instant),
    /// The deadline passed or every candidate is finished.
    Exhausted,
}

/// How one connect ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Established (SYN_SENT → SYN_RCVD → ESTABLISHED).
    Connected,
    /// RST, refused or reset: the early-SYN case. Retry at once.
    Refused,
    /// An error on our side or an ICMP unreachable; retry after a gap.
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Start a new attempt at this instant.
    Ready(Instant),
    /// A connect is in flight.
    InFlight,
    /// Connected: the driver owns the connection now.
    Done,
    /// Out of attempts ([`MAX_ATTEMPTS`]): nothing more is sent to it.
    Spent,
    /// Refused for [`REFUSED_GIVE_UP`] without a break: given up.
    Refusing,
}

/// Which candidate a connection went to, for preferring one path over
/// another: a peer's local address means the two hosts share a LAN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum CandidateKind {
    /// On our LAN (the peer's own address).
    Local,
    /// Through the peer's NAT (its observed endpoint).
    Public,
}

/// The punch schedule for one session.
#[derive(Debug, Clone)]
pub(crate) struct PunchPlan {
    candidates: Vec<SocketAddr>,
    slots: Vec<Slot>,
    attempts: Vec<u32>,
    repunches: Vec<u32>,
    /// When each candidate's current run of refusals began.
    refused_since: Vec<Option<Instant>>,
    deadline: Instant,
}

impl PunchPlan {
    /// All candidates fire at `fire_at`, except IPv4 ones when there are
    /// IPv6 ones too: those [`super::family::HEAD_START`] later (happy
    /// eyeballs, see `family.rs`). Nothing starts after `deadline`.
    pub(crate) fn new(candidates: Vec<SocketAddr>, fire_at: Instant, deadline: Instant) -> Self {
        let n = candidates.len();
        let slots = super::family::delays(&candidates)
            .into_iter()
            .map(|d| Slot::Ready(fire_at + d))
            .collect();
        Self {
            candidates,
            slots,
            attempts: vec![0; n],
            repunches: vec![0; n],
            refused_since: vec![None; n],
            deadline,
        }
    }

    /// Candidate `i`'s address.
    pub(crate) fn candidate(&self, i: usize) -> SocketAddr {
        self.candidates[i]
    }

    /// The first candidate is the observed endpoint; the rest are local.
    pub(crate) fn kind(&self, i: usize) -> CandidateKind {
        if i == 0 {
            CandidateKind::Public
        } else {
            CandidateKind::Local
        }
    }

    /// Connect attempts started so far.
    pub(crate) fn attempts(&self) -> u32 {
        self.attempts.iter().sum()
    }

    /// The next step at time `now`.
    pub(crate) fn poll(&mut self, now: Instant) -> Action {
        if now >= self.deadline {
            return Action::Exhausted;
        }
        let mut next: Option<Instant> = None;
        let mut in_flight = false;
        for (i, slot) in self.slots.iter_mut().enumerate() {
            match *slot {
                Slot::Ready(t) if t <= now => {
                    *slot = Slot::InFlight;
                    self.attempts[i] += 1;
                    return Action::Start(i);
                }
                Slot::Ready(t) => next = Some(next.map_or(t, |n| n.min(t))),
                Slot::InFlight => in_flight = true,
                Slot::Done | Slot::Spent | Slot::Refusing => {}
            }
        }
        match next {
            Some(t) => Action::WaitUntil(t.min(self.deadline)),
            // Connected candidates may still come back (`repunch`) until
            // the deadline.
            None if in_flight || self.repunchable() => Action::WaitUntil(self.deadline),
            None => Action::Exhausted,
        }
    }

    fn repunchable(&self) -> bool {
        self.slots
            .iter()
            .zip(&self.repunches)
            .any(|(s, n)| *s == Slot::Done && *n < MAX_REPUNCHES)
    }

    /// The connection to `addr` was punched but is of no use (its TLS
    /// handshake failed): punch that candidate again at `now`, at most
    /// [`MAX_REPUNCHES`] times. Returns whether it will.
    pub(crate) fn repunch(&mut self, addr: SocketAddr, now: Instant) -> bool {
        let Some(i) = self.candidates.iter().position(|c| *c == addr) else {
            return false;
        };
        if self.slots[i] != Slot::Done || self.repunches[i] >= MAX_REPUNCHES {
            return false;
        }
        self.repunches[i] += 1;
        self.slots[i] = Slot::Ready(now);
        true
    }

    /// True if a candidate was given up because it kept refusing (see the
    /// module doc) and none connected: the punch ports should stay quiet
    /// for [`STALE_QUIET`] before the next punch. (A peer's LAN address
    /// beside it may just time out; the refusing one is what the quiet
    /// period is for.)
    pub(crate) fn refused_throughout(&self) -> bool {
        self.slots.contains(&Slot::Refusing) && !self.slots.contains(&Slot::Done)
    }

    /// Records how candidate `i`'s attempt ended.
    pub(crate) fn on_outcome(&mut self, i: usize, now: Instant, outcome: Outcome) {
        let since = match outcome {
            Outcome::Refused => *self.refused_since[i].get_or_insert(now),
            Outcome::Connected | Outcome::Failed => {
                self.refused_since[i] = None;
                now
            }
        };
        self.slots[i] = match outcome {
            Outcome::Connected => Slot::Done,
            _ if self.attempts[i] >= MAX_ATTEMPTS => Slot::Spent,
            Outcome::Refused if now.duration_since(since) >= REFUSED_GIVE_UP => Slot::Refusing,
            Outcome::Refused if self.attempts[i] < FAST_RETRIES => Slot::Ready(now),
            Outcome::Refused | Outcome::Failed => Slot::Ready(now + SLOW_GAP),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: usize) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([203, 0, 113, 2 + i as u8], 40000)))
            .collect()
    }

    #[test]
    fn ipv4_waits_out_the_ipv6_head_start() {
        let t0 = Instant::now();
        let v6 = SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, 2], 40000));
        let mut cands = addrs(1);
        cands.push(v6);
        let mut p = PunchPlan::new(cands, t0, t0 + Duration::from_secs(10));
        assert_eq!(p.poll(t0), Action::Start(1), "IPv6 first");
        let later = t0 + super::super::family::HEAD_START;
        assert_eq!(p.poll(t0), Action::WaitUntil(later));
        assert_eq!(p.poll(later), Action::Start(0));
    }

    #[test]
    fn every_candidate_fires_together_at_fire_at() {
        let t0 = Instant::now();
        let fire = t0 + Duration::from_millis(30);
        let mut p = PunchPlan::new(addrs(2), fire, fire + Duration::from_secs(10));
        assert_eq!(p.poll(t0), Action::WaitUntil(fire));
        assert_eq!(p.poll(fire), Action::Start(0));
        assert_eq!(p.poll(fire), Action::Start(1));
        // Both in flight: wait for an outcome, at most until the deadline.
        assert_eq!(
            p.poll(fire),
            Action::WaitUntil(fire + Duration::from_secs(10))
        );
        assert_eq!(p.attempts(), 2);
        assert_eq!(p.kind(0), CandidateKind::Public);
        assert_eq!(p.kind(1), CandidateKind::Local);
    }

    #[test]
    fn a_refused_attempt_retries_at_once() {
        let t0 = Instant::now();
        let mut p = PunchPlan::new(addrs(1), t0, t0 + Duration::from_secs(1));
        assert_eq!(p.poll(t0), Action::Start(0));
        let t1 = t0 + Duration::from_micros(80);
        p.on_outcome(0, t1, Outcome::Refused);
        assert_eq!(p.poll(t1), Action::Start(0));
    }

    /// Refuses every attempt candidate `i` starts, one every `gap`, until
    /// `until`; returns the time reached.
    fn refuse_until(
        p: &mut PunchPlan,
        i: usize,
        mut now: Instant,
        gap: Duration,
        until: Instant,
    ) -> Instant {
        while now < until {
            match p.poll(now) {
                Action::Start(j) if j == i => p.on_outcome(i, now + gap, Outcome::Refused),
                Action::Start(j) => panic!("unexpected start of candidate {j}"),
                Action::WaitUntil(_) | Action::Exhausted => return now,
            }
            now += gap;
        }
        now
    }

    #[test]
    fn a_candidate_refused_without_a_break_is_given_up_and_the_ports_go_quiet() {
        let t0 = Instant::now();
        let mut p = PunchPlan::new(addrs(1), t0, t0 + Duration::from_secs(10));
        let gap = Duration::from_millis(5);
        let end = refuse_until(&mut p, 0, t0, gap, t0 + Duration::from_secs(10));
        // Given up once the refusals had lasted REFUSED_GIVE_UP, not at
        // the 10 s deadline: the SYNs stop so the stale entry can expire.
        assert!(
            end >= t0 + REFUSED_GIVE_UP && end < t0 + REFUSED_GIVE_UP + gap * 2,
            "{:?}",
            end - t0
        );
        assert_eq!(p.poll(end), Action::Exhausted);
        assert!(p.refused_throughout());
    }

    #[test]
    fn a_break_in_the_refusals_starts_the_count_again() {
        let t0 = Instant::now();
        let mut p = PunchPlan::new(addrs(1), t0, t0 + Duration::from_secs(10));
        let gap = Duration::from_millis(5);
        let mid = t0 + REFUSED_GIVE_UP - Duration::from_millis(500);
        let now = refuse_until(&mut p, 0, t0, gap, mid);
        // An ICMP error (or an attempt that connected and was punched
        // again) is not a refusal: the run of refusals starts over.
        assert_eq!(p.poll(now), Action::Start(0));
        p.on_outcome(0, now, Outcome::Failed);
        let resume = now + SLOW_GAP;
        let later = refuse_until(&mut p, 0, resume, gap, resume + REFUSED_GIVE_UP - gap * 2);
        assert_eq!(
            p.poll(later),
            Action::Start(0),
            "still punching {:?} in",
            later - t0
        );
        assert!(!p.refused_throughout());
    }

    #[test]
    fn one_candidate_refusing_leaves_the_others_punching() {
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(10);
        let mut p = PunchPlan::new(addrs(2), t0, deadline);
        assert_eq!(p.poll(t0), Action::Start(0)); // stays in flight (NAT drops)
        let end = refuse_until(&mut p, 1, t0, Duration::from_millis(5), deadline);
        assert_eq!(
            p.poll(end),
            Action::WaitUntil(deadline),
            "candidate 0 still in flight"
        );
        // Had the punch ended here, the refusing candidate's ports want
        // quiet; not once another candidate connected.
        assert!(p.refused_throughout());
        p.on_outcome(0, end, Outcome::Connected);
        assert!(!p.refused_throughout());
    }

    #[test]
    fn fast_retries_are_capped_then_spaced() {
        let t0 = Instant::now();
        let mut p = PunchPlan::new(addrs(1), t0, t0 + Duration::from_secs(100));
        let mut now = t0;
        for _ in 0..FAST_RETRIES {
            assert_eq!(p.poll(now), Action::Start(0));
            p.on_outcome(0, now, Outcome::Refused);
        }
        assert_eq!(p.poll(now), Action::WaitUntil(now + SLOW_GAP));
        now += SLOW_GAP;
        assert_eq!(p.poll(now), Action::Start(0));
        assert_eq!(p.attempts(), FAST_RETRIES + 1);
    }

    #[test]
    fn local_failures_back_off_and_deadline_ends_everything() {
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_millis(15);
        let mut p = PunchPlan::new(addrs(1), t0, deadline);
        assert_eq!(p.poll(t0), Action::Start(0));
        p.on_outcome(0, t0, Outcome::Failed);
        assert_eq!(p.poll(t0), Action::WaitUntil(t0 + SLOW_GAP));
        assert_eq!(p.poll(deadline), Action::Exhausted);
    }

    #[test]
    fn connected_candidates_wait_for_a_repunch_until_the_deadline() {
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(1);
        let mut p = PunchPlan::new(addrs(1), t0, deadline);
        assert_eq!(p.poll(t0), Action::Start(0));
        p.on_outcome(0, t0, Outcome::Connected);
        assert_eq!(p.poll(t0), Action::WaitUntil(deadline));
        assert_eq!(p.poll(deadline), Action::Exhausted);
    }

    #[test]
    fn a_connection_that_failed_tls_is_punched_again_a_bounded_number_of_times() {
        let t0 = Instant::now();
        let mut p = PunchPlan::new(addrs(2), t0, t0 + Duration::from_secs(10));
        let unknown = SocketAddr::from(([192, 0, 2, 9], 1));
        assert!(!p.repunch(unknown, t0));
        // Not connected yet: nothing to punch again.
        assert_eq!(p.poll(t0), Action::Start(0));
        assert!(!p.repunch(addrs(2)[0], t0));
        for _ in 0..MAX_REPUNCHES {
            p.on_outcome(0, t0, Outcome::Connected);
            assert!(p.repunch(addrs(2)[0], t0));
            assert_eq!(p.poll(t0), Action::Start(0));
        }
        p.on_outcome(0, t0, Outcome::Connected);
        assert!(!p.repunch(addrs(2)[0], t0));
        // Candidate 1 was never started; candidate 0 is finished for good.
        assert_eq!(p.poll(t0), Action::Start(1));
        p.on_outcome(1, t0, Outcome::Connected);
        p.repunches[1] = MAX_REPUNCHES;
        assert_eq!(p.poll(t0), Action::Exhausted);
    }

    #[test]
    fn a_candidate_that_keeps_failing_is_spent_after_its_budget() {
        let t0 = Instant::now();
        let mut p = PunchPlan::new(addrs(1), t0, t0 + Duration::from_secs(3600));
        let mut now = t0;
        // Refusals broken up by local errors never make a 4 s run of
        // refusals; the attempt budget still ends them.
        for k in 0..2 * MAX_ATTEMPTS {
            let o = if k % 2 == 0 {
                Outcome::Refused
            } else {
                Outcome::Failed
            };
            match p.poll(now) {
                Action::Start(i) => p.on_outcome(i, now, o),
                Action::WaitUntil(t) => now = t,
                Action::Exhausted => break,
            }
        }
        assert_eq!(p.attempts(), MAX_ATTEMPTS);
        assert_eq!(p.poll(now), Action::Exhausted);
    }

    proptest::proptest! {
        /// Whatever the outcomes and their timing, no attempt starts at or
        /// after the deadline, and no candidate gets more than its budget
        /// (plus its bounded re-punches).
        #[test]
        fn the_plan_respects_its_deadline_and_budget(
            n in 1usize..4,
            steps in proptest::collection::vec((0u64..30_000, 0u8..4, 0usize..4), 1..400),
        ) {
            let t0 = Instant::now();
            let deadline = t0 + Duration::from_secs(2);
            let mut p = PunchPlan::new(addrs(n), t0, deadline);
            let mut now = t0;
            for (gap_us, what, which) in steps {
                now += Duration::from_micros(gap_us);
                if let Action::Start(i) = p.poll(now) {
                    proptest::prop_assert!(now < deadline);
                    proptest::prop_assert!(i < n);
                }
                let i = which % n;
                if p.slots[i] == Slot::InFlight {
                    let o = [Outcome::Connected, Outcome::Refused, Outcome::Failed, Outcome::Refused][usize::from(what)];
                    p.on_outcome(i, now, o);
                } else if what == 0 {
                    p.repunch(p.candidate(i), now);
                }
            }
            for (a, r) in p.attempts.iter().zip(&p.repunches) {
                proptest::prop_assert!(*a <= MAX_ATTEMPTS + r);
                proptest::prop_assert!(*r <= MAX_REPUNCHES);
            }
        }
    }
}
