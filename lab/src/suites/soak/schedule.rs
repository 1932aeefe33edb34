//! Which faults hit, and when: a pure function of the seed, so a failing
//! soak can be replayed with `--seed`.
//!
//! Faults come in rounds: each round is a seeded shuffle of every kind,
//! so even a 2-minute run (about nine faults) hits each kind at least
//! once, while the order and the gaps between faults still vary with the
//! seed. Each fault's side (which NAT, which daemon) is drawn per fault.

use std::time::Duration;

use serde::Serialize;

/// One of the lab's two sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Side {
    /// alice's: hostA behind natA, the side with the forward.
    A,
    /// bob's: hostB behind natB, the side exposing the service.
    B,
}

/// What a fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Fault {
    /// `conntrack -F` on that side's NAT: every mapping is gone at once.
    Flush(Side),
    /// SIGKILL that side's daemon, restart it [`KILL_DOWN`] later.
    KillPeer(Side),
    /// SIGKILL the rendezvous, restart it [`KILL_DOWN`] later.
    KillRendezvous,
    /// That NAT drops [`LOSS_PERCENT`] of what arrives from the internet
    /// for [`LOSS_BURST`].
    Loss(Side),
    /// That NAT's conntrack timeouts shortened ([`SHORT_TIMEOUTS`]) for
    /// [`SHORT_WINDOW`]: mappings of anything idle for a few seconds
    /// expire, as on a stingy home router.
    ShortTimeouts(Side),
}

/// How long a killed process stays down before it is restarted.
pub const KILL_DOWN: Duration = Duration::from_secs(1);
/// How long a loss burst lasts.
pub const LOSS_BURST: Duration = Duration::from_secs(3);
/// The share of inbound packets a loss burst drops.
pub const LOSS_PERCENT: u32 = 30;
/// How long a NAT keeps its shortened timeouts.
pub const SHORT_WINDOW: Duration = Duration::from_secs(20);
/// The shortened conntrack timeouts (sysctl name, seconds). All above the
/// daemons' 5 s keepalive interval: a tunnel that is pinged keeps its
/// mapping, so these must not break anything.
pub const SHORT_TIMEOUTS: [(&str, u32); 3] = [
    ("net.netfilter.nf_conntrack_tcp_timeout_established", 15),
    ("net.netfilter.nf_conntrack_udp_timeout", 10),
    ("net.netfilter.nf_conntrack_udp_timeout_stream", 15),
];

/// Whether a fault may end streams that are open while it acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Breaks {
    /// It must: the process at one end of every tunnel stream is gone.
    Must,
    /// It may: the tunnel's own TCP connection can die of it (a flushed
    /// NAT answers the next inbound segment with a RST; heavy loss can
    /// outlast the keepalive's timeout), after which the daemons re-punch.
    May,
    /// It must not: the direct tunnel does not depend on what it hits.
    Never,
}

impl Fault {
    /// Every kind once (sides filled in by the schedule).
    const KINDS: [Fault; 5] = [
        Fault::Flush(Side::A),
        Fault::KillPeer(Side::A),
        Fault::KillRendezvous,
        Fault::Loss(Side::A),
        Fault::ShortTimeouts(Side::A),
    ];

    /// Whether it may end streams open while it acts.
    pub fn breaks(self) -> Breaks {
        match self {
            Fault::KillPeer(_) => Breaks::Must,
            Fault::Flush(_) | Fault::Loss(_) => Breaks::May,
            Fault::KillRendezvous | Fault::ShortTimeouts(_) => Breaks::Never,
        }
    }

