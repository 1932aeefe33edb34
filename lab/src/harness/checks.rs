//! The guarantees checked from outside the daemons, shared by the suites:
//! a checked run (no punch port ever in LISTEN, a containerized rendezvous
//! stops cleanly, every log's tail on failure), direct means direct (both
//! ends direct on the expected transport to each other's public address,
//! one path kept after a race, the rendezvous carrying under 1 % of a
//! checksummed transfer), and reading the rendezvous's metrics.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use crate::harness::binaries::Binaries;
use crate::harness::punchd_types::{PathState, PeerDoc, Transport};
use crate::harness::report::Report;
use crate::harness::run::{Run, CAPTURE_ENV};
use crate::harness::spec::{Scenario, PUNCH_PORT};
use crate::harness::stats::binomial_band;
use crate::harness::status::first_peer;
use crate::harness::transfer::{sink_endings, SendReport, CLEAN_EOF};
use crate::net::netns::listens_on;
use crate::net::topology::{Links, Topology};

/// Runs a scenario through `check` with the guarantees every checked run
/// has: the punch port never listens in either host, and a containerized
/// rendezvous stops the way deploy/ promises. On failure the error carries
/// the tails of every log; on success the run's folder is removed (unless
/// captures were asked for).
pub fn run(
    s: &Scenario,
    bins: &Binaries,
    check: impl FnOnce(&Scenario, &Run) -> Result<Report>,
) -> Result<Report> {
    let mut run = Run::start(s, bins)?;
    let result = no_listener_during(&run, || check(s, &run)).and_then(|mut report| {
        // A containerized server must also stop the way deploy/ promises:
        // SIGTERM from the container tool, exit 0 within the grace time.
        if let Some(c) = run.container.as_mut() {
            let code = c.stop(Duration::from_secs(10))?;
            if code != 0 {
                bail!("the rendezvous container exited {code} on SIGTERM (want 0)");
            }
            report.container = run.rendezvous_healthy_after.map(|h| (h, code));
        }
        Ok(report)
    });
    match result {
        Ok(r) => {
            if std::env::var_os(CAPTURE_ENV).is_none() {
                let _ = std::fs::remove_dir_all(&run.dir);
            }
            Ok(r)
        }
        Err(e) => Err(run.explain(e)),
    }
}

/// Runs `f` while watching both hosts: the punch port must never be in
/// LISTEN state (punched connections are simultaneous opens, never
/// accepted).
fn no_listener_during<T>(run: &Run, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let watch = ListenerWatch::start(
        vec![
            run.topo.host_a.name().to_owned(),
            run.topo.host_b.name().to_owned(),
        ],
        PUNCH_PORT,
    );
    let out = f()?;
    let seen = watch.finish();
    if !seen.is_empty() {
        bail!("the punch port {PUNCH_PORT} was in LISTEN state in {seen:?}");
    }
    Ok(out)
}

/// Direct means direct: alice and bob both report a direct path, on the
/// expected transport, each to the other's public address; after a race
/// only the kept path is left; a checksummed transfer goes through with the
/// rendezvous host carrying under 1 % of it; and the path is still direct
/// after it.
pub fn direct(s: &Scenario, run: &Run) -> Result<Report> {
    let mut report = Report {
        name: s.name.clone(),
        ..Default::default()
    };
    let status = run.wait_path("alice", PathState::Direct, Duration::from_secs(30))?;
    report.ready_ms = run.since_start().as_millis() as u64;
    report.read_peer(first_peer(&status)?);
    if let Some(want) = s.expect_transport {
        if report.transport != Some(want) {
            bail!(
                "transport is {}, expected {}",
                report.transport.map_or("none", Transport::as_str),
                want.as_str()
            );
        }
    }
    let bob_ip = &run.topo.bob_seen_from_alice;
    if !reaches(first_peer(&status)?, bob_ip) {
        bail!(
            "alice reaches bob at {}, expected {bob_ip}:*",
            report.remote
        );
    }
    let bob = run.wait_path("bob", PathState::Direct, Duration::from_secs(10))?;
    let alice_ip = &run.topo.alice_seen_from_bob;
    let bob_peer = first_peer(&bob)?;
    if !reaches(bob_peer, alice_ip) {
        bail!(
            "bob reaches alice at {}, expected {alice_ip}*",
            bob_peer.remote_addr.as_deref().unwrap_or("nothing")
        );
    }
    if s.transports.len() > 1 {
        let kept = report
            .transport
            .ok_or_else(|| anyhow!("a direct path with no transport"))?;
        one_path_kept(run, kept)?;
    }
    let (t, rendezvous_bytes) = run.transfer_counted(s.bytes, s.streams)?;
    report.rendezvous_bytes_during_transfer = rendezvous_bytes;
    intact(&t, "transfer failed")?;
    rendezvous_carried_under_1pct(rendezvous_bytes, t.bytes)?;
    report.transfer = Some(t);
    let status = run.status("alice")?;
    let peer = first_peer(&status)?;
    if peer.path != PathState::Direct {
        bail!("path changed during the transfer: {peer:?}");
    }
    Ok(report)
}

