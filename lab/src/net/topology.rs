//! The lab's address plan and layouts, built from namespaces and veths.
//!
//! ```text
//!   hostA 192.0.2.2 ── natA ──┐                    ┌── natB ── hostB 198.51.100.2
//!              (192.0.2.1)    │ 203.0.113.2    .3  │    (198.51.100.1)
//!                             └──── inet (br0) ────┘
//!                                      │
//!                               rv 203.0.113.1 (punch-rendezvous)
//! ```
//!
//! Variants: both hosts on one LAN behind natA; hostB directly on the
//! internet (203.0.113.3); hostA behind a home NAT (100.64.0.2) behind a
//! carrier NAT (100.64.0.1 / 203.0.113.2). IPv6 on the two-NAT layout
//! ([`Topology::add_ipv6`]): 2001:db8::/64 on the internet segment,
//! 2001:db8:a::/64 and 2001:db8:b::/64 behind the routers, which forward
//! it without NAT through a stateful firewall. Only TEST-NET, shared and
//! documentation ranges are used, and nothing is routed out of the
//! namespaces.

use std::path::Path;

use anyhow::Result;

use crate::net::linkem::{self, Impairment};
use crate::net::nat::{ruleset_at, NatBehaviour};
use crate::net::netns::{remove_all, Netns};

/// The rendezvous host's address.
pub const RENDEZVOUS_IP: &str = "203.0.113.1";

/// The address of the `i`-th extra rendezvous host (a cluster's further
/// instances, `{prefix}rv2`, `{prefix}rv3`, ...): 203.0.113.11 onwards.
pub fn extra_rendezvous_ip(i: usize) -> String {
    format!("203.0.113.{}", 11 + i)
}

/// Which network the scenario builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Each host behind its own NAT of this flavour.
    TwoNats(NatBehaviour),
    /// Both hosts on one LAN behind one NAT.
    SameNat,
    /// hostA behind a NAT, hostB with a public address.
    OnePublic,
    /// hostA behind a home NAT behind a carrier NAT; hostB behind a NAT.
    DoubleNat,
    /// Each host behind its own NAT, of two flavours (natA's, natB's).
    Mixed(NatBehaviour, NatBehaviour),
    /// As [`Layout::Mixed`], with a router hop in front of natB: every
    /// packet between natB and the rest of the internet crosses one more
    /// router, so a packet sent with a small TTL expires on the way
    /// between the two NATs (birthday probing's TTL-limited opening).
    MixedHop(NatBehaviour, NatBehaviour),
}

/// A built network. Dropping it removes every namespace (and kills every
/// process in them).
#[derive(Debug)]
pub struct Topology {
    /// Host running alice (the side with the forward).
    pub host_a: Netns,
    /// Host running bob (the side exposing the service).
    pub host_b: Netns,
    /// The rendezvous host.
    pub rv: Netns,
    /// Further rendezvous hosts (see [`Topology::add_rendezvous_host`]).
    pub extra_rv: Vec<Netns>,
    /// NATs, outermost last (for `conntrack -F` and captures).
    pub nats: Vec<Netns>,
    /// The internet switch.
    pub inet: Netns,
    /// The address alice should reach bob at.
    pub bob_seen_from_alice: String,
    /// The address bob should reach alice at.
    pub alice_seen_from_bob: String,
    /// Index in `nats` of the NAT facing the internet on alice's side.
    pub outer_nat_a: Option<usize>,
    /// Index in `nats` of the NAT facing the internet on bob's side.
    pub outer_nat_b: Option<usize>,
    /// IPv6, when [`Topology::add_ipv6`] added it.
    pub ipv6: Option<Ipv6Plan>,
    /// Routers that are neither NATs nor hosts ([`Layout::MixedHop`]).
    pub routers: Vec<Netns>,
    prefix: String,
}

/// Which host's uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// alice's (hostA).
    A,
    /// bob's (hostB).
    B,
}

fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ])?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])?;
    Ok(())
}

fn addr(ns: &Netns, ifname: &str, cidr: &str) -> Result<()> {
    ns.ip(&["addr", "add", cidr, "dev", ifname]).map(|_| ())
}

fn route_default(ns: &Netns, via: &str) -> Result<()> {
    ns.ip(&["route", "add", "default", "via", via]).map(|_| ())
}

