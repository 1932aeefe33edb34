//! IPv6 and dual stack (issue #20): IPv6 routers that forward without NAT
//! behind a stateful firewall, beside (or instead of) the IPv4 NATs.
//!
//! - `v6-random`, `v6-random-reject`: both IPv4 NATs port-randomizing
//!   (relayed without IPv6), both hosts dual stack: direct over IPv6 by
//!   TCP simultaneous open, through firewalls that drop (or reject with a
//!   RST / ICMPv6) unsolicited inbound; `v6-random-quic` punches by
//!   QUIC only (the dual-stack UDP punch socket), `v6-random-default`
//!   races TCP with QUIC (both connect over IPv6; the race prefers TCP);
//! - `v6-only`: no IPv4 on either host: direct over IPv6;
//! - `v6-broken` against `v6-broken-baseline`: IPv6 dropped between the
//!   sites, so the punch falls to IPv4, at most the happy-eyeballs head
//!   start (250 ms) later than on the same network without IPv6;
//! - `v6-mixed`: alice IPv6-only, bob IPv4-only: relayed through the
//!   dual-stack rendezvous, and status says so.
//!
//! Direct ones get the shared [`checks::direct`] (64 MiB checksummed, the
//! rendezvous carrying under 1 %, no listener on the punch port) and then
//! the family both ends name.

use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use crate::harness::checks::{self, intact};
use crate::harness::punchd_types::{PathState, Transport};
use crate::harness::run::Run;
use crate::harness::status::first_peer;
use crate::harness::{Binaries, Expect, Report, Scenario};
use crate::net::nat::NatBehaviour as N;
use crate::net::topology::{Ipv6Plan, Layout as L, Stack, V6Firewall as F};

/// Every scenario of this suite.
pub fn scenarios() -> Vec<Scenario> {
    use Transport::{Quic, Tcp};
    let relayed = |name: &str, plan| {
        Scenario {
            // 8 MiB show the relay carries it intact; 64 MiB through the
            // relay's bandwidth cap would cost CI ~30 s.
            bytes: 8 << 20,
            ..Scenario::new(name, L::TwoNats(N::Masquerade), Expect::Relayed)
        }
        .with_timeout("3s")
        .with_transports(&[Tcp, Quic])
        .with_ipv6(plan)
    };
    vec![
        Scenario::new("v6-random", L::TwoNats(N::RandomFully), Expect::Direct)
            .with_ipv6(Ipv6Plan::dual(F::Drop)),
        // The rendezvous by a name with A and AAAA records: each daemon
        // registers over one family and shows the server the other.
        Scenario::new("v6-name", L::TwoNats(N::RandomFully), Expect::Direct)
            .with_ipv6(Ipv6Plan::dual(F::Drop)),
        Scenario::new(
            "v6-random-reject",
            L::TwoNats(N::RandomFully),
            Expect::Direct,
        )
        .with_ipv6(Ipv6Plan::dual(F::Reject)),
        Scenario::new("v6-random-quic", L::TwoNats(N::RandomFully), Expect::Direct)
            .with_transports(&[Quic])
            .expecting_transport(Quic)
            .with_ipv6(Ipv6Plan::dual(F::Drop)),
        Scenario::new(
            "v6-random-default",
            L::TwoNats(N::RandomFully),
            Expect::Direct,
        )
        .with_transports(&[Tcp, Quic])
        .expecting_transport(Tcp)
        .with_ipv6(Ipv6Plan::dual(F::Drop)),
        Scenario::new("v6-only", L::TwoNats(N::Masquerade), Expect::Direct).with_ipv6(Ipv6Plan {
            a: Stack::V6Only,
            b: Stack::V6Only,
            firewall: F::Drop,
            by_name: false,
        }),
        // NATs that drop early SYNs: the first try goes through, so the
        // time to direct is the family's cost, not a RST retry lottery.
        // bob up 1 s first: an order made in the same few milliseconds as
        // his registration can come before the server has seen his IPv4
        // endpoint (his observe-only hello follows the registration), and
        // then holds his IPv6 candidate alone; that race is measured
        // apart (README, "IPv6 and dual stack", known limits).
        Scenario {
            alice_after: std::time::Duration::from_secs(1),
            ..Scenario::new("v6-broken", L::TwoNats(N::DropUnsolicited), Expect::Direct)
                .with_ipv6(Ipv6Plan::dual(F::BetweenSitesBroken))
        },
        Scenario::new(
            "v6-broken-baseline",
            L::TwoNats(N::DropUnsolicited),
            Expect::Direct,
        ),
        relayed(
            "v6-mixed",
            Ipv6Plan {
                a: Stack::V6Only,
                b: Stack::V4Only,
                firewall: F::Drop,
                by_name: false,
            },
        ),
    ]
}

