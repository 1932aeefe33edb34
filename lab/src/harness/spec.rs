//! What a lab run is: the network, what both daemons are configured with,
//! and what it must end in. [`Run`](crate::harness::run::Run) builds and
//! starts one; the suites say what to check.

use crate::harness::punchd_types::Transport;
use crate::net::router::RouterSpec;
use crate::net::topology::{Ipv6Plan, Layout, Links, Side};

/// The punch port both daemons use.
pub const PUNCH_PORT: u16 = 40000;
/// alice's forward listener, inside hostA.
pub const FORWARD_LISTEN: &str = "127.0.0.1:10000";
/// The port of [`FORWARD_LISTEN`].
pub const FORWARD_PORT: u16 = 10000;
/// The sink bob exposes, inside hostB.
pub const SINK_LISTEN: &str = "127.0.0.1:9000";

/// What a scenario should end in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// A direct path.
    Direct,
    /// No direct path; the relay carries the tunnel (still end-to-end TLS).
    Relayed,
    /// No direct path, reported as a failed punch (no relay fallback).
    PunchFails,
}

/// A scenario to run.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Short name; also the namespace prefix.
    pub name: String,
    /// The network.
    pub layout: Layout,
    /// The expected outcome.
    pub expect: Expect,
    /// Bytes to move (split over `streams`).
    pub bytes: u64,
    /// Parallel streams.
    pub streams: usize,
    /// Extra `[punch]` lines for both daemons.
    pub punch_extra: String,
    /// `[punch] transports` for both daemons. With one, a direct path must
    /// use it; with both, the race must keep one and close the other.
    pub transports: Vec<Transport>,
    /// The transport a direct path must end on (`None`: either).
    pub expect_transport: Option<Transport>,
    /// `[punch] timeout` for both daemons.
    pub punch_timeout: String,
    /// Internet link emulation (delay, jitter, loss), if any.
    pub links: Option<Links>,
    /// Run the rendezvous from this container image (as `deploy/` ships
    /// it) instead of the workspace binary.
    pub rendezvous_image: Option<String>,
    /// `rendezvous.toml` for the workspace server (its listen address is
    /// overridden), e.g. to raise the relay's bandwidth cap for a benchmark.
    pub rendezvous_config: Option<String>,
    /// An nftables rule set loaded in bob's host before the daemons start
    /// (a misbehaving network on his side).
    pub host_b_rules: Option<String>,
    /// Router daemons (miniupnpd) started on these sides' NATs before the
    /// daemons, for port mapping.
    pub routers: Vec<(Side, RouterSpec)>,
    /// Rendezvous instances (1: `[rendezvous] url`; more: `urls`, the
    /// first on the usual host, the others on extra rendezvous hosts).
    pub rendezvous_instances: usize,
    /// A real `redis-server` on the first rendezvous host (203.0.113.1:6379)
    /// shared by every instance (`redis`, each its own `public_url`), and
    /// the daemons spread: bob's `urls` start at the second instance.
    pub redis: bool,
    /// TOML appended to alice's and bob's `peer.toml` (more `[[forward]]`
    /// and `[[expose]]` entries).
    pub extra_config: (String, String),
    /// IPv6 on the network (two-NAT layouts), and which side has what.
    pub ipv6: Option<Ipv6Plan>,
    /// alice starts this long after bob (bob registered and his UDP
    /// endpoint observed before her first punch order); zero by default.
    pub alice_after: std::time::Duration,
}

impl Scenario {
    /// The standard scenario: 64 MiB over 8 streams.
    pub fn new(name: &str, layout: Layout, expect: Expect) -> Self {
        Self {
            name: name.to_owned(),
            layout,
            expect,
            bytes: 64 * 1024 * 1024,
            streams: 8,
            punch_extra: String::new(),
            transports: vec![Transport::Tcp],
            expect_transport: Some(Transport::Tcp),
            punch_timeout: "10s".to_owned(),
            links: None,
            rendezvous_image: None,
            rendezvous_config: None,
            host_b_rules: None,
            routers: Vec::new(),
            rendezvous_instances: 1,
            redis: false,
            extra_config: (String::new(), String::new()),
            ipv6: None,
            alice_after: std::time::Duration::ZERO,
        }
    }
}

impl Scenario {
    /// Runs `n` rendezvous instances; the daemons list them all in
    /// `[rendezvous] urls`.
    pub fn with_rendezvous_instances(mut self, n: usize) -> Self {
        self.rendezvous_instances = n.max(1);
        self
    }

    /// A rendezvous cluster: `n` instances sharing a real `redis-server`,
    /// alice on the first, bob on the second.
    pub fn with_cluster(mut self, n: usize) -> Self {
        self.rendezvous_instances = n.max(2);
        self.redis = true;
        self
    }

    /// Sets `[punch] timeout`.
    pub fn with_timeout(mut self, t: &str) -> Self {
        t.clone_into(&mut self.punch_timeout);
        self
    }

    /// Emulates these internet links.
    pub fn with_links(mut self, links: Links) -> Self {
        self.links = Some(links);
        self
    }

    /// Runs the rendezvous from a container image.
    pub fn with_rendezvous_image(mut self, image: &str) -> Self {
        self.rendezvous_image = Some(image.to_owned());
        self
    }

    /// Sets `[punch] transports` (the default here is TCP alone: most
    /// scenarios are about the timed simultaneous open).
    pub fn with_transports(mut self, t: &[Transport]) -> Self {
        self.transports = t.to_vec();
        self.expect_transport = match t {
            [only] => Some(*only),
            _ => None,
        };
        self
    }

    /// The transport a direct path must end on, when several are raced.
    pub fn expecting_transport(mut self, t: Transport) -> Self {
        self.expect_transport = Some(t);
        self
    }

    /// Loads this nftables rule set in bob's host before anything starts.
    pub fn with_host_b_rules(mut self, nft: &str) -> Self {
        self.host_b_rules = Some(nft.to_owned());
        self
    }

    /// Runs a router daemon (miniupnpd) on `side`'s NAT.
    pub fn with_router(mut self, side: Side, spec: RouterSpec) -> Self {
        self.routers.push((side, spec));
        self
    }

    /// IPv6 as `plan` says (see [`crate::net::topology::Topology::add_ipv6`]).
    pub fn with_ipv6(mut self, plan: Ipv6Plan) -> Self {
        self.ipv6 = Some(plan);
        self
    }

    /// Appends `alice` to alice's `peer.toml` and `bob` to bob's (after
    /// the standard sink forward and expose).
    pub fn with_config(mut self, alice: &str, bob: &str) -> Self {
        self.extra_config = (alice.to_owned(), bob.to_owned());
        self
    }

    /// Adds `[punch]` lines.
    pub fn with_punch(mut self, lines: &str) -> Self {
        self.punch_extra.push_str(lines);
        self.punch_extra.push('\n');
        self
    }
}
