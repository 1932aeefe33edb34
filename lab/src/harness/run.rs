//! A running lab scenario: the network built, the rendezvous (workspace
//! binary or container image), bob's sink and both daemons started with
//! generated keys and configs, and what a test does to it while it runs
//! (status, transfers, restarts). Dropping it removes everything; on a
//! failure [`Run::explain`] says what happened.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::harness::binaries::Binaries;
use crate::harness::container::Container;
use crate::harness::punchd_types::{PathState, StatusDoc};
use crate::harness::spec::{Scenario, FORWARD_LISTEN, PUNCH_PORT, SINK_LISTEN};
use crate::harness::status;
use crate::harness::transfer::{transfer_in, SendReport};
use crate::net::netns::{self, listens_on};
use crate::net::router::Router;
use crate::net::topology::{
    extra_rendezvous_ip, Side, Stack, Topology, RENDEZVOUS_IP, RENDEZVOUS_IP6, RENDEZVOUS_NAME,
};

const ADMIN: &str = "127.0.0.1:7070";
/// Where the cluster's `redis-server` listens (on the first rendezvous host).
pub const REDIS_URL: &str = "redis://203.0.113.1:6379";
/// Set to record every namespace's packets (`<ns>.pcap`) and each NAT's
/// conntrack events (`<ns>.conntrack.txt`) in the run's folder, kept after
/// a passing run too: for finding out why a punch missed.
pub const CAPTURE_ENV: &str = "PUNCH_LAB_CAPTURE";
/// A `RUST_LOG` filter for the lab's daemons instead of
/// `info,punchd=debug` (e.g. `info,punchd=trace,yamux=trace` to follow a stall).
pub const DAEMON_LOG_ENV: &str = "PUNCH_LAB_DAEMON_LOG";
/// A `RUST_LOG` filter for the lab's rendezvous instead of `info`.
pub const RENDEZVOUS_LOG_ENV: &str = "PUNCH_LAB_RENDEZVOUS_LOG";

/// The log filter for a lab process: the override in `env`, or `default`.
fn log_filter(env: &str, default: &str) -> String {
    std::env::var(env).unwrap_or_else(|_| default.to_owned())
}

/// A running lab: topology, working directory, process handles.
pub struct Run {
    /// The containerized rendezvous, if the scenario asked for one. First
    /// field: it is removed before the namespace it lives in.
    pub container: Option<Container>,
    /// The network.
    pub topo: Topology,
    /// Configs, keys and logs.
    pub dir: PathBuf,
    bins: Binaries,
    /// Index of alice's punchd in hostA.
    pub alice: usize,
    /// Index of bob's punchd in hostB.
    pub bob: usize,
    /// Index of the rendezvous process in rv (unused with a container).
    pub rendezvous: usize,
    /// Index of the cluster's `redis-server` in rv, if the scenario runs one.
    pub redis: Option<usize>,
    /// Indices of the further rendezvous instances, one per
    /// `topo.extra_rv` host.
    pub extra_rendezvous: Vec<usize>,
    /// Container start → its health check passed.
    pub rendezvous_healthy_after: Option<Duration>,
    /// Index of the sink bob exposes, in hostB.
    pub sink: usize,
    /// Router daemons, by index in `topo.nats`.
    pub routers: Vec<(usize, Router)>,
    started: Instant,
}

/// Polls `f` every 50 ms until it gives a value, for at most `timeout`.
pub fn wait<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts a packet capture in every namespace and a conntrack event log in
/// every NAT; they stop with their namespace. `-U` writes each packet as it
/// comes, so nothing is lost when the capture is killed.
fn capture(topo: &mut Topology, dir: &Path) -> Result<()> {
    let tcpdump = Path::new("tcpdump");
    let conntrack = Path::new("conntrack");
    for ns in [
        &mut topo.host_a,
        &mut topo.host_b,
        &mut topo.rv,
        &mut topo.inet,
    ]
    .into_iter()
    .chain(topo.nats.iter_mut())
    {
        let pcap = dir.join(format!("{}.pcap", ns.name()));
        let pcap = pcap.to_str().unwrap_or("capture.pcap").to_owned();
        let log = dir.join(format!("{}.tcpdump.txt", ns.name()));
        ns.spawn(tcpdump, &["-U", "-n", "-i", "any", "-w", &pcap], &[], &log)?;
    }
    for nat in &mut topo.nats {
        let log = dir.join(format!("{}.conntrack.txt", nat.name()));
        nat.spawn(conntrack, &["-E", "-o", "timestamp"], &[], &log)?;
    }
    std::thread::sleep(Duration::from_millis(300));
    Ok(())
}

