//! An attack that needs a network (issue #24): a peer gone rogue tries to
//! aim alice's punches at hosts on her own LAN and at a third party.
//!
//! mallory is a real rendezvous client (its own key, a signed hello) that
//! alice lists in `[[peers]]`: a peer whose key was stolen, or who turned.
//! It registers from bob's host claiming "local" addresses on alice's LAN
//! (her router's `192.0.2.1:22`, an absent `192.0.2.99:22`), a
//! "router-mapped" endpoint on the rendezvous host (`203.0.113.1:22`) and
//! UDP port 22, then asks for punches to alice again and again.
//!
//! The defences it meets: the rendezvous passes a daemon's own addresses
//! only to a peer in its site and a mapped endpoint only on the IP it
//! observed, and alice keeps only candidates on the peer's public IPs. So
//! alice punches mallory's public endpoint and nothing else. An nftables
//! counter in alice's host counts every packet to a victim (port 22, TCP
//! or UDP) and must read 0, while alice and bob move checksummed bytes over
//! their direct tunnel the whole time. One connect to a victim at the end
//! must then be counted: the counter is proven to count.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use ed25519_dalek::SigningKey;
use punch_rendezvous::protocol::{b64, ClientMsg, ServerMsg};
use serde::{Deserialize, Serialize};

use super::loadgen::{recv, register_as, send};
use crate::harness::checks::intact;
use crate::harness::punchd_types::PathState;
use crate::harness::{Binaries, Expect, Run, Scenario};
use crate::net::nat::NatBehaviour;
use crate::net::topology::{Layout, RENDEZVOUS_IP};

/// Addresses mallory claims as its own LAN: alice's router and a host
/// that is not there, both on alice's LAN.
const CLAIMED_LOCAL: [&str; 2] = ["192.0.2.1:22", "192.0.2.99:22"];
/// What mallory claims its router mapped for it: the rendezvous host.
const CLAIMED_MAPPED: &str = "203.0.113.1:22";

/// Counts, in alice's host, every packet to a victim of the claims above.
const VICTIM_COUNTER: &str = "table inet lab_victims {
  chain out {
    type filter hook output priority 0; policy accept;
    ip daddr { 192.0.2.1, 192.0.2.99, 203.0.113.1 } meta l4proto { tcp, udp } th dport 22 counter
  }
}
";

/// mallory's key: fixed, so alice's config can list it.
fn mallory_key() -> SigningKey {
    SigningKey::from_bytes(&[0x6d; 32])
}

/// What the rogue client saw.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RogueReport {
    /// Punch orders the server sent mallory (each one also went to the peer).
    pub orders: u32,
    /// Requests the server refused (rate limits, caps).
    pub refused: u32,
}

/// Registers as `mallory` with the claims above and asks for `count`
/// punches to `peer`, `interval` apart.
pub async fn rogue(
    addr: SocketAddr,
    peer: &str,
    count: u32,
    interval: Duration,
) -> Result<RogueReport> {
    let local = CLAIMED_LOCAL
        .iter()
        .map(|a| a.parse())
        .collect::<Result<Vec<SocketAddr>, _>>()?;
    let mapped: SocketAddr = CLAIMED_MAPPED.parse()?;
    let mut ws = register_as(addr, "mallory", &mallory_key(), |hello| {
        hello.local_addrs = local;
        hello.mapped_tcp = Some(mapped);
        hello.udp_port = Some(22);
    })
    .await?;
    let mut report = RogueReport::default();
    for _ in 0..count {
        send(
            &mut ws,
            &ClientMsg::Connect {
                peer: peer.to_owned(),
            },
        )
        .await?;
        match tokio::time::timeout(Duration::from_secs(2), recv(&mut ws)).await {
            Ok(Ok(ServerMsg::Punch(_))) => report.orders += 1,
            Ok(Ok(ServerMsg::Error { .. })) => report.refused += 1,
            _ => {}
        }
        tokio::time::sleep(interval).await;
    }
    Ok(report)
}