/// Runs the scenario called `name`.
pub fn run_named(name: &str, bins: &Binaries) -> Result<Report> {
    let s = scenarios()
        .into_iter()
        .find(|s| s.name == name)
        .with_context(|| format!("no IPv6 scenario called {name:?}"))?;
    checks::run(&s, bins, check)
}

fn check(s: &Scenario, run: &Run) -> Result<Report> {
    match s.expect {
        Expect::Direct => {
            let report = checks::direct(s, run)?;
            // The family both ends name is the one the address plan expects.
            let want = if run.topo.bob_seen_from_alice.starts_with('[') {
                "ipv6"
            } else {
                "ipv4"
            };
            for who in ["alice", "bob"] {
                let status = run.status(who)?;
                let family = first_peer(&status)?.family.clone();
                if family.as_deref() != Some(want) {
                    bail!("{who}'s tunnel family is {family:?}, expected {want}");
                }
            }
            if s.ipv6.is_some_and(|p| p.by_name) {
                both_families_registered(run)?;
            }
            println!(
                "IPV6 {}: direct over {want} by {} in {} ms (punch {} ms, {} attempts)",
                s.name,
                report.transport.map_or("none", Transport::as_str),
                report.ready_ms,
                report.punch_ms,
                report.attempts
            );
            Ok(report)
        }
        Expect::Relayed => relayed(s, run),
        Expect::PunchFails => bail!("no IPv6 scenario expects a failed punch"),
    }
}

/// Registered by name: alice's status has both public endpoints, one per
/// family, and bob's punch order carried alice in both families (his log's
/// `punching` line names her IPv4 NAT and her IPv6 address).
fn both_families_registered(run: &Run) -> Result<()> {
    let st = run.status("alice")?;
    let (Some(registered), Some(v6)) = (st.public_addr.as_deref(), st.public_addr6.as_deref())
    else {
        bail!(
            "alice registered by name shows public_addr {:?} and public_addr6 {:?}",
            st.public_addr,
            st.public_addr6
        );
    };
    if !v6.starts_with('[') {
        bail!("public_addr6 {v6} is not IPv6");
    }
    let bob_log = run.first_log("bob");
    let order = bob_log
        .lines()
        .find(|l| l.contains("punching tcp="))
        .unwrap_or_default();
    if !(order.contains("203.0.113.2:") && order.contains("[2001:db8:a::2]:")) {
        bail!("bob's order for alice lacks a family: {order:?}");
    }
    println!(
        "IPV6 by name: alice public_addr {registered}, public_addr6 {v6}; bob {}",
        order.split("punching ").nth(1).unwrap_or(order)
    );
    Ok(())
}