/// Connects `ns`'s `ifname` to the internet bridge.
fn to_internet(inet: &Netns, ns: &Netns, ifname: &str, port: &str, cidr: &str) -> Result<()> {
    veth(ns, ifname, inet, port)?;
    inet.ip(&["link", "set", port, "master", "br0"])?;
    addr(ns, ifname, cidr)
}

fn make_nat(name: &str, behaviour: NatBehaviour) -> Result<Netns> {
    make_nat_at(name, behaviour, None)
}

/// A NAT whose public address is `public` (for flavours that name it).
fn make_nat_at(name: &str, behaviour: NatBehaviour, public: Option<&str>) -> Result<Netns> {
    let ns = Netns::create(name)?;
    ns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
    ns.nft(&ruleset_at(behaviour, public))?;
    Ok(ns)
}

/// A host behind `nat` on a point-to-point LAN.
fn lan_host(
    nat: &Netns,
    host: &Netns,
    nat_if: &str,
    nat_cidr: &str,
    host_cidr: &str,
    gateway: &str,
) -> Result<()> {
    veth(nat, nat_if, host, "eth0")?;
    addr(nat, nat_if, nat_cidr)?;
    addr(host, "eth0", host_cidr)?;
    route_default(host, gateway)
}

/// The address plan of one side's NAT and host.
struct SidePlan {
    nat: &'static str,
    port: &'static str,
    public: &'static str,
    gateway: &'static str,
    gateway_cidr: &'static str,
    host: &'static str,
}

const SIDE_A: SidePlan = SidePlan {
    nat: "natA",
    port: "p-natA",
    public: "203.0.113.2/24",
    gateway: "192.0.2.1",
    gateway_cidr: "192.0.2.1/24",
    host: "192.0.2.2/24",
};
const SIDE_B: SidePlan = SidePlan {
    nat: "natB",
    port: "p-natB",
    public: "203.0.113.3/24",
    gateway: "198.51.100.1",
    gateway_cidr: "198.51.100.1/24",
    host: "198.51.100.2/24",
};

/// A NAT on the internet with `host` on its LAN, per `side`'s address plan.
fn side_nat(
    name: &str,
    behaviour: NatBehaviour,
    inet: &Netns,
    host: &Netns,
    side: &SidePlan,
) -> Result<Netns> {
    let ip = side.public.split('/').next();
    let nat = make_nat_at(name, behaviour, ip)?;
    to_internet(inet, &nat, "wan0", side.port, side.public)?;
    side_lan(&nat, host, side)?;
    Ok(nat)
}

/// `host` on `nat`'s LAN, per `side`'s address plan.
fn side_lan(nat: &Netns, host: &Netns, side: &SidePlan) -> Result<()> {
    lan_host(
        nat,
        host,
        "lan0",
        side.gateway_cidr,
        side.host,
        side.gateway,
    )
}

/// The router in front of natB ([`Layout::MixedHop`]): on the internet
/// switch at this address, answering ARP there for natB's public address
/// (proxy ARP), so natB keeps 203.0.113.3 and nothing else in the lab
/// changes, but every packet to or from natB is routed once more.
const HOP_IP: &str = "203.0.113.4";

/// natB (public 203.0.113.3, as in [`SIDE_B`]) with hostB on its LAN,
/// joined to the internet through a router `hop_name`. The link between
/// them is unnumbered: natB's 203.0.113.3/32 and the router's
/// 203.0.113.4/32, each with a host route to the other.
fn side_nat_behind_hop(
    name: &str,
    hop_name: &str,
    behaviour: NatBehaviour,
    inet: &Netns,
    host: &Netns,
) -> Result<(Netns, Netns)> {
    let side = &SIDE_B;
    let public = side.public.split('/').next().unwrap_or("203.0.113.3");
    let hop = Netns::create(hop_name)?;
    hop.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
    to_internet(inet, &hop, "eth0", "p-hop", &format!("{HOP_IP}/24"))?;
    let nat = make_nat_at(name, behaviour, Some(public))?;
    veth(&hop, "lan0", &nat, "wan0")?;
    addr(&hop, "lan0", &format!("{HOP_IP}/32"))?;
    hop.ip(&["route", "add", &format!("{public}/32"), "dev", "lan0"])?;
    hop.exec("sysctl", &["-qw", "net.ipv4.conf.eth0.proxy_arp=1"])?;
    addr(&nat, "wan0", &format!("{public}/32"))?;
    nat.ip(&["route", "add", &format!("{HOP_IP}/32"), "dev", "wan0"])?;
    nat.ip(&["route", "add", "default", "via", HOP_IP, "dev", "wan0"])?;
    side_lan(&nat, host, side)?;
    Ok((nat, hop))
}