impl Run {
    /// Builds the network and starts rendezvous, sink and both daemons.
    pub fn start(s: &Scenario, bins: &Binaries) -> Result<Self> {
        let mut topo = Topology::build(&netns::prefix(&s.name), s.layout)?;
        if let Some(plan) = s.ipv6 {
            topo.add_ipv6(plan)?;
        }
        let dir = std::env::temp_dir().join(format!("punch-lab-{}", s.name));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        if let Some(links) = &s.links {
            topo.emulate(links, &bins.tool, &dir)?;
            // Measured before anything starts: a late or dead emulator
            // would otherwise leave a plain network under a delayed name.
            let seen = crate::harness::checks::link_emulation_applied(&topo, links)?;
            std::fs::write(dir.join("links.txt"), seen)?;
        }
        if let Some(rules) = &s.host_b_rules {
            topo.host_b.nft(rules)?;
        }
        if std::env::var_os(CAPTURE_ENV).is_some() {
            capture(&mut topo, &dir)?;
        }
        let mut routers = Vec::new();
        for (side, spec) in &s.routers {
            let (nat, lan) = match side {
                Side::A => (topo.outer_nat_a, "192.0.2.0/24"),
                Side::B => (topo.outer_nat_b, "198.51.100.0/24"),
            };
            let Some(i) = nat else {
                bail!("no NAT on side {side:?} for a router");
            };
            routers.push((i, Router::start(&mut topo.nats[i], *spec, lan, &dir)?));
        }

        let alice_key = bins.keygen(&dir.join("alice.key"))?;
        let bob_key = bins.keygen(&dir.join("bob.key"))?;
        let url = format!("http://{RENDEZVOUS_IP}:8080");
        let rv_line = |rotate: usize| {
            if s.rendezvous_instances > 1 {
                let mut urls: Vec<String> = std::iter::once(format!("\"{url}\""))
                    .chain(
                        (0..s.rendezvous_instances - 1)
                            .map(|i| format!("\"http://{}:8080\"", extra_rendezvous_ip(i))),
                    )
                    .collect();
                let n = urls.len();
                urls.rotate_left(rotate % n);
                format!("urls = [{}]", urls.join(", "))
            } else {
                format!("url = \"{url}\"")
            }
        };
        let (mut alice_rv, mut bob_rv) = (rv_line(0), rv_line(usize::from(s.redis)));
        // An IPv6-only host reaches the rendezvous at its IPv6 literal.
        if let Some(plan) = s.ipv6 {
            let v6 = format!("url = \"http://[{RENDEZVOUS_IP6}]:8080\"");
            if plan.a == Stack::V6Only {
                alice_rv.clone_from(&v6);
            }
            if plan.b == Stack::V6Only {
                bob_rv.clone_from(&v6);
            }
            let name = format!("url = \"http://{RENDEZVOUS_NAME}:8080\"");
            if plan.by_name && plan.a == Stack::Dual {
                alice_rv.clone_from(&name);
            }
            if plan.by_name && plan.b == Stack::Dual {
                bob_rv = name;
            }
        }
        let transports: Vec<String> = s
            .transports
            .iter()
            .map(|t| format!("\"{}\"", t.as_str()))
            .collect();
        let punch = format!(
            "port = {PUNCH_PORT}\ntimeout = \"{}\"\ntransports = [{}]\n{}",
            s.punch_timeout,
            transports.join(", "),
            s.punch_extra
        );
        let alice_cfg = format!(
            "name = \"alice\"\nkey_file = \"alice.key\"\n[rendezvous]\n{alice_rv}\n[punch]\n{punch}\n[admin]\nlisten = \"{ADMIN}\"\ntoken_file = \"alice.admin-token\"\n\
             [[peers]]\nname = \"bob\"\npublic_key = \"{bob_key}\"\n[[forward]]\nlisten = \"{FORWARD_LISTEN}\"\npeer = \"bob\"\nservice = \"sink\"\n"
        );
        let bob_cfg = format!(
            "name = \"bob\"\nkey_file = \"bob.key\"\n[rendezvous]\n{bob_rv}\n[punch]\n{punch}\n[admin]\nlisten = \"{ADMIN}\"\ntoken_file = \"bob.admin-token\"\n\
             [[peers]]\nname = \"alice\"\npublic_key = \"{alice_key}\"\n[[expose]]\nname = \"sink\"\ntarget = \"{SINK_LISTEN}\"\nallow = [\"alice\"]\n"
        );
        std::fs::write(
            dir.join("alice.toml"),
            format!("{alice_cfg}{}", s.extra_config.0),
        )?;
        std::fs::write(
            dir.join("bob.toml"),
            format!("{bob_cfg}{}", s.extra_config.1),
        )?;
        let mut run = Self {
            container: None,
            rendezvous_healthy_after: None,
            topo,
            dir,
            bins: bins.clone(),
            alice: 0,
            bob: 0,
            rendezvous: 0,
            extra_rendezvous: Vec::new(),
            redis: None,
            sink: 0,
            routers,
            started: Instant::now(),
        };
        let base_cfg = s.rendezvous_config.clone().unwrap_or_default();
        if s.redis {
            run.start_redis()?;
            for i in 0..s.rendezvous_instances {
                let (file, ip) = match i {
                    0 => ("rendezvous.toml".to_owned(), RENDEZVOUS_IP.to_owned()),
                    _ => (
                        format!("rendezvous{}.toml", i + 1),
                        extra_rendezvous_ip(i - 1),
                    ),
                };
                let cfg = format!(
                    "redis = \"{REDIS_URL}\"\npublic_url = \"http://{ip}:8080\"\n{base_cfg}"
                );
                std::fs::write(run.dir.join(file), cfg)?;
            }
        } else if !base_cfg.is_empty() {
            std::fs::write(run.dir.join("rendezvous.toml"), base_cfg)?;
        }
        run.start_rendezvous(s.rendezvous_image.as_deref())?;
        for _ in 1..s.rendezvous_instances {
            run.start_extra_rendezvous()?;
        }
        let sink_log = run.dir.join("sink.log");
        run.sink = run.topo.host_b.spawn(
            &run.bins.tool,
            &["sink", "--listen", SINK_LISTEN],
            &[],
            &sink_log,
        )?;

        run.bob = run.start_daemon("bob")?;
        std::thread::sleep(s.alice_after);
        run.alice = run.start_daemon("alice")?;
        run.started = Instant::now();
        Ok(run)
    }

