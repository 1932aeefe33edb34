//! `punchd netcheck` against each lab NAT kind: the rendezvous alone in
//! its namespace (no daemons, so no other flow takes a port of the
//! predictable NAT between the check's own), `punchd netcheck --json` run
//! in hostA behind natA, and its verdict compared with what the kind is.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::harness::punchd_types::Transport;
use crate::harness::run::wait;
use crate::harness::Binaries;
use crate::net::nat::NatBehaviour;
use crate::net::netns::{listens_on, prefix};
use crate::net::topology::{Layout, Topology, RENDEZVOUS_IP};

/// What `punchd netcheck` must say for a kind: (TCP, UDP) mapping, and
/// whether a delta must be found.
fn expected(kind: NatBehaviour) -> (&'static str, bool) {
    match kind {
        NatBehaviour::RandomFully => ("endpoint-dependent", false),
        NatBehaviour::Predictable => ("endpoint-dependent", true),
        _ => ("endpoint-independent", false),
    }
}

/// What the NAT must do with an unsolicited SYN (the rendezvous's inbound
/// test): the kinds that drop unsolicited inbound before conntrack
/// confirms it stay silent; plain masquerade answers from its own stack.
fn expected_unsolicited(kind: NatBehaviour) -> &'static str {
    match kind {
        NatBehaviour::Firewall | NatBehaviour::Predictable | NatBehaviour::DropUnsolicited => {
            "dropped"
        }
        _ => "rst",
    }
}

fn name(kind: NatBehaviour) -> &'static str {
    match kind {
        NatBehaviour::Masquerade => "masquerade",
        NatBehaviour::DropUnsolicited => "drop",
        NatBehaviour::RejectRst => "rst",
        NatBehaviour::RandomFully => "random-fully",
        NatBehaviour::Firewall => "firewall",
        NatBehaviour::TcpBlocked => "tcp-blocked",
        NatBehaviour::Predictable => "predictable (numgen inc)",
    }
}

/// Every kind, one topology each; returns the table (kind → what it
/// printed) and fails on the first wrong verdict.
pub fn classify_every_kind(bins: &Binaries) -> Result<String> {
    let kinds = [
        NatBehaviour::Masquerade,
        NatBehaviour::DropUnsolicited,
        NatBehaviour::Firewall,
        NatBehaviour::RandomFully,
        NatBehaviour::Predictable,
    ];
    let mut table = String::from(
        "\n| NAT kind | mapping_tcp | mapping_udp | delta tcp/udp | port preserved tcp/udp | unsolicited_tcp | ms |\n|---|---|---|---|---|---|---|\n",
    );
    let mut wrong = Vec::new();
    for kind in kinds {
        let doc = check_one(bins, kind).with_context(|| name(kind))?;
        let s = |k: &str| doc[k].as_str().unwrap_or("?").to_owned();
        let d = |k: &str| doc[k].as_i64().map_or("-".to_owned(), |d| d.to_string());
        let b = |k: &str| doc[k].as_bool().unwrap_or(false);
        table.push_str(&format!(
            "| {} | {} | {} | {}/{} | {}/{} | {} | {} |\n",
            name(kind),
            s("mapping_tcp"),
            s("mapping_udp"),
            d("delta_tcp"),
            d("delta_udp"),
            b("port_preserved_tcp"),
            b("port_preserved_udp"),
            s("unsolicited_tcp"),
            doc["elapsed_ms"],
        ));
        if s("unsolicited_tcp") != expected_unsolicited(kind) {
            wrong.push(format!("{} unsolicited: {doc}", name(kind)));
        }
        let (want, delta) = expected(kind);
        for t in ["tcp", "udp"] {
            if s(&format!("mapping_{t}")) != want || doc[format!("delta_{t}")].is_i64() != delta {
                wrong.push(format!("{} {t}: {doc}", name(kind)));
            }
        }
    }
    if !wrong.is_empty() {
        bail!("misclassified:{table}\n{}", wrong.join("\n"));
    }
    Ok(format!("netcheck classified every kind{table}"))
}

