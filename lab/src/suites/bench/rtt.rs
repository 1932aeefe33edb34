//! `punch-lab-tool bench --rtt`: the comparison of [`super`] along a
//! round-trip-time axis (issue 18). Both NATs' internet links are delayed
//! by the lab's NFQUEUE link emulator (RTT ÷ 4 each way on each link, so
//! host to host is the RTT), at 0 (no emulation at all), 20, 40, 100 and
//! 200 ms, and at 40 ms with 1 % random loss each way host to host.
//!
//! At each condition, side by side in one run: plain TCP through a port
//! forward, punchd forced onto TCP (`transports = ["tcp"]`), `ssh -L`,
//! rathole (Noise), a bare relay (`punch-lab-tool relay` at each end, no
//! encryption, no multiplexing: the floor for any port-relaying tunnel),
//! punchd forced onto QUIC (under its default, the host's TCP choice: BBR
//! in the lab, and pinned to CUBIC) and a default install (both raced);
//! with `--baseline DIR`, also another build's punchd on each transport
//! ("(before)"). Each path
//! gets iperf3 with 1 and 8 streams, a 64-byte request/response on an
//! idle path, and the same request/response on a second connection while
//! a bulk download runs through the same path (for punchd: a second
//! stream of the same tunnel), which shows queueing inside the tunnel.
//! During the 1-stream run, `ss -tni` on alice's host records what the
//! kernel saw (cwnd, rtt, delivery rate, `app_limited`).
//!
//! The NFQUEUE delay line is userspace: it tops out near 0.3 Gbit/s in
//! this lab, which caps every delayed row (plain TCP included).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use super::{
    exec_in, iperf, port_forward, serve, start_bare_relay, start_rathole, start_ssh, BARE_LISTEN,
    BARE_PORT, BOB_PUBLIC, RATHOLE_LISTEN, SERVICE_PORT, SSH_LISTEN,
};
use crate::harness::punchd_types::{PathState, Transport};
use crate::harness::spec::FORWARD_LISTEN;
use crate::harness::status::first_peer;
use crate::harness::transfer::{DownloadReport, RrReport};
use crate::harness::{Binaries, Expect, Run, Scenario};
use crate::net::nat::NatBehaviour;
use crate::net::topology::{Link, Links};

/// The round-trip times measured when `--rtt` is given without values.
pub const DEFAULT_RTTS: [u64; 5] = [0, 20, 40, 100, 200];
/// The lossy condition: this RTT, this loss each way host to host.
const LOSSY_RTT: u64 = 40;
const LOSS_PCT: f64 = 1.0;
const BOB_HOST: &str = "198.51.100.2";

/// The round trips under load: timed from `LOADED_FROM` into a bulk
/// download of `LOADED_DOWNLOAD`, for about `LOADED_BUDGET` (30 round trips
/// at 200 ms RTT), past the sending socket's start-up. (Until 2026-12-07:
/// 2 s of round trips from 2 s into 6 s, i.e. 10 at 200 ms, all in the
/// download's first seconds: one unchanged daemon read +18 to +300 ms in
/// five runs.) The download outlasts them; the tunnel socket's `ss`
/// snapshot is taken halfway through them.
const LOADED_FROM: Duration = Duration::from_secs(3);
const LOADED_BUDGET: Duration = Duration::from_secs(6);
const LOADED_DOWNLOAD: Duration = Duration::from_secs(12);

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Seconds per iperf3 run.
    pub seconds: u64,
    /// Round-trip times, ms (the lossy condition is added).
    pub rtts: Vec<u64>,
    /// Where to write the JSON figures.
    pub json: Option<PathBuf>,
    /// Another build's punchd and punch-rendezvous, measured alongside.
    pub baseline: Option<PathBuf>,
    /// Only the TCP arms (each build's), with their neighbours.
    pub tcp_only: bool,
}

