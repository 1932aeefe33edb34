//! `punch-lab-tool bench`: tunnel throughput and latency side by side, in
//! one run, on the same lab path (both hosts behind port-preserving NATs,
//! no added delay), with iperf3 (1 stream and 8) and request/response
//! round trips (64-byte messages, `rr` against an `echo`):
//!
//! - plain TCP through a port forward on bob's NAT: the ceiling;
//! - punchd direct over TCP, through alice's `[[forward]]`;
//! - punchd direct over QUIC, in a second network whose NATs drop
//!   unsolicited packets (a home router's firewall; at the lab's raw speed a
//!   plain Linux NAT keeps state for an early UDP datagram that spoils the
//!   punch, see lab/README.md);
//! - `ssh -L` to an sshd behind bob's NAT (port forward);
//! - rathole with its Noise transport (server behind alice's NAT, client
//!   next to the service on bob's side: the same direction as punchd);
//! - punchd relayed, in a second network whose NATs randomize ports, with
//!   the relay's bandwidth cap lifted;
//! - a bare relay: `punch-lab-tool relay` in each host, plain TCP through
//!   a port forward on bob's NAT, no encryption, no multiplexing
//!   (`harness/relay.rs`). It makes the same four process hops as every
//!   tunnel here (into and out of each end) and nothing else, so its round
//!   trip is the floor for any port-relaying tunnel on this machine.
//!
//! Then 1,000 concurrent streams of 1 MiB through one punchd tunnel, with
//! checksums and both daemons' peak RSS, and the single-core AEAD rates
//! (`openssl speed`), the ceiling for any encrypted tunnel here. Figures
//! are printed with no thresholds, but an arm that measured a failure (a
//! checksum mismatch, a path that would not start, the loopback run)
//! fails the benchmark after everything is printed. A competitor that is
//! not installed is skipped with the reason printed. Last, the first four
//! paths and the bare relay again with everything on one host's loopback
//! (no NAT, no veth).

pub mod charts;
pub mod rtt;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use crate::harness::punchd_types::{PathState, Transport};
use crate::harness::spec::FORWARD_LISTEN;
use crate::harness::status::{self, first_peer};
use crate::harness::transfer::{transfer_in, RrReport};
use crate::harness::{Binaries, Expect, Run, Scenario};
use crate::net::nat::NatBehaviour;
use crate::net::netns::{self, listens_on, Netns};
use crate::net::topology::Layout;

/// The service port on bob's host: iperf3, then the echo, then the sink.
pub(crate) const SERVICE_PORT: u16 = 9000;
pub(crate) const SSH_LISTEN: &str = "127.0.0.1:10001";
pub(crate) const RATHOLE_LISTEN: &str = "127.0.0.1:10002";
pub(crate) const BARE_LISTEN: &str = "127.0.0.1:10003";
/// The bare relay's far end, behind bob's NAT (port-forwarded).
pub(crate) const BARE_PORT: u16 = 2444;
pub(crate) const BOB_PUBLIC: &str = "203.0.113.3";
const BOB_HOST: &str = "198.51.100.2";
const ALICE_PUBLIC: &str = "203.0.113.2";
const ALICE_HOST: &str = "192.0.2.2";

/// What one path measured.
#[derive(Debug, Default)]
struct Row {
    path: &'static str,
    one: Option<f64>,
    eight: Option<f64>,
    rr: Option<RrReport>,
    /// Not measured, and why (printed in place of the figures).
    skipped: Option<String>,
    /// Not measured because it broke, not because a tool is missing: the
    /// benchmark fails (after printing the others).
    failed: bool,
}

/// A competitor's tool is not installed: its row is skipped, and that
/// alone does not fail the benchmark.
#[derive(Debug)]
struct NotInstalled(String);

impl std::fmt::Display for NotInstalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} is not installed", self.0)
    }
}

impl std::error::Error for NotInstalled {}

/// Marks a competitor's row as not measured: skipped if its tool is
/// missing, failed if it is there and would not start.
fn not_measured(row: &mut Row, e: &anyhow::Error) {
    row.failed = e.downcast_ref::<NotInstalled>().is_none();
    row.skipped = Some(if row.failed {
        format!("FAILED: {e:#}")
    } else {
        format!("{e:#}")
    });
}