fn check_one(bins: &Binaries, kind: NatBehaviour) -> Result<serde_json::Value> {
    let mut topo = Topology::build(&prefix("netcheck"), Layout::TwoNats(kind))?;
    let dir = std::env::temp_dir().join("punch-lab-netcheck");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let rv = topo.rv.name().to_owned();
    topo.rv.spawn(
        &bins.rendezvous,
        &["--listen", "0.0.0.0:8080"],
        &[("RUST_LOG", "info")],
        &dir.join("rendezvous.log"),
    )?;
    wait("the rendezvous to listen", Duration::from_secs(10), || {
        (listens_on(&rv, 8080) && listens_on(&rv, 8081)).then_some(())
    })?;
    bins.keygen(&dir.join("alice.key"))?;
    let cfg = dir.join("alice.toml");
    std::fs::write(
        &cfg,
        format!(
            "name = \"alice\"\nkey_file = \"alice.key\"\n[rendezvous]\nurl = \"http://{RENDEZVOUS_IP}:8080\"\n"
        ),
    )?;
    let started = Instant::now();
    let out = topo.host_a.exec_output(
        bins.punchd.to_str().unwrap_or("punchd"),
        &["netcheck", "--config", cfg.to_str().unwrap_or(""), "--json"],
    )?;
    let took = started.elapsed();
    if !out.status.success() {
        bail!(
            "punchd netcheck failed after {took:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| String::from_utf8_lossy(&out.stdout).into_owned())?;
    drop(topo);
    Ok(doc)
}

/// Both NATs `--random-fully`: both daemons' discovery says
/// endpoint-dependent with no step, so the rendezvous orders
/// `relay-first` and the pair is relayed within 3 s of the order, status
/// saying why. `runs` times; returns the elapsed times.
pub fn hard_pair_relays_at_once(bins: &Binaries, runs: usize) -> Result<String> {
    use crate::harness::matrix::by_name;
    use crate::harness::punchd_types::PathState;
    use crate::harness::run::Run;
    use crate::harness::status::first_peer;
    let mut scenario = by_name("random").context("the random scenario")?;
    // Its own namespaces: the scenarios suite's `random` may run meanwhile.
    scenario.name = "hard-pair".into();
    let mut times = Vec::new();
    for i in 0..runs {
        let run = Run::start(&scenario, bins)?;
        let result = (|| -> Result<u64> {
            let mut worst = 0;
            for who in ["alice", "bob"] {
                let doc = run.wait_path(who, PathState::Relayed, Duration::from_secs(20))?;
                let peer = first_peer(&doc)?;
                let last = peer
                    .last_punch
                    .as_ref()
                    .context("relayed without a last punch")?;
                let reason = last.reason.clone().unwrap_or_default();
                if !reason.contains("relay-first") {
                    bail!("{who}: relayed, but not at once: {reason}");
                }
                if last.elapsed_ms > 3_000 {
                    bail!(
                        "{who}: relayed {} ms after the order (bound 3000)",
                        last.elapsed_ms
                    );
                }
                let nat = doc.nat.as_ref().context("no nat in status")?;
                if nat.mapping_udp != "endpoint-dependent"
                    || nat.mapping_tcp != "endpoint-dependent"
                {
                    bail!("{who}: status nat {nat:?}");
                }
                worst = worst.max(last.elapsed_ms);
            }
            Ok(worst)
        })();
        match result {
            Ok(ms) => times.push(ms),
            Err(e) => return Err(run.explain(e.context(format!("run {}", i + 1)))),
        }
    }
    let max = times.iter().max().copied().unwrap_or(0);
    Ok(format!(
        "random+random relayed at once in {}/{runs} runs; order -> relayed (slower side) ms: {times:?}, max {max}",
        times.len()
    ))
}

/// alice behind a port-preserving NAT with an input firewall (easy), bob
/// behind the predictable NAT (`numgen inc`, byte-swapped step 256), QUIC
/// only: the rendezvous orders alice to punch bob's next 16 predicted
/// ports too, and the pair goes direct. `runs` times; a direct path must
/// come within 15 s of the start, and 8 MiB must cross it intact.
pub fn predictable_and_easy_go_direct(bins: &Binaries, runs: usize) -> Result<String> {
    predicted_pair_goes_direct(bins, runs, NatBehaviour::Firewall, "predict")
}

/// Both NATs predictable: each side punches the other's predicted ports
/// first, so their k-th new mappings meet.
pub fn two_predictable_go_direct(bins: &Binaries, runs: usize) -> Result<String> {
    predicted_pair_goes_direct(bins, runs, NatBehaviour::Predictable, "predict2")
}

fn predicted_pair_goes_direct(
    bins: &Binaries,
    runs: usize,
    alice_nat: NatBehaviour,
    name: &str,
) -> Result<String> {
    use crate::harness::punchd_types::{PathState, Transport};
    use crate::harness::run::Run;
    use crate::harness::spec::{Expect, Scenario};
    use crate::harness::status::first_peer;
    let scenario = Scenario::new(
        name,
        Layout::Mixed(alice_nat, NatBehaviour::Predictable),
        Expect::Direct,
    )
    .with_transports(&[Transport::Quic]);
    // bob up first: the prediction starts from his UDP endpoint as the
    // rendezvous observed it, which an order made in the same millisecond
    // as his registration does not have yet (README, "Hard NATs").
    let scenario = Scenario {
        alice_after: Duration::from_secs(2),
        ..scenario
    };
    let mut rows = Vec::new();
    for i in 0..runs {
        let run = Run::start(&scenario, bins)?;
        // Counts what alice sends toward bob's IP over UDP, from her LAN
        // (punch datagrams, then QUIC's handshake): the probe budget.
        run.topo.nats[0].nft(COUNT_RULE)?;
        let result = (|| -> Result<(u64, u64, String, u64)> {
            let doc = run.wait_path("alice", PathState::Direct, Duration::from_secs(15))?;
            let sent = run.topo.nats[0].nft_counter("ip", "lab_count")?;
            if sent > PREDICT_PACKET_BOUND {
                bail!("alice sent {sent} UDP packets toward bob before direct (bound {PREDICT_PACKET_BOUND})");
            }
            let ready = run.since_start().as_millis() as u64;
            let peer = first_peer(&doc)?;
            let punch_ms = peer.last_punch.as_ref().map_or(0, |p| p.elapsed_ms);
            let remote = peer.remote_addr.clone().unwrap_or_default();
            let bob = run.status("bob")?;
            let nat = bob.nat.as_ref().context("bob has no nat in status")?;
            if nat.delta_udp.is_none() {
                bail!("bob's NAT was not found predictable: {nat:?}");
            }
            let t = run.transfer(8 << 20, 2)?;
            if t.bytes != 8 << 20 {
                bail!("moved {} of {} bytes", t.bytes, 8 << 20);
            }
            Ok((ready, punch_ms, remote, sent))
        })();
        match result {
            Ok(r) => rows.push(r),
            Err(e) => return Err(run.explain(e.context(format!("run {}", i + 1)))),
        }
    }
    Ok(format!(
        "{name}: direct over QUIC in {}/{runs} runs; (start -> direct ms, punch ms, bob seen at, UDP packets alice->bob before direct): {rows:?}",
        rows.len()
    ))
}

/// A counter on natA for UDP from alice's LAN toward bob's NAT.
const COUNT_RULE: &str = "table ip lab_count {\n  chain counting { type filter hook forward priority -10; policy accept; iifname \"lan0\" ip daddr 203.0.113.3 meta l4proto udp counter; }\n}\n";

/// What one predicting punch may send before it is direct: 2 candidates
/// plus 16 predictions per round for at most 25 rounds (the QUIC punch's
/// schedule), plus QUIC's handshake.
const PREDICT_PACKET_BOUND: u64 = 18 * 25 + 50;

/// One side behind a port-randomizing NAT (`--random-fully`), the other
/// behind an easy one (port-preserving, dropping unsolicited inbound, as
/// home routers do), QUIC only: the rendezvous orders birthday probing
/// (the random side opens 256 mappings, the easy side probes random ports
/// of its IP), and the pair goes direct. Runs alternate which side is the
/// random one, so both QUIC roles open and probe. `runs` times; direct
/// within 15 s of the start, 8 MiB intact, and each side's packets toward
/// the other's NAT within the birthday budget.
pub fn random_and_easy_go_direct(bins: &Binaries, runs: usize) -> Result<String> {
    birthday_pair(
        bins,
        runs,
        Transport::Quic,
        NatBehaviour::Firewall,
        false,
        true,
    )
}

/// The same over TCP only: the random side's 256 SYNs wait in `SYN_SENT`,
/// the easy side's probe SYNs meet one of them in a simultaneous open.
pub fn random_and_easy_go_direct_over_tcp(bins: &Binaries, runs: usize) -> Result<String> {
    birthday_pair(
        bins,
        runs,
        Transport::Tcp,
        NatBehaviour::Firewall,
        false,
        true,
    )
}

/// The easy side behind a plain Linux masquerade, which answers an
/// unsolicited SYN with RST (and tracks unsolicited UDP as a flow to
/// itself), with a router between the NATs: the random side's first SYNs
/// and datagrams go out TTL-limited and expire at that router, so they
/// open its NAT without reaching the easy one. Over `transport`.
pub fn random_and_rst_easy_go_direct_past_a_router(
    bins: &Binaries,
    runs: usize,
    transport: Transport,
) -> Result<String> {
    birthday_pair(bins, runs, transport, NatBehaviour::Masquerade, true, true)
}

/// The same pair, measured rather than asserted: over QUIC it went direct
/// in 39 of 40 runs, and the cause of the miss is not found (README, "Hard
/// NATs").
pub fn random_and_rst_easy_past_a_router_measured(
    bins: &Binaries,
    runs: usize,
    transport: Transport,
) -> Result<String> {
    birthday_pair(bins, runs, transport, NatBehaviour::Masquerade, true, false)
}

/// The same without the router (the two NATs on one switch): the
/// TTL-limited packets reach the easy NAT anyway. What happens is
/// measured, not asserted (`lab/hard-nat-runs.sh`).
pub fn random_and_rst_easy_without_a_router(
    bins: &Binaries,
    runs: usize,
    transport: Transport,
) -> Result<String> {
    birthday_pair(
        bins,
        runs,
        transport,
        NatBehaviour::Masquerade,
        false,
        false,
    )
}

fn birthday_pair(
    bins: &Binaries,
    runs: usize,
    transport: Transport,
    easy_kind: NatBehaviour,
    hop: bool,
    strict: bool,
) -> Result<String> {
    use crate::harness::punchd_types::PathState;
    let mut failed = Vec::new();
    use crate::harness::run::Run;
    use crate::harness::spec::{Expect, Scenario};
    use crate::harness::status::first_peer;
    let mut rows = Vec::new();
    for i in 0..runs {
        // Even runs: alice easy, bob random; odd runs the other way.
        let alice_random = i % 2 == 1;
        let (a, b) = if alice_random {
            (NatBehaviour::RandomFully, easy_kind)
        } else {
            (easy_kind, NatBehaviour::RandomFully)
        };
        let tcp = transport == Transport::Tcp;
        let ns_name = format!(
            "bd{}{}{}",
            if tcp { "t" } else { "u" },
            if hop { "h" } else { "" },
            if easy_kind == NatBehaviour::Firewall {
                ""
            } else {
                "m"
            }
        );
        let layout = if hop {
            Layout::MixedHop(a, b)
        } else {
            Layout::Mixed(a, b)
        };
        let scenario =
            Scenario::new(&ns_name, layout, Expect::Direct).with_transports(&[transport]);
        // bob up first, so the rendezvous has seen his UDP endpoint when
        // alice's registration makes the order (as for port prediction).
        let scenario = Scenario {
            alice_after: Duration::from_secs(2),
            ..scenario
        };
        let run = Run::start(&scenario, bins)?;
        // Counts what each side sends toward the other's NAT: UDP
        // packets, or SYNs.
        run.topo.nats[0].nft(&count_rule("203.0.113.3", tcp))?;
        run.topo.nats[1].nft(&count_rule("203.0.113.2", tcp))?;
        let result = (|| -> Result<String> {
            let doc = run.wait_path("alice", PathState::Direct, Duration::from_secs(15))?;
            let ready = run.since_start().as_millis() as u64;
            let peer = first_peer(&doc)?;
            if peer.transport != Some(transport) {
                bail!("direct, but over {:?}", peer.transport);
            }
            let punch_ms = peer.last_punch.as_ref().map_or(0, |p| p.elapsed_ms);
            let (random, easy) = if alice_random {
                ("alice", "bob")
            } else {
                ("bob", "alice")
            };
            let (opened, hit) = if tcp {
                (
                    "birthday: the peer's probe met one of our TCP mappings",
                    "birthday: a TCP probe met",
                )
            } else {
                (
                    "birthday: the peer's probe landed",
                    "birthday: a probe landed",
                )
            };
            if !run.first_log(random).contains(opened) {
                bail!("{random} (random NAT) went direct, but not through a birthday mapping");
            }
            let sent_a = run.topo.nats[0].nft_counter("ip", "lab_count")?;
            let sent_b = run.topo.nats[1].nft_counter("ip", "lab_count")?;
            let (by_random, by_easy) = if alice_random {
                (sent_a, sent_b)
            } else {
                (sent_b, sent_a)
            };
            let (easy_bound, random_bound) = if tcp {
                (EASY_SYN_BOUND, RANDOM_SYN_BOUND)
            } else {
                (EASY_PACKET_BOUND, RANDOM_PACKET_BOUND)
            };
            if by_easy > easy_bound || by_random > random_bound {
                bail!("over the birthday budget: {easy} (easy) sent {by_easy} packets toward the peer's NAT (bound {easy_bound}), {random} (random) {by_random} (bound {random_bound})");
            }
            let t = run.transfer(8 << 20, 2)?;
            if t.bytes != 8 << 20 {
                bail!("moved {} of {} bytes", t.bytes, 8 << 20);
            }
            // How many probes it took, as the easy side logged it.
            let log = run.first_log(easy);
            let probes = log
                .lines()
                .find(|l| l.contains(hit))
                .and_then(|l| l.split("probes=").nth(1))
                .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next())
                .unwrap_or("?")
                .to_owned();
            Ok(format!(
                "random={random} ready={ready}ms punch={punch_ms}ms probes_to_hit={probes} easy_sent={by_easy} random_sent={by_random}"
            ))
        })();
        match result {
            Ok(r) => rows.push(r),
            // A measurement (`strict` off): count, do not fail.
            Err(e) if !strict => {
                failed.push(format!("run {}: {e:#}", i + 1));
            }
            Err(e) => return Err(run.explain(e.context(format!("run {}", i + 1)))),
        }
    }
    Ok(format!(
        "random+easy ({}{}): direct over {} by birthday probing in {}/{runs} runs: {rows:#?}; not direct: {failed:#?}",
        name(easy_kind),
        if hop { ", a router between the NATs" } else { "" },
        transport.as_str(),
        rows.len()
    ))
}

/// A counter on a NAT for UDP (or TCP SYNs) from its LAN toward
/// `peer_nat`.
fn count_rule(peer_nat: &str, syns: bool) -> String {
    let rule = COUNT_RULE.replace("203.0.113.3", peer_nat);
    if syns {
        rule.replace("meta l4proto udp", "tcp flags & (syn | ack) == syn")
    } else {
        rule
    }
}

/// What the easy side may send toward the random side's NAT before it is
/// direct: the probes (2,048 at most), the plain punch (2 candidates × 25
/// rounds), answers and QUIC's handshake.
const EASY_PACKET_BOUND: u64 = 2048 + 2 * 25 + 100;
/// SYNs the easy side may send toward the random side's NAT before it is
/// direct: the probes (the timed punch leaves the random side's public IP
/// to them) and a margin.
const EASY_SYN_BOUND: u64 = 2048 + 50;
/// SYNs the random side may send: one per socket, the same again each
/// 0.9 s for 4 s when TTL-limited (4 rounds), restarts after an ICMP
/// "time exceeded" (≤ 3 per socket; ~6 in all in the lab: routers
/// rate-limit those ICMPs), the kernel's retransmission after the last
/// round, and a margin.
const RANDOM_SYN_BOUND: u64 = 256 * (1 + 4 + 1) + 256 + 100;
/// What the random side may send toward the easy side's NAT: 256 sockets
/// × at most 2 of the peer's IPs × 3 opening rounds, the plain punch,
/// answers and QUIC's handshake.
const RANDOM_PACKET_BOUND: u64 = 256 * 2 * 3 + 2 * 25 + 100;