/// Both daemons' punch orders all arrived before their firing time
/// (`punchd_orders_late_total` 0): each side's SYNs left on time, which the
/// timed open needs. A late order fires at once, and the side that fired
/// early also gets a TCP minimum RTT far below the path's (BENCHMARKS.md).
pub fn no_late_orders(run: &Run) -> Result<()> {
    for who in ["alice", "bob"] {
        let late = metric(&run.metrics(who)?, "punchd_orders_late_total").unwrap_or(f64::NAN);
        if late != 0.0 {
            bail!("{who}: {late} punch orders arrived after their firing time (punchd_orders_late_total; see the daemon's warning for how late)");
        }
    }
    Ok(())
}

/// Whether `peer` is reached at some port of `ip`.
fn reaches(peer: &PeerDoc, ip: &str) -> bool {
    peer.remote_addr
        .as_deref()
        .is_some_and(|r| r.starts_with(&format!("{ip}:")))
}

/// Every stream's sha256 matched what the sink saw.
pub fn intact(t: &SendReport, what: &str) -> Result<()> {
    if !t.ok {
        bail!("{what}: {:?}", t.errors);
    }
    Ok(())
}

/// Direct means direct, from outside: the rendezvous host's interface saw
/// under 1 % of the bytes moved.
pub fn rendezvous_carried_under_1pct(rendezvous_bytes: u64, moved: u64) -> Result<()> {
    if rendezvous_bytes * 100 >= moved {
        bail!(
            "the rendezvous saw {rendezvous_bytes} bytes during a {moved}-byte transfer: not direct"
        );
    }
    Ok(())
}

/// After a race, both ends must name the same transport and the losing
/// path must be gone: no TCP connection between the hosts if QUIC was kept,
/// no QUIC connection left on either endpoint if TCP was.
pub fn one_path_kept(run: &Run, kept: Transport) -> Result<()> {
    let bob_ip = &run.topo.bob_seen_from_alice;
    let tcp_to_bob = || -> Result<bool> {
        let out = run.topo.host_a.exec_output(
            "ss",
            &[
                "-Htn",
                "state",
                "established",
                &format!("( sport = :{PUNCH_PORT} )"),
            ],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).contains(&format!("{bob_ip}:")))
    };
    // Unknown (QUIC off at that end) counts as open: the race must say.
    let quic_open = |who: &str| -> Result<u64> {
        Ok(run
            .status(who)?
            .quic_connections
            .map_or(u64::MAX, |n| n as u64))
    };
    // A losing QUIC connection is closed at once, but when its
    // CONNECTION_CLOSE is lost (the lossy cases) the other end holds it
    // until the QUIC idle timeout: keepalive interval + timeout, 15 s by
    // default. Seen once in CI at 2 % loss: one left after 10 s.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let bob = first_peer(&run.status("bob")?)?.transport;
        let done = bob == Some(kept)
            && match kept {
                Transport::Quic => !tcp_to_bob()?,
                Transport::Tcp => quic_open("alice")? == 0 && quic_open("bob")? == 0,
                Transport::Relay => bail!("unexpected transport relay after a race"),
            };
        if done {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "after the race alice kept {}, bob {}; TCP to bob open: {}, QUIC connections: alice {}, bob {}",
                kept.as_str(),
                bob.map_or("none", Transport::as_str),
                tcp_to_bob()?,
                quic_open("alice")?,
                quic_open("bob")?
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A value from Prometheus text: the first sample whose name and labels
/// start with `prefix`.
pub fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix)?.trim().parse().ok())
}

