//! When to probe, renew, re-map and remove: the port mapper's decisions,
//! without sockets or clocks of its own (times come in, actions go out).
//!
//! The rules, and why:
//! - Probe once the punch port is known; a router that answers gets the
//!   punch port mapped (TCP and UDP) by the most precise protocol that
//!   answered (PCP, then NAT-PMP, then UPnP IGD: PCP and NAT-PMP are one
//!   UDP round trip each and say exactly which external port they gave).
//! - Renew at half the lease, as RFC 6886 recommends, so one lost renewal
//!   still leaves time for another before the router drops the mapping.
//! - A lost tunnel may mean the router restarted and forgot us: renew at
//!   once (a renewal of a forgotten mapping creates it again). Same for a
//!   changed gateway, which gets a fresh probe.
//! - No router, or a router that refuses: wait long before asking again
//!   (the LAN has said no; asking every few seconds would only spam it and
//!   the log), but still re-probe when a tunnel is lost, at most once per
//!   [`REPROBE_MIN`].

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Which protocol holds (or answered for) the mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Protocol {
    /// UPnP IGD (SSDP discovery, SOAP `AddPortMapping`).
    Upnp,
    /// NAT-PMP (RFC 6886).
    NatPmp,
    /// PCP (RFC 6887).
    Pcp,
}

impl Protocol {
    /// Every protocol, in the order of preference.
    pub(crate) const ALL: [Protocol; 3] = [Protocol::Pcp, Protocol::NatPmp, Protocol::Upnp];

    /// The status and metric label.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Protocol::Upnp => "upnp",
            Protocol::NatPmp => "nat-pmp",
            Protocol::Pcp => "pcp",
        }
    }
}

/// A router's grant: the external endpoints for the punch port and how
/// long they last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Grant {
    pub(crate) protocol: Protocol,
    pub(crate) external_tcp: SocketAddr,
    /// None when the QUIC path is off.
    pub(crate) external_udp: Option<SocketAddr>,
    /// The shorter of the two leases.
    pub(crate) lease: Duration,
}

/// What the mapper should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Probe all three protocols at once and map with the best answer.
    Probe,
    /// Renew (or re-create) the mapping held with this protocol.
    Renew(Protocol),
    /// Nothing until this instant (then call [`Plan::tick`]).
    WaitUntil(Instant),
}

/// Where the mapper stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Not started (the punch port is not known yet).
    Idle,
    /// A probe is out.
    Probing,
    /// A mapping is held.
    Mapped {
        grant: Grant,
        /// When the router drops it unless renewed.
        expires: Instant,
        renew_at: Instant,
        /// Renewals failed in a row.
        failures: u32,
    },
    /// Nothing answered or the router refused; ask again at `retry_at`.
    Unavailable { retry_at: Instant },
}

/// How long after a probe that found nothing the next one goes out on its own.
pub(crate) const REPROBE_IDLE: Duration = Duration::from_secs(600);
/// A lost tunnel re-probes a router-less LAN at most this often.
pub(crate) const REPROBE_MIN: Duration = Duration::from_secs(60);
/// A failed renewal is retried after this (capped by the time left).
const RENEW_RETRY: Duration = Duration::from_secs(15);
/// Leases shorter than this are renewed as if they were this long, so a
/// router that grants seconds cannot make us ask in a tight loop.
const MIN_LEASE: Duration = Duration::from_secs(20);

/// The port mapper's state machine.
#[derive(Debug)]
pub(crate) struct Plan {
    state: State,
    /// When the last probe went out (rate limit for tunnel-loss probes).
    last_probe: Option<Instant>,
}

impl Default for Plan {
    fn default() -> Self {
        Self::new()
    }
}

impl Plan {
    pub(crate) fn new() -> Self {
        Self {
            state: State::Idle,
            last_probe: None,
        }
    }

    pub(crate) fn state(&self) -> State {
        self.state
    }

    /// The mapping in force, if any.
    pub(crate) fn grant(&self) -> Option<Grant> {
        match self.state {
            State::Mapped { grant, .. } => Some(grant),
            _ => None,
        }
    }

    fn probe(&mut self, now: Instant) -> Action {
        self.state = State::Probing;
        self.last_probe = Some(now);
        Action::Probe
    }

    /// The punch port is known: start.
    pub(crate) fn start(&mut self, now: Instant) -> Action {
        match self.state {
            State::Idle => self.probe(now),
            _ => self.next(now),
        }
    }

    /// A probe finished: `grant` is the mapping it made, if any.
    pub(crate) fn probed(&mut self, now: Instant, grant: Option<Grant>) -> Action {
        match grant {
            Some(g) => self.mapped(now, g),
            None => {
                self.state = State::Unavailable {
                    retry_at: now + REPROBE_IDLE,
                };
                self.next(now)
            }
        }
    }