    /// Starts punch-rendezvous in rv, from the workspace binary or from a
    /// container image, and waits until it listens (and, for a container,
    /// until its health check passes and it runs as a non-root user).
    pub fn start_rendezvous(&mut self, image: Option<&str>) -> Result<()> {
        let log = self.dir.join("rendezvous.log");
        let rv = self.topo.rv.name().to_owned();
        match image {
            None => {
                let cfg = self.dir.join("rendezvous.toml");
                let cfg = cfg.to_str().unwrap_or("");
                let mut args = vec!["--listen", "0.0.0.0:8080"];
                if self.topo.ipv6.is_some() {
                    args.extend(["--listen", "[::]:8080"]);
                }
                if std::path::Path::new(cfg).is_file() {
                    args.extend(["--config", cfg]);
                }
                let filter = log_filter(RENDEZVOUS_LOG_ENV, "info");
                self.rendezvous = self.topo.rv.spawn(
                    &self.bins.rendezvous,
                    &args,
                    &[("RUST_LOG", filter.as_str())],
                    &log,
                )?;
            }
            Some(image) => {
                let name = format!("{}rendezvous", self.topo.prefix());
                let mut c = Container::run_in_netns(image, &name, &rv, &log)?;
                self.rendezvous_healthy_after = Some(c.wait_healthy(Duration::from_secs(60))?);
                let uid = c.process_uid()?;
                if uid == 0 {
                    bail!(
                        "the rendezvous container runs as root; the image must set a non-root USER"
                    );
                }
                self.container = Some(c);
            }
        }
        wait("the rendezvous to listen", Duration::from_secs(10), || {
            listens_on(&rv, 8080).then_some(())
        })?;
        Ok(())
    }