/// No family in common: the relay carries it all, and status says relayed.
fn relayed(s: &Scenario, run: &Run) -> Result<Report> {
    let mut report = Report {
        name: s.name.clone(),
        ..Default::default()
    };
    let status = run.wait_path("alice", PathState::Relayed, Duration::from_secs(60))?;
    report.ready_ms = run.since_start().as_millis() as u64;
    let peer = first_peer(&status)?;
    report.read_peer(peer);
    report.punch_reason = peer.last_punch.as_ref().and_then(|p| p.reason.clone());
    if peer.transport != Some(Transport::Relay) {
        bail!("alice's transport is {:?}, expected relay", peer.transport);
    }
    // alice registered over IPv6 (she has nothing else).
    if status.public_addr6.is_none() {
        bail!("an IPv6-only daemon shows no public_addr6: {status:?}");
    }
    run.wait_path("bob", PathState::Relayed, Duration::from_secs(10))?;
    let (t, rendezvous_bytes) = run.transfer_counted(s.bytes, s.streams)?;
    report.rendezvous_bytes_during_transfer = rendezvous_bytes;
    intact(&t, "relayed transfer failed")?;
    if rendezvous_bytes < t.bytes {
        bail!(
            "the rendezvous saw only {rendezvous_bytes} bytes of a {}-byte relayed transfer",
            t.bytes
        );
    }
    report.transfer = Some(t);
    println!(
        "IPV6 {}: relayed in {} ms (punch: {:?})",
        s.name, report.ready_ms, report.punch_reason
    );
    Ok(report)
}

/// What is done to a direct IPv6 tunnel in [`recovery`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upset {
    /// bob SIGKILLed and restarted a second later.
    PeerRestart,
    /// `conntrack -F` on both routers: the IPv6 firewalls forget every flow.
    FirewallFlush,
}

/// A direct tunnel over IPv6 (IPv4 NATs port-randomizing, so IPv6 is the
/// only direct path) is upset; within 10 s it is direct over IPv6 again
/// and a checksummed transfer goes through. Returns what it measured.
pub fn recovery(bins: &Binaries, upset: Upset) -> Result<String> {
    let name = match upset {
        Upset::PeerRestart => "v6-restart",
        Upset::FirewallFlush => "v6-flush",
    };
    let s = Scenario::new(name, L::TwoNats(N::RandomFully), Expect::Direct)
        .with_ipv6(Ipv6Plan::dual(F::Drop));
    let mut run = Run::start(&s, bins)?;
    let result = upset_and_recover(&mut run, upset);
    match result {
        Ok(line) => {
            let _ = std::fs::remove_dir_all(&run.dir);
            Ok(line)
        }
        Err(e) => Err(run.explain(e)),
    }
}

fn upset_and_recover(run: &mut Run, upset: Upset) -> Result<String> {
    let first = run.wait_path("alice", PathState::Direct, Duration::from_secs(30))?;
    let before = first_peer(&first)?.punches_ok;
    let upset_at = match upset {
        Upset::PeerRestart => {
            run.topo.host_b.kill(run.bob);
            std::thread::sleep(Duration::from_secs(1));
            let up = std::time::Instant::now();
            run.bob = run.start_daemon("bob")?;
            up
        }
        Upset::FirewallFlush => {
            for nat in &run.topo.nats {
                nat.exec("conntrack", &["-F"])?;
            }
            std::time::Instant::now()
        }
    };
    let limit = Duration::from_secs(10);
    let recovered = loop {
        let t = run.transfer(4 << 20, 2)?;
        if t.ok {
            let st = run.status("alice")?;
            let p = first_peer(&st)?;
            if p.path == PathState::Direct && p.family.as_deref() == Some("ipv6") {
                break upset_at.elapsed();
            }
        }
        if upset_at.elapsed() > limit {
            bail!("not direct over IPv6 with a working transfer {limit:?} after the upset");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let t = run.transfer(64 << 20, 8)?;
    intact(&t, "transfer after recovery failed")?;
    let st = run.status("alice")?;
    let p = first_peer(&st)?;
    let line = format!(
        "{upset:?} over IPv6: direct over ipv6 with a working transfer {:.2}s after it ({}; remote {})",
        recovered.as_secs_f64(),
        if p.punches_ok > before { "re-punched" } else { "the tunnel survived" },
        p.remote_addr.as_deref().unwrap_or("none")
    );
    println!("IPV6 {line}");
    Ok(line)
}
