//! Staying connected, tested from outside the daemons: NAT state flushed in
//! the middle of a transfer, the peer killed and restarted, the rendezvous
//! killed and restarted, a SIGTERM while streams are open, and a punched
//! connection that carries nothing. Each returns a line with what it
//! measured.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use crate::harness::checks::intact;
use crate::harness::punchd_types::{PathState, Transport};
use crate::harness::spec::{FORWARD_PORT, PUNCH_PORT};
use crate::harness::status::first_peer;
use crate::harness::transfer::{transfer_in, SendReport};
use crate::harness::{Binaries, Expect, Run, Scenario};
use crate::net::nat::NatBehaviour;
use crate::net::netns::listens_on;
use crate::net::topology::{Layout, Links};

/// Bytes of the long transfer that something is done in the middle of.
const LONG: u64 = 256 * 1024 * 1024;

/// Over which direct path a case runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    /// Timed TCP simultaneous open (no added delay).
    Tcp,
    /// UDP hole punch + QUIC, with [`Links::near`] (see lab/README.md).
    Quic,
}

fn start(name: &str, bins: &Binaries, over: Over) -> Result<Run> {
    let s = Scenario::new(
        name,
        Layout::TwoNats(NatBehaviour::Masquerade),
        Expect::Direct,
    );
    let s = match over {
        Over::Tcp => s,
        Over::Quic => s
            .with_transports(&[Transport::Quic])
            .with_links(Links::near()),
    };
    let mut run = Run::start(&s, bins)?;
    with_logs(&mut run, |run| {
        let st = run.wait_path("alice", PathState::Direct, Duration::from_secs(30))?;
        let want = match over {
            Over::Tcp => Transport::Tcp,
            Over::Quic => Transport::Quic,
        };
        let got = first_peer(&st)?.transport;
        if got != Some(want) {
            bail!(
                "direct over {}, expected {}",
                got.map_or("none", Transport::as_str),
                want.as_str()
            );
        }
        Ok(String::new())
    })?;
    Ok(run)
}

/// Runs `f` and adds every log's tail to its error.
fn with_logs(run: &mut Run, f: impl FnOnce(&mut Run) -> Result<String>) -> Result<String> {
    let result = f(run);
    result.map_err(|e| run.explain(e))
}