impl Topology {
    /// Builds `layout` with namespace names starting with `prefix`,
    /// first removing anything a crashed run left under that prefix.
    pub fn build(prefix: &str, layout: Layout) -> Result<Self> {
        remove_all(prefix);
        let n = |role: &str| format!("{prefix}{role}");
        let inet = Netns::create(&n("inet"))?;
        inet.ip(&["link", "add", "br0", "type", "bridge"])?;
        inet.ip(&["link", "set", "br0", "up"])?;
        let rv = Netns::create(&n("rv"))?;
        to_internet(&inet, &rv, "eth0", "p-rv", &format!("{RENDEZVOUS_IP}/24"))?;
        let host_a = Netns::create(&n("hostA"))?;
        let host_b = Netns::create(&n("hostB"))?;
        let mut nats = Vec::new();
        let mut routers = Vec::new();
        let (outer_a, outer_b) = match layout {
            Layout::TwoNats(_) | Layout::Mixed(..) | Layout::MixedHop(..) => (Some(0), Some(1)),
            Layout::SameNat => (Some(0), None),
            Layout::OnePublic => (Some(0), None),
            Layout::DoubleNat => (Some(1), Some(2)),
        };
        let (bob_seen, alice_seen) = match layout {
            Layout::TwoNats(b) => {
                let nat_a = side_nat(&n(SIDE_A.nat), b, &inet, &host_a, &SIDE_A)?;
                let nat_b = side_nat(&n(SIDE_B.nat), b, &inet, &host_b, &SIDE_B)?;
                nats.extend([nat_a, nat_b]);
                ("203.0.113.3", "203.0.113.2")
            }
            Layout::Mixed(a, b) => {
                let nat_a = side_nat(&n(SIDE_A.nat), a, &inet, &host_a, &SIDE_A)?;
                let nat_b = side_nat(&n(SIDE_B.nat), b, &inet, &host_b, &SIDE_B)?;
                nats.extend([nat_a, nat_b]);
                ("203.0.113.3", "203.0.113.2")
            }
            Layout::MixedHop(a, b) => {
                let nat_a = side_nat(&n(SIDE_A.nat), a, &inet, &host_a, &SIDE_A)?;
                let (nat_b, hop) =
                    side_nat_behind_hop(&n(SIDE_B.nat), &n("hop"), b, &inet, &host_b)?;
                nats.extend([nat_a, nat_b]);
                routers.push(hop);
                ("203.0.113.3", "203.0.113.2")
            }
            Layout::SameNat => {
                let nat = make_nat(&n("natA"), NatBehaviour::Masquerade)?;
                to_internet(&inet, &nat, "wan0", "p-natA", "203.0.113.2/24")?;
                nat.ip(&["link", "add", "lanbr", "type", "bridge"])?;
                nat.ip(&["link", "set", "lanbr", "up"])?;
                addr(&nat, "lanbr", "192.0.2.1/24")?;
                for (host, port, ip) in [
                    (&host_a, "la", "192.0.2.2/24"),
                    (&host_b, "lb", "192.0.2.3/24"),
                ] {
                    veth(&nat, port, host, "eth0")?;
                    nat.ip(&["link", "set", port, "master", "lanbr"])?;
                    addr(host, "eth0", ip)?;
                    route_default(host, "192.0.2.1")?;
                }
                nats.push(nat);
                ("192.0.2.3", "192.0.2.2")
            }
            Layout::OnePublic => {
                let nat_a = side_nat(
                    &n(SIDE_A.nat),
                    NatBehaviour::Masquerade,
                    &inet,
                    &host_a,
                    &SIDE_A,
                )?;
                to_internet(&inet, &host_b, "eth0", "p-hostB", "203.0.113.3/24")?;
                nats.push(nat_a);
                ("203.0.113.3", "203.0.113.2")
            }
            Layout::DoubleNat => {
                let cgn = make_nat(&n("cgn"), NatBehaviour::Masquerade)?;
                to_internet(&inet, &cgn, "wan0", "p-cgn", "203.0.113.2/24")?;
                let home = make_nat(&n("natA"), NatBehaviour::Masquerade)?;
                veth(&cgn, "lan0", &home, "wan0")?;
                addr(&cgn, "lan0", "100.64.0.1/24")?;
                addr(&home, "wan0", "100.64.0.2/24")?;
                route_default(&home, "100.64.0.1")?;
                lan_host(
                    &home,
                    &host_a,
                    "lan0",
                    "192.0.2.1/24",
                    "192.0.2.2/24",
                    "192.0.2.1",
                )?;
                let nat_b = side_nat(
                    &n(SIDE_B.nat),
                    NatBehaviour::Masquerade,
                    &inet,
                    &host_b,
                    &SIDE_B,
                )?;
                nats.extend([home, cgn, nat_b]);
                ("203.0.113.3", "203.0.113.2")
            }
        };
        Ok(Self {
            host_a,
            host_b,
            rv,
            extra_rv: Vec::new(),
            nats,
            inet,
            bob_seen_from_alice: bob_seen.to_owned(),
            alice_seen_from_bob: alice_seen.to_owned(),
            outer_nat_a: outer_a,
            outer_nat_b: outer_b,
            ipv6: None,
            routers,
            prefix: prefix.to_owned(),
        })
    }