/// Watches both hosts for a listener on the punch port until stopped.
pub struct ListenerWatch {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl ListenerWatch {
    /// Starts watching these namespaces.
    pub fn start(namespaces: Vec<String>, port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                for ns in &namespaces {
                    if listens_on(ns, port) && !seen.contains(ns) {
                        seen.push(ns.clone());
                    }
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            seen
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops and returns the namespaces where a listener was seen.
    pub fn finish(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for ListenerWatch {
    /// A check that failed before [`ListenerWatch::finish`] still stops
    /// the watching thread.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Probes per lossy round trip, 2 ms apart (2 s): enough that the band a
/// working emulator stays in ([`LOSS_FALSE_ALARM`]) excludes zero on every
/// lossy round trip the lab builds (1.99 % of 1,000: 3 to 44 lost).
const LOSS_PROBES: u32 = 1000;
/// How rare a lost count must be, on either side, to fail the check: one
/// run in a million per side, so the dozens of checks in a CI run do not
/// fail on chance (a normal-approximation band at 500 probes did, once).
const LOSS_FALSE_ALARM: f64 = 1e-6;
/// Probes per lossless round trip (the RTT only).
const RTT_PROBES: u32 = 20;

/// The link emulation is really applied, measured with `ping` from alice's
/// host on every emulated round trip (to the rendezvous, to bob's public
/// address): no reply faster than the configured delay (less jitter, less
/// 0.5 ms: a packet the emulator let through unheld, as `--queue-bypass`
/// does before it binds, comes back in ~0.1 ms), a median no more than
/// 10 % + 3 ms above it (plus jitter; the emulator's own test measures
/// within 10 %; the median, because on this shared machine one probe in
/// twenty can wait for a CPU: a mean of 15.2 ms, min 10.27 ms, was seen
/// on a 10 ms path), and, where loss is set, a lost count no rarer than
/// [`LOSS_FALSE_ALARM`] on the exact binomial. Returns
/// what was measured, for the report.
pub fn link_emulation_applied(topo: &Topology, links: &Links) -> Result<String> {
    let mut seen = Vec::new();
    for (dst, imp) in topo.emulated_round_trips(links) {
        let want = imp.delay.as_secs_f64() * 1e3;
        let jitter = imp.jitter.as_secs_f64() * 1e3;
        let lossy = imp.loss > 0.0;
        let (count, interval) = if lossy {
            (LOSS_PROBES, "0.002")
        } else {
            (RTT_PROBES, "0.02")
        };
        let p = topo.ping(&dst, count, interval)?;
        if p.received == 0 {
            bail!("no ping reply from {dst} through the emulated links: {p:?}");
        }
        let (low, high) = (want - jitter - 0.5, want * 1.1 + jitter + 3.0);
        if p.min_ms < low || p.median_ms > high {
            bail!(
                "ping to {dst}: min {:.2} ms, median {:.2} ms; the emulated links should give {want:.1} ms (± {jitter:.1}), so min ≥ {low:.1} and median ≤ {high:.1}: the emulator is not delaying as asked",
                p.min_ms,
                p.median_ms
            );
        }
        let mut line = format!(
            "{dst} rtt min/median {:.1}/{:.1} ms (want {want:.0})",
            p.min_ms, p.median_ms
        );
        if lossy {
            let (low, high) = binomial_band(p.sent, imp.loss, LOSS_FALSE_ALARM);
            let lost = p.sent - p.received;
            if !(low..=high).contains(&lost) {
                bail!(
                    "ping to {dst}: {lost} of {} lost; the emulated links drop {:.2} %, so {low} to {high} (a false alarm one run in a million): the emulator is not dropping as asked",
                    p.sent,
                    imp.loss * 100.0,
                );
            }
            line.push_str(&format!(", lost {lost}/{} (want {low} to {high})", p.sent));
        }
        seen.push(line);
    }
    Ok(seen.join("; "))
}

/// No silent truncation (DESIGN.md: bytes arrive complete and in order or
/// the stream errors): every connection bob's sink saw end in a clean EOF
/// carried one of the sizes that were sent (`sizes`, per stream), and no
/// sender stream got a clean EOF in place of the sink's answer. A stream
/// that a broken tunnel cuts must end in an error (a reset) on both local
/// sockets, never a FIN.
pub fn no_silent_truncation(run: &Run, sizes: &[u64], sent: &[&SendReport]) -> Result<()> {
    let short: Vec<u64> = sink_endings(&run.dir.join("sink.log"))
        .into_iter()
        .filter(|e| e.clean && !sizes.contains(&e.bytes))
        .map(|e| e.bytes)
        .collect();
    if !short.is_empty() {
        bail!(
            "silent truncation: bob's sink saw a clean EOF after {short:?} bytes (streams were {sizes:?}): a cut stream must end in a reset"
        );
    }
    let clean: usize = sent
        .iter()
        .map(|t| t.errors.iter().filter(|e| e.contains(CLEAN_EOF)).count())
        .sum();
    if clean > 0 {
        bail!("silent truncation: {clean} sender stream(s) got a clean EOF from alice's forward instead of an error");
    }
    Ok(())
}
