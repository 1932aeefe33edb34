//! The fault-injecting soak: two daemons behind two NATs on delayed links,
//! paced streams of checked traffic both ways through alice's forward,
//! and faults at seeded random intervals (a NAT's conntrack flushed, a
//! daemon SIGKILLed and restarted, the rendezvous SIGKILLed and
//! restarted, a burst of loss, a NAT with shortened conntrack timeouts).
//! At the end: bytes moved, streams opened and broken with each failure
//! put down to the fault that explains it, bytes corrupted, streams
//! silently truncated, recovery per fault kind, and both daemons' RSS and
//! fds (`punch-lab-tool soak`, `tests/soak.rs`).
//!
//! - [`schedule`]: which faults, when (a pure function of the seed).
//! - [`stream`]: the checked, framed streams; the client (in hostA) and
//!   server (in hostB, in place of bob's sink) that `punch-lab-tool` runs.
//! - [`verdict`]: attribution, recovery, growth, pass or fail (pure).
//!
//! This file is the thin part: it brings the lab up, injects the plan,
//! reads both processes' JSON lines and hands the record to the verdict.

pub mod schedule;
pub mod stream;
pub mod verdict;

use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::harness::punchd_types::PathState;
use crate::harness::run::wait;
use crate::harness::spec::{FORWARD_LISTEN, SINK_LISTEN};
use crate::harness::status;
use crate::harness::{Binaries, Expect, Run, Scenario};
use crate::net::linkem::{loss_ruleset, LOSS_TABLE};
use crate::net::nat::NatBehaviour;
use crate::net::netns::{listens_on, Netns};
use crate::net::topology::{Layout, Link, Links};
use schedule::{Fault, Side, KILL_DOWN, LOSS_BURST, LOSS_PERCENT, SHORT_TIMEOUTS, SHORT_WINDOW};
use stream::{now_ms, End, PROBE_TIMEOUT, STALL};
use verdict::{Footprint, Growth, Injected, Summary};

/// What to soak.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long, warm-up and wind-down included.
    pub duration: Duration,
    /// Seeds the fault plan and the streams' patterns.
    pub seed: u64,
    /// Long streams open at once.
    pub streams: u32,
    /// Each stream's rate each way, bytes per second. Paced, so the soak
    /// is about staying up under faults, not about throughput on two
    /// shared cores.
    pub rate: u64,
    /// Bytes after which a stream ends and is replaced (so both long-lived
    /// streams and fresh opens are exercised).
    pub stream_bytes: u64,
}

impl Options {
    /// Six streams at 512 KiB/s each way, 8 MiB each (~16 s).
    pub fn new(duration: Duration, seed: u64) -> Self {
        Self {
            duration,
            seed,
            streams: 6,
            rate: 512 * 1024,
            stream_bytes: 8 * 1024 * 1024,
        }
    }
}

/// A seed from the clock, for runs that do not ask for one (printed in
/// the summary, so a failure can be replayed with `--seed`).
pub fn clock_seed() -> u64 {
    now_ms() ^ u64::from(std::process::id()) << 40
}

/// Time before the first fault: streams open and a probe through.
const WARM_UP: Duration = Duration::from_secs(8);
/// Time after the last fault: streams reopened, footprints measured.
const WIND_DOWN: Duration = Duration::from_secs(10);
/// 10 ms each way on each NAT's internet link (40 ms RTT host to host).
const LINK_MS: u64 = 10;

/// New complete JSON lines of a log a process is still writing.
struct Tail {
    path: PathBuf,
    offset: u64,
    partial: String,
    ends: Vec<End>,
}

impl Tail {
    fn new(path: PathBuf) -> Self {
        Self {
            path,
            offset: 0,
            partial: String::new(),
            ends: Vec::new(),
        }
    }

    /// Reads what was appended since the last call; lines that are not an
    /// [`End`] (a panic message, say) are skipped.
    fn poll(&mut self) {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return;
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut buf = String::new();
        let Ok(n) = f.read_to_string(&mut buf) else {
            return;
        };
        self.offset += n as u64;
        self.partial.push_str(&buf);
        while let Some(i) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=i).collect();
            if let Ok(e) = serde_json::from_str::<End>(line.trim()) {
                self.ends.push(e);
            }
        }
    }
}

