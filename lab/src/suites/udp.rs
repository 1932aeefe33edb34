//! UDP forwarding through the two-NAT lab, with the tools a user would
//! try: Debian's `dnsmasq` serving a few records on bob's host, queried
//! with `dig` through alice's UDP forward (every query must be answered),
//! and `iperf3 -u` at a fixed rate through a UDP forward (its TCP control
//! connection through a TCP forward on the same port), reporting loss. On
//! the TCP, QUIC and relayed paths each.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::harness::punchd_types::{PathState, Transport};
use crate::harness::run::wait;
use crate::harness::{Binaries, Expect, Run, Scenario};
use crate::net::nat::NatBehaviour;
use crate::net::topology::{Layout, Links};

/// alice's UDP forward to bob's DNS server, inside hostA.
const DNS_FORWARD_PORT: u16 = 5300;
/// dnsmasq inside hostB (loopback only).
const DNS_PORT: u16 = 5353;
/// iperf3's port: the server in hostB, alice's TCP and UDP forwards in hostA.
const IPERF_PORT: u16 = 5201;
/// Records dnsmasq serves: `rN.lab.test` → 192.0.2.(10 + N).
const RECORDS: u8 = 8;

/// Which path carries the tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    /// Timed TCP simultaneous open through plain NATs (yamux streams).
    Tcp,
    /// UDP punch + QUIC, 5 ms links (QUIC datagrams).
    Quic,
    /// Port-randomizing NATs: the relay through the rendezvous.
    Relayed,
}

/// What one path measured.
#[derive(Debug, Clone)]
pub struct UdpReport {
    /// The path.
    pub over: Over,
    /// DNS queries sent.
    pub queries: usize,
    /// Queries answered with the right address.
    pub answered: usize,
    /// Seconds the queries took.
    pub dns_secs: f64,
    /// iperf3 -u: the rate asked for.
    pub mbit_target: u32,
    /// iperf3 -u: the rate received.
    pub mbit_received: f64,
    /// iperf3 -u: datagrams lost, in percent.
    pub lost_percent: f64,
    /// iperf3 -u: datagrams lost.
    pub lost_packets: u64,
    /// iperf3 -u: datagrams sent.
    pub packets: u64,
    /// alice's forward counters after the runs (out, in, dropped).
    pub counters: (u64, u64, u64),
}

impl std::fmt::Display for UdpReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?}: dig {}/{} answered in {:.1} s; iperf3 -u {} Mbit/s: {:.1} Mbit/s received, loss {:.2} % ({} of {}); forward datagrams out {} in {} dropped {}",
            self.over,
            self.answered,
            self.queries,
            self.dns_secs,
            self.mbit_target,
            self.mbit_received,
            self.lost_percent,
            self.lost_packets,
            self.packets,
            self.counters.0,
            self.counters.1,
            self.counters.2
        )
    }
}

fn scenario(over: Over) -> Scenario {
    let alice = format!(
        "\n[[forward]]\nlisten = \"127.0.0.1:{DNS_FORWARD_PORT}\"\npeer = \"bob\"\nservice = \"dns\"\nprotocol = \"udp\"\n\
         \n[[forward]]\nlisten = \"127.0.0.1:{IPERF_PORT}\"\npeer = \"bob\"\nservice = \"iperf\"\n\
         \n[[forward]]\nlisten = \"127.0.0.1:{IPERF_PORT}\"\npeer = \"bob\"\nservice = \"iperf-udp\"\nprotocol = \"udp\"\n"
    );
    let bob = format!(
        "\n[[expose]]\nname = \"dns\"\ntarget = \"127.0.0.1:{DNS_PORT}\"\nallow = [\"alice\"]\nprotocol = \"udp\"\n\
         \n[[expose]]\nname = \"iperf\"\ntarget = \"127.0.0.1:{IPERF_PORT}\"\nallow = [\"alice\"]\n\
         \n[[expose]]\nname = \"iperf-udp\"\ntarget = \"127.0.0.1:{IPERF_PORT}\"\nallow = [\"alice\"]\nprotocol = \"udp\"\n"
    );
    let s = match over {
        Over::Tcp => Scenario::new(
            "udp-tcp",
            Layout::TwoNats(NatBehaviour::Masquerade),
            Expect::Direct,
        ),
        Over::Quic => Scenario::new(
            "udp-quic",
            Layout::TwoNats(NatBehaviour::Masquerade),
            Expect::Direct,
        )
        .with_transports(&[Transport::Quic])
        .with_links(Links::near()),
        Over::Relayed => {
            let mut s = Scenario::new(
                "udp-relay",
                Layout::TwoNats(NatBehaviour::RandomFully),
                Expect::Relayed,
            )
            .with_timeout("3s")
            .with_transports(&[Transport::Tcp, Transport::Quic]);
            // The relay's default 8 MiB/s per session is below 100 Mbit/s.
            s.rendezvous_config = Some(
                "[limits]\nrelay_bytes_per_second = 10000000000\nrelay_total_bytes_per_second = 10000000000\n"
                    .to_owned(),
            );
            s
        }
    };
    s.with_config(&alice, &bob)
}