    fn mapped(&mut self, now: Instant, grant: Grant) -> Action {
        let lease = grant.lease.max(MIN_LEASE);
        self.state = State::Mapped {
            grant,
            expires: now + grant.lease,
            renew_at: now + lease / 2,
            failures: 0,
        };
        self.next(now)
    }

    /// A renewal finished: the new grant (which may name another external
    /// port), or a failure.
    pub(crate) fn renewed(&mut self, now: Instant, result: Option<Grant>) -> Action {
        if let Some(g) = result {
            return self.mapped(now, g);
        }
        let State::Mapped {
            grant,
            expires,
            failures,
            ..
        } = self.state
        else {
            return self.next(now);
        };
        let failures = failures + 1;
        // Twice refused, or already expired: the router has forgotten us or
        // no longer maps; probe from scratch (maybe another protocol answers).
        if failures >= 2 || now >= expires {
            return self.probe(now);
        }
        let left = expires.saturating_duration_since(now);
        self.state = State::Mapped {
            grant,
            expires,
            renew_at: now + RENEW_RETRY.min(left / 2),
            failures,
        };
        self.next(now)
    }

    /// A tunnel was lost: the router may have restarted and forgotten the
    /// mapping. Renew a held mapping now; re-probe a LAN without one, at
    /// most once per [`REPROBE_MIN`].
    pub(crate) fn tunnel_lost(&mut self, now: Instant) -> Action {
        match self.state {
            State::Mapped { grant, .. } => Action::Renew(grant.protocol),
            State::Unavailable { .. } if self.probe_allowed(now) => self.probe(now),
            _ => self.next(now),
        }
    }

    /// The gateway announced a restart (PCP/NAT-PMP, to 224.0.0.1:5350):
    /// it has forgotten our mapping. Map again from scratch, and the caller
    /// asks for a *fresh* external port. Why not the old one: between the
    /// restart and our request, a peer's packets to the old port found no
    /// mapping, and the router's connection tracking keeps an unmapped
    /// entry for that flow for as long as the peer keeps sending (it does:
    /// it is punching). A mapping re-created on the same port stays hidden
    /// from that peer behind the entry, and the tunnel ends relayed (seen
    /// in the lab, 2 runs in 3). A new port has no such entry; the new
    /// endpoint reaches the peer with the next registration update.
    pub(crate) fn router_restarted(&mut self, now: Instant) -> Action {
        match self.state {
            State::Mapped { .. } => self.probe(now),
            State::Unavailable { .. } if self.probe_allowed(now) => self.probe(now),
            _ => self.next(now),
        }
    }

    /// The default gateway changed: whatever we held was with another router.
    pub(crate) fn gateway_changed(&mut self, now: Instant) -> Action {
        match self.state {
            State::Idle | State::Probing => self.next(now),
            _ => self.probe(now),
        }
    }

    fn probe_allowed(&self, now: Instant) -> bool {
        self.last_probe
            .is_none_or(|t| now.saturating_duration_since(t) >= REPROBE_MIN)
    }

    /// Time passed: whatever is due.
    pub(crate) fn tick(&mut self, now: Instant) -> Action {
        self.next(now)
    }