    /// Adds one more rendezvous host on the internet switch, at
    /// [`extra_rendezvous_ip`] of its index: for a rendezvous cluster.
    pub fn add_rendezvous_host(&mut self) -> Result<&Netns> {
        let i = self.extra_rv.len();
        let ns = Netns::create(&format!("{}rv{}", self.prefix, i + 2))?;
        to_internet(
            &self.inet,
            &ns,
            "eth0",
            &format!("p-rv{}", i + 2),
            &format!("{}/24", extra_rendezvous_ip(i)),
        )?;
        self.extra_rv.push(ns);
        Ok(&self.extra_rv[i])
    }

    /// The prefix every namespace of this topology starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Bytes received on bob's host interface (what reached him).
    pub fn host_b_rx_bytes(&self) -> Result<u64> {
        let out = self.host_b.ip(&["-s", "-j", "link", "show", "eth0"])?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(v[0]["stats64"]["rx"]["bytes"].as_u64().unwrap_or(0))
    }

    /// Bytes received + sent on the rendezvous host's interface.
    pub fn rendezvous_bytes(&self) -> Result<u64> {
        let out = self.rv.ip(&["-s", "-j", "link", "show", "eth0"])?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let stats = &v[0]["stats64"];
        let get = |dir: &str| stats[dir]["bytes"].as_u64().unwrap_or(0);
        Ok(get("rx") + get("tx"))
    }
}

/// Uplink and downlink impairments of one internet-facing endpoint.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Link {
    /// Packets it sends into the internet.
    pub up: Impairment,
    /// Packets it receives from the internet.
    pub down: Impairment,
}

impl Link {
    /// No impairment.
    pub const NONE: Link = Link {
        up: Impairment::NONE,
        down: Impairment::NONE,
    };

    /// The same delay each way, in milliseconds.
    pub fn symmetric_ms(ms: u64) -> Self {
        Link {
            up: Impairment::delay_ms(ms),
            down: Impairment::delay_ms(ms),
        }
    }

    /// Adds jitter and loss to both directions.
    pub fn with(mut self, jitter: std::time::Duration, loss: f64) -> Self {
        for d in [&mut self.up, &mut self.down] {
            d.jitter = jitter;
            d.loss = loss;
        }
        self
    }
}

/// The links of one scenario: alice's side, bob's side, the rendezvous.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Links {
    /// alice's outermost NAT to the internet.
    pub a: Link,
    /// bob's outermost NAT (or bob himself, when public) to the internet.
    pub b: Link,
    /// The rendezvous host to the internet.
    pub rv: Link,
}