/// Starts dnsmasq (loopback of hostB only, no upstream, no hosts file) and
/// the iperf3 server in bob's host.
fn start_servers(run: &mut Run) -> Result<()> {
    let mut args = vec![
        "-k".to_owned(),
        "--no-resolv".to_owned(),
        "--no-hosts".to_owned(),
        "--conf-file=/dev/null".to_owned(),
        "--listen-address=127.0.0.1".to_owned(),
        "--bind-interfaces".to_owned(),
        format!("--port={DNS_PORT}"),
        "--pid-file=".to_owned(),
        "--user=root".to_owned(),
        "--log-facility=-".to_owned(),
    ];
    for n in 0..RECORDS {
        args.push(format!("--address=/r{n}.lab.test/192.0.2.{}", 10 + n));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let log = run.dir.join("dnsmasq.log");
    run.topo
        .host_b
        .spawn(Path::new("dnsmasq"), &args, &[], &log)?;
    let log = run.dir.join("iperf3-server.log");
    let port = IPERF_PORT.to_string();
    run.topo.host_b.spawn(
        Path::new("iperf3"),
        &["-s", "-B", "127.0.0.1", "-p", &port],
        &[],
        &log,
    )?;
    let ns = run.topo.host_b.name().to_owned();
    wait("iperf3 to listen", Duration::from_secs(10), || {
        crate::net::netns::listens_on(&ns, IPERF_PORT).then_some(())
    })?;
    // dnsmasq answers once it logged its start.
    wait("dnsmasq to start", Duration::from_secs(10), || {
        std::fs::read_to_string(run.dir.join("dnsmasq.log"))
            .ok()
            .filter(|l| l.contains("started"))
    })?;
    Ok(())
}

/// Concurrent `dig` processes (a resolver asks in parallel too); each
/// sends its share of the queries one after another.
const DIG_PARALLEL: usize = 8;

/// `queries` DNS queries through alice's forward, in [`DIG_PARALLEL`]
/// `dig -f` batches at once (each query from its own socket, so each is a
/// new flow); returns how many were answered with the right address, and
/// the time taken.
pub fn dig_through(run: &Run, queries: usize) -> Result<(usize, f64)> {
    let port = DNS_FORWARD_PORT.to_string();
    let ns = run.topo.host_a.name().to_owned();
    let mut want: BTreeMap<String, usize> = BTreeMap::new();
    let mut batches = vec![String::new(); DIG_PARALLEL];
    for i in 0..queries {
        let n = (i % RECORDS as usize) as u8;
        batches[i % DIG_PARALLEL].push_str(&format!("r{n}.lab.test A\n"));
        *want.entry(format!("192.0.2.{}", 10 + n)).or_default() += 1;
    }
    let started = Instant::now();
    let mut digs = Vec::new();
    for (i, text) in batches.iter().enumerate() {
        let batch = run.dir.join(format!("dig-batch-{i}.txt"));
        std::fs::write(&batch, text)?;
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", &ns, "dig", "@127.0.0.1", "-p", &port, "-f"])
            .arg(&batch)
            .args(["+short", "+tries=2", "+time=2"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("cannot run dig")?;
        digs.push(child);
    }
    let mut stdout = String::new();
    for d in digs {
        let out = d.wait_with_output()?;
        stdout.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    let secs = started.elapsed().as_secs_f64();
    // An unanswered query prints a ";;" line; each answer is the address.
    let mut answered = 0;
    for g in stdout.lines().map(str::trim) {
        if let Some(n) = want.get_mut(g) {
            if *n > 0 {
                *n -= 1;
                answered += 1;
            }
        }
    }
    Ok((answered, secs))
}

/// iperf3's UDP results: (received Mbit/s, lost %, lost, packets).
pub fn iperf_udp(run: &Run, mbit: u32, secs: u32) -> Result<(f64, f64, u64, u64)> {
    let port = IPERF_PORT.to_string();
    let rate = format!("{mbit}M");
    let secs = secs.to_string();
    let out = run.topo.host_a.exec_output(
        "iperf3",
        &[
            "-c",
            "127.0.0.1",
            "-p",
            &port,
            "-u",
            "-b",
            &rate,
            "-t",
            &secs,
            "-l",
            "1200",
            "-w",
            "4M",
            "-J",
        ],
    )?;
    parse_iperf(&String::from_utf8_lossy(&out.stdout))
}

/// Reads `iperf3 -u -J`'s receiver summary.
pub fn parse_iperf(json: &str) -> Result<(f64, f64, u64, u64)> {
    let v: serde_json::Value = serde_json::from_str(json).with_context(|| {
        format!(
            "iperf3 output: {}",
            json.chars().take(2000).collect::<String>()
        )
    })?;
    if let Some(e) = v.get("error") {
        bail!("iperf3: {e}");
    }
    let sum = &v["end"]["sum_received"];
    let num = |k: &str| sum[k].as_f64().with_context(|| format!("no {k} in {sum}"));
    Ok((
        num("bits_per_second")? / 1e6,
        num("lost_percent")?,
        num("lost_packets")? as u64,
        num("packets")? as u64,
    ))
}

/// Runs dig and iperf3 through a UDP forward on `over`.
pub fn run_path(
    bins: &Binaries,
    over: Over,
    queries: usize,
    mbit: u32,
    secs: u32,
) -> Result<UdpReport> {
    let s = scenario(over);
    let mut run = Run::start(&s, bins)?;
    let r = measure(&mut run, over, queries, mbit, secs);
    r.map_err(|e| run.explain(e))
}

fn measure(run: &mut Run, over: Over, queries: usize, mbit: u32, secs: u32) -> Result<UdpReport> {
    let want = match over {
        Over::Relayed => PathState::Relayed,
        _ => PathState::Direct,
    };
    run.wait_path("alice", want, Duration::from_secs(60))?;
    start_servers(run)?;
    let (answered, dns_secs) = dig_through(run, queries)?;
    let (mbit_received, lost_percent, lost_packets, packets) = iperf_udp(run, mbit, secs)?;
    let doc = run.status("alice")?;
    let udp: Vec<_> = doc
        .forwards
        .iter()
        .filter(|f| f.protocol == "udp")
        .collect();
    let counters = udp.iter().fold((0, 0, 0), |acc, f| {
        (
            acc.0 + f.datagrams_out,
            acc.1 + f.datagrams_in,
            acc.2 + f.datagrams_dropped,
        )
    });
    if crate::harness::status::path(&doc) != want {
        bail!("the path changed during the run: {:?}", doc.peers);
    }
    Ok(UdpReport {
        over,
        queries,
        answered,
        dns_secs,
        mbit_target: mbit,
        mbit_received,
        lost_percent,
        lost_packets,
        packets,
        counters,
    })
}

/// The CI check on one path: 1,000 queries all answered, and iperf3 at
/// 100 Mbit/s for 5 s delivering most of its datagrams (the loss figure
/// is printed; BENCHMARKS.md has the longer runs).
pub fn check(bins: &Binaries, over: Over) -> Result<String> {
    let r = run_path(bins, over, 1000, 100, 5)?;
    if r.answered != r.queries {
        bail!("{r}: not every DNS query was answered");
    }
    if r.packets == 0 || r.lost_percent > 20.0 {
        bail!("{r}: iperf3 lost more than 20 % (or sent nothing)");
    }
    if r.counters.0 < r.queries as u64 || r.counters.1 < r.queries as u64 {
        bail!("{r}: alice's forward counters do not show the datagrams");
    }
    Ok(r.to_string())
}

/// Port of the plain (no punchd) iperf3 server, DNATed on bob's NAT.
const PLAIN_PORT: u16 = 5202;
/// bob's host and his NAT's public address.
const BOB_HOST: &str = "198.51.100.2";
const BOB_PUBLIC: &str = "203.0.113.3";

/// DNAT `port` (TCP and UDP) on bob's NAT's outside interface to his host:
/// the plain-UDP reference, as a user would open a port without punchd.
fn port_forward_b(run: &Run, port: u16) -> Result<()> {
    let port = port.to_string();
    let to = format!("{BOB_HOST}:{port}");
    for proto in ["tcp", "udp"] {
        run.topo.nats[1].exec(
            "iptables",
            &[
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-i",
                "wan0",
                "-p",
                proto,
                "--dport",
                &port,
                "-j",
                "DNAT",
                "--to-destination",
                &to,
            ],
        )?;
    }
    Ok(())
}

/// The benchmark: on each path, iperf3 -u at `mbit` for `secs` through the
/// forward; on the TCP and QUIC runs' networks also plain UDP from alice's host to bob's
/// through a port forward on his NAT (no punchd). One line per figure.
pub fn bench(bins: &Binaries, mbit: u32, secs: u32) -> Result<String> {
    let mut lines = Vec::new();
    for over in [Over::Tcp, Over::Quic, Over::Relayed] {
        let s = scenario(over);
        let mut run = Run::start(&s, bins)?;
        let r = (|| -> Result<()> {
            let report = measure(&mut run, over, 200, mbit, secs)?;
            lines.push(format!("punchd {report}"));
            if over == Over::Relayed {
                return Ok(());
            }
            // Plain UDP on the same network, no punchd.
            let log = run.dir.join("iperf3-plain.log");
            let port = PLAIN_PORT.to_string();
            run.topo
                .host_b
                .spawn(Path::new("iperf3"), &["-s", "-p", &port], &[], &log)?;
            let ns = run.topo.host_b.name().to_owned();
            wait("plain iperf3 to listen", Duration::from_secs(10), || {
                crate::net::netns::listens_on(&ns, PLAIN_PORT).then_some(())
            })?;
            port_forward_b(&run, PLAIN_PORT)?;
            let rate = format!("{mbit}M");
            let t = secs.to_string();
            let out = run.topo.host_a.exec_output(
                "iperf3",
                &[
                    "-c", BOB_PUBLIC, "-p", &port, "-u", "-b", &rate, "-t", &t, "-l", "1200", "-w",
                    "4M", "-J",
                ],
            )?;
            let (rx, loss, lost, packets) = parse_iperf(&String::from_utf8_lossy(&out.stdout))?;
            lines.push(format!(
                "plain UDP through a port forward (network of the {over:?} run): iperf3 -u {mbit} Mbit/s: {rx:.1} Mbit/s received, loss {loss:.2} % ({lost} of {packets})"
            ));
            Ok(())
        })();
        r.map_err(|e| run.explain(e))?;
    }
    Ok(lines.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iperf_json_is_read_from_the_receiver_summary() {
        let json = r#"{"end":{"sum_received":{"bits_per_second":99000000.0,"lost_percent":0.5,"lost_packets":5,"packets":1000}}}"#;
        assert_eq!(parse_iperf(json).unwrap(), (99.0, 0.5, 5, 1000));
        assert!(parse_iperf(r#"{"error":"unable to connect"}"#).is_err());
        assert!(parse_iperf("not json").is_err());
    }
}