    /// Adds a rendezvous host and starts an instance there (same
    /// `rendezvous.toml` as the first), waiting until it listens.
    pub fn start_extra_rendezvous(&mut self) -> Result<()> {
        let i = self.extra_rendezvous.len();
        let own = self.dir.join(format!("rendezvous{}.toml", i + 2));
        let cfg = if own.is_file() {
            own
        } else {
            self.dir.join("rendezvous.toml")
        };
        let log = self.dir.join(format!("rendezvous{}.log", i + 2));
        let ns = self.topo.add_rendezvous_host()?.name().to_owned();
        let mut args = vec!["--listen".to_owned(), "0.0.0.0:8080".to_owned()];
        if cfg.is_file() {
            args.extend(["--config".to_owned(), cfg.to_string_lossy().into_owned()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let bin = self.bins.rendezvous.clone();
        let idx = self.topo.extra_rv[i].spawn(&bin, &args, &[("RUST_LOG", "info")], &log)?;
        self.extra_rendezvous.push(idx);
        wait(
            "an extra rendezvous to listen",
            Duration::from_secs(10),
            || listens_on(&ns, 8080).then_some(()),
        )?;
        Ok(())
    }

    /// Starts (or restarts) the cluster's `redis-server` on the first
    /// rendezvous host, without persistence (a restart comes back empty,
    /// the harder case), and waits until it listens.
    pub fn start_redis(&mut self) -> Result<()> {
        let log = self.dir.join("redis.log");
        let dir = self.dir.to_string_lossy().into_owned();
        self.redis = Some(self.topo.rv.spawn(
            Path::new("redis-server"),
            &[
                "--bind",
                RENDEZVOUS_IP,
                "--port",
                "6379",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
                "--daemonize",
                "no",
                "--dir",
                &dir,
            ],
            &[],
            &log,
        )?);
        let rv = self.topo.rv.name().to_owned();
        wait("redis-server to listen", Duration::from_secs(10), || {
            listens_on(&rv, 6379).then_some(())
        })
    }

    /// SIGKILLs the cluster's `redis-server`.
    pub fn kill_redis(&mut self) {
        if let Some(i) = self.redis.take() {
            self.topo.rv.kill(i);
        }
    }

    /// `/healthz`'s `status` of the rendezvous instance at `ip`, asked
    /// from its own host (`curl`).
    pub fn healthz(&self, ip: &str) -> Result<String> {
        let ns = if ip == RENDEZVOUS_IP {
            &self.topo.rv
        } else {
            self.topo
                .extra_rv
                .iter()
                .zip(0..)
                .find(|(_, i)| extra_rendezvous_ip(*i) == ip)
                .map(|(ns, _)| ns)
                .ok_or_else(|| anyhow::anyhow!("no rendezvous host {ip}"))?
        };
        let out = ns.exec_output(
            "curl",
            &["-s", "-m", "2", &format!("http://{ip}:8080/healthz")],
        )?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(v["status"].as_str().unwrap_or("").to_owned())
    }

    /// Kills the rendezvous (SIGKILL), process or container.
    pub fn kill_rendezvous(&mut self) {
        match self.container.take() {
            Some(c) => drop(c),
            None => self.topo.rv.kill(self.rendezvous),
        }
    }

    /// Starts (or restarts) a daemon; its log is appended per start.
    pub fn start_daemon(&mut self, who: &str) -> Result<usize> {
        let cfg = self.dir.join(format!("{who}.toml"));
        // One log per start (alice.1.log, alice.2.log, ...), so a restart
        // keeps the log of the run before it.
        let starts = std::fs::read_dir(&self.dir).map_or(0, |d| {
            d.flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(&format!("{who}."))
                        && e.file_name().to_string_lossy().ends_with(".log")
                })
                .count()
        });
        let log = self.dir.join(format!("{who}.{}.log", starts + 1));
        let ns = if who == "alice" {
            &mut self.topo.host_a
        } else {
            &mut self.topo.host_b
        };
        let filter = log_filter(DAEMON_LOG_ENV, "info,punchd=debug");
        ns.spawn(
            &self.bins.punchd,
            &["--config", cfg.to_str().unwrap_or("")],
            &[("RUST_LOG", filter.as_str())],
            &log,
        )
    }

    /// `punchd status --json` run inside a host, in the daemon's types.
    pub fn status(&self, who: &str) -> Result<StatusDoc> {
        let ns = if who == "alice" {
            &self.topo.host_a
        } else {
            &self.topo.host_b
        };
        status::read(ns, &self.bins.punchd, ADMIN)
    }

    /// Waits until `who`'s first peer reports `path`.
    pub fn wait_path(&self, who: &str, path: PathState, timeout: Duration) -> Result<StatusDoc> {
        let what = format!("{who} to report path {}", path.as_str());
        wait(&what, timeout, || {
            self.status(who)
                .ok()
                .filter(|doc| status::path(doc) == path)
        })
    }

    /// Daemons started (or last restarted together) → now.
    pub fn since_start(&self) -> Duration {
        self.started.elapsed()
    }

    /// Runs the sender in hostA through alice's forward.
    pub fn transfer(&self, bytes: u64, streams: usize) -> Result<SendReport> {
        transfer_in(
            self.topo.host_a.name(),
            &self.bins.tool,
            bytes,
            streams,
            None,
        )
    }

    /// [`Run::transfer`], and the bytes the rendezvous host's interface
    /// saw meanwhile (in and out): what tells a direct path from a relayed
    /// one from outside the daemons.
    pub fn transfer_counted(&self, bytes: u64, streams: usize) -> Result<(SendReport, u64)> {
        let before = self.topo.rendezvous_bytes()?;
        let t = self.transfer(bytes, streams)?;
        let after = self.topo.rendezvous_bytes()?;
        Ok((t, after.saturating_sub(before)))
    }

    /// The rendezvous's `/metrics` text, fetched inside rv.
    pub fn rendezvous_metrics(&self) -> Result<String> {
        let tool = self.bins.tool.to_str().unwrap_or("punch-lab-tool");
        let out = self.topo.rv.exec(
            tool,
            &["get", "--addr", "127.0.0.1:8080", "--path", "/metrics"],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A daemon's `/metrics` text, fetched inside its host.
    pub fn metrics(&self, who: &str) -> Result<String> {
        let tool = self.bins.tool.to_str().unwrap_or("punch-lab-tool");
        let ns = if who == "alice" {
            &self.topo.host_a
        } else {
            &self.topo.host_b
        };
        let out = ns.exec(tool, &["get", "--addr", ADMIN, "--path", "/metrics"])?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The binaries this run uses.
    pub fn bins(&self) -> &Binaries {
        &self.bins
    }

    /// `e` with the last lines of every log and the network's state
    /// after it: what a failed check reports.
    pub fn explain(&self, e: anyhow::Error) -> anyhow::Error {
        anyhow::anyhow!("{e:#}\n{}", self.log_tails())
    }

    /// What `who`'s first start logged (`alice.1.log`: see
    /// [`Run::start_daemon`]); empty if there is no such log.
    pub fn first_log(&self, who: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{who}.1.log"))).unwrap_or_default()
    }

    /// The last lines of every log, for a failure message.
    pub fn log_tails(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            let mut logs: Vec<_> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "log"))
                .collect();
            logs.sort();
            for p in logs {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                out.push_str(&format!("--- {} (last 25 lines)\n", p.display()));
                for l in &lines[lines.len().saturating_sub(25)..] {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
        out.push_str(&self.network_state());
        out
    }

    /// What the network looks like now, for a failure message: each
    /// host's punch-port sockets with their TCP internals (state,
    /// retransmits, unacknowledged bytes) and each NAT's punch-port
    /// conntrack entries and conntrack counters (`invalid` packets are not
    /// translated, `insert_failed`/`drop` are lost ones).
    pub fn network_state(&self) -> String {
        let port = PUNCH_PORT.to_string();
        let mut out = String::new();
        for host in [&self.topo.host_a, &self.topo.host_b] {
            out.push_str(&format!("--- {}: ss -tnoi (port {port})\n", host.name()));
            if let Ok(o) = host.exec_output("ss", &["-tanoi", "sport", "=", &format!(":{port}")]) {
                out.push_str(&String::from_utf8_lossy(&o.stdout));
            }
        }
        for nat in &self.topo.nats {
            out.push_str(&format!("--- {}: conntrack (port {port})\n", nat.name()));
            if let Ok(o) = nat.exec_output("conntrack", &["-L", "-p", "tcp"]) {
                for l in String::from_utf8_lossy(&o.stdout).lines() {
                    if l.contains(&format!("port={port}")) {
                        out.push_str(l);
                        out.push('\n');
                    }
                }
            }
            if let Ok(o) = nat.exec_output("conntrack", &["-S"]) {
                out.push_str(&conntrack_totals(&String::from_utf8_lossy(&o.stdout)));
                out.push('\n');
            }
        }
        out
    }
}

/// Sums `conntrack -S`'s per-CPU counters into one line of the non-zero
/// ones.
fn conntrack_totals(text: &str) -> String {
    let mut totals: Vec<(String, u64)> = Vec::new();
    for field in text.split_whitespace() {
        let Some((k, v)) = field.split_once('=') else {
            continue;
        };
        let (Ok(v), false) = (v.parse::<u64>(), k == "cpu") else {
            continue;
        };
        match totals.iter_mut().find(|(name, _)| name == k) {
            Some((_, t)) => *t += v,
            None => totals.push((k.to_owned(), v)),
        }
    }
    let parts: Vec<String> = totals
        .iter()
        .filter(|(_, v)| *v > 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    format!("conntrack counters: {}", parts.join(" "))
}

#[cfg(test)]
mod tests {
    #[test]
    fn conntrack_counters_are_summed_over_cpus() {
        let text = "cpu=0   \tfound=0 invalid=3 insert=0 drop=1\ncpu=1   \tfound=0 invalid=4 insert=0 drop=0\n";
        assert_eq!(
            super::conntrack_totals(text),
            "conntrack counters: invalid=7 drop=1"
        );
    }
}
