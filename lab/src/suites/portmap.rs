//! Port mapping against a real router daemon (miniupnpd 2.3.1 from
//! Debian's source, `lab/miniupnpd/build.sh`): both NATs randomize ports
//! (`masquerade fully-random`), which alone ends relayed; a router that
//! maps the punch port makes that side reachable, and the tunnel goes
//! direct through the mapping.
//!
//! Which transport: with both NATs port-randomizing, TCP cannot pair even
//! through a mapping (the peer's SYN toward the mapped port leaves its NAT
//! from a port nobody observed, so it matches no socket here, and there is
//! no listener on the punch port to take it). QUIC does: the peer's punch
//! datagram reaches our endpoint through the mapping, we answer the address
//! it came from, and the QUIC handshake authenticates both keys. So every
//! mapped scenario here must end direct on QUIC, bob reaching alice at her
//! mapped UDP endpoint.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::harness::checks::{self, metric};
use crate::harness::punchd_types::{PathState, StatusDoc, Transport};
use crate::harness::run::{wait, Run};
use crate::harness::status::first_peer;
use crate::harness::{Binaries, Expect, Report, Scenario};
use crate::net::nat::NatBehaviour;
use crate::net::router::{Offer, RouterSpec};
use crate::net::topology::{Layout, Side};

/// What a port-mapping scenario measured, beyond the scenario report.
#[derive(Debug, Clone, Default)]
pub struct Mapped {
    /// The scenario's report (punch, ready time, transfer).
    pub report: Report,
    /// alice's `port_mapping.protocol`.
    pub protocol: Option<String>,
    /// alice's mapped UDP endpoint.
    pub external_udp: Option<String>,
    /// Where bob's tunnel reaches alice (which candidate connected).
    pub bob_reaches: Option<String>,
    /// For the restart scenario: router restarted → checked direct again,
    /// and whether the tunnel lived through it or was punched again.
    pub recovered_ms: Option<u64>,
    /// For the restart scenario: a new punch was needed.
    pub repunched: bool,
}

impl std::fmt::Display for Mapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} mapping={} external_udp={} bob_reaches={}",
            self.report,
            self.protocol.as_deref().unwrap_or("none"),
            self.external_udp.as_deref().unwrap_or("-"),
            self.bob_reaches.as_deref().unwrap_or("-"),
        )?;
        if let Some(ms) = self.recovered_ms {
            let how = if self.repunched {
                "repunched"
            } else {
                "tunnel_kept"
            };
            write!(f, " after_restart={how} checked_after={ms}ms")?;
        }
        Ok(())
    }
}

fn spec(offer: Offer) -> RouterSpec {
    RouterSpec { offer, deny: false }
}

/// The named scenarios.
pub fn scenario(name: &str) -> Option<Scenario> {
    let random = Layout::TwoNats(NatBehaviour::RandomFully);
    let both = [Transport::Tcp, Transport::Quic];
    let direct = |n: &str| {
        Scenario::new(n, random, Expect::Direct)
            .with_transports(&both)
            .expecting_transport(Transport::Quic)
    };
    Some(match name {
        "pm-upnp" => direct(name).with_router(Side::A, spec(Offer::Upnp)),
        "pm-natpmp" => direct(name).with_router(Side::A, spec(Offer::NatPmp)),
        "pm-pcp" => direct(name).with_router(Side::A, spec(Offer::Pcp)),
        "pm-both" => direct(name)
            .with_router(Side::A, spec(Offer::All))
            .with_router(Side::B, spec(Offer::All)),
        "pm-restart" => direct(name).with_router(Side::A, spec(Offer::All)),
        // Relayed: 8 MiB is enough to show the relay carries it intact
        // (64 MiB through the relay's bandwidth cap would cost CI ~30 s).
        "pm-deny" => Scenario {
            bytes: 8 << 20,
            ..Scenario::new(name, random, Expect::Relayed)
        }
        .with_transports(&both)
        .with_router(
            Side::A,
            RouterSpec {
                offer: Offer::All,
                deny: true,
            },
        ),
        // No router at all, on NATs a plain punch gets through at the first
        // try (they drop early SYNs: no RST retry lottery, so the time to
        // direct shows the probe's cost): the probe must not hold it up.
        "pm-none" => Scenario::new(
            name,
            Layout::TwoNats(NatBehaviour::DropUnsolicited),
            Expect::Direct,
        ),
        // The same with mapping off: nothing is probed (and its time to
        // direct is the baseline for pm-none's).
        "pm-off" => Scenario::new(
            name,
            Layout::TwoNats(NatBehaviour::DropUnsolicited),
            Expect::Direct,
        )
        .with_punch("port_mapping = false"),
        _ => return None,
    })
}