/// Polls a 1 MiB transfer until one succeeds; returns how long that took.
fn until_transfer_works(run: &Run, since: Instant, timeout: Duration) -> Result<Duration> {
    loop {
        if let Ok(t) = run.transfer(1024 * 1024, 1) {
            if t.ok {
                return Ok(since.elapsed());
            }
        }
        if since.elapsed() > timeout {
            bail!("no working tunnel {timeout:?} after the event");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// alice's punches that ended in a tunnel; 0 while her status is
/// unreadable (a count that grew is what the caller asks about).
fn punches_ok(run: &Run) -> u64 {
    run.status("alice")
        .ok()
        .and_then(|doc| doc.peers.first().map(|p| p.punches_ok))
        .unwrap_or(0)
}

/// Connections alice's forward has accepted; 0 while unreadable.
fn forward_connections(run: &Run) -> u64 {
    run.status("alice")
        .ok()
        .and_then(|doc| doc.forwards.first().map(|f| f.total))
        .unwrap_or(0)
}

/// A transfer of `bytes` through alice's forward on its own thread.
fn transfer_in_background(
    run: &Run,
    bytes: u64,
    streams: usize,
) -> std::thread::JoinHandle<Result<SendReport>> {
    let ns = run.topo.host_a.name().to_owned();
    let tool = run.bins().tool.clone();
    std::thread::spawn(move || transfer_in(&ns, &tool, bytes, streams, None))
}

fn long_transfer_in_background(run: &Run) -> std::thread::JoinHandle<Result<SendReport>> {
    transfer_in_background(run, LONG, 4)
}

/// `conntrack -F` on every NAT in the middle of a transfer: the mappings
/// are gone, and the daemons must end up with a working tunnel again.
pub fn conntrack_flush(bins: &Binaries, over: Over) -> Result<String> {
    let mut run = start(&format!("flush-{over:?}").to_lowercase(), bins, over)?;
    with_logs(&mut run, |run| {
        let before = punches_ok(run);
        let bg = long_transfer_in_background(run);
        std::thread::sleep(Duration::from_millis(400));
        for nat in &run.topo.nats {
            nat.exec("conntrack", &["-F"])?;
        }
        let flushed = Instant::now();
        let inflight = bg.join().map_err(|_| anyhow!("sender thread panicked"))??;
        let recovered = until_transfer_works(run, flushed, Duration::from_secs(30))?;
        // Over QUIC nothing tells the daemons at once (no NAT answers a
        // UDP packet with a RST): the keepalive notices within its 10 s
        // timeout, and both sides move to fresh UDP ports before punching
        // again, because the flush left the NATs holding entries for each
        // side's in-flight packets that re-map the other's old port
        // (lab/README.md, "UDP and conntrack"). Direct again within 25 s of
        // the flush (before fresh ports: relayed at 25 s, direct at 38–43).
        let wait_direct = match over {
            Over::Tcp => Duration::ZERO,
            Over::Quic => Duration::from_secs(25).saturating_sub(flushed.elapsed()),
        };
        run.wait_path("alice", PathState::Direct, wait_direct)
            .map_err(|e| anyhow!("after the flush the path is not direct: {e}"))?;
        let direct_again = flushed.elapsed();
        let repunched = punches_ok(run) > before;
        Ok(format!(
            "conntrack -F mid-transfer ({over:?}): in-flight transfer {}, tunnel {}, working again {:.2}s after the flush, direct {:.2}s after",
            if inflight.ok { "completed" } else { "broke" },
            if repunched { "re-punched" } else { "survived" },
            recovered.as_secs_f64(),
            direct_again.as_secs_f64()
        ))
    })
}

/// A punched connection whose SYNs got through but whose data does not:
/// bob's host drops every segment alice sends on the first connection that
/// carries data (what a NAT that mistracks a simultaneous open does to the
/// connection: its packets leave untranslated). Both TLS handshakes fail,
/// and the same punch session must punch again and end direct, not wait
/// for the relay and a later upgrade.
pub fn dead_connection_is_punched_again(bins: &Binaries) -> Result<String> {
    // The first data segment from alice to the punch port marks its
    // connection, once (the set remembers that it was done); every later
    // segment of that connection but SYNs and RSTs is dropped. The reset
    // that ends it (either way) clears the mark, because the next
    // connection on the same ports may reuse the conntrack entry.
    let rules = format!(
        "table inet lab_break {{\n  set done {{ type inet_service; flags dynamic; }}\n\
         \x20 chain input {{\n    type filter hook input priority -10; policy accept;\n\
         \x20   ip saddr {alice} tcp dport {port} meta length > 120 ct mark 0 tcp dport != @done ct mark set 1 add @done {{ tcp dport }}\n\
         \x20   ip saddr {alice} tcp dport {port} tcp flags & rst != 0 ct mark set 0\n\
         \x20   ip saddr {alice} tcp dport {port} ct mark 1 tcp flags & (syn | rst) == 0 drop\n  }}\n\
         \x20 chain output {{\n    type filter hook output priority -10; policy accept;\n\
         \x20   ip daddr {alice} tcp sport {port} tcp flags & rst != 0 ct mark set 0\n  }}\n}}\n",
        alice = "203.0.113.2",
        port = PUNCH_PORT,
    );
    // NATs that drop unsolicited SYNs, and a 40 s session: between two
    // RST-answering NATs at the lab's zero delay a punch usually connects
    // in ~50 ms but has a long tail of its own (BENCHMARKS.md, punch
    // timing), and the point here is what happens after the TLS handshake
    // fails, 5 s after the first connection.
    let s = Scenario::new(
        "dead-conn",
        Layout::TwoNats(NatBehaviour::DropUnsolicited),
        Expect::Direct,
    )
    .with_timeout("40s")
    .with_host_b_rules(&rules);
    let mut run = Run::start(&s, bins)?;
    with_logs(&mut run, |run| {
        let st = run.wait_path("alice", PathState::Direct, Duration::from_secs(60))?;
        let (elapsed, attempts) = first_peer(&st)?
            .last_punch
            .as_ref()
            .map_or((0, 0), |p| (p.elapsed_ms, p.attempts));
        // The TLS handshake timeout (5 s) passed inside this punch: the
        // direct path came from the same session, punched again (without
        // that, the session ends relayed at 40 s and goes direct only by
        // the upgrade 11–19 s later, a punch of some 50 ms).
        if elapsed < 5_000 {
            bail!("the direct path came from a punch of {elapsed} ms: the dead connection was not what was punched again (was the rule hit? see the logs)");
        }
        let t = run.transfer(8 * 1024 * 1024, 2)?;
        intact(&t, "transfer over the re-punched path failed")?;
        Ok(format!(
            "dead punched connection: direct after punching again, {:.2}s from the order, {} attempts, 8 MiB intact",
            elapsed as f64 / 1000.0,
            attempts
        ))
    })
}

/// SIGKILL bob, restart him: alice's forward works again soon after.
pub fn peer_restart(bins: &Binaries, over: Over) -> Result<String> {
    let mut run = start(&format!("restart-{over:?}").to_lowercase(), bins, over)?;
    with_logs(&mut run, |run| {
        // Killed mid-transfer: the harder case, since a socket with unread
        // data dies with a bare RST rather than a FIN.
        let bg = long_transfer_in_background(run);
        std::thread::sleep(Duration::from_millis(300));
        run.topo.host_b.kill(run.bob);
        let broken = bg.join().map_err(|_| anyhow!("sender thread panicked"))??;
        if broken.ok {
            bail!("the transfer through a killed peer claims to have completed");
        }
        std::thread::sleep(Duration::from_secs(1));
        let up = Instant::now();
        run.bob = run.start_daemon("bob")?;
        let back = until_transfer_works(run, up, Duration::from_secs(30))?;
        // A killed TCP peer's kernel sends a FIN: the survivor knows at
        // once. QUIC has no kernel to say goodbye: the survivor learns it
        // from the restarted peer's stateless reset to its next packet, or
        // at the latest from its keepalive timeout (10 s after the kill).
        let limit = match over {
            Over::Tcp => Duration::from_secs(5),
            Over::Quic => Duration::from_secs(10),
        };
        if back > limit {
            bail!(
                "tunnel back only {:.2}s after the peer came up (want ≤ {limit:?})",
                back.as_secs_f64()
            );
        }

        Ok(format!(
            "peer killed and restarted ({over:?}): forward working {:.2}s after it came up",
            back.as_secs_f64()
        ))
    })
}

/// SIGKILL the rendezvous mid-transfer and restart it: the direct tunnel
/// keeps carrying bytes, and both daemons re-register.
pub fn rendezvous_restart(bins: &Binaries) -> Result<String> {
    let mut run = start("rv-restart", bins, Over::Tcp)?;
    with_logs(&mut run, |run| {
        let bg = long_transfer_in_background(run);
        std::thread::sleep(Duration::from_millis(300));
        run.kill_rendezvous();
        std::thread::sleep(Duration::from_secs(1));
        let up = Instant::now();
        run.start_rendezvous(None)?;
        let mut registered = None;
        while up.elapsed() < Duration::from_secs(20) {
            let ok = ["alice", "bob"]
                .iter()
                .all(|w| run.status(w).is_ok_and(|doc| doc.rendezvous == "connected"));
            if ok {
                registered = Some(up.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let registered =
            registered.ok_or_else(|| anyhow!("daemons did not re-register within 20s"))?;
        let t = bg.join().map_err(|_| anyhow!("sender thread panicked"))??;
        intact(
            &t,
            "the direct transfer broke while the rendezvous was down",
        )?;
        if registered > Duration::from_secs(10) {
            bail!(
                "re-registered only after {:.2}s (want ≤ 10s)",
                registered.as_secs_f64()
            );
        }
        Ok(format!(
            "rendezvous killed mid-transfer: {} MiB direct transfer intact, both daemons re-registered {:.2}s after restart",
            t.bytes >> 20,
            registered.as_secs_f64()
        ))
    })
}

/// SIGTERM alice while a transfer runs: the stream drains, she exits 0,
/// and the forward listener is gone.
pub fn sigterm_drains(bins: &Binaries) -> Result<String> {
    let mut run = start("sigterm", bins, Over::Tcp)?;
    with_logs(&mut run, |run| {
        // Size the transfer to ~2 s of this machine's throughput: long
        // enough to be cut by a SIGTERM, short enough for the 5 s drain.
        let warmup = run.transfer(64 * 1024 * 1024, 2)?;
        let rate = warmup.bytes as f64 / warmup.seconds.max(0.01);
        let bytes = ((rate * 2.0) as u64).clamp(64 << 20, 512 << 20);
        let bg = transfer_in_background(run, bytes, 2);
        // SIGTERM only once both streams are open.
        let deadline = Instant::now() + Duration::from_secs(10);
        while forward_connections(run) < 4 {
            if Instant::now() > deadline {
                bail!("the transfer's streams never opened");
            }
            std::thread::sleep(Duration::from_millis(20));
        }

        if bg.is_finished() {
            bail!("the transfer ended before the SIGTERM; nothing was drained");
        }
        let t0 = Instant::now();
        let code = run
            .topo
            .host_a
            .terminate(run.alice, Duration::from_secs(15));

        let exited = t0.elapsed();
        let t = bg.join().map_err(|_| anyhow!("sender thread panicked"))??;
        if code != Some(0) {
            bail!("punchd exited with {code:?} on SIGTERM, want 0");
        }
        intact(&t, "the open streams were cut instead of drained")?;
        if listens_on(run.topo.host_a.name(), FORWARD_PORT) {
            bail!("the forward still listens after exit");
        }
        Ok(format!(
            "SIGTERM with streams open: {} MiB drained intact, exit 0 after {:.2}s",
            t.bytes >> 20,
            exited.as_secs_f64()
        ))
    })
}