/// One path at one condition.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RowFigures {
    /// plain TCP, punchd TCP, ssh -L, rathole noise, punchd QUIC, ...
    pub path: String,
    /// iperf3, 1 stream, Gbit/s.
    pub one_gbps: Option<f64>,
    /// iperf3, 8 streams, Gbit/s.
    pub eight_gbps: Option<f64>,
    /// 64-byte round trip on an idle path.
    pub rr_p50_us: Option<f64>,
    /// 64-byte round trip while a bulk download runs through the path.
    pub loaded_rr_p50_us: Option<f64>,
    /// Its 99th percentile.
    pub loaded_rr_p99_us: Option<f64>,
    /// The bulk download's rate meanwhile, Gbit/s.
    pub loaded_download_gbps: Option<f64>,
    /// `ss -tni` on alice's host midway through the 1-stream run.
    pub ss: Option<String>,
    /// punchd rows: `ss -tmni` of the tunnel socket on both hosts 1 s into
    /// the round trips under load (where the 64-byte request waits: the
    /// path's queue shows as RTT over the minimum, the sender's unsent
    /// data as `notsent`, the receiver's unread data as `Recv-Q`).
    #[serde(default)]
    pub loaded_ss: Option<String>,
    /// punchd rows: the transport the tunnel ran on and why it was kept.
    pub note: Option<String>,
    /// Not measured, and why.
    pub skipped: Option<String>,
}

/// One RTT / loss condition.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Condition {
    /// Host-to-host round-trip time added, ms.
    pub rtt_ms: u64,
    /// Random loss each way host to host, percent.
    pub loss_pct: f64,
    /// Every path measured.
    pub rows: Vec<RowFigures>,
}

/// The whole run, as written by `--json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RttBench {
    /// Seconds per iperf3 run.
    pub seconds: u64,
    /// `uptime` before and after: the machine's load.
    pub load_before: String,
    /// See `load_before`.
    pub load_after: String,
    /// In the order measured.
    pub conditions: Vec<Condition>,
}

/// Each NAT link gets a quarter of the RTT each way; loss is split so
/// that each direction host to host (two links) loses `loss_pct`.
fn links(rtt_ms: u64, loss_pct: f64) -> Option<Links> {
    if rtt_ms == 0 && loss_pct == 0.0 {
        return None;
    }
    let per_link = 1.0 - (1.0 - loss_pct / 100.0).sqrt();
    let link = Link::symmetric_ms(rtt_ms / 4).with(Duration::ZERO, per_link);
    Some(Links {
        a: link,
        b: link,
        rv: Link::NONE,
    })
}

fn uptime() -> String {
    std::process::Command::new("uptime")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn row(path: &str) -> RowFigures {
    RowFigures {
        path: path.to_owned(),
        ..RowFigures::default()
    }
}

/// Round trips to measure: about `budget_ms` worth at this RTT.
fn rr_count(rtt_ms: u64, budget_ms: u64, most: usize) -> usize {
    ((budget_ms / rtt_ms.max(1)) as usize).clamp(10, most)
}

fn rr_in(ns: &str, tool: &Path, target: &str, count: usize, warmup: usize) -> Result<RrReport> {
    let out = exec_in(
        ns,
        tool.to_str().unwrap_or("punch-lab-tool"),
        &[
            "rr",
            "--connect",
            target,
            "--count",
            &count.to_string(),
            "--warmup",
            &warmup.to_string(),
        ],
    )?;
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("rr to {target}: {}", String::from_utf8_lossy(&out.stderr)))
}

/// `ss -tni` to bob's public address in `ns`: the sockets of this row
/// (by port: 9000 plain, 2222 ssh, 2333 rathole, 2444 the bare relay, the
/// rest punchd's tunnel), trimmed.
fn ss_snapshot(ns: &str, path: &str) -> String {
    let text = exec_in(ns, "ss", &["-tniH", "dst", BOB_PUBLIC])
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    busiest_socket(&text, path)
}