/// Runs the attack (see the module doc); returns a one-line summary.
pub fn rogue_peer_aims_at_the_lan(bins: &Binaries) -> Result<String> {
    let mut s = Scenario::new(
        "attack-lan",
        Layout::TwoNats(NatBehaviour::Masquerade),
        Expect::Direct,
    );
    s.bytes = 16 << 20;
    s.extra_config.0 = format!(
        "[[peers]]\nname = \"mallory\"\npublic_key = \"{}\"\n",
        b64(mallory_key().verifying_key().as_bytes())
    );
    let mut run = Run::start(&s, bins)?;
    match attack(&s, &mut run, bins) {
        Ok(summary) => {
            if std::env::var_os(crate::harness::run::CAPTURE_ENV).is_none() {
                let _ = std::fs::remove_dir_all(&run.dir);
            }
            Ok(summary)
        }
        Err(e) => Err(run.explain(e)),
    }
}

fn attack(s: &Scenario, run: &mut Run, bins: &Binaries) -> Result<String> {
    run.wait_path("alice", PathState::Direct, Duration::from_secs(30))?;
    run.topo.host_a.nft(VICTIM_COUNTER)?;
    let log = run.dir.join("mallory.log");
    let rendezvous = format!("{RENDEZVOUS_IP}:8080");
    let mallory = run.topo.host_b.spawn(
        &bins.tool,
        &[
            "rogue",
            "--addr",
            &rendezvous,
            "--peer",
            "alice",
            "--count",
            "6",
            "--interval-ms",
            "400",
        ],
        &[],
        &log,
    )?;
    // Honest bytes while the attack runs.
    let t = run.transfer(s.bytes, s.streams)?;
    intact(&t, "the honest transfer during the attack failed")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while run.topo.host_b.is_running(mallory) {
        if Instant::now() > deadline {
            bail!("the rogue client did not finish within 20 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = std::fs::read_to_string(&log).with_context(|| format!("read {}", log.display()))?;
    let report: RogueReport = text
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .with_context(|| format!("no report from the rogue client: {text}"))?;
    if report.orders == 0 {
        bail!("no punch between mallory and alice was coordinated ({report:?}): the attack did not happen");
    }
    // alice's punches for the last orders run after their fire time.
    std::thread::sleep(Duration::from_secs(2));
    let alice_log = run.first_log("alice");
    let orders_at_alice = alice_log
        .lines()
        .filter(|l| l.contains("punch order") && l.contains("peer=mallory"))
        .count();
    if orders_at_alice == 0 {
        bail!("alice acted on none of mallory's punch orders");
    }
    let hits = victim_packets(run)?;
    if hits != 0 {
        bail!("alice sent {hits} packets to a victim of mallory's claims");
    }
    // The counter counts: one connect to a victim from alice's host.
    let tool = bins.tool.to_str().unwrap_or("punch-lab-tool");
    let _ = run.topo.host_a.exec_output(
        tool,
        &[
            "send",
            "--connect",
            CLAIMED_LOCAL[0],
            "--bytes",
            "1",
            "--streams",
            "1",
        ],
    );
    if victim_packets(run)? == 0 {
        bail!(
            "the victim counter missed a connect to {}: it proves nothing",
            CLAIMED_LOCAL[0]
        );
    }
    let status = run.status("alice")?;
    let bob_direct = status
        .peers
        .iter()
        .any(|p| p.name == "bob" && p.path == PathState::Direct);
    if !bob_direct {
        bail!("alice's tunnel to bob is no longer direct after the attack");
    }
    Ok(format!(
        "rogue peer: {} orders coordinated ({} refused), {orders_at_alice} reached alice; 0 packets to the claimed victims; honest transfer {} MiB intact in {:.2} s; alice-bob still direct",
        report.orders,
        report.refused,
        t.bytes >> 20,
        t.seconds
    ))
}

/// Packets alice's host sent to a victim so far.
fn victim_packets(run: &Run) -> Result<u64> {
    run.topo.host_a.nft_counter("inet", "lab_victims")
}