    fn next(&mut self, now: Instant) -> Action {
        match self.state {
            State::Mapped {
                grant, renew_at, ..
            } if now >= renew_at => Action::Renew(grant.protocol),
            State::Mapped { renew_at, .. } => Action::WaitUntil(renew_at),
            State::Unavailable { retry_at } if now >= retry_at => self.probe(now),
            State::Unavailable { retry_at } => Action::WaitUntil(retry_at),
            // Idle waits for `start`, Probing for `probed`.
            State::Idle | State::Probing => Action::WaitUntil(now + REPROBE_IDLE),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(protocol: Protocol, port: u16, lease_s: u64) -> Grant {
        Grant {
            protocol,
            external_tcp: SocketAddr::from(([203, 0, 113, 2], port)),
            external_udp: Some(SocketAddr::from(([203, 0, 113, 2], port))),
            lease: Duration::from_secs(lease_s),
        }
    }

    #[test]
    fn starts_with_a_probe_and_renews_at_half_the_lease() {
        let t0 = Instant::now();
        let mut p = Plan::new();
        assert_eq!(p.start(t0), Action::Probe);
        assert_eq!(p.state(), State::Probing);
        let a = p.probed(t0, Some(grant(Protocol::Pcp, 40000, 3600)));
        assert_eq!(a, Action::WaitUntil(t0 + Duration::from_secs(1800)));
        assert_eq!(
            p.tick(t0 + Duration::from_secs(1799)),
            Action::WaitUntil(t0 + Duration::from_secs(1800))
        );
        assert_eq!(
            p.tick(t0 + Duration::from_secs(1800)),
            Action::Renew(Protocol::Pcp)
        );
    }

    #[test]
    fn a_renewal_may_move_the_external_port() {
        let t0 = Instant::now();
        let mut p = Plan::new();
        p.start(t0);
        p.probed(t0, Some(grant(Protocol::Upnp, 40000, 3600)));
        let t1 = t0 + Duration::from_secs(1800);
        p.renewed(t1, Some(grant(Protocol::Upnp, 40001, 3600)));
        assert_eq!(p.grant().map(|g| g.external_tcp.port()), Some(40001));
    }

    #[test]
    fn one_failed_renewal_retries_two_re_probe() {
        let t0 = Instant::now();
        let mut p = Plan::new();
        p.start(t0);
        p.probed(t0, Some(grant(Protocol::NatPmp, 40000, 3600)));
        let t1 = t0 + Duration::from_secs(1800);
        assert_eq!(
            p.renewed(t1, None),
            Action::WaitUntil(t1 + Duration::from_secs(15))
        );
        // Still offered while the lease runs.
        assert!(p.grant().is_some());
        let t2 = t1 + Duration::from_secs(15);
        assert_eq!(p.tick(t2), Action::Renew(Protocol::NatPmp));
        assert_eq!(p.renewed(t2, None), Action::Probe);
        assert_eq!(p.grant(), None);
    }

    #[test]
    fn an_expired_mapping_is_probed_again_not_renewed() {
        let t0 = Instant::now();
        let mut p = Plan::new();
        p.start(t0);
        p.probed(t0, Some(grant(Protocol::Pcp, 40000, 60)));
        assert_eq!(p.renewed(t0 + Duration::from_secs(61), None), Action::Probe);
    }

    #[test]
    fn a_lost_tunnel_renews_at_once() {
        let t0 = Instant::now();
        let mut p = Plan::new();
        p.start(t0);
        p.probed(t0, Some(grant(Protocol::Upnp, 40000, 3600)));
        assert_eq!(
            p.tunnel_lost(t0 + Duration::from_secs(3)),
            Action::Renew(Protocol::Upnp)
        );
    }

    #[test]
    fn no_router_waits_long_and_tunnel_losses_do_not_loop() {
        let t0 = Instant::now();
        let mut p = Plan::new();
        p.start(t0);
        assert_eq!(p.probed(t0, None), Action::WaitUntil(t0 + REPROBE_IDLE));
        // A tunnel lost right away: no second probe within REPROBE_MIN.
        assert_eq!(
            p.tunnel_lost(t0 + Duration::from_secs(1)),
            Action::WaitUntil(t0 + REPROBE_IDLE)
        );
        let later = t0 + REPROBE_MIN;
        assert_eq!(p.tunnel_lost(later), Action::Probe);
        // Many losses in a row: one probe per REPROBE_MIN at most.
        p.probed(later, None);
        let mut probes = 0;
        for s in 1..=600 {
            let t = later + Duration::from_secs(s);
            if p.tunnel_lost(t) == Action::Probe {
                probes += 1;
                p.probed(t, None);
            }
        }
        assert_eq!(probes, 10, "one probe a minute");
    }

    #[test]
    fn a_tiny_lease_is_not_renewed_in_a_tight_loop() {
        let t0 = Instant::now();
        let mut p = Plan::new();
        p.start(t0);
        assert_eq!(
            p.probed(t0, Some(grant(Protocol::Pcp, 40000, 1))),
            Action::WaitUntil(t0 + MIN_LEASE / 2)
        );
    }

    #[test]
    fn a_restarted_router_is_mapped_again_from_scratch() {
        let t0 = Instant::now();
        let mut p = Plan::new();
        p.start(t0);
        p.probed(t0, Some(grant(Protocol::Pcp, 40000, 3600)));
        // Not a renewal of the old port: a new mapping.
        assert_eq!(
            p.router_restarted(t0 + Duration::from_secs(9)),
            Action::Probe
        );
        assert_eq!(p.state(), State::Probing);
        // A second announcement while probing changes nothing.
        assert!(matches!(
            p.router_restarted(t0 + Duration::from_secs(9)),
            Action::WaitUntil(_)
        ));
        p.probed(
            t0 + Duration::from_secs(10),
            Some(grant(Protocol::Pcp, 51234, 3600)),
        );
        assert_eq!(p.grant().map(|g| g.external_tcp.port()), Some(51234));
        // A router-less LAN is not probed more than once per REPROBE_MIN.
        let mut q = Plan::new();
        q.start(t0);
        q.probed(t0, None);
        assert!(matches!(
            q.router_restarted(t0 + Duration::from_secs(1)),
            Action::WaitUntil(_)
        ));
        assert_eq!(q.router_restarted(t0 + REPROBE_MIN), Action::Probe);
    }

    #[test]
    fn a_gateway_change_re_probes() {
        let t0 = Instant::now();
        let mut p = Plan::new();
        p.start(t0);
        p.probed(t0, Some(grant(Protocol::Pcp, 40000, 3600)));
        assert_eq!(p.gateway_changed(t0), Action::Probe);
    }
}