/// Runs the named scenario with its checks.
pub fn run_named(name: &str, bins: &Binaries) -> Result<Mapped> {
    let s = scenario(name).with_context(|| format!("no port-mapping scenario {name:?}"))?;
    if name == "pm-restart" {
        return restart(&s, bins);
    }
    let mut out = Mapped::default();
    let report = checks::run(&s, bins, |s, run| {
        let report = match s.expect {
            Expect::Relayed => denied(s, run)?,
            _ => checks::direct(s, run)?,
        };
        out = mapped_facts(s, run, report)?;
        let probes = counted(run, "punchd_portmap_probes_total")?;
        let want = if s.punch_extra.contains("port_mapping = false") {
            0.0
        } else {
            3.0
        };
        if probes != want {
            bail!("alice sent {probes} port-mapping probes, expected {want}");
        }
        Ok(out.report.clone())
    })?;
    out.report = report;
    Ok(out)
}

/// After a direct run: the mapping alice's status shows, and that bob's
/// tunnel reaches alice where it must (her mapped UDP endpoint when she
/// has one).
fn mapped_facts(s: &Scenario, run: &Run, report: Report) -> Result<Mapped> {
    let alice = run.status("alice")?;
    let bob = run.status("bob")?;
    let pm = &alice.port_mapping;
    let bob_reaches = first_peer(&bob)?.remote_addr.clone();
    let out = Mapped {
        report,
        protocol: pm.protocol.clone(),
        external_udp: pm.external_udp.clone(),
        bob_reaches: bob_reaches.clone(),
        recovered_ms: None,
        repunched: false,
    };
    let want = match s.routers.iter().find(|(side, _)| *side == Side::A) {
        Some((_, r)) if !r.deny => Some(match r.offer {
            Offer::Upnp => "upnp",
            Offer::NatPmp => "nat-pmp",
            Offer::Pcp | Offer::All => "pcp",
        }),
        _ => None,
    };
    if pm.protocol.as_deref() != want {
        bail!("alice's port_mapping is {pm:?}, expected protocol {want:?}");
    }
    if let Some(proto) = want {
        check_mapping(&alice, proto)?;
        // Direct through a mapping: bob reaches alice at hers, or (when
        // bob's router maps too) alice reaches bob at his.
        let alice_reaches = first_peer(&alice)?.remote_addr.clone();
        let through_bobs = s.routers.iter().any(|(side, _)| *side == Side::B)
            && alice_reaches.is_some()
            && alice_reaches == bob.port_mapping.external_udp;
        if s.expect == Expect::Direct && bob_reaches != pm.external_udp && !through_bobs {
            bail!(
                "bob reaches alice at {bob_reaches:?}, alice bob at {alice_reaches:?}: \
                 neither through a mapping (alice's {:?}, bob's {:?})",
                pm.external_udp,
                bob.port_mapping.external_udp
            );
        }
    }
    Ok(out)
}