/// One iperf3 run's received rate, Gbit/s. iperf3 serves one test at a
/// time and may still be finishing the previous one: retried then.
pub(crate) fn iperf(ns: &str, target: &str, streams: usize, seconds: u64) -> Result<f64> {
    let mut tries = 0;
    loop {
        match iperf_once(ns, target, streams, seconds) {
            Err(e) if tries < 5 && format!("{e:#}").contains("busy") => {
                tries += 1;
                std::thread::sleep(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

/// Runs a command in namespace `ns`, whatever its exit code.
pub(crate) fn exec_in(ns: &str, cmd: &str, args: &[&str]) -> Result<std::process::Output> {
    std::process::Command::new("ip")
        .args(["netns", "exec", ns, cmd])
        .args(args)
        .output()
        .with_context(|| format!("cannot run {cmd} in {ns}"))
}

fn iperf_once(ns: &str, target: &str, streams: usize, seconds: u64) -> Result<f64> {
    let (host, port) = target.rsplit_once(':').context("target without a port")?;
    let out = exec_in(
        ns,
        "iperf3",
        &[
            "-c",
            host,
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
        None => bail!("iperf3 to {target} failed: {}", v["error"]),
    }
}

/// `punch-lab-tool rr` inside `ns`.
fn rr(ns: &str, tool: &Path, target: &str, count: usize) -> Result<RrReport> {
    let out = exec_in(
        ns,
        tool.to_str().unwrap_or("punch-lab-tool"),
        &["rr", "--connect", target, "--count", &count.to_string()],
    )?;
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("rr to {target}: {}", String::from_utf8_lossy(&out.stderr)))
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

pub(crate) fn installed(tool: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// DNAT `port` on a NAT's outside interface to `host:port` behind it.
pub(crate) fn port_forward(nat: &Netns, port: u16, host: &str) -> Result<()> {
    let port = port.to_string();
    nat.exec(
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
            &port,
            "-j",
            "DNAT",
            "--to-destination",
            &format!("{host}:{port}"),
        ],
    )?;
    Ok(())
}

pub(crate) fn wait_listening(ns: &Netns, addr: &str) -> Result<()> {
    let port: u16 = addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .context("address without a port")?;
    for _ in 0..100 {
        if listens_on(ns.name(), port) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("nothing listens on {addr} in {} after 10 s", ns.name())
}

/// Checks that OpenSSH is there and makes `dir` for its files.
fn ssh_dir(base: &Path) -> Result<std::path::PathBuf> {
    for tool in ["ssh", "sshd", "ssh-keygen"] {
        if !installed(tool) {
            return Err(NotInstalled(format!(
                "{tool} (apt-get install openssh-client openssh-server)"
            ))
            .into());
        }
    }
    let dir = base.join("ssh");
    std::fs::create_dir_all(&dir)?;
    std::fs::create_dir_all("/run/sshd")?;
    Ok(dir)
}

/// An sshd on port 2222 (all addresses) in `ns`, accepting a fresh key;
/// returns that key.
fn sshd(dir: &Path, ns: &mut Netns) -> Result<std::path::PathBuf> {
    for key in ["hostkey", "userkey"] {
        let path = dir.join(key);
        let _ = std::fs::remove_file(&path);
        netns::run(
            "ssh-keygen",
            &[
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-f",
                path.to_str().unwrap_or(""),
            ],
        )?;
    }
    std::fs::copy(dir.join("userkey.pub"), dir.join("authorized_keys"))?;
    let d = dir.display();
    std::fs::write(
        dir.join("sshd_config"),
        format!(
            "Port 2222\nListenAddress 0.0.0.0\nHostKey {d}/hostkey\nAuthorizedKeysFile {d}/authorized_keys\n\
             PidFile none\nStrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\nAllowTcpForwarding yes\n"
        ),
    )?;
    let cfg = dir.join("sshd_config");
    ns.spawn(
        Path::new("/usr/sbin/sshd"),
        &["-D", "-e", "-f", cfg.to_str().unwrap_or("")],
        &[],
        &dir.join("sshd.log"),
    )?;
    wait_listening(ns, "0.0.0.0:2222")?;
    Ok(dir.join("userkey"))
}

/// `ssh -L SSH_LISTEN:127.0.0.1:SERVICE_PORT` from `ns` to `server_ip`.
fn ssh_forward(dir: &Path, ns: &mut Netns, server_ip: &str, key: &Path) -> Result<()> {
    let forward = format!("{SSH_LISTEN}:127.0.0.1:{SERVICE_PORT}");
    ns.spawn(
        Path::new("ssh"),
        &[
            "-N",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-i",
            key.to_str().unwrap_or(""),
            "-p",
            "2222",
            "-L",
            &forward,
            &format!("root@{server_ip}"),
        ],
        &[],
        &dir.join("ssh.log"),
    )?;
    wait_listening(ns, SSH_LISTEN)
}

/// sshd behind bob's NAT (port forward 2222) and `ssh -L` in alice's host
/// to bob's service port.
pub(crate) fn start_ssh(run: &mut Run) -> Result<()> {
    let dir = ssh_dir(&run.dir)?;
    let key = sshd(&dir, &mut run.topo.host_b)?;
    port_forward(&run.topo.nats[1], 2222, BOB_HOST)?;
    ssh_forward(&dir, &mut run.topo.host_a, BOB_PUBLIC, &key)
}

/// Fresh Noise keys and the two rathole configs: the server listens on
/// 2333 and serves RATHOLE_LISTEN, the client dials `server` and serves
/// bob's service port. Returns (server config, client config).
fn rathole_configs(dir: &Path, server: &str) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    if !installed("rathole") {
        return Err(
            NotInstalled("rathole (cargo install rathole; see BENCHMARKS.md)".into()).into(),
        );
    }
    let out = netns::run("rathole", &["--genkey"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let keys: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.ends_with('=') && !l.contains(' '))
        .collect();
    let [private, public] = keys[..] else {
        bail!("unexpected `rathole --genkey` output: {text}");
    };
    std::fs::create_dir_all(dir)?;
    let server_cfg = dir.join("server.toml");
    let client_cfg = dir.join("client.toml");
    std::fs::write(
        &server_cfg,
        format!(
            "[server]\nbind_addr = \"0.0.0.0:2333\"\n[server.transport]\ntype = \"noise\"\n\
             [server.transport.noise]\nlocal_private_key = \"{private}\"\n\
             [server.services.bench]\ntoken = \"bench\"\nbind_addr = \"{RATHOLE_LISTEN}\"\n"
        ),
    )?;
    std::fs::write(
        &client_cfg,
        format!(
            "[client]\nremote_addr = \"{server}\"\n[client.transport]\ntype = \"noise\"\n\
             [client.transport.noise]\nremote_public_key = \"{public}\"\n\
             [client.services.bench]\ntoken = \"bench\"\nlocal_addr = \"127.0.0.1:{SERVICE_PORT}\"\n"
        ),
    )?;
    Ok((server_cfg, client_cfg))
}

/// Starts one side of rathole in `ns`.
fn rathole(ns: &mut Netns, side: &str, cfg: &Path) -> Result<()> {
    let log = cfg.with_extension("log");
    ns.spawn(
        Path::new("rathole"),
        &[side, cfg.to_str().unwrap_or("")],
        &[],
        &log,
    )?;
    Ok(())
}

/// rathole (Noise) server in alice's host (port forward 2333 on her NAT),
/// client in bob's host next to the service.
pub(crate) fn start_rathole(run: &mut Run) -> Result<()> {
    let (server, client) =
        rathole_configs(&run.dir.join("rathole"), &format!("{ALICE_PUBLIC}:2333"))?;
    rathole(&mut run.topo.host_a, "--server", &server)?;
    port_forward(&run.topo.nats[0], 2333, ALICE_HOST)?;
    wait_listening(&run.topo.host_a, "0.0.0.0:2333")?;
    rathole(&mut run.topo.host_b, "--client", &client)?;
    wait_listening(&run.topo.host_a, RATHOLE_LISTEN)?;
    // The server listens before the client's control channel is up.
    std::thread::sleep(Duration::from_secs(1));
    Ok(())
}

/// One end of the bare relay in `ns`: `punch-lab-tool relay` from
/// `listen` to `to` (see `harness/relay.rs`).
fn bare_relay(ns: &mut Netns, tool: &Path, listen: &str, to: &str, log: &Path) -> Result<()> {
    ns.spawn(tool, &["relay", "--listen", listen, "--to", to], &[], log)?;
    wait_listening(ns, listen)
}

/// The bare relay (see the module doc): its far end in bob's host from
/// `BARE_PORT` to the service (port forward on his NAT), its near end in
/// alice's host from `BARE_LISTEN` to that forward.
pub(crate) fn start_bare_relay(run: &mut Run) -> Result<()> {
    let tool = run.bins().tool.clone();
    let log = |side: &str| run.dir.join(format!("relay-{side}.log"));
    let (far, near) = (log("bob"), log("alice"));
    bare_relay(
        &mut run.topo.host_b,
        &tool,
        &format!("0.0.0.0:{BARE_PORT}"),
        &format!("127.0.0.1:{SERVICE_PORT}"),
        &far,
    )?;
    port_forward(&run.topo.nats[1], BARE_PORT, BOB_HOST)?;
    bare_relay(
        &mut run.topo.host_a,
        &tool,
        BARE_LISTEN,
        &format!("{BOB_PUBLIC}:{BARE_PORT}"),
        &near,
    )
}

/// Replaces whatever serves the service port in `ns` with `cmd args`
/// (iperf3 or a lab tool subcommand).
pub(crate) fn serve(
    ns: &mut Netns,
    dir: &Path,
    current: &mut Option<usize>,
    cmd: &Path,
    args: &[&str],
) -> Result<()> {
    if let Some(i) = current.take() {
        ns.kill(i);
    }
    let log = dir.join(format!(
        "service-{}.log",
        cmd.file_name().and_then(|n| n.to_str()).unwrap_or("x")
    ));
    *current = Some(ns.spawn(cmd, args, &[], &log)?);
    wait_listening(ns, &format!("0.0.0.0:{SERVICE_PORT}"))
}

/// iperf3 and rr from namespace `client` over each available path to the
/// service in `server`; returns the index of the service left running.
fn measure(
    server: &mut Netns,
    client: &str,
    tool: &Path,
    dir: &Path,
    paths: &mut [(Row, String)],
    seconds: u64,
    rr_count: usize,
) -> Result<Option<usize>> {
    let port = SERVICE_PORT.to_string();
    let mut current = None;
    serve(
        server,
        dir,
        &mut current,
        Path::new("iperf3"),
        &["-s", "-p", &port],
    )?;
    for (row, target) in paths.iter_mut().filter(|(r, _)| r.skipped.is_none()) {
        row.one = Some(iperf(client, target, 1, seconds)?);
        row.eight = Some(iperf(client, target, 8, seconds)?);
    }
    let listen = format!("0.0.0.0:{SERVICE_PORT}");
    serve(
        server,
        dir,
        &mut current,
        tool,
        &["echo", "--listen", &listen],
    )?;
    for (row, target) in paths.iter_mut().filter(|(r, _)| r.skipped.is_none()) {
        row.rr = Some(rr(client, tool, target, rr_count)?);
    }
    Ok(current)
}

/// [`measure`] on a lab run: the service on bob's host, clients on alice's. (server) with alice's host as the client.
fn measure_run(
    run: &mut Run,
    paths: &mut [(Row, String)],
    seconds: u64,
    rr_count: usize,
) -> Result<Option<usize>> {
    let client = run.topo.host_a.name().to_owned();
    let tool = run.bins().tool.clone();
    let dir = run.dir.clone();
    measure(
        &mut run.topo.host_b,
        &client,
        &tool,
        &dir,
        paths,
        seconds,
        rr_count,
    )
}

/// A process's resident memory, KiB (0 if it is gone).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Peak RSS (KiB) of `pids`, sampled every 50 ms until `stop`.
fn sample_rss(pids: Vec<u32>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<u64>> {
    std::thread::spawn(move || {
        let mut peak = vec![0u64; pids.len()];
        while !stop.load(Ordering::Relaxed) {
            for (p, pid) in peak.iter_mut().zip(&pids) {
                *p = (*p).max(rss_kib(*pid));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        peak
    })
}

/// 1,000 streams × 1 MiB through alice's forward to bob's sink, at once.
fn many_streams(run: &mut Run, server: &mut Option<usize>) -> Result<String> {
    const STREAMS: usize = 1000;
    let tool = run.bins().tool.clone();
    let listen = format!("127.0.0.1:{SERVICE_PORT}");
    if let Some(i) = server.take() {
        run.topo.host_b.kill(i);
    }
    *server = Some(run.topo.host_b.spawn(
        &tool,
        &["sink", "--listen", &listen],
        &[],
        &run.dir.join("sink-streams.log"),
    )?);
    wait_listening(&run.topo.host_b, &listen)?;
    let pids: Vec<u32> = [run.topo.host_a.pid(run.alice), run.topo.host_b.pid(run.bob)]
        .into_iter()
        .flatten()
        .collect();
    let before: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_rss(pids, stop.clone());
    let report = transfer_in(
        run.topo.host_a.name(),
        &tool,
        (STREAMS as u64) << 20,
        STREAMS,
        None,
    )?;
    stop.store(true, Ordering::Relaxed);
    let peak = sampler.join().unwrap_or_default();
    let line = format!(
        "{STREAMS} streams x 1 MiB through one tunnel: {} in {:.2}s ({} errors); punchd RSS before/peak: alice {}/{} KiB, bob {}/{} KiB",
        if report.ok { "all checksums match" } else { "FAILED" },
        report.seconds,
        report.errors.len(),
        before.first().copied().unwrap_or(0),
        peak.first().copied().unwrap_or(0),
        before.get(1).copied().unwrap_or(0),
        peak.get(1).copied().unwrap_or(0),
    );
    // A benchmark that measured a failure must not exit 0: the figure is
    // printed, and the run fails.
    if !report.ok {
        let first = report.errors.first().map_or("", String::as_str);
        bail!("{line}; first error: {first}");
    }
    Ok(line)
}

fn row(name: &'static str, target: &str) -> (Row, String) {
    let row = Row {
        path: name,
        ..Row::default()
    };
    (row, target.to_owned())
}

/// The five paths compared in one network (skipped ones are marked later),
/// the first reaching the service without a tunnel at `plain`.
fn compared_paths(plain: String) -> Vec<(Row, String)> {
    vec![
        row("plain TCP", &plain),
        row("punchd TCP", FORWARD_LISTEN),
        row("ssh -L", SSH_LISTEN),
        row("rathole noise", RATHOLE_LISTEN),
        row("bare relay", BARE_LISTEN),
    ]
}

/// The same comparison with everything on one host's loopback (no NAT, no
/// veth): the rendezvous, both daemons (punch ports 40000 and 40001),
/// sshd and `ssh -L`, both rathole sides, iperf3 and the echo.
fn loopback(bins: &Binaries, seconds: u64, rr_count: usize) -> Result<Vec<(Row, String)>> {
    let dir = std::env::temp_dir().join("punch-lab-bench-loopback");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut ns = Netns::create("pl-loop-host")?;
    let alice_key = bins.keygen(&dir.join("alice.key"))?;
    let bob_key = bins.keygen(&dir.join("bob.key"))?;
    let rv = "127.0.0.1:8080";
    let peer_toml = |me: &str, port: u16, admin: u16, peer: &str, peer_key: &str, tail: String| {
        format!(
            "name = \"{me}\"\nkey_file = \"{me}.key\"\n[rendezvous]\nurl = \"http://{rv}\"\n\
             [punch]\nport = {port}\ntransports = [\"tcp\"]\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
             [[peers]]\nname = \"{peer}\"\npublic_key = \"{peer_key}\"\n{tail}"
        )
    };
    let forward = format!(
        "[[forward]]\nlisten = \"{FORWARD_LISTEN}\"\npeer = \"bob\"\nservice = \"bench\"\n"
    );
    let expose = format!(
        "[[expose]]\nname = \"bench\"\ntarget = \"127.0.0.1:{SERVICE_PORT}\"\nallow = [\"alice\"]\n"
    );
    std::fs::write(
        dir.join("alice.toml"),
        peer_toml("alice", 40000, 7070, "bob", &bob_key, forward),
    )?;
    std::fs::write(
        dir.join("bob.toml"),
        peer_toml("bob", 40001, 7071, "alice", &alice_key, expose),
    )?;
    ns.spawn(
        &bins.rendezvous,
        &["--listen", rv],
        &[],
        &dir.join("rendezvous.log"),
    )?;
    wait_listening(&ns, rv)?;
    for who in ["bob", "alice"] {
        let cfg = dir.join(format!("{who}.toml"));
        ns.spawn(
            &bins.punchd,
            &["--config", cfg.to_str().unwrap_or("")],
            &[],
            &dir.join(format!("{who}.log")),
        )?;
    }
    let mut direct = false;
    for _ in 0..300 {
        // Not up yet reads as not direct: keep polling.
        let doc = status::read(&ns, &bins.punchd, "127.0.0.1:7070").ok();
        if doc.is_some_and(|d| status::path(&d) == PathState::Direct) {
            direct = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if !direct {
        bail!(
            "loopback: alice's tunnel to bob is not direct after 30 s (logs in {})",
            dir.display()
        );
    }
    let mut paths = compared_paths(format!("127.0.0.1:{SERVICE_PORT}"));
    let ssh = ssh_dir(&dir).and_then(|d| {
        let key = sshd(&d, &mut ns)?;
        ssh_forward(&d, &mut ns, "127.0.0.1", &key)
    });
    if let Err(e) = ssh {
        not_measured(&mut paths[2].0, &e);
    }
    let rathole_up = rathole_configs(&dir.join("rathole"), "127.0.0.1:2333").and_then(|(s, c)| {
        rathole(&mut ns, "--server", &s)?;
        wait_listening(&ns, "0.0.0.0:2333")?;
        rathole(&mut ns, "--client", &c)?;
        wait_listening(&ns, RATHOLE_LISTEN)?;
        std::thread::sleep(Duration::from_secs(1));
        Ok(())
    });
    if let Err(e) = rathole_up {
        not_measured(&mut paths[3].0, &e);
    }
    let far = format!("127.0.0.1:{BARE_PORT}");
    let bare = bare_relay(
        &mut ns,
        &bins.tool,
        &far,
        &format!("127.0.0.1:{SERVICE_PORT}"),
        &dir.join("relay-far.log"),
    )
    .and_then(|()| {
        bare_relay(
            &mut ns,
            &bins.tool,
            BARE_LISTEN,
            &far,
            &dir.join("relay-near.log"),
        )
    });
    if let Err(e) = bare {
        not_measured(&mut paths[4].0, &e);
    }
    let name = ns.name().to_owned();
    measure(
        &mut ns, &name, &bins.tool, &dir, &mut paths, seconds, rr_count,
    )?;
    Ok(paths)
}

/// Runs every comparison and prints the tables.
pub fn run(bins: &Binaries, seconds: u64) -> Result<()> {
    let rr_count = 2000;
    let mut paths = compared_paths(format!("{BOB_PUBLIC}:{SERVICE_PORT}"));
    let streams_line;
    {
        let s = Scenario::new(
            "bench",
            Layout::TwoNats(NatBehaviour::Masquerade),
            Expect::Direct,
        );
        let mut run = Run::start(&s, bins)?;
        run.wait_path("alice", PathState::Direct, Duration::from_secs(30))?;
        run.topo.host_b.kill(run.sink);
        port_forward(&run.topo.nats[1], SERVICE_PORT, BOB_HOST)?;
        if let Err(e) = start_ssh(&mut run) {
            not_measured(&mut paths[2].0, &e);
        }
        if let Err(e) = start_rathole(&mut run) {
            not_measured(&mut paths[3].0, &e);
        }
        if let Err(e) = start_bare_relay(&mut run) {
            not_measured(&mut paths[4].0, &e);
        }
        let mut server = measure_run(&mut run, &mut paths, seconds, rr_count)?;
        streams_line = many_streams(&mut run, &mut server);
    }
    // QUIC's default (`system`: the host's TCP choice, BBR in the lab)
    // and pinned to CUBIC, what a host on CUBIC gets.
    for (name, congestion) in [("punchd QUIC", "system"), ("punchd QUIC cubic", "cubic")] {
        let mut quic = vec![row(name, FORWARD_LISTEN)];
        let s = Scenario::new(
            &format!("bench-quic-{congestion}"),
            Layout::TwoNats(NatBehaviour::Firewall),
            Expect::Direct,
        )
        .with_transports(&[Transport::Quic])
        .with_punch(&format!("quic_congestion = \"{congestion}\""));
        let mut run = Run::start(&s, bins)?;
        let status = run.wait_path("alice", PathState::Direct, Duration::from_secs(30))?;
        let peer = first_peer(&status)?;
        if peer.transport != Some(Transport::Quic) {
            bail!("{name}: the tunnel is not on QUIC: {peer:?}");
        }
        run.topo.host_b.kill(run.sink);
        measure_run(&mut run, &mut quic, seconds, rr_count)?;
        paths.extend(quic);
    }
    let mut relayed = vec![row("punchd relayed", FORWARD_LISTEN)];
    {
        // Port-randomizing NATs: no direct path. The relay's per-session
        // cap (8 MiB/s by default) is lifted to see what the relay path
        // itself can do.
        let mut s = Scenario::new(
            "bench-relay",
            Layout::TwoNats(NatBehaviour::RandomFully),
            Expect::Relayed,
        )
        .with_timeout("3s");
        s.rendezvous_config = Some("[limits]\nrelay_bytes_per_second = 10000000000\n".to_owned());
        let mut run = Run::start(&s, bins)?;
        run.wait_path("alice", PathState::Relayed, Duration::from_secs(30))?;
        run.topo.host_b.kill(run.sink);
        measure_run(&mut run, &mut relayed, seconds, rr_count)?;
    }
    paths.extend(relayed);
    print_tables("lab both-NATs path", &paths, seconds, rr_count);
    // Printed before the result is judged, so a failed arm still leaves
    // every figure the others measured.
    let loopback = loopback(bins, seconds, rr_count);
    match &loopback {
        Ok(paths) => print_tables("loopback, one host", paths, seconds, rr_count),
        Err(e) => println!("\nloopback comparison failed: {e:#}"),
    }
    match &streams_line {
        Ok(line) => println!("\n{line}"),
        Err(e) => println!("\n{e:#}"),
    }
    for alg in ["aes-128-gcm", "chacha20-poly1305"] {
        if let Some(r) = aead_rate(alg) {
            println!("single-core {alg}: {r:.2} GB/s ({:.1} Gbit/s)", r * 8.0);
        }
    }
    // Every arm that measured a failure fails the benchmark (exit non-zero).
    let loopback = loopback.context("the loopback comparison failed")?;
    let broken: Vec<&str> = paths
        .iter()
        .chain(&loopback)
        .filter(|(r, _)| r.failed)
        .map(|(r, _)| r.path)
        .collect();
    if !broken.is_empty() {
        bail!("these paths would not start: {broken:?} (see the tables)");
    }
    streams_line.context("the 1,000-stream run failed")?;
    Ok(())
}

fn print_tables(title: &str, paths: &[(Row, String)], seconds: u64, rr_count: usize) {
    let by_name = |name: &str| paths.iter().find(|(r, _)| r.path == name).map(|(r, _)| r);
    let plain = by_name("plain TCP");
    let rathole = by_name("rathole noise").filter(|r| r.skipped.is_none());
    let ratio = |v: Option<f64>, base: Option<f64>| match (v, base) {
        (Some(v), Some(b)) if b > 0.0 => format!("{:.2}", v / b),
        _ => "-".to_owned(),
    };
    let num = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
    println!(
        "\nThroughput, {title}, iperf3 {seconds} s per run, Gbit/s (ratios: to plain TCP / to rathole):"
    );
    println!(
        "{:<16} {:>8} {:>13} {:>8} {:>13}",
        "path", "1 stream", "ratio", "8 streams", "ratio"
    );
    for (row, _) in paths {
        if let Some(why) = &row.skipped {
            println!("{:<16} skipped: {why}", row.path);
            continue;
        }
        println!(
            "{:<16} {:>8} {:>13} {:>8} {:>13}",
            row.path,
            num(row.one),
            format!(
                "{} / {}",
                ratio(row.one, plain.and_then(|p| p.one)),
                ratio(row.one, rathole.and_then(|r| r.one))
            ),
            num(row.eight),
            format!(
                "{} / {}",
                ratio(row.eight, plain.and_then(|p| p.eight)),
                ratio(row.eight, rathole.and_then(|r| r.eight))
            ),
        );
    }
    println!(
        "\nRequest/response, {title}, 64 B each way, {rr_count} round trips on one connection, microseconds (p50 ratio to plain TCP):"
    );
    println!("{:<16} {:>8} {:>8} {:>8}", "path", "p50", "p99", "ratio");
    let plain_p50 = plain.and_then(|p| p.rr.as_ref()).map(|r| r.p50_us);
    for (row, _) in paths.iter().filter(|(r, _)| r.skipped.is_none()) {
        let Some(rr) = &row.rr else { continue };
        println!(
            "{:<16} {:>8.0} {:>8.0} {:>8}",
            row.path,
            rr.p50_us,
            rr.p99_us,
            ratio(Some(rr.p50_us), plain_p50)
        );
    }
}