/// Of `ss -tniH`'s sockets (a head line and an info line each) on `path`'s
/// port, the one that has sent the most: the data connection, not
/// iperf3's control connection beside it (which the first match was, for
/// plain TCP and rathole, before this picked by bytes).
fn busiest_socket(text: &str, path: &str) -> String {
    // The rows that are not punchd's, by the port their sockets reach.
    let others = [
        ("plain TCP", SERVICE_PORT),
        ("ssh -L", 2222),
        ("rathole noise", 2333),
        ("bare relay", BARE_PORT),
    ]
    .map(|(name, port)| (name, format!(":{port}")));
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let mine = |head: &str| match others.iter().find(|(name, _)| *name == path) {
        Some((_, port)) => head.contains(port.as_str()),
        None => others.iter().all(|(_, port)| !head.contains(port.as_str())),
    };
    let sent = |info: &str| {
        info.split_whitespace()
            .find_map(|f| f.strip_prefix("bytes_sent:"))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    lines
        .chunks(2)
        .filter(|c| c.first().is_some_and(|h| mine(h)))
        .max_by_key(|c| c.get(1).map_or(0, |i| sent(i)))
        .map(|c| c.join("\n"))
        .unwrap_or_default()
}

/// iperf3 (1 and 8 streams), then the idle and loaded round trips, for
/// every row not skipped; the service runs in bob's host.
fn measure(
    run: &mut Run,
    rows: &mut [(RowFigures, String)],
    seconds: u64,
    rtt_ms: u64,
) -> Result<()> {
    let client = run.topo.host_a.name().to_owned();
    let tool = run.bins().tool.clone();
    let dir = run.dir.clone();
    let port = SERVICE_PORT.to_string();
    let mut current = None;
    serve(
        &mut run.topo.host_b,
        &dir,
        &mut current,
        Path::new("iperf3"),
        &["-s", "-p", &port],
    )?;
    for (r, target) in rows.iter_mut().filter(|(r, _)| r.skipped.is_none()) {
        let (ns, path) = (client.clone(), r.path.clone());
        let probe = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(seconds.div_ceil(2)));
            ss_snapshot(&ns, &path)
        });
        // One path failing (an iperf3 control connection reset through
        // ssh at 200 ms) must not discard the others' figures.
        let one = iperf(&client, target, 1, seconds);
        r.ss = probe.join().ok();
        match one.and_then(|one| Ok((one, iperf(&client, target, 8, seconds)?))) {
            Ok((one, eight)) => {
                r.one_gbps = Some(one);
                r.eight_gbps = Some(eight);
            }
            Err(e) => r.skipped = Some(format!("FAILED: {e:#}")),
        }
    }
    let listen = format!("0.0.0.0:{SERVICE_PORT}");
    serve(
        &mut run.topo.host_b,
        &dir,
        &mut current,
        &tool,
        &["echo-or-source", "--listen", &listen],
    )?;
    for (r, target) in rows.iter_mut().filter(|(r, _)| r.skipped.is_none()) {
        let idle = match rr_in(&client, &tool, target, rr_count(rtt_ms, 3000, 500), 5) {
            Ok(idle) => idle,
            Err(e) => {
                r.skipped = Some(format!("FAILED: {e:#}"));
                continue;
            }
        };
        r.rr_p50_us = Some(idle.p50_us);
        let load = {
            let (ns, tool, target) = (client.clone(), tool.clone(), target.clone());
            let seconds = LOADED_DOWNLOAD.as_secs().to_string();
            std::thread::spawn(move || -> Result<DownloadReport> {
                let out = exec_in(
                    &ns,
                    tool.to_str().unwrap_or("punch-lab-tool"),
                    &["download", "--connect", &target, "--seconds", &seconds],
                )?;
                serde_json::from_slice(&out.stdout)
                    .with_context(|| format!("download: {}", String::from_utf8_lossy(&out.stderr)))
            })
        };
        std::thread::sleep(LOADED_FROM);
        let probe = r.path.starts_with("punchd").then(|| {
            let hosts = [client.clone(), run.topo.host_b.name().to_owned()];
            let port = format!(":{}", crate::harness::spec::PUNCH_PORT);
            std::thread::spawn(move || {
                std::thread::sleep(LOADED_BUDGET / 2);
                hosts
                    .iter()
                    .map(|ns| {
                        let text = exec_in(ns, "ss", &["-tmniH", "sport", "=", &port])
                            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                            .unwrap_or_default();
                        format!("{ns}:\n{}", text.trim())
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        });
        let loaded = rr_in(
            &client,
            &tool,
            target,
            rr_count(rtt_ms, LOADED_BUDGET.as_millis() as u64, 300),
            2,
        );
        r.loaded_ss = probe.and_then(|p| p.join().ok());
        let download = load
            .join()
            .map_err(|_| anyhow::anyhow!("download thread panicked"))?;
        let (loaded, download) = match (loaded, download) {
            (Ok(l), Ok(d)) => (l, d),
            (Err(e), _) | (_, Err(e)) => {
                r.note = Some(format!("under load: FAILED: {e:#}"));
                continue;
            }
        };
        r.loaded_rr_p50_us = Some(loaded.p50_us);
        r.loaded_rr_p99_us = Some(loaded.p99_us);
        r.loaded_download_gbps = Some(download.bytes as f64 * 8.0 / download.seconds / 1e9);
    }
    if let Some(i) = current {
        run.topo.host_b.kill(i);
    }
    Ok(())
}

/// Which transport the tunnel runs on and why it was kept, as the side that
/// chose (the TLS client, the lower key: alice or bob) says it.
fn punchd_note(run: &Run) -> Option<String> {
    let kept = |who: &str| {
        let doc = run.status(who).ok()?;
        let peer = first_peer(&doc).ok()?;
        Some((peer.transport, peer.path_kept.clone().unwrap_or_default()))
    };
    let sides: Vec<_> = ["alice", "bob"].iter().filter_map(|w| kept(w)).collect();
    let (transport, why) = sides
        .iter()
        .find(|(_, why)| !why.is_empty() && !why.starts_with("chosen by the peer"))
        .or(sides.first())
        .cloned()?;
    Some(format!(
        "transport {transport:?}; kept: {}",
        if why.is_empty() { "-" } else { &why }
    ))
}

/// One punchd configuration measured at every condition.
#[derive(Debug, Clone, Copy)]
struct Arm {
    /// The row's name.
    label: &'static str,
    /// The transports it may use (`[punch] transports`): one forces a
    /// path; both race as a default install does.
    transports: &'static [Transport],
    /// `quic_congestion` (only matters on QUIC).
    congestion: &'static str,
}

/// This build's arms. The first, on TCP, also measures plain TCP, `ssh -L`
/// and rathole on its network. QUIC runs with its default (`system`: the
/// host's TCP choice, BBR in the lab) and pinned to CUBIC, because a
/// loss-based controller cannot match the kernel's BBR under random loss
/// and a host on CUBIC gets CUBIC. The last is a default install: both
/// transports race, and its note says which the race kept and why.
const ARMS: [Arm; 4] = [
    Arm {
        label: "punchd TCP",
        transports: &[Transport::Tcp],
        congestion: "system",
    },
    Arm {
        label: "punchd QUIC",
        transports: &[Transport::Quic],
        congestion: "system",
    },
    Arm {
        label: "punchd QUIC cubic",
        transports: &[Transport::Quic],
        congestion: "cubic",
    },
    Arm {
        label: "punchd default",
        transports: &[Transport::Tcp, Transport::Quic],
        congestion: "system",
    },
];

/// The `--baseline` build's arms (its defaults; `cubic` on QUIC, which
/// builds before `system` took as theirs).
const BASELINE_ARMS: [Arm; 2] = [
    Arm {
        label: "punchd TCP (before)",
        transports: &[Transport::Tcp],
        congestion: "cubic",
    },
    Arm {
        label: "punchd QUIC (before)",
        transports: &[Transport::Quic],
        congestion: "cubic",
    },
];

/// One lab run of punchd on `transport` (plus, on TCP, the plain, ssh
/// and rathole rows, which share its network): the rows it measured.
fn punchd_run(
    bins: &Binaries,
    arm: &Arm,
    with_others: bool,
    rtt_ms: u64,
    loss_pct: f64,
    seconds: u64,
) -> Vec<RowFigures> {
    let Arm {
        label,
        transports,
        congestion,
    } = *arm;
    let name = format!(
        "rtt{rtt_ms}{}-{}{}{}",
        if loss_pct > 0.0 { "l" } else { "" },
        match transports {
            [Transport::Quic] => "q",
            [Transport::Tcp] => "t",
            _ => "d",
        },
        match congestion {
            "bbr" => "r",
            "cubic" => "c",
            _ => "",
        },
        if label.ends_with("(before)") { "b" } else { "" },
    );
    // At zero delay a plain Linux NAT can spoil the UDP punch (lab/README
    // "UDP and conntrack"): the QUIC arm then uses firewall NATs, as the
    // zero-delay bench does.
    let behaviour = if transports == [Transport::Quic] && rtt_ms == 0 {
        NatBehaviour::Firewall
    } else {
        NatBehaviour::Masquerade
    };
    let mut s = Scenario::new(
        &name,
        crate::net::topology::Layout::TwoNats(behaviour),
        Expect::Direct,
    )
    .with_transports(transports)
    .with_punch(&format!("quic_congestion = \"{congestion}\""));
    if let Some(l) = links(rtt_ms, loss_pct) {
        s = s.with_links(l);
    }
    let mut rows = Vec::new();
    if with_others {
        rows.push((row("plain TCP"), format!("{BOB_PUBLIC}:{SERVICE_PORT}")));
    }
    rows.push((row(label), FORWARD_LISTEN.to_owned()));
    if with_others {
        rows.push((row("ssh -L"), SSH_LISTEN.to_owned()));
        rows.push((row("rathole noise"), RATHOLE_LISTEN.to_owned()));
        rows.push((row("bare relay"), BARE_LISTEN.to_owned()));
    }
    let result = (|| -> Result<()> {
        let mut run = Run::start(&s, bins)?;
        run.wait_path("alice", PathState::Direct, Duration::from_secs(60))?;
        run.topo.host_b.kill(run.sink);
        let note = punchd_note(&run);
        if let Some((r, _)) = rows.iter_mut().find(|(r, _)| r.path == label) {
            r.note = note;
        }
        if with_others {
            port_forward(&run.topo.nats[1], SERVICE_PORT, BOB_HOST)?;
            if let Err(e) = start_ssh(&mut run) {
                rows[2].0.skipped = Some(format!("{e:#}"));
            }
            if let Err(e) = start_rathole(&mut run) {
                rows[3].0.skipped = Some(format!("{e:#}"));
            }
            if let Err(e) = start_bare_relay(&mut run) {
                rows[4].0.skipped = Some(format!("{e:#}"));
            }
        }
        measure(&mut run, &mut rows, seconds, rtt_ms)
    })();
    if let Err(e) = result {
        for (r, _) in rows.iter_mut().filter(|(r, _)| r.skipped.is_none()) {
            if r.one_gbps.is_none() {
                r.skipped = Some(format!("FAILED: {e:#}"));
            }
        }
    }
    rows.into_iter().map(|(r, _)| r).collect()
}

/// Runs every condition, prints the tables, writes the JSON.
pub fn run(bins: &Binaries, o: &Options) -> Result<()> {
    let baseline = o.baseline.as_ref().map(|dir| Binaries {
        punchd: dir.join("punchd"),
        rendezvous: dir.join("punch-rendezvous"),
        tool: bins.tool.clone(),
    });
    let mut conditions: Vec<(u64, f64)> = o.rtts.iter().map(|r| (*r, 0.0)).collect();
    conditions.push((LOSSY_RTT, LOSS_PCT));
    let mut out = RttBench {
        seconds: o.seconds,
        load_before: uptime(),
        ..RttBench::default()
    };
    println!("load before: {}", out.load_before);
    for (rtt_ms, loss_pct) in conditions {
        let mut rows = Vec::new();
        let wanted = |arm: &&Arm| !o.tcp_only || arm.transports == [Transport::Tcp];
        for (i, arm) in ARMS.iter().filter(wanted).enumerate() {
            rows.extend(punchd_run(bins, arm, i == 0, rtt_ms, loss_pct, o.seconds));
        }
        if let Some(b) = &baseline {
            for arm in BASELINE_ARMS.iter().filter(wanted) {
                rows.extend(punchd_run(b, arm, false, rtt_ms, loss_pct, o.seconds));
            }
        }
        let c = Condition {
            rtt_ms,
            loss_pct,
            rows,
        };
        print_condition(&c, o.seconds);
        out.conditions.push(c);
        if let Some(path) = &o.json {
            // Written after every condition: a cut run keeps what it had.
            std::fs::write(path, serde_json::to_vec_pretty(&out)?)?;
        }
    }
    out.load_after = uptime();
    println!("\nload after: {}", out.load_after);
    print_summary(&out);
    if let Some(path) = &o.json {
        std::fs::write(path, serde_json::to_vec_pretty(&out)?)?;
    }
    Ok(())
}

fn num(v: Option<f64>, scale: f64, digits: usize) -> String {
    v.map_or("-".to_owned(), |v| format!("{:.*}", digits, v * scale))
}

fn print_condition(c: &Condition, seconds: u64) {
    let plain = c.rows.iter().find(|r| r.path == "plain TCP");
    let ratio = |v: Option<f64>, b: Option<f64>| match (v, b) {
        (Some(v), Some(b)) if b > 0.0 => format!("{:.2}", v / b),
        _ => "-".to_owned(),
    };
    println!(
        "\nRTT {} ms, loss {} %, iperf3 {seconds} s; Gbit/s (÷ plain); 64 B round trip p50 ms idle / under a bulk download (p99):",
        c.rtt_ms, c.loss_pct
    );
    println!(
        "{:<22} {:>7} {:>6} {:>7} {:>6} {:>8} {:>9} {:>9} {:>8}",
        "path", "1 str", "÷pl", "8 str", "÷pl", "rr idle", "rr load", "p99", "bulk"
    );
    for r in &c.rows {
        if let Some(why) = &r.skipped {
            println!("{:<22} skipped: {why}", r.path);
            continue;
        }
        println!(
            "{:<22} {:>7} {:>6} {:>7} {:>6} {:>8} {:>9} {:>9} {:>8}",
            r.path,
            num(r.one_gbps, 1.0, 3),
            ratio(r.one_gbps, plain.and_then(|p| p.one_gbps)),
            num(r.eight_gbps, 1.0, 3),
            ratio(r.eight_gbps, plain.and_then(|p| p.eight_gbps)),
            num(r.rr_p50_us, 1e-3, 2),
            num(r.loaded_rr_p50_us, 1e-3, 1),
            num(r.loaded_rr_p99_us, 1e-3, 1),
            num(r.loaded_download_gbps, 1.0, 3),
        );
    }
    for r in c.rows.iter().filter(|r| r.note.is_some()) {
        println!("  {}: {}", r.path, r.note.as_deref().unwrap_or(""));
    }
}

/// The 1-stream figures of every path by RTT, one line per path.
fn print_summary(b: &RttBench) {
    println!("\nOne stream, Gbit/s, by RTT (ms; L = with {LOSS_PCT} % loss):");
    let mut paths: Vec<&str> = Vec::new();
    for c in &b.conditions {
        for r in &c.rows {
            if !paths.contains(&r.path.as_str()) {
                paths.push(&r.path);
            }
        }
    }
    print!("{:<22}", "path");
    for c in &b.conditions {
        let head = format!("{}{}", c.rtt_ms, if c.loss_pct > 0.0 { "L" } else { "" });
        print!(" {head:>7}");
    }
    println!();
    for p in paths {
        print!("{p:<22}");
        for c in &b.conditions {
            let v = c.rows.iter().find(|r| r.path == p).and_then(|r| r.one_gbps);
            print!(" {:>7}", num(v, 1.0, 3));
        }
        println!();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_snapshot_keeps_the_data_connection_not_the_control_one() {
        let ss = "ESTAB 0 0 192.0.2.2:51000 203.0.113.3:9000\n\
                  cubic cwnd:12 bytes_sent:310 bytes_acked:311\n\
                  ESTAB 0 0 192.0.2.2:51002 203.0.113.3:9000\n\
                  bbr cwnd:2098 bytes_sent:412345678 bytes_acked:412000000\n\
                  ESTAB 0 0 192.0.2.2:40000 203.0.113.3:40000\n\
                  bbr cwnd:900 bytes_sent:999999999999\n";
        let got = busiest_socket(ss, "plain TCP");
        assert!(got.contains(":51002") && got.contains("cwnd:2098"), "{got}");
        let tunnel = busiest_socket(ss, "punchd TCP");
        assert!(tunnel.contains(":40000"), "{tunnel}");
        assert_eq!(busiest_socket(ss, "ssh -L"), "");
    }

    #[test]
    fn links_split_the_rtt_and_the_loss_over_both_nats() {
        assert!(links(0, 0.0).is_none());
        let l = links(40, 1.0).unwrap();
        let one_way = l.a.up.then(l.b.down);
        assert_eq!(one_way.delay, Duration::from_millis(20));
        assert!((one_way.loss - 0.01).abs() < 1e-9);
        assert_eq!(
            links(200, 0.0).unwrap().b.down.delay,
            Duration::from_millis(50)
        );
    }

    #[test]
    fn round_trip_counts_follow_the_rtt_within_bounds() {
        assert_eq!(rr_count(0, 3000, 500), 500);
        assert_eq!(rr_count(20, 3000, 500), 150);
        assert_eq!(rr_count(200, 3000, 500), 15);
        assert_eq!(rr_count(2000, 3000, 500), 10);
    }
}