/// The status's mapping: on alice's NAT's public address, TCP and UDP,
/// with a lease in the future, and counted in `/metrics`.
fn check_mapping(doc: &StatusDoc, proto: &str) -> Result<()> {
    let pm = &doc.port_mapping;
    for (what, ep) in [("tcp", &pm.external_tcp), ("udp", &pm.external_udp)] {
        if !ep.as_deref().is_some_and(|e| e.starts_with("203.0.113.2:")) {
            bail!("external_{what} is {ep:?}, expected 203.0.113.2:*");
        }
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    if pm.expires_unix_ms.is_none_or(|e| e <= now_ms) {
        bail!(
            "the lease expiry {:?} is not in the future",
            pm.expires_unix_ms
        );
    }
    if !pm.answered.iter().any(|a| a == proto) {
        bail!(
            "{proto} not among the protocols that answered: {:?}",
            pm.answered
        );
    }
    Ok(())
}

/// A router that refuses: the punch falls back to the relay as it would
/// without a router, the refusal is counted once per probe (no loop), and
/// nothing is offered as mapped.
fn denied(s: &Scenario, run: &Run) -> Result<Report> {
    let status = run.wait_path("alice", PathState::Relayed, Duration::from_secs(60))?;
    let mut report = Report {
        name: s.name.clone(),
        ..Default::default()
    };
    report.ready_ms = run.since_start().as_millis() as u64;
    report.read_peer(first_peer(&status)?);
    let t = run.transfer(s.bytes, s.streams)?;
    checks::intact(&t, "relayed transfer failed")?;
    report.transfer = Some(t);
    let pm = &status.port_mapping;
    if pm.protocol.is_some() || pm.external_udp.is_some() {
        bail!("a refused mapping shows in status: {pm:?}");
    }
    // No error loop: one probe per protocol, and a few more seconds of
    // failed punches and relaying add none.
    let before = counted(run, "punchd_portmap_probes_total")?;
    std::thread::sleep(Duration::from_secs(5));
    let after = counted(run, "punchd_portmap_probes_total")?;
    if before > 3.0 || after > before {
        bail!("port-mapping probes: {before} then {after} (want one per protocol, not growing)");
    }
    Ok(report)
}

/// The router restarts and forgets every mapping mid-tunnel: the tunnel
/// breaks, alice notices (keepalive), renews, which re-creates the
/// mapping, and the tunnel is direct through it again; then 64 MiB.
fn restart(s: &Scenario, bins: &Binaries) -> Result<Mapped> {
    let mut run = Run::start(s, bins)?;
    match restart_checks(s, &mut run) {
        Ok(m) => {
            let _ = std::fs::remove_dir_all(&run.dir);
            Ok(m)
        }
        Err(e) => Err(run.explain(e)),
    }
}

fn restart_checks(s: &Scenario, run: &mut Run) -> Result<Mapped> {
    let first = checks::direct(s, run)?;
    let renewals_before = renewals(run)?;
    let punches_before = punches_ok(run)?;
    let (nat, mut router) = run.routers.remove(0);
    let restarted = Instant::now();
    router.restart_forgetting(&mut run.topo.nats[nat], &run.dir)?;
    run.routers.insert(0, (nat, router));
    // The tunnel broke with the router's state; wait for it to be noticed
    // and rebuilt through the mapping made again.
    wait(
        "the mapping renewed after the restart",
        Duration::from_secs(40),
        || renewals(run).ok().filter(|n| *n > renewals_before),
    )?;
    // The restart announcement makes alice map again on a fresh external
    // port (the old one may hide behind conntrack entries the peer's
    // packets left while the router had no mapping) and register it; the
    // old tunnel dies with the old port, keepalive notices (at most
    // interval + timeout, 5 s + 10 s), and the re-punch goes direct
    // through the new mapping. So 17 s after the restart the old tunnel
    // is known dead; then the tunnel must be direct again.
    let settle = restarted + Duration::from_secs(17);
    wait("a direct tunnel again", Duration::from_secs(60), || {
        (Instant::now() >= settle)
            .then(|| run.status("alice").ok())
            .flatten()
            .filter(|d| first_peer(d).is_ok_and(|p| p.path == PathState::Direct))
    })?;
    let recovered_ms = restarted.elapsed().as_millis() as u64;
    let (t, rendezvous_bytes) = run.transfer_counted(s.bytes, s.streams)?;
    checks::intact(&t, "transfer after the router restart failed")?;
    checks::rendezvous_carried_under_1pct(rendezvous_bytes, t.bytes)?;
    let mut report = first;
    report.transfer = Some(t);
    let mut m = mapped_facts(s, run, report)?;
    m.recovered_ms = Some(recovered_ms);
    m.repunched = punches_ok(run)? > punches_before;
    Ok(m)
}

fn renewals(run: &Run) -> Result<f64> {
    counted(run, "punchd_portmap_renewals_total")
}

/// A `punchd_portmap_*` family of alice's, summed over the protocols.
fn counted(run: &Run, family: &str) -> Result<f64> {
    let text = run.metrics("alice")?;
    Ok(["upnp", "nat-pmp", "pcp"]
        .iter()
        .filter_map(|p| metric(&text, &format!("{family}{{protocol=\"{p}\"}}")))
        .sum())
}

fn punches_ok(run: &Run) -> Result<f64> {
    let text = run.metrics("alice")?;
    Ok(metric(&text, "punchd_punches_total{peer=\"bob\",result=\"ok\"}").unwrap_or(0.0))
}