    /// The kind without its side, for per-kind statistics.
    pub fn kind(self) -> &'static str {
        match self {
            Fault::Flush(_) => "conntrack-flush",
            Fault::KillPeer(_) => "peer-kill",
            Fault::KillRendezvous => "rendezvous-kill",
            Fault::Loss(_) => "loss-burst",
            Fault::ShortTimeouts(_) => "short-timeouts",
        }
    }

    /// Within how long of the fault's start a probe must get through
    /// again, or the fault never recovered. The recovery suite's bounds
    /// (30 s for a flush, a peer back within 5 s of coming up), with room
    /// for a noisy 2-core machine and the fault's own duration.
    pub fn recovery_bound(self) -> Duration {
        match self {
            Fault::Flush(_) => Duration::from_secs(30),
            Fault::KillPeer(_) => Duration::from_secs(15),
            Fault::KillRendezvous => Duration::from_secs(10),
            Fault::Loss(_) => LOSS_BURST + Duration::from_secs(20),
            Fault::ShortTimeouts(_) => Duration::from_secs(10),
        }
    }

    /// The same fault on `side` (unchanged where there is no side).
    fn on(self, side: Side) -> Fault {
        match self {
            Fault::Flush(_) => Fault::Flush(side),
            Fault::KillPeer(_) => Fault::KillPeer(side),
            Fault::KillRendezvous => Fault::KillRendezvous,
            Fault::Loss(_) => Fault::Loss(side),
            Fault::ShortTimeouts(_) => Fault::ShortTimeouts(side),
        }
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Flush(s) | Fault::KillPeer(s) | Fault::Loss(s) | Fault::ShortTimeouts(s) => {
                write!(f, "{} {s:?}", self.kind())
            }
            Fault::KillRendezvous => f.write_str(self.kind()),
        }
    }
}

/// splitmix64: a small seeded generator, so the schedule needs no
/// dependency and is the same on every machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// One fault of the plan: `gap` of quiet after the previous fault has
/// recovered (or after the warm-up), then `fault`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planned {
    /// Quiet time before it.
    pub gap: Duration,
    /// What it does.
    pub fault: Fault,
}

/// The shortest and longest quiet gap between faults.
pub const GAPS: (Duration, Duration) = (Duration::from_secs(4), Duration::from_secs(12));

/// At most this many faults, whatever the duration.
pub const MAX_FAULTS: usize = 2_000;

/// The faults for a soak of `faulting` (the time between warm-up and
/// wind-down), drawn from `seed`. The count is bounded by the time the
/// faults' gaps and own durations would take at the least, so a slow
/// recovery only makes the runner stop early, never the plan longer.
pub fn plan(seed: u64, faulting: Duration) -> Vec<Planned> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    let mut used = Duration::ZERO;
    let span = (GAPS.1 - GAPS.0).as_millis() as u64;
    'rounds: loop {
        let mut round = Fault::KINDS;
        // Fisher–Yates.
        for i in (1..round.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            round.swap(i, j);
        }
        for kind in round {
            let side = if rng.below(2) == 0 { Side::A } else { Side::B };
            let gap = GAPS.0 + Duration::from_millis(rng.below(span + 1));
            let fault = kind.on(side);
            used += gap + held_for(fault);
            if used > faulting || out.len() >= MAX_FAULTS {
                break 'rounds;
            }
            out.push(Planned { gap, fault });
        }
    }
    out
}

/// How long a fault acts before it is over (a kill's downtime, a burst,
/// a window of short timeouts); a flush is instant.
pub fn held_for(f: Fault) -> Duration {
    match f {
        Fault::Flush(_) => Duration::ZERO,
        Fault::KillPeer(_) | Fault::KillRendezvous => KILL_DOWN,
        Fault::Loss(_) => LOSS_BURST,
        Fault::ShortTimeouts(_) => SHORT_WINDOW,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_plan_and_another_seed_another() {
        let a = plan(7, Duration::from_secs(600));
        assert_eq!(a, plan(7, Duration::from_secs(600)));
        assert_ne!(a, plan(8, Duration::from_secs(600)));
    }

    #[test]
    fn a_two_minute_soak_hits_every_kind_and_fits_its_time() {
        for seed in 0..50 {
            let p = plan(seed, Duration::from_secs(90));
            let kinds: std::collections::BTreeSet<_> = p.iter().map(|f| f.fault.kind()).collect();
            assert_eq!(kinds.len(), 5, "seed {seed}: {p:?}");
            let total: Duration = p.iter().map(|f| f.gap + held_for(f.fault)).sum();
            assert!(total <= Duration::from_secs(90), "seed {seed}");
            assert!(p.iter().all(|f| f.gap >= GAPS.0 && f.gap <= GAPS.1));
        }
    }

    #[test]
    fn both_sides_are_hit_and_the_count_is_bounded() {
        let p = plan(1, Duration::from_secs(30 * 60));
        assert!(p.iter().any(|f| f.fault == Fault::Flush(Side::A)));
        assert!(p.iter().any(|f| f.fault == Fault::Flush(Side::B)));
        assert!(p.len() < MAX_FAULTS);
        assert!(plan(1, Duration::from_secs(1_000_000)).len() <= MAX_FAULTS);
        assert!(plan(1, Duration::ZERO).is_empty());
    }
}