impl Links {
    /// 5 ms each way on both NATs' internet links (10 ms host to host),
    /// none on the rendezvous's: enough for the two sides' first UDP
    /// datagrams to cross in flight (lab/README.md, "UDP and conntrack").
    pub fn near() -> Self {
        Links {
            a: Link::symmetric_ms(5),
            b: Link::symmetric_ms(5),
            rv: Link::NONE,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Rv,
    Nat(usize),
    HostB,
}

impl Topology {
    fn endpoint_ns(&mut self, e: Endpoint) -> Option<&mut Netns> {
        match e {
            Endpoint::Rv => Some(&mut self.rv),
            Endpoint::Nat(i) => self.nats.get_mut(i),
            Endpoint::HostB => Some(&mut self.host_b),
        }
    }

    /// Emulates `links` on the internet: every internet-facing namespace
    /// delays (and drops) what it receives from each other endpoint by the
    /// sender's uplink plus its own downlink. `tool` is `punch-lab-tool`.
    pub fn emulate(&mut self, links: &Links, tool: &Path, log_dir: &Path) -> Result<()> {
        let mut endpoints = vec![(Endpoint::Rv, "eth0", RENDEZVOUS_IP, links.rv)];
        let mut bound = Vec::new();
        if let Some(a) = self.outer_nat_a {
            endpoints.push((Endpoint::Nat(a), "wan0", "203.0.113.2", links.a));
        }
        match (self.outer_nat_b, self.outer_nat_a) {
            (Some(b), _) => endpoints.push((Endpoint::Nat(b), "wan0", "203.0.113.3", links.b)),
            // bob has a public address of his own.
            (None, _) if self.bob_seen_from_alice == "203.0.113.3" => {
                endpoints.push((Endpoint::HostB, "eth0", "203.0.113.3", links.b))
            }
            // bob shares alice's NAT: his link is hers.
            (None, _) => {}
        }
        for (i, &(receiver, ifname, _, rlink)) in endpoints.iter().enumerate() {
            let mut specs = Vec::new();
            let mut queues = Vec::new();
            for (j, &(_, _, source_ip, slink)) in endpoints.iter().enumerate() {
                if i == j {
                    continue;
                }
                let queue = 20 + j as u16;
                let imp = slink.up.then(rlink.down);
                if imp == Impairment::NONE {
                    continue;
                }
                let ns = self
                    .endpoint_ns(receiver)
                    .ok_or_else(|| anyhow::anyhow!("no namespace for {receiver:?}"))?;
                let args = linkem::rule_args(ifname, source_ip, queue);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                ns.exec("iptables", &args)?;
                specs.push(imp.spec(queue));
                queues.push(queue);
            }
            if specs.is_empty() {
                continue;
            }
            let ns = self
                .endpoint_ns(receiver)
                .ok_or_else(|| anyhow::anyhow!("no namespace for {receiver:?}"))?;
            // The emulator is the lab's network: at nice -20 it keeps its
            // delays when the daemons, captures and tests load both cores
            // (a starved emulator holds packets late, and the timing tests
            // then measure the lab, not punchd).
            let tool_path = tool.to_str().unwrap_or("punch-lab-tool").to_owned();
            let mut args = vec![
                "-n".to_owned(),
                "-20".to_owned(),
                tool_path,
                "linkem".to_owned(),
            ];
            for spec in specs {
                args.extend(["--queue".to_owned(), spec]);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let log = log_dir.join(format!("linkem-{}.log", ns.name()));
            ns.spawn(Path::new("nice"), &args, &[], &log)?;
            bound.push((ns.name().to_owned(), queues, log));
        }
        // Until an emulator has bound its queues, `--queue-bypass` passes
        // packets undelayed: wait until the kernel lists every queue as
        // bound (it takes ~10 ms; a fixed 300 ms sleep used to stand in).
        for (ns, queues, log) in &bound {
            wait_queues_bound(ns, queues, log)?;
        }
        Ok(())
    }

    /// `ping` from alice's host: `count` probes `interval` seconds apart.
    pub fn ping(&self, dst: &str, count: u32, interval: &str) -> Result<Ping> {
        let count_s = count.to_string();
        let out = self.host_a.exec_output(
            "ping",
            &["-n", "-c", &count_s, "-i", interval, "-W", "2", dst],
        )?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        Ping::parse(&text).ok_or_else(|| anyhow::anyhow!("no ping summary from {dst}: {text}"))
    }

    /// The round trips from alice's host whose emulation can be measured
    /// with `ping`, and what each should add: to the rendezvous (alice's
    /// link both ways and the rendezvous's), and to bob's public address
    /// when he has one of his own (his NAT or himself answers the ping).
    pub fn emulated_round_trips(&self, links: &Links) -> Vec<(String, Impairment)> {
        let round = |far: Link| links.a.up.then(far.down).then(far.up).then(links.a.down);
        let mut out = vec![(RENDEZVOUS_IP.to_owned(), round(links.rv))];
        // bob's public address (his NAT's, or his own); a bob behind
        // alice's NAT has no link of his own.
        if self.bob_seen_from_alice == "203.0.113.3" {
            out.push((self.bob_seen_from_alice.clone(), round(links.b)));
        }
        out.retain(|(_, imp)| *imp != Impairment::NONE);
        out
    }
}

/// What `ping` measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ping {
    /// Probes sent.
    pub sent: u32,
    /// Replies received.
    pub received: u32,
    /// Fastest round trip, ms (NaN with no reply).
    pub min_ms: f64,
    /// Median round trip, ms (NaN with no reply): unlike the mean, not
    /// moved by one probe that waited for a CPU on a loaded machine.
    pub median_ms: f64,
}

impl Ping {
    /// Reads each reply's `time=X ms` and the `N packets transmitted, M
    /// received` summary.
    pub fn parse(text: &str) -> Option<Ping> {
        let counts: Vec<u32> = text
            .lines()
            .find(|l| l.contains("packets transmitted"))?
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse().ok())
            .collect();
        let mut rtts: Vec<f64> = text
            .lines()
            .filter_map(|l| {
                l.split("time=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .collect();
        rtts.sort_by(f64::total_cmp);
        Some(Ping {
            sent: *counts.first()?,
            received: *counts.get(1)?,
            min_ms: rtts.first().copied().unwrap_or(f64::NAN),
            median_ms: rtts.get(rtts.len() / 2).copied().unwrap_or(f64::NAN),
        })
    }
}

/// Waits until `/proc/net/netfilter/nfnetlink_queue` in `ns` lists every
/// one of `queues` (the emulator bound them), or fails with its log.
fn wait_queues_bound(ns: &str, queues: &[u16], log: &Path) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let out = crate::net::netns::run(
            "ip",
            &[
                "netns",
                "exec",
                ns,
                "cat",
                "/proc/net/netfilter/nfnetlink_queue",
            ],
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        let listed: Vec<u16> = text
            .lines()
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect();
        if queues.iter().all(|q| listed.contains(q)) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!(
                "the link emulator in {ns} did not bind queues {queues:?} within 10 s (bound: {listed:?}); its log: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_summary_is_read() {
        let text = "64 bytes from 203.0.113.1: icmp_seq=1 ttl=63 time=40.6 ms\n\
                    64 bytes from 203.0.113.1: icmp_seq=2 ttl=63 time=90.2 ms\n\
                    64 bytes from 203.0.113.1: icmp_seq=3 ttl=63 time=40.1 ms\n\
                    --- 203.0.113.1 ping statistics ---\n\
                    4 packets transmitted, 3 received, 25% packet loss, time 60ms\n\
                    rtt min/avg/max/mdev = 40.1/57.0/90.2/23.5 ms\n";
        let p = Ping::parse(text).unwrap();
        assert_eq!((p.sent, p.received), (4, 3));
        assert!((p.min_ms - 40.1).abs() < 1e-9 && (p.median_ms - 40.6).abs() < 1e-9);
        let none = Ping::parse("3 packets transmitted, 0 received, 100% packet loss\n").unwrap();
        assert!(none.received == 0 && none.min_ms.is_nan());
        assert!(Ping::parse("ping: unknown host").is_none());
    }
}

/// The rendezvous host's IPv6 address (with [`Topology::add_ipv6`]).
pub const RENDEZVOUS_IP6: &str = "2001:db8::1";

/// What one side's host speaks once [`Topology::add_ipv6`] ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stack {
    /// IPv4 behind its NAT and IPv6 routed by the same router.
    Dual,
    /// IPv6 only: the host's IPv4 address and route are removed.
    V6Only,
    /// IPv4 only: no IPv6 on this side at all.
    V4Only,
}

/// How the IPv6 routers' stateful firewalls treat what comes in from
/// the internet. Inbound is always allowed for established and related
/// flows (what a host inside started, and RFC 6092's simultaneous open).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V6Firewall {
    /// Unsolicited inbound is dropped.
    Drop,
    /// Unsolicited inbound TCP gets a RST, anything else an ICMPv6
    /// administratively-prohibited.
    Reject,
    /// As `Drop`, and every IPv6 packet between the two sites is dropped
    /// both ways (the rendezvous stays reachable): IPv6 is broken.
    BetweenSitesBroken,
}

/// IPv6 on a [`Layout::TwoNats`] network: which sides have it, and the
/// routers' firewall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Plan {
    /// alice's side.
    pub a: Stack,
    /// bob's side.
    pub b: Stack,
    /// Both routers' IPv6 firewall.
    pub firewall: V6Firewall,
    /// Dual-stack hosts reach the rendezvous by [`RENDEZVOUS_NAME`], which
    /// resolves (their own /etc/hosts) to its IPv4 and IPv6 addresses: the
    /// daemons register over one family and show the server the other.
    /// [`Ipv6Plan::dual`] sets it: a server that never saw a host over
    /// IPv6 passes its IPv6 addresses to peers in its own site only (they
    /// are self-reported; issue #24), so across sites only the address the
    /// server observed makes an IPv6 candidate.
    pub by_name: bool,
}

impl Ipv6Plan {
    /// Both sides dual stack behind `firewall`, reaching the rendezvous by
    /// name (see `by_name`).
    pub fn dual(firewall: V6Firewall) -> Self {
        Self {
            a: Stack::Dual,
            b: Stack::Dual,
            firewall,
            by_name: true,
        }
    }
}

/// The rendezvous's name with [`Ipv6Plan::by_name`] (RFC 2606's reserved
/// `.example`; only the lab hosts' own /etc/hosts knows it).
pub const RENDEZVOUS_NAME: &str = "rendezvous.example";

/// The IPv6 plan of one side (2001:db8::/32 only): the router's address
/// on the internet segment 2001:db8::/64 and its LAN /64.
struct Side6 {
    wan: &'static str,
    lan_prefix: &'static str,
    gateway: &'static str,
    host: &'static str,
}

const SIDE6_A: Side6 = Side6 {
    wan: "2001:db8::2",
    lan_prefix: "2001:db8:a::/64",
    gateway: "2001:db8:a::1",
    host: "2001:db8:a::2",
};
const SIDE6_B: Side6 = Side6 {
    wan: "2001:db8::3",
    lan_prefix: "2001:db8:b::/64",
    gateway: "2001:db8:b::1",
    host: "2001:db8:b::2",
};

/// The IPv6 router's nftables ruleset: forwarding without NAT, stateful.
pub fn firewall6(f: V6Firewall) -> String {
    let broken = match f {
        V6Firewall::BetweenSitesBroken => {
            format!("ip6 saddr != {RENDEZVOUS_IP6} ip6 daddr != {RENDEZVOUS_IP6} drop; ")
        }
        _ => String::new(),
    };
    let unsolicited = match f {
        V6Firewall::Reject => {
            "iifname \"wan0\" meta l4proto tcp reject with tcp reset; \
             iifname \"wan0\" reject with icmpv6 type admin-prohibited;"
        }
        _ => "iifname \"wan0\" drop;",
    };
    format!(
        "table ip6 lab_fw6 {{\n  chain forward {{ type filter hook forward priority 0; policy accept; \
         {broken}ct state established,related accept; {unsolicited} }}\n}}\n"
    )
}

fn addr6(ns: &Netns, ifname: &str, cidr: &str) -> Result<()> {
    // nodad: usable at once, no duplicate address detection to wait out.
    ns.ip(&["-6", "addr", "add", cidr, "dev", ifname, "nodad"])
        .map(|_| ())
}

fn no_dad(ns: &Netns) -> Result<()> {
    ns.exec(
        "sysctl",
        &[
            "-qw",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ],
    )
    .map(|_| ())
}

impl Topology {
    /// Adds IPv6 to a [`Layout::TwoNats`] network: the rendezvous at
    /// [`RENDEZVOUS_IP6`] on the internet segment 2001:db8::/64, each
    /// side's NAT also an IPv6 router (forwarding, no NAT, the stateful
    /// firewall of `plan`) for its LAN 2001:db8:a::/64 or 2001:db8:b::/64,
    /// and each host on it as `plan` says. When both sides have IPv6
    /// that works between them, the addresses each should reach the other
    /// at become the IPv6 ones.
    pub fn add_ipv6(&mut self, plan: Ipv6Plan) -> Result<()> {
        let (Some(ia), Some(ib)) = (self.outer_nat_a, self.outer_nat_b) else {
            anyhow::bail!("IPv6 is built on the two-NAT layout only");
        };
        // Without this, the bridge's MLD snooping drops the first neighbor
        // solicitation to a router that has sent no MLD report yet (nodad
        // skips the one DAD would send), and a punch's first SYN waited
        // out the 1 s neighbor-discovery retransmit in the router's queue.
        self.inet.ip(&[
            "link",
            "set",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        no_dad(&self.rv)?;
        addr6(&self.rv, "eth0", &format!("{RENDEZVOUS_IP6}/64"))?;
        for (stack, side, i, host) in [
            (plan.a, &SIDE6_A, ia, &self.host_a),
            (plan.b, &SIDE6_B, ib, &self.host_b),
        ] {
            if stack == Stack::V4Only {
                continue;
            }
            let nat = &self.nats[i];
            no_dad(nat)?;
            no_dad(host)?;
            nat.exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"])?;
            addr6(nat, "wan0", &format!("{}/64", side.wan))?;
            addr6(nat, "lan0", &format!("{}/64", side.gateway))?;
            nat.nft(&firewall6(plan.firewall))?;
            addr6(host, "eth0", &format!("{}/64", side.host))?;
            host.ip(&["-6", "route", "add", "default", "via", side.gateway])?;
            self.rv
                .ip(&["-6", "route", "add", side.lan_prefix, "via", side.wan])?;
            if stack == Stack::V6Only {
                host.ip(&["-4", "addr", "flush", "dev", "eth0"])?;
            }
            if plan.by_name && stack == Stack::Dual {
                crate::net::netns::set_hosts(
                    host.name(),
                    &format!(
                        "127.0.0.1 localhost\n::1 localhost\n{RENDEZVOUS_IP} {RENDEZVOUS_NAME}\n{RENDEZVOUS_IP6} {RENDEZVOUS_NAME}\n"
                    ),
                )?;
            }
        }
        // Each router reaches the other side's LAN through its router.
        for (stack, i, other, other_stack) in [
            (plan.a, ia, &SIDE6_B, plan.b),
            (plan.b, ib, &SIDE6_A, plan.a),
        ] {
            if stack != Stack::V4Only && other_stack != Stack::V4Only {
                self.nats[i].ip(&["-6", "route", "add", other.lan_prefix, "via", other.wan])?;
            }
        }
        // Neighbor discovery once, before anything is measured: a router's
        // first packet to a neighbor waits in its queue until the
        // neighbor answers, and in namespaces seconds old that took up to
        // a second (a punch's first SYN held at the router for 1 s).
        let mut warm: Vec<(&Netns, &str)> = Vec::new();
        for (stack, side, host) in [
            (plan.a, &SIDE6_A, &self.host_a),
            (plan.b, &SIDE6_B, &self.host_b),
        ] {
            if stack != Stack::V4Only {
                warm.push((host, RENDEZVOUS_IP6));
                warm.push((&self.rv, side.host));
            }
        }
        if plan.a != Stack::V4Only && plan.b != Stack::V4Only {
            warm.push((&self.host_a, SIDE6_B.wan));
            warm.push((&self.host_b, SIDE6_A.wan));
        }
        for (ns, to) in warm {
            // A lost ping costs nothing but its wait; the test measures the rest.
            let _ = ns.exec("ping", &["-6", "-c", "1", "-W", "1", to]);
        }
        let both = plan.a != Stack::V4Only && plan.b != Stack::V4Only;
        let v6_path = both && plan.firewall != V6Firewall::BetweenSitesBroken;
        // The daemons' happy eyeballs prefer IPv6 where it works.
        if v6_path {
            self.bob_seen_from_alice = format!("[{}]", SIDE6_B.host);
            self.alice_seen_from_bob = format!("[{}]", SIDE6_A.host);
        }
        self.ipv6 = Some(plan);
        Ok(())
    }
}
