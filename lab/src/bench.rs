//! `punch-lab-tool bench`: tunnel throughput side by side, in one run, on
//! the same lab path (both hosts behind port-preserving NATs, no added
//! delay): plain TCP through a port forward on bob's NAT (the ceiling) and
//! punchd direct through alice's `[[forward]]`, 1 stream and 8, with iperf3.
//! Also the single-core AEAD rates (`openssl speed`), the ceiling for any
//! encrypted tunnel on this machine. Figures are printed, never asserted.

use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use crate::nat::NatBehaviour;
use crate::scenario::{Binaries, Expect, Run, Scenario, FORWARD_LISTEN, SINK_LISTEN};
use crate::topology::Layout;

/// One iperf3 run's received rate, Gbit/s.
fn iperf(run: &Run, target: &str, port: &str, streams: usize, seconds: u64) -> Result<f64> {
    let out = run.topo.host_a.exec_output(
        "iperf3",
        &[
            "-c",
            target,
            "-p",
            port,
            "-P",
            &streams.to_string(),
            "-t",
            &seconds.to_string(),
            "-J",
        ],
    )?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stderr)))?;
    match v["end"]["sum_received"]["bits_per_second"].as_f64() {
        Some(bps) => Ok(bps / 1e9),
        None => bail!("iperf3 failed: {}", v["error"]),
    }
}

/// `openssl speed -evp ALG` on one core, 16 KiB blocks, GB/s.
fn aead_rate(alg: &str) -> Option<f64> {
    let out = std::process::Command::new("openssl")
        .args(["speed", "-evp", alg, "-seconds", "1", "-bytes", "16384"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last()?;
    let kbps: f64 = line
        .split_whitespace()
        .last()?
        .trim_end_matches('k')
        .parse()
        .ok()?;
    Some(kbps * 1000.0 / 1e9)
}

/// Runs the comparison and prints a table.
pub fn run(bins: &Binaries, seconds: u64) -> Result<()> {
    let s = Scenario::new(
        "bench",
        Layout::TwoNats(NatBehaviour::Masquerade),
        Expect::Direct,
    );
    let mut run = Run::start(&s, bins)?;
    run.wait_path("alice", "direct", Duration::from_secs(30))?;
    // iperf3 takes the sink's place behind bob's exposed service...
    run.topo.host_b.kill(run.sink);
    let port = SINK_LISTEN.rsplit(':').next().unwrap_or("9000");
    run.topo.host_b.spawn(
        std::path::Path::new("iperf3"),
        &["-s", "-B", "127.0.0.1", "-p", port],
        &[],
        &run.dir.join("iperf-tunnel.log"),
    )?;
    // ...and a second one is reached through a port forward on bob's NAT.
    run.topo.host_b.spawn(
        std::path::Path::new("iperf3"),
        &["-s", "-p", "5201"],
        &[],
        &run.dir.join("iperf-plain.log"),
    )?;
    let nat_b = run.topo.nats.get(1).context("no NAT on bob's side")?;
    nat_b.exec(
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-i",
            "wan0",
            "-p",
            "tcp",
            "--dport",
            "5201",
            "-j",
            "DNAT",
            "--to-destination",
            "198.51.100.2:5201",
        ],
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let fwd_port = FORWARD_LISTEN.rsplit(':').next().unwrap_or("10000");
    let mut rows = Vec::new();
    for streams in [1, 8] {
        let plain = iperf(&run, "203.0.113.3", "5201", streams, seconds)?;
        let tunnel = iperf(&run, "127.0.0.1", fwd_port, streams, seconds)?;
        rows.push((streams, plain, tunnel));
    }
    println!("Tunnel throughput, lab both-NATs path, iperf3 {seconds}s per run, Gbit/s:");
    println!(
        "{:>8} {:>12} {:>14} {:>8}",
        "streams", "plain TCP", "punchd direct", "ratio"
    );
    for (streams, plain, tunnel) in &rows {
        println!(
            "{streams:>8} {plain:>12.2} {tunnel:>14.2} {:>8.2}",
            tunnel / plain
        );
    }
    for alg in ["aes-128-gcm", "chacha20-poly1305"] {
        if let Some(r) = aead_rate(alg) {
            println!("single-core {alg}: {r:.2} GB/s ({:.1} Gbit/s)", r * 8.0);
        }
    }
    Ok(())
}