/// A daemon's RSS and open fds from /proc.
fn footprint(ns: &Netns, index: usize) -> Result<Footprint> {
    let pid = ns
        .pid(index)
        .ok_or_else(|| anyhow!("no process {index} in {}", ns.name()))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("/proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
    Ok(Footprint { rss_kib, fds })
}

fn footprints(run: &Run) -> Result<[Footprint; 2]> {
    Ok([
        footprint(&run.topo.host_a, run.alice)?,
        footprint(&run.topo.host_b, run.bob)?,
    ])
}

/// The NAT facing the internet on `side`.
fn nat(run: &Run, side: Side) -> Result<&Netns> {
    let i = match side {
        Side::A => run.topo.outer_nat_a,
        Side::B => run.topo.outer_nat_b,
    };
    i.and_then(|i| run.topo.nats.get(i))
        .ok_or_else(|| anyhow!("no NAT on side {side:?}"))
}

/// Sleeps `d`, reading the client's log meanwhile.
fn idle(tail: &mut Tail, d: Duration) {
    let until = Instant::now() + d;
    while Instant::now() < until {
        tail.poll();
        std::thread::sleep(Duration::from_millis(100).min(until - Instant::now()));
    }
}

/// Does `fault` to the running lab; returns when it is over.
fn inject(run: &mut Run, fault: Fault, tail: &mut Tail) -> Result<()> {
    match fault {
        Fault::Flush(side) => {
            nat(run, side)?.exec("conntrack", &["-F"])?;
        }
        Fault::KillPeer(side) => {
            let who = if side == Side::A { "alice" } else { "bob" };
            match side {
                Side::A => run.topo.host_a.kill(run.alice),
                Side::B => run.topo.host_b.kill(run.bob),
            }
            idle(tail, KILL_DOWN);
            let i = run.start_daemon(who)?;
            match side {
                Side::A => run.alice = i,
                Side::B => run.bob = i,
            }
        }
        Fault::KillRendezvous => {
            run.kill_rendezvous();
            idle(tail, KILL_DOWN);
            run.start_rendezvous(None)?;
        }
        Fault::Loss(side) => {
            nat(run, side)?.nft(&loss_ruleset("wan0", LOSS_PERCENT))?;
            idle(tail, LOSS_BURST);
            nat(run, side)?.exec("nft", &["delete", "table", "inet", LOSS_TABLE])?;
        }
        Fault::ShortTimeouts(side) => {
            // Per-namespace sysctls: only this NAT's conntrack changes, and
            // they go with the namespace if the soak dies meanwhile.
            let ns = nat(run, side)?;
            let mut old = Vec::new();
            for (name, short) in SHORT_TIMEOUTS {
                let was = ns.exec("sysctl", &["-n", name])?;
                old.push((name, String::from_utf8_lossy(&was.stdout).trim().to_owned()));
                ns.exec("sysctl", &["-qw", &format!("{name}={short}")])?;
            }
            idle(tail, SHORT_WINDOW);
            let ns = nat(run, side)?;
            for (name, was) in old {
                ns.exec("sysctl", &["-qw", &format!("{name}={was}")])?;
            }
        }
    }
    Ok(())
}

/// Brings the lab up with the soak's server in place of bob's sink and
/// its client in hostA; returns the client's index in hostA.
fn start(bins: &Binaries, o: &Options) -> Result<(Run, usize)> {
    let s = Scenario::new(
        "soak",
        Layout::TwoNats(NatBehaviour::Masquerade),
        Expect::Direct,
    )
    .with_links(Links {
        a: Link::symmetric_ms(LINK_MS),
        b: Link::symmetric_ms(LINK_MS),
        rv: Link::NONE,
    });
    let mut run = Run::start(&s, bins)?;
    let client = (|| {
        run.wait_path("alice", PathState::Direct, Duration::from_secs(30))?;
        run.topo.host_b.kill(run.sink);
        let log = run.dir.join("soak-server.log");
        let tool = run.bins().tool.clone();
        run.topo
            .host_b
            .spawn(&tool, &["soak-serve", "--listen", SINK_LISTEN], &[], &log)?;
        let host_b = run.topo.host_b.name().to_owned();
        wait("the soak server to listen", Duration::from_secs(10), || {
            listens_on(&host_b, 9000).then_some(())
        })?;
        // In the run's folder, which every start empties first.
        let stop = stop_file(&run);
        // The client's own limit: the soak, plus the longest its faults
        // could overrun, plus the wind-down; normally the stop file ends it.
        let max = o.duration + Duration::from_secs(600);
        let args = [
            "soak-client".to_owned(),
            "--connect".into(),
            FORWARD_LISTEN.into(),
            "--streams".into(),
            o.streams.to_string(),
            "--rate".into(),
            o.rate.to_string(),
            "--stream-bytes".into(),
            o.stream_bytes.to_string(),
            "--seed".into(),
            o.seed.to_string(),
            "--stop-file".into(),
            stop.display().to_string(),
            "--max-seconds".into(),
            max.as_secs().to_string(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = run.dir.join("soak-client.log");
        run.topo.host_a.spawn(&tool, &args, &[], &log)
    })();
    match client {
        Ok(c) => Ok((run, c)),
        Err(e) => Err(run.explain(e)),
    }
}

/// Runs the soak; the summary says whether it passed.
pub fn run(bins: &Binaries, o: &Options) -> Result<Summary> {
    let (mut run, client) = start(bins, o)?;
    let result = soak(&mut run, client, o);
    result.map_err(|e| run.explain(e))
}

/// The file whose appearance tells the client to end its streams.
fn stop_file(run: &Run) -> PathBuf {
    run.dir.join("soak.stop")
}

fn soak(run: &mut Run, client: usize, o: &Options) -> Result<Summary> {
    let t0 = Instant::now();
    let t0_ms = now_ms();
    let mut tail = Tail::new(run.dir.join("soak-client.log"));
    // Warm-up: a probe through, streams flowing.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !tail
        .ends
        .iter()
        .any(|e| e.probe && e.outcome == stream::Outcome::Complete)
    {
        if Instant::now() > deadline {
            bail!("no probe got through the forward within 30 s of the start");
        }
        idle(&mut tail, Duration::from_millis(200));
    }
    idle(&mut tail, WARM_UP.saturating_sub(t0.elapsed()));
    let start_fp = footprints(run)?;

    let stop_faults = o.duration.saturating_sub(WIND_DOWN);
    let plan = schedule::plan(o.seed, stop_faults.saturating_sub(t0.elapsed()));
    let mut faults: Vec<Injected> = Vec::new();
    for p in plan {
        if t0.elapsed() + p.gap > stop_faults {
            break;
        }
        idle(&mut tail, p.gap);
        // A status that cannot be read counts as direct: the stricter rule.
        let relayed = run
            .status("alice")
            .is_ok_and(|doc| status::path(&doc) == PathState::Relayed);
        let start_ms = now_ms();
        eprintln!(
            "soak {:6.1}s: {}{}",
            t0.elapsed().as_secs_f64(),
            p.fault,
            if relayed { " (tunnel relayed)" } else { "" }
        );
        inject(run, p.fault, &mut tail)?;
        let f = Injected {
            fault: p.fault,
            start_ms,
            end_ms: now_ms(),
            relayed,
        };
        faults.push(f);
        // Until a probe started since the fault has come through, or its
        // bound has passed (the verdict then counts it as never).
        let give_up = Instant::now() + p.fault.recovery_bound();
        while verdict::recovered_after(&f, &tail.ends).is_none() && Instant::now() < give_up {
            idle(&mut tail, Duration::from_millis(200));
        }
    }
    // Traffic alone until the soak's time is up, and at least long enough
    // for broken streams to reopen, so both footprints are taken with the
    // same streams open.
    idle(
        &mut tail,
        o.duration
            .saturating_sub(t0.elapsed())
            .max(Duration::from_secs(5)),
    );
    let end_fp = footprints(run)?;
    let t1_ms = now_ms();

    std::fs::write(stop_file(run), b"stop")?;
    let give_up = Instant::now() + STALL + PROBE_TIMEOUT + Duration::from_secs(10);
    while run.topo.host_a.is_running(client) && Instant::now() < give_up {
        idle(&mut tail, Duration::from_millis(200));
    }
    if run.topo.host_a.is_running(client) {
        bail!("the soak client did not stop after the stop file");
    }
    tail.poll();
    // The server logs each end as it sees it: give the last ones a moment.
    std::thread::sleep(Duration::from_secs(1));
    let mut server = Tail::new(run.dir.join("soak-server.log"));
    server.poll();
    let mut ends = tail.ends;
    ends.extend(server.ends);
    let growth = ["alice", "bob"]
        .iter()
        .zip(start_fp.iter().zip(end_fp))
        .map(|(who, (&start, end))| Growth {
            who: (*who).to_owned(),
            start,
            end,
        })
        .collect();
    Ok(verdict::judge(o.seed, t0_ms, t1_ms, &ends, &faults, growth))
}
