//! The scenario suite: each named network of [`matrix`] end to end, with
//! the check its expected outcome calls for. Direct ones get the shared
//! [`checks::direct`]; the relayed one must carry every byte through the
//! rendezvous without the rendezvous ever seeing plaintext; a direct-only
//! one must fail its punch, say why, and never touch the relay.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::harness::checks::{self, intact, metric};
use crate::harness::matrix;
use crate::harness::punchd_types::{PathState, Transport};
use crate::harness::run::{wait, Run};
use crate::harness::status::first_peer;
use crate::harness::transfer::transfer_in;
use crate::harness::{Binaries, Expect, Report, Scenario};

/// Runs a scenario and checks its guarantees. On failure the error carries
/// the tails of every log.
pub fn run(s: &Scenario, bins: &Binaries) -> Result<Report> {
    checks::run(s, bins, check)
}

/// Runs the scenario of [`matrix`] called `name`.
pub fn run_named(name: &str, bins: &Binaries) -> Result<Report> {
    let s = matrix::by_name(name).with_context(|| format!("no scenario called {name:?}"))?;
    run(&s, bins)
}

fn check(s: &Scenario, run: &Run) -> Result<Report> {
    match s.expect {
        Expect::Direct => checks::direct(s, run),
        Expect::Relayed => relayed(s, run),
        Expect::PunchFails => punch_fails(s, run),
    }
}

/// No direct path: the relay carries the tunnel, every byte of it through
/// the rendezvous host, and the failed punch says why.
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
        bail!(
            "transport is {}, expected relay",
            peer.transport.map_or("none", Transport::as_str)
        );
    }
    if report.punch_reason.is_none() {
        bail!("a relayed path must say why the punch failed");
    }
    run.wait_path("bob", PathState::Relayed, Duration::from_secs(10))?;
    let (t, rendezvous_bytes) = run.transfer_counted(s.bytes, s.streams)?;
    report.rendezvous_bytes_during_transfer = rendezvous_bytes;
    intact(&t, "relayed transfer failed")?;
    // Through the relay, the rendezvous host carries every byte (in and out).
    if rendezvous_bytes < t.bytes {
        bail!(
            "the rendezvous saw only {rendezvous_bytes} bytes of a {}-byte relayed transfer",
            t.bytes
        );
    }
    report.transfer = Some(t);
    check_relay_sees_ciphertext(run)?;
    Ok(report)
}

/// No path at all: alice reports a failed punch (a direct-only one says
/// so and the relay was never used), and the forward refuses rather than
/// hangs.
fn punch_fails(s: &Scenario, run: &Run) -> Result<Report> {
    let mut report = Report {
        name: s.name.clone(),
        ..Default::default()
    };
    let status = wait(
        "alice to report a failed punch",
        Duration::from_secs(40),
        || {
            run.status("alice").ok().filter(|doc| {
                doc.peers
                    .first()
                    .and_then(|p| p.last_punch.as_ref())
                    .is_some_and(|p| p.result == "failed")
            })
        },
    )?;
    let peer = first_peer(&status)?;
    report.read_peer(peer);
    report.punch_reason = peer.last_punch.as_ref().and_then(|p| p.reason.clone());
    if report.path != PathState::None {
        bail!("path is {} after a failed punch", report.path.as_str());
    }
    if s.punch_extra.contains("direct-only") {
        let why = report.punch_reason.clone().unwrap_or_default();
        if !why.contains("direct-only") {
            bail!("a direct-only failure must say so; reason was {why:?}");
        }
        let relays =
            metric(&run.rendezvous_metrics()?, "punch_rendezvous_relays_total").unwrap_or(-1.0);
        if relays != 0.0 {
            bail!("direct-only daemons used the relay ({relays} relays)");
        }
    }

    // A connection to the forward must end (refused), not hang: README.md
    // promises a new connection waits at most `timeout + 5 s` for the
    // tunnel. 1 s of margin covers starting the sender in the namespace
    // and its connect on a loaded machine.
    let timeout = s
        .punch_timeout
        .strip_suffix('s')
        .and_then(|n| n.parse::<u64>().ok())
        .with_context(|| format!("punch timeout {:?} is not whole seconds", s.punch_timeout))?;
    let limit = Duration::from_secs(timeout + 5 + 1);
    let t0 = Instant::now();
    let t = run.transfer(1024, 1)?;
    let refused = t0.elapsed();
    if t.ok {
        bail!("a transfer succeeded with no path");
    }
    if refused > limit {
        bail!(
            "the forward held a connection {:.2}s with no path (want ≤ timeout {timeout}s + 5s + 1s)",
            refused.as_secs_f64()
        );
    }
    report.refused_after = Some(refused);
    Ok(report)
}

/// Plaintext the relay check sends, to look for in a capture.
pub const MARKER: &str = "PUNCHD-PLAINTEXT-MARKER-";

/// The relayed scenario's extra checks: the relay carried the bytes, and a
/// capture on the rendezvous host never shows the plaintext.
fn check_relay_sees_ciphertext(run: &Run) -> Result<u64> {
    let pcap = run.dir.join("rv.pcap");
    let mut cap = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            run.topo.rv.name(),
            "tcpdump",
            "-i",
            "eth0",
            "-s",
            "0",
            "-U",
            "-w",
        ])
        .arg(&pcap)
        .arg("tcp port 8080")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("cannot start tcpdump (apt-get install tcpdump)")?;
    std::thread::sleep(Duration::from_millis(500));
    let sent = transfer_in(
        run.topo.host_a.name(),
        &run.bins().tool,
        2 * 1024 * 1024,
        1,
        Some(MARKER),
    );
    std::thread::sleep(Duration::from_millis(300));
    let _ = std::process::Command::new("kill")
        .args(["-INT", &cap.id().to_string()])
        .status();
    let _ = cap.wait();
    let sent = sent?;
    intact(&sent, "marker transfer over the relay failed")?;
    let captured = std::fs::read(&pcap).with_context(|| format!("reading {}", pcap.display()))?;
    if (captured.len() as u64) < sent.bytes {
        bail!(
            "the capture holds {} bytes, less than the {} relayed: it did not see the relay",
            captured.len(),
            sent.bytes
        );
    }
    if captured
        .windows(MARKER.len())
        .any(|w| w == MARKER.as_bytes())
    {
        bail!("plaintext seen on the rendezvous host: the relay is not end-to-end encrypted");
    }
    Ok(captured.len() as u64)
}
